"""Released SSP-SAM-224 and SSP-SAM-336 files: every key loads and is used, and the outputs equal a
reference forward pass written independently from the spec (tests/reference_forward.py).

The fixtures have exactly the release's keys and shapes (tests/data/ssp_sam_*_checkpoint_keys.json)
with every tensor drawn away from any initial value (no zero bias, no unit LayerNorm), and a CLIP of
the released interface widths (E = 512 or 768, 14x14 or 24x24 patches) but a narrow, shallow vision
tower, a one-layer text tower and a 1,000-token vocabulary, so that each file is written and run in
seconds. SAM's image encoder never runs: the SAM embedding is random.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssp_sam.backbones.clip import build_clip_model
from ssp_sam.checkpoint import load_model, map_release_key, release_preset

from fixtures_weights import write_release_file
from reference_forward import reference_forward

DATA = Path(__file__).parent / "data"
SURGERY_BLOCKS = 2
VOCAB = 1000
# Release preset -> the CLIP interface of its OpenAI model (embedding and text widths, patch grid).
CLIPS = {
    "ssp_sam_224": {"embed_dim": 512, "image_size": 224, "patch_size": 16, "text_width": 512, "text_heads": 8},
    "ssp_sam_336": {"embed_dim": 768, "image_size": 336, "patch_size": 14, "text_width": 768, "text_heads": 12},
}
VISION = {"vision_width": 64, "vision_layers": 3, "vision_head_width": 32, "text_layers": 1, "vocab_size": VOCAB}

# Release tensors SSP-SAM's forward pass never reads (SAM's point/box/mask prompt parts, the
# multimask and IoU outputs, the two modules the spec lists as unused) and one that it reads without
# effect (the LAD word-score bias shifts every word's score before a softmax over the words).
UNUSED_BY_FORWARD = (
    "sam.prompt_encoder.point_embeddings.",
    "sam.prompt_encoder.not_a_point_embed.",
    "sam.prompt_encoder.mask_downscaling.",
    "sam.mask_decoder.output_hypernetworks_mlps.1.",
    "sam.mask_decoder.output_hypernetworks_mlps.2.",
    "sam.mask_decoder.output_hypernetworks_mlps.3.",
    "sam.mask_decoder.iou_prediction_head.",
    "img2img_attn.",
    "norm_text_cond_img.",
)
NO_EFFECT_ON_OUTPUT = ("phrase_attn.fc.bias",)


def perturbed(shapes: dict[str, tuple[int, ...]], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors of these shapes, none at an initial value: matrices ~ N(0, 1/fan_in), norm
    scales (the 1-D weights) and the Gaussian's scale 1 + N(0, 0.1^2), its sigma 0.5 + N(0, 0.1^2),
    every other vector N(0, 0.1^2)."""
    state = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if len(shape) >= 2:
            state[key] = noise / math.sqrt(math.prod(shape[1:]))
        elif key == "tf_sigma":
            state[key] = 0.5 + 0.1 * noise
        elif key == "tf_scale" or (len(shape) == 1 and key.endswith(".weight")):
            state[key] = 1.0 + 0.1 * noise
        else:
            state[key] = 0.1 * noise
    return state


def model_config(preset: str, clip_path: Path) -> dict:
    return {
        "name": f"parity_{preset}",
        "clip_arch": "custom",
        "clip_checkpoint": str(clip_path),
        "clip_custom": {**CLIPS[preset], **VISION},
        "surgery_blocks": SURGERY_BLOCKS,
        "sam_variant": "vit_h",
        "adapters": {"dim": 512},
    }


def write_release_files(preset: str, folder: Path) -> tuple[dict, dict, Path, dict]:
    """A perturbed release file and CLIP file in ``folder``: (release state, CLIP state, release file, model config)."""
    generator = torch.Generator().manual_seed(7)
    shapes = {k: tuple(v) for k, v in json.loads((DATA / f"{preset}_checkpoint_keys.json").read_text()).items()}
    state = perturbed(shapes, generator)
    release_path = folder / f"{preset}.pth"
    write_release_file(release_path, state, clip_pretrained="pretrained_checkpoints/CS/CS-ViT-L-14-336px.pt" if preset == "ssp_sam_336" else "pretrained_checkpoints/CS/CS-ViT-B-16.pt")  # as the release's train.py writes it
    clip_shapes = {k: tuple(v.shape) for k, v in build_clip_model("custom", None, {**CLIPS[preset], **VISION}).state_dict().items()}
    clip = perturbed(clip_shapes, generator)
    clip_path = folder / "clip.pt"
    torch.save(clip, clip_path)
    return state, clip, release_path, model_config(preset, clip_path)


@pytest.fixture(scope="module", params=sorted(CLIPS))
def release(request, tmp_path_factory):
    """(preset, release state, CLIP state, release file, model config) for a perturbed release file."""
    return (request.param, *write_release_files(request.param, tmp_path_factory.mktemp(request.param)))


def inputs(preset: str, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image (CLIP pixels, SAM embedding) and two expressions of different lengths."""
    generator = torch.Generator().manual_seed(3)
    size = CLIPS[preset]["image_size"]
    pixels = torch.randn(1, 3, size, size, generator=generator, dtype=dtype)
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[0, :5] = torch.tensor([998, 5, 17, 300, 999])
    tokens[1, :12] = torch.cat([torch.tensor([998]), torch.randint(1, 998, (10,), generator=generator), torch.tensor([999])])
    embedding = torch.randn(1, 256, 64, 64, generator=generator, dtype=dtype)
    return pixels, tokens, embedding


def test_release_preset_is_told_by_the_shapes(release):
    preset, state, *_ = release
    assert release_preset(state, "x") == preset


def test_every_release_tensor_reaches_its_place(release):
    preset, state, _, path, config = release
    model = load_model(path, config, with_sam_image_encoder=False)
    assert model.config.release_quirks and model.visual_adapter.token_axis_norm
    assert model.word_proj.weight.shape == (512, CLIPS[preset]["text_width"])
    ours = model.state_dict()
    dropped = [key for key in state if map_release_key(key) is None]
    assert sorted({key.split(".")[0] for key in dropped}) == ["img2img_attn", "norm_text_cond_img"] and len(dropped) == 8
    for key, tensor in state.items():
        if map_release_key(key) is not None:
            assert torch.equal(ours[map_release_key(key)], tensor), key


def test_every_loaded_release_tensor_is_used_by_the_forward_pass(release):
    """Each used tensor gets a gradient from the output (buffers: perturbing one changes it); the
    tensors SSP-SAM never reads get none."""
    preset, state, _, path, config = release
    model = load_model(path, config, with_sam_image_encoder=False)
    pixels, tokens, embedding = inputs(preset, torch.float32)
    image_tokens, text = model.encode_clip_image(pixels), model.encode_text(tokens)

    def output():
        out = model.decode(image_tokens, embedding, text)
        return torch.cat([out.low_res_logits.flatten(), out.boxes.flatten()])

    params = dict(model.named_parameters())
    for tensor in params.values():
        tensor.requires_grad_(True)
    reference = output()
    (reference * torch.randn_like(reference)).sum().backward()
    buffers = dict(model.named_buffers())
    for key in state:
        target = map_release_key(key)
        if target is None:
            continue
        if key in NO_EFFECT_ON_OUTPUT:
            grad = params[target].grad
            assert grad is None or float(grad.abs().max()) < 1e-5 * max(1.0, float(reference.detach().abs().max())), key
            continue
        if target in params:
            used = params[target].grad is not None and bool(params[target].grad.abs().sum() > 0)
        else:
            with torch.no_grad():
                saved = buffers[target].clone()
                buffers[target].add_(1.0)
                used = not torch.equal(output(), reference.detach())
                buffers[target].copy_(saved)
        assert used != key.startswith(UNUSED_BY_FORWARD), f"{key} ({target}) used: {used}"


def test_outputs_equal_the_independent_reference(release):
    """Mask logits in the 512x512 padded frame, boxes and the similarity map, within 1e-4, from
    CLIP pixels (CLIP-Surgery included) through SAM's mask decoder."""
    preset, state, clip, path, config = release
    model = load_model(path, config, with_sam_image_encoder=False)
    pixels, tokens, embedding = inputs(preset)
    with torch.no_grad():
        ours = model(pixels.float(), tokens, embedding.float())
    # The reference runs in float64, so the difference is our float32 rounding (SAM's PE is float32 only).
    expected = reference_forward(
        {k: v.double() for k, v in state.items()}, {k: v.double() for k, v in clip.items()}, pixels, tokens, embedding,
        vision_heads=VISION["vision_width"] // VISION["vision_head_width"], text_heads=CLIPS[preset]["text_heads"],
        surgery_blocks=SURGERY_BLOCKS,
    )
    assert ours.mask_logits.shape == expected["mask_logits"].shape == (2, 1, 512, 512)
    assert ours.similarity.shape == (2, (CLIPS[preset]["image_size"] // CLIPS[preset]["patch_size"]) ** 2)
    for name, value in (("mask_logits", ours.mask_logits), ("boxes", ours.boxes), ("similarity", ours.similarity)):
        difference = float((value.double() - expected[name]).abs().max())
        assert difference < 1e-4, f"{name}: max difference {difference}"
    # Not a degenerate case: both masks have foreground and background, and differ from each other.
    masks = expected["mask_logits"] > 0
    assert masks.flatten(1).any(1).all() and (~masks).flatten(1).any(1).all() and not torch.equal(masks[0], masks[1])


_RUN_IN_SUBPROCESS = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from ssp_sam.checkpoint import load_model
import json
model = load_model(sys.argv[2], json.loads(sys.argv[3]), with_sam_image_encoder=False)
pixels, tokens, embedding = torch.load(sys.argv[4], weights_only=True)
with torch.no_grad():
    torch.save(model(pixels, tokens, embedding).mask_logits, sys.argv[4] + ".out")
"""


@pytest.mark.slow
def test_masks_do_not_depend_on_loading_twice_or_the_thread_count(tmp_path):
    preset = "ssp_sam_224"
    _, _, path, config = write_release_files(preset, tmp_path)
    pixels, tokens, embedding = inputs(preset, torch.float32)
    with torch.no_grad():
        first, second = (load_model(path, config, with_sam_image_encoder=False)(pixels, tokens, embedding).mask_logits for _ in range(2))
    assert torch.equal(first, second)
    saved = tmp_path / "inputs.pt"
    torch.save((pixels, tokens, embedding), saved)
    threads = 2 if torch.get_num_threads() == 1 else 1
    run = subprocess.run(
        [sys.executable, "-c", _RUN_IN_SUBPROCESS, str(threads), str(path), json.dumps(config), str(saved)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    other = torch.load(str(saved) + ".out", weights_only=True)
    assert torch.equal(other > 0, first > 0)
    assert float((other - first).abs().max()) < 1e-4
