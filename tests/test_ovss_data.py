"""OVSS readers (ssp_sam/ovss/data/), their configs, ShapeWorld-OVSS and check_data's OVSS part.

Fixtures are tiny images and label maps written by the tests into the folders the field's prepare
scripts produce (configs/ovss_dataset/*.yaml)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ssp_sam.data.shapeworld import CLASS_NAMES, UNSEEN_CLASSES, generate_ovss_dataset, generate_scene
from ssp_sam.data.shapeworld.ovss import TRAIN_EXCLUDED
from ssp_sam.errors import DatasetError
from ssp_sam.ovss.data import IGNORE_INDEX, load_class_list, load_ovss_dataset, shipped_class_names

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CONFIGS = REPO / "configs" / "ovss_dataset"


def _config(name: str, root: Path, **overrides):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    cfg.root = str(root)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _write_pair(image_path: Path, label_path: Path, labels: np.ndarray, image_size=None) -> None:
    """An RGB image of ``image_size`` (default: the label's) and the label map (uint8 PNG / uint16 TIFF)."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    height, width = image_size or labels.shape
    Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(image_path)
    Image.fromarray(labels).save(label_path)


# ---- class lists ---------------------------------------------------------------------------------


def test_shipped_class_lists():
    sizes = {name: len(shipped_class_names(name)) for name in ("coco_stuff171", "ade150", "ade847", "pc59", "pc459", "voc20", "voc20b")}
    assert sizes == {"coco_stuff171": 171, "ade150": 150, "ade847": 847, "pc59": 59, "pc459": 459, "voc20": 20, "voc20b": 59}
    assert shipped_class_names("coco_stuff171")[:3] == ("person", "bicycle", "car")
    assert shipped_class_names("ade150")[:3] == ("wall", "building", "sky")
    assert shipped_class_names("voc20")[0] == "aeroplane" and shipped_class_names("voc20")[-1] == "tvmonitor"
    # VOC-20b's vocabulary: the 20 VOC classes, then Pascal Context classes standing for background
    voc20b = shipped_class_names("voc20b")
    assert voc20b[:20] == shipped_class_names("voc20") and set(voc20b[20:]) <= set(shipped_class_names("pc59"))


@pytest.mark.parametrize(
    ("name", "ignore", "label_ext"),
    [
        ("coco_stuff_171", 255, ".png"),
        ("ade20k_150", 255, ".png"),
        ("ade20k_847", 65535, ".tif"),
        ("pascal_context_59", 255, ".png"),
        ("pascal_context_459", 459, ".tif"),
        ("voc20", 255, ".png"),
        ("voc20b", 255, ".png"),
    ],
)
def test_configs_state_the_ignore_values_of_metrics_md(name, ignore, label_ext):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    assert (cfg.ignore_value, cfg.label_ext) == (ignore, label_ext)


def test_bad_class_lists_name_the_file_or_key(tmp_path):
    with pytest.raises(DatasetError, match="classes: empty class list"):
        load_class_list([])
    duplicate = tmp_path / "names.json"
    duplicate.write_text(json.dumps(["cat", "dog", "cat"]))
    with pytest.raises(DatasetError, match=r"names\.json: duplicate class name 'cat' \(positions 0 and 2\)"):
        load_class_list(str(duplicate))
    with pytest.raises(DatasetError, match="neither a shipped class list"):
        load_class_list("ade151")
    unseen = tmp_path / "zs.json"
    unseen.write_text(json.dumps({"classes": ["a", "b"], "unseen_classes": ["c"]}))
    with pytest.raises(DatasetError, match="'c' is not in 'classes'"):
        load_class_list(str(unseen))


# ---- official layouts ----------------------------------------------------------------------------


def test_ade20k_150_layout_and_items(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    labels = np.array([[0, 149, 255], [7, 7, 255]], dtype=np.uint8)
    _write_pair(base / "images/validation/ADE_val_00000002.jpg", base / "annotations_detectron2/validation/ADE_val_00000002.png", labels)
    _write_pair(base / "images/validation/ADE_val_00000001.jpg", base / "annotations_detectron2/validation/ADE_val_00000001.png", labels * 0)
    dataset = load_ovss_dataset(_config("ade20k_150", tmp_path))
    assert len(dataset) == 2 and len(dataset.class_names) == 150
    assert [sample.label_path.name for sample in dataset.samples] == ["ADE_val_00000001.png", "ADE_val_00000002.png"]
    item = dataset[1]
    assert item["image"].shape == (3, 2, 3) and item["image"].dtype == torch.uint8
    assert item["label"].tolist() == [[0, 149, IGNORE_INDEX], [7, 7, IGNORE_INDEX]]
    assert dataset.samples[1].ignore_value == 255 and dataset.samples[1].class_names == dataset.class_names


def test_ade20k_847_reads_16_bit_tiff_with_ignore_65535(tmp_path):
    base = tmp_path / "ADE20K_2021_17_01"
    labels = np.array([[846, 65535], [300, 0]], dtype=np.uint16)
    _write_pair(base / "images_detectron2/validation/ADE_frame_1.jpg", base / "annotations_detectron2/validation/ADE_frame_1.tif", labels)
    dataset = load_ovss_dataset(_config("ade20k_847", tmp_path))
    assert dataset[0]["label"].tolist() == [[846, IGNORE_INDEX], [300, 0]]


def test_pascal_context_459_tiff_with_ignore_459(tmp_path):
    base = tmp_path / "VOCdevkit/VOC2010"
    labels = np.array([[458, 459], [0, 255]], dtype=np.uint16)
    _write_pair(base / "JPEGImages/2008_000002.jpg", base / "annotations_detectron2/pc459_val/2008_000002.tif", labels)
    dataset = load_ovss_dataset(_config("pascal_context_459", tmp_path))
    assert dataset[0]["label"].tolist() == [[458, IGNORE_INDEX], [0, 255]]  # 255 is a class of the 459


def test_pascal_labels_decide_the_samples(tmp_path):
    # JPEGImages also holds training images: only the images with a validation label are samples.
    base = tmp_path / "VOCdevkit/VOC2010"
    _write_pair(base / "JPEGImages/2008_000003.jpg", base / "annotations_detectron2/pc59_val/2008_000003.png", np.array([[58, 255]], np.uint8))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(base / "JPEGImages/2008_000001.jpg")
    dataset = load_ovss_dataset(_config("pascal_context_59", tmp_path))
    assert [sample.image_path.name for sample in dataset.samples] == ["2008_000003.jpg"]


def test_coco_stuff_train_layout(tmp_path):
    _write_pair(tmp_path / "coco/train2017/000000000009.jpg", tmp_path / "coco/stuffthingmaps_detectron2/train2017/000000000009.png", np.array([[170, 0]], np.uint8))
    dataset = load_ovss_dataset(_config("coco_stuff_171", tmp_path))
    assert dataset.split == "train2017" and dataset[0]["label"].tolist() == [[170, 0]]


def test_voc20_and_voc20b(tmp_path):
    base = tmp_path / "VOCdevkit/VOC2012"
    _write_pair(base / "JPEGImages/2007_000033.jpg", base / "annotations_detectron2/val/2007_000033.png", np.array([[0, 19, 255]], np.uint8))
    _write_pair(base / "JPEGImages/2007_000033.jpg", base / "annotations_detectron2_bg/val/2007_000033.png", np.array([[0, 19, 20]], np.uint8))
    voc20 = load_ovss_dataset(_config("voc20", tmp_path))
    assert voc20[0]["label"].tolist() == [[0, 19, IGNORE_INDEX]] and len(voc20.label_class_names) == 20
    voc20b = load_ovss_dataset(_config("voc20b", tmp_path))
    assert len(voc20b.class_names) == 59 and len(voc20b.label_class_names) == 21
    assert voc20b.label_class_names[-1] == "background" and voc20b[0]["label"].tolist() == [[0, 19, 20]]
    # scoring: the vocabulary's "bag" (index 20) and "wood" (58) are background; 19 stays 19
    matrix = voc20b.confusion_matrix()
    matrix.update(torch.tensor([[20, 19, 58]]), voc20b[0]["label"])
    assert matrix.counts.shape == (21, 21) and matrix.counts[0, 20] == 1 and matrix.counts[19, 19] == 1 and matrix.counts[20, 20] == 1


def test_generic_format_with_inline_classes(tmp_path):
    _write_pair(tmp_path / "imgs/a.jpg", tmp_path / "labels/a.png", np.array([[0, 2, 255]], np.uint8))
    cfg = _config("semseg", tmp_path, image_dir="imgs", label_dir="labels", classes=["cat", "dog", "grass"])
    dataset = load_ovss_dataset(cfg)
    assert dataset.class_names == ("cat", "dog", "grass") and dataset[0]["label"].tolist() == [[0, 2, IGNORE_INDEX]]


# ---- bad input -----------------------------------------------------------------------------------


def test_label_values_beyond_the_classes_name_the_file(tmp_path):
    _write_pair(tmp_path / "imgs/a.jpg", tmp_path / "labels/a.png", np.array([[0, 3, 255, 7]], np.uint8))
    dataset = load_ovss_dataset(_config("semseg", tmp_path, image_dir="imgs", label_dir="labels", classes=["cat", "dog", "grass"]))
    with pytest.raises(DatasetError, match=r"labels/a\.png: label values 3, 7 are outside the 3 classes \(0\.\.2\) and not the ignore value 255"):
        dataset[0]


def test_label_of_another_size_than_its_image_names_the_file(tmp_path):
    _write_pair(tmp_path / "imgs/a.jpg", tmp_path / "labels/a.png", np.zeros((2, 3), np.uint8), image_size=(3, 3))
    dataset = load_ovss_dataset(_config("semseg", tmp_path, image_dir="imgs", label_dir="labels", classes=["cat"]))
    with pytest.raises(DatasetError, match=r"labels/a\.png: label map is 2x3 \(HxW\) but its image is 3x3"):
        dataset[0]


def test_label_without_image_and_missing_folders(tmp_path):
    _write_pair(tmp_path / "imgs/a.jpg", tmp_path / "labels/b.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(DatasetError, match=r"b\.png has no image .*imgs/b\.jpg"):
        load_ovss_dataset(_config("semseg", tmp_path, image_dir="imgs", label_dir="labels", classes=["cat"]))
    with pytest.raises(DatasetError, match="image folder not found; .* label folder not found"):
        load_ovss_dataset(_config("ade20k_150", tmp_path / "nowhere"))


def _check_data(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(REPO / "scripts" / "check_data.py"), *args], capture_output=True, text=True, timeout=120)


def test_check_data_reports_every_ovss_problem(tmp_path, capsys):
    base = tmp_path / "ADEChallengeData2016"
    folders = ("images/validation", "annotations_detectron2/validation")
    _write_pair(base / folders[0] / "good.jpg", base / folders[1] / "good.png", np.array([[1, 255]], np.uint8))
    _write_pair(base / folders[0] / "big.jpg", base / folders[1] / "big.png", np.array([[1, 150]], np.uint8))
    _write_pair(base / folders[0] / "size.jpg", base / folders[1] / "size.png", np.zeros((2, 2), np.uint8), image_size=(2, 5))
    _write_pair(base / folders[0] / "orphan.jpg", base / folders[1] / "orphan.png", np.zeros((1, 2), np.uint8))
    (base / folders[0] / "orphan.jpg").unlink()  # a label without its image: named, and the others still checked
    result = _check_data("ovss_dataset=ade20k_150", f"ovss_dataset.root={tmp_path}")
    assert result.returncode == 1, result.stderr
    assert "1 label files without their image" in result.stdout and "orphan.png has no image" in result.stdout
    assert "2 of 3 label maps unusable" in result.stdout
    assert "big.png: label values 150 are outside the 150 classes" in result.stdout
    assert "size.png: label map is 2x2 (HxW) but its image is 2x5" in result.stdout

    # the same script in this process (a subprocess per case would cost seconds each)
    spec = importlib.util.spec_from_file_location("check_data_script", REPO / "scripts" / "check_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["ovss_dataset=ade20k_150", f"ovss_dataset.root={tmp_path}", "ovss_dataset.label_dir=none"]) == 1
    assert "label folder not found" in capsys.readouterr().out
    empty = tmp_path / "classes.json"
    empty.write_text("[]")
    assert script.main(["ovss_dataset=ade20k_150", f"ovss_dataset.root={tmp_path}", f"ovss_dataset.classes={empty}"]) == 1
    assert f"{empty}: empty class list" in capsys.readouterr().out


def test_check_data_flags_voc20b_read_from_a_folder_without_background(tmp_path, capsys):
    """PAS-20b scores background as a class: its labels are CAT-Seg's annotations_detectron2_bg; VOC-20's folder
    (no background value) reads without error but would score every image without its background."""
    base = tmp_path / "VOCdevkit/VOC2012"
    _write_pair(base / "JPEGImages/a.jpg", base / "annotations_detectron2/val/a.png", np.array([[0, 19, 255]], np.uint8))
    _write_pair(base / "JPEGImages/a.jpg", base / "annotations_detectron2_bg/val/a.png", np.array([[0, 19, 20]], np.uint8))
    spec = importlib.util.spec_from_file_location("check_data_script", REPO / "scripts" / "check_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["ovss_dataset=voc20b", f"ovss_dataset.root={tmp_path}"]) == 0
    assert "no label map has the background value" not in capsys.readouterr().out
    wrong = "ovss_dataset.label_dir=VOCdevkit/VOC2012/annotations_detectron2/val"
    assert script.main(["ovss_dataset=voc20b", f"ovss_dataset.root={tmp_path}", wrong]) == 1
    assert "no label map has the background value 20 (background_from)" in capsys.readouterr().out


# ---- ShapeWorld-OVSS -----------------------------------------------------------------------------

# (colour i, shape j) with (i + j) mod 4 == 0, colours red green blue yellow purple orange white black,
# shapes circle square diamond triangle hexagon star, listed by hand.
HAND_UNSEEN = (
    "red circle", "red hexagon", "green triangle", "blue diamond", "yellow square", "yellow star",
    "purple circle", "purple hexagon", "orange triangle", "white diamond", "black square", "black star",
)  # fmt: skip


def test_unseen_pairs_by_hand():
    assert UNSEEN_CLASSES == HAND_UNSEEN
    assert CLASS_NAMES[:7] == ("red circle", "red square", "red diamond", "red triangle", "red hexagon", "red star", "green circle")
    assert len(CLASS_NAMES) == 48 and CLASS_NAMES[-1] == "black star"


def test_train_scenes_never_hold_an_unseen_pair_and_others_do():
    scenes = [generate_scene(0, "train", index, exclude=TRAIN_EXCLUDED) for index in range(60)]
    train = [obj.category for scene in scenes for obj in scene.objects]
    test = [obj.category for index in range(30) for obj in generate_scene(0, "test", index).objects]
    assert not set(train) & set(HAND_UNSEEN) and len(set(train)) == 36
    assert set(test) & set(HAND_UNSEEN)
    # the object count keeps its 2..6 range in train
    assert {len(scene.objects) for scene in scenes} == {2, 3, 4, 5, 6}


@pytest.mark.parametrize("background", ["ignore", "class"])
def test_make_shapeworld_ovss(tmp_path, background):
    out = tmp_path / "sw"
    generate_ovss_dataset(out, {"train": 6, "test": 3}, seed=4, background=background, progress=False)
    info = json.loads((out / "shapeworld_ovss/dataset.json").read_text())
    assert info["background"] == background and info["unseen_classes"] == list(HAND_UNSEEN)
    assert info["classes"] == list(CLASS_NAMES) + (["background"] if background == "class" else [])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 4 and manifest["n_images"] == {"train": 6, "test": 3}
    assert manifest["tasks"]["ovss"]["counts"]["train"]["unseen_objects"] == 0
    dataset = load_ovss_dataset(_config("shapeworld_ovss", out, split="train"))
    assert len(dataset) == 6 and dataset.unseen_indices == tuple(CLASS_NAMES.index(name) for name in HAND_UNSEEN)
    for index, sample in enumerate(dataset.samples):
        scene = generate_scene(4, "train", index, exclude=TRAIN_EXCLUDED)
        labels = np.asarray(Image.open(sample.label_path))
        assert np.array_equal(np.asarray(Image.open(sample.image_path)), scene.image)
        expected = np.full((256, 256), 255 if background == "ignore" else 48)
        for obj in scene.objects:  # class index = 6 * colour position + shape position
            expected[obj.mask] = 6 * list(("red", "green", "blue", "yellow", "purple", "orange", "white", "black")).index(obj.color) + [
                "circle", "square", "diamond", "triangle", "hexagon", "star"
            ].index(obj.shape)
        assert np.array_equal(labels, expected)
    # deterministic given (seed, split, count): a second run writes the same bytes
    again = tmp_path / "again"
    generate_ovss_dataset(again, {"train": 6, "test": 3}, seed=4, background=background, progress=False)
    for path in sorted((out / "shapeworld_ovss").rglob("*.png")):
        assert path.read_bytes() == (again / path.relative_to(out)).read_bytes()


def test_make_shapeworld_ovss_bad_argument_exits_2(tmp_path):
    command = [PYTHON, str(REPO / "scripts" / "make_shapeworld.py"), "task=ovss", f"out={tmp_path / 'x'}", "n_images=1", "background=grey"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == "error: background: expected one of ignore, class, got 'grey'"
    assert not (tmp_path / "x").exists()
