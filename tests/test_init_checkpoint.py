"""A self-contained checkpoint whose frozen encoders differ from the configured weight files.

As init_checkpoint, the run must not mix them silently: SAM embeddings of the file's encoder must not feed a
decoder trained on the checkpoint's (nor may the checkpoint's encoder write entries under the file's key), and a
run that stores only what trains must not write checkpoints that name the file in place of the encoders it
trained with. A resumed run keeps the encoder it stored. Loaded with a SAM file named in place of its own
encoder, it must be that encoder.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ssp_sam.backbones.clip import build_clip_model
from ssp_sam.engine.trainer import Trainer
from ssp_sam.checkpoint import load_model, save_checkpoint
from ssp_sam.errors import CheckpointError, ConfigError
from ssp_sam.model import build_model
from ssp_sam.ovss.engine.checkpoint import load_ovss_model
from ssp_sam.ovss.engine.trainer import OVSSTrainer
from ssp_sam.pretrain.clip import save_clip_checkpoint

from conftest import REPO, tiny_config, write_sam_file
from test_ovss_engine import bands, tiny_run  # noqa: F401 (fixture)
from test_trainer import compose_train, shapeworld_root, train_overrides  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def sam_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("sam")
    custom = tiny_config().sam_custom
    return write_sam_file(folder / "sam_a.pth", custom, 1), write_sam_file(folder / "sam_b.pth", custom, 2)


def test_ssp_run_trains_on_the_checkpoints_sam_encoder_and_caches_it_apart(shapeworld_root, sam_files, tmp_path):
    sam_a, sam_b = sam_files
    cache = tmp_path / "cache"
    stored = ("train.epochs=1", "train.save_encoders=true")

    def trainer(name: str, sam: Path, *extra: str) -> Trainer:
        return Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / name, cache, f"model.sam_checkpoint={sam}", *extra)))

    run_a = trainer("a", sam_a, *stored)
    run_a.fit()
    run_b = trainer("b", sam_b, *stored)  # fills the cache with sam_b's embeddings, under sam_b's key
    image = run_a.datasets["train"].image_paths()[0]
    of_a, of_b = run_a.cache.get(image), run_b.cache.get(image)
    assert (of_a - of_b).abs().max() > 0.1

    # Started from run a (which stored sam_a's encoder) with model.sam_checkpoint=sam_b: sam_a's embeddings.
    started = trainer("c", sam_b, *stored, f"init_checkpoint={tmp_path / 'a' / 'last'}")
    assert torch.allclose(started.cache.get(image), of_a, atol=1e-5)
    assert torch.equal(started.model.sam_image_encoder.pos_embed, run_a.model.sam_image_encoder.pos_embed)
    assert torch.equal(trainer("b2", sam_b, *stored).cache.get(image), of_b)  # sam_b's entries were not overwritten

    # A run that would not store the encoders: refused, naming the file and the ways out.
    with pytest.raises(ConfigError, match=rf"SAM image encoder differs from the one of model.sam_checkpoint={sam_b}.*save_encoders=true"):
        trainer("d", sam_b, "train.epochs=1", f"init_checkpoint={tmp_path / 'a' / 'last'}")

    # Started from a checkpoint of the same file: the file's cache serves, nothing is recomputed.
    same = trainer("e", sam_a, *stored, f"init_checkpoint={tmp_path / 'a' / 'last'}")
    assert same.cache.last_build.computed == 0 and torch.equal(same.cache.get(image), of_a)


def test_ssp_resume_keeps_the_sam_encoder_the_run_stored(shapeworld_root, sam_files, tmp_path, capsys):
    """A stopped run resumed after its SAM file was rewritten (a pretraining writes there), or resumed without
    repeating the init_checkpoint its encoder came from: the run goes on with the encoder it stored, and reads
    that encoder's embeddings, not the file's."""
    sam_a, sam_b = sam_files
    sam_file = tmp_path / "sam.pth"
    sam_file.write_bytes(sam_a.read_bytes())
    cache = tmp_path / "cache"
    stored = ("train.epochs=2", "train.save_encoders=true", f"model.sam_checkpoint={sam_file}", "test.split=val")

    def trainer(name: str, *extra: str) -> Trainer:
        return Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / name, cache, *stored, *extra)))

    first = trainer("run", "train.max_minutes=1e-9")
    assert first.fit() is not None and (tmp_path / "run" / "last").is_dir()
    image = first.datasets["train"].image_paths()[0]
    of_a = first.cache.get(image)
    sam_file.write_bytes(sam_b.read_bytes())  # the file is rewritten while the run is stopped
    capsys.readouterr()
    resumed = trainer("run", "resume=true")
    assert "resuming on the SAM image encoder the run stored" in capsys.readouterr().out
    assert torch.allclose(resumed.cache.get(image), of_a, atol=1e-5)
    assert torch.equal(resumed.model.sam_image_encoder.pos_embed, first.model.sam_image_encoder.pos_embed)
    assert resumed.fit().finished and resumed.test() is not None  # best/ holds the stored encoder too

    # Started from run "run" with the (rewritten) file, stopped, resumed without init_checkpoint.
    start = f"init_checkpoint={tmp_path / 'run' / 'last'}"
    trainer("cont", start, "train.max_minutes=1e-9").fit()
    continued = trainer("cont", "resume=true")
    assert torch.allclose(continued.cache.get(image), of_a, atol=1e-5)


def test_ssp_run_refuses_another_frozen_clip_it_would_not_store(shapeworld_root, tmp_path):
    clip_files = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        clip_files.append(tmp_path / f"clip{seed}.pt")
        save_clip_checkpoint(build_clip_model("custom", None, tiny_config().clip_custom), clip_files[-1])
    cache = tmp_path / "cache"
    first = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "a", cache, f"model.clip_checkpoint={clip_files[0]}",
                                                  "train.epochs=1", "train.save_encoders=true")))
    first.fit()
    start = f"init_checkpoint={tmp_path / 'a' / 'last'}"
    with pytest.raises(ConfigError, match=rf"frozen CLIP differs from the one of model.clip_checkpoint={clip_files[1]}"):
        Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "b", cache, f"model.clip_checkpoint={clip_files[1]}", "train.epochs=1", start)))
    # The file it was trained with: accepted without storing the encoders.
    Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "c", cache, f"model.clip_checkpoint={clip_files[0]}", "train.epochs=1", start)))


def test_ovss_run_trains_on_the_checkpoints_sam_encoder_and_caches_it_apart(bands, tmp_path):
    custom = OmegaConf.load(REPO / "configs" / "ovss_model" / "tiny.yaml").sam.custom
    sam_a, sam_b = write_sam_file(tmp_path / "sam_a.pth", custom, 1), write_sam_file(tmp_path / "sam_b.pth", custom, 2)
    cache = tmp_path / "cache"
    common = ("train.crop=none", "train.iterations=1", "train.save_every=1", f"cache_dir={cache}")
    stored = (*common, "train.save_encoders=true")

    def trainer(name: str, sam: Path, *extra: str) -> OVSSTrainer:
        return OVSSTrainer(tiny_run(bands, tmp_path / name, f"ovss_model.sam.checkpoint={sam}", *extra))

    run_a = trainer("a", sam_a, *stored)
    run_a.fit()
    run_b = trainer("b", sam_b, *stored)
    image = run_a.train_set.samples[0].image_path
    of_a, of_b = run_a.train_cache.get(image), run_b.train_cache.get(image)
    assert (of_a - of_b).abs().max() > 0.1

    two_steps = (f"init_checkpoint={tmp_path / 'a' / 'last'}", "train.iterations=2")
    started = trainer("c", sam_b, *stored, *two_steps, "train.max_minutes=1e-9")  # stops after its first iteration
    assert torch.allclose(started.train_cache.get(image), of_a, atol=1e-5)
    assert torch.equal(trainer("b2", sam_b, *stored).train_cache.get(image), of_b)
    with pytest.raises(ConfigError, match=rf"SAM image encoder differs from the one of ovss_model.sam.checkpoint={sam_b}"):
        trainer("d", sam_b, *common, f"init_checkpoint={tmp_path / 'a' / 'last'}")
    assert not started.fit().finished
    resumed = trainer("c", sam_b, *stored, "train.iterations=2", "resume=true")  # without init_checkpoint: its last/ stores sam_a's
    assert torch.allclose(resumed.train_cache.get(image), of_a, atol=1e-5)
    assert resumed.fit().finished

    # Loaded for evaluation with a SAM file named in place of its own encoder: only the same encoder will do.
    with pytest.raises(CheckpointError, match=rf"own SAM image encoder, which differs from the one of ovss_model.sam.checkpoint={sam_b}"):
        load_ovss_model(tmp_path / "a" / "last", overrides={"sam": {"checkpoint": str(sam_b)}})
    assert load_ovss_model(tmp_path / "a" / "last", overrides={"sam": {"checkpoint": str(sam_a)}}).model is not None


def test_loading_refuses_a_sam_file_other_than_the_checkpoints_own_encoder(sam_files, tmp_path):
    sam_a, sam_b = sam_files
    torch.manual_seed(0)
    model = build_model(tiny_config(sam_checkpoint=str(sam_a)), with_sam_image_encoder=True)
    directory = save_checkpoint(model, tmp_path / "self_contained", embed_encoders=True)
    for with_encoder in (None, True):  # reading cached embeddings, or computing them (scripts/cache_embeddings.py)
        with pytest.raises(CheckpointError, match=rf"own SAM image encoder, which differs from the one of model.sam_checkpoint={sam_b}"):
            load_model(directory, {"sam_checkpoint": str(sam_b)}, with_sam_image_encoder=with_encoder)
    loaded = load_model(directory, {"sam_checkpoint": str(sam_a)}, with_sam_image_encoder=None)  # the same weights: fine
    assert loaded.sam_image_encoder is None
    assert torch.equal(loaded.mask_head.mask_decoder.iou_token.weight, model.mask_head.mask_decoder.iou_token.weight)
    assert load_model(directory, with_sam_image_encoder=None).sam_image_encoder is not None  # no file named: its own


def test_a_release_file_as_init_checkpoint_is_named_and_refused(shapeworld_root, tmp_path):
    """init_checkpoint=<released .pth>: the run cannot start from it (the trainer reads checkpoints of ours), and the
    one line says so naming that file, not a config.json beside it that nobody meant."""
    from test_checkpoint import write_release_checkpoint

    release = tmp_path / "ssp_sam_224.pth"
    write_release_checkpoint(release)
    with pytest.raises(CheckpointError) as error:
        Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache", f"init_checkpoint={release}")))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{release}: not a checkpoint of ours")
    assert "a training run cannot start from one" in message and "config.json: config file" not in message


# ------------------------------------------------------- weight files and model settings of the init checkpoint


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory) -> tuple[Path, Path]:
    """Two CLIP files of the tiny model's shapes, other weights."""
    folder = tmp_path_factory.mktemp("clip")
    files = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        files.append(folder / f"clip{seed}.pt")
        save_clip_checkpoint(build_clip_model("custom", None, tiny_config().clip_custom), files[-1])
    return files[0], files[1]


def test_init_checkpoint_of_another_clip_file_of_the_same_shape_is_refused(shapeworld_root, clip_files, tmp_path):
    """A checkpoint that does not carry its encoders (train.save_encoders=false, the REC stage's) names the CLIP file
    and its sha256: started with another CLIP of the same shape, the adapters would train on other features. Refused
    as loading and resuming refuse it; a copy of the file it was trained with, elsewhere, passes."""
    clip_1, clip_2 = clip_files
    cache = tmp_path / "cache"
    Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "a", cache, f"model.clip_checkpoint={clip_1}", "train.epochs=1"))).fit()
    start = f"init_checkpoint={tmp_path / 'a' / 'last'}"
    for stage in ("train.stage=res", "train.stage=rec"):
        with pytest.raises(CheckpointError) as error:
            Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "b", cache, f"model.clip_checkpoint={clip_2}", start, stage)))
        message = str(error.value)
        assert message.startswith(f"{start}: trained with model.clip_checkpoint={clip_1}") and f"model.clip_checkpoint={clip_2} holds other weights" in message
    copy = tmp_path / "moved" / "clip.pt"
    copy.parent.mkdir()
    copy.write_bytes(clip_1.read_bytes())
    Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "c", cache, f"model.clip_checkpoint={copy}", start)))


@pytest.mark.parametrize("override, changed", [
    ("model.append_period=false", "append_period: True -> False"),
    ("model.prompt_generator.positions_in_values=true", "prompt_generator.positions_in_values: False -> True"),
    ("model.surgery_blocks=0", "surgery_blocks: 1 -> 0"),
    ("model.adapters.gaussian=false", "adapters.gaussian: True -> False"),
])
def test_init_checkpoint_of_other_model_settings_is_refused(shapeworld_root, tmp_path, override, changed):
    """Settings that change no tensor shape: the checkpoint's weights would load and compute something else."""
    cache = tmp_path / "cache"
    Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "a", cache, "train.epochs=1"))).fit()
    start = f"init_checkpoint={tmp_path / 'a' / 'last'}"
    with pytest.raises(ConfigError) as error:
        Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "b", cache, start, override)))
    message = str(error.value)
    assert message.startswith(f"{start}: model settings differ from those it was trained with ({changed})") and "\n" not in message


def test_a_new_stage_may_change_its_mask_target_and_what_trains(shapeworld_root, clip_files, tmp_path):
    """What a stage-2 run legitimately changes: the target its masks train toward (recorded in its own checkpoints;
    docs/shapeworld_model.md's model.mask_target=area run) and the fine-tuned CLIP parts (from the file)."""
    clip_1, _ = clip_files
    cache = tmp_path / "cache"
    Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "a", cache, f"model.clip_checkpoint={clip_1}", "train.epochs=1"))).fit()
    start = f"init_checkpoint={tmp_path / 'a' / 'last'}"
    changed = Trainer(compose_train(train_overrides(
        shapeworld_root, tmp_path / "b", cache, f"model.clip_checkpoint={clip_1}", start,
        "model.mask_target=nearest", "model.finetune_text_encoder=true", "model.finetune_image_blocks=1",
    )))
    assert changed.model.config.mask_target == "nearest" and changed.model.config.finetune_text_encoder


def test_the_shipped_checkpoint_still_starts_the_shapeworld_recipe():
    """init_checkpoint=checkpoints/shapeworld_default (encoders embedded, no weight files recorded) with
    experiment=shapeworld_v2, as docs/shapeworld_model.md's fine-tuning runs start (one to mask_target=area)."""
    from ssp_sam.checkpoint import read_checkpoint_config
    from ssp_sam.engine.init_checkpoint import check_init_checkpoint
    from ssp_sam.engine.train_config import train_run_config_from

    shipped = REPO / "checkpoints" / "shapeworld_default"
    for extra in ([], ["model.mask_target=area"]):
        config = train_run_config_from(compose_train(["experiment=shapeworld_v2", f"init_checkpoint={shipped}", *extra]))
        check_init_checkpoint(shipped, read_checkpoint_config(shipped), config.model)
    config = train_run_config_from(compose_train(["experiment=shapeworld_v2", "model.append_period=false"]))
    with pytest.raises(ConfigError, match="append_period: True -> False"):
        check_init_checkpoint(shipped, read_checkpoint_config(shipped), config.model)


def test_shapeworld_v2_stage_two_from_its_own_rec_stage(tmp_path):
    """The recipe's two-stage use: `experiment=shapeworld_v2 train.stage=rec train.save_encoders=false`, then
    `experiment=shapeworld_v2 init_checkpoint=<that run>/last` (both at the recipe's model, on weight files of its
    shapes written here; few images and steps). Stage 2 starts: the REC stage's modules and fine-tuned text tower,
    SAM's own mask decoder."""
    from ssp_sam.data.shapeworld import generate_dataset

    model = OmegaConf.load(REPO / "configs" / "model" / "shapeworld_v2.yaml")
    clip_file, sam_file = tmp_path / "clip_v2.pt", tmp_path / "sam_v2.pth"
    torch.manual_seed(0)
    save_clip_checkpoint(build_clip_model("custom", None, OmegaConf.to_container(model.clip_custom)), clip_file)
    write_sam_file(sam_file, OmegaConf.to_container(model.sam_custom), 3)
    data = generate_dataset(tmp_path / "data", "gres", {"train": 4, "val": 1}, seed=5, progress=False)
    small = [
        f"dataset.root={data}", f"cache_dir={tmp_path / 'cache'}", f"model.clip_checkpoint={clip_file}",
        f"model.sam_checkpoint={sam_file}", "train.epochs=3", "train.max_steps_per_epoch=1", "train.batch_size=2",
        "train.workers=0", "val.every=3", "val.overlays=0",
    ]
    rec = Trainer(compose_train(["experiment=shapeworld_v2", "train.stage=rec", "train.save_encoders=false",
                                 f"run_dir={tmp_path / 'rec'}", *small]))
    rec.fit()
    stage_two = Trainer(compose_train(["experiment=shapeworld_v2", f"init_checkpoint={tmp_path / 'rec' / 'last'}",
                                       f"run_dir={tmp_path / 'res'}", *small]))
    loaded, trained = stage_two.model.state_dict(), rec.model.state_dict()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained if k.startswith(("prompt_generator.", "word_proj.", "clip.clip.ln_final.")))
    sam_decoder = torch.load(sam_file, weights_only=True)
    assert torch.equal(loaded["mask_head.mask_decoder.iou_token.weight"], sam_decoder["mask_decoder.iou_token.weight"])
    assert all(math.isfinite(loss) for loss in stage_two.train_one_epoch(0))
