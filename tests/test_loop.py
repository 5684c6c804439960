"""The self-play loop: a scripted policy drives every branch; the tiny model runs it end to end."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import azr_mini
from collections import Counter
from dataclasses import fields
from rewards import known_proposals
from run import Timer, build_parser, buffers_from_json, latest_checkpoint, load_checkpoint, step_metrics
from azr_mini import Config, Episode, parse_args, self_play_step, train, trr_update
from executor import Executor
from policy import Completion
from prompts import ABDUCTION, DEDUCTION, INDUCTION, PROPOSE, SEED_TRIPLET, SOLVE, InductionTask, Triplet
from rewards import trr_advantages
from scripted import HalfScripted, TINY_FLAGS, answer, kind_of, metrics, run_tiny, without_timings

ROOT = Path(__file__).resolve().parents[1]


class ScriptedPolicy:
    """Stands in for Policy: returns chosen completions, in order, per (task type, role)."""

    def __init__(self, script: dict[tuple[str, str], list[str]]):
        self.script = {k: list(v) for k, v in script.items()}
        self.device = torch.device("cpu")
        self.param = torch.nn.Parameter(torch.zeros(1))
        self.logprob_calls = []

    def format_chat(self, messages: list[dict], prefill: str = "") -> str:
        return messages[-1]["content"] + "\n<assistant>" + prefill

    def generate(self, prompts, **kwargs) -> list[Completion]:
        out = []
        for p in prompts:
            text = self.script[kind_of(p)].pop(0)
            out.append(Completion([1, 2, 3], [ord(c) % 500 for c in text] or [0], text, truncated=False))
        return out

    def token_logprobs(self, prompt_ids, completion_ids):
        T = max(len(c) for c in completion_ids)
        logp = torch.zeros(len(completion_ids), T, requires_grad=True)   # [B, T] leaf: grads are dL/dlogp
        mask = torch.tensor([[t < len(c) for t in range(T)] for c in completion_ids])
        self.logprob_calls.append((logp, completion_ids))
        return logp, mask

    def trainable_parameters(self):
        return [self.param]


def scripted_step(rule: str, train_rollouts: bool = False):
    cfg = Config(model="tiny", batch_size=2, learnability_rollouts=2, n_inputs=4, reward_rule=rule,
                 train_rollouts=train_rollouts)
    induction_seed = InductionTask("def f(a):\n    return a * 2", "doubles", (("1", "2"), ("3", "6")),
                                   (("5", "10"), ("0", "0")))
    buffers = {DEDUCTION: [SEED_TRIPLET], ABDUCTION: [SEED_TRIPLET], INDUCTION: [induction_seed]}
    script = {
        (DEDUCTION, PROPOSE): [answer(("python", "def f(s):\n    return s[::-1]"), ("input", "'abc'")),
                               answer(("python", "import os\ndef f(a):\n    return a"), ("input", "1"))],
        (ABDUCTION, PROPOSE): ["no tags at all",
                               answer(("python", "def f(x):\n    return x + 1"), ("input", "41"),
                                      think="I will outsmart the humans")],
        (INDUCTION, PROPOSE): [answer(("input", "1"), ("input", "'a'"), ("input", "[1]"), ("input", "2"),
                                      ("message", "returns its input")),
                               answer(("input", "1"), ("message", "too few inputs"))],
        # learnability rollouts first (2 per valid proposal), then the solve batch (new tasks first)
        (DEDUCTION, SOLVE): [answer(("output", "'cba'")), answer(("output", "'abc'")),
                             answer(("output", "'cba'")), "garbage"],
        (ABDUCTION, SOLVE): [answer(("input", "41")), answer(("input", "40")),
                             answer(("input", "41")), answer(("input", "'zzz'"))],
        (INDUCTION, SOLVE): [answer(("python", "def f(a):\n    return a")), answer(("python", "def f(b):\n    return b")),
                             answer(("python", "def f(a):\n    return a")), answer(("python", "def f(a):\n    return a * 3"))],
    }
    policy = ScriptedPolicy(script)
    before = {t: list(b) for t, b in buffers.items()}
    import random
    with Executor(timeout_s=2, workers=2) as ex:
        episodes, rollouts, new_tasks = self_play_step(policy, ex, buffers, random.Random(0), cfg, Timer())
    assert buffers == before                       # the step commits nothing itself
    assert all(not v for v in policy.script.values())   # every scripted completion was used
    return cfg, policy, episodes, rollouts, new_tasks


@pytest.mark.parametrize("rule,trivial_reward", [("paper", 0.0), ("official", -0.5)])
def test_scripted_policy_drives_every_branch(rule, trivial_reward):
    cfg, policy, episodes, rollouts, new_tasks = scripted_step(rule)
    rewards = {(e.request.task_type, e.request.role): [] for e in episodes}
    for e in episodes:
        rewards[(e.request.task_type, e.request.role)].append(e.reward)
    # proposers: valid with rbar = 1/2 -> 1 - 1/2; invalid (banned import), no tags, too few inputs -> -1;
    # a valid induction task solved by both rollouts is trivial (rbar = 1) -> 0 (paper) or -0.5 (code)
    assert rewards[(DEDUCTION, PROPOSE)] == [0.5, -1.0]
    assert rewards[(ABDUCTION, PROPOSE)] == [-1.0, 0.5]
    assert rewards[(INDUCTION, PROPOSE)] == [trivial_reward, -1.0]
    # solvers: correct -> 1, well formed but wrong -> -0.5, format error -> -1
    assert rewards[(DEDUCTION, SOLVE)] == [1.0, -1.0]
    assert rewards[(ABDUCTION, SOLVE)] == [1.0, -0.5]
    assert rewards[(INDUCTION, SOLVE)] == [1.0, -0.5]
    # the proposals' tasks, with outputs computed by the executor
    assert new_tasks[DEDUCTION] == [Triplet("def f(s):\n    return s[::-1]", "'abc'", "'cba'")]
    assert new_tasks[ABDUCTION] == [Triplet("def f(x):\n    return x + 1", "41", "42")]
    [induction] = new_tasks[INDUCTION]
    assert induction.visible == (("1", "1"), ("'a'", "'a'")) and induction.hidden == (("[1]", "[1]"), ("2", "2"))
    assert [e.r_role for e in rollouts] == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    # Eq. 8 advantages: six groups of two different rewards -> +-1/sqrt(2), 0 where rewards are equal
    expected = trr_advantages([(e.request.task_type, e.request.role, e.reward) for e in episodes])
    assert [e.advantage for e in episodes] == expected
    assert all(math.isclose(abs(a), 2 ** -0.5, rel_tol=1e-5) for a in expected)
    # the monitor flags the alarming chain of thought
    assert [e.alarms for e in episodes if e.alarms] == [["outsmart"]]

    # what reaches the loss (token-mean): dL/dlogp_t = -w_i A_i / sum_j |y_j| on each real token,
    # w = lambda for solvers
    cfg.solver_weight = 0.5
    all_tokens = sum(len(e.completion_ids) for e in episodes)
    update = trr_update(policy, torch.optim.AdamW(policy.trainable_parameters()), episodes, cfg)
    assert update["trained_sequences"] == len(episodes)
    by_ids = {tuple(e.completion_ids): e for e in episodes}
    for logp, completions in policy.logprob_calls:
        for row, ids in enumerate(completions):
            e = by_ids[tuple(ids)]
            w = cfg.solver_weight if e.request.role == SOLVE else 1.0
            want = -w * e.advantage / all_tokens
            assert torch.allclose(logp.grad[row, : len(ids)], torch.full((len(ids),), want), atol=1e-7)
            assert torch.all(logp.grad[row, len(ids):] == 0)


def test_training_on_the_learnability_rollouts():
    """--train-rollouts: the rollouts join their type's solver group (rewards as graded for Eq. 4,
    advantages over the whole group), the proposers' rewards do not change, and the metrics count
    the trained responses per (type, role)."""
    _, _, plain, plain_rollouts, _ = scripted_step("paper")
    cfg, _, episodes, rollouts, _ = scripted_step("paper", train_rollouts=True)
    assert rollouts == []                                          # nothing left untrained
    trained_rollouts = [e for e in episodes if e.request.phase == "learnability"]
    assert [e.text for e in trained_rollouts] == [e.text for e in plain_rollouts]
    assert [e.reward for e in trained_rollouts] == [1.0, -0.5, 1.0, -0.5, 1.0, 1.0]
    solvers = [e for e in episodes if e.request.role == SOLVE and e.request.task_type == DEDUCTION]
    assert [e.reward for e in solvers] == [1.0, -1.0, 1.0, -0.5]   # solve batch, then the rollouts
    assert [e.advantage for e in episodes] == trr_advantages(
        [(e.request.task_type, e.request.role, e.reward) for e in episodes])
    assert [e.reward for e in episodes if e.request.role == PROPOSE] == \
        [e.reward for e in plain if e.request.role == PROPOSE]
    m = step_metrics(1, episodes, rollouts, {t: [] for t in (DEDUCTION, ABDUCTION, INDUCTION)}, 0,
                              Counter(), Timer(), {})
    assert m["trained/deduction/solve"] == 4 and m["trained/induction/solve"] == 4   # 2 + 2 rollouts
    assert m["trained/deduction/propose"] == 2
    assert m["accuracy/deduction"] == 0.5                           # the solve batch alone, as before
    # the pool's diversity signals: no valid proposal borrows the worked example; a solve batch drawn
    # from a one-task buffer after the new task repeats tasks
    assert m["example_reuse"] == 0.0
    batch = [(e.request.task_type, e.request.task) for e in episodes if e.request.phase == "solve"]
    assert m["solve_repeats"] == sum(pair in batch[:k] for k, pair in enumerate(batch)) / len(batch) > 0


def test_zero_advantages_are_not_trained():
    policy = ScriptedPolicy({})
    req = azr_mini.Request(DEDUCTION, SOLVE, "p", "solve")
    episodes = [Episode(req, [1], [5, 6], "x", False, advantage=0.0),
                Episode(req, [1], [7], "y", False, advantage=1.0)]
    update = trr_update(policy, None, episodes, Config(model="tiny"))
    assert update["trained_sequences"] == 1 and policy.logprob_calls[0][1] == [[7]]


@pytest.mark.parametrize("mode,weights", [
    ("token-mean", (1 / 12, 1 / 12)),                      # every token of the step: 2 + 6 + 4 = 12
    ("seq-mean-token-mean", (1 / (3 * 2), 1 / (3 * 6))),   # 1 / (N |y_i|): the short answer's tokens x3
    ("seq-mean-token-sum-norm", (1 / (3 * 8), 1 / (3 * 8))),  # 1 / (N L_max), L_max = max_new_tokens = 8
])
def test_loss_aggregation_sets_the_weight_of_every_token(mode, weights):
    """Two responses of different lengths (2 and 6 tokens) and a zero-advantage one (4 tokens, in the
    denominators only): dL/dlogp_t = -A_i c_i on each token of response i."""
    policy = ScriptedPolicy({})
    req = azr_mini.Request(DEDUCTION, SOLVE, "p", "solve")
    episodes = [Episode(req, [1], [5, 6], "short", False, advantage=1.0),
                Episode(req, [1], [7, 8, 9, 10, 11, 12], "long", False, advantage=-0.5),
                Episode(req, [1], [13, 14, 15, 16], "none", False, advantage=0.0)]
    cfg = Config(model="tiny", loss_agg=mode, max_new_tokens=8)
    trr_update(policy, None, episodes, cfg)
    [(logp, completions)] = policy.logprob_calls       # one micro-batch: the two trained responses
    by_first = {ids[0]: row for row, ids in enumerate(completions)}
    short, long = logp.grad[by_first[5], :2], logp.grad[by_first[7], :6]
    assert torch.allclose(short, torch.full((2,), -1.0 * weights[0]))
    assert torch.allclose(long, torch.full((6,), 0.5 * weights[1]))
    assert torch.all(logp.grad[by_first[5], 2:] == 0)   # padding gets nothing


# --------------------------------------------------------------------------------------------------
# Configuration and command line
# --------------------------------------------------------------------------------------------------

def test_every_config_field_is_a_flag_and_presets_apply():
    help_text = build_parser(Config, azr_mini.PRESETS, "").format_help()
    for f in fields(Config):
        assert "--" + f.name.replace("_", "-") in help_text
    cfg = parse_args(["--preset", "gpu-24gb", "--batch-size", "3"])
    assert cfg.model == "Qwen/Qwen2.5-Coder-3B-Instruct" and cfg.load_in_4bit and cfg.batch_size == 3
    assert parse_args([]) == Config()
    # a preset applies wherever a Config is made, not only on the command line
    assert Config(preset="gpu-24gb", batch_size=3) == cfg
    # a typed flag wins over the preset even when it equals the cpu default
    assert parse_args(["--preset", "gpu-8gb", "--lora-layers", "4"]).lora_layers == 4


@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--steps", "many"], ["--batch-size", "0"],
                                  ["--preset", "tpu"], ["--reward-rule", "mine"], ["--resume", "/nonexistent"]])
def test_bad_flags_exit_with_code_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_bad_model_is_one_clear_line():
    proc = subprocess.run([sys.executable, "azr_mini.py", "--model", "/no/such/model/folder"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------------
# End to end on the tiny model: seeding, two steps, checkpoints, exact resume
# --------------------------------------------------------------------------------------------------

def test_end_to_end_tiny_model_and_exact_resume(tmp_path):
    full = run_tiny(tmp_path / "full", "--steps", "2")
    [m1, m2] = metrics(full)
    for key in ["reward/deduction/propose", "reward/induction/solve", "valid_proposals", "accuracy/abduction",
                "format_errors", "length/abduction/solve", "truncated", "zero_advantage", "buffer/induction",
                "executor/calls", "time/generate", "time/execute", "time/update", "time/other",
                "memory/peak_rss_mb", "flagged", "loss", "grad_norm", "entropy", "copies", "empty_think/abduction"]:
        assert key in m2, key
    assert m2["executor/calls"] > 0 and m2["trained_sequences"] > 0
    assert 0 < m2["entropy"] < math.log(152_000)  # nats; at most log of the vocabulary size

    # the buffers hold validated triplets: the executor agrees with every stored output
    checkpoint = latest_checkpoint(full)
    assert checkpoint.name == "checkpoint-000002" and (checkpoint / "adapter" / "adapter_config.json").exists()
    buffers = buffers_from_json(json.loads((checkpoint / "state.json").read_text())["buffers"])
    assert len(buffers[DEDUCTION]) >= 2 and len(buffers[INDUCTION]) >= 1
    with Executor(workers=2) as ex:
        for t in (DEDUCTION, ABDUCTION):
            results = ex.validate_many([(x.program, x.input) for x in buffers[t]])
            assert all(r.status == "ok" and r.value == x.output for r, x in zip(results, buffers[t]))
        for task in buffers[INDUCTION]:
            pairs = task.visible + task.hidden
            results = ex.validate_many([(task.program, i) for i, _ in pairs])
            assert [r.value for r in results] == [o for _, o in pairs]

    # the LoRA weights changed (and only they)
    fresh = azr_mini.build_policy(parse_args(TINY_FLAGS))
    trained = azr_mini.build_policy(parse_args(TINY_FLAGS))
    step, _, _ = load_checkpoint(checkpoint, trained, torch.optim.AdamW(trained.trainable_parameters()))
    changed = [name for (name, p), q in zip(fresh.model.named_parameters(), trained.model.parameters())
               if not torch.equal(p, q)]
    assert changed and all("lora_" in name for name in changed)

    # samples.jsonl has every proposal and answer
    samples = [json.loads(line) for line in (full / "samples.jsonl").read_text().splitlines()]
    assert {s["phase"] for s in samples} == {"seed", "propose", "learnability", "solve"}
    assert all(s["completion"].startswith("<think>") for s in samples)

    # a run stopped after step 1 and resumed gives the same step 2
    part = run_tiny(tmp_path / "part", "--steps", "1")
    assert latest_checkpoint(part).name == "checkpoint-000001"
    cfg = parse_args(["--resume", str(part), "--steps", "2"])
    assert cfg.model == "tiny" and cfg.max_new_tokens == 16
    train(cfg, HalfScripted(azr_mini.build_policy(cfg)))
    r1, r2 = metrics(part)
    assert without_timings(r1) == without_timings(m1)
    assert without_timings(r2) == without_timings(m2)


def test_ctrl_c_saves_and_resumes(tmp_path):
    """An interrupt in the middle of step 2 saves step 1 (the unfinished step is dropped)."""
    run_dir = tmp_path / "run"
    cfg = parse_args(TINY_FLAGS + ["--run-dir", str(run_dir), "--steps", "3", "--save-every", "5"])
    policy = HalfScripted(azr_mini.build_policy(cfg))
    calls = {"n": 0}
    real_update = azr_mini.trr_update

    def update_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_update(*args, **kwargs)

    azr_mini.trr_update = update_then_interrupt
    try:
        with pytest.raises(SystemExit) as exit_info:
            train(cfg, policy)
    finally:
        azr_mini.trr_update = real_update
    assert exit_info.value.code == 130
    assert latest_checkpoint(run_dir).name == "checkpoint-000001"
    assert len(metrics(run_dir)) == 1
    assert not list(run_dir.glob(".checkpoint-*"))


def test_4bit_tiny_run_of_two_steps(tmp_path):
    """QLoRA through the loop: seeding and each step sample (eval mode), then update, then sample again."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    run_dir = run_tiny(tmp_path / "run", "--load-in-4bit", "--steps", "2", "--max-new-tokens", "8")
    ms = metrics(run_dir)
    assert [m["step"] for m in ms] == [1, 2] and all(m["trained_sequences"] > 0 for m in ms)
    assert all(m["grad_norm"] > 0 for m in ms)
    cfg = parse_args(["--resume", str(run_dir)])
    assert cfg.load_in_4bit


def test_copies_are_rejected_and_earn_the_invalid_reward():
    """A proposal that repeats the prompt's example, a reference or a buffer task is not a new task."""
    import random

    from prompts import EXAMPLE_INPUT, EXAMPLE_PROGRAM

    double = Triplet("def f(n):\n    return n * 2", "3", "6")
    induction_task = InductionTask(double.program, "doubles", (("1", "2"), ("2", "4")), (("5", "10"), ("0", "0")))
    buffers = {DEDUCTION: [SEED_TRIPLET, double], ABDUCTION: [SEED_TRIPLET, double], INDUCTION: [induction_task]}
    script = {
        (DEDUCTION, PROPOSE): [answer(("python", EXAMPLE_PROGRAM), ("input", EXAMPLE_INPUT)),       # the example
                               answer(("python", "def f(a):\n  return a"), ("input", "[1, 2]"))],   # the seed, re-indented
        (ABDUCTION, PROPOSE): [answer(("python", "def f(n):\n    return n  *  2"), ("input", "7")),  # a buffer task
                               answer(("python", "def f(n):\n    return n - 1"), ("input", "7"))],  # new
        (INDUCTION, PROPOSE): [answer(*[("input", i) for i in ("0", "5", "2", "1")], ("message", "m")),  # same inputs
                               answer(*[("input", i) for i in ("7", "8", "9", "10")], ("message", "m"))],
        (DEDUCTION, SOLVE): ["x"] * 2,
        (ABDUCTION, SOLVE): ["x"] * 4,
        (INDUCTION, SOLVE): ["x"] * 4,
    }
    cfg = Config(model="tiny", batch_size=2, learnability_rollouts=2, n_inputs=4)
    policy = ScriptedPolicy(script)
    rng = random.Random(0)
    rng.choice = lambda sources: double  # the program the induction proposers write inputs for
    with Executor(timeout_s=2, workers=2) as ex:
        episodes, _, new_tasks = self_play_step(policy, ex, buffers, rng, cfg, Timer())
    proposals = [e for e in episodes if e.request.role == PROPOSE]
    assert [e.copy for e in proposals] == [True, True, True, False, True, False]
    assert [e.valid for e in proposals] == [False, False, False, True, False, True]
    assert all(e.reward == -1.0 for e in proposals if e.copy)  # the invalid-proposal reward
    assert new_tasks[DEDUCTION] == [] and len(new_tasks[ABDUCTION]) == len(new_tasks[INDUCTION]) == 1
    m = step_metrics(1, episodes, [], buffers, 0, Counter(), Timer(), {})
    assert m["copies"] == pytest.approx(4 / 6)
    assert m["empty_think/abduction"] == 0.0                  # "x" is a format error, not an empty think


def test_the_worked_examples_inputs_are_a_copy_for_induction():
    from prompts import InductionProposal, example_induction_inputs, propose_induction
    from rewards import is_copy

    request = azr_mini.Request(INDUCTION, PROPOSE, propose_induction(SEED_TRIPLET, 4), "propose",
                               program=SEED_TRIPLET.program)
    known = known_proposals({DEDUCTION: [], ABDUCTION: [], INDUCTION: []}, request.task_type, request.program, 4)
    assert is_copy(InductionProposal(example_induction_inputs(4), "m"), known)
    assert not is_copy(InductionProposal(("1", "2", "3", "4"), "m"), known)


def test_the_worked_examples_programs_are_copies_for_deduction_and_abduction():
    from prompts import EXAMPLE_PROGRAM, EXAMPLE_REFERENCE, Proposal, propose_deduction
    from rewards import is_copy

    request = azr_mini.Request(DEDUCTION, PROPOSE, propose_deduction([SEED_TRIPLET]), "propose")
    known = known_proposals({DEDUCTION: [SEED_TRIPLET], ABDUCTION: [], INDUCTION: []}, request.task_type,
                            request.program, 4)
    for program in (EXAMPLE_PROGRAM, EXAMPLE_REFERENCE.program, SEED_TRIPLET.program):
        assert is_copy(Proposal(program, "1"), known)
    assert not is_copy(Proposal("def f(x):\n    return x - 1", "1"), known)
