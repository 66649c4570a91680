"""Opening weight files: every format the code accepts, read without running anything in them.

One entry point, :func:`read_weights`, for every weight file ``ssp_sam`` opens (CLIP, SAM, released
SSP-SAM files, our trainer state, the pretraining outputs):

- ``.safetensors``: ``safetensors.torch.load_file`` (tensors only by construction);
- TorchScript archives (OpenAI's CLIP ``.pt``): :func:`ssp_sam.safe_pickle.read_torchscript_state_dict`,
  which never runs the archive's code;
- everything else: ``torch.load(weights_only=True)``, torch's own restricted unpickler, with extra
  classes allowed only where a caller names them (``argparse.Namespace`` for the release files).

Also here: :func:`require_finite` (a NaN or Inf weight is refused, naming the file and key) and
:func:`describe_weights`, which says what kind of model a loaded file holds, for the messages of a
loader given the file of another model.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from .errors import CheckpointError, first_line
from .safe_pickle import is_torchscript_archive, read_torchscript_state_dict

_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def read_weights(
    path: str | os.PathLike, what: str, allowed_classes: Sequence[type] = (), mmap: bool = False
) -> Any:
    """Load a weight file of any accepted format without executing code from it.

    Args:
        path: the file.
        what: what the file should be ("SAM checkpoint", ...), for the messages.
        allowed_classes: classes a torch pickle may hold besides tensors and plain containers
            (torch's weights_only set); nothing else is ever allowed.
        mmap: memory-map torch zip files, so only the tensors used are read from disk.

    Returns:
        What the file holds: a state dict for safetensors and TorchScript files, else the unpickled
        object (tensors, plain containers and ``allowed_classes`` instances).

    Raises:
        CheckpointError: one line naming the file, when it is missing, empty, unreadable, or holds
            anything else.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: {what} not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: {what} file is empty (0 bytes)")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(error)})") from None
    if is_torchscript_archive(path, what):  # refuses a zip whose directory is damaged
        return read_torchscript_state_dict(path)
    try:
        with torch.serialization.safe_globals(list(allowed_classes)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        refused = _REFUSED_GLOBAL.search(str(error))
        if refused is None:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({first_line(error)})") from None
        name = refused.group(1)
        if name == "argparse.Namespace":  # a training script's run arguments beside the weights
            raise CheckpointError(
                f"{path}: holds a training run's arguments (argparse.Namespace), as SSP-SAM release checkpoints "
                f"do; expected a {what} (nothing was run)"
            ) from None
        allowed = "".join(f", {cls.__module__}.{cls.__qualname__}" for cls in allowed_classes)
        raise CheckpointError(
            f"{path}: refused, the pickle asks for {name} (a weight file may hold only tensors, "
            f"plain containers{allowed}; nothing was run)"
        ) from None
    except Exception as error:  # torch.load raises many types (IndexError, RuntimeError, ...) on foreign files
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({first_line(error)})") from None


def require_finite(tensors: Mapping[str, Tensor], source: str | os.PathLike) -> None:
    """Refuse weights holding NaN or Inf (a diverged run or a damaged file), naming the first such key.

    Raises:
        CheckpointError: "<file>: weight '<key>' holds N NaN/Inf values of M".
    """
    for key, tensor in tensors.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise CheckpointError(
                f"{source}: weight {key!r} holds {bad} NaN/Inf values of {tensor.numel()} "
                "(a diverged run or a damaged file); refusing to load it"
            )


def _has(keys: Sequence[str], *prefixes: str) -> bool:
    return any(key.startswith(prefixes) for key in keys)


def describe_weights(loaded: Any) -> str | None:
    """Which kind of model a loaded weight file holds, from its keys alone; None if unknown.

    Used by a loader that was given the file of another model ("a SAM checkpoint", ...); the
    loaders of each kind say more (which SAM or CLIP variant) about files of their own kind.
    """
    if not isinstance(loaded, Mapping):
        return None
    if isinstance(loaded.get("model"), Mapping) and "args" in loaded:
        inner = describe_weights(loaded["model"])
        return f"a training checkpoint ({{'model', 'args', ...}}) of {inner}" if inner else None
    if isinstance(loaded.get("state_dict"), Mapping):
        inner = describe_weights(loaded["state_dict"])
        return f"an open_clip training checkpoint of {inner}" if inner else None
    keys = [key.removeprefix("module.") for key in loaded if isinstance(key, str)]
    if _has(keys, "vl_transformer.", "clip_proj.", "sam.mask_decoder."):
        return "an SSP-SAM model in the release's layout"
    if _has(keys, "word_proj.", "mask_head.", "prompt_generator."):
        return "an ssp_sam model"
    if _has(keys, "image_encoder.", "prompt_encoder.", "mask_decoder."):
        return "a SAM model"
    if _has(keys, "vision_model.", "text_model."):
        return "a Hugging Face transformers CLIP (vision_model.* / text_model.* keys)"
    if _has(keys, "visual.") and _has(keys, "text."):
        return "an open_clip CustomTextCLIP (text.* keys)"
    if _has(keys, "visual.") and _has(keys, "token_embedding.", "transformer."):
        return "a CLIP model (OpenAI / open_clip key names)"
    return None
