"""Can the model play the game before any training? The step-0 instrument for the prompts.

For each (task type, role) it samples n responses (default 32) with the loop's own prompts, sampling
settings (the cpu preset's: T = 1, top-p 1, 320 new tokens) and parsers, grades them with the loop's
own functions, and prints one table:

    well formed   the parser read the response (else: a format error, reward -1 in Eq. 6)
    valid         proposers: the task passed the executor's checks and is not a copy
    correct       solvers: the executor says the answer is right (Eq. 5)
    copies        proposers: the program repeats the prompt's example or a reference, or the
                  induction inputs repeat a known task's (rewards.is_copy)
    truncated     cut off by the length limit
    length        mean completion length in tokens; prompt: mean prompt length in tokens

and a second table of why the rest were not well formed. Proposer rows use the seed triplet and a
few small buffer-like references (below) the way the loop draws them; solver rows use the first n
CRUXEval programs (`--data`; measurement only, never training data) for deduction and abduction,
and induction tasks built from the references. Same seed, same table.

    python bench/bench_play.py [--n 32] [--model embedded] [--json PATH] [--samples PATH]
    python bench/bench_play.py --compare REV     # also prompts.py as it was at git revision REV,
                                                 # taking turns row by row, in the same run
    python bench/bench_play.py --rows propose/deduction,solve/induction --n 8    # a quick probe

Any azr_mini.py flag that changes sampling can follow `--` (e.g. `-- --max-new-tokens 512`).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import azr_mini  # noqa: E402
from models import EMBEDDED  # noqa: E402
from run import Timer  # noqa: E402
import evaluate  # noqa: E402
import prompts  # noqa: E402
from executor import Executor  # noqa: E402
from prompts import ABDUCTION, DEDUCTION, INDUCTION, PROPOSE, ROLES, SEED_TRIPLET, SOLVE, TASK_TYPES  # noqa: E402
from prompts import Chat, InductionTask, Triplet  # noqa: E402

# Small programs of the kind a buffer holds after a few steps, each with a one-line message and
# distinct inputs (outputs come from the executor). Deduction/abduction proposers see some of them
# as references (with their first input); induction proposers write inputs for them; induction
# solvers get them as tasks (message, first half of the pairs shown, the rest hidden).
REFERENCES = [
    ("def f(nums):\n    return [x * 2 for x in nums if x % 2 == 1]",
     "Doubles the odd numbers and drops the even ones.",
     ["[1, 2, 3]", "[5]", "[2, 4]", "[7, 8, 9, 10]", "[]", "[11, 13, 14]"]),
    ("def f(s):\n    return s[::-1].upper()",
     "Reverses the string and makes it upper case.",
     ["'abc'", "'Hello'", "''", "'a b'", "'xyz1'", "'race'"]),
    ("def f(a, b):\n    if a > b:\n        return a - b\n    return a * b",
     "The difference if the first number is larger, else the product.",
     ["5, 3", "2, 4", "0, 0", "10, 1", "3, 3", "-1, 2"]),
    ("def f(words):\n    best = ''\n    for w in words:\n        if len(w) > len(best):\n            best = w\n    return best",
     "The longest word; the first one on ties.",
     ["['a', 'abc', 'ab']", "['hi', 'yo']", "[]", "['one', 'three', 'seven']", "['x']", "['aa', 'b', 'cc']"]),
    ("def f(n):\n    total = 0\n    while n > 0:\n        total += n % 10\n        n //= 10\n    return total",
     "The sum of the digits of n.",
     ["123", "0", "9", "1001", "4567", "99"]),
    ("def f(d):\n    return sorted(d, key=lambda k: (d[k], k))",
     "The keys, sorted by their values (ties by key).",
     ["{'a': 2, 'b': 1}", "{}", "{'x': 0}", "{'p': 3, 'q': 3, 'r': 1}", "{'k': -1, 'j': 5}", "{'b': 2, 'a': 2}"]),
    ("def f(nums):\n    out, total = [], 0\n    for x in nums:\n        total += x\n        out.append(total)\n    return out",
     "The running totals of the list.",
     ["[1, 2, 3]", "[]", "[5]", "[-1, 1, -1]", "[10, 0, 10]", "[2, 2, 2, 2]"]),
    ("def f(s, c):\n    return [i for i, ch in enumerate(s) if ch == c]",
     "The positions where the character c occurs in s.",
     ["'banana', 'a'", "'abc', 'z'", "'', 'a'", "'aaa', 'a'", "'hello', 'l'", "'xyx', 'y'"]),
]

ROWS = [(t, r) for r in ROLES for t in TASK_TYPES]


def row_name(task_type: str, role: str) -> str:
    return f"{role}/{task_type}"


def reference_tasks(executor: Executor) -> tuple[list[Triplet], list[InductionTask]]:
    """The references as triplets (first input) and as induction tasks (all inputs), run for real."""
    jobs = [(program, i) for program, _, inputs in REFERENCES for i in inputs]
    results = iter(executor.validate_many(jobs))
    triplets, induction = [], []
    for program, message, inputs in REFERENCES:
        pairs = []
        for i in inputs:
            result = next(results)
            if result.status != "ok":
                raise RuntimeError(f"a bench reference does not run: {program!r} on {i}: {result.error}")
            pairs.append((i, result.value))
        triplets.append(Triplet(program, pairs[0][0], pairs[0][1]))
        half = len(pairs) // 2
        induction.append(InductionTask(program, message, tuple(pairs[:half]), tuple(pairs[half:])))
    return triplets, induction


def cruxeval(path: Path, n: int) -> list[Triplet]:
    """The first n CRUXEval programs, read as evaluate.py reads them."""
    return [item.task for item in evaluate.load_cruxeval(path, n, DEDUCTION)]


def load_prompts_at(rev: str):
    """prompts.py as it was at a git revision, imported under another name."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:prompts.py"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        raise SystemExit(f"error: --compare {rev}: cannot read prompts.py there ({error})") from None
    path = Path(tempfile.mkdtemp()) / f"prompts_at_{rev.replace('/', '_')}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def as_chat(prompt) -> Chat:
    """Older prompts.py versions returned the user message alone; newer ones a Chat (of that version's
    own class, hence the duck test)."""
    return prompt if hasattr(prompt, "messages") else Chat(user=prompt)


def requests_for(module, task_type: str, role: str, n: int, cfg, pool, induction, crux, seed: int):
    """The n requests of one row, built with `module`'s prompt functions the way the loop builds them;
    `pool` is what a proposer's buffer would hold (references, programs for induction)."""
    rng = random.Random(seed)

    def example(k: int) -> dict:  # the proposers' worked examples in turn (--worked-examples)
        return {"example": k % cfg.worked_examples} if cfg.worked_examples > 1 else {}

    out = []
    for k in range(n):
        if role == PROPOSE and task_type in (DEDUCTION, ABDUCTION):
            template = module.propose_deduction if task_type == DEDUCTION else module.propose_abduction
            references = rng.sample(pool, cfg.n_references)
            out.append(azr_mini.Request(task_type, role, as_chat(template(references, **example(k))), "bench"))
        elif role == PROPOSE:
            source = pool[k % len(pool)]
            out.append(azr_mini.Request(task_type, role, as_chat(module.propose_induction(source, cfg.n_inputs,
                                                                                          **example(k))),
                                        "bench", program=source.program))
        else:
            task = induction[k % len(induction)] if task_type == INDUCTION else crux[k % len(crux)]
            template = {DEDUCTION: module.solve_deduction, ABDUCTION: module.solve_abduction,
                        INDUCTION: module.solve_induction}[task_type]
            out.append(azr_mini.Request(task_type, role, as_chat(template(task)), "bench", task=task))
    return out


def failure(e: azr_mini.Episode) -> str:
    """Why a response is not well formed, in the parser's order."""
    text = e.text
    a = text.rfind("<answer>")
    if a < 0:
        return "cut off" if e.truncated else "no <answer>"
    if text.find("</answer>", a) < 0:
        return "cut off" if e.truncated else "no </answer>"
    if text.rfind("</think>", 0, a) < 0:
        return "</th> for </think>" if "</th>" in text[:a] else "no </think>"
    return "blocks missing"


def measure(policy, executor, module, task_type, role, n, cfg, refs, crux, seed) -> tuple[dict, list]:
    triplets, induction = refs
    pool = [SEED_TRIPLET] + triplets
    requests = requests_for(module, task_type, role, n, cfg, pool, induction, crux, seed)
    timer = Timer()
    torch.manual_seed(seed)
    start = time.perf_counter()
    episodes = azr_mini.sample(policy, requests, cfg, timer, desc=None)  # no bar: one line per row below
    wall = time.perf_counter() - start
    if role == PROPOSE:
        buffers = {DEDUCTION: pool, ABDUCTION: pool, INDUCTION: []}
        azr_mini.mark_proposals(executor, episodes, buffers, cfg, timer)
    else:
        azr_mini.mark_solutions(executor, episodes, timer)
    bad = [failure(e) for e in episodes if e.parsed is None]
    row = {
        "row": row_name(task_type, role), "n": n,
        "well_formed": sum(e.parsed is not None for e in episodes) / n,
        "valid": sum(e.valid for e in episodes) / n if role == PROPOSE else None,
        "correct": sum(e.r_role == 1.0 for e in episodes) / n if role == SOLVE else None,
        "copies": sum(e.copy for e in episodes) / n if role == PROPOSE else None,
        "truncated": sum(e.truncated for e in episodes) / n,
        "length": sum(len(e.completion_ids) for e in episodes) / n,
        "prompt": sum(len(e.prompt_ids) for e in episodes) / n,
        "wall_s": round(wall, 1),
        "failures": {reason: bad.count(reason) for reason in sorted(set(bad))},
    }
    samples = [{"row": row["row"], "prompt": e.request.prompt.user, "completion": prompts.THINK_PREFILL + e.text,
                "well_formed": e.parsed is not None, "valid": e.valid, "copy": e.copy, "r_role": e.r_role,
                "truncated": e.truncated, "task_type": task_type, "role": role,
                "task": None if e.request.task is None else asdict(e.request.task)} for e in episodes]
    return row, samples


def print_table(title: str, rows: list[dict]) -> None:
    def pct(x):
        return "    -" if x is None else f"{100 * x:4.0f}%"
    print(f"\n{title}")
    print(f"{'row':<20} {'well formed':>11} {'valid':>6} {'correct':>7} {'copies':>6} {'truncated':>9} "
          f"{'length':>6} {'prompt':>6} {'wall s':>6}")
    for r in rows:
        print(f"{r['row']:<20} {pct(r['well_formed']):>11} {pct(r['valid']):>6} {pct(r['correct']):>7} "
              f"{pct(r['copies']):>6} {pct(r['truncated']):>9} {r['length']:6.0f} {r['prompt']:6.0f} {r['wall_s']:6.0f}")
    proposals = [r for r in rows if r["copies"] is not None]
    if proposals:
        copies = sum(r["copies"] * r["n"] for r in proposals) / sum(r["n"] for r in proposals)
        print(f"copies among all proposals: {100 * copies:.0f}%")
    print("not well formed, why: " + "; ".join(
        f"{r['row']} " + ", ".join(f"{why} {k}" for why, k in r["failures"].items()) for r in rows if r["failures"]))


def main() -> None:
    argv = sys.argv[1:]
    loop_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32, help="responses per (task type, role)")
    parser.add_argument("--model", default=EMBEDDED, help="as azr_mini.py --model")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cruxeval.jsonl"),
                        help="CRUXEval jsonl for the deduction and abduction solver rows")
    parser.add_argument("--rows", default="", help="comma-separated rows (e.g. propose/induction); default all six")
    parser.add_argument("--compare", default="", help="also measure prompts.py at this git revision")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="write the table(s) here")
    parser.add_argument("--samples", default="", help="write every response here (jsonl)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be positive")
    rows = ROWS
    if args.rows:
        rows = [(t, r) for t, r in ROWS if row_name(t, r) in args.rows.split(",")]
        unknown = set(args.rows.split(",")) - {row_name(t, r) for t, r in ROWS}
        if unknown:
            parser.error(f"--rows: unknown {sorted(unknown)}; choose from {[row_name(t, r) for t, r in ROWS]}")
    cfg = azr_mini.parse_args(["--model", args.model, "--seed", str(args.seed)] + loop_flags)
    versions = {"now": prompts}
    if args.compare:
        versions = {args.compare: load_prompts_at(args.compare), "now": prompts}
    crux = cruxeval(Path(args.data), args.n)
    policy = azr_mini.build_policy(cfg)
    print(f"model {cfg.model}, dtype {next(policy.model.parameters()).dtype}, T {cfg.temperature}, top-p {cfg.top_p}, "
          f"{cfg.max_new_tokens} new tokens, n {args.n} per row, K {cfg.n_references}, N {cfg.n_inputs}")
    tables: dict[str, list] = {name: [] for name in versions}
    samples = []
    with Executor(timeout_s=cfg.exec_timeout_s, memory_mb=cfg.exec_memory_mb) as executor:
        refs = reference_tasks(executor)
        for task_type, role in rows:            # the versions take turns, row by row
            for name, module in versions.items():
                row, row_samples = measure(policy, executor, module, task_type, role, args.n, cfg, refs, crux,
                                           args.seed)
                tables[name].append(row)
                samples += [{"prompts": name, **s} for s in row_samples]
                print(f"  {name:>10} {row['row']:<20} well formed {100 * row['well_formed']:3.0f}%  "
                      f"({row['wall_s']:.0f} s)", flush=True)
    for name, table in tables.items():
        print_table(f"prompts.py {'as committed at ' + name if name != 'now' else 'now'}", table)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": {"model": cfg.model, "n": args.n, "seed": args.seed,
                                               "temperature": cfg.temperature, "top_p": cfg.top_p,
                                               "max_new_tokens": cfg.max_new_tokens},
                                               "tables": tables}, indent=2))
    if args.samples:
        with open(args.samples, "w") as fh:
            for s in samples:
                fh.write(json.dumps(s) + "\n")


if __name__ == "__main__":
    main()
