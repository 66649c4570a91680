"""What every benchmark shares: where results go, the machine they were measured on, wall-clock timing.

The benchmark scripts import this module by name (``from _common import ...``): run as
``python benchmarks/<script>.py``, their own folder is first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from ssp_sam.config import ModelConfig, model_config_from
from ssp_sam.engine.host_memory import keep_freed_host_memory
from ssp_sam.fileio import write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def add_timing_arguments(parser: argparse.ArgumentParser, repeats: int, quick_help: str, name: str) -> None:
    """The options every timed benchmark has: --device, --repeats, --quick (``quick_help``) and --out
    (default benchmarks/results/<name>[_quick].json; filled in by :func:`finish_timing_arguments`)."""
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds (the median is reported)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=None, help=f"JSON file (default benchmarks/results/{name}[_quick].json)")
    parser.set_defaults(result_name=name)


def finish_timing_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """After the benchmark's own --quick settings: --repeats checked, --out defaulted."""
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.out is None:
        args.out = RESULTS / f"{args.result_name}{'_quick' if args.quick else ''}.json"
    return args


def bench_model_config(quick: bool, **overrides: Any) -> ModelConfig:
    """SSP-SAM-224 with SAM ViT-B and random weights, or (``quick``) the tiny model of configs/model/tiny.yaml; then ``overrides``."""
    if quick:
        values = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml"))
    else:
        values = {"name": "bench", "sam_variant": "vit_b", "random_encoders": True}
    return model_config_from({**values, **overrides})


def machine_info(device: torch.device) -> dict:
    """Python, torch, CPU / GPU and the current load: what a reader needs to judge the numbers."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        # At the end of the run: other processes make CPU timings noisy; recorded to judge them by.
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def add_allocator_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="keep glibc's default malloc settings (the trainer and eval.py keep freed host memory on CPU)",
    )


def set_up_host_memory(device: torch.device, default_allocator: bool) -> str:
    """On CPU, keep freed host memory as scripts/train.py and scripts/eval.py do; says which setting is in effect."""
    if device.type == "cpu" and not default_allocator and keep_freed_host_memory():
        return "freed memory kept (keep_freed_host_memory)"
    return "glibc default" if device.type == "cpu" else "not changed (GPU run)"


def seconds(run: Callable[[], object], device: torch.device) -> float:
    """Wall time of ``run()``, waiting for the GPU to finish when there is one."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def write_result(
    path: Path,
    *,
    benchmark: str,
    goal: str,
    goal_met: bool,
    setup: dict[str, Any],
    device: torch.device,
    results: Any,
) -> None:
    """Write one benchmark's results file (atomically) in the layout all benchmarks share."""
    write_json(
        path,
        {
            "benchmark": benchmark,
            "goal": goal,
            "goal_met": goal_met,
            "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "setup": setup,
            "machine": machine_info(device),
            "results": results,
        },
    )
    print(f"wrote {path}")
