"""Caches of what the frozen CLIP encoders return: text features per sentence, image tokens per CLIP input.

CLIP is frozen in SSP-SAM, so its output depends only on its input: the token ids of a sentence, the
letterboxed pixels of an image. Both caches key an entry by a hash of that exact input and by a
fingerprint of everything else the output depends on (the CLIP weights that compute it, the
CLIP-Surgery depth, the autocast precision it is computed in), and a hit returns the tensors the
encoder returned for it: the same values as running the encoder again, up to the rounding by which
the encoder's own output for one input differs between batch compositions (about 1e-7 relative).

Where they pay:

- :class:`TextFeatureCache`: each sentence is encoded once per run instead of at every visit
  (training visits each sentence every epoch, validation every validated epoch).
- :class:`ImageTokenCache`: only where a CLIP input repeats exactly: evaluation and validation
  (centred placement), training with augmentation off, or with ``train.clip_placements: K``, where
  each image is placed at one of K fixed offsets (:func:`ssp_sam.letterbox.fixed_placements`)
  instead of the release's uniform random offset. That is a deviation from the release; on
  ShapeWorld (square scenes fill CLIP's square: there is nothing to place) it changes nothing.

Use (the trainer, per step; ``tokens`` and ``clip_pixels`` as the data loader gives them, on the CPU,
so that keying them costs no device synchronisation)::

    text = text_cache.encode(model, batch["tokens"])                 # TextFeatures on model.device
    image_tokens = image_cache.encode(model, batch["clip_pixels"])   # (B, 1+N, D) on model.device
    output = ddp_model(image_tokens, text, sam_embeddings)           # SSPSAM.forward takes either form

Only the misses of a batch reach the encoder, in one batched call. Entries live on the CPU in a
least-recently-used store bounded by ``max_bytes`` (a ViT-B/16 sentence is 77 x 512 word features,
158 kB in fp32; a CLIP-Surgery image 197 x 512 tokens, 403 kB). With ``directory`` every entry is also
written to disk (one file per entry, to a temporary name then renamed, so any number of processes
can share the directory and a killed writer leaves no partial entry), under a folder named by the
fingerprint, so entries of other CLIP weights are never read; a file that fails its checks (header,
fingerprint, key, shapes, crc32 of the payload) is recomputed and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Sequence
from weakref import WeakKeyDictionary

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from .backbones.clip import CLIPSurgeryBackbone
from .errors import ConfigError
from .fileio import atomic_path
from .model import SSPSAM, TextFeatures

ENTRY_FORMAT = "ssp_sam-frozen-clip-output-1"
DEFAULT_MAX_BYTES = 2 << 30
# Part of every fingerprint: bump it when the encoders' forward pass changes.
FORWARD_VERSION = "clip-surgery-1"

Entry = tuple[Tensor, ...]

_fingerprints: "WeakKeyDictionary[CLIPSurgeryBackbone, dict[str, tuple[tuple, str]]]" = WeakKeyDictionary()


def _tower_tensors(backbone: CLIPSurgeryBackbone, tower: str) -> list[tuple[str, Tensor]]:
    """(name, tensor) of the CLIP state that the text tower, or the frozen part of the image tower
    (``CLIPSurgeryBackbone.frozen_image_features``), reads, sorted by name."""
    state = backbone.clip.state_dict(keep_vars=True)
    visual = tower == "image"
    trained = {id(parameter) for parameter in backbone.finetuned_image_parameters()} if visual else set()
    return sorted(
        (name, tensor) for name, tensor in state.items() if name.startswith("visual.") == visual and id(tensor) not in trained
    )


def clip_fingerprint(backbone: CLIPSurgeryBackbone, tower: str) -> str:
    """Hex sha256 of what the ``tower`` ("text" or "image") output depends on besides its input.

    Every name, dtype, shape and byte of the tower's weights (of the image tower: its frozen ones), the
    CLIP-Surgery depth and the fine-tuned blocks (image) or the context length (text), and
    :data:`FORWARD_VERSION`. Computed once per backbone and weight state while no tensor of the tower
    requires grad (remembered until a tensor is replaced or modified in place, e.g. by ``load_state_dict``);
    a tower with trainable tensors is hashed at every call, since an optimizer may change them in place
    without bumping their version (torch's fused AdamW does).
    """
    if tower not in ("text", "image"):
        raise ValueError(f"tower must be 'text' or 'image', got {tower!r}")
    tensors = _tower_tensors(backbone, tower)
    signature = tuple((name, tensor.data_ptr(), tensor._version, tensor.device) for name, tensor in tensors)
    trainable = any(tensor.requires_grad for _, tensor in tensors)
    remembered = _fingerprints.setdefault(backbone, {}).get(tower)
    if remembered is not None and remembered[0] == signature and not trainable:
        return remembered[1]
    shape_setting: object = backbone.surgery_blocks if tower == "image" else backbone.context_length
    if tower == "image" and backbone.finetune_image_blocks:  # entries are then the frozen blocks' output
        shape_setting = f"{backbone.surgery_blocks}|frozen below the last {backbone.finetune_image_blocks}"
    digest = hashlib.sha256(f"{FORWARD_VERSION}|{tower}|{shape_setting}\n".encode())
    for name, tensor in tensors:
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    fingerprint = digest.hexdigest()
    if not trainable:
        _fingerprints[backbone][tower] = (signature, fingerprint)
    return fingerprint


def autocast_state(device: torch.device) -> str:
    """The precision the encoders run in on ``device`` right now: "fp32", or the autocast dtype."""
    if not torch.is_autocast_enabled(device.type):
        return "fp32"
    return str(torch.get_autocast_dtype(device.type)).removeprefix("torch.")


def input_keys(inputs: Tensor) -> list[str]:
    """One hex key per row of a CPU tensor: blake2b of its dtype, shape and bytes."""
    header = f"{inputs.dtype}|{tuple(inputs.shape[1:])}|".encode()
    rows = inputs.detach().contiguous().reshape(inputs.shape[0], -1).view(torch.uint8).numpy()
    return [hashlib.blake2b(header + row.tobytes(), digest_size=20).hexdigest() for row in rows]


def _payload_crc(tensors: Entry) -> str:
    crc = 0
    for tensor in tensors:
        crc = zlib.crc32(tensor.contiguous().view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


class _EntryStore:
    """Entries (tuples of CPU tensors) by (fingerprint, key): an LRU in memory, optionally a directory."""

    def __init__(self, kind: str, names: Sequence[str], max_bytes: int, directory: str | os.PathLike | None) -> None:
        if int(max_bytes) < 0:
            raise ConfigError(f"{kind} cache: max_bytes must be >= 0, got {max_bytes}")
        self.kind = kind
        self.names = tuple(names)
        self.max_bytes = int(max_bytes)
        self.directory = Path(directory) if directory is not None else None
        self.memory: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self.bytes = 0

    def _file(self, fingerprint: str, key: str) -> Path:
        return self.directory / f"{self.kind}-{fingerprint[:16]}" / key[:2] / f"{key}.safetensors"

    def get(self, fingerprint: str, key: str) -> Optional[Entry]:
        entry = self.memory.get((fingerprint, key))
        if entry is not None:
            self.memory.move_to_end((fingerprint, key))
            return entry
        if self.directory is None:
            return None
        entry = self._read(self._file(fingerprint, key), fingerprint, key)
        if entry is not None:
            self._remember(fingerprint, key, entry)
        return entry

    def put(self, fingerprint: str, key: str, entry: Entry) -> None:
        self._remember(fingerprint, key, entry)
        if self.directory is not None:
            metadata = {"format": ENTRY_FORMAT, "fingerprint": fingerprint, "key": key, "crc32": _payload_crc(entry)}
            with atomic_path(self._file(fingerprint, key)) as tmp:
                tmp.write_bytes(save_safetensors(dict(zip(self.names, entry)), metadata=metadata))

    def _remember(self, fingerprint: str, key: str, entry: Entry) -> None:
        size = sum(tensor.numel() * tensor.element_size() for tensor in entry)
        if size > self.max_bytes:
            return
        self.memory[(fingerprint, key)] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self.memory.popitem(last=False)
            self.bytes -= sum(tensor.numel() * tensor.element_size() for tensor in evicted)

    def _read(self, file: Path, fingerprint: str, key: str) -> Optional[Entry]:
        """The entry in ``file`` if it is complete and belongs to (fingerprint, key); None otherwise."""
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            return None
        try:
            header_length = int.from_bytes(data[:8], "little")
            metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__", {})
            tensors = load_safetensors(data)
        except (SafetensorError, ValueError, UnicodeDecodeError):
            return None
        if set(tensors) != set(self.names):
            return None
        entry = tuple(tensors[name] for name in self.names)
        expected = {"format": ENTRY_FORMAT, "fingerprint": fingerprint, "key": key, "crc32": _payload_crc(entry)}
        return entry if metadata == expected else None


class _FrozenOutputCache:
    """Shared machinery: key the rows, look them up, compute the misses in one call, store them."""

    tower: str
    names: tuple[str, ...]

    def __init__(
        self, max_bytes: int = DEFAULT_MAX_BYTES, directory: str | os.PathLike | None = None, weights_fixed: bool = False
    ) -> None:
        """``weights_fixed``: the caller promises that no CLIP weight changes while this cache lives (one
        evaluation of a model whose tower trains): the weights are then hashed once per backbone instead of at
        every call, which a tower with trainable tensors otherwise needs (see :func:`clip_fingerprint`)."""
        self.store = _EntryStore(self.tower, self.names, max_bytes, directory)
        self.hits = 0
        self.misses = 0
        self._fixed_fingerprints: "WeakKeyDictionary[CLIPSurgeryBackbone, str] | None" = (
            WeakKeyDictionary() if weights_fixed else None
        )

    def _weights_fingerprint(self, backbone: CLIPSurgeryBackbone) -> str:
        if self._fixed_fingerprints is None:
            return clip_fingerprint(backbone, self.tower)
        if backbone not in self._fixed_fingerprints:
            self._fixed_fingerprints[backbone] = clip_fingerprint(backbone, self.tower)
        return self._fixed_fingerprints[backbone]

    def _rows(self, model: SSPSAM, inputs: Tensor, compute: Callable[[Tensor], Entry]) -> list[Entry]:
        """The entry of every row of ``inputs`` (CPU tensors), computing the distinct misses at once."""
        fingerprint = f"{self._weights_fingerprint(model.clip)}-{autocast_state(model.device)}"
        keys = input_keys(inputs.cpu())
        entries: list[Optional[Entry]] = [self.store.get(fingerprint, key) for key in keys]
        first_row_of: dict[str, int] = {}
        for row, (key, entry) in enumerate(zip(keys, entries)):
            if entry is None:
                first_row_of.setdefault(key, row)
        self.hits += len(keys) - len(first_row_of)
        self.misses += len(first_row_of)
        if first_row_of:
            computed = compute(inputs[list(first_row_of.values())].to(model.device))
            for index, key in enumerate(first_row_of):
                entry = tuple(output[index].cpu().clone() for output in computed)
                self.store.put(fingerprint, key, entry)
                first_row_of[key] = entry
            entries = [entry if entry is not None else first_row_of[key] for key, entry in zip(keys, entries)]
        return entries

    @staticmethod
    def _stacked(entries: list[Entry], field: int, device: torch.device) -> Tensor:
        return torch.stack([entry[field] for entry in entries]).to(device, non_blocking=True)


class TextFeatureCache(_FrozenOutputCache):
    """CLIP text features by token ids.

    ``encode(model, tokens)`` equals ``model.encode_text(tokens)`` (bit for bit, in the precision
    that is in force) and runs the text encoder only on the sentences not seen before.
    """

    tower = "text"
    names = ("words", "sentence")

    def encode(self, model: SSPSAM, tokens: Tensor) -> TextFeatures:
        """(B, L) token ids (CPU preferred) -> TextFeatures (words (B, L, W), sentence (B, D), padding (B, L)) on model.device."""
        def compute(ids: Tensor) -> Entry:
            with torch.no_grad():  # an entry never holds a graph (a text tower that trains is run uncached)
                features = model.encode_text(ids)
            return features.words, features.sentence

        entries = self._rows(model, tokens, compute)
        device = model.device
        return TextFeatures(
            words=self._stacked(entries, 0, device),
            sentence=self._stacked(entries, 1, device),
            padding=tokens.to(device, non_blocking=True) == 0,
        )


class ImageTokenCache(_FrozenOutputCache):
    """CLIP-Surgery image tokens by the letterboxed CLIP input.

    ``encode(model, clip_pixels)`` equals ``model.encode_clip_image(clip_pixels)`` and runs the
    image encoder only on the inputs not seen before. It only pays where inputs repeat (see the
    module docstring); with continuous random placement every training input is new. With
    ``model.finetune_image_blocks`` an entry is what the frozen blocks compute (the input of the
    first fine-tuned block), and the fine-tuned blocks run on it at every call, with their graph.
    """

    tower = "image"
    names = ("tokens",)

    def encode(self, model: SSPSAM, clip_pixels: Tensor) -> Tensor:
        """(B, 3, S, S) letterboxed, normalised pixels (CPU preferred) -> (B, 1+N, D) tokens on model.device."""
        entries = self._rows(model, clip_pixels, lambda pixels: (model.clip.frozen_image_features(pixels),))
        return model.clip.finish_image_tokens(self._stacked(entries, 0, model.device))
