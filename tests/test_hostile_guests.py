"""Hostile guests against the host: what a guest asks for never costs the host guest-chosen memory.

Each test boots a guest written to abuse the host, through the CLI in a child process, and
measures the child's peak RSS: its own ``VmHWM`` at exit (``wait4``'s ``ru_maxrss`` would also
count the pages a forked child shared with this large test process before its exec).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import guest

pytestmark = pytest.mark.kvm

MIB = 1 << 20
# Runs the CLI, then reports the process's peak RSS on stderr as its last line.
PEAK_REPORTING_CLI = """
import atexit, sys
def report():
    peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1]
    print(f"peak-rss-kib {peak}", file=sys.stderr)
atexit.register(report)
from pykvm.cli import main
main(prog_name="pykvm")
"""


def run_pykvm(*args: str) -> tuple[int, bytes, bytes, int]:
    """``pykvm ARGS`` in a child process: status, stdout, stderr (without the report), peak RSS in bytes."""
    child = subprocess.run([sys.executable, "-c", PEAK_REPORTING_CLI, *args], capture_output=True, timeout=300)
    err, _, report = child.stderr.rstrip(b"\n").rpartition(b"\n")
    assert report.startswith(b"peak-rss-kib "), child.stderr.decode()
    return child.returncode, child.stdout, err, int(report.split()[1]) * 1024


def test_chains_of_guest_sized_buffers_cost_the_host_no_guest_sized_memory(tmp_path: Path) -> None:
    """Balloon page numbers and statistics, blk discard and write-zeroes segments: a 256 MiB chain
    from a 64 MiB guest is refused by its length before anything is copied (it used to cost 830 MiB)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MIB))
    status, out, err, peak = run_pykvm("run", str(guest("virtio_flood.bin")), "--mode", "long", "-m", "64M",
                                       "--balloon", "--disk", str(disk), "--timeout", "120")  # fmt: skip
    assert status == 1, err.decode()
    assert out == b"balloon: inflate used 0\nblk: discard status 1\nblk: write-zeroes status 1\n"
    assert b"more than 65536 page numbers" in err and b"more than 64 entries" in err
    assert peak < 160 * MIB, f"peak RSS {peak // MIB} MiB"
