"""Guest memory as a debugger addresses it: by guest-virtual address, through a vCPU's eyes.

Each 4 KiB page of an access is translated on its own with ``KVM_TRANSLATE`` (the vCPU's
page tables; without paging, in real and protected mode, the linear address itself), so a
range may cross into a page that is not mapped: the access then stops there with
:class:`~pykvm.gdbstub.UnmappedAddressError` naming the first address it could not reach.
A page that translates to no guest RAM (the MMIO hole, a device) counts as not mapped: a
debugger must not read device registers as a side effect.

The int3 bytes of software breakpoints are planted here, by guest-physical address, and
reads show the guest's own bytes in their place; a write over one changes the byte the
breakpoint hides and leaves the int3.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import GuestMemoryError, KvmIoctlError
from ..gdbstub import UnmappedAddressError
from ..kvm import Vcpu
from ..memory import GuestMemory
from ..x86.layout import PAGE_SIZE

INT3 = 0xCC


class DebugMemory:
    """Guest RAM by virtual address, with the debugger's int3s planted and hidden."""

    def __init__(self, memory: GuestMemory) -> None:
        self._memory = memory
        self._planted: dict[int, int] = {}  # guest-physical address -> the byte the int3 replaced

    def physical(self, vcpu: Vcpu, address: int) -> int:
        """The guest-physical address ``vcpu`` reaches at virtual ``address`` (in guest RAM)."""
        gpa = next(self._pages(vcpu, address, 1))[0]
        self._view(gpa, 1, address)
        return gpa

    def read(self, vcpu: Vcpu, address: int, length: int) -> bytes:
        data = bytearray()
        for gpa, start, size in self._pages(vcpu, address, length):
            piece = bytearray(self._view(gpa, size, start))
            for planted, byte in self._planted.items():
                if gpa <= planted < gpa + size:
                    piece[planted - gpa] = byte
            data += piece
        return bytes(data)

    def write(self, vcpu: Vcpu, address: int, data: bytes) -> None:
        for gpa, start, size in self._pages(vcpu, address, len(data)):
            piece = bytearray(data[start - address : start - address + size])
            for planted in self._planted:
                if gpa <= planted < gpa + size:
                    self._planted[planted], piece[planted - gpa] = piece[planted - gpa], INT3
            self._view(gpa, size, start)[:] = piece

    # --- int3s ---------------------------------------------------------------------------------
    def plant(self, gpa: int) -> None:
        """Put an int3 at ``gpa``, keeping the byte it replaces (once, however often it is planted)."""
        if gpa not in self._planted:
            self._planted[gpa] = self._memory.read(gpa, 1)[0]
            self._memory.write(gpa, bytes([INT3]))

    def unplant(self, gpa: int) -> None:
        """Give ``gpa`` its own byte back."""
        byte = self._planted.pop(gpa, None)
        if byte is not None:
            self._memory.write(gpa, bytes([byte]))

    def is_planted(self, gpa: int) -> bool:
        return gpa in self._planted

    # --- translation ---------------------------------------------------------------------------
    def _pages(self, vcpu: Vcpu, address: int, length: int) -> Iterator[tuple[int, int, int]]:
        """``(guest-physical address, virtual address, size)`` of each page piece of the range."""
        end = address + length
        while address < end:
            size = min(end - address, PAGE_SIZE - address % PAGE_SIZE)
            try:
                translation = vcpu.translate(address)
            except KvmIoctlError as err:
                raise UnmappedAddressError(address) from err
            if not translation.valid:
                raise UnmappedAddressError(address)
            yield translation.physical_address, address, size
            address += size

    def _view(self, gpa: int, size: int, address: int) -> memoryview:
        """Guest RAM at ``gpa``; anything else is unmapped for a debugger (``address`` is where it began)."""
        try:
            return self._memory.view(gpa, size)
        except GuestMemoryError as err:
            raise UnmappedAddressError(address) from err
