"""Dataset readers on tiny fixtures written in the exact official layouts (tests/fixtures_official.py).

Expected masks are drawn by hand (rectangles) in the fixture module, or, for the one triangle,
rasterised with pycocotools directly; expected counts and boxes are read off the fixture tables.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from hydra import compose, initialize_config_dir

import fixtures_official as fx
from ssp_sam.data.grefcoco import read_grefcoco
from ssp_sam.data.jsonl import read_jsonl, read_jsonl_file
from ssp_sam.data.phrasecut import read_phrasecut
from ssp_sam.data.refer import read_refer
from ssp_sam.data.registry import load_dataset, read_splits
from ssp_sam.errors import ConfigError, DatasetError

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
# pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _refer(root: Path, folder: str = "refcoco", split_by: str = "unc", **kwargs):
    return read_refer(root / folder, split_by=split_by, image_root=root / fx.COCO_IMAGE_DIR, name=folder, **kwargs)


def _dataset_cfg(config_name: str, root: Path, **overrides) -> dict:
    """configs/dataset/<config_name>.yaml composed by Hydra with dataset.root=<root>, resolved."""
    args = [f"dataset={config_name}", f"dataset.root={root}"] + [f"dataset.{k}={v}" for k, v in overrides.items()]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="check_data", overrides=args)
    return cfg.dataset


@pytest.fixture()
def coco_root(tmp_path: Path) -> Path:
    fx.write_refer(tmp_path, "refcoco", "unc")
    return tmp_path


# ---- REFER layout (RefCOCO family, refclef) ---------------------------------------------------------


def test_refer_splits_samples_and_sentences(coco_root):
    datasets = _refer(coco_root)
    counts = {split: (len(d), d.num_sentences(), len(d.per_sentence())) for split, d in datasets.items()}
    assert counts == {"train": (2, 3, 3), "val": (2, 5, 5), "testA": (1, 1, 1), "testB": (1, 2, 2)}
    val = datasets["val"]
    assert (val.name, val.split, val.task) == ("refcoco", "val", "res")
    assert [(s.sample_id, i) for s, i in val.per_sentence()] == [("2", 0), ("2", 1), ("2", 2), ("3", 0), ("3", 1)]
    assert val.image_ids() == [102]
    assert val.image_paths() == [coco_root / fx.COCO_IMAGE_DIR / "COCO_train2014_000000000102.jpg"]


def test_refer_masks_match_hand_drawn(coco_root):
    samples = {s.sample_id: s for d in _refer(coco_root).values() for s in d}
    assert np.array_equal(samples["0"].mask(), fx.ANN_MASKS[1001])  # rectangle polygon
    assert np.array_equal(samples["1"].mask(), fx.ANN_MASKS[1002])  # two polygons -> union
    assert np.array_equal(samples["2"].mask(), fx.ANN_MASKS[2001])  # crowd, uncompressed RLE
    assert np.array_equal(samples["3"].mask(), fx.ANN_MASKS[2002])  # compressed RLE
    assert np.array_equal(samples["5"].mask(), fx.ANN_MASKS[4001])
    triangle = mask_utils.decode(mask_utils.frPyObjects([fx.TRIANGLE], fx.HEIGHT, fx.WIDTH))[:, :, 0].astype(bool)
    assert triangle.any() and np.array_equal(samples["4"].mask(), triangle)
    for sample in samples.values():
        mask = sample.mask()
        assert mask.dtype == bool and mask.shape == (fx.HEIGHT, fx.WIDTH) == sample.image_size


def test_refer_boxes_ids_meta_and_sentences(coco_root):
    train = _refer(coco_root)["train"]
    first, second = train[0], train[1]
    assert first.boxes_xyxy == ((2.0, 3.0, 8.0, 7.0),)  # bbox [2, 3, 6, 4]
    assert second.boxes_xyxy == ((10.0, 1.0, 14.0, 10.0),)  # bbox [10, 1, 4, 9]
    assert first.ann_ids == (1001,) and not first.no_target
    assert first.expressions == ("the box on the left", "left box")  # "sent", not "raw"
    assert second.expressions == ("Both RED boxes",)  # empty "sent" falls back to "raw"
    assert first.sentence_ids == (0, 1) and second.sentence_ids == (2,)
    assert first.meta["source"] == "fixture"  # unknown ref key passed through
    assert first.meta["dataset"] == "refcoco" and first.meta["ref_id"] == 0 and first.meta["category_ids"] == (1,)
    assert first.sentence_meta(0) == {"kind": "A"} and second.sentence_meta(0) == {}
    assert first.union_box_xyxy() == (2.0, 3.0, 8.0, 7.0)


def test_refcocog_split_by_chooses_the_refs_file(tmp_path):
    fx.write_refer(tmp_path, "refcocog", "umd")
    fx.write_refer(tmp_path, "refcocog", "google")
    umd = _refer(tmp_path, "refcocog", "umd")
    google = _refer(tmp_path, "refcocog", "google")
    assert {s: len(d) for s, d in umd.items()} == {"train": 2, "val": 2, "test": 2}
    assert {s: len(d) for s, d in google.items()} == {"train": 3, "val": 3}


def test_refclef_image_paths_follow_instances_file_names(tmp_path):
    fx.write_refer(tmp_path, "refclef", "berkeley", image_dir="images/saiapr_tc-12")
    cfg = _dataset_cfg("refclef_berkeley", tmp_path, split="test")
    dataset = load_dataset(cfg)
    assert len(dataset) == 3
    assert dataset[0].image_path == tmp_path / "images" / "saiapr_tc-12" / "COCO_train2014_000000000102.jpg"
    assert dataset[0].image_path.is_file()


def test_unknown_split_lists_available_splits(coco_root):
    with pytest.raises(DatasetError) as error:
        _refer(coco_root, splits=["test"])
    message = str(error.value)
    assert "'test'" in message and all(split in message for split in ("train", "val", "testA", "testB"))


def test_missing_files_are_named(coco_root):
    with pytest.raises(DatasetError, match=r"refs\(umd\)\.p: file not found; found: refs\(unc\)\.p"):
        _refer(coco_root, split_by="umd")
    (coco_root / "refcoco" / "instances.json").unlink()
    with pytest.raises(DatasetError, match=r"instances\.json: file not found"):
        _refer(coco_root)


def test_refs_pickle_with_objects_is_refused(coco_root, tmp_path):
    refs_path = coco_root / "refcoco" / "refs(unc).p"
    refs_path.write_bytes(pickle.dumps([OrderedDict(ref_id=0)], protocol=2))
    with pytest.raises(DatasetError, match="collections.OrderedDict"):
        _refer(coco_root)

    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    refs_path.write_bytes(pickle.dumps([Exploit()]))
    with pytest.raises(DatasetError, match="refusing to load global"):
        _refer(coco_root)
    assert not marker.exists()


def test_malformed_refs_are_all_reported(coco_root):
    refs = fx.refer_refs("unc")
    refs[2]["ann_id"] = 999999
    refs[3]["sentences"] = []
    (coco_root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(DatasetError) as error:
        _refer(coco_root)
    message = str(error.value)
    assert "refs(unc).p: 2 problems" in message
    assert "ref 2: ann_id 999999 not in instances.json" in message and "ref 3: empty sentence list" in message


# ---- gRefCOCO layout -----------------------------------------------------------------------------


def test_grefcoco_multi_and_no_target(tmp_path):
    fx.write_grefcoco(tmp_path)
    datasets = read_grefcoco(tmp_path / "grefcoco", image_root=tmp_path / fx.COCO_IMAGE_DIR, name="grefcoco")
    assert {s: (len(d), d.num_sentences()) for s, d in datasets.items()} == {
        "train": (1, 2), "val": (2, 3), "testA": (1, 1), "testB": (1, 1)
    }
    assert all(d.task == "gres" for d in datasets.values())
    multi = datasets["train"][0]
    assert multi.ann_ids == (1001, 1002)
    assert np.array_equal(multi.mask(), fx.ANN_MASKS[1001] | fx.ANN_MASKS[1002])
    assert multi.boxes_xyxy == ((2.0, 3.0, 8.0, 7.0), (10.0, 1.0, 14.0, 10.0))
    assert multi.union_box_xyxy() == (2.0, 1.0, 14.0, 10.0)
    assert multi.meta["category_ids"] == (1, 2) and multi.sentence_meta(1) == {"kind": "M"}

    empty = datasets["val"][1]
    assert empty.no_target and empty.ann_ids == () and empty.boxes_xyxy == () and empty.meta["category_ids"] == ()
    assert empty.has_mask and not empty.mask().any() and empty.mask().shape == (fx.HEIGHT, fx.WIDTH)
    assert empty.union_box_xyxy() == (0.0, 0.0, 0.0, 0.0)

    triangle = mask_utils.decode(mask_utils.frPyObjects([fx.TRIANGLE], fx.HEIGHT, fx.WIDTH))[:, :, 0].astype(bool)
    assert np.array_equal(datasets["testA"][0].mask(), triangle | fx.ANN_MASKS[3002])


def test_grefcoco_inconsistent_no_target_flag(tmp_path):
    folder = fx.write_grefcoco(tmp_path)
    refs = fx.grefcoco_refs()
    refs[0]["no_target"] = True
    (folder / "grefs(unc).json").write_text(json.dumps(refs))
    with pytest.raises(DatasetError, match=r"ref 0: no_target is True but ann_id is \[1001, 1002\]"):
        read_grefcoco(folder, image_root=tmp_path / fx.COCO_IMAGE_DIR, name="grefcoco")


def test_shapeworld_configs_read_generator_layouts(tmp_path):
    fx.write_refer(tmp_path, "shapeworld", "unc", image_dir="images")
    fx.write_grefcoco(tmp_path, "shapeworld_gres", image_dir="images")
    res = load_dataset(_dataset_cfg("shapeworld", tmp_path, split="train"))
    gres = load_dataset(_dataset_cfg("shapeworld_gres", tmp_path))
    assert (res.name, res.task, len(res)) == ("shapeworld", "res", 2)
    assert res[0].image_path == tmp_path / "images" / "COCO_train2014_000000000101.jpg"
    assert (gres.name, gres.task, gres.split, len(gres)) == ("shapeworld_gres", "gres", "val", 2)
    assert [s.sentence_meta(0)["kind"] for s in gres] == ["A", "N"]


# ---- PhraseCut -----------------------------------------------------------------------------------


@pytest.mark.parametrize("with_image_data", [False, True])
def test_phrasecut_tasks_masks_and_sizes(tmp_path, with_image_data):
    folder = fx.write_phrasecut(tmp_path, with_image_data=with_image_data)
    datasets = read_phrasecut(folder, image_root=folder / "images")
    assert {s: len(d) for s, d in datasets.items()} == {"test": 3, "val": 1}
    samples = {s.sample_id: s for d in datasets.values() for s in d}
    for task_id, expected in fx.PHRASECUT_MASKS.items():
        assert np.array_equal(samples[task_id].mask(), expected), task_id
    car = samples["7__1"]
    assert car.expressions == ("red car",) and car.meta["task_id"] == "7__1"
    assert car.image_path == folder / "images" / "7.jpg" and car.image_size == fx.PHRASECUT_SIZES[7]
    assert (car.size_hint is not None) == with_image_data
    assert car.boxes_xyxy == ((2.0, 3.0, 9.0, 8.0),) and car.ann_ids == (70,)
    assert car.meta["phrase_structure"]["attributes"] == ["red"]
    assert samples["7__2"].boxes_xyxy == ((0.0, 0.0, 4.0, 3.0), (9.0, 5.0, 13.0, 9.0))


def test_phrasecut_config_defaults_to_test(tmp_path):
    fx.write_phrasecut(tmp_path)
    dataset = load_dataset(_dataset_cfg("phrasecut", tmp_path))
    assert (dataset.split, dataset.task, len(dataset)) == ("test", "phrasecut", 3)


# ---- JSONL ---------------------------------------------------------------------------------------


def test_jsonl_every_target_kind(tmp_path):
    fixture = fx.write_jsonl(tmp_path / "mine")
    datasets = read_jsonl(fixture.folder, name="mine")
    assert {s: len(d) for s, d in datasets.items()} == {"train": 2, "val": 6}
    samples = {s.sample_id: s for s in datasets["val"]}
    for sample_id, expected in fixture.masks.items():
        assert np.array_equal(samples[sample_id].mask(), expected), sample_id
    assert samples["1"].image_path == fixture.folder / "imgs" / "a.png" and samples["1"].image_size == fx.JSONL_SIZE
    assert samples["rle-c"].meta["kind"] == "A" and samples["rle-c"].size_hint == fx.JSONL_SIZE
    assert samples["4"].boxes_xyxy == ((1.0, 1.0, 5.0, 5.0),)
    assert samples["5"].no_target and samples["5"].union_box_xyxy() == (0.0, 0.0, 0.0, 0.0)
    assert [s.no_target for s in datasets["val"]] == [False, False, False, False, True, False]
    box_only = samples["6"]
    assert not box_only.has_mask and not box_only.no_target and box_only.union_box_xyxy() == (2.0, 2.0, 5.0, 5.0)
    with pytest.raises(DatasetError, match="boxes only"):
        box_only.mask()
    assert samples["1"].union_box_xyxy() == (2.0, 1.0, 6.0, 4.0)  # no boxes given: from the mask


def test_jsonl_malformed_lines_are_all_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        '{"image": "a.png", "expression": "ok"}',
        "{not json",
        '{"image": "a.png", "expression": "two", "mask": "m.png", "polygons": [[0, 0, 1, 0, 1, 1]]}',
        '{"image": "a.png", "expression": "  "}',
    ]
    path.write_text("\n".join(lines))
    with pytest.raises(DatasetError) as error:
        read_jsonl_file(path, name="bad", split="val")
    message = str(error.value)
    assert "3 problems" in message and "line 2" in message and "line 3: give only one of" in message and "line 4" in message


def test_jsonl_config_with_explicit_path(tmp_path):
    fixture = fx.write_jsonl(tmp_path / "mine")
    dataset = load_dataset(_dataset_cfg("jsonl", tmp_path, path=fixture.folder / "train.jsonl", split="train"))
    assert (dataset.name, dataset.split, len(dataset)) == ("jsonl", "train", 2)
    assert load_dataset(_dataset_cfg("jsonl", tmp_path, folder="mine")).split == "val"


# ---- merged REC set and the registry ---------------------------------------------------------------


def test_merged_set_is_the_union_of_training_splits(tmp_path):
    fx.write_refer(tmp_path, "refcoco", "unc")
    fx.write_refer(tmp_path, "refcocog", "google")
    image_root = str(tmp_path / fx.COCO_IMAGE_DIR)
    cfg = {
        "name": "merged", "format": "merged", "root": str(tmp_path), "split": "train", "task": "res",
        "sources": [
            {"name": "refcoco", "format": "refer", "folder": "refcoco", "split_by": "unc", "image_root": image_root},
            {"name": "refcocog_google", "format": "refer", "folder": "refcocog", "split_by": "google", "image_root": image_root},
        ],
    }
    everything = load_dataset({**cfg, "exclude_eval_images": False})
    assert [s.sample_id for s in everything] == ["refcoco/0", "refcoco/1", "refcocog_google/0", "refcocog_google/1", "refcocog_google/2"]
    assert everything[2].meta["dataset"] == "refcocog_google" and everything[2].meta["ref_id"] == 0
    # refcocog_google/2 is on image 102, which refcoco uses for val: dropped by default.
    merged = load_dataset(cfg)
    assert [s.sample_id for s in merged] == ["refcoco/0", "refcoco/1", "refcocog_google/0", "refcocog_google/1"]
    assert (merged.name, merged.split) == ("merged", "train")
    with pytest.raises(DatasetError, match="available splits: train"):
        load_dataset({**cfg, "split": "val"})


def test_merged_rec_config_resolves_sources(tmp_path):
    cfg = _dataset_cfg("merged_rec", tmp_path)
    assert [source.name for source in cfg.sources] == ["refcoco", "refcoco+", "refcocog_umd", "refclef_unc"]
    assert cfg.sources[3].image_root == f"{tmp_path}/images/saiapr_tc-12"
    with pytest.raises(DatasetError, match=r"refcoco/refs\(unc\)\.p: file not found"):
        load_dataset(cfg)


@pytest.mark.parametrize(
    "name", ["refcoco", "refcoco+", "refcocog_umd", "refcocog_google", "refclef_unc", "refclef_berkeley", "grefcoco", "phrasecut",
             "merged_rec", "jsonl", "shapeworld", "shapeworld_gres"],
)
def test_every_dataset_config_composes(tmp_path, name):
    cfg = _dataset_cfg(name, tmp_path)
    keys = {"name", "format", "root", "folder", "image_root", "split", "split_by", "task"}
    assert keys <= set(cfg.keys()) and cfg.root == str(tmp_path)
    assert cfg.split == ("test" if name == "phrasecut" else "train" if name == "merged_rec" else "val")
    if cfg.image_root is not None:
        assert cfg.image_root.startswith(str(tmp_path))


def test_registry_config_errors_name_the_key(coco_root):
    cfg = {"name": "refcoco", "format": "refer", "root": str(coco_root), "folder": "refcoco",
           "image_root": str(coco_root / fx.COCO_IMAGE_DIR), "split": "val", "split_by": "unc", "task": "res"}
    assert len(load_dataset(cfg)) == 2
    assert set(read_splits(cfg)) == {"train", "val", "testA", "testB"}
    with pytest.raises(ConfigError, match="unknown format 'coco' \\(key 'format'\\)"):
        load_dataset({**cfg, "format": "coco"})
    with pytest.raises(ConfigError, match="missing key 'split_by'"):
        load_dataset({k: v for k, v in cfg.items() if k != "split_by"})
    with pytest.raises(ConfigError, match="key 'task'"):
        load_dataset({**cfg, "task": "detection"})


# ---- scripts/check_data.py -----------------------------------------------------------------------


def _check_data(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(PYTHON), str(REPO / "scripts" / "check_data.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_check_data_exit_codes(tmp_path):
    good, broken, work = tmp_path / "good", tmp_path / "broken", tmp_path / "work"
    fx.write_refer(good)
    shutil.copytree(good, broken)
    work.mkdir()
    (broken / fx.COCO_IMAGE_DIR / "COCO_train2014_000000000102.jpg").unlink()
    instances = json.loads((broken / "refcoco" / "instances.json").read_text())
    instances["annotations"][3]["segmentation"] = {"size": [5, 5], "counts": "00"}  # ann 2002, val
    (broken / "refcoco" / "instances.json").write_text(json.dumps(instances))

    result = _check_data(work, "dataset=refcoco", f"dataset.root={good}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "split testA: 1 referents, 1 sentences" in result.stdout and "result: OK" in result.stdout

    result = _check_data(work, "dataset=refcoco", f"dataset.root={broken}")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 of 1 image files missing" in result.stdout and "COCO_train2014_000000000102.jpg" in result.stdout
    assert "1 segmentations cannot be decoded" in result.stdout and "annotation 2002" in result.stdout

    for usage_error in (["dataset=no_such_dataset"], ["dataset=refcoco", f"dataset.root={good}", "dataset.split=testC"]):
        result = _check_data(work, *usage_error)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert "available splits: train, val, testA, testB" in result.stderr
    assert list(work.iterdir()) == []  # no outputs/ or .hydra folders
