"""What was written to guest memory since the last look: KVM's dirty log and the host's own writes.

KVM logs the pages the guest writes (and those KVM itself writes for it); it does not see the
host's writes, so guest memory notes those (:meth:`~pykvm.memory.GuestMemory.track_host_writes`:
virtio devices filling buffers and rings).  :class:`DirtyLog` turns both on for a migration
and back off afterwards, and hands out what was written since the last look.

Where KVM offers manual protection (``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``), reading the log
does not reset it: :meth:`DirtyLog.windows` clears (``KVM_CLEAR_DIRTY_LOG``, which write-protects
the pages again) one window of a slot just before its pages are read and sent, so a page the
guest writes between the look and the send goes out once, fresh, rather than twice.  Without
it, each look resets the whole log, as ``KVM_GET_DIRTY_LOG`` always did.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from ..kvm.dirty_bitmap import DirtyBitmap
from ..native import lib
from ..snapshot import merge_runs
from ..x86.layout import PAGE_SIZE

if TYPE_CHECKING:
    from ..machine import Machine

Runs = list[tuple[int, int]]  # (guest-physical address, bytes), in order
# Pages of a slot cleared and sent together (64 MiB): a multiple of 64, a word of KVM's bitmap.
WINDOW_PAGES = 16384


@dataclasses.dataclass
class Dirty:
    """The pages written since a look: KVM's bitmap of each slot, and the pages the host wrote."""

    bitmaps: list[DirtyBitmap]
    host_pages: set[int]

    def pages(self) -> int:
        """How many pages (a page both logs name counts twice: an estimate of what to send)."""
        return sum(bitmap.count() for bitmap in self.bitmaps) + len(self.host_pages)

    def merge(self, later: Dirty) -> Dirty:
        """What this look and a ``later`` one found together."""
        bitmaps = [_union(a, b) for a, b in zip(self.bitmaps, later.bitmaps)]
        return Dirty(bitmaps, self.host_pages | later.host_pages)

    def runs(self) -> Runs:
        """Every page written, as merged runs."""
        runs = [run for bitmap in self.bitmaps for run in bitmap.ranges()] + page_runs(self.host_pages)
        return merge_runs(runs)


class DirtyLog:
    """Dirty logging of ``machine``'s RAM for one migration; ``note_written``, if given, hears every
    run taken from the logs (the machine's reset point needs them too)."""

    def __init__(self, machine: Machine, note_written: Callable[[Runs], None] | None) -> None:
        self._vm = machine.vm
        self._memory = machine.memory
        self._note_written = note_written
        self._manual = bool(self._vm.manual_dirty_log_protect2() & lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        self._turned_on: list[int] = []
        self._host_pages: set[int] = set()  # what the host wrote, as the last look found it

    def start(self) -> None:
        """Log from now on (what was logged before is handed to ``note_written`` and forgotten)."""
        if self._manual:
            self._vm.enable_manual_dirty_log_protect()
        for slot in self._vm.memory_slots():
            if not slot.flags & lib.KVM_MEM_LOG_DIRTY_PAGES:
                self._vm.set_dirty_logging(slot.slot)
                self._turned_on.append(slot.slot)
        self._forget(self.take())

    def take(self) -> Dirty:
        """What was written since the last look.  Devices must be quiesced: a device notes a page
        before it writes it, and one halfway through a write at the look would have its page read
        before its data.  The pages the host wrote by the last look come again (a device working
        outside the vCPU and I/O threads, a balloon statistics request from the caller's, may
        still have been at it)."""
        host_pages = self._memory.track_host_writes()
        dirty = Dirty([self._vm.get_dirty_log(slot.slot) for slot in self._vm.memory_slots()],
                      host_pages | self._host_pages)  # fmt: skip
        self._host_pages = host_pages
        if self._note_written is not None:
            self._note_written(dirty.runs())
        return dirty

    def windows(self, dirty: Dirty) -> Iterator[Runs]:
        """The runs of ``dirty`` to send, a window at a time; with manual protection each window
        is cleared in KVM's log just before it is handed out."""
        for bitmap in dirty.bitmaps:
            for first in range(0, bitmap.pages, WINDOW_PAGES):
                window = _window(bitmap, first, WINDOW_PAGES)
                if window is not None:
                    if self._manual:
                        self._vm.clear_dirty_log(window)
                    yield list(window.ranges())
        if dirty.host_pages:
            yield page_runs(dirty.host_pages)

    def stop(self) -> None:
        """Put the logging back as it was (a reset point's logging stays on)."""
        self._forget(self.take())
        for slot in self._turned_on:
            self._vm.set_dirty_logging(slot, False)
        if self._manual:
            self._vm.enable_cap(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0)

    def _forget(self, dirty: Dirty) -> None:
        if self._manual:
            for bitmap in dirty.bitmaps:
                if bitmap:
                    self._vm.clear_dirty_log(bitmap)


def _window(bitmap: DirtyBitmap, first: int, pages: int) -> DirtyBitmap | None:
    """``bitmap`` with only pages ``[first, first + pages)`` kept (``first`` a multiple of 64);
    None when none of those is dirty."""
    start, end = first // 8, min((first + pages) // 8, len(bitmap.bitmap))
    if bitmap.bitmap.count(0, start, end) == end - start:
        return None
    kept = bytes(start) + bitmap.bitmap[start:end] + bytes(len(bitmap.bitmap) - end)
    return DirtyBitmap(bitmap.slot, bitmap.gpa, bitmap.pages, kept)


def _union(a: DirtyBitmap, b: DirtyBitmap) -> DirtyBitmap:
    both = int.from_bytes(a.bitmap, "little") | int.from_bytes(b.bitmap, "little")
    return DirtyBitmap(a.slot, a.gpa, a.pages, both.to_bytes(len(a.bitmap), "little"))


def page_runs(pages: Iterable[int]) -> Runs:
    """Page numbers as (address, bytes) runs of consecutive pages."""
    return merge_runs((page * PAGE_SIZE, PAGE_SIZE) for page in pages)
