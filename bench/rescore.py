"""Same completions, two parsers: which verdicts change when prompts.py's parsers change.

A parser decides the reward (Eq. 5-6) and every benchmark score, so a change to it must say what it
changes. This reads saved completions, parses each one with prompts.py as it was at a git revision
(`--before`) and as it is now, grades both readings with the loop's own functions, and prints per
file and row: responses, readings that changed, verdicts that changed, and the moves between
verdicts. Nothing is sampled: no model is loaded.

    solver answers   correct / wrong / format error   (rewards.grade, evaluate.grade_outcomes)
    proposals        valid / invalid / format error   (rewards.check_proposals; copies are not
                                                       re-checked: that needs the run's buffers)

Files it reads (any mix):
    a run's samples.jsonl            every proposal and answer of a run (azr_mini.py)
    an evaluate.py report (.json)    the benchmark's items are loaded again by id
    bench_play.py --samples file     the rows' responses, with their tasks

    python bench/rescore.py --before REV notebooks/example_run/samples.jsonl \
        notebooks/example_run/checkpoint-000000/eval/cruxeval-o-64.json
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from prompts import task_from_json  # noqa: E402
import evaluate  # noqa: E402
import prompts  # noqa: E402
from bench_play import load_prompts_at  # noqa: E402
from executor import Executor  # noqa: E402
from prompts import INDUCTION, PROPOSE, SOLVE  # noqa: E402
from rewards import check_proposals, grade  # noqa: E402

CORRECT, WRONG, FORMAT_ERROR, VALID, INVALID = "correct", "wrong", "format error", "valid", "invalid"


def read_records(path: Path) -> tuple[dict | None, list[dict]]:
    """(the evaluate.py report, or None for a samples file; records of {row, task_type, role,
    completion, task, id}) from one file."""
    if path.suffix == ".json":                               # an evaluate.py report
        report = json.loads(path.read_text())
        return report, [{"row": report["bench"], "id": item["id"], "completion": item["completion"]}
                        for item in report["items"]]
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in records:
        r.setdefault("row", f"{r['role']}/{r['task_type']}")
    return None, records


def verdicts_of_report(executor, report: dict, records: list[dict], parse) -> list[tuple[object, str]]:
    """(reading, verdict) per item of an evaluate.py report, with its benchmark items loaded again."""
    items = {item.id: item for item in evaluate.load_bench(report["bench"], report.get("data"), report["limit"])}
    chosen = [items[r["id"]] for r in records]
    graded = evaluate.grade_outcomes(executor, chosen, [r["completion"] for r in records], parse=parse)
    return [(answer, CORRECT if ok else WRONG if answer is not None else FORMAT_ERROR) for answer, ok in graded]


def verdicts_of_samples(executor, records: list[dict], module, n_inputs: int) -> list[tuple[object, str]]:
    """(reading, verdict) per response of a samples file, read with `module`'s parsers."""
    out: list[tuple[object, str]] = [(None, "skipped")] * len(records)   # a solver record without its task
    solves = [k for k, r in enumerate(records) if r["role"] == SOLVE and r.get("task")]
    answers = [module.parse_solution(records[k]["task_type"], records[k]["completion"]) for k in solves]
    scores = grade(executor, [(records[k]["task_type"], task_from_json(records[k]["task_type"], records[k]["task"]),
                               answer) for k, answer in zip(solves, answers)])
    for k, answer, score in zip(solves, answers, scores):
        out[k] = answer, CORRECT if score == 1.0 else WRONG if answer is not None else FORMAT_ERROR
    programs = [k for k, r in enumerate(records) if r["role"] == PROPOSE and r["task_type"] != INDUCTION]
    proposals = [module.parse_proposal(records[k]["completion"]) for k in programs]
    tasks = check_proposals(executor, proposals)
    for k, proposal, task in zip(programs, proposals, tasks):
        out[k] = proposal, VALID if task is not None else INVALID if proposal is not None else FORMAT_ERROR
    for k, r in enumerate(records):
        if r["role"] == PROPOSE and r["task_type"] == INDUCTION:
            # The program these inputs are for is not in the file: the reading alone is compared.
            proposal = module.parse_induction_proposal(r["completion"], n_inputs)
            out[k] = proposal, FORMAT_ERROR if proposal is None else "read"
    return out


def comparable(reading) -> object:
    """Readings of two versions of the module are different classes: compare their fields."""
    return getattr(reading, "__dict__", reading)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="samples.jsonl, evaluate.py reports, bench_play --samples files")
    parser.add_argument("--before", required=True, help="git revision of the parsers to compare with")
    parser.add_argument("--n-inputs", type=int, default=prompts.N_INPUTS, help="N of the induction proposals")
    parser.add_argument("--json", default="", help="write the table here")
    args = parser.parse_args()
    versions = {args.before: load_prompts_at(args.before), "now": prompts}
    table = []
    with Executor() as executor:
        for name in args.files:
            path = Path(name)
            if not path.is_file():
                raise SystemExit(f"error: {path}: no such file")
            report, records = read_records(path)
            verdicts = {}
            for version, module in versions.items():
                if report is not None:
                    verdicts[version] = verdicts_of_report(executor, report, records,
                                                           lambda t, text, m=module: m.parse_solution(t, text))
                else:
                    verdicts[version] = verdicts_of_samples(executor, records, module, args.n_inputs)
            rows: dict[str, dict] = {}
            for r, (read_before, was), (read_now, now) in zip(records, verdicts[args.before], verdicts["now"]):
                row = rows.setdefault(r["row"], {"file": name, "row": r["row"], "responses": 0, "readings_changed": 0,
                                                 "verdicts_changed": 0, "moves": Counter()})
                row["responses"] += 1
                row["readings_changed"] += comparable(read_before) != comparable(read_now)
                if was != now:
                    row["verdicts_changed"] += 1
                    row["moves"][f"{was} -> {now}"] += 1
            table += rows.values()
    print(f"{'file':<58} {'row':<20} {'responses':>9} {'readings changed':>16} {'verdicts changed':>16}  moves")
    for row in table:
        print(f"{row['file'][-58:]:<58} {row['row']:<20} {row['responses']:>9} {row['readings_changed']:>16} "
              f"{row['verdicts_changed']:>16}  " + ", ".join(f"{m} {k}" for m, k in row["moves"].items()))
    total = Counter()
    for row in table:
        total.update({k: row[k] for k in ("responses", "readings_changed", "verdicts_changed")})
    print(f"all: {total['responses']} responses, {total['readings_changed']} readings changed, "
          f"{total['verdicts_changed']} verdicts changed")
    if args.json:
        Path(args.json).write_text(json.dumps([{**row, "moves": dict(row["moves"])} for row in table], indent=2))


if __name__ == "__main__":
    main()
