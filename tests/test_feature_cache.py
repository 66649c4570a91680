"""Caches of the frozen CLIP outputs (ssp_sam/feature_cache.py) and the fixed letterbox placements."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssp_sam.errors import ConfigError
from ssp_sam.feature_cache import ImageTokenCache, TextFeatureCache, clip_fingerprint
from ssp_sam.letterbox import fixed_placements, letterbox_image

from conftest import tiny_model


def _tokens(rows: list[list[int]]) -> torch.Tensor:
    """(B, 77) ids: SOT, the given word ids, EOT, zero padding."""
    tokens = torch.zeros(len(rows), 77, dtype=torch.long)
    for index, words in enumerate(rows):
        tokens[index, : len(words) + 2] = torch.tensor([49406, *words, 49407])
    return tokens


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to the rounding the encoders themselves show between batch compositions."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def _pixels(model, batch: int, seed: int) -> torch.Tensor:
    size = model.clip.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


class _CountingCalls:
    """Wraps a model method and records the batch size of every call."""

    def __init__(self, monkeypatch, model, name: str) -> None:
        self.batches: list[int] = []
        original = getattr(model, name)

        def counted(inputs):
            self.batches.append(inputs.shape[0])
            return original(inputs)

        monkeypatch.setattr(model, name, counted)


def test_text_features_equal_the_encoder_and_only_misses_are_computed(monkeypatch):
    model = tiny_model()
    cache = TextFeatureCache()
    calls = _CountingCalls(monkeypatch, model, "encode_text")
    first = _tokens([[500, 600], [700], [500, 600]])  # a repeated sentence within the batch
    features = cache.encode(model, first)
    expected = model.clip.encode_text(first)
    _close(features.words, expected[0])
    _close(features.sentence, expected[1])
    assert torch.equal(features.padding, first == 0)
    assert calls.batches == [2]  # the two distinct sentences, in one call

    second = _tokens([[700], [800, 900], [500, 600]])
    features = cache.encode(model, second)
    assert calls.batches == [2, 1]  # only the new sentence
    expected = model.clip.encode_text(second)
    _close(features.words, expected[0])
    _close(features.sentence, expected[1])
    assert (cache.hits, cache.misses) == (3, 3)  # a repeat within a batch is a hit


def test_image_tokens_equal_the_encoder_and_repeat_inputs_hit(monkeypatch):
    model = tiny_model()
    cache = ImageTokenCache()
    pixels = _pixels(model, 3, seed=0)
    expected = model.clip.encode_image(pixels)
    calls = _CountingCalls(monkeypatch, model.clip, "frozen_image_features")
    tokens = cache.encode(model, pixels)
    _close(tokens, expected)
    again = cache.encode(model, torch.cat([pixels[1:], _pixels(model, 1, seed=1)]))
    assert calls.batches == [3, 1]
    assert torch.equal(again[:2], tokens[1:])  # the stored tensors themselves


def test_forward_from_cached_features_equals_forward_from_inputs():
    model = tiny_model()
    pixels, tokens = _pixels(model, 2, seed=2), _tokens([[400], [410, 420]])
    side = model.sam_image_size // 16
    sam = torch.randn(2, model.mask_head.embed_dim, side, side)
    direct = model(pixels, tokens, sam)
    cached = model(ImageTokenCache().encode(model, pixels), TextFeatureCache().encode(model, tokens), sam)
    _close(cached.mask_logits, direct.mask_logits)
    _close(cached.boxes, direct.boxes)


def test_other_clip_weights_or_precision_are_other_entries():
    model = tiny_model()
    cache = TextFeatureCache()
    tokens = _tokens([[500]])
    before = cache.encode(model, tokens).sentence
    fingerprint = clip_fingerprint(model.clip, "text")
    with torch.no_grad():
        model.clip.clip.text_projection.mul_(2.0)  # in place: same storage, new version
    assert clip_fingerprint(model.clip, "text") != fingerprint
    assert torch.allclose(cache.encode(model, tokens).sentence, 2.0 * before, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = cache.encode(model, tokens).sentence
    assert low.dtype == torch.bfloat16 and cache.misses == 3
    # the image tower's weights do not touch text entries
    image_fingerprint = clip_fingerprint(model.clip, "image")
    with torch.no_grad():
        model.clip.clip.visual.proj.mul_(2.0)
    assert clip_fingerprint(model.clip, "image") != image_fingerprint
    cache.encode(model, tokens)
    assert cache.misses == 3


def test_a_trainable_tower_changed_by_a_fused_optimizer_is_other_entries():
    """torch's fused AdamW (the trainers') writes the weights in place without bumping their version: a tower
    with trainable tensors must not be recognised by version alone."""
    model = tiny_model()
    weights = [model.clip.clip.text_projection]
    weights[0].requires_grad_(True)
    optimizer = torch.optim.AdamW(weights, lr=0.1, fused=True)
    cache, tokens = TextFeatureCache(), _tokens([[500]])
    before = cache.encode(model, tokens).sentence
    version = weights[0]._version
    weights[0].grad = torch.ones_like(weights[0])
    optimizer.step()
    assert weights[0]._version == version  # what the memo used to trust
    after = cache.encode(model, tokens).sentence
    assert cache.misses == 2 and not torch.allclose(after, before)
    _close(after, model.encode_text(tokens.to(model.device)).sentence.detach())


def test_a_cache_with_fixed_weights_hashes_a_trainable_tower_once(monkeypatch):
    """One evaluation of a model whose text tower trains: its weights cannot change during the call, so the
    evaluator's own cache hashes them once, where a training cache rehashes them at every call."""
    import ssp_sam.feature_cache as feature_cache

    model = tiny_model()
    model.clip.clip.text_projection.requires_grad_(True)
    hashed: list[str] = []

    def counted(backbone, tower):
        hashed.append(tower)
        return clip_fingerprint(backbone, tower)

    monkeypatch.setattr(feature_cache, "clip_fingerprint", counted)
    fixed, training = TextFeatureCache(weights_fixed=True), TextFeatureCache()
    for batch in ([[500]], [[600]], [[500], [700]]):
        fixed_features = fixed.encode(model, _tokens(batch))
        _close(fixed_features.sentence, training.encode(model, _tokens(batch)).sentence)
    assert len(hashed) == 1 + 3  # the fixed cache once, the training cache at each of its 3 calls
    assert (fixed.hits, fixed.misses) == (1, 3)


def test_memory_is_bounded_least_recently_used_first():
    model = tiny_model()
    entry_bytes = 77 * model.clip.text_width * 4 + model.clip.embed_dim * 4
    cache = TextFeatureCache(max_bytes=2 * entry_bytes)
    a, b, c = _tokens([[1000]]), _tokens([[1001]]), _tokens([[1002]])
    for tokens in (a, b, a, c):  # c evicts b, the least recently used
        cache.encode(model, tokens)
    assert cache.store.bytes <= 2 * entry_bytes and cache.misses == 3
    cache.encode(model, a)
    assert cache.misses == 3
    cache.encode(model, b)
    assert cache.misses == 4


def test_disk_entries_are_reused_checked_and_kept_apart_by_weights(tmp_path, monkeypatch):
    model = tiny_model()
    tokens = _tokens([[500], [600]])
    expected = TextFeatureCache(directory=tmp_path).encode(model, tokens)
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 2 and not list(tmp_path.rglob("*.tmp"))

    fresh = TextFeatureCache(directory=tmp_path)  # a new process: memory empty
    calls = _CountingCalls(monkeypatch, model, "encode_text")
    assert torch.equal(fresh.encode(model, tokens).words, expected.words) and calls.batches == []

    # a damaged entry (payload byte flipped) and a truncated one are recomputed, equal, and rewritten
    data = bytearray(files[0].read_bytes())
    data[-3] ^= 0xFF
    files[0].write_bytes(bytes(data))
    files[1].write_bytes(files[1].read_bytes()[:50])
    again = TextFeatureCache(directory=tmp_path).encode(model, tokens)
    assert calls.batches == [2] and torch.equal(again.words, expected.words)
    assert TextFeatureCache(directory=tmp_path).encode(model, tokens) is not None and calls.batches == [2]

    # an entry moved under another key is refused: its header names its own key
    files = sorted(tmp_path.rglob("*.safetensors"))
    files[1].write_bytes(files[0].read_bytes())
    TextFeatureCache(directory=tmp_path).encode(model, tokens)
    assert calls.batches == [2, 1]

    # other CLIP weights: another folder, nothing of the first read
    other = tiny_model(seed=1)
    TextFeatureCache(directory=tmp_path).encode(other, tokens)
    assert len({path.parent.parent.name for path in tmp_path.rglob("*.safetensors")}) == 2


def test_bad_max_bytes_names_the_setting():
    with pytest.raises(ConfigError, match="max_bytes"):
        TextFeatureCache(max_bytes=-1)


def test_fixed_placements_span_the_free_range():
    # 60 x 30 image into a 32 square: 32 x 16 content, 16 free rows
    assert fixed_placements(30, 60, 32, 1) == [(0, 8)]
    assert fixed_placements(30, 60, 32, 3) == [(0, 0), (0, 8), (0, 16)]
    assert fixed_placements(40, 40, 32, 4) == [(0, 0)] * 4  # square: nothing to place
    image = np.zeros((30, 60, 3), dtype=np.uint8)
    for offset in fixed_placements(30, 60, 32, 5):
        _, box = letterbox_image(image, 32, offset)  # every placement is a valid one
        assert (box.offset_x, box.offset_y) == offset
    with pytest.raises(ConfigError, match="count"):
        fixed_placements(30, 60, 32, 0)
