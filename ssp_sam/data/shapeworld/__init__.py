"""ShapeWorld-Ref v1: the synthetic referring-segmentation benchmark of /specs/shapeworld.md.

``generate_scene(seed, split, index)`` samples one image with its objects and masks,
``generate_refs(scene, task)`` its referring expressions, and ``generate_dataset(out, task, n_images, seed)``
writes a whole dataset in the RefCOCO (task="res") or gRefCOCO (task="gres") layout;
``generate_ovss_dataset(out, n_images, seed)`` writes ShapeWorld-OVSS (label maps, 12 unseen classes).
"""

from .dataset import GENERATOR_VERSION, SPEC_VERSION, dataset_config, existing_task, generate_dataset
from .expressions import KIND_PROPORTIONS, TASKS, Expression, Ref, generate_refs
from .ovss import UNSEEN_CLASSES, generate_ovss_dataset
from .scene import CLASS_NAMES, COLORS, SHAPES, SIZE_RADII, SPLITS, Scene, SceneObject, generate_scene

__all__ = [
    "CLASS_NAMES",
    "COLORS",
    "GENERATOR_VERSION",
    "KIND_PROPORTIONS",
    "SHAPES",
    "SIZE_RADII",
    "SPEC_VERSION",
    "SPLITS",
    "UNSEEN_CLASSES",
    "TASKS",
    "Expression",
    "Ref",
    "Scene",
    "SceneObject",
    "dataset_config",
    "existing_task",
    "generate_dataset",
    "generate_ovss_dataset",
    "generate_refs",
    "generate_scene",
]
