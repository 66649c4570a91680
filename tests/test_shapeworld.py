"""ShapeWorld-Ref v1 generator: checked against the spec page with references written here, not with
the generator's own helpers (expressions are parsed and evaluated by an independent checker, shapes are
re-rasterised with a different method)."""

import json
import math
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from ssp_sam.data.shapeworld import generate_dataset, generate_refs, generate_scene
from ssp_sam.data.shapeworld.expressions import mirror_refs, mirror_text
from ssp_sam.data.shapeworld.scene import mirror_scene
from ssp_sam.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# pycocotools' decode under numpy 2 warns about __array__ copy semantics; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# --- The spec page, transcribed -------------------------------------------------------------------
SPEC_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SPEC_SHAPES = ["circle", "square", "diamond", "triangle", "hexagon", "star"]
SPEC_RADII = {"small": (12, 18), "large": (26, 36)}
SPEC_VERTEX_ANGLES = {
    "square": [45 + 90 * k for k in range(4)],
    "diamond": [90 * k for k in range(4)],
    "triangle": [-90 + 120 * k for k in range(3)],
    "hexagon": [60 * k for k in range(6)],
    "star": [-90 + 36 * k for k in range(10)],
}
# Area of each shape for r = 1 (regular polygons inscribed in the unit circle; star = 10 triangles).
UNIT_AREAS = {
    "circle": math.pi,
    "square": 2.0,
    "diamond": 2.0,
    "triangle": 3 * math.sqrt(3) / 4,
    "hexagon": 3 * math.sqrt(3) / 2,
    "star": 10 * 0.5 * 0.45 * math.sin(math.radians(36)),
}
RES_PROPORTIONS = {"A": 0.50, "L": 0.25, "R": 0.25}
GRES_PROPORTIONS = {"A": 0.40, "L": 0.15, "R": 0.15, "M": 0.15, "N": 0.15}
SIDE_WORDS = {"left": (0, 1), "right": (0, -1), "top": (1, 1), "bottom": (1, -1)}
RELATION_WORDS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}


def fan_rasterize(shape, center, radius, rotation):
    """Pixels whose centre lies in the shape, as a union of closed triangles (centre, v_k, v_k+1)."""
    ys, xs = np.mgrid[0:256, 0:256] + 0.5
    cx, cy = center
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
    angles = SPEC_VERTEX_ANGLES[shape]
    points = []
    for k, angle in enumerate(angles):
        rho = radius * (0.45 if shape == "star" and k % 2 else 1.0)
        theta = math.radians(angle + rotation)
        points.append((cx + rho * math.cos(theta), cy + rho * math.sin(theta)))
    inside = np.zeros((256, 256), dtype=bool)
    for k in range(len(points)):
        corners = [(cx, cy), points[k], points[(k + 1) % len(points)]]
        signs = []
        for (ax, ay), (bx, by) in zip(corners, corners[1:] + corners[:1]):
            signs.append((bx - ax) * (ys - ay) - (by - ay) * (xs - ax))
        inside |= ((signs[0] >= 0) & (signs[1] >= 0) & (signs[2] >= 0)) | (
            (signs[0] <= 0) & (signs[1] <= 0) & (signs[2] <= 0)
        )
    return inside


# --- Independent expression checker ----------------------------------------------------------------
def parse_desc(words):
    """["large", "red", "circles"] -> ({"size": .., "color": .., "shape": ..}, plural)."""
    *modifiers, noun = words
    plural = noun.endswith("s")
    noun = noun[:-1] if plural else noun
    assert noun == "shape" or noun in SPEC_SHAPES, words
    desc = {"shape": None if noun == "shape" else noun, "color": None, "size": None}
    for word in modifiers:
        key = "color" if word in SPEC_COLORS else "size"
        assert word in SPEC_COLORS or word in SPEC_RADII, words
        assert desc[key] is None, words
        desc[key] = word
    if desc["color"] and desc["size"]:
        assert modifiers == [desc["size"], desc["color"]], words  # order "{size} {color} {noun}"
    return desc, plural


def matching(desc, objects):
    return [i for i, o in enumerate(objects) if all(desc[k] is None or getattr(o, k) == desc[k] for k in desc)]


def referents(text, objects):
    """Indices the expression refers to under the spec's definitions, or None if it is not valid."""
    words = text.split()
    if words[0] == "all":
        return set(matching(parse_desc(words[1:])[0], objects))
    assert words[0] == "the", text
    for relation, (axis, sign) in RELATION_WORDS.items():
        marker = f" {relation} the "
        if marker in text:
            left, right = text[len("the ") :].split(marker)
            anchors = matching(parse_desc(right.split())[0], objects)
            if len(anchors) != 1:
                return None
            anchor = objects[anchors[0]]
            return {
                i
                for i in matching(parse_desc(left.split())[0], objects)
                if i != anchors[0] and sign * (objects[i].center[axis] - anchor.center[axis]) > 8
            }
    side = None
    if len(words) >= 4 and words[-3:-1] == ["on", "the"] and words[-1] in SIDE_WORDS:
        side, desc_words = words[-1], words[1:-3]
    elif words[1].endswith("most"):
        side, desc_words = words[1][: -len("most")], words[2:]
    if side is not None:
        axis, sign = SIDE_WORDS[side]
        members = matching(parse_desc(desc_words)[0], objects)
        if len(members) < 2:
            return None
        ranked = sorted(members, key=lambda i: sign * objects[i].center[axis])
        margin = sign * (objects[ranked[1]].center[axis] - objects[ranked[0]].center[axis])
        return {ranked[0]} if margin >= 16 else None
    return set(matching(parse_desc(words[1:])[0], objects))


def check_form(text, kind):
    """The surface form belongs to the templates the spec lists for the kind."""
    words = text.split()
    if kind == "A":
        desc, plural = parse_desc(words[1:])
        assert words[0] == "the" and not plural
        named = tuple(k for k in ("size", "color", "shape") if desc[k])
        assert named in {("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"), ("color",),
                         ("size", "color")}, text
    elif kind == "M":
        ok = (words[0] == "all" and len(words) == 3 and words[2] == "shapes" and words[1] in {**SPEC_COLORS, **SPEC_RADII})
        ok |= words[0] == "all" and len(words) == 2 and words[1][:-1] in SPEC_SHAPES
        ok |= words[0] == "the" and len(words) == 3 and words[1] in SPEC_COLORS and words[2][:-1] in SPEC_SHAPES
        assert ok, text
    elif kind == "N":
        ok = words[0] == "all" and len(words) == 3 and words[1] in SPEC_COLORS and words[2] == "shapes"
        ok |= words[0] == "the" and len(words) == 3 and words[1] in SPEC_COLORS and words[2] in SPEC_SHAPES
        ok |= (words[0] == "the" and len(words) == 4 and words[1] in SPEC_RADII and words[2] in SPEC_COLORS
               and words[3] in SPEC_SHAPES)
        assert ok, text


def check_sentence(text, kind, targets, objects):
    check_form(text, kind)
    found = referents(text, objects)
    assert found is not None, (text, kind)
    if kind in "ALR":
        assert len(targets) == 1 and found == set(targets), (text, kind, targets, found)
    elif kind == "M":
        assert len(targets) >= 2 and found == set(targets), (text, kind, targets, found)
    else:
        assert targets == () and found == set(), (text, kind, found)


# --- Fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes():
    return [generate_scene(7, "train", index) for index in range(150)]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapeworld")
    counts = {"train": 6, "val": 2, "test": 2}
    generate_dataset(out, "res", counts, seed=3, progress=False)
    generate_dataset(out, "gres", counts, seed=3, progress=False)
    return out


# --- Scenes --------------------------------------------------------------------------------------
def test_scene_is_deterministic_per_seed_split_index():
    first, again = generate_scene(1, "val", 5), generate_scene(1, "val", 5)
    assert np.array_equal(first.image, again.image)
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(first.objects, again.objects))
    assert not np.array_equal(first.image, generate_scene(2, "val", 5).image)
    assert not np.array_equal(first.image, generate_scene(1, "test", 5).image)
    assert first.image.dtype == np.uint8 and first.image.shape == (256, 256, 3)


def test_scene_rules(scenes):
    counts = Counter()
    for scene in scenes:
        assert 2 <= len(scene.objects) <= 6
        counts[len(scene.objects)] += 1
        assert all(100 <= v <= 160 for v in scene.background)
        for obj in scene.objects:
            assert obj.color in SPEC_COLORS and obj.shape in SPEC_SHAPES
            low, high = SPEC_RADII[obj.size]
            assert low <= obj.radius <= high
            assert obj.rotation == 0.0 if obj.shape == "circle" else -15 <= obj.rotation <= 15
            for coordinate in obj.center:
                assert obj.radius + 4 <= coordinate <= 256 - obj.radius - 4
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                assert math.dist(a.center, b.center) >= a.radius + b.radius + 6
    assert set(counts) == {2, 3, 4, 5, 6}


def test_masks_are_exactly_the_painted_pixels(scenes):
    for scene in scenes[:40]:
        clean = scene.clean_image
        painted = np.zeros((256, 256), dtype=bool)
        for obj in scene.objects:
            reference = fan_rasterize(obj.shape, obj.center, obj.radius, obj.rotation)
            assert np.array_equal(obj.mask, reference), (scene.index, obj.shape)
            expected_area = UNIT_AREAS[obj.shape] * obj.radius**2
            perimeter = 2 * math.pi * obj.radius
            assert abs(obj.mask.sum() - expected_area) <= 0.5 * perimeter
            assert (clean[obj.mask] == SPEC_COLORS[obj.color]).all()
            painted |= obj.mask
        assert (clean[~painted] == scene.background).all()
        for color, rgb in SPEC_COLORS.items():
            same_color = [obj.mask for obj in scene.objects if obj.color == color]
            union = np.any(same_color, axis=0) if same_color else np.zeros((256, 256), dtype=bool)
            assert np.array_equal((clean == rgb).all(axis=2), union)


def test_noise_is_gaussian_sigma_6(scenes):
    scene = scenes[0]
    difference = scene.image.astype(float) - scene.clean_image
    unclipped = (scene.image > 0) & (scene.image < 255)
    assert abs(difference[unclipped].mean()) < 0.1
    assert abs(difference[unclipped].std() - 6.0) < 0.1  # rounding adds variance 1/12


def test_unknown_split_and_negative_seed_are_config_errors():
    with pytest.raises(ConfigError, match="split"):
        generate_scene(0, "testA", 0)
    with pytest.raises(ConfigError, match="seed"):
        generate_scene(-1, "train", 0)


# --- Expressions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("task, proportions", [("res", RES_PROPORTIONS), ("gres", GRES_PROPORTIONS)])
def test_every_expression_refers_as_its_kind_says_and_kinds_follow_proportions(scenes, task, proportions):
    kinds = Counter()
    for scene in scenes:
        refs = generate_refs(scene, task)
        single_targets = [ref.targets for ref in refs if len(ref.targets) == 1]
        assert len(single_targets) == len(set(single_targets))  # one ref per target object
        for ref in refs:
            assert 1 <= len(ref.sentences) <= 3
            for sentence in ref.sentences:
                check_sentence(sentence.text, sentence.kind, ref.targets, scene.objects)
                kinds[sentence.kind] += 1
    total = sum(kinds.values())
    assert total > 500
    assert set(kinds) == set(proportions)
    for kind, share in proportions.items():
        assert abs(kinds[kind] / total - share) < 0.06, (kind, kinds[kind] / total)


def test_checker_rejects_wrong_expressions(scenes):
    """The checker itself can fail: a non-identifying A and an ambiguous relation are caught."""
    scene = next(s for s in scenes if len(s.objects) >= 3)
    with pytest.raises(AssertionError):
        check_sentence("the shape", "A", (0,), scene.objects)
    with pytest.raises(AssertionError):
        check_sentence(f"the {scene.objects[0].color} {scene.objects[0].shape}", "N", (), scene.objects)


# --- Written files -------------------------------------------------------------------------------
def test_same_seed_gives_identical_bytes_with_or_without_workers(written, tmp_path):
    counts = {"train": 6, "val": 2, "test": 2}
    again = tmp_path / "again"
    generate_dataset(again, "res", counts, seed=3, workers=2, progress=False)
    generate_dataset(again, "gres", counts, seed=3, progress=False)
    files = sorted(p.relative_to(written) for p in written.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (written / name).read_bytes() == (again / name).read_bytes(), name

    other = tmp_path / "other"
    generate_dataset(other, "res", {"train": 1}, seed=4, progress=False)
    image = "images/shapeworld_train_000000.png"
    assert (other / image).read_bytes() != (written / image).read_bytes()


def test_refcoco_layout_loads_and_matches_the_scenes(written):
    refs = pickle.loads((written / "shapeworld" / "refs(unc).p").read_bytes())
    instances = json.loads((written / "shapeworld" / "instances.json").read_text())
    names = [f"{color} {shape}" for color in SPEC_COLORS for shape in SPEC_SHAPES]
    assert [c["name"] for c in instances["categories"]] == names
    category_names = {c["id"]: c["name"] for c in instances["categories"]}
    images = {image["id"]: image for image in instances["images"]}
    assert len(images) == 10
    objects_by_ann = {}
    for image in images.values():
        assert (image["width"], image["height"]) == (256, 256)
        split, index = image["file_name"][len("shapeworld_") : -len(".png")].split("_")
        scene = generate_scene(3, split, int(index))
        loaded = np.asarray(Image.open(written / "images" / image["file_name"]))
        assert np.array_equal(loaded, scene.image)
        annotations = [a for a in instances["annotations"] if a["image_id"] == image["id"]]
        assert len(annotations) == len(scene.objects)
        for annotation in annotations:
            assert annotation["iscrowd"] == 0
            mask = mask_utils.decode(annotation["segmentation"]).astype(bool)
            obj = next(o for o in scene.objects if np.array_equal(o.mask, mask))
            assert category_names[annotation["category_id"]] == f"{obj.color} {obj.shape}"
            ys, xs = np.nonzero(mask)
            assert annotation["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert annotation["area"] == mask.sum()
            objects_by_ann[annotation["id"]] = (scene, scene.objects.index(obj), image)

    assert {ref["split"] for ref in refs} == {"train", "val", "test"}
    for ref in refs:
        scene, position, image = objects_by_ann[ref["ann_id"]]
        assert ref["image_id"] == image["id"]
        assert ref["file_name"] == image["file_name"].replace(".png", f"_{ref['ann_id']}.png")
        assert ref["split"] == scene.split
        assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        assert ref["kinds"] == [s["kind"] for s in ref["sentences"]]
        for sentence in ref["sentences"]:
            assert sentence["tokens"] == sentence["sent"].split() and sentence["raw"] == sentence["sent"]
            check_sentence(sentence["sent"], sentence["kind"], (position,), scene.objects)


def test_grefcoco_layout_loads_and_matches_the_scenes(written):
    refs = json.loads((written / "shapeworld_gres" / "grefs(unc).json").read_text())
    instances = json.loads((written / "shapeworld_gres" / "instances.json").read_text())
    scene_of_image = {}
    positions = {}
    for image in instances["images"]:
        split, index = image["file_name"][len("shapeworld_") : -len(".png")].split("_")
        scene_of_image[image["id"]] = scene = generate_scene(3, split, int(index))
        for annotation in instances["annotations"]:
            if annotation["image_id"] == image["id"]:
                mask = mask_utils.decode(annotation["segmentation"]).astype(bool)
                positions[annotation["id"]] = next(i for i, o in enumerate(scene.objects) if np.array_equal(o.mask, mask))
    kinds = Counter()
    for ref in refs:
        scene = scene_of_image[ref["image_id"]]
        assert isinstance(ref["ann_id"], list) and isinstance(ref["category_id"], list)
        if ref["no_target"]:
            assert ref["ann_id"] == [-1] and ref["category_id"] == [-1]
            targets = ()
        else:
            targets = tuple(positions[a] for a in ref["ann_id"])
        for sentence in ref["sentences"]:
            check_sentence(sentence["sent"], sentence["kind"], targets, scene.objects)
            kinds[sentence["kind"]] += 1
            assert sentence["subkind"] == _expected_subkind(sentence["sent"], sentence["kind"], targets, scene.objects)
            kinds[sentence["subkind"]] += 1
    assert set(kinds) <= {*GRES_PROPORTIONS, "L-shortcut", "L-described"} and {"A", "N"} <= set(kinds)
    assert kinds["L-shortcut"] > 0 and kinds["L-shortcut"] + kinds["L-described"] == kinds["L"]


# Where each side word points: (axis of the centre, +1 when the extreme is the largest coordinate).
_SIDE_DIRECTIONS = {"left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1)}


def _expected_subkind(text: str, kind: str, targets: tuple[int, ...], objects) -> str:
    """The spec's kind, location split by whether the target is the extreme object of the whole scene."""
    if kind != "L":
        return kind
    side = next(word.removesuffix("most") for word in text.split() if word.removesuffix("most") in _SIDE_DIRECTIONS)
    axis, direction = _SIDE_DIRECTIONS[side]
    furthest = max(range(len(objects)), key=lambda i: direction * objects[i].center[axis])
    return "L-shortcut" if furthest == targets[0] else "L-described"


def test_manifest_counts_and_conflicting_seed(written):
    manifest = json.loads((written / "manifest.json").read_text())
    assert manifest["spec_version"] == "ShapeWorld-Ref v1" and manifest["seed"] == 3
    assert manifest["n_images"] == {"train": 6, "val": 2, "test": 2}
    refs = pickle.loads((written / "shapeworld" / "refs(unc).p").read_bytes())
    res_train = manifest["tasks"]["res"]["counts"]["train"]
    train_kinds = Counter(kind for ref in refs if ref["split"] == "train" for kind in ref["kinds"])
    assert res_train["images"] == 6 and res_train["kinds"] == {k: train_kinds[k] for k in RES_PROPORTIONS}
    with pytest.raises(ConfigError, match="out"):
        generate_dataset(written, "res", {"train": 6, "val": 2, "test": 2}, seed=4, progress=False)


def test_split_with_zero_images_is_omitted(tmp_path):
    generate_dataset(tmp_path, "gres", {"train": 2, "val": 0}, seed=0, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["n_images"] == {"train": 2}
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "shapeworld_train_000000.png",
        "shapeworld_train_000001.png",
    ]


# --- Mirrored training scenes --------------------------------------------------------------------
@pytest.mark.parametrize("axis", ["h", "v"])
def test_mirrored_scene_is_the_reflection_and_its_reworded_sentences_follow_the_spec(scenes, axis):
    flip = np.fliplr if axis == "h" else np.flipud
    reworded = 0
    for scene in scenes[:40]:
        mirrored = mirror_scene(scene, axis)
        assert np.array_equal(mirrored.image, flip(scene.image)) and mirrored.file_name.endswith(f"_mirror_{axis}.png")
        for original, obj in zip(scene.objects, mirrored.objects):
            assert np.array_equal(obj.mask, flip(original.mask))
            # the spec's rasteriser at the mirrored centre and rotation draws the mirrored mask
            drawn = fan_rasterize(obj.shape, obj.center, obj.radius, obj.rotation)
            assert (drawn != obj.mask).sum() <= 2, (obj.shape, obj.rotation)
        for ref, mirrored_ref in zip(generate_refs(scene, "gres"), mirror_refs(generate_refs(scene, "gres"), axis)):
            for sentence, mirrored_sentence in zip(ref.sentences, mirrored_ref.sentences):
                check_sentence(mirrored_sentence.text, mirrored_sentence.kind, mirrored_ref.targets, mirrored.objects)
                reworded += mirrored_sentence.text != sentence.text
    assert reworded >= 20  # spatial sentences were reworded, not only copied


def test_mirror_text_swaps_whole_words_only():
    assert mirror_text("the rightmost red circle", "h") == "the leftmost red circle"
    assert mirror_text("the star right of the blue square", "h") == "the star left of the blue square"
    assert mirror_text("the circle above the topmost star", "v") == "the circle below the bottommost star"
    assert mirror_text("the circle on the left", "v") == "the circle on the left"


def test_dataset_with_mirrors_adds_the_mirrored_training_scenes_only(tmp_path):
    generate_dataset(tmp_path, "gres", {"train": 3, "val": 1}, seed=2, progress=False, mirrors=["h", "v"])
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert len(names) == 3 * 3 + 1 and not any("val" in name and "mirror" in name for name in names)
    original = np.asarray(Image.open(tmp_path / "images" / "shapeworld_train_000001.png"))
    for axis, flip in (("h", np.fliplr), ("v", np.flipud)):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / f"shapeworld_train_000001_mirror_{axis}.png")), flip(original))
    instances = json.loads((tmp_path / "shapeworld_gres" / "instances.json").read_text())
    ids = [image["id"] for image in instances["images"]]
    assert len(set(ids)) == len(ids) == 10
    assert len({a["id"] for a in instances["annotations"]}) == len(instances["annotations"])
    refs = json.loads((tmp_path / "shapeworld_gres" / "grefs(unc).json").read_text())
    assert len({ref["ref_id"] for ref in refs}) == len(refs)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["mirrors"] == ["h", "v"] and manifest["tasks"]["gres"]["counts"]["train"]["images"] == 9
    assert manifest["off_spec"] == ["top-bottom mirrors draw triangles and stars pointing down (ShapeWorld-Ref v1 draws them pointing up)"]
    generate_dataset(tmp_path / "h", "res", {"train": 1}, seed=2, progress=False, mirrors=["h"])
    assert "off_spec" not in json.loads((tmp_path / "h" / "manifest.json").read_text())  # left-right stays within the spec
    with pytest.raises(ConfigError, match="mirrors"):  # the same OUT with other mirrors is another dataset
        generate_dataset(tmp_path, "gres", {"train": 3, "val": 1}, seed=2, progress=False, mirrors=["h"])
    with pytest.raises(ConfigError, match="mirrors"):
        generate_dataset(tmp_path / "x", "gres", 1, seed=2, progress=False, mirrors=["x"])


# --- Command line --------------------------------------------------------------------------------
def run_cli(*arguments, cwd):
    command = [sys.executable, str(REPO / "scripts" / "make_shapeworld.py"), *arguments]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "arguments, named",
    [
        (["out=data", "task=foo", "n_images=1"], "task"),
        (["out=data", "n_images=-1"], "n_images"),
        (["out=a_file", "n_images=1"], "out"),
        (["out=data", "n_images=1", "mirrors=[h, h]"], "mirrors"),
        (["out=data", "n_images=1", "task=ovss", "mirrors=[h]"], "mirrors"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, arguments, named):
    (tmp_path / "a_file").write_text("")
    result = run_cli(*arguments, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {named}")
    assert "Traceback" not in result.stderr


def test_cli_writes_dataset_and_no_hydra_outputs(tmp_path):
    result = run_cli("task=gres", "out=sw", "n_images={train: 2, test: 1}", "seed=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sw"]
    assert json.loads((tmp_path / "sw" / "manifest.json").read_text())["n_images"] == {"train": 2, "test": 1}
    assert (tmp_path / "sw" / "shapeworld_gres" / "grefs(unc).json").is_file()


def test_cli_skip_existing_does_nothing_for_the_same_data_and_refuses_other_data(tmp_path):
    made = run_cli("task=gres", "out=sw", "n_images={train: 2, test: 1}", "seed=5", "skip_existing=true", cwd=tmp_path)
    assert made.returncode == 0, made.stderr  # nothing there yet: made
    instances = tmp_path / "sw" / "shapeworld_gres" / "instances.json"
    written = instances.stat().st_mtime_ns
    again = run_cli("task=gres", "out=sw", "n_images={train: 2, test: 1}", "seed=5", "skip_existing=true", cwd=tmp_path)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert instances.stat().st_mtime_ns == written
    other_task = run_cli("task=res", "out=sw", "n_images={train: 2, test: 1}", "seed=5", "skip_existing=true", cwd=tmp_path)
    assert other_task.returncode == 0 and (tmp_path / "sw" / "shapeworld" / "refs(unc).p").is_file()  # res was not there
    for other in (["seed=6"], ["n_images={train: 3, test: 1}"]):
        result = run_cli("task=gres", "out=sw", "n_images={train: 2, test: 1}", "seed=5", *other, "skip_existing=true", cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: out: sw already holds")
        assert instances.stat().st_mtime_ns == written
