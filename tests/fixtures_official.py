"""Write tiny datasets in the exact official layouts, with their answers worked out by hand.

Every mask below is an axis-aligned rectangle (or a union of them) whose pixels are known without
running any rasteriser: pycocotools fills a polygon with integer corners (x0, y0)-(x1, y1) as
``mask[y0:y1, x0:x1]``, and PhraseCut's PIL drawing (outline included) as ``mask[y0:y1+1, x0:x1+1]``.
The one exception (a triangle) is checked against pycocotools directly in the tests.

COCO-style fixture (RefCOCO family, gRefCOCO, ShapeWorld), images 12 x 16 (H x W):

    image 101 (train)  ann 1001 rectangle polygon        ann 1002 two rectangles (multi-polygon)
    image 102 (val)    ann 2001 crowd, uncompressed RLE   ann 2002 compressed RLE (an L shape)
                       ann 2003 crowd, uncompressed RLE   ann 2004 rectangle polygon (the pixels of 2001)
    image 103 (testA)  ann 3001 triangle polygon          ann 3002 small rectangle
    image 104 (testB)  ann 4001 rectangle polygon
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

HEIGHT, WIDTH = 12, 16
COCO_IMAGE_DIR = "images/mscoco/images/train2014"


def rect_polygon(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    """Flat COCO polygon of the rectangle with corners (x0, y0), (x1, y1)."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def rect_mask(x0: int, y0: int, x1: int, y1: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """Pixels pycocotools fills for ``rect_polygon(x0, y0, x1, y1)`` with integer corners."""
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE, by hand: run lengths over the column-major pixels, background first."""
    pixels = mask.flatten(order="F").astype(int)
    counts, current, run = [], 0, 0
    for value in pixels:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE as stored in JSON (counts a str)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def coco_file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def write_image(path: Path, height: int, width: int, as_png: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (120, 130, 140)).save(path, format="PNG" if as_png else "JPEG")


# ---- the COCO-style instances shared by the REFER and gRefCOCO fixtures -------------------------

L_SHAPE = rect_mask(3, 2, 5, 9) | rect_mask(5, 7, 11, 9)
TRIANGLE = [1.0, 1.0, 9.0, 1.0, 1.0, 9.0]

# ann id -> (image id, category id, bbox xywh, segmentation, iscrowd)
ANNOTATIONS = {
    1001: (101, 1, [2, 3, 6, 4], [rect_polygon(2, 3, 8, 7)], 0),
    1002: (101, 2, [10, 1, 4, 9], [rect_polygon(10, 1, 14, 4), rect_polygon(10, 6, 13, 10)], 0),
    2001: (102, 1, [1, 8, 4, 3], uncompressed_rle(rect_mask(1, 8, 5, 11)), 1),
    2002: (102, 3, [3, 2, 8, 7], compressed_rle(L_SHAPE), 0),
    3001: (103, 2, [1, 1, 8, 8], [TRIANGLE], 0),
    3002: (103, 1, [0, 0, 3, 3], [rect_polygon(0, 0, 3, 3)], 0),
    4001: (104, 3, [4, 2, 8, 8], [rect_polygon(4, 2, 12, 10)], 0),
    2003: (102, 1, [12, 0, 4, 3], uncompressed_rle(rect_mask(12, 0, 16, 3)), 1),
    2004: (102, 1, [1, 8, 4, 3], [rect_polygon(1, 8, 5, 11)], 0),
}

# Expected masks by hand (the triangle's is taken from pycocotools in the tests).
ANN_MASKS = {
    1001: rect_mask(2, 3, 8, 7),
    1002: rect_mask(10, 1, 14, 4) | rect_mask(10, 6, 13, 10),
    2001: rect_mask(1, 8, 5, 11),
    2002: L_SHAPE,
    3002: rect_mask(0, 0, 3, 3),
    4001: rect_mask(4, 2, 12, 10),
    2003: rect_mask(12, 0, 16, 3),
    2004: rect_mask(1, 8, 5, 11),
}


def ann_mask(ann_id: int) -> np.ndarray:
    """Expected mask of an annotation; the triangle's is pycocotools' rasterisation."""
    if ann_id in ANN_MASKS:
        return ANN_MASKS[ann_id]
    return mask_utils.decode(mask_utils.frPyObjects([TRIANGLE], HEIGHT, WIDTH))[:, :, 0].astype(bool)


def coco_instances(rle_lists: bool = False) -> dict:
    """instances.json; ``rle_lists`` stores every mask as refclef's does: a list of one compressed RLE."""
    images = [
        {"id": image_id, "file_name": coco_file_name(image_id), "height": HEIGHT, "width": WIDTH, "license": 1}
        for image_id in (101, 102, 103, 104)
    ]
    annotations = [
        {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "segmentation": segmentation,
         "iscrowd": iscrowd, "area": float(bbox[2] * bbox[3])}
        for ann_id, (image_id, category_id, bbox, segmentation, iscrowd) in ANNOTATIONS.items()
    ]
    if rle_lists:
        for annotation in annotations:
            annotation["segmentation"] = [compressed_rle(ann_mask(annotation["id"]))]
    categories = [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 2, "name": "dog", "supercategory": "animal"},
                  {"id": 3, "name": "car", "supercategory": "vehicle"}]
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def _sentences(texts: list[str], first_id: int, kind: str | None = None) -> list[dict]:
    sentences = []
    for offset, text in enumerate(texts):
        sentence = {"tokens": text.lower().split(), "raw": text, "sent": text.lower(), "sent_id": first_id + offset}
        if kind is not None:
            sentence["kind"] = kind
        sentences.append(sentence)
    return sentences


# ---- RefCOCO family / refclef / ShapeWorld RES ------------------------------------------------------

# ref id -> (ann id, sentence texts)
REFER_REFS = {
    0: (1001, ["The box on the left", "left box"]),
    1: (1002, ["Both RED boxes"]),
    2: (2001, ["crowd at the bottom", "bottom people", "people"]),
    3: (2002, ["the L shape", "bent thing"]),
    4: (3001, ["triangle"]),
    5: (4001, ["big square", "square in the middle"]),
}
# split_by -> {ref id: split}
REFER_SPLITS = {
    "unc": {0: "train", 1: "train", 2: "val", 3: "val", 4: "testA", 5: "testB"},
    "umd": {0: "train", 1: "train", 2: "val", 3: "val", 4: "test", 5: "test"},
    "google": {0: "train", 1: "train", 2: "train", 3: "val", 4: "val", 5: "val"},
    "berkeley": {0: "train", 1: "val", 2: "val", 3: "test", 4: "test", 5: "test"},
}


def refer_refs(split_by: str, ref_ids: dict[int, tuple[int, list[str]]] | None = None) -> list[dict]:
    """REFER refs as in refs(<split_by>).p; ref 0 carries an extra key, its sentences a "kind"."""
    refs, next_sentence = [], 0
    for ref_id, (ann_id, texts) in (ref_ids or REFER_REFS).items():
        image_id, category_id = ANNOTATIONS[ann_id][0], ANNOTATIONS[ann_id][1]
        sentences = _sentences(texts, next_sentence, kind="A" if ref_id == 0 else None)
        ref = {
            "ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": category_id,
            "split": REFER_SPLITS[split_by][ref_id], "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
            "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences,
        }
        if ref_id == 0:
            ref["source"] = "fixture"
        if ref_id == 1:  # "sent" empty: the reader must fall back to "raw"
            sentences[0]["sent"] = ""
        refs.append(ref)
        next_sentence += len(sentences)
    return refs


def write_images(root: Path, image_dir: str) -> None:
    for image_id in (101, 102, 103, 104):
        write_image(root / image_dir / coco_file_name(image_id), HEIGHT, WIDTH)


def write_refer(
    root: Path, folder: str = "refcoco", split_by: str = "unc", image_dir: str = COCO_IMAGE_DIR, rle_lists: bool = False
) -> Path:
    """<root>/<folder>/refs(<split_by>).p (pickle protocol 2, as Python 2 wrote them) + instances.json + images.

    ``rle_lists``: masks stored as refclef's instances.json stores them (see ``coco_instances``).
    """
    out = root / folder
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"refs({split_by}).p", "wb") as file:
        pickle.dump(refer_refs(split_by), file, protocol=2)
    (out / "instances.json").write_text(json.dumps(coco_instances(rle_lists)))
    write_images(root, image_dir)
    return out


# ---- gRefCOCO / ShapeWorld GRES -------------------------------------------------------------------

# ref id -> (ann ids, category ids, split, sentence texts, kind). Ref 1's crowd annotation 2003 is
# not part of its target: its GT mask is ann 2004's rectangle (the pixels of 2001) alone.
GREF_REFS = {
    0: ([1001, 1002], [1, 2], "train", ["all boxes", "the boxes"], "M"),
    1: ([2004, 2003], [1, 1], "val", ["the crowd"], "A"),
    2: ([-1], [-1], "val", ["the purple star", "the giraffe"], "N"),
    3: ([3001, 3002], [2, 1], "testA", ["triangle and small square"], "M"),
    4: ([4001], [3], "testB", ["square"], "A"),
}


def grefcoco_refs() -> list[dict]:
    refs, next_sentence = [], 0
    for ref_id, (ann_ids, category_ids, split, texts, kind) in GREF_REFS.items():
        image_id = 102 if ann_ids == [-1] else ANNOTATIONS[ann_ids[0]][0]
        sentences = _sentences(texts, next_sentence, kind=kind)
        refs.append({
            "ref_id": ref_id, "ann_id": ann_ids, "image_id": image_id, "category_id": category_ids, "split": split,
            "file_name": coco_file_name(image_id), "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences,
            "no_target": ann_ids == [-1],
        })
        next_sentence += len(sentences)
    return refs


def write_grefcoco(root: Path, folder: str = "grefcoco", image_dir: str = COCO_IMAGE_DIR) -> Path:
    """<root>/<folder>/grefs(unc).json + instances.json + images."""
    out = root / folder
    out.mkdir(parents=True, exist_ok=True)
    (out / "grefs(unc).json").write_text(json.dumps(grefcoco_refs()))
    (out / "instances.json").write_text(json.dumps(coco_instances()))
    write_images(root, image_dir)
    return out


# ---- PhraseCut -----------------------------------------------------------------------------------

PHRASECUT_SIZES = {7: (10, 14), 8: (9, 11)}  # image id -> (H, W)


def _pil_rect(x0: int, y0: int, x1: int, y1: int, size: tuple[int, int]) -> np.ndarray:
    """Pixels PhraseCut's PIL drawing fills (outline included) for the rectangle (x0, y0)-(x1, y1)."""
    mask = np.zeros(size, dtype=bool)
    mask[y0 : y1 + 1, x0 : x1 + 1] = True
    return mask


def _points(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


PHRASECUT_TASKS = {
    "test": [
        {"task_id": "7__1", "image_id": 7, "phrase": "red car", "ann_ids": [70], "instance_boxes": [[2, 3, 7, 5]],
         "Polygons": [[_points(2, 3, 8, 7)]], "phrase_structure": {"name": "car", "attributes": ["red"], "type": "attribute"}},
        {"task_id": "7__2", "image_id": 7, "phrase": "windows", "ann_ids": [71, 72], "instance_boxes": [[0, 0, 4, 3], [9, 5, 4, 4]],
         "Polygons": [[_points(0, 0, 3, 2)], [_points(10, 5, 12, 6), _points(9, 7, 11, 8)]],
         "phrase_structure": {"name": "window", "attributes": [], "type": "name"}},
        {"task_id": "8__1", "image_id": 8, "phrase": "sky", "ann_ids": [80], "instance_boxes": [[1, 1, 5, 4]],
         "Polygons": [[_points(1.7, 1.2, 5.9, 4.8)]], "phrase_structure": {"name": "sky", "attributes": [], "type": "name"}},
    ],
    "val": [
        {"task_id": "8__2", "image_id": 8, "phrase": "grass", "ann_ids": [81], "instance_boxes": [[0, 6, 11, 3]],
         "Polygons": [[_points(0, 6, 10, 8)]], "phrase_structure": {"name": "grass", "attributes": [], "type": "name"}},
    ],
}
PHRASECUT_MASKS = {
    "7__1": _pil_rect(2, 3, 8, 7, PHRASECUT_SIZES[7]),
    "7__2": _pil_rect(0, 0, 3, 2, PHRASECUT_SIZES[7]) | _pil_rect(10, 5, 12, 6, PHRASECUT_SIZES[7]) | _pil_rect(9, 7, 11, 8, PHRASECUT_SIZES[7]),
    "8__1": _pil_rect(1, 1, 5, 4, PHRASECUT_SIZES[8]),  # points truncated to integers
    "8__2": _pil_rect(0, 6, 10, 8, PHRASECUT_SIZES[8]),
}


def write_phrasecut(root: Path, with_image_data: bool = False) -> Path:
    """<root>/phrasecut/refer_{test,val}.json, images/<id>.jpg, optionally image_data_split.json."""
    out = root / "phrasecut"
    out.mkdir(parents=True, exist_ok=True)
    for split, tasks in PHRASECUT_TASKS.items():
        (out / f"refer_{split}.json").write_text(json.dumps(tasks))
    for image_id, (height, width) in PHRASECUT_SIZES.items():
        write_image(out / "images" / f"{image_id}.jpg", height, width)
    if with_image_data:
        entries = [{"image_id": i, "height": h, "width": w, "split": "test", "url": ""} for i, (h, w) in PHRASECUT_SIZES.items()]
        (out / "image_data_split.json").write_text(json.dumps(entries))
    return out


# ---- JSONL ---------------------------------------------------------------------------------------

JSONL_SIZE = (8, 10)


@dataclass
class JsonlFixture:
    folder: Path
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # sample id -> expected mask


def write_jsonl(folder: Path) -> JsonlFixture:
    """<folder>/val.jsonl (every target kind) and train.jsonl; images and masks under the folder."""
    height, width = JSONL_SIZE
    write_image(folder / "imgs" / "a.png", height, width, as_png=True)
    png = rect_mask(2, 1, 6, 4, height, width)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(png.astype(np.uint8) * 255).save(folder / "masks" / "a.png")
    rle_c, rle_u = rect_mask(0, 4, 3, 7, height, width), rect_mask(7, 0, 10, 2, height, width)
    lines = [
        {"image": "imgs/a.png", "expression": "the png one", "mask": "masks/a.png"},
        {"id": "rle-c", "image": "imgs/a.png", "expression": "compressed", "rle": compressed_rle(rle_c), "kind": "A"},
        {"image": "imgs/a.png", "expression": "uncompressed", "rle": uncompressed_rle(rle_u)},
        {"image": "imgs/a.png", "expression": "polygon", "polygons": [rect_polygon(1, 1, 5, 5)], "boxes": [[1, 1, 4, 4]]},
        {"image": "imgs/a.png", "expression": "nothing here"},
        {"image": "imgs/a.png", "expression": "box only", "boxes": [[2, 2, 3, 3]]},
    ]
    (folder / "val.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    (folder / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines[:2]) + "\n")
    return JsonlFixture(
        folder,
        {"1": png, "rle-c": rle_c, "3": rle_u, "4": rect_mask(1, 1, 5, 5, height, width), "5": np.zeros(JSONL_SIZE, dtype=bool)},
    )


# ---- SimREC's merge.json (the release's REC pretraining data) --------------------------------------

WORDS_40 = " ".join(["word"] * 40)  # 40 words: kept by the release's filter
WORDS_41 = " ".join(["word"] * 41)  # 41 words: no sample of its own, still drawable from its referent
SPACED_40 = "big  " + " ".join(["word"] * 39)  # 40 words but 41 pieces of split(" "): the release drops it

# data_source -> image folder under the root (the file names below live there)
REC_JSON_IMAGE_DIRS = {"coco": COCO_IMAGE_DIR, "flickr": "images/flickr", "vg": "images/VG", "referit": "images/referit"}
REC_JSON = {
    "train": [
        {"iid": "101.jpg", "data_source": "coco", "bbox": [2, 3, 6, 4], "refs": ["left box", WORDS_41, "the box on the left"],
         "mask_id": 5},
        {"iid": "f1.jpg", "data_source": "flickr", "bbox": [0, 1, 5, 4], "refs": ["a dog"]},
        {"iid": "v1.jpg", "data_source": "vg", "bbox": [1, 1, 2, 2], "refs": [WORDS_41, SPACED_40]},
        {"iid": "r1.jpg", "data_source": "referit", "bbox": [4, 2, 8, 8], "refs": [WORDS_40, "sky"]},
    ],
    "val": [{"iid": 102, "data_source": "coco", "bbox": [3, 2, 8, 7], "refs": ["the l shape"]}],
}
# Per sentence, at most 40 words: entry 0 sentences 0 and 2, entry 1, entry 3 both; entry 2 none.
REC_JSON_SENTENCE_SAMPLES = ["0#0", "0#2", "1#0", "3#0", "3#1"]


def write_rec_json(root: Path) -> Path:
    """<root>/anns/merge.json + an image per entry in its data_source's folder."""
    out = root / "anns"
    out.mkdir(parents=True, exist_ok=True)
    (out / "merge.json").write_text(json.dumps(REC_JSON))
    write_images(root, COCO_IMAGE_DIR)
    for name in ("f1.jpg", "v1.jpg", "r1.jpg"):
        source = {"f": "flickr", "v": "vg", "r": "referit"}[name[0]]
        write_image(root / REC_JSON_IMAGE_DIRS[source] / name, HEIGHT, WIDTH)
    return out / "merge.json"
