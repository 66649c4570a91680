"""One training sample per sentence instead of per referent (the release's REC pretraining set).

The release builds its pretraining set (``dataset == 'merge'``) sentence by sentence: every
sentence of at most 40 words (counted as ``len(sentence.split(' '))``) adds one item holding its
referent, so a referent with five sentences is visited five times per epoch. Each visit then
draws a sentence uniformly from all of the referent's sentences, long ones included; the
sentence that created the item is not the one it necessarily uses. ``pool="referent"``
reproduces that; ``pool="own"`` gives each item exactly its own sentence.

The 40 is a word count, not a token count: the release's ``max_query_len=40`` is stored but never
used, and its CLIP tokenizer (context 77) refuses longer texts rather than cutting them; ours
cuts at 77 tokens with a warning (``CLIPTokenizer``).
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import ConfigError
from .records import ReferringDataset

POOLS = ("referent", "own")


def word_count(sentence: str) -> int:
    """Words as the release counts them: pieces between single spaces."""
    return len(sentence.split(" "))


def one_sample_per_sentence(dataset: ReferringDataset, *, max_words: int | None = None, pool: str = "referent") -> ReferringDataset:
    """A dataset with one sample per sentence of at most ``max_words`` words (None: every sentence).

    Sample ids become ``"<referent id>#<sentence index>"``; the samples of one referent follow
    each other in sentence order. A referent whose sentences are all too long has no sample.

    Args:
        pool: "referent" (the sample draws from all its referent's sentences, as the release) or
            "own" (the sample holds only its own sentence).
    """
    if pool not in POOLS:
        raise ConfigError(f"dataset {dataset.name}: pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if max_words is not None and (isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1):
        raise ConfigError(f"dataset {dataset.name}: max_words must be a positive integer or null, got {max_words!r}")
    samples = []
    for sample in dataset:
        for index, sentence in enumerate(sample.expressions):
            if max_words is not None and word_count(sentence) > max_words:
                continue
            if pool == "own":
                own = {"expressions": (sentence,), "sentence_ids": (sample.sentence_ids[index],),
                       "meta": {**sample.meta, "sentence_meta": (sample.sentence_meta(index),)}}
                samples.append(replace(sample, sample_id=f"{sample.sample_id}#{index}", **own))
            else:
                samples.append(replace(sample, sample_id=f"{sample.sample_id}#{index}"))
    return ReferringDataset(dataset.name, dataset.split, dataset.task, samples)
