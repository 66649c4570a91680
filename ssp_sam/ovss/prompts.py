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
from .data.classes import check_class_names, first_synonym


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
        DatasetError: an empty class list, a blank name or a duplicate name (``check_class_names``).
    """
    names = check_class_names(class_names, "classes")
    return [template.format(first_synonym(name)) for name in names for template in templates]
