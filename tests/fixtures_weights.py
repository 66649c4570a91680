"""Weight files written the way their publishers write them, and crafted ones that must be refused.

- :func:`write_release_file`: an SSP-SAM release checkpoint as the release's train.py saves it,
  ``torch.save({"model", "optimizer", "lr_scheduler", "epoch", "args"})`` with a real AdamW state
  dict, a timm cosine scheduler's state dict and the run's ``argparse.Namespace``.
- :func:`save_openai_torchscript`: a genuine TorchScript archive of a CLIP with OpenAI's module and
  parameter names (traced and saved by torch.jit, fp16 as OpenAI's files), like ``ViT-B-16.pt``.
- :func:`with_ovss_encoder_files`: an OVSS model config whose CLIP and SAM come from random weight files
  written in their publishers' layouts (open_clip state dict, Meta's flat .pth).
- :func:`write_file_creating_pickle`, :func:`write_file_creating_torchscript`: files whose
  unpickling by an unrestricted reader creates a file on disk.
"""

from __future__ import annotations

import argparse
import pickle
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import torch
from timm.scheduler.cosine_lr import CosineLRScheduler
from torch import nn

from ssp_sam.backbones.clip import build_clip_model
from ssp_sam.backbones.sam import build_sam

# The release's checkpoint names of its three optimizer groups (train.py): SAM's mask decoder at
# lr_backbone, the VL transformer and the remaining trainable modules at lr.
_DECODER, _VL = "sam.mask_decoder.", "vl_transformer."


def release_args(clip_pretrained: str, **overrides) -> argparse.Namespace:
    """The release's run arguments (train.py's parser defaults merged with configs/SSP_SAM_CLIP_*_FT_unc.py)."""
    size = 336 if "336" in clip_pretrained else 224
    values = {
        "is_pretrain": False, "lr": 1e-4, "lr_backbone": 1e-5, "lr_vis_enc": 1e-5, "batch_size": 8,
        "weight_decay": 1e-4, "epochs": 80, "lr_drop": 60, "clip_max_norm": 0.1, "checkpoint_step": 5,
        "checkpoint_latest": True, "checkpoint_best": True, "load_weights_path": None,
        "freeze_modules": ["sam.mask_decoder"], "freeze_param_names": [], "freeze_epochs": 20,
        "max_query_len": 40, "aux_loss": True, "bbox_loss_coef": 5, "giou_loss_coef": 2, "dice_loss_coef": 4,
        "focal_loss_coef": 4, "other_loss_coefs": {}, "dataset": "unc", "test_split": "val",
        "output_dir": "outputs/your_save_folder", "device": "cuda", "seed": 3407, "resume": "",
        "resume_from_pretrain": f"ckpts/vpp-sam/merge/{size}px/pretrain/checkpoint0020.pth",
        "start_epoch": 0, "eval": False, "num_workers": 16, "pin_memory": True,
        "train_transforms": [
            {"type": "RandomResize", "sizes": [size], "record_resize_info": True},
            {"type": "ToTensor", "keys": []},
            {"type": "NormalizeAndPad", "size": size, "aug_translate": True},
        ],
        "world_size": 1, "dist_url": "env://", "distributed": False,
        "config": f"configs/SSP_SAM_CLIP_{'L' if size == 336 else 'B'}_FT_unc.py", "clip_pretrained": clip_pretrained,
    }
    return argparse.Namespace(**{**values, **overrides})


def _optimizer_and_scheduler(state: dict[str, torch.Tensor], args: argparse.Namespace) -> tuple[dict, dict]:
    """State dicts of a real AdamW (the release's three groups) after one step, and of its scheduler.

    One small stand-in parameter per released tensor keeps the fixture small: the container's
    structure (step counts, moments, group hyper-parameters) is what a reader must accept.
    """
    names = [key for key in state if not key.startswith(("sam.image_encoder.", "sam.prompt_encoder.", "encoder."))]
    stand_ins = {key: nn.Parameter(torch.full((2,), 0.5)) for key in names}
    groups = [
        {"params": [p for k, p in stand_ins.items() if k.startswith(_DECODER)], "lr": args.lr_backbone},
        {"params": [p for k, p in stand_ins.items() if k.startswith(_VL)], "lr": args.lr},
        {"params": [p for k, p in stand_ins.items() if not k.startswith((_DECODER, _VL))], "lr": args.lr},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    for parameter in stand_ins.values():
        parameter.grad = torch.full_like(parameter, 0.1)
    optimizer.step()
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs, lr_min=1e-6, warmup_t=5, warmup_lr_init=1e-6)
    scheduler.step(3)
    return optimizer.state_dict(), scheduler.state_dict()


def write_release_file(
    path: Path, state: dict[str, torch.Tensor], clip_pretrained: str = "pretrained_checkpoints/CS/CS-ViT-B-16.pt",
    epoch: int = 79, **arg_overrides,
) -> None:
    """``state`` saved as the release's train.py saves checkpoint_latest.pth."""
    args = release_args(clip_pretrained, **arg_overrides)
    optimizer, scheduler = _optimizer_and_scheduler(state, args)
    torch.save({"model": state, "optimizer": optimizer, "lr_scheduler": scheduler, "epoch": epoch, "args": args}, path)


# ----------------------------------------------------------------------------- OpenAI's TorchScript CLIP


class _OpenAIStyleCLIP(nn.Module):
    """An open_clip CLIP's modules under OpenAI's names, with the three scalar buffers OpenAI's
    archives carry; the text transformer's causal mask is a plain attribute, as in OpenAI's model."""

    def __init__(self, clip: nn.Module, image_size: int) -> None:
        super().__init__()
        self.visual, self.transformer, self.token_embedding, self.ln_final = (
            clip.visual, clip.transformer, clip.token_embedding, clip.ln_final,
        )
        self.positional_embedding, self.text_projection, self.logit_scale = (
            clip.positional_embedding, clip.text_projection, clip.logit_scale,
        )
        self.attn_mask = clip.attn_mask.clone()
        self.register_buffer("input_resolution", torch.tensor(image_size))
        self.register_buffer("context_length", torch.tensor(clip.context_length))
        self.register_buffer("vocab_size", torch.tensor(clip.vocab_size))

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        x = self.ln_final(self.transformer(self.token_embedding(text) + self.positional_embedding, attn_mask=self.attn_mask))
        sentence = x[torch.arange(x.shape[0]), text.argmax(-1)] @ self.text_projection
        return self.visual(image), sentence, self.logit_scale.exp()


def save_openai_torchscript(clip: nn.Module, image_size: int, path: Path) -> None:
    """Trace ``clip`` (an open_clip CLIP) as OpenAI's model and save it, in fp16, with torch.jit."""
    module = _OpenAIStyleCLIP(clip, image_size)
    example = (torch.zeros(1, 3, image_size, image_size), torch.zeros(1, clip.context_length, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False).half()
        torch.jit.save(traced, str(path))


# ----------------------------------------------------------------------------- crafted files


class _CreatesFile:
    """Unpickled by a plain pickle reader, this opens (so creates) ``target`` for writing."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return open, (str(self.target), "w")


def write_file_creating_pickle(path: Path, target: Path) -> None:
    """A torch.save file of a "state dict" whose unpickling creates ``target``."""
    torch.save({"visual.proj": torch.zeros(2, 2), "model": _CreatesFile(target)}, path)


def copy_with_record(archive: Path, path: Path, name_suffix: str, data: bytes) -> None:
    """A copy of a zip archive in which the record whose name ends with ``name_suffix`` holds ``data``."""
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            out.writestr(info.filename, data if info.filename.endswith(name_suffix) else source.read(info))


def write_file_creating_torchscript(genuine: Path, path: Path, target: Path) -> bytes:
    """A copy of a genuine TorchScript archive whose data.pkl creates ``target`` when unpickled.

    Returns the crafted data.pkl, so a test can show what an unrestricted reader does with it.
    """
    crafted = pickle.dumps(_CreatesFile(target), protocol=2)
    copy_with_record(genuine, path, "/data.pkl", crafted)
    return crafted


def with_ovss_encoder_files(cfg, folder: Path, seed: int):
    """``cfg`` (an OVSSModelConfig) with its CLIP and SAM read from random weight files written into
    ``folder`` (clip.pt: an open_clip state dict; sam.pth: Meta's flat layout), as a run names them."""
    torch.manual_seed(seed)
    torch.save(build_clip_model(cfg.clip.arch, None, cfg.clip.custom).state_dict(), folder / "clip.pt")
    torch.save(build_sam(cfg.sam.variant, None, cfg.sam.custom).state_dict(), folder / "sam.pth")
    return replace(cfg, random_encoders=False, clip=replace(cfg.clip, checkpoint=str(folder / "clip.pt")),
                   sam=replace(cfg.sam, checkpoint=str(folder / "sam.pth")))
