"""Which recipe teaches the solver to reason? Short runs of several recipes from one seeding, side by side.

    python bench/ablations.py                               # seed once, train each recipe, evaluate, table
    python bench/ablations.py --recipes before,token-mean   # some of them
    python bench/ablations.py --phase table                 # the table from what is on disk

Every recipe starts from the same seeded buffers: seeding does not depend on the update recipe, so it
runs once (RUN/seed, `python azr_mini.py --steps 0` with the shared flags after --) and each recipe's
folder starts as a copy of it. The runs then differ only by their flags (RECIPES), with the same seed.
Each phase resumes where it stopped (kill it with SIGTERM; rerun the same command):

  seed   RUN/seed: seeding alone (step 0)
  train  RUN/<recipe>: python azr_mini.py --resume RUN/<recipe> --steps S <recipe flags> <shared flags>
  eval   the held-out self-play set (evaluate.py --bench selfplay) on each recipe's last checkpoint
  table  per recipe, over its last --window steps, counted response by response from samples.jsonl
         (with 95% intervals where it is a rate): the solver's empty-think share and mean response
         length per type, solve accuracy per type, format errors, valid proposals, entropy; and the
         held-out accuracy, paired item by item against the first recipe listed (fixed / broken /
         exact McNemar p). Printed, and written to RUN/ablations.json and RUN/ablations.md.

One seed and a few steps per recipe: a difference smaller than the intervals is a hint, not a result.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from run import latest_checkpoint, mean  # noqa: E402
import evaluate  # noqa: E402
import learning_curve  # noqa: E402
from prompts import SOLVE, TASK_TYPES, thinks_empty  # noqa: E402

# name -> azr_mini.py flags. "before" is the recipe of the first learning curve (README): the loss
# averaged per response; every other recipe changes one lever against the new default (token-mean).
RECIPES = {
    "before": ["--loss-agg", "seq-mean-token-mean"],
    "token-mean": [],
    "rollouts": ["--train-rollouts"],
    "examples": ["--worked-examples", "3"],
    "official-rule": ["--reward-rule", "official"],
    "lr-2e-4": ["--lr", "2e-4"],
    "all-layers": ["--lora-layers", "0"],
}


def run(command: list[str], what: str) -> None:
    print(f"{what}: python " + " ".join(command), flush=True)
    subprocess.run([sys.executable, *command], check=True, cwd=ROOT)


def seed(root: Path, shared: list[str]) -> Path:
    seed_dir = root / "seed"
    if latest_checkpoint(seed_dir) is None:
        shutil.rmtree(seed_dir, ignore_errors=True)      # an attempt killed while seeding
        run(["azr_mini.py", "--run-dir", str(seed_dir), "--steps", "0", *shared], "seed")
    return seed_dir


def train(root: Path, name: str, steps: int, shared: list[str]) -> None:
    run_dir = root / name
    if latest_checkpoint(run_dir) is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(root / "seed", run_dir)
    newest = latest_checkpoint(run_dir)
    if learning_curve.step_of(newest) >= steps:
        return
    # Flags given with --resume win over the saved config, so the recipe's flags take effect from
    # step 1 (its checkpoints then carry them).
    run(["azr_mini.py", "--resume", str(run_dir), "--steps", str(steps), *RECIPES[name], *shared], f"train {name}")


def heldout_report(root: Path, name: str, limit: int) -> Path | None:
    newest = latest_checkpoint(root / name)
    return None if newest is None else learning_curve.report_path(newest, "selfplay", limit)


def evaluate_last(root: Path, name: str, limit: int) -> None:
    report = heldout_report(root, name, limit)
    if report is not None and not report.exists():
        run(["evaluate.py", "--adapter", str(report.parent.parent), "--bench", "selfplay", "--limit", str(limit)],
            f"eval {name}")


def rate(rows: list[dict], hit) -> dict:
    k, n = sum(bool(hit(r)) for r in rows), len(rows)
    return {"k": k, "n": n, "rate": k / n if n else None, "interval": list(evaluate.wilson(k, n))}


def summarize(root: Path, name: str, window: int, limit: int) -> dict | None:
    """One recipe's row: its last `window` steps, and its held-out score."""
    run_dir = root / name
    if not (run_dir / "metrics.jsonl").exists():
        return None
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if not metrics:
        return None
    last = metrics[-1]["step"]
    first = max(1, last - window + 1)
    steps = [m for m in metrics if m["step"] >= first]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    samples = [r for r in samples if r["step"] >= first]
    solver = [r for r in samples if r["role"] == SOLVE]
    row = {"recipe": name, "flags": RECIPES[name], "steps": [first, last],
           "format_errors": rate(samples, lambda r: r["parsed"] is None),
           "valid_proposals": rate([r for r in samples if r["phase"] == "propose"], lambda r: r["valid"]),
           "entropy": mean(m["entropy"] for m in steps if m.get("entropy") is not None)}
    for t in TASK_TYPES:
        row[f"empty_think/{t}"] = rate([r for r in solver if r["task_type"] == t], lambda r: thinks_empty(r["completion"]))
        row[f"accuracy/{t}"] = rate([r for r in solver if r["task_type"] == t and r["phase"] == "solve"],
                                    lambda r: r["r_role"] == 1.0)
        row[f"length/{t}/solve"] = mean(m[f"length/{t}/solve"] for m in steps
                                                 if m.get(f"length/{t}/solve") is not None)
    report = heldout_report(root, name, limit)
    if report is not None and report.exists():
        summary = json.loads(report.read_text())["summary"]
        row["heldout"] = {"k": summary["correct"], "n": summary["n"], "rate": summary["accuracy"],
                          "interval": summary["interval"], "step": learning_curve.step_of(report.parent.parent)}
    return row


def table(root: Path, names: list[str], window: int, limit: int) -> list[dict]:
    rows = [row for name in names if (row := summarize(root, name, window, limit)) is not None]
    reference = heldout_report(root, names[0], limit)
    for row in rows[1:]:
        other = heldout_report(root, row["recipe"], limit)
        if "heldout" in row and reference is not None and reference.exists() and other.exists():
            row["heldout_vs_first"] = learning_curve.paired(reference, other)
    return rows


def markdown(rows: list[dict]) -> str:
    def pct(x):
        return "-" if not x or x["rate"] is None else f"{100 * x['rate']:.0f}% ({x['k']}/{x['n']})"

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    head = ["recipe", "steps"] + [f"empty think {t[:3]}" for t in TASK_TYPES] + \
        [f"solve length {t[:3]}" for t in TASK_TYPES] + [f"accuracy {t[:3]}" for t in TASK_TYPES] + \
        ["format errors", "valid proposals", "entropy", "held-out", "vs first: fixed/broken, p"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        paired = r.get("heldout_vs_first")
        cells = [f"`{r['recipe']}`", f"{r['steps'][0]}-{r['steps'][1]}"] + \
            [pct(r[f"empty_think/{t}"]) for t in TASK_TYPES] + [num(r[f"length/{t}/solve"], ".0f") for t in TASK_TYPES] + \
            [pct(r[f"accuracy/{t}"]) for t in TASK_TYPES] + \
            [pct(r["format_errors"]), pct(r["valid_proposals"]), num(r["entropy"], ".2f"), pct(r.get("heldout")),
             f"{paired['fixed']}/{paired['broken']}, p = {paired['p']:.2f}" if paired else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    shared = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--phase", default="all", choices=("all", "seed", "train", "eval", "table"))
    parser.add_argument("--root", default=str(ROOT / "runs" / "ablations"), help="one folder per recipe in here")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, from: " + ", ".join(RECIPES))
    parser.add_argument("--steps", type=int, default=10, help="training steps per recipe")
    parser.add_argument("--window", type=int, default=5, help="the table counts the last N steps of each run")
    parser.add_argument("--limit", type=int, default=60, help="held-out self-play tasks evaluated")
    args = parser.parse_args(argv)
    names = args.recipes.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"--recipes: unknown {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    if min(args.steps, args.window, args.limit) < 1:
        parser.error("--steps, --window and --limit must be positive")
    root = Path(args.root)
    if args.phase in ("all", "seed", "train"):
        seed(root, shared)
    if args.phase in ("all", "train"):
        for name in names:
            train(root, name, args.steps, shared)
    if args.phase in ("all", "eval"):
        for name in names:
            evaluate_last(root, name, args.limit)
    if args.phase in ("all", "table"):
        rows = table(root, names, args.window, args.limit)
        if not rows:
            raise SystemExit(f"error: {root} holds no trained recipe of {', '.join(names)}")
        (root / "ablations.json").write_text(json.dumps(rows, indent=1))
        (root / "ablations.md").write_text(markdown(rows))
        print(markdown(rows))


if __name__ == "__main__":
    main()
