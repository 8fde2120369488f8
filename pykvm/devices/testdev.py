"""QEMU's ``pc-testdev``: the ports and memory KVM's own test suite (kvm-unit-tests) uses.

As QEMU's ``hw/misc/pc-testdev.c`` lays it out:

========================  ==================================================================
ports 0xe0-0xe3           a 32-bit scratch register: an access of any width at offset ``k``
                          reads or writes its bytes ``k`` up (the emulator tests' I/O target)
ports 0xe4-0xe7           "flush page": a 4-byte write of a guest-physical address.  QEMU
                          mprotect()s the host page so that KVM drops its mapping and the next
                          guest access faults inside KVM (invisible to the guest).  pykvm
                          counts the write and does nothing else: the guest sees the same
ports 0xe8-0xeb           the scratch register again, decoded one byte at a time
ports 0x2000-0x2017       IRQ lines: a byte written to 0x2000 + n sets interrupt line n to
                          high (non-zero) or low (zero): ISA IRQs 0-15 reach both PICs and
                          the IOAPIC, 16-23 the IOAPIC (QEMU stops at 15).  The ports are one
                          byte wide: a wider write is a byte per port, as QEMU splits it, so
                          ``outl 1`` to 0x200b raises line 11 and lowers lines 12 to 14
MMIO 0xff000000, 64 KiB   "iomem": RAM-like memory behind MMIO exits, for the MMIO tests
========================  ==================================================================

Accesses of a width a range does not take are ignored (and read as all ones), as
QEMU's memory API drops them; every part counts what it did in ``stats``.

The state a snapshot keeps (:class:`PcTestdevState`) is the register's and the iomem's, saved by
the ports, which hold the iomem window as QEMU's device holds both; the interrupt lines' levels
are the in-kernel irqchip's, saved with it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .ports import BITS_PER_BYTE, BYTE_MASK, size_mask
from .state import check_bytes, check_int, check_record

log = logging.getLogger(__name__)

# Where QEMU puts the parts (pc-testdev.c, testdev_realizefn).
REGISTER_PORT = 0xE0
REGISTER_PORTS = 12  # the register, the flush port, the byte-wise register
IRQ_LINE_PORT = 0x2000
IRQ_LINES = 24
IOMEM_ADDR = 0xFF00_0000
IOMEM_SIZE = 0x10000

_REGISTER_BYTES = 4
_FLUSH_OFFSET = 4
_BYTEWISE_OFFSET = 8
_FLUSH_WRITE_SIZE = 4
_U32_MASK = 0xFFFF_FFFF


@dataclass(frozen=True)
class PcTestdevState:
    """Everything the guest can observe of pc-testdev: the scratch register and the iomem window's bytes."""

    register: int
    iomem: bytes


class PcTestdevPorts:
    """Ports 0xe0-0xeb: the scratch register (twice) and the flush-page port; the keeper of the
    device's state, its iomem window's included."""

    SIZE = REGISTER_PORTS

    def __init__(self, iomem: PcTestdevMemory) -> None:
        self.register = 0
        self.iomem = iomem
        self.stats: Counter[str] = Counter()

    def save_state(self) -> PcTestdevState:
        """The register and the iomem window."""
        return PcTestdevState(self.register, bytes(self.iomem.data))

    def restore_state(self, state: PcTestdevState) -> None:
        """Take ``state``; raises :class:`StateError`, changing nothing, if a field is invalid."""
        check_record(state, PcTestdevState)
        check_int(state, "register", 0, _U32_MASK)
        check_bytes(state, "iomem", IOMEM_SIZE, IOMEM_SIZE)
        self.register = state.register
        self.iomem.data[:] = state.iomem

    def read(self, offset: int, size: int) -> int:
        if offset < _FLUSH_OFFSET:
            return self._read_register(offset, size)
        if offset >= _BYTEWISE_OFFSET:
            return sum(self._read_register(offset + lane, 1) << (BITS_PER_BYTE * lane) for lane in range(size))
        self.stats["flush_reads"] += 1
        return size_mask(size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < _FLUSH_OFFSET:
            self._write_register(offset, size, value)
        elif offset >= _BYTEWISE_OFFSET:
            for lane in range(size):
                self._write_register(offset + lane, 1, value >> (BITS_PER_BYTE * lane))
        elif size == _FLUSH_WRITE_SIZE:
            self.stats["flushes"] += 1
        else:
            self.stats["missed_writes"] += 1

    def _lanes(self, offset: int, size: int) -> tuple[int, int]:
        """The bit shift and the mask, within the 32-bit register, of ``size`` bytes at ``offset``."""
        shift = (offset % _REGISTER_BYTES) * BITS_PER_BYTE
        return shift, (size_mask(size) << shift) & _U32_MASK

    def _read_register(self, offset: int, size: int) -> int:
        self.stats["reads"] += 1
        shift, mask = self._lanes(offset, size)
        return (self.register & mask) >> shift

    def _write_register(self, offset: int, size: int, value: int) -> None:
        self.stats["writes"] += 1
        shift, mask = self._lanes(offset, size)
        self.register = (self.register & ~mask | (value << shift) & mask) & _U32_MASK


class PcTestdevIrqLines:
    """Ports 0x2000-0x2017: a byte written to 0x2000 + n sets line n (non-zero: high); reads are not decoded."""

    SIZE = IRQ_LINES

    def __init__(self, set_line: Callable[[int, bool], None] | None) -> None:
        self._set_line = set_line
        self.stats: Counter[str] = Counter()

    def read(self, offset: int, size: int) -> int:
        self.stats["missed_reads"] += 1
        return size_mask(size)

    def write(self, offset: int, size: int, value: int) -> None:
        for lane in range(size):
            self._write_line(offset + lane, (value >> (BITS_PER_BYTE * lane)) & BYTE_MASK)

    def _write_line(self, line: int, byte: int) -> None:
        if line >= IRQ_LINES:
            self.stats["missed_writes"] += 1
        elif self._set_line is None:
            self.stats["no_irqchip"] += 1
            log.debug("pc-testdev: line %d set to %d, but the machine has no interrupt controllers", line, byte)
        else:
            self.stats["line_writes"] += 1
            self._set_line(line, bool(byte))


class PcTestdevMemory:
    """The 64 KiB "iomem" window: reads return what was written, little-endian, through MMIO exits."""

    SIZE = IOMEM_SIZE

    def __init__(self) -> None:
        self.data = bytearray(IOMEM_SIZE)
        self.stats: Counter[str] = Counter()

    def read(self, offset: int, size: int) -> int:
        self.stats["reads"] += 1
        chunk = self.data[offset : offset + size]
        return int.from_bytes(chunk.ljust(size, b"\xff"), "little")  # bytes past the end: an open bus

    def write(self, offset: int, size: int, value: int) -> None:
        self.stats["writes"] += 1
        room = max(0, min(size, IOMEM_SIZE - offset))
        self.data[offset : offset + room] = (value & size_mask(size)).to_bytes(size, "little")[:room]
