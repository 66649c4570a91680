"""ShapeWorld-Ref v1 referring expressions: every valid expression of a scene, and the sampling of refs.

Expression kinds (spec page, "Expressions"):
- A "the {desc}" where desc identifies the target (one of six identifying forms);
- L "the {desc} on the {side}" / "the {side}most {desc}": desc matches >= 2 objects and the target's
  centre is extreme along that axis by >= 16 px over the next matching object;
- R "the {desc1} {relation} the {desc2}": desc2 identifies the anchor and exactly one other object
  matching desc1 satisfies the relation (centre offset beyond +-8 px);
- M (GRES) "all {color} shapes" / "all {shape}s" / "the {color} {shape}s" / "all {size} shapes" for >= 2
  objects, all of them the target;
- N (GRES) "the {color} {shape}" / "the {size} {color} {shape}" / "all {color} shapes" matching nothing.
A desc is a shape noun or "shape" with an optional colour and an optional size, in the order
"{size} {color} {noun}". Positions are object centres.

Sampling refs for a scene (the spec leaves it open; see :func:`sample_refs`): a ref is a target set (one
object for A/L/R, two or more for M, none for N) with 1 to 3 sentences. The scene gets
S = sum over its objects of U{1, 2, 3} sentences whose kinds are drawn i.i.d. from the task's
proportions, so the proportions hold exactly in expectation as long as every drawn kind can be placed.
Kinds are placed scarcest first (L, R, M, A, N); each goes to a target set drawn uniformly among those
that still have an unused expression of that kind and fewer than 3 sentences, and then to one of that
set's unused expressions, choosing the form first and then the expression within the form, uniformly.
When no target set can take the drawn kind, the kind is redrawn from the proportions restricted to the
kinds that can still be placed; this is the only deviation from the nominal proportions (rare: L is
the kind most often unavailable). No-target sentences are grouped into refs of up to 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import ConfigError
from .scene import COLOR_NAMES, SHAPES, SIZES, Scene, SceneObject, split_code

TASKS = ("res", "gres")
KIND_PROPORTIONS = {
    "res": {"A": 0.50, "L": 0.25, "R": 0.25},
    "gres": {"A": 0.40, "L": 0.15, "R": 0.15, "M": 0.15, "N": 0.15},
}
PLACEMENT_ORDER = ("L", "R", "M", "A", "N")  # scarcest kinds are placed first
MAX_SENTENCES_PER_REF = 3
EXTREME_MARGIN = 16.0
RELATION_MARGIN = 8.0

# The identifying forms of A, as the attributes they name; "shape" here is the shape noun.
ATTRIBUTE_FORMS = (
    ("shape",),
    ("color", "shape"),
    ("size", "shape"),
    ("size", "color", "shape"),
    ("color",),
    ("size", "color"),
)
# side -> (axis, sign making the extreme object the smallest key, superlative)
SIDES = {
    "left": (0, 1.0, "leftmost"),
    "right": (0, -1.0, "rightmost"),
    "top": (1, 1.0, "topmost"),
    "bottom": (1, -1.0, "bottommost"),
}
# relation -> (axis, sign): the target satisfies it iff sign * (target - anchor) > 8 along axis.
RELATIONS = {"left of": (0, -1.0), "right of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}
# Random streams of the expressions, distinct from the scene's so RES and GRES share their images.
_TASK_STREAMS = {"res": 1, "gres": 2}


@dataclass(frozen=True)
class Desc:
    """A description: attributes left as None are not constrained (a None shape reads "shape")."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        return (
            (self.shape is None or obj.shape == self.shape)
            and (self.color is None or obj.color == self.color)
            and (self.size is None or obj.size == self.size)
        )

    def text(self, plural: bool = False) -> str:
        noun = (self.shape or "shape") + ("s" if plural else "")
        return " ".join(word for word in (self.size, self.color, noun) if word)

    def form(self) -> str:
        """The template, e.g. "{size} {color} shape"."""
        return Desc(
            "{shape}" if self.shape else None, "{color}" if self.color else None, "{size}" if self.size else None
        ).text()


@dataclass(frozen=True)
class Expression:
    """A sentence with its kind, template and target objects (indices into the scene; () = no target)."""

    text: str
    kind: str
    form: str
    targets: tuple[int, ...]


@dataclass(frozen=True)
class Ref:
    """A target set (object indices, sorted; () for no target) and its 1 to 3 sentences."""

    targets: tuple[int, ...]
    sentences: tuple[Expression, ...]


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ConfigError(f"task: unknown task {task!r}, expected one of {', '.join(TASKS)}")
    return task


def _descs_of(obj: SceneObject) -> list[Desc]:
    """The 8 descriptions that match ``obj`` (each attribute named or not), in a fixed order."""
    return [
        Desc(shape, color, size)
        for shape in (obj.shape, None)
        for color in (obj.color, None)
        for size in (obj.size, None)
    ]


def _matching(desc: Desc, objects: tuple[SceneObject, ...]) -> tuple[int, ...]:
    return tuple(i for i, obj in enumerate(objects) if desc.matches(obj))


def _attribute_expressions(objects: tuple[SceneObject, ...]) -> list[Expression]:
    expressions = []
    for index, obj in enumerate(objects):
        for names in ATTRIBUTE_FORMS:
            desc = Desc(*(getattr(obj, name) if name in names else None for name in ("shape", "color", "size")))
            if _matching(desc, objects) == (index,):
                expressions.append(Expression(f"the {desc.text()}", "A", f"the {desc.form()}", (index,)))
    return expressions


def _location_expressions(objects: tuple[SceneObject, ...], descs: dict[Desc, tuple[int, ...]]) -> list[Expression]:
    expressions = []
    for desc, members in descs.items():
        if len(members) < 2:
            continue
        for side, (axis, sign, superlative) in SIDES.items():
            keys = sorted((sign * objects[i].center[axis], i) for i in members)
            if keys[1][0] - keys[0][0] >= EXTREME_MARGIN:
                target = (keys[0][1],)
                expressions.append(
                    Expression(f"the {desc.text()} on the {side}", "L", f"the {desc.form()} on the {{side}}", target)
                )
                expressions.append(
                    Expression(f"the {superlative} {desc.text()}", "L", f"the {{side}}most {desc.form()}", target)
                )
    return expressions


@dataclass(frozen=True)
class LocationReading:
    """What an L sentence asks among a scene's objects: the side, the objects its description fits
    (sorted from the asked extreme to the opposite one), so ``candidates[0]`` is the target and
    ``candidates[-1]`` the object at the other end."""

    side: str
    candidates: tuple[int, ...]


def read_location(text: str, objects: tuple[SceneObject, ...]) -> LocationReading:
    """Parse an L sentence ("the {desc} on the {side}" / "the {side}most {desc}") back into its side and
    the objects its description fits, ordered along the side's axis (error analysis of location)."""
    words = text.split(" ")
    if len(words) >= 5 and words[-3:-1] == ["on", "the"] and words[-1] in SIDES:
        side, desc_words = words[-1], words[1:-3]
    elif len(words) >= 3 and words[1].endswith("most") and words[1][: -len("most")] in SIDES:
        side, desc_words = words[1][: -len("most")], words[2:]
    else:
        raise ValueError(f"not a location sentence: {text!r}")
    noun, modifiers = desc_words[-1], desc_words[:-1]
    desc = Desc(
        shape=None if noun == "shape" else noun,
        color=next((word for word in modifiers if word in COLOR_NAMES), None),
        size=next((word for word in modifiers if word in SIZES), None),
    )
    axis, sign, _ = SIDES[side]
    members = sorted(_matching(desc, objects), key=lambda i: sign * objects[i].center[axis])
    return LocationReading(side, tuple(members))


def subkind(expression: Expression, objects: tuple[SceneObject, ...]) -> str:
    """The sentence's kind, with location split by whether the description matters (a dataset annotation,
    read by ``train.expression_weight_key=subkind``): "L-shortcut" when the target is also the extreme
    of the whole scene on the asked side, so that the side word alone finds it (about 60 % of the L
    sentences), "L-described" when another object lies further out and only the description rules it
    out. A model that learnt the shortcut fails the second kind (docs/shapeworld_model.md, "Anatomy
    of the remaining L errors")."""
    if expression.kind != "L":
        return expression.kind
    axis, sign, _ = SIDES[read_location(expression.text, objects).side]
    scene_extreme = min(range(len(objects)), key=lambda i: sign * objects[i].center[axis])
    return "L-shortcut" if scene_extreme == expression.targets[0] else "L-described"


def _relation_expressions(objects: tuple[SceneObject, ...], descs: dict[Desc, tuple[int, ...]]) -> list[Expression]:
    expressions = []
    anchors = [(members[0], desc) for desc, members in descs.items() if len(members) == 1]
    for anchor, anchor_desc in anchors:
        for desc, members in descs.items():
            others = [i for i in members if i != anchor]
            for relation, (axis, sign) in RELATIONS.items():
                satisfying = [
                    i for i in others if sign * (objects[i].center[axis] - objects[anchor].center[axis]) > RELATION_MARGIN
                ]
                if len(satisfying) == 1:
                    text = f"the {desc.text()} {relation} the {anchor_desc.text()}"
                    form = f"the {{desc1}} {relation} the {{desc2}}"
                    expressions.append(Expression(text, "R", form, (satisfying[0],)))
    return expressions


def _multi_target_expressions(objects: tuple[SceneObject, ...]) -> list[Expression]:
    candidates = []
    for color in COLOR_NAMES:
        candidates.append((f"all {Desc(color=color).text(plural=True)}", "all {color} shapes", Desc(color=color)))
    for shape in SHAPES:
        candidates.append((f"all {Desc(shape=shape).text(plural=True)}", "all {shape}s", Desc(shape=shape)))
    for color in COLOR_NAMES:
        for shape in SHAPES:
            desc = Desc(shape, color)
            candidates.append((f"the {desc.text(plural=True)}", "the {color} {shape}s", desc))
    for size in SIZES:
        candidates.append((f"all {Desc(size=size).text(plural=True)}", "all {size} shapes", Desc(size=size)))
    expressions = []
    for text, form, desc in candidates:
        members = _matching(desc, objects)
        if len(members) >= 2:
            expressions.append(Expression(text, "M", form, members))
    return expressions


def _no_target_expressions(objects: tuple[SceneObject, ...]) -> list[Expression]:
    candidates = []
    for color in COLOR_NAMES:
        for shape in SHAPES:
            candidates.append((f"the {Desc(shape, color).text()}", "the {color} {shape}", Desc(shape, color)))
    for size in SIZES:
        for color in COLOR_NAMES:
            for shape in SHAPES:
                desc = Desc(shape, color, size)
                candidates.append((f"the {desc.text()}", "the {size} {color} {shape}", desc))
    for color in COLOR_NAMES:
        candidates.append((f"all {Desc(color=color).text(plural=True)}", "all {color} shapes", Desc(color=color)))
    return [Expression(text, "N", form, ()) for text, form, desc in candidates if not _matching(desc, objects)]


def enumerate_expressions(objects: tuple[SceneObject, ...], task: str) -> list[Expression]:
    """Every valid expression of the task's kinds for these objects, in a fixed order."""
    descs: dict[Desc, tuple[int, ...]] = {}  # insertion-ordered, so the order never depends on hashing
    for obj in objects:
        for desc in _descs_of(obj):
            descs.setdefault(desc, _matching(desc, objects))
    expressions = (
        _attribute_expressions(objects)
        + _location_expressions(objects, descs)
        + _relation_expressions(objects, descs)
    )
    if check_task(task) == "gres":
        expressions += _multi_target_expressions(objects) + _no_target_expressions(objects)
    return expressions


def _draw_from_form(pool: list[Expression], rng: np.random.Generator) -> Expression:
    """Remove and return an expression of ``pool``: a form uniformly, then an expression of that form."""
    forms = list(dict.fromkeys(expression.form for expression in pool))
    form = forms[rng.integers(len(forms))]
    positions = [i for i, expression in enumerate(pool) if expression.form == form]
    return pool.pop(positions[rng.integers(len(positions))])


def sample_refs(objects: tuple[SceneObject, ...], task: str, rng: np.random.Generator) -> list[Ref]:
    """Draw the refs of a scene (allocation rule in the module docstring)."""
    proportions = KIND_PROPORTIONS[check_task(task)]
    pools: dict[tuple[int, ...], dict[str, list[Expression]]] = {}
    for expression in enumerate_expressions(objects, task):
        pools.setdefault(expression.targets, {}).setdefault(expression.kind, []).append(expression)
    units = sorted(pools)
    assigned: dict[tuple[int, ...], list[Expression]] = {unit: [] for unit in units}

    def open_units(kind: str) -> list[tuple[int, ...]]:
        return [
            unit
            for unit in units
            if pools[unit].get(kind) and (unit == () or len(assigned[unit]) < MAX_SENTENCES_PER_REF)
        ]

    kinds = list(proportions)
    count = int(rng.integers(1, MAX_SENTENCES_PER_REF + 1, size=len(objects)).sum())
    drawn = rng.choice(kinds, size=count, p=[proportions[kind] for kind in kinds])
    for kind in sorted((str(kind) for kind in drawn), key=PLACEMENT_ORDER.index):
        candidates = open_units(kind)
        if not candidates:
            open_kinds = [k for k in kinds if open_units(k)]
            if not open_kinds:
                break
            weights = np.array([proportions[k] for k in open_kinds])
            kind = open_kinds[rng.choice(len(open_kinds), p=weights / weights.sum())]
            candidates = open_units(kind)
        unit = candidates[rng.integers(len(candidates))]
        assigned[unit].append(_draw_from_form(pools[unit][kind], rng))

    refs = []
    for unit in units:
        sentences = assigned[unit]
        for start in range(0, len(sentences), MAX_SENTENCES_PER_REF):
            chunk = sentences[start : start + MAX_SENTENCES_PER_REF]
            refs.append(Ref(unit, tuple(chunk[i] for i in rng.permutation(len(chunk)))))
    return refs


# The words a reflection turns into their opposites (every spatial word of the templates above).
MIRRORED_WORDS = {
    "h": {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"},
    "v": {"top": "bottom", "bottom": "top", "topmost": "bottommost", "bottommost": "topmost", "above": "below", "below": "above"},
}


def mirror_text(text: str, axis: str) -> str:
    """``text`` with its spatial words swapped for the reflection ``axis`` ("h" or "v"), word by word."""
    swaps = MIRRORED_WORDS[axis]
    return " ".join(swaps.get(word, word) for word in text.split(" "))


def mirror_refs(refs: list[Ref], axis: str) -> list[Ref]:
    """The refs of a scene, reworded for its mirror image (:func:`~.scene.mirror_scene`): same targets.

    The templates' conditions are symmetric (margins on centre differences), so every reworded
    sentence is one the generator could have written for the mirrored scene, with the same targets.
    """
    return [
        Ref(ref.targets, tuple(Expression(mirror_text(e.text, axis), e.kind, mirror_text(e.form, axis), e.targets) for e in ref.sentences))
        for ref in refs
    ]


def generate_refs(scene: Scene, task: str) -> list[Ref]:
    """The refs of ``scene`` for ``task``, from the stream (seed, split, index, task)."""
    stream = _TASK_STREAMS[check_task(task)]
    rng = np.random.default_rng([scene.seed, split_code(scene.split), scene.index, stream])
    return sample_refs(scene.objects, task, rng)
