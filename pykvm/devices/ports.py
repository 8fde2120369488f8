"""Port-I/O building blocks shared by the legacy PC devices.

:class:`ByteRegisterDevice` is the decoding every ISA-style device here
shares.  Its registers are one byte wide, and the wrong-width policy is that
of the ISA bus (and of QEMU, whose legacy devices declare a 1-byte
implementation size): a 2- or 4-byte access is **split into byte accesses at
consecutive offsets, lowest first**, each acting on its own register with its
usual side effects.  So ``outw`` to the CMOS index port sets the index and
writes the data port, as on a PC.  A byte lane with no register behind it (an
offset inside the range that nothing decodes, or a lane that runs past the
end of the range) reads ``0xff`` like an open bus and drops writes.

Each device keeps a :class:`collections.Counter` named ``stats``:

- ``wide_reads`` / ``wide_writes``: accesses wider than one byte (split);
- ``missed_reads`` / ``missed_writes``: byte lanes nothing answered, and
  accesses of a size other than 1, 2 or 4 (which read all ones and are dropped).

:class:`ConstantPort` is a range whose reads return a constant, for port 0x80
(POST codes) and similar.

State: the devices built on :class:`ByteRegisterDevice` (UART, CMOS, i8042) each
have a state record (see :mod:`pykvm.devices.state`); a :class:`ConstantPort` has
none, since nothing the guest writes changes what it reads.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger(__name__)

# Port I/O access sizes an x86 IN/OUT instruction can make.
ACCESS_SIZES = (1, 2, 4)
BITS_PER_BYTE = 8
BYTE_MASK = 0xFF
# What a read of a byte lane nothing drives returns on a PC bus.
OPEN_BUS_BYTE = 0xFF


def size_mask(size: int) -> int:
    """All ones over ``size`` bytes; 0 for a size that is not positive."""
    if size <= 0:
        return 0
    return (1 << (BITS_PER_BYTE * size)) - 1


class ByteRegisterDevice:
    """A device whose registers are all one byte wide, decoded one byte lane at a time.

    Subclasses set :attr:`SIZE` (the length of the range they are registered
    over) and implement :meth:`_read_register` and :meth:`_write_register`,
    which see one byte at an offset inside ``[0, SIZE)`` and return ``None``
    / ``False`` where no register is decoded.
    """

    #: Length of the port range the device is registered over.
    SIZE = 1

    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()

    def read(self, offset: int, size: int) -> int:
        """The value of a ``size``-byte read at ``offset``: one byte access per lane."""
        if size not in ACCESS_SIZES:
            self._miss("read", offset, size)
            return size_mask(size)
        if size != 1:
            self.stats["wide_reads"] += 1
        value = 0
        for lane in range(size):
            value |= self._read_lane(offset + lane) << (BITS_PER_BYTE * lane)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """A ``size``-byte write of ``value`` at ``offset``: one byte access per lane."""
        if size not in ACCESS_SIZES:
            self._miss("write", offset, size)
            return
        if size != 1:
            self.stats["wide_writes"] += 1
        for lane in range(size):
            self._write_lane(offset + lane, (value >> (BITS_PER_BYTE * lane)) & BYTE_MASK)

    def _read_lane(self, offset: int) -> int:
        byte = self._read_register(offset) if 0 <= offset < self.SIZE else None
        if byte is None:
            self._miss("read", offset, 1)
            return OPEN_BUS_BYTE
        return byte & BYTE_MASK

    def _write_lane(self, offset: int, byte: int) -> None:
        if not (0 <= offset < self.SIZE and self._write_register(offset, byte)):
            self._miss("write", offset, 1)

    def _miss(self, kind: str, offset: int, size: int) -> None:
        self.stats[f"missed_{kind}s"] += 1
        log.debug("%s: unanswered %d-byte %s at offset %#x", type(self).__name__, size, kind, offset)

    def _read_register(self, offset: int) -> int | None:
        """The byte the register at ``offset`` reads as, or None if there is none."""
        raise NotImplementedError

    def _write_register(self, offset: int, byte: int) -> bool:
        """Write ``byte`` to the register at ``offset``; False if there is none."""
        raise NotImplementedError


class ConstantPort:
    """A port range whose reads return a constant and whose writes are ignored.

    Used for port 0x80, where firmware and Linux write POST codes (and Linux's
    ``outb_p`` writes as an I/O delay), and for similar ports that must merely
    exist.  A read of any size at any offset returns ``value`` masked to the
    access size (by default all ones, as an open bus).  Accesses are counted in
    ``stats["reads"]`` and ``stats["writes"]``: only those that reach Python.
    Where the C fast path answers the range (a ``FastKind.CONSTANT`` entry, as
    every :class:`~pykvm.machine.Machine` has on port 0x80), its accesses never
    reach this object and are counted in that entry's ``reads`` and ``writes``.
    """

    def __init__(self, value: int = 0xFFFFFFFF) -> None:
        self.value = value
        self.stats: Counter[str] = Counter()

    def read(self, offset: int, size: int) -> int:
        """``value`` masked to ``size`` bytes, wherever the read lands."""
        self.stats["reads"] += 1
        return self.value & size_mask(size)

    def write(self, offset: int, size: int, value: int) -> None:
        """Count the write; nothing else happens."""
        self.stats["writes"] += 1
