"""model.finetune_image_blocks: CLIP's last vision blocks (with ln_post and the projection) train with SSP-SAM.

Not the release (its CLIP is frozen). What must hold: the split forward gives the frozen tower's tokens,
exactly those parameters train, at their own learning rate, through the image-token cache (whose entries
are the frozen blocks' output, keyed by the frozen weights only); checkpoints carry the trained blocks
and refuse to stand in for them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssp_sam.backbones.clip import build_clip_model
from ssp_sam.checkpoint import WEIGHTS_FILE, load_model, load_own_weights, save_checkpoint
from ssp_sam.config import model_config_from
from ssp_sam.engine.optim import parameter_groups
from ssp_sam.engine.trainer import Trainer
from ssp_sam.errors import CheckpointError, ConfigError
from ssp_sam.feature_cache import ImageTokenCache, clip_fingerprint
from ssp_sam.model import build_model

from conftest import tiny_config
from test_text_finetune import clip_file  # noqa: F401 (fixture)
from test_trainer import compose_train, shapeworld_root, train_overrides  # noqa: F401 (fixture)

# configs/model/tiny.yaml: 2 vision blocks, CLIP Surgery on the last one; fine-tuning the last block.
IMAGE_TRAINED = ("clip.clip.visual.transformer.resblocks.1.", "clip.clip.visual.ln_post.", "clip.clip.visual.proj")


def tiny_with_file(clip_file: Path, blocks: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_config(clip_checkpoint=str(clip_file), finetune_image_blocks=blocks))


def pixels(count: int = 2, seed: int = 0) -> torch.Tensor:
    size = tiny_config().clip_custom["image_size"]
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("blocks", [1, 2])
def test_split_forward_gives_the_frozen_towers_tokens(clip_file, blocks):
    frozen, tuned = tiny_with_file(clip_file, 0), tiny_with_file(clip_file, blocks)
    inputs = pixels()
    expected = frozen.encode_clip_image(inputs)
    features = tuned.clip.frozen_image_features(inputs)
    assert features.shape[-1] == tiny_config().clip_custom["vision_width"] and not features.requires_grad
    tokens = tuned.clip.finish_image_tokens(features)
    assert tokens.requires_grad and torch.equal(tokens, expected)
    assert not expected.requires_grad


def test_exactly_the_last_blocks_ln_post_and_projection_train(clip_file):
    model = tiny_with_file(clip_file, 1)
    trainable_clip = {n for n, p in model.named_parameters() if n.startswith("clip.") and p.requires_grad}
    assert trainable_clip == {n for n, _ in model.named_parameters() if n.startswith(IMAGE_TRAINED)}
    model.encode_clip_image(pixels()).square().sum().backward()
    visual = model.clip.clip.visual
    assert visual.transformer.resblocks[1].attn.in_proj_weight.grad.abs().sum() > 0 and visual.proj.grad.abs().sum() > 0
    assert visual.transformer.resblocks[0].attn.in_proj_weight.grad is None and visual.conv1.weight.grad is None


def test_fewer_blocks_than_clip_surgery_runs_on_are_refused():
    with pytest.raises(ConfigError, match=r"model\.finetune_image_blocks: must be 0 or at least model\.surgery_blocks \(2\), got 1"):
        model_config_from({**tiny_config().to_dict(), "surgery_blocks": 2, "finetune_image_blocks": 1})
    with pytest.raises(ConfigError, match=r"model\.finetune_image_blocks=3: must be 0 or lie in \[surgery_blocks, vision blocks\] = \[1, 2\]"):
        build_model(tiny_config(finetune_image_blocks=3, random_encoders=True))


def test_image_cache_keeps_the_frozen_blocks_output_and_serves_after_a_step(clip_file):
    """Entries are keyed by the frozen weights only: changing the fine-tuned block keeps them valid (a hit
    runs the block anew, with its graph); changing a frozen block makes them misses."""
    model = tiny_with_file(clip_file, 1)
    cache = ImageTokenCache()
    inputs = pixels()
    first = cache.encode(model, inputs)
    assert cache.misses == 2 and first.requires_grad
    torch.testing.assert_close(first, model.encode_clip_image(inputs), rtol=0, atol=0)
    fingerprint = clip_fingerprint(model.clip, "image")
    with torch.no_grad():
        model.clip.clip.visual.transformer.resblocks[1].mlp.c_fc.weight.mul_(1.5)
    assert clip_fingerprint(model.clip, "image") == fingerprint
    again = cache.encode(model, inputs)
    assert cache.hits == 2 and not torch.equal(again, first)
    torch.testing.assert_close(again, model.encode_clip_image(inputs), rtol=0, atol=0)
    again.sum().backward()
    assert model.clip.clip.visual.transformer.resblocks[1].mlp.c_fc.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.clip.clip.visual.transformer.resblocks[0].mlp.c_fc.weight.mul_(1.5)
    assert clip_fingerprint(model.clip, "image") != fingerprint
    cache.encode(model, inputs)
    assert cache.misses == 4
    frozen = tiny_with_file(clip_file, 0)
    assert clip_fingerprint(frozen.clip, "image") != clip_fingerprint(tiny_with_file(clip_file, 1).clip, "image")


def test_image_blocks_get_their_own_parameter_group(clip_file):
    model = tiny_with_file(clip_file, 1)
    groups = parameter_groups(model, lr=1e-3, decoder_lr=1e-4, weight_decay=0.0, text_encoder_lr=3e-4, image_encoder_lr=2e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [("new_modules", 1e-3), ("mask_decoder", 1e-4), ("image_encoder", 2e-4)]
    assert {id(p) for p in groups[2]["params"]} == {id(p) for n, p in model.named_parameters() if n.startswith(IMAGE_TRAINED)}


def test_checkpoint_carries_the_trained_blocks_and_a_frozen_one_does_not_stand_in(clip_file, tmp_path):
    model = tiny_with_file(clip_file, 1)
    with torch.no_grad():
        model.clip.clip.visual.transformer.resblocks[1].mlp.c_fc.weight.mul_(2.0)
        model.clip.clip.visual.proj.add_(0.5)
    directory = save_checkpoint(model, tmp_path / "ckpt")
    stored_clip = {k for k in load_file(str(directory / WEIGHTS_FILE)) if k.startswith("clip.")}
    assert stored_clip == {n for n, _ in model.named_parameters() if n.startswith(IMAGE_TRAINED)}
    loaded = load_model(directory)
    file_clip = build_clip_model("custom", clip_file, tiny_config().clip_custom)
    assert torch.equal(loaded.clip.clip.visual.proj, model.clip.clip.visual.proj)
    assert not torch.equal(loaded.clip.clip.visual.proj, file_clip.visual.proj)
    assert torch.equal(loaded.clip.clip.visual.transformer.resblocks[0].mlp.c_fc.weight, file_clip.visual.transformer.resblocks[0].mlp.c_fc.weight)

    frozen = save_checkpoint(tiny_with_file(clip_file, 0, seed=1), tmp_path / "frozen")
    with pytest.raises(CheckpointError, match="finetune_image_blocks=1, but the checkpoint carries no fine-tuned CLIP image blocks"):
        load_model(frozen, {"finetune_image_blocks": 1})
    start = tiny_with_file(clip_file, 1, seed=2)  # init_checkpoint of a fine-tuning run: the blocks from the file
    load_own_weights(start, frozen, finetuned_from_file=True)
    assert torch.equal(start.clip.clip.visual.proj, file_clip.visual.proj)


def test_training_moves_the_last_block_only_with_the_image_cache_on(shapeworld_root, clip_file, tmp_path):
    trainer = Trainer(compose_train(train_overrides(
        shapeworld_root, tmp_path / "run", tmp_path / "cache", "train.epochs=1", "train.image_cache_gb=0.01", "train.augment=false",
        f"model.clip_checkpoint={clip_file}", "model.finetune_image_blocks=1", "train.image_encoder_lr=1e-2",
    )))
    trainer.fit()
    assert trainer.image_cache.misses > 0
    file_clip = build_clip_model("custom", clip_file, tiny_config().clip_custom).state_dict()
    tuned = trainer.model.clip.clip.state_dict()
    moved = {k for k in tuned if not torch.equal(tuned[k], file_clip[k])}
    assert moved and all(f"clip.clip.{k}".startswith(IMAGE_TRAINED) for k in moved)
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in moved
