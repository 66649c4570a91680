"""SAM backbone: builder and checkpoint validation, image transform, batched mask head, mask frames.

References are segment_anything's own SamPredictor / MaskDecoder / Sam.postprocess_masks, hashlib,
and values worked out by hand in the comments.
"""

import copy
import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.modeling.image_encoder import PatchEmbed

from ssp_sam.backbones.sam import SAM_VARIANTS, ContiguousPatchEmbed, build_sam
from ssp_sam.backbones.sam_decoder import SAMMaskHead, hypernetwork_masks
from ssp_sam.backbones.sam_frames import (
    SAMImageTransform,
    mask_to_area_frame,
    mask_to_padded_frame,
    padded_frame_to_original,
    upscale_to_padded_frame,
)
from ssp_sam.errors import CheckpointError, ConfigError, ImageError

# 256 px input, 16 px patches -> 16x16 embedding -> 64x64 low-resolution logits.
TINY = {
    "encoder_embed_dim": 64,
    "encoder_depth": 2,
    "encoder_num_heads": 4,
    "encoder_global_attn_indexes": [1],
    "image_size": 256,
    "window_size": 6,
    "prompt_embed_dim": 64,
    "decoder_mlp_dim": 128,
}
TINY_CHANNELS, TINY_SIDE = 64, 16


@pytest.fixture(scope="module")
def tiny_state_dict():
    """Random weights in Meta's flat layout; every tensor perturbed so none is a trivial 0/1 init."""
    torch.manual_seed(0)
    state_dict = build_sam("custom", custom=TINY).state_dict()
    return {key: tensor + 0.05 * torch.randn_like(tensor) for key, tensor in state_dict.items()}


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_state_dict, tmp_path_factory):
    path = tmp_path_factory.mktemp("sam") / "tiny_sam.pth"
    torch.save(tiny_state_dict, path)
    return path


@pytest.fixture(scope="module")
def tiny_sam(tiny_checkpoint):
    return build_sam("custom", tiny_checkpoint, custom=TINY)


def test_image_encoder_residual_stream_is_contiguous_and_computes_the_same(tiny_sam):
    """segment_anything's PatchEmbed returns a permuted view, and every block's adds and norms keep that
    strided layout (slow on a CPU); ours lays it out once. Same embedding as with the stock class."""
    encoder = tiny_sam.image_encoder
    assert type(encoder.patch_embed) is ContiguousPatchEmbed
    block_outputs = []
    hook = encoder.blocks[-1].register_forward_hook(lambda module, args, out: block_outputs.append(out.is_contiguous()))
    images = torch.randn(2, 3, 256, 256)
    try:
        with torch.no_grad():
            ours = encoder(images)
            encoder.patch_embed.__class__ = PatchEmbed
            stock = encoder(images)
    finally:
        encoder.patch_embed.__class__ = ContiguousPatchEmbed
        hook.remove()
    assert block_outputs == [True, False]
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def head(tiny_sam):
    return SAMMaskHead(tiny_sam.prompt_encoder, tiny_sam.mask_decoder)


def test_hypernetwork_masks_equal_the_stock_upscaling_and_product(head):
    """hypernetwork_masks runs output_upscaling token by token (each token -> its 4x4 pixels); values and
    gradients must be those of segment_anything's module followed by MaskDecoder.predict_masks' product."""
    decoder = head.mask_decoder
    h, w = 3, 5  # not square: rows and columns must not trade places
    token_out = torch.randn(2, 1 + decoder.num_mask_tokens + 2, TINY_CHANNELS, requires_grad=True)
    image_out = torch.randn(2, h, w, TINY_CHANNELS, requires_grad=True)
    inputs = (token_out, image_out, *decoder.output_upscaling.parameters())
    for outputs in (range(1), range(1, 4)):
        ours = hypernetwork_masks(decoder, token_out, image_out, outputs)
        upscaled = decoder.output_upscaling(image_out.permute(0, 3, 1, 2))
        hyper_in = torch.stack([decoder.output_hypernetworks_mlps[i](token_out[:, 1 + i]) for i in outputs], dim=1)
        stock = (hyper_in @ upscaled.flatten(2)).view(2, len(outputs), 4 * h, 4 * w)
        assert ours.shape == (2, len(outputs), 4 * h, 4 * w)
        torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
        upstream = torch.randn_like(stock)
        for ours_grad, stock_grad in zip(
            torch.autograd.grad(ours, inputs, upstream), torch.autograd.grad(stock, inputs, upstream)
        ):
            torch.testing.assert_close(ours_grad, stock_grad, rtol=1e-4, atol=1e-5)


def test_hypernetwork_masks_refuse_another_upscaling(head):
    decoder = copy.deepcopy(head.mask_decoder)
    decoder.output_upscaling[1] = torch.nn.BatchNorm2d(TINY_CHANNELS // 4)
    with pytest.raises(ConfigError, match="output_upscaling"):
        hypernetwork_masks(decoder, torch.randn(1, 6, TINY_CHANNELS), torch.randn(1, 2, 2, TINY_CHANNELS), range(1))


def assert_state_dict_equal(module, expected, prefix):
    state_dict = module.state_dict()
    expected_part = {key[len(prefix) :]: value for key, value in expected.items() if key.startswith(prefix)}
    assert state_dict.keys() == expected_part.keys()
    for key, tensor in state_dict.items():
        assert torch.equal(tensor, expected_part[key]), prefix + key


# ---------------------------------------------------------------- building and loading


def test_variants_are_the_official_encoders():
    assert SAM_VARIANTS["vit_b"]["encoder_embed_dim"] == 768
    assert SAM_VARIANTS["vit_l"]["encoder_global_attn_indexes"] == (5, 11, 17, 23)
    assert SAM_VARIANTS["vit_h"]["encoder_depth"] == 32
    assert SAM_VARIANTS["vit_h"]["encoder_num_heads"] == 16


def test_tiny_checkpoint_arrives_whole(tiny_sam, tiny_state_dict):
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        assert_state_dict_equal(getattr(tiny_sam, part), tiny_state_dict, part + ".")
    assert not tiny_sam.training


def test_model_container_and_parts(tiny_state_dict, tmp_path):
    path = tmp_path / "container.pth"
    torch.save({"model": tiny_state_dict, "epoch": 3}, path)
    sam = build_sam("custom", path, custom=TINY, parts=("prompt_encoder", "mask_decoder"))
    assert sam.image_encoder is None
    assert_state_dict_equal(sam.mask_decoder, tiny_state_dict, "mask_decoder.")
    assert_state_dict_equal(sam.prompt_encoder, tiny_state_dict, "prompt_encoder.")


def test_file_with_only_some_parts(tiny_state_dict, tmp_path):
    path = tmp_path / "decoder_only.pth"
    torch.save({k: v for k, v in tiny_state_dict.items() if k.startswith("mask_decoder.")}, path)
    sam = build_sam("custom", path, custom=TINY, parts=("mask_decoder",))
    assert sam.image_encoder is None and sam.prompt_encoder is None
    assert_state_dict_equal(sam.mask_decoder, tiny_state_dict, "mask_decoder.")
    with pytest.raises(CheckpointError, match=r"decoder_only\.pth.*missing keys: image_encoder\."):
        build_sam("custom", path, custom=TINY, parts=("image_encoder",))


def test_official_vit_b_layout(tmp_path):
    torch.manual_seed(1)
    reference = sam_model_registry["vit_b"]()
    expected = reference.state_dict()
    path = tmp_path / "sam_vit_b.pth"
    torch.save(expected, path)
    del reference
    sam = build_sam("vit_b", path)
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        assert_state_dict_equal(getattr(sam, part), expected, part + ".")
    assert sam.image_encoder.img_size == 1024
    assert sam.prompt_encoder.image_embedding_size == (64, 64)


def test_vit_l_weights_for_vit_b_are_named(tmp_path):
    # Shapes of the real ViT-L without allocating it; a few blocks are enough to check the logic.
    with torch.device("meta"):
        vit_l = sam_model_registry["vit_l"]().state_dict()
    kept = ("image_encoder.patch_embed.", "image_encoder.blocks.0.", "image_encoder.blocks.20.")
    path = tmp_path / "sam_vit_l.pth"
    torch.save({k: torch.zeros(v.shape) for k, v in vit_l.items() if k.startswith(kept)}, path)
    with pytest.raises(CheckpointError) as error:
        build_sam("vit_b", path, parts=("image_encoder",))
    message = str(error.value)
    assert "sam_vit_l.pth" in message
    assert "this is an incomplete SAM vit_l (image encoder width 1024, 2 of 24 blocks), not SAM vit_b" in message
    assert "patch_embed.proj.weight (file (1024, 3, 16, 16), model (768, 3, 16, 16))" in message
    assert "unexpected keys: image_encoder.blocks.20." in message
    # Also when only the decoder is requested: the file's encoder keys still have to fit.
    with pytest.raises(CheckpointError, match="this is an incomplete SAM vit_l .*, not SAM vit_b"):
        build_sam("vit_b", path, parts=("mask_decoder",))


def shape_only_state_dict(variant: str) -> dict[str, torch.Tensor]:
    """A released SAM's keys and shapes at almost no cost: every tensor a stride-0 view of one zero."""
    with torch.device("meta"):
        shapes = {key: value.shape for key, value in sam_model_registry[variant]().state_dict().items()}
    return {key: torch.zeros(()).expand(shape) for key, shape in shapes.items()}


def test_vit_b_file_where_vit_h_is_expected(tmp_path):
    """The decoders of the released SAMs have the same shapes; the file's encoder still tells it apart."""
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(shape_only_state_dict("vit_b"), path)
    with pytest.raises(CheckpointError) as error:
        build_sam("vit_h", path, parts=("prompt_encoder", "mask_decoder"))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: this is SAM vit_b (image encoder width 768, 12 blocks), not SAM vit_h; ")
    assert "image_encoder.patch_embed.proj.weight (file (768, 3, 16, 16), model (1280, 3, 16, 16))" in message


def test_clip_file_where_sam_is_expected(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    torch.save({"visual.conv1.weight": torch.zeros(4, 3, 2, 2), "token_embedding.weight": torch.zeros(4, 2)}, path)
    with pytest.raises(CheckpointError, match=r"ViT-B-16\.pt: this is a CLIP model \(OpenAI / open_clip key names\), not SAM vit_h"):
        build_sam("vit_h", path, parts=("mask_decoder",))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_loaded_weights_with_nan_or_inf_are_refused(tiny_state_dict, tmp_path, value):
    broken = {key: tensor.clone() for key, tensor in tiny_state_dict.items()}
    broken["mask_decoder.iou_token.weight"][0, 1] = value
    path = tmp_path / "diverged.pth"
    torch.save(broken, path)
    with pytest.raises(CheckpointError, match=r"diverged\.pth: weight 'mask_decoder\.iou_token\.weight' holds 1 NaN/Inf"):
        build_sam("custom", path, custom=TINY, parts=("mask_decoder",))
    # Only what is loaded is read (and checked): the image encoder alone still loads.
    build_sam("custom", path, custom=TINY, parts=("image_encoder",))


def test_mismatched_custom_config(tiny_checkpoint):
    wider = {**TINY, "decoder_mlp_dim": 256}
    with pytest.raises(CheckpointError) as error:
        build_sam("custom", tiny_checkpoint, custom=wider)
    assert "tiny_sam.pth" in str(error.value)
    assert "layers.0.mlp.lin1.weight (file (128, 64), model (256, 64))" in str(error.value)


def test_missing_and_unexpected_keys(tiny_state_dict, tmp_path):
    broken = dict(tiny_state_dict)
    del broken["mask_decoder.iou_token.weight"]
    broken["mask_decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(CheckpointError) as error:
        build_sam("custom", path, custom=TINY)
    assert "broken.pth" in str(error.value)
    assert "unexpected keys: mask_decoder.extra.weight" in str(error.value)
    assert "missing keys: mask_decoder.iou_token.weight" in str(error.value)


@pytest.mark.parametrize("content", [None, b"", b"\x00garbage" * 64], ids=["missing", "empty", "garbage"])
def test_unreadable_files(tmp_path, content):
    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="weights.pth"):
        build_sam("custom", path, custom=TINY)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match=r"list\.pth.*expected a state dict"):
        build_sam("custom", path, custom=TINY)


def test_config_errors():
    with pytest.raises(ConfigError, match="vit_x"):
        build_sam("vit_x")
    with pytest.raises(ConfigError, match="encoder_depth"):
        build_sam("custom", custom={k: v for k, v in TINY.items() if k != "encoder_depth"})
    with pytest.raises(ConfigError, match="depht"):
        build_sam("custom", custom={**TINY, "depht": 3})
    with pytest.raises(ConfigError, match="decoder"):
        build_sam("custom", custom=TINY, parts=("decoder",))
    with pytest.raises(ConfigError, match="only for variant 'custom'"):
        build_sam("vit_b", custom=TINY)


# ---------------------------------------------------------------- against SamPredictor


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(1).integers(0, 256, (90, 130, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def predictor(tiny_sam, image):
    predictor = SamPredictor(tiny_sam)
    predictor.set_image(image)
    return predictor


def test_transform_and_encoder_match_predictor(tiny_sam, predictor, image):
    transform = SAMImageTransform(256)
    pixels, input_size = transform(image)
    assert pixels.shape == (3, 256, 256) and pixels.dtype == torch.float32
    # 130 -> 256 on the long side: 90 * 256 / 130 = 177.2 -> 177.
    assert input_size == (177, 256) == transform.input_size_for((90, 130)) == predictor.input_size
    assert torch.all(pixels[:, 177:] == 0)
    with torch.no_grad():
        features = tiny_sam.image_encoder(pixels[None])
    torch.testing.assert_close(features, predictor.features, rtol=0, atol=1e-6)


def test_mask_head_matches_predictor(tiny_sam, head, predictor, image):
    points, labels = np.array([[30.0, 40.0], [100.0, 20.0], [64.0, 70.0]]), np.array([1, 0, 1])
    expected, _, _ = predictor.predict(
        point_coords=points, point_labels=labels, multimask_output=False, return_logits=True
    )
    coords = torch.as_tensor(predictor.transform.apply_coords(points, image.shape[:2]), dtype=torch.float)
    with torch.no_grad():
        point_prompts = (coords[None], torch.as_tensor(labels)[None])
        sparse, _ = tiny_sam.prompt_encoder(points=point_prompts, boxes=None, masks=None)
        low_res = head(predictor.features, sparse)
    assert low_res.shape == (1, 1, 64, 64)
    masks = tiny_sam.postprocess_masks(low_res, predictor.input_size, image.shape[:2])
    np.testing.assert_allclose(masks[0].numpy(), expected, rtol=0, atol=1e-5)


def decoder_call(sam, embedding, sparse):
    """segment_anything's own decoder call for one image (SamPredictor.predict_torch)."""
    dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    dense = dense.expand(sparse.shape[0], -1, TINY_SIDE, TINY_SIDE)
    masks, _ = sam.mask_decoder(
        image_embeddings=embedding,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return masks


def test_batched_head_equals_per_image_decoder(tiny_sam, head):
    generator = torch.Generator().manual_seed(2)
    embeddings = torch.randn(3, TINY_CHANNELS, TINY_SIDE, TINY_SIDE, generator=generator)
    prompts = torch.randn(3, 5, TINY_CHANNELS, generator=generator)
    with torch.no_grad():
        batched = head(embeddings, prompts)
        per_image = torch.cat(
            [decoder_call(tiny_sam, embeddings[i : i + 1], prompts[i : i + 1]) for i in range(3)]
        )
    assert batched.shape == (3, 1, 64, 64)
    torch.testing.assert_close(batched, per_image, rtol=0, atol=1e-5)


def test_shared_embedding_equals_separate_calls(tiny_sam, head):
    generator = torch.Generator().manual_seed(3)
    embedding = torch.randn(1, TINY_CHANNELS, TINY_SIDE, TINY_SIDE, generator=generator)
    prompts = torch.randn(4, 7, TINY_CHANNELS, generator=generator)
    with torch.no_grad():
        shared = head(embedding, prompts)
        separate = torch.cat([head(embedding, prompts[k : k + 1]) for k in range(4)])
        # SAM's native one-image / K-prompt-sets call.
        native = decoder_call(tiny_sam, embedding, prompts)
    torch.testing.assert_close(shared, separate, rtol=0, atol=1e-5)
    torch.testing.assert_close(shared, native, rtol=0, atol=1e-5)


def test_image_of_equals_each_set_with_its_own_copy_of_its_image(tiny_sam, head):
    """Two images, five prompt sets: decoding each image once for its sets gives every set the masks
    it gets from its image's embedding alone, and from SAM's own decoder called image by image."""
    generator = torch.Generator().manual_seed(4)
    embeddings = torch.randn(2, TINY_CHANNELS, TINY_SIDE, TINY_SIDE, generator=generator)
    prompts = torch.randn(5, 6, TINY_CHANNELS, generator=generator)
    image_of = torch.tensor([1, 0, 1, 1, 0])
    with torch.no_grad():
        grouped = head(embeddings, prompts, image_of)
        copied = head(embeddings[image_of], prompts)
        native = torch.cat([decoder_call(tiny_sam, embeddings[i : i + 1], prompts[k : k + 1]) for k, i in enumerate(image_of.tolist())])
    assert grouped.shape == (5, 1, 64, 64)
    torch.testing.assert_close(grouped, copied, rtol=0, atol=1e-6)
    torch.testing.assert_close(grouped, native, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"image_of: expected a \(5,\) long tensor"):
        head(embeddings, prompts, image_of[:4])


def test_head_trains_decoder_only(tiny_checkpoint):
    sam = build_sam("custom", tiny_checkpoint, custom=TINY, parts=("prompt_encoder", "mask_decoder"))
    head = SAMMaskHead(sam.prompt_encoder, sam.mask_decoder)
    prompts = torch.randn(2, 3, TINY_CHANNELS, requires_grad=True)
    head(torch.randn(2, TINY_CHANNELS, TINY_SIDE, TINY_SIDE), prompts).sum().backward()
    assert all(not p.requires_grad for p in head.prompt_encoder.parameters())
    assert head.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight.grad is not None
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0


def test_head_rejects_bad_shapes(head):
    with pytest.raises(ValueError, match="2 image embeddings for 3 prompt sets: give one embedding per set, one for all, or image_of"):
        head(torch.zeros(2, TINY_CHANNELS, TINY_SIDE, TINY_SIDE), torch.zeros(3, 4, TINY_CHANNELS))
    with pytest.raises(ValueError, match="image_embeddings"):
        head(torch.zeros(1, TINY_CHANNELS, 8, 8), torch.zeros(1, 4, TINY_CHANNELS))


def test_transform_rejects_non_uint8():
    with pytest.raises(ImageError, match="uint8"):
        SAMImageTransform(256)(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ImageError, match="uint8"):
        SAMImageTransform(256)(np.zeros((10, 10), dtype=np.uint8))


# ---------------------------------------------------------------- mask frames


def test_constant_logits_stay_constant():
    low_res = torch.full((2, 1, 256, 256), -3.5)
    frame = upscale_to_padded_frame(low_res, 1024)
    assert frame.shape == (2, 1, 512, 512)
    original = padded_frame_to_original(frame, (1024, 614), (100, 60), 1024)
    assert original.shape == (2, 1, 100, 60)
    torch.testing.assert_close(original, torch.full_like(original, -3.5))


@pytest.mark.parametrize("low_res, image_size", [(256, 1024), (16, 64), (50, 200), (7, 30)])
def test_upscale_to_padded_frame_is_the_releases_two_bilinear_resizes(low_res, image_size):
    logits = (4 * torch.randn(2, 3, low_res, low_res)).requires_grad_()
    full = F.interpolate(logits, (image_size, image_size), mode="bilinear", align_corners=False)
    expected = F.interpolate(full, (image_size // 2, image_size // 2), mode="bilinear", align_corners=False)
    frame = upscale_to_padded_frame(logits, image_size)
    torch.testing.assert_close(frame, expected, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(frame)
    (ours,), (stock,) = torch.autograd.grad(frame, logits, upstream), torch.autograd.grad(expected, logits, upstream)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-4)


def test_resampling_matrices_first_made_in_inference_mode_still_train():
    """The matrices are remembered: made first under torch.inference_mode (a prediction), they must still
    serve a later training step (a notebook that predicts, then fine-tunes)."""
    sizes = (13, 29)  # sizes no other test uses, so the first call here is the one that makes them
    with torch.inference_mode():
        upscale_to_padded_frame(torch.zeros(1, 1, sizes[0], sizes[0]), 4 * sizes[0])
        padded_frame_to_original(torch.zeros(1, 1, sizes[1], sizes[1]), (2 * sizes[1], 2 * sizes[1]), (31, 33), 2 * sizes[1], "nearest")
    logits = torch.randn(1, 1, sizes[0], sizes[0], requires_grad=True)
    upscale_to_padded_frame(logits, 4 * sizes[0]).sum().backward()
    frame = torch.randn(1, 1, sizes[1], sizes[1], requires_grad=True)
    padded_frame_to_original(frame, (2 * sizes[1], 2 * sizes[1]), (31, 33), 2 * sizes[1], "nearest").sum().backward()
    assert logits.grad is not None and frame.grad is not None


def test_upscale_to_padded_frame_weights_are_exact_in_bf16():
    # S = 4 s: every weight is a multiple of 1/16, so the response to one logit (a product of two
    # weights, a multiple of 1/256 in [0, 1]) has at most 8 significant bits and bf16 holds it exactly.
    impulse = torch.zeros(1, 1, 16, 16)
    impulse[0, 0, 5, 9] = 1.0
    response = upscale_to_padded_frame(impulse, 64)
    assert response.sum() > 0 and torch.equal(response * 256, (response * 256).round())
    torch.testing.assert_close(upscale_to_padded_frame(impulse.bfloat16(), 64).float(), response, rtol=0, atol=0)


def test_upscale_left_right_step():
    # Left half +1, right half -1 on a 4x4 map; S = 16 -> frame 8x8. Bilinear keeps the sign of each
    # side and is antisymmetric about the middle; columns 0 and 7 see only one side: exactly +-1.
    low_res = torch.tensor([1.0, 1.0, -1.0, -1.0]).expand(1, 1, 4, 4)
    frame = upscale_to_padded_frame(low_res, 16)[0, 0]
    assert frame.shape == (8, 8)
    assert torch.all(frame[:, :4] > 0) and torch.all(frame[:, 4:] < 0)
    torch.testing.assert_close(frame.flip(1), -frame)
    assert torch.all(frame[:, 0] == 1) and torch.all(frame[:, 7] == -1)


def test_checker_lands_exactly_when_scales_match():
    # 100x60 image with S = 200: input size (200, 120), frame 100x100 whose valid part is 100x60,
    # i.e. the original size, so the resize is the identity and the padding (1e6) must be cut off.
    frame = torch.full((1, 1, 100, 100), 1e6)
    quadrants = torch.tensor([[1.0, -2.0], [-3.0, 4.0]]).repeat_interleave(50, 0).repeat_interleave(30, 1)
    frame[0, 0, :, :60] = quadrants
    assert SAMImageTransform(200).input_size_for((100, 60)) == (200, 120)
    original = padded_frame_to_original(frame, (200, 120), (100, 60), 200)
    torch.testing.assert_close(original[0, 0], quadrants, rtol=0, atol=0)


def test_checker_lands_where_expected_at_1024():
    # 100x60 image, S = 1024: input (1024, 614), valid frame rows [:512], cols [:307]. A 2x2 checker
    # of +-1 split at frame row 256 / col 153.5 must land split at row 50 / col 30 of the original.
    frame = torch.full((1, 1, 512, 512), 1e3)
    rows = torch.arange(512)[:, None] < 256
    cols = torch.arange(307)[None, :] < 153.5
    frame[0, 0, :, :307] = torch.where(rows == cols, 1.0, -1.0)
    original = padded_frame_to_original(frame, (1024, 614), (100, 60), 1024)[0, 0]
    assert original.abs().max() <= 1.0  # no padding leaked in
    assert torch.all(original[:48, :28] > 0) and torch.all(original[52:, 32:] > 0)
    assert torch.all(original[:48, 32:] < 0) and torch.all(original[52:, :28] < 0)


def test_odd_sizes():
    transform = SAMImageTransform(64)
    # 37x101 -> scale 64/101: 37 * 0.6337 = 23.4 -> 23 rows; padded_frame_to_original keeps frame rows
    # [:12]; the ground truth samples input row 2i + 1, so frame row 11 (input row 23) is padding.
    input_size = transform.input_size_for((37, 101))
    assert input_size == (23, 64)
    frame = upscale_to_padded_frame(torch.randn(2, 1, 16, 16), 64)
    assert frame.shape == (2, 1, 32, 32)
    assert padded_frame_to_original(frame, input_size, (37, 101), 64).shape == (2, 1, 37, 101)
    ground_truth = mask_to_padded_frame(np.ones((37, 101), dtype=bool), 64)
    assert torch.all(ground_truth[:11] == 1) and torch.all(ground_truth[11:] == 0)


def test_mask_to_padded_frame_by_hand():
    # 3x5 mask, S = 10: resized x2 to 6x10, padded to 10x10, halved to 5x5: the mask itself in the
    # top rows, zeros below.
    mask = np.random.default_rng(4).random((3, 5)) > 0.5
    frame = mask_to_padded_frame(mask, 10)
    assert frame.dtype == torch.float32
    expected = np.zeros((5, 5), dtype=np.float32)
    expected[:3] = mask
    np.testing.assert_array_equal(frame.numpy(), expected)


def test_nearest_target_frames_go_back_where_they_were_sampled_by_hand():
    # 8x8 image, S = 8: frame 4x4, identity resize. Frame rows 0, 10, 20, 30 down a column.
    frame = torch.tensor([0.0, 10.0, 20.0, 30.0])[:, None].repeat(1, 4)[None, None]
    # mask_to_padded_frame took frame row i from image row 2i + 1: read back from there, linearly in
    # between (row 2 lies halfway between rows 1 and 3), clamped at the ends.
    nearest = padded_frame_to_original(frame, (8, 8), (8, 8), 8, "nearest")[0, 0, :, 0]
    assert nearest.tolist() == [0.0, 0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0]
    # The release's mapping puts frame row i at image coordinate 2i + 1 (between rows 2i and 2i + 1).
    release = padded_frame_to_original(frame, (8, 8), (8, 8), 8, "release")[0, 0, :, 0]
    assert release.tolist() == [0.0, 2.5, 7.5, 12.5, 17.5, 22.5, 27.5, 30.0]
    with pytest.raises(ValueError, match="mask_target"):
        padded_frame_to_original(frame, (8, 8), (8, 8), 8, "bilinear")


def test_odd_resized_heights_do_not_stretch_the_mask():
    # A 7x8 image at S = 8 (no resize): frame 4x4, whose last row is half padding. Frame row i lies at
    # image coordinate 2i + 1, so the image's rows read what they read in the 8x8 image of the test
    # above (row 6 halfway between frame rows 2 and 3); resizing the 4 frame rows to 7 would stretch them
    # over 7 rows instead (row 6 would read frame row 3 alone: 30).
    frame = torch.tensor([0.0, 10.0, 20.0, 30.0])[:, None].repeat(1, 4)[None, None]
    release = padded_frame_to_original(frame, (7, 8), (7, 8), 8, "release")[0, 0, :, 0]
    assert release.tolist() == [0.0, 2.5, 7.5, 12.5, 17.5, 22.5, 27.5]
    nearest = padded_frame_to_original(frame, (7, 8), (7, 8), 8, "nearest")[0, 0, :, 0]
    assert nearest.tolist() == [0.0, 0.0, 5.0, 10.0, 15.0, 20.0, 25.0]


@pytest.mark.parametrize("original, input_size", [((100, 60), (1024, 614)), ((480, 640), (768, 1024)), ((33, 50), (42, 64))])
def test_release_mapping_is_the_bilinear_resize_of_the_region_for_even_sizes(original, input_size):
    image_size = max(input_size)
    frame = torch.randn(2, 1, image_size // 2, image_size // 2)
    region = frame[..., : input_size[0] // 2, : input_size[1] // 2]
    expected = F.interpolate(region, original, mode="bilinear", align_corners=False)
    # F.interpolate computes its source positions in float32, our matrix in float64
    torch.testing.assert_close(padded_frame_to_original(frame, input_size, original, image_size), expected, rtol=0, atol=5e-4)


def test_nearest_target_masks_come_back_in_place():
    # A GT mask through mask_to_padded_frame and back ("a perfect answer" of a model trained on it) lies
    # where the GT is with the nearest mapping; the release's mapping shifts it by half a pixel (discs of
    # ShapeWorld's smallest radius, 12 px, at several sub-pixel centres; and a letterboxed 300x200 image).
    yy, xx = np.mgrid[:256, :256]
    # margins: half a frame pixel is half an image pixel at 256 x 256, 0.59 of one in the 300 x 200 image
    for size, crop, margin in ((256, (256, 256), 0.01), (256, (300, 200), 0.002)):
        ious = {"release": [], "nearest": []}
        for cx in (100.0, 100.3, 100.6, 100.9):
            mask = ((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cx - 0.4) ** 2 <= 144)
            mask = np.pad(mask, ((0, max(0, crop[0] - 256)), (0, 0)))[: crop[0], : crop[1]]
            input_size = SAMImageTransform(size).input_size_for(mask.shape)
            logits = (2 * mask_to_padded_frame(mask, size) - 1)[None, None]
            for target in ious:
                back = padded_frame_to_original(logits, input_size, mask.shape, size, target)[0, 0].numpy() > 0
                ious[target].append((back & mask).sum() / (back | mask).sum())
        assert np.mean(ious["nearest"]) > np.mean(ious["release"]) + margin, ious


def test_area_target_by_hand():
    # 4x4 mask at S = 4 (no resize): each 2x2 block's covered fraction; a 3x2 letterboxed mask at S = 6
    # is resized to 6x4 (each pixel doubled), padded to 6x6 and averaged.
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=bool)
    assert mask_to_area_frame(mask, 4).tolist() == [[0.75, 0.0], [0.0, 1.0]]
    small = np.array([[1, 0], [0, 0], [1, 1]], dtype=bool)
    frame = mask_to_area_frame(small, 6)
    assert frame.shape == (3, 3) and frame[:, 2].tolist() == [0.0, 0.0, 0.0]  # the padding
    assert frame[:, :2].tolist() == [[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]


def test_area_target_answered_by_its_logits_gives_the_mask_back():
    # The coverage's logits through the release's mapping (which "area" uses) are the disc itself; the
    # binary "nearest" sample caps the same disc near 0.94.
    yy, xx = np.mgrid[:256, :256]
    mask = (xx + 0.5 - 100.3) ** 2 + (yy + 0.5 - 100.7) ** 2 <= 144
    coverage = mask_to_area_frame(mask, 256)
    assert set(coverage.unique().tolist()) > {0.0, 1.0}  # edges are fractions
    logits = torch.logit(coverage.clamp(0.02, 0.98))[None, None]
    back = padded_frame_to_original(logits, (256, 256), (256, 256), 256, "area")[0, 0].numpy() > 0
    assert (back == mask).all()
    nearest = padded_frame_to_original((2 * mask_to_padded_frame(mask, 256) - 1)[None, None], (256, 256), (256, 256), 256, "nearest")
    binary = nearest[0, 0].numpy() > 0
    assert (binary & mask).sum() / (binary | mask).sum() < 0.96


def test_mask_round_trip_iou():
    mask = np.zeros((97, 143), dtype=bool)
    mask[10:80, 20:130] = True
    frame = mask_to_padded_frame(mask, 1024)
    input_size = SAMImageTransform(1024).input_size_for(mask.shape)
    logits = padded_frame_to_original((2 * frame - 1)[None, None], input_size, mask.shape, 1024)
    recovered = (logits[0, 0] > 0).numpy()
    iou = (recovered & mask).sum() / (recovered | mask).sum()
    assert iou > 0.97
