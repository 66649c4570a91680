"""SAM embedding cache: exact entries, nothing stale, moved datasets, other weights, damage and its
repair, many writers (ranks, concurrent runs, kill -9), temporary files, workers, CLI."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fixtures_official as fx
from conftest import REPO, run_script, tiny_model
from ssp_sam.backbones.sam import build_sam
from ssp_sam.backbones.sam_frames import SAMImageTransform
from ssp_sam.checkpoint import save_checkpoint
from ssp_sam.data.embedding_cache import PREFIX, EmbeddingCache, EncoderIdentity, module_fingerprint
from ssp_sam import weight_identity
from ssp_sam.engine import caching
from ssp_sam.engine import precision as precision_module
from ssp_sam.engine.caching import build_cache, dataset_image_roots, ensure_cache, remembered_fingerprint
from ssp_sam.engine.distributed import DistInfo
from ssp_sam.errors import CacheError, ConfigError, ImageError
from ssp_sam.image_io import load_image

TINY_SAM = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml").sam_custom)
EMBEDDING_SHAPE = (32, 4, 4)  # (prompt_embed_dim, 64 / 16, 64 / 16)
CPU = torch.device("cpu")


def tiny_encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_sam("custom", custom=TINY_SAM, parts=("image_encoder",)).image_encoder


def never_built() -> nn.Module:
    raise AssertionError("the SAM encoder was built although nothing was to be computed")


def counting_copy(encoder: nn.Module) -> nn.Module:
    """A copy of ``encoder`` (same weights, so the same cache folder) counting the images it encodes in ``images_seen``."""
    twin = copy.deepcopy(encoder)
    twin.images_seen = 0
    twin.register_forward_pre_hook(lambda module, args: setattr(module, "images_seen", module.images_seen + args[0].shape[0]))
    return twin


def write_images(folder: Path, count: int, seed: int = 0, suffix: str = "png") -> list[Path]:
    """Images of random pixels and varied sizes; BMPs of one size have the same byte size whatever the pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        path = folder / f"image_{index}.{suffix}"
        Image.fromarray(rng.integers(0, 256, (20 + 3 * index, 40 - index, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def direct_embedding(encoder: nn.Module, path: Path) -> torch.Tensor:
    """The reference: SAM's transform and one plain encoder call on one image -> (C, h, w)."""
    with torch.inference_mode():
        return encoder(SAMImageTransform(64)(load_image(path))[0][None])[0]


def open_cache(root: Path, encoder: nn.Module, image_roots=(), **options) -> EmbeddingCache:
    return EmbeddingCache(root, EncoderIdentity("custom", module_fingerprint(encoder), 64), image_roots, **options)


def ensure(root, paths, encoder, image_roots=(), **options) -> EmbeddingCache:
    return ensure_cache(root, paths, image_roots, encoder, "custom", None, 64, CPU, progress=False, **options)


def entry_files(cache: EmbeddingCache) -> list[Path]:
    return sorted(cache.folder.glob("*/*.emb"))


@pytest.fixture(scope="module")
def encoder() -> nn.Module:
    return tiny_encoder()


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch):
    """dtype=auto follows precision=auto, which depends on the CPU: the tests fix it (fp32 on CPU)."""
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)


# ---------------------------------------------------------------------------------------- entries


def test_entries_equal_direct_encoder_calls(tmp_path, encoder):
    paths = write_images(tmp_path / "images", 3)
    cache = ensure(tmp_path / "cache", paths, encoder, [tmp_path / "images"], batch_size=2)

    assert (cache.last_build.computed, cache.last_build.cached, cache.last_build.repaired) == (3, 0, 0)
    assert cache.folder.parent == tmp_path / "cache" and cache.folder.name.startswith("custom-64-")
    assert len(entry_files(cache)) == 3 and cache.missing(paths, full=True) == []
    for path in paths:
        embedding = cache.get(path)
        assert embedding.dtype == torch.float32 and embedding.shape == EMBEDDING_SHAPE
        torch.testing.assert_close(embedding, direct_embedding(encoder, path), rtol=0, atol=1e-5)

    raw = cache.slot(paths[0]).file.read_bytes()
    magic, length, crc = PREFIX.unpack_from(raw)
    header = json.loads(raw[PREFIX.size : PREFIX.size + length])
    stat = paths[0].stat()
    assert magic == b"SSPEMB02" and crc == zlib.crc32(raw[PREFIX.size : PREFIX.size + length])
    assert header["payload_crc32"] == zlib.crc32(raw[PREFIX.size + length :])
    assert header["key"] == "image_0.png" and header["image"] == [stat.st_size, stat.st_mtime_ns]
    assert header["encoder"]["weights"] == module_fingerprint(encoder) and header["encoder"]["image_size"] == 64
    assert header["encoder"]["pixel_mean"] == pytest.approx([123.675, 116.28, 103.53])
    assert (header["dtype"], header["shape"]) == ("float32", list(EMBEDDING_SHAPE))
    assert len(raw) == PREFIX.size + length + 32 * 4 * 4 * 4


@pytest.mark.parametrize("dtype, storage", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_entries(tmp_path, encoder, dtype, storage):
    paths = write_images(tmp_path / "images", 2)
    cache = ensure(tmp_path / "cache", paths, encoder, dtype=dtype)
    for path in paths:
        expected = direct_embedding(encoder, path)
        # the direct fp32 embedding rounded to the storage dtype, up to one rounding step: the cache fills
        # batches, and fp32 results 1e-7 apart (another batch size, another kernel blocking) may round apart
        torch.testing.assert_close(cache.get(path), expected.to(storage).float(), rtol=torch.finfo(storage).eps, atol=1e-5)
    # "auto" uses entries of any dtype; an explicit other dtype recomputes them.
    counting = counting_copy(encoder)
    assert ensure(tmp_path / "cache", paths, counting).last_build.cached == 2 and counting.images_seen == 0
    fp32 = ensure(tmp_path / "cache", paths, counting, dtype="fp32")
    assert fp32.last_build.repaired == 2 and counting.images_seen == 2
    torch.testing.assert_close(fp32.get(paths[0]), direct_embedding(encoder, paths[0]), rtol=0, atol=1e-5)  # fp32 now
    # ...which the reader opened for the half dtype no longer takes for its own (the fp32 fill came after its check)
    with pytest.raises(CacheError, match=f"stored as float32, but this run reads {str(storage).split('.')[1]} entries only"):
        cache.get(paths[0])


def test_auto_dtype_on_a_native_bf16_cpu_computes_and_stores_bf16(tmp_path, encoder, monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    paths = write_images(tmp_path / "images", 2)
    cache = ensure(tmp_path / "cache", paths, encoder)
    for path in paths:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = direct_embedding(encoder, path).to(torch.bfloat16)
        stored = cache.get(path, dtype=None)  # as stored
        assert stored.dtype == torch.bfloat16
        assert torch.equal(stored, expected)


def test_resume_computes_only_missing_entries(tmp_path, encoder):
    paths = write_images(tmp_path / "images", 5)
    counting = counting_copy(encoder)
    ensure(tmp_path / "cache", paths[:3], counting)
    cache = ensure(tmp_path / "cache", paths, counting, batch_size=4)
    assert counting.images_seen == 5 and (cache.last_build.computed, cache.last_build.cached) == (2, 3)
    ensure(tmp_path / "cache", paths, counting, verify="full")
    assert counting.images_seen == 5
    for bad in ({"verify": "none"}, {"batch_size": 0}, {"stall_timeout": 0}, {"stall_timeout": "abc"}, {"dtype": "fp8"}):
        with pytest.raises(ConfigError, match=list(bad)[0]):
            ensure(tmp_path / "cache", paths, counting, **bad)


# ------------------------------------------------------------------------------------ nothing stale


def test_a_dataset_regenerated_in_place_is_recomputed_not_reused(tmp_path, encoder):
    """Issue 11.1: same file names, same byte sizes (BMP), new pixels -> the old embeddings must not be served."""
    paths = write_images(tmp_path / "images", 3, seed=1, suffix="bmp")
    sizes = [path.stat().st_size for path in paths]
    cache = ensure(tmp_path / "cache", paths, encoder, [tmp_path / "images"])
    old = [cache.get(path) for path in paths]

    time.sleep(0.01)  # a new modification time
    assert write_images(tmp_path / "images", 3, seed=2, suffix="bmp") == paths
    assert [path.stat().st_size for path in paths] == sizes
    with pytest.raises(CacheError, match="image_0.bmp: no SAM embedding .* the file changed since"):
        cache.get(paths[0])  # a reader never gets the old image's embedding

    counting = counting_copy(encoder)
    cache = ensure(tmp_path / "cache", paths, counting, [tmp_path / "images"])
    assert counting.images_seen == 3 and cache.last_build.computed == 3
    for path, before in zip(paths, old):
        new = cache.get(path)
        torch.testing.assert_close(new, direct_embedding(encoder, path), rtol=0, atol=1e-5)
        assert not torch.allclose(new, before)


def test_a_moved_dataset_keeps_its_cache(tmp_path, encoder):
    """Issue 12.1: keys are paths inside the image root, so moving the dataset recomputes nothing."""
    paths = write_images(tmp_path / "data" / "images" / "sub", 3)
    cache = ensure(tmp_path / "cache", paths, encoder, [tmp_path / "data" / "images"])
    before = [cache.get(path) for path in paths]
    assert cache.key(paths[1]) == "sub/image_1.png"

    (tmp_path / "data").rename(tmp_path / "moved")
    moved = [tmp_path / "moved" / "images" / "sub" / path.name for path in paths]
    counting = counting_copy(encoder)
    cache = ensure(tmp_path / "cache", moved, counting, [tmp_path / "moved" / "images"])
    assert counting.images_seen == 0 and (cache.last_build.computed, cache.last_build.cached) == (0, 3)
    assert all(torch.equal(cache.get(path), embedding) for path, embedding in zip(moved, before))


def test_embeddings_of_other_sam_weights_are_not_used(tmp_path, encoder):
    paths = write_images(tmp_path / "images", 2)
    ensure(tmp_path / "cache", paths, encoder)
    other = tiny_encoder(seed=1)
    counting = counting_copy(other)
    cache = ensure(tmp_path / "cache", paths, counting)
    assert counting.images_seen == 2  # another folder: nothing of the first encoder's is read
    torch.testing.assert_close(cache.get(paths[0]), direct_embedding(other, paths[0]), rtol=0, atol=1e-5)

    # The first encoder's entry put where the other's belongs is detected by its header and recomputed.
    first = open_cache(tmp_path / "cache", encoder)
    shutil.copyfile(first.slot(paths[0]).file, cache.slot(paths[0]).file)
    assert cache.problem(cache.slot(paths[0])) == "made by another SAM encoder or preprocessing"
    with pytest.raises(CacheError, match="made by another SAM encoder"):
        cache.get(paths[0])
    rebuilt = build_cache(cache, paths, counting, progress=False)
    assert (rebuilt.computed, rebuilt.cached) == (1, 1)  # get() removed it; now it is recomputed

    # Read-only: a cache holding only other weights is refused in one line naming what it holds.
    third = open_cache(tmp_path / "cache", tiny_encoder(seed=2), read_only=True)
    with pytest.raises(CacheError) as error:
        build_cache(third, paths, never_built, progress=False)
    message = str(error.value)
    assert "\n" not in message and "read-only cache without a valid embedding for 2 images" in message
    assert first.folder.name in message and cache.folder.name in message


def test_weights_fingerprint_is_hashed_once_and_remembered(tmp_path, monkeypatch):
    """One pass over the file serves the cache's key and the digests the weight checks ask for (one memo)."""
    monkeypatch.setenv("SSP_SAM_CACHE_HOME", str(tmp_path / "memo"))
    weights = tmp_path / "sam.pth"
    weights.write_bytes(os.urandom(3000))
    passes = []
    hash_file = weight_identity.hash_weights_file_digests
    monkeypatch.setattr(weight_identity, "hash_weights_file_digests", lambda path: passes.append(path) or hash_file(path))

    first = remembered_fingerprint(weights, tmp_path / "cache")
    assert first == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert remembered_fingerprint(weights, tmp_path / "cache") == first and len(passes) == 1  # remembered
    assert (tmp_path / "cache" / "fingerprints").is_dir()  # the cache says which file built it
    assert weight_identity.remembered_sha256(weights) == first  # the checkpoint record's digest: no new pass
    assert weight_identity.remembered_digest(weights, "md5") == hashlib.md5(weights.read_bytes()).hexdigest()
    assert len(passes) == 1

    weights.write_bytes(os.urandom(3000))  # new weights, same size, new mtime
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert remembered_fingerprint(weights, tmp_path / "cache") == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert len(passes) == 2


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ damage


def test_truncated_entries_and_bad_headers_are_detected_and_recomputed(tmp_path, encoder):
    paths = write_images(tmp_path / "images", 3)
    cache = ensure(tmp_path / "cache", paths, encoder)
    truncated, reshaped = cache.slot(paths[0]).file, cache.slot(paths[1]).file
    os.truncate(truncated, truncated.stat().st_size - 10)
    raw = reshaped.read_bytes()  # a header with a valid checksum but an impossible shape
    _, length, _ = PREFIX.unpack_from(raw)
    header = json.loads(raw[PREFIX.size : PREFIX.size + length])
    header["shape"] = [32, 4]
    new_header = json.dumps(header).encode()
    reshaped.write_bytes(PREFIX.pack(b"SSPEMB02", len(new_header), zlib.crc32(new_header)) + new_header + raw[PREFIX.size + length :])

    assert cache.problem(cache.slot(paths[0])).startswith("truncated")
    with pytest.raises(CacheError, match=r"is corrupt \(embedding shape \[32, 4\] is not \(C, h, w\)\)"):
        cache.get(paths[1])
    counting = counting_copy(encoder)
    rebuilt = ensure(tmp_path / "cache", paths, counting)
    assert counting.images_seen == 2 and rebuilt.missing(paths, full=True) == []
    assert (rebuilt.last_build.repaired, rebuilt.last_build.computed) == (1, 1)  # truncated: repaired; removed by get: computed


def test_unreadable_images_are_reported_after_the_others_are_cached(tmp_path, encoder):
    paths = write_images(tmp_path / "images", 3)
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ImageError, match=f"1 images could not be read .*{broken}"):
        ensure(tmp_path / "cache", [*paths, broken], encoder, batch_size=2)
    assert open_cache(tmp_path / "cache", encoder).missing([*paths, broken]) == [broken]


def test_old_temporary_files_are_removed_and_live_ones_kept(tmp_path, encoder):
    paths = write_images(tmp_path / "images", 2)
    cache = ensure(tmp_path / "cache", paths[:1], encoder)
    old, live = cache.folder / "tmp" / "dead.123.aa.tmp", cache.folder / "tmp" / "live.456.bb.tmp"
    old.write_bytes(b"x")
    live.write_bytes(b"y")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    ensure(tmp_path / "cache", paths, encoder)
    assert not old.exists() and live.exists()


# --------------------------------------------------------------------------------- many writers

WRITER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import torch
    from ssp_sam.backbones.sam import build_sam
    from ssp_sam.engine.caching import ensure_cache
    from ssp_sam.engine.distributed import DistInfo

    cache_dir, weights, images, root, custom, rank, world, delay = sys.argv[1:9]
    custom = json.loads(custom)

    class Slow(torch.nn.Module):  # SAM's encoder, slowed down; says when it starts computing
        def __init__(self):
            super().__init__()
            self.encoder = build_sam("custom", weights, custom, parts=("image_encoder",)).image_encoder
            self.img_size = self.encoder.img_size
        def forward(self, pixels):
            Path(cache_dir, f"computing-{rank}").touch()
            time.sleep(float(delay))
            return self.encoder(pixels)

    cache = ensure_cache(cache_dir, json.loads(images), [root], Slow, "custom", weights, custom["image_size"],
                         torch.device("cpu"), DistInfo(int(rank), int(world)), batch_size=1, progress=False, stall_timeout=1.0,
                         dtype="fp32")  # exact against fp32 direct calls on any CPU
    print(json.dumps({"computed": cache.last_build.computed, "cached": cache.last_build.cached}))
    """
)


def start_writer(tmp_path: Path, paths: list[Path], rank: int, world: int, delay: float) -> subprocess.Popen:
    """A cache writer process: rank ``rank`` of ``world``, its encoder sleeping ``delay`` s per image."""
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path / "cache"), str(tmp_path / "sam.pth"), json.dumps([str(p) for p in paths]),
         str(tmp_path / "images"), json.dumps(TINY_SAM), str(rank), str(world), str(delay)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def finish(process: subprocess.Popen) -> tuple[str, str]:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return out, err


@pytest.fixture
def weights_file(tmp_path, encoder) -> Path:
    torch.save({f"image_encoder.{name}": tensor for name, tensor in encoder.state_dict().items()}, tmp_path / "sam.pth")
    return tmp_path / "sam.pth"


def assert_complete_and_exact(cache: EmbeddingCache, paths: list[Path], encoder: nn.Module) -> None:
    assert cache.missing(paths, full=True) == []
    assert len(entry_files(cache)) == len(paths)  # one file per image: nothing lost, nothing twice
    assert not list((cache.folder / "tmp").glob("*"))
    for path in paths:
        torch.testing.assert_close(cache.get(path), direct_embedding(encoder, path), rtol=0, atol=1e-5)


def test_two_writers_started_at_once_both_finish(tmp_path, encoder, weights_file):
    paths = write_images(tmp_path / "images", 4)
    writers = [start_writer(tmp_path, paths, 0, 1, delay=0.1) for _ in range(2)]
    for writer in writers:
        result = json.loads(finish(writer)[0])
        assert result["computed"] + result["cached"] == 4
    cache = EmbeddingCache(tmp_path / "cache", EncoderIdentity("custom", _sha256(weights_file), 64), [tmp_path / "images"])
    assert_complete_and_exact(cache, paths, encoder)


def test_kill_9_of_a_writer_then_the_same_command_completes(tmp_path, encoder, weights_file):
    paths = write_images(tmp_path / "images", 6)
    victim = start_writer(tmp_path, paths, 1, 2, delay=2.0)  # rank 1 of 2, killed while computing
    deadline = time.monotonic() + 120
    while not (tmp_path / "cache" / "computing-1").exists():
        assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()[1]
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()

    out, err = finish(start_writer(tmp_path, paths, 1, 2, delay=0.0))  # the same command again
    # Its own share first; then no rank 0 writes anything, so after the stall timeout it takes rank 0's share over.
    assert f"computing the 3 still missing here (e.g. {paths[0]})" in err
    assert json.loads(out) == {"computed": 6, "cached": 0}
    cache = EmbeddingCache(tmp_path / "cache", EncoderIdentity("custom", _sha256(weights_file), 64), [tmp_path / "images"])
    assert_complete_and_exact(cache, paths, encoder)


# ---------------------------------------------------------------------------------------- readers


class CachedEmbeddings(Dataset):
    def __init__(self, cache: EmbeddingCache, paths: list[Path]) -> None:
        self.cache, self.paths = cache, paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.cache.get(self.paths[index])


def test_dataloader_workers_read_the_same_tensors(tmp_path, encoder):
    paths = write_images(tmp_path / "images", 4)
    cache = ensure(tmp_path / "cache", paths, encoder)
    expected = torch.stack([cache.get(path) for path in paths])
    state = pickle.dumps(cache)  # what a spawned worker receives: paths and settings, no embedding bytes
    assert len(state) < 4000 and torch.equal(pickle.loads(state).get(paths[1]), expected[1])
    loader = DataLoader(CachedEmbeddings(cache, paths), batch_size=2, num_workers=2, multiprocessing_context="fork")
    assert torch.equal(torch.cat(list(loader)), expected)


def test_image_roots_of_dataset_configs(tmp_path):
    assert dataset_image_roots({"format": "refer", "root": "d", "folder": "refcoco", "image_root": "d/coco"}) == [Path("d/coco")]
    assert dataset_image_roots({"format": "jsonl", "root": "d", "folder": "mine", "image_root": None}) == [Path("d/mine")]
    assert dataset_image_roots({"format": "jsonl", "path": "/x/val.jsonl", "image_root": None}) == [Path("/x")]
    merged = {"format": "merged", "root": "d", "sources": [{"format": "refer", "image_root": "d/coco"}, {"format": "jsonl", "folder": "j"}]}
    assert dataset_image_roots(merged) == [Path("d/coco"), Path("d/j")]


# ------------------------------------------------------------------------------------------ CLI


def cli_arguments(tmp_path: Path, data: Path, weights: Path) -> list[str]:
    custom = "{" + ", ".join(f"{key}: {value}" for key, value in TINY_SAM.items()) + "}"
    return [f"dataset.root={data}", f"sam_checkpoint={weights}", "sam_variant=custom", f"sam_custom={custom}",
            f"cache_dir={tmp_path / 'cache'}", "device=cpu", "progress=false",
            "dtype=fp32"]  # exact against fp32 direct calls on any CPU (auto is bf16 on native-bf16 CPUs)


def cli(tmp_path: Path, data: Path, weights: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_script("cache_embeddings.py", *cli_arguments(tmp_path, data, weights), *extra, cwd=tmp_path)


def test_cli_caches_what_is_missing_and_its_hint_repairs_a_checksum_mismatch(tmp_path, encoder, weights_file):
    data = tmp_path / "data"
    fx.write_refer(data)
    paths = [data / fx.COCO_IMAGE_DIR / fx.coco_file_name(image_id) for image_id in (101, 102, 103, 104)]
    cache = EmbeddingCache(tmp_path / "cache", EncoderIdentity("custom", _sha256(weights_file), 64), [data / fx.COCO_IMAGE_DIR])
    build_cache(cache, paths[1:2], encoder, progress=False)  # an earlier, partial run

    result = cli(tmp_path, data, weights_file, "batch_size=3")
    assert result.returncode == 0, result.stderr
    assert f"(train, val, testA, testB): 4 images -> {cache.folder}: computed 3, already cached 1, repaired 0" in result.stdout
    for path in paths:
        torch.testing.assert_close(cache.get(path), direct_embedding(encoder, path), rtol=0, atol=1e-5)

    entry = cache.slot(paths[2]).file
    data_bytes = bytearray(entry.read_bytes())
    data_bytes[-7] ^= 0x10  # a flipped payload bit: headers and sizes stay intact
    entry.write_bytes(data_bytes)
    with pytest.raises(CacheError) as error:
        cache.get(paths[2])
    message = str(error.value)
    assert "checksum mismatch" in message and str(paths[2]) in message and "scripts/cache_embeddings.py" in message
    # opened without the command that fills it: what the cache knows (its cache_dir, the SAM file its fingerprint
    # memo names, the variant), the rest as placeholders
    assert f"cache_dir={tmp_path / 'cache'} sam_checkpoint={weights_file} sam_variant=custom" in message
    assert "dataset=<its dataset config>" in message and "'sam_custom=<its sizes>'" in message

    repaired = cli(tmp_path, data, weights_file)
    assert repaired.returncode == 0, repaired.stderr
    assert "computed 1, already cached 3" in repaired.stdout
    torch.testing.assert_close(cache.get(paths[2]), direct_embedding(encoder, paths[2]), rtol=0, atol=1e-5)


def test_cli_under_torchrun_splits_the_missing_images_between_ranks(tmp_path, encoder, weights_file):
    """What torchrun gives each process (RANK, WORLD_SIZE): two processes, each computes its half, no process group."""
    data = tmp_path / "data"
    fx.write_refer(data)
    command = [sys.executable, str(REPO / "scripts" / "cache_embeddings.py"), *cli_arguments(tmp_path, data, weights_file), "stall_timeout=120"]
    ranks = [
        subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
        for rank in (0, 1)
    ]
    outputs = [finish(rank)[0] for rank in ranks]
    assert "rank 0/2: refcoco (train, val, testA, testB): 4 images" in outputs[0] and "computed 2, already cached 2" in outputs[0]
    assert "rank 1/2: refcoco" in outputs[1] and "computed 2, already cached 2" in outputs[1]
    paths = [data / fx.COCO_IMAGE_DIR / fx.coco_file_name(image_id) for image_id in (101, 102, 103, 104)]
    cache = EmbeddingCache(tmp_path / "cache", EncoderIdentity("custom", _sha256(weights_file), 64), [data / fx.COCO_IMAGE_DIR])
    assert_complete_and_exact(cache, paths, encoder)


def test_cli_uses_the_sam_encoder_of_our_checkpoint(tmp_path):
    fx.write_refer(tmp_path / "data")
    model = tiny_model()
    save_checkpoint(model, tmp_path / "run")
    result = run_script(
        "cache_embeddings.py", f"dataset.root={tmp_path / 'data'}", f"checkpoint={tmp_path / 'run'}",
        f"cache_dir={tmp_path / 'cache'}", "progress=false", "splits=[train]", "dtype=fp32", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    identity = EncoderIdentity("custom", module_fingerprint(model.sam_image_encoder), model.sam_image_size)
    cache = EmbeddingCache(tmp_path / "cache", identity, [tmp_path / "data" / fx.COCO_IMAGE_DIR])
    path = tmp_path / "data" / fx.COCO_IMAGE_DIR / fx.coco_file_name(101)
    torch.testing.assert_close(cache.get(path), direct_embedding(model.sam_image_encoder, path), rtol=0, atol=1e-5)


def test_cli_without_sam_weights_is_a_one_line_error(tmp_path):
    result = run_script("cache_embeddings.py", f"dataset.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: sam_checkpoint: required")


def test_the_command_a_damaged_entry_names_repairs_it(tmp_path, encoder, weights_file):
    """Opened with what a trainer knows (dataset arguments, a custom SAM's sizes, an fp32 reader), the message about a
    removed entry names a scripts/cache_embeddings.py command that, run as written, computes it again."""
    import shlex

    data = tmp_path / "data"
    fx.write_refer(data)
    paths = [data / fx.COCO_IMAGE_DIR / fx.coco_file_name(image_id) for image_id in (101, 102, 103, 104)]
    cache = ensure_cache(tmp_path / "cache", paths, [data / fx.COCO_IMAGE_DIR], encoder, "custom", str(weights_file), 64, CPU,
                         progress=False, dtype="fp32", sam_custom=TINY_SAM, dataset_arguments=f"dataset=refcoco dataset.root={data}")
    entry = cache.slot(paths[1]).file
    entry.write_bytes(entry.read_bytes()[:-3])
    with pytest.raises(CacheError) as error:
        cache.get(paths[1])
    message = str(error.value)
    assert message.startswith(f"{entry}: the cached SAM embedding of {paths[1]} is truncated") and "\n" not in message
    command = shlex.split(message.split("as does: ", 1)[1])
    assert command[:2] == ["python", "scripts/cache_embeddings.py"] and "dtype=fp32" in command and f"cache_dir={tmp_path / 'cache'}" in command
    done = subprocess.run([sys.executable, str(REPO / command[1]), *command[2:]], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "computed 1, already cached 3" in done.stdout
    torch.testing.assert_close(cache.get(paths[1]), direct_embedding(encoder, paths[1]), rtol=0, atol=1e-5)


def test_an_fp32_reader_refuses_entries_another_writer_turned_bf16(tmp_path, encoder):
    """The fp32 guarantee holds at every read, not only when the cache was filled: a concurrent
    `cache_embeddings.py dtype=bf16` on the same cache must not feed bf16 embeddings to a run that reports fp32."""
    paths = write_images(tmp_path / "images", 2)
    fp32 = ensure(tmp_path / "cache", paths, encoder, dtype="fp32")
    assert fp32.get(paths[0], dtype=None).dtype == torch.float32
    ensure(tmp_path / "cache", paths[:1], encoder, dtype="bf16")  # the other writer, after the fp32 run's fill
    with pytest.raises(CacheError) as error:
        fp32.get(paths[0], dtype=None)
    message = str(error.value)
    assert message.startswith(f"{fp32.slot(paths[0]).file}: the cached SAM embedding of {paths[0]} is stored as bfloat16, "
                              "but this run reads float32 entries only") and "\n" not in message
    assert fp32.get(paths[1]).dtype == torch.float32  # the others still serve
    assert ensure(tmp_path / "cache", paths[:1], encoder).get(paths[0], dtype=None).dtype == torch.bfloat16  # any dtype: fine


def test_a_missing_image_stops_every_writer_before_any_work(tmp_path, encoder):
    """Every rank stats every image: a file that is not there is named by each at once, nothing computed."""
    paths = write_images(tmp_path / "images", 3)
    gone = tmp_path / "images" / "gone.png"
    counting = counting_copy(encoder)
    for rank in (0, 1):
        started = time.monotonic()
        with pytest.raises(ImageError) as error:
            ensure(tmp_path / "cache", [*paths, gone], counting, dist_info=DistInfo(rank, 2), stall_timeout=300)
        assert str(error.value).startswith(f"{gone}: cannot read image") and "\n" not in str(error.value)
        assert time.monotonic() - started < 60
    assert counting.images_seen == 0 and not entry_files(open_cache(tmp_path / "cache", encoder))


def test_an_undecodable_image_stops_the_waiting_writers_at_once(tmp_path, encoder):
    """Rank 0 owns an image that exists but cannot be decoded: it caches its other images, marks that one and
    fails; rank 1, waiting for it with a 300 s stall timeout, stops as soon as it polls, naming the file. A mark left
    by an earlier command is not believed: the waiting rank then takes over after its stall timeout and fails by
    itself (or caches the image, had it become readable)."""
    paths = write_images(tmp_path / "images", 3)
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes(b"not a png")
    images = [broken, *paths]  # images[0::2] are rank 0's: broken and paths[1]
    with pytest.raises(ImageError, match=f"1 images could not be read .*{broken}"):
        ensure(tmp_path / "cache", images, encoder, dist_info=DistInfo(0, 2))
    started = time.monotonic()
    with pytest.raises(ImageError) as error:
        ensure(tmp_path / "cache", images, encoder, dist_info=DistInfo(1, 2), stall_timeout=300)
    assert time.monotonic() - started < 30
    message = str(error.value)
    assert message.startswith(f"{broken}: ") and "found by another cache writer" in message and "\n" not in message
    cache = open_cache(tmp_path / "cache", encoder)
    assert cache.missing(images) == [broken]  # everything else cached by the two ranks

    for mark in (cache.folder / "unreadable").glob("*.txt"):  # left by a command two hours ago
        os.utime(mark, (time.time() - 7200, time.time() - 7200))
    with pytest.raises(ImageError) as error:
        ensure(tmp_path / "cache", images, encoder, dist_info=DistInfo(1, 2), stall_timeout=0.5)
    assert "found by another cache writer" not in str(error.value) and str(broken) in str(error.value)


@pytest.mark.parametrize("extra, message", [
    (("'splits=[]'",), "error: splits: an empty list names no split to cache"),
    (("checkpoint={run}", "sam_variant=vit_b"), "error: sam_variant: the SAM image encoder comes from checkpoint={run}"),
    (("checkpoint={run}", "sam_custom={{image_size: 64}}"), "error: sam_custom: the SAM image encoder comes from checkpoint={run}"),
    (("checkpoint={run}", "sam_variant=custom", "sam_custom={{image_size: 64}}"), "error: sam_variant and sam_custom: the SAM image encoder"),
])
def test_cli_refuses_arguments_it_would_ignore(tmp_path, extra, message):
    """`splits=[]` cached nothing and exited 0; beside checkpoint=, whose config says which SAM encoder it holds,
    sam_variant and sam_custom were silently ignored."""
    fx.write_refer(tmp_path / "data")
    save_checkpoint(tiny_model(), tmp_path / "run")
    arguments = [argument.format(run=tmp_path / "run").strip("'") for argument in extra]
    result = run_script("cache_embeddings.py", f"dataset.root={tmp_path / 'data'}", f"cache_dir={tmp_path / 'cache'}",
                        "progress=false", *arguments, *([] if any(a.startswith("checkpoint=") for a in arguments) else ["sam_checkpoint=x.pth"]),
                        cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(message.format(run=tmp_path / "run")), result.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("*/*/*.emb"))
