"""The SSP-SAM model: adapters, ablation switches, prompt generator, shapes and losses."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ssp_sam.adapters import LinguisticAttentionAdapter, VisualAttentionAdapter
from ssp_sam.errors import ConfigError
from ssp_sam.losses import LossWeights, dice_loss, focal_loss, rec_loss, ssp_sam_loss
from ssp_sam.model import TextFeatures
from ssp_sam.prompt_generator import PostNormDecoderLayer, PromptGenerator

from conftest import tiny_config, tiny_model


def _param_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters()}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _random_inputs(model, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    size = model.clip.image_size
    clip_pixels = torch.randn(batch, 3, size, size, generator=generator)
    tokens = torch.zeros(batch, 77, dtype=torch.long)
    tokens[:, 0] = 49406
    tokens[:, 1:4] = torch.randint(300, 4000, (batch, 3), generator=generator)
    tokens[:, 4] = 49407
    side = model.sam_image_size // 16
    embeddings = torch.randn(batch, model.mask_head.embed_dim, side, side, generator=generator)
    return clip_pixels, tokens, embeddings


def test_forward_shapes(model):
    clip_pixels, tokens, embeddings = _random_inputs(model, batch=3)
    out = model(clip_pixels, tokens, embeddings)
    # tiny: SAM 64x64 input -> 4x4 embedding -> 16x16 low-res logits -> 32x32 padded frame
    assert out.low_res_logits.shape == (3, 1, 16, 16)
    assert out.mask_logits.shape == (3, 1, 32, 32)
    assert out.boxes.shape == (3, 4)
    assert ((out.boxes > 0) & (out.boxes < 1)).all()
    assert out.similarity.shape == (3, 16)
    assert out.word_weights.shape == (3, 77)


def _decode_parts(model, seed: int = 0):
    """Encoder outputs of random inputs: (image_tokens, sam_embeddings, text)."""
    clip_pixels, tokens, embeddings = _random_inputs(model, seed=seed)
    return model.encode_clip_image(clip_pixels), embeddings, model.encode_text(tokens)


def _fused_output(model, visual, phrase, embeddings):
    """What decode computes after the adapters, from the visual features and the phrase by hand."""
    prompts, boxes = model.prompt_generator(model.fusion(visual, phrase))
    return model.mask_head(embeddings, prompts), boxes


def test_without_vad_the_normalised_patches_are_projected():
    """The paper's w/o VAD (release: ssp_sam_224_only_LAD_Q_token.py): the patch MLP on the
    L2-normalised CLIP patches, no similarity weighting, no verification, no LayerNorm."""
    full, without = tiny_model(), tiny_model(**{"adapters.visual": False})
    assert without.visual_adapter is None and full.patch_projection is None
    assert not any(name.startswith("visual_adapter.") for name in _param_names(without))
    mlp_params = 3 * (32 * 32 + 32)
    assert _count(full) - _count(without) == _count(full.visual_adapter) - mlp_params
    image_tokens, embeddings, text = _decode_parts(without)
    out = without.decode(image_tokens, embeddings, text)
    assert out.similarity is None and out.mask_logits.shape == (2, 1, 32, 32)
    patches = image_tokens[:, 1:] / image_tokens[:, 1:].norm(dim=-1, keepdim=True)
    x = patches
    for i, layer in enumerate(without.patch_projection.mlp.layers):
        x = x @ layer.weight.T + layer.bias
        x = torch.relu(x) if i < 2 else x
    phrase, _ = without.linguistic_adapter(without.word_proj(text.words), text.padding)
    logits, boxes = _fused_output(without, x, phrase, embeddings)
    assert torch.allclose(out.low_res_logits, logits, atol=1e-5) and torch.allclose(out.boxes, boxes, atol=1e-6)


def test_verification_switch_removes_exactly_its_modules():
    full, without = tiny_model(), tiny_model(**{"adapters.verification": False})
    assert not hasattr(without.visual_adapter, "text_attention")
    dim = 32
    # text attention 4D^2+4D, two Linear(D, D) 2(D^2+D), Gaussian scale and sigma 2
    assert _count(full) - _count(without) == 4 * dim * dim + 4 * dim + 2 * (dim * dim + dim) + 2
    without(*_random_inputs(without))


def test_without_gaussian_the_raw_cosine_scores_the_patches():
    """The paper's w/o Gaussian (release: ssp_sam_224_wo_gaussian.py): the verification stays, the
    score is the cosine itself, multiplied into LayerNorm(image queries); no scale or sigma."""
    torch.manual_seed(0)
    adapter = VisualAttentionAdapter(4, 4, num_heads=1, mlp_layers=1, gaussian=False).eval()
    assert not hasattr(adapter, "gauss_scale") and hasattr(adapter, "text_attention")
    tokens, sentence, words = torch.randn(1, 3, 4), torch.randn(1, 4), torch.randn(1, 5, 4)
    padding = torch.tensor([[False, False, True, True, True]])
    fused, _ = adapter(tokens, sentence, words, padding)
    patches, sim = adapter.similarity_map(tokens, sentence)
    queries = adapter.query_mlp(patches * sim.unsqueeze(-1))
    attended, _ = adapter.text_attention(queries, words[:, :2], words[:, :2])
    e_i, e_t = adapter.query_proj(queries), adapter.attended_text_proj(attended)
    cosine = (e_i * e_t).sum(-1) / (e_i.norm(dim=-1) * e_t.norm(dim=-1))
    assert torch.allclose(fused, adapter.norm(queries) * cosine.unsqueeze(-1), atol=1e-5)
    model = tiny_model(**{"adapters.gaussian": False})
    assert _count(tiny_model()) - _count(model) == 2


def test_without_lad_the_normalised_sentence_is_the_phrase():
    """The paper's w/o LAD (release: ssp_sam_224_only_VAD_Q_token.py): the L2-normalised sentence."""
    model = tiny_model(**{"adapters.linguistic": False})
    assert model.linguistic_adapter is None
    assert not any(name.startswith("linguistic_adapter.") for name in _param_names(model))
    image_tokens, embeddings, text = _decode_parts(model)
    out = model.decode(image_tokens, embeddings, text)
    assert out.word_weights is None
    words = model.word_proj(text.words)
    visual, _ = model.visual_adapter(image_tokens, text.sentence, words, text.padding)
    phrase = text.sentence / text.sentence.norm(dim=-1, keepdim=True)
    logits, boxes = _fused_output(model, visual, phrase, embeddings)
    assert torch.allclose(out.low_res_logits, logits, atol=1e-5) and torch.allclose(out.boxes, boxes, atol=1e-6)
    # The sentence's length does not matter (VAD normalises it too), its direction does.
    longer = model.decode(image_tokens, embeddings, TextFeatures(text.words, 3.0 * text.sentence, text.padding))
    assert torch.allclose(longer.boxes, out.boxes, atol=1e-6)
    turned = model.decode(image_tokens, embeddings, TextFeatures(text.words, text.sentence + 1.0, text.padding))
    assert not torch.allclose(turned.boxes, out.boxes)


def test_adapter_width_is_its_own_setting():
    """SSP-SAM-336's layout: 768-wide CLIP outputs, 512-wide adapters (release models/ssp_sam_336.py);
    the similarity is taken at CLIP's width, the word projection and patch MLP map 768 -> 512."""
    clip = {"embed_dim": 48, "text_width": 40, "vision_width": 64}
    model = tiny_model(**{f"clip_custom.{k}": v for k, v in clip.items()}, **{"adapters.dim": 24})
    assert model.word_proj.weight.shape == (24, 40)
    assert [tuple(layer.weight.shape) for layer in model.visual_adapter.query_mlp.layers] == [(24, 48), (24, 24), (24, 24)]
    assert model.visual_adapter.text_attention.embed_dim == 24 and model.linguistic_adapter.gru.input_size == 24
    assert model.fusion.proj.weight.shape == (32, 24)
    out = model(*_random_inputs(model))
    assert out.similarity.shape == (2, 16) and out.mask_logits.shape == (2, 1, 32, 32)
    with pytest.raises(ConfigError, match="adapters.dim must equal it"):
        tiny_model(**{f"clip_custom.{k}": v for k, v in clip.items()}, **{"adapters.dim": 24, "adapters.linguistic": False})
    assert tiny_config().adapters.dim == 32 and tiny_config(**{"adapters.dim": None}).adapters.dim is None


def test_vad_text_attention_dropout_is_the_release_one_in_training_only():
    from ssp_sam.config import RELEASE_PRESETS, model_config_from

    assert model_config_from(RELEASE_PRESETS["ssp_sam_336"]).adapters.text_attention_dropout == 0.1
    model = tiny_model(**{"adapters.text_attention_dropout": 0.1})
    assert model.visual_adapter.text_attention.dropout == 0.1
    image_tokens, embeddings, text = _decode_parts(model)
    evaluated = [model.decode(image_tokens, embeddings, text).boxes for _ in range(2)]
    assert torch.equal(*evaluated)
    model.train()
    trained = [model.decode(image_tokens, embeddings, text).boxes for _ in range(2)]
    assert not torch.allclose(*trained)
    with pytest.raises(ConfigError, match="text_attention_dropout"):
        tiny_config(**{"adapters.text_attention_dropout": 1.0})


def test_prompt_token_count_and_decoder_mode():
    model = tiny_model(**{"prompt_generator.num_prompt_tokens": 7, "prompt_generator.mode": "decoder"})
    generator = model.prompt_generator
    assert generator.prompt_tokens.weight.shape == (7, 32)
    assert generator.pos_embed.weight.shape == (1 + 7 + 16, 32)
    assert all(isinstance(layer, PostNormDecoderLayer) for layer in generator.layers)
    prompts, boxes = generator(torch.randn(2, 16, 32))
    assert prompts.shape == (2, 7, 32) and boxes.shape == (2, 4)


def test_prompt_generator_encoder_matches_hand_written_detr_layer():
    """One encoder layer computed by hand from its weights (q = k = x + pos, post-norm)."""
    torch.manual_seed(0)
    generator = PromptGenerator(dim=8, num_prompt_tokens=2, num_visual_tokens=3, depth=1, num_heads=2, ffn_dim=16).eval()
    multimodal = torch.randn(1, 3, 8)
    prompts, boxes = generator(multimodal)

    layer = generator.layers[0]
    x = torch.cat([generator.reg_token.weight, generator.prompt_tokens.weight, multimodal[0]])  # (6, 8)
    pos = generator.pos_embed.weight
    w, b = layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias
    q = (x + pos) @ w[:8].T + b[:8]
    k = (x + pos) @ w[8:16].T + b[8:16]
    v = x @ w[16:].T + b[16:]
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        attn = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(4), dim=-1)
        heads.append(attn @ v[:, sl])
    attended = torch.cat(heads, dim=-1) @ layer.self_attn.out_proj.weight.T + layer.self_attn.out_proj.bias
    x = layer.norm1(x + attended)
    x = layer.norm2(x + layer.linear2(torch.relu(layer.linear1(x))))
    x = generator.norm(x)
    assert torch.allclose(prompts[0], x[1:3], atol=1e-5)
    assert torch.allclose(boxes[0], generator.box_head(x[0]).sigmoid(), atol=1e-6)


@pytest.mark.parametrize("mode, calls_per_layer", [("encoder", 1), ("decoder", 2)])
def test_prompt_generator_attention_runs_fused(mode, calls_per_layer, monkeypatch):
    """nn.MultiheadAttention with need_weights=False hands its heads to scaled_dot_product_attention
    (its native fast path needs query, key and value to be one tensor, which positions on q and k
    only rule out): every attention of the generator runs fused, in training as in evaluation."""
    calls = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs))
    generator = PromptGenerator(dim=8, num_prompt_tokens=2, num_visual_tokens=4, depth=3, num_heads=2, ffn_dim=16, mode=mode)
    generator(torch.randn(2, 4, 8))[0].sum().backward()
    assert len(calls) == 3 * calls_per_layer


def test_prompt_generator_weights_start_xavier_uniform_as_the_release():
    """Encoder mode: every weight matrix of the layers ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out))
    (the release's VisionLanguageEncoder._reset_parameters); biases keep PyTorch's defaults.
    Decoder mode keeps PyTorch's defaults, as the release's nn.TransformerDecoder ablation."""
    torch.manual_seed(0)
    encoder = PromptGenerator(dim=256, num_prompt_tokens=2, num_visual_tokens=4, depth=1, ffn_dim=2048)
    layer = encoder.layers[0]
    for weight in (layer.self_attn.in_proj_weight, layer.self_attn.out_proj.weight, layer.linear1.weight, layer.linear2.weight):
        fan_out, fan_in = weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert 0.97 * bound < float(weight.detach().abs().max()) <= bound
    # PyTorch's default for linear2 would be U(+-1/sqrt(2048)) = +-0.022, well inside xavier's +-0.051
    assert float(layer.linear1.bias.detach().abs().max()) > 0.9 / math.sqrt(256)
    decoder = PromptGenerator(dim=256, num_prompt_tokens=2, num_visual_tokens=4, depth=1, ffn_dim=2048, mode="decoder")
    assert float(decoder.layers[0].linear2.weight.detach().abs().max()) <= 1 / math.sqrt(2048)


@pytest.mark.parametrize("mode", ["encoder", "decoder"])
def test_prompt_generator_layers_start_as_copies_of_one_layer(mode):
    """The release clones one layer (DETR's _get_clones; nn.TransformerDecoder for its decoder ablation):
    the feed-forward biases start equal in every layer; encoder mode then draws each matrix again."""
    torch.manual_seed(0)
    generator = PromptGenerator(dim=16, num_prompt_tokens=2, num_visual_tokens=4, depth=3, num_heads=2, ffn_dim=32, mode=mode)
    first, *others = generator.layers
    for layer in others:
        assert torch.equal(layer.linear1.bias, first.linear1.bias) and torch.equal(layer.linear2.bias, first.linear2.bias)
        assert first.linear1.bias.abs().max() > 0  # PyTorch's default bias draw, not zeros
        if mode == "encoder":
            assert not torch.equal(layer.linear1.weight, first.linear1.weight)


def test_sincos_position_init_codes_rows_and_columns():
    """Patch rows of pos_embed hold 2-D sine-cosine codes (hand-computed); the other rows stay N(0, 1)."""
    torch.manual_seed(0)
    random_init = PromptGenerator(dim=8, num_prompt_tokens=2, num_visual_tokens=4, depth=1, num_heads=2, ffn_dim=16)
    torch.manual_seed(0)
    sincos = PromptGenerator(dim=8, num_prompt_tokens=2, num_visual_tokens=4, depth=1, num_heads=2, ffn_dim=16,
                             position_init="sincos")
    # dim 8: 2 frequencies, 1 and 10000^(-1/2) = 0.01; patch p of the 2x2 grid is (row p // 2, column p % 2).
    def axis(i: int) -> list[float]:
        return [math.sin(i), math.sin(0.01 * i), math.cos(i), math.cos(0.01 * i)]

    expected = torch.tensor([axis(p // 2) + axis(p % 2) for p in range(4)])
    assert torch.allclose(sincos.pos_embed.weight[3:], expected, atol=1e-6)
    assert torch.equal(sincos.pos_embed.weight[:3], random_init.pos_embed.weight[:3])
    with pytest.raises(ConfigError, match="position_init"):
        tiny_config(**{"prompt_generator.position_init": "learned"})
    with pytest.raises(ValueError, match="square grid"):
        PromptGenerator(dim=8, num_prompt_tokens=2, num_visual_tokens=6, position_init="sincos")


def test_positions_in_values_adds_patch_positions_to_the_tokens():
    """The switch is exactly "multimodal + patch position rows" fed to the release's generator."""
    torch.manual_seed(0)
    released = PromptGenerator(dim=8, num_prompt_tokens=2, num_visual_tokens=4, depth=2, num_heads=2, ffn_dim=16)
    with_values = PromptGenerator(dim=8, num_prompt_tokens=2, num_visual_tokens=4, depth=2, num_heads=2, ffn_dim=16,
                                  positions_in_values=True)
    with_values.load_state_dict(released.state_dict())
    multimodal = torch.randn(3, 4, 8)
    patch_positions = released.pos_embed.weight[3:]  # after the reg token and the 2 prompt tokens
    expected_prompts, expected_boxes = released(multimodal + patch_positions)
    prompts, boxes = with_values(multimodal)
    assert torch.allclose(prompts, expected_prompts, atol=1e-6)
    assert torch.allclose(boxes, expected_boxes, atol=1e-6)
    assert not torch.allclose(released(multimodal)[0], prompts, atol=1e-3)


def test_sam_click_position_init_is_a_click_on_each_patch_centre():
    """Patch rows start as SAM's one-click prompt token at the patch centre, computed here from
    SAM's formula: random-Fourier PE of the pixel centre (x + 0.5) / S, plus the positive-point embedding."""
    model = tiny_model(**{"prompt_generator.position_init": "sam_click"})
    grid, size = model.clip.grid_size, model.sam_image_size
    prompt_encoder = model.mask_head.prompt_encoder
    gaussian = prompt_encoder.pe_layer.positional_encoding_gaussian_matrix  # (2, C/2)
    rows = []
    for p in range(grid * grid):
        row, column = divmod(p, grid)
        centre = torch.tensor([(column + 0.5) / grid, (row + 0.5) / grid])  # patch centre, normalised
        projected = 2 * math.pi * ((2 * centre - 1) @ gaussian)
        rows.append(torch.cat([projected.sin(), projected.cos()]) + prompt_encoder.point_embeddings[1].weight[0])
    start = 1 + model.prompt_generator.num_prompt_tokens
    assert size % grid == 0  # so the centres are whole pixel centres: (column + 0.5) * S / grid
    assert torch.allclose(model.prompt_generator.pos_embed.weight[start:], torch.stack(rows), atol=1e-5)
    assert tiny_config(**{"prompt_generator.position_init": "sam_click"}).prompt_generator.position_init == "sam_click"


def test_vad_similarity_channel_and_token_axis():
    """Hand-checkable similarity: 1 CLS + 3 patches of width 2, sentence along +x."""
    tokens = torch.tensor([[[5.0, 5.0], [3.0, 4.0], [0.0, 2.0], [1.0, 0.0]]])
    sentence = torch.tensor([[2.0, 0.0]])
    clean = VisualAttentionAdapter(2, 2, num_heads=1, verification=False)
    _, sim = clean.similarity_map(tokens, sentence)
    # channel-normalised patches . (1, 0) = 3/5, 0, 1 -> min-max -> 0.6, 0, 1
    assert torch.allclose(sim, torch.tensor([[0.6, 0.0, 1.0]]), atol=1e-6)
    quirk = VisualAttentionAdapter(2, 2, num_heads=1, verification=False, token_axis_norm=True)
    _, sim_quirk = quirk.similarity_map(tokens, sentence)
    # token-axis norms of the x column (incl. CLS): sqrt(25+9+0+1) = sqrt(35); x values 3, 0, 1
    # -> 3/sqrt35, 0, 1/sqrt35 -> min-max -> 1, 0, 1/3
    assert torch.allclose(sim_quirk, torch.tensor([[1.0, 0.0, 1.0 / 3.0]]), atol=1e-6)


def test_vad_gaussian_score_is_applied():
    torch.manual_seed(0)
    adapter = VisualAttentionAdapter(4, 4, num_heads=1, mlp_layers=1)
    tokens, sentence, words = torch.randn(1, 3, 4), torch.randn(1, 4), torch.randn(1, 5, 4)
    padding = torch.tensor([[False, False, True, True, True]])
    fused, _ = adapter(tokens, sentence, words, padding)
    patches, sim = adapter.similarity_map(tokens, sentence)
    queries = adapter.query_mlp(patches * sim.unsqueeze(-1))
    attended, _ = adapter.text_attention(queries, words[:, :2], words[:, :2])  # padding removed by hand
    c = torch.nn.functional.cosine_similarity(adapter.query_proj(queries), adapter.attended_text_proj(attended), dim=-1)
    score = torch.exp(-((1 - c) ** 2) / (2 * 0.5**2))  # scale 1, sigma 0.5 at init
    assert torch.allclose(fused, adapter.norm(queries) * score.unsqueeze(-1), atol=1e-5)


def test_lad_ignores_padding_and_normalises():
    torch.manual_seed(0)
    adapter = LinguisticAttentionAdapter(4)
    words = torch.randn(2, 6, 4)
    padding = torch.tensor([[False] * 3 + [True] * 3, [False] * 5 + [True]])
    phrase, weights = adapter(words, padding)
    assert torch.all(weights[padding] == 0)
    assert torch.allclose(weights.sum(-1), torch.ones(2))
    assert torch.allclose(phrase, (weights.unsqueeze(-1) * words).sum(1), atol=1e-6)


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match="adaptors"):
        tiny_config(**{"adaptors": {"visual": False}})
    with pytest.raises(ConfigError, match="sam_variant"):
        tiny_config(sam_variant="vit_x")
    with pytest.raises(ConfigError, match="num_prompt_tokens"):
        tiny_config(**{"prompt_generator.num_prompt_tokens": 0})


def test_losses_hand_computed():
    # Logits 0 -> p = 0.5 everywhere. Mask of 4 pixels, 1 foreground.
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    # dice: 1 - (2 * 0.5 + 1) / (2.0 + 1 + 1) = 1 - 2/4 = 0.5
    assert dice_loss(logits, target).item() == pytest.approx(0.5)
    # focal per pixel: ce = ln 2, (1 - p_t)^2 = 0.25; alpha 0.25 for the positive, 0.75 for negatives
    expected_focal = (0.25 * 0.25 * math.log(2) + 3 * 0.75 * 0.25 * math.log(2)) / 4
    assert focal_loss(logits, target).item() == pytest.approx(expected_focal, rel=1e-6)
    # boxes: prediction (0.5, 0.5, 0.2, 0.2) vs target (0.6, 0.5, 0.2, 0.2): L1 = 0.1
    # xyxy (0.4,0.4,0.6,0.6) vs (0.5,0.4,0.7,0.6): I = 0.02, U = 0.06, C = 0.3 x 0.2 = 0.06 -> GIoU = 1/3
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    gt = torch.tensor([[0.6, 0.5, 0.2, 0.2]])
    terms = ssp_sam_loss(logits, target, pred, gt)
    assert terms["l1"].item() == pytest.approx(5 * 0.1, rel=1e-5)
    assert terms["giou"].item() == pytest.approx(2 * (1 - 1 / 3), rel=1e-5)
    assert terms["dice"].item() == pytest.approx(4 * 0.5)
    assert terms["focal"].item() == pytest.approx(4 * expected_focal, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(sum(terms[k].item() for k in ("l1", "giou", "dice", "focal")))
    box_only = rec_loss(pred, gt)
    assert set(box_only) == {"loss", "l1", "giou"} and box_only["loss"].item() == pytest.approx(0.5 + 2 * (2 / 3), rel=1e-5)


def test_losses_are_means_over_the_batch():
    logits = torch.randn(3, 1, 4, 4)
    targets = (torch.rand(3, 1, 4, 4) > 0.5).float()
    boxes, gt = torch.rand(3, 4) * 0.5 + 0.25, torch.rand(3, 4) * 0.5 + 0.25
    batch = ssp_sam_loss(logits, targets, boxes, gt)["loss"]
    singles = [ssp_sam_loss(logits[i : i + 1], targets[i : i + 1], boxes[i : i + 1], gt[i : i + 1])["loss"] for i in range(3)]
    assert batch.item() == pytest.approx(sum(s.item() for s in singles) / 3, rel=1e-5)
    assert LossWeights() == LossWeights(dice=4, focal=4, l1=5, giou=2, focal_alpha=0.25, focal_gamma=2)


def test_frozen_encoders_get_no_gradient(model):
    model.train()
    assert not model.clip.training and not model.sam_image_encoder.training
    out = model(*_random_inputs(model))
    (out.mask_logits.mean() + out.boxes.mean()).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("clip.", "sam_image_encoder.", "mask_head.prompt_encoder.")) for n in trainable)
    assert any(n.startswith("mask_head.mask_decoder.") for n in trainable)
    assert model.word_proj.weight.grad is not None and model.word_proj.weight.grad.abs().sum() > 0
