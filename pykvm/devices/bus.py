"""Address buses: a port-I/O bus and an MMIO bus map address ranges to devices.

A device never knows where it sits: the bus turns an address into
``(device, offset)`` and calls ``device.read(offset, size)`` or
``device.write(offset, size, value)``.  Values are little-endian integers of
``size`` bytes.  An address no device claims reads as all ones and ignores
writes, as on a PC bus; each such access is counted (per address, for the first
``UNCLAIMED_ADDRESSES_KEPT`` addresses, then in one bucket: a guest scanning the
address space cannot grow the table) and logged at debug level.  A device whose
range an access runs past still gets the whole access: it answers the bytes it
has no register for itself.
"""

from __future__ import annotations

import bisect
import enum
import logging
from collections import Counter
from typing import Final, Protocol, Sequence

from ..errors import BusError, DeviceError

log = logging.getLogger(__name__)

UNCLAIMED_ADDRESSES_KEPT = 64
FIND_CACHE_SIZE = 4096
OTHER_ADDRESSES = -1  # the bucket for unclaimed addresses beyond the first few


class Device(Protocol):
    """What a bus needs of a device model."""

    def read(self, offset: int, size: int) -> int:
        """The value of a ``size``-byte read at ``offset`` into the device's range."""

    def write(self, offset: int, size: int, value: int) -> None:
        """A ``size``-byte write of ``value`` at ``offset`` into the device's range."""


class Bus:
    """Non-overlapping address ranges, each served by one device.

    ``reserved`` are ranges no device may claim, each with the reason (guest RAM, where a
    guest's accesses never leave KVM; the in-kernel LAPIC and IOAPIC windows).
    """

    def __init__(self, name: str, reserved: Sequence[tuple[int, int, str]] = ()) -> None:
        self.name = name
        self.reserved = tuple(reserved)
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, Device]] = []
        self._found: dict[int, tuple[Device, int] | None] = {}  # addresses looked up before
        self.unclaimed: Counter[tuple[int, str]] = Counter()  # (address, "read"/"write") -> count

    def register(self, base: int, length: int, device: Device) -> None:
        """Claim ``[base, base+length)`` for ``device``; raise :class:`BusError` on overlap."""
        if length <= 0:
            raise BusError(f"{self.name}: empty range at {base:#x}")
        end = base + length
        for start, stop, what in self.reserved:
            if base < stop and start < end:
                raise BusError(f"{self.name}: [{base:#x}, {end:#x}) overlaps {what} at [{start:#x}, {stop:#x}); "
                               "the guest's accesses there never reach a device")  # fmt: skip
        index = bisect.bisect_left(self._starts, base)
        if index > 0 and self._ranges[index - 1][1] > base or index < len(self._ranges) and self._starts[index] < end:
            raise BusError(f"{self.name}: [{base:#x}, {end:#x}) overlaps a registered device")
        self._starts.insert(index, base)
        self._ranges.insert(index, (base, end, device))
        self._found.clear()

    def find(self, addr: int) -> tuple[Device, int] | None:
        """The device claiming ``addr`` and the offset into its range, or None."""
        try:
            return self._found[addr]
        except KeyError:
            pass
        found = None
        index = bisect.bisect_right(self._starts, addr) - 1
        if index >= 0:
            base, end, device = self._ranges[index]
            if addr < end:
                found = device, addr - base
        if len(self._found) < FIND_CACHE_SIZE:  # a guest scanning addresses cannot grow it without bound
            self._found[addr] = found
        return found

    def read(self, addr: int, size: int) -> int:
        """A ``size``-byte read (1 to 8 bytes) at ``addr``."""
        mask = _MASKS.get(size) or _bad_size(size)
        found = self._found.get(addr, _NOT_LOOKED_UP)  # find()'s cache, looked at here: every exit comes here
        if found is _NOT_LOOKED_UP:
            found = self.find(addr)
        if found is None:
            self._unclaimed(addr, size, "read")
            return mask
        device, offset = found
        value = device.read(offset, size)
        if type(value) is not int:
            raise DeviceError(f"{self.name}: {type(device).__name__}.read({offset:#x}, {size}) at {addr:#x} "
                              f"returned {value!r:.40}, not an int")  # fmt: skip
        return value & mask

    def write(self, addr: int, size: int, value: int) -> None:
        """A ``size``-byte write (1 to 8 bytes) of ``value`` at ``addr``."""
        mask = _MASKS.get(size) or _bad_size(size)
        found = self._found.get(addr, _NOT_LOOKED_UP)
        if found is _NOT_LOOKED_UP:
            found = self.find(addr)
        if found is None:
            self._unclaimed(addr, size, "write")
            return
        device, offset = found
        device.write(offset, size, value & mask)

    def _unclaimed(self, addr: int, size: int, kind: str) -> None:
        known = (addr, kind) in self.unclaimed or len(self.unclaimed) < UNCLAIMED_ADDRESSES_KEPT
        self.unclaimed[(addr if known else OTHER_ADDRESSES, kind)] += 1
        log.debug("%s: unclaimed %d-byte %s at %#x", self.name, size, kind, addr)


class _Lookup(enum.Enum):
    """A sentinel a type checker can tell apart from ``find()``'s answers (one of them is None)."""

    NOT_DONE = enum.auto()


_MASKS = {size: (1 << (8 * size)) - 1 for size in range(1, 9)}
_NOT_LOOKED_UP: Final = _Lookup.NOT_DONE


def _bad_size(size: int) -> int:
    raise ValueError(f"bus access of {size} bytes; accesses are 1 to 8 bytes")
