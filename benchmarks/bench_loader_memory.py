"""Benchmark: peak memory of a short training run with 0, 2 and 4 data-loader workers.

The release built SAM ViT-H inside every data-loader worker, so each worker added gigabytes.
Here workers only read files (images, masks, the SAM embedding cache), so a worker should cost no
more than what it holds: its share of the prefetched batches plus a fixed per-process overhead.

Setup: a ShapeWorld-Ref (RES) training set is generated into a temporary folder, and the
``shapeworld`` model config (configs/model/shapeworld.yaml, random weights: its checkpoint paths
are overridden to null) trains two epochs of 15 steps from an embedding cache (the workers of
the second epoch are forked from a trainer that has already run steps), once per worker count,
each run in its own process (``scripts/train.py`` with Hydra overrides, on the CPU). While
a run lives, the PSS of its process and all its descendants (``/proc/<pid>/smaps_rollup``) is
summed every 50 ms; PSS divides shared pages among the processes that map them, so the sum is
the memory the run really uses, pages a forked worker shares with its parent counted once.

Before the runs, a probe process builds the same trainer (which fills the cache) and measures:

    idle-worker overhead   how much the summed PSS grows when one worker has started and waits,
                           before loading anything (a worker's own PSS also holds half of every
                           page it shares with its parent, which the parent's PSS loses);
    batch bytes            the tensors of one collated batch.

Goal: memory does not grow with the worker count beyond the workers' batches. A worker holds at
most ``prefetch_factor`` finished batches waiting for the trainer, plus, while it collates the
next one, that batch twice (the items and their collated copy). Judged per worker (since session 24):
for each worker count N > 0, the largest worker's peak private memory (USS: private clean + dirty
pages, sampled while all the run's workers live; the median over ``--repeats`` interleaved runs) must stay
within an idle worker's private memory plus ``(prefetch_factor + 2) x batch bytes``. Whatever a worker
copies of the trainer's memory (the pages it or the trainer writes after the fork, a model built in it:
the release's workers each built a SAM ViT-H image encoder, 2.4 GiB of weights) becomes its private
memory. (Not its PSS: that also holds 1 / (N + 1) of the pages still shared, so it changes with N by itself.) A verdict counts only when its margin exceeds
the spread (max - min) of the runs; otherwise it is "not established". The whole run's peak (the sum
over the trainer and its workers) and its growth per added worker are still measured and reported, but
not judged: its run-to-run spread (about 100 MiB at 0 workers on 2026-11-27, the trainer's own transient
allocations) exceeds the few MiB in question, which left the verdict "not established" in sessions 20-22.

    python benchmarks/bench_loader_memory.py
    python benchmarks/bench_loader_memory.py --steps 30 --epochs 3 --batch-size 32
    python benchmarks/bench_loader_memory.py --quick      # 0, 1 and 2 workers, a few steps: a smoke run

Prints a table and writes benchmarks/results/loader_memory.json (``--quick``: loader_memory_quick.json).
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from _common import REPO, RESULTS, write_result
from ssp_sam.data.shapeworld import generate_dataset
from ssp_sam.data.training import collate
from ssp_sam.engine.trainer import Trainer

WORKER_COUNTS = (0, 2, 4)
SAMPLE_INTERVAL_S = 0.05
MIB = 2**20
BATCHES_IN_THE_MAKING = 2  # a collating worker holds the batch's items and their collated copy
PROBE_MARKER = "PROBE "  # prefix of the probe's result line on its stdout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=list(WORKER_COUNTS), help="worker counts to run (0 is always run)")
    parser.add_argument("--steps", type=int, default=15, help="training steps per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (workers are forked again every epoch)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--images", type=int, default=300, help="ShapeWorld training images (enough referents for the steps)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per worker count, interleaved (the verdict uses their medians and spread)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 0, 1 and 2 workers, 4 steps of batch 8 on 40 images, once each")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/loader_memory[_quick].json)")
    parser.add_argument("--probe", type=Path, default=None, help=argparse.SUPPRESS)  # internal: the probe process's work folder
    args = parser.parse_args(argv)
    if args.quick:
        args.workers, args.steps, args.epochs, args.batch_size, args.images, args.repeats = [0, 1, 2], 4, 1, 8, 40, 1
    if min(args.workers) < 0 or min(args.steps, args.epochs, args.batch_size, args.images, args.repeats) < 1:
        parser.error("--workers must be >= 0; --steps, --epochs, --batch-size, --images and --repeats >= 1")
    args.workers = sorted(set(args.workers) | {0})
    if args.out is None:
        args.out = RESULTS / ("loader_memory_quick.json" if args.quick else "loader_memory.json")
    return args


# ------------------------------------------------------------------------------------ memory


def _children(pid: int) -> list[int]:
    children = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(child) for child in (task / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass  # the process ended while being read
    return children


ROLLUP_FIELDS = {"Pss:": "pss", "Private_Clean:": "private", "Private_Dirty:": "private"}


def _rollup_bytes(pid: int) -> dict[str, int] | None:
    """{"pss": PSS, "private": USS (private clean + dirty)} of ``pid`` in bytes, None once it has ended."""
    memory = {"pss": 0, "private": 0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            field = ROLLUP_FIELDS.get(line.split(maxsplit=1)[0]) if line else None
            if field is not None:
                memory[field] += int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return memory


def process_tree_memory(pid: int) -> dict[int, dict[str, int]]:
    """:func:`_rollup_bytes` of ``pid`` and every live descendant, by process id."""
    usage, pending = {}, [pid]
    while pending:
        current = pending.pop()
        memory = _rollup_bytes(current)
        if memory is not None:
            usage[current] = memory
            pending += _children(current)
    return usage


def process_tree_pss(pid: int) -> dict[int, int]:
    """PSS in bytes of ``pid`` and every live descendant, by process id."""
    return {current: memory["pss"] for current, memory in process_tree_memory(pid).items()}


def run_and_sample(command: list[str], log_path: Path, processes: int = 1) -> dict:
    """Run ``command``, summing its process tree's PSS every SAMPLE_INTERVAL_S; the peak and its breakdown.

    The peak is taken over the samples in which at least ``processes`` processes are alive (the trainer and
    its data-loader workers): a peak reached before the workers start, or after they stop, says nothing
    about what they cost, and a worker count judged on it would pass or fail by accident.
    """
    peak_total, at_peak, most_processes, samples = 0, {}, 0, 0
    worker_peaks: dict[int, int] = {}  # each descendant's largest private memory (USS) while all processes live
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            memory = process_tree_memory(process.pid)
            usage = {pid: m["pss"] for pid, m in memory.items()}
            total = sum(usage.values())
            if len(usage) >= processes:
                for pid, m in memory.items():
                    if pid != process.pid:
                        worker_peaks[pid] = max(worker_peaks.get(pid, 0), m["private"])
            if len(usage) >= processes and total > peak_total:
                peak_total, at_peak = total, usage
            most_processes = max(most_processes, len(usage))
            samples += 1
            time.sleep(SAMPLE_INTERVAL_S)
    if process.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command)} failed with exit code {process.returncode}:\n{tail}")
    if not at_peak:
        raise RuntimeError(f"{' '.join(command)}: never sampled with {processes} processes alive (a run too short to judge)")
    return {
        "peak_total_pss_bytes": peak_total,
        "main_pss_at_peak_bytes": at_peak.get(process.pid, 0),
        "children_pss_at_peak_bytes": sorted((pss for pid, pss in at_peak.items() if pid != process.pid), reverse=True),
        "worker_peak_private_bytes": sorted(worker_peaks.values(), reverse=True),
        "most_processes": most_processes,
        "samples": samples,
        "seconds": time.perf_counter() - started,
    }


# ------------------------------------------------------------------------------------ runs


def train_overrides(work: Path, run_name: str, workers: int, steps: int, batch_size: int, epochs: int = 1) -> list[str]:
    """Hydra overrides of configs/train.yaml for one short run on the generated set."""
    return [
        "model=shapeworld",
        "model.clip_checkpoint=null",
        "model.sam_checkpoint=null",
        "++model.random_encoders=true",  # not a key of configs/model/shapeworld.yaml: added
        "dataset=shapeworld",
        f"dataset.root={work / 'data'}",
        f"cache_dir={work / 'cache'}",
        f"run_dir={work / run_name}",
        "device=cpu",
        "seed=0",
        f"train.epochs={epochs}",
        f"train.max_steps_per_epoch={steps}",
        f"train.batch_size={batch_size}",
        f"train.workers={workers}",
        "train.warmup_epochs=0",
        "train.decoder_freeze_epochs=0",
        "val.split=null",
        "val.overlays=0",
    ]


def _hold_worker(started, release, worker_id: int) -> None:
    """worker_init_fn of the probe: report that the worker is up, then wait before loading anything."""
    started.set()
    release.wait(timeout=120)


def probe(work: Path, batch_size: int, steps: int) -> dict:
    """In its own process: build the trainer (fills the cache), measure an idle worker and one batch."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=train_overrides(work, "probe", 1, steps, batch_size))
    trainer = Trainer(cfg)
    context = multiprocessing.get_context(trainer.loader.multiprocessing_context or multiprocessing.get_start_method())
    started, release = context.Event(), context.Event()
    loader = DataLoader(
        trainer.train_set, batch_sampler=trainer.sampler, collate_fn=collate, num_workers=1,
        worker_init_fn=functools.partial(_hold_worker, started, release), multiprocessing_context=context,
    )
    before = sum(process_tree_pss(os.getpid()).values())
    iterator = iter(loader)
    if not started.wait(timeout=120):
        raise RuntimeError("the probe's data-loader worker did not start")
    time.sleep(1.0)  # let the worker settle in its wait
    during_memory = process_tree_memory(os.getpid())
    during = {pid: m["pss"] for pid, m in during_memory.items()}
    release.set()
    del iterator

    batch = collate([trainer.train_set[index] for index in next(iter(trainer.sampler))])
    return {
        "idle_worker_increase_bytes": sum(during.values()) - before,
        "idle_worker_own_pss_bytes": max(pss for pid, pss in during.items() if pid != os.getpid()),
        "idle_worker_private_bytes": max(m["private"] for pid, m in during_memory.items() if pid != os.getpid()),
        "batch_bytes": sum(tensor.numel() * tensor.element_size() for tensor in batch.values()),
        "batch_shapes": {name: list(tensor.shape) for name, tensor in batch.items()},
        "prefetch_factor": trainer.loader.prefetch_factor or 2,
        "start_method": context.get_start_method(),
        "train_referents": len(trainer.train_set),
        "steps_per_epoch": len(trainer.sampler),
    }


def run_probe(work: Path, batch_size: int, steps: int) -> dict:
    command = [sys.executable, __file__, "--probe", str(work), "--batch-size", str(batch_size), "--steps", str(steps)]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(PROBE_MARKER)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"the probe failed (exit code {completed.returncode}):\n{completed.stderr[-2000:]}")
    return json.loads(lines[-1][len(PROBE_MARKER) :])


def summarize(runs: dict[int, list[dict]], bound_per_worker: int) -> list[dict]:
    """Per worker count: the median peak's growth over 0 workers, and per added worker over the smallest N > 0.

    Going from 0 workers to any is a step of its own (batches cross processes through shared
    memory); the goal is about what each further worker adds, so the smallest non-zero count is
    the reference for the others and is not judged itself. A judged count's verdict (``within_bound``)
    is None, "not established", when the margin ``bound - per_worker`` is within the run-to-run noise:
    the larger spread (max - min peak) of the two counts, divided by their distance in workers.
    """
    peaks = {workers: [run["peak_total_pss_bytes"] for run in repeats] for workers, repeats in runs.items()}
    median = {workers: float(statistics.median(values)) for workers, values in peaks.items()}
    spread = {workers: max(values) - min(values) for workers, values in peaks.items()}
    first = min((workers for workers in runs if workers), default=None)
    rows = []
    for workers, repeats in runs.items():
        judged = first is not None and workers > first
        row = {
            "workers": workers,
            "runs": repeats,
            "median_peak_total_pss_bytes": median[workers],
            "peak_spread_bytes": spread[workers],
            "growth_over_0_workers_bytes": median[workers] - median[0],
            "growth_per_added_worker_bytes": None,
            "noise_per_worker_bytes": None,
            "bound_per_worker_bytes": bound_per_worker if judged else None,
            "within_bound": None,
        }
        if judged:
            per_worker = (median[workers] - median[first]) / (workers - first)
            noise = max(spread[workers], spread[first]) / (workers - first)
            row.update(growth_per_added_worker_bytes=per_worker, noise_per_worker_bytes=noise)
            if abs(bound_per_worker - per_worker) > noise:
                row["within_bound"] = per_worker <= bound_per_worker
        rows.append(row)
    return rows


def summarize_workers(runs: dict[int, list[dict]], bound_own: int) -> list[dict]:
    """Per worker count N > 0: the largest worker's peak private memory (USS), the median over the runs, against
    ``bound_own`` (an idle worker's private memory plus the batches a worker holds).

    What a worker copies of the trainer's memory (pages it or the trainer writes after the fork, a model built in
    it) becomes its private memory, so this judges each worker directly (PSS would not do: it also holds a share
    of the pages still shared, 1 / (N + 1) of them with N workers, so it changes with N by itself); the whole run's peak also carries the trainer's own
    transient allocations, whose run-to-run spread (about 100 MiB) hides a worker's few MiB. The verdict is None,
    "not established", when the margin is within the spread (max - min) of the runs.
    """
    rows = []
    for workers, repeats in runs.items():
        if workers == 0:
            continue
        largest = [max(run["worker_peak_private_bytes"], default=0) for run in repeats]
        value, spread = float(statistics.median(largest)), max(largest) - min(largest)
        row = {"workers": workers, "largest_worker_peak_private_bytes": largest, "median_bytes": value, "spread_bytes": spread,
               "bound_bytes": bound_own, "within_bound": None}
        if abs(bound_own - value) > spread:
            row["within_bound"] = value <= bound_own
        rows.append(row)
    return rows


def print_table(rows: list[dict], probe_result: dict, bound: int) -> None:
    print(
        f"bound per worker = idle-worker overhead {probe_result['idle_worker_increase_bytes'] / MIB:.1f} MiB + "
        f"({probe_result['prefetch_factor']} + 2) x batch {probe_result['batch_bytes'] / MIB:.1f} MiB = {bound / MIB:.1f} MiB"
    )
    print(f"{'workers':>7}  {'runs':>4}  {'median peak MiB':>15}  {'spread MiB':>10}  {'growth MiB':>10}  "
          f"{'per added worker MiB':>20}  {'noise MiB':>9}  {'within bound':>16}")
    for row in rows:
        judged = row["bound_per_worker_bytes"] is not None
        per_worker = f"{row['growth_per_added_worker_bytes'] / MIB:.1f}" if judged else "-"
        noise = f"{row['noise_per_worker_bytes'] / MIB:.1f}" if judged else "-"
        within = {None: "not established" if judged else "-", True: "yes", False: "NO"}[row["within_bound"]]
        print(
            f"{row['workers']:>7d}  {len(row['runs']):>4d}  {row['median_peak_total_pss_bytes'] / MIB:>15.1f}  "
            f"{row['peak_spread_bytes'] / MIB:>10.1f}  {row['growth_over_0_workers_bytes'] / MIB:>10.1f}  "
            f"{per_worker:>20}  {noise:>9}  {within:>16}"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.probe is not None:
        print(PROBE_MARKER + json.dumps(probe(args.probe, args.batch_size, args.steps)), flush=True)
        return

    print(
        f"shapeworld model (random weights), {args.epochs} epochs of {args.steps} steps of batch {args.batch_size}, "
        f"workers {args.workers}, cpu"
    )
    with tempfile.TemporaryDirectory(prefix="bench_loader_memory_") as folder:
        work = Path(folder)
        generate_dataset(work / "data", "res", {"train": args.images}, seed=0, progress=False)
        probe_result = run_probe(work, args.batch_size, args.steps)
        if probe_result["steps_per_epoch"] < args.steps:
            raise SystemExit(
                f"{probe_result['train_referents']} referents give only {probe_result['steps_per_epoch']} steps of "
                f"batch {args.batch_size}; raise --images"
            )
        runs: dict[int, list[dict]] = {workers: [] for workers in args.workers}
        for repeat in range(args.repeats):  # interleaved, so that a drift of the machine spreads over every count
            for workers in args.workers:
                name = f"run_{workers}_{repeat}"
                overrides = train_overrides(work, name, workers, args.steps, args.batch_size, args.epochs)
                command = [sys.executable, "scripts/train.py", *overrides]
                runs[workers].append(run_and_sample(command, work / f"{name}.log", processes=1 + workers))
                print(f"  {workers} workers done (run {repeat + 1} of {args.repeats})", file=sys.stderr, flush=True)
        cache_folders = [path.name for path in (work / "cache").iterdir() if path.is_dir()]
    if len(cache_folders) != 1:
        raise RuntimeError(f"the runs did not share one embedding cache ({cache_folders}): a run computed embeddings itself")

    batches_held = probe_result["prefetch_factor"] + BATCHES_IN_THE_MAKING
    bound = probe_result["idle_worker_increase_bytes"] + batches_held * probe_result["batch_bytes"]
    bound_own = probe_result["idle_worker_private_bytes"] + batches_held * probe_result["batch_bytes"]
    rows = summarize(runs, bound)
    print("whole-run peaks (reported; the trainer's own transient allocations spread them by tens of MiB):")
    print_table(rows, probe_result, bound)
    worker_rows = summarize_workers(runs, bound_own)
    print(
        f"each worker's private memory (USS) at its peak (judged): bound = idle worker's {probe_result['idle_worker_private_bytes'] / MIB:.1f} MiB "
        f"+ {batches_held} x batch {probe_result['batch_bytes'] / MIB:.1f} MiB = {bound_own / MIB:.1f} MiB"
    )
    print(f"{'workers':>7}  {'largest worker peak MiB (median)':>32}  {'spread MiB':>10}  {'within bound':>16}")
    for row in worker_rows:
        within = {None: "not established", True: "yes", False: "NO"}[row["within_bound"]]
        print(f"{row['workers']:>7d}  {row['median_bytes'] / MIB:>32.1f}  {row['spread_bytes'] / MIB:>10.1f}  {within:>16}")
    verdicts = [row["within_bound"] for row in worker_rows]
    goal_met = bool(verdicts) and all(verdict is True for verdict in verdicts)
    # a definite excess settles it; otherwise every count needs a verdict beyond the spread of its runs
    established = False in verdicts or (bool(verdicts) and None not in verdicts)
    verdict = ("met" if goal_met else "NOT met") if established else "not established (within the run-to-run spread)"
    print(
        "goal: no worker holds more than an idle worker plus the batches it holds -> "
        f"{verdict}{' (not judged for --quick)' if args.quick else ''}"
    )
    write_result(
        args.out,
        benchmark="loader_memory",
        goal="for every worker count N > 0: the largest worker's peak private memory (USS; median over the runs) <= an idle worker's + (prefetch_factor + 2) x batch bytes",
        goal_met=goal_met and established and not args.quick,
        setup={
            "model": "shapeworld (configs/model/shapeworld.yaml, random weights)",
            "dataset": f"ShapeWorld-Ref res, {args.images} training images, seed 0",
            "steps_per_epoch": args.steps,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "worker_counts": args.workers,
            "repeats": args.repeats,
            "sample_interval_s": SAMPLE_INTERVAL_S,
            "memory": "judged: each worker's private memory (USS, smaps_rollup private clean + dirty); reported: the sum of PSS over the training process and all its descendants",
        },
        device=torch.device("cpu"),
        results={
            "probe": probe_result, "bound_private_bytes": bound_own, "verdict": verdict, "worker_rows": worker_rows,
            "whole_run": {"bound_per_worker_bytes": bound, "rows": rows},
        },
    )


if __name__ == "__main__":
    main()
