"""The training engine on a tiny model and a small ShapeWorld set in the RefCOCO layout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from ssp_sam.data.shapeworld import generate_dataset
from ssp_sam.engine import trainer as trainer_module
from ssp_sam.engine.trainer import Trainer, TrainingDivergedError
from ssp_sam.errors import ConfigError

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
