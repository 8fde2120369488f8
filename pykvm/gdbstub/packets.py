"""gdb remote serial protocol framing: ``$data#cs`` packets, acks, escapes and hex fields.

On the wire a packet is ``$``, its data, ``#`` and two hex digits of checksum (the sum of
the data bytes modulo 256).  The receiver answers ``+`` (good) or ``-`` (bad checksum:
send it again) until both sides agree on ``QStartNoAckMode``.  Between packets, the byte
0x03 is gdb's Ctrl-C; anything else there is noise and is skipped.  Binary data (``X``
packets, ``qXfer`` replies) escapes ``#``, ``$``, ``}`` and ``*`` as ``}`` followed by the
byte xor 0x20.

:class:`PacketReader` turns received bytes into events with bounded memory: it keeps at
most ``max_size`` bytes of a packet, and reports a longer one as :attr:`Control.OVERSIZED`.
"""

from __future__ import annotations

import dataclasses
import enum
import re

ESCAPE = 0x7D  # '}'
ESCAPE_XOR = 0x20
INTERRUPT_BYTE = 0x03
_NEEDS_ESCAPE = frozenset(b"#$}*")
_PACKET_END = re.compile(rb"[#$]")
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


class MalformedPacket(Exception):
    """A packet whose fields cannot be parsed (gdb gets an error reply)."""


class Control(enum.Enum):
    """A one-byte message, or a framing problem the connection must answer."""

    ACK = "+"
    NAK = "-"
    INTERRUPT = "Ctrl-C"
    CORRUPT = "bad checksum"  # answered with a NAK
    OVERSIZED = "packet too long"  # acked (it arrived intact) and answered with an error


@dataclasses.dataclass(frozen=True)
class Packet:
    """A received packet's data, still escaped (only binary fields are unescaped, by their reader)."""

    data: bytes


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def frame(data: bytes) -> bytes:
    """``data`` as a packet on the wire (``data`` must already be escaped where it is binary)."""
    return b"$" + data + b"#" + b"%02x" % checksum(data)


def escape(data: bytes) -> bytes:
    """Binary data with the bytes that framing gives a meaning to escaped."""
    if not _NEEDS_ESCAPE.intersection(data):
        return data
    out = bytearray()
    for byte in data:
        if byte in _NEEDS_ESCAPE:
            out += bytes((ESCAPE, byte ^ ESCAPE_XOR))
        else:
            out.append(byte)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """The binary data of an escaped field."""
    if ESCAPE not in data:
        return data
    out = bytearray()
    escaped = False
    for byte in data:
        if escaped:
            out.append(byte ^ ESCAPE_XOR)
            escaped = False
        elif byte == ESCAPE:
            escaped = True
        else:
            out.append(byte)
    if escaped:
        raise MalformedPacket("binary data ends in the middle of an escape")
    return bytes(out)


def parse_int(field: bytes, what: str, digits: int = 16) -> int:
    """A hex number of at most ``digits`` digits (64 bits by default)."""
    if not field or len(field) > digits or not _HEX_DIGITS.issuperset(field):
        raise MalformedPacket(f"{what} is not a hex number of 1 to {digits} digits: {field[:40]!r}")
    return int(field, 16)


def parse_hex_bytes(field: bytes, what: str) -> bytes:
    """Bytes written as hex pairs."""
    if len(field) % 2 or not _HEX_DIGITS.issuperset(field):
        raise MalformedPacket(f"{what} is not hex bytes")
    return bytes.fromhex(field.decode("ascii"))


class _State(enum.Enum):
    BETWEEN = 0  # between packets
    DATA = 1  # after '$'
    CHECKSUM = 2  # after '#'


class PacketReader:
    """Splits a received byte stream into packets and signals, never holding more than ``max_size`` bytes."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._state = _State.BETWEEN
        self._data = bytearray()
        self._sum = 0
        self._too_long = False
        self._checksum = bytearray()

    def feed(self, received: bytes) -> list[Packet | Control]:
        """The packets and signals completed by ``received``, in order."""
        events: list[Packet | Control] = []
        i = 0
        while i < len(received):
            if self._state is _State.BETWEEN:
                i = self._between(received, i, events)
            elif self._state is _State.DATA:
                i = self._in_data(received, i)
            else:
                self._checksum.append(received[i])
                i += 1
                if len(self._checksum) == 2:
                    events.append(self._finish())
        return events

    def _between(self, received: bytes, i: int, events: list[Packet | Control]) -> int:
        byte = received[i]
        if byte == ord("$"):
            self._start()
        elif byte == ord("+"):
            events.append(Control.ACK)
        elif byte == ord("-"):
            events.append(Control.NAK)
        elif byte == INTERRUPT_BYTE:
            events.append(Control.INTERRUPT)
        return i + 1

    def _in_data(self, received: bytes, i: int) -> int:
        end = _PACKET_END.search(received, i)
        stop = end.start() if end else len(received)
        chunk = received[i:stop]
        self._sum = (self._sum + sum(chunk)) & 0xFF
        if len(self._data) + len(chunk) > self.max_size:
            self._too_long = True
            self._data.clear()
        if not self._too_long:
            self._data += chunk
        if end is None:
            return stop
        if received[stop] == ord("$"):  # an unescaped '$' inside a packet: the '#' was lost; start again
            self._start()
        else:
            self._state = _State.CHECKSUM
        return stop + 1

    def _start(self) -> None:
        self._state = _State.DATA
        self._data.clear()
        self._sum = 0
        self._too_long = False
        self._checksum.clear()

    def _finish(self) -> Packet | Control:
        self._state = _State.BETWEEN
        received = bytes(self._checksum)
        if not _HEX_DIGITS.issuperset(received) or int(received, 16) != self._sum:
            return Control.CORRUPT
        if self._too_long:
            return Control.OVERSIZED
        packet = Packet(bytes(self._data))
        self._data.clear()
        return packet
