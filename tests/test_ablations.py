"""bench/ablations.py: recipes trained from one seeding, evaluated, tabled; a second call resumes (tiny model)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import ablations  # noqa: E402
from test_learning_curve import TINY  # noqa: E402


def ablate(root: Path, *args):
    return subprocess.run([sys.executable, "bench/ablations.py", "--root", str(root), "--recipes", "before,rollouts",
                           "--window", "1", "--limit", "3", *args, "--", *TINY],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_recipes_start_from_one_seeding_and_differ_by_their_flags(tmp_path, monkeypatch):
    out = ablate(tmp_path, "--steps", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("seed: python azr_mini.py") == 1
    seeding = (tmp_path / "seed" / "samples.jsonl").read_text()
    for name, loss_agg, train_rollouts in (("before", "seq-mean-token-mean", False), ("rollouts", "token-mean", True)):
        run = tmp_path / name
        assert (run / "samples.jsonl").read_text().startswith(seeding)     # the same seeding, not a new one
        config = json.loads((run / "checkpoint-000001" / "state.json").read_text())["config"]
        assert (config["loss_agg"], config["train_rollouts"]) == (loss_agg, train_rollouts)
        assert (run / "checkpoint-000001" / "eval" / "selfplay-3.json").exists()
    rows = json.loads((tmp_path / "ablations.json").read_text())
    assert [r["recipe"] for r in rows] == ["before", "rollouts"] and rows[0]["steps"] == [1, 1]
    assert rows[1]["heldout"]["n"] == 3 and rows[1]["heldout_vs_first"]["n"] == 3
    assert (tmp_path / "ablations.md").read_text().count("\n| `") == 2
    # a second call finds every recipe at its step count: it starts nothing, and tables the same rows
    def refuse(*args, **kwargs):
        raise AssertionError("nothing should run")
    monkeypatch.setattr(ablations.subprocess, "run", refuse)
    ablations.main(["--root", str(tmp_path), "--recipes", "before,rollouts", "--window", "1", "--limit", "3",
                    "--steps", "1"])
    assert [r["recipe"] for r in json.loads((tmp_path / "ablations.json").read_text())] == ["before", "rollouts"]


def test_an_unknown_recipe_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        ablations.main(["--root", str(tmp_path), "--recipes", "before,magic"])
    assert stopped.value.code == 2 and "unknown magic" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_table_of_nothing_says_so(tmp_path):
    with pytest.raises(SystemExit, match="holds no trained recipe"):
        ablations.main(["--phase", "table", "--root", str(tmp_path / "nowhere")])
