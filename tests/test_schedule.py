"""The learning-rate schedules against values worked out by hand from the release's formula, and the optimizer.

The release (train.py) builds timm's CosineLRScheduler(t_initial=epochs, lr_min=1e-6, warmup_t=5,
warmup_lr_init=1e-6) and calls step(epoch + 1) after every epoch, so epoch e trains at
    e < W:   1e-6 + e * (base - 1e-6) / W
    e >= W:  1e-6 + (base - 1e-6) * (1 + cos(pi * e / E)) / 2
The numbers below were computed by hand from that formula (cos(3pi/8) = 0.3826834324,
cos(3pi/4) = -0.7071067812, cos(7pi/8) = -0.9238795325, cos(pi/16) = 0.9807852804,
cos(pi/80) = 0.9992290362).
"""

from __future__ import annotations

import io

import pytest
import torch

from ssp_sam.engine.optim import adamw, build_schedule, release_epoch_lr
from ssp_sam.errors import ConfigError


def two_group_optimizer(lr: float = 1e-4, decoder_lr: float = 1e-5) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": decoder_lr}]
    )


# 8 epochs, 3 warm-up epochs, base lr 1e-4 (new modules) and 1e-5 (mask decoder), min lr 1e-6.
EXPECTED_NEW_MODULES = [1.0e-6, 3.4e-5, 6.7e-5, 6.944282990e-5, 5.05e-5, 3.155717010e-5, 1.549821433e-5, 4.767963141e-6]
EXPECTED_DECODER = [1.0e-6, 4.0e-6, 7.0e-6, 7.222075446e-6, 5.5e-6, 3.777924554e-6, 2.318019485e-6, 1.342542104e-6]


def test_per_epoch_schedule_is_the_releases():
    optimizer = two_group_optimizer()
    scheduler = build_schedule(optimizer, "per_epoch", epochs=8, steps_per_epoch=3, warmup_epochs=3, min_lr=1e-6)
    seen = []
    for _ in range(8):
        seen.append([group["lr"] for group in optimizer.param_groups])  # the rate this epoch trains at
        optimizer.step()
        scheduler.step()  # after the epoch, as the release's step(epoch + 1)
    assert [lrs[0] for lrs in seen] == pytest.approx(EXPECTED_NEW_MODULES, rel=1e-9)
    assert [lrs[1] for lrs in seen] == pytest.approx(EXPECTED_DECODER, rel=1e-9)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1e-6, 1e-6], rel=1e-12)  # after the last epoch


def test_release_recipe_values_for_refcoco():
    """80 epochs, 5 warm-up: epoch 0 at 1e-6, the warm-up stops short of 1e-4, the last epoch is above 1e-6."""
    def lr(epoch: int) -> float:
        return release_epoch_lr(epoch, 1e-4, epochs=80, warmup_epochs=5, min_lr=1e-6)

    assert lr(0) == pytest.approx(1.0e-6, rel=1e-12)
    assert lr(4) == pytest.approx(8.02e-5, rel=1e-9)
    assert lr(5) == pytest.approx(9.904887138e-5, rel=1e-9)
    assert lr(79) == pytest.approx(1.038162708e-6, rel=1e-8)
    # No warm-up (the release's pretraining): epoch 0 at the base rate, then the cosine.
    assert release_epoch_lr(0, 1e-4, epochs=20, warmup_epochs=0, min_lr=1e-6) == pytest.approx(1e-4, rel=1e-12)
    assert release_epoch_lr(10, 1e-4, epochs=20, warmup_epochs=0, min_lr=1e-6) == pytest.approx(5.05e-5, rel=1e-12)


def test_per_iteration_schedule_values():
    """Warm-up over 2 steps to the base rate, then a half cosine over the 8 remaining steps down to min_lr."""
    optimizer = two_group_optimizer(lr=1e-3, decoder_lr=1e-3)
    scheduler = build_schedule(optimizer, "per_iteration", epochs=5, steps_per_epoch=2, warmup_epochs=1, min_lr=1e-5)
    seen = []
    for _ in range(11):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # step 0: half the warm-up; 1 and 2: the base rate; 6: half way down the cosine; 10: the floor
    assert seen[0] == pytest.approx(1e-5 + 0.99e-3 * 0.5, rel=1e-12)
    assert seen[1] == pytest.approx(1e-3, rel=1e-12) and seen[2] == pytest.approx(1e-3, rel=1e-12)
    assert seen[6] == pytest.approx(5.05e-4, rel=1e-12)
    assert seen[10] == pytest.approx(1e-5, rel=1e-12)


def test_schedule_state_resumes_and_loads_safely():
    optimizer = two_group_optimizer()
    scheduler = build_schedule(optimizer, "per_epoch", epochs=8, steps_per_epoch=3, warmup_epochs=3, min_lr=1e-6)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # numbers only: no function pickled
    resumed_optimizer = two_group_optimizer()
    resumed = build_schedule(resumed_optimizer, "per_epoch", epochs=8, steps_per_epoch=3, warmup_epochs=3, min_lr=1e-6)
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["scheduler"])
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(EXPECTED_NEW_MODULES[4], rel=1e-9)
    resumed_optimizer.step()
    resumed.step()
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(EXPECTED_NEW_MODULES[5], rel=1e-9)
    assert resumed_optimizer.param_groups[1]["lr"] == pytest.approx(EXPECTED_DECODER[5], rel=1e-9)


def test_unknown_schedule_is_named():
    with pytest.raises(ConfigError, match="train.schedule.*per_epoch, per_iteration"):
        build_schedule(two_group_optimizer(), "step", epochs=8, steps_per_epoch=3, warmup_epochs=3, min_lr=1e-6)


def test_adamw_is_fused_on_a_cpu_and_steps_as_torchs_default_adamw():
    torch.manual_seed(0)
    initial = [torch.randn(5, 3), torch.randn(7)]
    runs = []
    for make in (lambda groups: adamw(groups, torch.device("cpu")), torch.optim.AdamW):
        params = [torch.nn.Parameter(weight.clone()) for weight in initial]
        optimizer = make([{"params": params[:1], "lr": 1e-2, "weight_decay": 0.1}, {"params": params[1:], "lr": 1e-3}])
        for step in range(3):
            for index, param in enumerate(params):
                param.grad = torch.sin(torch.arange(param.numel(), dtype=torch.float32).view_as(param) * (step + 1 + index))
            optimizer.step()
        runs.append((optimizer, params))
    (fused, fused_params), (default, default_params) = runs
    assert fused.defaults["fused"] is True and not default.defaults["fused"]
    assert not torch.allclose(fused_params[0], initial[0])  # the weights moved
    for ours, reference in zip(fused_params, default_params):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)


def test_adamw_resumes_the_state_of_torchs_default_adamw():
    """Trainer states written before the optimizer was fused hold torch's default AdamW state: a resumed
    run must continue it as the default AdamW would have."""
    torch.manual_seed(0)
    weight, gradients = torch.randn(6), [torch.randn(6) for _ in range(3)]
    default_param, fused_param = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    default = torch.optim.AdamW([default_param], lr=1e-2, weight_decay=0.1)
    for gradient in gradients[:2]:
        default_param.grad = gradient.clone()
        default.step()
    fused_param.data.copy_(default_param.data)
    fused = adamw([{"params": [fused_param], "lr": 1e-2, "weight_decay": 0.1}], torch.device("cpu"))
    saved = io.BytesIO()
    torch.save(default.state_dict(), saved)  # as a trainer state file holds it
    saved.seek(0)
    fused.load_state_dict(torch.load(saved, weights_only=True))
    default_param.grad, fused_param.grad = gradients[2].clone(), gradients[2].clone()
    default.step()
    fused.step()
    assert fused.state[fused_param]["step"].item() == 3
    torch.testing.assert_close(fused_param, default_param, rtol=1e-6, atol=1e-7)
