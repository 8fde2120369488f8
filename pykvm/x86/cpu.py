"""Entering the guest: the vCPU state of real, protected and long mode, CPUID and MSRs.

The functions that compute state are pure; :func:`apply_entry` is the one step that
writes the boot structures into guest memory and the registers into a vCPU.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..kvm.state import GPR_NAMES, CpuidEntry, DTable, Regs, Segment, SRegs
from . import gdt, layout, paging
from .entry import BootTables, CpuMode, EntryState, MemoryWrite

if TYPE_CHECKING:
    from ..kvm import Vcpu
    from ..memory import GuestMemory

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1
RFLAGS_IOPL3 = 3 << 12

REAL_MODE_SEGMENT_LIMIT = 0xFFFF
_REAL_DATA_TYPE = 3  # read/write, accessed
_REAL_CODE_TYPE = 0xB  # execute/read, accessed
_LDT_TYPE = 2

# CPUID leaf 1: ECX bit 31 says "running under a hypervisor"; EBX bits 24-31 hold the APIC ID.
_CPUID_HYPERVISOR_BIT = 1 << 31
_CPUID_APIC_ID_SHIFT = 24
_CPUID_LEAF_X2APIC = 0xB

# MSRs every vCPU starts with, as Firecracker and the Linux boot protocol expect.
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MISC_ENABLE_FAST_STRING = 1 << 0
BOOT_MSRS = {
    MSR_IA32_SYSENTER_CS: 0,
    MSR_IA32_SYSENTER_ESP: 0,
    MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0,
    MSR_CSTAR: 0,
    MSR_KERNEL_GS_BASE: 0,
    MSR_SYSCALL_MASK: 0,
    MSR_LSTAR: 0,
    MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
}


def boot_structures(mode: CpuMode, tables: BootTables = BootTables()) -> list[MemoryWrite]:
    """What must be in guest memory before entering ``mode``: GDT, TSS, page tables, at ``tables``."""
    if mode is CpuMode.REAL:
        return []
    writes = [
        MemoryWrite(tables.gdt, gdt.boot_gdt(tables.tss)),
        MemoryWrite(tables.tss, gdt.boot_tss(rsp0=tables.stack_pointer)),
    ]
    if mode is CpuMode.LONG:
        writes += [MemoryWrite(gpa, data) for gpa, data in paging.identity_page_tables(tables.page_tables)]
    return writes


def _real_segment(selector: int, code: bool = False) -> Segment:
    return Segment(
        base=selector << 4,
        limit=REAL_MODE_SEGMENT_LIMIT,
        selector=selector,
        type=_REAL_CODE_TYPE if code else _REAL_DATA_TYPE,
    )


def _with_segments(sregs: SRegs, code: Segment, data: Segment) -> SRegs:
    return dataclasses.replace(sregs, cs=code, ds=data, es=data, fs=data, gs=data, ss=data)


def _real_mode_code_segment(entry: EntryState) -> int:
    """The segment real-mode code is entered with: as given, or the one putting ``entry`` in its first 64 KiB."""
    return entry.segment if entry.segment is not None else (entry.entry >> 4) & 0xF000


def entry_sregs(entry: EntryState, initial: SRegs) -> SRegs:
    """The special registers that enter ``entry`` (``initial``: the vCPU's current state, from which
    only what no mode sets is kept; real and protected mode start with paging and long mode off,
    whatever the vCPU ran before)."""
    if entry.mode is CpuMode.REAL:
        code = _real_segment(_real_mode_code_segment(entry), code=True)
        data = _real_segment(entry.data_segment)
        return dataclasses.replace(_with_segments(initial, code, data), cr0=CR0_ET, cr3=0, cr4=0, efer=0)
    ldt = Segment(type=_LDT_TYPE, s=0, present=0, unusable=1, limit=0)
    tables = dataclasses.replace(initial, gdt=DTable(entry.tables.gdt, gdt.BOOT_GDT_SIZE - 1), idt=DTable(0, 0),
                                 tr=gdt.tss_segment(entry.tables.tss), ldt=ldt)  # fmt: skip
    if entry.mode is CpuMode.PROTECTED:
        return dataclasses.replace(_with_segments(tables, gdt.CODE32, gdt.DATA), cr0=CR0_PE | CR0_ET, cr3=0, cr4=0, efer=0)
    code, data = (gdt.USER_CODE64, gdt.USER_DATA) if entry.user else (gdt.CODE64, gdt.DATA)
    return dataclasses.replace(
        _with_segments(tables, code, data),
        cr0=CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG,
        cr3=entry.tables.page_tables,
        cr4=CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
        efer=EFER_LME | EFER_LMA,
    )


def entry_regs(entry: EntryState) -> Regs:
    """The general registers that enter ``entry``."""
    unknown = set(entry.regs) - set(GPR_NAMES)
    if unknown:
        raise ValueError(f"unknown register names in the entry state: {sorted(unknown)}")
    if entry.mode is CpuMode.REAL:
        code_base = _real_mode_code_segment(entry) << 4
        regs = Regs(rip=entry.entry - code_base, rsp=layout.REAL_MODE_LOAD_ADDR)
    else:
        regs = Regs(rip=entry.entry, rsp=entry.tables.stack_pointer)
    if entry.user:
        regs.rflags |= RFLAGS_IOPL3
    return dataclasses.replace(regs, **entry.regs)


def vcpu_cpuid(supported: list[CpuidEntry], vcpu_id: int) -> list[CpuidEntry]:
    """KVM's supported CPUID, with the hypervisor bit set and this vCPU's APIC ID filled in."""
    leaves = []
    for leaf in supported:
        if leaf.function == 1:
            leaf = dataclasses.replace(
                leaf,
                ecx=leaf.ecx | _CPUID_HYPERVISOR_BIT,
                ebx=(leaf.ebx & 0x00FFFFFF) | (vcpu_id << _CPUID_APIC_ID_SHIFT),
            )
        elif leaf.function == _CPUID_LEAF_X2APIC:
            leaf = dataclasses.replace(leaf, edx=vcpu_id)
        leaves.append(leaf)
    return leaves


def apply_entry(vcpu: Vcpu, memory: GuestMemory, entry: EntryState) -> None:
    """Write the boot structures ``entry`` needs into ``memory`` and enter it on ``vcpu``."""
    for write in boot_structures(entry.mode, entry.tables):
        memory.write(write.gpa, write.data)
    vcpu.set_sregs(entry_sregs(entry, vcpu.get_sregs()))
    vcpu.set_regs(entry_regs(entry))
