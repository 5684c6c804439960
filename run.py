"""The machinery of a run: what Algorithm 1 needs around it, but does not consist of.

azr_mini.py holds the algorithm and its loop; this file holds what turns that loop into a run you can
stop, resume and read afterwards. Nothing here is in the paper's equations; none of it changes what
is learned. In order:

  flags         every Config field is a command-line flag; presets; --resume reads the saved config
  timing        seconds per phase (generate, execute, update)
  the monitor   alarming phrases in the chains of thought (the paper's "uh-oh moment")
  metrics       the health signals of a step (metrics.jsonl) and every sample (samples.jsonl)
  checkpoints   LoRA adapter, optimizer, buffers and RNG states, written whole or not at all
  signals       Ctrl-C and SIGTERM stop a run at a step boundary; a step is committed as one block
  Run           a run's life as azr_mini.train drives it: open, resume or seed, commit, stop
  export        a run's buffers as seed files for the authors' multi-GPU implementation

It imports the algorithm's records from prompts.py only, never azr_mini.py: episodes and configs
arrive as arguments (their fields are azr_mini.Episode's and azr_mini.Config's).
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
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

import budget
from policy import Policy
from prompts import (ABDUCTION, DEDUCTION, INDUCTION, PROPOSE, PROPOSER_EXAMPLES, SOLVE, TASK_TYPES, THINK_PREFILL, reuses_example,
                     task_from_json, task_key, thinks_empty)

if TYPE_CHECKING:   # for the annotations only: azr_mini.py imports this file, not the reverse
    from azr_mini import Buffers, Config, Episode


# ==================================================================================================
# Flags: every Config field is one (azr_mini.flag), defaults < preset < what was typed
# ==================================================================================================


def build_parser(config_class: type, presets: dict[str, dict], description: str) -> argparse.ArgumentParser:
    """One flag per field of the config dataclass: --name-with-dashes, its help and default from the field."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="presets: " + "; ".join(f"{name}: {values or 'the defaults'}" for name, values in presets.items())
        + ". Also: python azr_mini.py --export-seeds RUN_DIR OUT.jsonl writes a run's buffers as seed files "
        "for the authors' implementation (OUT.jsonl and OUT_code_f.jsonl).")
    for f in fields(config_class):
        name, kind = "--" + f.name.replace("_", "-"), type(f.default)
        if kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        else:
            parser.add_argument(name, type=kind, default=f.default, choices=f.metadata["choices"],
                                help=f.metadata["help"])
    return parser


def parse_config(config_class: type, presets: dict[str, dict], description: str, argv: list[str] | None = None):
    """Defaults < preset < flags given on the command line. With --resume, the run's saved config
    replaces the first two. Unknown or invalid flags exit with code 2 and a clear message."""
    parser = build_parser(config_class, presets, description)
    args = vars(parser.parse_args(argv))
    given = {k for k, v in vars(_explicit_parser(parser).parse_args(argv)).items()}
    if args["resume"]:
        base = load_saved_config(parser, config_class, args["resume"])
    else:
        base = {**args, **presets[args["preset"]]}
    values = {**base, **{k: args[k] for k in given}}
    try:
        return config_class.exactly(values)
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


def load_saved_config(parser: argparse.ArgumentParser, config_class: type, run_dir: str) -> dict:
    """The config a run was started with, from its newest checkpoint (which must be whole)."""
    checkpoint = latest_checkpoint(Path(run_dir))
    if checkpoint is None:
        parser.error(f"--resume {run_dir}: no checkpoint found there")
    try:
        saved = read_state(checkpoint)["config"]
    except CheckpointError as error:
        parser.error(f"--resume {run_dir}: {error}")
    known = {f.name for f in fields(config_class)}
    return {k: v for k, v in saved.items() if k in known} | {"run_dir": run_dir, "resume": run_dir}


def check_config(cfg: Config) -> None:
    """Raise a ValueError naming the first flag out of its range."""
    checks = {
        "--steps must be >= 0": cfg.steps >= 0,
        "--save-every must be positive": cfg.save_every > 0,
        "--keep-every must be >= 0": cfg.keep_every >= 0,
        "--lora-r must be positive": cfg.lora_r > 0,
        "--lora-layers must be >= 0": cfg.lora_layers >= 0,
        "--lora-dropout must be in [0, 1)": 0 <= cfg.lora_dropout < 1,
        "--temperature must be > 0": cfg.temperature > 0,
        "--top-p must be in (0, 1]": 0 < cfg.top_p <= 1,
        "--max-new-tokens must be positive": cfg.max_new_tokens > 0,
        "--gen-batch-size must be positive": cfg.gen_batch_size > 0,
        "--batch-size must be positive": cfg.batch_size > 0,
        "--n-references must be positive": cfg.n_references > 0,
        f"--worked-examples must be in 1..{len(PROPOSER_EXAMPLES)}": 1 <= cfg.worked_examples <= len(PROPOSER_EXAMPLES),
        "--n-inputs must be >= 2 (half are shown, half hidden)": cfg.n_inputs >= 2,
        "--learnability-rollouts must be positive": cfg.learnability_rollouts > 0,
        "--seed-buffer-size must be positive": cfg.seed_buffer_size > 0,
        "--buffer-cap must be >= --seed-buffer-size": cfg.buffer_cap >= cfg.seed_buffer_size,
        "--lr must be > 0": cfg.lr > 0,
        "--micro-batch must be positive": cfg.micro_batch > 0,
        "--update-epochs must be positive": cfg.update_epochs > 0,
        "--clip-eps must be in (0, 1)": 0 < cfg.clip_eps < 1,
        "--exec-timeout-s must be > 0": cfg.exec_timeout_s > 0,
        "--exec-memory-mb must be >= 64": cfg.exec_memory_mb >= 64,
    }
    for message, ok in checks.items():
        if not ok:
            raise ValueError(message)


# ==================================================================================================
# Buffers on disk (checkpoints) and timing
# ==================================================================================================


def buffers_to_json(buffers: Buffers) -> dict:
    return {t: [asdict(task) for task in tasks] for t, tasks in buffers.items()}


def buffers_from_json(data: dict) -> Buffers:
    return {t: [task_from_json(t, d) for d in data[t]] for t in TASK_TYPES}


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
# Metrics, samples, checkpoints
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
    m["flagged"] = sum(bool(e.alarms) for e in everything)
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
                    "advantage": e.advantage, "flagged": e.alarms,
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
# A run's life, as azr_mini.train drives it
# ==================================================================================================


class Run:
    """One training run: its folder, logs and checkpoints, and the rules for stopping it.

    A step is computed first (sampling, executing, gradients) and then committed as one block that
    Ctrl-C cannot split (`commit`): optimizer step, buffers, step count, metrics, samples, the RNG
    snapshot and (when due) the checkpoint (`record`). An interrupt (Ctrl-C, or SIGTERM from
    `kill PID`) before the commit drops the unfinished step; one during it waits for the commit to
    end. Either way the saved checkpoint, its RNG states and the logs agree, and --resume continues
    as if nothing had happened (a kill -9 loses at most the steps since the last checkpoint, which a
    resumed run recomputes exactly)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dir = Path(cfg.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
        if not cfg.resume and latest_checkpoint(self.dir) is not None:
            raise CheckpointError(f"{self.dir} holds a run already: continue it with --resume {self.dir}, "
                                  "or choose another --run-dir")
        self.dir.mkdir(parents=True, exist_ok=True)
        print(f"azr-mini: run folder {self.dir}  (model {cfg.model}, preset {cfg.preset}, {cfg.steps} steps)")
        self.checkpoint = latest_checkpoint(self.dir) if cfg.resume else None
        if cfg.resume and self.checkpoint is None:
            raise CheckpointError(f"--resume {cfg.resume}: no checkpoint found there")
        self.log = RunLog(self.dir)
        self.step = self.saved_step = 0     # steps committed; the newest of them that is on disk
        self.buffers: Buffers | None = None
        self.policy = self.optimizer = self.rng = self.executor = None
        self.snapshot: dict | None = None   # the random states at the start of the next step
        self.before: dict | None = None     # trainable_state before a multi-epoch update
        self.committing = False             # inside commit(): record() belongs there
        self.calls_before, self.statuses_before = 0, Counter()   # the executor's counters when the step began

    def announce(self, policy: Policy) -> None:
        """The start-up line: dtype and why, threads, a rough time for what is left (budget.py)."""
        done = 0 if self.checkpoint is None else read_state(self.checkpoint)["step"]
        print(budget.startup_line(self.cfg, policy, steps=max(0, self.cfg.steps - done),
                                  seeding=self.checkpoint is None), flush=True)

    @contextmanager
    def interruptible(self, policy: Policy, optimizer, rng: random.Random):
        """Around the whole run: SIGTERM counts as Ctrl-C, and either saves the last committed step
        (unless it is on disk already), undoes an unfinished multi-epoch update, and exits with 130."""
        self.policy, self.optimizer, self.rng = policy, optimizer, rng
        with sigterm_as_ctrl_c():
            try:
                yield self
            except KeyboardInterrupt:
                optimizer.zero_grad(set_to_none=True)   # the unfinished step is dropped
                if self.before is not None:             # and so are its first update epochs
                    restore_trainable_state(policy, optimizer, self.before)
                with ctrl_c_deferred(deliver=False):    # a second Ctrl-C does not cut the save short
                    if self.snapshot is not None and self.step > self.saved_step:
                        save_checkpoint(self.dir, self.step, policy, optimizer, self.buffers, self.snapshot, self.cfg)
                        self.saved_step = self.step
                newest = latest_checkpoint(self.dir)
                if newest is None:                      # stopped before the first checkpoint
                    print("\ninterrupted: nothing saved yet")
                else:
                    print(f"\ninterrupted: saved step {read_state(newest)['step']}; continue with "
                          f"python azr_mini.py --resume {self.dir}")
                raise SystemExit(130) from None

    def start(self, executor) -> Buffers | None:
        """A run resumed: the newest checkpoint's adapter, optimizer and random states restored, the
        logs cut back to its step, and its buffers returned. A new run: empty logs, config.json
        written, and None (the buffers are still to seed). Keeps the executor, whose counters go
        into each step's metrics."""
        self.executor = executor
        if self.checkpoint is None:
            self.log.truncate_after(-1)                 # logs of an attempt killed before its first checkpoint
            (self.dir / "config.json").write_text(json.dumps(asdict(self.cfg), indent=2))
            return None
        step, buffers, python_rng = load_checkpoint(self.checkpoint, self.policy, self.optimizer)
        for group in self.optimizer.param_groups:   # the saved optimizer state carries the lr it ran with:
            group["lr"] = self.cfg.lr                # --resume DIR --lr X means X from here on
        self.rng.setstate(python_rng)
        self.log.truncate_after(step)
        # all at once, after the slow part: an interrupt before this line has nothing new to save
        self.step = self.saved_step = step
        self.buffers, self.snapshot = buffers, rng_snapshot(self.rng)
        print(f"resumed from {self.checkpoint} (step {step})")
        return buffers

    @contextmanager
    def seeding(self):
        """Around INITSEEDING: an interrupt there has nothing to save."""
        try:
            yield
        except KeyboardInterrupt:
            print("\ninterrupted while seeding: nothing to save yet")
            raise SystemExit(130) from None

    def save_seeded(self, buffers: Buffers) -> None:
        """Checkpoint step 0: the seeded buffers are worth keeping."""
        self.buffers = buffers
        with ctrl_c_deferred():
            save_checkpoint(self.dir, 0, self.policy, self.optimizer, buffers, rng_snapshot(self.rng), self.cfg)
        self.snapshot = rng_snapshot(self.rng)

    def new_step(self) -> Timer:
        """A step begins: a fresh timer, and the executor's counters as they stand."""
        self.calls_before, self.statuses_before = self.executor.calls, self.executor.statuses.copy()
        return Timer()

    @contextmanager
    def revertible(self):
        """Around the update: with --update-epochs > 1 the optimizer steps before the commit, so keep
        a copy of what it changes until the commit (an interrupt reverts to it)."""
        self.before = trainable_state(self.policy, self.optimizer) if self.cfg.update_epochs > 1 else None
        yield

    @contextmanager
    def commit(self):
        """The step's commit: Ctrl-C and SIGTERM wait until the block is done."""
        with ctrl_c_deferred():
            self.committing = True
            try:
                yield
            finally:
                self.committing = False
            self.before = None

    def record(self, episodes: list[Episode], rollouts: list[Episode], buffers: Buffers, update: dict,
               timer: Timer) -> None:
        """Inside the commit: count the step, log its metrics and samples, checkpoint when due."""
        assert self.committing, "Run.record belongs inside `with run.commit():`"
        self.step += 1
        self.buffers = buffers
        m = step_metrics(self.step, episodes, rollouts, buffers, self.executor.calls - self.calls_before,
                         self.executor.statuses - self.statuses_before, timer, update)
        self.log.metrics(m)
        self.log.samples(self.step, episodes + rollouts)
        self.snapshot = rng_snapshot(self.rng)
        if self.step % self.cfg.save_every == 0 or self.step == self.cfg.steps:
            save_checkpoint(self.dir, self.step, self.policy, self.optimizer, buffers, self.snapshot, self.cfg)
            self.saved_step = self.step
        tqdm.write(summary_line(m))

    def done(self) -> Path:
        print(f"done: {self.step} steps. Outputs in {self.dir}/: metrics.jsonl (one line per step), samples.jsonl "
              f"(every task and answer), {latest_checkpoint(self.dir).name}/ (LoRA adapter, optimizer, buffers)")
        return self.dir


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


def use_the_cores_we_may() -> None:
    """torch's default thread count is the machine's physical cores, even where this process may use
    fewer (taskset, a container's cpuset): more threads than cores make every step slower. So cap it at
    the cores we may run on, unless OMP_NUM_THREADS or MKL_NUM_THREADS chose already."""
    if "OMP_NUM_THREADS" in os.environ or "MKL_NUM_THREADS" in os.environ:
        return
    if hasattr(os, "sched_getaffinity"):        # Linux; macOS and Windows do not say
        torch.set_num_threads(min(torch.get_num_threads(), len(os.sched_getaffinity(0))))
