"""Guest physical memory: anonymous host mappings registered as KVM memory slots.

Each region is an anonymous, private mapping made with ``MAP_NORESERVE`` (so guest
RAM costs nothing until the guest touches it), aligned to 2 MiB inside a slightly
larger mapping and advised for transparent huge pages.  Every access by
guest-physical address goes through :meth:`GuestMemory.locate`, the one bounds
check; an access that is not wholly inside one region raises
:class:`~pykvm.errors.GuestMemoryError`.  Integers in guest memory are
little-endian (x86, and every structure a guest shares with pykvm: virtqueues,
boot information), read and written with the typed accessors ``read_u16`` ...
``write_u64``, each one load or store of the whole integer: a vCPU running at the
same time (a virtqueue's index read by the driver while the device moves it) sees
the old value or the new one, never half of each.  (``struct`` packs and unpacks
little-endian integers byte by byte, so it is not used for them.)  C code that checks guest addresses itself (the virtqueue chain
walk, virtio-blk's plain requests) gets the regions as one ``struct pykvm_guest_memory``:
:attr:`GuestMemory.table`.  The pages the host writes (KVM's dirty log sees only the guest's
writes) are noted, while :meth:`GuestMemory.track_host_writes` asks for it, in a bitmap per
region that C code and :meth:`GuestMemory.view` alike mark (``pykvm_note_written``).
"""

from __future__ import annotations

import logging
import mmap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Literal

from .errors import ConfigError, GuestMemoryError
from .native import ffi, lib
from .x86.layout import HUGE_PAGE_SIZE, PAGE_SIZE

if TYPE_CHECKING:
    from .kvm import Vm

log = logging.getLogger(__name__)


@dataclass
class MemoryRegion:
    """One contiguous range of guest RAM and its host mapping."""

    gpa: int
    size: int
    host_addr: int
    view: memoryview
    mapping: mmap.mmap
    mapping_offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


# The first 2 MiB of guest-physical memory (boot structures, firmware tables, the first bytes of a
# kernel at 1 MiB) stays on 4 KiB pages: an idle guest touches a few pages there, and a huge page
# would make it cost 2 MiB instead (bench/bench_density.py: ~0.1 MiB per idle guest instead of ~2.1).
SMALL_PAGES_END = HUGE_PAGE_SIZE


def _map_region(gpa: int, size: int, backing: int | None = None) -> MemoryRegion:
    if backing is not None:  # copy-on-write over a file, paged in on demand (a snapshot's memory)
        mapping = mmap.mmap(
            backing, size, flags=mmap.MAP_PRIVATE | lib.MAP_NORESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=gpa
        )
        pointer = ffi.from_buffer(mapping)
        base = int(ffi.cast("uintptr_t", pointer))
        ffi.release(pointer)
        return MemoryRegion(gpa, size, base, memoryview(mapping), mapping, 0)
    mapping = mmap.mmap(
        -1,
        size + HUGE_PAGE_SIZE,
        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | lib.MAP_NORESERVE,
        prot=mmap.PROT_READ | mmap.PROT_WRITE,
    )
    pointer = ffi.from_buffer(mapping)
    base = int(ffi.cast("uintptr_t", pointer))
    ffi.release(pointer)
    offset = -base % HUGE_PAGE_SIZE
    small = max(0, min(size, SMALL_PAGES_END - gpa))
    if small:
        mapping.madvise(mmap.MADV_NOHUGEPAGE, offset, small)
    if size > small:
        mapping.madvise(mmap.MADV_HUGEPAGE, offset + small, size - small)
    return MemoryRegion(gpa, size, base + offset, memoryview(mapping)[offset : offset + size], mapping, offset)


_WORD_FORMATS: dict[int, Literal["H", "I", "Q"]] = {2: "H", 4: "I", 8: "Q"}


class GuestMemory:
    """The guest's RAM: sorted, non-overlapping regions of page-aligned size.

    ``backing`` is a file (descriptor) whose bytes at each region's guest-physical address
    become the region's contents, mapped copy-on-write: the guest's writes stay private, and
    nothing is read until the guest touches it (a restored snapshot).  Without one, RAM is
    anonymous and reads as zeros.

    >>> with GuestMemory([(0, 1 << 20)]) as mem:
    ...     mem.write(0x1000, b"hi")
    ...     mem.read(0x1000, 2)
    b'hi'
    """

    def __init__(self, ranges: Iterable[tuple[int, int]], backing: int | None = None) -> None:
        ranges = list(ranges)
        _validate(ranges)
        self.regions: list[MemoryRegion] = []
        self.file_backed = backing is not None
        self.table = ffi.new("struct pykvm_guest_memory *")  # filled once the regions are mapped
        self._written: list[object] = []  # each region's written-page bitmap, while host writes are tracked
        try:
            for gpa, size in ranges:
                self.regions.append(_map_region(gpa, size, backing))
        except OSError as err:
            self.close()
            total = sum(size for _, size in ranges)
            raise ConfigError(f"cannot reserve {total} bytes of guest memory: {err.strerror}") from err
        self._fill_table()

    @property
    def size(self) -> int:
        """Total bytes of guest RAM."""
        return sum(region.size for region in self.regions)

    def register(self, vm: Vm, first_slot: int = 0, flags: int = 0) -> None:
        """Map every region into ``vm`` as a KVM memory slot (with ``KVM_MEM_*`` ``flags``)."""
        for slot, region in enumerate(self.regions, first_slot):
            vm.set_user_memory_region(slot, region.gpa, region.size, region.host_addr, flags)

    def locate(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        """The region wholly holding ``[gpa, gpa+length)`` and the offset into it."""
        if gpa >= 0 and length >= 0:
            for region in self.regions:
                if region.gpa <= gpa and gpa + length <= region.end:
                    return region, gpa - region.gpa
        raise GuestMemoryError(gpa, length)

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy, writable view of ``[gpa, gpa+length)`` (counted as written, when host
        writes are tracked: a view is how devices write guest memory)."""
        region, offset = self.locate(gpa, length)
        self._note_host_write(gpa, length)
        return region.view[offset : offset + length]

    def _note_host_write(self, gpa: int, length: int) -> None:
        if self._written:
            lib.pykvm_note_written(self.table, gpa, length)

    def track_host_writes(self) -> set[int]:
        """Start (or restart) noting which pages the host writes: KVM's dirty log sees only the
        guest's own writes, not a device's (Python's or C's).  Returns the pages noted until now
        (page numbers); a page written while this runs is in this set or the next one."""
        if not self._written:
            self._written = [ffi.new("uint64_t[]", _bitmap_words(region.size)) for region in self.regions]
            for entry, bitmap in zip(self.table.regions, self._written):
                entry.written = bitmap
            return set()
        noted: set[int] = set()
        for region, bitmap in zip(self.regions, self._written):
            words = _bitmap_words(region.size)
            taken = ffi.new("uint64_t[]", words)
            lib.pykvm_take_written(bitmap, taken, words)
            first_page = region.gpa // PAGE_SIZE
            for index, word in enumerate(memoryview(ffi.buffer(taken)).cast("Q")):
                while word:
                    low = word & -word
                    noted.add(first_page + 64 * index + low.bit_length() - 1)
                    word ^= low
        return noted

    def read(self, gpa: int, length: int) -> bytes:
        """A copy of ``length`` bytes at ``gpa``."""
        region, offset = self.locate(gpa, length)
        return bytes(region.view[offset : offset + length])

    def write(self, gpa: int, data: bytes) -> None:
        """Copy ``data`` to ``gpa``."""
        self.view(gpa, len(data))[:] = data

    def read_u16(self, gpa: int) -> int:
        return self._word(gpa, 2)[0]

    def read_u32(self, gpa: int) -> int:
        return self._word(gpa, 4)[0]

    def read_u64(self, gpa: int) -> int:
        return self._word(gpa, 8)[0]

    def write_u16(self, gpa: int, value: int) -> None:
        self.view(gpa, 2).cast("H")[0] = value

    def write_u32(self, gpa: int, value: int) -> None:
        self.view(gpa, 4).cast("I")[0] = value

    def write_u64(self, gpa: int, value: int) -> None:
        self.view(gpa, 8).cast("Q")[0] = value

    def _word(self, gpa: int, size: int) -> memoryview[int]:
        """The integer of ``size`` bytes at ``gpa`` as a one-item view to read: indexing it is one
        load of the whole integer (host byte order, which is x86's little-endian).  The writers
        cast :meth:`view` the same way, so that the write is one store, and noted."""
        region, offset = self.locate(gpa, size)
        return region.view[offset : offset + size].cast(_WORD_FORMATS[size])

    def host_address(self, gpa: int, length: int = 1) -> int:
        """The host virtual address of ``gpa`` (for C code and syscalls)."""
        region, offset = self.locate(gpa, length)
        return region.host_addr + offset

    def _fill_table(self) -> None:
        if len(self.regions) > lib.PYKVM_MEM_REGIONS_MAX:
            self.close()
            raise ConfigError(f"C code handles at most {lib.PYKVM_MEM_REGIONS_MAX} memory regions")
        for entry, region in zip(self.table.regions, self.regions):
            entry.gpa, entry.size, entry.host = region.gpa, region.size, region.host_addr
        self.table.count = len(self.regions)

    def discard(self, gpa: int, length: int) -> None:
        """Give whole pages back to the host (MADV_DONTNEED); the guest then reads zeros there (or,
        over a backing file, the file's contents again)."""
        if gpa % PAGE_SIZE or length % PAGE_SIZE:
            raise GuestMemoryError(gpa, length, "not page aligned")
        region, offset = self.locate(gpa, length)
        self._note_host_write(gpa, length)
        region.mapping.madvise(mmap.MADV_DONTNEED, region.mapping_offset + offset, length)

    def merge(self, enable: bool) -> None:
        """Opt guest RAM into the kernel's same-page merging (KSM), or back out of it.

        ``MADV_MERGEABLE`` over every region (``MADV_UNMERGEABLE`` to undo: merged pages are
        copied back first).  Merging happens only while ``/sys/kernel/mm/ksm/run`` is 1.
        """
        advice = mmap.MADV_MERGEABLE if enable else mmap.MADV_UNMERGEABLE
        for region in self.regions:
            try:
                region.mapping.madvise(advice, region.mapping_offset, region.size)
            except OSError as err:
                raise ConfigError(
                    f"cannot {'enable' if enable else 'disable'} page sharing on guest memory at {region.gpa:#x}: "
                    f"{err.strerror} (a kernel without KSM, CONFIG_KSM?)"
                ) from err

    def resident(self) -> dict[str, int]:
        """Bytes of guest RAM the host holds for this memory, from ``/proc/self/smaps``.

        ``rss`` (resident, as counted in the process RSS), ``anon_huge`` (of which in
        transparent huge pages), ``ksm`` (of which merged pages, shared by KSM) and
        ``private_dirty`` (pages only this memory holds: over a backing file, what the guest
        changed), summed over the mappings of every region: what the guest's RAM costs inside
        the process's RSS.
        """
        spans = [(r.host_addr - r.mapping_offset, r.host_addr - r.mapping_offset + len(r.mapping)) for r in self.regions]
        totals = {"rss": 0, "anon_huge": 0, "ksm": 0, "private_dirty": 0}
        fields = {"Rss:": "rss", "AnonHugePages:": "anon_huge", "KSM:": "ksm", "Private_Dirty:": "private_dirty"}
        inside = False
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                head = line.split(None, 1)[0]
                if head in fields:
                    if inside:
                        totals[fields[head]] += int(line.split()[1]) * 1024
                elif "-" in head and not head.endswith(":"):
                    start, end = (int(x, 16) for x in head.split("-"))
                    inside = any(lo <= start and end <= hi for lo, hi in spans)
        return totals

    def close(self) -> None:
        """Unmap guest RAM (views still held elsewhere keep their mapping alive)."""
        self.table.count = 0  # C code sees no memory from now on
        self._written = []
        for region in self.regions:
            region.view.release()
            try:
                region.mapping.close()
            except BufferError:
                log.debug("guest memory at %#x is still viewed; unmapped when the views go", region.gpa)
        self.regions = []

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bitmap_words(size: int) -> int:
    """64-bit words of a bitmap with one bit per page of ``size`` bytes."""
    return -(-size // PAGE_SIZE) // 64 + 1


def _validate(ranges: list[tuple[int, int]]) -> None:
    if not ranges:
        raise ConfigError("guest memory needs at least one region")
    previous_end = 0
    for gpa, size in ranges:
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
            raise ConfigError(f"guest memory region at {gpa:#x} of {size:#x} bytes is not page aligned")
        if gpa < previous_end:
            raise ConfigError(f"guest memory region at {gpa:#x} overlaps or is out of order")
        previous_end = gpa + size
