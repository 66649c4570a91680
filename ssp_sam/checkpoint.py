"""Checkpoints: the released SSP-SAM files (torch pickles) and our own (safetensors + config JSON).

Released checkpoints hold the state dict under "model" with the release's module names
(``../shared/specs/ssp_sam_224_checkpoint_keys.json``); :data:`RELEASE_KEY_MAP` maps them onto
ours explicitly. The release's quirks are switched on for models loaded from such files.

Our checkpoints are directories::

    <dir>/model.safetensors   # weights (frozen encoders included only when no weight file names them)
    <dir>/config.json         # the resolved ModelConfig (and, from the trainer, the run config)

Every mismatch (missing, unexpected or mis-shaped keys) raises :class:`CheckpointError` that
names the file and the keys.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import save_file
from torch import Tensor

from .backbones.clip import FINETUNED_TEXT_PARAMETERS
from .config import RELEASE_PRESETS, ModelConfig, model_config_from
from .errors import CheckpointError, ConfigError
from .fileio import atomic_directory
from .model import SSPSAM, build_model, build_sam_image_encoder, require_weight_files
from .state_dicts import differs_under, mismatch_report
from .weight_files import describe_weights, read_weights, require_finite
from .weight_identity import check_release_weight_files, check_weight_files, weight_file_record

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINER_STATE_FILE = "trainer_state.pt"

# (release name or prefix, our name or prefix). A prefix ends with "."; an entry without the dot
# is an exact key. Order matters only for readability: no release prefix is a prefix of another.
RELEASE_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("encoder.", None),  # CLIP: dropped, as the official test script does; CLIP comes from its own file
    ("sam.image_encoder.", "sam_image_encoder."),
    ("sam.prompt_encoder.", "mask_head.prompt_encoder."),
    ("sam.mask_decoder.", "mask_head.mask_decoder."),
    ("clip_proj.", "word_proj."),
    ("clip_img_proj.", "visual_adapter.query_mlp."),
    ("norm_img.", "visual_adapter.norm."),
    ("img2text_attn.", "visual_adapter.text_attention."),
    ("imgtext_proj.", "visual_adapter.attended_text_proj."),
    ("img_proj.", "visual_adapter.query_proj."),
    ("tf_scale", "visual_adapter.gauss_scale"),
    ("tf_sigma", "visual_adapter.gauss_sigma"),
    ("text_proj.", "linguistic_adapter.gru."),
    ("phrase_attn.fc.", "linguistic_adapter.word_score."),
    ("mlp.", "fusion.proj."),
    ("reg_token.", "prompt_generator.reg_token."),
    ("prompt_token.", "prompt_generator.prompt_tokens."),
    ("vl_pos_embed.", "prompt_generator.pos_embed."),
    ("vl_transformer.encoder.layers.", "prompt_generator.layers."),
    ("norm.", "prompt_generator.norm."),
    ("bbox_embed.", "prompt_generator.box_head."),
    # Present in the release but never used by its forward pass: loaded and ignored.
    ("img2img_attn.", None),
    ("norm_text_cond_img.", None),
)

# Parameters our model has that the release file does not need to provide: SAM's image encoder
# (the official test script loads it from SAM's own file) and CLIP.
SAM_ENCODER_PREFIX = "sam_image_encoder."  # the state-dict prefix of SAM's image encoder in SSPSAM
_OPTIONAL_OURS = (SAM_ENCODER_PREFIX, "clip.")


def map_release_key(key: str) -> str | None:
    """Our parameter name for a release key; None for keys that are dropped.

    Raises:
        KeyError: the key belongs to no known module of the release.
    """
    for release, ours in RELEASE_KEY_MAP:
        if release.endswith("."):
            if key.startswith(release):
                return None if ours is None else ours + key[len(release) :]
        elif key == release:
            return ours
    raise KeyError(key)


def check_state_dict(
    expected: Mapping[str, Tensor], given: Mapping[str, Tensor], source: str, optional: tuple[str, ...] = (), required: tuple[str, ...] = ()
) -> None:
    """Raise CheckpointError if ``given`` lacks, adds or mis-shapes keys of ``expected``.

    Args:
        expected: the model's state dict (names -> tensors).
        given: the (mapped) checkpoint state dict.
        source: the file, for the message.
        optional: prefixes of expected keys that may be missing...
        required: ...unless they also start with one of these.
    """
    report = mismatch_report(given, expected, required=lambda key: key.startswith(required) or not key.startswith(optional))
    if report:
        raise CheckpointError(f"{source}: checkpoint does not fit this model; {report}")


def _require_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty (0 bytes)")


# ----------------------------------------------------------------------------- released checkpoints


@dataclass(frozen=True)
class ReleaseFile:
    """A released SSP-SAM checkpoint as the release's train.py saves it.

    The file is ``torch.save({"model", "optimizer", "lr_scheduler", "epoch", "args"})`` (the best-mIoU
    files lack the optimizer and scheduler), ``args`` being the run's ``argparse.Namespace``.
    """

    state: dict[str, Tensor]  # "model": the state dict, release key names
    args: argparse.Namespace | None
    epoch: int | None

    @property
    def clip_file(self) -> str | None:
        """The CLIP weight file the run was trained with (``args.clip_pretrained``), if recorded."""
        value = getattr(self.args, "clip_pretrained", None)
        return value if isinstance(value, str) else None

    @property
    def trained_with(self) -> str:
        """For messages, e.g. ' (trained with CLIP CS-ViT-B-16.pt, epoch 79)'; empty if the file records neither."""
        facts = ([f"trained with CLIP {Path(self.clip_file).name}"] if self.clip_file else []) + (
            [f"epoch {self.epoch}"] if self.epoch is not None else []
        )
        return f" ({', '.join(facts)})" if facts else ""


def read_release_file(path: str | os.PathLike) -> ReleaseFile:
    """Read a released SSP-SAM checkpoint: weights only, with exactly ``argparse.Namespace`` allowed.

    Raises:
        CheckpointError: the file is missing or unreadable, holds anything else than tensors, plain
            containers and the run's Namespace, or has no "model" state dict of tensors.
    """
    path = Path(path)
    container = read_weights(path, "checkpoint", allowed_classes=(argparse.Namespace,), mmap=True)
    if not isinstance(container, dict) or not isinstance(container.get("model"), dict):
        what = describe_weights(container)
        found = f"it holds {what}" if what else f"found {sorted(container)[:5] if isinstance(container, dict) else type(container).__name__}"
        raise CheckpointError(f"{path}: not an SSP-SAM release checkpoint (expected a dict with a 'model' state dict; {found})")
    state = container["model"]
    not_tensors = sorted(str(key) for key, value in state.items() if not isinstance(value, Tensor))
    if not_tensors:
        raise CheckpointError(f"{path}: 'model' entries that are not tensors: {', '.join(not_tensors[:5])}")
    args = container.get("args")
    epoch = container.get("epoch")
    return ReleaseFile(
        state=dict(state),
        args=args if isinstance(args, argparse.Namespace) else None,
        epoch=epoch if isinstance(epoch, int) else None,
    )


def release_preset(state: Mapping[str, Tensor], source: str) -> str:
    """Tell SSP-SAM-224 from SSP-SAM-336 by the release's own tensor shapes.

    Both project the CLIP words to 512 (``clip_proj`` is Linear(text width, 512)); the CLIP text
    width (512 on ViT-B/16, 768 on ViT-L/14@336) and the prompt generator's positions
    (1 + 128 prompts + 196 or 576 patches) tell them apart.
    """
    try:
        clip_proj, positions = tuple(state["clip_proj.weight"].shape), tuple(state["vl_pos_embed.weight"].shape)
    except KeyError as exc:
        raise CheckpointError(f"{source}: not an SSP-SAM release checkpoint (no {exc.args[0]!r})") from None
    presets = {((512, 512), (1 + 128 + 196, 256)): "ssp_sam_224", ((512, 768), (1 + 128 + 576, 256)): "ssp_sam_336"}
    if (clip_proj, positions) not in presets:
        raise CheckpointError(
            f"{source}: unknown SSP-SAM release layout (clip_proj.weight {clip_proj}, vl_pos_embed.weight {positions}; "
            "SSP-SAM-224 has (512, 512) and (325, 256), SSP-SAM-336 (512, 768) and (705, 256))"
        )
    return presets[(clip_proj, positions)]


def map_release_state_dict(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Rename release keys to ours, dropping CLIP and the unused modules."""
    mapped, unknown = {}, []
    for key, value in state.items():
        try:
            ours = map_release_key(key)
        except KeyError:
            unknown.append(key)
            continue
        if ours is not None:
            mapped[ours] = value
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        raise CheckpointError(f"{source}: keys that belong to no SSP-SAM release module: {shown}")
    return mapped


def load_release_weights(model: SSPSAM, state: Mapping[str, Tensor], source: str) -> None:
    """Load a released SSP-SAM state dict (see :func:`read_release_file`) into ``model``.

    SAM's image encoder is taken from the file when the model has one and the file carries it (the
    release's train.py saves the whole model). A file that carries one, loaded with a SAM weight file
    named too, must carry that file's encoder: a model built to read cached embeddings drops the file's
    encoder and its cache is filled from (and keyed by) the weight file's, so with two different encoders
    the masks would depend on whether a cache is used.

    Raises:
        CheckpointError: naming the file and the missing / unexpected / mis-shaped keys, the first
            loaded tensor holding NaN or Inf, or a SAM image encoder other than model.sam_checkpoint's.
    """
    mapped = map_release_state_dict(state, source)
    if model.config.sam_checkpoint is not None and stored_sam_encoder_differs(model, mapped):
        raise CheckpointError(
            f"{source}: the release file carries its own SAM image encoder (sam.image_encoder.*), which differs from "
            f"the one of model.sam_checkpoint={model.config.sam_checkpoint}; leave model.sam_checkpoint unset to use "
            "the file's encoder, or give the SAM file it was trained with"
        )
    if model.sam_image_encoder is None:
        mapped = {k: v for k, v in mapped.items() if not k.startswith(SAM_ENCODER_PREFIX)}
    require_finite({key: value for key, value in state.items() if map_release_key(key) in mapped}, source)
    check_state_dict(model.state_dict(), mapped, source, optional=_OPTIONAL_OURS)
    model.load_state_dict(mapped, strict=False)


# ----------------------------------------------------------------------------- our checkpoints


# Prefix of an encoder a checkpoint of ours may embed -> (its name, the config key of its weight file).
_EMBEDDED_ENCODERS = {"clip.": ("CLIP", "model.clip_checkpoint"), SAM_ENCODER_PREFIX: ("SAM image encoder", "model.sam_checkpoint")}
# Our names of the text-tower parameters that model.finetune_text_encoder trains.
_FINETUNED_TEXT = tuple(f"clip.clip.{name}" for name in FINETUNED_TEXT_PARAMETERS)


def _finetuned_image(model: SSPSAM) -> tuple[str, ...]:
    """Our names (prefixes) of the image-tower parameters that model.finetune_image_blocks trains."""
    count = model.clip.finetune_image_blocks
    if not count:
        return ()
    blocks = len(model.clip.clip.visual.transformer.resblocks)
    trained = tuple(f"clip.clip.visual.transformer.resblocks.{index}." for index in range(blocks - count, blocks))
    return (*trained, "clip.clip.visual.ln_post.", "clip.clip.visual.proj")


def _embedded_prefixes(model: SSPSAM, config: ModelConfig) -> tuple[str, ...]:
    """Encoder prefixes whose weights a checkpoint of ours must carry.

    Encoders that come from a weight file named in the config are not stored (they are large and
    the user has them); encoders without a file (our small pretrained ones) are, and so are the
    fine-tuned parts of CLIP (text tower, last vision blocks: their weights differ from the file's).
    """
    prefixes = []
    if config.clip_checkpoint is None:
        prefixes.append("clip.")
    else:
        if config.finetune_text_encoder:
            prefixes.extend(_FINETUNED_TEXT)
        prefixes.extend(_finetuned_image(model))
    if config.sam_checkpoint is None:
        prefixes.append(SAM_ENCODER_PREFIX)
    return tuple(prefixes)


def weight_files_of(config: ModelConfig) -> dict[str, str | None]:
    """``{config key: path}`` of the weight files the model's frozen encoders come from (None: none)."""
    return {"model.clip_checkpoint": config.clip_checkpoint, "model.sam_checkpoint": config.sam_checkpoint}


def keys_from_weight_files(model: SSPSAM, keys: Iterable[str]) -> set[str]:
    """Those of ``keys`` whose values come from the weight files the model's config names.

    They are the encoders' frozen weights that :func:`save_checkpoint` leaves out unless it embeds
    the encoders (fine-tuned parts of CLIP and encoders without a file are always stored).
    """
    stored_always = _embedded_prefixes(model, model.config)
    return {k for k in keys if k.startswith(_OPTIONAL_OURS) and not (stored_always and k.startswith(stored_always))}


def save_checkpoint(
    model: SSPSAM,
    directory: str | os.PathLike,
    extra: Mapping[str, Any] | None = None,
    embed_encoders: bool = False,
    trainer_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as <directory>/model.safetensors + config.json, atomically.

    Args:
        extra: more JSON-serialisable entries for config.json (the trainer's run config, metrics).
        embed_encoders: store the frozen encoders too and drop their weight-file paths from the
            stored config, so the checkpoint is self-contained (our small ShapeWorld model).
        trainer_state: optimizer/scheduler/epoch state for resuming, saved as trainer_state.pt
            (tensors and plain containers only, so it loads with ``weights_only=True``).
    """
    directory = Path(directory)
    config = model.config
    if embed_encoders:
        if model.sam_image_encoder is None:
            raise ValueError("embed_encoders needs a model built with its SAM image encoder")
        config = replace(config, clip_checkpoint=None, sam_checkpoint=None)
    embedded = _embedded_prefixes(model, config)
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith(_OPTIONAL_OURS) or k.startswith(embedded)
    }
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "ssp_sam"})
        record = {"model": config.to_dict(), "weight_files": weight_file_record(weight_files_of(config)), **(extra or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if trainer_state is not None:
            torch.save(dict(trainer_state), tmp / TRAINER_STATE_FILE)
    return directory


def embed_encoders(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write our ``checkpoint`` again at ``out`` with its frozen encoders stored in it (self-contained).

    A run trained with ``train.save_encoders=false`` names the CLIP and SAM files its frozen encoders
    come from and stores only what it trains: its run directory stays small (our ShapeWorld runs are
    committed between sessions). What is shipped must not depend on those files: this reads the
    checkpoint with them (their fingerprints checked, as any load does) and writes weights and config as
    :func:`save_checkpoint` with ``embed_encoders=True`` would have, the stored run config, epoch and
    metrics kept. ``out`` is replaced atomically; the trainer state (resuming) is not copied.

    Raises:
        CheckpointError: as :func:`load_model` (a missing or changed weight file, a checkpoint that does not fit).
    """
    stored = read_checkpoint_config(checkpoint)
    model = load_model(checkpoint, with_sam_image_encoder=True)
    extra = {key: value for key, value in stored.items() if key not in ("model", "weight_files")}
    return save_checkpoint(model, out, extra=extra, embed_encoders=True)


def read_trainer_state(directory: str | os.PathLike) -> dict[str, Any]:
    """The resumable trainer state saved beside a checkpoint's weights (tensors and plain containers only)."""
    return read_weights(Path(directory) / TRAINER_STATE_FILE, "trainer state")


def is_own_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() or path.suffix == ".safetensors"


def read_config_file(path: str | os.PathLike) -> tuple[Path, Any]:
    """Where the config.json of a checkpoint directory of ours (or of its model.safetensors) is, and its JSON
    (SSP-SAM's and OVSS's checkpoints; each reader checks its own sections).

    Raises:
        CheckpointError: the checkpoint or its config.json missing, or not JSON.
    """
    path = Path(path)
    _require_file(path)
    if not is_own_checkpoint(path):  # a .pth beside no config.json of its own: say what it is, not what is missing
        raise CheckpointError(
            f"{path}: not a checkpoint of ours (a directory holding {WEIGHTS_FILE} and {CONFIG_FILE}); a released "
            "SSP-SAM .pth is read only by evaluation and prediction (checkpoint=...): a training run cannot start "
            "from one (init_checkpoint takes a run's last/ or best/)"
        )
    config_path = (path if path.is_dir() else path.parent) / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: config file of the checkpoint not found")
    try:
        return config_path, json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None


# Adapter keys that came in with commit 7ee4a69 (2026-11-28), which also changed what adapters.linguistic=false
# computes (the phrase became the L2-normalised CLIP sentence embedding, as the release's w/o-LAD model; it was
# the raw one): a stored config with none of them was written before.
_ADAPTER_KEYS_OF_7EE4A69 = ("dim", "gaussian", "text_attention_dropout")


def read_checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config.json of a checkpoint of ours (directory or its model.safetensors).

    Checkpoints written before ``model.mask_target`` existed get it from :func:`stored_mask_target`, so their
    masks go back to the image where they were drawn. A w/o-LAD checkpoint (``adapters.linguistic=false``)
    written before 7ee4a69 is refused: its weights fit today's model, which would compute another phrase.

    Raises:
        CheckpointError: the config is missing or unreadable, has no model section, or is such a w/o-LAD one.
    """
    config_path, config = read_config_file(path)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{config_path}: no 'model' section")
    adapters = config["model"].get("adapters")
    before_7ee4a69 = isinstance(adapters, Mapping) and not any(key in adapters for key in _ADAPTER_KEYS_OF_7EE4A69)
    if before_7ee4a69 and adapters.get("linguistic") is False:
        raise CheckpointError(
            f"{config_path}: a w/o-LAD model (adapters.linguistic=false) written before 2026-11-28 (no adapters.dim, gaussian "
            "or text_attention_dropout): it was trained on the raw CLIP sentence embedding as its phrase, which this code "
            "no longer computes (now the L2-normalised one, as the release's w/o-LAD model); retrain it"
        )
    config["model"].setdefault("mask_target", stored_mask_target(config))
    return config


def stored_mask_target(config: Mapping[str, Any]) -> str:
    """The ``model.mask_target`` a checkpoint's config.json stands for, i.e. what its training did.

    Its model section's; else (written before the model kept it) its run's ``train.mask_target``; else, for a
    run of a trainer older than that key (before 162683b), the trainer's only target then,
    ``mask_to_padded_frame``: today's "nearest"; a config without a run section was not written by the
    trainer (e.g. a converted release file) and stands for the release's.
    """
    model, run = config.get("model"), config.get("run")
    if isinstance(model, Mapping) and "mask_target" in model:
        return model["mask_target"]
    train = run.get("train") if isinstance(run, Mapping) else None
    return train.get("mask_target", "nearest") if isinstance(train, Mapping) else "release"


def stored_sam_encoder_differs(model: SSPSAM, state: Mapping[str, Tensor]) -> bool:
    """Whether ``state`` carries SAM image-encoder weights that differ from those ``model`` would use.

    The reference is the model's own encoder as it stands, or, for a model built to read cached
    embeddings (no encoder), the encoder of its ``sam_checkpoint`` file, built only when ``state``
    carries encoder weights at all (our self-contained small models; release files and checkpoints of
    models with a SAM file do not).
    """
    if not any(k.startswith(SAM_ENCODER_PREFIX) for k in state):
        return False
    return differs_under(state, sam_encoder_state(model), SAM_ENCODER_PREFIX)


def sam_encoder_state(model: SSPSAM) -> dict[str, Tensor]:
    """The SAM image-encoder weights ``model`` uses, under our state-dict names: its own encoder, or for a
    model built to read cached embeddings (none), that of its ``sam_checkpoint`` file."""
    encoder = model.sam_image_encoder if model.sam_image_encoder is not None else build_sam_image_encoder(model.config)
    return encoder.state_dict(prefix=SAM_ENCODER_PREFIX)


def load_own_weights(
    model: SSPSAM,
    path: str | os.PathLike,
    finetuned_from_file: bool = False,
    sam_encoder_checked: bool = False,
    state: Mapping[str, Tensor] | None = None,
) -> None:
    """Load a checkpoint of ours into ``model``, checking every key and shape.

    A checkpoint that carries its own SAM image encoder (a self-contained small model), loaded with a
    SAM weight file named in its place, must carry that file's encoder: SAM embeddings are cached under
    the file's fingerprint, so another encoder's would silently stand in for its own.

    Args:
        finetuned_from_file: a model that fine-tunes CLIP's text tower or last vision blocks may start
            from a checkpoint without them (``init_checkpoint`` of a frozen-CLIP run): those of the CLIP
            file are kept.
        sam_encoder_checked: the caller has compared the checkpoint's SAM image encoder with the file's
            and takes the checkpoint's (a trainer, which caches embeddings under the encoder's own
            weights when they differ, ``ssp_sam.engine.init_checkpoint``): not compared again.
        state: the checkpoint's weights if the caller has read them already (read from ``path`` otherwise).
    """
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if state is None:
        state = read_weights(weights, "checkpoint")
    require_finite(state, weights)
    if model.config.sam_checkpoint is not None and not sam_encoder_checked and stored_sam_encoder_differs(model, state):
        raise CheckpointError(
            f"{weights}: the checkpoint carries its own SAM image encoder, which differs from the one of "
            f"model.sam_checkpoint={model.config.sam_checkpoint}, whose (cached) embeddings its mask decoder would be "
            "given; leave model.sam_checkpoint unset to use the checkpoint's encoder, or give the file it was trained with"
        )
    if model.sam_image_encoder is None:  # built to read cached embeddings: an embedded encoder is not needed
        state = {k: v for k, v in state.items() if not k.startswith(SAM_ENCODER_PREFIX)}
    expected = {k: v for k, v in model.state_dict().items()}
    embedded = _embedded_prefixes(model, model.config)
    finetuned = {
        "finetune_text_encoder=true": ("text tower", _FINETUNED_TEXT, "finetune_text_encoder=false"),
        f"finetune_image_blocks={model.clip.finetune_image_blocks}": ("image blocks", _finetuned_image(model), "finetune_image_blocks=0"),
    }
    for setting, (what, prefixes, frozen) in finetuned.items():
        in_state = any(k.startswith(prefixes) for k in state)
        if not prefixes or not set(prefixes) & set(embedded) or in_state:
            continue
        if finetuned_from_file:
            embedded = tuple(p for p in embedded if p not in prefixes)
            continue
        raise CheckpointError(
            f"{weights}: model.{setting}, but the checkpoint carries no fine-tuned CLIP {what} ({prefixes[0]}*): "
            f"it was trained with a frozen CLIP; load it with model.{frozen}"
        )
    for prefix in embedded:  # an encoder neither stored nor named by a weight file: say what to give
        if any(k.startswith(prefix) for k in expected) and not any(k.startswith(prefix) for k in state):
            what, key = _EMBEDDED_ENCODERS[prefix]
            raise CheckpointError(
                f"{weights}: the checkpoint carries no {what} and its config names no {what.split()[0]} weight file; "
                f"give {key}=... (or train with train.save_encoders=true)"
            )
    optional = tuple(p for p in _OPTIONAL_OURS if p not in embedded)
    check_state_dict(expected, state, str(weights), optional=optional, required=embedded)
    model.load_state_dict(state, strict=False)


def load_model(
    checkpoint: str | os.PathLike,
    model_config: ModelConfig | Mapping | None = None,
    with_sam_image_encoder: bool | None = True,
    device: str | torch.device = "cpu",
) -> SSPSAM:
    """Build and load a model from a checkpoint of ours or a released one.

    Args:
        checkpoint: our checkpoint directory (or its model.safetensors), or a released .pth.
        model_config: for our checkpoints, optional overrides of the stored config (e.g. new
            encoder weight paths); for released ones, overrides of the preset (224 or 336) its
            shapes tell (CLIP/SAM weight paths), or that preset in full.
        with_sam_image_encoder: build SAM's image encoder (True) or not (False, for cached
            embeddings); None: only when no SAM weight file is named, i.e. when its weights can
            only come from ``checkpoint`` itself.

    A released checkpoint given CLIP or SAM files other than the published ones it was trained with
    loads with a warning on stderr (:func:`ssp_sam.weight_identity.check_release_weight_files`).

    Raises:
        CheckpointError: an unreadable checkpoint or weight file, one that does not fit, or a checkpoint
            of the REC pretraining stage (:func:`refuse_rec_stage_checkpoint`), whose masks are random.
        ConfigError: model settings the checkpoint defines otherwise.
    """
    path = Path(checkpoint)
    if is_own_checkpoint(path):
        stored = read_checkpoint_config(path)
        refuse_rec_stage_checkpoint(stored, path)
        config = model_config_from(stored["model"], **(_as_overrides(model_config)))
        _refuse_changed_settings(model_config_from(stored["model"]), config, path)
        check_weight_files(stored.get("weight_files"), weight_files_of(config), path)
        # Encoders without a weight file are stored in the checkpoint (load_own_weights checks).
        model = build_model(
            config,
            with_sam_image_encoder=_wants_sam_image_encoder(with_sam_image_encoder, config),
            without_weight_files=("clip", "sam"),
        )
        load_own_weights(model, path)
    else:
        release = read_release_file(path)
        state = release.state
        preset = release_preset(state, str(path))
        config = model_config_from(RELEASE_PRESETS[preset], **_as_overrides(model_config))
        if config.name in RELEASE_PRESETS and config.name != preset:
            raise CheckpointError(
                f"{path}: this is an {preset} release checkpoint{release.trained_with} but the model config is {config.name}"
            )
        _refuse_settings_of_another_model(config, preset, path)
        with_encoder = _wants_sam_image_encoder(with_sam_image_encoder, config)
        carries_sam_encoder = any(key.startswith("sam.image_encoder.") for key in state)
        require_weight_files(config, ["clip"], reason=f" ({path} carries no CLIP: a release file's encoder.* entries are dropped)")
        if with_encoder and not carries_sam_encoder:
            require_weight_files(config, ["sam"], reason=f" ({path} carries no SAM image encoder)")
        # Both checked just above, with the reason a release file cannot provide them.
        model = build_model(replace(config, release_quirks=True), with_sam_image_encoder=with_encoder, without_weight_files=("clip", "sam"))
        load_release_weights(model, state, str(path))
        check_release_weight_files(preset, weight_files_of(config), path)  # warns; after the files loaded
    return model.to(device).eval()


def refuse_rec_stage_checkpoint(stored: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuse a checkpoint of the REC pretraining stage (its run's ``train.stage`` is "rec") for making masks.

    That stage never runs SAM (``ssp_sam.engine.trainer``: no SAM weights are loaded and the loss has box
    terms only), so the mask decoder and prompt encoder it stores (``mask_head.*``) are their random
    initialisation: its masks would be noise with exit status 0, and a SAM file named for it
    (``model.sam_checkpoint``) would not help, the checkpoint's decoder being loaded over the file's. Stage 2
    starts from it through the trainer's ``init_checkpoint``, which reads it without :func:`load_model`.

    Raises:
        CheckpointError: naming the checkpoint, why, and what to do instead.
    """
    run = stored.get("run")
    train = run.get("train") if isinstance(run, Mapping) else None
    if not (isinstance(train, Mapping) and train.get("stage") == "rec"):
        return
    raise CheckpointError(
        f"{path}: a stage-1 (REC pretraining, run.train.stage=rec) checkpoint, whose mask decoder was never trained "
        "(that stage runs no SAM), so its masks would be random, with or without model.sam_checkpoint; train stage 2 "
        f"from it (scripts/train.py train.stage=res init_checkpoint={path}). Its boxes were scored by the REC stage's "
        f"validation (REC-acc in its {CONFIG_FILE} metrics and the run's train_log.jsonl); no script evaluates boxes alone"
    )


# Settings of our checkpoints that a caller may give: where the frozen weights now are, the no-target
# threshold (an inference setting), and what would train (the loaded weights are the same either way).
OVERRIDABLE_SETTINGS = ("clip_checkpoint", "sam_checkpoint", "no_target_pixels", "finetune_text_encoder", "finetune_image_blocks")


def flat_settings(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings -> ``{"adapters.visual": True, ...}``: dotted keys, the values that are not mappings."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(before: ModelConfig, after: ModelConfig, free: tuple[str, ...]) -> list[str]:
    """``"key: old -> new"`` for every setting that differs, but for those under the top-level keys ``free``."""
    old, new = flat_settings(before.to_dict()), flat_settings(after.to_dict())
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if key.split(".")[0] not in free and old.get(key) != new.get(key)
    ]


def _refuse_changed_settings(stored: ModelConfig, given: ModelConfig, path: Path) -> None:
    """A checkpoint of ours defines its model: other settings given for it (``model=<preset>`` on the
    command line brings a whole preset) would change what it computes without any shape error
    (``append_period``, ``prompt_generator.positions_in_values``, the adapters' switches), so they are refused."""
    changed = changed_settings(stored, given, OVERRIDABLE_SETTINGS + ("random_encoders",))
    if changed:
        raise ConfigError(
            f"{path}: model settings differ from the checkpoint's own config.json ({'; '.join(changed)}); a checkpoint "
            f"of ours defines its model, so give only {', '.join(OVERRIDABLE_SETTINGS)} (not model=<preset>)"
        )


# Settings of a stand-in encoder (clip_arch=custom, sam_variant=custom: tests and benchmarks), free for a release
# file: a small encoder's sizes, and how many of its blocks run CLIP-Surgery, cannot be the preset's.
_STAND_IN_SETTINGS = {"clip_arch": ("clip_arch", "clip_custom", "surgery_blocks"), "sam_variant": ("sam_variant", "sam_custom")}


def _refuse_settings_of_another_model(given: ModelConfig, preset: str, path: Path) -> None:
    """A released file holds the weights of its preset's model: like a checkpoint of ours, it defines every
    setting but those of :data:`OVERRIDABLE_SETTINGS` (``release_quirks`` is set by the loader), and other
    values (``mask_target``, ``append_period``, ``surgery_blocks``, ...) would change what it computes
    without any shape error. Stand-in encoders may differ in their own sizes and give the model a name."""
    free = OVERRIDABLE_SETTINGS + ("random_encoders", "release_quirks")
    for key, settings in _STAND_IN_SETTINGS.items():
        if getattr(given, key) == "custom":
            free += (*settings, "name")
    changed = changed_settings(model_config_from(RELEASE_PRESETS[preset]), given, free)
    if changed:
        raise ConfigError(
            f"{path}: model settings differ from those of the {preset} release ({'; '.join(changed)}); a released "
            f"checkpoint defines its model, so give only {', '.join(OVERRIDABLE_SETTINGS)} (with model={preset} or without model=)"
        )


def _wants_sam_image_encoder(requested: bool | None, config: ModelConfig) -> bool:
    return config.sam_checkpoint is None if requested is None else requested


def _as_overrides(model_config: ModelConfig | Mapping | None) -> dict[str, Any]:
    if model_config is None:
        return {}
    if isinstance(model_config, ModelConfig):
        return model_config.to_dict()
    return dict(model_config)
