"""Class-name lists: the vocabulary an OVSS model is asked about, and the meaning of each label value.

A list is given in a dataset config's ``classes`` key as

- the name of a list shipped with the package (``ssp_sam/ovss/classes/<name>.json``): "ade150",
  "ade847", "coco_stuff171", "pc59", "pc459", "voc20", "voc20b" (the lists CAT-Seg prompts with,
  kept verbatim, e.g. ADE20K-150's "bed " with its trailing space);
- a path to a JSON file holding a list of names, or an object with a "classes" list (and, for a
  zero-shot split such as ShapeWorld-OVSS, an "unseen_classes" list);
- an inline list of names.

Label value i means ``classes[i]``. A list must be non-empty, every name a non-blank string, and no
name may occur twice (two text embeddings for one name would split its pixels between two labels).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ...errors import DatasetError

SHIPPED_LISTS = ("ade150", "ade847", "coco_stuff171", "pc59", "pc459", "voc20", "voc20b")


@dataclass(frozen=True)
class ClassList:
    """Names in label order, and the names held out of training (empty unless the source says so)."""

    names: tuple[str, ...]
    unseen: tuple[str, ...] = ()


def shipped_class_names(name: str) -> tuple[str, ...]:
    """A list shipped in ``ssp_sam/ovss/classes/`` by name (see :data:`SHIPPED_LISTS`)."""
    if name not in SHIPPED_LISTS:
        raise DatasetError(f"classes: unknown class list {name!r}; shipped lists: {', '.join(SHIPPED_LISTS)}")
    text = resources.files("ssp_sam.ovss").joinpath("classes", f"{name}.json").read_text(encoding="utf-8")
    return check_class_names(json.loads(text), f"shipped class list {name}")


def check_class_names(names: Any, source: str) -> tuple[str, ...]:
    """``names`` as a tuple after checking it is a non-empty list of distinct, non-blank strings.

    Raises:
        DatasetError: naming ``source`` (a file or config key) and the first offending entry.
    """
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise DatasetError(f"{source}: expected a list of class names, got {type(names).__name__}")
    if not names:
        raise DatasetError(f"{source}: empty class list")
    seen: dict[str, int] = {}
    for position, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{source}: class {position} must be a non-blank string, got {name!r}")
        if name in seen:
            raise DatasetError(f"{source}: duplicate class name {name!r} (positions {seen[name]} and {position})")
        seen[name] = position
    return tuple(names)


def first_synonym(name: str) -> str:
    """The part of a class name the text encoder is given: its first synonym ("tv, television" -> "tv")."""
    return name.split(", ")[0].strip()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: class list file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable JSON class list ({exc})") from exc


def load_class_list(spec: Any, key: str = "classes") -> ClassList:
    """Resolve a config's ``classes`` value (shipped name, JSON path or inline list); see the module docstring."""
    if isinstance(spec, str) and spec in SHIPPED_LISTS:
        return ClassList(shipped_class_names(spec))
    if isinstance(spec, str):
        if not spec.endswith(".json"):
            raise DatasetError(
                f"{key}: {spec!r} is neither a shipped class list ({', '.join(SHIPPED_LISTS)}) nor a .json file"
            )
        path = Path(spec)
        content = _read_json(path)
        if isinstance(content, dict):
            if "classes" not in content:
                raise DatasetError(f"{path}: a JSON object class list needs a 'classes' key")
            names = check_class_names(content["classes"], f"{path} key 'classes'")
            unseen = content.get("unseen_classes", [])
            if unseen:
                unseen = check_class_names(unseen, f"{path} key 'unseen_classes'")
                unknown = [name for name in unseen if name not in names]
                if unknown:
                    raise DatasetError(f"{path} key 'unseen_classes': {unknown[0]!r} is not in 'classes'")
            return ClassList(names, tuple(unseen))
        return ClassList(check_class_names(content, str(path)))
    return ClassList(check_class_names(spec, key))
