"""The training engine on a tiny model and a small ShapeWorld set in the RefCOCO layout."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
import subprocess
import sys
import time
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
from ssp_sam.engine.rec_validation import rec_accuracy
from ssp_sam.engine.trainer import Trainer, TrainingDivergedError
from ssp_sam.errors import ConfigError
from ssp_sam.model import SSPOutput

from conftest import REPO, run_script


@pytest.fixture(scope="module")
def shapeworld_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapeworld")
    generate_dataset(root, "res", {"train": 8, "val": 2}, seed=11, progress=False)
    return root


def train_overrides(root: Path, run_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
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
    assert Trainer(cfg).train_set.expression_weights == {}


def test_mask_targets_follow_train_mask_target(shapeworld_root, tmp_path):
    """release (the paper experiments' default): the release's GT processing; nearest: pixel-centred nearest."""
    from ssp_sam.backbones.sam import mask_to_padded_frame
    from ssp_sam.engine.protocols import release_gt_frame

    for target in ("release", "nearest"):
        trainer = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / target, tmp_path / "cache", f"train.mask_target={target}")))
        size = trainer.model.sam_image_size
        trainer.train_set.cache = None  # only the masks are looked at
        for index in range(2):
            gt = trainer.train_set.dataset[index].mask()
            expected = torch.from_numpy(release_gt_frame(gt, size)).float() if target == "release" else mask_to_padded_frame(gt, size)
            assert torch.equal(trainer.train_set[0, index]["mask"], expected)
    # The two differ on these masks (the release's bilinear resize grows the edges), so the test can tell them apart.
    assert not torch.equal(torch.from_numpy(release_gt_frame(gt, size)).float(), mask_to_padded_frame(gt, size))
    with pytest.raises(ConfigError, match="train.mask_target"):
        Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "x", tmp_path / "cache", "train.mask_target=bicubic")))


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
    reference = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "ref", cache, "train.max_steps_per_epoch=null"))).fit()
    overrides = train_overrides(shapeworld_root, tmp_path / "killed", cache, "train.max_steps_per_epoch=null")
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


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shapeworld_root, tmp_path, monkeypatch):
    trainer = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache")))
    trainer.train_one_epoch(0)
    trainer._save("last", 0, {})
    saved = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    real_loss = trainer_module.ssp_sam_loss

    def nan_loss(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(trainer_module, "ssp_sam_loss", nan_loss)
    trainer.start_epoch = 1
    with pytest.raises(TrainingDivergedError, match=r"became nan at epoch 2, step 1.*last"):
        trainer.fit()
    kept = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    assert all(torch.equal(saved[k], kept[k]) for k in saved)


def test_existing_run_dir_needs_resume(shapeworld_root, tmp_path):
    (tmp_path / "run" / "last").mkdir(parents=True)
    with pytest.raises(ConfigError, match="resume=true"):
        Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache")))
    with pytest.raises(ConfigError, match="nothing to resume"):
        Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "other", tmp_path / "cache", "resume=true")))
    with pytest.raises(ConfigError, match="batch_size=64 is larger than the training set"):
        Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "x", tmp_path / "cache", "train.batch_size=64")))


def test_ddp_two_processes_match_one(shapeworld_root, tmp_path):
    """torchrun with 2 CPU processes (gloo) gives the single-process loss curve at the same global batch."""
    cache = tmp_path / "cache"
    single = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "one", cache, "train.epochs=2"))).fit()
    overrides = train_overrides(shapeworld_root, tmp_path / "two", cache, "train.epochs=2")
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
    Then A gets a second sentence, predicted P2 (IoU 200/800 = 0.25 with A, a miss): A scores
    the mean of its sentences, hit 1/2 and IoU 0.625, so REC-acc = (0.5 + 1 + 0 + 1)/4 = 0.625 and
    box mIoU = (0.625 + 0.5 + 0 + 1)/4 = 0.53125 (the expected value of the release's random draw).
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
    assert metrics == {"REC-acc": pytest.approx(0.625), "box_mIoU": pytest.approx(0.53125), "n_samples": 4, "n_sentences": 5}


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
        assert (train.batch_size, cfg.seed) == (64, 3407)
        if name == "rec_pretrain":
            assert (train.stage, train.warmup_epochs, cfg.val.split, cfg.dataset.name) == ("rec", 0, "val", "merged_rec")
        else:
            assert (train.stage, train.warmup_epochs, train.decoder_freeze_epochs) == ("res", 5, 20)
