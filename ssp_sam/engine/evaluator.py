"""Evaluate a model on one split of a referring dataset, the way published tables are computed.

Every sentence of every referent is one sample (formats.md). Sentences are grouped by image so
that the frozen image encoders run once per image, ``images_per_batch`` images per encoder call
(:meth:`Predictor.encode_prepared`, with SAM's embedding taken from an
:class:`~ssp_sam.data.embedding_cache.EmbeddingCache` when one is given), and the decoder runs
batched over the sentences of those images (:meth:`Predictor.predict_images`). Reading and decoding
the images, the letterbox and the cached SAM embeddings are done ahead by ``workers`` data-loader
processes. The result does not depend on ``images_per_batch`` (up to float rounding between batch
compositions, about 1e-6 on a logit). ``precision`` (auto | fp32 | bf16 | fp16) is the autocast
region of the encoders and the decoder; the result names it.

The protocol (``ssp_sam.engine.protocols``: standard, ssp_sam_release, rela) decides in which
frame the prediction and its GT are compared; the dataset's task decides what is counted
(metrics.md):

- ``res`` (RefCOCO family, ReferIt, ShapeWorld): :class:`RESMetrics` with REC box accuracy against
  the referent's union box.
- ``gres`` (gRefCOCO, ShapeWorld GRES): :class:`GRESMetrics` with the protocol's no-target decision.
- ``phrasecut``: RES metrics without REC accuracy.

Under ``ssp_sam_release`` the released evaluator's own arithmetic (:class:`SSPSAMReleaseMetrics`)
is reported beside them, under its own keys.

Under ``torch.distributed`` each rank evaluates every world-th image; the per-sample records are
gathered and put back in dataset order on every rank, so every rank returns the result of a
single-process run.

The result also says what was evaluated: the data (referent count and :func:`data_sha256`, a fingerprint of
the split's sentences that does not depend on where the files are) and the model's effective config
(overrides such as ``no_target_pixels`` included), so that results files of other data or settings are
never laid out as one (``reporting.py``). ``group_key`` (:func:`resolve_group_key`) is checked against the
split's sentences before any image is read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.embedding_cache import EmbeddingCache
from ..data.records import ReferringDataset, ReferringSample
from ..errors import ConfigError, DatasetError, SSPSAMError
from ..feature_cache import ImageTokenCache, TextFeatureCache
from ..metrics import GRESMetrics, RESMetrics, SSPSAMReleaseMetrics
from ..model import SSPSAM
from ..predictor import ImagePreparer, Prediction, PreparedImage, Predictor
from .host_memory import default_host_memory_in_worker, shared_with_forked_workers
from .precision import Precision
from .protocols import Protocol, ReleaseProtocol, make_protocol

_MetricState = Union[RESMetrics, GRESMetrics, SSPSAMReleaseMetrics]

# group_key's default: the breakdown by ShapeWorld's expression kinds where the sentences carry "kind",
# none elsewhere (RefCOCO); a key given by name must be carried by some sentence.
GROUP_KEY_AUTO = "auto"
DEFAULT_GROUP_KEY = "kind"
@dataclass
class EvaluationResult:
    """Scores of one evaluation.

    protocol: the frame the masks were compared in (``ssp_sam.engine.protocols.PROTOCOLS``).
    precision: the precision the model ran in (fp32, bf16 or fp16).
    metrics: metric name -> value, names as in ``ssp_sam.metrics`` (rates in [0, 1], counts as ints).
    by_group: group (the sentences' ``group_key`` meta value, e.g. ShapeWorld's "kind") -> metrics.
    n_images: distinct images evaluated. n_samples: sentences evaluated.
    per_sample: one dict per sentence in dataset order (sample_id, sentence, expression, image,
        group, I, U, IoU and the task's other per-sample values).
    n_referents: referents (the dataset's samples) evaluated.
    data_sha256: :func:`data_sha256` of the evaluated split.
    model_config: the evaluated model's effective config (``ModelConfig.to_dict()``).
    group_key: the sentence key ``by_group`` breaks the metrics down by (None: no breakdown).
    """

    task: str
    protocol: str
    precision: str
    metrics: dict[str, float | int]
    by_group: dict[str, dict[str, float | int]]
    n_images: int
    n_samples: int
    per_sample: list[dict[str, Any]] = field(default_factory=list)
    n_referents: Optional[int] = None
    data_sha256: Optional[str] = None
    model_config: Optional[dict[str, Any]] = None
    group_key: Optional[str] = None


@dataclass(frozen=True)
class _Sentence:
    """One evaluation sample: sentence ``index`` of ``sample``; ``position`` is its rank in dataset order."""

    position: int
    sample: ReferringSample
    index: int

    @property
    def expression(self) -> str:
        return self.sample.expressions[self.index]


def _sentences_by_image(dataset: ReferringDataset) -> dict[Path, list[_Sentence]]:
    """Image file -> its sentences, images in order of first appearance."""
    by_image: dict[Path, list[_Sentence]] = {}
    for position, (sample, index) in enumerate(dataset.per_sentence()):
        by_image.setdefault(sample.image_path, []).append(_Sentence(position, sample, index))
    return by_image


def sentence_keys(dataset: ReferringDataset) -> list[str]:
    """The per-sentence annotation keys the split's sentences carry (e.g. ShapeWorld's "kind"), in order of first appearance."""
    keys: dict[str, None] = {}
    for sample, index in dataset.per_sentence():
        keys.update(dict.fromkeys(sample.sentence_meta(index)))
    return list(keys)


def resolve_group_key(dataset: ReferringDataset, group_key: str | None) -> str | None:
    """The key to break ``dataset``'s metrics down by.

    ``"auto"`` (:data:`GROUP_KEY_AUTO`): "kind" where some sentence carries it, else no breakdown; None: none;
    any other key must be carried by some sentence: a misspelt one would silently give no breakdown.

    Raises:
        ConfigError: a named key that no sentence of the split carries, listing those they carry.
    """
    if group_key is None:
        return None
    keys = sentence_keys(dataset)
    if group_key == GROUP_KEY_AUTO:
        return DEFAULT_GROUP_KEY if DEFAULT_GROUP_KEY in keys else None
    if group_key not in keys:
        carried = f"their keys: {', '.join(keys)}" if keys else "they carry no per-sentence keys"
        raise ConfigError(
            f"group_key={group_key}: no sentence of {dataset.name} {dataset.split} carries it ({carried}); "
            "give one of those, group_key=auto or group_key=null"
        )
    return group_key


def data_sha256(dataset: ReferringDataset) -> str:
    """A fingerprint of the split as evaluated: sha256 over every referent's id, image (id and file name),
    size, boxes, no-target flag and sentences (ids and text), in dataset order.

    It does not depend on where the files are (a copy of the data elsewhere has the same fingerprint), and
    differs for other data of the same name and counts (another ShapeWorld seed, refclef's other splits).
    """
    digest = hashlib.sha256()
    for sample in dataset:
        item = [
            sample.sample_id, str(sample.image_id), sample.image_path.name,
            list(sample.size_hint) if sample.size_hint is not None else None,
            [list(box) for box in sample.boxes_xyxy], bool(sample.no_target),
            list(sample.sentence_ids), list(sample.expressions),
        ]
        digest.update(json.dumps(item, default=str).encode() + b"\n")
    return digest.hexdigest()


def _group_of(sentence: _Sentence, group_key: str | None) -> str | None:
    if group_key is None:
        return None
    value = sentence.sample.sentence_meta(sentence.index).get(group_key)
    return None if value is None or value == "" else str(value)


class _TaskScorer:
    """The metric accumulations of one task under one protocol, fed one (prediction, GT) pair at a time."""

    def __init__(self, task: str, protocol: Protocol) -> None:
        self.task = task
        self.protocol = protocol
        self.states: list[_MetricState] = [GRESMetrics() if task == "gres" else RESMetrics()]
        if isinstance(protocol, ReleaseProtocol):
            self.states.append(SSPSAMReleaseMetrics("gres" if task == "gres" else "res", protocol.no_target_pixels))

    def update(self, prediction: Prediction, gt_mask: np.ndarray, sentence: _Sentence, group: str | None) -> None:
        """Score one sentence; ``gt_mask`` is its GT already in the protocol's frame."""
        position = sentence.position
        pred_mask, pred_no_target = self.protocol.prediction(prediction)
        standard = self.states[0]
        if self.task == "gres":
            standard.update(pred_mask, gt_mask, pred_no_target, group=group, sample_id=position, gt_no_target=sentence.sample.no_target)
        elif self.task == "res":
            standard.update(pred_mask, gt_mask, prediction.box, sentence.sample.union_box_xyxy(), group=group, sample_id=position)
        else:
            standard.update(pred_mask, gt_mask, group=group, sample_id=position)
        for state in self.states[1:]:
            state.update(pred_mask, gt_mask, group=group, sample_id=position)

    def state_dicts(self) -> list[dict[str, Any]]:
        return [state.state_dict() for state in self.states]

    def load_gathered(self, per_rank: Iterable[list[dict[str, Any]]]) -> None:
        """Replace the accumulations by the union of every rank's ``state_dicts()``, in dataset order.

        The sample ids are dataset positions: sorting by them puts the records (and hence every
        float sum) in the same order whatever the number of ranks and the image order.
        """
        per_rank = list(per_rank)
        merged = []
        for slot, state in enumerate(self.states):
            combined = type(state).from_state_dict(per_rank[0][slot])
            for states in per_rank[1:]:
                combined.merge(type(state).from_state_dict(states[slot]))
            records = combined.state_dict()
            order = np.argsort(records["records"]["sample_id"], kind="stable")
            records["records"] = {name: [column[i] for i in order] for name, column in records["records"].items()}
            merged.append(type(state).from_state_dict(records))
        self.states = merged

    def __len__(self) -> int:
        return len(self.states[0])

    def compute(self) -> dict[str, float | int]:
        return {key: value for state in self.states for key, value in state.compute().items()}

    def compute_by_group(self) -> dict[str, dict[str, float | int]]:
        by_group: dict[str, dict[str, float | int]] = {}
        for state in self.states:
            for group, values in state.compute_by_group().items():
                by_group.setdefault(group, {}).update(values)
        return by_group

    def per_sample(self) -> list[dict[str, Any]]:
        """Per-sample records of every accumulation side by side (the release's under its own names)."""
        rows = [dict(row) for row in self.states[0].per_sample()]
        for state in self.states[1:]:
            for row, extra in zip(rows, state.per_sample()):
                row.update({key: value for key, value in extra.items() if key not in row})
        return rows


def _distributed_slot() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _ground_truth(sample: ReferringSample, prediction: Prediction, protocol: Protocol, masks: dict[str, np.ndarray]) -> np.ndarray:
    """The sample's GT in the protocol's frame (made once per referent), its size checked against the prediction's."""
    if sample.sample_id not in masks:
        if tuple(sample.image_size) != prediction.mask.shape:
            raise DatasetError(
                f"sample {sample.sample_id} ({sample.image_path}): annotated size {tuple(sample.image_size)} "
                f"differs from the image's size {prediction.mask.shape}"
            )
        masks[sample.sample_id] = protocol.ground_truth(sample)
    return masks[sample.sample_id]


def _describe(sentence: _Sentence, record: dict[str, Any]) -> dict[str, Any]:
    """A per-sample record with the sentence it scores."""
    sample = sentence.sample
    return {
        "sample_id": sample.sample_id,
        "sentence": sentence.index,
        "sentence_id": sample.sentence_ids[sentence.index],
        "expression": sentence.expression,
        "image": str(sample.image_path),
        **{key: value for key, value in record.items() if key != "sample_id"},
    }


class _PreparedImages(Dataset):
    """Item i: (i, the PreparedImage of ``paths[i]``, its SAM embedding read from ``cache``), or (i, the error).

    An error of the data (unreadable image, entry missing from the cache) is returned, not raised, so
    that the main process raises it as it is (one line naming the file) rather than wrapped in a
    data-loader worker's traceback.
    """

    def __init__(self, paths: list[Path], preparer: ImagePreparer, cache: EmbeddingCache | None) -> None:
        self.paths = paths
        self.preparer = preparer
        self.cache = cache

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, PreparedImage | SSPSAMError]:
        path = self.paths[index]
        try:
            embedding = self.cache.get(path, dtype=None) if self.cache is not None else None  # storage dtype: converted on the device
            return index, self.preparer(path, sam_embedding=embedding)
        except SSPSAMError as error:
            return index, error


def _prepared_batches(
    paths: list[Path], preparer: ImagePreparer, cache: EmbeddingCache | None, images_per_batch: int, workers: int
) -> Iterator[list[tuple[int, PreparedImage]]]:
    """Batches of ``images_per_batch`` prepared images in order, made ahead by ``workers`` processes (0: here)."""
    loader = DataLoader(
        _PreparedImages(paths, preparer, cache), batch_size=images_per_batch, num_workers=workers, collate_fn=list,
        prefetch_factor=2 if workers > 0 else None, worker_init_fn=default_host_memory_in_worker,
    )
    for batch in loader:
        for _, item in batch:
            if isinstance(item, SSPSAMError):
                raise item
        yield batch


def evaluate(
    model: SSPSAM | Predictor,
    dataset: ReferringDataset,
    cache: EmbeddingCache | None = None,
    device: str | torch.device | None = None,
    max_batch: int = 32,
    progress: bool = True,
    group_key: str | None = GROUP_KEY_AUTO,
    protocol: str = "standard",
    images_per_batch: int = 1,
    workers: int = 0,
    precision: str | Precision = "fp32",
    text_cache: TextFeatureCache | None = None,
    image_cache: ImageTokenCache | None = None,
    compile: bool = False,
) -> EvaluationResult:
    """Score ``model`` on every sentence of ``dataset``.

    Args:
        model: an SSP-SAM model, or a ready :class:`Predictor` (then ``device``, ``max_batch``,
            ``precision``, the feature caches and ``compile`` are its own).
        dataset: one split; its ``task`` picks the metrics.
        cache: SAM embeddings covering the dataset's images, or None to
            run SAM's image encoder on the fly.
        max_batch: sentences decoded together (across the images of a batch).
        progress: show a tqdm bar over this rank's images (on every rank).
        group_key: per-sentence meta key whose value breaks the metrics down (``by_group``);
            None for no breakdown; "auto": "kind" where the sentences carry it (:func:`resolve_group_key`).
        protocol: where the masks are compared: "standard" (original resolution),
            "ssp_sam_release" or "rela" (``ssp_sam.engine.protocols``).
        images_per_batch: images per encoder call; their sentences are decoded together.
        workers: data-loader processes reading images and cached embeddings ahead (0: none).
        precision: auto | fp32 | bf16 | fp16 (``ssp_sam.engine.precision.resolve_precision``).
        text_cache / image_cache: frozen-feature caches (``ssp_sam.feature_cache``); a new text
            cache for this call when None (sentences repeat within a split; the weights are fixed during
            the call, so a text tower that trains is hashed once, not per batch), no image cache.
        compile: ``torch.compile`` the decoder where it can (:class:`Predictor`).

    Raises:
        ConfigError: an unknown protocol, a ``group_key`` no sentence carries.
        DatasetError: unreadable annotations, or an annotated size that differs from the image.
        ImageError: a missing or unreadable image (named).
        CacheError: an image missing from ``cache`` (named).
    """
    if len(dataset) == 0:
        raise DatasetError(f"dataset {dataset.name} split {dataset.split}: no samples to evaluate")
    if int(images_per_batch) < 1 or int(workers) < 0:
        raise ConfigError(f"images_per_batch must be >= 1 and workers >= 0, got {images_per_batch} and {workers}")
    group_key = resolve_group_key(dataset, group_key)
    predictor = model if isinstance(model, Predictor) else Predictor(
        model, device=device, max_batch=max_batch, precision=precision,
        text_cache=text_cache if text_cache is not None else TextFeatureCache(weights_fixed=True), image_cache=image_cache, compile=compile,
    )
    frame = make_protocol(protocol, predictor.model.sam_image_size, predictor.model.config.no_target_pixels)
    by_image = _sentences_by_image(dataset)
    rank, world_size = _distributed_slot()
    my_images = list(by_image)[rank::world_size]
    scorer = _TaskScorer(dataset.task, frame)

    bar = tqdm(total=len(my_images), desc=f"eval {dataset.name}/{dataset.split}", unit="img", disable=not progress, dynamic_ncols=True)
    # The loader's workers are forked from this process: without the context, every page of the kept free
    # heap that the forward passes reuse while they live is copied on write (evaluation 3-4x slower on a
    # 2-core CPU, benchmarks/README.md, "2026-11-30").
    with shared_with_forked_workers(enabled=int(workers) > 0):
        for batch in _prepared_batches(my_images, predictor.preparer, cache, int(images_per_batch), int(workers)):
            sentences = [by_image[my_images[index]] for index, _ in batch]
            encoded = predictor.encode_prepared([prepared for _, prepared in batch])
            predictions = predictor.predict_images(encoded, [[sentence.expression for sentence in group] for group in sentences])
            for group, group_predictions in zip(sentences, predictions):
                masks: dict[str, np.ndarray] = {}
                for sentence, prediction in zip(group, group_predictions):
                    gt_mask = _ground_truth(sentence.sample, prediction, frame, masks)
                    scorer.update(prediction, gt_mask, sentence, _group_of(sentence, group_key))
            bar.update(len(batch))
            bar.set_postfix(sentences=len(scorer), refresh=False)
    bar.close()

    gathered: list[Any] = [scorer.state_dicts()]
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, scorer.state_dicts())
    scorer.load_gathered(gathered)

    sentence_at = {sentence.position: sentence for group in by_image.values() for sentence in group}
    per_sample = [_describe(sentence_at[record["sample_id"]], record) for record in scorer.per_sample()]
    return EvaluationResult(
        task=dataset.task,
        protocol=frame.name,
        precision=predictor.precision.name,
        metrics=scorer.compute(),
        by_group=scorer.compute_by_group(),
        n_images=len(by_image),
        n_samples=len(scorer),
        per_sample=per_sample,
        n_referents=len(dataset),
        data_sha256=data_sha256(dataset),
        model_config=predictor.model.config.to_dict(),
        group_key=group_key,
    )
