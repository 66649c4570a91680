"""From an OVSS dataset config (``configs/ovss_dataset/*.yaml``) to a :class:`SemSegDataset`.

Keys (folders relative to ``root`` unless absolute):

- ``name``: used in messages and result files.
- ``root``: the data folder (``$SSP_SAM_DATA``, default ``./data``).
- ``split``: the split's name; the official configs interpolate it into the folders.
- ``image_dir``, ``label_dir``: the split's images and label maps (same file stems).
- ``image_ext``, ``label_ext``: file endings, e.g. ".jpg" and ".png" (".tif" for ADE20K-847, PC-459).
- ``classes``: a shipped list name, a JSON file (relative to ``root``) or an inline list; see
  ``classes.py``. A JSON object may also list ``unseen_classes`` (ShapeWorld-OVSS).
- ``ignore_value``: label value of unlabelled pixels (255; 65535 for ADE20K-847; 459 for PC-459).
- optional ``background_from``: PAS-20b's rule (see ``SemSegDataset``); null otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ...data.registry import _get as config_value
from ...errors import ConfigError
from .classes import load_class_list
from .dataset import SemSegDataset, pair_files


def _int(cfg: Mapping, key: str, default: int | None = None, required: bool = True) -> int | None:
    value = config_value(cfg, key, default, required=required)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"ovss dataset config: key '{key}' must be a non-negative integer, got {value!r}")
    return value


def load_ovss_dataset(cfg: Mapping, orphans: list[str] | None = None) -> SemSegDataset:
    """The split described by ``cfg`` (see the module docstring). ``orphans``: see :func:`pair_files`.

    Raises:
        ConfigError: a missing or malformed key.
        DatasetError: missing folders, labels without images, a bad class list (empty, duplicates).
    """
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"ovss dataset config must be a mapping, got {type(cfg).__name__}")
    root = Path(str(config_value(cfg, "root")))
    classes_spec = config_value(cfg, "classes")
    if isinstance(classes_spec, str) and classes_spec.endswith(".json"):
        classes_spec = str(root / classes_spec)
    classes = load_class_list(classes_spec, key="classes")
    pairs = pair_files(
        root / str(config_value(cfg, "image_dir")),
        root / str(config_value(cfg, "label_dir")),
        str(config_value(cfg, "image_ext")),
        str(config_value(cfg, "label_ext")),
        orphans,
    )
    return SemSegDataset(
        name=str(config_value(cfg, "name")),
        split=str(config_value(cfg, "split")),
        pairs=pairs,
        class_names=classes.names,
        ignore_value=_int(cfg, "ignore_value"),
        background_from=_int(cfg, "background_from", required=False),
        unseen_classes=classes.unseen,
    )
