"""What this host's KVM can do: API version, the backend module, capabilities, limits,
and which guest debugging events reach the VMM."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .kvm import Kvm
from .native import lib

# Module that serves /dev/kvm -> what kind of virtualization it is.
BACKENDS = {
    "kvm_intel": "hardware (Intel VT-x)",
    "kvm_amd": "hardware (AMD-V)",
    "kvm_pvm": "software (PVM, pagetable-based nested virtualization)",
}
# What guests each kind of backend can run (the README's "Notes on software KVM backends").
HARDWARE_GUESTS = "guest code runs natively at full speed: any x86-64 kernel boots, a full Linux included"
GUESTS = {
    "kvm_intel": HARDWARE_GUESTS,
    "kvm_amd": HARDWARE_GUESTS,
    "kvm_pvm": (
        "long-mode user code (CPL3) runs natively; kernel code (CPL0, real and protected mode) is "
        "emulated at about 1 us an instruction, and some instructions cannot be: small kernels run; "
        "a full Linux boot is not possible"
    ),
}
UNKNOWN_GUESTS = "unknown backend: whether guest kernel code runs natively cannot be told"
CAPABILITIES = (
    "IRQCHIP", "HLT", "USER_MEMORY", "SET_TSS_ADDR", "EXT_CPUID", "PIT2", "IOEVENTFD", "IRQFD",
    "SYNC_REGS", "IMMEDIATE_EXIT", "READONLY_MEM", "MP_STATE", "XSAVE", "X86_USER_SPACE_MSR",
    "DIRTY_LOG_RING", "SPLIT_IRQCHIP", "TSC_CONTROL", "X2APIC_API",
)  # fmt: skip


class Privilege(enum.Enum):
    """Where guest code runs, as guest debugging on a backend tells it apart."""

    REAL = "real mode"
    KERNEL = "kernel mode"  # protected or long mode, CPL 0-2
    USER = "user mode"  # protected or long mode, CPL 3


@dataclass(frozen=True)
class DebugSupport:
    """Where each kind of guest debug event reaches the VMM on a backend (and so a debugger).

    Software breakpoints count where an int3 the debugger planted comes back to it: as
    ``KVM_EXIT_DEBUG`` with ``KVM_GUESTDBG_USE_SW_BP``, or, on kvm_pvm, as the emulation
    failure the int3 ends in.  ``note`` says why, where some do not.
    """

    single_step: frozenset[Privilege]
    hardware_breakpoints: frozenset[Privilege]
    watchpoints: frozenset[Privilege]
    software_breakpoints: frozenset[Privilege]
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        where = {name: [place.value for place in Privilege if place in getattr(self, name)] for name in _DEBUG_EVENTS}
        return {**where, "note": self.note}


_DEBUG_EVENTS = ("single_step", "hardware_breakpoints", "watchpoints", "software_breakpoints")
_EVERYWHERE = frozenset(Privilege)
FULL_DEBUG_SUPPORT = DebugSupport(_EVERYWHERE, _EVERYWHERE, _EVERYWHERE, _EVERYWHERE)
# Measured on the nested backend (tests/test_debugger_platform.py checks every entry on the host it runs on).
_EMULATED = frozenset({Privilege.REAL, Privilege.KERNEL})
DEBUG_SUPPORT = {
    "kvm_pvm": DebugSupport(
        single_step=_EMULATED,
        hardware_breakpoints=_EMULATED,
        watchpoints=frozenset(),
        software_breakpoints=frozenset({Privilege.KERNEL}),
        note="on kvm_pvm user-mode code runs natively and its debug exceptions go to the guest; the rest is "
        "emulated, and the emulator checks no data watchpoint, gives a real-mode int3 to the guest's "
        "interrupt table, and ends a protected- or long-mode int3 in an emulation failure, which pykvm "
        "takes as the breakpoint",
    ),
}


def debug_support(backend: str | None) -> DebugSupport:
    """What guest debugging can do on ``backend`` (VT-x/AMD-V, and backends not known here: all of it)."""
    return DEBUG_SUPPORT.get(backend or "", FULL_DEBUG_SUPPORT)


def kvm_backend(sys_module: Path = Path("/sys/module")) -> str | None:
    """The loaded kernel module that provides /dev/kvm, if one of the known ones is loaded."""
    for module in BACKENDS:
        if (sys_module / module).exists():
            return module
    return None


def is_hardware_backend() -> bool:
    """True where guest kernel code runs on VT-x/AMD-V rather than in a software emulator."""
    return kvm_backend() in ("kvm_intel", "kvm_amd")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def host_info(kvm_path: str = "/dev/kvm") -> dict[str, Any]:
    """Everything ``pykvm info`` reports, as plain data."""
    with Kvm(kvm_path) as kvm:
        backend = kvm_backend()
        return {
            "device": kvm_path,
            "api_version": kvm.api_version(),
            "backend": backend,
            "backend_kind": BACKENDS.get(backend or "", "unknown"),
            "guests": GUESTS.get(backend or "", UNKNOWN_GUESTS),
            "host_kernel": os.uname().release,
            "cpu_model": _cpu_model(),
            "host_cpus": os.cpu_count(),
            "limits": {
                "recommended_vcpus": kvm.check_extension(lib.KVM_CAP_NR_VCPUS),
                "max_vcpus": kvm.check_extension(lib.KVM_CAP_MAX_VCPUS),
                "memory_slots": kvm.check_extension(lib.KVM_CAP_NR_MEMSLOTS),
                "vcpu_mmap_size": kvm.vcpu_mmap_size(),
                "supported_cpuid_leaves": len(kvm.supported_cpuid()),
                "saved_msrs": len(kvm.msr_index_list()),
            },
            "capabilities": {name.lower(): kvm.check_extension(getattr(lib, f"KVM_CAP_{name}")) for name in CAPABILITIES},
            "debugging": debug_support(backend).as_dict(),
        }


def format_info(info: dict[str, Any]) -> str:
    """``host_info()`` for humans."""
    lines = [
        f"device:       {info['device']} (KVM API {info['api_version']})",
        f"backend:      {info['backend'] or 'unknown'}: {info['backend_kind']}",
        f"guests:       {info['guests']}",
        f"host:         {info['cpu_model']}, {info['host_cpus']} CPUs, Linux {info['host_kernel']}",
        "limits:",
        *(f"  {name:<24} {value}" for name, value in info["limits"].items()),
        "capabilities:",
        *(f"  {name:<24} {'yes' if value else 'no'}{f' ({value})' if value > 1 else ''}" for name, value in info["capabilities"].items()),
        "debugging (pykvm run --gdb), where each event stops the guest:",
        *(f"  {event.replace('_', ' '):<24} {', '.join(info['debugging'][event]) or 'nowhere'}" for event in _DEBUG_EVENTS),
    ]
    if info["debugging"]["note"]:
        lines.append(f"  ({info['debugging']['note']})")
    return "\n".join(lines)
