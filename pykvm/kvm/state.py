"""Plain, typed records of vCPU state, and their conversion to and from KVM's structs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from ..native import ffi

GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip


@dataclass
class Regs:
    """General registers, ``rip`` and ``rflags`` (``struct kvm_regs``)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2


@dataclass
class Segment:
    """A segment register with its hidden descriptor part (``struct kvm_segment``)."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 - the field's name in <linux/kvm.h>
    g: int = 0
    avl: int = 0
    unusable: int = 0


@dataclass
class DTable:
    """A descriptor-table register: GDTR or IDTR (``struct kvm_dtable``)."""

    base: int = 0
    limit: int = 0xFFFF


@dataclass
class SRegs:
    """Segment, descriptor-table and control registers (``struct kvm_sregs``)."""

    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: DTable = field(default_factory=DTable)
    idt: DTable = field(default_factory=DTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0


@dataclass(frozen=True)
class CpuidEntry:
    """One CPUID leaf/subleaf (``struct kvm_cpuid_entry2``)."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def to_record(cls: type, cstruct: Any) -> Any:
    """Copy a cffi struct into the dataclass ``cls`` (nested dataclasses recurse)."""
    values = {}
    for f in fields(cls):
        member = getattr(cstruct, f.name)
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        values[f.name] = to_record(nested, member) if nested is not None else int(member)
    return cls(**values)


def fill_struct(cstruct: Any, record: Any) -> None:
    """Copy the dataclass ``record`` into a cffi struct (nested dataclasses recurse)."""
    for f in fields(record):
        value = getattr(record, f.name)
        if dataclasses.is_dataclass(value):
            fill_struct(getattr(cstruct, f.name), value)
        else:
            setattr(cstruct, f.name, value)


def new_struct(ctype: str, record: Any) -> Any:
    """A new cffi ``ctype *`` holding ``record``."""
    cstruct = ffi.new(ctype + " *")
    fill_struct(cstruct, record)
    return cstruct
