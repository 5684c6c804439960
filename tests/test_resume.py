"""Exact resume after any interrupt: Ctrl-C at each point of a step, kill -9 at random moments, and
damaged run folders. Each interrupted run, once resumed, must give the uninterrupted run's metrics
and sampled text, line for line."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import azr_mini
import run
from run import RunLog, latest_checkpoint, save_checkpoint
from scripted import ROOT, metrics, run_tiny, samples, without_timings

# Three short steps; checkpoints after seeding, at the end and on Ctrl-C only (so Ctrl-C must save).
STEPS = ["--steps", "3", "--save-every", "5", "--max-new-tokens", "8"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def timed_run(tmp_path_factory) -> tuple[Path, float]:
    start = time.perf_counter()
    run_dir = run_tiny(tmp_path_factory.mktemp("uninterrupted") / "run", *STEPS)
    return run_dir, time.perf_counter() - start


@pytest.fixture(scope="module")
def uninterrupted(timed_run) -> Path:
    return timed_run[0]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert [without_timings(m) for m in metrics(run_dir)] == [without_timings(m) for m in metrics(reference)]
    assert samples(run_dir) == samples(reference)  # prompts, sampled text, rewards, advantages
    assert latest_checkpoint(run_dir).name == latest_checkpoint(reference).name
    assert not list(run_dir.glob(".checkpoint-*")) and not list(run_dir.glob("*.tmp"))


# Where Ctrl-C lands in step 2: (object, attribute, what the saved checkpoint holds).
# Before the commit the step is dropped (checkpoint 1); inside it, the commit finishes first (2).
POINTS = {
    "while proposing": (azr_mini, "sample", 1),
    "while computing gradients": (azr_mini, "trr_update", 1),
    "in the optimizer step": (torch.optim.AdamW, "step", 2),
    "while computing metrics": (run, "step_metrics", 2),
    "while writing metrics": (RunLog, "metrics", 2),
    "while writing samples": (RunLog, "samples", 2),
}


@pytest.mark.parametrize("point", POINTS)
def test_ctrl_c_anywhere_in_a_step_resumes_exactly(point, uninterrupted, tmp_path, monkeypatch):
    owner, name, saved = POINTS[point]
    real, calls = getattr(owner, name), []

    def ctrl_c_in_step_2(*args, **kwargs):
        calls.append(1)
        if azr_mini_step[0] == 2 and len(calls) == first_call_of_step_2[0]:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, delivered as the real one would be
        return real(*args, **kwargs)

    # Count calls per step: the hooked function runs the same number of times in every step.
    azr_mini_step, first_call_of_step_2 = [0], [None]
    real_step = azr_mini.self_play_step

    def counting_step(*args, **kwargs):
        azr_mini_step[0] += 1
        if azr_mini_step[0] == 2:
            first_call_of_step_2[0] = len(calls) + 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(azr_mini, "self_play_step", counting_step)
    monkeypatch.setattr(owner, name, ctrl_c_in_step_2)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_tiny(run_dir, *STEPS)
    assert exit_info.value.code == 130
    assert latest_checkpoint(run_dir).name == f"checkpoint-{saved:06d}"
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, saved + 1))  # logs agree with it
    monkeypatch.undo()

    cfg = azr_mini.parse_args(["--resume", str(run_dir)])
    azr_mini.train(cfg, __import__("scripted").HalfScripted(azr_mini.build_policy(cfg)))
    assert_same_run(run_dir, uninterrupted)


def test_ctrl_c_while_checkpointing_finishes_the_checkpoint(uninterrupted, tmp_path, monkeypatch):
    real = save_checkpoint

    def ctrl_c_then_save(run_dir, step, *args, **kwargs):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(run, "save_checkpoint", ctrl_c_then_save)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit):
        run_tiny(run_dir, *STEPS)
    assert_same_run(run_dir, uninterrupted)  # the last commit, its logs and checkpoint all landed


def test_kill_9_at_random_moments_then_resume(timed_run, tmp_path):
    """A real trainer process, killed with SIGKILL at random moments of its work (seeding, steps,
    commits, checkpoints), resumed each time; the last attempt runs to the end."""
    uninterrupted, seconds = timed_run
    run_dir, rng, kills = tmp_path / "run", random.Random(0), []
    script = [sys.executable, str(ROOT / "tests" / "scripted.py")]
    for attempt in range(4):
        if latest_checkpoint(run_dir) is None:
            argv = script + ["--run-dir", str(run_dir), *STEPS]  # killed before its first checkpoint
        else:
            argv = script + ["--resume", str(run_dir)]
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if attempt < 3:
            proc.stdout.readline()  # "azr-mini: run folder ...": imports and model loading are done
            delay = rng.uniform(0.05, 0.9) * seconds  # a moment within what an uninterrupted run takes
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.kill()
                kills.append(delay)
            proc.communicate()
        else:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-2000:]
    assert kills, "no attempt was killed"
    assert_same_run(run_dir, uninterrupted)


# --------------------------------------------------------------------------------------------------
# Damaged or misplaced run folders: a clear error naming the file, exit code 2, nothing deleted


def files_of(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage, broken", [
    (lambda c: (c / "state.json").write_text('{"step": 3, "conf'), "state.json is damaged"),
    (lambda c: (c / "state.json").write_text('{"step": 3}'), "state.json is damaged"),
    (lambda c: (c / "adapter" / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
    (lambda c: shutil.rmtree(c / "adapter"), "adapter_config.json is missing"),
    (lambda c: (c / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 40), "adapter_model.safetensors is damaged"),
    (lambda c: (c / "trainer.pt").write_bytes(b"not a torch file"), "trainer.pt is damaged"),
])
def test_resume_of_a_damaged_checkpoint_names_the_file_and_exits_2(damage, broken, uninterrupted, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    damage(latest_checkpoint(run_dir))
    before = files_of(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        azr_mini.main(["--resume", str(run_dir), "--steps", "4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert broken in err and str(run_dir) in err and "Traceback" not in err
    assert files_of(run_dir) == before  # nothing deleted or rewritten


def test_a_fresh_start_refuses_a_folder_that_holds_a_run(uninterrupted, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    before = files_of(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        azr_mini.main(["--model", "tiny", "--run-dir", str(run_dir)])
    assert exit_info.value.code == 2 and "--resume" in capsys.readouterr().err
    assert files_of(run_dir) == before


def test_keep_every_keeps_those_checkpoints_and_resume_takes_the_newest(tmp_path):
    run = run_tiny(tmp_path / "run", "--steps", "3", "--keep-every", "2")
    names = sorted(p.name for p in run.glob("checkpoint-*"))
    assert names == ["checkpoint-000000", "checkpoint-000002", "checkpoint-000003"]
    run_tiny(tmp_path / "run", "--resume", str(run), "--steps", "5")
    names = sorted(p.name for p in run.glob("checkpoint-*"))
    assert names == ["checkpoint-000000", "checkpoint-000002", "checkpoint-000004", "checkpoint-000005"]
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5]


def test_several_update_epochs_make_the_clip_work_and_ctrl_c_between_them_undoes_them(
        uninterrupted, tmp_path, monkeypatch):
    flags = ["--steps", "2", "--save-every", "5", "--max-new-tokens", "8", "--update-epochs", "3"]
    reference = run_tiny(tmp_path / "reference", *flags)
    clip = [m["clip_fraction"] for m in metrics(reference)]
    assert max(clip) > 0                                   # the policy moved: ratios left [0.8, 1.2]
    assert all(m["clip_fraction"] == 0 for m in metrics(uninterrupted))   # one epoch: rho = 1
    assert [without_timings(m) for m in metrics(reference)] != [without_timings(m) for m in metrics(uninterrupted)][:2]

    # Ctrl-C right after the first optimizer step of step 2's update (3 steps per training step:
    # two between the epochs, one in the commit): that step is dropped, its first epochs undone.
    real, calls = torch.optim.AdamW.step, []

    def step_then_ctrl_c(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_ctrl_c)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit):
        run_tiny(run_dir, *flags)
    assert latest_checkpoint(run_dir).name == "checkpoint-000001"
    monkeypatch.undo()
    cfg = azr_mini.parse_args(["--resume", str(run_dir)])
    azr_mini.train(cfg, __import__("scripted").HalfScripted(azr_mini.build_policy(cfg)))
    assert_same_run(run_dir, reference)


def test_kill_pid_saves_the_last_whole_step_like_ctrl_c(uninterrupted, tmp_path):
    """SIGTERM (what `kill PID` sends, and what a background job still obeys) stops a real trainer
    process as Ctrl-C does: the last whole step is saved, and the resumed run is the same run."""
    run_dir = tmp_path / "run"
    script = [sys.executable, str(ROOT / "tests" / "scripted.py")]
    proc = subprocess.Popen(script + ["--run-dir", str(run_dir), *STEPS], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline   # step 1 committed
        time.sleep(0.05)
    proc.terminate()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    saved = latest_checkpoint(run_dir).name
    assert f"interrupted: saved step {int(saved.split('-')[1])}" in out and saved != "checkpoint-000000"
    _, err = subprocess.Popen(script + ["--resume", str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True).communicate(timeout=300)
    assert_same_run(run_dir, uninterrupted)


def test_a_flag_given_with_resume_wins_over_the_saved_optimizer_state(tmp_path):
    """--resume DIR --lr X trains at X: the optimizer state saved in the checkpoint carries the old lr,
    and loading it must not bring that back (ablations resume a seeding with a recipe's flags)."""
    run_dir = run_tiny(tmp_path / "run", "--steps", "1", "--lr", "1e-4")
    cfg = azr_mini.parse_args(["--resume", str(run_dir), "--steps", "2", "--lr", "3e-4"])
    azr_mini.train(cfg, __import__("scripted").HalfScripted(azr_mini.build_policy(cfg)))
    trainer = torch.load(latest_checkpoint(run_dir) / "trainer.pt", weights_only=True)
    assert [g["lr"] for g in trainer["optimizer"]["param_groups"]] == [3e-4]
