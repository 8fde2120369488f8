"""virtio-balloon (device ID 5, virtio 1.2 section 5.5): memory the guest gives back to the host.

The host sets a target in the configuration space (``num_pages``, in 4 KiB pages) and
raises a configuration-change interrupt; the driver inflates the balloon by handing the
device page frame numbers (le32, 4 KiB units) on the inflate queue, or deflates it on the
deflate queue, and writes how many pages it holds to ``actual``.

Queues are numbered densely over the negotiated features, as Linux and QEMU number them:
inflateq 0, deflateq 1, then statsq if VIRTIO_BALLOON_F_STATS_VQ was negotiated, then
reporting_vq if VIRTIO_BALLOON_F_REPORTING was (free_page_vq, VIRTIO_BALLOON_F_FREE_PAGE_HINT,
is not offered).  The transport's queue count is fixed when it is created, so the device
offers a queue for every feature it may negotiate and maps indices to roles at DRIVER_OK.

What the device does with each queue:

* **inflateq**: a chain carries at most :data:`MAX_PFNS_PER_CHAIN` page numbers (read from
  guest memory in pieces; a longer chain is skipped, counted and completed: Linux sends 256
  per buffer); every PFN is checked (inside guest RAM, in an e820 RAM range, not below
  1 MiB where the VMM keeps its boot structures and the BIOS area) and the good ones are
  released to the host with ``madvise(MADV_DONTNEED)`` (:meth:`GuestMemory.discard
  <pykvm.memory.GuestMemory.discard>`): the process RSS falls and the guest reads zeros there
  if it touches the pages again.  All chains available at one notification are gathered,
  sorted and merged into runs first (in batches of at most :data:`MAX_PFNS_PER_CHAIN` pages),
  so that contiguous pages go in one call (a run that covers a whole 2 MiB transparent huge
  page frees it at once; a smaller one splits it).
* **deflateq**: PFNs are checked and recorded; nothing else (the pages fault back in, zeroed).
* **statsq**: the driver posts one buffer of 10-byte ``{le16 tag, le64 value}`` entries (the
  first :data:`MAX_STAT_ENTRIES` are read, the rest counted); the device keeps the latest
  value of each tag (unknown tags by number) and *holds* the buffer.
  Completing it is how the device asks for fresh statistics (5.5.6.3): :meth:`request_stats`.
* **reporting_vq**: each buffer *is* free guest memory (Linux posts them device-writable,
  2 MiB blocks); whole 4 KiB-aligned ranges that pass the same checks are discarded, and the
  chain is completed with length 0.

Guest mistakes are skipped, logged (a few a minute) and counted (Firecracker's rule), never
trusted: a PFN outside RAM (``bad_pfns``), a buffer whose length is not a multiple of 4 (or,
for reports, of 4 KiB) or whose direction is wrong, a PFN array longer than any driver
needs (``bad_buffers``).  The chain is still completed.

Library use (``Machine(balloon=True)`` attaches one as ``vm.balloon``)::

    vm.balloon.target = "32M"      # the balloon's size: take 32 MiB from the guest
    vm.balloon.actual              # bytes the driver says it holds (config "actual")
    vm.balloon.guest_stats()       # {"memtot": ..., "memfree": ..., "avail": ...}, bytes
    vm.balloon.counters()          # inflated/deflated/reported bytes, bad PFNs and buffers
    vm.balloon.stats               # the device's own counters, as every device keeps them
"""

from __future__ import annotations

import array
import bisect
import logging
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from ...config import parse_size
from ...errors import ConfigError, GuestMemoryError, StateError
from ...logs import RateLimitedLog
from ...memory import GuestMemory
from ...x86.e820 import E820Entry, E820Type
from ...x86.layout import HIMEM_START
from ..state import check_bytes, check_int, check_type
from .device import VirtioDevice, VirtioInterrupt
from .queue import Buffer, DescriptorChain, SplitQueue

log = logging.getLogger(__name__)

DEVICE_ID = 5
QUEUE_SIZE = 256
PAGE_SHIFT = 12  # VIRTIO_BALLOON_PFN_SHIFT: the balloon always counts 4 KiB pages
PAGE = 1 << PAGE_SHIFT
PFN_BYTES = 4

# Feature bits (5.5.3).
F_MUST_TELL_HOST = 0
F_STATS_VQ = 1
F_DEFLATE_ON_OOM = 2
F_FREE_PAGE_HINT = 3  # not offered
F_PAGE_POISON = 4  # not offered
F_REPORTING = 5

# Configuration space (5.5.4): le32 num_pages, le32 actual, le32 free_page_hint_cmd_id, le32 poison_val.
CONFIG_NUM_PAGES, CONFIG_ACTUAL, CONFIG_SIZE = 0, 4, 16

# Memory statistics tags (5.5.6.3); values are bytes (events for the swap/fault counters).
STAT_NAMES = {
    0: "swap_in",
    1: "swap_out",
    2: "major_faults",
    3: "minor_faults",
    4: "memfree",
    5: "memtot",
    6: "avail",
    7: "caches",
    8: "hugetlb_allocations",
    9: "hugetlb_failures",
}
STAT_ENTRY = struct.Struct("<HQ")  # packed: 10 bytes
MAX_STAT_ENTRIES = 64  # the spec defines 10 tags; a longer buffer is read this far
# Page numbers one inflate or deflate chain may carry (256 MiB of guest pages; Linux sends
# 256 per buffer): more is no driver's need, and would make the host hold a guest-sized array.
MAX_PFNS_PER_CHAIN = 1 << 16
PFN_PIECE = 4096  # page numbers read from guest memory at a time
MAX_HELD_BYTES = 1 << 32  # a held-page bitmap for 128 TiB of RAM: more is not a machine's
# Guest mistakes logged per minute; the rest are counted (a guest controls the rate).
LOUD_MISTAKES = 10


@dataclass(frozen=True)
class BalloonState:
    """What the balloon keeps across a snapshot: the target, the driver's ``actual``, the pages
    it holds (one bit per page frame), the guest's statistics and the statistics buffer it
    holds (head and buffers, to complete it when fresh statistics are wanted)."""

    num_pages: int
    actual_pages: int
    held: bytes
    guest_stats: tuple[tuple[int, int], ...]
    stats_chain: tuple[int, tuple[tuple[int, int, bool], ...]] | None


class VirtioBalloon(VirtioDevice):
    """A virtio-balloon: a target the host sets, pages the guest hands back, its statistics.

    ``memory_map`` (the machine's e820 map) says which pages may be released: only
    :attr:`~pykvm.x86.e820.E820Type.RAM` pages at or above 1 MiB.  Without one, every page of
    guest memory at or above 1 MiB qualifies.  ``ram_size`` (guest RAM) bounds the target.
    ``on_change(target=...)`` or ``on_change(actual=...)`` (bytes) hears of each change.
    """

    name = "balloon"
    device_id = DEVICE_ID

    def __init__(
        self,
        memory_map: Sequence[E820Entry] | None = None,
        *,
        deflate_on_oom: bool = False,
        free_page_reporting: bool = False,
        ram_size: int | None = None,
        on_change: Callable[..., None] | None = None,
    ) -> None:
        super().__init__()
        self._on_change = on_change
        self.features = (1 << F_STATS_VQ) | (deflate_on_oom << F_DEFLATE_ON_OOM) | (free_page_reporting << F_REPORTING)
        # One queue per role that may be negotiated (inflate, deflate, stats, reporting).
        self.queue_max_sizes = (QUEUE_SIZE,) * (3 + free_page_reporting)
        self._memory_map = tuple(memory_map) if memory_map is not None else None
        self._ranges: list[tuple[int, int]] = []  # usable [start, end), sorted
        self._starts: list[int] = []
        self._held = bytearray()  # one bit per PFN: pages the host believes are in the balloon
        self._ram_size = ram_size  # the largest target; learnt at activation when not given
        if self._memory_map is not None:
            self._learn_ranges(usable_ranges((e.addr, e.end) for e in self._memory_map if e.type is E820Type.RAM))
        self._roles: dict[int, str] = {}
        self.num_pages = 0  # the target, in pages
        self.actual_pages = 0  # what the driver wrote to "actual"
        self._guest_stats: dict[int, int] = {}
        self._stats_chain: DescriptorChain | None = None
        self._stats_queue: int | None = None
        self.stats_updated_at: float | None = None  # time.monotonic() of the last update
        self._changed = threading.Condition()  # actual written, statistics updated
        self._mistakes = RateLimitedLog(log, LOUD_MISTAKES, 60.0)

    def _learn_ranges(self, ranges: list[tuple[int, int]]) -> None:
        """Which pages may be released, and room for one held bit per page up to the top one."""
        self._ranges = ranges
        self._starts = [start for start, _ in ranges]
        top = max((end for _, end in ranges), default=0)
        if len(self._held) != (top >> PAGE_SHIFT) // 8 + 1:
            self._held = bytearray((top >> PAGE_SHIFT) // 8 + 1)

    @property
    def usable(self) -> list[tuple[int, int]]:
        """The guest-physical ``[start, end)`` ranges whose pages the balloon may release."""
        return list(self._ranges)

    def config_bytes(self) -> bytes:
        return struct.pack("<IIII", self.num_pages, self.actual_pages, 0, 0)

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Only ``actual`` (bytes 4-7) is driver-writable; partial writes merge into it."""
        if not (CONFIG_ACTUAL <= offset and offset + size <= CONFIG_ACTUAL + 4) or size not in (1, 2, 4):
            self.stats["config_writes_ignored"] += 1
            return
        current = bytearray(struct.pack("<I", self.actual_pages))
        shift = offset - CONFIG_ACTUAL
        current[shift : shift + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        with self._changed:
            self.actual_pages = struct.unpack("<I", current)[0]
            self._changed.notify_all()
        if self._on_change is not None:
            self._on_change(actual=self.actual)

    # --- the host's side: target, actual, statistics -----------------------------------
    @property
    def target(self) -> int:
        """The balloon size the host asks for, in bytes (``num_pages`` x 4 KiB).

        Set it to a size (``"32M"``, bytes as an int); it is rounded down to whole pages,
        and the driver gets a configuration-change interrupt when it changes.
        """
        return self.num_pages * PAGE

    @target.setter
    def target(self, size: str | int) -> None:
        self.set_target(size)

    def set_target(self, size: str | int) -> int:
        """Set the target (see :attr:`target`); returns it in bytes."""
        wanted = parse_size(size)
        ram = self._ram_size
        if wanted < 0 or (ram is not None and wanted > ram):
            limit = f" (guest RAM is {ram} bytes)" if ram is not None else ""
            raise ConfigError(f"a balloon of {wanted} bytes is out of range{limit}")
        pages = wanted >> PAGE_SHIFT
        with self.lock:
            if pages != self.num_pages:
                self.num_pages = pages
                self.stats["target_changes"] += 1
                self.config_changed()
                if self._on_change is not None:
                    self._on_change(target=self.target)
        return pages * PAGE

    @property
    def actual(self) -> int:
        """Bytes the driver says are in the balloon (configuration field ``actual``)."""
        return self.actual_pages * PAGE

    def wait_actual(self, size: str | int, timeout: float) -> bool:
        """Wait until ``actual`` equals ``size`` (bytes or a size string); False on timeout."""
        pages = parse_size(size) >> PAGE_SHIFT
        with self._changed:
            return self._changed.wait_for(lambda: self.actual_pages == pages, timeout)

    def guest_stats(self) -> dict[str, int]:
        """The guest's latest memory statistics by name (bytes; see :data:`STAT_NAMES`)."""
        with self._changed:
            return {STAT_NAMES.get(tag, f"tag_{tag}"): value for tag, value in sorted(self._guest_stats.items())}

    @property
    def stats_generation(self) -> int:
        """How many statistics buffers the driver has posted."""
        return self.stats["stats_updates"]

    def request_stats(self) -> bool:
        """Ask the driver for fresh statistics by returning the buffer it posted (5.5.6.3).

        False if there is no buffer to return (no STATS_VQ, or the driver has not posted one).
        """
        with self.lock:
            chain, queue = self._stats_chain, self._stats_queue
            if chain is None or queue is None or not self.active:
                return False
            self._stats_chain = None
            self.complete(queue, chain, 0)
            self.signal(queue)
            self.stats["stats_requests"] += 1
            return True

    def refresh_stats(self, timeout: float = 1.0) -> bool:
        """:meth:`request_stats`, then wait (up to ``timeout`` s) for the driver's next buffer.

        When the device holds no buffer because the driver is still refilling the one it got
        back, its next buffer is as fresh and is waited for all the same.  False on timeout,
        or when statistics were not negotiated.
        """
        before = self.stats_generation
        if not self.request_stats() and not self.stats_expected():
            return False
        return self.wait_stats(before, timeout)

    def stats_expected(self) -> bool:
        """Whether the driver negotiated statistics on a live device (so a buffer will come)."""
        return self.active and self._stats_queue is not None

    def wait_stats(self, generation: int, timeout: float) -> bool:
        """Wait until :attr:`stats_generation` passes ``generation``; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self.stats_generation > generation, timeout)

    def counters(self) -> dict[str, int]:
        """What the device did, in bytes where it is memory."""
        return {
            "inflated_bytes": self.stats["inflated_pages"] * PAGE,
            "deflated_bytes": self.stats["deflated_pages"] * PAGE,
            "reported_bytes": self.stats["reported_bytes"],
            "held_bytes": self.held_pages() * PAGE,
            "bad_pfns": self.stats["bad_pfns"],
            "bad_buffers": self.stats["bad_buffers"],
        }

    def held_pages(self) -> int:
        """Pages the host has released for the balloon and not seen deflated since."""
        return int.from_bytes(self._held, "little").bit_count()

    @property
    def negotiated(self) -> dict[str, bool]:
        """Which optional features the driver accepted."""
        f = self.driver_features
        return {
            "stats": bool(f >> F_STATS_VQ & 1),
            "deflate_on_oom": bool(f >> F_DEFLATE_ON_OOM & 1),
            "free_page_reporting": bool(f >> F_REPORTING & 1),
        }

    # --- lifecycle --------------------------------------------------------------------
    def activate(self, memory: GuestMemory, queues: Sequence[SplitQueue], interrupt: VirtioInterrupt) -> None:
        super().activate(memory, queues, interrupt)
        if self._memory_map is None:  # no e820 map: every page of guest RAM from 1 MiB up
            self._learn_ranges(usable_ranges((region.gpa, region.end) for region in memory.regions))
        if self._ram_size is None:
            self._ram_size = memory.size
        roles = ["inflate", "deflate"]
        if self.driver_features >> F_STATS_VQ & 1:
            roles.append("stats")
        if self.driver_features >> F_REPORTING & 1:
            roles.append("reporting")
        self._roles = dict(enumerate(roles))
        self._stats_queue = roles.index("stats") if "stats" in roles else None

    def reset(self) -> None:
        super().reset()
        self._roles = {}
        self._stats_chain = None
        self._stats_queue = None
        with self._changed:
            self.actual_pages = 0
            self._changed.notify_all()
        self._held[:] = bytes(len(self._held))

    def process(self, queue_index: int) -> None:
        role = self._roles.get(queue_index)
        if role == "inflate":
            self._process_pfns(queue_index, inflate=True)
        elif role == "deflate":
            self._process_pfns(queue_index, inflate=False)
        elif role == "stats":
            self._process_stats(queue_index)
        elif role == "reporting":
            self._process_reports(queue_index)
        else:  # a queue the negotiated features do not give a role (5.5.2: it does not exist)
            self.stats["notifications_without_role"] += 1

    # --- inflate and deflate ------------------------------------------------------------
    def _process_pfns(self, queue_index: int, inflate: bool) -> None:
        """Gather the chains' page numbers, in batches of at most :data:`MAX_PFNS_PER_CHAIN`,
        then release (or record) each batch's sorted, merged runs and complete its chains."""
        kind = "inflate" if inflate else "deflate"
        batch, pfns = [], array.array("I")
        for chain in self.chains(queue_index):
            pfns.extend(self._pfns(chain, kind))
            batch.append(chain)
            if len(pfns) >= MAX_PFNS_PER_CHAIN:
                self._settle(queue_index, batch, pfns, inflate)
                batch, pfns = [], array.array("I")
        if batch:
            self._settle(queue_index, batch, pfns, inflate)

    def _settle(self, queue_index: int, chains: list[DescriptorChain], pfns: array.array[int], inflate: bool) -> None:
        kind = "inflate" if inflate else "deflate"
        pages = self._checked(sorted(set(pfns)), kind)
        for start, count in runs(pages):
            if inflate:
                self._discard(start << PAGE_SHIFT, count << PAGE_SHIFT, kind)
            self._mark(start, count, inflate)
        self.stats[f"{kind}d_pages"] += len(pages)
        for chain in chains:
            self.complete(queue_index, chain, 0)
        self.signal(queue_index)

    def _pfns(self, chain: DescriptorChain, kind: str) -> array.array[int]:
        """The page numbers a chain carries, read in pieces; none from a malformed buffer."""
        pfns = array.array("I")
        if sum(b.len for b in chain.readable) > MAX_PFNS_PER_CHAIN * PFN_BYTES:
            self._mistake("bad_buffers", "%s: chain at head %d carries more than %d page numbers, skipped",
                          kind, chain.head, MAX_PFNS_PER_CHAIN)  # fmt: skip
            return pfns
        for buffer in chain.buffers:
            if buffer.writable:
                self._mistake("bad_buffers", "%s: device-writable buffer at %#x (%d bytes) skipped",
                              kind, buffer.gpa, buffer.len)  # fmt: skip
            elif buffer.len % PFN_BYTES:
                self._mistake("bad_buffers", "%s: buffer at %#x of %d bytes is not whole PFNs, skipped",
                              kind, buffer.gpa, buffer.len)  # fmt: skip
            else:
                for offset in range(0, buffer.len, PFN_PIECE * PFN_BYTES):
                    length = min(PFN_PIECE * PFN_BYTES, buffer.len - offset)
                    pfns.frombytes(self.memory.view(buffer.gpa + offset, length))
        if sys.byteorder != "little":
            pfns.byteswap()
        return pfns

    def _checked(self, pfns: list[int], kind: str) -> list[int]:
        """Of the sorted ``pfns``, those that name a page the balloon may take; the rest are
        counted and logged."""
        good: list[int] = []
        for start, end in self._ranges:
            good += pfns[bisect.bisect_left(pfns, start >> PAGE_SHIFT) : bisect.bisect_left(pfns, end >> PAGE_SHIFT)]
        bad = len(pfns) - len(good)
        if bad:
            first_bad = next(pfn for pfn in pfns if not self._usable(pfn << PAGE_SHIFT, PAGE))
            self.stats["bad_pfns"] += bad
            self._mistake(None, "%s: %d page numbers outside the guest's RAM (first %#x) ignored", kind, bad, first_bad)
        return good

    def _usable(self, gpa: int, length: int) -> bool:
        i = bisect.bisect_right(self._starts, gpa) - 1
        return i >= 0 and gpa + length <= self._ranges[i][1]

    def _mark(self, pfn: int, count: int, held: bool) -> None:
        """Set (or clear) the held bits of ``count`` pages from ``pfn``: whole bytes at once."""
        bitmap, end = self._held, pfn + count
        while pfn < end and (pfn & 7 or end - pfn < 8):
            if held:
                bitmap[pfn >> 3] |= 1 << (pfn & 7)
            else:
                bitmap[pfn >> 3] &= ~(1 << (pfn & 7)) & 0xFF
            pfn += 1
        whole = (end - pfn) >> 3
        if whole:
            bitmap[pfn >> 3 : (pfn >> 3) + whole] = (b"\xff" if held else b"\x00") * whole
            self._mark(pfn + 8 * whole, end - pfn - 8 * whole, held)

    def _discard(self, gpa: int, length: int, kind: str) -> None:
        try:
            self.memory.discard(gpa, length)
        except (GuestMemoryError, OSError) as err:  # checked above; a failure here is the host's
            self.stats["discard_failures"] += 1
            log.error("virtio-balloon %s: cannot release %#x+%#x: %s", kind, gpa, length, err)
            return
        self.stats["discarded_bytes"] += length

    # --- statistics -----------------------------------------------------------------------
    def _process_stats(self, queue_index: int) -> None:
        for chain in self.chains(queue_index):
            data = self._stats_bytes(chain)
            whole = len(data) - len(data) % STAT_ENTRY.size
            if whole != len(data):
                self._mistake("bad_buffers", "stats: %d trailing bytes after %d entries ignored",
                              len(data) - whole, whole // STAT_ENTRY.size)  # fmt: skip
            with self._changed:
                for tag, value in STAT_ENTRY.iter_unpack(bytes(data[:whole])):
                    self._guest_stats[tag] = value
                    if tag not in STAT_NAMES:
                        self.stats["unknown_stat_tags"] += 1
                self.stats["stats_updates"] += 1
                self.stats_updated_at = time.monotonic()
                self._changed.notify_all()
            if self._stats_chain is not None:  # the driver posted another before we returned the first
                self.complete(queue_index, self._stats_chain, 0)
                self.signal(queue_index)
            self._stats_chain = chain  # held until the host wants fresh numbers

    def _stats_bytes(self, chain: DescriptorChain) -> bytes:
        """The chain's readable bytes, up to :data:`MAX_STAT_ENTRIES` entries."""
        room = MAX_STAT_ENTRIES * STAT_ENTRY.size
        data = bytearray()
        for buffer in chain.buffers:
            if buffer.writable:
                self._mistake("bad_buffers", "stats: device-writable buffer at %#x skipped", buffer.gpa)
                continue
            take = min(buffer.len, room - len(data))
            data += self.memory.view(buffer.gpa, take)
            if take < buffer.len:
                self._mistake("bad_buffers", "stats: more than %d entries; the rest ignored", MAX_STAT_ENTRIES)
                break
        return bytes(data)

    # --- free page reporting --------------------------------------------------------------
    def _process_reports(self, queue_index: int) -> None:
        completed = 0
        for chain in self.chains(queue_index):
            for buffer in chain.buffers:  # Linux posts them device-writable; the direction is not used
                if buffer.gpa % PAGE or buffer.len % PAGE:
                    self._mistake("bad_buffers", "reporting: %#x+%#x is not whole 4 KiB pages, skipped",
                                  buffer.gpa, buffer.len)  # fmt: skip
                elif not self._usable(buffer.gpa, buffer.len):
                    self.stats["bad_reports"] += 1
                    self._mistake(None, "reporting: %#x+%#x is not guest RAM the balloon may take, skipped",
                                  buffer.gpa, buffer.len)  # fmt: skip
                else:
                    self._discard(buffer.gpa, buffer.len, "reporting")
                    self.stats["reported_bytes"] += buffer.len
            self.complete(queue_index, chain, 0)
            completed += 1
        if completed:
            self.signal(queue_index)

    def _mistake(self, counter: str | None, message: str, *args: object) -> None:
        if counter is not None:
            self.stats[counter] += 1
        self.stats["guest_mistakes"] += 1
        self._mistakes.warning("virtio-balloon " + message, *args)

    # --- state ------------------------------------------------------------------------------
    def save_state(self) -> BalloonState:
        with self.lock, self._changed:
            chain = self._stats_chain
            held_chain = None if chain is None else (chain.head, tuple((b.gpa, b.len, b.writable) for b in chain.buffers))
            return BalloonState(self.num_pages, self.actual_pages, bytes(self._held),
                                tuple(sorted(self._guest_stats.items())), held_chain)  # fmt: skip

    def restore_state(self, state: object | None) -> None:
        """Take ``state`` after the transport restored (and so activated) the device."""
        if not isinstance(state, BalloonState):
            raise StateError(f"virtio balloon: expected a BalloonState, not {type(state).__name__}")
        check_int(state, "num_pages", 0, 0xFFFFFFFF)
        check_int(state, "actual_pages", 0, 0xFFFFFFFF)
        held = check_bytes(state, "held", MAX_HELD_BYTES)
        if len(held) != len(self._held) and any(held):
            raise StateError(f"BalloonState.held covers {len(held)} bytes of page bits, this machine's RAM {len(self._held)}")
        stats = check_type(state, "guest_stats", tuple)
        if len(stats) > len(STAT_NAMES) + MAX_STAT_ENTRIES or not all(
            isinstance(pair, tuple) and len(pair) == 2 and all(type(n) is int and 0 <= n < 1 << 64 for n in pair)
            for pair in stats
        ):
            raise StateError("BalloonState.guest_stats is not a short list of (tag, value) pairs")
        chain = self._restored_stats_chain(state.stats_chain)
        with self.lock, self._changed:
            self.num_pages, self.actual_pages = state.num_pages, state.actual_pages
            if len(held) == len(self._held):
                self._held[:] = held
            self._guest_stats = dict(stats)
            self._stats_chain = chain
            self._changed.notify_all()

    def _restored_stats_chain(self, saved: object) -> DescriptorChain | None:
        if saved is None:
            return None
        if self._stats_queue is None or not isinstance(saved, tuple) or len(saved) != 2:
            raise StateError("BalloonState.stats_chain does not fit the negotiated features")
        head, buffers = saved
        queue = self.queues[self._stats_queue]
        if type(head) is not int or not 0 <= head < queue.size or not isinstance(buffers, tuple) or len(buffers) > queue.size:
            raise StateError("BalloonState.stats_chain is not a chain of the statistics queue")
        checked = []
        for buffer in buffers:
            if not (isinstance(buffer, tuple) and len(buffer) == 3 and type(buffer[0]) is int
                    and type(buffer[1]) is int and isinstance(buffer[2], bool)):  # fmt: skip
                raise StateError("BalloonState.stats_chain has a malformed buffer")
            try:
                self.memory.locate(buffer[0], buffer[1])
            except GuestMemoryError as err:
                raise StateError(f"BalloonState.stats_chain: {err}") from err
            checked.append(Buffer(*buffer))
        return DescriptorChain(head, checked)


def usable_ranges(ram: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Of the RAM ranges ``[start, end)``, what a balloon may release: from 1 MiB up, whole pages."""
    ranges = []
    for start, end in ram:
        lo = -(-max(start, HIMEM_START) // PAGE) * PAGE
        hi = end // PAGE * PAGE
        if hi > lo:
            ranges.append((lo, hi))
    return sorted(ranges)


def runs(pages: Sequence[int]) -> Iterable[tuple[int, int]]:
    """``(first, count)`` for each run of consecutive numbers in sorted, distinct ``pages``."""
    if pages and pages[-1] - pages[0] == len(pages) - 1:  # one run (the usual case): no Python loop
        yield pages[0], len(pages)
        return
    start = previous = None
    for page in pages:
        if previous is not None and page == previous + 1:
            previous = page
            continue
        if start is not None:
            yield start, previous - start + 1  # type: ignore[operator]
        start = previous = page
    if start is not None:
        yield start, previous - start + 1  # type: ignore[operator]
