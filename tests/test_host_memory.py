"""keep_freed_host_memory: large tensors of a repeated step reuse freed memory instead of page-faulting."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

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
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "faults": faults}))
    """
)
STEP_PAGES = 3 * 64 * 2**20 // 4096  # three 64 MiB tensors per step


def _faults_per_step(mode: str) -> dict:
    completed = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(completed.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_repeated_steps_stop_page_faulting():
    default = _faults_per_step("default")
    kept = _faults_per_step("keep")
    assert kept["applied"] and not default["applied"]
    # glibc's default maps every large block afresh: each step faults on all its pages again.
    assert min(default["faults"][1:]) >= 0.9 * STEP_PAGES
    # Kept: once the heap holds the step's blocks (a few steps), later steps reuse them; over the
    # last four steps at most a step's worth of faults (glibc's default: four steps' worth).
    assert sum(kept["faults"][-4:]) < STEP_PAGES
