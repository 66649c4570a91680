"""Encoder pretraining: SAM promptable segmentation and CLIP region-caption contrast.

Tiny configurations and a few steps each. References: segment_anything's own PromptEncoder called
prompt set by prompt set, masks and values worked out by hand in the comments, and the builders
(build_sam / build_clip_model) that SSP-SAM loads the weights with.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from ssp_sam.backbones.clip import CLIPSurgeryBackbone, build_clip_model
from ssp_sam.backbones.clip_tokenizer import CLIPTokenizer
from ssp_sam.backbones.sam import build_sam
from ssp_sam.backbones.sam_frames import SAMImageTransform
from ssp_sam.data.shapeworld import generate_scene
from ssp_sam.errors import ConfigError, SSPSAMError
from ssp_sam.fileio import file_sha256
from ssp_sam.pretrain.clip import (
    BACKGROUND_CLASS,
    DENSE_CLASS_NAMES,
    DESCRIPTIONS,
    PARTIAL_DESCRIPTIONS,
    CLIPPretrainSettings,
    GroundingScene,
    attribute_code,
    confusion_counts,
    contrastive_batch,
    dense_class,
    description_matches,
    dense_labelling,
    on_object_patches,
    dense_loss,
    finished_clip_stage,
    masked_info_nce,
    miou_from_confusion,
    patch_class_shares,
    patch_embeddings,
    pool_regions,
    pretrain_clip,
    side_loss,
    side_swapped_text,
    start_with_sincos_positions,
)
from ssp_sam.pretrain.sam import (
    NOT_A_POINT,
    PromptBatch,
    SAMPointSegmenter,
    SAMPretrainSettings,
    ScenePool,
    centre_clicks,
    embed_prompts,
    finished_sam_stage,
    point_prompt_miou,
    predict_masks,
    pretrain_sam,
    sample_prompt,
    sample_training_batch,
)
from ssp_sam.pretrain.stage import StageControl, run_steps

from conftest import run_script, write_sam_file

TINY_SAM = {
    "encoder_embed_dim": 32,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_global_attn_indexes": [1],
    "image_size": 64,
    "patch_size": 16,
    "window_size": 2,
    "prompt_embed_dim": 32,
    "decoder_depth": 1,
    "decoder_mlp_dim": 64,
    "decoder_num_heads": 2,
}
TINY_SAM_SETTINGS = SAMPretrainSettings(
    steps=40, batch_size=4, prompts_per_image=2, lr=3e-3, warmup_steps=2, pool_size=8, eval_scenes=2, seed=5
)
TINY_CLIP = {
    "embed_dim": 32,
    "image_size": 32,
    "patch_size": 8,
    "vision_width": 64,
    "vision_layers": 2,
    "vision_head_width": 32,
    "text_width": 32,
    "text_layers": 2,
    "text_heads": 2,
}
TINY_CLIP_SETTINGS = CLIPPretrainSettings(
    steps=30, batch_size=6, expressions_per_scene=2, lr=2e-3, warmup_steps=2, pool_size=12, eval_scenes=2, seed=5,
    dense_weight=1.0,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and lose much when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def first_and_last_means(losses: list[float], count: int = 5) -> tuple[float, float]:
    return float(np.mean(losses[:count])), float(np.mean(losses[-count:]))


# ---------------------------------------------------------------------------------------------------
# SAM
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sam_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sam") / "tiny_sam.pth"
    sam, result = pretrain_sam(TINY_SAM, TINY_SAM_SETTINGS, out=out, progress=False)
    return sam, result, out


def test_sam_pretraining_lowers_the_loss(sam_run):
    _, result, _ = sam_run
    assert len(result.losses) == TINY_SAM_SETTINGS.steps
    first, last = first_and_last_means(result.losses)
    assert last < 0.8 * first
    assert 0.0 <= result.heldout_miou <= 1.0 and result.heldout_instances >= 4  # 2 scenes, >= 2 objects each


def test_image_frame_targets_are_the_full_masks_the_padded_frame_subsamples():
    """loss_frame=image: the targets are the instance masks at the image's 256x256; the padded frame's
    are their pixels (2i + 1, 2j + 1) (mask_to_padded_frame's rule), for the same draws."""
    pool = ScenePool.generate(5, "train", 2)
    transform = SAMImageTransform(256)
    batches = {
        frame: sample_training_batch(pool, np.random.default_rng(3), replace(TINY_SAM_SETTINGS, loss_frame=frame), transform)
        for frame in ("padded", "image")
    }
    (pixels, prompts, padded), (same_pixels, same_prompts, full) = batches["padded"], batches["image"]
    assert torch.equal(pixels, same_pixels) and torch.equal(prompts.coords, same_prompts.coords)
    assert full.shape == (len(padded), 1, 256, 256) and padded.shape == (len(padded), 1, 128, 128)
    assert torch.equal(full[..., 1::2, 1::2], padded)
    assert set(full.unique().tolist()) == {0.0, 1.0} and (full.flatten(1).sum(1) > 0).all()  # every prompted instance is visible
    with pytest.raises(ConfigError, match="loss_frame: expected one of padded, image"):
        replace(TINY_SAM_SETTINGS, loss_frame="full")


def test_sam_pretraining_differentiates_its_image_encoder():
    """Pretraining trains SAM's image encoder through the same encoder inference uses, whose fused attention
    keeps autograd out only where nothing trains: one click's mask loss reaches every encoder weight and the
    prompt encoder's point embeddings."""
    torch.manual_seed(0)
    sam = build_sam("custom", custom=TINY_SAM)
    sam.requires_grad_(True)
    size = sam.image_encoder.img_size
    prompts = PromptBatch.clicks(np.array([[[size / 3, size / 2]], [[size / 2, size / 4]]]), np.array([[1], [1]]))
    logits, ious = predict_masks(sam, torch.randn(1, 3, size, size), prompts)
    (logits.square().mean() + ious.square().mean()).backward()
    without = [name for name, p in sam.image_encoder.named_parameters() if p.grad is None or not p.grad.any()]
    assert without == []
    assert sam.prompt_encoder.point_embeddings[1].weight.grad.any()  # the positive click's embedding


def test_sam_pretraining_is_deterministic():
    settings = SAMPretrainSettings(**{**TINY_SAM_SETTINGS.__dict__, "steps": 4, "eval_scenes": 0})
    first, first_result = pretrain_sam(TINY_SAM, settings, progress=False)
    second, second_result = pretrain_sam(TINY_SAM, settings, progress=False)
    assert first_result.losses == second_result.losses
    for key, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[key]), key


def test_sam_file_is_meta_layout_and_loads_as_the_trained_model(sam_run):
    sam, _, out = sam_run
    saved = torch.load(out, weights_only=True)
    assert {key.split(".")[0] for key in saved} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    loaded = build_sam("custom", checkpoint=out, custom=TINY_SAM)
    trained = sam.state_dict()
    assert loaded.state_dict().keys() == trained.keys()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trained[key]), key


def test_sam_point_segmenter_gives_one_image_sized_mask_per_click(sam_run):
    sam, _, _ = sam_run
    scene = generate_scene(3, "val", 0)
    masks = SAMPointSegmenter(sam, TINY_SAM_SETTINGS.point_slots)(scene.image, centre_clicks(scene))
    assert masks.shape == (len(scene.objects), 256, 256) and masks.dtype == bool


@pytest.mark.parametrize("loss_frame, mask_target", [("padded", "nearest"), ("image", "release")])
def test_heldout_masks_are_read_back_where_the_loss_put_them(loss_frame, mask_target, monkeypatch):
    """A padded-frame loss trains on mask_to_padded_frame's samples (frame pixel i = image pixel 2i + 1): the
    held-out figure maps its masks back by that rule; the image-frame loss saw the release's mapping."""
    import ssp_sam.pretrain.sam as sam_module

    used = []
    real = sam_module.SAMPointSegmenter
    monkeypatch.setattr(sam_module, "SAMPointSegmenter", lambda sam, slots, target: used.append(target) or real(sam, slots, target))
    settings = replace(TINY_SAM_SETTINGS, steps=1, eval_scenes=1, loss_frame=loss_frame)
    pretrain_sam(TINY_SAM, settings, progress=False)
    assert used == [mask_target]
    sam = build_sam("custom", custom=TINY_SAM)
    scene = generate_scene(3, "val", 0)
    shifted = [real(sam, 2, target)(scene.image, centre_clicks(scene)) for target in ("release", "nearest")]
    assert not np.array_equal(*shifted)  # the two rules do place the masks differently


def test_heldout_miou_is_one_for_a_perfect_predictor_and_zero_for_an_empty_one():
    scenes = [generate_scene(7, "val", index) for index in range(3)]
    by_image = {id(scene.image): scene for scene in scenes}

    def perfect(image, clicks):
        # The object under each click, found from the scene's own masks.
        objects = by_image[id(image)].objects
        return np.stack([next(obj.mask for obj in objects if obj.mask[y, x]) for x, y in clicks])

    def empty(image, clicks):
        return np.zeros((len(clicks), *image.shape[:2]), dtype=bool)

    instances = sum(len(scene.objects) for scene in scenes)
    assert point_prompt_miou(perfect, scenes) == (1.0, instances)
    assert point_prompt_miou(empty, scenes) == (0.0, instances)


def test_heldout_miou_of_a_half_covering_predictor():
    scene = generate_scene(7, "val", 1)

    def left_half(image, clicks):
        # Each object's mask, cut to the columns left of its click: IoU = kept / all pixels.
        masks = []
        for x, y in clicks:
            mask = next(obj.mask for obj in scene.objects if obj.mask[y, x]).copy()
            mask[:, x:] = False
            masks.append(mask)
        return np.stack(masks)

    expected = np.mean([obj.mask[:, : math.floor(obj.center[0])].sum() / obj.mask.sum() for obj in scene.objects])
    miou, _ = point_prompt_miou(left_half, [scene])
    assert miou == pytest.approx(expected)


def test_centre_clicks_fall_inside_their_objects():
    for index in range(10):
        scene = generate_scene(11, "train", index)
        for obj, (x, y) in zip(scene.objects, centre_clicks(scene)):
            assert obj.mask[y, x]


def test_sampled_prompts_lie_inside_or_around_the_instance():
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:20, 30:50] = True  # rows 10..19, columns 30..49
    rng = np.random.default_rng(0)
    points_only = SAMPretrainSettings(box_probability=0.0)
    boxes_only = SAMPretrainSettings(box_probability=1.0)
    for _ in range(50):
        coords, labels, box = sample_prompt(mask, rng, points_only)
        assert box is None and labels[0] == 1 and (labels == 1).sum() <= 3 and (labels == 0).sum() <= 2
        for (x, y), label in zip(coords.astype(int), labels):
            if label != NOT_A_POINT:
                assert mask[y, x] == (label == 1)
        coords, labels, box = sample_prompt(mask, rng, boxes_only)
        assert (labels == NOT_A_POINT).all()
        # Exact box (30, 10, 49, 19); jitter std is 10% of the side (2 px, 1 px), never beyond 20 px.
        assert box[0] <= box[2] and box[1] <= box[3]
        assert np.all(np.abs(box - [30, 10, 49, 19]) < 20)


def test_mixed_prompt_batch_matches_sams_prompt_encoder_set_by_set():
    torch.manual_seed(0)
    encoder = build_sam("custom", custom=TINY_SAM, parts=("prompt_encoder",)).prompt_encoder
    coords = torch.rand(3, 3, 2) * 64
    labels = torch.tensor([[1, 0, -1], [-1, -1, -1], [1, 1, 1]])
    boxes = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 6.0, 30.0, 40.0], [0.0, 0.0, 0.0, 0.0]])
    has_box = torch.tensor([False, True, False])
    sparse, dense = embed_prompts(encoder, PromptBatch(coords, labels, boxes, has_box))
    assert sparse.shape == (3, 4, 32) and dense.shape == (3, 32, 4, 4)
    for index in range(3):
        if has_box[index]:
            points = (coords[index : index + 1, :2], labels[index : index + 1, :2])
            expected, _ = encoder(points=points, boxes=boxes[index : index + 1], masks=None)
        else:
            points = (coords[index : index + 1], labels[index : index + 1])
            expected, _ = encoder(points=points, boxes=None, masks=None)
        torch.testing.assert_close(sparse[index : index + 1], expected)


# ---------------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    model, result = pretrain_clip(TINY_CLIP, 1, TINY_CLIP_SETTINGS, out=out, progress=False)
    return model, result, out


def test_clip_pretraining_lowers_the_loss(clip_run):
    _, result, _ = clip_run
    first, last = first_and_last_means(result.losses)
    assert last < 0.8 * first
    for key in ("expression_all", "pointing", "description", "color", "shape", "size"):
        assert 0.0 <= result.heldout[key] <= 1.0


def test_clip_pretraining_differentiates_the_image_tower():
    """The pretraining's image forward records the whole tower, although SSP-SAM's keeps its frozen part out
    of autograd: from 2026-11-30 to 2026-12-01 it went through that forward, the image tower never trained
    and the recipe's CLIP learnt shape to 0.28 instead of 0.99. Every vision weight the patch tokens depend
    on gets a gradient (the last block's MLP feeds only the CLS token, which the pretraining does not use)."""
    torch.manual_seed(0)
    model = build_clip_model("custom", custom={**TINY_CLIP, "stem": "conv"})
    backbone = CLIPSurgeryBackbone(model, surgery_blocks=1)
    model.requires_grad_(True)  # as pretrain_clip does
    patch_embeddings(backbone, torch.randn(2, 3, 32, 32)).square().sum().backward()
    last = len(model.visual.transformer.resblocks) - 1
    cls_only = (f"transformer.resblocks.{last}.ln_2.", f"transformer.resblocks.{last}.mlp.")
    without = [name for name, p in model.visual.named_parameters() if not name.startswith(cls_only) and (p.grad is None or not p.grad.any())]
    assert without == []
    assert any(name.startswith("conv1.") for name, _ in model.visual.named_parameters())  # the stem is among them


def test_clip_file_loads_as_the_trained_model(clip_run):
    model, _, out = clip_run
    loaded = build_clip_model("custom", checkpoint=out, custom=TINY_CLIP)
    trained = model.state_dict()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trained[key]), key
    # The file is what SSP-SAM's frozen backbone runs on: same surgery output as the trained model.
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(
        CLIPSurgeryBackbone(loaded, 1).encode_image(pixels), CLIPSurgeryBackbone(model, 1).encode_image(pixels)
    )


def test_masked_info_nce_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    identity = torch.eye(2, dtype=torch.bool)
    everything = torch.ones(2, 2, dtype=torch.bool)
    # Each row and column: -log(e^2 / (e^2 + e^0)) = log(1 + e^-2).
    assert masked_info_nce(logits, identity, everything).item() == pytest.approx(math.log(1 + math.exp(-2)))
    # Without the off-diagonal pairs every softmax has one entry: loss 0.
    assert masked_info_nce(logits, identity, identity).item() == pytest.approx(0.0)
    # Caption 0 has both regions as positives (its term is 0); caption 1 has none (no term). Regions:
    # region 0 has caption 0 of {0, 1}: -log(e^2 / (e^2 + 1)); region 1 has caption 0 of {0, 1}: -log(1 / (1 + e^2)).
    positives = torch.tensor([[True, True], [False, False]])
    region_terms = math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))
    assert masked_info_nce(logits, positives, everything).item() == pytest.approx(0.5 * (0.0 + region_terms / 2))
    with pytest.raises(ValueError):
        masked_info_nce(logits, identity, ~identity)


def test_pool_regions_weights_unit_patches_by_coverage():
    patch_tokens = torch.tensor([[[3.0, 0.0], [0.0, 5.0], [0.0, -2.0]]])  # one image, 3 patches -> units x, y, -y
    coverage = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.25, 0.75], [0.0, 0.0, 0.0]])
    regions = pool_regions(patch_tokens, coverage, torch.zeros(3, dtype=torch.long))
    root_half = math.sqrt(0.5)
    torch.testing.assert_close(regions[0], torch.tensor([root_half, root_half]))  # (x + y) / 2, normalised
    torch.testing.assert_close(regions[1], torch.tensor([0.0, -1.0]))  # 0.25 y - 0.75 y = -0.5 y
    torch.testing.assert_close(regions[2], torch.tensor([0.0, 0.0]))  # covers nothing


def test_contrastive_batch_pairs():
    tokenizer = CLIPTokenizer()
    description_tokens = tokenizer(DESCRIPTIONS)
    red_circle = attribute_code("small", "red", "circle")
    blue_star = attribute_code("large", "blue", "star")

    def scene(codes, expressions):
        return GroundingScene(
            pixels=torch.zeros(3, 8, 8).half(),
            coverage=torch.rand(len(codes) + 1, 4),
            codes=torch.tensor(codes),
            expressions=tokenizer([text for text, _, _ in expressions]),
            expression_targets=tuple(targets for _, targets, _ in expressions),
            expression_kinds=tuple(kind for _, _, kind in expressions),
            side_swapped=tokenizer([side_swapped_text(text) for text, _, _ in expressions]),
        )

    first = scene([red_circle, blue_star], [("the star", (1,), "A")])
    second = scene([red_circle], [("the green square", (), "N")])
    batch = contrastive_batch([first, second], np.random.default_rng(0), 5, description_tokens)
    # Regions: scene 0 objects 0, 1, background; scene 1 object 0, background.
    assert batch.region_image.tolist() == [0, 0, 0, 1, 1]
    assert batch.coverage.shape == (5, 4) and batch.pixels.shape == (2, 3, 8, 8)
    # Captions: the 96 descriptions, then "the star" (scene 0), then "the green square" (scene 1).
    assert len(batch.tokens) == 98
    assert torch.equal(batch.tokens[:96], description_tokens)
    assert batch.valid[:96].all()
    # Both red circles (scene 0 object 0, scene 1 object 0) are positives of their description.
    assert batch.positives[red_circle].tolist() == [True, False, False, True, False]
    assert batch.positives[blue_star].tolist() == [False, True, False, False, False]
    assert batch.positives[:96].sum() == 3
    assert torch.equal(batch.tokens[96], first.expressions[0])
    assert batch.valid[96].tolist() == [True, True, True, False, False]
    assert batch.positives[96].tolist() == [False, True, False, False, False]
    assert torch.equal(batch.tokens[97], second.expressions[0])
    assert batch.valid[97].tolist() == [False, False, False, True, True]
    assert not batch.positives[97].any()


def test_side_swapped_text_turns_every_spatial_word():
    assert side_swapped_text("the leftmost red circle") == "the rightmost red circle"
    assert side_swapped_text("the small circle on the bottom") == "the small circle on the top"
    assert side_swapped_text("the star above the blue square") == "the star below the blue square"
    assert side_swapped_text("the topmost circle left of the square") == "the bottommost circle right of the square"
    assert side_swapped_text("the red circle") == "the red circle"


def test_side_pairs_put_each_target_against_its_swapped_twin():
    """An L expression drawn with side_pairs: its swapped twin follows it, outside the contrast (valid with no
    region, positive for none), paired with the expression's target; an A expression has no twin."""
    tokenizer = CLIPTokenizer()
    texts = ["the circle on the left", "the star"]
    scene = GroundingScene(
        pixels=torch.zeros(3, 8, 8).half(), coverage=torch.rand(4, 4), codes=torch.tensor([0, 1, 2]),
        expressions=tokenizer(texts), expression_targets=((0,), (2,)), expression_kinds=("L", "A"),
        side_swapped=tokenizer([side_swapped_text(text) for text in texts]),
    )
    descriptions = tokenizer(DESCRIPTIONS)
    plain = contrastive_batch([scene], np.random.default_rng(0), 2, descriptions, dense=False)
    batch = contrastive_batch([scene], np.random.default_rng(0), 2, descriptions, dense=False, side_pairs=True)
    assert plain.side_pairs is None
    assert len(plain.tokens) == 96 + 2 and len(batch.tokens) == 96 + 3 and len(batch.positives) == 96 + 3
    left = next(i for i in range(96, 99) if torch.equal(batch.tokens[i], scene.expressions[0]))
    assert torch.equal(batch.tokens[left + 1], tokenizer(["the circle on the right"])[0])
    assert not batch.valid[left + 1].any() and not batch.positives[left + 1].any()
    assert batch.positives[left].tolist() == [True, False, False, False]
    assert batch.side_pairs.tolist() == [[left, left + 1, 0]]


def test_side_loss_by_hand():
    logits = torch.tensor([[3.0, 0.0], [1.0, 2.0], [0.0, 5.0]])  # captions 0 (true), 1 (its twin), 2; regions 0, 1
    pairs = torch.tensor([[0, 1, 0], [2, 1, 1]])
    # softplus(1 - 3) and softplus(2 - 5), averaged.
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-3))) / 2
    assert side_loss(logits, pairs).item() == pytest.approx(expected)
    assert side_loss(logits, torch.zeros(0, 3, dtype=torch.long)).item() == 0.0


def test_settings_added_later_keep_earlier_stages_finished(clip_run):
    """A report written before side_weight / init_checkpoint existed has no such keys: at their off values the
    stage is still finished (the installed v2 CLIP is not trained again); any other value makes it a new stage."""
    _, _, out = clip_run
    report = json.loads((out.parent / (out.name + ".json")).read_text())
    assert not {"side_weight", "init_checkpoint"} & set(report["identity"]["settings"])
    assert finished_clip_stage(out, TINY_CLIP, 1, TINY_CLIP_SETTINGS, True) is not None
    assert finished_clip_stage(out, TINY_CLIP, 1, replace(TINY_CLIP_SETTINGS, side_weight=0.5), True) is None
    assert finished_clip_stage(out, TINY_CLIP, 1, replace(TINY_CLIP_SETTINGS, init_checkpoint=str(out)), True) is None


def test_clip_pretraining_starts_from_init_checkpoint(clip_run, tmp_path):
    """With init_checkpoint and a zero learning rate the weights stay the file's; a missing file is named."""
    _, _, out = clip_run
    frozen = replace(TINY_CLIP_SETTINGS, steps=2, lr=0.0, min_lr=0.0, init_checkpoint=str(out), side_weight=1.0)
    model, _ = pretrain_clip(TINY_CLIP, 1, frozen, progress=False)
    assert_same_weights(model, build_clip_model("custom", checkpoint=out, custom=TINY_CLIP))
    with pytest.raises(SSPSAMError, match="absent.pt"):
        pretrain_clip(TINY_CLIP, 1, replace(frozen, init_checkpoint=str(tmp_path / "absent.pt")), progress=False)


def test_partial_descriptions_are_true_of_every_object_with_the_named_attributes():
    """Reference by words: "the red circle" is true of a full description holding every word it holds."""
    assert len(PARTIAL_DESCRIPTIONS) == 6 + 48 + 12 and len(set(PARTIAL_DESCRIPTIONS)) == 66
    matches = description_matches(partial=True)
    captions = (*DESCRIPTIONS, *PARTIAL_DESCRIPTIONS)
    expected = torch.tensor([[set(text.split()) <= set(full.split()) for full in DESCRIPTIONS] for text in captions])
    assert torch.equal(matches, expected)
    assert torch.equal(description_matches(partial=False), expected[:96])
    # In a batch: "the circle" has both red circles as positives, "the large star" the blue star; all regions valid.
    tokenizer = CLIPTokenizer()
    red_circle, blue_star = attribute_code("small", "red", "circle"), attribute_code("large", "blue", "star")
    scenes = [
        GroundingScene(torch.zeros(3, 8, 8).half(), torch.rand(len(codes) + 1, 4), torch.tensor(codes),
                       tokenizer(["the star"]), ((0,),), ("A",))
        for codes in ([red_circle, blue_star], [red_circle])
    ]
    batch = contrastive_batch(scenes, np.random.default_rng(0), 0, tokenizer(captions), dense=False, matches=matches)
    assert len(batch.tokens) == 162 and batch.valid.all()
    assert batch.positives[captions.index("the circle")].tolist() == [True, False, False, True, False]
    assert batch.positives[captions.index("the large star")].tolist() == [False, True, False, False, False]
    assert not batch.positives[captions.index("the small star")].any()
    assert not batch.positives[:, [2, 4]].any()  # backgrounds


def test_attribute_codes_index_the_descriptions():
    assert DESCRIPTIONS[attribute_code("small", "red", "circle")] == "the small red circle"
    assert DESCRIPTIONS[attribute_code("large", "black", "star")] == "the large black star"
    assert len(set(DESCRIPTIONS)) == 96


def test_dense_class_names_follow_the_ovss_class_order():
    # Spec: class index = position of "{color} {shape}", ordered by colour then shape; background last here.
    assert len(DENSE_CLASS_NAMES) == 49 and DENSE_CLASS_NAMES[BACKGROUND_CLASS] == "background"
    assert DENSE_CLASS_NAMES[0] == "red circle" and DENSE_CLASS_NAMES[7] == "green square"
    assert DENSE_CLASS_NAMES[47] == "black star"
    # A description's code drops its size: "the large green square" -> "green square" (index 1 * 6 + 1).
    assert dense_class(torch.tensor([attribute_code("large", "green", "square")])).tolist() == [7]


def test_patch_class_shares_add_objects_of_one_class_and_normalise():
    # 3 patches; regions: red circle, another red circle, blue star, background.
    coverage = torch.tensor([[0.5, 0.0, 0.0], [0.25, 0.0, 0.0], [0.0, 0.5, 0.0], [0.25, 0.25, 0.5]])
    classes = torch.tensor([0, 0, 17, BACKGROUND_CLASS])  # blue star = 2 * 6 + 5
    shares = patch_class_shares(coverage, classes)
    assert shares.shape == (3, 49)
    # Patch 0: 0.75 red circle, 0.25 background; patch 1: 2/3 blue star, 1/3 background (0.75 covered, normalised);
    # patch 2: only background.
    assert shares[0, 0].item() == pytest.approx(0.75) and shares[0, BACKGROUND_CLASS].item() == pytest.approx(0.25)
    assert shares[1, 17].item() == pytest.approx(2 / 3) and shares[1, BACKGROUND_CLASS].item() == pytest.approx(1 / 3)
    assert shares[2, BACKGROUND_CLASS].item() == pytest.approx(1.0)
    torch.testing.assert_close(shares.sum(dim=1), torch.ones(3))


def test_dense_loss_is_the_soft_cross_entropy_over_class_names():
    # Two classes along x and y; one image, two patches: (2, 0) -> unit x, (1, 1) -> unit diagonal.
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tokens = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])
    targets = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
    scale = torch.tensor(3.0)
    # Patch 0: logits (3, 0): -log(e^3 / (e^3 + 1)). Patch 1: logits (3/sqrt2, 3/sqrt2): -log(1/2) for both halves.
    expected = (math.log(1 + math.exp(-3)) + math.log(2)) / 2
    assert dense_loss(tokens, classes, targets, scale).item() == pytest.approx(expected, rel=1e-6)


def test_dense_labelling_of_a_hand_built_scene():
    # Classes: 0 = red circle, 1 = red square, 2 = background (a 3-name list is enough for the rule).
    class_embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # Four patches, tokens pointing at: red circle, red square, background, red square.
    patch_tokens = torch.tensor([[5.0, 1.0], [0.2, 3.0], [-2.0, 0.5], [0.1, 1.0]])
    # Regions: a red circle over patches 0 (60 %) and 1 (30 %), background elsewhere.
    coverage = torch.tensor([[0.6, 0.3, 0.0, 0.0], [0.4, 0.7, 1.0, 1.0]])
    predicted, truth = dense_labelling(patch_tokens, class_embeddings, coverage, torch.tensor([0, 2]))
    assert predicted.tolist() == [0, 1, 2, 1]
    assert truth.tolist() == [0, 2, 2, 2]  # patch 1 is mostly background
    confusion = confusion_counts(predicted, truth, 3)
    assert confusion.tolist() == [[1, 0, 0], [0, 0, 0], [0, 2, 1]]
    # IoU: circle 1 / 1, square 0 / 2 (two false positives), background 1 / 3; mean over the three.
    assert miou_from_confusion(confusion) == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert miou_from_confusion(confusion, [0, 1]) == pytest.approx(0.5)
    # A class that occurs nowhere does not count.
    assert miou_from_confusion(torch.tensor([[2, 0], [0, 0]])) == pytest.approx(1.0)
    # Issue 13's figure, "on the patches objects cover": only patch 0 (mostly circle) is scored; the square
    # predicted on background patches 1 and 3 is no false positive there, so the object classes' mean is 1.
    covered = confusion_counts(*on_object_patches(predicted, truth, background=2), 3)
    assert covered.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert miou_from_confusion(covered, [0, 1]) == pytest.approx(1.0)
    # An object patch labelled background counts against its object (recall), not for the background.
    missed = confusion_counts(*on_object_patches(torch.tensor([2, 0]), torch.tensor([0, 0]), background=2), 3)
    assert miou_from_confusion(missed, [0, 1]) == pytest.approx(0.5)


def test_clip_pretraining_reports_dense_labelling(clip_run):
    _, result, out = clip_run
    assert 0.0 <= result.heldout["dense_miou"] <= 1.0 and 0.0 <= result.heldout["dense_miou_objects"] <= 1.0
    assert 0.0 <= result.heldout["dense_miou_covered"] <= 1.0
    # The finished stage is recognised (same config, weights load) and holds the printed figures.
    report = finished_clip_stage(out, TINY_CLIP, 1, TINY_CLIP_SETTINGS, True)
    assert report is not None and report["heldout"] == pytest.approx(result.heldout, nan_ok=True)
    other = CLIPPretrainSettings(**{**TINY_CLIP_SETTINGS.__dict__, "steps": 31})
    assert finished_clip_stage(out, TINY_CLIP, 1, other, True) is None


# ---------------------------------------------------------------------------------------------------
# Stages: stop, kill and resume exactly
# ---------------------------------------------------------------------------------------------------


def assert_same_weights(first: torch.nn.Module, second: torch.nn.Module) -> None:
    for (key, tensor), other in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(tensor, other), key


def test_clip_stage_stopped_halfway_and_resumed_equals_one_run(tmp_path):
    settings = CLIPPretrainSettings(**{**TINY_CLIP_SETTINGS.__dict__, "steps": 6, "eval_scenes": 1})
    straight, straight_result = pretrain_clip(TINY_CLIP, 1, settings, progress=False)
    out = tmp_path / "clip.pt"
    _, stopped = pretrain_clip(TINY_CLIP, 1, settings, out=out, progress=False, control=StageControl.beside(out, stop_after_steps=3))
    assert not stopped.finished and len(stopped.losses) == 3
    assert not out.exists() and (tmp_path / "clip.pt.resume").exists()  # nothing the next stage could read
    resumed, result = pretrain_clip(TINY_CLIP, 1, settings, out=out, progress=False, control=StageControl.beside(out, resume=True))
    assert result.finished and result.losses == straight_result.losses
    assert result.heldout == pytest.approx(straight_result.heldout, nan_ok=True)
    assert_same_weights(straight, resumed)
    assert out.exists() and not (tmp_path / "clip.pt.resume").exists()


def test_sam_stage_stopped_halfway_and_resumed_equals_one_run(tmp_path):
    settings = SAMPretrainSettings(**{**TINY_SAM_SETTINGS.__dict__, "steps": 4, "eval_scenes": 0})
    straight, straight_result = pretrain_sam(TINY_SAM, settings, progress=False)
    out = tmp_path / "sam.pth"
    pretrain_sam(TINY_SAM, settings, out=out, progress=False, control=StageControl.beside(out, stop_after_steps=2))
    assert not out.exists()
    # Resuming the half-done stage with another recipe would mix two in one file: refused, naming what changed.
    other = SAMPretrainSettings(**{**settings.__dict__, "lr": settings.lr * 2})
    with pytest.raises(ConfigError, match=rf"sam.pth.resume: the stage was started with other settings \(settings.lr: {settings.lr} -> {settings.lr * 2}\)"):
        pretrain_sam(TINY_SAM, other, out=out, progress=False, control=StageControl.beside(out, resume=True))
    resumed, result = pretrain_sam(TINY_SAM, settings, out=out, progress=False, control=StageControl.beside(out, resume=True))
    assert result.losses == straight_result.losses
    assert_same_weights(straight, resumed)


def test_a_killed_stage_replays_the_steps_after_its_last_save(tmp_path):
    """A crash between two saves: the resumed run redoes the lost steps with the same random draws
    (numpy batches and torch's RNG) and ends bit-equal to an uninterrupted run."""

    def stage(control, crash_at=None):
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))

        def step(index):
            if index == crash_at:
                raise RuntimeError("killed")
            inputs = torch.as_tensor(rng.normal(size=(4, 3)), dtype=torch.float32) + torch.randn(4, 3)
            loss = model(inputs).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            return loss.item()

        progress = run_steps(7, step, model, optimizer, schedule, rng, control, "toy", progress=False)
        return model, progress

    straight, straight_progress = stage(StageControl())
    control = StageControl(state_path=tmp_path / "toy.resume", save_every=2)
    with pytest.raises(RuntimeError):
        stage(control, crash_at=5)  # saved after steps 2 and 4; step 5 dies
    resumed, progress = stage(StageControl(state_path=tmp_path / "toy.resume", save_every=2, resume=True))
    assert progress.finished and progress.losses == straight_progress.losses
    assert_same_weights(straight, resumed)


def test_clip_script_stops_resumes_and_skips_a_finished_stage(tmp_path):
    """The stage commands of scripts/train_default_model.sh: exit 3 when stopped (no output written),
    resume=true finishes it, and a second resume=true only reports the finished figures."""
    out = tmp_path / "clip.pt"
    tiny = [f"model.clip_custom.{key}={value}" for key, value in TINY_CLIP.items()]
    args = [*tiny, "model.surgery_blocks=1", "steps=2", "batch_size=3", "pool_size=4", "eval_scenes=1",
            "warmup_steps=1", "threads=1", "progress=false", f"out={out}"]
    stopped = run_script("pretrain_clip.py", *args, "stop_after_steps=1")
    assert stopped.returncode == 3, stopped.stderr
    assert "stopped after 1 of 2 steps" in stopped.stdout and not out.exists()
    finished = run_script("pretrain_clip.py", *args, "resume=true")
    assert finished.returncode == 0, finished.stderr
    assert out.exists() and "dense labelling mIoU on object patches" in finished.stdout
    # the training seed's val scenes, then issue 13's held-out figures on a fresh seed's test scenes
    assert "(1 val scenes, seed 1000)" in finished.stdout.splitlines()[-2]
    assert "(1 test scenes, seed 4242)" in finished.stdout.splitlines()[-1]
    again = run_script("pretrain_clip.py", *args, "resume=true")
    assert again.returncode == 0 and "already finished" in again.stdout
    assert again.stdout.splitlines()[-2:] == finished.stdout.splitlines()[-2:]  # the same held-out lines
    # the fresh seed's figures are remembered in the report: a rerun prints them without scoring again,
    # another test_seed is scored (and remembered in their place)
    report_file = out.with_name(out.name + ".json")
    report = json.loads(report_file.read_text())
    assert report["results"]["fresh_seed"]["scored_on"] == {"seed": 4242, "split": "test", "scenes": 1, "version": 1}
    report["results"]["fresh_seed"]["figures"]["shape"] = 0.123
    report_file.write_text(json.dumps(report))
    remembered = run_script("pretrain_clip.py", *args, "resume=true")
    assert remembered.returncode == 0 and "shape 0.123" in remembered.stdout.splitlines()[-1]
    other_seed = run_script("pretrain_clip.py", *args, "resume=true", "test_seed=4243")
    assert other_seed.returncode == 0 and "(1 test scenes, seed 4243)" in other_seed.stdout.splitlines()[-1]
    assert "shape 0.123" not in other_seed.stdout.splitlines()[-1]
    assert json.loads(report_file.read_text())["results"]["fresh_seed"]["scored_on"]["seed"] == 4243
    # a report written before the object-patch figure existed still reads (that figure left out)
    report = json.loads(out.with_name(out.name + ".json").read_text())
    del report["results"]["heldout"]["dense_miou_covered"]
    out.with_name(out.name + ".json").write_text(json.dumps(report))
    old = run_script("pretrain_clip.py", *args, "resume=true")
    assert old.returncode == 0 and "already finished" in old.stdout, old.stderr[-2000:]
    assert "on object patches" not in old.stdout.splitlines()[-2] and "on object patches" in old.stdout.splitlines()[-1]


def test_sincos_position_start_is_the_2d_sine_cosine_code_of_each_patch():
    model = build_clip_model("custom", custom=TINY_CLIP)  # 32 px, 8 px patches: a 4 x 4 grid, width 64
    start_with_sincos_positions(model)
    positions = model.visual.positional_embedding
    assert not positions[0].any()  # the class token has no place
    # First half of the width: the column x, second half: the row y; each half sin(p w_k) for k < 16,
    # then cos(p w_k), with w_k = 10000 ** (-k / 16).
    frequencies = 10000.0 ** (-torch.arange(16, dtype=torch.float64) / 16)
    row, column = 2, 3
    expected = torch.cat([torch.sin(column * frequencies), torch.cos(column * frequencies),
                          torch.sin(row * frequencies), torch.cos(row * frequencies)]).float()
    torch.testing.assert_close(positions[1 + row * 4 + column], expected)
    with pytest.raises(ConfigError, match="position_init"):
        CLIPPretrainSettings(position_init="learned")


# ---------------------------------------------------------------------------------------------------
# Stage files and settings: reports tied to their weights, refusals before any work, kill leftovers
# ---------------------------------------------------------------------------------------------------

ONE_STEP_SAM = replace(TINY_SAM_SETTINGS, steps=1, eval_scenes=0)
TINY_CLIP_ARGS = (*(f"model.clip_custom.{key}={value}" for key, value in TINY_CLIP.items()), "model.surgery_blocks=1",
                  "steps=2", "eval_scenes=1", "warmup_steps=1", "threads=1", "progress=false")
TINY_SAM_ARGS = (*(f"model.sam_custom.{key}={value}" for key, value in TINY_SAM.items()),
                 "steps=2", "batch_size=2", "prompts_per_image=2", "pool_size=4", "eval_scenes=0", "warmup_steps=1",
                 "threads=1", "progress=false")


def test_a_death_between_new_weights_and_their_report_leaves_no_finished_stage(tmp_path, monkeypatch):
    """The old report is deleted before the weights are replaced: a run that dies once its new weights are
    in place (here: its report cannot be written) must not leave the previous recipe's report beside them,
    which would pass them off as that recipe's finished output."""
    import ssp_sam.pretrain.stage as stage

    out = tmp_path / "sam.pth"
    pretrain_sam(TINY_SAM, ONE_STEP_SAM, out=out, progress=False)
    assert finished_sam_stage(out, TINY_SAM, ONE_STEP_SAM) is not None
    first_weights = out.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(stage, "write_json", full_disk)
    with pytest.raises(OSError, match="no space left"):
        pretrain_sam(TINY_SAM, replace(ONE_STEP_SAM, lr=1e-2), out=out, progress=False)
    assert out.read_bytes() != first_weights and not (tmp_path / "sam.pth.json").exists()
    assert finished_sam_stage(out, TINY_SAM, ONE_STEP_SAM) is None


def test_a_report_counts_only_for_the_weights_it_was_written_for(tmp_path, capsys):
    """The report holds its weights' sha256: other weights under it (loadable, same architecture) are not a
    finished stage, and one note says why. A report from before the sha256 was recorded counts only when it
    is not older than the weights (the code of that time wrote the report after its weights)."""
    out = tmp_path / "sam.pth"
    report_file = tmp_path / "sam.pth.json"
    pretrain_sam(TINY_SAM, ONE_STEP_SAM, out=out, progress=False)
    report = json.loads(report_file.read_text())
    assert report["sha256"] == file_sha256(out)
    write_sam_file(out, TINY_SAM, seed=1)
    capsys.readouterr()
    assert finished_sam_stage(out, TINY_SAM, ONE_STEP_SAM) is None
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 1 and notes[0].startswith(f"note: {report_file} was written for other weights"), notes

    del report["sha256"]
    report_file.write_text(json.dumps(report))
    written = out.stat().st_mtime_ns
    os.utime(report_file, ns=(written - 10**9, written - 10**9))
    assert finished_sam_stage(out, TINY_SAM, ONE_STEP_SAM) is None
    assert "is older than the weights" in capsys.readouterr().err
    os.utime(report_file, ns=(written, written))
    assert finished_sam_stage(out, TINY_SAM, ONE_STEP_SAM) is not None


def test_a_rewritten_init_checkpoint_makes_another_stage(clip_run, tmp_path, monkeypatch):
    """init_checkpoint counts by its contents: a state started from other bytes under the same path is
    refused (before the scene pool is built), and a finished stage is no longer finished."""
    import ssp_sam.pretrain.clip as clip_module

    init = tmp_path / "init.pt"
    shutil.copy(clip_run[2], init)

    def rewrite_init(seed):
        torch.manual_seed(seed)
        torch.save(build_clip_model("custom", custom=TINY_CLIP).state_dict(), tmp_path / "new.pt")
        os.replace(tmp_path / "new.pt", init)

    settings = replace(TINY_CLIP_SETTINGS, steps=2, eval_scenes=1, init_checkpoint=str(init))
    out = tmp_path / "clip.pt"
    pretrain_clip(TINY_CLIP, 1, settings, out=out, progress=False, control=StageControl.beside(out, stop_after_steps=1))
    rewrite_init(0)
    with monkeypatch.context() as patch:
        patch.setattr(clip_module, "grounding_scenes", lambda *args, **kwargs: pytest.fail("scene pool built first"))
        with pytest.raises(ConfigError, match=r"clip.pt.resume: the stage was started with other settings \(init_checkpoint_sha256: "):
            pretrain_clip(TINY_CLIP, 1, settings, out=out, progress=False, control=StageControl.beside(out, resume=True))
    pretrain_clip(TINY_CLIP, 1, settings, out=out, progress=False)
    assert finished_clip_stage(out, TINY_CLIP, 1, settings, True) is not None
    rewrite_init(1)
    assert finished_clip_stage(out, TINY_CLIP, 1, settings, True) is None


def test_a_state_of_other_settings_or_an_unreadable_one_is_refused_before_the_scene_pool(tmp_path, monkeypatch):
    import ssp_sam.pretrain.sam as sam_module

    out = tmp_path / "sam.pth"
    settings = replace(ONE_STEP_SAM, steps=2)
    pretrain_sam(TINY_SAM, settings, out=out, progress=False, control=StageControl.beside(out, stop_after_steps=1))
    monkeypatch.setattr(sam_module.ScenePool, "generate", lambda *args, **kwargs: pytest.fail("scene pool built first"))
    resume = StageControl.beside(out, resume=True)
    with pytest.raises(ConfigError, match=r"sam.pth.resume: the stage was started with other settings \(settings.lr: "):
        pretrain_sam(TINY_SAM, replace(settings, lr=1e-2), out=out, progress=False, control=resume)
    (tmp_path / "sam.pth.resume").write_bytes(b"half a file")
    with pytest.raises(SSPSAMError, match=r"sam.pth.resume: not a readable torch checkpoint"):
        pretrain_sam(TINY_SAM, settings, out=out, progress=False, control=resume)


@pytest.mark.parametrize("settings, change, message", [
    (TINY_CLIP_SETTINGS, {"grad_clip": -1.0}, "grad_clip=-1.0: must be a number > 0"),  # gradient ascent
    (TINY_CLIP_SETTINGS, {"lr": -1.0}, "lr=-1.0: must be a number >= 0"),
    (TINY_CLIP_SETTINGS, {"min_lr": -1.0}, "min_lr=-1.0: must be a number >= 0"),
    (TINY_CLIP_SETTINGS, {"weight_decay": -0.05}, "weight_decay=-0.05: must be a number >= 0"),
    (TINY_CLIP_SETTINGS, {"steps": "abc"}, "steps=abc: must be an integer >= 1"),
    (TINY_CLIP_SETTINGS, {"batch_size": 13}, "batch_size=13: must be <= pool_size=12"),
    (TINY_CLIP_SETTINGS, {"partial_descriptions": "false"}, "partial_descriptions=false: must be true or false"),
    (TINY_SAM_SETTINGS, {"focal_weight": -20.0}, "focal_weight=-20.0: must be a number >= 0"),
    (TINY_SAM_SETTINGS, {"iou_weight": -1.0}, "iou_weight=-1.0: must be a number >= 0"),
    (TINY_SAM_SETTINGS, {"grad_clip": 0.0}, "grad_clip=0.0: must be a number > 0"),
    (TINY_SAM_SETTINGS, {"prompts_per_image": "abc"}, "prompts_per_image=abc: must be an integer >= 1"),
    (StageControl(), {"max_minutes": "abc"}, "max_minutes=abc: must be a number > 0 (or null)"),
    (StageControl(), {"save_every": 2.5}, "save_every=2.5: must be an integer >= 1"),
])
def test_settings_that_reverse_or_break_training_are_refused_by_key(settings, change, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        replace(settings, **change)


@pytest.mark.parametrize("script, extra, message", [
    ("pretrain_clip.py", ("threads=abc",), "threads=abc: must be an integer >= 1"),
    # The default pool of 3000 scenes would take minutes to build: refused before it.
    ("pretrain_clip.py", ("batch_size=3001",), "batch_size=3001: must be <= pool_size=3000"),
    ("pretrain_clip.py", ("batch_size=3", "pool_size=4", "out={tmp}"), "out={tmp}: is a directory"),
    ("pretrain_sam.py", ("focal_weight=-20",), "focal_weight=-20: must be a number >= 0"),
    ("pretrain_sam.py", ("seed=7", "test_seed=7"), "test_seed=7: must differ from seed=7"),
    ("pretrain_clip.py", ("test_seed=-1",), "test_seed=-1: must be an integer >= 0 or null"),
])
def test_pretraining_scripts_refuse_bad_settings_in_one_line(tmp_path, script, extra, message):
    base = TINY_CLIP_ARGS if script == "pretrain_clip.py" else TINY_SAM_ARGS
    extra = tuple(arg.format(tmp=tmp_path) for arg in extra)
    result = run_script(script, *base, f"out={tmp_path / 'weights.pt'}", *extra)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"error: {message.format(tmp=tmp_path)}"), lines[0]
    assert list(tmp_path.iterdir()) == []


def test_a_stage_deletes_its_own_unfinished_saves_and_claims_no_state_it_did_not_save(tmp_path):
    """A kill during a save leaves atomic_path's temporary file: the next start of the stage deletes those of
    its output, report and state (and no other file). stop_after_steps=0 on a fresh stage saves nothing."""
    out = tmp_path / "sam.pth"
    own = [".sam.pth.k3j_9x2a.tmp", ".sam.pth.resume.0abcdefg.tmp", ".sam.pth.json.zz12yy34.tmp"]
    others = [".sam.pth.x.k3j_9x2a.tmp", "sam.pth.k3j_9x2a.tmp", ".other.pth.k3j_9x2a.tmp", ".sam.pth.k3j_9x2a.new"]
    for name in own + others:
        (tmp_path / name).write_bytes(b"half a file")
    _, result = pretrain_sam(TINY_SAM, ONE_STEP_SAM, out=out, progress=False, control=StageControl.beside(out, stop_after_steps=0))
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(others)
    assert not result.finished and not result.state_saved and result.losses == []


def test_sam_script_remembers_the_fresh_seed_figure_of_a_finished_stage(tmp_path):
    """A finished SAM stage scored on the fresh seed once: the rerun (resume=true) prints the same lines,
    the fresh seed's from the report ((mIoU, instances) read back from JSON)."""
    out = tmp_path / "sam.pth"
    args = (*TINY_SAM_ARGS, "eval_scenes=1", f"out={out}")
    finished = run_script("pretrain_sam.py", *args)
    assert finished.returncode == 0, finished.stderr
    report_file = out.with_name(out.name + ".json")
    report = json.loads(report_file.read_text())
    miou, instances = report["results"]["fresh_seed"]["figures"]
    assert f"mIoU {miou:.4f} over {instances} instances (1 test scenes, seed 4242" in finished.stdout.splitlines()[-1]
    report["results"]["fresh_seed"]["figures"] = [0.5, 99]
    report_file.write_text(json.dumps(report))
    again = run_script("pretrain_sam.py", *args, "resume=true")
    assert again.returncode == 0 and "already finished" in again.stdout
    assert again.stdout.splitlines()[-2] == finished.stdout.splitlines()[-2]
    assert "mIoU 0.5000 over 99 instances (1 test scenes, seed 4242" in again.stdout.splitlines()[-1]


def test_sam_script_stopped_before_its_first_step_says_no_state_was_saved(tmp_path):
    out = tmp_path / "sam.pth"
    result = run_script("pretrain_sam.py", *TINY_SAM_ARGS, f"out={out}", "stop_after_steps=0")
    assert result.returncode == 3, result.stderr[-2000:]
    assert "stopped after 0 of 2 steps" in result.stdout and "no step was done and no state saved" in result.stdout
    assert "state saved to" not in result.stdout and list(tmp_path.iterdir()) == []
