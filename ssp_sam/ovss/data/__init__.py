"""OVSS datasets: label-map folders with a class list (every benchmark as prepared, and users' own data).

``load_ovss_dataset(cfg)`` builds a :class:`SemSegDataset` from a ``configs/ovss_dataset/*.yaml``
config; its items are (image, label) tensors and its ``class_names`` the vocabulary.
"""

from .classes import SHIPPED_LISTS, ClassList, check_class_names, load_class_list, shipped_class_names
from .dataset import IGNORE_INDEX, SemSegDataset, SemSegSample, pair_files, read_label_map
from .registry import load_ovss_dataset

__all__ = [
    "IGNORE_INDEX",
    "SHIPPED_LISTS",
    "ClassList",
    "SemSegDataset",
    "SemSegSample",
    "check_class_names",
    "load_class_list",
    "load_ovss_dataset",
    "pair_files",
    "read_label_map",
    "shipped_class_names",
]
