"""Weight files are read without running anything in them, and give what torch.jit.load would.

The TorchScript archives here are genuine (torch.jit traced or scripted, then torch.jit.save); the
crafted files are shown to create a file on disk when read by an unrestricted reader before our
readers are shown to refuse them without creating it.
"""

from __future__ import annotations

import pickle
import warnings
from typing import Tuple

import pytest
import torch
from torch import nn

from ssp_sam.backbones.clip import build_clip_model
from ssp_sam.backbones.sam import build_sam
from ssp_sam.checkpoint import load_model
from ssp_sam.errors import CheckpointError
from ssp_sam.safe_pickle import read_torchscript_state_dict
from ssp_sam.weight_files import read_weights

from fixtures_weights import (
    copy_with_record,
    save_openai_torchscript,
    write_file_creating_pickle,
    write_file_creating_torchscript,
    write_release_file,
)

TINY_CLIP = {
    "embed_dim": 32, "image_size": 32, "patch_size": 8, "vision_width": 64, "vision_layers": 2,
    "vision_head_width": 16, "text_width": 32, "text_layers": 2, "text_heads": 2,
}


def jit_state_dict(path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())


def assert_same_state_dict(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert list(ours) == list(reference)
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key


@pytest.fixture(scope="module")
def openai_archive(tmp_path_factory):
    """A traced fp16 CLIP under OpenAI's names, saved by torch.jit (as OpenAI's ViT-B-16.pt is)."""
    torch.manual_seed(3)
    clip = build_clip_model("custom", custom=TINY_CLIP)
    path = tmp_path_factory.mktemp("clip") / "ViT-tiny.pt"
    save_openai_torchscript(clip, TINY_CLIP["image_size"], path)
    return path, clip


def test_openai_style_archive_reads_as_torch_jit_load(openai_archive):
    path, clip = openai_archive
    ours = read_torchscript_state_dict(path)
    assert_same_state_dict(ours, jit_state_dict(path))
    # And those are the traced model's weights, in OpenAI's fp16, plus OpenAI's three scalars.
    assert {"input_resolution", "context_length", "vocab_size"} <= set(ours)
    assert int(ours["context_length"]) == 77 and int(ours["input_resolution"]) == 32
    for key, value in clip.state_dict().items():
        assert ours[key].dtype == torch.float16 and torch.equal(ours[key], value.half()), key


class _Scripted(nn.Module):
    """Script-only features: a Linear without bias (a None parameter), a plain tensor attribute
    (not in the state dict), a buffer, a submodule list and a shared submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2, bias=False)
        self.blocks = nn.ModuleList([nn.LayerNorm(2), nn.LayerNorm(2)])
        self.shared = self.blocks[0]
        self.register_buffer("counts", torch.arange(4, dtype=torch.int32))
        self.plain = torch.full((5,), 7.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(self.proj(x)) if x.shape[-1] == 3 else block(x)
        return self.shared(x) * self.plain.sum()


def test_scripted_module_reads_as_torch_jit_load(tmp_path):
    torch.manual_seed(4)
    module = _Scripted()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_()
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(module).save(str(path))
    reference = jit_state_dict(path)
    assert "plain" not in reference and "proj.bias" not in reference and "shared.weight" in reference
    assert_same_state_dict(read_torchscript_state_dict(path), reference)


class _Talkative(nn.Module):
    """A module restored by its own TorchScript __setstate__, which prints when it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        print("ARCHIVE CODE RAN")
        self.weight = state[0]
        self.training = state[1]


def test_archive_code_runs_under_jit_load_but_never_here(tmp_path, capfd):
    path = tmp_path / "talkative.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(_Talkative()).save(str(path))
    jit_state_dict(path)
    assert "ARCHIVE CODE RAN" in capfd.readouterr().out  # torch.jit.load runs the archive's code
    with pytest.raises(CheckpointError) as error:
        read_torchscript_state_dict(path)
    assert "ARCHIVE CODE RAN" not in capfd.readouterr().out
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert "_Talkative is restored by its own __setstate__ code, which is never run" in message


def test_crafted_torchscript_archive_creates_no_file(openai_archive, tmp_path):
    genuine, _ = openai_archive
    target = tmp_path / "created_by_the_archive"
    crafted = tmp_path / "ViT-B-16.pt"
    data_pkl = write_file_creating_torchscript(genuine, crafted, target)
    pickle.loads(data_pkl).close()  # what an unrestricted unpickler does with it
    assert target.exists()
    target.unlink()
    with pytest.raises(CheckpointError) as error:
        build_clip_model("custom", crafted, custom=TINY_CLIP)
    message = str(error.value)
    assert not target.exists()
    assert "\n" not in message and str(crafted) in message
    assert "refused, the pickle asks for io.open" in message and "nothing was run" in message


@pytest.mark.parametrize("reader", ["clip", "sam", "release", "read_weights"])
def test_crafted_torch_pickle_creates_no_file(tmp_path, reader):
    target = tmp_path / "created_by_the_pickle"
    path = tmp_path / "weights.pth"
    write_file_creating_pickle(path, target)
    torch.load(path, weights_only=False)  # what an unrestricted reader does with it
    assert target.exists()
    target.unlink()
    read = {
        "clip": lambda: build_clip_model("custom", path, custom=TINY_CLIP),
        "sam": lambda: build_sam("vit_b", path, parts=("mask_decoder",)),
        "release": lambda: load_model(path),
        "read_weights": lambda: read_weights(path, "weights"),
    }[reader]
    with pytest.raises(CheckpointError) as error:
        read()
    assert not target.exists()
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "refused, the pickle asks for io.open" in message


def test_storage_records_are_bounds_checked(openai_archive, tmp_path):
    """A tensor that claims more values than its storage record holds is refused, not read past the end."""
    genuine, _ = openai_archive
    broken = tmp_path / "short.pt"
    copy_with_record(genuine, broken, "/data/0", b"\x00\x00")
    with pytest.raises(CheckpointError, match=r"short\.pt: refused, storage record .*/data/0 holds 2 bytes"):
        read_torchscript_state_dict(broken)


def test_archive_without_declarations_is_refused(openai_archive, tmp_path):
    """The state dict is what the archive's code declares; an archive without its code is not guessed at."""
    genuine, _ = openai_archive
    stripped = tmp_path / "stripped.pt"
    copy_with_record(genuine, stripped, ".py", b"")  # every code file emptied
    with pytest.raises(CheckpointError, match=r"stripped\.pt: refused, module class __torch__\.\S+ is not declared"):
        read_torchscript_state_dict(stripped)


def test_release_file_given_as_clip_or_sam_says_so(tmp_path):
    """Swapping checkpoint= and a backbone's weight file is named, not reported as a generic refusal."""
    path = tmp_path / "ssp_sam_224.pth"
    write_release_file(path, {"clip_proj.weight": torch.zeros(512, 512), "vl_pos_embed.weight": torch.zeros(325, 256)})
    for read, what in [
        (lambda: build_clip_model("custom", path, custom=TINY_CLIP), "CLIP checkpoint"),
        (lambda: build_sam("vit_h", path, parts=("mask_decoder",)), "SAM checkpoint"),
    ]:
        with pytest.raises(CheckpointError) as error:
            read()
        assert str(error.value) == (
            f"{path}: holds a training run's arguments (argparse.Namespace), as SSP-SAM release checkpoints do; "
            f"expected a {what} (nothing was run)"
        )
    plain = tmp_path / "model_only.pth"
    torch.save({"model": {"clip_proj.weight": torch.zeros(2, 2)}, "epoch": 3}, plain)
    with pytest.raises(CheckpointError, match=r"model_only\.pth: not a state dict of tensors, not a CLIP checkpoint"):
        build_clip_model("custom", plain, custom=TINY_CLIP)
