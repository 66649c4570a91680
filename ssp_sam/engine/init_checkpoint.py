"""Starting a run from a checkpoint (``init_checkpoint``) that carries its own frozen encoders.

A self-contained checkpoint (``train.save_encoders=true``: our small ShapeWorld models) stores the
frozen CLIP and SAM it was trained with. A new run built from weight files (``model.clip_checkpoint``,
``model.sam_checkpoint``) and started from it loads those stored encoders over the files' ones; if
they differ (the files were remade, or belong to another model), two things would go silently wrong:

- the SAM embedding cache is keyed by the weight file's sha256, so embeddings of the file's encoder
  would feed a mask decoder trained on the checkpoint's, and embeddings the run computes with the
  checkpoint's encoder would be filed under the file's key, poisoning the cache for every later run;
- a run that does not store its encoders (``train.save_encoders=false``) writes checkpoints that name
  the files in place of the encoders it trained with, so they would not hold the model it trained.

:func:`encoders_replaced` finds such encoders; a run that stores its encoders trains on the
checkpoint's (the model being continued) and keys its SAM cache by the encoder's own weights, any
other run is refused with an error naming the file and the two ways out. A resumed run likewise keeps
the SAM image encoder its ``last/`` stored (:func:`describe_resumed`), the file's or not.

A checkpoint that does not carry its encoders (``train.save_encoders=false``, the paper's REC stage)
has only their files' sha256 to show what its modules were trained on: :func:`check_init_checkpoint`
compares them with the files the run names, as loading and resuming do, and the stored model settings
with the run's, so that neither another CLIP of the same shape nor a setting that changes no tensor
shape (``append_period``, ``prompt_generator.positions_in_values``, ``surgery_blocks``, ...) silently
gives the new stage other features than its modules learnt from. What a new stage may change:
:data:`INIT_FREE_SETTINGS`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

from torch import Tensor

from ..checkpoint import OVERRIDABLE_SETTINGS, changed_settings, weight_files_of
from ..config import ModelConfig, model_config_from
from ..errors import ConfigError
from ..state_dicts import differs_under
from ..weight_identity import check_weight_files

# Model settings a run may change from its init_checkpoint's: where the frozen weights are (their contents are
# compared by sha256), the no-target threshold (inference only), what trains (the fine-tuned CLIP parts start from
# the file when the checkpoint lacks them), the target this run's masks are trained toward (its checkpoints record
# it; docs/shapeworld_model.md fine-tunes the shipped model to model.mask_target=area), the model's name (a label),
# and whether encoders without a file may be random (tests). Every other setting is the checkpoint's.
INIT_FREE_SETTINGS = (*OVERRIDABLE_SETTINGS, "random_encoders", "mask_target", "name")


def check_init_checkpoint(checkpoint: str | os.PathLike, stored: Mapping, model: ModelConfig) -> None:
    """The run's model (``model``) must be the one the init checkpoint (config.json ``stored``) was trained as.

    Raises:
        CheckpointError: a weight file the run names holds other weights than the one the checkpoint recorded.
        ConfigError: model settings other than :data:`INIT_FREE_SETTINGS` differ, all of them named.
    """
    check_weight_files(stored.get("weight_files"), weight_files_of(model), f"init_checkpoint={checkpoint}")
    changed = changed_settings(model_config_from(stored["model"]), model, INIT_FREE_SETTINGS)
    if changed:
        raise ConfigError(
            f"init_checkpoint={checkpoint}: model settings differ from those it was trained with ({'; '.join(changed)}); "
            f"its modules would run on other features than they learnt from: give the checkpoint's values (its config.json), "
            f"a new stage may change only {', '.join(INIT_FREE_SETTINGS)}"
        )


@dataclass(frozen=True)
class FrozenEncoder:
    """A frozen encoder whose weights come from a weight file the config names."""

    prefix: str | tuple[str, ...]  # its state-dict prefix(es) in the model
    what: str  # "SAM image encoder", for messages
    key: str  # the config key naming its file, e.g. "model.sam_checkpoint"
    file: str | None  # that file (None: not from a file, never replaced)
    cached: bool = False  # its outputs are cached under the weight file's fingerprint (SAM's image encoder)


def encoders_replaced(
    checkpoint: str | os.PathLike,
    stored: Mapping[str, Tensor],
    current: Mapping[str, Tensor],
    from_files: Collection[str],
    encoders: Sequence[FrozenEncoder],
    save_encoders: bool,
) -> list[FrozenEncoder]:
    """The file-built encoders whose weights the init checkpoint replaces with different ones.

    Args:
        checkpoint: the init checkpoint, for messages.
        stored: its state dict.
        current: the model's state dict as built from the weight files, before loading the checkpoint
            (SAM's image encoder included even when the model reads cached embeddings).
        from_files: the keys whose values come from weight files (a run's checkpoints do not store them
            unless it stores its encoders).
        encoders: the encoders to report, by prefix.
        save_encoders: whether the run stores its encoders in its checkpoints.

    Raises:
        ConfigError: an encoder is replaced and the run does not store its encoders.
    """
    comparable = {k: v for k, v in stored.items() if k in from_files and k in current}
    replaced = [e for e in encoders if e.file is not None and differs_under(comparable, current, e.prefix)]
    if replaced and not save_encoders:
        encoder = replaced[0]
        raise ConfigError(
            f"init_checkpoint={checkpoint}: its {encoder.what} differs from the one of {encoder.key}={encoder.file}. "
            f"This run would train on the checkpoint's but write checkpoints that name {encoder.key} in its place; "
            f"give {encoder.key} the file the checkpoint was trained with, or set train.save_encoders=true to train "
            f"on the checkpoint's encoders and store them"
        )
    return replaced


def describe_replaced(checkpoint: str | os.PathLike, replaced: Sequence[FrozenEncoder]) -> str:
    """One line for the log: which encoders the run takes from the checkpoint instead of the files."""
    named = ", ".join(f"{e.what} (not {e.key}={e.file})" for e in replaced)
    cache = "; its embeddings are cached under the encoder's own weights" if any(e.cached for e in replaced) else ""
    return f"init_checkpoint={checkpoint}: training on its own {named}, stored in this run's checkpoints{cache}"


def describe_resumed(last: str | os.PathLike, key: str, file: str) -> str:
    """One line for the log: a resumed run keeps the SAM image encoder it stored, not the file's."""
    return (
        f"{last}: resuming on the SAM image encoder the run stored, not the one of {key}={file}; "
        "its embeddings are cached under its own weights"
    )
