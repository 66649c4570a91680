"""Training items: which expression of a referent a visit uses (uniform, or weighted by kind)."""

from __future__ import annotations

import pytest
import torch

from ssp_sam.backbones.clip import CLIPTokenizer
from ssp_sam.data.registry import load_dataset
from ssp_sam.data.shapeworld import generate_dataset
from ssp_sam.data.shapeworld.dataset import dataset_config
from ssp_sam.data.training import ReferringTrainingSet
from ssp_sam.errors import ConfigError


class _ZeroEmbeddings:
    """Stands in for the SAM embedding cache: these tests look at the expressions only."""

    def get(self, key: str) -> torch.Tensor:
        return torch.zeros(4, 2, 2)


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
        items.set_epoch(epoch)
        tokens = items[index]["tokens"]
        location_visits += any(torch.equal(tokens, row) for row in location_tokens)
    # L share: 2 of 3 sentences uniformly; 2 * 3 / (2 * 3 + 1) with L weighted 3; 2 * 0.5 / (1 + 2) with L 0.5, A 2.
    assert location_visits / visits == pytest.approx(expected_l_share, abs=0.06)


def test_expression_weights_must_be_positive(dataset):
    with pytest.raises(ConfigError, match=r"expression_weights\.L"):
        _items(dataset, {"L": 0.0})
