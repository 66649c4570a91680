"""AdamW parameter groups and the cosine-with-warm-up schedule of the SSP-SAM recipe."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..model import SSPSAM


def parameter_groups(model: SSPSAM, lr: float, decoder_lr: float, weight_decay: float) -> list[dict]:
    """Two groups: the new modules (adapters, fusion, prompt generator) and SAM's mask decoder.

    Frozen encoders are left out entirely. The mask decoder's parameters are in their group even
    while the decoder is frozen (requires_grad False): AdamW skips parameters without gradients.
    """
    decoder = [p for n, p in model.named_parameters() if n.startswith("mask_head.mask_decoder.")]
    decoder_ids = {id(p) for p in decoder}
    frozen_prefixes = ("clip.", "sam_image_encoder.", "mask_head.prompt_encoder.")
    new = [p for n, p in model.named_parameters() if not n.startswith(frozen_prefixes) and id(p) not in decoder_ids]
    return [
        {"name": "new_modules", "params": new, "lr": lr, "weight_decay": weight_decay},
        {"name": "mask_decoder", "params": decoder, "lr": decoder_lr, "weight_decay": weight_decay},
    ]


def cosine_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """1 -> 0 along a half cosine after a linear warm-up from 1/warmup_steps to 1."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float) -> LambdaLR:
    """Per-group lr = min_lr + (base_lr - min_lr) * cosine_factor(step), stepped once per iteration."""

    def lambda_for(base_lr: float):
        floor = min(min_lr, base_lr)
        return lambda step: (floor + (base_lr - floor) * cosine_factor(step, total_steps, warmup_steps)) / base_lr

    return LambdaLR(optimizer, [lambda_for(group["lr"]) for group in optimizer.param_groups])
