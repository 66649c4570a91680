"""scripts/embed_encoders.py: a checkpoint that names its encoder files, made self-contained for shipping.

The copy must load with the weight files gone and hold every weight the checkpoint computed with when
they were there (frozen encoders from the files, trained parts from the checkpoint), keep the run's
record, and refuse what would give another model (a changed weight file) or lose a run's trainer state.
"""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from conftest import REPO, run_script, tiny_config, write_sam_file
from fixtures_weights import with_ovss_encoder_files
from ssp_sam.backbones.clip import build_clip_model
from ssp_sam.checkpoint import load_model, save_checkpoint
from ssp_sam.model import build_model
from ssp_sam.ovss.build import build_ovss_model
from ssp_sam.ovss.engine.checkpoint import load_ovss_model, save_ovss_checkpoint
from ssp_sam.ovss.engine.train_config import ovss_train_config_from
from ssp_sam.pretrain.clip import save_clip_checkpoint


def _perturb_trainable(model: torch.nn.Module) -> None:
    """As if trained: every trainable weight differs from a fresh build's."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01)


@pytest.fixture
def ssp_sam_run(tmp_path):
    """A tiny SSP-SAM "run checkpoint" as train.save_encoders=false writes it: CLIP and SAM named by file,
    CLIP's text tower fine-tuned (stored), its image tower and SAM's image encoder only in the files."""
    torch.manual_seed(11)
    clip_file, sam_file = tmp_path / "clip.pt", tmp_path / "sam.pth"
    save_clip_checkpoint(build_clip_model("custom", None, tiny_config().clip_custom), clip_file)
    write_sam_file(sam_file, tiny_config().sam_custom, seed=12)
    config = tiny_config(clip_checkpoint=str(clip_file), sam_checkpoint=str(sam_file), finetune_text_encoder=True)
    model = build_model(config, with_sam_image_encoder=True)
    _perturb_trainable(model)
    checkpoint = save_checkpoint(model, tmp_path / "run" / "best", extra={"epoch": 7, "metrics": {"mIoU": 0.5}, "run": {"seed": 3}})
    return model, checkpoint, (clip_file, sam_file)


def test_ssp_sam_copy_loads_without_the_files_and_holds_every_weight(ssp_sam_run, tmp_path):
    model, checkpoint, files = ssp_sam_run
    stored_before = load_file(checkpoint / "model.safetensors")
    assert not any(key.startswith(("sam_image_encoder.", "clip.clip.visual.")) for key in stored_before)  # named by file

    done = run_script("embed_encoders.py", f"checkpoint={checkpoint}", f"out={tmp_path / 'shipped'}")
    assert done.returncode == 0, done.stderr
    for file in files:
        file.rename(file.with_suffix(".gone"))

    loaded = load_model(tmp_path / "shipped", with_sam_image_encoder=True)
    expected = model.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
    record = json.loads((tmp_path / "shipped" / "config.json").read_text())
    assert record["model"]["clip_checkpoint"] is None and record["model"]["sam_checkpoint"] is None
    assert (record["epoch"], record["metrics"], record["run"]) == (7, {"mIoU": 0.5}, {"seed": 3})
    assert sorted(p.name for p in (tmp_path / "shipped").iterdir()) == ["config.json", "model.safetensors"]


def test_a_changed_weight_file_or_the_checkpoint_itself_as_out_is_refused(ssp_sam_run, tmp_path):
    _, checkpoint, (clip_file, _) = ssp_sam_run
    same = run_script("embed_encoders.py", f"checkpoint={checkpoint}", f"out={checkpoint}")
    assert same.returncode == 2 and f"out={checkpoint}: the checkpoint itself" in same.stderr

    torch.manual_seed(99)  # other weights of the same shapes at the path the checkpoint names
    save_clip_checkpoint(build_clip_model("custom", None, tiny_config().clip_custom), clip_file)
    changed = run_script("embed_encoders.py", f"checkpoint={checkpoint}", f"out={tmp_path / 'shipped'}")
    assert changed.returncode == 2 and str(clip_file) in changed.stderr and "Traceback" not in changed.stderr
    assert not (tmp_path / "shipped").exists()


def test_ovss_copy_loads_without_the_files_and_keeps_its_class_names(tmp_path):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        run = compose("train_ovss", ["experiment=ovss_tiny", f"ovss_dataset.root={tmp_path}", f"run_dir={tmp_path / 'run'}"])
    model = build_ovss_model(with_ovss_encoder_files(ovss_train_config_from(run).ovss_model, tmp_path, seed=2))
    _perturb_trainable(model)
    save_ovss_checkpoint(model, tmp_path / "ckpt", ["red", "blue", "green"], extra={"iteration": 40})

    done = run_script("embed_encoders.py", f"checkpoint={tmp_path / 'ckpt'}", f"out={tmp_path / 'shipped'}")
    assert done.returncode == 0, done.stderr
    (tmp_path / "clip.pt").unlink()
    (tmp_path / "sam.pth").unlink()

    loaded = load_ovss_model(tmp_path / "shipped")
    expected = model.state_dict()
    assert set(loaded.model.state_dict()) == set(expected)
    assert all(torch.equal(value, expected[key]) for key, value in loaded.model.state_dict().items())
    assert loaded.class_names == ("red", "blue", "green") and loaded.info["iteration"] == 40
    assert loaded.config.clip.checkpoint is None and loaded.config.sam.checkpoint is None
