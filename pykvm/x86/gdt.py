"""The boot GDT and TSS pykvm gives protected- and long-mode guests (pure encoders).

Descriptors are built like Firecracker's ``gdt.rs`` ("derived from the kernel's
segment.h"): ``flags`` packs the access byte (bits 0-7) and the G/DB/L/AVL nibble
(bits 12-15).
"""

from __future__ import annotations

import struct

from ..kvm.state import Segment
from . import layout

# Access bytes + flag nibbles of the boot GDT's descriptors.
CODE64_FLAGS = 0xA09B  # G, L, present, DPL0, code execute/read, accessed
CODE32_FLAGS = 0xC09B  # G, D, present, DPL0, code execute/read, accessed
DATA_FLAGS = 0xC093  # G, B, present, DPL0, data read/write, accessed
USER_DATA_FLAGS = 0xC0F3  # as DATA_FLAGS at DPL3
USER_CODE64_FLAGS = 0xA0FB  # as CODE64_FLAGS at DPL3
TSS_FLAGS = 0x008B  # present, busy 64-bit (or 32-bit) TSS

# Selectors (index * 8 | RPL).  The user selectors are Linux's (__USER_DS, __USER_CS),
# in the order SYSRET expects: user data at STAR[63:48] + 8, 64-bit user code at + 16.
CODE64_SELECTOR = 0x08
CODE32_SELECTOR = 0x10
DATA_SELECTOR = 0x18
USER_DATA_SELECTOR = 0x28 | 3
USER_CODE64_SELECTOR = 0x30 | 3
TSS_SELECTOR = 0x38

_TSS_SIZE = 0x68  # the 64-bit TSS proper
_TSS_RSP0_OFFSET = 4
_TSS_IOMAP_BASE_OFFSET = 0x66
_IO_BITMAP_SIZE = 0x10000 // 8 + 1  # a bit per port, then a byte of ones (SDM 20.5.2)
TSS_LIMIT = _TSS_SIZE + _IO_BITMAP_SIZE - 1
_FLAT_LIMIT = 0xFFFFF


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """An 8-byte segment descriptor as an integer."""
    return (
        ((base & 0xFF000000) << 32)
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0x0000FFFF)
        | ((limit & 0x000F0000) << 32)
        | ((flags & 0xF0FF) << 40)
    )


def segment(flags: int, base: int, limit: int, selector: int) -> Segment:
    """The ``kvm_segment`` (hidden part included) that loading ``selector`` would give."""
    granular = (flags >> 15) & 1
    return Segment(
        base=base,
        limit=(limit << 12) | 0xFFF if granular else limit,
        selector=selector,
        type=flags & 0xF,
        present=(flags >> 7) & 1,
        dpl=(flags >> 5) & 3,
        db=(flags >> 14) & 1,
        s=(flags >> 4) & 1,
        l=(flags >> 13) & 1,
        g=granular,
        avl=(flags >> 12) & 1,
    )


def boot_gdt(tss_base: int = layout.BOOT_TSS_START) -> bytes:
    """The boot GDT: null, code64, code32, data, (unused), user data, user code64, then a 16-byte TSS descriptor.

    The TSS descriptor points at ``tss_base``.
    """
    entries = [
        0,
        gdt_entry(CODE64_FLAGS, 0, _FLAT_LIMIT),
        gdt_entry(CODE32_FLAGS, 0, _FLAT_LIMIT),
        gdt_entry(DATA_FLAGS, 0, _FLAT_LIMIT),
        0,  # where Linux keeps its 32-bit user code segment
        gdt_entry(USER_DATA_FLAGS, 0, _FLAT_LIMIT),
        gdt_entry(USER_CODE64_FLAGS, 0, _FLAT_LIMIT),
        gdt_entry(TSS_FLAGS, tss_base, TSS_LIMIT),
        tss_base >> 32,  # upper half of the 64-bit TSS descriptor
    ]
    return struct.pack(f"<{len(entries)}Q", *entries)


def boot_tss(rsp0: int) -> bytes:
    """A 64-bit TSS whose RSP0 is ``rsp0`` (the stack for interrupts taken at CPL3).

    Its I/O permission bitmap allows every port.  On VT-x/AMD-V the IOPL of 3 that
    CPL3 entry sets already allows port I/O; a software backend such as kvm_pvm
    checks the bitmap instead, so both must say yes.
    """
    tss = bytearray(_TSS_SIZE)
    struct.pack_into("<Q", tss, _TSS_RSP0_OFFSET, rsp0)
    struct.pack_into("<H", tss, _TSS_IOMAP_BASE_OFFSET, _TSS_SIZE)
    return bytes(tss) + bytes(_IO_BITMAP_SIZE - 1) + b"\xff"


def tss_segment(base: int) -> Segment:
    """The task register's state for the boot TSS at ``base``."""
    return segment(TSS_FLAGS, base, TSS_LIMIT, TSS_SELECTOR)


BOOT_GDT_SIZE = len(boot_gdt())
TSS_SIZE = TSS_LIMIT + 1
CODE64 = segment(CODE64_FLAGS, 0, _FLAT_LIMIT, CODE64_SELECTOR)
CODE32 = segment(CODE32_FLAGS, 0, _FLAT_LIMIT, CODE32_SELECTOR)
DATA = segment(DATA_FLAGS, 0, _FLAT_LIMIT, DATA_SELECTOR)
USER_DATA = segment(USER_DATA_FLAGS, 0, _FLAT_LIMIT, USER_DATA_SELECTOR)
USER_CODE64 = segment(USER_CODE64_FLAGS, 0, _FLAT_LIMIT, USER_CODE64_SELECTOR)
TSS = tss_segment(layout.BOOT_TSS_START)
