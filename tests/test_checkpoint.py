"""Released SSP-SAM checkpoints (torch pickle, release key names) and our safetensors checkpoints."""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ssp_sam.checkpoint import (
    RELEASE_KEY_MAP,
    WEIGHTS_FILE,
    load_model,
    map_release_key,
    read_release_file,
    release_preset,
    save_checkpoint,
    stored_mask_target,
)
from ssp_sam.backbones.sam import build_sam
from ssp_sam.config import model_config_from
from ssp_sam.errors import CheckpointError, ConfigError
from ssp_sam.model import build_model

from conftest import tiny_model
from fixtures_weights import write_release_file

KEYS_FILE = Path(__file__).parent / "data" / "ssp_sam_224_checkpoint_keys.json"
RELEASE_SHAPES: dict[str, list[int]] = json.loads(KEYS_FILE.read_text())

# SSP-SAM-224's CLIP interface (512-wide embeddings and words, 14x14 patches) on a one-layer CLIP,
# so the test builds in a second; the release's own tensors are what is checked.
RELEASE_LIKE = {
    "name": "release_test",
    "random_encoders": True,  # no CLIP or SAM weight files in these tests
    "clip_arch": "custom",
    "clip_custom": {
        "embed_dim": 512, "image_size": 224, "patch_size": 16, "vision_width": 64, "vision_layers": 1,
        "vision_head_width": 32, "text_width": 512, "text_layers": 1, "text_heads": 8,
    },
    "surgery_blocks": 1,
    "sam_variant": "vit_h",
}


def write_release_checkpoint(path: Path, seed: int = 0, mutate=None, **arg_overrides) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the release's keys and shapes, saved as the release's train.py saves them."""
    generator = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(*shape, generator=generator) * 0.05 for key, shape in RELEASE_SHAPES.items()}
    state["tf_scale"] = torch.tensor([1.3])
    state["tf_sigma"] = torch.tensor([0.7])
    if mutate is not None:
        mutate(state)
    write_release_file(path, state, **arg_overrides)
    return state


@pytest.fixture
def release(tmp_path_factory):
    path = tmp_path_factory.mktemp("release") / "ssp_sam_224.pth"
    state = write_release_checkpoint(path)
    model = load_model(path, RELEASE_LIKE, with_sam_image_encoder=False)
    return path, state, model


def test_release_quirk_is_switched_on(release):
    _, _, model = release
    assert model.config.release_quirks is True
    assert model.visual_adapter.token_axis_norm is True


def test_release_sam_image_encoder_is_loaded_when_present(tmp_path):
    """Keys under sam.image_encoder.* go to our SAM image encoder (a small one stands in for ViT-H)."""
    config = dict(RELEASE_LIKE, sam_variant="custom", sam_custom={
        "encoder_embed_dim": 16, "encoder_depth": 1, "encoder_num_heads": 1, "encoder_global_attn_indexes": [0],
        "image_size": 1024, "patch_size": 16, "window_size": 4, "prompt_embed_dim": 256,
    })
    encoder_state = build_model(model_config_from(config)).sam_image_encoder.state_dict()
    path = tmp_path / "with_encoder.pth"
    encoder = {f"sam.image_encoder.{k}": torch.randn_like(v) for k, v in encoder_state.items()}
    write_release_checkpoint(path, mutate=lambda s: s.update(encoder))
    model = load_model(path, config)
    for key, value in encoder.items():
        assert torch.equal(model.state_dict()[key.replace("sam.image_encoder.", "sam_image_encoder.")], value)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.pop("bbox_embed.layers.2.weight"), "missing keys: prompt_generator.box_head.layers.2.weight"),
        (lambda s: s.update({"vl_transformer.decoder.layers.0.weight": torch.zeros(1)}), "vl_transformer.decoder.layers.0.weight"),
        (lambda s: s.update({"prompt_token.weight": torch.zeros(64, 256)}), r"prompt_generator.prompt_tokens.weight \(file \(64, 256\), model \(128, 256\)\)"),
    ],
)
def test_release_checkpoint_mismatches_are_named(tmp_path, mutate, message):
    path = tmp_path / "broken.pth"
    write_release_checkpoint(path, mutate=mutate)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(path, RELEASE_LIKE, with_sam_image_encoder=False)
    assert str(path) in str(info.value)


def test_wrong_files_as_release_checkpoint(tmp_path):
    sam_like = tmp_path / "sam_vit_b.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1)}, sam_like)
    with pytest.raises(CheckpointError, match=r"not an SSP-SAM release checkpoint .*it holds a SAM model"):
        load_model(sam_like, RELEASE_LIKE)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth: not a readable torch checkpoint"):
        load_model(garbage, RELEASE_LIKE)
    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(CheckpointError, match="empty"):
        load_model(empty, RELEASE_LIKE)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pth", RELEASE_LIKE)


def test_release_preset_from_shapes():
    base = {"clip_proj.weight": torch.zeros(512, 512), "vl_pos_embed.weight": torch.zeros(325, 256)}
    assert release_preset(base, "x") == "ssp_sam_224"
    large = {"clip_proj.weight": torch.zeros(512, 768), "vl_pos_embed.weight": torch.zeros(705, 256)}
    assert release_preset(large, "x") == "ssp_sam_336"


def test_release_224_file_refuses_the_336_config(tmp_path):
    path = tmp_path / "ssp_sam_224.pth"
    write_release_checkpoint(path)
    message = r"ssp_sam_224 release checkpoint \(trained with CLIP CS-ViT-B-16.pt, epoch 79\) but the model config is ssp_sam_336"
    with pytest.raises(CheckpointError, match=message):
        load_model(path, {"name": "ssp_sam_336", "clip_arch": "ViT-L-14-336"})


def test_release_file_as_train_py_writes_it(release):
    """{"model", "optimizer", "lr_scheduler", "epoch", "args"} loads with argparse.Namespace allowed, and
    what the run's arguments say is kept."""
    path, state, _ = release
    with torch.serialization.safe_globals([argparse.Namespace]):
        container = torch.load(path, weights_only=True)
    assert set(container) == {"model", "optimizer", "lr_scheduler", "epoch", "args"}
    assert isinstance(container["args"], argparse.Namespace) and container["optimizer"]["state"]
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what the loader did before: refused
    read = read_release_file(path)
    assert read.epoch == 79 and read.clip_file == "pretrained_checkpoints/CS/CS-ViT-B-16.pt"
    assert read.args.lr == 1e-4 and read.args.freeze_modules == ["sam.mask_decoder"]
    assert list(read.state) == list(state) and all(torch.equal(read.state[k], v) for k, v in state.items())


def test_release_file_allows_exactly_argparse_namespace(tmp_path):
    path = tmp_path / "path_in_args.pth"
    write_release_checkpoint(path, output_dir=pathlib.PurePosixPath("outputs"))
    with pytest.raises(CheckpointError) as error:
        load_model(path, RELEASE_LIKE, with_sam_image_encoder=False)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert "refused, the pickle asks for pathlib.PurePosixPath" in message and "argparse.Namespace" in message
    # The allow-list was scoped to the release reader's call.
    namespace = tmp_path / "namespace.pt"
    torch.save(argparse.Namespace(a=1), namespace)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(namespace, weights_only=True)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_release_file_with_nan_or_inf_is_refused(tmp_path, value):
    path = tmp_path / "diverged.pth"
    write_release_checkpoint(path, mutate=lambda s: s["bbox_embed.layers.2.weight"].view(-1)[5].fill_(value))
    with pytest.raises(CheckpointError) as error:
        load_model(path, RELEASE_LIKE, with_sam_image_encoder=False)
    message = str(error.value)
    assert "\n" not in message
    assert f"{path}: weight 'bbox_embed.layers.2.weight' holds 1 NaN/Inf values of 1024" in message


def test_key_map_covers_the_whole_release():
    for key in RELEASE_SHAPES:
        map_release_key(key)  # raises KeyError for a key of no known module
    with pytest.raises(KeyError):
        map_release_key("decoder.weight")
    assert all(ours is None or ours.endswith(".") == release.endswith(".") for release, ours in RELEASE_KEY_MAP)


def test_release_trainable_parameter_count_matches_the_key_list():
    """The key list sums to the release's parameter count (one 256-value buffer aside)."""
    total = sum(math.prod(shape) for shape in RELEASE_SHAPES.values())
    assert total == 18_387_511


# ----------------------------------------------------------------------------- our own checkpoints


def test_own_checkpoint_roundtrip(tmp_path):
    model = tiny_model(seed=3)
    with torch.no_grad():
        model.word_proj.weight.add_(1.0)
    directory = save_checkpoint(model, tmp_path / "run" / "best", extra={"metrics": {"mIoU": 0.5}})
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((directory / "config.json").read_text())
    assert config["model"]["name"] == "tiny" and config["metrics"] == {"mIoU": 0.5}
    loaded = load_model(directory)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    also = load_model(directory / "model.safetensors")
    assert torch.equal(also.word_proj.weight, model.word_proj.weight)
    assert not list(tmp_path.joinpath("run").glob(".*")), "temporary files left behind"


def test_own_checkpoint_of_another_model_is_refused(tmp_path):
    directory = save_checkpoint(tiny_model(), tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    config["model"]["adapters"]["linguistic"] = False
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unexpected keys: linguistic_adapter"):
        load_model(directory)


def test_own_checkpoint_with_inf_is_refused(tmp_path):
    directory = save_checkpoint(tiny_model(), tmp_path / "ckpt")
    state = load_file(str(directory / WEIGHTS_FILE))
    state["word_proj.weight"][0, :3] = float("-inf")
    save_file(state, str(directory / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weight 'word_proj\.weight' holds 3 NaN/Inf values"):
        load_model(directory)


def test_corrupt_own_checkpoint(tmp_path):
    directory = save_checkpoint(tiny_model(), tmp_path / "ckpt")
    (directory / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model(directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_model(directory)


def test_mask_target_of_checkpoints_written_before_the_model_kept_it(tmp_path):
    """Older checkpoints named the mask target in their run's train section (or not at all: the release's);
    the model takes it from there, since it says where the model draws its masks. A given one must agree."""
    directory = save_checkpoint(tiny_model(), tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    assert config["model"]["mask_target"] == "release"
    del config["model"]["mask_target"]
    (directory / "config.json").write_text(json.dumps(config))
    assert load_model(directory).config.mask_target == "release"
    config["run"] = {"train": {"mask_target": "nearest"}}
    (directory / "config.json").write_text(json.dumps(config))
    assert load_model(directory).config.mask_target == "nearest"
    with pytest.raises(ConfigError, match=r"mask_target: 'nearest' -> 'release'"):
        load_model(directory, {"mask_target": "release"})


def test_own_checkpoint_refuses_settings_that_change_what_it_computes(tmp_path):
    """model=<preset> (or a single key) on one of our checkpoints: only weight-file paths, the no-target threshold
    and what would train may differ from its config.json; the rest would change its output with no shape error."""
    directory = save_checkpoint(tiny_model(), tmp_path / "ckpt")
    stored = json.loads((directory / "config.json").read_text())["model"]
    assert load_model(directory, dict(stored)).config == model_config_from(stored)  # the same settings again: fine
    assert load_model(directory, {"no_target_pixels": 3}).config.no_target_pixels == 3
    with pytest.raises(ConfigError, match=r"append_period: True -> False; prompt_generator.positions_in_values: False -> True"):
        load_model(directory, {"append_period": False, "prompt_generator": {"positions_in_values": True}})


def test_mask_target_of_a_run_from_before_train_mask_target(tmp_path):
    """Until train.mask_target came in (162683b) the trainer always trained on mask_to_padded_frame, today's
    "nearest": a run's checkpoint of that time (its run.train names no target, as the shipped model of a6cc457)
    is read back as nearest. A config without a run section was not written by a trainer: the release's."""
    directory = save_checkpoint(tiny_model(), tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    del config["model"]["mask_target"]
    config["run"] = {"train": {  # the train section of a6cc457's shipped model, as stored
        "stage": "res", "split": "train", "epochs": 30, "batch_size": 16, "lr": 0.0002, "decoder_lr": 2e-05, "min_lr": 1e-06,
        "weight_decay": 0.0001, "grad_clip": 1.0, "warmup_epochs": 1, "decoder_freeze_epochs": 2, "amp": "auto", "workers": 1,
        "augment": True, "log_every": 10, "max_steps_per_epoch": None, "save_encoders": True,
    }}
    (directory / "config.json").write_text(json.dumps(config))
    assert stored_mask_target(config) == "nearest"
    assert load_model(directory).config.mask_target == "nearest"
    with pytest.raises(ConfigError, match=r"mask_target: 'nearest' -> 'release'"):
        load_model(directory, {"mask_target": "release"})
    assert stored_mask_target({"model": {}}) == "release"


@pytest.mark.parametrize(
    "setting, change",
    [
        ({"mask_target": "nearest"}, "mask_target: 'release' -> 'nearest'"),
        ({"append_period": False}, "append_period: True -> False"),
        ({"prompt_generator": {"positions_in_values": True}}, "prompt_generator.positions_in_values: False -> True"),
        ({"name": "ssp_sam_224", "mask_target": "area"}, "mask_target: 'release' -> 'area'"),
    ],
)
def test_release_file_refuses_settings_that_change_what_it_computes(tmp_path, setting, change):
    """A released file defines its model as one of ours does: a setting that changes what it computes without any
    shape error is refused in one line naming it; the weight files, no_target_pixels and stand-in encoders are not."""
    path = tmp_path / "ssp_sam_224.pth"
    write_release_checkpoint(path)
    with pytest.raises(ConfigError) as error:
        load_model(path, {**RELEASE_LIKE, **setting}, with_sam_image_encoder=False)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: model settings differ from those of the ssp_sam_224 release")
    assert f"({change})" in message
    assert load_model(path, {**RELEASE_LIKE, "no_target_pixels": 3}, with_sam_image_encoder=False).config.no_target_pixels == 3


def test_release_file_refuses_surgery_blocks_other_than_its_own(tmp_path):
    """Surgery on the last 6 CLIP blocks is SSP-SAM's (only a stand-in CLIP may have another count); refused before any
    encoder is built."""
    path = tmp_path / "ssp_sam_224.pth"
    write_release_checkpoint(path)
    with pytest.raises(ConfigError, match=r"\(surgery_blocks: 6 -> 0\)"):
        load_model(path, {"random_encoders": True, "surgery_blocks": 0}, with_sam_image_encoder=False)


def test_release_files_sam_encoder_must_be_that_of_model_sam_checkpoint(tmp_path):
    """The release's train.py saves SAM's image encoder too. Named with a SAM file holding another encoder, a model
    computing embeddings would use the release file's and one reading cached embeddings (eval.py cache_dir=) the SAM
    file's: refused both ways. The same encoder loads both ways; without a SAM file the release file's is used."""
    sam_custom = {
        "encoder_embed_dim": 16, "encoder_depth": 1, "encoder_num_heads": 1, "encoder_global_attn_indexes": [0],
        "image_size": 1024, "patch_size": 16, "window_size": 4, "prompt_embed_dim": 256,
    }
    config = dict(RELEASE_LIKE, sam_variant="custom", sam_custom=sam_custom)
    torch.manual_seed(0)
    sam = build_sam("custom", custom=sam_custom).state_dict()
    encoder = {k: torch.randn_like(v) for k, v in sam.items() if k.startswith("image_encoder.")}
    path = tmp_path / "with_encoder.pth"
    write_release_checkpoint(path, mutate=lambda s: s.update({f"sam.{k}": v for k, v in encoder.items()}))
    same, other = tmp_path / "same_sam.pth", tmp_path / "other_sam.pth"
    torch.save({**sam, **encoder}, same)
    torch.save(sam, other)
    for with_encoder in (True, None):
        with pytest.raises(CheckpointError) as error:
            load_model(path, dict(config, sam_checkpoint=str(other)), with_sam_image_encoder=with_encoder)
        message = str(error.value)
        assert "\n" not in message
        assert message.startswith(f"{path}: the release file carries its own SAM image encoder (sam.image_encoder.*), which differs")
        assert f"model.sam_checkpoint={other}" in message
        loaded = load_model(path, dict(config, sam_checkpoint=str(same)), with_sam_image_encoder=with_encoder)
        assert (loaded.sam_image_encoder is None) == (with_encoder is None)
    own = load_model(path, config, with_sam_image_encoder=None).sam_image_encoder  # no SAM file: the release file's
    assert torch.equal(own.patch_embed.proj.weight, encoder["image_encoder.patch_embed.proj.weight"])


def test_w_o_lad_checkpoint_from_before_its_phrase_changed_is_refused(tmp_path):
    """7ee4a69 made adapters.linguistic=false use the L2-normalised CLIP sentence as the phrase (it was the raw one)
    and added adapters.dim, gaussian and text_attention_dropout: a w/o-LAD config without them was trained on the
    other phrase, which its weights fit silently. Refused naming the file; one of after 7ee4a69 loads."""
    directory = save_checkpoint(tiny_model(**{"adapters.linguistic": False}), tmp_path / "no_lad")
    assert load_model(directory).linguistic_adapter is None
    config = json.loads((directory / "config.json").read_text())
    for key in ("dim", "gaussian", "text_attention_dropout"):
        del config["model"]["adapters"][key]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load_model(directory)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{directory / 'config.json'}: a w/o-LAD model (adapters.linguistic=false)")
    assert "raw CLIP sentence embedding" in message
    full = save_checkpoint(tiny_model(), tmp_path / "full")  # the full model of that time: its phrase did not change
    config = json.loads((full / "config.json").read_text())
    for key in ("dim", "gaussian", "text_attention_dropout"):
        del config["model"]["adapters"][key]
    (full / "config.json").write_text(json.dumps(config))
    assert load_model(full).linguistic_adapter is not None
