"""Run-time precision choice: auto picks what is fast on the hardware, forced choices are checked."""

from __future__ import annotations

import warnings

import pytest
import torch

from ssp_sam.engine import precision as precision_module
from ssp_sam.engine.precision import resolve_precision
from ssp_sam.errors import ConfigError

CPU = torch.device("cpu")


@pytest.fixture
def native_bf16(monkeypatch):
    def set_native(value: bool) -> None:
        monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: value)

    return set_native


def test_auto_on_cpu_is_bf16_only_where_native(native_bf16):
    """The issue: auto = bf16 on CPUs with native bf16, fp32 where bf16 is emulated (5.7x slower there)."""
    native_bf16(True)
    chosen = resolve_precision("auto", CPU)
    assert chosen.name == "bf16" and "native bf16" in chosen.reason
    native_bf16(False)
    chosen = resolve_precision("auto", CPU)
    assert chosen.name == "fp32" and "without native bf16" in chosen.reason


def test_forced_bf16_on_emulating_cpu_warns(native_bf16):
    native_bf16(False)
    with pytest.warns(UserWarning, match="slower than fp32"):
        assert resolve_precision("bf16", CPU, key="train.precision").name == "bf16"
    native_bf16(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", CPU).name == "bf16"


def test_fp16_on_cpu_and_unknown_values_are_refused():
    with pytest.raises(ConfigError, match="eval.precision=fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU, key="eval.precision")
    with pytest.raises(ConfigError, match="train.precision: must be one of auto, fp32, bf16, fp16, got 'half'"):
        resolve_precision("half", CPU, key="train.precision")


def test_fp32_runs_without_autocast():
    chosen = resolve_precision("fp32", CPU)
    with chosen.autocast(CPU):
        assert not torch.is_autocast_enabled("cpu")
    with resolve_precision("bf16", CPU).autocast(CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_cpuinfo_flags_detect_native_bf16(monkeypatch, tmp_path):
    """Without torch's probes, the kernel's flags decide (x86 AMX / AVX512-BF16, Arm BF16)."""
    # PyTorch's kernels as on a CPU whose flags are in question, whatever the host's: on an AVX2-only host
    # they are AVX2's, which rules native bf16 out before the flags are read (the test below)
    monkeypatch.setattr(precision_module.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(precision_module, "_cpuinfo_flags", lambda: {"avx2", "fma"})
    assert not precision_module.cpu_has_native_bf16()
    monkeypatch.setattr(precision_module, "_cpuinfo_flags", lambda: {"avx2", "amx_bf16"})
    assert precision_module.cpu_has_native_bf16()


def test_x86_kernels_limited_to_avx2_count_as_no_native_bf16(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 / ONEDNN_MAX_CPU_ISA=AVX2 run an AVX2-only CPU's kernels on any x86 CPU:
    bf16 is emulated there, so auto must pick fp32 whatever the hardware flags say."""
    monkeypatch.setattr(precision_module.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(precision_module, "_cpuinfo_flags", lambda: {"avx2", "amx_bf16", "avx512_bf16"})
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert precision_module.cpu_has_native_bf16()
    for isa, native in (("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True), ("AVX512_CORE_AMX", True), ("ALL", True)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        assert precision_module.cpu_has_native_bf16() is native, isa
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not precision_module.cpu_has_native_bf16()
    assert resolve_precision("auto", CPU).name == "fp32"
    monkeypatch.setattr(precision_module.platform, "machine", lambda: "aarch64")  # Arm: its own flags decide
    assert precision_module.cpu_has_native_bf16()


def test_amx_is_told_apart_from_avx512_bf16(monkeypatch):
    """Native bf16 without AMX runs PyTorch's CPU flash attention at fp32's speed, so the fused image-encoder
    attention asks for AMX itself: from torch's probe or the kernel's flags, and not when oneDNN is limited
    below AMX; the benchmarks' CPU column says which."""
    monkeypatch.setattr(precision_module.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(precision_module, "_cpuinfo_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert precision_module.cpu_has_native_bf16() and not precision_module.cpu_has_amx()
    assert precision_module.cpu_capability() == "AVX512, native bf16 (no AMX)"
    monkeypatch.setattr(precision_module, "_cpuinfo_flags", lambda: frozenset({"avx512_bf16", "amx_tile", "amx_bf16"}))
    assert precision_module.cpu_has_amx() and precision_module.cpu_capability() == "AVX512, native bf16 (AMX)"
    for isa, amx in (("AVX512_CORE_BF16", False), ("AVX2", False), ("AVX512_CORE_AMX", True), ("ALL", True)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        assert precision_module.cpu_has_amx() is amx, isa


@pytest.fixture
def denormals_restored():
    yield
    torch.set_flush_denormal(False)


def test_a_cpu_training_process_computes_denormals_as_zero(denormals_restored):
    """Denormal floats take x86's slow microcode path (SAM pretraining 1.7x slower late in training);
    a CPU training process flushes them, so a product below float32's normal range comes out 0."""
    from ssp_sam.engine.distributed import start_training_process

    tiny = torch.tensor([1e-30])
    torch.set_flush_denormal(False)
    assert (tiny * 1e-9).item() != 0.0  # representable as a denormal
    device, _, _ = start_training_process("cpu", "fp32", seed=0)
    assert device.type == "cpu" and (tiny * 1e-9).item() == 0.0
