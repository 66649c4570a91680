"""keep_freed_host_memory: large tensors of a repeated step reuse freed memory instead of page-faulting;
shared_with_forked_workers: forked workers then do not keep a copy of the free heap, and the garbage
collector leaves the objects they share alone."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap

import pytest

from ssp_sam.engine.host_memory import shared_with_forked_workers

# A step-like loop on 64 MiB tensors (above glibc's largest mmap threshold, 32 MiB), in a fresh
# process, optionally after keep_freed_host_memory(); prints the minor page faults of each step.
PROBE = textwrap.dedent(
    """
    import json, resource, sys, torch
    from ssp_sam.engine.host_memory import keep_freed_host_memory
    applied = keep_freed_host_memory() if sys.argv[1] == "keep" else False
    torch.set_num_threads(1)
    def step():
        x = torch.ones(8, 32, 256, 256)
        (x * 2).relu().sum()
    faults = []
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "faults": faults}))
    """
)
STEP_PAGES = 3 * 64 * 2**20 // 4096  # three 64 MiB tensors per step


def _run_probe(script: str, mode: str):
    """``script`` run in a fresh interpreter with ``mode`` as its argument: the JSON it prints."""
    completed = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
    return json.loads(completed.stdout)


def _faults_per_step(mode: str) -> dict:
    return _run_probe(PROBE, mode)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_repeated_steps_stop_page_faulting():
    default = _faults_per_step("default")
    kept = _faults_per_step("keep")
    assert kept["applied"] and not default["applied"]
    # glibc's default maps every large block afresh: each step faults on all its pages again.
    assert min(default["faults"][1:]) >= 0.9 * STEP_PAGES
    # Kept: once the heap holds the step's blocks (a few steps), later steps reuse them. From the
    # third step on, at most a quarter of the default's faults (seen: none at all on an idle machine;
    # on a loaded one, now and then a step re-faults its blocks once).
    assert sum(kept["faults"][2:]) < 0.25 * sum(default["faults"][2:])


# With freed memory kept, a 128 MiB free heap, then two forked children (like data-loader workers)
# while the parent rewrites that heap; prints the children's summed PSS in MiB.
FORK_PROBE = textwrap.dedent(
    """
    import json, os, sys, torch
    from ssp_sam.engine.host_memory import keep_freed_host_memory, release_freed_host_memory
    keep_freed_host_memory()
    torch.set_num_threads(1)
    blocks = [torch.ones(1 << 20) for _ in range(32)]  # 32 x 4 MiB, then freed: the free heap
    del blocks
    if sys.argv[1] == "release":
        assert release_freed_host_memory()
    go, children = os.pipe(), []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            os.read(go[0], 1)  # wait until the parent has measured
            os._exit(0)
        children.append(pid)
    blocks = [torch.full((1 << 20,), 2.0) for _ in range(32)]  # the parent's next step reuses the heap
    def pss_mib(pid):
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            return next(int(line.split()[1]) for line in rollup if line.startswith("Pss:")) / 1024
    print(json.dumps(sum(pss_mib(pid) for pid in children)))
    os.write(go[1], b"xx")
    for pid in children:
        os.waitpid(pid, 0)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_released_heap_is_not_copied_into_forked_workers():
    kept, released = _run_probe(FORK_PROBE, "keep"), _run_probe(FORK_PROBE, "release")
    # Kept, the children hold the old copy of every heap page the parent rewrote: about 128 MiB more.
    assert kept - released > 0.75 * 128, (kept, released)


def test_objects_are_frozen_only_while_workers_live():
    gc.unfreeze()
    with shared_with_forked_workers():
        assert gc.get_freeze_count() > 0  # the collector leaves the objects alive at the fork alone
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), shared_with_forked_workers():
        raise RuntimeError("a diverged step")
    assert gc.get_freeze_count() == 0
    with shared_with_forked_workers(enabled=False):
        assert gc.get_freeze_count() == 0


def test_nested_uses_keep_the_outer_workers_objects_frozen():
    """The OVSS trainer validates (forking evaluation workers) inside its epoch's own use."""
    gc.unfreeze()
    with shared_with_forked_workers():
        outer = gc.get_freeze_count()
        with shared_with_forked_workers():
            assert gc.get_freeze_count() >= outer
        assert gc.get_freeze_count() >= outer > 0  # the training workers still share these pages
    assert gc.get_freeze_count() == 0


# A forked child of a process that keeps freed memory (a data-loader worker of the trainer) decodes 32 x 4 MiB,
# frees it, and prints its private memory (MiB) grown since the fork, with or without default_host_memory_in_worker.
WORKER_PROBE = textwrap.dedent(
    """
    import json, os, sys, torch
    from ssp_sam.engine.host_memory import default_host_memory_in_worker, keep_freed_host_memory
    keep_freed_host_memory()
    torch.set_num_threads(1)
    def private_mib():
        with open("/proc/self/smaps_rollup") as rollup:
            return sum(int(line.split()[1]) for line in rollup if line.startswith(("Private_Clean:", "Private_Dirty:"))) / 1024
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        if sys.argv[1] == "worker_init":
            default_host_memory_in_worker(0)
        before = private_mib()
        items = [torch.ones(1 << 20) for _ in range(32)]  # what a worker reads for its batches
        del items
        os.write(write, json.dumps(private_mib() - before).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    print(os.read(read, 100).decode())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_workers_do_not_keep_what_they_freed():
    inherited, restored = _run_probe(WORKER_PROBE, "inherited"), _run_probe(WORKER_PROBE, "worker_init")
    # With the trainer's settings the child keeps its 128 MiB high-water mark; with glibc's own it gives it back.
    assert inherited > 0.75 * 128 and restored < 16, (inherited, restored)
