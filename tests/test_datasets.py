"""Dataset readers on tiny fixtures written in the exact official layouts (tests/fixtures_official.py).

Expected masks are drawn by hand (rectangles) in the fixture module, or, for the one triangle,
rasterised with pycocotools directly; expected counts and boxes are read off the fixture tables.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from hydra import compose, initialize_config_dir

import fixtures_official as fx
from ssp_sam.data.grefcoco import read_grefcoco
from ssp_sam.data.jsonl import read_jsonl, read_jsonl_file
from ssp_sam.data.masks import CocoSegmentationMask
from ssp_sam.data.phrasecut import read_phrasecut
from ssp_sam.data.rec_json import read_rec_json
from ssp_sam.data.refer import read_refer
from ssp_sam.data.registry import load_dataset, read_splits
from ssp_sam.errors import ConfigError, DatasetError

from conftest import run_script

REPO = Path(__file__).resolve().parents[1]
# pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _refer(root: Path, folder: str = "refcoco", split_by: str = "unc", **kwargs):
    return read_refer(root / folder, split_by=split_by, image_root=root / fx.COCO_IMAGE_DIR, name=folder, **kwargs)


def _compose(config_name: str, args: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return compose(config_name=config_name, overrides=args)


def _dataset_cfg(config_name: str, root: Path, **overrides) -> dict:
    """configs/dataset/<config_name>.yaml composed by Hydra with dataset.root=<root>, resolved."""
    args = [f"dataset={config_name}", f"dataset.root={root}"] + [f"dataset.{k}={v}" for k, v in overrides.items()]
    return _compose("check_data", args).dataset


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
    assert np.array_equal(samples["2"].mask(), fx.ANN_MASKS[2001])  # crowd, uncompressed RLE: the target regardless
    assert samples["2"].ann_ids == (2001,) and "crowd_ann_ids" not in samples["2"].meta
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


def test_refclef_berkeley_test_split_and_rle_list_masks(tmp_path):
    fx.write_refer(tmp_path, "refclef", "berkeley", image_dir="images/saiapr_tc-12", rle_lists=True)
    instances = json.loads((tmp_path / "refclef" / "instances.json").read_text())
    assert all(isinstance(a["segmentation"], list) and isinstance(a["segmentation"][0], dict) for a in instances["annotations"])
    datasets = {split: load_dataset(_dataset_cfg("refclef_berkeley", tmp_path, split=split)) for split in ("train", "val", "test")}
    assert {split: [s.sample_id for s in d] for split, d in datasets.items()} == {"train": ["0"], "val": ["1", "2"], "test": ["3", "4", "5"]}
    test = datasets["test"]
    assert test[0].image_path == tmp_path / "images" / "saiapr_tc-12" / "COCO_train2014_000000000102.jpg"
    assert test[0].image_path.is_file()
    for dataset in datasets.values():
        for sample in dataset:  # every mask a list of one compressed RLE, decoded to the hand-drawn pixels
            assert np.array_equal(sample.mask(), fx.ann_mask(sample.ann_ids[0])), sample.sample_id


def test_segmentation_lists_of_rles_are_unions_and_never_mixed():
    top, corner = fx.rect_mask(0, 0, 16, 2), fx.rect_mask(12, 8, 16, 12)
    parts = [fx.compressed_rle(top), fx.uncompressed_rle(corner)]
    mask = CocoSegmentationMask((("ann 1", parts),)).decode(fx.HEIGHT, fx.WIDTH)
    assert np.array_equal(mask, top | corner) and mask.sum() == 32 + 16
    mixed = [fx.compressed_rle(top), fx.rect_polygon(0, 0, 4, 4)]
    with pytest.raises(DatasetError, match="ann 2: a segmentation list must hold only polygons or only RLE dicts"):
        CocoSegmentationMask((("ann 2", mixed),)).decode(fx.HEIGHT, fx.WIDTH)


def test_referit_experiments_use_the_berkeley_splits():
    for experiment in ("referit_224", "referit_336"):
        cfg = _compose("train", [f"experiment={experiment}"])
        assert (cfg.dataset.name, cfg.dataset.split_by) == ("refclef_berkeley", "berkeley"), experiment


def test_unknown_split_lists_available_splits(coco_root):
    with pytest.raises(DatasetError) as error:
        _refer(coco_root, splits=["testC"])
    message = str(error.value)
    assert "'testC'" in message and all(split in message for split in ("train", "val", "testA", "testB"))


def test_test_splits_are_read_as_refer_reads_them(coco_root):
    """REFER's getRefIds: "testA" takes every test label containing A ("we also consider testAB, testBC, ...")
    and "test" every test label (refclef's unc refs carry such labels); other splits their own label."""
    refs = fx.refer_refs("unc")
    refs[3]["split"], refs[5]["split"] = "testAB", "testBC"  # refs: train 0 1, val 2, testA 4, testAB 3, testBC 5
    (coco_root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    datasets = _refer(coco_root, splits=["testA", "testB", "testC", "test", "val", "testAB"])
    ids = {split: sorted(s.sample_id for s in d) for split, d in datasets.items()}
    assert ids == {"testA": ["3", "4"], "testB": ["3", "5"], "testC": ["5"], "test": ["3", "4", "5"], "val": ["2"], "testAB": ["3"]}
    assert sorted(_refer(coco_root)) == ["testA", "testAB", "testBC", "train", "val"]  # all splits: the labels, each once


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

    crowd = datasets["val"][0]  # anns [2004, 2003]; 2003 is a crowd annotation: not in the target
    assert crowd.ann_ids == (2004,) and crowd.meta["crowd_ann_ids"] == (2003,) and not crowd.no_target
    assert np.array_equal(crowd.mask(), fx.ANN_MASKS[2004]) and not (crowd.mask() & fx.ANN_MASKS[2003]).any()
    assert crowd.boxes_xyxy == ((1.0, 8.0, 5.0, 11.0), (12.0, 0.0, 16.0, 3.0))  # the release's box covers the crowd too
    assert crowd.union_box_xyxy() == (1.0, 0.0, 16.0, 11.0)
    assert multi.meta["crowd_ann_ids"] == ()

    empty = datasets["val"][1]
    assert empty.no_target and empty.ann_ids == () and empty.boxes_xyxy == () and empty.meta["category_ids"] == ()
    assert empty.has_mask and not empty.mask().any() and empty.mask().shape == (fx.HEIGHT, fx.WIDTH)
    assert empty.union_box_xyxy() == (0.0, 0.0, 0.0, 0.0)

    triangle = mask_utils.decode(mask_utils.frPyObjects([fx.TRIANGLE], fx.HEIGHT, fx.WIDTH))[:, :, 0].astype(bool)
    assert np.array_equal(datasets["testA"][0].mask(), triangle | fx.ANN_MASKS[3002])


def test_grefcoco_boxes_without_crowd_and_all_crowd_refs(tmp_path):
    folder = fx.write_grefcoco(tmp_path)
    cfg = {"name": "grefcoco", "format": "grefcoco", "root": str(tmp_path), "folder": "grefcoco", "split_by": "unc",
           "image_root": str(tmp_path / fx.COCO_IMAGE_DIR), "split": "val", "task": "gres", "crowd_in_boxes": False}
    crowd = load_dataset(cfg)[0]
    assert crowd.boxes_xyxy == ((1.0, 8.0, 5.0, 11.0),) and crowd.union_box_xyxy() == (1.0, 8.0, 5.0, 11.0)
    assert np.array_equal(crowd.mask(), fx.ANN_MASKS[2004])

    refs = fx.grefcoco_refs()
    refs[1]["ann_id"] = [2001, 2003]  # both crowd: not a no-target ref (no_target is false), and no target either
    (folder / "grefs(unc).json").write_text(json.dumps(refs))
    with pytest.raises(DatasetError, match=r"grefs\(unc\)\.json: 1 problem: ref 1: every annotation \(2001, 2003\) is a crowd"):
        load_dataset(cfg)


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
    # A file given without split= is named by the file, not by a default that would label test numbers "val".
    assert load_dataset(_dataset_cfg("jsonl", tmp_path, path=fixture.folder / "train.jsonl")).split == "train"


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


def test_merged_rec_refer_config_resolves_sources(tmp_path):
    cfg = _dataset_cfg("merged_rec_refer", tmp_path)
    assert [source.name for source in cfg.sources] == ["refcoco", "refcoco+", "refcocog_umd", "refclef_unc"]
    assert cfg.sources[3].image_root == f"{tmp_path}/images/saiapr_tc-12"
    with pytest.raises(DatasetError, match=r"refcoco/refs\(unc\)\.p: file not found"):
        load_dataset(cfg)
    for folder in ("refcoco", "refcoco+", "refcocog", "refclef"):
        fx.write_refer(tmp_path, folder, {"refcocog": "umd"}.get(folder, "unc"))
    # One sample per sentence; the unc/umd train refs 0 (2 sentences) and 1 (1) sit on image 101,
    # which no eval split uses, so all four sources keep them.
    ids = [s.sample_id for s in load_dataset(cfg)]
    assert ids == [f"{source}/{ref}" for source in ("refcoco", "refcoco+", "refcocog_umd", "refclef_unc") for ref in ("0#0", "0#1", "1#0")]


# ---- SimREC's merge.json (the release's REC pretraining data) -------------------------------------


def _rec_json(root: Path, **kwargs):
    roots = {source: root / folder for source, folder in fx.REC_JSON_IMAGE_DIRS.items()}
    return read_rec_json(root / "anns" / "merge.json", image_roots=roots, name="merge", **kwargs)


def test_rec_json_entries_boxes_and_image_paths(tmp_path):
    fx.write_rec_json(tmp_path)
    datasets = _rec_json(tmp_path)
    assert {split: len(d) for split, d in datasets.items()} == {"train": 4, "val": 1}
    coco, flickr, vg, referit = datasets["train"]
    assert coco.image_path == tmp_path / fx.COCO_IMAGE_DIR / "COCO_train2014_000000000101.jpg"  # iid "101.jpg"
    assert datasets["val"][0].image_path == tmp_path / fx.COCO_IMAGE_DIR / "COCO_train2014_000000000102.jpg"  # iid 102
    assert [s.image_path for s in (flickr, vg, referit)] == [
        tmp_path / "images/flickr/f1.jpg", tmp_path / "images/VG/v1.jpg", tmp_path / "images/referit/r1.jpg"]
    assert all(s.image_path.is_file() for d in datasets.values() for s in d)
    # xywh -> xyxy: [2, 3, 6, 4] -> (2, 3, 8, 7); [0, 1, 5, 4] -> (0, 1, 5, 5)
    assert coco.boxes_xyxy == ((2.0, 3.0, 8.0, 7.0),) and flickr.union_box_xyxy() == (0.0, 1.0, 5.0, 5.0)
    assert coco.expressions == ("left box", fx.WORDS_41, "the box on the left") and coco.sentence_ids == (0, 1, 2)
    assert not coco.has_mask and not coco.no_target and coco.ann_ids == ()
    assert coco.meta["mask_id"] == 5 and coco.meta["data_source"] == "coco" and coco.image_id == "101.jpg"


def test_rec_json_bad_entries_and_box_format(tmp_path):
    fx.write_rec_json(tmp_path)
    assert _rec_json(tmp_path, box_format="xyxy", splits=["val"])["val"][0].boxes_xyxy == ((3.0, 2.0, 8.0, 7.0),)
    data = json.loads(json.dumps(fx.REC_JSON))
    data["train"][0]["bbox"] = [6, 1, 5, 4]  # fine as x, y, w, h; read as x1, y1, x2, y2 it has x2 < x1
    (tmp_path / "anns" / "merge.json").write_text(json.dumps(data))
    assert _rec_json(tmp_path, splits=["train"])["train"][0].boxes_xyxy == ((6.0, 1.0, 11.0, 5.0),)
    with pytest.raises(DatasetError, match=r"train entry 0: box \[6, 1, 5, 4\] is not x1, y1, x2, y2 .*is the file xywh"):
        _rec_json(tmp_path, box_format="xyxy", splits=["train"])
    with pytest.raises(ConfigError, match="box_format must be one of xywh, xyxy"):
        _rec_json(tmp_path, box_format="cxcywh")
    data["train"][1]["data_source"] = "gqa"
    data["train"][3]["refs"] = []
    (tmp_path / "anns" / "merge.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError) as error:
        _rec_json(tmp_path)
    message = str(error.value)
    assert "merge.json: 2 problems" in message and "train entry 1: data_source 'gqa' has no image folder" in message
    assert "image_roots has: coco, flickr, referit, vg" in message and "train entry 3: refs must be" in message


def test_merged_rec_words_are_counted_on_the_sentence_as_written(tmp_path):
    """The release splits the raw sentence at single spaces: a trailing space makes a 40-word sentence 41."""
    fx.write_rec_json(tmp_path)
    data = json.loads((tmp_path / "anns" / "merge.json").read_text())
    sentence_ids = lambda: [s.sample_id for s in load_dataset(_dataset_cfg("merged_rec", tmp_path))]
    assert sentence_ids() == fx.REC_JSON_SENTENCE_SAMPLES
    (entry,) = [entry for entry in data["train"] if fx.WORDS_40 in entry["refs"]]
    entry["refs"][entry["refs"].index(fx.WORDS_40)] = fx.WORDS_40 + " "
    (tmp_path / "anns" / "merge.json").write_text(json.dumps(data))
    assert sentence_ids() == [sample for sample in fx.REC_JSON_SENTENCE_SAMPLES if sample != "3#0"]


def test_merged_rec_config_is_one_sample_per_sentence_of_at_most_40_words(tmp_path):
    fx.write_rec_json(tmp_path)
    cfg = _dataset_cfg("merged_rec", tmp_path)
    assert cfg.image_roots.vg == f"{tmp_path}/images/VG"
    dataset = load_dataset(cfg)
    assert (dataset.name, dataset.split) == ("merged_rec", "train")
    assert [s.sample_id for s in dataset] == fx.REC_JSON_SENTENCE_SAMPLES
    # As the release: each sample draws from all its referent's sentences, the 41-word one included.
    first, third = dataset[0], dataset[1]
    assert first.expressions == third.expressions == ("left box", fx.WORDS_41, "the box on the left")
    assert dataset[3].expressions == (fx.WORDS_40, "sky") and dataset[3].boxes_xyxy == ((4.0, 2.0, 12.0, 10.0),)

    assert [s.sample_id for s in load_dataset(_dataset_cfg("merged_rec", tmp_path, split="val"))] == ["0"]  # per referent

    own = load_dataset(_dataset_cfg("merged_rec", tmp_path, **{"sentence_samples.pool": "own"}))
    assert [s.sample_id for s in own] == fx.REC_JSON_SENTENCE_SAMPLES
    assert [s.expressions for s in own] == [("left box",), ("the box on the left",), ("a dog",), (fx.WORDS_40,), ("sky",)]
    assert [s.sentence_ids for s in own] == [(0,), (2,), (0,), (0,), (1,)]

    unlimited = load_dataset(_dataset_cfg("merged_rec", tmp_path, **{"sentence_samples.max_words": "null"}))
    assert len(unlimited) == 3 + 1 + 2 + 2
    per_referent = load_dataset(_dataset_cfg("merged_rec", tmp_path, sentence_samples="null"))
    assert [s.sample_id for s in per_referent] == ["0", "1", "2", "3"]
    with pytest.raises(ConfigError, match="pool must be one of referent, own"):
        load_dataset(_dataset_cfg("merged_rec", tmp_path, **{"sentence_samples.pool": "token"}))
    with pytest.raises(ConfigError, match="max_words must be a positive integer"):
        load_dataset(_dataset_cfg("merged_rec", tmp_path, **{"sentence_samples.max_words": 0}))
    with pytest.raises(ConfigError, match="'sentence_samples' must be null or a mapping with 'split'"):
        load_dataset(_dataset_cfg("merged_rec", tmp_path, sentence_samples="train"))


@pytest.mark.parametrize(
    "name", ["refcoco", "refcoco+", "refcocog_umd", "refcocog_google", "refclef_unc", "refclef_berkeley", "grefcoco", "phrasecut",
             "merged_rec", "merged_rec_refer", "jsonl", "shapeworld", "shapeworld_gres"],
)
def test_every_dataset_config_composes(tmp_path, name):
    cfg = _dataset_cfg(name, tmp_path)
    keys = {"name", "format", "root", "folder", "image_root", "split", "split_by", "task"}
    assert keys <= set(cfg.keys()) and cfg.root == str(tmp_path)
    # jsonl: null, so that a file given by path is named by the file (load_dataset reads a folder's val).
    assert cfg.split == ("test" if name == "phrasecut" else "train" if name.startswith("merged_rec") else None if name == "jsonl" else "val")
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


def test_check_data_exit_codes(tmp_path):
    good, broken, work = tmp_path / "good", tmp_path / "broken", tmp_path / "work"
    fx.write_refer(good)
    shutil.copytree(good, broken)
    work.mkdir()
    (broken / fx.COCO_IMAGE_DIR / "COCO_train2014_000000000102.jpg").unlink()
    instances = json.loads((broken / "refcoco" / "instances.json").read_text())
    instances["annotations"][3]["segmentation"] = {"size": [5, 5], "counts": "00"}  # ann 2002, val
    (broken / "refcoco" / "instances.json").write_text(json.dumps(instances))

    result = run_script("check_data.py", "dataset=refcoco", f"dataset.root={good}", cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "split testA: 1 referents, 1 sentences" in result.stdout and "result: OK" in result.stdout

    result = run_script("check_data.py", "dataset=refcoco", f"dataset.root={broken}", cwd=work)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 of 1 image files missing" in result.stdout and "COCO_train2014_000000000102.jpg" in result.stdout
    assert "1 segmentations cannot be decoded" in result.stdout and "annotation 2002" in result.stdout

    for usage_error in (["dataset=no_such_dataset"], ["dataset=refcoco", f"dataset.root={good}", "dataset.split=testC"]):
        result = run_script("check_data.py", *usage_error, cwd=work)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert "available splits: train, val, testA, testB" in result.stderr
    assert list(work.iterdir()) == []  # no outputs/ or .hydra folders
