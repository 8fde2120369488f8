"""virtio-blk (device ID 2, virtio 1.2 section 5.2) on a raw image file.

One request queue.  A request is a chain whose device-readable part starts with the
16-byte header ``{le32 type, le32 reserved, le64 sector}`` and whose device-writable
part ends with the status byte (5.2.6); the data lies in between, device-writable for
reads (IN, GET_ID) and device-readable for writes (OUT, DISCARD, WRITE_ZEROES).  The
device makes no assumption about how those bytes are split into descriptors (2.6.4):
the header may share a descriptor with OUT data, the status byte with IN data.

Host input: none (:meth:`host_fds` stays empty); every request is handled when the
queue is notified, synchronously, under the device's lock.  ``on_read(offset, buffers)``,
if given, sees the data of every complete read before the request is answered (a
recorder of host inputs hashes it, :mod:`pykvm.replay`).

The plain requests, IN, OUT and FLUSH, are served in C (``pykvm_blk_serve``, in
``_native.c``) unless ``fast_path`` is False or an ``on_read`` hook must see the data:
on a notification it serves the available chains in order, straight between the file
and guest memory, and completes them in the used ring, until it meets one it leaves to
this module (any other request type, a malformed chain, a bound broken, a transfer
that failed), which then pops and answers that one as described below, and so on.  C
keeps every rule of this module; this module is the reference (the property tests run
both).  A write-through or FLUSH sync that fails is answered IOERR in C itself: the
kernel reports such an error once, so trying again here could succeed over lost data.

I/O goes straight between the file and guest memory: ``os.preadv`` / ``os.pwritev``
on views of guest RAM, looping on short transfers.  A request is answered only when
its I/O is done, so an OUT is complete when ``pwritev`` returned; FLUSH is ``fsync``.
The device offers VIRTIO_BLK_F_FLUSH; a driver that does not accept it gets
write-through behaviour (every write is followed by ``fdatasync`` before it completes,
as 5.2.6.2 requires of "FLUSH offered but not negotiated").

Bounds (requests outside them are answered VIRTIO_BLK_S_IOERR, nothing is read or
written, and the reason is counted):

- at most :data:`SEG_MAX` data segments (``seg_max``), i.e. ``SEG_MAX + 2`` buffers with
  the header and the status;
- at most :data:`MAX_REQUEST_BYTES` (4 MiB) of data per request.  ``size_max`` is
  offered as ``MAX_REQUEST_BYTES // SEG_MAX`` so that a driver which honours
  ``seg_max`` and ``size_max`` (Linux does) can never build a larger request;
- ``sector * 512 + length`` within the capacity, the length a multiple of 512
  (5.2.6.1): no partial I/O past the end.

VIRTIO_BLK_F_DISCARD and VIRTIO_BLK_F_WRITE_ZEROES are offered on writable images:
discard is ``fallocate(PUNCH_HOLE | KEEP_SIZE)`` (a hint: a file system that cannot
punch holes leaves the data, which 5.2.6.2 allows), write-zeroes is
``fallocate(PUNCH_HOLE | KEEP_SIZE)`` when the driver set ``unmap`` and
``fallocate(ZERO_RANGE | KEEP_SIZE)`` otherwise, falling back to writing zeros when
the file system has neither; reads of the range then return zeros.  Unknown segment
flags, and ``unmap`` on a discard, are answered VIRTIO_BLK_S_UNSUPP (5.2.6.2).

A malformed chain (its last buffer not device-writable, so no status byte; a device-readable buffer
after a device-writable one, a header shorter than 16 bytes, data in the wrong
direction) is answered IOERR when it has a status byte, and returned with used length
0 when it has none; it is logged at debug level and counted, and the device goes on.
Host I/O errors (EIO, ENOSPC, ...) are answered IOERR and logged.  Used length is the
number of bytes the device wrote into the chain: the data read plus the status byte.

Counters (``stats``): ``reads``, ``writes``, ``bytes_read``, ``bytes_written``,
``flushes``, ``write_through_syncs``, ``get_ids``, ``discards``, ``write_zeroes``;
``errors`` counts every non-OK status, and each is also counted by its reason:
``malformed``, ``unsupported``, ``io_errors`` (host I/O failures, logged) and
``rejected_<bound>`` (``out_of_range``, ``unaligned_length``, ``too_large``,
``too_many_segments``, ``wrong_direction``, ``read_only``, ``bad_segments``).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ...disk_lock import open_image, release_lock, take_lock
from ...errors import ConfigError
from ...memory import GuestMemory
from ...native import fallocate, ffi, lib
from .device import VirtioDevice, VirtioInterrupt
from .queue import Buffer, DescriptorChain, SplitQueue

log = logging.getLogger(__name__)

DEVICE_ID = 2
QUEUE_SIZE = 256
SECTOR_SIZE = 512
SEG_MAX = 128  # data segments; a chain then has at most 130 buffers, within the queue size
MAX_REQUEST_BYTES = 4 * 1024 * 1024
SIZE_MAX = MAX_REQUEST_BYTES // SEG_MAX
ID_BYTES = 20

# Feature bits (5.2.3).
VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

# Request types and status values (5.2.6).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

HEADER = struct.Struct("<IIQ")  # type, reserved, sector
SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags (virtio_blk_discard_write_zeroes)
# virtio_blk_config up to write_zeroes_may_unmap and its padding (5.2.4): capacity, size_max,
# seg_max, geometry (cylinders, heads, sectors), blk_size, topology (physical_block_exp,
# alignment_offset, min_io_size, opt_io_size), writeback, unused0, num_queues,
# max_discard_sectors, max_discard_seg, discard_sector_alignment, max_write_zeroes_sectors,
# max_write_zeroes_seg, write_zeroes_may_unmap, unused1[3].
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")

MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment: a hole punch costs the host little
MAX_DISCARD_SEG = 32
DISCARD_SECTOR_ALIGNMENT = 8  # 4 KiB, the usual file system block
MAX_WRITE_ZEROES_SECTORS = MAX_REQUEST_BYTES // SECTOR_SIZE  # bounded: it may fall back to writing zeros
MAX_WRITE_ZEROES_SEG = 1

_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
# What pykvm_blk_serve counts, by the names of this device's counters.
_C_COUNTERS = {
    lib.PYKVM_BLK_READS: "reads", lib.PYKVM_BLK_WRITES: "writes", lib.PYKVM_BLK_BYTES_READ: "bytes_read",
    lib.PYKVM_BLK_BYTES_WRITTEN: "bytes_written", lib.PYKVM_BLK_FLUSHES: "flushes",
    lib.PYKVM_BLK_WRITE_THROUGH_SYNCS: "write_through_syncs", lib.PYKVM_BLK_ERRORS: "errors",
    lib.PYKVM_BLK_IO_ERRORS: "io_errors",
}  # fmt: skip
_ALL_AVAILABLE = 0xFFFFFFFF  # no limit on the chains one call of pykvm_blk_serve takes


class _Reject(Exception):
    """A request answered with a non-OK status: the status, the counter to bump, and how many
    data bytes were written into the chain before it failed."""

    def __init__(self, status: int, reason: str, written: int = 0) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.written = written


@dataclass
class _Request:
    """A chain split into the request's parts: header, data regions, the status byte."""

    kind: int
    sector: int
    out_data: list[tuple[int, int]]  # device-readable data after the header
    in_data: list[tuple[int, int]]  # device-writable data before the status byte

    @property
    def out_len(self) -> int:
        return sum(length for _, length in self.out_data)

    @property
    def in_len(self) -> int:
        return sum(length for _, length in self.in_data)


def _split(regions: list[Buffer], front: int, back: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Cut ``front`` bytes off the start of ``regions`` (returned first) and ``back`` bytes
    off the end; the middle is returned second.  The caller checks that there are enough."""
    head: list[tuple[int, int]] = []
    middle: list[tuple[int, int]] = []
    total = sum(b.len for b in regions)
    position = 0
    for b in regions:
        start, end = position, position + b.len
        position = end
        cut_front = min(max(front - start, 0), b.len)
        cut_back = min(max(end - (total - back), 0), b.len - cut_front)
        if cut_front:
            head.append((b.gpa, cut_front))
        if b.len - cut_front - cut_back > 0:
            middle.append((b.gpa + cut_front, b.len - cut_front - cut_back))
    return head, middle


ReadHook = Callable[[int, Sequence[memoryview]], None]


class VirtioBlock(VirtioDevice):
    """A virtio-blk disk backed by the raw image at ``path`` (opened read-write unless ``read_only``).

    The image is locked while it is open (:mod:`pykvm.disk_lock`), unless ``lock`` is False: a
    machine receiving a migrated guest takes the locks only once the source let go of them.
    ``fd``, if given, is the disk's data already open, which the device takes over instead of
    opening ``path``: a throw-away overlay of the image at ``path`` (:mod:`pykvm.disk_overlay`),
    which no other machine sees and so needs no lock; the serial derives from the image still.
    """

    name = "blk"
    device_id = DEVICE_ID
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(
        self, path: str | Path, read_only: bool = False, serial: str | None = None, on_read: ReadHook | None = None,
        lock: bool = True,
        fast_path: bool = True,
        fd: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.path = str(path)
        self.read_only = read_only
        self._on_read = on_read
        self.fast_path = fast_path and on_read is None  # C cannot show the data to the hook
        self._plain: _PlainRequests | None = None  # while active, with the fast path
        self.fd = open_image(self.path, read_only, lock) if fd is None else fd
        try:
            identity = os.fstat(self.fd) if fd is None else os.stat(self.path)
            size = os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as err:
            os.close(self.fd)
            raise ConfigError(f"{self.path}: cannot read its size: {err.strerror}") from err
        if size % SECTOR_SIZE:
            # Firecracker does the same (with a warning); QEMU's block layer instead rounds the
            # sector count up and reads the partial last sector padded with zeros.
            log.warning(
                "virtio-blk %s: size %d is not a multiple of %d; the last %d bytes are not visible to the guest",
                self.path, size, SECTOR_SIZE, size % SECTOR_SIZE,
            )  # fmt: skip
        self.capacity = size // SECTOR_SIZE
        self.serial = _serial(serial, identity)
        self.features = VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
        if read_only:
            self.features |= VIRTIO_BLK_F_RO
        else:
            self.features |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES

    def lock_image(self) -> None:
        """Lock the image (see :func:`pykvm.disk_lock.take_lock`)."""
        take_lock(self.fd, self.path, self.read_only)

    def unlock_image(self) -> None:
        """Let another process lock the image (a migrated guest's destination)."""
        release_lock(self.fd)

    def close(self) -> None:
        with self.lock:  # not while a notification is served; C must never see the number once it is closed
            self._plain = None
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    # --- configuration space -------------------------------------------------------------
    def config_bytes(self) -> bytes:
        discard = not self.read_only
        return CONFIG.pack(
            self.capacity, SIZE_MAX, SEG_MAX,
            0, 0, 0,  # geometry: not offered
            SECTOR_SIZE,
            0, 0, 0, 0,  # topology: not offered
            0, 0, 0,  # writeback (no CONFIG_WCE), unused0, num_queues (no MQ)
            MAX_DISCARD_SECTORS if discard else 0,
            MAX_DISCARD_SEG if discard else 0,
            DISCARD_SECTOR_ALIGNMENT if discard else 0,
            MAX_WRITE_ZEROES_SECTORS if discard else 0,
            MAX_WRITE_ZEROES_SEG if discard else 0,
            1 if discard else 0,  # write_zeroes_may_unmap
        )  # fmt: skip

    # --- lifecycle -------------------------------------------------------------------------
    def activate(self, memory: GuestMemory, queues: Sequence[SplitQueue], interrupt: VirtioInterrupt) -> None:
        super().activate(memory, queues, interrupt)
        if self.fast_path and queues[0].ready:
            self._plain = _PlainRequests(self, memory, queues[0])

    def reset(self) -> None:
        super().reset()
        self._plain = None

    # --- requests --------------------------------------------------------------------------
    def process(self, queue_index: int) -> None:
        """Serve what is available: C the plain requests, this module the one C stops at, and on."""
        queue, completed = self.queues[queue_index], 0
        try:
            while True:
                if self._plain is not None:
                    completed += self._plain.serve(queue, _ALL_AVAILABLE)
                    if not self._plain.python_next:
                        break
                chain = queue.pop(self.memory)
                if chain is None:
                    break
                self.complete(queue_index, chain, self._handle(chain))
                completed += 1
        finally:
            if completed:
                self.signal(queue_index)

    def _handle(self, chain: DescriptorChain) -> int:
        """Serve one request; returns the used length (bytes written into the chain)."""
        buffers = chain.buffers
        if not buffers or not buffers[-1].writable:
            self.stats["malformed"] += 1
            self._malformed(chain, "no device-writable byte at the end for the status")
            return 0
        status_gpa = buffers[-1].gpa + buffers[-1].len - 1
        try:
            written = self._execute(self._parse(chain))
            status = VIRTIO_BLK_S_OK
        except _Reject as reject:
            status, written = reject.status, reject.written
            self.stats["errors"] += 1
            self.stats[reject.reason] += 1
        self.memory.view(status_gpa, 1)[0] = status
        return written + 1

    def _parse(self, chain: DescriptorChain) -> _Request:
        """Header, data and status of a chain whose last buffer is device-writable."""
        buffers = chain.buffers
        first_writable = next(i for i, b in enumerate(buffers) if b.writable)
        readable, writable = buffers[:first_writable], buffers[first_writable:]
        if not all(b.writable for b in writable):
            raise self._malformed(chain, "a device-readable buffer after a device-writable one")
        header_regions, out_data = _split(readable, HEADER.size, 0)
        if sum(length for _, length in header_regions) < HEADER.size:
            raise self._malformed(chain, "a header shorter than 16 bytes")
        if len(buffers) > SEG_MAX + 2:
            raise _Reject(VIRTIO_BLK_S_IOERR, "rejected_too_many_segments")
        header = b"".join(self.memory.read(gpa, length) for gpa, length in header_regions)  # read once
        kind, _, sector = HEADER.unpack(header)
        _, in_data = _split(writable, 0, 1)
        return _Request(kind, sector, out_data, in_data)

    def _malformed(self, chain: DescriptorChain, reason: str) -> _Reject:
        log.debug("virtio-blk %s: malformed request at head %d: %s", self.path, chain.head, reason)
        return _Reject(VIRTIO_BLK_S_IOERR, "malformed")

    def _execute(self, request: _Request) -> int:
        """Carry out a well-formed request; returns the data bytes written into the chain."""
        kind, sector = request.kind, request.sector
        if kind == VIRTIO_BLK_T_IN:
            return self._read(sector, request)
        if kind == VIRTIO_BLK_T_OUT:
            self._write(sector, request)
            return 0
        if kind == VIRTIO_BLK_T_FLUSH:
            self._sync("flushes", os.fsync)
            return 0
        if kind == VIRTIO_BLK_T_GET_ID:
            return self._get_id(request)
        if kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            self._discard_or_zero(kind == VIRTIO_BLK_T_WRITE_ZEROES, request)
            return 0
        raise _Reject(VIRTIO_BLK_S_UNSUPP, "unsupported")

    def _check_range(self, sector: int, length: int) -> None:
        if length % SECTOR_SIZE:
            raise _Reject(VIRTIO_BLK_S_IOERR, "rejected_unaligned_length")
        if length > MAX_REQUEST_BYTES:
            raise _Reject(VIRTIO_BLK_S_IOERR, "rejected_too_large")
        if sector > self.capacity or length // SECTOR_SIZE > self.capacity - sector:
            raise _Reject(VIRTIO_BLK_S_IOERR, "rejected_out_of_range")

    def _read(self, sector: int, request: _Request) -> int:
        if request.out_data:
            raise _Reject(VIRTIO_BLK_S_IOERR, "rejected_wrong_direction")
        length = request.in_len
        self._check_range(sector, length)
        views = [self.memory.view(gpa, n) for gpa, n in request.in_data]
        done = self._transfer(os.preadv, views, sector * SECTOR_SIZE, length)
        self.stats["reads"] += 1
        self.stats["bytes_read"] += done
        if done < length:
            raise _Reject(VIRTIO_BLK_S_IOERR, "io_errors", written=done)
        if self._on_read is not None:
            self._on_read(sector * SECTOR_SIZE, views)
        return done

    def _write(self, sector: int, request: _Request) -> None:
        if request.in_data:
            raise _Reject(VIRTIO_BLK_S_IOERR, "rejected_wrong_direction")
        if self.read_only:  # 5.2.6.2: IOERR, and MUST NOT write any data
            raise _Reject(VIRTIO_BLK_S_IOERR, "rejected_read_only")
        length = request.out_len
        self._check_range(sector, length)
        views = [self.memory.view(gpa, n) for gpa, n in request.out_data]
        done = self._transfer(os.pwritev, views, sector * SECTOR_SIZE, length)
        self.stats["writes"] += 1
        self.stats["bytes_written"] += done
        if done < length:
            raise _Reject(VIRTIO_BLK_S_IOERR, "io_errors")
        self._write_through()

    def _transfer(self, call, views: list[memoryview], offset: int, length: int) -> int:  # type: ignore[no-untyped-def]
        """preadv/pwritev until ``length`` bytes moved; returns how many did (short on error or EOF)."""
        done = 0
        while done < length:
            try:
                moved = call(self.fd, views, offset + done)
            except OSError as err:
                log.warning("virtio-blk %s: I/O error at offset %d: %s", self.path, offset + done, err.strerror)
                return done
            if moved == 0:  # the file shrank under us
                log.warning("virtio-blk %s: unexpected end of file at offset %d", self.path, offset + done)
                return done
            done += moved
            views = _advance(views, moved)
        return done

    def _write_through(self) -> None:
        """Without a negotiated FLUSH, a completed write must be stable (5.2.6.2, case 1)."""
        if not self.driver_features & VIRTIO_BLK_F_FLUSH:
            self._sync("write_through_syncs", os.fdatasync)

    def _sync(self, counter: str, call) -> None:  # type: ignore[no-untyped-def]
        try:
            call(self.fd)
        except OSError as err:
            log.warning("virtio-blk %s: %s failed: %s", self.path, call.__name__, err.strerror)
            raise _Reject(VIRTIO_BLK_S_IOERR, "io_errors") from err
        self.stats[counter] += 1

    def _get_id(self, request: _Request) -> int:
        if request.out_data:
            raise _Reject(VIRTIO_BLK_S_IOERR, "rejected_wrong_direction")
        data = self.serial[: min(ID_BYTES, request.in_len)]
        offset = 0
        for gpa, length in request.in_data:
            piece = data[offset : offset + length]
            self.memory.write(gpa, piece)
            offset += len(piece)
            if offset == len(data):
                break
        self.stats["get_ids"] += 1
        return len(data)

    def _discard_or_zero(self, zero: bool, request: _Request) -> None:
        feature = VIRTIO_BLK_F_WRITE_ZEROES if zero else VIRTIO_BLK_F_DISCARD
        if not self.driver_features & feature:
            raise _Reject(VIRTIO_BLK_S_UNSUPP, "unsupported")
        if self.read_only:
            raise _Reject(VIRTIO_BLK_S_IOERR, "rejected_read_only")
        if request.in_data:
            raise _Reject(VIRTIO_BLK_S_IOERR, "rejected_wrong_direction")
        max_segments, max_sectors = (
            (MAX_WRITE_ZEROES_SEG, MAX_WRITE_ZEROES_SECTORS) if zero else (MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
        )
        length = request.out_len  # checked before anything is read: the guest chose it
        if not length or length % SEGMENT.size:
            raise _Reject(VIRTIO_BLK_S_IOERR, "rejected_bad_segments")
        if length // SEGMENT.size > max_segments:
            raise _Reject(VIRTIO_BLK_S_IOERR, "rejected_too_many_segments")
        raw = b"".join(self.memory.read(gpa, n) for gpa, n in request.out_data)
        segments = [SEGMENT.unpack_from(raw, i) for i in range(0, len(raw), SEGMENT.size)]
        for sector, count, flags in segments:  # check them all before touching the file
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (not zero and flags):
                raise _Reject(VIRTIO_BLK_S_UNSUPP, "unsupported")
            if count > max_sectors:
                raise _Reject(VIRTIO_BLK_S_IOERR, "rejected_too_large")
            if sector > self.capacity or count > self.capacity - sector:
                raise _Reject(VIRTIO_BLK_S_IOERR, "rejected_out_of_range")
        for sector, count, flags in segments:
            offset, length = sector * SECTOR_SIZE, count * SECTOR_SIZE
            if length == 0:
                continue
            try:
                if zero:
                    self._zero(offset, length, bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
                else:
                    self._punch(offset, length)
            except OSError as err:
                log.warning("virtio-blk %s: %s at offset %d failed: %s", self.path,
                            "write-zeroes" if zero else "discard", offset, err.strerror)  # fmt: skip
                raise _Reject(VIRTIO_BLK_S_IOERR, "io_errors") from err
        self.stats["write_zeroes" if zero else "discards"] += 1
        self._write_through()

    def _punch(self, offset: int, length: int) -> None:
        try:
            fallocate(self.fd, lib.FALLOC_FL_PUNCH_HOLE | lib.FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as err:
            if err.errno not in _NOT_SUPPORTED:
                raise
            self.stats["discards_not_supported_by_host"] += 1  # a hint: the data may stay (5.2.6.2)

    def _zero(self, offset: int, length: int, unmap: bool) -> None:
        modes = [lib.FALLOC_FL_ZERO_RANGE | lib.FALLOC_FL_KEEP_SIZE]
        if unmap:
            modes.insert(0, lib.FALLOC_FL_PUNCH_HOLE | lib.FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
                return
            except OSError as err:
                if err.errno not in _NOT_SUPPORTED:
                    raise
        zeros = bytes(min(length, 1 << 20))
        done = 0
        while done < length:  # bounded by MAX_WRITE_ZEROES_SECTORS
            done += os.pwrite(self.fd, memoryview(zeros)[: length - done], offset + done)
        self.stats["write_zeroes_written"] += 1


class _PlainRequests:
    """IN, OUT and FLUSH requests of an active device's queue, served in C (``pykvm_blk_serve``)."""

    def __init__(self, device: VirtioBlock, memory: GuestMemory, queue: SplitQueue) -> None:
        self._device = device
        c = self._c = ffi.new("struct pykvm_blk *")
        c.mem, c.fd, c.read_only = memory.table, device.fd, device.read_only
        c.write_through = not device.driver_features & VIRTIO_BLK_F_FLUSH  # 5.2.6.2, as _write_through
        c.seg_max, c.max_bytes, c.capacity = SEG_MAX, MAX_REQUEST_BYTES, device.capacity
        c.desc_table, c.avail_ring, c.used_ring = queue.desc_table, queue.avail_ring, queue.used_ring
        c.size, c.indirect, c.event_idx = queue.size, queue.indirect, queue.event_idx
        self._buffers = c.buffers = ffi.new("struct pykvm_buffer[]", queue.size)  # the chain walk's

    @property
    def python_next(self) -> bool:
        """False if the last :meth:`serve` found nothing more available; else Python looks at the
        ring next (a chain, or a ring index, that C left to it)."""
        return bool(self._c.python_next)

    def serve(self, queue: SplitQueue, limit: int) -> int:
        """Serve up to ``limit`` available chains, until one C leaves to Python; returns how many."""
        c, stats = self._c, self._device.stats
        c.next_avail, c.next_used = queue.next_avail, queue.next_used
        served: int = lib.pykvm_blk_serve(c, limit)
        queue.next_avail, queue.next_used = c.next_avail, c.next_used
        if served:
            for index, count in enumerate(ffi.unpack(c.counts, lib.PYKVM_BLK_COUNTERS)):
                if count:
                    stats[_C_COUNTERS[index]] += count
            if c.sync_errno:
                log.warning("virtio-blk %s: a sync failed: %s", self._device.path, os.strerror(c.sync_errno))
        return served


def _advance(views: list[memoryview], count: int) -> list[memoryview]:
    """``views`` without their first ``count`` bytes."""
    while count and views:
        if count >= len(views[0]):
            count -= len(views[0])
            views = views[1:]
        else:
            views = [views[0][count:], *views[1:]]
            count = 0
    return views


def _serial(serial: str | None, info: os.stat_result) -> bytes:
    """The GET_ID string: ``serial``, or one derived from the image's device and inode numbers,
    NUL-padded to 20 bytes (no terminator when it is 20 bytes long)."""
    if serial is None:
        serial = "pykvm-" + hashlib.blake2b(f"{info.st_dev}:{info.st_ino}".encode(), digest_size=7).hexdigest()
    data = serial.encode("ascii", "replace")[:ID_BYTES]
    return data.ljust(ID_BYTES, b"\0")
