"""An OS's view of ACPI tables: parsers written from the ACPI 6.3 text, independent of the builder.

Every parser checks what an OS checks (signature, length, checksum) and raises
AssertionError when something is off, so tests can simply call them.  Offsets are
the specification's, spelled out here on purpose rather than imported.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pykvm.x86.acpi import AcpiTables


@dataclass(frozen=True)
class Rsdp:
    oem_id: bytes
    revision: int
    rsdt: int
    length: int
    xsdt: int


@dataclass(frozen=True)
class Header:
    signature: bytes
    length: int
    revision: int
    oem_id: bytes
    oem_table_id: bytes


@dataclass(frozen=True)
class Gas:
    space: int
    bit_width: int
    bit_offset: int
    access_size: int
    address: int


@dataclass(frozen=True)
class Madt:
    local_apic_address: int
    flags: int
    local_apics: list[tuple[int, int, int]]  # (processor UID, APIC ID, flags)
    io_apics: list[tuple[int, int, int]]  # (ID, address, GSI base)
    overrides: list[tuple[int, int, int, int]]  # (bus, source, GSI, flags)
    nmis: list[tuple[int, int, int]]  # (processor UID, flags, LINT#)
    other: list[int]  # types of any other entry


def memory(tables: AcpiTables, address: int, length: int) -> bytes:
    """``length`` bytes of guest memory at ``address``, as if the blob were written at its base."""
    offset = address - tables.base
    assert offset >= 0 and offset + length <= len(tables.blob), f"{address:#x}+{length} is outside the blob"
    return tables.blob[offset : offset + length]


def parse_rsdp(tables: AcpiTables, address: int) -> Rsdp:
    """Section 5.2.5.3: a revision 2 RSDP with both checksums right."""
    raw = memory(tables, address, 36)
    assert raw[:8] == b"RSD PTR "
    assert sum(raw[:20]) % 256 == 0, "RSDP checksum (first 20 bytes)"
    assert sum(raw) % 256 == 0, "RSDP extended checksum"
    _, _, oem_id, revision, rsdt, length, xsdt, _ = struct.unpack("<8sB6sBIIQB3x", raw)
    assert length == 36
    return Rsdp(oem_id, revision, rsdt, length, xsdt)


def table(tables: AcpiTables, address: int) -> tuple[Header, bytes]:
    """The table at ``address``: its header (section 5.2.6) and its whole bytes; checksum checked."""
    signature, length = struct.unpack("<4sI", memory(tables, address, 8))
    assert length >= 36, f"{signature!r}: length {length}"
    raw = memory(tables, address, length)
    assert sum(raw) % 256 == 0, f"{signature!r}: checksum"
    revision, oem_id, oem_table_id = raw[8], raw[10:16], raw[16:24]
    return Header(signature, length, revision, oem_id, oem_table_id), raw


def table_pointers(tables: AcpiTables, address: int, signature: bytes, width: int) -> list[int]:
    """The entries of the RSDT (``width`` 4) or XSDT (``width`` 8) at ``address``."""
    header, raw = table(tables, address)
    assert header.signature == signature
    body = raw[36:]
    assert len(body) % width == 0
    return [int.from_bytes(body[i : i + width], "little") for i in range(0, len(body), width)]


def parse_gas(raw: bytes) -> Gas:
    """Section 5.2.3.2: a 12-byte Generic Address Structure."""
    return Gas(*struct.unpack("<BBBBQ", raw))


def fadt_field(raw: bytes, offset: int, size: int) -> int:
    """An integer field of the FADT at its offset in section 5.2.9."""
    return int.from_bytes(raw[offset : offset + size], "little")


def fadt_gas(raw: bytes, offset: int) -> Gas:
    return parse_gas(raw[offset : offset + 12])


def parse_madt(raw: bytes) -> Madt:
    """Section 5.2.12: the MADT's fields and every interrupt controller structure."""
    local_apic_address, flags = struct.unpack_from("<II", raw, 36)
    madt = Madt(local_apic_address, flags, [], [], [], [], [])
    offset = 44
    while offset < len(raw):
        kind, length = raw[offset], raw[offset + 1]
        assert length >= 2 and offset + length <= len(raw), f"MADT entry at {offset}: length {length}"
        entry = raw[offset : offset + length]
        _madt_entry(madt, kind, entry)
        offset += length
    assert offset == len(raw)
    return madt


def _madt_entry(madt: Madt, kind: int, entry: bytes) -> None:
    if kind == 0:
        assert len(entry) == 8
        madt.local_apics.append(struct.unpack("<xxBBI", entry))
    elif kind == 1:
        assert len(entry) == 12
        ioapic_id, address, gsi_base = struct.unpack("<xxBxII", entry)
        madt.io_apics.append((ioapic_id, address, gsi_base))
    elif kind == 2:
        assert len(entry) == 10
        madt.overrides.append(struct.unpack("<xxBBIH", entry))
    elif kind == 4:
        assert len(entry) == 6
        madt.nmis.append(struct.unpack("<xxBHB", entry))
    else:
        madt.other.append(kind)


def aml_package_names(aml: bytes) -> dict[bytes, list[int]]:
    """Decode a sequence of ``Name (NAME, Package () {integers})`` (ACPI 6.3 section 20.2) from ``aml``.

    Only what a sleep-state package uses: NameOp, an optionally rooted NameSeg,
    PackageOp with a one-byte PkgLength, and ZeroOp / OneOp / BytePrefix elements.
    """
    names: dict[bytes, list[int]] = {}
    position = 0
    while position < len(aml):
        assert aml[position] == 0x08, "NameOp"
        position += 1
        root = aml[position] == 0x5C
        position += root
        name = (b"\\" if root else b"") + aml[position : position + 4]
        position += 4
        assert aml[position] == 0x12, "PackageOp"
        package_length = aml[position + 1]
        assert package_length < 0x40, "one-byte PkgLength"
        end = position + 1 + package_length
        assert end <= len(aml), "the package ends inside the AML"
        count = aml[position + 2]
        position += 3
        elements = []
        while position < end:
            opcode = aml[position]
            if opcode in (0x00, 0x01):  # ZeroOp, OneOp
                elements.append(opcode)
                position += 1
            else:
                assert opcode == 0x0A, f"BytePrefix expected, got {opcode:#x}"
                elements.append(aml[position + 1])
                position += 2
        assert position == end, "the elements fill the package"
        assert len(elements) == count
        assert name not in names, f"{name!r} named twice"
        names[name] = elements
    return names
