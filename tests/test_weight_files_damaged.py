"""Weight files damaged in their zip directory: one error line naming the file, never a traceback.

``zipfile.is_zipfile`` reads only the end record, so a file whose central directory is damaged passes it;
every reader (SAM, CLIP, a released checkpoint) must then still say which file is unreadable, in-process
and from the command line.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image

from ssp_sam.backbones.clip import build_clip_model
from ssp_sam.backbones.sam import build_sam
from ssp_sam.checkpoint import load_model, save_checkpoint
from ssp_sam.errors import CheckpointError
from ssp_sam.safe_pickle import read_torchscript_state_dict
from ssp_sam.weight_files import read_weights

from conftest import run_script, tiny_config, tiny_model, write_sam_file
from fixtures_weights import save_openai_torchscript, write_release_file

TINY_CLIP = {
    "embed_dim": 32, "image_size": 32, "patch_size": 8, "vision_width": 64, "vision_layers": 2,
    "vision_head_width": 16, "text_width": 32, "text_layers": 2, "text_heads": 2,
}
CENTRAL_ENTRY = b"PK\x01\x02"  # the signature of each central-directory entry
END_RECORD = b"PK\x05\x06"


def damage_central_directory(path: Path) -> Path:
    """Overwrite the signature of the zip's last central-directory entry, just before its end record."""
    data = bytearray(path.read_bytes())
    last = data.rfind(CENTRAL_ENTRY, 0, data.rfind(END_RECORD))
    assert last > 0
    data[last : last + 4] = b"XXXX"
    path.write_bytes(bytes(data))
    return path


def tiny_clip_file(path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(build_clip_model("custom", custom=TINY_CLIP).state_dict(), path)
    return path


def release_file(path: Path) -> Path:
    write_release_file(path, {"clip_proj.weight": torch.zeros(512, 512), "vl_pos_embed.weight": torch.zeros(325, 256)})
    return path


@pytest.mark.parametrize(
    "write, read, what",
    [
        (lambda path: write_sam_file(path, tiny_config().sam_custom, 0),
         lambda path: build_sam("custom", path, custom=tiny_config().sam_custom), "SAM checkpoint"),
        (tiny_clip_file, lambda path: build_clip_model("custom", path, custom=TINY_CLIP), "CLIP checkpoint"),
        (release_file, lambda path: load_model(path), "checkpoint"),
    ],
    ids=["sam", "clip", "release"],
)
def test_a_damaged_central_directory_is_one_error_naming_the_file(tmp_path, write, read, what):
    path = damage_central_directory(write(tmp_path / "weights.pth"))
    with pytest.raises(CheckpointError) as error:
        read(path)
    assert str(error.value) == f"{path}: not a readable {what} (damaged zip archive: Bad magic number for central directory)"


@pytest.mark.parametrize("kind", ["torch.save", "TorchScript"])
def test_weight_files_with_bytes_overwritten_load_or_are_refused_by_name(tmp_path, kind):
    """Random bytes overwritten (fixed seeds), half of the time in the central directory: whatever zipfile,
    zlib or torch raise must come out as a CheckpointError naming the file."""
    genuine = tmp_path / "genuine.pt"
    if kind == "torch.save":
        torch.save({"a": torch.arange(6.0), "b": {"c": torch.ones(2, 2, dtype=torch.float16)}}, genuine)
    else:
        torch.manual_seed(0)
        save_openai_torchscript(build_clip_model("custom", custom=TINY_CLIP), TINY_CLIP["image_size"], genuine)
    original = genuine.read_bytes()
    directory = original.find(CENTRAL_ENTRY)
    damaged, refused = tmp_path / "damaged.pt", 0
    for seed in range(150):
        rng = random.Random(seed)
        data = bytearray(original)
        start = directory if seed % 2 else 0
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(start, len(data))] = rng.randrange(256)
        damaged.write_bytes(bytes(data))
        try:
            read_weights(damaged, "CLIP checkpoint")
        except CheckpointError as error:
            assert str(error).startswith(f"{damaged}: "), error
            refused += 1
    assert refused > 0  # the damage was seen at least once


def test_a_torchscript_record_whose_header_says_deflated_is_refused(tmp_path):
    """A flipped compression method in the directory makes zipfile inflate stored bytes: zlib.error, named."""
    genuine, damaged = tmp_path / "clip.pt", tmp_path / "deflated.pt"
    torch.manual_seed(0)
    save_openai_torchscript(build_clip_model("custom", custom=TINY_CLIP), TINY_CLIP["image_size"], genuine)
    data = bytearray(genuine.read_bytes())
    entry = data.find(CENTRAL_ENTRY)
    while True:  # the directory entry of the first tensor record, "<name>/data/0"
        name_length = struct.unpack_from("<H", data, entry + 28)[0]
        if bytes(data[entry + 46 : entry + 46 + name_length]).endswith(b"/data/0"):
            break
        entry = data.find(CENTRAL_ENTRY, entry + 4)
        assert entry > 0
    struct.pack_into("<H", data, entry + 10, 8)  # compression method: deflate
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"^{damaged}: not a readable TorchScript archive \(Error -3 while decompressing"):
        read_torchscript_state_dict(damaged)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("damaged")
    save_checkpoint(tiny_model(), folder / "tiny")
    Image.new("RGB", (40, 30), (120, 30, 200)).save(folder / "scene.png")
    return folder


@pytest.mark.parametrize("which", ["sam", "clip", "release"])
def test_predict_names_a_damaged_weight_file_in_one_line(tiny_checkpoint, tmp_path, which):
    if which == "sam":
        damaged = damage_central_directory(write_sam_file(tmp_path / "sam.pth", tiny_config().sam_custom, 0))
        arguments, what = [f"checkpoint={tiny_checkpoint / 'tiny'}", f"model.sam_checkpoint={damaged}"], "SAM checkpoint"
    elif which == "clip":
        damaged = damage_central_directory(tiny_clip_file(tmp_path / "clip.pth"))
        arguments, what = [f"checkpoint={tiny_checkpoint / 'tiny'}", f"model.clip_checkpoint={damaged}"], "CLIP checkpoint"
    else:
        damaged = damage_central_directory(release_file(tmp_path / "ssp_sam_224.pth"))
        arguments, what = [f"checkpoint={damaged}"], "checkpoint"
    result = run_script(
        "predict.py", f"image={tiny_checkpoint / 'scene.png'}", "expressions=[the thing]", f"out_dir={tmp_path / 'out'}", "device=cpu", *arguments
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0] == f"error: {damaged}: not a readable {what} (damaged zip archive: Bad magic number for central directory)"
