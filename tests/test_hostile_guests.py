"""Hostile guests against the host: what a guest asks for never costs the host guest-chosen memory.

Each test boots a guest written to abuse the host, through the CLI in a child process, and
measures the child's peak RSS (``wait4``'s ``ru_maxrss``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import guest

pytestmark = pytest.mark.kvm

MIB = 1 << 20


def test_chains_of_guest_sized_buffers_cost_the_host_no_guest_sized_memory(tmp_path: Path) -> None:
    """Balloon page numbers and statistics, blk discard and write-zeroes segments: a 256 MiB chain
    from a 64 MiB guest is refused by its length before anything is copied (it used to cost 830 MiB)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MIB))
    child = subprocess.Popen(
        [sys.executable, "-m", "pykvm", "run", str(guest("virtio_flood.bin")), "--mode", "long", "-m", "64M",
         "--balloon", "--disk", str(disk), "--timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = child.stdout.read(), child.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(child.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1, err.decode()
    assert out == b"balloon: inflate used 0\nblk: discard status 1\nblk: write-zeroes status 1\n"
    assert b"more than 65536 page numbers" in err and b"more than 64 entries" in err
    assert usage.ru_maxrss * 1024 < 160 * MIB, f"peak RSS {usage.ru_maxrss // 1024} MiB"
