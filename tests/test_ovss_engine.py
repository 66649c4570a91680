"""The OVSS training and evaluation engine on the tiny SAM-MI: training lowers the loss, a stopped and resumed run
equals an uninterrupted one bit for bit, 2 DDP processes end with one process's weights, evaluation's scores match
a hand-worked confusion matrix, scripts/eval.py's sliding window matches crops predicted one by one and its cached
SAM embeddings match SAM run live, checkpoints round-trip (with encoders from weight files), bad options are one
line and exit 2."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, run_script
from ssp_sam.engine.precision import Precision
from ssp_sam.errors import CheckpointError, ConfigError
from ssp_sam.ovss.data import load_ovss_dataset
from ssp_sam.ovss.engine.checkpoint import default_class_names, load_ovss_model, save_ovss_checkpoint
from ssp_sam.ovss.engine.data import IterationBatchSampler, TrainingCrops
from ssp_sam.ovss.resize import shortest_edge_size
from ssp_sam.ovss.engine.evaluator import evaluate_ovss
from ssp_sam.ovss.engine.train_config import OVSSEvalSection, ovss_train_config_from, settled_eval_section
from ssp_sam.ovss.engine.trainer import PROPOSAL_CHECK_ITERATIONS, OVSSTrainer

COLOURS = np.array([[230, 20, 20], [20, 20, 230], [20, 230, 20]], dtype=np.uint8)


def write_bands(root: Path, split: str, count: int, seed: int, height: int = 64, width: int = 64) -> None:
    """Scenes of three vertical colour bands (classes red, blue, green in a random order), a corner ignored."""
    rng = np.random.default_rng(seed)
    for folder in ("images", "labels"):
        (root / folder / split).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        label = np.repeat(rng.permutation(3)[np.arange(width) * 3 // width][None], height, axis=0).astype(np.uint8)
        label[:4, :4] = 255
        Image.fromarray(COLOURS[np.minimum(label, 2)]).save(root / "images" / split / f"{index:03d}.png")
        Image.fromarray(label).save(root / "labels" / split / f"{index:03d}.png")
    (root / "classes.json").write_text(json.dumps(["red", "blue", "green"]))


@pytest.fixture(scope="module")
def bands(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bands")
    write_bands(root, "train", 4, seed=0)
    return root


def tiny_run(root: Path, run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train_ovss", ["experiment=ovss_tiny", f"ovss_dataset.root={root}", f"run_dir={run_dir}", *overrides])
    return cfg


def test_training_crops_follow_catsegs_mapper(tmp_path):
    """detectron2's MAX_SIZE_TRAIN default (1333; CAT-Seg's configs keep it) caps the long side, and a resized
    image smaller than the crop is padded with 128, its label with the ignore value (CAT-Seg's mapper)."""
    write_bands(tmp_path, "train", 1, seed=3, height=24, width=96)  # 1:4, so 384 x 1536 would pass the cap
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        coco = ovss_train_config_from(compose("train_ovss", ["experiment=ovss_coco_vitb16_384", f"run_dir={tmp_path / 'coco'}"]))
    assert (coco.train.short_side, coco.train.max_size, coco.train.precision) == (384, 1333, "fp32")  # fp32: CAT-Seg has no AMP
    assert shortest_edge_size(384, 1536, 384, coco.train.max_size) == (333, 1333)
    dataset = load_ovss_dataset(ovss_train_config_from(tiny_run(tmp_path, tmp_path / "run")).dataset_config("train"))
    crops = TrainingCrops(dataset, 384, "random", 384, coco.train.max_size, False, seed=0)  # CAT-Seg's 384 crops
    item = crops[0, 0]
    assert item["image"].shape == (3, 384, 384)
    assert torch.all(item["image"][:, 333:] == 128) and torch.all(item["label"][333:] == -1)
    assert not torch.all(item["image"][:, :333] == 128)


def test_training_lowers_the_loss_on_a_fixed_batch(bands, tmp_path):
    # Batch 4 of 4 whole images: every step sees the same batch.
    cfg = tiny_run(bands, tmp_path / "run", "train.crop=none", "train.batch_size=4", "train.iterations=8", "train.lr=2e-3",
                   "train.grad_clip=null", "train.save_every=8", "train.log_every=4")
    result = OVSSTrainer(cfg).fit()
    assert result.finished and result.iteration == 8 and len(result.losses) == 8
    assert np.mean(result.losses[-2:]) < result.losses[0] - 0.02
    logged = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [record["iteration"] for record in logged] == list(range(8))
    assert logged[0]["train/loss"] == pytest.approx(logged[0]["train/seg"] + logged[0]["train/tspp"], rel=1e-6)
    # CAT-Seg's schedule: cosine from lr to 0 over the iterations, no warm-up; CLIP at 0.01x.
    for record in logged:
        factor = 0.5 * (1 + np.cos(np.pi * record["iteration"] / 8))
        assert record["lr/new_modules"] == pytest.approx(2e-3 * factor)
        assert record["lr/clip"] == pytest.approx(2e-5 * factor)
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()  # no validation: best/ is the final state


def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(bands, tmp_path):
    # random crops + flips, 2 batches per epoch; the clock is read at the end of each log window (one iteration here)
    common = ("train.iterations=3", "train.batch_size=2", "train.save_every=3", "train.log_every=1")
    whole = OVSSTrainer(tiny_run(bands, tmp_path / "whole", *common)).fit()
    stopped = OVSSTrainer(tiny_run(bands, tmp_path / "parts", *common, "train.max_minutes=1e-9")).fit()
    assert not stopped.finished and stopped.iteration == 1  # stopped at the first log window, last/ saved
    with pytest.raises(ConfigError, match=r"ovss_model.tspp.loss_weight: 1.0 -> 2.0"):  # another recipe: not this run
        OVSSTrainer(tiny_run(bands, tmp_path / "parts", *common, "resume=true", "ovss_model.tspp.loss_weight=2.0"))
    resumed = OVSSTrainer(tiny_run(bands, tmp_path / "parts", *common, "resume=true")).fit()
    assert resumed.finished and resumed.iteration == 3 and resumed.iterations_run == 2
    a = load_file(tmp_path / "whole" / "last" / "model.safetensors")
    b = load_file(tmp_path / "parts" / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.losses[1:] == resumed.losses
    lines = (tmp_path / "parts" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2]


def test_training_stops_when_sam_keeps_no_mask(bands, tmp_path):
    """Filters that keep none of SAM's masks would train CAT-Seg under SAM-MI's name: a run shorter than
    PROPOSAL_CHECK_ITERATIONS is stopped at its end with one line naming the proposal settings, nothing saved."""
    done = run_script(
        "train.py", "experiment=ovss_tiny", f"ovss_dataset.root={bands}", f"run_dir={tmp_path / 'run'}", "train.crop=none",
        "train.iterations=6", "train.log_every=2", "train.save_every=6", "ovss_model.proposals.pred_iou_thresh=1e9",
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ovss_model.proposals: SAM kept no mask in iterations 1-6 (multimask_output=True")
    assert not (tmp_path / "run" / "last").exists()


def proposal_checker(first_iteration: int, iterations: int = 2000) -> SimpleNamespace:
    """What OVSSTrainer._check_proposals reads of its trainer, for a stage starting at ``first_iteration``."""
    proposals = SimpleNamespace(multimask_output=False, pred_iou_thresh=0.88, stability_score_thresh=0.95)
    config = SimpleNamespace(train=SimpleNamespace(iterations=iterations), ovss_model=SimpleNamespace(proposals=proposals))
    return SimpleNamespace(_proposals_checked=False, _proposal_check_from=first_iteration, config=config)


def logged(first: int, end: int, kept: float) -> list[dict]:
    return [{"iteration": i, "train/sam_masks": kept} for i in range(first, end)]


def test_sam_keeping_few_masks_is_not_stopped():
    """A resumed stage's short first window without a mask (the ShapeWorld SAM-MI keeps 0.1-1.5 masks per scene)
    is no proof; a mask anywhere in the first PROPOSAL_CHECK_ITERATIONS settles it for the stage."""
    checker = proposal_checker(first_iteration=1188)
    OVSSTrainer._check_proposals(checker, logged(1188, 1200, 0.0))
    OVSSTrainer._check_proposals(checker, logged(1200, 1280, 0.0))
    OVSSTrainer._check_proposals(checker, logged(1280, 1286, 0.5))
    OVSSTrainer._check_proposals(checker, logged(1286, 1500, 0.0))
    assert checker._proposals_checked

    checker = proposal_checker(first_iteration=1188)
    OVSSTrainer._check_proposals(checker, logged(1188, 1280, 0.0))
    with pytest.raises(ConfigError, match=r"SAM kept no mask in iterations 1189-1300 \(multimask_output=False"):
        OVSSTrainer._check_proposals(checker, logged(1280, 1300, 0.0))
    assert PROPOSAL_CHECK_ITERATIONS == 100


def test_batches_start_anywhere_and_split_over_ranks():
    one = list(IterationBatchSampler(10, 4, seed=1, iterations=7))  # 2 batches per epoch
    assert list(IterationBatchSampler(10, 4, seed=1, iterations=7, start=3)) == one[3:]
    assert [batch[0][0] for batch in one] == [0, 0, 1, 1, 2, 2, 3]  # the epoch travels with each key
    ranks = [list(IterationBatchSampler(10, 4, 1, 7, 0, rank, 2)) for rank in (0, 1)]
    assert [r0 + r1 for r0, r1 in zip(*ranks)] == one


@pytest.mark.parametrize("num_classes", [3, 8])  # tiny's max_classes is 8: class padding, then none
def test_every_trainable_parameter_gets_a_gradient(bands, tmp_path, num_classes):
    """DDP runs without a search for unused parameters: a training step reaches every trainable weight."""
    from ssp_sam.ovss.engine.trainer import _LossOfBatch, parameters_never_used

    trainer = OVSSTrainer(tiny_run(bands, tmp_path / "run"))
    names = tuple(f"class{i}" for i in range(num_classes))
    never = {id(p) for p in parameters_never_used(trainer.model, num_classes)}
    assert len(never) == (0 if num_classes < 8 else 4)  # padding token + guidance of both aggregation layers
    for parameter in parameters_never_used(trainer.model, num_classes):
        parameter.requires_grad_(False)
    labels = torch.randint(0, num_classes, (2, 64, 64))
    _LossOfBatch(trainer.model, names)(torch.rand(2, 3, 64, 64) * 255, labels, None)["loss"].backward()
    missing = [name for name, p in trainer.model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    last_q = trainer.model.catseg.clip.clip.visual.transformer.resblocks[-1].attn.q_proj_weight
    assert not last_q.requires_grad  # CAT-Seg's last image block mixes no attention


def test_two_processes_end_with_the_weights_of_one(bands, tmp_path):
    """torchrun, 2 gloo CPU processes of batch 1, without find_unused_parameters, against 1 process of batch 2.

    Not bit-equal: DDP averages the two ranks' gradients (each the mean over its own image) where one
    process takes the mean over both images in another summation order, so gradients differ in the last
    bits; Adam's normalised steps and the clipping keep the difference at float rounding for 3 steps.
    """
    common = ["train.iterations=3", "train.batch_size=2", "train.save_every=3", "train.log_every=1"]
    single = OVSSTrainer(tiny_run(bands, tmp_path / "one", *common)).fit()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    process = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(REPO / "scripts" / "train.py"),
         "experiment=ovss_tiny", f"ovss_dataset.root={bands}", f"run_dir={tmp_path / 'two'}", *common],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    logged = [json.loads(line)["train/loss"] for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(single.losses, rel=1e-5)  # the mean over ranks is the loss of the global batch
    one = load_file(tmp_path / "one" / "last" / "model.safetensors")
    two = load_file(tmp_path / "two" / "last" / "model.safetensors")
    assert one.keys() == two.keys()
    start = OVSSTrainer(tiny_run(bands, tmp_path / "start", *common)).model.state_dict()  # the same seed: the same start
    moved = [key for key in one if not torch.equal(one[key], start[key])]
    assert len(moved) > 50  # the comparison is about trained weights
    for key in moved:
        step = (one[key] - start[key]).abs().max()
        assert (one[key] - two[key]).abs().max() <= 1e-3 * step + 1e-7, key


class FixedPredictions(torch.nn.Module):
    """A model stub at the metric boundary: the predicted class of a pixel is the image's red value there."""

    image_size = 4

    def encode_classes(self, names):
        return torch.zeros(len(names), 1, 1)

    freeze_counts: list[int] = []  # the GC's permanent generation at each forward (forked workers: see below)

    def forward(self, images, text, sam_embeddings=None):
        self.freeze_counts.append(gc.get_freeze_count())
        return SimpleNamespace(classes=images[:, 0].round().long(), count=text.shape[0], proposals=None)

    def probabilities(self, output):
        return torch.nn.functional.one_hot(output.classes, output.count).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("workers", [0, 1])
def test_scores_of_a_hand_made_two_image_split(tmp_path, workers):
    """Also with a forked loader worker: the same scores, and the parent's objects frozen while it lives
    (ssp_sam.engine.host_memory.shared_with_forked_workers: no copy-on-write of what the forward rewrites)."""
    ignore = 255
    gt = [
        [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [ignore, ignore, 2, 2]],
        [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [ignore] * 4],
    ]
    predicted = [
        [[0, 0, 0, 1], [0, 1, 1, 1], [2, 2, 1, 2], [0, 0, 2, 2]],
        [[1, 1, 1, 1], [1, 1, 2, 2], [1, 1, 1, 1], [2, 2, 2, 2]],
    ]
    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    for index, (labels, classes) in enumerate(zip(gt, predicted)):
        image = np.zeros((4, 4, 3), np.uint8)
        image[..., 0] = classes
        Image.fromarray(image).save(tmp_path / "images" / f"{index}.png")
        Image.fromarray(np.array(labels, np.uint8)).save(tmp_path / "labels" / f"{index}.png")
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["a", "b", "c"], "unseen_classes": ["c"]}))
    dataset = load_ovss_dataset({
        "name": "hand", "root": str(tmp_path), "split": "val", "image_dir": "images", "label_dir": "labels",
        "image_ext": ".png", "label_ext": ".png", "classes": "classes.json", "ignore_value": ignore,
    })
    options = OVSSEvalSection(sliding_window=False, window=4, batch_size=2)
    frozen_before = gc.get_freeze_count()
    FixedPredictions.freeze_counts = []
    result = evaluate_ovss(FixedPredictions(), dataset, options, torch.device("cpu"), Precision("fp32", "test"), workers=workers)
    assert gc.get_freeze_count() == frozen_before
    assert len(FixedPredictions.freeze_counts) == 1
    assert (FixedPredictions.freeze_counts[0] > frozen_before) == (workers > 0)
    # Confusion [gt, prediction] counted by hand: rows (3, 1, 0), (1, 13, 2), (0, 1, 5); 26 scored pixels.
    iou = [3 / 5, 13 / 18, 5 / 8]  # TP / (GT + PRED - TP): 3/(4+4-3), 13/(16+15-13), 5/(6+7-5)
    expected = {
        "mIoU": sum(iou) / 3,
        "mIoU (GT classes)": sum(iou) / 3,  # every class is in the GT here
        "fwIoU": (iou[0] * 4 + iou[1] * 16 + iou[2] * 6) / 26,
        "pAcc": 21 / 26,
        "mACC": (3 / 4 + 13 / 16 + 5 / 6) / 3,
        "mIoU seen": (iou[0] + iou[1]) / 2,
        "mIoU unseen": iou[2],
    }
    expected["hIoU"] = 2 * expected["mIoU seen"] * iou[2] / (expected["mIoU seen"] + iou[2])
    assert result.metrics == pytest.approx(expected, abs=1e-12)
    assert result.per_class_iou == pytest.approx(dict(zip("abc", iou)))
    assert result.n_images == 2 and result.sam_prompts_per_image is None


class RedIsClassOne(torch.nn.Module):
    """A CAT-Seg stand-in with an 8 x 8 input: class 1 where the red channel is above 128, class 0 elsewhere."""

    image_size = 8

    def encode_classes(self, names):
        return torch.zeros(len(names), 1, 1)

    def costs(self, images, text):
        return SimpleNamespace(images=images, selected=None)

    def decode(self, state):
        red = state.images[:, :1] > 128
        return torch.where(torch.cat([~red, red], dim=1), 10.0, -10.0)


class WholeViewMask(torch.nn.Module):
    """A SAM stand-in whose grid gives one mask, covering all of whatever view it is shown."""

    def embed(self, images):
        return images

    def propose(self, embeddings, points, valid, image_size):
        from ssp_sam.ovss.sam_mi.proposals import Proposals

        batch = embeddings.shape[0]
        ones = torch.ones(batch, 1)
        return Proposals(torch.ones(batch, 1, 4, 4), ones.bool(), ones, valid.sum(dim=1))


def test_sam_vote_with_the_sliding_window_votes_once_on_the_whole_image(tmp_path):
    """CAT-Seg + SAM vote under the sliding window (a 12 x 12 image, windows of 8 at stride 4 and the global view):
    the top-left 7 x 7 is not red (CAT-Seg's class 0), the rest red (class 1). SAM's one mask of the whole image
    holds a red majority, so every pixel is voted class 1. Voted per view instead, the top-left window (49 of its
    64 pixels not red) votes class 0 and its corner, in no other window, averages to a 0.5 / 0.5 tie with the
    global view's class 1; SAM also ran on 5 views instead of once."""
    from ssp_sam.ovss.sam_vote import CATSegSAMVote

    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    image = np.zeros((12, 12, 3), np.uint8)
    image[..., 0] = 230
    image[:7, :7, 0] = 20
    Image.fromarray(image).save(tmp_path / "images" / "0.png")
    Image.fromarray(np.ones((12, 12), np.uint8)).save(tmp_path / "labels" / "0.png")
    (tmp_path / "classes.json").write_text(json.dumps(["other", "red"]))
    dataset = load_ovss_dataset({
        "name": "red", "root": str(tmp_path), "split": "val", "image_dir": "images", "label_dir": "labels",
        "image_ext": ".png", "label_ext": ".png", "classes": "classes.json", "ignore_value": 255,
    })
    model = CATSegSAMVote(RedIsClassOne(), WholeViewMask(), SimpleNamespace(proposals=SimpleNamespace(grid_side=2)))
    options = OVSSEvalSection(sliding_window=True, overlap=0.5)  # window 8 (the model's), out_size 12 = 8 + stride 4
    result = evaluate_ovss(model, dataset, options, torch.device("cpu"), Precision("fp32", "test"), progress=False, workers=0)
    assert result.metrics["pAcc"] == 1.0
    assert result.sam_prompts_per_image == 4 and result.sam_masks_per_image == 1  # SAM's 2 x 2 grid, once per image
    from ssp_sam.ovss.predict import OVSSPredictor

    predicted = OVSSPredictor(model, inference="sliding", overlap=0.5).predict(image, ["other", "red"])  # scripts/predict.py's
    assert predicted.inference == "sliding" and (predicted.label_map == 1).all()


def test_checkpoints_round_trip_with_their_vocabulary(tmp_path):
    cfg = ovss_train_config_from(tiny_run(Path("/unused"), tmp_path / "run"))
    torch.manual_seed(0)
    from ssp_sam.ovss.build import build_ovss_model

    model = build_ovss_model(cfg.ovss_model)
    save_ovss_checkpoint(model, tmp_path / "ckpt", ["red", "blue"], extra={"iteration": 7})
    loaded = load_ovss_model(tmp_path / "ckpt")
    assert loaded.class_names == ("red", "blue") and loaded.info["iteration"] == 7 and not loaded.model.training
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in loaded.model.state_dict().items())
    grid = load_ovss_model(tmp_path / "ckpt", overrides={"points": "grid"})  # the dense-grid ablation of the same weights
    assert grid.model.tspp is None and grid.config.points == "grid"
    with pytest.raises(CheckpointError, match="does not fit this model; mis-shaped keys: catseg.decoder"):
        load_ovss_model(tmp_path / "ckpt", overrides={"variant": "catseg"})  # no DMI channels in CAT-Seg's decoder


def test_unseen_names_are_left_out_of_training_unless_asked(tmp_path):
    """train.vocabulary=seen (inductive zero-shot): the unseen names are not in the training vocabulary, labels
    are renumbered onto the seen names and an unseen class's pixels ignored; =all keeps every name as a
    negative; a run stored before the key trained with all of them, so resuming it with the default is refused.
    predict.py's default classes are the dataset's whole list (its training vocabulary before that was stored)."""
    write_bands(tmp_path, "train", 2, seed=0)
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["red", "blue", "green"], "unseen_classes": ["blue"]}))
    raw = load_ovss_dataset({
        "name": "bands", "root": str(tmp_path), "split": "train", "image_dir": "images/train",
        "label_dir": "labels/train", "image_ext": ".png", "label_ext": ".png", "classes": "classes.json", "ignore_value": 255,
    })
    renumbered = raw.without_unseen()
    assert renumbered.class_names == ("red", "green") and raw.class_names == ("red", "blue", "green")
    file_label = np.array(Image.open(tmp_path / "labels" / "train" / "000.png")).astype(np.int64)
    expected = np.select([file_label == 0, file_label == 2], [0, 1], default=-1)  # blue (1) and 255 ignored
    assert (file_label == 1).any() and np.array_equal(renumbered[0]["label"].numpy(), expected)
    assert np.array_equal(raw[0]["label"].numpy(), np.where(file_label == 255, -1, file_label))

    common = ("train.crop=none", "train.batch_size=2", "train.iterations=1", "train.save_every=1")
    seen = OVSSTrainer(tiny_run(tmp_path, tmp_path / "seen", *common))
    assert seen.class_names == ("red", "green")
    seen.fit()
    assert load_ovss_model(tmp_path / "seen" / "last").class_names == ("red", "green")
    # predict.py without classes= segments into the dataset's list, the held-out name included; a checkpoint
    # written before that list was stored: into its training vocabulary
    assert default_class_names(tmp_path / "seen" / "last") == ("red", "blue", "green")
    legacy = tmp_path / "legacy"
    shutil.copytree(tmp_path / "seen" / "last", legacy)
    stored = json.loads((legacy / "config.json").read_text())
    del stored["dataset_class_names"]
    (legacy / "config.json").write_text(json.dumps(stored))
    assert default_class_names(legacy) == ("red", "green")
    every = OVSSTrainer(tiny_run(tmp_path, tmp_path / "all", *common, "train.vocabulary=all"))
    assert every.class_names == ("red", "blue", "green")
    every.fit()
    config = tmp_path / "all" / "last" / "config.json"
    stored = json.loads(config.read_text())
    del stored["run"]["train"]["vocabulary"]  # as saved before the key existed
    config.write_text(json.dumps(stored))
    with pytest.raises(ConfigError, match=r"train.vocabulary: 'all' -> 'seen'"):
        OVSSTrainer(tiny_run(tmp_path, tmp_path / "all", *common, "resume=true"))


def test_a_zero_shot_selection_metric_needs_unseen_classes_before_training(bands, tmp_path):
    with pytest.raises(ConfigError, match="val.metric=mIoU seen: the validation split train names no unseen classes"):
        OVSSTrainer(tiny_run(bands, tmp_path / "run", "val.split=train", "val.metric=mIoU seen"))


def test_inductive_validation_scores_the_seen_vocabulary_on_seen_pixels(tmp_path, monkeypatch):
    """train.vocabulary=seen: validation (which picks best/) prompts the seen names only and does not score an
    unseen class's pixels, so how unseen objects are labelled cannot steer selection; its "mIoU seen" is that
    mIoU, and a selection metric of the unseen classes is refused before training."""
    import ssp_sam.ovss.engine.trainer as trainer_module

    write_bands(tmp_path, "train", 2, seed=0)
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["red", "blue", "green"], "unseen_classes": ["blue"]}))
    common = ("train.crop=none", "train.batch_size=2", "train.iterations=1", "val.split=train", "val.every=1")
    with pytest.raises(ConfigError, match="val.metric=hIoU: with train.vocabulary=seen"):
        OVSSTrainer(tiny_run(tmp_path, tmp_path / "refused", *common, "val.metric=hIoU"))

    scored = []

    def spy(model, dataset, *args, **kwargs):
        scored.append((dataset.class_names, dataset[0]["label"].numpy()))
        return evaluate_ovss(model, dataset, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate_ovss", spy)
    trainer = OVSSTrainer(tiny_run(tmp_path, tmp_path / "seen", *common, "val.metric=mIoU seen"))
    metrics = trainer.validate()
    file_label = np.array(Image.open(tmp_path / "labels" / "train" / "000.png")).astype(np.int64)
    names, label = scored[0]
    assert names == ("red", "green")
    assert np.array_equal(label, np.select([file_label == 0, file_label == 2], [0, 1], default=-1))  # blue not scored
    assert metrics["mIoU seen"] == metrics["mIoU"] and "mIoU unseen" not in metrics


def test_an_unseen_selection_metric_needs_unseen_pixels_among_the_validated_images(tmp_path):
    """hIoU of a split whose validated images show no unseen class would be missing at the first validation,
    after the work before it: refused before training."""
    write_bands(tmp_path, "train", 2, seed=0)
    classes = {"classes": ["red", "blue", "green", "purple"], "unseen_classes": ["purple"]}  # no purple pixel
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    overrides = ("train.vocabulary=all", "val.split=train", "val.metric=hIoU")
    with pytest.raises(ConfigError, match="val.metric=hIoU: none of the 2 validated images of train shows an unseen class"):
        OVSSTrainer(tiny_run(tmp_path, tmp_path / "run", *overrides))
    classes["unseen_classes"] = ["blue"]
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    assert OVSSTrainer(tiny_run(tmp_path, tmp_path / "run", *overrides)).val_set.unseen_classes == ("blue",)


def plain_confusion(predicted: list[np.ndarray], labels: list[np.ndarray], classes: int) -> np.ndarray:
    confusion = np.zeros((classes, classes), np.int64)
    for p, gt in zip(predicted, labels):
        scored = gt != 255
        np.add.at(confusion, (gt[scored], p[scored]), 1)
    return confusion


def plain_scores(confusion: np.ndarray) -> dict[str, float]:
    """metrics.md's scores of a [gt, prediction] confusion matrix (every class present in the labels)."""
    tp, gt, pred = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    iou = tp / (gt + pred - tp)
    return {"mIoU": iou.mean(), "fwIoU": (iou * gt).sum() / gt.sum(), "pAcc": tp.sum() / gt.sum(), "mACC": (tp / gt).mean()}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny SAM-MI (random encoders stored in it) as scripts/eval.py reads it."""
    from ssp_sam.ovss.build import build_ovss_model

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    cfg = ovss_train_config_from(tiny_run(Path("/unused"), path.parent / "run"))
    torch.manual_seed(1)
    save_ovss_checkpoint(build_ovss_model(cfg.ovss_model), path, ["red", "blue", "green"])
    return path


def test_eval_script_scores_sliding_windows_as_a_plain_computation(bands, tiny_checkpoint, tmp_path):
    """scripts/eval.py on an OVSS checkpoint with CAT-Seg's sliding window over 80x96 images (window 64, stride 32
    over the image resized to short side 96 and then to 96 x 96: 4 crops + the global view); the results JSON against
    crops predicted one by one."""
    write_bands(bands, "wide", 2, seed=5, height=80, width=96)
    out = tmp_path / "results.json"
    done = run_script(
        "eval.py", f"checkpoint={tiny_checkpoint}", "ovss_dataset=semseg", f"ovss_dataset.root={bands}", "ovss_dataset.split=wide",
        "ovss_dataset.image_dir=images/wide", "ovss_dataset.label_dir=labels/wide", "ovss_dataset.image_ext=.png",
        "ovss_dataset.classes=classes.json", "eval.overlap=0.5", "workers=0", "precision=fp32",
        f"metrics_out={out}", "threads=1",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    loaded = load_ovss_model(tiny_checkpoint)
    model = loaded.model
    predicted, labels = [], []
    with torch.no_grad():
        text = model.encode_classes(["red", "blue", "green"])
        for index in range(2):
            image = torch.from_numpy(np.array(Image.open(bands / "images" / "wide" / f"{index:03d}.png"))).permute(2, 0, 1).float()
            # detectron2's test resize first: short side 80 -> 96 (out_size), 96 x 115.2 -> 96 x 115, antialiased
            image = torch.nn.functional.interpolate(image[None], size=(96, 115), mode="bilinear", align_corners=False, antialias=True)[0]
            resized = torch.nn.functional.interpolate(image[None], size=(96, 96), mode="bilinear", align_corners=False)
            summed, count = torch.zeros(3, 96, 96), torch.zeros(96, 96)
            for top in (0, 32):
                for left in (0, 32):
                    summed[:, top : top + 64, left : left + 64] += model.predict(resized[:, :, top : top + 64, left : left + 64], text)[0]
                    count[top : top + 64, left : left + 64] += 1
            whole = model.predict(torch.nn.functional.interpolate(image[None], size=(64, 64), mode="bilinear", align_corners=False), text)
            whole = torch.nn.functional.interpolate(whole, size=(96, 96), mode="bilinear", align_corners=False)[0]
            averaged = (summed / count + whole) / 2
            probabilities = torch.nn.functional.interpolate(averaged[None], size=(80, 96), mode="bilinear", align_corners=False)[0]
            predicted.append(probabilities.argmax(0).numpy())
            labels.append(np.array(Image.open(bands / "labels" / "wide" / f"{index:03d}.png")).astype(np.int64))
    expected = plain_scores(plain_confusion(predicted, labels, 3))
    assert all(np.bincount(p.ravel(), minlength=3).min() > 0 for p in predicted)  # a prediction with every class in it
    assert {k: record["metrics"][k] for k in expected} == pytest.approx(expected, abs=1e-3)  # a pixel is 1.3e-4 of a split
    assert record["protocol"] == "sliding_window" and record["eval"]["window"] == 64 and record["n_images"] == 2
    assert record["eval"]["out_size"] == 96  # not given: window 64 + stride 32 (64 * (1 - 0.5))
    assert record["variant"] == "sam_mi" and record["points"] == "tspp" and record["sam_embeddings_cached"] is False
    assert record["sam_prompts_per_image"] > 0 and record["seconds_per_image"] > 0 and record["precision"] == "fp32"
    assert set(record["per_class_iou"]) == {"red", "blue", "green"} and record["dataset"] == "semseg" and record["split"] == "wide"
    assert "checkpoint_sha256" in record and "eval.py" in record["command"]


def test_eval_script_refuses_uncovered_windows_before_the_model_loads(tiny_checkpoint, tmp_path):
    """eval.out_size=600 with windows of 64 at overlap 0.333 (stride int(64 * 0.667) = 42): 600 - 64 = 536 is no
    multiple of 42. The checkpoint here has no weights file and the dataset no folder: the geometry is named first."""
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_bytes((tiny_checkpoint / "config.json").read_bytes())
    done = run_script("eval.py", f"checkpoint={config_only}", f"ovss_dataset.root={tmp_path / 'absent'}", "eval.out_size=600")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: eval.out_size=600: windows of 64 with stride 42 do not cover it; give window + a multiple of the stride, e.g. 610"
    ]


def test_out_size_defaults_to_window_plus_stride():
    """CAT-Seg's 640 for a 384 model at overlap 0.333 (stride int(384 * 0.667) = 256); 336 + 224 = 560 for ViT-L/14 at
    336; a given out_size is kept; with the sliding window off an out_size is still filled in, never checked."""
    assert settled_eval_section(OVSSEvalSection(), 384).out_size == 640
    settled = settled_eval_section(OVSSEvalSection(), 336)
    assert (settled.window, settled.out_size) == (336, 560)
    assert settled_eval_section(OVSSEvalSection(out_size=896), 384).out_size == 896  # 384 + 2 * 256
    assert settled_eval_section(OVSSEvalSection(sliding_window=False, out_size=7), 64).out_size == 7
    with pytest.raises(ConfigError, match=r"eval.out_size=700: windows of 384 with stride 256 do not cover it"):
        settled_eval_section(OVSSEvalSection(out_size=700), 384)


def test_cached_sam_embeddings_score_as_sam_computed_live(bands, tiny_checkpoint, tmp_path):
    """scripts/eval.py with cache_dir (whole square images) gives the metrics of SAM run on every image."""
    out = tmp_path / "cached.json"
    common = [f"checkpoint={tiny_checkpoint}", "ovss_dataset=semseg", f"ovss_dataset.root={bands}", "ovss_dataset.split=train",
              "ovss_dataset.image_dir=images/train", "ovss_dataset.label_dir=labels/train", "ovss_dataset.image_ext=.png",
              "ovss_dataset.classes=classes.json", "eval.sliding_window=false", "workers=0", "precision=fp32", "threads=1"]
    done = run_script("eval.py", *common, f"cache_dir={tmp_path / 'cache'}", f"metrics_out={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert any((tmp_path / "cache").rglob("*")), "nothing was cached"
    cached = json.loads(out.read_text())
    assert cached["sam_embeddings_cached"] is True and cached["protocol"] == "whole_image"
    loaded = load_ovss_model(tiny_checkpoint)
    dataset = load_ovss_dataset({
        "name": "semseg", "root": str(bands), "split": "train", "image_dir": "images/train", "label_dir": "labels/train",
        "image_ext": ".png", "label_ext": ".png", "classes": "classes.json", "ignore_value": 255,
    })
    live = evaluate_ovss(loaded.model, dataset, OVSSEvalSection(sliding_window=False, window=64), torch.device("cpu"),
                         Precision("fp32", "test"), workers=0, progress=False)
    assert cached["metrics"] == pytest.approx(live.metrics, abs=1e-6)
    assert cached["sam_prompts_per_image"] == pytest.approx(live.sam_prompts_per_image)


def test_cached_sam_embeddings_are_the_models_own_for_any_image_size(tiny_checkpoint, tmp_path):
    """An 80x96 image (not square: the model's 64 x 64 input squashes it) and a 48x48 one (square, not the input's
    side): scripts/eval.py with cache_dir caches SAM's embedding of the model's own input, so the entries equal
    ``proposer.embed`` of the image resized to 64 x 64, the model's output with them equals its output computing
    SAM itself, and the script's metrics equal those of an evaluation without the cache."""
    from ssp_sam.engine.caching import ensure_cache
    from ssp_sam.ovss.resize import resize_image

    for split, side in (("wide", (80, 96)), ("small", (48, 48))):
        write_bands(tmp_path / split, "x", 1, seed=len(split), height=side[0], width=side[1])
    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
        for index, split in enumerate(("wide", "small")):
            (tmp_path / split / folder / "x" / "000.png").rename(tmp_path / folder / f"{index}.png")
    (tmp_path / "classes.json").write_text(json.dumps(["red", "blue", "green"]))
    out = tmp_path / "cached.json"
    done = run_script(
        "eval.py", f"checkpoint={tiny_checkpoint}", "ovss_dataset=semseg", f"ovss_dataset.root={tmp_path}", "ovss_dataset.split=odd",
        "ovss_dataset.image_dir=images", "ovss_dataset.label_dir=labels", "ovss_dataset.image_ext=.png",
        "ovss_dataset.classes=classes.json", "eval.sliding_window=false", "workers=0", "precision=fp32", "threads=1",
        f"cache_dir={tmp_path / 'cache'}", f"metrics_out={out}",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    cached = json.loads(out.read_text())
    assert cached["sam_embeddings_cached"] is True
    model = load_ovss_model(tiny_checkpoint).model
    dataset = load_ovss_dataset({
        "name": "semseg", "root": str(tmp_path), "split": "odd", "image_dir": "images", "label_dir": "labels",
        "image_ext": ".png", "label_ext": ".png", "classes": "classes.json", "ignore_value": 255,
    })
    paths = [sample.image_path for sample in dataset.samples]
    proposer = model.proposer
    cache = ensure_cache(tmp_path / "cache", paths, [tmp_path], proposer.image_encoder, "custom", None, proposer.sam_size,
                         torch.device("cpu"), dtype="fp32", progress=False, model_input_size=model.image_size)
    assert cache.last_build.computed == 0  # the script's entries, found under the model's input size
    with torch.no_grad():
        inputs = torch.stack([resize_image(dataset[index]["image"], (64, 64)) for index in range(2)])
        entries = torch.stack([cache.get(path) for path in paths])
        assert torch.allclose(entries, proposer.embed(inputs), atol=1e-5)
        text = model.encode_classes(["red", "blue", "green"])
        assert torch.allclose(model.predict(inputs, text, entries), model.predict(inputs, text), atol=1e-5)
    live = evaluate_ovss(model, dataset, OVSSEvalSection(sliding_window=False), torch.device("cpu"),
                         Precision("fp32", "test"), workers=0, progress=False)
    assert cached["metrics"] == pytest.approx(live.metrics, abs=1e-6)


def test_eval_script_takes_stored_model_overrides_as_written(bands, tiny_checkpoint, tmp_path):
    """The README's baseline rows: ``ovss_model.points=grid`` on a SAM-MI checkpoint (no ``+``: the stored config's
    keys are not in eval_ovss.yaml) runs the dense grid; grid_side=3 prompts SAM at 9 points per image."""
    out = tmp_path / "grid.json"
    done = run_script(
        "eval.py", f"checkpoint={tiny_checkpoint}", "ovss_dataset=semseg", f"ovss_dataset.root={bands}", "ovss_dataset.split=train",
        "ovss_dataset.image_dir=images/train", "ovss_dataset.label_dir=labels/train", "ovss_dataset.image_ext=.png",
        "ovss_dataset.classes=classes.json", "eval.sliding_window=false", "workers=0", "precision=fp32", "threads=1",
        "ovss_model.points=grid", "ovss_model.proposals.grid_side=3", f"metrics_out={out}",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["points"] == "grid" and record["sam_prompts_per_image"] == 9
    assert 0 < record["sam_masks_per_image"] <= 3 * 9  # the tiny config keeps every mask but box NMS may merge some
    bad = run_script("eval.py", f"checkpoint={tiny_checkpoint}", f"ovss_dataset.root={bands}", "ovss_model.points=dense")
    assert bad.returncode == 2 and "ovss_model.points: must be one of tspp, grid" in bad.stderr


def test_checkpoints_leave_out_encoders_their_weight_files_hold(tmp_path):
    """CLIP (open_clip state dict) and SAM (Meta's flat .pth) written to disk: the checkpoint stores only what trains
    (and CLIP's trained q/v), and loading fills the rest from the files; a moved file is named."""
    from fixtures_weights import with_ovss_encoder_files
    from ssp_sam.ovss.build import build_ovss_model

    cfg = ovss_train_config_from(tiny_run(Path("/unused"), tmp_path / "run")).ovss_model
    model = build_ovss_model(with_ovss_encoder_files(cfg, tmp_path, seed=2))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01)  # "trained": differs from any fresh build
    save_ovss_checkpoint(model, tmp_path / "ckpt", ["red", "blue", "green"])
    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    clip_file = torch.load(tmp_path / "clip.pt", weights_only=True)
    assert not any(key.startswith("proposer.") for key in stored)  # SAM: all from its file
    stored_clip = {key[len("catseg.clip.clip."):] for key in stored if key.startswith("catseg.clip.clip.")}
    assert stored_clip and all(key.endswith(("q_proj_weight", "v_proj_weight", "positional_embedding")) for key in stored_clip)
    assert "visual.transformer.resblocks.2.attn.q_proj_weight" not in stored_clip  # frozen: it never trains
    loaded = load_ovss_model(tmp_path / "ckpt").model
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in loaded.state_dict().items())
    k = loaded.catseg.clip.clip.visual.transformer.resblocks[0].attn.k_proj_weight
    assert torch.equal(k, clip_file["visual.transformer.resblocks.0.attn.in_proj_weight"].chunk(3)[1])  # from the file
    (tmp_path / "sam.pth").rename(tmp_path / "moved.pth")
    with pytest.raises(CheckpointError, match=r"sam.pth: SAM checkpoint not found"):
        load_ovss_model(tmp_path / "ckpt")


def test_a_catseg_checkpoint_neither_needs_nor_records_the_sam_file_its_config_names(tmp_path):
    """CAT-Seg builds no SAM: a SAM file named by the shared config (here absent, as before the SAM's pretraining
    finished) is not fingerprinted, so saving and loading work and the record holds the CLIP file alone."""
    from fixtures_weights import with_ovss_encoder_files
    from ssp_sam.ovss.build import build_ovss_model

    cfg = with_ovss_encoder_files(ovss_train_config_from(tiny_run(Path("/unused"), tmp_path / "run")).ovss_model, tmp_path, seed=4)
    (tmp_path / "sam.pth").unlink()
    model = build_ovss_model(replace(cfg, variant="catseg"))
    save_ovss_checkpoint(model, tmp_path / "ckpt", ["red", "blue"])
    record = json.loads((tmp_path / "ckpt" / "config.json").read_text())["weight_files"]
    assert set(record) == {"ovss_model.clip.checkpoint"}
    loaded = load_ovss_model(tmp_path / "ckpt").model
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in loaded.state_dict().items())


def test_sam_mi_started_from_a_catseg_checkpoint_predicts_as_that_catseg(bands, tmp_path):
    """init_checkpoint= a CAT-Seg run for a SAM-MI run: CAT-Seg's weights taken over, the decoder's mask channels
    and DMI's output maps at zero, so before any step the SAM-MI's logits are the CAT-Seg's."""
    from ssp_sam.backbones.clip import build_clip_model
    from ssp_sam.backbones.sam import build_sam
    from ssp_sam.ovss.build import build_ovss_model

    cfg = ovss_train_config_from(tiny_run(bands, tmp_path / "run")).ovss_model
    torch.manual_seed(3)
    torch.save(build_clip_model(cfg.clip.arch, None, cfg.clip.custom).state_dict(), tmp_path / "clip.pt")
    torch.save(build_sam(cfg.sam.variant, None, cfg.sam.custom).state_dict(), tmp_path / "sam.pth")
    files = [f"ovss_model.clip.checkpoint={tmp_path / 'clip.pt'}", f"ovss_model.sam.checkpoint={tmp_path / 'sam.pth'}",
             "ovss_model.random_encoders=false"]
    base_cfg = ovss_train_config_from(tiny_run(bands, tmp_path / "base", *files, "ovss_model.variant=catseg")).ovss_model
    catseg = build_ovss_model(base_cfg).eval()
    with torch.no_grad():
        for parameter in catseg.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)  # "trained": far from a fresh build
    save_ovss_checkpoint(catseg, tmp_path / "catseg", ["red", "blue", "green"])

    trainer = OVSSTrainer(tiny_run(bands, tmp_path / "run", *files, f"init_checkpoint={tmp_path / 'catseg'}"))
    sam_mi = trainer.model.eval()
    assert sam_mi.config.variant == "sam_mi" and sam_mi.low_frequency is not None and sam_mi.tspp is not None
    for block, base_block in zip(sam_mi.catseg.decoder.blocks, catseg.catseg.decoder.blocks):
        widened, base = block.conv[0].weight, base_block.conv[0].weight
        assert widened.shape[1] == base.shape[1] + block.extra_channels
        assert torch.equal(widened[:, : base.shape[1]], base) and not widened[:, base.shape[1] :].any()
    assert all(not layer.out.weight.any() and not layer.out.bias.any() for layer in sam_mi.low_frequency)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 255
    with torch.no_grad():
        text = catseg.encode_classes(["red", "blue", "green"])
        expected = catseg(images, text).logits
        output = sam_mi(images, text)
    assert output.proposals is not None and output.proposals.valid.any()  # SAM's masks were injected, at zero weight
    torch.testing.assert_close(output.logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+train.bogus=1"], "train.bogus: not an OVSS training option"),
        (["train.iterations=0"], "train.iterations=0: must be an integer >= 1"),
        (["train.crop=center"], "train.crop: unknown value 'center'; expected one of random, none"),
        (["val.metric=IoU"], "val.metric: unknown value 'IoU'"),
        (["ovss_model.variant=sam"], "ovss_model.variant: must be one of catseg, catseg_sam_vote, sam_mi"),
        (["eval.sliding_window=true", "eval.window=32"], r"eval.window=32: the windows are the model's input \(ovss_model.image_size=64\)"),
    ],
)
def test_bad_options_name_their_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        ovss_train_config_from(tiny_run(tmp_path, tmp_path / "run", *overrides))


def test_scripts_refuse_a_bad_key_in_one_line(tmp_path):
    done = run_script("train.py", "experiment=ovss_tiny", f"ovss_dataset.root={tmp_path}", "train.lr=-1")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: train.lr=-1: must be a number >= 0"]
