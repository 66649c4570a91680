"""ShapeWorld-Ref v1 scenes: sampling, rasterisation and noise, exactly as the spec page says.

A scene is fully determined by ``(seed, split, index)``: its random stream is
``np.random.default_rng([seed, split_code, index])`` with split_code the position of the split in
:data:`SPLITS`, so any image can be regenerated alone and a dataset does not depend on how many
workers produced it.

Conventions (the spec leaves them open):
- Coordinates are continuous pixel coordinates, x right and y down; pixel (row y, column x) covers
  the square [x, x + 1) x [y, y + 1). Centres, radii and rotations are floats.
- Rasterisation rule: a pixel belongs to an object iff its centre (x + 0.5, y + 0.5) lies inside
  the shape (disk: distance to the centre <= r; polygon: even-odd crossing test). Objects are filled
  flat with their colour and no anti-aliasing, so an instance mask is exactly the pixels painted.
- The background is one flat colour whose channels are integers uniform in [100, 160]. Noise
  ``N(0, 6)`` is added per pixel and channel, then the image is rounded to the nearest integer,
  clipped to [0, 255] and stored as uint8.
- Placement is joint rejection sampling: all centres are proposed together and the whole proposal is
  rejected unless every pair is far enough apart, so a scene is uniform over the valid placements.
  Proposals are drawn in vectorised batches; the first valid proposal of the stream is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import ConfigError

CANVAS = 256
SPLITS = ("train", "val", "test")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "diamond", "triangle", "hexagon", "star")
MIRRORS = ("h", "v")  # left-right and top-bottom reflections of training scenes (generate_dataset's mirrors)
SIZE_RADII = {"small": (12.0, 18.0), "large": (26.0, 36.0)}
SIZES = tuple(SIZE_RADII)
# The 48 "{colour} {shape}" classes, ordered by colour then shape (the OVSS class list).
CLASS_NAMES = tuple(f"{color} {shape}" for color in COLOR_NAMES for shape in SHAPES)

BACKGROUND_RANGE = (100, 160)
NOISE_SIGMA = 6.0
OBJECT_COUNT_RANGE = (2, 6)
ROTATION_RANGE = (-15.0, 15.0)
BORDER = 4.0  # centres keep r + 4 px from every edge
GAP = 6.0  # centre distance >= r1 + r2 + 6
STAR_INNER_RATIO = 0.45

_MAX_PROPOSALS_PER_BATCH = 16384


@dataclass(frozen=True, eq=False)
class SceneObject:
    """One flat-filled object; ``mask`` is (256, 256) bool, exactly the pixels painted with ``color``."""

    shape: str
    color: str
    size: str
    radius: float
    center: tuple[float, float]  # (cx, cy) in pixels, x right, y down
    rotation: float  # degrees, 0.0 for the circle
    mask: np.ndarray

    @property
    def category(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def category_index(self) -> int:
        """Position in :data:`CLASS_NAMES` (0..47)."""
        return CLASS_NAMES.index(self.category)


@dataclass(frozen=True, eq=False)
class Scene:
    """A generated image with its objects.

    ``clean_image`` is the (256, 256, 3) uint8 image before noise (flat background and objects);
    ``image`` is the noisy image that is saved and shown to models.
    """

    seed: int
    split: str
    index: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]
    clean_image: np.ndarray
    image: np.ndarray
    mirror: str = ""  # "" for a generated scene, "h" / "v" for its mirror image (:func:`mirror_scene`)

    @property
    def file_name(self) -> str:
        return image_file_name(self.split, self.index, self.mirror)


def image_file_name(split: str, index: int, mirror: str = "") -> str:
    return f"shapeworld_{split}_{index:06d}{f'_mirror_{mirror}' if mirror else ''}.png"


def check_mirrors(mirrors) -> tuple[str, ...]:
    """The mirror axes asked for (each of :data:`MIRRORS` at most once), else ConfigError naming ``mirrors``."""
    mirrors = tuple(mirrors or ())
    if any(axis not in MIRRORS for axis in mirrors) or len(set(mirrors)) != len(mirrors):
        raise ConfigError(f"mirrors: expected distinct axes among {', '.join(MIRRORS)}, got {list(mirrors)!r}")
    return mirrors


def mirror_scene(scene: Scene, axis: str) -> Scene:
    """The scene reflected left-right (``axis="h"``) or top-bottom (``"v"``): pixels, masks and centres.

    A pixel column i goes to CANVAS - 1 - i, so a continuous coordinate x (pixel i spans [i, i + 1))
    goes to CANVAS - x. Every shape's vertex angles are symmetric about the vertical axis (a and
    180 - a both occur), so a left-right reflection turns a rotation r into -r, and a top-bottom one
    (that reflection followed by a half turn) into 180 - r.
    """
    check_mirrors([axis])
    flip = np.fliplr if axis == "h" else np.flipud
    objects = []
    for obj in scene.objects:
        cx, cy = obj.center
        center = (CANVAS - cx, cy) if axis == "h" else (cx, CANVAS - cy)
        rotation = 0.0 if obj.shape == "circle" else (-obj.rotation if axis == "h" else 180.0 - obj.rotation) % 360.0
        objects.append(SceneObject(obj.shape, obj.color, obj.size, obj.radius, center, rotation, np.ascontiguousarray(flip(obj.mask))))
    return Scene(
        scene.seed, scene.split, scene.index, scene.background, tuple(objects),
        np.ascontiguousarray(flip(scene.clean_image)), np.ascontiguousarray(flip(scene.image)), axis,
    )


def split_code(split: str) -> int:
    """Position of ``split`` in :data:`SPLITS`; raises ConfigError for an unknown split."""
    if split not in SPLITS:
        raise ConfigError(f"split: unknown split {split!r}, expected one of {', '.join(SPLITS)}")
    return SPLITS.index(split)


def check_non_negative_int(value, name: str) -> int:
    """Return ``value`` if it is a non-negative int (bools rejected), else raise ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"{name}: expected a non-negative integer, got {value!r}")
    return int(value)


def vertex_angles(shape: str) -> np.ndarray:
    """Vertex angles in degrees (0 = +x, y down, so -90 points up) before rotation."""
    if shape == "square":
        return 45.0 + 90.0 * np.arange(4)
    if shape == "diamond":
        return 90.0 * np.arange(4)
    if shape == "triangle":
        return -90.0 + 120.0 * np.arange(3)
    if shape == "hexagon":
        return 60.0 * np.arange(6)
    if shape == "star":
        return -90.0 + 36.0 * np.arange(10)
    raise ValueError(f"shape {shape!r} has no vertices")


def polygon_vertices(shape: str, center: tuple[float, float], radius: float, rotation: float) -> np.ndarray:
    """(V, 2) vertices (x, y) of a polygonal shape on its bounding circle, rotated by ``rotation`` degrees."""
    angles = np.deg2rad(vertex_angles(shape) + rotation)
    radii = np.full(angles.shape, radius)
    if shape == "star":
        radii[1::2] = STAR_INNER_RATIO * radius
    return np.stack([center[0] + radii * np.cos(angles), center[1] + radii * np.sin(angles)], axis=1)


def rasterize(shape: str, center: tuple[float, float], radius: float, rotation: float) -> np.ndarray:
    """(256, 256) bool mask of the pixels whose centre lies inside the shape (see module docstring)."""
    centres = np.arange(CANVAS) + 0.5
    px, py = centres[None, :], centres[:, None]
    if shape == "circle":
        return (px - center[0]) ** 2 + (py - center[1]) ** 2 <= radius**2
    vertices = polygon_vertices(shape, center, radius, rotation)
    inside = np.zeros((CANVAS, CANVAS), dtype=bool)
    for (x1, y1), (x2, y2) in zip(vertices, np.roll(vertices, -1, axis=0)):
        if y1 == y2:
            continue  # a horizontal edge is never crossed by a horizontal ray
        crosses_row = (y1 > py) != (y2 > py)  # (256, 1)
        x_at_row = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses_row & (px < x_at_row)
    return inside


def _place_centres(rng: np.random.Generator, radii: np.ndarray) -> np.ndarray:
    """(N, 2) centres, uniform over the placements with every pair >= r1 + r2 + 6 apart."""
    low = (radii + BORDER)[:, None]
    high = (CANVAS - radii - BORDER)[:, None]
    first, second = np.triu_indices(len(radii), k=1)
    min_distance = radii[first] + radii[second] + GAP
    batch = 256
    while True:
        proposals = rng.uniform(low, high, size=(batch, len(radii), 2))
        distances = np.linalg.norm(proposals[:, first] - proposals[:, second], axis=-1)
        valid = (distances >= min_distance).all(axis=1)
        if valid.any():
            return proposals[int(np.argmax(valid))]
        batch = min(4 * batch, _MAX_PROPOSALS_PER_BATCH)


def generate_scene(seed: int, split: str, index: int, exclude: frozenset[str] = frozenset()) -> Scene:
    """Sample scene ``index`` of ``split`` for ``seed``; the same arguments always give the same scene.

    ``exclude``: "{colour} {shape}" classes that must not appear (ShapeWorld-OVSS's training split):
    an object drawn as one of them draws its shape and colour again until it is not, so its class is
    uniform over the others and the object count keeps its distribution. Empty: the stream is
    untouched (RES / GRES scenes do not change).
    """
    seed = check_non_negative_int(seed, "seed")
    index = check_non_negative_int(index, "index")
    rng = np.random.default_rng([seed, split_code(split), index])

    background = tuple(int(v) for v in rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1, size=3))
    count = int(rng.integers(OBJECT_COUNT_RANGE[0], OBJECT_COUNT_RANGE[1] + 1))
    attributes = []
    for _ in range(count):
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
        while f"{color} {shape}" in exclude:
            shape = SHAPES[rng.integers(len(SHAPES))]
            color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
        size = SIZES[rng.integers(len(SIZES))]
        radius = float(rng.uniform(*SIZE_RADII[size]))
        rotation = 0.0 if shape == "circle" else float(rng.uniform(*ROTATION_RANGE))
        attributes.append((shape, color, size, radius, rotation))
    centres = _place_centres(rng, np.array([radius for _, _, _, radius, _ in attributes]))

    clean = np.empty((CANVAS, CANVAS, 3), dtype=np.uint8)
    clean[:] = background
    objects = []
    for (shape, color, size, radius, rotation), (cx, cy) in zip(attributes, centres):
        center = (float(cx), float(cy))
        mask = rasterize(shape, center, radius, rotation)
        clean[mask] = COLORS[color]
        objects.append(SceneObject(shape, color, size, radius, center, rotation, mask))

    noise = rng.normal(0.0, NOISE_SIGMA, size=clean.shape)
    image = np.clip(np.rint(clean + noise), 0, 255).astype(np.uint8)
    return Scene(seed, split, index, background, tuple(objects), clean, image)
