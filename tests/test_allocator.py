"""retain_freed_memory: a second round of the same large allocations reuses freed pages."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from pfc_sweeps.collapse.allocator import retain_freed_memory

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import resource, sys, torch
from pfc_sweeps.collapse.allocator import retain_freed_memory
if sys.argv[1] == "1":
    assert retain_freed_memory()
def round_():  # like a cached metric pass: many 4 MB feature tensors alive at once, then freed
    xs = [torch.ones(1000, 1000) for _ in range(40)]
    return sum(float(x[0, 0]) for x in xs)
round_()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def faults_in_second_round(retain: bool) -> int:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, "1" if retain else "0"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_pages_are_reused():
    if not retain_freed_memory():
        pytest.skip("the C library is not glibc")
    default, retained = faults_in_second_round(False), faults_in_second_round(True)
    # The round's 40 x 4 MB tensors span PAGES pages: without retention each is faulted in
    # again; with it, most are reused. Other faults of the round (the interpreter's, the
    # torch build's) are the same in both runs and cancel in the difference, so the
    # threshold does not depend on the build (a torch from PyPI faulted 9,766 pages more).
    pages = 40 * 1000 * 1000 * 4 // resource.getpagesize()
    assert default > pages / 2, (default, pages)
    assert default - retained > pages / 2, (retained, default, pages)
