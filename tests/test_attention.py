"""Fused multi-head attention (ssp_sam/attention.py) against nn.MultiheadAttention itself."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssp_sam.attention import multi_head_attention


def _module(dim=16, heads=4, dropout=0.0, bias=True):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(dim, heads, dropout=dropout, bias=bias, batch_first=True)
    with torch.no_grad():  # non-zero biases so that a bias placed wrongly would show
        for name, parameter in attention.named_parameters():
            if "bias" in name:
                parameter.normal_()
    return attention.eval()


@pytest.mark.parametrize("bias", [True, False])
def test_self_attention_with_key_padding_equals_the_module(bias):
    attention = _module(bias=bias)
    x = torch.randn(3, 7, 16)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True
    padding[2, 1:] = True
    expected = attention(x, x, x, key_padding_mask=padding, need_weights=False)[0]
    torch.testing.assert_close(multi_head_attention(attention, x, x, x, key_padding_mask=padding), expected)


def test_cross_attention_with_distinct_query_key_value_equals_the_module():
    attention = _module()
    query, key, value = torch.randn(2, 5, 16), torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    expected = attention(query, key, value, need_weights=False)[0]
    torch.testing.assert_close(multi_head_attention(attention, query, key, value), expected)
    # key is value (the memory of a decoder), a separate projection path
    expected = attention(query, key, key, need_weights=False)[0]
    torch.testing.assert_close(multi_head_attention(attention, query, key, key), expected)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning")  # the module, not ours
def test_causal_float_mask_and_padding_together_equal_the_module():
    attention = _module()
    x = torch.randn(2, 6, 16)
    causal = torch.full((6, 6), float("-inf")).triu_(1)
    padding = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    expected = attention(x, x, x, key_padding_mask=padding, attn_mask=causal, need_weights=False)[0]
    torch.testing.assert_close(multi_head_attention(attention, x, x, x, key_padding_mask=padding, attn_mask=causal), expected)
    boolean = causal.isinf()  # the module's bool convention: True = not allowed
    torch.testing.assert_close(multi_head_attention(attention, x, x, x, attn_mask=boolean), attention(x, x, x, attn_mask=boolean, need_weights=False)[0])


def test_attention_on_a_transposed_view_gives_the_same_as_on_a_contiguous_copy():
    attention = _module()
    x = torch.randn(7, 3, 16).transpose(0, 1)  # (3, 7, 16), not contiguous
    torch.testing.assert_close(multi_head_attention(attention, x, x, x), multi_head_attention(attention, x.contiguous(), x.contiguous(), x.contiguous()))


def test_dropout_acts_in_training_only_and_gradients_match_the_module():
    attention = _module(dropout=0.5)
    x = torch.randn(2, 5, 16)
    attention.train()
    first, second = multi_head_attention(attention, x, x, x), multi_head_attention(attention, x, x, x)
    assert not torch.allclose(first, second)
    attention.eval()
    assert torch.equal(multi_head_attention(attention, x, x, x), multi_head_attention(attention, x, x, x))

    ours = x.clone().requires_grad_(True)
    theirs = x.clone().requires_grad_(True)
    multi_head_attention(attention, ours, ours, ours).square().sum().backward()
    ours_grads = [p.grad.clone() for p in attention.parameters()]
    attention.zero_grad()
    attention(theirs, theirs, theirs, need_weights=False)[0].square().sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad)
    for mine, module in zip(ours_grads, [p.grad for p in attention.parameters()]):
        torch.testing.assert_close(mine, module)


def test_fused_two_way_attention_equals_segment_anythings_and_build_sam_uses_it():
    from segment_anything.modeling.transformer import Attention

    from ssp_sam.attention import FusedTwoWayAttention, fuse_two_way_attention
    from ssp_sam.backbones.sam import build_sam

    torch.manual_seed(0)
    stock = Attention(32, num_heads=4, downsample_rate=2)
    q, k = torch.randn(2, 7, 32), torch.randn(2, 50, 32)
    image_view = torch.randn(2, 32, 50).permute(0, 2, 1)  # the decoder's image tokens: a permuted view
    expected = stock(q, k, image_view)
    fused = fuse_two_way_attention(stock)
    assert type(fused) is FusedTwoWayAttention and fused is stock
    torch.testing.assert_close(fused(q, k, image_view), expected)
    torch.testing.assert_close(fused(k, q, q), Attention.forward(fused, k, q, q))  # image-to-token direction

    sam = build_sam("custom", custom={"encoder_embed_dim": 32, "encoder_depth": 1, "encoder_num_heads": 2,
                                      "encoder_global_attn_indexes": [0], "image_size": 64, "prompt_embed_dim": 32,
                                      "decoder_mlp_dim": 64, "decoder_num_heads": 2}, parts=("mask_decoder",))
    kinds = {type(m) for m in sam.mask_decoder.modules() if isinstance(m, Attention)}
    assert kinds == {FusedTwoWayAttention}
    assert type(sam.mask_decoder.transformer).__name__ == "FusedTwoWayTransformer"
    assert {type(layer).__name__ for layer in sam.mask_decoder.transformer.layers} == {"FusedTwoWayAttentionBlock"}


def _two_way_transformers():
    """segment_anything's TwoWayTransformer with only its attention fused (the reference), and fully fused."""
    import copy

    from segment_anything.modeling.transformer import Attention, TwoWayTransformer

    from ssp_sam.attention import FusedTwoWayAttention, fuse_two_way_attention

    torch.manual_seed(0)
    reference = TwoWayTransformer(depth=2, embedding_dim=32, num_heads=4, mlp_dim=64)  # layer 0 skips its query PE
    fused = fuse_two_way_attention(copy.deepcopy(reference))
    for module in reference.modules():
        if type(module) is Attention:
            module.__class__ = FusedTwoWayAttention
    return reference, fused


@pytest.mark.parametrize("image_batch", ["one image for every prompt set", "one image per prompt set"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_two_way_transformer_gives_segment_anythings_result_to_the_bit(image_batch, precision):
    """Contiguous image tokens, positioned keys added once, broadcast inputs computed once: the same
    numbers as the stock transformer (attention fused as in the decoder), outputs and input gradients."""
    reference, fused = _two_way_transformers()
    pe = torch.randn(1, 32, 6, 5).expand(3, -1, -1, -1)  # SAM's dense PE, expanded over the sets
    if image_batch == "one image for every prompt set":
        embedding = torch.randn(1, 32, 6, 5).expand(3, -1, -1, -1)
    else:
        embedding = torch.randn(3, 32, 6, 5)
    points = torch.randn(3, 7, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        expected = reference(embedding, pe, points)
        got = fused(embedding, pe, points)
    for mine, theirs in zip(got, expected):
        assert mine.shape == theirs.shape and torch.equal(mine, theirs)
    if precision == "fp32":
        weights = [torch.randn_like(out) for out in expected]
        grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(got, weights)), [points, *fused.parameters()])
        reference_grads = torch.autograd.grad(
            sum((o * w).sum() for o, w in zip(expected, weights)), [points, *reference.parameters()]
        )
        for mine, theirs in zip(grads, reference_grads):  # sums over a broadcast batch may add in another order
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_fused_two_way_transformer_matches_the_unfused_module():
    """Against segment_anything's own classes throughout (softmax spelled out): equal to float rounding."""
    import copy

    from segment_anything.modeling.transformer import TwoWayTransformer

    from ssp_sam.attention import fuse_two_way_attention

    torch.manual_seed(1)
    stock = TwoWayTransformer(depth=2, embedding_dim=32, num_heads=4, mlp_dim=64)
    fused = fuse_two_way_attention(copy.deepcopy(stock))
    embedding, pe, points = torch.randn(2, 32, 4, 6), torch.randn(2, 32, 4, 6), torch.randn(2, 5, 32)
    for mine, theirs in zip(fused(embedding, pe, points), stock(embedding, pe, points)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_an_image_shared_by_prompt_sets_is_projected_once_in_the_first_layer():
    """With one image's embedding broadcast over 3 prompt sets, the first layer's image-side
    projections see one element; the second layer's (keys now differ per set) see all 3."""
    _, fused = _two_way_transformers()
    batches = {}

    def record(name):
        def hook(module, inputs):
            batches[name] = inputs[0].shape[0]

        return hook

    first, second = fused.layers
    first.cross_attn_token_to_image.k_proj.register_forward_pre_hook(record("layer 0 keys"))
    first.cross_attn_token_to_image.v_proj.register_forward_pre_hook(record("layer 0 values"))
    first.cross_attn_image_to_token.q_proj.register_forward_pre_hook(record("layer 0 image queries"))
    second.cross_attn_token_to_image.k_proj.register_forward_pre_hook(record("layer 1 keys"))
    embedding = torch.randn(1, 32, 6, 5).expand(3, -1, -1, -1)
    queries, keys = fused(embedding, torch.randn(1, 32, 6, 5).expand(3, -1, -1, -1), torch.randn(3, 7, 32))
    assert batches == {"layer 0 keys": 1, "layer 0 values": 1, "layer 0 image queries": 1, "layer 1 keys": 3}
    assert queries.shape == (3, 7, 32) and keys.shape == (3, 30, 32)


def test_linear_input_casts_and_lays_out_in_autocast_only():
    from ssp_sam.attention import linear_input

    view = torch.randn(2, 8, 5).permute(0, 2, 1)
    plain = linear_input(view)
    assert plain.is_contiguous() and plain.dtype == torch.float32 and torch.equal(plain, view)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = linear_input(view)
    assert cast.is_contiguous() and cast.dtype == torch.bfloat16 and torch.equal(cast, view.to(torch.bfloat16))


def _image_encoder_attention(dim=32, heads=4, size=(6, 5), rel_pos=True):
    from segment_anything.modeling.image_encoder import Attention

    torch.manual_seed(0)
    stock = Attention(dim, num_heads=heads, qkv_bias=True, use_rel_pos=rel_pos, input_size=size)
    if rel_pos:  # SAM zero-initialises them: random ones, so that a bias placed wrongly would show
        with torch.no_grad():
            stock.rel_pos_h.normal_(0, 0.5)
            stock.rel_pos_w.normal_(0, 0.5)
    return stock


@pytest.mark.parametrize("rel_pos", [True, False])
def test_fused_image_encoder_attention_equals_segment_anythings(rel_pos):
    import copy

    from ssp_sam.attention import FusedImageEncoderAttention, fuse_image_encoder_attention

    stock = _image_encoder_attention(rel_pos=rel_pos)
    fused = fuse_image_encoder_attention(copy.deepcopy(stock))
    assert type(fused) is FusedImageEncoderAttention
    assert fused.state_dict().keys() == stock.state_dict().keys()
    x = torch.randn(2, 6, 5, 32)  # a non-square token grid: rows != columns catches a swapped height / width
    with torch.no_grad():
        expected = stock(x)
        got = fused(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(got, expected)  # the fused computation ran (float sums in another order)


def test_fused_image_encoder_attention_trains_as_the_stock_module():
    """Differentiated (SAM pretraining), it computes exactly what segment_anything does, gradients included."""
    import copy

    from ssp_sam.attention import fuse_image_encoder_attention

    stock = _image_encoder_attention()
    fused = fuse_image_encoder_attention(copy.deepcopy(stock))
    x = torch.randn(2, 6, 5, 32)
    weights = torch.randn(2, 6, 5, 32)
    expected, got = stock(x), fused(x)
    assert torch.equal(got, expected)
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    for (name, p_stock), p_fused in zip(stock.named_parameters(), fused.parameters()):
        assert torch.equal(p_fused.grad, p_stock.grad), name


def test_fused_image_encoder_attention_interpolates_relative_positions_as_sam():
    """An input grid other than the one the positions were made for (SAM resizes them: get_rel_pos)."""
    import copy

    from ssp_sam.attention import fuse_image_encoder_attention

    stock = _image_encoder_attention(size=(4, 4))
    fused = fuse_image_encoder_attention(copy.deepcopy(stock))
    x = torch.randn(1, 7, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), stock(x), atol=1e-5, rtol=1e-5)


def test_fused_image_encoder_attention_in_bf16_is_closer_to_fp32_than_the_stock_module(monkeypatch):
    import copy

    import ssp_sam.attention as attention
    from ssp_sam.attention import fuse_image_encoder_attention

    monkeypatch.setattr(attention, "cpu_has_amx", lambda: True)  # the folded kernel, whatever this CPU is

    stock = _image_encoder_attention(dim=64, heads=2, size=(16, 16))
    fused = fuse_image_encoder_attention(copy.deepcopy(stock))
    x = torch.randn(1, 16, 16, 64)
    with torch.no_grad():
        reference = stock(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            errors = [((m(x).float() - reference).norm() / reference.norm()).item() for m in (stock, fused)]
    assert errors[1] < 0.02 and errors[1] <= errors[0] * 1.05, errors


def test_fused_image_encoder_attention_folds_only_where_the_fused_kernel_pays(monkeypatch):
    """In bf16 on a CPU without AMX PyTorch's flash kernel runs at fp32's speed over a query three times as
    wide (ViT-B at 1024 px: 4.4 s fused against 1.9 s stock): the stock computation runs there, exactly the
    stock module's; in fp32, and in bf16 with AMX, the one fused kernel."""
    import copy

    import ssp_sam.attention as attention
    from ssp_sam.attention import fuse_image_encoder_attention

    calls = []
    sdpa = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    stock = _image_encoder_attention(dim=64, heads=2, size=(8, 8))
    fused = fuse_image_encoder_attention(copy.deepcopy(stock))
    x = torch.randn(1, 8, 8, 64)
    for amx, precision, folded in ((False, "bf16", False), (True, "bf16", True), (False, "fp32", True)):
        monkeypatch.setattr(attention, "cpu_has_amx", lambda: amx)
        calls.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out, reference = fused(x), stock(x)
        assert len(calls) == int(folded), (amx, precision)
        if not folded:
            assert torch.equal(out, reference)


def test_build_sam_fuses_the_image_encoders_attention_and_its_output_is_sams():
    from segment_anything.modeling.image_encoder import Attention

    from ssp_sam.attention import FusedImageEncoderAttention
    from ssp_sam.backbones.sam import build_sam

    custom = {"encoder_embed_dim": 32, "encoder_depth": 2, "encoder_num_heads": 2, "encoder_global_attn_indexes": [1],
              "image_size": 64, "patch_size": 8, "window_size": 3, "prompt_embed_dim": 32, "decoder_mlp_dim": 64,
              "decoder_num_heads": 2}
    torch.manual_seed(0)
    encoder = build_sam("custom", custom=custom, parts=("image_encoder",)).image_encoder.eval()
    attentions = [m for m in encoder.modules() if isinstance(m, Attention)]
    assert len(attentions) == 2 and {type(m) for m in attentions} == {FusedImageEncoderAttention}
    with torch.no_grad():
        for m in attentions:
            m.rel_pos_h.normal_(0, 0.5)
            m.rel_pos_w.normal_(0, 0.5)
        x = torch.randn(1, 3, 64, 64)
        fused = encoder(x)
        for m in attentions:  # the stock module on the same weights
            m.__class__ = Attention
        torch.testing.assert_close(fused, encoder(x), atol=1e-5, rtol=1e-4)


def test_the_release_baseline_runs_segment_anythings_own_decoder_classes(monkeypatch):
    """benchmarks/release_baseline.py times the release's computation: SAM's stock transformer and
    attention, not the fused classes our models are built with; the model keeps its own afterwards."""
    import copy

    from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer

    from conftest import REPO
    from ssp_sam.attention import FUSED_DECODER_CLASSES, fuse_two_way_attention

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from release_baseline import segment_anythings_decoder_classes

    torch.manual_seed(0)
    stock = TwoWayTransformer(depth=2, embedding_dim=32, num_heads=4, mlp_dim=64)
    fused = fuse_two_way_attention(copy.deepcopy(stock))
    inputs = torch.randn(2, 32, 4, 6), torch.randn(2, 32, 4, 6), torch.randn(2, 5, 32)
    with segment_anythings_decoder_classes(fused):
        kinds = {type(module) for module in fused.modules()}
        inside = fused(*inputs)
    assert kinds & set(FUSED_DECODER_CLASSES.values()) == set()
    assert {TwoWayTransformer, TwoWayAttentionBlock, Attention} <= kinds
    for mine, theirs in zip(inside, stock(*inputs)):
        assert torch.equal(mine, theirs)
    assert {type(module) for module in fused.modules()} & set(FUSED_DECODER_CLASSES) == set()


def test_attention_differentiated_in_bf16_on_a_cpu_runs_in_fp32():
    """Where autograd will differentiate bf16 attention on a CPU, the result and gradients are those of
    fp32 attention on the (exactly) upcast inputs, cast back, also inside autocast, which would otherwise
    cast the inputs back down; without gradients it is PyTorch's bf16 kernel, unchanged."""
    from ssp_sam.attention import scaled_dot_product_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 16).bfloat16() for n in (7, 300, 300))
    mask = torch.randn(1, 1, 7, 300).bfloat16()
    bf16_kernel = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    inputs32 = [t.float().requires_grad_() for t in (q, k, v)]
    fp32 = F.scaled_dot_product_attention(*inputs32, attn_mask=mask.float())
    fp32.sum().backward()
    assert not torch.equal(bf16_kernel, fp32.detach().bfloat16())  # the two computations are told apart

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scaled_dot_product_attention(*leaves, attn_mask=mask)
    assert out.dtype == torch.bfloat16 and torch.equal(out, fp32.detach().bfloat16())
    out.float().sum().backward()
    for leaf, reference in zip(leaves, inputs32):
        assert torch.equal(leaf.grad, reference.grad.bfloat16())

    with torch.no_grad():
        assert torch.equal(scaled_dot_product_attention(*leaves, attn_mask=mask), bf16_kernel)
