"""A training run killed while saving, or in its first epoch: the next start recovers and logs each step once."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ssp_sam.data.shapeworld import generate_dataset
from ssp_sam.engine.trainer import Trainer
from ssp_sam.errors import ConfigError

from test_trainer import compose_train, read_log, train_overrides


@pytest.fixture(scope="module")
def shapeworld_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapeworld")
    generate_dataset(root, "res", {"train": 8}, seed=11, progress=False)
    return root


def run_killed_between_the_renames(save, checkpoint: Path) -> None:
    """Run ``save()`` in a forked child that dies (no cleanup, like kill -9) after ``checkpoint`` was
    moved aside and before the new version is renamed onto it."""
    pid = os.fork()
    if pid == 0:
        try:
            real_replace = os.replace

            def replace(source, target):
                if Path(target) == checkpoint and Path(source).suffix == ".new":
                    os._exit(9)
                real_replace(source, target)

            os.replace = replace
            save()
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9, "the save was not interrupted"


def test_resume_after_a_kill_between_the_renames_of_last(shapeworld_root, tmp_path):
    cache = tmp_path / "cache"
    reference = Trainer(compose_train(train_overrides(shapeworld_root, tmp_path / "ref", cache))).fit()
    run = tmp_path / "run"
    overrides = train_overrides(shapeworld_root, run, cache)
    first = Trainer(compose_train(overrides))
    first.train_one_epoch(0)
    first._save("last", 0, {})
    first.train_one_epoch(1)
    run_killed_between_the_renames(lambda: first._save("last", 1, {}), run / "last")
    assert not (run / "last").exists()  # what the kill left: the old and the new version under side names

    resumed = Trainer(compose_train([*overrides, "resume=true"]))
    assert resumed.start_epoch == 2  # the complete epoch-1 save was put in place, not rolled back
    assert sorted(p.name for p in run.iterdir()) == ["last", "train_log.jsonl"]
    resumed.fit()
    log = read_log(run)
    assert [r["step"] for r in log] == list(range(9))  # each step once
    assert [r["train/loss"] for r in log] == reference.losses
    a, b = load_file(str(tmp_path / "ref" / "last" / "model.safetensors")), load_file(str(run / "last" / "model.safetensors"))
    assert all(a[k].equal(b[k]) for k in a)


def test_rerun_after_a_crash_in_the_first_epoch_starts_a_fresh_log(shapeworld_root, tmp_path):
    overrides = train_overrides(shapeworld_root, tmp_path / "run", tmp_path / "cache", "train.epochs=1")
    Trainer(compose_train(overrides)).train_one_epoch(0)  # then the process dies: a log, no checkpoint
    assert len(read_log(tmp_path / "run")) == 3
    Trainer(compose_train(overrides)).fit()
    assert [r["step"] for r in read_log(tmp_path / "run")] == [0, 1, 2]


def test_resume_refuses_settings_that_change_what_the_run_trains(shapeworld_root, tmp_path, capsys):
    """A resume with another recipe would mix two runs in one: refused, naming each key and both values.
    How and where the run goes (time limit, log interval, cache sizes, paths) may change."""
    run = tmp_path / "run"
    overrides = train_overrides(shapeworld_root, run, tmp_path / "cache")
    first = Trainer(compose_train(overrides))
    first.train_one_epoch(0)
    first._save("last", 0, {})

    with pytest.raises(ConfigError) as refused:
        Trainer(compose_train([*overrides, "resume=true", "train.lr=1e-3", "train.expression_weights={A: 2.0}"]))
    message = str(refused.value)
    assert str(run / "last") in message
    assert "train.lr: 0.002 -> 0.001" in message and "train.expression_weights: None -> {'A': 2.0}" in message
    with pytest.raises(ConfigError, match=r"model.prompt_generator.num_prompt_tokens: 4 -> 6"):
        Trainer(compose_train([*overrides, "resume=true", "model.prompt_generator.num_prompt_tokens=6"]))

    moved = tmp_path / "moved_data"
    shutil.copytree(shapeworld_root, moved)
    free = ["train.max_minutes=30", "train.log_every=2", "train.text_cache_gb=0.5", f"dataset.root={moved}", f"cache_dir={tmp_path / 'cache2'}"]
    resumed = Trainer(compose_train([*overrides, "resume=true", *free]))
    assert resumed.start_epoch == 1
    assert f"note: resuming with dataset.root={moved} (the run had {shapeworld_root})" in capsys.readouterr().err


def test_resume_ignores_settings_newer_than_the_run(shapeworld_root, tmp_path):
    """A key the stored run does not have came with a newer version (and defaults to the old behaviour)."""
    run = tmp_path / "run"
    overrides = train_overrides(shapeworld_root, run, tmp_path / "cache")
    first = Trainer(compose_train(overrides))
    first.train_one_epoch(0)
    first._save("last", 0, {})
    config_path = run / "last" / "config.json"
    stored = json.loads(config_path.read_text())
    del stored["run"]["train"]["referent_weights"], stored["run"]["model"]["prompt_generator"]["positions_in_values"]
    config_path.write_text(json.dumps(stored))
    assert Trainer(compose_train([*overrides, "resume=true"])).start_epoch == 1


def test_resume_compares_a_key_newer_than_the_run_with_what_the_run_did_without_it(shapeworld_root, tmp_path):
    """VAD's text-attention dropout came in at 0.1 where runs before it had none, and the per-epoch schedule
    replaced the smooth one: a run stored without those keys resumes only with its own behaviour."""
    run = tmp_path / "run"
    overrides = train_overrides(
        shapeworld_root, run, tmp_path / "cache", "model.adapters.text_attention_dropout=0.1", "train.schedule=per_epoch",
    )
    first = Trainer(compose_train(overrides))
    first.train_one_epoch(0)
    first._save("last", 0, {})
    config_path = run / "last" / "config.json"
    stored = json.loads(config_path.read_text())
    del stored["run"]["model"]["adapters"]["text_attention_dropout"], stored["run"]["train"]["schedule"]
    config_path.write_text(json.dumps(stored))
    with pytest.raises(ConfigError, match=r"train.schedule: 'per_iteration' -> 'per_epoch'; model.adapters.text_attention_dropout: 0.0 -> 0.1"):
        Trainer(compose_train([*overrides, "resume=true"]))
    own = train_overrides(
        shapeworld_root, run, tmp_path / "cache", "model.adapters.text_attention_dropout=0.0", "train.schedule=per_iteration",
    )
    assert Trainer(compose_train([*own, "resume=true"])).start_epoch == 1


def test_resume_reads_the_mask_target_of_a_run_from_before_the_model_kept_it(shapeworld_root, tmp_path):
    """Runs written before model.mask_target named it train.mask_target: resuming compares against that."""
    run = tmp_path / "run"
    overrides = train_overrides(shapeworld_root, run, tmp_path / "cache", "model.mask_target=nearest")
    first = Trainer(compose_train(overrides))
    first.train_one_epoch(0)
    first._save("last", 0, {})
    config_path = run / "last" / "config.json"
    stored = json.loads(config_path.read_text())
    del stored["run"]["model"]["mask_target"], stored["model"]["mask_target"]
    stored["run"]["train"]["mask_target"] = "nearest"
    config_path.write_text(json.dumps(stored))
    assert Trainer(compose_train([*overrides, "resume=true"])).start_epoch == 1
    with pytest.raises(ConfigError, match=r"model.mask_target: 'nearest' -> 'area'"):
        Trainer(compose_train([*train_overrides(shapeworld_root, run, tmp_path / "cache", "model.mask_target=area"), "resume=true"]))
