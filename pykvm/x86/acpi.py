"""ACPI tables for pykvm's PC machine (ACPI Specification 6.3, chapter 5).

:func:`build_acpi_tables` returns one blob to be written at ``base`` (by
default ``layout.ACPI_START``, inside the BIOS area where an OS scans for the
RSDP on 16-byte boundaries, ACPI 6.3 section 5.2.5.1).  The blob holds, in
this order, each on a 16-byte boundary (the FACS on a 64-byte one):

=========  ===================================================================
RSDP       revision 2: both checksums; points at the RSDT and the XSDT
DSDT       the sleep states ``\\_S3_`` and ``\\_S5_`` (see :data:`DSDT_AML`)
FACS       the firmware control structure: no waking vector (the guest writes
           one before it suspends), global lock free
APIC       the MADT: one Processor Local APIC per vCPU (APIC IDs 0..N-1),
           the IOAPIC (ID N, GSI base 0), two Interrupt Source Overrides
           (ISA IRQ0 -> GSI 2, and the SCI: IRQ9 -> GSI 9 level, active high)
           and a Local APIC NMI on LINT1 of every processor
FACP       the FADT, revision 6.3: not hardware-reduced; SCI on IRQ 9; the
           PM1a event and control blocks and the PM timer of the ACPI PM
           device (:mod:`pykvm.devices.acpi_pm`) at ``pm_base``
RSDT/XSDT  both list the FACP and the APIC (the DSDT and FACS are reached
           through the FADT, as the specification wants)
=========  ===================================================================

The PM timer is 32 bits wide (TMR_VAL_EXT set): it wraps every 20 minutes
instead of every 4.7 seconds as QEMU's 24-bit PIIX4 timer does
(``acpi_pm_tmr_get()`` in QEMU's ``hw/acpi/core.c`` masks with 0xffffff).
There is no reset register (RESET_REG_SUP clear): pykvm resets through the
i8042.  SMI_CMD is 0: the machine is always in ACPI mode, so SCI_EN always
reads 1 and an OS never tries an SMI transition (section 4.8.3.4, Legacy/ACPI
Select and the SCI Interrupt).

The FADT's FIRMWARE_CTRL points at the FACS: the specification requires one
unless the platform is hardware-reduced (section 5.2.10), ACPICA, finding a
global lock enable bit that sticks in PM1_EN, would otherwise believe in a
global lock whose FACS it cannot find, and an OS that suspends to S3 writes its
waking vector there (:data:`FACS_WAKING_VECTOR_OFFSET`, read at the wake).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..errors import ConfigError
from . import layout
from .interrupts import ACPI_SCI_IRQ, PIT_IOAPIC_PIN, PIT_IRQ

# --- The ACPI PM device the FADT describes (pykvm.devices.acpi_pm emulates it) -------------
# I/O base of the PM registers: QEMU's PIIX4 PM base.
ACPI_PM_BASE = 0x600
# Offsets of the register blocks inside the PM range, and their lengths (section 4.8.4).
PM1A_EVT_OFFSET = 0
PM1_EVT_LEN = 4  # PM1_STS (2 bytes) then PM1_EN (2 bytes)
PM1A_CNT_OFFSET = 4
PM1_CNT_LEN = 2
PM_TMR_OFFSET = 8
PM_TMR_LEN = 4
ACPI_PM_SIZE = PM_TMR_OFFSET + PM_TMR_LEN
# The PM timer counts at 3.579545 MHz (section 4.8.3); its width follows TMR_VAL_EXT.
PM_TIMER_FREQUENCY = 3_579_545
PM_TMR_BITS = 32
# The SCI: ISA IRQ 9, level-triggered, active high (as on QEMU's PC).
SCI_IRQ = ACPI_SCI_IRQ  # the FADT's SCI_INT
# SLP_TYP values the DSDT's \_S3_ and \_S5_ give (written to PM1a_CNT with SLP_EN): S3,
# suspend to RAM, is 1 as in QEMU's DSDT (which kvm-unit-tests' s3 test writes without
# reading it); S5, soft-off, is 5.
SLP_TYP_S3 = 1
SLP_TYP_S5 = 5

# --- Common structure -----------------------------------------------------------------------
OEM_ID = b"PYKVM "  # 6 bytes
OEM_TABLE_ID = b"PYKVMPC "  # 8 bytes
OEM_REVISION = 1
CREATOR_ID = b"PYKV"
CREATOR_REVISION = 1
HYPERVISOR_VENDOR_ID = b"PYKVM\0\0\0"  # FADT "Hypervisor Vendor Identity", 8 bytes
TABLE_ALIGN = 16
FACS_ALIGN = 64  # section 5.2.10: the FACS is 64-byte aligned
# System Description Table Header (section 5.2.6): signature, length, revision,
# checksum, OEMID, OEM table ID, OEM revision, creator ID, creator revision.
SDT_HEADER = struct.Struct("<4sIBB6s8sI4sI")
SDT_CHECKSUM_OFFSET = 9
# Generic Address Structure (section 5.2.3.2): address space, bit width, bit offset,
# access size, address.
GAS = struct.Struct("<BBBBQ")
GAS_SYSTEM_IO = 1
GAS_ACCESS_WORD = 2
GAS_ACCESS_DWORD = 3
BITS_PER_BYTE = 8

# --- RSDP (section 5.2.5.3) ---------------------------------------------------------------------
RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2  # ACPI 2.0+: has the XSDT address and the extended checksum
# Signature, checksum, OEMID, revision, RSDT address, length, XSDT address,
# extended checksum, reserved.
RSDP = struct.Struct("<8sB6sBIIQB3x")
RSDP_V1_LENGTH = 20  # the checksum covers these bytes (the ACPI 1.0 structure)
RSDP_CHECKSUM_OFFSET = 8
RSDP_EXTENDED_CHECKSUM_OFFSET = 32

# --- RSDT, XSDT (sections 5.2.7, 5.2.8) -----------------------------------------------------
RSDT_REVISION = 1
XSDT_REVISION = 1

# --- FACS (section 5.2.10) ----------------------------------------------------------------------
# Signature, length, hardware signature, firmware waking vector, global lock, flags,
# X firmware waking vector, version, reserved, OSPM flags, reserved.
FACS = struct.Struct("<4sIIIIIQB3xI24x")
FACS_VERSION = 2
# Firmware_Waking_Vector: the real-mode address an OS's wake code starts at.  (The 64-bit
# X_Firmware_Waking_Vector after it is ignored, as SeaBIOS ignores it.)
FACS_WAKING_VECTOR_OFFSET = 12

# --- DSDT (section 5.2.11.1) --------------------------------------------------------------------
DSDT_REVISION = 2  # 2 or more: AML integers are 64 bits
# The sleep states, each Name (\_Sx_, Package () {SLP_TYPa, SLP_TYPb, 0, 0}) hand-encoded in
# AML (section 20.2); for \_S5_:
#   08                NameOp                                  (20.2.5.1, DefName)
#   5C 5F 53 35 5F    NameString: RootChar '\', NameSeg "_S5_" (20.2.2)
#   12                PackageOp                               (20.2.5.4, DefPackage)
#   08                PkgLength: 8 bytes, this byte included  (20.2.4, one-byte form)
#   04                NumElements: 4
#   0A 05             BytePrefix 5: SLP_TYPa for PM1a_CNT      (20.2.3)
#   0A 05             BytePrefix 5: SLP_TYPb (there is no PM1b_CNT block)
#   00 00             ZeroOp, ZeroOp: reserved
# These are the \_Sx objects of chapter 7 (System States): to enter state x, OSPM writes
# SLP_TYPa << 10 | SLP_EN to PM1a_CNT.


def _sleep_state(name: bytes, sleep_type: int) -> bytes:
    """``Name (\\<name>, Package () {sleep_type, sleep_type, 0, 0})`` in AML."""
    return bytes([0x08, 0x5C, *name, 0x12, 0x08, 0x04, 0x0A, sleep_type, 0x0A, sleep_type, 0x00, 0x00])


DSDT_AML = _sleep_state(b"_S3_", SLP_TYP_S3) + _sleep_state(b"_S5_", SLP_TYP_S5)

# --- MADT (section 5.2.12) ----------------------------------------------------------------------
MADT_REVISION = 5  # ACPI 6.3
MADT_PCAT_COMPAT = 1 << 0  # a dual 8259 PIC is present too
MADT_LOCAL_APIC = 0  # interrupt controller structure types (section 5.2.12)
MADT_IO_APIC = 1
MADT_INTERRUPT_SOURCE_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
LOCAL_APIC_ENABLED = 1 << 0
ALL_PROCESSORS = 0xFF  # ACPI processor UID that means every processor
LINT1 = 1
ISA_BUS = 0
# MPS INTI flags (section 5.2.12.5): polarity bits 0-1, trigger mode bits 2-3.
MPS_INTI_CONFORMING = 0x0000
MPS_INTI_ACTIVE_HIGH = 0x0001
MPS_INTI_LEVEL = 0x000C
IOAPIC_GSI_BASE = 0
# (source IRQ, GSI, flags) of every Interrupt Source Override.
INTERRUPT_SOURCE_OVERRIDES = (
    (PIT_IRQ, PIT_IOAPIC_PIN, MPS_INTI_CONFORMING),
    (SCI_IRQ, SCI_IRQ, MPS_INTI_LEVEL | MPS_INTI_ACTIVE_HIGH),
)
# xAPIC IDs are 8 bits, 0xff is the broadcast ID, and the IOAPIC takes ID N.
MAX_CPUS = 254

# --- FADT (section 5.2.9) -----------------------------------------------------------------------
FADT_REVISION = 6
FADT_MINOR_REVISION = 3  # ACPI 6.3
FADT_LENGTH = 276
PM_PROFILE_UNSPECIFIED = 0
P_LVL2_LAT_NO_C2 = 101  # more than 100: C2 not supported
P_LVL3_LAT_NO_C3 = 1001  # more than 1000: C3 not supported
RTC_CENTURY_INDEX = 0x32  # the CMOS byte holding the century (IBM PC convention)
# Fixed feature flags (section 5.2.9).
FADT_F_WBINVD = 1 << 0
FADT_F_PROC_C1 = 1 << 2
FADT_F_PWR_BUTTON = 1 << 4  # set: no fixed-feature power button
FADT_F_SLP_BUTTON = 1 << 5  # set: no fixed-feature sleep button
FADT_F_TMR_VAL_EXT = 1 << 8  # set: the PM timer is 32 bits wide
FADT_F_RESET_REG_SUP = 1 << 10  # clear: no reset register
FADT_F_FORCE_APIC_CLUSTER_MODEL = 1 << 18
FADT_F_HW_REDUCED_ACPI = 1 << 20  # clear: the fixed hardware above exists
FLAT_LOGICAL_MAX_CPUS = 8  # xAPIC flat logical destination mode reaches 8 CPUs
# IA-PC boot architecture flags (section 5.2.9.3).
IAPC_BOOT_ARCH_LEGACY_DEVICES = 1 << 0
IAPC_BOOT_ARCH_8042 = 1 << 1
IAPC_BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
IAPC_BOOT_ARCH = IAPC_BOOT_ARCH_LEGACY_DEVICES | IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT
# The FADT after its header, field by field (section 5.2.9).  Byte offsets of the table are
# 36 + the offset in this format.
FADT_BODY = struct.Struct(
    "<"
    "II"  # 36 FIRMWARE_CTRL, 40 DSDT
    "BBH"  # 44 reserved (INT_MODEL in ACPI 1.0), 45 Preferred_PM_Profile, 46 SCI_INT
    "I"  # 48 SMI_CMD
    "BBBB"  # 52 ACPI_ENABLE, 53 ACPI_DISABLE, 54 S4BIOS_REQ, 55 PSTATE_CNT
    "IIIIII"  # 56 PM1a_EVT_BLK, PM1b_EVT_BLK, PM1a_CNT_BLK, PM1b_CNT_BLK, PM2_CNT_BLK, PM_TMR_BLK
    "II"  # 80 GPE0_BLK, 84 GPE1_BLK
    "BBBBBBBB"  # 88 PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN, GPE0/1_BLK_LEN, GPE1_BASE, CST_CNT
    "HHHH"  # 96 P_LVL2_LAT, P_LVL3_LAT, FLUSH_SIZE, FLUSH_STRIDE
    "BBBBB"  # 104 DUTY_OFFSET, DUTY_WIDTH, DAY_ALRM, MON_ALRM, CENTURY
    "HB"  # 109 IAPC_BOOT_ARCH, 111 reserved
    "I"  # 112 Flags
    "12sB"  # 116 RESET_REG, 128 RESET_VALUE
    "HB"  # 129 ARM_BOOT_ARCH, 131 FADT Minor Version
    "QQ"  # 132 X_FIRMWARE_CTRL, 140 X_DSDT
    "12s12s12s12s"  # 148 X_PM1a_EVT_BLK, X_PM1b_EVT_BLK, X_PM1a_CNT_BLK, X_PM1b_CNT_BLK
    "12s12s12s12s"  # 196 X_PM2_CNT_BLK, X_PM_TMR_BLK, X_GPE0_BLK, X_GPE1_BLK
    "12s12s"  # 244 SLEEP_CONTROL_REG, SLEEP_STATUS_REG
    "8s"  # 268 Hypervisor Vendor Identity
)
NO_GAS = bytes(GAS.size)


@dataclass(frozen=True)
class AcpiTables:
    """The ACPI tables of one machine, as one blob to write at ``base``.

    ``base`` is the RSDP's address; ``tables`` maps each signature (``"RSD PTR "``
    for the RSDP, ``"FACP"`` for the FADT, ``"APIC"`` for the MADT, ...) to the
    guest-physical address of that structure.
    """

    base: int
    blob: bytes
    tables: dict[str, int] = field(hash=False)

    @property
    def rsdp(self) -> bytes:
        """The RSDP's bytes (the start of the blob)."""
        return self.blob[: RSDP.size]


def build_acpi_tables(cpus: int, base: int = layout.ACPI_START, pm_base: int = ACPI_PM_BASE) -> AcpiTables:
    """The RSDP, RSDT, XSDT, FADT, FACS, MADT and DSDT of a machine with ``cpus`` vCPUs.

    Raises :class:`ConfigError` when ``cpus`` is not 1 to :data:`MAX_CPUS`, when
    ``base`` is not 16-byte aligned (section 5.2.5.1), or when the tables do not fit
    in ``[layout.ACPI_START, layout.ACPI_END)`` from ``base``.
    """
    _check_cpus(cpus)
    if base % TABLE_ALIGN or not layout.ACPI_START <= base < layout.ACPI_END:
        raise ConfigError(
            f"ACPI tables at {base:#x}: the RSDP must sit on a 16-byte boundary in "
            f"[{layout.ACPI_START:#x}, {layout.ACPI_END:#x})"
        )
    builder = _Builder(base)
    builder.place(bytes(RSDP.size), TABLE_ALIGN)  # filled in last, once the RSDT/XSDT are placed
    dsdt = builder.place(_sdt(b"DSDT", DSDT_REVISION, DSDT_AML), TABLE_ALIGN)
    facs = builder.place(_facs(), FACS_ALIGN)
    madt = builder.place(_madt(cpus), TABLE_ALIGN)
    fadt = builder.place(_fadt(cpus, dsdt=dsdt, facs=facs, pm_base=pm_base), TABLE_ALIGN)
    rsdt = builder.place(_sdt(b"RSDT", RSDT_REVISION, struct.pack("<2I", fadt, madt)), TABLE_ALIGN)
    xsdt = builder.place(_sdt(b"XSDT", XSDT_REVISION, struct.pack("<2Q", fadt, madt)), TABLE_ALIGN)
    builder.put(base, _rsdp(rsdt, xsdt))
    blob = builder.finish()
    if base + len(blob) > layout.ACPI_END:
        raise ConfigError(
            f"ACPI tables for {cpus} vCPUs need {len(blob)} bytes from {base:#x}, "
            f"past the end of their area at {layout.ACPI_END:#x}"
        )
    tables = {"RSD PTR ": base, "DSDT": dsdt, "FACS": facs, "APIC": madt, "FACP": fadt, "RSDT": rsdt, "XSDT": xsdt}
    return AcpiTables(base=base, blob=blob, tables=tables)


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` plus itself sum to 0 modulo 256 (section 5.2.6)."""
    return -sum(data) & 0xFF


def _check_cpus(cpus: int) -> None:
    if not 1 <= cpus <= MAX_CPUS:
        raise ConfigError(
            f"{cpus} vCPUs: the MADT describes 1 to {MAX_CPUS} (xAPIC IDs are 8 bits and the IOAPIC takes ID N)"
        )


class _Builder:
    """Lays structures out one after the other from ``base``, each aligned."""

    def __init__(self, base: int) -> None:
        self._base = base
        self._blob = bytearray()

    def place(self, data: bytes, align: int) -> int:
        """Append ``data`` at the next ``align``-byte boundary; return its address."""
        self._blob.extend(bytes(-(self._base + len(self._blob)) % align))
        address = self._base + len(self._blob)
        self._blob.extend(data)
        return address

    def put(self, address: int, data: bytes) -> None:
        """Overwrite the bytes at ``address`` (already placed) with ``data``."""
        offset = address - self._base
        self._blob[offset : offset + len(data)] = data

    def finish(self) -> bytes:
        return bytes(self._blob)


def _sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A table: the System Description Table Header (section 5.2.6), ``body``, a right checksum."""
    length = SDT_HEADER.size + len(body)
    header = SDT_HEADER.pack(
        signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, OEM_REVISION, CREATOR_ID, CREATOR_REVISION
    )
    table = bytearray(header + body)
    table[SDT_CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


def _rsdp(rsdt: int, xsdt: int) -> bytes:
    """The Root System Description Pointer, revision 2 (section 5.2.5.3)."""
    rsdp = bytearray(RSDP.pack(RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION, rsdt, RSDP.size, xsdt, 0))
    rsdp[RSDP_CHECKSUM_OFFSET] = checksum(rsdp[:RSDP_V1_LENGTH])
    rsdp[RSDP_EXTENDED_CHECKSUM_OFFSET] = checksum(rsdp)
    return bytes(rsdp)


def _facs() -> bytes:
    """The Firmware ACPI Control Structure (section 5.2.10): no waking vector, lock free."""
    return FACS.pack(b"FACS", FACS.size, 0, 0, 0, 0, 0, FACS_VERSION, 0)


def _madt(cpus: int) -> bytes:
    """The Multiple APIC Description Table (section 5.2.12)."""
    entries = [_local_apic(cpu) for cpu in range(cpus)]
    entries.append(_io_apic(ioapic_id=cpus))
    entries.extend(_interrupt_source_override(*override) for override in INTERRUPT_SOURCE_OVERRIDES)
    entries.append(_local_apic_nmi())
    body = struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT) + b"".join(entries)
    return _sdt(b"APIC", MADT_REVISION, body)


def _local_apic(cpu: int) -> bytes:
    """Processor Local APIC structure (section 5.2.12.2): processor UID = APIC ID = ``cpu``."""
    return struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, LOCAL_APIC_ENABLED)


def _io_apic(ioapic_id: int) -> bytes:
    """I/O APIC structure (section 5.2.12.3)."""
    return struct.pack("<BBBBII", MADT_IO_APIC, 12, ioapic_id, 0, layout.IOAPIC_ADDR, IOAPIC_GSI_BASE)


def _interrupt_source_override(source: int, gsi: int, flags: int) -> bytes:
    """Interrupt Source Override structure (section 5.2.12.5), for an ISA IRQ."""
    return struct.pack("<BBBBIH", MADT_INTERRUPT_SOURCE_OVERRIDE, 10, ISA_BUS, source, gsi, flags)


def _local_apic_nmi() -> bytes:
    """Local APIC NMI structure (section 5.2.12.7): NMI on LINT1 of every processor."""
    return struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, MPS_INTI_CONFORMING, LINT1)


def _io_gas(address: int, length: int, access: int) -> bytes:
    """A Generic Address Structure (section 5.2.3.2) for ``length`` bytes of system I/O."""
    return GAS.pack(GAS_SYSTEM_IO, length * BITS_PER_BYTE, 0, access, address)


def _fadt_flags(cpus: int) -> int:
    flags = FADT_F_WBINVD | FADT_F_PROC_C1 | FADT_F_PWR_BUTTON | FADT_F_SLP_BUTTON | FADT_F_TMR_VAL_EXT
    if cpus > FLAT_LOGICAL_MAX_CPUS:  # as QEMU's PC does
        flags |= FADT_F_FORCE_APIC_CLUSTER_MODEL
    return flags


def _fadt(cpus: int, *, dsdt: int, facs: int, pm_base: int) -> bytes:
    """The Fixed ACPI Description Table, revision 6.3 (section 5.2.9)."""
    evt, cnt, tmr = pm_base + PM1A_EVT_OFFSET, pm_base + PM1A_CNT_OFFSET, pm_base + PM_TMR_OFFSET
    body = FADT_BODY.pack(
        facs, dsdt,
        0, PM_PROFILE_UNSPECIFIED, SCI_IRQ,
        0,  # SMI_CMD: no SMI port, the machine is always in ACPI mode
        0, 0, 0, 0,  # ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT
        evt, 0, cnt, 0, 0, tmr,
        0, 0,  # no general-purpose event blocks
        PM1_EVT_LEN, PM1_CNT_LEN, 0, PM_TMR_LEN, 0, 0, 0, 0,
        P_LVL2_LAT_NO_C2, P_LVL3_LAT_NO_C3, 0, 0,
        0, 0, 0, 0, RTC_CENTURY_INDEX,
        IAPC_BOOT_ARCH, 0,
        _fadt_flags(cpus),
        NO_GAS, 0,  # RESET_REG, RESET_VALUE: none
        0, FADT_MINOR_REVISION,
        facs, dsdt,
        _io_gas(evt, PM1_EVT_LEN, GAS_ACCESS_WORD), NO_GAS,
        _io_gas(cnt, PM1_CNT_LEN, GAS_ACCESS_WORD), NO_GAS,
        NO_GAS, _io_gas(tmr, PM_TMR_LEN, GAS_ACCESS_DWORD), NO_GAS, NO_GAS,
        NO_GAS, NO_GAS,  # sleep control/status registers: hardware-reduced only
        HYPERVISOR_VENDOR_ID,
    )  # fmt: skip
    return _sdt(b"FACP", FADT_REVISION, body)
