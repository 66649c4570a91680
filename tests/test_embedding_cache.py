"""SAM embedding cache: exact entries, resuming, damage detection and repair, kill -9, workers, CLI."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fixtures_official as fx
from conftest import run_script, tiny_model
from ssp_sam.backbones.sam import SAMImageTransform, build_sam, sam_weights_fingerprint
from ssp_sam.checkpoint import save_checkpoint
from ssp_sam.data.embedding_cache import EmbeddingCache, build_cache, image_key, module_fingerprint
from ssp_sam.errors import CacheError, ImageError
from ssp_sam.image_io import load_image

TINY_SAM = {
    "encoder_embed_dim": 16,
    "encoder_depth": 1,
    "encoder_num_heads": 1,
    "encoder_global_attn_indexes": [0],
    "image_size": 64,
    "patch_size": 16,
    "window_size": 2,
    "prompt_embed_dim": 16,
}
EMBEDDING_SHAPE = (16, 4, 4)  # (prompt_embed_dim, 64 / 16, 64 / 16)
TRANSFORM = SAMImageTransform(64)


def tiny_encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_sam("custom", custom=TINY_SAM, parts=("image_encoder",)).image_encoder


class CountingEncoder(nn.Module):
    """Wraps an encoder and counts the images it is asked to encode."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.img_size = encoder.img_size
        self.images_seen = 0

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images_seen += pixels.shape[0]
        return self.encoder(pixels)


def write_images(folder: Path, count: int, start: int = 0) -> dict[str, Path]:
    """PNGs of random pixels and varied sizes -> {image_key: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for index in range(start, start + count):
        rng = np.random.default_rng(index)
        path = folder / f"image_{index}.png"
        Image.fromarray(rng.integers(0, 256, (20 + 3 * index, 40 - index, 3), dtype=np.uint8)).save(path)
        images[image_key(path)] = path
    return images


def direct_embeddings(encoder: nn.Module, paths: list[Path]) -> torch.Tensor:
    """One encoder call on the stacked SAM inputs of ``paths`` -> (B, C, h, w)."""
    with torch.inference_mode():
        return encoder(torch.stack([TRANSFORM(load_image(path))[0] for path in paths]))


@pytest.fixture(scope="module")
def encoder() -> nn.Module:
    return tiny_encoder()


@pytest.fixture(scope="module")
def fingerprint(encoder) -> str:
    return module_fingerprint(encoder)


def build(root, images, encoder, fingerprint, **options) -> EmbeddingCache:
    return build_cache(root, images, encoder, TRANSFORM, fingerprint, progress=False, **options)


def the_shard(cache: EmbeddingCache) -> Path:
    (shard,) = cache.folder.glob("shard-*.bin")
    return shard


# ---------------------------------------------------------------------------------------- keys


def test_image_key_is_sha1_of_the_resolved_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = hashlib.sha1(str(tmp_path.resolve() / "a.png").encode()).hexdigest()
    assert image_key("a.png") == image_key(tmp_path / "sub" / ".." / "a.png") == expected


def test_module_fingerprint_follows_the_weights(encoder, fingerprint):
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    assert fingerprint == digest.hexdigest()
    assert module_fingerprint(tiny_encoder(seed=1)) != fingerprint


# ------------------------------------------------------------------------------------ contents


def test_entries_equal_direct_encoder_calls(tmp_path, encoder, fingerprint):
    images = write_images(tmp_path / "images", 5)
    cache = build(tmp_path / "cache", images, encoder, fingerprint, batch_size=2)

    assert cache.folder == tmp_path / "cache" / fingerprint[:16]
    header = json.loads((cache.folder / "cache.json").read_text())
    assert (header["fingerprint"], header["shape"], header["dtype"], header["image_size"]) == (
        fingerprint, list(EMBEDDING_SHAPE), "float32", 64)
    assert len(cache) == 5 and cache.missing(images) == []
    assert (cache.last_build.computed, cache.last_build.cached, cache.last_build.repaired) == (5, 0, 0)

    keys, paths = list(images), list(images.values())
    for start in range(0, 5, 2):  # the cache encodes in batches of 2, in mapping order
        reference = direct_embeddings(encoder, paths[start : start + 2])
        for key, expected in zip(keys[start : start + 2], reference):
            embedding = cache.get(key)
            assert embedding.dtype == torch.float32 and embedding.shape == EMBEDDING_SHAPE
            assert torch.equal(embedding, expected)
    with pytest.raises(KeyError):
        cache.get("0" * 40)

    reopened = EmbeddingCache(tmp_path / "cache", fingerprint)
    assert len(reopened) == 5 and torch.equal(reopened.get(keys[0]), cache.get(keys[0]))


@pytest.mark.parametrize("dtype, storage, itemsize", [("fp16", torch.float16, 2), ("bf16", torch.bfloat16, 2)])
def test_half_precision_entries(tmp_path, encoder, fingerprint, dtype, storage, itemsize):
    images = write_images(tmp_path / "images", 2)
    cache = build(tmp_path / "cache", images, encoder, fingerprint, dtype=dtype, batch_size=2)
    reference = direct_embeddings(encoder, list(images.values()))
    for key, expected in zip(images, reference):
        embedding = cache.get(key)
        assert embedding.dtype == torch.float32
        assert torch.equal(embedding, expected.to(storage).float())  # stored compactly, read back as float32
        torch.testing.assert_close(embedding, expected, rtol=1e-2, atol=1e-2)
    entry_bytes = 32 + int(np.prod(EMBEDDING_SHAPE)) * itemsize
    assert the_shard(cache).stat().st_size == 2 * entry_bytes
    # "auto" keeps what the cache holds; an explicit other dtype would mix precisions.
    assert build(tmp_path / "cache", images, encoder, fingerprint, dtype="auto").dtype == storage
    with pytest.raises(CacheError, match="fp32"):
        build(tmp_path / "cache", images, encoder, fingerprint, dtype="fp32")


def test_resume_computes_only_missing_entries(tmp_path, encoder, fingerprint):
    images = write_images(tmp_path / "images", 5)
    first = dict(list(images.items())[:3])
    counting = CountingEncoder(encoder)
    build(tmp_path / "cache", first, counting, fingerprint)
    assert counting.images_seen == 3

    cache = build(tmp_path / "cache", images, counting, fingerprint, batch_size=4)
    assert counting.images_seen == 5
    assert (cache.last_build.computed, cache.last_build.cached) == (2, 3)
    build(tmp_path / "cache", images, counting, fingerprint, verify="full")
    assert counting.images_seen == 5


# ------------------------------------------------------------------------------------- damage


def test_truncated_shard_is_detected_and_repaired(tmp_path, encoder, fingerprint):
    images = write_images(tmp_path / "images", 3)
    cache = build(tmp_path / "cache", images, encoder, fingerprint, batch_size=1)
    shard, last = the_shard(cache), list(images)[-1]
    os.truncate(shard, shard.stat().st_size - 10)

    assert cache.verify() == [last]
    with pytest.raises(CacheError) as error:
        cache.get(last)
    assert last in str(error.value) and str(shard) in str(error.value) and "cache_embeddings.py" in str(error.value)

    counting = CountingEncoder(encoder)
    repaired = build(tmp_path / "cache", images, counting, fingerprint, verify="quick")
    assert counting.images_seen == 1
    assert (repaired.last_build.repaired, repaired.last_build.cached) == (1, 2)
    assert repaired.verify(full=True) == []
    assert torch.equal(repaired.get(last), direct_embeddings(encoder, [images[last]])[0])


def test_flipped_byte_is_found_by_full_verify_and_repaired(tmp_path, encoder, fingerprint):
    images = write_images(tmp_path / "images", 3)
    cache = build(tmp_path / "cache", images, encoder, fingerprint, batch_size=1)
    middle = list(images)[1]
    entry_bytes = 32 + int(np.prod(EMBEDDING_SHAPE)) * 4
    with open(the_shard(cache), "r+b") as shard:  # a payload byte of the second entry
        shard.seek(entry_bytes + 32 + 100)
        byte = shard.read(1)
        shard.seek(-1, os.SEEK_CUR)
        shard.write(bytes([byte[0] ^ 0x10]))

    assert cache.verify(full=False) == []  # sizes and headers are intact
    assert cache.verify(full=True) == [middle]
    with pytest.raises(CacheError, match=f"entry {middle} is corrupt"):
        cache.get(middle)

    counting = CountingEncoder(encoder)
    build(tmp_path / "cache", images, counting, fingerprint, verify="quick")
    assert counting.images_seen == 0  # a quick check cannot see it
    repaired = build(tmp_path / "cache", images, counting, fingerprint, verify="full", batch_size=1)
    assert counting.images_seen == 1 and repaired.last_build.repaired == 1
    assert torch.equal(repaired.get(middle), direct_embeddings(encoder, [images[middle]])[0])


def test_torn_writes_are_ignored_and_resumed_after(tmp_path, encoder, fingerprint):
    """What kill -9 can leave: bytes after the last indexed entry, an index line without its newline."""
    images = write_images(tmp_path / "images", 4)
    first, rest = dict(list(images.items())[:2]), dict(list(images.items())[2:])
    cache = build(tmp_path / "cache", first, encoder, fingerprint)
    with open(the_shard(cache), "ab") as shard:
        shard.write(b"SSPE" + b"\x00" * 50)
    index_line = (cache.folder / "index.log").read_bytes().splitlines(keepends=True)[0]
    with open(cache.folder / "index.log", "ab") as index:
        index.write(index_line[:-20])

    reopened = EmbeddingCache(tmp_path / "cache", fingerprint)
    assert len(reopened) == 2 and reopened.verify(full=True) == []
    resumed = build(tmp_path / "cache", images, encoder, fingerprint, batch_size=2)
    assert resumed.last_build.computed == 2
    final = EmbeddingCache(tmp_path / "cache", fingerprint)
    assert len(final) == 4 and final.verify(full=True) == []
    assert torch.equal(final.get(list(rest)[1]), direct_embeddings(encoder, list(rest.values()))[1])


# ---------------------------------------------------------------------------------- ownership


def test_each_encoder_has_its_own_folder(tmp_path, encoder, fingerprint):
    images = write_images(tmp_path / "images", 1)
    cache = build(tmp_path / "cache", images, encoder, fingerprint)
    other = tiny_encoder(seed=1)
    other_cache = build(tmp_path / "cache", images, other, module_fingerprint(other))
    assert other_cache.folder != cache.folder and len(other_cache) == 1
    assert not torch.equal(other_cache.get(list(images)[0]), cache.get(list(images)[0]))

    same_prefix = fingerprint[:16] + "0" * (len(fingerprint) - 16)
    with pytest.raises(CacheError, match=re.escape(str(cache.folder))):
        EmbeddingCache(tmp_path / "cache", same_prefix)
    with pytest.raises(CacheError, match="image_size"):
        EmbeddingCache(tmp_path / "cache", fingerprint, image_size=1024)


def test_a_second_writer_is_refused(tmp_path, encoder, fingerprint):
    images = write_images(tmp_path / "images", 1)
    cache = EmbeddingCache(tmp_path / "cache", fingerprint)
    with open(cache.folder / "writer.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(CacheError, match="another process"):
            build(tmp_path / "cache", images, encoder, fingerprint)


def test_unreadable_images_are_reported_after_the_others_are_cached(tmp_path, encoder, fingerprint):
    images = write_images(tmp_path / "images", 3)
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ImageError, match=f"1 of 4 images .*{re.escape(str(broken))}"):
        build(tmp_path / "cache", {**images, image_key(broken): broken}, encoder, fingerprint, batch_size=2)
    cache = EmbeddingCache(tmp_path / "cache", fingerprint)
    assert sorted(cache.keys()) == sorted(images)


# ----------------------------------------------------------------------------------- processes

KILLED_BUILD = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from ssp_sam.backbones.sam import SAMImageTransform, build_sam
    from ssp_sam.data.embedding_cache import build_cache

    root, weights, images, fingerprint, custom = sys.argv[1:6]
    encoder = build_sam("custom", custom=json.loads(custom), parts=("image_encoder",)).image_encoder
    encoder.load_state_dict(torch.load(weights, weights_only=True))

    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.img_size = encoder, encoder.img_size
        def forward(self, pixels):
            time.sleep(0.3)
            return self.encoder(pixels)

    build_cache(root, json.loads(images), Slow(), SAMImageTransform(encoder.img_size), fingerprint, batch_size=1, progress=False)
    """
)


def test_kill_9_during_a_build_loses_only_the_batch_in_flight(tmp_path, encoder, fingerprint):
    images = write_images(tmp_path / "images", 10)
    torch.save(encoder.state_dict(), tmp_path / "encoder.pt")
    root = tmp_path / "cache"
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD, str(root), str(tmp_path / "encoder.pt"),
         json.dumps({key: str(path) for key, path in images.items()}), fingerprint, json.dumps(TINY_SAM)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    index = root / fingerprint[:16] / "index.log"
    deadline = time.monotonic() + 60
    while not (index.exists() and index.read_bytes().count(b"\n") >= 3):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the build wrote nothing in 60 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()

    cache = EmbeddingCache(root, fingerprint)
    done = len(cache)
    assert 3 <= done < 10 and cache.verify(full=True) == []
    for key in cache.keys():
        assert torch.equal(cache.get(key), direct_embeddings(encoder, [images[key]])[0])

    counting = CountingEncoder(encoder)
    finished = build(root, images, counting, fingerprint)
    assert counting.images_seen == 10 - done and len(finished) == 10
    assert finished.verify(full=True) == []


class CachedEmbeddings(Dataset):
    def __init__(self, cache: EmbeddingCache, keys: list[str]) -> None:
        self.cache, self.keys = cache, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.cache.get(self.keys[index])


def test_dataloader_workers_read_the_same_tensors(tmp_path, encoder, fingerprint):
    images = write_images(tmp_path / "images", 6)
    cache = build(tmp_path / "cache", images, encoder, fingerprint)
    keys = list(images)
    expected = torch.stack([cache.get(key) for key in keys])

    state = pickle.dumps(cache)  # what a spawned worker receives: paths and index, no embedding bytes
    assert cache.get(keys[0]).numpy().tobytes() not in state
    copy = pickle.loads(state)
    assert copy._fds == {} and torch.equal(copy.get(keys[1]), expected[1])

    loader = DataLoader(CachedEmbeddings(cache, keys), batch_size=2, num_workers=2, multiprocessing_context="fork")
    assert torch.equal(torch.cat(list(loader)), expected)


# ------------------------------------------------------------------------------------------ CLI


def test_cli_caches_what_is_missing(tmp_path, encoder):
    data = tmp_path / "data"
    fx.write_refer(data)
    weights = tmp_path / "sam_tiny.pth"
    torch.save({f"image_encoder.{name}": tensor for name, tensor in encoder.state_dict().items()}, weights)
    paths = [data / fx.COCO_IMAGE_DIR / fx.coco_file_name(image_id) for image_id in (101, 102, 103, 104)]
    fingerprint = sam_weights_fingerprint(weights)
    build(tmp_path / "cache", {image_key(paths[1]): paths[1]}, encoder, fingerprint)  # an earlier, partial run

    custom = "{" + ", ".join(f"{key}: {value}" for key, value in TINY_SAM.items()) + "}"
    result = run_script(
        "cache_embeddings.py", f"dataset.root={data}", f"sam_checkpoint={weights}", "sam_variant=custom",
        f"sam_custom={custom}", f"cache_dir={tmp_path / 'cache'}", "device=cpu", "batch_size=3", "progress=false",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "(train, val, testA, testB): 4 images" in result.stdout
    assert "computed 3, already cached 1, repaired 0" in result.stdout

    cache = EmbeddingCache(tmp_path / "cache", fingerprint)
    # Every fixture image is the same flat colour, so batching cannot change the result.
    reference = direct_embeddings(encoder, paths[:1])[0]
    for path in paths:
        torch.testing.assert_close(cache.get(image_key(path)), reference, rtol=0, atol=1e-6)


def test_cli_uses_the_sam_encoder_of_our_checkpoint(tmp_path):
    fx.write_refer(tmp_path / "data")
    model = tiny_model()
    save_checkpoint(model, tmp_path / "run")
    result = run_script(
        "cache_embeddings.py", f"dataset.root={tmp_path / 'data'}", f"checkpoint={tmp_path / 'run'}",
        f"cache_dir={tmp_path / 'cache'}", "progress=false", "splits=[train]", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    cache = EmbeddingCache(tmp_path / "cache", module_fingerprint(model.sam_image_encoder))
    path = tmp_path / "data" / fx.COCO_IMAGE_DIR / fx.coco_file_name(101)
    image = SAMImageTransform(model.sam_image_encoder.img_size)(load_image(path))[0]
    with torch.inference_mode():
        expected = model.sam_image_encoder(image[None])[0]
    assert torch.equal(cache.get(image_key(path)), expected)


def test_cli_without_sam_weights_is_a_one_line_error(tmp_path):
    result = run_script("cache_embeddings.py", f"dataset.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: sam_checkpoint: required")
