"""model.finetune_text_encoder: CLIP's text tower (all but its token embedding) trains with SSP-SAM.

Not the release (its CLIP is frozen); the lever for a text tower that reads past the words a task needs
(docs/shapeworld_model.md). What must hold: exactly those parameters train, at their own learning rate,
even with the text-feature cache on; checkpoints carry the trained tower and refuse to stand in for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ssp_sam.backbones.clip import build_clip_model
from ssp_sam.checkpoint import WEIGHTS_FILE, load_model, load_own_weights, save_checkpoint
from ssp_sam.engine.optim import parameter_groups
from ssp_sam.engine.trainer import Trainer
from ssp_sam.errors import CheckpointError
from ssp_sam.model import build_model
from ssp_sam.pretrain.clip import save_clip_checkpoint

from conftest import tiny_config
from test_trainer import compose_train, shapeworld_root, train_overrides  # noqa: F401 (fixture)

TEXT_TRAINED = ("clip.clip.positional_embedding", "clip.clip.transformer.", "clip.clip.ln_final.", "clip.clip.text_projection")


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    """A random tiny CLIP (configs/model/tiny.yaml's sizes) as a plain state-dict file."""
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    save_clip_checkpoint(build_clip_model("custom", None, tiny_config().clip_custom), path)
    return path


def tiny_with_file(clip_file: Path, finetune: bool, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_config(clip_checkpoint=str(clip_file), finetune_text_encoder=finetune))


def test_exactly_the_text_tower_but_its_token_embedding_trains(clip_file):
    model = tiny_with_file(clip_file, finetune=True)
    trainable_clip = {n for n, p in model.named_parameters() if n.startswith("clip.") and p.requires_grad}
    text_tower = {n for n, _ in model.named_parameters() if n.startswith(TEXT_TRAINED)}
    assert text_tower and trainable_clip == text_tower
    assert not model.clip.clip.token_embedding.weight.requires_grad and not model.clip.clip.visual.proj.requires_grad

    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[:, :4] = torch.tensor([49406, 320, 1929, 49407])
    words, sentence = model.clip.encode_text(tokens)
    (words.square().sum() + sentence.square().sum()).backward()
    assert model.clip.clip.transformer.resblocks[0].attn.in_proj_weight.grad.abs().sum() > 0
    assert model.clip.clip.text_projection.grad.abs().sum() > 0
    assert model.clip.clip.token_embedding.weight.grad is None


def test_frozen_text_tower_records_no_graph(clip_file):
    model = tiny_with_file(clip_file, finetune=False)
    words, sentence = model.clip.encode_text(torch.ones(1, 77, dtype=torch.long))
    assert not words.requires_grad and not sentence.requires_grad
    assert not any(p.requires_grad for p in model.clip.parameters())


def test_text_tower_gets_its_own_parameter_group(clip_file):
    model = tiny_with_file(clip_file, finetune=True)
    groups = parameter_groups(model, lr=1e-3, decoder_lr=1e-4, weight_decay=0.0, text_encoder_lr=3e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [("new_modules", 1e-3), ("mask_decoder", 1e-4), ("text_encoder", 3e-4)]
    assert {id(p) for p in groups[2]["params"]} == {id(p) for n, p in model.named_parameters() if n.startswith(TEXT_TRAINED)}
    frozen = parameter_groups(tiny_with_file(clip_file, finetune=False), 1e-3, 1e-4, 0.0, 3e-4)
    assert [g["name"] for g in frozen] == ["new_modules", "mask_decoder"]


def test_checkpoint_carries_the_trained_text_tower_only(clip_file, tmp_path):
    model = tiny_with_file(clip_file, finetune=True)
    with torch.no_grad():
        model.clip.clip.ln_final.weight.add_(0.5)
        model.clip.clip.transformer.resblocks[1].mlp.c_fc.weight.mul_(2.0)
    directory = save_checkpoint(model, tmp_path / "ckpt")
    stored = load_file(str(directory / WEIGHTS_FILE))
    stored_clip = {k for k in stored if k.startswith("clip.")}
    assert stored_clip == {n for n, _ in model.named_parameters() if n.startswith(TEXT_TRAINED)}

    loaded = load_model(directory)
    file_clip = build_clip_model("custom", clip_file, tiny_config().clip_custom)
    assert torch.equal(loaded.clip.clip.ln_final.weight, model.clip.clip.ln_final.weight)
    assert not torch.equal(loaded.clip.clip.ln_final.weight, file_clip.ln_final.weight)
    assert torch.equal(loaded.clip.clip.transformer.resblocks[1].mlp.c_fc.weight, model.clip.clip.transformer.resblocks[1].mlp.c_fc.weight)
    assert torch.equal(loaded.clip.clip.visual.proj, file_clip.visual.proj)  # the image tower from the file

    del stored["clip.clip.ln_final.bias"]
    save_file(stored, str(directory / WEIGHTS_FILE), metadata={"format": "ssp_sam"})
    with pytest.raises(CheckpointError, match=r"missing keys: clip\.clip\.ln_final\.bias"):
        load_model(directory)


def test_a_frozen_clip_checkpoint_does_not_stand_in_for_a_trained_tower(clip_file, tmp_path):
    directory = save_checkpoint(tiny_with_file(clip_file, finetune=False, seed=1), tmp_path / "frozen")
    assert not any(k.startswith("clip.") for k in load_file(str(directory / WEIGHTS_FILE)))
    with pytest.raises(CheckpointError, match="finetune_text_encoder=true, but the checkpoint carries no fine-tuned CLIP text tower"):
        load_model(directory, {"finetune_text_encoder": True})
    # ...but a fine-tuning run may start from it (init_checkpoint): the tower then starts from the file.
    model = tiny_with_file(clip_file, finetune=True, seed=2)
    load_own_weights(model, directory, finetuned_from_file=True)
    file_clip = build_clip_model("custom", clip_file, tiny_config().clip_custom)
    assert torch.equal(model.clip.clip.ln_final.weight, file_clip.ln_final.weight)
    assert torch.equal(model.word_proj.weight, load_file(str(directory / WEIGHTS_FILE))["word_proj.weight"])


def test_training_moves_the_text_tower_with_the_text_cache_on(shapeworld_root, clip_file, tmp_path):
    """The trainer runs a trained text tower at every step (a cached entry carries no graph) at train.text_encoder_lr."""
    def run(name: str, finetune: bool) -> Trainer:
        trainer = Trainer(compose_train(train_overrides(
            shapeworld_root, tmp_path / name, tmp_path / "cache", "train.epochs=1", "train.text_cache_gb=0.01",
            f"model.clip_checkpoint={clip_file}", f"model.finetune_text_encoder={str(finetune).lower()}", "train.text_encoder_lr=1e-2",
        )))
        trainer.fit()
        return trainer

    file_clip = build_clip_model("custom", clip_file, tiny_config().clip_custom).state_dict()
    tuned = run("tuned", True).model.clip.clip.state_dict()
    moved = [k for k in tuned if not torch.equal(tuned[k], file_clip[k])]
    assert moved and all(f"clip.clip.{k}".startswith(TEXT_TRAINED) for k in moved)
    assert any(k.startswith("transformer.resblocks.0.") for k in moved)  # the gradient reaches the first block
    frozen = run("frozen", False).model.clip.clip.state_dict()
    assert all(torch.equal(frozen[k], file_clip[k]) for k in file_clip)
