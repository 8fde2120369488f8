"""Intel MultiProcessor Specification 1.4 tables: the legacy way to describe CPUs and IRQs.

:func:`build_mptable` returns the bytes to write at ``base`` (by default
``layout.MPTABLE_START``, in the BIOS ROM area an OS scans for the floating
pointer, MP spec section 4): the MP floating pointer structure ("_MP_",
section 4.1), then at once the MP configuration table ("PCMP", section 4.2),
whose base table holds, in the order section 4.3 asks for:

- one Processor entry per vCPU (APIC IDs 0..N-1, enabled; APIC 0 is the BSP);
- one Bus entry, bus 0, "ISA   ";
- one I/O APIC entry: ID N, version 0x11, at ``layout.IOAPIC_ADDR``;
- I/O Interrupt Assignment entries for ISA IRQs 0-15 as QEMU routes them:
  IRQ0 (the PIT) on INTIN 2, IRQ2 absent (the 8259 cascade; INTIN 2 is IRQ0's),
  every other IRQ n on INTIN n, all with the ISA bus's default polarity and trigger;
- Local Interrupt Assignment entries: ExtINT (the 8259) on LINT0 of the BSP, and NMI on
  LINT1 of every local APIC (virtual wire mode, MP spec section 3.6.2.2).

Linux reads these tables when it boots without ACPI (``acpi=off``) and falls back to
them when the ACPI tables lack a MADT.
"""

from __future__ import annotations

import struct

from ..errors import ConfigError
from . import layout
from .interrupts import ISA_IRQS, PIC_CASCADE_IRQ, PIT_IOAPIC_PIN, PIT_IRQ

# MP floating pointer structure (section 4.1): signature, physical address pointer,
# length in 16-byte units, spec revision, checksum, feature bytes 1-5.
MPF_SIGNATURE = b"_MP_"
MP_FLOATING_POINTER = struct.Struct("<4sIBBB5s")
MPF_ALIGN = 16
MPF_LENGTH_UNITS = 1  # 16 bytes
MP_SPEC_REV = 4  # MP specification 1.4
MPF_CHECKSUM_OFFSET = 10
MPF_FEATURES = bytes(5)  # feature byte 1 = 0: a configuration table is present; IMCRP = 0

# MP configuration table header (section 4.2): signature, base table length, spec revision,
# checksum, OEM ID, product ID, OEM table pointer, OEM table size, entry count,
# local APIC address, extended table length, extended table checksum, reserved.
PCMP_SIGNATURE = b"PCMP"
MP_CONFIG_HEADER = struct.Struct("<4sHBB8s12sIHHIHBx")
PCMP_CHECKSUM_OFFSET = 7
OEM_ID = b"PYKVM   "  # 8 bytes
PRODUCT_ID = b"PYKVM PC    "  # 12 bytes

# Entry types (section 4.3, table 4-3) and their layouts.
MP_PROCESSOR = 0
MP_BUS = 1
MP_IOAPIC = 2
MP_IO_INTERRUPT = 3
MP_LOCAL_INTERRUPT = 4
# Processor: type, local APIC ID, local APIC version, CPU flags, CPU signature,
# feature flags, reserved.
PROCESSOR_ENTRY = struct.Struct("<BBBBII8x")
# Bus: type, bus ID, bus type string.
BUS_ENTRY = struct.Struct("<BB6s")
# I/O APIC: type, ID, version, flags, address.
IOAPIC_ENTRY = struct.Struct("<BBBBI")
# I/O and local interrupt assignment: type, interrupt type, flags, source bus ID,
# source bus IRQ, destination (I/O or local) APIC ID, destination INTIN / LINTIN.
INTERRUPT_ENTRY = struct.Struct("<BBHBBBB")

CPU_ENABLED = 1 << 0  # CPU flags: EN
CPU_BOOTSTRAP = 1 << 1  # CPU flags: BP
LOCAL_APIC_VERSION = 0x14  # an integrated (xAPIC) local APIC, as KVM's
# CPUID(1).EAX and EDX summarised for the table: family 6, and FPU plus APIC on chip.
CPU_SIGNATURE = 0x600
CPU_FEATURE_FPU = 1 << 0
CPU_FEATURE_APIC = 1 << 9
CPU_FEATURES = CPU_FEATURE_FPU | CPU_FEATURE_APIC
BSP_APIC_ID = 0

ISA_BUS_ID = 0
BUS_TYPE_ISA = b"ISA   "
IOAPIC_VERSION = 0x11  # an 82093AA-style I/O APIC, as KVM's in-kernel one reports
IOAPIC_USABLE = 1 << 0

# Interrupt types (table 4-10) and flags (polarity and trigger "conform to the bus").
INT_TYPE_INT = 0
INT_TYPE_NMI = 1
INT_TYPE_EXTINT = 3
IRQ_FLAGS_CONFORMING = 0
ALL_LOCAL_APICS = 0xFF
LINTIN0 = 0
LINTIN1 = 1

# xAPIC IDs are 8 bits, 0xff is the broadcast ID, and the IOAPIC takes ID N.
MAX_CPUS = 254


def build_mptable(cpus: int, base: int = layout.MPTABLE_START) -> bytes:
    """The MP floating pointer and configuration table of a machine with ``cpus`` vCPUs.

    Raises :class:`ConfigError` when ``cpus`` is not 1 to :data:`MAX_CPUS`, when
    ``base`` is not 16-byte aligned (section 4), or when the tables do not fit in
    ``[layout.MPTABLE_START, layout.MPTABLE_END)`` from ``base``.
    """
    if not 1 <= cpus <= MAX_CPUS:
        raise ConfigError(f"{cpus} vCPUs: the MP table describes 1 to {MAX_CPUS}")
    if base % MPF_ALIGN or not layout.MPTABLE_START <= base < layout.MPTABLE_END:
        raise ConfigError(
            f"MP table at {base:#x}: the floating pointer must sit on a 16-byte boundary in "
            f"[{layout.MPTABLE_START:#x}, {layout.MPTABLE_END:#x})"
        )
    config = _config_table(cpus)
    size = MP_FLOATING_POINTER.size + len(config)
    if base + size > layout.MPTABLE_END:
        raise ConfigError(
            f"the MP table for {cpus} vCPUs needs {size} bytes from {base:#x}, "
            f"past the end of its area at {layout.MPTABLE_END:#x}"
        )
    return _floating_pointer(base + MP_FLOATING_POINTER.size) + config


def _checksum(data: bytes | bytearray) -> int:
    return -sum(data) & 0xFF


def _floating_pointer(config_address: int) -> bytes:
    """The MP floating pointer structure (section 4.1), pointing at the configuration table."""
    mpf = bytearray(
        MP_FLOATING_POINTER.pack(MPF_SIGNATURE, config_address, MPF_LENGTH_UNITS, MP_SPEC_REV, 0, MPF_FEATURES)
    )
    mpf[MPF_CHECKSUM_OFFSET] = _checksum(mpf)
    return bytes(mpf)


def _config_table(cpus: int) -> bytes:
    """The MP configuration table (section 4.2): header, then the base table entries."""
    entries = _entries(cpus)
    length = MP_CONFIG_HEADER.size + sum(len(entry) for entry in entries)
    header = MP_CONFIG_HEADER.pack(
        PCMP_SIGNATURE, length, MP_SPEC_REV, 0, OEM_ID, PRODUCT_ID, 0, 0, len(entries), layout.LAPIC_ADDR, 0, 0
    )
    table = bytearray(header + b"".join(entries))
    table[PCMP_CHECKSUM_OFFSET] = _checksum(table)
    return bytes(table)


def _entries(cpus: int) -> list[bytes]:
    ioapic_id = cpus
    entries = [_processor(apic_id) for apic_id in range(cpus)]
    entries.append(BUS_ENTRY.pack(MP_BUS, ISA_BUS_ID, BUS_TYPE_ISA))
    entries.append(IOAPIC_ENTRY.pack(MP_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_USABLE, layout.IOAPIC_ADDR))
    entries.extend(_io_interrupt(irq, ioapic_id) for irq in range(ISA_IRQS) if irq != PIC_CASCADE_IRQ)
    entries.append(_local_interrupt(INT_TYPE_EXTINT, BSP_APIC_ID, LINTIN0))
    entries.append(_local_interrupt(INT_TYPE_NMI, ALL_LOCAL_APICS, LINTIN1))
    return entries


def _processor(apic_id: int) -> bytes:
    """A Processor entry (section 4.3.1)."""
    flags = CPU_ENABLED | (CPU_BOOTSTRAP if apic_id == BSP_APIC_ID else 0)
    return PROCESSOR_ENTRY.pack(MP_PROCESSOR, apic_id, LOCAL_APIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES)


def _io_interrupt(irq: int, ioapic_id: int) -> bytes:
    """An I/O Interrupt Assignment entry (section 4.3.4) for ISA ``irq``."""
    intin = PIT_IOAPIC_PIN if irq == PIT_IRQ else irq
    return INTERRUPT_ENTRY.pack(MP_IO_INTERRUPT, INT_TYPE_INT, IRQ_FLAGS_CONFORMING, ISA_BUS_ID, irq, ioapic_id, intin)


def _local_interrupt(int_type: int, apic_id: int, lintin: int) -> bytes:
    """A Local Interrupt Assignment entry (section 4.3.5)."""
    return INTERRUPT_ENTRY.pack(MP_LOCAL_INTERRUPT, int_type, IRQ_FLAGS_CONFORMING, ISA_BUS_ID, 0, apic_id, lintin)
