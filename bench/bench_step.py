"""Where a self-play step spends its time: runs a couple of steps of the cpu preset (any azr_mini.py
flag may be added) and prints the split generate / execute / update / everything else, and the peak
memory. Target: everything other than generating and updating under 10% of a step.

    python bench/bench_step.py [--steps 2] [any azr_mini.py flag, e.g. --model tiny]
    python bench/bench_step.py --from-run runs/<name>    # the same figures for a finished run
"""
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import azr_mini  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--from-run"]:
        run_dir = Path(argv[1])
        cfg = azr_mini.Config.exactly(json.loads((run_dir / "config.json").read_text()))
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        print(f"run {run_dir}: model {cfg.model}, preset {cfg.preset}, {len(steps)} steps")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            if "--run-dir" not in argv:
                argv += ["--run-dir", tmp]
            cfg = azr_mini.parse_args(argv)
            start = time.perf_counter()
            run_dir = azr_mini.train(cfg)
            total = time.perf_counter() - start
            steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        print(f"\nmodel {cfg.model}, preset {cfg.preset}, {len(steps)} steps, {total:.0f} s in all "
              f"(loading and seeding included)")
    parts = ("generate", "execute", "update", "other")
    print(f"{'step':>4} " + " ".join(f"{p:>9}" for p in parts) + f" {'step s':>8} {'non gen/upd':>11}")
    for m in steps:
        rest = m["time/execute"] + m["time/other"]
        print(f"{m['step']:>4} " + " ".join(f"{m['time/' + p]:9.1f}" for p in parts)
              + f" {m['time/step']:8.1f} {100 * rest / m['time/step']:10.1f}%")
    sums = {p: sum(m[f"time/{p}"] for m in steps) for p in parts}
    step_total = sum(m["time/step"] for m in steps)
    share = 100 * (sums["execute"] + sums["other"]) / step_total
    print("all  " + " ".join(f"{sums[p]:9.1f}" for p in parts) + f" {step_total:8.1f} {share:10.1f}%")
    print(f"everything other than generating and updating: {share:.1f}% of step time (target < 10%)")
    print(f"peak resident memory: {max(m['memory/peak_rss_mb'] for m in steps):.0f} MB"
          + (f", peak CUDA memory {max(m['memory/peak_cuda_mb'] for m in steps):.0f} MB"
             if "memory/peak_cuda_mb" in steps[0] else ""))


if __name__ == "__main__":
    main()
