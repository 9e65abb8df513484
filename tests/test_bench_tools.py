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


def test_peak_fraction_is_the_median_of_each_repetition_against_its_own_probe():
    """A probe that a neighbour slowed would make the best pairing exceed 100%: the median pairing is reported, and
    the verdict follows it."""
    row = bench.Row("b  decode", ours=[1.0, 1.0, 2.0], theirs=[3.0, 3.0, 3.0], mem_ours=0, mem_theirs=0, work=4.0,
                    unit="GB/s", target=1.8, peak_fraction=0.77, peaks=[5.0, 1.0, 4.0])  # pairs: 80%, 400%, 50%
    line = bench.table([row], peak=100.0, bandwidth=100.0).splitlines()[-1]
    assert "80% of the peak before each, median" in line and line.endswith("| PASS |")
    row.peaks = [5.0, 1.0, 10.0]  # pairs: 80%, 400%, 20% -> median 80%
    assert "80%" in bench.table([row], 100.0, 100.0)
    row.peaks = [10.0, 1.0, 10.0]  # pairs: 40%, 400%, 20% -> median 40%: fails although the best pair is 400%
    assert bench.table([row], 100.0, 100.0).splitlines()[-1].endswith("| FAIL |")
    row.peaks = None  # one probe for the run: the best repetition against it
    assert "4 GB/s (4% of peak)" in bench.table([row], 100.0, 100.0)


def test_write_report_adds_a_section_above_earlier_runs_and_keeps_the_rest(tmp_path):
    """`make bench` adds its run to RESULTS.md; the notes and the earlier runs stay, newest first."""
    path = tmp_path / "RESULTS.md"
    bench.write_report(str(path), "Machine: first\n\n| a | PASS |\n", "2026-01-01 10:00 UTC")
    text = path.read_text()
    assert text.startswith("# Benchmark results\n") and "## Run of 2026-01-01 10:00 UTC" in text
    assert "Machine: first" in text
    path.write_text(text + "\n## Notes of an earlier session\n\nkept\n")
    bench.write_report(str(path), "Machine: second\n", "2026-01-02 11:00 UTC")
    text = path.read_text()
    assert text.startswith("# Benchmark results\n") and text.endswith("kept\n")
    assert text.index("2026-01-02") < text.index("2026-01-01") < text.index("Notes of an earlier session")
    assert "Machine: first" in text and "Machine: second" in text
    assert not (tmp_path / "RESULTS.md.tmp").exists()
