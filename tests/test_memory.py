"""Guest memory: reserved untouched, huge-page advised, bounds-checked, zero-copy, discardable."""

from __future__ import annotations

import threading

import psutil
import pytest

from pykvm.errors import ConfigError, GuestMemoryError
from pykvm.memory import GuestMemory
from pykvm.x86 import layout
from pykvm.x86.e820 import ram_regions

MIB = layout.MIB


def test_reserving_a_gib_does_not_touch_it() -> None:
    before = psutil.Process().memory_info().rss
    with GuestMemory([(0, 1024 * MIB)]) as memory:
        assert memory.size == 1024 * MIB
        assert psutil.Process().memory_info().rss - before < 16 * MIB


def test_regions_are_2mib_aligned_and_advised_for_huge_pages_above_the_first_2mib() -> None:
    with GuestMemory([(0, 8 * MIB)]) as memory:
        start = memory.host_address(0)
        assert start % layout.HUGE_PAGE_SIZE == 0
        assert "nh" in _vm_flags(start).split()
        assert "hg" in _vm_flags(memory.host_address(layout.HUGE_PAGE_SIZE)).split()


def _vm_flags(address: int) -> str:
    lines = open("/proc/self/smaps").read().splitlines()
    inside = False
    for line in lines:
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            low, high = (int(x, 16) for x in fields[0].split("-"))
            inside = low <= address < high
        elif inside and line.startswith("VmFlags:"):
            return line
    raise AssertionError(f"{address:#x} not found in /proc/self/smaps")


def test_read_write_and_views_are_by_guest_physical_address() -> None:
    with GuestMemory(ram_regions(4 * layout.GIB)) as memory:
        memory.write(0x1000, b"low")
        memory.write(layout.MMIO_HOLE_END + 0x10, b"high")
        assert memory.read(0x1000, 3) == b"low"
        assert memory.read(layout.MMIO_HOLE_END + 0x10, 4) == b"high"
        view = memory.view(0x2000, 4)
        view[:] = b"zero"  # a view writes straight into guest memory
        assert memory.read(0x2000, 4) == b"zero"


@pytest.mark.parametrize(
    "gpa, length",
    [(64 * MIB - 2, 4), (64 * MIB, 1), (-1, 1), (layout.MMIO_HOLE_START, 1), (0, 64 * MIB + 1)],
)
def test_accesses_outside_guest_ram_raise_with_the_address(gpa: int, length: int) -> None:
    with GuestMemory([(0, 64 * MIB)]) as memory:
        with pytest.raises(GuestMemoryError) as info:
            memory.read(gpa, length)
    assert info.value.gpa == gpa and info.value.length == length


def test_an_access_may_not_span_the_mmio_hole() -> None:
    with GuestMemory(ram_regions(4 * layout.GIB)) as memory:
        with pytest.raises(GuestMemoryError):
            memory.read(layout.MMIO_HOLE_START - 2, 4)


def test_discard_gives_pages_back_and_they_read_as_zero() -> None:
    with GuestMemory([(0, 64 * MIB)]) as memory:
        memory.write(0x10000, b"\xaa" * 8192)
        memory.discard(0x10000, 4096)
        assert memory.read(0x10000, 4096) == bytes(4096)
        assert memory.read(0x11000, 4) == b"\xaa" * 4
        with pytest.raises(GuestMemoryError, match="not page aligned"):
            memory.discard(0x10001, 4096)


@pytest.mark.parametrize(
    "ranges",
    [[], [(0, 1000)], [(0x1001, 4096)], [(0, 8192), (4096, 8192)], [(8192, 4096), (0, 4096)]],
)
def test_bad_region_sets_are_rejected(ranges) -> None:
    with pytest.raises(ConfigError):
        GuestMemory(ranges)


def test_typed_integers_are_little_endian_and_bounds_checked() -> None:
    with GuestMemory([(0, 2 * MIB)]) as memory:
        memory.write_u64(0x1000, 0x0102030405060708)
        assert memory.read(0x1000, 8) == bytes([8, 7, 6, 5, 4, 3, 2, 1])
        memory.write_u32(0x1004, 0xAABBCCDD)
        memory.write_u16(0x1002, 0xEEFF)
        assert memory.read_u64(0x1000) == 0xAABBCCDDEEFF0708
        assert (memory.read_u32(0x1004), memory.read_u16(0x1002)) == (0xAABBCCDD, 0xEEFF)
        with pytest.raises(GuestMemoryError):
            memory.write_u16(2 * MIB - 1, 0)


def test_host_writes_are_noted_by_page_while_tracked() -> None:
    with GuestMemory([(0, 2 * MIB), (4 * MIB, 2 * MIB)]) as memory:
        memory.write(0x3000, b"before tracking")
        assert memory.track_host_writes() == set()  # starts tracking
        memory.write(0x1FFF, b"ab")  # across a page boundary
        memory.write_u32(4 * MIB + 0x10, 7)  # the second region
        memory.discard(0x10000, 0x2000)
        memory.read(0x5000, 100)  # reads are not writes
        assert memory.track_host_writes() == {1, 2, 0x10, 0x11, (4 * MIB) // 0x1000}
        assert memory.track_host_writes() == set()


def test_pages_written_while_they_are_taken_are_in_one_set_or_the_next() -> None:
    pages = 512
    with GuestMemory([(0, 4 * MIB)]) as memory:
        memory.track_host_writes()
        noted: set[int] = set()
        writer = threading.Thread(target=lambda: [memory.write(page * 0x1000, b"x") for page in range(pages)])
        writer.start()
        while writer.is_alive():
            taken = memory.track_host_writes()
            assert not taken & noted  # a page written once is noted once
            noted |= taken
        writer.join()
        noted |= memory.track_host_writes()
        assert noted == set(range(pages))
