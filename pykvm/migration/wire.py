"""The migration stream on the wire: the handshake, the records, and the sockets that carry them.

Integers are little-endian.  The destination speaks first:

``greeting`` (destination -> source)
    ``MAGIC``, the protocol version (u32), a random nonce (32 bytes).
``hello`` (source -> destination)
    ``MAGIC``, the version, the source's nonce, the source's *proof* (32 bytes), the length
    (u32, at most :data:`MAX_HEADER_BYTES`) of the JSON header that follows: the guest's
    :class:`~pykvm.snapshot.format.Manifest` (configuration, command line, CPU features,
    disk identities, memory size).
``answer`` (destination -> source)
    A status (u8: :data:`READY`, :data:`ACCEPTED` or :data:`REFUSED`), the destination's proof,
    the length (u16, at most :data:`MAX_REASON_BYTES`) of a UTF-8 reason that follows.  It
    answers the hello (ready for the records, or refused) and, at the end, the whole stream.

A proof is HMAC-SHA256 over a role (``b"source"`` or ``b"destination"``) and the other side's
nonce, keyed with the pre-shared token; without a token it is 32 zero bytes.  Each side checks
the other's when it has a token, so neither talks to a stranger.

After a ready answer the source sends records, each a 16-byte header (kind u8, three zero
bytes, count u32, address u64) and what the kind says follows:

=========  ==========================================================================
``PAGES``  ``count`` pages (1 to :data:`RECORD_PAGES`) of data for guest-physical ``address``
``ZERO``   ``count`` pages from ``address`` hold zeros (nothing follows)
``STATE``  ``count`` bytes of the machine's state as JSON (once, after the last pages)
``END``    ``count`` is the CRC-32 of every record before it, ``address`` their size in bytes
=========  ==========================================================================

The CRC catches a damaged stream, not a forged one: the stream is neither encrypted nor
authenticated beyond the handshake (see :mod:`pykvm.migration`).
"""

from __future__ import annotations

import enum
import hmac
import socket
import struct
import time
import zlib
from typing import Callable, Union

from ..errors import MigrationError

MAGIC = b"PYKVMMIG"
VERSION = 2  # 2: the header has DiskConfig.snapshot and Manifest.disk_copies
NONCE_BYTES = 32
PAGE_SIZE = 4096
RECORD_PAGES = 256  # data pages in one PAGES record at most (1 MiB)
MAX_HEADER_BYTES = 1 << 20
MAX_REASON_BYTES = 1024
READY, ACCEPTED, REFUSED = 0, 1, 2
BURST_SECONDS = 0.05  # a rate-limited writer may catch up on this much idle time at once

GREETING = struct.Struct("<8sI32s")  # magic, version, nonce
HELLO = struct.Struct("<8sI32s32sI")  # magic, version, nonce, proof, header length
ANSWER = struct.Struct("<B32sH")  # status, proof, reason length
RECORD = struct.Struct("<B3xIQ")  # kind, count, address

Buffer = Union[bytes, bytearray, memoryview]


class Kind(enum.IntEnum):
    PAGES = 1
    ZERO = 2
    STATE = 3
    END = 4


def proof(token: bytes | None, role: bytes, nonce: bytes) -> bytes:
    """What proves knowledge of ``token`` to the side that sent ``nonce`` (zeros without a token)."""
    return hmac.new(token, role + nonce, "sha256").digest() if token else bytes(32)


def check_proof(token: bytes | None, role: bytes, nonce: bytes, given: bytes) -> bool:
    return token is None or hmac.compare_digest(proof(token, role, nonce), given)


def answer(status: int, token_proof: bytes = bytes(32), reason: str = "") -> bytes:
    text = reason.encode()[:MAX_REASON_BYTES]
    return ANSWER.pack(status, token_proof, len(text)) + text


def check_magic(magic: bytes, version: int, peer: str) -> None:
    if magic != MAGIC:
        raise MigrationError(f"{peer} does not speak pykvm's migration protocol")
    if version != VERSION:
        raise MigrationError(f"{peer} speaks migration protocol version {version}; this pykvm speaks {VERSION}")


class Channel:
    """A connected stream socket whose every operation ends by ``deadline`` (``time.monotonic()``)."""

    def __init__(self, sock: socket.socket, deadline: float | None, peer: str) -> None:
        self.sock = sock
        self.deadline = deadline
        self.peer = peer  # "the destination tcp:...": what error messages call the other side

    def _arm(self) -> None:
        if self.deadline is None:
            self.sock.settimeout(None)
            return
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise MigrationError(f"timed out talking to {self.peer}")
        self.sock.settimeout(left)

    def send(self, *parts: Buffer) -> None:
        views = [memoryview(part).cast("B") for part in parts if len(part)]
        try:
            while views:
                self._arm()
                sent = self.sock.sendmsg(views)
                while views and sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                if views:
                    views[0] = views[0][sent:]
        except TimeoutError as err:
            raise MigrationError(f"timed out sending to {self.peer}") from err
        except OSError as err:
            raise MigrationError(f"{self.peer} is gone ({err.strerror or err})") from err

    def read_into(self, view: memoryview) -> int:
        """Some bytes into ``view``; 0 at the end of the stream."""
        try:
            self._arm()
            return self.sock.recv_into(view)
        except TimeoutError as err:
            raise MigrationError(f"timed out waiting for {self.peer}") from err
        except OSError as err:
            raise MigrationError(f"{self.peer} is gone ({err.strerror or err})") from err

    def receive(self, size: int) -> bytes:
        """Exactly ``size`` bytes (the caller bounds ``size``)."""
        return StreamReader(self.read_into, self.peer).read(size)

    def close(self) -> None:
        self.sock.close()


class StreamReader:
    """Reads a stream exactly, keeping the CRC-32 and the count of what it read."""

    def __init__(self, read_into: Callable[[memoryview], int], peer: str) -> None:
        self._read_into = read_into
        self.peer = peer
        self.crc = 0
        self.count = 0

    def read_into(self, view: memoryview) -> None:
        """Fill ``view`` exactly (guest memory, or a buffer of the caller's size)."""
        done = 0
        while done < len(view):
            got = self._read_into(view[done:])
            if got <= 0:
                raise MigrationError(f"{self.peer} ended the stream early (after {self.count + done} bytes)")
            done += got
        self.crc = zlib.crc32(view, self.crc)
        self.count += done

    def read(self, size: int) -> bytes:
        """Exactly ``size`` bytes: ``size`` is a bound the caller checked, and the buffer grows only
        as bytes arrive (a stream claiming a large size costs what it really sends)."""
        data = bytearray()
        chunk = bytearray(min(size, 1 << 16))
        while len(data) < size:
            view = memoryview(chunk)[: min(len(chunk), size - len(data))]
            self.read_into(view)
            data += view
        return bytes(data)

    def record(self) -> tuple[int, int, int]:
        """The next record's header: (kind, count, address)."""
        return RECORD.unpack(self.read(RECORD.size))


class StreamWriter:
    """Writes records to ``channel`` at no more than ``bandwidth`` bytes/s (None: as fast as it
    goes), keeping the CRC-32 and the count of what it wrote."""

    def __init__(self, channel: Channel, bandwidth: int | None) -> None:
        self._channel = channel
        self._bandwidth = bandwidth
        self._due = time.monotonic()  # when what was written so far may all have left, at that rate
        self.crc = 0
        self.count = 0

    def pages(self, gpa: int, data: Buffer) -> None:
        self._record(Kind.PAGES, len(data) // PAGE_SIZE, gpa, data)

    def zero(self, gpa: int, pages: int) -> None:
        self._record(Kind.ZERO, pages, gpa)

    def state(self, blob: bytes) -> None:
        self._record(Kind.STATE, len(blob), 0, blob)

    def end(self) -> None:
        self._send(RECORD.pack(Kind.END, self.crc, self.count))

    def _record(self, kind: Kind, count: int, address: int, payload: Buffer = b"") -> None:
        header = RECORD.pack(kind, count, address)
        self.crc = zlib.crc32(payload, zlib.crc32(header, self.crc))
        self._send(header, payload)

    def _send(self, *parts: Buffer) -> None:
        size = sum(len(part) for part in parts)
        if self._bandwidth is not None:
            now = time.monotonic()
            self._due = max(self._due, now - BURST_SECONDS) + size / self._bandwidth
            if self._due > now:
                time.sleep(self._due - now)
        self._channel.send(*parts)
        self.count += size
