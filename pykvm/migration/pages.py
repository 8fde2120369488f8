"""Guest memory into page records: pages of data as they are, pages of zeros as a flag.

Each run of pages is copied out of guest memory a record at a time (the guest may be writing
it: what was copied is what is sent, and the dirty log catches the rest) and split into runs
of zero and non-zero pages.  For anonymous guest RAM the process's page map
(``/proc/self/pagemap``) tells which pages were never touched (neither present nor swapped):
those hold zeros and are not read at all, so sending an idle guest of any size costs little.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

from ..memory import GuestMemory, MemoryRegion
from .wire import PAGE_SIZE, RECORD_PAGES, StreamWriter

RECORD_BYTES = RECORD_PAGES * PAGE_SIZE
_ZERO_PAGE = bytes(PAGE_SIZE)
_ZERO_RECORD = bytes(RECORD_BYTES)
PAGEMAP = "/proc/self/pagemap"
PAGEMAP_BATCH = 1 << 16  # pages whose page-map entries are read at once (512 KiB of entries)
# The last byte of a little-endian page-map entry holds bit 63 (present) and bit 62 (swapped):
# translated through this table it is 1 for a page that may hold data, 0 for one never touched.
_TOUCHED = bytes.maketrans(bytes(range(256)), bytes(int(bool(value & 0xC0)) for value in range(256)))
_SAME_BYTES = re.compile(rb"\x01+|\x00+")


class PageSender:
    """Sends pages of ``memory`` through ``writer``, counting the pages sent as data and as zeros."""

    def __init__(self, writer: StreamWriter, memory: GuestMemory) -> None:
        self.writer = writer
        self._memory = memory
        self.data_pages = 0
        self.zero_pages = 0

    def send_all(self) -> None:
        """Every page of guest RAM."""
        for region in self._memory.regions:
            for offset, length, touched in self._touched_runs(region):
                if touched:
                    self._send(region, offset, length)
                else:
                    self._zero(region.gpa + offset, length // PAGE_SIZE)

    def send(self, runs: Iterable[tuple[int, int]]) -> None:
        """The pages of ``runs`` ((guest-physical address, bytes), page aligned)."""
        for gpa, length in runs:
            region, offset = self._memory.locate(gpa, length)
            self._send(region, offset, length)

    def _send(self, region: MemoryRegion, offset: int, length: int) -> None:
        for start in range(offset, offset + length, RECORD_BYTES):
            data = region.view[start : min(start + RECORD_BYTES, offset + length)].tobytes()
            gpa = region.gpa + start
            if data == _ZERO_RECORD[: len(data)]:
                self._zero(gpa, len(data) // PAGE_SIZE)
                continue
            for first, end, zero in _zero_runs(data):
                if zero:
                    self._zero(gpa + first, (end - first) // PAGE_SIZE)
                else:
                    self.writer.pages(gpa + first, memoryview(data)[first:end])
                    self.data_pages += (end - first) // PAGE_SIZE

    def _zero(self, gpa: int, pages: int) -> None:
        self.writer.zero(gpa, pages)
        self.zero_pages += pages

    def _touched_runs(self, region: MemoryRegion) -> Iterator[tuple[int, int, bool]]:
        """(offset, bytes, touched) runs covering ``region``: untouched pages are zeros."""
        if self._memory.file_backed:  # an untouched page there holds the file's data
            yield 0, region.size, True
            return
        pages = region.size // PAGE_SIZE
        try:
            with open(PAGEMAP, "rb", buffering=0) as pagemap:
                for first in range(0, pages, PAGEMAP_BATCH):
                    count = min(PAGEMAP_BATCH, pages - first)
                    pagemap.seek((region.host_addr // PAGE_SIZE + first) * 8)
                    entries = pagemap.read(count * 8)
                    if len(entries) != count * 8:
                        raise OSError("short read")
                    touched = entries[7::8].translate(_TOUCHED)
                    for match in _SAME_BYTES.finditer(touched):
                        start, end = first + match.start(), first + match.end()
                        yield start * PAGE_SIZE, (end - start) * PAGE_SIZE, touched[match.start()] == 1
        except OSError:  # no page map here: read every page
            yield 0, region.size, True


def _zero_runs(data: bytes) -> Iterator[tuple[int, int, bool]]:
    """(start, end, all zeros) runs of whole pages covering ``data``."""
    start = 0
    zero = data.startswith(_ZERO_PAGE)
    for offset in range(PAGE_SIZE, len(data), PAGE_SIZE):
        page_zero = data.startswith(_ZERO_PAGE, offset)
        if page_zero != zero:
            yield start, offset, zero
            start, zero = offset, page_zero
    yield start, len(data), zero
