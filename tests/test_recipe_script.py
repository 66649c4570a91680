"""scripts/train_default_model.sh's stage logic, run with a stand-in interpreter.

The stand-in ``python`` records which stage script it was asked to run and exits with the status
the test gives that stage, so the shell logic (which stages run, side by side or in turn, and which
status the recipe ends with) is checked without training anything.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

STAND_IN = """#!/usr/bin/env bash
case "$*" in
  *pretrain_sam.py*) echo "sam stage ran $*" >> "$FAKE_CALLS"; printf 'progress\rheld-out mIoU 0.9\n'; exit "${FAKE_SAM_STATUS:-0}" ;;
  *pretrain_clip.py*) echo "clip stage ran $*" >> "$FAKE_CALLS"; exit "${FAKE_CLIP_STATUS:-0}" ;;
  *train.py*) echo "training ran $*" >> "$FAKE_CALLS"; exit 0 ;;
  *embed_encoders.py*) echo "shipping ran $*" >> "$FAKE_CALLS"; exit 0 ;;
  *make_shapeworld.py*) echo "data stage ran $*" >> "$FAKE_CALLS"; exit "${FAKE_DATA_STATUS:-0}" ;;
  *) echo "unexpected: $*" >> "$FAKE_CALLS"; exit 99 ;;
esac
"""


def make_checkout(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the script and what it reads, and a stand-in venv."""
    checkout = tmp_path / "repo"
    (checkout / "scripts").mkdir(parents=True)
    for name in ("train_default_model.sh", "setup_env.sh"):
        shutil.copy(REPO / "scripts" / name, checkout / "scripts" / name)
    shutil.copy(REPO / "pyproject.toml", checkout / "pyproject.toml")
    (checkout / "checkpoints").mkdir()
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(STAND_IN)
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    # setup_env.sh installs nothing when the stamp matches its hash of pyproject.toml + itself.
    stamp = hashlib.sha256((checkout / "pyproject.toml").read_bytes() + (checkout / "scripts" / "setup_env.sh").read_bytes())
    (venv / ".ssp_sam_installed").write_text(stamp.hexdigest()[:16] + "\n")
    return checkout, venv


def run_recipe(
    tmp_path: Path, recipe: str | None, sam_status: int, clip_status: int, data_status: int = 0
) -> tuple[subprocess.CompletedProcess, list[str], Path]:
    checkout, venv = make_checkout(tmp_path)
    calls = tmp_path / "calls.txt"
    calls.touch()
    (checkout / "runs" / "shapeworld_default_v2" / "best").mkdir(parents=True)
    (checkout / "runs" / "shapeworld_default" / "best").mkdir(parents=True)
    env = {**os.environ, "SSP_SAM_VENV": str(venv), "FAKE_CALLS": str(calls),
           "FAKE_SAM_STATUS": str(sam_status), "FAKE_CLIP_STATUS": str(clip_status), "FAKE_DATA_STATUS": str(data_status)}
    env.pop("RECIPE", None)
    if recipe is not None:
        env["RECIPE"] = recipe
    result = subprocess.run(["bash", str(checkout / "scripts" / "train_default_model.sh")], env=env,
                            capture_output=True, text=True, timeout=60)
    return result, calls.read_text().splitlines(), checkout


@pytest.mark.parametrize("sam_status, clip_status", [(3, 0), (0, 3), (3, 3)])
def test_v2_runs_both_pretrainings_and_stops_with_3_when_either_stopped(tmp_path, sam_status, clip_status):
    result, calls, checkout = run_recipe(tmp_path, "v2", sam_status, clip_status)
    assert result.returncode == 3, result.stderr
    assert "rerun this script" in result.stdout
    assert sorted(call.split()[0] for call in calls) == ["clip", "data", "sam"]  # both ran, training did not
    assert not (checkout / "checkpoints" / "shapeworld_default").exists()


def test_v2_pretraining_failure_wins_over_a_stop_and_names_the_sam_log(tmp_path):
    result, calls, _ = run_recipe(tmp_path, "v2", sam_status=1, clip_status=3)
    assert result.returncode == 1
    assert "SAM: exit 1, see runs/logs/pretrain_sam_v2.log" in result.stderr
    assert not any(call.startswith("training") for call in calls)


@pytest.mark.parametrize("recipe", ["v2", None])  # v2 is the default: the shipped model's recipe
def test_v2_finished_pretrainings_go_on_to_training_and_shipping(tmp_path, recipe):
    result, calls, checkout = run_recipe(tmp_path, recipe, 0, 0)
    assert result.returncode == 0, result.stderr
    assert [call.split()[0] for call in calls][-2:] == ["training", "shipping"]
    assert "experiment=shapeworld_v2" in calls[-2] and "name=shapeworld_default_v2" in calls[-2]
    # the run's best epoch goes out with its encoders embedded (the run names their files)
    assert calls[-1].split()[-2:] == ["checkpoint=runs/shapeworld_default_v2/best", "out=checkpoints/shapeworld_default"]
    configs = sorted(call.split("--config-name ")[1].split()[0] for call in calls if "--config-name" in call)
    assert configs == ["pretrain_clip_v2", "pretrain_sam_v2"]
    # the SAM ran in the background with its output in the log the script names
    assert "sam stage ran" in (tmp_path / "calls.txt").read_text()
    assert (checkout / "runs" / "logs" / "pretrain_sam_v2.log").exists()
    assert "\nheld-out mIoU 0.9\n" in result.stdout and "progress" in result.stdout  # its last words, shown


def test_v1_runs_the_pretrainings_in_turn_and_stops_at_the_first_stop(tmp_path):
    result, calls, _ = run_recipe(tmp_path, "v1", sam_status=3, clip_status=0)
    assert result.returncode == 3
    assert [call.split()[0] for call in calls] == ["data", "sam"]  # the CLIP stage never started


@pytest.mark.parametrize("recipe", ["v2", "v1"])
def test_the_data_stage_runs_first_and_skips_a_made_data_set(tmp_path, recipe):
    """The data of seed 7 is asked for before anything else, with skip_existing (make_shapeworld.py's own
    test checks that it then does nothing for a made set and refuses other data)."""
    result, calls, _ = run_recipe(tmp_path, recipe, 0, 0)
    assert result.returncode == 0, result.stderr
    assert calls[0].startswith("data stage ran") and sum(call.startswith("data stage ran") for call in calls) == 1
    assert all(word in calls[0].split() for word in ("task=gres", "out=data/shapeworld_train", "seed=7", "skip_existing=true"))


@pytest.mark.parametrize("recipe", ["v2", "v1"])
def test_a_refused_data_set_stops_the_recipe_before_pretraining(tmp_path, recipe):
    """make_shapeworld.py exits 2 when data/shapeworld_train holds other data: nothing else runs."""
    result, calls, _ = run_recipe(tmp_path, recipe, 0, 0, data_status=2)
    assert result.returncode == 2
    assert len(calls) == 1 and calls[0].startswith("data stage ran")


def test_training_resumes_the_run_it_finds_and_starts_one_otherwise(tmp_path):
    """With runs/<run>/last there, training is resumed (train.py refuses a run of other settings and
    trains no epoch of a finished one); without it, started. The overrides go through either way."""
    checkout, venv = make_checkout(tmp_path)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "SSP_SAM_VENV": str(venv), "FAKE_CALLS": str(calls)}
    env.pop("RECIPE", None)
    script = ["bash", str(checkout / "scripts" / "train_default_model.sh"), "train.epochs=2"]
    (checkout / "runs" / "shapeworld_default_v2" / "best").mkdir(parents=True)
    assert subprocess.run(script, env=env, capture_output=True, text=True, timeout=60).returncode == 0
    (checkout / "runs" / "shapeworld_default_v2" / "last").mkdir()
    assert subprocess.run(script, env=env, capture_output=True, text=True, timeout=60).returncode == 0
    started, resumed = [call.split() for call in calls.read_text().splitlines() if call.startswith("training")]
    assert "resume=true" not in started and "train.epochs=2" in started and "name=shapeworld_default_v2" in started
    assert "resume=true" in resumed and "train.epochs=2" in resumed


# Stages that run until they are killed: each writes its process id, then becomes `sleep` (the pretrainings,
# or with FAKE_FINISHED_PRETRAINING the training, the pretrainings then finishing at once).
SLEEPING_STAGES = """#!/usr/bin/env bash
case "$*" in
  *pretrain_sam.py*|*pretrain_clip.py*)
    if [ -n "$FAKE_FINISHED_PRETRAINING" ]; then exit 0; fi
    echo "$$" >> "$FAKE_STAGES"; exec sleep 120 ;;
  *train.py*) if [ -n "$FAKE_FINISHED_PRETRAINING" ]; then echo "$$" >> "$FAKE_STAGES"; exec sleep 120; fi
    echo "ran $*" >> "$FAKE_CALLS"; exit 0 ;;
  *make_shapeworld.py*) exit 0 ;;
  *) echo "ran $*" >> "$FAKE_CALLS"; exit 0 ;;
esac
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("recipe, stages, training", [("v2", 2, False), ("v1", 1, False), ("v2", 1, True)])
def test_term_stops_the_running_stages_and_the_script(tmp_path, recipe, stages, training):
    """bash runs a trap only after a foreground command ends: with a stage in the foreground a TERM waited for
    that stage (an hour) and the script then went on to training. The stages run in the background and the
    script waits for them, so a TERM ends the running stages and the script at once, with status 143."""
    checkout, venv = make_checkout(tmp_path)
    (venv / "bin" / "python").write_text(SLEEPING_STAGES)
    started, calls = tmp_path / "stages.txt", tmp_path / "calls.txt"
    env = {**os.environ, "SSP_SAM_VENV": str(venv), "FAKE_STAGES": str(started), "FAKE_CALLS": str(calls), "RECIPE": recipe}
    if training:  # the pretrainings finish, the training stage is the one running
        env["FAKE_FINISHED_PRETRAINING"] = "1"
    script = subprocess.Popen(["bash", str(checkout / "scripts" / "train_default_model.sh")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while len(pids) < stages and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = [int(line) for line in started.read_text().split()] if started.exists() else []
        assert len(pids) == stages, "the stages did not start"
        script.send_signal(signal.SIGTERM)
        _, stderr = script.communicate(timeout=10)
        assert script.returncode == 143, stderr
        assert "rerun this script to continue" in stderr
        assert not any(alive(pid) for pid in pids)  # ended and reaped by the script, not left running
        assert not calls.exists()  # neither the next stage nor training started, nor shipping
        assert not (checkout / "checkpoints" / "shapeworld_default").exists()
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if script.poll() is None:
            script.kill()
            script.communicate()
