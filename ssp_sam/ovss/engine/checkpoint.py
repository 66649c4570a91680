"""Saving and loading a trained OVSS model (CAT-Seg, CAT-Seg + SAM vote, SAM-MI): one place for both.

A checkpoint is a directory, as for SSP-SAM (``ssp_sam/checkpoint.py``)::

    <dir>/model.safetensors   the weights (see below what is left out)
    <dir>/config.json         {"format": "ssp_sam.ovss", "ovss_model": the OVSSModelConfig,
                               "class_names": the training vocabulary, + the run's entries
                               (a training run's: "dataset_class_names", its dataset's whole list)}
    <dir>/trainer_state.pt    training runs' last/ only: optimizer, schedule, RNG, iteration
                              (tensors and plain containers: loads with weights_only=True)

What the weights hold: everything trained (CAT-Seg's modules, TSPP, DMI, CLIP's q/v and position
embeddings). The frozen encoders are stored only when no weight file names them: CLIP's frozen
weights when ``clip.checkpoint`` is null, SAM (``proposer.*``) when ``sam.checkpoint`` is null, or
both with ``embed_encoders=True`` (which also drops the files' paths from the stored config, so the
directory is self-contained, as the shipped ShapeWorld model must be). A ViT-L CLIP or a SAM ViT-H is
not copied into every checkpoint of a run: they come from their own files at load time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ...checkpoint import CONFIG_FILE, TRAINER_STATE_FILE, WEIGHTS_FILE, read_config_file
from ...errors import CheckpointError
from ...fileio import atomic_directory
from ...state_dicts import differs_under, mismatch_report
from ...weight_files import read_weights, require_finite
from ...weight_identity import check_weight_files, weight_file_record
from ..build import build_ovss_model
from ..catseg.decoder import UpBlock
from ..model import OVSSModel
from ..model_config import OVSSModelConfig, ovss_config_from

FORMAT = "ssp_sam.ovss"

CLIP_PREFIX = "catseg.clip.clip."
SAM_PREFIX = "proposer."
SAM_ENCODER_PREFIX = SAM_PREFIX + "image_encoder."
TSPP_PREFIX = "tspp."
SAM_MI_OWN_PREFIXES = ("low_frequency.", TSPP_PREFIX)  # SAM-MI's modules beside CAT-Seg's (DMI's low frequency, TSPP)
CATSEG_BASES = ("catseg", "catseg_sam_vote")  # variants whose trained weights are CAT-Seg's alone


@dataclass
class LoadedOVSSModel:
    """What :func:`load_ovss_model` returns."""

    model: OVSSModel  # on the requested device, in eval mode
    config: OVSSModelConfig  # as built (stored config + overrides)
    class_names: tuple[str, ...]  # the vocabulary it was trained on (a default; any list can be prompted)
    info: dict[str, Any]  # config.json's other entries (run config, iteration, metrics)


def weight_files_of(config: OVSSModelConfig) -> dict[str, str | None]:
    """``{config key: path}`` of the weight files the frozen CLIP and SAM come from (None: none).

    CAT-Seg alone builds no SAM: the SAM file its config may still name (the SAM-MI configs it shares)
    is not part of its model, so it is neither fingerprinted nor required (a CAT-Seg run once died at its
    first checkpoint because that unused file did not exist yet).
    """
    files = {"ovss_model.clip.checkpoint": config.clip.checkpoint}
    if config.uses_sam:
        files["ovss_model.sam.checkpoint"] = config.sam.checkpoint
    return files


def frozen_from_files(model: OVSSModel, config: OVSSModelConfig) -> set[str]:
    """State-dict keys whose values come from a weight file the config names (not stored, not required).

    CLIP's frozen weights when ``clip.checkpoint`` is set (its trained q/v and position embeddings are
    always stored), all of SAM when ``sam.checkpoint`` is set.
    """
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    keys = set()
    for key in model.state_dict():
        if config.clip.checkpoint is not None and key.startswith(CLIP_PREFIX) and key not in trained:
            keys.add(key)
        if config.sam.checkpoint is not None and key.startswith(SAM_PREFIX):
            keys.add(key)
    return keys


def save_ovss_checkpoint(
    model: OVSSModel,
    directory: str | os.PathLike,
    class_names: Sequence[str],
    extra: Mapping[str, Any] | None = None,
    embed_encoders: bool = False,
    trainer_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as ``directory`` (weights, config.json, optionally trainer_state.pt), atomically.

    Args:
        class_names: the vocabulary it was trained on (stored, returned by :func:`load_ovss_model`).
        extra: more JSON entries for config.json (the run config, iteration, metrics).
        embed_encoders: store the frozen encoders too and drop their file paths from the stored config.
        trainer_state: the trainer's resumable state (tensors and plain containers only).
    """
    config = model.config
    left_out = set() if embed_encoders else frozen_from_files(model, config)
    if embed_encoders:
        config = replace(config, clip=replace(config.clip, checkpoint=None), sam=replace(config.sam, checkpoint=None))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in left_out}
    stored = {
        "format": FORMAT, "ovss_model": config.to_dict(), "class_names": list(class_names),
        "weight_files": weight_file_record(weight_files_of(config)), **(extra or {}),
    }
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(stored, indent=2) + "\n")
        if trainer_state is not None:
            torch.save(dict(trainer_state), tmp / TRAINER_STATE_FILE)
    return Path(directory)


def embed_ovss_encoders(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the OVSS ``checkpoint`` again at ``out`` with its frozen CLIP and SAM stored in it.

    The OVSS counterpart of :func:`ssp_sam.checkpoint.embed_encoders` (a run trained with
    ``train.save_encoders=false``, made self-contained for shipping): read with its weight files, written
    with ``embed_encoders=True``, the class names, run config and metrics kept, ``out`` replaced
    atomically, no trainer state.
    """
    loaded = load_ovss_model(checkpoint)
    extra = {key: value for key, value in loaded.info.items() if key != "weight_files"}
    return save_ovss_checkpoint(loaded.model, out, loaded.class_names, extra=extra, embed_encoders=True)


def is_ovss_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory (or its model.safetensors) whose config.json says it holds an OVSS model."""
    path = Path(path)
    config = (path if path.is_dir() else path.parent) / CONFIG_FILE
    try:
        return json.loads(config.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_ovss_checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of an OVSS checkpoint (directory or its model.safetensors).

    Raises:
        CheckpointError: missing, unreadable, or not an OVSS checkpoint.
    """
    config_path, stored = read_config_file(path)
    if not isinstance(stored, dict) or stored.get("format") != FORMAT or not isinstance(stored.get("ovss_model"), dict):
        raise CheckpointError(f"{config_path}: not an OVSS checkpoint (no 'format': '{FORMAT}' with an 'ovss_model' section)")
    return stored


def default_class_names(path: str | os.PathLike) -> tuple[str, ...]:
    """The classes a checkpoint segments into when none are given: its training dataset's whole list.

    For a run trained inductively (``train.vocabulary=seen``) that is the training vocabulary plus the
    names held out of it, in the dataset's order: defaulting to the training vocabulary alone would label
    every unseen object with a seen name. Checkpoints from before 2026-12-01 store the training vocabulary
    only (``class_names``), which is then the answer. Empty when neither is stored.
    """
    stored = read_ovss_checkpoint_config(path)
    names = stored.get("dataset_class_names") or stored.get("class_names") or ()
    return tuple(str(name) for name in names)


def _weights_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / WEIGHTS_FILE if path.is_dir() else path


def read_ovss_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict of an OVSS checkpoint (directory or its model.safetensors), checked to be finite."""
    weights = _weights_file(path)
    state: dict[str, Tensor] = read_weights(weights, "OVSS checkpoint")
    require_finite(state, weights)
    return state


def sam_mi_start_from_catseg(state: Mapping[str, Tensor], model: OVSSModel) -> dict[str, Tensor]:
    """A trained CAT-Seg's weights (``state``) completed into the start of ``model``, a SAM-MI on that CAT-Seg.

    SAM-MI adds SAM's masks to CAT-Seg through parts whose outputs start at zero (DMI's low-frequency
    maps and the decoder's extra mask channels, ``sam_mi/dmi.py``), so a SAM-MI holding a CAT-Seg's weights
    and its own parts as initialised computes exactly that CAT-Seg's logits: training from there measures
    what the masks add to a converged CAT-Seg. Returned: ``state`` with SAM-MI's own modules (DMI,
    TSPP) taken from ``model`` and each decoder block's first convolution widened by the model's
    (zero) weights of the mask channels. Any other difference is left to :func:`load_ovss_weights`'s check.
    """
    own = model.state_dict()
    grown = dict(state)
    for name, module in model.named_modules():
        key = f"{name}.conv.0.weight"
        if not (isinstance(module, UpBlock) and module.extra_channels and key in grown):
            continue
        base, widened = grown[key], own[key]
        if base.shape[1] + module.extra_channels == widened.shape[1] and (base.shape[0], *base.shape[2:]) == (widened.shape[0], *widened.shape[2:]):
            grown[key] = torch.cat([base.to(widened.dtype), widened[:, base.shape[1] :]], dim=1)
    grown.update({key: value for key, value in own.items() if key.startswith(SAM_MI_OWN_PREFIXES) and key not in grown})
    return grown


def load_ovss_weights(
    model: OVSSModel, path: str | os.PathLike, sam_encoder_checked: bool = False, state: Mapping[str, Tensor] | None = None
) -> None:
    """Load a checkpoint's weights into ``model``, checking every key and shape.

    Keys that come from a weight file named by the model's config may be absent; every other key must
    be there. A SAM-MI trained with TSPP and built with ``points=grid`` (the dense-grid ablation of the
    same weights) ignores the TSPP heads. Raises CheckpointError naming the file and the keys (or the weight file to give).

    A checkpoint that carries its own SAM image encoder (a self-contained small model) loaded with a SAM
    weight file named in its place must carry that file's encoder: SAM embeddings are cached under the
    file's fingerprint, so another encoder's outputs would silently stand in for its own. With
    ``sam_encoder_checked=True`` the caller has compared the two and takes the checkpoint's (a trainer,
    which caches embeddings under the encoder's own weights when they differ,
    ``ssp_sam.engine.init_checkpoint``). ``state``: the weights if the caller has read them already.
    """
    weights = _weights_file(path)
    state = read_ovss_weights(path) if state is None else dict(state)
    if model.config.variant == "sam_mi" and not model.config.uses_tspp:  # a TSPP-trained SAM-MI run with the dense grid
        state = {k: v for k, v in state.items() if not k.startswith(TSPP_PREFIX)}
    expected = model.state_dict()
    from_files = frozen_from_files(model, model.config)
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    for prefix, what, key in ((CLIP_PREFIX, "CLIP", "clip"), (SAM_PREFIX, "SAM", "sam")):
        frozen = [k for k in expected if k.startswith(prefix) and k not in trained and k not in from_files]
        if frozen and not any(k in state for k in frozen):  # an encoder neither stored nor named by a file
            raise CheckpointError(
                f"{weights}: the checkpoint carries no frozen {what} weights and its config names no {what} weight file; "
                f"give ovss_model.{key}.checkpoint=..."
            )
    report = mismatch_report(state, expected, required=lambda k: k not in from_files)
    if report:
        raise CheckpointError(f"{weights}: checkpoint does not fit this model; {report}")
    sam_file = model.config.sam.checkpoint
    if sam_file is not None and not sam_encoder_checked and differs_under(state, expected, SAM_ENCODER_PREFIX):
        raise CheckpointError(
            f"{weights}: the checkpoint carries its own SAM image encoder, which differs from the one of "
            f"ovss_model.sam.checkpoint={sam_file}, whose (cached) embeddings the model would be given; leave "
            "ovss_model.sam.checkpoint unset to use the checkpoint's encoder, or give the file it was trained with"
        )
    model.load_state_dict(state, strict=False)


def load_ovss_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", overrides: Mapping[str, Any] | None = None
) -> LoadedOVSSModel:
    """Build the model a checkpoint describes and load its weights.

    Args:
        path: the checkpoint directory (or its model.safetensors).
        device: where the model goes (returned in eval mode).
        overrides: changes to the stored model config, e.g. ``{"sam": {"checkpoint": "/weights/sam_vit_b.pth"}}``
            for weight files that moved, or ``{"points": "grid"}`` for the dense-grid ablation.

    Raises:
        CheckpointError: not an OVSS checkpoint, unreadable, keys or shapes that do not fit, NaN/Inf weights.
        ConfigError: overrides with unknown keys or impossible values.
    """
    stored = read_ovss_checkpoint_config(path)
    config = ovss_config_from(stored["ovss_model"], **dict(overrides or {}))
    check_weight_files(stored.get("weight_files"), weight_files_of(config), path)
    # Encoders without a weight file are built empty and filled from the checkpoint (load_ovss_weights checks).
    model = build_ovss_model(replace(config, random_encoders=True))
    model.config = config
    load_ovss_weights(model, path)
    info = {k: v for k, v in stored.items() if k not in ("format", "ovss_model", "class_names")}
    names = stored.get("class_names") or ()
    return LoadedOVSSModel(model.to(device).eval(), config, tuple(str(name) for name in names), info)
