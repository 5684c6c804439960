"""--export-seeds: a run's buffers in the seed file format of the authors' implementation."""
import json
import subprocess
import sys

import pytest

from run import latest_checkpoint, program_imports, read_state
from scripted import ROOT, run_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

IO_FIELDS = {"snippet", "input", "output", "imports", "original_snippet", "composite_functions"}
CODE_F_FIELDS = {"snippet", "inputs", "outputs", "message", "imports"}


def test_export_writes_both_files_in_the_documented_format(tmp_path):
    run = run_tiny(tmp_path / "run", "--steps", "1")
    state = read_state(latest_checkpoint(run))
    out = subprocess.run([sys.executable, "azr_mini.py", "--export-seeds", str(run), str(tmp_path / "seeds.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    io = [json.loads(line) for line in (tmp_path / "seeds.jsonl").read_text().splitlines()]
    code_f = [json.loads(line) for line in (tmp_path / "seeds_code_f.jsonl").read_text().splitlines()]
    assert io and all(set(line) == IO_FIELDS for line in io)
    assert io[0]["snippet"] == "def f(a):\n    return a" and io[0]["input"] == "'Hello world'"   # the seed first
    assert all(line["snippet"] == line["original_snippet"] and line["composite_functions"] == [] for line in io)
    buffers = state["buffers"]
    expected = {(t["program"], t["input"]) for t in buffers["deduction"] + buffers["abduction"]}
    assert {(line["snippet"], line["input"]) for line in io} == expected and len(io) == len(expected)
    assert code_f and len(code_f) == len(buffers["induction"])
    for line, task in zip(code_f, buffers["induction"]):
        assert set(line) == CODE_F_FIELDS and line["message"] == task["message"]
        assert line["inputs"] == [i for i, _ in task["visible"] + task["hidden"]]
        assert line["outputs"] == [o for _, o in task["visible"] + task["hidden"]]


def test_imports_are_listed_and_a_missing_run_is_a_clear_error(tmp_path):
    assert program_imports("import math\nfrom collections import Counter\ndef f(x):\n    return x") == [
        "import math", "from collections import Counter"]
    assert program_imports("def f(:") == []
    out = subprocess.run([sys.executable, "azr_mini.py", "--export-seeds", str(tmp_path), str(tmp_path / "s.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no checkpoint found" in out.stderr
    out = subprocess.run([sys.executable, "azr_mini.py", "--export-seeds", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "usage" in out.stderr
