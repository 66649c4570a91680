"""The training engine on a tiny model and a small ShapeWorld set in the RefCOCO layout."""

from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import replace
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from ssp_sam.data.records import ReferringDataset
from ssp_sam.data.registry import load_dataset
from ssp_sam.data.shapeworld import generate_dataset
from ssp_sam.engine import trainer as trainer_module
from ssp_sam.engine.distributed import seed_rank_rngs
from ssp_sam.engine.rec_validation import rec_accuracy
from ssp_sam.config import ModelConfig
from ssp_sam.engine.precision import resolve_precision
from ssp_sam.engine.train_config import TrainRunConfig, config_warnings, train_run_config_from
from ssp_sam.engine.trainer import Trainer, TrainingDivergedError, epoch_would_overrun
from ssp_sam.errors import ConfigError, DatasetError
from ssp_sam.model import SSPOutput

from conftest import REPO, run_script


@pytest.fixture(scope="module")
def shapeworld_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapeworld")
    generate_dataset(root, "res", {"train": 8, "val": 2}, seed=11, progress=False)
    return root


def train_overrides(root: Path, run_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    """The tiny run's overrides, then ``extra``. A one-epoch run (``train.epochs=1`` in ``extra``) gets no warm-up and
    no decoder freeze: either would last the whole run, which the config validation refuses (``extra`` may still
    set them)."""
    one_epoch = ["train.warmup_epochs=0", "train.decoder_freeze_epochs=0"] if "train.epochs=1" in extra else []
    return [
        "model=tiny",
        "dataset=shapeworld",
        f"dataset.root={root}",
        f"run_dir={run_dir}",
        f"cache_dir={cache_dir}",
        "train.epochs=3",
        "train.batch_size=4",
        "train.workers=0",
        "train.warmup_epochs=1",
        "train.decoder_freeze_epochs=1",
        "train.lr=2e-3",
        "train.decoder_lr=1e-3",
        "train.max_steps_per_epoch=3",
        "val.split=null",
        "val.overlays=0",
        "train.precision=fp32",
        *one_epoch,
        *extra,
    ]


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss(tmp_path):
    """Overfitting the referents of one image (one full batch per step): the loss falls clearly."""
    root = tmp_path / "data"
    generate_dataset(root, "res", {"train": 1}, seed=12, progress=False)
    cfg = compose_train(
        train_overrides(
            root, tmp_path / "run", tmp_path / "cache",
            "train.epochs=15", "train.batch_size=2", "train.max_steps_per_epoch=1", "train.augment=false",
            "train.warmup_epochs=0", "train.decoder_freeze_epochs=0", "train.lr=3e-3", "train.grad_clip=1.0",
        )
    )
    trainer = Trainer(cfg)
    trainer.train_set.dataset = trainer.train_set.dataset[:2]
    trainer.sampler.size = 2
    result = trainer.fit()
    losses = result.losses
    assert len(losses) == 15
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()
    assert (tmp_path / "run" / "tb").is_dir()


def test_expression_weights_reach_the_training_items(shapeworld_root, tmp_path):
    cfg = compose_train(train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache", "train.expression_weights={L: 3.0}"))
    assert Trainer(cfg).train_set.expression_weights == {"L": 3.0}
    cfg = compose_train(train_overrides(shapeworld_root, tmp_path / "run2", tmp_path / "cache"))
    trainer = Trainer(cfg)
    assert trainer.train_set.expression_weights == {} and trainer.sampler.weights is None


def test_referent_weights_reach_the_sampler(shapeworld_root, tmp_path):
    cfg = compose_train(train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache", "train.referent_weights={L: 5.0}"))
    trainer = Trainer(cfg)
    has_location = [
        any(sample.sentence_meta(i)["kind"] == "L" for i in range(len(sample.expressions))) for sample in trainer.datasets["train"]
    ]
    assert any(has_location) and not all(has_location)
    weights = trainer.sampler.weights.tolist()
    for weighted, location in zip(weights, has_location):
        assert (weighted > 1.0) == location


def test_mask_targets_follow_model_mask_target(shapeworld_root, tmp_path):
    """release (the paper experiments' default): the release's GT processing; nearest: pixel-centred nearest.
    The model keeps its target, so that its checkpoint's masks are mapped back where they were drawn."""
    from ssp_sam.backbones.sam_frames import mask_to_padded_frame
    from ssp_sam.engine.protocols import release_gt_frame

    for target in ("release", "nearest"):
        trainer = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / target, tmp_path / "cache", f"model.mask_target={target}")))
        assert trainer.model.config.mask_target == target
        size = trainer.model.sam_image_size
        trainer.train_set.cache = None  # only the masks are looked at
        for index in range(2):
            gt = trainer.train_set.dataset[index].mask()
            expected = torch.from_numpy(release_gt_frame(gt, size)).float() if target == "release" else mask_to_padded_frame(gt, size)
            assert torch.equal(trainer.train_set[0, index]["mask"], expected)
    # The two differ on these masks (the release's bilinear resize grows the edges), so the test can tell them apart.
    assert not torch.equal(torch.from_numpy(release_gt_frame(gt, size)).float(), mask_to_padded_frame(gt, size))
    with pytest.raises(ConfigError, match="model.mask_target: must be one of release, nearest, area, got 'bicubic'"):
        Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "x", tmp_path / "cache", "model.mask_target=bicubic")))
    with pytest.raises(ConfigError, match="train.mask_target: now model.mask_target"):
        Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "x", tmp_path / "cache", "+train.mask_target=nearest")))


def test_a_run_killed_while_saving_resumes_with_best_matching_last(shapeworld_root, tmp_path, monkeypatch):
    """Killed between the two checkpoint saves of an epoch that improved: the resumed run must end with best/
    holding the epoch that last/'s best_metric names (saving last/ first left best/ one improvement behind)."""
    scores = {0: 0.3, 1: 0.5, 2: 0.4}  # validation score (the selection metric) per epoch
    monkeypatch.setattr(Trainer, "validate", lambda self, epoch: {self._selection_metric(): scores[epoch]})
    real_save, saves = Trainer._save, []

    class Killed(BaseException):
        pass

    def save_then_die(self, name, epoch, metrics):
        saves.append((name, epoch))
        if saves.count(("best", 1)) + saves.count(("last", 1)) == 2:  # the second save of epoch 1
            raise Killed
        return real_save(self, name, epoch, metrics)

    overrides = train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache", "val.split=val", "train.max_steps_per_epoch=1")
    monkeypatch.setattr(Trainer, "_save", save_then_die)
    with pytest.raises(Killed):
        Trainer(compose_train(overrides)).fit()
    monkeypatch.setattr(Trainer, "_save", real_save)
    result = Trainer(compose_train([*overrides, "resume=true"])).fit()
    best = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert result.best_metric == 0.5 and (best["epoch"], list(best["metrics"].values())) == (1, [0.5])


def test_each_rank_and_epoch_draws_its_own_dropout_masks():
    """One RNG stream on every rank would give rank r's j-th sample rank 0's j-th dropout mask (the release
    seeds seed + rank); seeding by (seed, epoch, rank) also replays a resumed epoch without stored RNG state."""
    def mask(step: int, rank: int) -> tuple[float, ...]:
        seed_rank_rngs(3407, step, rank)
        return tuple(torch.nn.functional.dropout(torch.ones(64), 0.5).tolist())

    drawn = {(step, rank): mask(step, rank) for step in (0, 1) for rank in (0, 1)}
    assert len(set(drawn.values())) == 4
    assert mask(1, 1) == drawn[1, 1]


def test_trainer_seeds_every_epoch_by_its_rank(shapeworld_root, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(trainer_module, "seed_rank_rngs", lambda *args: calls.append(args))
    Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache", "train.epochs=2", "seed=5"))).fit()
    assert calls == [(5, 0, 0), (5, 1, 0)]


def test_decoder_frozen_then_trained(shapeworld_root, tmp_path):
    cfg = compose_train(train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache", "train.epochs=2"))
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.mask_head.mask_decoder.state_dict().items()}
    generator_before = trainer.model.prompt_generator.norm.weight.clone()
    trainer.train_one_epoch(0)
    after_first = trainer.model.mask_head.mask_decoder.state_dict()
    assert all(torch.equal(before[k], after_first[k]) for k in before), "decoder changed while frozen"
    assert not torch.equal(generator_before, trainer.model.prompt_generator.norm.weight)
    trainer.train_one_epoch(1)
    after_second = trainer.model.mask_head.mask_decoder.state_dict()
    assert any(not torch.equal(before[k], after_second[k]) for k in before), "decoder never trained"
    base = {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups}
    assert base == {"new_modules": 2e-3, "mask_decoder": 1e-3}


def test_resume_equals_uninterrupted_run(shapeworld_root, tmp_path):
    cache = tmp_path / "cache"
    full = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "full", cache))).fit()
    first = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "part", cache, "train.epochs=3")))
    first.train_one_epoch(0)
    first._save("last", 0, {})
    resumed = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "part", cache, "resume=true")))
    assert resumed.start_epoch == 1
    rest = resumed.fit()
    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert rest.losses == full.losses[3:]
    assert [r["train/loss"] for r in read_log(tmp_path / "part")] == [
        r["train/loss"] for r in read_log(tmp_path / "full")
    ]
    # The release's per-epoch schedule, resumed too: 3 epochs, 1 warm-up, base 2e-3 / 1e-3, min 1e-6.
    # Epoch 0 at 1e-6; epoch e >= 1 at 1e-6 + (base - 1e-6)(1 + cos(pi e / 3)) / 2, i.e. factors 0.75, 0.25.
    expected = {0: (1e-6, 1e-6), 1: (1.50025e-3, 7.5025e-4), 2: (5.0075e-4, 2.5075e-4)}
    for run in ("full", "part"):
        for record in read_log(tmp_path / run):
            new_modules, decoder = expected[record["epoch"]]
            assert record["lr/new_modules"] == pytest.approx(new_modules, rel=1e-9), (run, record)
            assert record["lr/mask_decoder"] == pytest.approx(decoder, rel=1e-9), (run, record)


def test_resume_after_kill_mid_epoch(shapeworld_root, tmp_path):
    """SIGKILL during the second epoch, then resume=true: the result equals an uninterrupted run."""
    cache = tmp_path / "cache"
    reference = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "ref", cache, "train.max_steps_per_epoch=null", "train.log_every=1"))).fit()
    # log_every=1: a line per step, so the kill lands inside epoch 1 and not after its save.
    overrides = train_overrides(shapeworld_root, tmp_path / "killed", cache, "train.max_steps_per_epoch=null", "train.log_every=1")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "train.py"), *overrides],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    log = tmp_path / "killed" / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if log.exists() and any(json.loads(l)["epoch"] == 1 for l in log.read_text().splitlines() if l.endswith("}")):
            break
        time.sleep(0.05)
    assert process.poll() is None, "training ended before it could be interrupted"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    state = torch.load(tmp_path / "killed" / "last" / "trainer_state.pt", weights_only=True)
    assert state["epoch"] == 0
    done = run_script("train.py", *overrides, "resume=true", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    a = load_file(str(tmp_path / "ref" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train/loss"] for r in read_log(tmp_path / "killed")] == reference.losses


def test_a_stage_stops_before_an_epoch_that_would_pass_max_minutes():
    """Stages of 13-minute epochs under a 55-minute limit: four epochs (52 min) and not a fifth that would
    end at 65; with the first epoch the longest (cache fills) its length is the one that counts."""
    epoch = 13 * 60
    assert not epoch_would_overrun(3 * epoch, epoch, 55)  # a fourth ends at 52 min
    assert epoch_would_overrun(4 * epoch, epoch, 55)  # a fifth would end at 65
    assert epoch_would_overrun(40 * 60, 17 * 60, 55)  # 40 + 17 > 55, though 40 + 13 would fit
    assert not epoch_would_overrun(38 * 60, 17 * 60, 55)  # ends at exactly 55: still inside


def test_max_minutes_stops_after_an_epoch_and_resume_equals_one_run(shapeworld_root, tmp_path):
    """train.max_minutes: the script stops before an epoch that would pass the limit (exit 3, last/ saved, no
    test); two stops and resumes give the weights and losses of one uninterrupted 3-epoch run."""
    cache = tmp_path / "cache"
    full = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "full", cache))).fit()
    assert full.finished and full.epochs_run == 3
    overrides = train_overrides(shapeworld_root, tmp_path / "staged", cache)
    stopped = run_script("train.py", *overrides, "train.max_minutes=1e-6", cwd=tmp_path)
    assert stopped.returncode == 3, stopped.stderr[-2000:]
    assert "stopped by train.max_minutes after 1 epochs" in stopped.stdout
    assert torch.load(tmp_path / "staged" / "last" / "trainer_state.pt", weights_only=True)["epoch"] == 0
    second = Trainer(compose_train([*overrides, "resume=true", "train.max_minutes=1e-6"])).fit()
    assert (second.finished, second.epochs_run) == (False, 1)
    last = Trainer(compose_train([*overrides, "resume=true", "train.max_minutes=1e-6"])).fit()
    assert (last.finished, last.epochs_run) == (True, 1)  # the last epoch always ends the run
    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "staged" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert [r["train/loss"] for r in read_log(tmp_path / "staged")] == full.losses


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shapeworld_root, tmp_path, monkeypatch):
    """The loss turns NaN at the second step of a window (read back at its end): that step is named."""
    trainer = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache")))
    trainer.train_one_epoch(0)
    trainer._save("last", 0, {})
    saved = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    real_loss = trainer_module.ssp_sam_loss
    calls = []

    def nan_loss(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 2:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(trainer_module, "ssp_sam_loss", nan_loss)
    trainer.start_epoch = 1
    with pytest.raises(TrainingDivergedError, match=r"became nan at epoch 2, step 2.*last"):
        trainer.fit()
    kept = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    assert all(torch.equal(saved[k], kept[k]) for k in saved)
    assert [r["step"] for r in read_log(tmp_path / "run")] == [0, 1, 2, 3]  # the good step of epoch 2 is logged


# Tensor methods that read a value back to the host (a device synchronisation on a GPU).
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def count_host_reads(monkeypatch) -> list[str]:
    """Record every host read of a tensor made by ssp_sam's own code (torch's internals are not counted)."""
    reads: list[str] = []
    package = str(REPO / "ssp_sam")
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(package):
                reads.append(f"{_name} at {caller.f_code.co_filename}:{caller.f_lineno}")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


@pytest.mark.parametrize("log_every, windows", [(3, 1), (2, 2)])
def test_no_host_sync_per_step(shapeworld_root, tmp_path, monkeypatch, log_every, windows):
    """Three steps read the losses back once per logging window (plus the epoch's end), not once per step."""
    trainer = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache", f"train.log_every={log_every}")))
    trainer.loader = list(islice(trainer.loader, 3))  # the batches are read first: only the steps are watched
    reads = count_host_reads(monkeypatch)
    losses = trainer.train_one_epoch(1)
    assert len(reads) == windows, reads
    assert len(losses) == 3 and len(read_log(tmp_path / "run")) == 3


def test_decoder_parts_that_never_run_are_frozen(shapeworld_root, tmp_path):
    """A backward pass through the whole decoder reaches everything but SAM's IoU head and the
    hypernetwork MLPs of mask tokens 1-3; the trainer freezes exactly those, so every trainable
    parameter gets a gradient at every step (what DDP without find_unused_parameters needs)."""
    trainer = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache", "train.decoder_freeze_epochs=0")))
    batch = next(iter(trainer.loader))
    decoder = trainer.model.mask_head.mask_decoder
    decoder.requires_grad_(True)
    trainer._train_step(trainer.model, batch)
    gradless = {name for name, p in decoder.named_parameters() if p.grad is None}
    never_run = {id(p) for part in trainer_module.decoder_parts_never_run(decoder) for p in part.parameters()}
    assert gradless == {name for name, p in decoder.named_parameters() if id(p) in never_run}
    assert any(name.startswith("iou_prediction_head.") for name in gradless)
    assert any(name.startswith("output_hypernetworks_mlps.3.") for name in gradless)

    trainer._set_decoder_trainable(0)
    trainer._train_step(trainer.model, batch)
    trainable = [(name, p) for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert any(name.startswith("mask_head.mask_decoder.") for name, _ in trainable)
    assert all(p.grad is not None for _, p in trainable), [name for name, p in trainable if p.grad is None]
    assert all(not p.requires_grad for p in decoder.iou_prediction_head.parameters())


def test_loader_workers_persist_across_epochs(shapeworld_root, tmp_path, monkeypatch):
    """Two epochs with 2 workers: the same worker processes, and the items (so the losses) of a run without workers."""
    from ssp_sam.data.training import ReferringTrainingSet

    real_item = ReferringTrainingSet.__getitem__

    def item_with_pid(self, key):
        return {**real_item(self, key), "worker_pid": torch.tensor(os.getpid())}

    monkeypatch.setattr(ReferringTrainingSet, "__getitem__", item_with_pid)
    cache = tmp_path / "cache"
    reference = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "ref", cache, "train.epochs=2"))).fit()
    trainer = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "run", cache, "train.epochs=2", "train.workers=2")))
    pids: dict[int, set[int]] = {}
    real_step = trainer._train_step

    def step(model, batch):
        pids.setdefault(trainer.sampler.epoch, set()).update(batch["worker_pid"].tolist())
        return real_step(model, batch)

    trainer._train_step = step
    result = trainer.fit()
    assert set(pids) == {0, 1} and pids[0] == pids[1] and os.getpid() not in pids[0]
    assert result.losses == reference.losses


def test_sam_embeddings_travel_in_their_storage_dtype(shapeworld_root, tmp_path):
    """Items carry the cache's stored dtype; converting on the device gives the step of a float32 batch."""
    overrides = train_overrides(shapeworld_root, tmp_path / "a", tmp_path / "cache")
    first = Trainer(compose_train(overrides))
    batch = next(iter(first.loader))
    assert batch["sam_embedding"].dtype == first.cache.get(first.train_set.dataset[0].image_path, dtype=None).dtype
    half = {**batch, "sam_embedding": batch["sam_embedding"].half()}
    second = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "b", tmp_path / "cache")))
    from_half = first._train_step(first.model, half)
    from_float = second._train_step(second.model, {**half, "sam_embedding": half["sam_embedding"].float()})
    assert all(torch.equal(from_half[k], from_float[k]) for k in from_half)


@pytest.mark.parametrize("precision, stored", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_sam_embeddings_are_cached_in_the_training_precision(shapeworld_root, tmp_path, monkeypatch, precision, stored):
    """On a machine where precision=auto means bf16 (made so here), an fp32 training fills and reads fp32
    entries, as the release computes them, and a bf16 one bf16 entries."""
    import ssp_sam.engine.caching as caching
    from ssp_sam.engine.precision import Precision

    monkeypatch.setattr(caching, "resolve_precision", lambda name, device: Precision("bf16", "native bf16 (test)"))
    trainer = Trainer(compose_train(train_overrides(
        shapeworld_root, tmp_path / "run", tmp_path / "cache", f"train.precision={precision}",
    )))
    assert trainer.cache.get(trainer.train_set.dataset[0].image_path, dtype=None).dtype == stored


def test_validation_overlays_match_the_predictor(shapeworld_root, tmp_path):
    """The trainer draws its overlays from one batched forward of the model (no Predictor); the pictures
    are those of the Predictor's masks and boxes for the same sentences."""
    from ssp_sam.image_io import load_image
    from ssp_sam.predictor import Predictor
    from ssp_sam.visualize import overlay

    assert not hasattr(trainer_module, "Predictor")
    trainer = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache", "val.split=val")))
    trainer.model.eval()
    drawn = []

    class Writer:
        def add_image(self, tag, picture, step, dataformats):
            drawn.append((tag, picture, step))

    trainer.writer = Writer()
    samples = trainer.datasets["val"][:2]
    trainer._log_overlays(samples, 7)
    predictor = Predictor(trainer.model, device="cpu")
    assert [tag for tag, _, _ in drawn] == ["val/overlay_0", "val/overlay_1"]
    for (_, picture, step), sample in zip(drawn, samples):
        encoded = predictor.encode_image(sample.image_path, sam_embedding=trainer.cache.get(sample.image_path))
        prediction = predictor.predict(encoded, [sample.expressions[0]])[0]
        expected = np.asarray(overlay(load_image(sample.image_path), prediction.mask, prediction.box, sample.expressions[0]))
        assert step == 7 and picture.shape == expected.shape
        # One batched forward against one forward per image: a pixel may flip where a logit is ~0.
        assert np.mean(np.any(picture != expected, axis=-1)) < 0.01


def test_epochs_not_validated_are_never_best(shapeworld_root, tmp_path, monkeypatch):
    """val.every=2 over 4 epochs: validation after epochs 2 and 4 only; a skipped epoch neither
    reuses the previous metrics nor becomes best/."""
    cfg = compose_train(train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache", "train.epochs=4", "train.max_steps_per_epoch=1",
                                        "val.split=val", "val.every=2", "val.protocol=standard"))
    trainer = Trainer(cfg)
    validated = []
    scores = {1: 0.5, 3: 0.4}

    def validate(epoch):
        validated.append(epoch)
        return {"mIoU": scores[epoch]}

    monkeypatch.setattr(trainer, "validate", validate)
    result = trainer.fit()
    assert validated == [1, 3]
    assert result.best_metric == 0.5 and result.last_metrics == {"mIoU": 0.4}
    best = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert (best["epoch"], best["metrics"]) == (1, {"mIoU": 0.5})


def test_text_feature_cache_changes_nothing_but_the_rounding(shapeworld_root, tmp_path):
    """train.text_cache_gb > 0: sentences seen before skip CLIP's text encoder; the losses stay those of a run without it."""
    cache = tmp_path / "cache"
    plain = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "plain", cache))).fit()
    trainer = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "cached", cache, "train.text_cache_gb=0.01")))
    cached = trainer.fit()
    assert trainer.text_cache.hits > 0 and trainer.text_cache.misses <= 8 * 3  # 8 referents, at most 3 sentences each
    assert cached.losses == pytest.approx(plain.losses, rel=1e-5)


def test_existing_run_dir_needs_resume(shapeworld_root, tmp_path):
    (tmp_path / "run" / "last").mkdir(parents=True)
    with pytest.raises(ConfigError, match="resume=true"):
        Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache")))
    with pytest.raises(ConfigError, match="nothing to resume"):
        Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "other", tmp_path / "cache", "resume=true")))
    with pytest.raises(ConfigError, match="batch_size=64 is larger than the training set"):
        Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "x", tmp_path / "cache", "train.batch_size=64")))


@pytest.mark.parametrize(
    "extra",
    [
        (),
        # CLIP's last block trained, run on image-cache hits outside DDP's forward: its gradient must still be reduced
        ("model.finetune_image_blocks=1", "train.image_encoder_lr=1e-2", "train.image_cache_gb=0.01", "train.augment=false"),
    ],
    ids=["defaults", "image block trained through the image cache"],
)
def test_ddp_two_processes_match_one(shapeworld_root, tmp_path, extra):
    """torchrun with 2 CPU processes (gloo) gives the single-process loss curve at the same global batch."""
    cache = tmp_path / "cache"
    single = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "one", cache, "train.epochs=2", *extra))).fit()
    overrides = train_overrides(shapeworld_root, tmp_path / "two", cache, "train.epochs=2", *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    process = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         str(REPO / "scripts" / "train.py"), *overrides],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    distributed = [r["train/loss"] for r in read_log(tmp_path / "two")]
    assert len(distributed) == len(single.losses)
    # Tolerance: the two processes sum gradients in another order than one process does.
    assert distributed == pytest.approx(single.losses, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.precision=fp8", "train.precision: unknown value 'fp8'; expected one of auto, fp32, bf16, fp16"),
        ("train.precision=fp16", "train.precision=fp16 needs a CUDA device"),
        ("+train.amp=false", "train.amp: replaced by train.precision=auto|fp32|bf16|fp16"),
        ("+train.not_a_key=1", "train.not_a_key: not a training option"),
        ("train.log_every=1.5", "train.log_every=1.5: must be an integer >= 1"),
        ("train.grad_clip=0", "train.grad_clip=0: must be a number > 0 (or null)"),
        ("train.max_minutes=0", "train.max_minutes=0: must be a number > 0 (or null)"),
        ("train.schedule=linear", "train.schedule: unknown value 'linear'; expected one of per_epoch, per_iteration"),
        ("train.expression_weights={L: 0}", "train.expression_weights.L: must be > 0"),
        ("train.referent_weights={R: 0}", "train.referent_weights.R: must be > 0"),
        ("val.every=0", "val.every=0: must be an integer >= 1"),
        ("val.protocol=coco", "val.protocol: unknown value 'coco'"),
        ("cache_batch_size=0", "cache_batch_size=0: must be an integer >= 1"),
        ("model.adapters.dim=0", "model.adapters.dim: must be >= 1"),
    ],
)
def test_bad_options_are_named_before_any_work(tmp_path, override, message):
    """Each stops the trainer with a message naming the key, before the (absent) dataset is read."""
    cfg = compose_train(train_overrides(tmp_path / "no_such_data", tmp_path / "run", tmp_path / "cache", override))
    with pytest.raises(ConfigError) as error:
        Trainer(cfg)
    assert str(error.value).startswith(message), str(error.value)


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=1000", "train.batch_size=1000 is larger than the training set"),
    ("train.expression_weights={Z: 2.0}", "train.expression_weights"),
])
def test_settings_the_data_refutes_stop_before_the_sam_cache_fill(shapeworld_root, tmp_path, monkeypatch, override, message):
    """The SAM embedding cache fill is the long work before training (hours of ViT-H for RefCOCO)."""
    monkeypatch.setattr(Trainer, "_prepare_cache", lambda self: pytest.fail("the cache was filled before the check"))
    with pytest.raises((ConfigError, DatasetError), match=message):
        Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache", override)))


def test_typed_defaults_are_those_of_train_yaml():
    """The sections' dataclass defaults repeat configs/train.yaml's (a Python caller gets the same run)."""
    config = train_run_config_from(compose_train([]))
    default = TrainRunConfig()
    assert (config.train, config.val, config.test) == (default.train, default.val, default.test)
    assert (config.seed, config.resume, config.device, config.cache_batch_size) == (default.seed, default.resume, default.device, default.cache_batch_size)
    assert isinstance(config.model, ModelConfig) and isinstance(config.train.lr, float) and config.train.precision == "auto"


@pytest.mark.parametrize("experiment, rec_run", [("refcoco_224", "rec_pretrain_224"), ("grefcoco_336", "rec_pretrain_336"), ("refcocog_336", "rec_pretrain_336")])
def test_paper_stage_two_experiments_require_a_starting_point(experiment, rec_run, tmp_path):
    """The release starts stage 2 from its REC pretraining: left out, the run would silently start from
    random new modules, so the experiments make the choice a required key (null: start from scratch)."""
    overrides = [f"experiment={experiment}", f"run_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match=rf"init_checkpoint: .*init_checkpoint=runs/{rec_run}/last.* or init_checkpoint=null"):
        train_run_config_from(compose_train(overrides))
    assert train_run_config_from(compose_train([*overrides, "init_checkpoint=null"])).init_checkpoint is None
    chosen = train_run_config_from(compose_train([*overrides, f"init_checkpoint=runs/{rec_run}/last"]))
    assert chosen.init_checkpoint == f"runs/{rec_run}/last"


def test_precision_choice_is_printed_once(shapeworld_root, tmp_path, capsys):
    """train.precision=auto resolves as resolve_precision says on this machine and prints one line with the reason."""
    expected = resolve_precision("auto", torch.device("cpu"))
    trainer = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache", "train.precision=auto")))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("precision:")]
    assert lines == [f"precision: {expected.name} ({expected.reason})"]
    assert trainer.precision == expected and not trainer.scaler.is_enabled()
    assert all(math.isfinite(loss) for loss in trainer.train_one_epoch(0))


def test_unknown_config_key_exits_non_zero(tmp_path):
    done = run_script("train.py", "train.not_a_key=1", cwd=tmp_path)
    assert done.returncode != 0
    assert "not_a_key" in done.stderr


def test_best_checkpoint_is_evaluated_on_the_test_split(shapeworld_root, tmp_path):
    cfg = compose_train(
        train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache", "train.epochs=1", "test.split=val", "name=variant_x")
    )
    trainer = Trainer(cfg)
    trainer.fit()
    path = trainer.test()
    record = json.loads(path.read_text())
    assert path.name == "results_shapeworld_val.json"
    assert record["label"] == "variant_x" and record["split"] == "val" and record["dataset"] == "shapeworld"
    assert 0.0 <= record["metrics"]["mIoU"] <= 1.0 and record["n_images"] == 2
    assert record["protocol"] == cfg.val.protocol == "ssp_sam_release"  # as validation compares masks (the recipe's)


@pytest.mark.parametrize("protocol, selection", [("ssp_sam_release", "mIoU (SSP-SAM release)"), ("standard", "mIoU")])
def test_best_epoch_by_the_validation_protocols_miou(shapeworld_root, tmp_path, protocol, selection):
    """The release keeps the epoch with the best mean IoU of its own evaluator (val.protocol=ssp_sam_release)."""
    cfg = compose_train(train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache", "train.epochs=1", "val.split=val", f"val.protocol={protocol}"))
    result = Trainer(cfg).fit()
    assert result.best_metric == result.last_metrics[selection]
    assert ("mIoU (SSP-SAM release)" in result.last_metrics) == (protocol == "ssp_sam_release")
    saved = json.loads((tmp_path / "run" / "best" / "config.json").read_text())["metrics"]
    assert saved[selection] == result.best_metric


ABLATIONS = {
    "full": {},
    "no_vad": {"visual": False, "surgery_blocks": 0},
    "no_gaussian": {"gaussian": False},
    "no_lad": {"linguistic": False},
    "pg_decoder": {"mode": "decoder"},
    "prompt_tokens_8": {"num_prompt_tokens": 8},
}


def test_shapeworld_recipe_keeps_the_shipped_models_precision():
    """The shipped model was trained on a CPU with the old amp=auto, i.e. in fp32; train.yaml's default is auto."""
    assert compose_train(["experiment=shapeworld_default"]).train.precision == "fp32"
    assert compose_train(["experiment=ablation_shapeworld"]).train.precision == "fp32"
    assert compose_train([]).train.precision == "auto"


@pytest.mark.parametrize("variant", sorted(ABLATIONS))
def test_ablation_sweep_variants_compose(variant):
    """Each variant of the documented sweep changes only its switch and gets its own run directory."""
    cfg = compose_train(["experiment=ablation_shapeworld", f"ablation={variant}"])
    switches = {
        "visual": cfg.model.adapters.visual,
        "verification": cfg.model.adapters.verification,
        "gaussian": cfg.model.adapters.gaussian,
        "surgery_blocks": cfg.model.surgery_blocks,
        "linguistic": cfg.model.adapters.linguistic,
        "mode": cfg.model.prompt_generator.mode,
        "num_prompt_tokens": cfg.model.prompt_generator.num_prompt_tokens,
    }
    full = {"visual": True, "verification": True, "gaussian": True, "surgery_blocks": 2, "linguistic": True, "mode": "encoder", "num_prompt_tokens": 16}
    assert switches == {**full, **ABLATIONS[variant]}
    assert cfg.run_dir == f"runs/ablation_shapeworld_gres/{variant}"
    assert cfg.test.split == "test" and cfg.model.name == "shapeworld"


# ------------------------------------------------------------------------------------------ REC stage


def write_rec_fixture(root: Path) -> Path:
    """Box-only (REC) JSONL data: a 20x40 image; train and val lines with boxes and no masks.

    The val boxes are chosen for test_rec_accuracy_by_hand (xywh): A [10, 5, 20, 10],
    B [20, 5, 10, 10], C [0, 0, 10, 5], D [0, 0, 40, 20] (the whole image).
    """
    folder = root / "jsonl"
    folder.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, size=(20, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "scene.png")
    boxes = {"A": [10, 5, 20, 10], "B": [20, 5, 10, 10], "C": [0, 0, 10, 5], "D": [0, 0, 40, 20]}
    lines = [json.dumps({"id": name, "image": "scene.png", "expression": f"thing {name.lower()}", "boxes": [box]}) for name, box in boxes.items()]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "val.jsonl").write_text("\n".join(lines) + "\n")
    return root


def rec_overrides(root: Path, run_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        "model=tiny", "dataset=jsonl", f"dataset.root={root}", f"run_dir={run_dir}", f"cache_dir={cache_dir}",
        "train.stage=rec", "train.epochs=2", "train.batch_size=2", "train.workers=0", "train.warmup_epochs=0",
        "train.lr=2e-3", "val.split=val", "val.overlays=0", *extra,
    ]


def test_rec_stage_runs_without_sam(tmp_path, monkeypatch):
    """No SAM weights read, no cache, no mask head forward; the loss is the box loss; validated by REC-acc."""

    def no_sam(*args, **kwargs):
        raise AssertionError("the REC stage reached SAM's image encoder or the embedding cache")

    monkeypatch.setattr(trainer_module, "ensure_cache", no_sam)
    monkeypatch.setattr(trainer_module, "build_sam_image_encoder", no_sam)
    root = write_rec_fixture(tmp_path / "data")
    run = tmp_path / "run"
    # A SAM weight file that does not exist: the REC stage must not need it.
    cfg = compose_train(rec_overrides(root, run, tmp_path / "cache", f"model.sam_checkpoint={tmp_path / 'absent_sam.pth'}"))
    trainer = Trainer(cfg)
    mask_head_calls = []
    trainer.model.mask_head.register_forward_hook(lambda *args: mask_head_calls.append(1))
    result = trainer.fit()

    assert mask_head_calls == []
    assert trainer.model.sam_image_encoder is None and trainer.cache is None
    assert not (tmp_path / "cache").exists()
    records = read_log(run)
    assert len(records) == 4  # 2 epochs x 2 steps
    for record in records:
        assert {k for k in record if k.startswith("train/")} == {"train/loss", "train/l1", "train/giou"}
        assert record["train/loss"] == pytest.approx(record["train/l1"] + record["train/giou"], rel=1e-6)
    assert set(result.last_metrics) == {"REC-acc", "box_mIoU", "n_samples", "n_sentences"} and result.last_metrics["n_samples"] == 4
    assert 0.0 <= result.last_metrics["REC-acc"] <= 1.0
    assert result.best_metric == max(0.0, result.best_metric)
    assert json.loads((run / "best" / "config.json").read_text())["model"]["sam_checkpoint"] is None
    # Without warm-up (the release's pretraining) epoch 0 trains at the base rate, epoch 1 at min_lr + (base - min_lr)(1 + cos(pi/2))/2.
    assert [r["lr/new_modules"] for r in records] == pytest.approx([2e-3, 2e-3, 1.0005e-3, 1.0005e-3], rel=1e-9)


def test_rec_accuracy_by_hand(tmp_path, monkeypatch):
    """Boxes mapped out of the centred letterbox and clipped to the image, hits at IoU >= 0.5.

    The 20x40 image in the tiny model's 32x32 square: scale 0.8, content 32x16 at offset (0, 8).
    Prediction P1 = (0.5, 0.5, 0.5, 0.25) -> square (8, 12, 24, 20) -> image (10, 5, 30, 15):
    IoU 1 with A, 100/200 = 0.5 with B (a hit), 0 with C. Prediction P2 = (0.5, 0.5, 1, 1) ->
    square (0, 0, 32, 32) -> image (0, -10, 40, 30), clipped to (0, 0, 40, 20): IoU 1 with D
    (unclipped it would be 800/1200). REC-acc = 3/4, box mIoU = (1 + 0.5 + 0 + 1)/4.
    Then A gets a second sentence, predicted P2 (IoU 200/800 = 0.25 with A, a miss): every sentence
    counts once, as the release's one val item per sentence does, so REC-acc = (1 + 0 + 1 + 0 + 1)/5
    = 0.6 and box mIoU = (1 + 0.25 + 0.5 + 0 + 1)/5 = 0.55 (per referent it would be 0.625 and 0.53125).
    """
    from conftest import tiny_model

    model = tiny_model()
    dataset = load_dataset({"name": "rec", "format": "jsonl", "root": str(write_rec_fixture(tmp_path)), "folder": "jsonl", "split": "val", "task": "res"})
    assert [s.sample_id for s in dataset] == ["A", "B", "C", "D"]
    p1, p2 = [0.5, 0.5, 0.5, 0.25], [0.5, 0.5, 1.0, 1.0]

    predictions = [[p1, p1, p1, p2], [p1, p2, p1, p1, p2]]

    def fixed_boxes(image_tokens, sam_embeddings, text):
        assert sam_embeddings is None  # SAM does not run
        boxes = torch.tensor(predictions.pop(0))
        assert len(boxes) == len(text.words)
        return SSPOutput(None, None, boxes, None, None)

    monkeypatch.setattr(model, "decode", fixed_boxes)
    metrics = rec_accuracy(model, dataset, torch.device("cpu"))
    assert metrics == {"REC-acc": pytest.approx(0.75), "box_mIoU": pytest.approx(0.625), "n_samples": 4, "n_sentences": 4}
    two_sentences = replace(dataset[0], expressions=("thing a", "the a thing"), sentence_ids=(0, 1))
    dataset = ReferringDataset(dataset.name, dataset.split, dataset.task, [two_sentences, *dataset[1:]])
    metrics = rec_accuracy(model, dataset, torch.device("cpu"))
    assert metrics == {"REC-acc": pytest.approx(0.6), "box_mIoU": pytest.approx(0.55), "n_samples": 4, "n_sentences": 5}


def test_stage_two_keeps_sams_mask_decoder_from_a_rec_checkpoint(shapeworld_root, tmp_path):
    """init_checkpoint from the REC stage: everything but the (untrained) mask head comes from it."""
    from safetensors.torch import save_file

    rec = Trainer(compose_train(rec_overrides(write_rec_fixture(tmp_path / "data"), tmp_path / "rec", tmp_path / "c0", "train.epochs=1")))
    rec.fit()
    weights = tmp_path / "rec" / "last" / "model.safetensors"
    state = load_file(str(weights))
    state = {k: v + 1 if k.startswith("mask_head.") else v for k, v in state.items()}  # mark the REC file's mask head
    save_file(state, str(weights), metadata={"format": "ssp_sam"})

    cache = tmp_path / "cache"
    fresh = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "fresh", cache))).model.state_dict()
    started = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "s2", cache, f"init_checkpoint={tmp_path / 'rec' / 'last'}")))
    loaded = started.model.state_dict()
    mask_head = [k for k in loaded if k.startswith("mask_head.")]
    trained = [k for k in loaded if k.startswith(("prompt_generator.", "visual_adapter.", "word_proj."))]
    assert mask_head and trained
    assert all(torch.equal(loaded[k], fresh[k]) for k in mask_head)
    assert all(torch.equal(loaded[k], state[k]) for k in trained)


def test_rec_stage_refuses_a_test_split(tmp_path):
    with pytest.raises(ConfigError, match="test.split"):
        Trainer(compose_train(rec_overrides(write_rec_fixture(tmp_path / "data"), tmp_path / "run", tmp_path / "c", "test.split=val")))


# The release's configs/SSP_SAM_CLIP_{B,L}_*.py: epochs per dataset (B = 224, L = 336).
RELEASE_EPOCHS = {
    "refcoco": (80, 80), "refcoco+": (100, 100), "refcocog": (100, 100), "refcocog_google": (100, 100),
    "referit": (100, 100), "grefcoco": (80, 100), "rec_pretrain": (20, 20),
}


@pytest.mark.parametrize("name", sorted(RELEASE_EPOCHS))
def test_paper_experiments_follow_the_release_recipe(name):
    for size, epochs in zip(("224", "336"), RELEASE_EPOCHS[name]):
        cfg = compose_train([f"experiment={name}_{size}"])
        train = cfg.train
        assert (cfg.model.name, train.epochs, train.schedule) == (f"ssp_sam_{size}", epochs, "per_epoch")
        assert (train.lr, train.decoder_lr, train.min_lr, train.weight_decay, train.grad_clip) == (1e-4, 1e-5, 1e-6, 1e-4, 0.1)
        assert (train.batch_size, cfg.seed, train.precision) == (64, 3407, "fp32")  # the release trains in fp32
        if name == "rec_pretrain":
            assert (train.stage, train.warmup_epochs, cfg.val.split, cfg.dataset.name) == ("rec", 0, "val", "merged_rec")
        else:
            assert (train.stage, train.warmup_epochs, train.decoder_freeze_epochs) == ("res", 5, 20)


def test_image_token_cache_with_fixed_placements(shapeworld_root, tmp_path):
    """train.clip_placements=K with train.image_cache_gb > 0: repeated CLIP inputs skip CLIP's image
    encoder; the losses are those of the same placements without the cache."""
    cache = tmp_path / "cache"
    placed = ("train.clip_placements=2",)
    plain = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "plain", cache, *placed))).fit()
    trainer = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "cached", cache, *placed, "train.image_cache_gb=0.01")))
    cached = trainer.fit()
    assert trainer.image_cache.hits > 0
    assert cached.losses == pytest.approx(plain.losses, rel=1e-5)
    with pytest.raises(ConfigError, match="train.image_cache_gb: CLIP image tokens repeat only with train.augment=false or train.clip_placements > 0"):
        Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "x", cache, "train.image_cache_gb=0.01")))


def test_shapeworld_v2_recipe_caches_what_random_placement_cannot_change():
    """experiment=shapeworld_v2 caches the frozen CLIP's image tokens, which needs train.augment=false. That is no
    deviation on ShapeWorld: a 256 x 256 scene fills the 256 px CLIP square, so the release's random letterbox
    placement has no freedom and gives the centred input, pixel for pixel."""
    from ssp_sam.data.shapeworld.scene import CANVAS
    from ssp_sam.letterbox import letterbox_image

    cfg = compose_train(["experiment=shapeworld_v2"])
    assert cfg.model.name == "shapeworld_v2" and cfg.name == "shapeworld_default_v2"
    assert not cfg.train.augment and cfg.train.image_cache_gb > 0 and cfg.train.text_cache_gb == 0  # the text tower trains
    assert cfg.train.precision == "fp32" and cfg.dataset.root == "data/shapeworld_train"  # the rest: shapeworld_default's
    # 30 epochs (shipped 2026-12-01) and the kind weights of the 20-epoch pilot (docs/shapeworld_model.md)
    # pass the trainer's validation
    train = train_run_config_from(cfg).train
    assert train.epochs == 30 and train.referent_weights == {"L": 4.0, "R": 2.0} and train.expression_weights == {"L": 3.0, "R": 2.0}
    # CLIP's text tower trains (docs/shapeworld_model.md, "What moved L"), at its own learning rate
    assert cfg.model.finetune_text_encoder and train.text_encoder_lr == 5.0e-4
    assert cfg.model.clip_custom.image_size == CANVAS
    scene = np.random.default_rng(0).integers(0, 256, (CANVAS, CANVAS, 3), dtype=np.uint8)
    centred, box = letterbox_image(scene, CANVAS)
    for seed in range(5):
        placed, placed_box = letterbox_image(scene, CANVAS, "random", torch.Generator().manual_seed(seed))
        assert torch.equal(placed, centred) and placed_box == box


# ------------------------------------------------------------------------ settings accepted with no effect


@pytest.mark.parametrize("overrides, message", [
    # the decoder's default freeze (20 epochs) outlasting a short run: SAM's mask decoder would never train
    (("train.epochs=10", "train.decoder_freeze_epochs=20"), "train.decoder_freeze_epochs=20 >= train.epochs=10: SAM's mask decoder would never unfreeze"),
    (("train.epochs=3", "train.decoder_freeze_epochs=3"), "train.decoder_freeze_epochs=3 >= train.epochs=3"),
    (("train.epochs=3", "train.warmup_epochs=3"), "train.warmup_epochs=3 >= train.epochs=3: the run would never leave its"),
    (("train.min_lr=1e-2",), "train.min_lr=0.01 is above train.lr=0.002"),
    (("train.min_lr=1.5e-3",), "train.min_lr=0.0015 is above train.decoder_lr=0.001"),  # the decoder trains from epoch 2
    (("train.min_lr=1e-4", "model.finetune_text_encoder=true"), "train.min_lr=0.0001 is above train.text_encoder_lr=1e-05"),
    (("train.augment=false", "train.clip_placements=4"), "train.clip_placements=4: the K placements are offsets of the random letterbox"),
])
def test_settings_that_would_do_nothing_are_refused(tmp_path, overrides, message):
    """Each was accepted and silently ignored (or made the schedule run upwards); now one line naming the keys,
    before the (absent) dataset is read."""
    cfg = compose_train(train_overrides(tmp_path / "no_such_data", tmp_path / "run", tmp_path / "cache", *overrides))
    with pytest.raises(ConfigError) as error:
        Trainer(cfg)
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize("overrides", [
    ("train.epochs=3", "train.decoder_freeze_epochs=5", "train.decoder_lr=0"),  # the decoder frozen all run, on purpose
    ("train.stage=rec", "train.epochs=3", "train.decoder_freeze_epochs=20"),  # REC: no decoder training at all
    ("train.min_lr=1.5e-3", "train.decoder_freeze_epochs=3", "train.decoder_lr=0"),  # a decoder that never trains has no rate
    ("train.min_lr=1e-4",),  # the text tower is frozen: text_encoder_lr (1e-5) trains nothing
    ("train.epochs=2", "train.warmup_epochs=1", "train.decoder_freeze_epochs=1"),
    ("train.augment=true", "train.clip_placements=4"),
])
def test_settings_that_take_effect_pass(tmp_path, overrides):
    train_run_config_from(compose_train(train_overrides(tmp_path / "data", tmp_path / "run", tmp_path / "cache", *overrides)))


def test_a_decoder_frozen_on_purpose_never_trains(shapeworld_root, tmp_path):
    """train.decoder_lr=0 with the freeze outlasting the run: the decoder stays SAM's, the rest trains."""
    trainer = Trainer(compose_train(train_overrides(
        shapeworld_root, tmp_path / "run", tmp_path / "cache", "train.epochs=2", "train.decoder_freeze_epochs=2", "train.decoder_lr=0",
    )))
    before = {k: v.clone() for k, v in trainer.model.mask_head.mask_decoder.state_dict().items()}
    trainer.fit()
    after = trainer.model.mask_head.mask_decoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("overrides, warning", [
    (("train.text_cache_gb=1", "model.finetune_text_encoder=true"), "train.text_cache_gb=1 has no effect with model.finetune_text_encoder=true"),
    (("train.stage=rec", "val.protocol=standard", "val.overlays=4"), "val.protocol=standard has no effect in the REC stage"),
    (("train.stage=rec", "val.protocol=standard", "val.overlays=1"), "val.protocol=standard, val.overlays=1 have no effect in the REC stage"),
    (("train.stage=rec", "val.overlays=0"), "val.overlays=0 has no effect in the REC stage"),
    (("val.split=train",), "val.split=train is the training split (train.split): best/ is chosen on training data"),
    (("test.split=train",), "test.split=train is the training split: the test results are on data the model trained on"),
])
def test_settings_that_are_ignored_or_misleading_are_warned_about(tmp_path, overrides, warning):
    config = train_run_config_from(compose_train(train_overrides(tmp_path / "data", tmp_path / "run", tmp_path / "cache", *overrides)))
    assert [line for line in config_warnings(config) if line.startswith(warning)], config_warnings(config)
    plain = train_run_config_from(compose_train(train_overrides(tmp_path / "data", tmp_path / "run", tmp_path / "cache")))
    assert config_warnings(plain) == []


def test_the_trainer_prints_its_warnings_once_at_the_start(shapeworld_root, tmp_path, capsys):
    Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache", "val.split=train")))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: val.split=train")]
    assert len(lines) == 1


def test_the_released_recipes_pass_the_new_checks():
    """Every experiment (the paper's with init_checkpoint given, the ShapeWorld ones, the ablations) and the
    recipe script's commands pass, warnings aside."""
    experiments = sorted(path.stem for path in (REPO / "configs" / "experiment").glob("*.yaml") if not path.stem.startswith("ovss_"))
    assert "shapeworld_v2" in experiments and "refcoco_224" in experiments
    for name in experiments:
        train_run_config_from(compose_train([f"experiment={name}", "init_checkpoint=null"]))
    for name in ("shapeworld_v2", "shapeworld_default"):  # scripts/train_default_model.sh
        train_run_config_from(compose_train([f"experiment={name}", "train.max_minutes=55", "resume=true"]))
    rec = train_run_config_from(compose_train(["experiment=shapeworld_v2", "train.stage=rec", "train.save_encoders=false"]))
    assert rec.train.stage == "rec"


def test_the_final_test_of_a_bf16_run_reads_fp32_embeddings(shapeworld_root, tmp_path, monkeypatch):
    """A bf16 training caches bf16 SAM embeddings (precision=auto's dtype, made bf16 here); its results JSON says
    fp32, so the test split is scored on fp32 entries: the numbers of an fp32 evaluation of best/ (eval.py
    precision=fp32), not those of bf16 embeddings."""
    import ssp_sam.engine.caching as caching
    from ssp_sam.checkpoint import load_model
    from ssp_sam.engine.caching import ensure_cache
    from ssp_sam.engine.evaluator import evaluate
    from ssp_sam.engine.precision import Precision

    monkeypatch.setattr(caching, "resolve_precision", lambda name, device: Precision("bf16", "native bf16 (test)"))
    cache = tmp_path / "cache"
    trainer = Trainer(compose_train(train_overrides(
        shapeworld_root, tmp_path / "run", cache, "train.precision=bf16", "train.epochs=1", "test.split=val", "train.save_encoders=true",
    )))
    image = trainer.datasets["test"].image_paths()[0]
    assert trainer.cache.get(image, dtype=None).dtype == torch.bfloat16  # what training and validation read
    trainer.fit()
    record = json.loads(trainer.test().read_text())
    assert record["precision"] == "fp32" and record["cache_dtype"] == "fp32"
    assert trainer._test_cache().get(image, dtype=None).dtype == torch.float32

    model = load_model(tmp_path / "run" / "best")  # carries its SAM encoder: an fp32 cache of its own, elsewhere
    fp32 = ensure_cache(tmp_path / "cache_fp32", trainer.datasets["test"].image_paths(), [shapeworld_root / "images"],
                        model.sam_image_encoder, "custom", None, model.sam_image_size, torch.device("cpu"), dtype="fp32", progress=False)
    reference = evaluate(model, trainer.datasets["test"], cache=fp32, progress=False, protocol=trainer.config.val.protocol)
    assert record["metrics"] == pytest.approx(reference.metrics, abs=1e-6)
