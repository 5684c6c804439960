"""Executor throughput: validate all 800 CRUXEval programs with the fork-server executor and, side by
side in the same run, with the naive path (a fresh `python -c` per run, two runs per program with
different hash seeds, spread over the same number of worker threads). The two paths take turns on
blocks of programs; each program is timed once on each path. Prints validated programs per second
for both, the ratio, and whether the verdicts agree.

    python bench/bench_executor.py [--workers N] [--limit N] [--blocks N] [--executor-only]

The executor prints its jail's layers at start-up (to stderr); run it as root and as an ordinary user
to compare the two jails (as a user it needs a Python that user can run).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from executor import Executor, same_value  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cruxeval.jsonl"

# The naive runner: what a first implementation does - no sandbox, one interpreter per run.
NAIVE_RUNNER = "import sys\nexec(sys.argv[1])\nprint(repr(eval('f(' + sys.argv[2] + '\\n)')))"


def naive_run(program: str, input_str: str, hash_seed: int, timeout_s: float) -> tuple[str, str | None]:
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
    try:
        proc = subprocess.run([sys.executable, "-c", NAIVE_RUNNER, program, input_str], env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "timeout", None
    if proc.returncode != 0:
        return "error", None
    return "ok", proc.stdout.strip().splitlines()[-1]


def naive_validate(job, timeout_s: float) -> tuple[str, str | None]:
    first = naive_run(*job, hash_seed=1, timeout_s=timeout_s)
    if first[0] != "ok":
        return first
    second = naive_run(*job, hash_seed=2, timeout_s=timeout_s)
    if second[0] != "ok":
        return second
    return ("ok", first[1]) if same_value(first[1], second[1]) else ("nondeterministic", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel workers for both paths")
    parser.add_argument("--limit", type=int, default=800, help="number of CRUXEval programs")
    parser.add_argument("--blocks", type=int, default=8,
                        help="the programs are split into this many blocks, each timed on both paths in turn")
    parser.add_argument("--executor-only", action="store_true",
                        help="time the executor alone, without the naive path (which takes most of the time)")
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"error: CRUXEval not found at {DATA}")
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][: args.limit]
    jobs = [(r["code"], r["input"]) for r in rows]
    print(f"{len(jobs)} CRUXEval programs, {args.workers} workers, {os.cpu_count()} cores, "
          f"python {sys.version.split()[0]}")

    # The two paths take turns block by block, so a slow spell of the machine (this one is a shared
    # VM) falls on both and not on one of them.
    size = -(-len(jobs) // args.blocks)
    fast, naive, fast_s, naive_s, block_ratios = [], [], 0.0, 0.0, []
    start = time.perf_counter()
    with Executor(workers=args.workers) as ex, ThreadPoolExecutor(args.workers) as pool:
        ex.validate_many(jobs[: 4 * args.workers])         # start and warm every server
        startup = time.perf_counter() - start
        for first in range(0, len(jobs), size):
            block = jobs[first: first + size]
            start = time.perf_counter()
            fast += ex.validate_many(block)
            block_fast_s = time.perf_counter() - start
            fast_s += block_fast_s
            if args.executor_only:
                continue
            start = time.perf_counter()
            naive += pool.map(lambda job: naive_validate(job, 10.0), block)
            block_naive_s = time.perf_counter() - start
            naive_s += block_naive_s
            block_ratios.append(block_naive_s / block_fast_s)
        isolated = ex.isolated

    matches_recorded = sum(f.status == "ok" and same_value(f.value, r["output"]) for f, r in zip(fast, rows))
    print(f"executor (fork server):  {len(jobs) / fast_s:8.1f} programs/s  ({fast_s:.2f} s; servers started "
          f"and warmed in {startup:.2f} s; namespaces: {isolated})")
    if args.executor_only:
        print(f"outputs equal to CRUXEval's: {matches_recorded}/{len(jobs)}")
        return
    same_verdicts = sum(f.status == n[0] and (f.status != "ok" or same_value(f.value, n[1]))
                        for f, n in zip(fast, naive))
    print(f"naive (python -c x 2):   {len(jobs) / naive_s:8.1f} programs/s  ({naive_s:.2f} s)")
    print(f"speed-up: {naive_s / fast_s:.1f}x (target >= 15x); the two paths took turns over {len(block_ratios)} "
          f"blocks, whose speed-ups ranged from {min(block_ratios):.1f}x to {max(block_ratios):.1f}x")
    print(f"identical verdicts: {same_verdicts}/{len(jobs)}; outputs equal to CRUXEval's: "
          f"{matches_recorded}/{len(jobs)}")


if __name__ == "__main__":
    main()
