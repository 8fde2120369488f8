"""The dirty log of one memory slot: which of its pages the guest wrote.

KVM reports it as a bitmap, one bit per 4 KiB page of the slot (bit ``i % 8`` of byte
``i // 8`` is page ``i``).  :class:`DirtyBitmap` keeps those bytes and answers in the
shapes a caller needs: a count, the page numbers, or runs of consecutive pages and their
guest-physical byte ranges (one copy per run when rewriting or sending pages).  Clean
stretches are skipped at C speed (whole blocks of zero bytes, then a regular expression
inside the others) and runs of ``0xff`` bytes are taken whole, so a clean, a sparse or a
fully dirty GiB costs about as little as its result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from ..errors import StateError

PAGE_SIZE = 4096
# Bitmap bytes looked at together (2048 pages): an all-zero block is passed over at once.
_BLOCK = 256
# A run of all-ones bytes (eight dirty pages each), or any other non-zero byte.
_SET_BYTES = re.compile(rb"\xff+|[^\x00]", re.DOTALL)


def _byte_runs(value: int) -> tuple[tuple[int, int], ...]:
    """The (first bit, length) runs of ones in one byte."""
    runs: list[tuple[int, int]] = []
    for bit in range(8):
        if value >> bit & 1:
            if runs and runs[-1][0] + runs[-1][1] == bit:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((bit, 1))
    return tuple(runs)


_BYTE_RUNS = tuple(_byte_runs(value) for value in range(256))


def bitmap_size(pages: int) -> int:
    """Bytes of KVM's dirty bitmap for ``pages`` pages (whole 64-bit words)."""
    return (pages + 63) // 64 * 8


@dataclass(frozen=True)
class DirtyBitmap:
    """The dirty pages of memory slot ``slot`` (``pages`` pages from guest-physical ``gpa``)."""

    slot: int
    gpa: int
    pages: int
    bitmap: bytes

    def __post_init__(self) -> None:
        if len(self.bitmap) != bitmap_size(self.pages):
            raise StateError(
                f"a dirty bitmap of {self.pages} pages has {bitmap_size(self.pages)} bytes, not {len(self.bitmap)}"
            )

    def __bool__(self) -> bool:
        """Whether any page is dirty."""
        return self.bitmap.count(0) != len(self.bitmap)

    def count(self) -> int:
        """How many pages are dirty."""
        return int.from_bytes(self.bitmap, "little").bit_count()

    def runs(self) -> Iterator[tuple[int, int]]:
        """(first page, page count) of each run of consecutive dirty pages, in order (slot-relative)."""
        start = length = 0
        for match in self._set_bytes():
            first_page = match.start() * 8
            byte = self.bitmap[match.start()]
            pieces = ((0, 8 * (match.end() - match.start())),) if byte == 0xFF else _BYTE_RUNS[byte]
            for offset, count in pieces:
                page = first_page + offset
                if length and page == start + length:
                    length += count
                    continue
                if length:
                    yield start, length
                start, length = page, count
        if length:
            yield start, length

    def _set_bytes(self) -> Iterator[re.Match[bytes]]:
        size = len(self.bitmap)
        for block in range(0, size, _BLOCK):
            end = min(block + _BLOCK, size)
            if self.bitmap.count(0, block, end) != end - block:
                yield from _SET_BYTES.finditer(self.bitmap, block, end)

    def page_numbers(self) -> Iterator[int]:
        """The slot-relative number of every dirty page, in order."""
        for start, length in self.runs():
            yield from range(start, start + length)

    def ranges(self) -> Iterator[tuple[int, int]]:
        """(guest-physical address, bytes) of each run of dirty pages."""
        for start, length in self.runs():
            yield self.gpa + start * PAGE_SIZE, length * PAGE_SIZE
