"""Plain records of vCPU and VM state: dataclasses of ints (and bytes), no C in sight.

``kvm/convert.py`` copies them to and from KVM's structs.  Structures pykvm does not
interpret (the FPU/XSAVE area, XCRs, debug registers, the LAPIC page, pending events,
the PIC, IOAPIC and PIT) travel as the raw bytes of the kernel's struct: their layout
is the kernel's ABI, and a restore hands them back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class ClockData:
    """The VM's kvmclock (``struct kvm_clock_data``): ``clock`` in ns, ``KVM_CLOCK_*`` flags.

    ``realtime`` and ``host_tsc`` are the host's wall clock (ns) and TSC at the same moment,
    valid when ``flags`` has ``KVM_CLOCK_REALTIME`` / ``KVM_CLOCK_HOST_TSC``.
    """

    clock: int = 0
    flags: int = 0
    realtime: int = 0
    host_tsc: int = 0


@dataclass
class Translation:
    """A guest-virtual address as the vCPU's page tables map it (``struct kvm_translation``).

    On x86 only ``physical_address`` and ``valid`` say anything: KVM always reports
    ``writeable`` 1 and ``usermode`` 0.
    """

    physical_address: int
    valid: int
    writeable: int
    usermode: int


@dataclass(frozen=True)
class MemorySlot:
    """A KVM memory slot as pykvm registered it (``struct kvm_userspace_memory_region``)."""

    slot: int
    gpa: int
    size: int
    host_addr: int
    flags: int = 0


@dataclass
class VcpuState:
    """Everything KVM holds for one vCPU (``Vcpu.save_state``), ready to restore into a new vCPU.

    The interrupt bitmap of ``KVM_GET_SREGS`` is not kept: an interrupt being injected is
    also in ``vcpu_events``, which is restored last.
    """

    mp_state: int
    regs: Regs
    sregs: SRegs
    xsave: bytes
    xcrs: bytes
    debugregs: bytes
    lapic: bytes | None  # None: the VM has no in-kernel LAPIC
    cpuid: list[CpuidEntry]
    msrs: dict[int, int]
    vcpu_events: bytes


@dataclass
class VmState:
    """What KVM holds for the VM itself (``Vm.save_state``): the kvmclock and, where the VM
    has them, the in-kernel PICs, IOAPIC (``struct kvm_irqchip``'s ``chip``) and PIT."""

    clock: ClockData
    pic_master: bytes | None = None
    pic_slave: bytes | None = None
    ioapic: bytes | None = None
    pit: bytes | None = None
