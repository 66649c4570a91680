"""The OVSS models (CAT-Seg, CAT-Seg + SAM vote, SAM-MI) on tiny configurations: every stage's shape and
the rules each stage follows, checked against hand-worked or separately computed references."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from timm.models.swin_transformer import SwinTransformerBlock

from ssp_sam.attention import FUSED_DECODER_CLASSES
from ssp_sam.errors import ConfigError, DatasetError
from ssp_sam.ovss.build import build_ovss_model
from ssp_sam.ovss.catseg.aggregation import ClassAggregation, GuidedSwinBlock
from ssp_sam.ovss.catseg.cost import cost_volume, gather_classes, scatter_classes, select_classes
from ssp_sam.ovss.model_config import TSPPConfig, ovss_config_from
from ssp_sam.ovss.prompts import class_prompts, load_templates
from ssp_sam.ovss.sam_mi.smagg import assign_proposals, assign_with_confidence, merge_by_class
from ssp_sam.ovss.sam_mi.tspp import sample_points
from ssp_sam.ovss.sam_vote import vote_in_masks
from ssp_sam.ovss.sliding_window import sliding_window_inference

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["red circle", "blue square", "green star"]


def tiny(seed: int = 0, **overrides):
    config = OmegaConf.load(REPO / "configs" / "ovss_model" / "tiny.yaml")
    for key, value in overrides.items():
        OmegaConf.update(config, key, value, merge=True)
    torch.manual_seed(seed)
    return build_ovss_model(config)


def images_and_labels(batch: int = 2, seed: int = 1):
    """Scenes of three coloured vertical bands (one class each, a random order per image), a corner ignored."""
    generator = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[230.0, 20, 20], [20, 20, 230], [20, 230, 20]])
    labels = torch.empty(batch, 64, 64, dtype=torch.long)
    for image in range(batch):
        order = torch.randperm(3, generator=generator) if image % 2 else torch.arange(3)
        for band in range(3):
            labels[image, :, band * 22 : (band + 1) * 22] = order[band]
    images = colours[labels].permute(0, 3, 1, 2) + torch.rand(batch, 3, 64, 64, generator=generator) * 20
    labels[:, :4, :4] = 255
    return images, labels


# --- shapes -------------------------------------------------------------------------------------


def test_every_stage_has_its_shape():
    model = tiny(variant="sam_mi").eval()
    images, _ = images_and_labels()
    text = model.encode_classes(CLASSES)
    assert text.shape == (3, 1, 32)  # (T, P, E)
    state = model.catseg.costs(images, text)
    assert state.dense.shape == (2, 32, 8, 8)
    assert state.cost.shape == (2, 1, 3, 8, 8)  # (B, P, T, H, W)
    assert state.selected is None
    assert state.embedding.shape == (2, 16, 3, 8, 8)  # (B, C, T, H, W)
    assert state.appearance.shape == (2, 16, 8, 8)
    assert state.text_guidance.shape == (2, 3, 16)
    assert [tuple(g.shape) for g in state.decoder_guidance] == [(2, 8, 16, 16), (2, 4, 32, 32)]
    with torch.no_grad():
        output = model(images, text)
    assert output.logits.shape == (2, 3, 32, 32)
    assert output.tspp.where.shape == (2, 3, 8, 8) and output.tspp.presence.shape == (2, 3)
    proposals = output.proposals
    assert proposals.logits.shape[0] == 2 and proposals.logits.shape[2:] == (16, 16)  # SAM's 4x4 embedding -> 16x16
    assert proposals.valid.shape == proposals.logits.shape[:2]
    assert (proposals.num_prompts <= 6).all()  # the budget
    assert model.class_masks(state, proposals).shape == (2, 3, 16, 16)
    assert model.predict(images, text).shape == (2, 3, 64, 64)


def test_dense_grid_prompts_every_grid_point():
    model = tiny(variant="sam_mi", points="grid").eval()
    images, _ = images_and_labels()
    with torch.no_grad():
        output = model(images, model.encode_classes(CLASSES))
    assert model.tspp is None and output.tspp is None
    assert output.proposals.num_prompts.tolist() == [16, 16]  # grid_side 4


# --- cost volume and class selection -------------------------------------------------------------


def test_cost_volume_is_the_cosine_similarity():
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 5, 3, 4, generator=generator) * 3
    text = torch.randn(4, 2, 5, generator=generator) * 2  # T = 4 classes, P = 2 prompts
    cost = cost_volume(image, text)
    assert cost.shape == (2, 2, 4, 3, 4)
    for b, p, t, h, w in [(0, 0, 0, 0, 0), (1, 1, 3, 2, 3), (0, 1, 2, 1, 2), (1, 0, 1, 2, 0)]:
        u, v = image[b, :, h, w].tolist(), text[t, p].tolist()
        dot = sum(x * y for x, y in zip(u, v))
        expected = dot / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v)))
        assert cost[b, p, t, h, w].item() == pytest.approx(expected, abs=1e-5)
    per_image = cost_volume(image, text.expand(2, -1, -1, -1))  # (B, T, P, C) text gives the same
    assert torch.allclose(per_image, cost)


def test_top_classes_by_maximum_clip_score():
    cost = torch.zeros(2, 2, 5, 2, 2)  # (B, P, T, H, W)
    maxima = [[0.1, 0.9, 0.3, 0.8, 0.2], [0.7, 0.1, 0.6, 0.2, 0.5]]
    for b, row in enumerate(maxima):
        for t, value in enumerate(row):
            cost[b, b % 2, t, t % 2, 1] = value  # the maximum sits at a different prompt / pixel each time
    assert select_classes(cost, 5) is None
    selected = select_classes(cost, 2)
    assert selected.tolist() == [[1, 3], [0, 2]]
    logits = torch.arange(2 * 2 * 1 * 1, dtype=torch.float32).view(2, 2, 1, 1)
    full = scatter_classes(logits, selected, 5, fill=-100.0)
    assert full[:, :, 0, 0].tolist() == [[-100, 0, -100, 1, -100], [2, -100, 3, -100, -100]]
    assert gather_classes(full, selected, dim=1).equal(logits)


def test_classes_beyond_max_classes_get_the_low_score():
    model = tiny(variant="catseg").eval()
    names = [f"class {i}" for i in range(11)]  # 11 classes, max_classes 8
    images, _ = images_and_labels(batch=1)
    with torch.no_grad():
        text = model.encode_classes(names)
        state = model.catseg.costs(images, text)
        logits = model(images, text).logits
    best = state.cost[0].amax(dim=(0, 2, 3))
    expected = sorted(best.topk(8).indices.tolist())
    assert state.selected[0].tolist() == expected
    dropped = sorted(set(range(11)) - set(expected))
    assert (logits[0, dropped] == -100.0).all()
    assert (logits[0, expected] > -50).all()


# --- aggregation ---------------------------------------------------------------------------------


def test_class_aggregation_is_permutation_equivariant():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 4, 4)
    guidance = torch.randn(2, 5, 6)
    permutation = torch.tensor([3, 0, 4, 1, 2])
    for pad_to in (0, 8):
        layer = ClassAggregation(8, 6, num_heads=2, pooling=(2, 2), pad_to=pad_to)
        with torch.no_grad():
            if pad_to:
                layer.padding_token.normal_()
            out = layer(x, guidance)
            permuted = layer(x[:, :, permutation], guidance[:, permutation])
        assert torch.allclose(permuted, out[:, :, permutation], atol=1e-5)
        assert not torch.allclose(out[:, :, 0], out[:, :, 1])  # the classes do differ


def test_class_aggregation_pools_as_catseg_trains_and_tests():
    """CAT-Seg trains with POOLING_SIZES [2, 2] and evaluates with [1, 1] (its eval.sh): test_pooling in eval mode."""
    torch.manual_seed(0)
    x, guidance = torch.randn(2, 8, 5, 4, 4), torch.randn(2, 5, 6)
    both = ClassAggregation(8, 6, num_heads=2, pooling=(2, 2), test_pooling=(1, 1))
    pooled, unpooled = ClassAggregation(8, 6, num_heads=2, pooling=(2, 2)), ClassAggregation(8, 6, num_heads=2, pooling=(1, 1))
    pooled.load_state_dict(both.state_dict())
    unpooled.load_state_dict(both.state_dict())  # no weights depend on the pooling
    with torch.no_grad():
        assert torch.equal(both.train()(x, guidance), pooled(x, guidance))
        assert torch.equal(both.eval()(x, guidance), unpooled(x, guidance))
        assert not torch.allclose(pooled(x, guidance), unpooled(x, guidance))
    assert ovss_config_from({"name": "x"}).aggregator.test_pooling is None  # ShapeWorld's: evaluated as trained
    with pytest.raises(ConfigError, match=r"ovss_model.aggregator.test_pooling: needs two entries"):
        ovss_config_from({"aggregator": {"test_pooling": [1]}})


def test_whole_model_is_equivariant_to_the_class_order():
    model = tiny(variant="catseg").eval()
    images, _ = images_and_labels(batch=1)
    with torch.no_grad():
        text = model.encode_classes(CLASSES)
        logits = model(images, text).logits
        permuted = model(images, text[[2, 0, 1]]).logits
    assert torch.allclose(permuted, logits[:, [2, 0, 1]], atol=1e-4)


def test_guided_swin_block_is_timms_block_plus_guidance_in_queries_and_keys():
    torch.manual_seed(0)
    for shift in (0, 2):
        guided = GuidedSwinBlock(8, 4, input_resolution=(8, 8), num_heads=2, window_size=4, shift_size=shift)
        plain = SwinTransformerBlock(8, input_resolution=(8, 8), num_heads=2, window_size=4, shift_size=shift)
        state = {k.replace("qkv.qkv.", "qkv."): v for k, v in guided.state_dict().items() if "qkv.guidance" not in k}
        plain.load_state_dict(state)
        x, guidance = torch.randn(3, 8, 8, 8), torch.randn(3, 8, 8, 4)
        with torch.no_grad():
            guided.attn.qkv.guidance.weight.zero_()
            assert torch.allclose(guided(x, guidance), plain(x), atol=1e-5)  # no guidance: timm's block exactly
            guided.attn.qkv.guidance.weight.normal_()
            assert not torch.allclose(guided(x, guidance), plain(x), atol=1e-3)
            # The guidance enters q and k only: the v part of the projection is timm's qkv of x alone.
            projected = guided.attn.qkv(torch.cat([x, guidance], dim=-1).view(3, 64, 12))
            assert torch.allclose(projected[..., 16:], guided.attn.qkv.qkv(x.view(3, 64, 8))[..., 16:])


# --- CLIP fine-tuning ----------------------------------------------------------------------------


def test_only_attention_q_v_and_position_embeddings_of_clip_train():
    model = tiny(variant="catseg")
    trainable = {name for name, p in model.catseg.clip.named_parameters() if p.requires_grad}
    expected = {"clip.visual.positional_embedding", "clip.positional_embedding"}
    for tower, depth in (("clip.visual.transformer", 3), ("clip.transformer", 1)):
        for block in range(depth):
            expected |= {f"{tower}.resblocks.{block}.attn.q_proj_weight", f"{tower}.resblocks.{block}.attn.v_proj_weight"}
    expected.remove("clip.visual.transformer.resblocks.2.attn.q_proj_weight")  # the last image block mixes no attention
    assert trainable == expected
    without_positions = tiny(variant="catseg", **{"clip.finetune_positions": False})
    assert {n for n, p in without_positions.catseg.clip.named_parameters() if p.requires_grad} == expected - {
        "clip.visual.positional_embedding",
        "clip.positional_embedding",
    }
    # The loss reaches them (through the image and the text towers).
    images, labels = images_and_labels()
    text = model.encode_classes(CLASSES)
    model.loss(model(images, text), labels)["loss"].backward()
    clip = model.catseg.clip.clip
    for parameter in (clip.visual.transformer.resblocks[0].attn.q_proj_weight, clip.transformer.resblocks[0].attn.v_proj_weight,
                      clip.visual.positional_embedding, clip.positional_embedding):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_surgery_dense_path_is_clip_surgerys_patch_stream():
    """clip.dense=surgery gives CLIPSurgeryBackbone's patch tokens (an independent implementation over the packed
    weights), guidance maps of the blocks as they run, and a gradient for every trained CLIP weight."""
    import copy

    from ssp_sam.backbones.clip import CLIPSurgeryBackbone, build_clip_model
    from ssp_sam.ovss.catseg.clip_dense import CATSegCLIP

    custom = dict(OmegaConf.load(REPO / "configs" / "ovss_model" / "tiny.yaml").clip.custom)
    torch.manual_seed(3)
    clip = build_clip_model("custom", None, custom)
    reference = CLIPSurgeryBackbone(copy.deepcopy(clip), surgery_blocks=2)
    plain = CATSegCLIP(copy.deepcopy(clip), 32, [0, 1], dense="catseg")  # at CLIP's own 32: no position resize
    surgery = CATSegCLIP(clip, 32, [0, 1], dense="surgery", surgery_blocks=2)
    pixels = torch.randn(2, 3, 32, 32)
    dense, guidance = surgery.encode_image(pixels)
    expected = reference.encode_image(pixels)[:, 1:].transpose(1, 2).reshape(2, -1, 4, 4)
    assert torch.allclose(dense, expected, atol=1e-5)
    _, plain_guidance = plain.encode_image(pixels)  # block 1 is a dual block in the surgery path
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(guidance, plain_guidance))
    model = tiny(**{"clip.dense": "surgery", "clip.surgery_blocks": 2})
    images, labels = images_and_labels()
    model.loss(model(images, model.encode_classes(CLASSES)), labels)["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    with pytest.raises(ConfigError, match="surgery_blocks: between 1 and 2"):
        CATSegCLIP(build_clip_model("custom", None, custom), 32, [0, 1], dense="surgery", surgery_blocks=3)


def test_split_projections_compute_the_same_attention():
    from ssp_sam.ovss.catseg.clip_dense import split_attention_projections

    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    before = attention(x, x, x, need_weights=False)[0]
    split_attention_projections(attention)
    assert attention.in_proj_weight is None
    assert torch.allclose(attention(x, x, x, need_weights=False)[0], before, atol=1e-6)


# --- TSPP ------------------------------------------------------------------------------------------


def test_tspp_points_stay_within_the_budget_and_the_image():
    generator = torch.Generator().manual_seed(0)
    config = TSPPConfig(budget=7, upsample=2, min_probability=0.0)
    point_map = torch.rand(3, 4, 6, 6, generator=generator)
    points, valid = sample_points(point_map, 96, config)
    assert points.shape == (3, 7, 2) and valid.shape == (3, 7)
    assert ((points >= 0) & (points < 96)).all()
    assert (valid.sum(dim=1) <= 7).all()
    for image in range(3):  # one point per cell
        assert len({tuple(p) for p in points[image][valid[image]].tolist()}) == int(valid[image].sum())


def test_tspp_samplers_on_a_hand_built_map():
    point_map = torch.zeros(1, 2, 4, 4)
    point_map[0, 0, 0, 0] = 0.9  # class 0: two strong peaks
    point_map[0, 0, 3, 3] = 0.8
    point_map[0, 1, 0, 3] = 0.3  # class 1: one weak peak
    common = dict(budget=2, upsample=1, nms_kernel=3, min_probability=0.1)
    points, valid = sample_points(point_map, 64, TSPPConfig(sampler="class_peaks", **common))
    assert valid.tolist() == [[True, True]]
    assert sorted(map(tuple, points[0].tolist())) == [(8.0, 8.0), (56.0, 8.0)]  # cell (0,0) and class 1's (row 0, col 3)
    points, valid = sample_points(point_map, 64, TSPPConfig(sampler="global_peaks", **common))
    assert sorted(map(tuple, points[0].tolist())) == [(8.0, 8.0), (56.0, 56.0)]
    points, valid = sample_points(point_map, 64, TSPPConfig(sampler="class_peaks", **{**common, "budget": 5}))
    assert valid.sum().item() == 3  # only three peaks reach min_probability


@pytest.mark.parametrize("sampler", ["class_peaks", "global_peaks"])
def test_tspp_plateau_gives_one_peak_and_leaves_the_budget_to_other_classes(sampler):
    """The audit's case: class 0 a flat 4x4 plateau at 0.9, class 1 one peak at 0.5, budget 3. Of equal values
    within a window only the first (lowest flat index) is a peak, so the plateau gives one point (its top-left
    cell) and class 1's peak gets the second; the third slot stays empty (no other peak)."""
    point_map = torch.zeros(1, 2, 8, 8)
    point_map[0, 0, 2:6, 2:6] = 0.9
    point_map[0, 1, 7, 0] = 0.5
    config = TSPPConfig(sampler=sampler, budget=3, upsample=1, nms_kernel=3, min_probability=0.1)
    points, valid = sample_points(point_map, 64, config)
    assert valid.tolist() == [[True, True, False]]
    assert points[0, :2].tolist() == [[20.0, 20.0], [4.0, 60.0]]  # cells (row 2, col 2) and (row 7, col 0), 8 px each


def test_tspp_keeps_a_peak_whose_equal_neighbour_is_no_peak():
    """Kernel 5 on the row 0.9, .1, .5, .1, .5, .1, ...: the 0.5 at x=2 is no peak (0.9 lies in its window), so it
    must not suppress the equal 0.5 at x=4, the maximum of its own window (an audit's case: it did)."""
    point_map = torch.zeros(1, 1, 8, 8)
    point_map[0, 0, 0] = torch.tensor([0.9, 0.1, 0.5, 0.1, 0.5, 0.1, 0.1, 0.1])
    points, valid = sample_points(point_map, 64, TSPPConfig(budget=4, upsample=1, nms_kernel=5, min_probability=0.2))
    assert points[0][valid[0]].tolist() == [[4.0, 4.0], [36.0, 4.0]]  # x=0 and x=4, 8 px cells


def test_tspp_gives_the_first_pass_to_one_best_peak_per_class():
    """Two separate peaks of class 0 tie at its maximum: only the first (lowest flat index) gets the "best peak
    first" rank, so class 1's weaker peak comes before class 0's second one."""
    point_map = torch.zeros(1, 2, 8, 8)
    point_map[0, 0, 0, 0] = 0.9
    point_map[0, 0, 6, 6] = 0.9
    point_map[0, 1, 0, 6] = 0.3
    points, valid = sample_points(point_map, 64, TSPPConfig(budget=2, upsample=1, nms_kernel=3, min_probability=0.1))
    assert valid.tolist() == [[True, True]]
    assert points[0].tolist() == [[4.0, 4.0], [52.0, 4.0]]


# --- SMAgg and the vote baseline ------------------------------------------------------------------


def test_smagg_assigns_by_the_chosen_criterion_and_merges_per_class():
    masks = torch.zeros(1, 3, 2, 4)
    masks[0, 0, 0, :] = 1  # proposal 0: the top row
    masks[0, 1, 1, :2] = 1  # proposal 1: bottom left
    masks[0, 2, 1, 2:] = 1  # proposal 2: bottom right
    scores = torch.zeros(1, 3, 2, 4)
    scores[0, 0, 0] = torch.tensor([0.6, 0.6, 0.6, 0.0])  # top row: class 0 wins 3 of 4 pixels ...
    scores[0, 1, 0] = torch.tensor([0.5, 0.5, 0.5, 0.9])  # ... but class 1's mean is higher (0.6 vs 0.45)
    scores[0, 1, 1, :2] = 0.7  # bottom left: class 1
    scores[0, 2, 1, 2:] = 0.4  # bottom right: class 2
    valid = torch.tensor([[True, True, True]])
    assert assign_proposals(masks, valid, scores, "mean_cost").tolist() == [[1, 1, 2]]
    assert assign_proposals(masks, valid, scores, "majority_vote").tolist() == [[0, 1, 2]]
    assert assign_proposals(masks, torch.tensor([[True, False, True]]), scores, "mean_cost").tolist() == [[1, -1, 2]]
    merged = merge_by_class(masks, torch.tensor([[1, 1, 2]]), 3)
    assert merged[0, 0].sum() == 0
    assert merged[0, 1].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]  # the union of proposals 0 and 1
    assert merged[0, 2].tolist() == [[0, 0, 0, 0], [0, 0, 1, 1]]


def test_gated_smagg_weights_each_proposal_by_its_assignments_confidence():
    """The example above: proposal 0's mean scores are 0.45 / 0.6 / 0 (classes 0 / 1 / 2), so at
    temperature 0.1 class 1 wins with probability e^6 / (e^4.5 + e^6 + 1) = 0.8171; proposal 1's
    0 / 0.7 / 0 give e^7 / (e^7 + 2) = 0.9982; proposal 2's 0 / 0 / 0.4 give e^4 / (e^4 + 2) = 0.9647.
    By votes proposal 0 goes to class 0 with 3 of its 4 pixels: 0.75. The class mask of class 1 is the
    union of 0.8171 x proposal 0 and 0.9982 x proposal 1; a padding proposal has confidence 0."""
    masks = torch.zeros(1, 3, 2, 4)
    masks[0, 0, 0, :] = 1
    masks[0, 1, 1, :2] = 1
    masks[0, 2, 1, 2:] = 1
    scores = torch.zeros(1, 3, 2, 4)
    scores[0, 0, 0] = torch.tensor([0.6, 0.6, 0.6, 0.0])
    scores[0, 1, 0] = torch.tensor([0.5, 0.5, 0.5, 0.9])
    scores[0, 1, 1, :2] = 0.7
    scores[0, 2, 1, 2:] = 0.4
    valid = torch.tensor([[True, True, True]])
    e = math.exp
    expected = [torch.tensor(value) for value in (e(6) / (e(4.5) + e(6) + 1), e(7) / (e(7) + 2), e(4) / (e(4) + 2))]
    assignment, confidence = assign_with_confidence(masks, valid, scores, "mean_cost", 0.1)
    assert assignment.tolist() == [[1, 1, 2]]
    torch.testing.assert_close(confidence[0], torch.stack(expected))
    assignment, confidence = assign_with_confidence(masks, valid, scores, "majority_vote", 0.1)
    assert assignment.tolist() == [[0, 1, 2]] and confidence[0, 0].item() == pytest.approx(0.75)
    assert assign_with_confidence(masks, torch.tensor([[True, False, True]]), scores, "mean_cost", 0.1)[1][0, 1] == 0
    merged = merge_by_class(masks, torch.tensor([[1, 1, 2]]), 3, torch.stack(expected)[None])
    torch.testing.assert_close(merged[0, 1], torch.stack([expected[0].expand(4), torch.stack([expected[1]] * 2 + [torch.tensor(0.0)] * 2)]))
    assert merged[0, 0].sum() == 0


def test_gated_smagg_is_a_switch_of_the_model():
    """smagg.confidence=gated: the same assignment, every class mask at most the binary one and above 0 where it is."""
    binary, gated = tiny(variant="sam_mi").eval(), tiny(variant="sam_mi", **{"smagg.confidence": "gated", "smagg.temperature": 0.05}).eval()
    gated.load_state_dict(binary.state_dict())
    images, _ = images_and_labels()
    with torch.no_grad():
        text = binary.encode_classes(CLASSES)
        state = binary.catseg.costs(images, text)
        proposals = binary(images, text).proposals
        hard, soft = binary.class_masks(state, proposals), gated.class_masks(state, proposals)
    assert hard.any() and ((soft > 0) == (hard > 0)).all() and (soft <= hard).all() and (soft < hard).any()
    with pytest.raises(ConfigError, match="ovss_model.smagg.confidence: must be one of none, gated, got 'soft'"):
        tiny(variant="sam_mi", **{"smagg.confidence": "soft"})
    with pytest.raises(ConfigError, match="ovss_model.smagg.temperature=0.0: must be > 0"):
        tiny(variant="sam_mi", **{"smagg.temperature": 0.0})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("criterion", ["majority_vote", "mean_cost"])
def test_smagg_counts_in_fp32_under_autocast(dtype, criterion):
    """A mask of 2001 pixels of class 1 and 2000 of class 0: bf16 sums (8 significant bits) tie and
    hand it to class 0; fp16 sums of 80000 + 70000 overflow. The assignment must be fp32's."""
    for first, second in ((2000, 2001), (70000, 80000)):
        pixels = first + second
        scores = torch.zeros(1, 2, 1, pixels)
        scores[0, 0, 0, :first], scores[0, 1, 0, :first] = 0.9, 0.1
        scores[0, 0, 0, first:], scores[0, 1, 0, first:] = 0.1, 0.9
        masks, valid = torch.ones(1, 1, 1, pixels), torch.tensor([[True]])
        with torch.autocast("cpu", dtype=dtype):
            assert assign_proposals(masks, valid, scores, criterion).tolist() == [[1]]


def test_majority_vote_baseline_on_a_hand_built_example():
    probabilities = torch.zeros(1, 2, 2, 4)
    probabilities[0, 0] = torch.tensor([[0.9, 0.8, 0.2, 0.1], [0.6, 0.3, 0.4, 0.5]])
    probabilities[0, 1] = torch.tensor([[0.1, 0.2, 0.7, 0.6], [0.4, 0.1, 0.3, 0.2]])
    # argmax: class 0 everywhere except (0,2), (0,3)
    masks = torch.zeros(1, 2, 2, 4)
    masks[0, 0, 0, :] = 1  # top row: argmax votes 2 x class 0, 2 x class 1 -> tie -> class 0
    masks[0, 0, 1, 0] = 1  # + (1,0): class 0 -> 3 votes to 2
    masks[0, 1, 0, 2:] = 1  # small mask inside it: class 1 (2 votes)
    out = vote_in_masks(probabilities, masks, torch.tensor([[True, True]]))
    label = out.argmax(dim=1)[0]
    assert label.tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]
    assert out[0, :, 0, 2].tolist() == [0.0, 1.0]  # the smaller mask wins where they overlap
    assert out[0, :, 0, 0].tolist() == [1.0, 0.0]
    assert torch.equal(out[0, :, 1, 1:], probabilities[0, :, 1, 1:])  # outside every mask: unchanged
    ignored = vote_in_masks(probabilities, masks, torch.tensor([[False, False]]))
    assert torch.equal(ignored, probabilities)


def test_no_surviving_proposal_leaves_catseg_unchanged():
    strict = {"proposals.pred_iou_thresh": 1.0e9}  # SAM's masks all filtered out
    vote = tiny(variant="catseg_sam_vote", **strict).eval()
    alone = tiny(variant="catseg").eval()
    alone.load_state_dict(vote.state_dict(), strict=False)
    images, _ = images_and_labels()
    with torch.no_grad():
        text = vote.encode_classes(CLASSES)
        voted = vote.predict(images, text)
        assert vote(images, text).proposals.logits.shape[1] == 0
        assert torch.equal(voted, alone.predict(images, text))
        sam_mi = tiny(variant="sam_mi", **strict).eval()
        assert sam_mi(images, text).logits.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("multimask", [True, False])
def test_proposals_per_point_follow_multimask_output(multimask):
    """Each point gives SAM's three masks, or with multimask_output=false its single-mask output, with
    SAM's predicted IoU: what segment_anything's own decoder classes return for that point (image
    embedding given, one prompt), although the proposer decodes points of both images in one call that
    shares each image's embedding; every mask kept (no filter, no NMS) lands in its own image: 2 and 3
    points give 2m and 3m proposals."""
    keep_all = {"proposals.pred_iou_thresh": -1.0e9, "proposals.stability_score_thresh": -1.0e9,
                "proposals.box_nms_thresh": 1.0, "proposals.multimask_output": multimask}
    proposer = tiny(variant="sam_mi", **keep_all).proposer
    stock_decoder = copy.deepcopy(proposer.mask_decoder)
    stock_classes = {fused: stock for stock, fused in FUSED_DECODER_CLASSES.items()}
    for module in stock_decoder.modules():
        module.__class__ = stock_classes.get(type(module), type(module))
    images, _ = images_and_labels(batch=2)
    points = torch.tensor([[[10.0, 12.0], [40.0, 20.0], [0.0, 0.0]], [[20.0, 50.0], [33.0, 33.0], [60.0, 5.0]]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    per_point = 3 if multimask else 1
    with torch.no_grad():
        embeddings = proposer.embed(images)
        proposals = proposer.propose(embeddings, points, valid, 64)
        assert proposals.valid.sum(dim=1).tolist() == [2 * per_point, 3 * per_point]
        for image, point in ((0, 1), (1, 2)):
            coords = points[image, point : point + 1] * (proposer.sam_size / 64)
            sparse, dense = proposer.prompt_encoder(points=(coords[:, None], torch.ones(1, 1)), boxes=None, masks=None)
            expected, expected_iou = stock_decoder(
                image_embeddings=embeddings[image : image + 1], image_pe=proposer.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
            )
            kept = proposals.valid[image]
            for mask, iou in zip(expected[0], expected_iou[0]):
                matches = [
                    index for index, candidate in enumerate(proposals.logits[image][kept])
                    if torch.allclose(mask, candidate, atol=1e-5)
                ]
                assert len(matches) == 1
                assert proposals.scores[image][kept][matches[0]] == pytest.approx(iou.item(), abs=1e-5)


# --- sliding window ------------------------------------------------------------------------------


def test_sliding_window_first_resizes_as_detectron2s_test_mapper():
    """CAT-Seg's configs resize the image to short side 640 (long side at most 2560, PIL bilinear: antialiased)
    before its sliding window resizes to 640 x 640 and to the 384 global view; the output is at the image's size."""
    image = torch.rand(3, 1536, 2048) * 255
    seen = []

    def record(crops):
        seen.append(crops)
        return torch.zeros(crops.shape[0], 1, 384, 384)

    out = sliding_window_inference(record, image, window=384, overlap=0.333, out_size=640)
    assert out.shape == (1, 1536, 2048)
    mapped = F.interpolate(image[None], size=(640, 853), mode="bilinear", align_corners=False, antialias=True)  # 1536 -> 640
    global_view = F.interpolate(mapped, size=(384, 384), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(seen[0][-1], global_view, rtol=0, atol=1e-3)
    skipped = F.interpolate(image[None], size=(384, 384), mode="bilinear", align_corners=False)[0]  # the old, aliased path
    assert (seen[0][-1] - skipped).abs().mean() > 10


def test_sliding_window_averages_as_computed_by_hand():
    values = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])  # crops (0,0), (0,256), (256,0), (256,256), global view

    def constant_per_crop(crops):
        assert crops.shape == (5, 3, 384, 384)
        return values.view(5, 1, 1, 1).expand(5, 1, 384, 384)

    out = sliding_window_inference(constant_per_crop, torch.rand(3, 640, 640), window=384, overlap=0.333, out_size=640)
    assert out.shape == (1, 640, 640)
    # (mean of the crops covering the pixel + global) / 2
    expected = {(100, 100): (0.1 + 0.5) / 2, (100, 300): ((0.1 + 0.2) / 2 + 0.5) / 2,
                (300, 300): ((0.1 + 0.2 + 0.3 + 0.4) / 4 + 0.5) / 2, (500, 500): (0.4 + 0.5) / 2,
                (500, 100): (0.3 + 0.5) / 2}
    for (row, col), value in expected.items():
        assert out[0, row, col].item() == pytest.approx(value, abs=1e-6)


# --- SAM runs once per image -----------------------------------------------------------------------


@pytest.mark.parametrize("variant,points", [("sam_mi", "tspp"), ("sam_mi", "grid"), ("catseg_sam_vote", "grid")])
def test_sam_image_embedding_is_computed_once_per_image(variant, points):
    model = tiny(variant=variant, points=points).eval()
    calls = []
    model.proposer.image_encoder.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    images, _ = images_and_labels(batch=3)
    text = model.encode_classes(CLASSES)
    with torch.no_grad():
        output = model(images, text)
        assert calls == [3]  # one encoder call, three images, for the proposals and the injection
        embeddings = model.proposer.embed(images)
        calls.clear()
        cached = model(images, text, sam_embeddings=embeddings)
    assert calls == []  # given from a cache: never run
    assert torch.equal(cached.logits, output.logits)


# --- training --------------------------------------------------------------------------------------


@pytest.mark.parametrize("detach", [False, True])
def test_tspp_loss_reaches_catseg_only_without_detach_input(detach):
    """The TSPP term's gradient reaches CAT-Seg's cost embedding (the 7x7 convolution whose output TSPP reads)
    unless tspp.detach_input; TSPP's own heads learn either way."""
    model = tiny(variant="sam_mi", **{"tspp.detach_input": detach}).train()
    images, labels = images_and_labels()
    losses = model.loss(model(images, model.encode_classes(CLASSES)), labels)
    losses["tspp"].backward()
    cost_embedding = [p.grad for p in model.catseg.cost_embedding.parameters()]
    reached = any(g is not None and g.abs().sum() > 0 for g in cost_embedding)
    assert reached is not detach
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.tspp.parameters())


@pytest.mark.parametrize("variant", ["catseg", "sam_mi"])
def test_loss_decreases_on_a_tiny_batch(variant):
    model = tiny(variant=variant).train()
    images, labels = images_and_labels()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(10):
        losses = model.loss(model(images, model.encode_classes(CLASSES)), labels)
        optimiser.zero_grad()
        losses["loss"].backward()
        optimiser.step()
        history.append(losses["loss"].item())
    # From chance (ln 2 = 0.69 per term) to below 0.95 of it in ten steps; with random CLIP weights the
    # costs barely tell the colours apart, so this first drop is mostly the class prior being learnt.
    assert history[-1] < 0.95 * history[0]
    if variant == "sam_mi":
        assert set(losses) == {"loss", "seg", "tspp"}
        assert not any(p.requires_grad for p in model.proposer.parameters())  # SAM stays frozen


def test_ignored_pixels_rule():
    from ssp_sam.ovss.losses import per_class_bce

    logits = torch.zeros(1, 2, 2, 2)
    labels = torch.tensor([[[0, 1], [255, 255]]])
    log2 = math.log(2.0)
    assert per_class_bce(logits, labels, ignore_pixels="negative").item() == pytest.approx(log2)  # zero logits: ln 2 per term
    logits[0, :, 1, :] = -5.0  # confident negatives where ignored: count only under "negative"
    negative = per_class_bce(logits, labels, ignore_pixels="negative").item()
    excluded = per_class_bce(logits, labels, ignore_pixels="excluded").item()
    assert excluded == pytest.approx(log2)
    assert negative == pytest.approx((4 * log2 + 4 * math.log1p(math.exp(-5.0))) / 8)


def test_decoder_block_equals_the_convolution_of_the_concatenation():
    """UpBlock convolves the per-image guidance once; the result is CAT-Seg's conv over [x, guidance, extra] per class."""
    from ssp_sam.ovss.catseg.decoder import UpBlock

    torch.manual_seed(0)
    block = UpBlock(24, 16, guidance_channels=8, extra_channels=2)
    torch.nn.init.normal_(block.conv[0].weight)  # the extra channels' zero start would hide them
    x, guidance, extra = torch.randn(6, 24, 4, 4), torch.randn(2, 8, 8, 8), torch.randn(6, 2, 8, 8)  # 2 images x 3 classes
    plain = block.conv(torch.cat([block.up(x), guidance.repeat_interleave(3, dim=0), extra], dim=1))
    assert torch.allclose(block(x, guidance, extra), plain, atol=1e-5)


def test_losses_equal_their_one_hot_definitions():
    """The BCE and TSPP targets computed without a one-hot map equal the plain one-hot computation."""
    from ssp_sam.ovss.losses import per_class_bce, point_map_loss

    torch.manual_seed(0)
    logits = (torch.randn(2, 5, 4, 4) * 8).requires_grad_()  # some beyond softplus's threshold of 20
    labels = torch.randint(0, 5, (2, 16, 16))
    labels[0, :3] = 255
    up = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    target = F.one_hot(torch.where(labels == 255, 0, labels), 5).permute(0, 3, 1, 2).float() * (labels != 255)[:, None]
    terms = F.binary_cross_entropy_with_logits(up, target, reduction="none")
    expected = {"negative": terms.mean(), "excluded": (terms * (labels != 255)[:, None]).sum() / ((labels != 255).sum() * 5)}
    for rule, value in expected.items():
        loss = per_class_bce(logits, labels, ignore_pixels=rule)
        assert loss.item() == pytest.approx(value.item(), rel=1e-6)
        ours = torch.autograd.grad(loss, logits)[0]
        assert torch.allclose(ours, torch.autograd.grad(value, logits, retain_graph=True)[0], atol=1e-7)
    where, presence = torch.randn(2, 3, 4, 4), torch.randn(2, 3)
    selected = torch.tensor([[0, 2, 4], [1, 2, 3]])
    kept = target.gather(1, selected[:, :, None, None].expand(-1, -1, 16, 16))
    plain = F.binary_cross_entropy_with_logits(where, F.adaptive_avg_pool2d(kept, 4)) + F.binary_cross_entropy_with_logits(
        presence, kept.flatten(2).amax(dim=-1))
    assert point_map_loss(where, presence, labels, 5, selected).item() == pytest.approx(plain.item(), rel=1e-6)


# --- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,sam", [("vitb16_384", "vit_b"), ("vitb16_384", "vit_h"), ("vitl14_336", "vit_l"),
                                      ("shapeworld", None), ("tiny", None)])
def test_hydra_configs_compose_and_validate(name, sam):
    overrides = [f"+ovss_model={name}"] + ([f"ovss_model/sam={sam}"] if sam else [])
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        composed = compose(config_name=None, overrides=overrides)
    config = ovss_config_from(composed.ovss_model)
    if sam:
        assert config.sam.variant == sam
    assert config.clip.guidance_layers == {"vitb16_384": [3, 7], "vitl14_336": [7, 15]}.get(name, config.clip.guidance_layers)


def test_bad_configs_and_class_lists_name_the_key():
    with pytest.raises(ConfigError, match="ovss_model.variant"):
        ovss_config_from({"variant": "maskclip"})
    with pytest.raises(ConfigError, match="tspp.budgett"):
        ovss_config_from({"tspp": {"budgett": 3}})
    with pytest.raises(ConfigError, match="smagg.criterion"):
        ovss_config_from({"smagg": {"criterion": "iou"}})
    with pytest.raises(ConfigError, match=r"tspp.test_budget: must be >= 1, got 0"):
        ovss_config_from({"tspp": {"test_budget": 0}})
    with pytest.raises(ConfigError, match=r"tspp.test_min_probability: a probability in \[0, 1\], got 1.5"):
        ovss_config_from({"tspp": {"test_min_probability": 1.5}})
    with pytest.raises(ConfigError, match="clip.checkpoint"):
        build_ovss_model({"variant": "catseg"})
    with pytest.raises(DatasetError, match="duplicate class name 'cat'"):
        class_prompts(["cat", "dog", "cat"], ["a {}"])
    with pytest.raises(DatasetError, match="empty class list"):
        class_prompts([], ["a {}"])


def test_templates_are_data():
    assert load_templates("single") == ("A photo of a {} in the scene",)
    imagenet = load_templates("imagenet80")
    assert len(imagenet) == 80 and imagenet[0] == "a bad photo of a {}." and imagenet[-1] == "a tattoo of the {}."
    assert class_prompts(["tv, television", "cat"], ["a {}.", "the {}"]) == ["a tv.", "the tv", "a cat.", "the cat"]


def test_shapeworld_v2_composes_and_builds_on_the_v2_encoders(tmp_path, monkeypatch):
    """configs/ovss_model/shapeworld_v2.yaml in the ShapeWorld recipe: the v2 CLIP (convolutional stem, 6 blocks of
    width 160 at its own 256, guidance from blocks 1 and 3) and SAM (8 px patches: a 32x32 embedding of the 256 input)
    build with random encoders and predict; without random encoders the missing v2 weight file is named."""
    from ssp_sam.backbones.clip_stem import ConvStem
    from ssp_sam.errors import CheckpointError
    from ssp_sam.ovss.engine.train_config import ovss_train_config_from

    def composed(*overrides: str):
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = compose("train_ovss", ["experiment=ovss_shapeworld", "ovss_model=shapeworld_v2", f"run_dir={tmp_path / 'run'}", *overrides])
        return ovss_train_config_from(cfg).ovss_model

    config = composed("ovss_model.random_encoders=true", "ovss_model.clip.checkpoint=null", "ovss_model.sam.checkpoint=null")
    assert config.name == "shapeworld_v2" and config.image_size == 256 and config.clip.resolution == 256
    model = build_ovss_model(config).eval()
    clip = model.catseg.clip
    assert isinstance(clip.clip.visual.conv1, ConvStem) and len(clip.clip.visual.transformer.resblocks) == 6
    assert clip.guidance_layers == (1, 3) and clip.grid_size == 16 and clip.vision_width == 160
    with torch.no_grad():
        assert model.proposer.image_encoder(torch.zeros(1, 3, 256, 256)).shape[-2:] == (32, 32)
        probabilities = model.predict(torch.rand(1, 3, 256, 256) * 255, model.encode_classes(["red circle", "blue square"]))
    assert probabilities.shape == (1, 2, 256, 256) and torch.isfinite(probabilities).all()
    config = composed()
    monkeypatch.chdir(tmp_path)  # the relative weight paths resolve here, where no pretraining has run
    with pytest.raises(CheckpointError, match=r"checkpoints/pretrained/tiny_clip_v2.pt: CLIP checkpoint not found"):
        build_ovss_model(config)


def test_tspp_samples_with_its_test_settings_only_at_inference():
    """test_budget / test_min_probability replace budget / min_probability in eval mode, not in training."""
    model = tiny(variant="sam_mi", **{"tspp.budget": 2, "tspp.min_probability": 0.0, "tspp.test_budget": 5,
                                      "tspp.test_min_probability": 0.0})
    images, _ = images_and_labels()
    text = model.encode_classes(CLASSES)
    with torch.no_grad():
        trained = model.train()(images, text).proposals.num_prompts
        inferred = model.eval()(images, text).proposals.num_prompts
    assert (trained == 2).all() and (inferred == 5).all()  # threshold 0: every slot of the budget has a peak
    assert TSPPConfig(budget=3, min_probability=0.2).at_inference() == TSPPConfig(budget=3, min_probability=0.2)
