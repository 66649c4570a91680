"""Training items: which expression of a referent a visit uses (uniform, or weighted by kind) and the GT box."""

from __future__ import annotations

import pytest
import torch

import fixtures_official as fx
from ssp_sam.backbones.clip_tokenizer import CLIPTokenizer
from ssp_sam.data.grefcoco import read_grefcoco
from ssp_sam.data.registry import load_dataset
from ssp_sam.data.shapeworld import generate_dataset
from ssp_sam.data.shapeworld.dataset import dataset_config
from ssp_sam.data.training import EpochBatchSampler, ReferringTrainingSet, referent_weights
from ssp_sam.errors import ConfigError


class _ZeroEmbeddings:
    """Stands in for the SAM embedding cache: these tests look at the expressions only."""

    def get(self, key: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        return torch.zeros(4, 2, 2, dtype=dtype or torch.float16)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapeworld")
    generate_dataset(root, "res", {"train": 4}, seed=11, progress=False)
    return load_dataset(dataset_config(root, "res", "train"))


def _items(dataset, weights) -> ReferringTrainingSet:
    tokenizer = CLIPTokenizer(77, append_period=True)
    return ReferringTrainingSet(dataset, _ZeroEmbeddings(), 32, 64, tokenizer, seed=5, augment=False, expression_weights=weights)


@pytest.mark.parametrize("weights, expected_l_share", [(None, 2 / 3), ({"L": 3.0}, 6 / 7), ({"L": 0.5, "A": 2.0}, 1 / 4)])
def test_expression_weights_set_how_often_each_kind_is_drawn(dataset, weights, expected_l_share):
    index = next(i for i, sample in enumerate(dataset) if sample.expressions == (
        "the triangle on the right", "the large yellow triangle", "the triangle on the bottom"))
    kinds = [dataset[index].sentence_meta(i)["kind"] for i in range(3)]
    assert kinds == ["L", "A", "L"]
    items = _items(dataset, weights)
    location_tokens = items.tokenizer(["the triangle on the right", "the triangle on the bottom"])
    visits = 400
    location_visits = 0
    for epoch in range(visits):
        tokens = items[epoch, index]["tokens"]
        location_visits += any(torch.equal(tokens, row) for row in location_tokens)
    # L share: 2 of 3 sentences uniformly; 2 * 3 / (2 * 3 + 1) with L weighted 3; 2 * 0.5 / (1 + 2) with L 0.5, A 2.
    assert location_visits / visits == pytest.approx(expected_l_share, abs=0.06)


def test_expression_weights_must_be_positive(dataset):
    with pytest.raises(ConfigError, match=r"expression_weights\.L"):
        _items(dataset, {"L": 0.0})


def test_referent_weights_are_the_mean_weight_of_the_sentences(dataset):
    weights = referent_weights(dataset, {"L": 4.0, "R": 0.5})
    for sample, weight in zip(dataset, weights.tolist()):
        kinds = [sample.sentence_meta(i)["kind"] for i in range(len(sample.expressions))]
        per_sentence = [{"L": 4.0, "R": 0.5}.get(kind, 1.0) for kind in kinds]
        assert weight == pytest.approx(sum(per_sentence) / len(per_sentence))
    index = next(i for i, sample in enumerate(dataset) if sample.expressions == (
        "the triangle on the right", "the large yellow triangle", "the triangle on the bottom"))
    assert weights[index].item() == pytest.approx((4 + 1 + 4) / 3)  # L, A, L
    with pytest.raises(ConfigError, match=r"train\.referent_weights\.L: must be > 0"):
        referent_weights(dataset, {"L": -1.0})


def test_weighted_epochs_draw_referents_in_proportion_and_the_same_on_every_rank():
    weights = torch.tensor([1.0, 1.0, 2.0, 6.0], dtype=torch.float64)
    single = EpochBatchSampler(4, 2, seed=9, weights=weights)
    counts = torch.zeros(4)
    for epoch in range(1000):
        single.set_epoch(epoch)
        for batch in single:
            for key_epoch, index in batch:
                assert key_epoch == epoch
                counts[index] += 1
    assert counts.sum() == 4000  # an epoch still holds len(dataset) items
    torch.testing.assert_close(counts / 4000, torch.tensor([0.1, 0.1, 0.2, 0.6]), atol=0.02, rtol=0)
    # Two processes split every global batch of the single-process run between them.
    ranks = [EpochBatchSampler(4, 2, seed=9, rank=r, world_size=2, weights=weights) for r in range(2)]
    for epoch in (0, 7):
        for sampler in (single, *ranks):
            sampler.set_epoch(epoch)
        merged = [a + b for a, b in zip(*(list(r) for r in ranks))]
        assert merged == list(single)
    with pytest.raises(ValueError, match="shape"):
        EpochBatchSampler(5, 2, seed=9, weights=weights)


# ---- GT boxes (release-layout fixtures; the boxes worked out by hand) ------------------------------

CLIP_SIZE = 32  # fixture images are 12 x 16 (H x W): scale 2 -> 24 x 32 content, 8 free rows


def _box_items(dataset, augment: bool) -> ReferringTrainingSet:
    return ReferringTrainingSet(dataset, None, CLIP_SIZE, 64, CLIPTokenizer(77), seed=3, augment=augment, need_masks=False)


def test_no_target_box_is_the_letterbox_corner(tmp_path):
    fx.write_grefcoco(tmp_path)
    val = read_grefcoco(tmp_path / "grefcoco", image_root=tmp_path / fx.COCO_IMAGE_DIR, name="grefcoco", splits=["val"])["val"]
    index = next(i for i, sample in enumerate(val) if sample.no_target)
    items = _box_items(val, augment=True)
    offsets = set()
    for epoch in range(12):
        item = items[epoch, index]
        # The letterbox's top offset, read off the pixels: the padding rows are exactly zero.
        top = int((item["clip_pixels"].abs().sum(dim=(0, 2)) == 0).int().cumprod(0).sum())
        offsets.add(top)
        assert item["box"].tolist() == [0.0, top / CLIP_SIZE, 0.0, 0.0]  # (left / S, top / S, 0, 0), left = 0
        assert "mask" not in item and "sam_embedding" not in item
    assert len(offsets) > 1  # the random placement moved the target box


def test_rec_items_one_per_sentence_with_boxes(tmp_path):
    fx.write_rec_json(tmp_path)
    cfg = {"name": "merged_rec", "format": "rec_json", "root": str(tmp_path), "folder": "anns", "split": "train", "task": "res",
           "image_roots": {source: str(tmp_path / folder) for source, folder in fx.REC_JSON_IMAGE_DIRS.items()},
           "sentence_samples": {"split": "train", "max_words": 40}}
    items = _box_items(load_dataset(cfg), augment=False)
    assert len(items) == len(fx.REC_JSON_SENTENCE_SAMPLES) == 5
    # flickr entry (sample "1#0"): xywh [0, 1, 5, 4] -> xyxy (0, 1, 5, 5); x2 -> (0, 2, 10, 10), centred: +4 rows
    # -> (0, 6, 10, 14) in the 32 square -> cx, cy, w, h = (5, 10, 10, 8) / 32.
    assert items[0, 2]["box"].tolist() == [5 / 32, 10 / 32, 10 / 32, 8 / 32]


def test_fixed_placements_repeat_the_clip_input(tmp_path):
    """train.clip_placements=K: the letterbox offset takes only the K evenly spaced values, so the
    CLIP input of an image repeats (its tokens can be cached); the release's placement takes any."""
    fx.write_grefcoco(tmp_path)
    val = read_grefcoco(tmp_path / "grefcoco", image_root=tmp_path / fx.COCO_IMAGE_DIR, name="grefcoco", splits=["val"])["val"]
    # 12 x 16 images -> 24 x 32 in the 32 square: 8 free rows; 3 placements at rows 0, 4 and 8.
    fixed = ReferringTrainingSet(val, None, CLIP_SIZE, 64, CLIPTokenizer(77), seed=3, augment=True, placements=3, need_masks=False)
    continuous = _box_items(val, augment=True)

    def top_offsets(items) -> set[int]:
        return {int((items[epoch, 0]["clip_pixels"].abs().sum(dim=(0, 2)) == 0).int().cumprod(0).sum()) for epoch in range(30)}

    assert top_offsets(fixed) == {0, 4, 8}
    assert len(top_offsets(continuous)) > 3
    inputs = {fixed[epoch, 0]["clip_pixels"].numpy().tobytes() for epoch in range(30)}
    assert len(inputs) == 3


@pytest.mark.parametrize(
    ("weights", "key", "message"),
    [
        ({"l": 3.0}, "kind", r"train\.expression_weights\.l: no sentence of .* has kind='l' \(.*values present: A, L, R\)"),
        ({"L": 3.0, "M": 2.0}, "kind", r"train\.expression_weights\.M: .* has kind='M'"),  # a RES set has no M
        ({"L": 3.0}, "subkind", r"has subkind='L' .*values present: A, L-\w+"),  # subkind splits L
        ({"L": 3.0}, "colour", r"has colour='L' .*no sentence carries that annotation"),
    ],
)
def test_a_weight_that_no_training_sentence_can_take_is_refused(dataset, weights, key, message):
    """Unmatched weights would leave training uniform without a word: a typo, or data without the annotation."""
    tokenizer = CLIPTokenizer(77, append_period=True)
    with pytest.raises(ConfigError, match=message):
        ReferringTrainingSet(dataset, _ZeroEmbeddings(), 32, 64, tokenizer, seed=5, augment=False,
                             expression_weights=weights, expression_weight_key=key)
    with pytest.raises(ConfigError, match=message.replace("expression_weights", "referent_weights")):
        referent_weights(dataset, weights, key)
