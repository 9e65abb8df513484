"""The measuring tools of benchmarks/bench.py (the timings themselves are never asserted)."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench  # noqa: E402

linux = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/self/status")


@linux
@pytest.mark.parametrize("reset_peak", [True, False])
def test_peak_memory_sees_a_temporary_allocation(reset_peak, monkeypatch, tmp_path):
    """A 256 MiB temporary freed before the block ends still counts, with the kernel's peak reset (clear_refs) and
    with the sampling thread used where clear_refs cannot be written."""
    if not reset_peak:
        monkeypatch.setattr(bench, "CLEAR_REFS", str(tmp_path / "missing" / "clear_refs"))
    with bench.PeakMemory() as pm:
        x = torch.ones(64 * 2**20)  # 256 MiB, touched
        if not reset_peak:
            time.sleep(0.05)  # let the sampler see it
        del x
    assert (pm.thread is None) == reset_peak
    assert 200 * 2**20 < pm.rise < 320 * 2**20, pm.rise
    with bench.PeakMemory() as small:
        pass
    assert small.rise < 32 * 2**20
