"""The v2 encoder files committed in checkpoints/pretrained/ are what the recipe takes them for.

A fresh machine holds only what is committed, so the recipe (scripts/train_default_model.sh) skips a
pretraining whose output and report are committed and resumes one whose stage state is. These tests
check, on the committed files themselves, that the pretraining scripts' own checks accept them for
the recipe's configurations: a finished output's report vouches for its bytes and settings and the
weights load; a committed stage state belongs to the recipe's settings and is not past its end. A
commit of weights without their report, of a report for other weights, or of a state of another
configuration fails here instead of silently making the recipe pretrain again (or refuse to resume).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ssp_sam.pretrain.clip import CLIPPretrainSettings, finished_clip_stage
from ssp_sam.pretrain.sam import SAMPretrainSettings, finished_sam_stage, sam_stage_identity
from ssp_sam.pretrain.script import settings_from
from ssp_sam.pretrain.stage import StageControl, read_state

REPO = Path(__file__).resolve().parents[1]


def committed(path: str) -> bool:
    """Whether ``path`` is in the checkout and tracked by git (an untracked file, e.g. a stage state left
    by an interrupted local run, is not what a fresh machine gets); without git, whether it is there."""
    if not (REPO / path).is_file():
        return False
    if not (REPO / ".git").exists():
        return True
    return subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=REPO, capture_output=True).returncode == 0


def recipe_config(name: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(name)


def test_the_recipe_finds_its_encoders_committed():
    """At least one of the v2 encoders is committed, finished or as a stage state (else this file checks nothing)."""
    paths = ("checkpoints/pretrained/tiny_clip_v2.pt", "checkpoints/pretrained/tiny_sam_v2.pth",
             "checkpoints/pretrained/tiny_sam_v2.pth.resume")
    assert any(committed(path) for path in paths)


def test_committed_clip_is_the_finished_stage_of_the_recipe():
    cfg = recipe_config("pretrain_clip_v2")
    out = cfg.out
    if not committed(out):
        pytest.skip(f"{out} is not committed")
    assert committed(f"{out}.json"), f"{out} is committed without its report {out}.json"
    settings = settings_from(cfg, CLIPPretrainSettings)
    custom = OmegaConf.to_container(cfg.model.clip_custom, resolve=True)
    report = finished_clip_stage(REPO / out, custom, cfg.model.surgery_blocks, settings, cfg.model.append_period)
    assert report is not None, f"{out}: its report does not vouch for it under configs/pretrain_clip_v2.yaml"
    # issue 13, item 1: the held-out figures on a fresh seed that the report records
    fresh = report["fresh_seed"]["figures"]
    assert fresh["shape"] >= 0.90 and fresh["color"] >= 0.98 and fresh["size"] >= 0.95
    assert fresh["dense_miou_covered"] >= 0.70
    assert not committed(f"{out}.resume"), "a finished stage's state is deleted; commit its deletion"


def test_committed_sam_is_finished_or_a_resumable_state_of_the_recipe():
    cfg = recipe_config("pretrain_sam_v2")
    out = cfg.out
    settings = settings_from(cfg, SAMPretrainSettings)
    custom = OmegaConf.to_container(cfg.model.sam_custom, resolve=True)
    if committed(out):
        assert committed(f"{out}.json"), f"{out} is committed without its report {out}.json"
        report = finished_sam_stage(REPO / out, custom, settings)
        assert report is not None, f"{out}: its report does not vouch for it under configs/pretrain_sam_v2.yaml"
        assert not committed(f"{out}.resume"), "a finished stage's state is deleted; commit its deletion"
    elif committed(f"{out}.resume"):
        control = StageControl.beside(REPO / out, resume=True, save_every=cfg.save_every)
        state = read_state(control, sam_stage_identity(custom, settings), settings.steps)
        assert state is not None and 0 < len(state["losses"]) < settings.steps
    else:
        pytest.skip(f"neither {out} nor its stage state is committed")
