"""Page sharing: guest RAM opted into the kernel's same-page merging (KSM), and what KSM reports.

``share_pages=True`` (``--share-pages``) advises guest RAM MADV_MERGEABLE; merging itself only
happens while the host runs ksmd (``/sys/kernel/mm/ksm/run`` = 1).  The sharing test fills two
machines' memory with the same content from the host and waits for KSM to merge it.  When KSM
is off and this process may switch it on (root), the test switches it on for its duration and
restores every setting it changed; otherwise it skips and says why.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Iterator

import pytest

from pykvm.memory import GuestMemory
from pykvm.memory_policy import KSM_DIR, ksm_status
from pykvm.x86.layout import MIB, PAGE_SIZE


def vm_flags(memory: GuestMemory) -> set[str]:
    """The VmFlags of the VMAs that map guest RAM (``mg``: MADV_MERGEABLE)."""
    spans = [(r.host_addr, r.host_addr + r.size) for r in memory.regions]
    flags: set[str] = set()
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = any(start < hi and lo < end for lo, hi in spans)
            elif inside and head == "VmFlags:":
                flags |= set(line.split()[1:])
    return flags


def test_merge_advises_guest_ram_mergeable_and_back() -> None:
    with GuestMemory([(0, 8 * MIB)]) as memory:
        assert "mg" not in vm_flags(memory)
        memory.merge(True)
        assert "mg" in vm_flags(memory)
        memory.merge(False)
        assert "mg" not in vm_flags(memory)


@pytest.mark.kvm
def test_share_pages_makes_a_machines_ram_mergeable(machine_factory) -> None:
    assert "mg" in vm_flags(machine_factory(memory="16M", share_pages=True).memory)
    assert "mg" not in vm_flags(machine_factory(memory="16M").memory)


def test_ksm_status_reads_the_counters_and_says_what_was_saved(tmp_path: Path) -> None:
    for name, value in {"run": "1", "pages_to_scan": "100", "sleep_millisecs": "20", "pages_shared": "10",
                        "pages_sharing": "30", "full_scans": "4"}.items():  # fmt: skip
        (tmp_path / name).write_text(value + "\n")
    status = ksm_status(tmp_path)
    assert status["available"] is True and status["run"] == 1 and status["pages_sharing"] == 30
    assert status["shared_bytes"] == 10 * PAGE_SIZE and status["saved_bytes"] == 30 * PAGE_SIZE


def test_ksm_status_without_ksm_says_so(tmp_path: Path) -> None:
    status = ksm_status(tmp_path / "nothing")
    assert status["available"] is False and "CONFIG_KSM" in str(status["reason"])


# --- two machines, the same content: KSM merges it ---------------------------------------------------
@contextlib.contextmanager
def ksm_running(pages_to_scan: int = 4000, sleep_millisecs: int = 10) -> Iterator[None]:
    """KSM on for the block (skips when it cannot be), every changed setting restored after."""
    status = ksm_status()
    if not status["available"]:
        pytest.skip(f"KSM is not available on this kernel: {status['reason']}")
    wanted = {"run": 1, "pages_to_scan": max(pages_to_scan, int(status["pages_to_scan"])),  # type: ignore[call-overload]
              "sleep_millisecs": min(sleep_millisecs, int(status["sleep_millisecs"]))}  # type: ignore[call-overload]  # fmt: skip
    changes = {name: status[name] for name, value in wanted.items() if status[name] != value}
    if changes and not os.access(KSM_DIR / "run", os.W_OK):
        pytest.skip("KSM is off (run = 0) and this test may not switch it on: as root, "
                    "echo 1 > /sys/kernel/mm/ksm/run")  # fmt: skip
    try:
        for name in changes:
            (KSM_DIR / name).write_text(f"{wanted[name]}\n")
        yield
    finally:
        for name, value in changes.items():
            (KSM_DIR / name).write_text(f"{value}\n")


@pytest.mark.kvm
def test_two_machines_with_the_same_memory_content_share_it(machine_factory) -> None:
    size = 32 * MIB
    base = 8 * MIB
    pages = size // PAGE_SIZE
    # Every page different from the others, the two machines identical: KSM keeps one copy of each.
    content = b"".join(f"pykvm page {i:08d} ".encode().ljust(PAGE_SIZE, b"\xa5") for i in range(pages))
    a = machine_factory(memory="64M", share_pages=True)
    b = machine_factory(memory="64M", share_pages=True)
    a.memory.write(base, content)
    b.memory.write(base, content)
    with ksm_running():
        deadline = time.monotonic() + 120
        while True:
            status = ksm_status()
            merged = a.memory.resident()["ksm"] + b.memory.resident()["ksm"]
            if merged >= 2 * 0.9 * size or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert merged >= 2 * 0.9 * size, (merged, status)  # smaps "KSM": both machines' pages are merged
        assert int(status["saved_bytes"]) >= 0.9 * size, status  # host-wide: one of the two copies is gone
        assert a.memory.read(base, PAGE_SIZE) == content[:PAGE_SIZE]
        b.memory.write(base, b"written after merging")  # copy on write: a keeps its page
        assert a.memory.read(base, PAGE_SIZE) == content[:PAGE_SIZE]
        a.close()
        b.close()
        deadline = time.monotonic() + 10  # let ksmd forget the merged pages before it is switched off again
        while int(ksm_status()["pages_shared"]) >= pages // 2 and time.monotonic() < deadline:  # type: ignore[call-overload]
            time.sleep(0.1)
