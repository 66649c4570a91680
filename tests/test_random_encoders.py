"""No random encoders by accident: a missing CLIP or SAM weight file stops before any work.

Random CLIP and SAM weights give meaningless masks with exit code 0, so they are built only with
``model.random_encoders=true`` (tests, benchmarks); everywhere else the missing key is named.
"""

from __future__ import annotations

import pytest

from ssp_sam.checkpoint import load_model
from ssp_sam.config import model_config_from
from ssp_sam.errors import ConfigError
from ssp_sam.model import build_model, build_sam_image_encoder

from conftest import run_script, tiny_config
from test_checkpoint import RELEASE_LIKE, write_release_checkpoint

STRICT = dict(RELEASE_LIKE, random_encoders=False)


@pytest.fixture(scope="module")
def release_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("release") / "ssp_sam_224.pth"
    write_release_checkpoint(path)
    return path


def test_release_file_without_clip_weights_is_refused(release_file):
    with pytest.raises(ConfigError, match=r"^model\.clip_checkpoint: no weight file given \(.*ssp_sam_224\.pth carries no CLIP"):
        load_model(release_file, STRICT, with_sam_image_encoder=False)


def test_release_file_without_sam_encoder_needs_the_sam_file(release_file, tmp_path):
    """The release file has no sam.image_encoder.*: building SAM's encoder needs model.sam_checkpoint."""
    clip_file = tmp_path / "clip.pt"
    clip_file.write_bytes(b"not read: the SAM check comes first")
    with pytest.raises(ConfigError, match=r"^model\.sam_checkpoint: no weight file given \(.*carries no SAM image encoder\)"):
        load_model(release_file, dict(STRICT, clip_checkpoint=str(clip_file)), with_sam_image_encoder=True)


def test_build_model_names_every_missing_file():
    config = model_config_from(dict(STRICT, clip_arch="custom"))
    with pytest.raises(ConfigError, match=r"^model\.clip_checkpoint and model\.sam_checkpoint: no weight file given"):
        build_model(config)
    with pytest.raises(ConfigError, match=r"^model\.sam_checkpoint: no weight file given for SAM's image encoder"):
        build_sam_image_encoder(config)


def test_random_encoders_only_when_asked():
    """The tiny test model asks for them (configs/model/tiny.yaml); the same config without the switch fails."""
    assert build_model(tiny_config()).sam_image_encoder is not None
    with pytest.raises(ConfigError, match="model.random_encoders=true"):
        build_model(tiny_config(random_encoders=False))


def test_train_script_stops_before_work_without_weight_files(tmp_path):
    """A real model config with no weight files: one line naming the keys, exit 2, no run directory."""
    run_dir = tmp_path / "run"
    result = run_script("train.py", "model=ssp_sam_224", "dataset=jsonl", f"run_dir={run_dir}", f"cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "model.clip_checkpoint and model.sam_checkpoint: no weight file given" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists()


def test_checkpoint_without_its_sam_encoder_names_the_fix(tmp_path):
    """Trained without save_encoders on random encoders: loading it with SAM's encoder says what to give."""
    from ssp_sam.checkpoint import save_checkpoint
    from ssp_sam.errors import CheckpointError

    directory = save_checkpoint(build_model(tiny_config(), with_sam_image_encoder=False), tmp_path / "ckpt")
    assert load_model(directory, with_sam_image_encoder=False).sam_image_encoder is None
    with pytest.raises(CheckpointError, match=r"carries no SAM image encoder and its config names no SAM weight file; give model\.sam_checkpoint"):
        load_model(directory, with_sam_image_encoder=True)
