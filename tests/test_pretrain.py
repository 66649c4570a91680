"""Encoder pretraining: SAM promptable segmentation and CLIP region-caption contrast.

Tiny configurations and a few steps each. References: segment_anything's own PromptEncoder called
prompt set by prompt set, masks and values worked out by hand in the comments, and the builders
(build_sam / build_clip_model) that SSP-SAM loads the weights with.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssp_sam.backbones.clip import CLIPSurgeryBackbone, build_clip_model
from ssp_sam.backbones.clip_tokenizer import CLIPTokenizer
from ssp_sam.backbones.sam import build_sam
from ssp_sam.data.shapeworld import generate_scene
from ssp_sam.pretrain.clip import (
    DESCRIPTIONS,
    CLIPPretrainSettings,
    GroundingScene,
    attribute_code,
    contrastive_batch,
    masked_info_nce,
    pool_regions,
    pretrain_clip,
)
from ssp_sam.pretrain.sam import (
    NOT_A_POINT,
    PromptBatch,
    SAMPointSegmenter,
    SAMPretrainSettings,
    centre_clicks,
    embed_prompts,
    point_prompt_miou,
    pretrain_sam,
    sample_prompt,
)

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
    steps=30, batch_size=6, expressions_per_scene=2, lr=2e-3, warmup_steps=2, pool_size=12, eval_scenes=2, seed=5
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


def test_attribute_codes_index_the_descriptions():
    assert DESCRIPTIONS[attribute_code("small", "red", "circle")] == "the small red circle"
    assert DESCRIPTIONS[attribute_code("large", "black", "star")] == "the large black star"
    assert len(set(DESCRIPTIONS)) == 96
