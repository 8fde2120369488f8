"""The vCPU state a wake from ACPI S3 starts in: reset processors, the BSP at the waking vector.

The processors lose their state in S3.  On a wake QEMU resets every CPU, and SeaBIOS's resume
path (``s3_resume`` in its ``src/resume.c``) enters the waking vector the OS wrote into the FACS,
in real mode, by a far call with a zeroed register set.  The bootstrap processor starts with:

- CS:IP = vector >> 4 : vector & 0xF (ACPI 6.3 section 5.2.10; the segment keeps 16 bits, as
  SeaBIOS's ``FLATPTR_TO_SEG`` does with a vector above 1 MiB);
- DS, ES, FS, GS, SS = 0 and SS:SP = 0000:1000 (the top of SeaBIOS's resume stack); every general
  register 0; FLAGS = 0x2 (interrupts off);
- CR0 = ET (SeaBIOS clears CD and NW on its way through protected mode), CR2-CR4, CR8 and EFER 0;
  the real-mode interrupt table at 0 (IDTR limit 0x3ff), the GDTR, LDTR and TR of a reset;
- the debug registers of a reset (no breakpoint armed);
- its local APIC as at power-on, in xAPIC mode at the default base: software-disabled, every LVT
  masked but LINT0, in ExtINT mode (the virtual wire KVM and a BIOS give the BSP).

The other vCPUs get the same state with their LAPIC's LINT0 masked and wait for a SIPI, as after
an INIT (KVM's INIT_RECEIVED state, set by the caller); the OS starts them again with INIT and SIPI.
Segment limits are real mode's 64 KiB (SeaBIOS's far call leaves the 4 GiB limits of its "big real
mode" behind).  The x87/SSE/AVX registers, XCR0 and the MSRs keep what they held: real-mode wake
code does not use them, and an OS reloads them on resume (Linux's ``restore_processor_state``).
"""

from __future__ import annotations

import struct

from ..kvm.state import DTable, Regs, Segment, SRegs
from . import layout
from .cpu import entry_regs, entry_sregs
from .entry import CpuMode, EntryState

# SeaBIOS's resume stack ends here (BUILD_S3RESUME_STACK_ADDR); the waking vector gets it.
WAKING_STACK_POINTER = 0x1000
SEGMENT_MASK = 0xFFFF
REAL_MODE_IVT_LIMIT = 0x3FF
_LDT_TYPE = 2
_BUSY_TSS_TYPE = 0xB
# IA32_APIC_BASE: the bootstrap processor flag and the global enable (Intel SDM 10.4.4).
APIC_BASE_BSP = 1 << 8
APIC_BASE_ENABLE = 1 << 11

# struct kvm_debugregs: db[4], dr6, dr7, flags, reserved[9] (u64 each); DR6 and DR7 as at reset.
_DEBUGREGS = struct.Struct("<4QQQQ9Q")
DR6_RESET = 0xFFFF0FF0
DR7_RESET = 0x400
RESET_DEBUGREGS = _DEBUGREGS.pack(0, 0, 0, 0, DR6_RESET, DR7_RESET, *[0] * 10)

# The local APIC's registers, at their offsets in its page (struct kvm_lapic_state's regs),
# with their power-on values (Intel SDM 10.12.5.1).
LAPIC_ID = 0x20
LAPIC_VERSION = 0x30
LAPIC_DFR = 0xE0
LAPIC_SVR = 0xF0
LAPIC_LVT_CMCI = 0x2F0
LAPIC_LVT_TIMER = 0x320
LAPIC_LVT_THERMAL = 0x330
LAPIC_LVT_PERFORMANCE = 0x340
LAPIC_LVT_LINT0 = 0x350
LAPIC_LVT_LINT1 = 0x360
LAPIC_LVT_ERROR = 0x370
LAPIC_ID_SHIFT = 24
DFR_FLAT = 0xFFFFFFFF
SVR_RESET = 0xFF  # spurious vector 0xff, APIC software-disabled
LVT_MASKED = 1 << 16
LVT_EXTINT = 0x7 << 8
LVTS = (LAPIC_LVT_CMCI, LAPIC_LVT_TIMER, LAPIC_LVT_THERMAL, LAPIC_LVT_PERFORMANCE, LAPIC_LVT_LINT0,
        LAPIC_LVT_LINT1, LAPIC_LVT_ERROR)  # fmt: skip
_REGISTER = struct.Struct("<I")


def waking_entry(vector: int) -> EntryState:
    """The real-mode entry at the FACS waking vector ``vector`` (a 32-bit physical address)."""
    segment = (vector >> 4) & SEGMENT_MASK
    return EntryState(
        CpuMode.REAL, entry=(segment << 4) + (vector & 0xF), segment=segment, regs={"rsp": WAKING_STACK_POINTER}
    )


def waking_regs(vector: int) -> Regs:
    """The general registers at the waking vector: all 0 but IP and SP, FLAGS 0x2."""
    return entry_regs(waking_entry(vector))


def waking_sregs(vector: int, bsp: bool) -> SRegs:
    """The special registers of a reset processor entering the waking vector in real mode."""
    reset = SRegs(
        ldt=Segment(type=_LDT_TYPE, s=0),
        tr=Segment(type=_BUSY_TSS_TYPE, s=0),
        gdt=DTable(0, SEGMENT_MASK),
        idt=DTable(0, REAL_MODE_IVT_LIMIT),
        apic_base=layout.LAPIC_ADDR | APIC_BASE_ENABLE | (APIC_BASE_BSP if bsp else 0),
    )
    return entry_sregs(waking_entry(vector), reset)


def reset_lapic(current: bytes, apic_id: int, bsp: bool) -> bytes:
    """The LAPIC page at power-on for ``apic_id`` (``current`` gives its size and version register)."""
    page = bytearray(len(current))
    page[LAPIC_VERSION : LAPIC_VERSION + _REGISTER.size] = current[LAPIC_VERSION : LAPIC_VERSION + _REGISTER.size]
    values = {LAPIC_ID: apic_id << LAPIC_ID_SHIFT, LAPIC_DFR: DFR_FLAT, LAPIC_SVR: SVR_RESET}
    values |= {lvt: LVT_MASKED for lvt in LVTS}
    if bsp:
        values[LAPIC_LVT_LINT0] = LVT_EXTINT
    for offset, value in values.items():
        _REGISTER.pack_into(page, offset, value)
    return bytes(page)
