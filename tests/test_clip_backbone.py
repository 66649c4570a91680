"""Tests of the CLIP backbone: Surgery forward, text features, checkpoint formats, tokenizer, letterbox.

Expected values come from open_clip's own forward, from a per-head reference of the surgery path
written from the raw weight matrices here, or from hand arithmetic.
"""

import copy
import math
import re
import warnings

import numpy as np
import open_clip
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image

from ssp_sam.backbones.clip import CLIPSurgeryBackbone, build_clip_model
from ssp_sam.backbones.clip_tokenizer import CLIPTokenizer, ExpressionTruncatedWarning
from ssp_sam.errors import CheckpointError, ConfigError, ExpressionError, ImageError
from ssp_sam.letterbox import CLIP_MEAN, CLIP_STD, Letterbox, letterbox_image, letterbox_mask

from fixtures_weights import save_openai_torchscript

TINY = {
    "embed_dim": 32,
    "image_size": 32,
    "patch_size": 8,
    "vision_width": 64,
    "vision_layers": 3,
    "vision_head_width": 16,
    "text_width": 64,
    "text_layers": 2,
    "text_heads": 4,
}
OTHER_TINY = {**TINY, "vision_width": 96, "vision_layers": 4, "patch_size": 4}
START_OF_TEXT, END_OF_TEXT = 49406, 49407


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_clip_model("custom", custom=TINY)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------
# Independent reference of the surgery path
# ---------------------------------------------------------------------------------------------------


def layer_norm(x, norm):
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def layer_scale(x, scale_module):
    return x * scale_module.gamma if hasattr(scale_module, "gamma") else x


def reference_value_value_attention(block, x):
    """softmax(v v^T / sqrt(d)) v for every head separately, then out_proj, from the raw matrices."""
    width = x.shape[-1]
    heads = block.attn.num_heads
    head_dim = width // heads
    value_weight = block.attn.in_proj_weight[2 * width :]
    value_bias = block.attn.in_proj_bias[2 * width :]
    per_head = []
    for head in range(heads):
        rows = slice(head * head_dim, (head + 1) * head_dim)
        v = x @ value_weight[rows].T + value_bias[rows]
        logits = torch.einsum("btd,bsd->bts", v, v) / math.sqrt(head_dim)
        per_head.append(torch.einsum("bts,bsd->btd", logits.softmax(dim=-1), v))
    merged = torch.cat(per_head, dim=-1)
    return merged @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def plain_vision_states(model, pixels):
    """Inputs of every vision block, then of ln_post, during open_clip's own encode_image."""
    states = []
    modules = [*model.visual.transformer.resblocks, model.visual.ln_post]
    handles = [module.register_forward_pre_hook(lambda _, args: states.append(args[0])) for module in modules]
    try:
        with torch.no_grad():
            model.encode_image(pixels)
    finally:
        for handle in handles:
            handle.remove()
    return states


def reference_surgery_tokens(model, pixels, surgery_blocks):
    """The original stream is open_clip's plain stream; the surgery stream adds v-v attention of ln_1 of it."""
    states = plain_vision_states(model, pixels)
    blocks = model.visual.transformer.resblocks
    first_dual = len(blocks) - surgery_blocks
    with torch.no_grad():
        surgery = states[first_dual]
        for index in range(first_dual, len(blocks)):
            block = blocks[index]
            attention = reference_value_value_attention(block, layer_norm(states[index], block.ln_1))
            surgery = surgery + layer_scale(attention, block.ls_1)
        tokens = torch.cat([states[-1][:, :1], surgery[:, 1:]], dim=1)
        return layer_norm(tokens, model.visual.ln_post) @ model.visual.proj


# ---------------------------------------------------------------------------------------------------
# Image encoder
# ---------------------------------------------------------------------------------------------------


def test_properties(tiny_model):
    backbone = CLIPSurgeryBackbone(tiny_model, surgery_blocks=2)
    assert (backbone.image_size, backbone.grid_size, backbone.num_patches) == (32, 4, 16)
    assert (backbone.embed_dim, backbone.text_width, backbone.context_length) == (32, 64, 77)


@pytest.mark.parametrize("surgery_blocks", [0, 1, 3])
def test_cls_token_is_open_clip_image_embedding(tiny_model, pixels, surgery_blocks):
    tokens = CLIPSurgeryBackbone(tiny_model, surgery_blocks).encode_image(pixels)
    assert tokens.shape == (2, 17, 32)
    with torch.no_grad():
        expected = tiny_model.encode_image(pixels)
    torch.testing.assert_close(tokens[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_blocks_before_the_dual_ones_are_unchanged(tiny_model, pixels):
    # The first dual block's ln_1 reads the output of the last plain block, in open_clip's forward and in ours.
    first_dual_norm = tiny_model.visual.transformer.resblocks[2].ln_1
    inputs = []
    handle = first_dual_norm.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    try:
        with torch.no_grad():
            tiny_model.encode_image(pixels)
        CLIPSurgeryBackbone(tiny_model, surgery_blocks=1).encode_image(pixels)
    finally:
        handle.remove()
    assert len(inputs) == 2
    torch.testing.assert_close(inputs[1], inputs[0], rtol=0, atol=1e-6)


def test_no_surgery_blocks_gives_open_clip_tokens(tiny_model, pixels):
    final_stream = plain_vision_states(tiny_model, pixels)[-1]
    expected = layer_norm(final_stream, tiny_model.visual.ln_post) @ tiny_model.visual.proj
    tokens = CLIPSurgeryBackbone(tiny_model, surgery_blocks=0).encode_image(pixels)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("surgery_blocks", [1, 2, 3])
def test_surgery_stream_matches_reference(tiny_model, pixels, surgery_blocks):
    tokens = CLIPSurgeryBackbone(tiny_model, surgery_blocks).encode_image(pixels)
    expected = reference_surgery_tokens(tiny_model, pixels, surgery_blocks)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    plain = layer_norm(plain_vision_states(tiny_model, pixels)[-1], tiny_model.visual.ln_post) @ tiny_model.visual.proj
    assert not torch.allclose(tokens[:, 1:], plain[:, 1:], atol=1e-3), "surgery must change the patch tokens"


def test_dual_attention_equals_per_head_softmax_math(tiny_model):
    """Both paths of a dual block run fused (scaled_dot_product_attention); the math they replace:
    softmax(q k^T / sqrt(d)) v and softmax(v v^T / sqrt(d)) v per head, then out_proj."""
    block = tiny_model.visual.transformer.resblocks[-1]
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(3))
    width, heads = 64, block.attn.num_heads
    head_dim = width // heads
    with torch.no_grad():
        standard, value_value = CLIPSurgeryBackbone._dual_attention(block, x)
        q, k, v = (x @ block.attn.in_proj_weight[i * width : (i + 1) * width].T + block.attn.in_proj_bias[i * width : (i + 1) * width] for i in range(3))
        expected = []
        for query, key in ((q, k), (v, v)):
            per_head = []
            for head in range(heads):
                rows = slice(head * head_dim, (head + 1) * head_dim)
                weights = (query[..., rows] @ key[..., rows].transpose(1, 2) / math.sqrt(head_dim)).softmax(dim=-1)
                per_head.append(weights @ v[..., rows])
            expected.append(torch.cat(per_head, dim=-1) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias)
    torch.testing.assert_close(standard, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(value_value, expected[1], rtol=1e-5, atol=1e-5)


def test_surgery_with_layer_scale_matches_reference(pixels):
    torch.manual_seed(2)
    vision_cfg = open_clip.model.CLIPVisionCfg(
        layers=3, width=64, head_width=16, patch_size=8, image_size=32, ls_init_value=0.5
    )
    text_cfg = open_clip.model.CLIPTextCfg(width=64, heads=4, layers=1)
    model = open_clip.model.CLIP(32, vision_cfg, text_cfg, quick_gelu=True).eval()
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            block.ls_1.gamma.uniform_(0.2, 2.0)
            block.ls_2.gamma.uniform_(0.2, 2.0)
    tokens = CLIPSurgeryBackbone(model, surgery_blocks=2).encode_image(pixels)
    torch.testing.assert_close(tokens, reference_surgery_tokens(model, pixels, 2), rtol=1e-5, atol=1e-5)


def test_constant_values_give_exact_value_value_attention(tiny_model, pixels):
    """With zero value weights every token's v is the value bias, so v-v attention returns exactly that bias."""
    model = copy.deepcopy(tiny_model)
    last = model.visual.transformer.resblocks[-1]
    width = 64
    with torch.no_grad():
        last.attn.in_proj_weight[2 * width :] = 0.0
        last.attn.in_proj_bias[2 * width :] = torch.linspace(-1.0, 1.0, width)
        value_bias = last.attn.in_proj_bias[2 * width :]
        block_input = plain_vision_states(model, pixels)[-2]
        surgery = block_input + value_bias @ last.attn.out_proj.weight.T + last.attn.out_proj.bias
        expected = layer_norm(surgery, model.visual.ln_post) @ model.visual.proj
    tokens = CLIPSurgeryBackbone(model, surgery_blocks=1).encode_image(pixels)
    torch.testing.assert_close(tokens[:, 1:], expected[:, 1:], rtol=1e-5, atol=1e-5)


def test_surgery_path_has_no_mlp_and_later_blocks_read_the_original_stream(tiny_model, pixels):
    baseline = CLIPSurgeryBackbone(tiny_model, surgery_blocks=2).encode_image(pixels)
    not_constant = torch.linspace(-1.0, 1.0, 64)  # LayerNorm would cancel a constant shift

    # The MLP of the last dual block only feeds the original stream: patch tokens keep, CLS moves.
    last_mlp_changed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        last_mlp_changed.visual.transformer.resblocks[2].mlp.c_proj.bias += not_constant
    tokens = CLIPSurgeryBackbone(last_mlp_changed, surgery_blocks=2).encode_image(pixels)
    torch.testing.assert_close(tokens[:, 1:], baseline[:, 1:], rtol=0, atol=1e-6)
    assert not torch.allclose(tokens[:, 0], baseline[:, 0], atol=1e-3)

    # The MLP of the first dual block also only touches the original stream; the patch tokens can only
    # see it if the later dual block computes its v-v attention from ln_1(original stream).
    first_mlp_changed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        first_mlp_changed.visual.transformer.resblocks[1].mlp.c_proj.bias += not_constant
    tokens = CLIPSurgeryBackbone(first_mlp_changed, surgery_blocks=2).encode_image(pixels)
    assert not torch.allclose(tokens[:, 1:], baseline[:, 1:], atol=1e-3)
    torch.testing.assert_close(tokens, reference_surgery_tokens(first_mlp_changed, pixels, 2), rtol=1e-5, atol=1e-5)


def test_backbone_stays_frozen_in_eval_mode(tiny_model):
    backbone = CLIPSurgeryBackbone(tiny_model, surgery_blocks=1)
    backbone.train()
    assert not any(module.training for module in backbone.modules())
    assert not any(parameter.requires_grad for parameter in backbone.parameters())


def test_bad_surgery_blocks_and_pixels(tiny_model):
    with pytest.raises(ConfigError, match="surgery_blocks=4"):
        CLIPSurgeryBackbone(tiny_model, surgery_blocks=4)
    with pytest.raises(ImageError, match=r"\(B, 3, 32, 32\)"):
        CLIPSurgeryBackbone(tiny_model, surgery_blocks=1).encode_image(torch.zeros(1, 3, 16, 16))


# ---------------------------------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------------------------------


def test_encode_text_matches_open_clip(tiny_model):
    tokens = CLIPTokenizer()(["the man on the left", "red car"])
    final_norm_outputs = []
    handle = tiny_model.ln_final.register_forward_hook(lambda _, __, output: final_norm_outputs.append(output))
    try:
        with torch.no_grad():
            expected_sentence = tiny_model.encode_text(tokens)
    finally:
        handle.remove()

    backbone = CLIPSurgeryBackbone(tiny_model, surgery_blocks=1)
    words, sentence = backbone.encode_text(tokens)
    assert words.shape == (2, 77, 64) and sentence.shape == (2, 32)
    torch.testing.assert_close(sentence, expected_sentence, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(words, final_norm_outputs[0], rtol=1e-5, atol=1e-6)
    end_positions = [7, 4]  # start + 5 or 2 BPE tokens + "." -> end of text
    assert tokens[0, 7] == END_OF_TEXT and tokens[1, 4] == END_OF_TEXT
    projected = torch.stack([words[i, end_positions[i]] for i in range(2)]) @ tiny_model.text_projection
    torch.testing.assert_close(projected, sentence, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------


def random_weights(custom, seed):
    """A state dict of a freshly built model with another seed, so that loading is observable."""
    torch.manual_seed(seed)
    return {key: value.clone() for key, value in build_clip_model("custom", custom=custom).state_dict().items()}


def assert_all_weights_arrived(model, source):
    loaded = model.state_dict()
    assert set(loaded) == set(source)
    for key, value in source.items():
        assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key


def test_loads_openai_torchscript_archive(tmp_path):
    """A genuine TorchScript archive (traced, fp16, OpenAI's names and scalars) loads without torch.jit."""
    torch.manual_seed(5)
    source = build_clip_model("custom", custom=TINY)
    path = tmp_path / "ViT-tiny.pt"
    save_openai_torchscript(source, TINY["image_size"], path)
    model = build_clip_model("custom", path, custom=TINY)
    assert_all_weights_arrived(model, {key: value.half() for key, value in source.state_dict().items()})
    assert model.visual.conv1.weight.dtype == torch.float32
    assert not model.training and not any(parameter.requires_grad for parameter in model.parameters())


def test_loads_plain_state_dict(tmp_path):
    source = random_weights(TINY, seed=6)
    path = tmp_path / "plain.pt"
    torch.save(source, path)
    assert_all_weights_arrived(build_clip_model("custom", str(path), custom=TINY), source)


def test_loads_open_clip_training_checkpoint(tmp_path):
    source = random_weights(TINY, seed=7)
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in source.items()}}, path)
    assert_all_weights_arrived(build_clip_model("custom", path, custom=TINY), source)


def test_loads_safetensors(tmp_path):
    source = random_weights(TINY, seed=8)
    path = tmp_path / "open_clip_model.safetensors"
    safetensors.torch.save_file(source, path)
    assert_all_weights_arrived(build_clip_model("custom", path, custom=TINY), source)


def test_wrong_architecture_names_file_and_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(random_weights(OTHER_TINY, seed=9), path)
    with pytest.raises(CheckpointError) as error:
        build_clip_model("custom", path, custom=TINY)
    message = str(error.value)
    assert str(path) in message
    assert "visual.class_embedding (file (96,), model (64,))" in message
    assert "unexpected keys: visual.transformer.resblocks.3." in message
    assert "width 96, 4 blocks, patch 4, image size 32" in message


def test_tiny_file_for_vit_b_16_says_what_it_holds(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(random_weights(TINY, seed=10), path)
    with pytest.raises(CheckpointError) as error:
        build_clip_model("ViT-B-16", path)
    message = str(error.value)
    assert str(path) in message and "'ViT-B-16'" in message
    assert "visual.class_embedding (file (64,), model (768,))" in message
    assert "width 64, 3 blocks, patch 8, image size 32" in message


def shape_only_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """An open_clip model's keys and shapes at almost no cost: every tensor a stride-0 view of one zero."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in open_clip.model.CLIP(**open_clip.get_model_config(arch)).state_dict().items()}
    return {key: torch.zeros(()).expand(shape) for key, shape in shapes.items()}


def test_vit_l_336_file_for_vit_b_16_names_both(tmp_path):
    path = tmp_path / "ViT-L-14-336px.pt"
    torch.save(shape_only_state_dict("ViT-L-14-336"), path)
    with pytest.raises(CheckpointError) as error:
        build_clip_model("ViT-B-16", path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        f"{path}: a state dict of CLIP ViT-L-14-336 (visual width 1024, 24 blocks, patch 14, image size 336), "
        "not of CLIP 'ViT-B-16': mis-shaped keys: visual.class_embedding (file (1024,), model (768,))"
    )


def test_file_formats_are_named(tmp_path):
    """An open_clip training checkpoint, a TorchScript archive, a Hugging Face CLIP, a SAM: each said as what it is."""
    other = random_weights(OTHER_TINY, seed=12)
    training = tmp_path / "epoch_32.pt"
    torch.save({"epoch": 32, "name": "run", "state_dict": {f"module.{k}": v for k, v in other.items()}}, training)
    archive = tmp_path / "ViT-other.pt"
    torch.manual_seed(12)
    save_openai_torchscript(build_clip_model("custom", custom=OTHER_TINY), 32, archive)
    hugging_face = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(2, 3, 4, 4),
                                 "text_model.embeddings.token_embedding.weight": torch.zeros(5, 2)}, hugging_face)
    sam = tmp_path / "sam_vit_b.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}, sam)
    expected = {
        training: "an open_clip training checkpoint of a CLIP ViT of no released size (visual width 96, 4 blocks, patch 4",
        archive: "a TorchScript archive (OpenAI's format) of a CLIP ViT of no released size (visual width 96",
        hugging_face: "a safetensors file of a Hugging Face transformers CLIP (vision_model.* / text_model.* keys)",
        sam: "a state dict of a SAM model",
    }
    for path, held in expected.items():
        with pytest.raises(CheckpointError) as error:
            build_clip_model("custom", path, custom=TINY)
        assert str(error.value).startswith(f"{path}: {held}"), str(error.value)
        assert "not of CLIP 'custom'" in str(error.value)


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_weights_with_nan_or_inf_are_refused(tmp_path, value):
    source = random_weights(TINY, seed=13)
    source["visual.proj"][2, 3] = value
    path = tmp_path / "diverged.safetensors"
    safetensors.torch.save_file(source, path)
    with pytest.raises(CheckpointError, match=r"diverged\.safetensors: weight 'visual\.proj' holds 1 NaN/Inf values of 2048"):
        build_clip_model("custom", path, custom=TINY)


def test_vit_b_16_sizes():
    backbone = CLIPSurgeryBackbone(build_clip_model("ViT-B-16"))
    assert (backbone.image_size, backbone.grid_size, backbone.num_patches) == (224, 14, 196)
    assert (backbone.embed_dim, backbone.text_width, backbone.surgery_blocks) == (512, 512, 6)
    assert isinstance(backbone.clip.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def test_missing_key_is_named(tmp_path):
    source = random_weights(TINY, seed=11)
    del source["visual.proj"]
    path = tmp_path / "partial.pt"
    torch.save(source, path)
    with pytest.raises(CheckpointError, match=r"missing keys: visual\.proj \(64, 32\)"):
        build_clip_model("custom", path, custom=TINY)


def test_missing_and_garbage_files(tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(CheckpointError, match="nowhere.pt"):
        build_clip_model("custom", missing, custom=TINY)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        build_clip_model("custom", garbage, custom=TINY)
    not_a_state_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(CheckpointError, match="list.pt"):
        build_clip_model("custom", not_a_state_dict, custom=TINY)


def test_bad_configs():
    with pytest.raises(ConfigError, match="ViT-H-99"):
        build_clip_model("ViT-H-99")
    with pytest.raises(ConfigError, match="text_heads"):
        build_clip_model("custom", custom={key: value for key, value in TINY.items() if key != "text_heads"})
    with pytest.raises(ConfigError, match="vision_head_width"):
        build_clip_model("custom", custom={**TINY, "vision_head_width": 24})


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


def test_period_is_appended(tokenizer):
    tokens = tokenizer(["the red car", "x"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    reference = open_clip.tokenizer.SimpleTokenizer()
    assert torch.equal(tokens, reference(["the red car.", "x."]))
    assert tokens[1, :4].tolist() == [START_OF_TEXT, reference.encode("x")[0], reference.encode(".")[0], END_OF_TEXT]
    assert not tokens[1, 4:].any()
    # The release appends unconditionally, so a trailing period is doubled.
    assert torch.equal(tokenizer(["x."]), reference(["x.."]))
    assert torch.equal(CLIPTokenizer(append_period=False)(["x"]), reference(["x"]))


@pytest.mark.parametrize("bad", ["", "   \t", None, 3])
def test_bad_expressions_are_named(tokenizer, bad):
    with pytest.raises(ExpressionError, match=f"expression 1 .*{re.escape(repr(bad))}"):
        tokenizer(["fine", bad])


def test_long_expression_is_truncated_with_end_token(tokenizer):
    long_expression = " ".join(["dog"] * 100)
    with pytest.warns(ExpressionTruncatedWarning, match="dog dog"):
        tokens = tokenizer(["cat", long_expression])
    dog = open_clip.tokenizer.SimpleTokenizer().encode("dog")[0]
    assert tokens[1].tolist() == [START_OF_TEXT] + [dog] * 75 + [END_OF_TEXT]
    assert tokens[0, 3] == END_OF_TEXT


def test_expression_that_just_fits_is_not_truncated(tokenizer):
    fitting = " ".join(["dog"] * 74)  # start + 74 + "." + end = 77
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExpressionTruncatedWarning)
        tokens = tokenizer([fitting])
    assert tokens[0, -1] == END_OF_TEXT and tokens[0, -2] == open_clip.tokenizer.SimpleTokenizer().encode(".")[0]


# ---------------------------------------------------------------------------------------------------
# Letterbox
# ---------------------------------------------------------------------------------------------------


def normalised(colour):
    return (torch.tensor(colour, dtype=torch.float32) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)


def test_tall_image_is_centred_with_zero_padding():
    colour = (200, 100, 30)
    image = np.empty((100, 50, 3), dtype=np.uint8)
    image[:] = colour
    pixels, box = letterbox_image(image, 32)
    # scale 32 / 100: 100 x 50 -> 32 x 16, placed 8 pixels from the left.
    assert box == Letterbox(offset_x=8, offset_y=0, width=16, height=32, size=32, original_width=50, original_height=100)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert torch.equal(pixels[:, :, :8], torch.zeros(3, 32, 8))
    assert torch.equal(pixels[:, :, 24:], torch.zeros(3, 32, 8))
    content = pixels[:, :, 8:24]
    torch.testing.assert_close(content, normalised(colour).view(3, 1, 1).expand_as(content), rtol=0, atol=1e-4)


def test_image_of_the_right_size_is_only_normalised():
    image = np.random.default_rng(0).integers(0, 256, size=(30, 32, 3), dtype=np.uint8)
    pixels, box = letterbox_image(image, 32)
    assert (box.width, box.height, box.offset_x, box.offset_y) == (32, 30, 0, 1)
    expected = normalised(image.reshape(-1, 3).tolist()).reshape(30, 32, 3).permute(2, 0, 1)
    torch.testing.assert_close(pixels[:, 1:31], expected, rtol=0, atol=1e-5)
    assert not pixels[:, 0].any() and not pixels[:, 31].any()


def test_wide_image_rounds_its_height():
    _, box = letterbox_image(np.zeros((30, 100, 3), dtype=np.uint8), 32)
    # 30 * 0.32 = 9.6 -> 10 rows, floor((32 - 10) / 2) = 11.
    assert (box.width, box.height, box.offset_x, box.offset_y) == (32, 10, 0, 11)


def test_random_and_explicit_placement():
    image = np.full((100, 50, 3), 128, dtype=np.uint8)
    first = letterbox_image(image, 32, "random", torch.Generator().manual_seed(3))[1]
    again = letterbox_image(image, 32, "random", torch.Generator().manual_seed(3))[1]
    assert first == again and 0 <= first.offset_x <= 16 and first.offset_y == 0
    offsets = {letterbox_image(image, 32, "random")[1].offset_x for _ in range(50)}
    assert len(offsets) > 1
    pixels, box = letterbox_image(image, 32, (16, 0))
    assert (box.offset_x, box.offset_y) == (16, 0)
    assert not pixels[:, :, :16].any() and pixels[:, :, 16:].all()
    with pytest.raises(ConfigError, match=r"\(17, 0\)"):
        letterbox_image(image, 32, (17, 0))
    with pytest.raises(ConfigError, match="'middle'"):
        letterbox_image(image, 32, "middle")


def test_letterbox_resizes_as_the_release_does():
    """The release: torchvision 0.16's F.resize on the PIL image (PIL's bilinear filter on uint8), ToTensor
    (/ 255), CLIP's mean / std, then zero padding; here written out with PIL by hand."""
    image = np.random.default_rng(5).integers(0, 256, size=(427, 640, 3), dtype=np.uint8)
    pixels, box = letterbox_image(image, 224)
    assert (box.width, box.height, box.offset_x, box.offset_y) == (224, 149, 0, 37)  # round(427 * 0.35) = 149
    resized = np.asarray(Image.fromarray(image).resize((224, 149), Image.BILINEAR), dtype=np.float32) / 255
    expected = (torch.from_numpy(resized).permute(2, 0, 1) - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(pixels[:, 37:186], expected, rtol=0, atol=1e-6)
    assert not pixels[:, :37].any() and not pixels[:, 186:].any()


def test_boxes_scale_by_each_axis_after_rounding():
    """As the release's RandomResize: ratio_w = new_w / w and ratio_h = new_h / h, the resized size rounded
    (427 x 640 at 224: 149 / 427 = 0.34895 vertically, 224 / 640 = 0.35 horizontally)."""
    _, box = letterbox_image(np.zeros((427, 640, 3), dtype=np.uint8), 224, "center")
    whole = box.box_from_image(torch.tensor([0.0, 0.0, 640.0, 427.0]))
    torch.testing.assert_close(whole, torch.tensor([112.0, 37 + 149 / 2, 224.0, 149.0]) / 224, rtol=0, atol=1e-6)
    torch.testing.assert_close(box.box_to_image(whole), torch.tensor([0.0, 0.0, 640.0, 427.0]), rtol=0, atol=1e-4)


def test_box_conversions():
    box = Letterbox(offset_x=8, offset_y=0, width=16, height=32, size=32, original_width=50, original_height=100)
    # Square box (cx 16, cy 16, w 8, h 16) px = x 12..20, y 8..24 -> original ((x - 8) / 0.32, y / 0.32).
    square_box = torch.tensor([0.5, 0.5, 0.25, 0.5])
    torch.testing.assert_close(box.box_to_image(square_box), torch.tensor([12.5, 25.0, 37.5, 75.0]))
    torch.testing.assert_close(box.box_from_image(torch.tensor([12.5, 25.0, 37.5, 75.0])), square_box)
    corners = torch.rand(5, 3, 2, 2).sort(dim=2).values * torch.tensor([50.0, 100.0])  # boxes inside the 50 x 100 image
    inside = corners.flatten(-2)  # x1, y1, x2, y2
    torch.testing.assert_close(box.box_to_image(box.box_from_image(inside)), inside, rtol=0, atol=1e-4)


def test_predicted_boxes_are_clipped_to_the_image():
    """As the release's PostProcess: a box reaching into the letterbox padding ends at the image's edge
    (100 x 200 at 224: content 224 x 112 at offset_y 56; (0.5, 0.5, 0.9, 0.9) spans y -40 .. 140)."""
    _, box = letterbox_image(np.zeros((100, 200, 3), dtype=np.uint8), 224)
    torch.testing.assert_close(box.box_to_image(torch.tensor([0.5, 0.5, 0.9, 0.9])), torch.tensor([10.0, 0.0, 190.0, 100.0]), rtol=0, atol=1e-3)


def test_letterbox_mask():
    mask = np.zeros((100, 50), dtype=bool)
    mask[:, :25] = True
    _, box = letterbox_image(np.zeros((100, 50, 3), dtype=np.uint8), 32)
    square = letterbox_mask(mask, box)
    expected = torch.zeros(32, 32)
    expected[:, 8:16] = 1.0  # the left half of the 16 content columns that start at column 8
    assert square.dtype == torch.float32 and torch.equal(square, expected)
    with pytest.raises(ImageError, match=r"\(60, 50\)"):
        letterbox_mask(np.zeros((60, 50), dtype=bool), box)


def test_bad_images():
    with pytest.raises(ImageError, match="float32"):
        letterbox_image(np.zeros((10, 10, 3), dtype=np.float32), 32)
    with pytest.raises(ImageError, match=r"\(10, 10\)"):
        letterbox_image(np.zeros((10, 10), dtype=np.uint8), 32)
