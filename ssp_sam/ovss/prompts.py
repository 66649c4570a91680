"""Prompt templates of the class texts (data files in ``ssp_sam/ovss/templates/``) and the texts they give.

``single.json`` is CAT-Seg's single template, ``imagenet80.json`` CLIP's 80 ImageNet templates (the
"imagenet" ensemble of CAT-Seg and of CLIP's zero-shot notebook). A class name listing synonyms
("tv, television") is read by its first synonym, as CAT-Seg's text encoder does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

from ..errors import ConfigError


@lru_cache(maxsize=None)
def load_templates(name: str) -> tuple[str, ...]:
    """The template strings of ``templates/<name>.json``, each holding one "{}" for the class name."""
    try:
        text = resources.files("ssp_sam.ovss").joinpath("templates", f"{name}.json").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"ovss_model.clip.templates: no template set {name!r} (ssp_sam/ovss/templates/)") from None
    templates = json.loads(text)
    if not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
        raise ConfigError(f"ssp_sam/ovss/templates/{name}.json: expected a list of strings with one '{{}}' each")
    return tuple(templates)


def class_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """The T x P texts, class-major: text ``t * P + p`` is template p filled with class t's first synonym.

    Raises:
        ConfigError: an empty class list, an empty name or a duplicate name (each named).
    """
    if isinstance(class_names, str) or not class_names:
        raise ConfigError("classes: an empty class list (give at least one class name)")
    seen: set[str] = set()
    texts = []
    for index, name in enumerate(class_names):
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"classes: class {index} is not a non-empty string: {name!r}")
        if name in seen:
            raise ConfigError(f"classes: duplicate class name {name!r}")
        seen.add(name)
        first_synonym = name.split(", ")[0].strip()
        texts.extend(template.format(first_synonym) for template in templates)
    return texts
