"""Checkpoints record the sha256 of the weight files their frozen encoders come from, and loading checks them.

A path outlives its contents (a pretraining writes its result where the configs read it): a checkpoint loaded,
evaluated or resumed on other frozen weights must stop, naming the file; a moved or copied file must pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ssp_sam.checkpoint import CONFIG_FILE, load_model, save_checkpoint
from ssp_sam.engine.trainer import Trainer
from ssp_sam.errors import CheckpointError
from ssp_sam.model import build_model
from ssp_sam.ovss.build import build_ovss_model
from ssp_sam.ovss.engine.checkpoint import load_ovss_model, save_ovss_checkpoint
from ssp_sam.ovss.model_config import ovss_config_from
from ssp_sam.weight_identity import hash_weights_file_digests, remembered_sha256

from conftest import REPO, tiny_config, write_sam_file
from test_trainer import compose_train, shapeworld_root, train_overrides  # noqa: F401 (fixture)


def test_weight_files_are_hashed_in_chunks_for_every_digest_in_one_pass(tmp_path):
    data = os.urandom(5000)  # not a multiple of the chunk
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    digests = hash_weights_file_digests(path, chunk_bytes=64)
    assert digests == {"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest()}
    with pytest.raises(CheckpointError, match="absent.bin: cannot read SAM weights"):
        hash_weights_file_digests(tmp_path / "absent.bin", "SAM weights")


def test_a_checkpoint_refuses_a_sam_file_whose_weights_changed(tmp_path):
    custom = tiny_config().sam_custom
    sam = write_sam_file(tmp_path / "sam.pth", custom, 1)
    model = build_model(tiny_config(sam_checkpoint=str(sam)), with_sam_image_encoder=False)
    directory = save_checkpoint(model, tmp_path / "ckpt")
    record = json.loads((directory / CONFIG_FILE).read_text())["weight_files"]
    assert record == {"model.sam_checkpoint": {"path": str(sam), "sha256": hashlib.sha256(sam.read_bytes()).hexdigest()}}

    moved = tmp_path / "elsewhere" / "sam_copy.pth"
    moved.parent.mkdir()
    shutil.copy(sam, moved)
    assert load_model(directory, {"sam_checkpoint": str(moved)}, with_sam_image_encoder=False) is not None  # same contents

    write_sam_file(sam, custom, 2)  # rewritten in place, same size
    with pytest.raises(CheckpointError, match=rf"trained with model.sam_checkpoint={sam} .*but model.sam_checkpoint={sam} holds other weights"):
        load_model(directory, with_sam_image_encoder=False)


def test_the_hash_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"a" * 1000)
    hashed = []

    def counting(path: str) -> str:
        hashed.append(path)
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    memo = tmp_path / "memo"
    assert remembered_sha256(weights, memo, counting) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert remembered_sha256(weights, memo, counting) == hashlib.sha256(b"a" * 1000).hexdigest() and len(hashed) == 1
    weights.write_bytes(b"b" * 1001)
    assert remembered_sha256(weights, memo, counting) == hashlib.sha256(b"b" * 1001).hexdigest() and len(hashed) == 2


def test_a_repointed_link_with_the_same_size_and_mtime_is_hashed_again(tmp_path):
    """Size and mtime can repeat for other contents (an archive's normalised timestamps): the memo must not
    hand out the first file's hash for the second."""
    first, second, link = tmp_path / "first.pth", tmp_path / "second.pth", tmp_path / "sam.pth"
    first.write_bytes(b"a" * 1000)
    second.write_bytes(b"b" * 1000)
    for path in (first, second):
        os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    link.symlink_to(first)
    memo = tmp_path / "memo"
    assert remembered_sha256(link, memo) == hashlib.sha256(b"a" * 1000).hexdigest()
    link.unlink()
    link.symlink_to(second)
    assert remembered_sha256(link, memo) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_resume_refuses_a_sam_file_whose_weights_changed(shapeworld_root, tmp_path):
    custom = tiny_config().sam_custom
    sam = write_sam_file(tmp_path / "sam.pth", custom, 1)
    overrides = train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache", "train.epochs=2", f"model.sam_checkpoint={sam}")
    Trainer(compose_train([*overrides, "train.max_minutes=1e-9"])).fit()
    write_sam_file(sam, custom, 2)
    with pytest.raises(CheckpointError, match="holds other weights"):
        Trainer(compose_train([*overrides, "resume=true"]))


def test_an_ovss_checkpoint_refuses_a_sam_file_whose_weights_changed(tmp_path):
    stored = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "ovss_model" / "tiny.yaml"))
    sam = write_sam_file(tmp_path / "sam.pth", stored["sam"]["custom"], 1)
    config = ovss_config_from(stored, sam={**stored["sam"], "checkpoint": str(sam)})
    directory = save_ovss_checkpoint(build_ovss_model(config), tmp_path / "ovss", ["red", "blue"])
    assert load_ovss_model(directory).config.sam.checkpoint == str(sam)
    write_sam_file(sam, stored["sam"]["custom"], 2)
    with pytest.raises(CheckpointError, match=rf"trained with ovss_model.sam.checkpoint={sam} .*holds other weights"):
        load_ovss_model(directory)
