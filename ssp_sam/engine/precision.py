"""Numeric precision of training and evaluation: ``auto | fp32 | bf16 | fp16``, chosen at run time.

bf16 autocast is a large win where the hardware computes it natively and the kernels use it (CUDA
GPUs, CPUs with AVX512-BF16 or AMX) and a large loss where it is emulated (AVX2-only CPUs: measured
5.7x *slower* than fp32 on CLIP ViT-B/16). ``auto`` therefore picks bf16 on CUDA and on CPUs with
native bf16, fp32 elsewhere, and says what it chose; a forced bf16 on an emulating CPU warns. fp16 is
a CUDA choice (with a gradient scaler in training); on a CPU it is refused, since PyTorch's CPU fp16
kernels are emulated.

On native-bf16 CPUs this needs every attention to project contiguous tensors: under CPU autocast a
linear on a non-contiguous 3-D input (what ``nn.MultiheadAttention(batch_first=True)`` feeds its
in-projection) copies its weight once per sequence position, which made bf16 1.3x *slower* than fp32
until every attention went through :mod:`ssp_sam.attention` (``benchmarks/README.md``).

The frozen encoders, the adapters and the decoder all run under one ``torch.autocast`` region, so
weights stay fp32 (the optimizer's master copy) and only the matmuls run in the low precision.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags of native bf16 arithmetic: x86 AMX tiles or AVX512-BF16; Arm's BF16 extension.
_NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


@functools.cache
def _cpuinfo_flags() -> frozenset[str]:
    """The CPU's flags as the kernel lists them (read once: attention modules ask at every call)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def _onednn_max_isa() -> str:
    """oneDNN's instruction-set limit for this process, upper case ("ALL": none)."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()


def _x86_kernels_limited_below_bf16() -> bool:
    """Whether PyTorch was told to use x86 kernels without native bf16 on this process.

    ``ATEN_CPU_CAPABILITY=avx2`` (or lower) and oneDNN's ``ONEDNN_MAX_CPU_ISA`` below
    AVX512_CORE_BF16 make PyTorch run the kernels of an AVX2-only CPU on any x86 CPU: bf16 is then
    emulated (benchmarks use this to measure what such a CPU runs), whatever the hardware has.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX", "AVX2"):
        return True
    isa = _onednn_max_isa()
    return isa != "ALL" and not any(tag in isa for tag in ("BF16", "AMX", "FP16", "AVX10"))


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AMX, AVX512-BF16 or Arm BF16) and PyTorch's kernels use it."""
    if _x86_kernels_limited_below_bf16():
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    if any(getattr(torch.cpu, name, lambda: False)() for name in probes):
        return True
    return bool(_cpuinfo_flags() & set(_NATIVE_BF16_FLAGS))


def cpu_has_amx() -> bool:
    """True when this CPU has AMX tiles and PyTorch's kernels may use them.

    Native bf16 is not one speed: PyTorch's CPU flash-attention kernel packs its bf16 blocks for AMX
    and runs them several times faster than fp32 there, but without AMX (AVX512-BF16 alone) it runs
    bf16 at fp32's speed, slower than the same attention spelt out in bf16 matrix products
    (:class:`ssp_sam.attention.FusedImageEncoderAttention` chooses by this; benchmarks/README.md).
    """
    if _x86_kernels_limited_below_bf16():
        return False
    isa = _onednn_max_isa()
    if isa != "ALL" and "AMX" not in isa:
        return False
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return True
    return "amx_bf16" in _cpuinfo_flags()


def cpu_capability() -> str:
    """A short description of the CPU's vector units, printed beside benchmark rows."""
    kind = torch.backends.cpu.get_cpu_capability()
    if not cpu_has_native_bf16():
        return f"{kind}, no native bf16"
    return f"{kind}, native bf16 (AMX)" if cpu_has_amx() else f"{kind}, native bf16 (no AMX)"


@dataclass(frozen=True)
class Precision:
    """The resolved precision of a run.

    name: "fp32", "bf16" or "fp16". reason: why it was chosen, for the log.
    """

    name: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    @property
    def needs_grad_scaler(self) -> bool:
        return self.name == "fp16"

    def autocast(self, device: torch.device) -> AbstractContextManager:
        """The autocast region for ``device`` (no region at all for fp32)."""
        if self.name == "fp32":
            return nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def flush_denormals() -> bool:
    """Compute with denormal floats (fp32 magnitudes below 1.2e-38) as zero on this CPU, in every thread.

    x86 CPUs take a microcode path for denormal inputs and results, tens of times slower per operation,
    and training drifts into them as gradients and activations shrink: the ShapeWorld SAM's pretraining
    at one thread took 3.5 s per step at step 950 against 2.1 s with them flushed (benchmarks/README.md).
    Values that small change no result in float32 arithmetic that rounds far above them.

    Call it before the process's first parallel torch operation: OpenMP's worker threads take the setting
    from the thread that creates them, later changes reach only the calling thread. Returns whether the
    CPU supports it.
    """
    return torch.set_flush_denormal(True)


def resolve_precision(requested: str, device: torch.device, key: str = "precision") -> Precision:
    """Turn ``auto | fp32 | bf16 | fp16`` into the precision used on ``device``.

    Args:
        requested: the configured value.
        device: where the model runs.
        key: the config key, for messages (e.g. "train.precision").
    Raises:
        ConfigError: unknown value, or fp16 on a CPU.
    """
    requested = str(requested).lower()
    if requested not in PRECISIONS:
        raise ConfigError(f"{key}: must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    cuda = device.type == "cuda"
    if requested == "auto":
        if cuda:
            if torch.cuda.is_bf16_supported():
                return Precision("bf16", "auto: CUDA device with bf16")
            return Precision("fp16", "auto: CUDA device without bf16")
        if cpu_has_native_bf16():
            return Precision("bf16", "auto: CPU with native bf16 (AVX512-BF16 or AMX)")
        return Precision("fp32", "auto: CPU without native bf16 (bf16 would be emulated and slower)")
    if requested == "fp16" and not cuda:
        raise ConfigError(f"{key}=fp16 needs a CUDA device (CPU fp16 is emulated); use bf16 or fp32")
    if requested == "bf16" and not cuda and not cpu_has_native_bf16():
        warnings.warn(
            f"{key}=bf16 on a CPU without native bf16 (no AMX or AVX512-BF16): bf16 is emulated there and "
            "several times slower than fp32",
            stacklevel=2,
        )
    return Precision(requested, f"{key}={requested} as configured")
