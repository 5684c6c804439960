"""bench/learning_curve.py: train, evaluate the kept checkpoints, plot; a second call resumes (tiny model)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import learning_curve  # noqa: E402
TINY = ["--model", "tiny", "--max-new-tokens", "8", "--batch-size", "2", "--n-inputs", "4",
        "--learnability-rollouts", "2", "--seed-buffer-size", "2", "--seed-rounds", "1", "--exec-timeout-s", "2"]


def curve(tmp_path, *args):
    return subprocess.run([sys.executable, "bench/learning_curve.py", "--run-dir", str(tmp_path / "run"),
                           "--out", str(tmp_path / "docs"), "--benches", "selfplay", "--end-benches", "humaneval", "--limit", "3", *args,
                           "--", *TINY], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_learning_curve_trains_evaluates_every_kept_checkpoint_and_draws(tmp_path):
    out = curve(tmp_path, "--steps", "2", "--every", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    for step in (0, 1, 2):                          # the base model (step 0) and both steps were kept
        report = json.loads((run / f"checkpoint-{step:06d}" / "eval" / "selfplay-3.json").read_text())
        assert report["step"] == step and report["summary"]["n"] == 3
    # the transfer benchmark only before and after: the base model and the last kept checkpoint
    assert [(run / f"checkpoint-{step:06d}" / "eval" / "humaneval-3.json").exists() for step in (0, 1, 2)] == [True, False, True]
    assert (tmp_path / "docs" / "learning_curve_eval.png").stat().st_size > 10_000
    assert (tmp_path / "docs" / "learning_curve_signals.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "docs" / "learning_curve.json").read_text())
    assert data["steps"] == [1, 2] and [p["step"] for p in data["evals"]["selfplay"]] == [0, 1, 2]
    assert len(data["signals"]["format_errors"]) == 2
    assert data["paired"]["selfplay"]["steps"] == [0, 2] and data["paired"]["selfplay"]["n"] == 3
    assert [p["step"] for p in data["evals"]["humaneval"]] == [0, 2] and data["paired"]["humaneval"]["steps"] == [0, 2]
    # a second call with more steps resumes the run and evaluates only the new checkpoint
    out = curve(tmp_path, "--steps", "3", "--every", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--resume" in out.stdout and out.stdout.count("eval: python evaluate.py") == 1
    data = json.loads((tmp_path / "docs" / "learning_curve.json").read_text())
    assert [p["step"] for p in data["evals"]["selfplay"]] == [0, 1, 2, 3]
    assert [p["step"] for p in data["evals"]["humaneval"]] == [0, 2, 3] and data["paired"]["humaneval"]["steps"] == [0, 3]


def test_learning_curve_refuses_an_unknown_benchmark(tmp_path, capsys):
    for flags, name in ((["--benches", "mmlu"], "mmlu"), (["--end-benches", "humaneval,mbpp"], "mbpp")):
        with pytest.raises(SystemExit) as stopped:            # before anything is trained or read
            learning_curve.main(["--run-dir", str(tmp_path / "run"), *flags])
        assert stopped.value.code == 2 and f"unknown {name}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_paired_test_counts_fixed_and_broken_items(tmp_path):
    assert learning_curve.mcnemar(0, 0) == 1.0 and learning_curve.mcnemar(3, 3) == 1.0
    assert learning_curve.mcnemar(5, 0) == 2 / 32                 # all 5 changes one way: p = 2 * 0.5^5
    assert abs(learning_curve.mcnemar(10, 3) - 0.0923) < 1e-4
    for name, right in (("a.json", [True, False, False, True]), ("b.json", [True, True, True, False])):
        (tmp_path / name).write_text(json.dumps({"items": [{"id": str(k), "correct": c} for k, c in enumerate(right)]}))
    assert learning_curve.paired(tmp_path / "a.json", tmp_path / "b.json") == {
        "n": 4, "fixed": 2, "broken": 1, "p": 1.0}
