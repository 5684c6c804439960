"""Does the loop make the model better? Train, evaluate along the way, and draw what changed.

    python bench/learning_curve.py                  # train, evaluate, plot (each phase resumes)
    python bench/learning_curve.py --phase plot     # redraw from what is on disk
    python bench/learning_curve.py -- --lr 5e-5     # azr_mini.py flags for the training run go after --

Three phases, each skipping what is already on disk, so an interrupted run continues where it stopped:

  train  python azr_mini.py --run-dir RUN --steps S --keep-every E [flags after --]
         (or --resume RUN --steps S once the run exists); the cpu preset unless the flags say otherwise.
  eval   python evaluate.py --adapter RUN/checkpoint-N --bench B --limit L for every kept checkpoint
         (step 0 is the base model: its adapter is still the zero init), written to
         RUN/checkpoint-N/eval/<bench>-<L>.json; the transfer benchmarks (--end-benches: HumanEval,
         GSM8K) only on the base model and the last kept checkpoint, before and after.
  plot   docs/learning_curve_eval.png     benchmark accuracy per checkpoint, with 95% intervals;
         docs/learning_curve_signals.png  the loop's own signals per step (format errors, valid
                                          proposals, solve accuracy and response length per type,
                                          entropy, zero-advantage share), raw and as a moving mean;
         docs/learning_curve.json         the numbers plotted, and the settings;
         and for each benchmark the base model against the last checkpoint on the same items: how
         many were fixed, how many broken, and the exact McNemar p-value of that split;
         and it prints the loop's own rates (format errors, valid proposals, solve accuracy, empty thinks) over
         the first and the last --compare-steps steps, counted response by response, with intervals.
  example  (on its own) notebooks/example_run/: config, metrics, evaluation reports and a sample of
           the responses, for notebooks/02_run_analysis.ipynb.

The README's learning-curve section was made with the defaults below on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from run import is_kept, latest_checkpoint  # noqa: E402
import evaluate  # noqa: E402
from prompts import TASK_TYPES, thinks_empty  # noqa: E402

DOCS = ROOT / "docs"
# The loop's signals drawn, as (metrics.jsonl key, label); per-type keys are filled in below.
SIGNALS = [("format_errors", "format errors (all responses)"), ("valid_proposals", "valid proposals"),
           ("zero_advantage", "zero-advantage share"), ("entropy", "mean token entropy (nats)")]


def kept_checkpoints(run_dir: Path, every: int) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint-*") if p.is_dir() and is_kept(p, every))


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("checkpoint-"))


def train(args, loop_flags: list[str]) -> None:
    run_dir = Path(args.run_dir)
    newest = latest_checkpoint(run_dir)
    if newest is not None and step_of(newest) >= args.steps:
        print(f"train: {run_dir} is at step {step_of(newest)}, nothing to do")
        return
    if newest is None:
        command = ["--run-dir", str(run_dir), "--steps", str(args.steps), "--keep-every", str(args.every), *loop_flags]
    else:
        command = ["--resume", str(run_dir), "--steps", str(args.steps)]
    print("train: python azr_mini.py " + " ".join(command), flush=True)
    subprocess.run([sys.executable, str(ROOT / "azr_mini.py"), *command], check=True)


def report_path(checkpoint: Path, bench: str, limit: int) -> Path:
    return checkpoint / "eval" / evaluate.report_name(bench, limit)   # where evaluate.py puts it


def bench_lists(args) -> tuple[list[str], list[str]]:
    """(--benches, --end-benches not already in --benches)."""
    every = args.benches.split(",")
    return every, [b for b in args.end_benches.split(",") if b and b not in every]


def benches_of(args, checkpoint: Path, checkpoints: list[Path]) -> list[str]:
    """Every kept checkpoint gets --benches; the first and the last get --end-benches as well."""
    every, end = bench_lists(args)
    return every + end if checkpoint in (checkpoints[0], checkpoints[-1]) else every


def evaluate_checkpoints(args) -> None:
    checkpoints = kept_checkpoints(Path(args.run_dir), args.every)
    for checkpoint in checkpoints:
        missing = [b for b in benches_of(args, checkpoint, checkpoints)
                   if not report_path(checkpoint, b, args.limit).exists()]
        if not missing:
            continue
        command = ["--adapter", str(checkpoint), "--bench", ",".join(missing), "--limit", str(args.limit)]
        print("eval: python evaluate.py " + " ".join(command), flush=True)
        subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *command], check=True)


def mcnemar(fixed: int, broken: int) -> float:
    """Exact two-sided McNemar test: the chance of a split at least this uneven between items that
    went wrong -> right (fixed) and right -> wrong (broken), were training to change nothing."""
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(fixed, broken) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(first: Path, last: Path) -> dict:
    """The same items before and after: how many each checkpoint got right, how many changed."""
    before = {o["id"]: o["correct"] for o in json.loads(first.read_text())["items"]}
    after = {o["id"]: o["correct"] for o in json.loads(last.read_text())["items"]}
    common = before.keys() & after.keys()
    fixed = sum(after[i] and not before[i] for i in common)
    broken = sum(before[i] and not after[i] for i in common)
    return {"n": len(common), "fixed": fixed, "broken": broken, "p": mcnemar(fixed, broken)}


def moving_mean(values: list, window: int) -> list:
    out = []
    for k in range(len(values)):
        recent = [v for v in values[max(0, k - window + 1):k + 1] if v is not None]
        out.append(sum(recent) / len(recent) if recent else None)
    return out


def project_path(path: Path) -> str:
    """A path relative to the project when it lies inside it (docs/ should not name this machine)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def collect(args) -> dict:
    """The numbers to plot: eval accuracy per checkpoint, and the loop's signals per step."""
    run_dir = Path(args.run_dir)
    every, end = bench_lists(args)
    benches = every + end
    checkpoints = kept_checkpoints(run_dir, args.every)
    evals: dict[str, list] = {}
    for checkpoint in checkpoints:
        for bench in benches:
            path = report_path(checkpoint, bench, args.limit)
            if not path.exists():
                continue
            summary = json.loads(path.read_text())["summary"]
            rows = [(bench, summary)] + [(f"{bench}/{t}", s) for t, s in summary.get("per_type", {}).items()]
            for name, s in rows:
                evals.setdefault(name, []).append({"step": step_of(checkpoint), "n": s["n"], "correct": s["correct"],
                                                   "accuracy": s["accuracy"], "interval": s["interval"],
                                                   "format_errors": s["format_errors"]})
    pairs = {}
    for bench in benches:   # the base model against the last evaluated checkpoint
        done = [c for c in checkpoints if report_path(c, bench, args.limit).exists()]
        if len(done) > 1:
            pairs[bench] = {"steps": [step_of(done[0]), step_of(done[-1])],
                            **paired(report_path(done[0], bench, args.limit), report_path(done[-1], bench, args.limit))}
    metrics_path = run_dir / "metrics.jsonl"
    lines = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    keys = [k for k, _ in SIGNALS] + [f"accuracy/{t}" for t in TASK_TYPES] + [f"valid_proposals/{t}" for t in TASK_TYPES] \
        + [f"length/{t}/{role}" for t in TASK_TYPES for role in ("propose", "solve")] \
        + [f"empty_think/{t}" for t in TASK_TYPES]
    signals = {k: [m.get(k) for m in lines] for k in keys}
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    for key in ("run_dir", "resume"):    # as the project names them, not this machine's absolute paths
        if config.get(key):
            config[key] = project_path(Path(config[key]))
    return {"run_dir": project_path(run_dir), "limit": args.limit, "config": config, "steps": [m["step"] for m in lines],
            "evals": evals, "paired": pairs, "signals": signals}


def early_late(run_dir: Path, window: int) -> dict:
    """The loop's own rates over the first and the last `window` steps, counted over responses in
    samples.jsonl (training phases only: proposals, solve batches, learnability rollouts), each with
    its 95% interval: what moved beyond the noise of the counts."""
    path = run_dir / "samples.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    rows = [r for r in rows if r["step"] > 0]       # step 0 is seeding
    if not rows:
        return {}
    last = max(r["step"] for r in rows)
    spans = {"early": (1, min(window, last)), "late": (max(1, last - window + 1), last)}
    rates = {  # name -> (which responses count, which of them are a "hit")
        "format errors, all": (lambda r: True, lambda r: r["parsed"] is None),
        **{f"format errors, {role}/{t}": ((lambda r, t=t, role=role: r["task_type"] == t and r["role"] == role),
                                          lambda r: r["parsed"] is None)
           for role in ("propose", "solve") for t in TASK_TYPES},
        **{f"valid proposals, {t}": ((lambda r, t=t: r["task_type"] == t and r["phase"] == "propose"), lambda r: r["valid"])
           for t in TASK_TYPES},
        **{f"solve accuracy, {t}": ((lambda r, t=t: r["task_type"] == t and r["phase"] == "solve"),
                                    lambda r: r["r_role"] == 1.0) for t in TASK_TYPES},
        **{f"empty think, solve/{t}": ((lambda r, t=t: r["task_type"] == t and r["role"] == "solve"),
                                       lambda r: thinks_empty(r["completion"])) for t in TASK_TYPES},
    }
    out = {"window": window, "spans": spans, "rates": {}}
    for name, (counts, hit) in rates.items():
        out["rates"][name] = {}
        for span, (lo, hi) in spans.items():
            group = [r for r in rows if lo <= r["step"] <= hi and counts(r)]
            k = sum(bool(hit(r)) for r in group)
            out["rates"][name][span] = {"k": k, "n": len(group), "interval": list(evaluate.wilson(k, len(group)))}
    return out


def print_early_late(table: dict) -> None:
    if not table:
        return
    (a, b), (c, d) = table["spans"]["early"], table["spans"]["late"]
    print(f"\nthe loop's own rates, steps {a}-{b} against steps {c}-{d} (95% intervals; * = the intervals do not overlap)")
    for name, spans in table["rates"].items():
        early, late = spans["early"], spans["late"]
        def fmt(x):
            if not x["n"]:
                return f"{'-':>22}"
            return f"{x['k']:>3}/{x['n']:<4} {100 * x['k'] / x['n']:3.0f}% [{100 * x['interval'][0]:2.0f}-{100 * x['interval'][1]:3.0f}%]"
        apart = early["n"] and late["n"] and (late["interval"][0] > early["interval"][1] or late["interval"][1] < early["interval"][0])
        print(f"{name:<32} {fmt(early)}  ->  {fmt(late)} {'*' if apart else ''}")


def plot(data: dict, out_dir: Path, window: int) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    names = sorted(data["evals"])
    if names:
        # left: one line per benchmark; right: the held-out self-play set per task type
        groups = [[n for n in names if "/" not in n], [n for n in names if "/" in n]]
        groups = [g for g in groups if g]
        fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
        last = max(p["step"] for points in data["evals"].values() for p in points)
        for ax, group, title in zip(axes[0], groups, ("Benchmarks along the run", "Held-out self-play tasks, per type")):
            for k, name in enumerate(group):
                points = data["evals"][name]
                shift = (k - (len(group) - 1) / 2) * last / 150   # side by side, so the bars do not hide each other
                steps = [p["step"] + shift for p in points]
                acc = [100 * p["accuracy"] for p in points]
                err = [[100 * (p["accuracy"] - p["interval"][0]) for p in points],
                       [100 * (p["interval"][1] - p["accuracy"]) for p in points]]
                ax.errorbar(steps, acc, yerr=err, marker="o", capsize=3, label=f"{name} (n={points[0]['n']})")
            ax.set_xlabel("training step (0 = the base model)")
            ax.set_ylabel("accuracy, % (greedy; bars: 95% Wilson interval)")
            ax.set_ylim(bottom=0)
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "learning_curve_eval.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    steps = data["steps"]
    if steps:
        panels = [[(k, label)] for k, label in SIGNALS] + [
            [(f"accuracy/{t}", t) for t in TASK_TYPES], [(f"valid_proposals/{t}", t) for t in TASK_TYPES],
            [(f"length/{t}/solve", t) for t in TASK_TYPES], [(f"length/{t}/propose", t) for t in TASK_TYPES]]
        titles = [label for _, label in SIGNALS] + ["solve accuracy per type", "valid proposals per type",
                                                     "solver response length (tokens)", "proposer response length (tokens)"]
        fig, axes = plt.subplots(2, 4, figsize=(16, 7), sharex=True)
        for ax, panel, title in zip(axes.flat, panels, titles):
            for key, label in panel:
                values = data["signals"][key]
                shown = [(s, v) for s, v in zip(steps, values) if v is not None]
                if not shown:
                    continue
                line = ax.plot(*zip(*shown), alpha=0.3, linewidth=1)[0]
                smooth = [(s, v) for s, v in zip(steps, moving_mean(values, window)) if v is not None]
                ax.plot(*zip(*smooth), color=line.get_color(), linewidth=2, label=label if len(panel) > 1 else None)
            ax.set_title(title, fontsize=10)
            if not panel[0][0].startswith(("entropy", "length")):
                ax.set_ylim(-0.02, 1.02)            # a rate: the whole range, so a change looks its size
            ax.grid(alpha=0.3)
            if len(panel) > 1:
                ax.legend(fontsize=8)
        for ax in axes[-1]:
            ax.set_xlabel("step")
        fig.suptitle(f"The loop's own signals (thin: each step; thick: mean of the last {window} steps)")
        fig.tight_layout()
        written.append(out_dir / "learning_curve_signals.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def export_example(run_dir: Path, out: Path, every: int, limit_samples: int = 400) -> None:
    """A small copy of the run for notebooks/02_run_analysis.ipynb: config, metrics, the evaluation
    reports of the kept checkpoints (no weights), and a sample of samples.jsonl: every valid or
    flagged proposal, then an even spread of the other responses, up to limit_samples lines."""
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(run_dir / name, out / name)
    for checkpoint in kept_checkpoints(run_dir, every):
        if (checkpoint / "eval").is_dir():
            shutil.copytree(checkpoint / "eval", out / checkpoint.name / "eval")
    lines = (run_dir / "samples.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    keep = [k for k, r in enumerate(rows) if r["flagged"] or (r["role"] == "propose" and r["valid"])][:limit_samples]
    chosen = set(keep)
    rest = [k for k in range(len(rows)) if k not in chosen]
    spare = limit_samples - len(keep)
    if spare > 0 and rest:
        keep += rest[::max(1, len(rest) // spare)][:spare]
    (out / "samples.jsonl").write_text("".join(lines[k] + "\n" for k in sorted(keep)))
    print(f"wrote {out}: {len(keep)} of {len(rows)} samples, "
          f"{sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB")


def print_evals(data: dict) -> None:
    for name, points in sorted(data["evals"].items()):
        row = "  ".join(f"step {p['step']}: {p['correct']}/{p['n']} [{100 * p['interval'][0]:.0f}-{100 * p['interval'][1]:.0f}%]"
                        for p in points)
        print(f"{name:<24} {row}")
    for bench, p in data["paired"].items():
        print(f"{bench}, step {p['steps'][0]} -> {p['steps'][1]}, the same {p['n']} items: {p['fixed']} fixed, "
              f"{p['broken']} broken (exact McNemar p = {p['p']:.2f})")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    loop_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--phase", default="all", choices=("all", "train", "eval", "plot", "example"),
                        help="example: copy a small piece of the run to notebooks/example_run/ (not part of all)")
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "learning-curve"))
    parser.add_argument("--steps", type=int, default=30, help="training steps in all")
    parser.add_argument("--every", type=int, default=10, help="evaluate every N steps (and the base model)")
    parser.add_argument("--benches", default="cruxeval-o,cruxeval-i,selfplay")
    parser.add_argument("--end-benches", default="humaneval,gsm8k",
                        help="evaluated on the base model and the last kept checkpoint only ('' for none)")
    parser.add_argument("--limit", type=int, default=64, help="items per benchmark")
    parser.add_argument("--window", type=int, default=5, help="steps in the moving mean of the signals")
    parser.add_argument("--compare-steps", type=int, default=10, help="the first and the last N steps, "
                        "compared response by response")
    parser.add_argument("--out", default=str(DOCS), help="where the PNGs and the JSON go")
    args = parser.parse_args(argv)
    every, end = bench_lists(args)
    unknown = [b for b in every + end if b not in evaluate.BENCHES]
    if unknown:
        parser.error(f"--benches/--end-benches: unknown {', '.join(unknown)}; choose from {', '.join(evaluate.BENCHES)}")
    if min(args.steps, args.every, args.limit, args.window, args.compare_steps) < 1:
        parser.error("--steps, --every, --limit, --window and --compare-steps must be positive")
    if args.phase in ("all", "train"):
        train(args, loop_flags)
    if args.phase in ("all", "eval"):
        evaluate_checkpoints(args)
    if args.phase == "example":
        export_example(Path(args.run_dir), ROOT / "notebooks" / "example_run", args.every)
    if args.phase in ("all", "plot"):
        data = collect(args)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        data["early_late"] = early_late(Path(args.run_dir), args.compare_steps)
        (out / "learning_curve.json").write_text(json.dumps(data, indent=1))
        for path in plot(data, out, args.window):
            print(f"wrote {path}")
        print_evals(data)
        print_early_late(data["early_late"])


if __name__ == "__main__":
    main()
