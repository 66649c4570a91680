"""A released SSP-SAM checkpoint given CLIP or SAM files other than the published ones it was trained with: a
warning line per file (not an error), from digests remembered once per file version.

Small random files stand in for OpenAI's and Meta's; the table of published digests is patched to name them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import open_clip
import pytest
import torch

from ssp_sam import weight_identity
from ssp_sam.backbones.sam import build_sam
from ssp_sam.checkpoint import load_model
from ssp_sam.config import RELEASE_PRESETS
from ssp_sam.weight_identity import PublishedWeights, check_release_weight_files, remembered_digest, remembered_sha256

from test_checkpoint import RELEASE_LIKE, write_release_checkpoint


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def counted_hashing(monkeypatch, tmp_path):
    """Every hashing pass of the default hasher, recorded by path; the memo in a directory of this test."""
    passes = []
    hash_file = weight_identity.hash_weights_file_digests

    def counting(path, *args, **kwargs):
        passes.append(Path(path).name)
        return hash_file(path, *args, **kwargs)

    monkeypatch.setattr(weight_identity, "hash_weights_file_digests", counting)
    monkeypatch.setenv("SSP_SAM_CACHE_HOME", str(tmp_path / "memo"))
    return passes


def test_the_published_digests_are_those_openai_and_meta_publish():
    """OpenAI's URLs (as open_clip has them) carry the sha256; SAM's file names the md5's first 6 hex digits."""
    for preset, published in weight_identity.RELEASE_WEIGHT_FILES.items():
        clip, sam = published["model.clip_checkpoint"], published["model.sam_checkpoint"]
        url = open_clip.get_pretrained_url(RELEASE_PRESETS[preset]["clip_arch"], "openai")
        assert clip.algorithm == "sha256" and url.split("/")[-2] == clip.digest, preset
        assert sam.algorithm == "md5" and RELEASE_PRESETS[preset]["sam_variant"] == "vit_h"
        assert f"sam_vit_h_{sam.digest[:6]}.pth" in sam.name and len(sam.digest) == 32


def test_other_weight_files_are_named_in_one_warning_line_each(tmp_path, monkeypatch, capsys, counted_hashing):
    clip, sam, other = tmp_path / "ViT-B-16.pt", tmp_path / "sam_vit_h.pth", tmp_path / "laion_b16.pt"
    for path, seed in ((clip, 0), (sam, 1), (other, 2)):
        path.write_bytes(torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).numpy().tobytes())
    published = {
        "model.clip_checkpoint": PublishedWeights("OpenAI's CLIP ViT-B/16 (ViT-B-16.pt)", "sha256", sha256(clip)),
        "model.sam_checkpoint": PublishedWeights("Meta's SAM ViT-H (sam_vit_h_4b8939.pth)", "md5", md5(sam)),
    }
    monkeypatch.setitem(weight_identity.RELEASE_WEIGHT_FILES, "ssp_sam_224", published)
    release = tmp_path / "ssp_sam_224.pth"

    files = {"model.clip_checkpoint": str(clip), "model.sam_checkpoint": str(sam)}
    assert check_release_weight_files("ssp_sam_224", files, release) == [] and capsys.readouterr().err == ""

    # The other CLIP in CLIP's place and the published CLIP in SAM's: two lines, each naming its file and what was expected.
    swapped = {"model.clip_checkpoint": str(other), "model.sam_checkpoint": str(clip)}
    lines = check_release_weight_files("ssp_sam_224", swapped, release)
    assert capsys.readouterr().err.splitlines() == lines and len(lines) == 2
    assert lines[0].startswith(f"warning: model.clip_checkpoint={other} is not OpenAI's CLIP ViT-B/16 (ViT-B-16.pt), ")
    assert f"ssp_sam_224.pth (ssp_sam_224 release) was trained with (sha256 differs from the published {sha256(clip)[:12]}" in lines[0]
    assert lines[1].startswith(f"warning: model.sam_checkpoint={clip} is not Meta's SAM ViT-H (sam_vit_h_4b8939.pth), ")
    assert f"(md5 differs from the published {md5(sam)[:12]}" in lines[1]

    # Not given, missing, or no release preset: nothing to compare.
    assert check_release_weight_files("ssp_sam_224", {"model.clip_checkpoint": None, "model.sam_checkpoint": str(tmp_path / "absent")}, release) == []
    assert check_release_weight_files("tiny", swapped, release) == []
    assert sorted(counted_hashing) == sorted([clip.name, sam.name, other.name])  # each file read once, for both digests


def test_each_file_version_is_read_once_for_both_digests(tmp_path, counted_hashing):
    weights = tmp_path / "sam.pth"
    weights.write_bytes(b"a" * 5000)
    assert remembered_sha256(weights) == sha256(weights)  # e.g. a checkpoint of ours recording the file
    assert remembered_digest(weights, "md5") == md5(weights)  # then a release compared with it: from the memo
    assert remembered_sha256(weights) == sha256(weights)
    assert counted_hashing == ["sam.pth"]
    weights.write_bytes(b"b" * 5000)  # a new version: read again, once
    assert remembered_digest(weights, "md5") == md5(weights) and remembered_sha256(weights) == sha256(weights)
    assert counted_hashing == ["sam.pth", "sam.pth"]


def test_a_memo_with_the_sha256_alone_gets_the_md5_added(tmp_path, counted_hashing):
    """Memos written before the md5 was kept (or by a caller hashing the sha256 alone) are completed once."""
    weights, memo = tmp_path / "clip.pt", tmp_path / "own_memo"
    weights.write_bytes(b"c" * 4000)
    assert remembered_sha256(weights, memo, hash_file=lambda path: sha256(Path(path))) == sha256(weights)
    assert counted_hashing == []
    assert remembered_digest(weights, "md5", memo) == md5(weights)
    assert remembered_digest(weights, "md5", memo) == md5(weights) and remembered_sha256(weights, memo) == sha256(weights)
    assert counted_hashing == ["clip.pt"]
    [entry] = [json.loads(path.read_text()) for path in memo.glob("*.json")]
    assert (entry["sha256"], entry["md5"]) == (sha256(weights), md5(weights))


def test_a_release_loaded_with_another_sam_file_warns_and_loads(tmp_path, monkeypatch, capsys, counted_hashing):
    """load_model compares a release's weight files after loading them; a differing one warns, the model still loads."""
    sam_custom = {
        "encoder_embed_dim": 16, "encoder_depth": 1, "encoder_num_heads": 1, "encoder_global_attn_indexes": [0],
        "image_size": 1024, "patch_size": 16, "window_size": 4, "prompt_embed_dim": 256,
    }
    torch.manual_seed(0)
    published, other = tmp_path / "sam_vit_h.pth", tmp_path / "sam_finetuned.pth"
    state = build_sam("custom", custom=sam_custom).state_dict()
    torch.save(state, published)
    torch.save({k: v + 0.01 for k, v in state.items()}, other)
    monkeypatch.setitem(
        weight_identity.RELEASE_WEIGHT_FILES, "ssp_sam_224",
        {"model.sam_checkpoint": PublishedWeights("Meta's SAM ViT-H (sam_vit_h_4b8939.pth)", "md5", md5(published))},
    )
    release = tmp_path / "ssp_sam_224.pth"
    write_release_checkpoint(release)
    config = dict(RELEASE_LIKE, sam_variant="custom", sam_custom=sam_custom)

    assert load_model(release, dict(config, sam_checkpoint=str(published)), with_sam_image_encoder=True) is not None
    assert capsys.readouterr().err == ""
    assert load_model(release, dict(config, sam_checkpoint=str(other)), with_sam_image_encoder=True) is not None
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: model.sam_checkpoint={other} is not Meta's SAM ViT-H (sam_vit_h_4b8939.pth), which ssp_sam_224.pth")
    assert counted_hashing == [published.name, other.name]
