"""Region-level contrastive pretraining of a small CLIP on ShapeWorld scenes.

SSP-SAM reads CLIP frozen, and only through two outputs: the CLIP-Surgery patch tokens
(``CLIPSurgeryBackbone.encode_image(...)[:, 1:]``), which its visual adapter compares with the
sentence embedding patch by patch, and the text tower (sentence embedding and word features). So
the contrastive pairs here are regions and captions rather than images and captions:

- Image side: the CLIP-Surgery patch tokens, each L2-normalised, averaged over an object with
  the fraction of each patch the object covers as weights, then normalised again. Every scene
  also gives a background region (the patch fractions covered by no object), a negative for
  every caption of the scene, so that background patches learn to stay away from all captions.
- Text side: the sentence embedding of CLIPSurgeryBackbone's text forward, on the text SSP-SAM
  feeds ("{caption}." with the model's ``append_period``).
- Captions: per scene, some of its ShapeWorld-Ref GRES expressions (``generate_refs(scene,
  "gres")``: kinds A / L / R / M / N; so left / right / top / bottom, "left of", "above", plurals
  and absent objects all occur), and at every step all 96 descriptions "the {size} {color}
  {shape}", so that every object is told apart from every other size / colour / shape.
- Loss: symmetric multi-positive InfoNCE with a mask of valid pairs (:func:`masked_info_nce`) and
  CLIP's learnable temperature (``logit_scale``, clamped at 100). An expression is only scored
  against the regions of its own scene (it is defined relative to that scene) and its positives
  are its targets (several for M, none for N: an N caption only serves as a negative). A
  description is scored against every region of the batch, and every object with its size,
  colour and shape is a positive, so equal objects of different scenes are never pushed apart.
- Dense term (weight ``dense_weight``; 0 in the shipped model's recipe): every patch token is
  classified among the 48 OVSS class names "{color} {shape}" and "background"
  (:data:`DENSE_CLASS_NAMES`, text through the same text tower) with the patch's coverage fractions
  as soft targets (:func:`dense_loss`). The region contrast only constrains coverage-weighted means
  of the patch tokens; SSP-SAM's visual adapter and an OVSS head read the tokens one by one, so
  each token must carry its object's colour and shape itself.

The weights are saved as a plain open_clip state dict, which ``build_clip_model("custom",
checkpoint=..., custom=...)`` loads. Training scenes: ``generate_scene(seed, "train", i)`` for
i < ``pool_size``, made once at the start; held-out: the "val" split of the same seed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.pos_embed import get_2d_sincos_pos_embed
from torch import Tensor
from tqdm import tqdm

from ..backbones.clip import CLIPSurgeryBackbone, build_clip_model
from ..backbones.clip_tokenizer import CLIPTokenizer
from ..data.shapeworld import COLORS, SHAPES, SIZE_RADII, Scene, generate_refs, generate_scene
from ..data.shapeworld.expressions import mirror_text
from ..engine.config_fields import number
from ..engine.optim import cosine_schedule
from ..errors import ConfigError
from ..fileio import atomic_path
from ..letterbox import letterbox_image, letterbox_mask
from ..weight_identity import hash_weights_file, remembered_sha256
from .stage import StageControl, check_settings, finish_stage, finished_report, prepare_stage_files, read_state, run_steps

TRAIN_SPLIT = "train"
HELDOUT_SPLIT = "val"
MAX_LOGIT_SCALE = 100.0
# Every "{size} {color} {shape}" description, indexed by attribute_code().
DESCRIPTIONS = tuple(f"the {size} {color} {shape}" for size in SIZE_RADII for color in COLORS for shape in SHAPES)
# Descriptions that name the shape alone or with one other attribute ("the circle", "the red circle",
# "the small circle"; settings.partial_descriptions): among them shape is the only thing that tells
# some captions apart, while any two of the 96 full descriptions also differ in colour or size.
PARTIAL_DESCRIPTIONS = (
    *(f"the {shape}" for shape in SHAPES),
    *(f"the {color} {shape}" for color in COLORS for shape in SHAPES),
    *(f"the {size} {shape}" for size in SIZE_RADII for shape in SHAPES),
)
# The OVSS class list of the ShapeWorld spec (colour-major, then shape) and a background class last.
BACKGROUND_NAME = "background"
DENSE_CLASS_NAMES = (*(f"{color} {shape}" for color in COLORS for shape in SHAPES), BACKGROUND_NAME)
BACKGROUND_CLASS = len(DENSE_CLASS_NAMES) - 1
# Vision position embeddings at the start of pretraining: open_clip's random ones, or 2-D sine-cosine
# codes (start_with_sincos_positions).
POSITION_INITS = ("random", "sincos")


@dataclass(frozen=True)
class CLIPPretrainSettings:
    """Hyper-parameters of :func:`pretrain_clip` (configs/pretrain_clip.yaml gives the defaults used).

    Each number has its range (:func:`~ssp_sam.pretrain.stage.check_settings`, one error naming the key):
    a negative learning rate, weight decay or loss weight, or a clip norm <= 0, would train the model
    away from its objective with no error. A zero learning rate trains nothing and is allowed.
    """

    steps: int = number(900, 1)
    batch_size: int = number(32, 1)  # scenes per step, drawn from the pool without replacement
    expressions_per_scene: int = number(3, 0)  # GRES expressions drawn per scene and step (fewer if the scene has fewer)
    lr: float = number(2e-3, 0)
    min_lr: float = number(1e-5, 0)
    weight_decay: float = number(0.05, 0)
    warmup_steps: int = number(45, 0)
    grad_clip: float = number(1.0, 0, above=True)  # gradient norm clipped to this (always on)
    seed: int = number(1000, 0)
    pool_size: int = number(3000, 1)  # training scenes generated once and reused
    eval_scenes: int = number(300, 0)  # held-out scenes for the final accuracies
    dense_weight: float = number(0.0, 0)  # weight of dense_loss (0: region-caption contrast only, the shipped recipe)
    position_init: str = "random"  # vision position embeddings at the start: one of POSITION_INITS
    partial_descriptions: bool = False  # also train on PARTIAL_DESCRIPTIONS ("the circle", "the red circle", ...)
    side_weight: float = number(0.0, 0)  # weight of side_loss (each drawn L / R expression against its side-swapped twin; 0: off)
    init_checkpoint: Optional[str] = None  # start from these open_clip weights (same clip_custom) instead of from scratch

    def __post_init__(self) -> None:
        check_settings(self)
        if self.position_init not in POSITION_INITS:
            raise ConfigError(f"position_init: expected one of {', '.join(POSITION_INITS)}, got {self.position_init!r}")
        if self.batch_size > self.pool_size:
            # Checked here, not when the first step draws its batch after the pool has been generated.
            raise ConfigError(
                f"batch_size={self.batch_size}: must be <= pool_size={self.pool_size} (a step draws distinct scenes of the pool)"
            )


@dataclass
class CLIPPretrainResult:
    losses: list[float]  # training loss of every step done (all steps when finished)
    heldout: dict[str, float]  # evaluate_grounding() on the held-out scenes; empty when not finished
    seconds: float  # wall time of this session (scene generation, training, evaluation, saving)
    finished: bool = True  # False: stopped early (stop_after_steps / max_minutes)
    state_saved: bool = False  # stopped early and the stage state holds every step done (resume=true continues)


def attribute_code(size: str, color: str, shape: str) -> int:
    """Index of "the {size} {color} {shape}" in :data:`DESCRIPTIONS`."""
    return (tuple(SIZE_RADII).index(size) * len(COLORS) + tuple(COLORS).index(color)) * len(SHAPES) + SHAPES.index(shape)


def description_matches(partial: bool) -> Tensor:
    """(D, 96) bool: which objects (by attribute code) each training description is true of. The rows are
    :data:`DESCRIPTIONS` (each true of its own code only), then with ``partial`` :data:`PARTIAL_DESCRIPTIONS`
    (true of every object with the attributes they name)."""
    if not partial:
        return torch.eye(len(DESCRIPTIONS), dtype=torch.bool)
    sizes, colors, shapes = (
        torch.tensor(values) for values in np.unravel_index(np.arange(len(DESCRIPTIONS)), (len(SIZE_RADII), len(COLORS), len(SHAPES)))
    )
    shape_alone = shapes[None, :] == torch.arange(len(SHAPES))[:, None]
    with_color = (colors[None, None, :] == torch.arange(len(COLORS))[:, None, None]) & shape_alone[None]
    with_size = (sizes[None, None, :] == torch.arange(len(SIZE_RADII))[:, None, None]) & shape_alone[None]
    return torch.cat([torch.eye(len(DESCRIPTIONS), dtype=torch.bool), shape_alone, with_color.flatten(0, 1), with_size.flatten(0, 1)])


def dense_class(codes: Tensor) -> Tensor:
    """Index in :data:`DENSE_CLASS_NAMES` ("{color} {shape}") of objects given by attribute codes (size is
    the outermost digit of a code, so dropping it is a remainder)."""
    return codes % (len(COLORS) * len(SHAPES))


# ---------------------------------------------------------------------------------------------------
# Scenes as regions and captions
# ---------------------------------------------------------------------------------------------------


@dataclass
class GroundingScene:
    """One scene, ready for region-caption contrast (K objects, N patches, E expressions, L tokens).

    pixels: (3, S, S) letterboxed CLIP input (stored in float16 to halve the pool's memory);
    coverage: (K + 1, N) fraction of each patch covered by object k, the last row by background;
    codes: (K,) attribute_code of each object; expressions: (E, L) token ids;
    expression_targets: E tuples of object indices (empty for a no-target expression);
    expression_kinds: E kind letters (A, L, R, M, N);
    side_swapped: (E, L) token ids of each expression with its spatial words swapped (left / right,
    top / bottom, above / below, ...: :func:`side_swapped_text`; a row equals its expression's when
    the expression has no spatial word), or None when not asked for (the side term is off).
    """

    pixels: Tensor
    coverage: Tensor
    codes: Tensor
    expressions: Tensor
    expression_targets: tuple[tuple[int, ...], ...]
    expression_kinds: tuple[str, ...]
    side_swapped: Optional[Tensor] = None

    @property
    def num_objects(self) -> int:
        return len(self.codes)


def patch_coverage(scene: Scene, image_size: int, patch_size: int) -> tuple[Tensor, Tensor]:
    """Letterboxed CLIP pixels (3, S, S) and the (K + 1, N) patch coverage of objects and background."""
    pixels, box = letterbox_image(scene.image, image_size, "center")
    background = ~np.logical_or.reduce([obj.mask for obj in scene.objects])
    masks = torch.stack([letterbox_mask(mask, box) for mask in [*(obj.mask for obj in scene.objects), background]])
    coverage = F.avg_pool2d(masks[:, None], patch_size).flatten(1)
    return pixels, coverage


def side_swapped_text(text: str) -> str:
    """``text`` with its spatial words turned into their opposites ("the red circle on the left" ->
    "... on the right", "left of" -> "right of", "above" -> "below"); unchanged without one.

    An L or R expression of ShapeWorld-Ref is false of its targets once swapped: an L target is the
    extreme matching object on its side by a margin, an R target lies beyond its anchor by a margin
    (``expressions.py``), so neither is also the extreme or beyond on the other side.
    """
    return mirror_text(mirror_text(text, "h"), "v")


def grounding_scene(
    scene: Scene, task: str, tokenizer: CLIPTokenizer, image_size: int, patch_size: int, side_twins: bool = False
) -> GroundingScene:
    """The regions of ``scene`` and every sentence of its ``task`` refs ("res" or "gres"); ``side_twins``:
    also their side-swapped twins (only the side term reads them)."""
    pixels, coverage = patch_coverage(scene, image_size, patch_size)
    sentences = [sentence for ref in generate_refs(scene, task) for sentence in ref.sentences]
    return GroundingScene(
        pixels=pixels.half(),
        coverage=coverage,
        codes=torch.tensor([attribute_code(obj.size, obj.color, obj.shape) for obj in scene.objects]),
        expressions=tokenizer([sentence.text for sentence in sentences]),
        expression_targets=tuple(sentence.targets for sentence in sentences),
        expression_kinds=tuple(sentence.kind for sentence in sentences),
        side_swapped=tokenizer([side_swapped_text(sentence.text) for sentence in sentences]) if side_twins else None,
    )


def grounding_scenes(
    seed: int, split: str, count: int, task: str, tokenizer: CLIPTokenizer, image_size: int, patch_size: int,
    progress: bool = False, side_twins: bool = False,
) -> list[GroundingScene]:
    indices = range(count)
    if progress:
        indices = tqdm(indices, desc=f"scenes ({split}, seed {seed})", leave=False)
    return [grounding_scene(generate_scene(seed, split, i), task, tokenizer, image_size, patch_size, side_twins) for i in indices]


@dataclass
class ContrastiveBatch:
    """B scenes with R regions, C captions and N patches each.

    pixels: (B, 3, S, S); coverage: (R, N); region_image: (R,) scene of each region;
    tokens: (C, L); positives, valid: (C, R) bool, positives a subset of valid;
    dense_targets: (B, N, len(DENSE_CLASS_NAMES)) share of each patch covered by each class (rows sum to
        1), or None when the dense term is off.
    side_pairs: (P, 3) rows (caption, its side-swapped twin, a target region) for :func:`side_loss`
        (the twins are captions outside the contrast: no valid pair), or None when the side term is off.
    """

    pixels: Tensor
    coverage: Tensor
    region_image: Tensor
    tokens: Tensor
    positives: Tensor
    valid: Tensor
    dense_targets: Optional[Tensor]
    side_pairs: Optional[Tensor] = None

    def to(self, device: torch.device | str) -> "ContrastiveBatch":
        values = (getattr(self, name) for name in self.__dataclass_fields__)
        return ContrastiveBatch(*(None if value is None else value.to(device) for value in values))


def contrastive_batch(
    scenes: Sequence[GroundingScene], rng: np.random.Generator, expressions_per_scene: int, description_tokens: Tensor,
    dense: bool = True, matches: Tensor | None = None, side_pairs: bool = False,
) -> ContrastiveBatch:
    """The captions of one step: all descriptions, and per scene some of its expressions.

    Captions: the D ``description_tokens`` (the 96 of :data:`DESCRIPTIONS`, and more with
    ``matches``: (D, 96) :func:`description_matches`, which objects each is true of), then the
    expressions scene after scene. Regions: each scene's K objects then its background, scene after
    scene. See the module docstring for which pairs are valid and positive. ``dense``: also the
    dense term's patch targets. ``side_pairs``: after each drawn expression with a spatial word
    (L, R), its twin with the words swapped (:func:`side_swapped_text`), paired with each target in
    ``side_pairs`` and valid with no region (the twin's own target, the object on the other side, is
    not computed here, so the twin only enters :func:`side_loss`).
    """
    region_codes, region_image, first_region = [], [], []
    for index, scene in enumerate(scenes):
        first_region.append(len(region_codes))
        region_codes += [*scene.codes.tolist(), -1]  # -1: background, no description matches it
        region_image += [index] * (scene.num_objects + 1)
    region_codes = torch.tensor(region_codes)
    region_image = torch.tensor(region_image)

    matches = description_matches(partial=False) if matches is None else matches
    tokens = [*description_tokens]
    positives = [*(matches[:, region_codes.clamp(min=0)] & (region_codes >= 0))]
    valid = [torch.ones(len(region_codes), dtype=torch.bool)] * len(description_tokens)
    pairs: list[tuple[int, int, int]] = []
    for index, scene in enumerate(scenes):
        for expression in rng.permutation(len(scene.expression_targets))[:expressions_per_scene]:
            targets = torch.zeros(len(region_codes), dtype=torch.bool)
            targets[[first_region[index] + target for target in scene.expression_targets[expression]]] = True
            tokens.append(scene.expressions[expression])
            positives.append(targets)
            valid.append(region_image == index)
            if side_pairs and not torch.equal(scene.side_swapped[expression], scene.expressions[expression]):
                tokens.append(scene.side_swapped[expression])
                positives.append(torch.zeros_like(targets))
                valid.append(torch.zeros_like(targets))
                pairs += [(len(tokens) - 2, len(tokens) - 1, int(region)) for region in targets.nonzero()[:, 0]]
    return ContrastiveBatch(
        pixels=torch.stack([scene.pixels.float() for scene in scenes]),
        coverage=torch.cat([scene.coverage for scene in scenes]),
        region_image=region_image,
        tokens=torch.stack(tokens),
        positives=torch.stack(positives),
        valid=torch.stack(valid),
        dense_targets=torch.stack([patch_class_shares(scene.coverage, region_classes(scene.codes)) for scene in scenes])
        if dense
        else None,
        side_pairs=torch.tensor(pairs, dtype=torch.long).view(-1, 3) if side_pairs else None,
    )


def region_classes(codes: Tensor) -> Tensor:
    """(K + 1,) :data:`DENSE_CLASS_NAMES` index of a scene's regions: its K objects, then background."""
    return torch.cat([dense_class(codes), torch.tensor([BACKGROUND_CLASS])])


def patch_class_shares(coverage: Tensor, classes: Tensor) -> Tensor:
    """(N, len(DENSE_CLASS_NAMES)) share of each patch covered by each class, from the (K + 1, N) region
    coverage and the (K + 1,) region classes; each row is normalised to sum to 1 (two objects of
    one class add up)."""
    shares = torch.zeros(coverage.shape[1], len(DENSE_CLASS_NAMES)).index_add_(1, classes, coverage.T.float())
    return shares / shares.sum(dim=1, keepdim=True).clamp(min=1e-6)


# ---------------------------------------------------------------------------------------------------
# Embeddings and loss
# ---------------------------------------------------------------------------------------------------


def pool_regions(patch_tokens: Tensor, coverage: Tensor, region_image: Tensor) -> Tensor:
    """Unit region embeddings (R, D) from patch tokens (B, N, D), coverage (R, N) and region_image (R,).

    Each patch token is normalised first (SSP-SAM compares patches one by one), then averaged with
    the coverage fractions as weights; a region covering no patch at all gives a zero vector.
    """
    weights = coverage / coverage.sum(dim=1, keepdim=True).clamp(min=1e-6)
    patches = F.normalize(patch_tokens, dim=-1)[region_image]  # (R, N, D)
    return F.normalize((weights.unsqueeze(-1) * patches).sum(dim=1), dim=-1)


def sentence_embeddings(backbone: CLIPSurgeryBackbone, tokens: Tensor) -> Tensor:
    """Unit sentence embeddings (C, D) from token ids (C, L), with gradients."""
    return F.normalize(backbone.encode_text(tokens)[1], dim=-1)


def patch_embeddings(backbone: CLIPSurgeryBackbone, pixels: Tensor) -> Tensor:
    """CLIP-Surgery patch tokens (B, N, D) from letterboxed pixels (B, 3, S, S), with gradients.

    ``image_tokens``, not ``encode_image``: SSP-SAM's image forward keeps its frozen part out of
    autograd, which here would leave the whole image tower untrained (it did from 2026-11-30 to
    2026-12-01: the recipe's CLIP then learnt shape to 0.28 instead of 0.99)."""
    return backbone.image_tokens(pixels)[:, 1:]


def masked_info_nce(logits: Tensor, positives: Tensor, valid: Tensor) -> Tensor:
    """Symmetric multi-positive InfoNCE over the valid entries of a (C, R) caption-region logit matrix.

    For each caption with at least one positive: -log of the softmax probability (over its valid
    regions) of all its positives together; the same for each region over its valid captions. The
    loss is the mean of the two directions, each averaged over its rows that have a positive.
    """
    if (positives & ~valid).any():
        raise ValueError("every positive pair must be valid")

    def one_direction(scores: Tensor, positive: Tensor, allowed: Tensor) -> Tensor:
        rows = positive.any(dim=1)
        scores, positive, allowed = scores[rows], positive[rows], allowed[rows]
        log_all = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=1)
        log_positive = torch.logsumexp(scores.masked_fill(~positive, float("-inf")), dim=1)
        return (log_all - log_positive).mean()

    return 0.5 * (one_direction(logits, positives, valid) + one_direction(logits.T, positives.T, valid.T))


def dense_loss(patch_tokens: Tensor, class_embeddings: Tensor, targets: Tensor, scale: Tensor) -> Tensor:
    """Soft cross-entropy of every patch over the class names (scalar, mean over the B * N patches).

    Args:
        patch_tokens: (B, N, D) CLIP-Surgery patch tokens (normalised here, as SSP-SAM compares them).
        class_embeddings: (C, D) unit text embeddings of :data:`DENSE_CLASS_NAMES`.
        targets: (B, N, C) class shares of each patch (rows sum to 1).
        scale: CLIP's temperature (the logits are ``scale`` times cosine similarities).
    """
    logits = scale * F.normalize(patch_tokens, dim=-1) @ class_embeddings.T
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def side_loss(logits: Tensor, pairs: Tensor) -> Tensor:
    """Each target against its expression's side-swapped twin: mean of softplus(l_twin - l_true) over
    the (P, 3) ``pairs`` (caption, twin, region) of a (C, R) caption-region logit matrix; 0 without pairs.

    The twin differs from the expression by its side words alone and is false of the target, so only a
    text embedding that reads the side word can pass this 2-way test. In the InfoNCE the twin would be one
    negative among ~100 captions of the region, next to its easy positive (its own description), which
    takes almost all the probability mass: a hard negative there barely moves the loss (the 300-step
    pilot of docs/shapeworld_model.md). On the ShapeWorld CLIP this term alone did not make the text
    read the side word either (the same document, "Where the direction word is lost").
    """
    if len(pairs) == 0:
        return logits.sum() * 0.0
    true, twin = logits[pairs[:, 0], pairs[:, 2]], logits[pairs[:, 1], pairs[:, 2]]
    return F.softplus(twin - true).mean()


def training_losses(
    backbone: CLIPSurgeryBackbone, batch: ContrastiveBatch, class_tokens: Tensor, dense_weight: float, side_weight: float = 0.0
) -> dict[str, Tensor]:
    """The loss terms of one batch: ``contrast`` (region-caption InfoNCE), ``dense`` (weighted
    :func:`dense_loss`, only when ``dense_weight`` > 0), ``side`` (weighted :func:`side_loss`, only when
    ``side_weight`` > 0) and their sum ``loss``. One text forward for the captions and the (C, L)
    ``class_tokens``."""
    patches = patch_embeddings(backbone, batch.pixels)
    regions = pool_regions(patches, batch.coverage, batch.region_image)
    texts = sentence_embeddings(backbone, torch.cat([batch.tokens, class_tokens]) if dense_weight else batch.tokens)
    captions = texts[: len(batch.tokens)]
    scale = backbone.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    logits = scale * captions @ regions.T
    terms = {"contrast": masked_info_nce(logits, batch.positives, batch.valid)}
    if side_weight:
        terms["side"] = side_weight * side_loss(logits, batch.side_pairs)
    if dense_weight:
        terms["dense"] = dense_weight * dense_loss(patches, texts[len(batch.tokens) :], batch.dense_targets, scale)
    terms["loss"] = sum(terms.values())
    return terms


# ---------------------------------------------------------------------------------------------------
# Held-out evaluation
# ---------------------------------------------------------------------------------------------------


def dense_labelling(
    patch_tokens: Tensor, class_embeddings: Tensor, coverage: Tensor, classes: Tensor
) -> tuple[Tensor, Tensor]:
    """Zero-shot labelling of one image's patches: (N,) predicted and (N,) true class indices.

    Each patch token (N, D) takes the class whose text embedding (C, D, unit) is most similar to it;
    the truth of a patch is the class of the region (object or background) covering the largest
    share of it, from the (K + 1, N) coverage and the (K + 1,) region classes.
    """
    predicted = (F.normalize(patch_tokens, dim=-1) @ class_embeddings.T).argmax(dim=1)
    return predicted, classes[coverage.argmax(dim=0)]


def on_object_patches(predicted: Tensor, truth: Tensor, background: int = BACKGROUND_CLASS) -> tuple[Tensor, Tensor]:
    """The (predicted, truth) pairs of the patches objects cover (issue 13's dense figure): those whose
    largest share is an object's (truth is not ``background``), whatever was predicted there."""
    on_object = truth != background
    return predicted[on_object], truth[on_object]


def confusion_counts(predicted: Tensor, truth: Tensor, num_classes: int) -> Tensor:
    """(C, C) counts, row = true class, column = predicted class."""
    return torch.bincount(truth * num_classes + predicted, minlength=num_classes**2).view(num_classes, num_classes)


def miou_from_confusion(confusion: Tensor, classes: Sequence[int] | None = None) -> float:
    """Mean over ``classes`` (default all) that occur (in truth or prediction) of TP / (TP + FP + FN)."""
    true_positive = confusion.diagonal().double()
    union = confusion.sum(dim=0).double() + confusion.sum(dim=1).double() - true_positive
    chosen = torch.arange(len(confusion)) if classes is None else torch.as_tensor(classes)
    chosen = chosen[union[chosen] > 0]
    return float((true_positive[chosen] / union[chosen]).mean()) if len(chosen) else float("nan")


@torch.no_grad()
def evaluate_grounding(
    backbone: CLIPSurgeryBackbone, scenes: Sequence[GroundingScene], description_tokens: Tensor, class_tokens: Tensor
) -> dict[str, float]:
    """Accuracies of the frozen features on scenes with single-target expressions (RES refs).

    - ``expression_{A,L,R,all}``: an expression picks, among its scene's objects, the region with
      the most similar embedding; correct if it is the target (chance about 1 / objects).
    - ``pointing``: the patch whose token is most similar to the expression lies (partly) on the
      target; this is the similarity map that SSP-SAM's visual adapter reads.
    - ``description``: each object, among all 96 "the {size} {color} {shape}" captions, picks the
      most similar one; correct if it is its own. ``color`` / ``shape`` / ``size``: the picked
      caption names the object's colour / shape / size.
    - ``dense_miou``: zero-shot labelling of every patch token among :data:`DENSE_CLASS_NAMES`
      (:func:`dense_labelling`), mIoU over the patches of all scenes and the classes that occur;
      ``dense_miou_objects`` the same mean over the 48 object classes only (background left out).
    - ``dense_miou_covered``: issue 13's figure, "mIoU on the patches objects cover": the same labelling
      (background still a candidate name) scored only on the patches whose largest share is an object's,
      mean over the 48 object classes. Usually above ``dense_miou``: background patches labelled as an
      object, and objects' slivers on background patches, are left out.
    """
    device = backbone.clip.logit_scale.device
    descriptions = sentence_embeddings(backbone, description_tokens.to(device))
    class_embeddings = sentence_embeddings(backbone, class_tokens.to(device))
    confusion = torch.zeros(len(class_tokens), len(class_tokens), dtype=torch.long)
    covered = torch.zeros_like(confusion)  # patches whose largest share is an object's
    correct: dict[str, list[bool]] = {key: [] for key in ("A", "L", "R", "pointing", "description", "color", "shape", "size")}
    for scene in scenes:
        patches = patch_embeddings(backbone, scene.pixels.float()[None].to(device))
        coverage = scene.coverage.to(device)
        objects = pool_regions(patches, coverage, torch.zeros(len(coverage), dtype=torch.long, device=device))[:-1]
        sentences = sentence_embeddings(backbone, scene.expressions.to(device))
        chosen = (sentences @ objects.T).argmax(dim=1).tolist()
        best_patch = (sentences @ F.normalize(patches[0], dim=-1).T).argmax(dim=1)
        for index, (targets, kind) in enumerate(zip(scene.expression_targets, scene.expression_kinds)):
            correct[kind].append(chosen[index] == targets[0])
            correct["pointing"].append(bool(coverage[targets[0], best_patch[index]] > 0))
        predicted, truth = dense_labelling(patches[0], class_embeddings, coverage, region_classes(scene.codes).to(device))
        predicted, truth = predicted.cpu(), truth.cpu()
        confusion += confusion_counts(predicted, truth, len(class_tokens))
        covered += confusion_counts(*on_object_patches(predicted, truth), len(class_tokens))
        picked = (objects @ descriptions.T).argmax(dim=1).tolist()
        for code, guess in zip(scene.codes.tolist(), picked):
            true_size, true_color, true_shape = np.unravel_index(code, (len(SIZE_RADII), len(COLORS), len(SHAPES)))
            guess_size, guess_color, guess_shape = np.unravel_index(guess, (len(SIZE_RADII), len(COLORS), len(SHAPES)))
            correct["description"].append(code == guess)
            correct["color"].append(true_color == guess_color)
            correct["shape"].append(true_shape == guess_shape)
            correct["size"].append(true_size == guess_size)
    correct["all"] = correct["A"] + correct["L"] + correct["R"]

    def mean(values: list[bool]) -> float:
        return float(np.mean(values)) if values else float("nan")

    results = {f"expression_{kind}": mean(correct[kind]) for kind in ("A", "L", "R", "all")}
    results.update({key: mean(correct[key]) for key in ("pointing", "description", "color", "shape", "size")})
    results["dense_miou"] = miou_from_confusion(confusion)
    results["dense_miou_objects"] = miou_from_confusion(confusion, range(BACKGROUND_CLASS))
    results["dense_miou_covered"] = miou_from_confusion(covered, range(BACKGROUND_CLASS))
    return results


def heldout_figures(
    model: CLIP, surgery_blocks: int, append_period: bool, seed: int, split: str, count: int, progress: bool = False
) -> dict[str, float]:
    """:func:`evaluate_grounding` of ``model`` on ``count`` scenes ``generate_scene(seed, split, i)`` (RES refs).

    The pretraining reports it on the "val" split of its training seed (a stream disjoint from its
    training scenes, but the one its design choices were made on); ``scripts/pretrain_clip.py`` also
    on the "test" split of a fresh seed (``test_seed``), issue 13's held-out figures.
    """
    backbone = CLIPSurgeryBackbone(model, surgery_blocks=surgery_blocks)
    tokenizer = CLIPTokenizer(model.context_length, append_period=append_period)
    scenes = grounding_scenes(seed, split, count, "res", tokenizer, backbone.image_size, model.visual.patch_size[0], progress=progress)
    return evaluate_grounding(backbone, scenes, tokenizer(DESCRIPTIONS), tokenizer(DENSE_CLASS_NAMES))


# ---------------------------------------------------------------------------------------------------
# Training and saving
# ---------------------------------------------------------------------------------------------------


def save_clip_checkpoint(model: CLIP, path: str | os.PathLike) -> None:
    """A plain open_clip state dict (``torch.save``), written atomically."""
    state_dict = {key: tensor.detach().cpu().clone() for key, tensor in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state_dict, tmp)


# Settings added after CLIP weights were made and recorded: at these values they change nothing, so they
# stay out of the identity and a stage finished before they existed is still recognised as finished.
LATER_SETTINGS_OFF = {"side_weight": 0.0, "init_checkpoint": None}


def clip_stage_identity(clip_custom: Mapping, surgery_blocks: int, settings: CLIPPretrainSettings, append_period: bool) -> dict:
    """What a CLIP pretraining's output depends on: a finished stage is reused, and a state resumed, only
    for the same. A start from ``init_checkpoint`` depends on the file's contents, not its path (the path
    outlives its contents: a pretraining rewrites its output in place), hence its sha256.

    Raises:
        CheckpointError: ``init_checkpoint`` cannot be read (named).
    """
    recorded = {key: value for key, value in asdict(settings).items() if LATER_SETTINGS_OFF.get(key, ...) != value}
    identity = {"clip_custom": dict(clip_custom), "surgery_blocks": surgery_blocks, "append_period": append_period,
                "settings": recorded}
    if settings.init_checkpoint is not None:
        identity["init_checkpoint_sha256"] = remembered_sha256(
            settings.init_checkpoint, hash_file=lambda path: hash_weights_file(path, "init_checkpoint")
        )
    return identity


def finished_clip_stage(
    out: str | os.PathLike, clip_custom: Mapping, surgery_blocks: int, settings: CLIPPretrainSettings, append_period: bool
) -> dict | None:
    """The report of an earlier, finished run of the same stage whose weights load, or None."""
    return finished_report(
        out,
        clip_stage_identity(clip_custom, surgery_blocks, settings, append_period),
        lambda path: build_clip_model("custom", checkpoint=path, custom=clip_custom),
    )


def start_with_sincos_positions(model: CLIP) -> None:
    """Start the (learnable) vision position embeddings from 2-D sine-cosine codes (MAE's; a zero code
    for the class token), in place.

    From open_clip's random start a ViT sees its patches as an unordered set until it has learned
    which are neighbours: colour and size (a patch count) need no order and are learned first, shape
    (where the boundary patches lie relative to each other) waits. The codes give neighbourhoods from
    the first step; they stay trainable, and the file is an ordinary open_clip state dict.
    """
    visual = model.visual
    codes = get_2d_sincos_pos_embed(visual.positional_embedding.shape[1], visual.grid_size[0], cls_token=True)
    with torch.no_grad():
        visual.positional_embedding.copy_(torch.from_numpy(codes).to(visual.positional_embedding))


def pretrain_clip(
    clip_custom: Mapping,
    surgery_blocks: int,
    settings: CLIPPretrainSettings,
    out: str | os.PathLike | None = None,
    append_period: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log_dir: str | os.PathLike | None = None,
    control: StageControl | None = None,
) -> tuple[CLIP, CLIPPretrainResult]:
    """Train a custom CLIP from scratch with region-caption contrast (and the dense term) on ShapeWorld.

    Args:
        clip_custom: the ``custom`` mapping of :func:`build_clip_model` (configs/model/*.yaml ``clip_custom``).
        surgery_blocks: the number of CLIP-Surgery blocks SSP-SAM will use (the model's ``surgery_blocks``).
        settings: hyper-parameters; ``settings.seed`` fixes initialisation, data and caption draws.
        out: where to write the open_clip state dict (and its report "{out}.json"); None writes nothing.
        append_period: the model's text convention ("{caption}.").
        device: torch device for the model.
        progress: show tqdm bars.
        log_dir: TensorBoard directory for the loss terms, temperature and learning rate, or None.
        control: saving, stopping and resuming (:class:`StageControl`); None: one uninterrupted run.

    Returns:
        The open_clip model (eval mode, frozen, as ``build_clip_model`` returns it) and a
        :class:`CLIPPretrainResult`. When the run stops early (``control``), the model is the one
        trained so far, nothing is evaluated and ``out`` is not written.
    """
    started = time.perf_counter()
    control = control or StageControl()
    # Everything that can refuse the stage comes before the minutes of scene generation.
    prepare_stage_files(out, control)
    identity = clip_stage_identity(clip_custom, surgery_blocks, settings, append_period)
    state = read_state(control, identity, settings.steps)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model = build_clip_model("custom", checkpoint=settings.init_checkpoint, custom=clip_custom).to(device)
    if settings.position_init == "sincos" and settings.init_checkpoint is None:
        start_with_sincos_positions(model)
    backbone = CLIPSurgeryBackbone(model, surgery_blocks=surgery_blocks)
    model.requires_grad_(True)  # the backbone froze it for SSP-SAM; here it is what we train
    tokenizer = CLIPTokenizer(model.context_length, append_period=append_period)
    matches = description_matches(settings.partial_descriptions)
    training_description_tokens = tokenizer((*DESCRIPTIONS, *PARTIAL_DESCRIPTIONS)[: len(matches)])
    class_tokens = tokenizer(DENSE_CLASS_NAMES).to(device)
    image_size, patch_size = backbone.image_size, model.visual.patch_size[0]
    pool = grounding_scenes(
        settings.seed, TRAIN_SPLIT, settings.pool_size, "gres", tokenizer, image_size, patch_size, progress=progress,
        side_twins=settings.side_weight > 0,
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = cosine_schedule(optimizer, settings.steps, settings.warmup_steps, settings.min_lr)
    writer = _summary_writer(log_dir)

    def train_step(step: int) -> float:
        scenes = [pool[index] for index in rng.choice(len(pool), size=settings.batch_size, replace=False)]
        batch = contrastive_batch(
            scenes, rng, settings.expressions_per_scene, training_description_tokens, settings.dense_weight > 0, matches,
            settings.side_weight > 0,
        ).to(device)
        terms = training_losses(backbone, batch, class_tokens, settings.dense_weight, settings.side_weight)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        schedule.step()
        if writer is not None:
            for name, value in terms.items():
                writer.add_scalar(f"clip/{name}", value.item(), step)
            writer.add_scalar("clip/logit_scale", model.logit_scale.exp().item(), step)
            writer.add_scalar("clip/lr", schedule.get_last_lr()[0], step)
        return terms["loss"].item()

    done = run_steps(
        settings.steps, train_step, model, optimizer, schedule, rng, control, "CLIP pretraining", progress, identity, state
    )
    model.eval()
    model.requires_grad_(False)
    if not done.finished:
        if writer is not None:
            writer.close()
        return model, CLIPPretrainResult(done.losses, {}, time.perf_counter() - started, finished=False, state_saved=done.state_saved)

    heldout = heldout_figures(model, surgery_blocks, append_period, settings.seed, HELDOUT_SPLIT, settings.eval_scenes, progress)
    if writer is not None:
        for name, value in heldout.items():
            writer.add_scalar(f"clip/heldout_{name}", value, settings.steps)
        writer.close()
    if out is not None:
        finish_stage(out, lambda path: save_clip_checkpoint(model, path), identity,
                     {"final_loss": done.losses[-1], "heldout": heldout}, control)
    return model, CLIPPretrainResult(done.losses, heldout, time.perf_counter() - started)


def _summary_writer(log_dir: str | os.PathLike | None):
    if log_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter  # optional dependency, imported only when asked for

    return SummaryWriter(os.fspath(log_dir))
