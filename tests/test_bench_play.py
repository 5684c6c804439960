"""bench/bench_play.py: the step-0 instrument runs end to end and writes its table (tiny model)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CRUX = [{"code": "def f(x):\n    return x + 1", "input": "1", "output": "2", "id": "a"},
        {"code": "def f(s):\n    return s[::-1]", "input": "'ab'", "output": "'ba'", "id": "b"}]


def run_bench(tmp_path, *args):
    return subprocess.run([sys.executable, "bench/bench_play.py", "--model", "tiny", *args, "--", "--max-new-tokens", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_bench_play_prints_and_writes_one_row_per_task_type_and_role(tmp_path):
    data = tmp_path / "crux.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in CRUX))
    out = run_bench(tmp_path, "--n", "2", "--data", str(data), "--json", str(tmp_path / "t.json"),
                    "--samples", str(tmp_path / "s.jsonl"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "well formed" in out.stdout and "copies among all proposals" in out.stdout
    table = json.loads((tmp_path / "t.json").read_text())["tables"]["now"]
    assert [r["row"] for r in table] == [f"{role}/{t}" for role in ("propose", "solve")
                                         for t in ("deduction", "abduction", "induction")]
    for r in table:
        assert r["n"] == 2 and 0 <= r["well_formed"] <= 1 and r["length"] <= 8
        assert (r["valid"] is None) == (r["correct"] is not None) == r["row"].startswith("solve")
    samples = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and all(s["completion"].startswith("<think>") for s in samples)


def test_bench_play_refuses_a_missing_data_file_and_an_unknown_row(tmp_path):
    out = run_bench(tmp_path, "--data", str(tmp_path / "nope.jsonl"))
    assert out.returncode != 0 and "no such file" in out.stderr
    out = run_bench(tmp_path, "--rows", "propose/nothing")
    assert out.returncode == 2 and "unknown" in out.stderr
