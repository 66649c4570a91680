"""CLIP weight files: reading every accepted format without running code, and saying what a file holds.

Accepted: OpenAI's TorchScript ``.pt`` (read by :mod:`ssp_sam.safe_pickle`, never by ``torch.jit``),
a plain or OpenAI state dict, an open_clip training checkpoint ({"state_dict": ...}, "module."
prefixes allowed) and ``.safetensors``. A file that does not fit the requested architecture is
refused with a line naming its format and the CLIP ViT its shapes describe (or the other model it is).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import open_clip
from torch import Tensor, nn

from ..errors import CheckpointError
from ..safe_pickle import is_torchscript_archive
from ..state_dicts import mismatch_report
from ..weight_files import describe_weights, read_weights, require_finite

# Released CLIP ViTs a weight file is recognised as (open_clip's names), by their vision shapes.
_KNOWN_VITS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-g-14", "ViT-bigG-14")
# Scalars stored in OpenAI's state dicts that are not weights of the model.
_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
_SHOWN_KEYS = 3


def load_clip_weights(model: nn.Module, checkpoint: str | os.PathLike, arch: str) -> None:
    """Load a CLIP weight file into ``model`` (an open_clip CLIP of ``arch``), checking every key,
    shape and value.

    Raises:
        CheckpointError: one line naming the file: unreadable, of another model or architecture
            (which one is said), or holding NaN / Inf.
    """
    path = Path(checkpoint)
    state_dict, file_format = read_clip_state_dict(path)
    _check_fit(state_dict, model, path, arch, file_format)
    require_finite(state_dict, path)
    model.load_state_dict(state_dict)


def read_clip_state_dict(path: Path) -> tuple[dict[str, Tensor], str]:
    """Read any of the supported checkpoint formats into a flat {key: tensor} dict on the CPU.

    Nothing in the file is run (:func:`ssp_sam.weight_files.read_weights`); OpenAI's TorchScript
    archives are read by the restricted reader of :mod:`ssp_sam.safe_pickle`.

    Returns:
        The state dict and the file's format, for messages ("a TorchScript archive (OpenAI's format)", ...).
    """
    loaded = read_weights(path, "CLIP checkpoint")
    if path.suffix == ".safetensors":
        file_format = "a safetensors file"
    elif is_torchscript_archive(path, "CLIP checkpoint"):
        file_format = "a TorchScript archive (OpenAI's format)"
    elif isinstance(loaded, Mapping) and "state_dict" in loaded:
        file_format = "an open_clip training checkpoint"
        loaded = loaded["state_dict"]
    else:
        file_format = "a state dict"
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in loaded.items()
    ):
        held = describe_weights(loaded)
        raise CheckpointError(f"{path}: {held or 'not a state dict of tensors'}, not a CLIP checkpoint")
    state_dict = {key.removeprefix("module."): value for key, value in loaded.items()}
    for key in _OPENAI_METADATA_KEYS:
        state_dict.pop(key, None)
    return state_dict, file_format


def _check_fit(state_dict: Mapping[str, Tensor], model: nn.Module, path: Path, arch: str, file_format: str) -> None:
    """Raise CheckpointError saying what the file holds and listing the first mismatched keys, if any."""
    report = mismatch_report(state_dict, model.state_dict(), first=("visual.",), limit=_SHOWN_KEYS)
    if report is None:
        return
    held = describe_clip_weights(state_dict) or describe_weights(state_dict) or "an unknown model"
    raise CheckpointError(f"{path}: {file_format} of {held}, not of CLIP {arch!r}: {report}")


def describe_clip_weights(state_dict: Mapping[str, Tensor]) -> str | None:
    """Which CLIP ViT a state dict holds, from its vision tower's shapes; None if it holds no CLIP ViT.

    e.g. "CLIP ViT-L-14-336 (visual width 1024, 24 blocks, patch 14, image size 336)", so a ViT-L
    file given for ViT-B-16 is recognised at once.
    """
    conv = state_dict.get("visual.conv1.weight")
    positions = state_dict.get("visual.positional_embedding")
    if conv is None or positions is None or conv.dim() != 4 or positions.dim() != 2:
        return None
    width, patch = conv.shape[0], conv.shape[-1]
    image_size = patch * math.isqrt(positions.shape[0] - 1)
    blocks = len({key.split(".")[3] for key in state_dict if key.startswith("visual.transformer.resblocks.")})
    sizes = f"visual width {width}, {blocks} blocks, patch {patch}, image size {image_size}"
    for name in _KNOWN_VITS:
        vision = open_clip.get_model_config(name)["vision_cfg"]
        if (vision["width"], vision["layers"], vision["patch_size"], vision["image_size"]) == (width, blocks, patch, image_size):
            return f"CLIP {name} ({sizes})"
    return f"a CLIP ViT of no released size ({sizes})"
