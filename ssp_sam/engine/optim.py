"""AdamW parameter groups and the learning-rate schedules of the SSP-SAM recipe.

Two schedules, both cosine to ``min_lr`` after a linear warm-up:

- ``per_epoch`` (the release): the learning rate changes once per epoch, as the release's
  ``timm`` ``CosineLRScheduler(t_initial=epochs, lr_min=1e-6, warmup_t=5, warmup_lr_init=1e-6)``
  stepped with ``step(epoch + 1)`` after every epoch computes it (:func:`release_epoch_lr`).
- ``per_iteration``: a smooth cosine updated after every optimizer step, with the warm-up
  ending exactly at the base learning rate (:func:`per_iteration_lr`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LRScheduler

from ..errors import ConfigError
from ..model import SSPSAM

SCHEDULES = ("per_epoch", "per_iteration")


def parameter_groups(
    model: SSPSAM, lr: float, decoder_lr: float, weight_decay: float, text_encoder_lr: float = 0.0, image_encoder_lr: float = 0.0
) -> list[dict]:
    """Two groups: the new modules (adapters, fusion, prompt generator) and SAM's mask decoder; then
    "text_encoder" at ``text_encoder_lr`` when the model fine-tunes CLIP's text tower, and
    "image_encoder" at ``image_encoder_lr`` when it fine-tunes CLIP's last vision blocks.

    Frozen encoders are left out entirely. The mask decoder's parameters are in their group even
    while the decoder is frozen (requires_grad False): AdamW skips parameters without gradients.
    """
    decoder = [p for n, p in model.named_parameters() if n.startswith("mask_head.mask_decoder.")]
    decoder_ids = {id(p) for p in decoder}
    frozen_prefixes = ("clip.", "sam_image_encoder.", "mask_head.prompt_encoder.")
    new = [p for n, p in model.named_parameters() if not n.startswith(frozen_prefixes) and id(p) not in decoder_ids]
    groups = [
        {"name": "new_modules", "params": new, "lr": lr, "weight_decay": weight_decay},
        {"name": "mask_decoder", "params": decoder, "lr": decoder_lr, "weight_decay": weight_decay},
    ]
    for name, params, group_lr in (
        ("text_encoder", model.clip.finetuned_text_parameters(), text_encoder_lr),
        ("image_encoder", model.clip.finetuned_image_parameters(), image_encoder_lr),
    ):
        if params:
            groups.append({"name": name, "params": params, "lr": group_lr, "weight_decay": weight_decay})
    return groups


def adamw(groups: list[dict], device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``groups``, fused (one kernel over all tensors of a group) on CPUs and CUDA.

    Why fused: PyTorch's default AdamW (tensor-list operations on CUDA, a loop over the tensors on a CPU)
    reads and writes every weight a dozen times per step; the fused kernel reads each once. SSP-SAM-224's 17.6 M trainable weights, one step on 2 CPU
    cores: 70 -> 20 ms with AVX-512, 140 -> 60 ms with AVX2 kernels (benchmarks/README.md), about 3 %
    of a training step from cached embeddings. With fp16's gradient scaler it also takes the found-inf
    flag on the device, so the scaler never reads it back to the host. Same update rule (a step equal
    to the default one to float rounding, tested).
    """
    return torch.optim.AdamW(groups, fused=device.type in ("cpu", "cuda") or None)


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float | None) -> None:
    """Backward of ``loss`` (scaled for fp16), the gradients of ``model``'s trainable parameters clipped to L2 norm
    ``grad_clip`` (None: not clipped), one optimizer step. No host sync: the fused AdamW takes fp16's found-inf
    flag on the device."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    scaler.step(optimizer)
    scaler.update()


def release_epoch_lr(epoch: int, base_lr: float, epochs: int, warmup_epochs: int, min_lr: float) -> float:
    """The learning rate of epoch ``epoch`` (0-based) in the released recipe.

    With W warm-up epochs and E epochs (timm's CosineLRScheduler, warmup_prefix=False):

        epoch e < W:      min_lr + e * (base_lr - min_lr) / W          (epoch 0 trains at min_lr)
        W <= e < E:       min_lr + (base_lr - min_lr) * (1 + cos(pi * e / E)) / 2
        e >= E:           min_lr                                        (after the last epoch)

    The cosine counts from epoch 0, not from the end of the warm-up, so the rate never quite
    reaches ``base_lr`` (epoch W - 1 ends the warm-up below it and epoch W starts the cosine at
    its value for e = W); the last epoch trains at the cosine's value for e = E - 1, above
    ``min_lr``. The warm-up starts from ``min_lr`` (the release: warmup_lr_init = lr_min = 1e-6)
    for every parameter group. Without warm-up (W = 0) epoch 0 trains at ``base_lr``.
    """
    if epoch < warmup_epochs:
        return min_lr + epoch * (base_lr - min_lr) / warmup_epochs
    if epoch >= epochs:
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * epoch / epochs))


def per_iteration_lr(step: int, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float) -> float:
    """Learning rate after ``step`` optimizer steps: linear warm-up from base_lr / warmup_steps to
    base_lr, then a half cosine from base_lr down to min(min_lr, base_lr) at ``total_steps``."""
    floor = min(min_lr, base_lr)
    if warmup_steps > 0 and step < warmup_steps:
        factor = (step + 1) / warmup_steps
    else:
        progress = min(max(step - warmup_steps, 0) / max(total_steps - warmup_steps, 1), 1.0)
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (base_lr - floor) * factor


class FunctionLR(LRScheduler):
    """Every group's lr = ``lr_at(count, group's base lr)``, ``count`` = the number of ``step()`` calls.

    The state (``state_dict``) holds only numbers, so a resumed run continues the schedule and the
    trainer state loads with ``torch.load(weights_only=True)``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr_at: Callable[[int, float], float]) -> None:
        self.lr_at = lr_at
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch, base_lr) for base_lr in self.base_lrs]

    def state_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "lr_at")}


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float) -> FunctionLR:
    """The per-iteration schedule over ``total_steps`` optimizer steps; call ``step()`` after each."""
    return FunctionLR(optimizer, lambda step, base: per_iteration_lr(step, base, total_steps, warmup_steps, min_lr))


def build_schedule(
    optimizer: torch.optim.Optimizer, schedule: str, epochs: int, steps_per_epoch: int, warmup_epochs: int, min_lr: float
) -> FunctionLR:
    """The schedule named by ``train.schedule``; step it once per epoch (per_epoch) or per optimizer step."""
    if schedule == "per_epoch":
        return FunctionLR(optimizer, lambda epoch, base: release_epoch_lr(epoch, base, epochs, warmup_epochs, min_lr))
    if schedule == "per_iteration":
        return cosine_schedule(optimizer, epochs * steps_per_epoch, warmup_epochs * steps_per_epoch, min_lr)
    raise ConfigError(f"train.schedule: unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
