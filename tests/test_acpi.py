"""The ACPI tables, parsed back the way an OS would find them (ACPI 6.3 chapter 5)."""

from __future__ import annotations

import itertools

import pytest

from pykvm.errors import ConfigError
from pykvm.x86 import layout
from pykvm.x86.acpi import ACPI_PM_BASE, AcpiTables, build_acpi_tables
from tests.acpi_parse import (
    aml_package_names,
    fadt_field,
    fadt_gas,
    parse_madt,
    parse_rsdp,
    table,
    table_pointers,
)

CPU_COUNTS = (1, 2, 4, 64)
SYSTEM_IO = 1
# FADT offsets (section 5.2.9).
FIRMWARE_CTRL, DSDT, SCI_INT, SMI_CMD, ACPI_ENABLE, ACPI_DISABLE = 36, 40, 46, 48, 52, 53
PM1A_EVT_BLK, PM1B_EVT_BLK, PM1A_CNT_BLK, PM1B_CNT_BLK, PM2_CNT_BLK, PM_TMR_BLK = 56, 60, 64, 68, 72, 76
GPE0_BLK, GPE1_BLK = 80, 84
PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN, GPE0_BLK_LEN, GPE1_BLK_LEN = 88, 89, 90, 91, 92, 93
CENTURY, IAPC_BOOT_ARCH, FLAGS, RESET_REG, RESET_VALUE, MINOR_VERSION = 108, 109, 112, 116, 128, 131
X_FIRMWARE_CTRL, X_DSDT = 132, 140
X_PM1A_EVT_BLK, X_PM1B_EVT_BLK, X_PM1A_CNT_BLK, X_PM1B_CNT_BLK = 148, 160, 172, 184
X_PM2_CNT_BLK, X_PM_TMR_BLK = 196, 208
X_GPE0_BLK, X_GPE1_BLK, SLEEP_CONTROL_REG, SLEEP_STATUS_REG = 220, 232, 244, 256
# FADT flags (section 5.2.9).
WBINVD, PROC_C1, TMR_VAL_EXT, RESET_REG_SUP = 1 << 0, 1 << 2, 1 << 8, 1 << 10
FORCE_APIC_CLUSTER_MODEL, HW_REDUCED_ACPI = 1 << 18, 1 << 20
LEGACY_DEVICES, I8042 = 1 << 0, 1 << 1


@pytest.fixture(params=CPU_COUNTS, ids=lambda n: f"{n}cpu")
def acpi(request: pytest.FixtureRequest) -> AcpiTables:
    return build_acpi_tables(request.param)


def cpus_of(acpi: AcpiTables) -> int:
    return len(parse_madt(table(acpi, acpi.tables["APIC"])[1]).local_apics)


def fadt(acpi: AcpiTables) -> bytes:
    rsdp = parse_rsdp(acpi, acpi.base)
    (fadt_address,) = [a for a in table_pointers(acpi, rsdp.xsdt, b"XSDT", 8) if table(acpi, a)[0].signature == b"FACP"]
    return table(acpi, fadt_address)[1]


# --- placement ------------------------------------------------------------------------------


def test_blob_is_placed_at_the_default_base_inside_the_acpi_area(acpi: AcpiTables) -> None:
    assert acpi.base == layout.ACPI_START == acpi.tables["RSD PTR "]
    assert acpi.base >= layout.ACPI_START and acpi.base + len(acpi.blob) <= layout.ACPI_END


def length_of(acpi: AcpiTables, signature: str) -> int:
    """The length of a structure: the RSDP is 36 bytes, the FACS (no checksum) says its own."""
    address = acpi.tables[signature]
    if signature == "RSD PTR ":
        return 36
    if signature == "FACS":
        return int.from_bytes(acpi.blob[address - acpi.base + 4 :][:4], "little")
    return table(acpi, address)[0].length


def test_tables_are_aligned_and_do_not_overlap(acpi: AcpiTables) -> None:
    spans = sorted(
        (address, address + length_of(acpi, signature), signature) for signature, address in acpi.tables.items()
    )
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        assert end <= start, f"{first} overlaps {second}"
    assert all(address % 16 == 0 for address, _, _ in spans)
    assert acpi.tables["FACS"] % 64 == 0
    assert spans[-1][1] == acpi.base + len(acpi.blob)


def test_tables_dict_names_every_structure(acpi: AcpiTables) -> None:
    assert set(acpi.tables) == {"RSD PTR ", "RSDT", "XSDT", "FACP", "APIC", "DSDT", "FACS"}
    for signature, address in acpi.tables.items():
        if signature not in ("RSD PTR ", "FACS"):  # the two structures that are not tables
            assert table(acpi, address)[0].signature == signature.encode()


def test_same_input_gives_the_same_bytes() -> None:
    assert build_acpi_tables(4) == build_acpi_tables(4)


# --- RSDP, RSDT, XSDT ---------------------------------------------------------------------------


def test_rsdp_is_revision_2_with_both_checksums(acpi: AcpiTables) -> None:
    rsdp = parse_rsdp(acpi, acpi.base)
    assert rsdp.oem_id == b"PYKVM "
    assert rsdp.revision == 2
    assert (rsdp.rsdt, rsdp.xsdt) == (acpi.tables["RSDT"], acpi.tables["XSDT"])
    assert acpi.rsdp == acpi.blob[:36]


def test_rsdp_is_found_by_a_scan_of_16_byte_boundaries(acpi: AcpiTables) -> None:
    # Section 5.2.5.1: OSPM scans the BIOS area for "RSD PTR " on 16-byte boundaries.
    found = [
        acpi.base + offset
        for offset in range(0, len(acpi.blob), 16)
        if acpi.blob[offset : offset + 8] == b"RSD PTR " and sum(acpi.blob[offset : offset + 20]) % 256 == 0
    ]
    assert found == [acpi.base]


@pytest.mark.parametrize(("signature", "width"), [(b"RSDT", 4), (b"XSDT", 8)])
def test_rsdt_and_xsdt_list_the_fadt_and_the_madt(acpi: AcpiTables, signature: bytes, width: int) -> None:
    header, _ = table(acpi, acpi.tables[signature.decode()])
    assert header.revision == 1
    assert header.oem_id == b"PYKVM "
    pointers = table_pointers(acpi, acpi.tables[signature.decode()], signature, width)
    assert pointers == [acpi.tables["FACP"], acpi.tables["APIC"]]
    assert [table(acpi, p)[0].signature for p in pointers] == [b"FACP", b"APIC"]


# --- FADT ---------------------------------------------------------------------------------------


def test_fadt_is_revision_6_of_the_acpi_6_length(acpi: AcpiTables) -> None:
    header, raw = table(acpi, acpi.tables["FACP"])
    assert (header.length, header.revision, raw[MINOR_VERSION]) == (276, 6, 3)


def test_fadt_points_at_the_dsdt_and_the_facs_both_ways(acpi: AcpiTables) -> None:
    raw = fadt(acpi)
    assert fadt_field(raw, DSDT, 4) == fadt_field(raw, X_DSDT, 8) == acpi.tables["DSDT"]
    assert fadt_field(raw, FIRMWARE_CTRL, 4) == fadt_field(raw, X_FIRMWARE_CTRL, 8) == acpi.tables["FACS"]
    assert table(acpi, acpi.tables["DSDT"])[0].signature == b"DSDT"


def test_facs_is_64_bytes_with_no_waking_vector_and_a_free_lock(acpi: AcpiTables) -> None:
    raw = acpi.blob[acpi.tables["FACS"] - acpi.base :][:64]
    assert raw[:4] == b"FACS"
    assert int.from_bytes(raw[4:8], "little") == 64
    assert raw[8:32] == bytes(24)  # hardware signature, waking vector, global lock, flags
    assert raw[32] == 2  # version


def test_fadt_sci_and_acpi_mode(acpi: AcpiTables) -> None:
    raw = fadt(acpi)
    assert fadt_field(raw, SCI_INT, 2) == 9
    assert fadt_field(raw, SMI_CMD, 4) == 0
    assert (raw[ACPI_ENABLE], raw[ACPI_DISABLE]) == (0, 0)


def test_fadt_pm_blocks_and_their_x_generic_addresses(acpi: AcpiTables) -> None:
    raw = fadt(acpi)
    blocks = {
        (PM1A_EVT_BLK, PM1_EVT_LEN, X_PM1A_EVT_BLK): (ACPI_PM_BASE, 4),
        (PM1A_CNT_BLK, PM1_CNT_LEN, X_PM1A_CNT_BLK): (ACPI_PM_BASE + 4, 2),
        (PM_TMR_BLK, PM_TMR_LEN, X_PM_TMR_BLK): (ACPI_PM_BASE + 8, 4),
    }
    for (block, length, x_block), (address, size) in blocks.items():
        assert fadt_field(raw, block, 4) == address
        assert raw[length] == size
        gas = fadt_gas(raw, x_block)
        assert (gas.space, gas.bit_width, gas.bit_offset, gas.address) == (SYSTEM_IO, size * 8, 0, address)
        assert gas.access_size in (2, 3)


def test_fadt_absent_blocks_are_zero(acpi: AcpiTables) -> None:
    raw = fadt(acpi)
    for offset in (PM1B_EVT_BLK, PM1B_CNT_BLK, PM2_CNT_BLK, GPE0_BLK, GPE1_BLK):
        assert fadt_field(raw, offset, 4) == 0
    assert (raw[PM2_CNT_LEN], raw[GPE0_BLK_LEN], raw[GPE1_BLK_LEN]) == (0, 0, 0)
    for offset in (X_PM1B_EVT_BLK, X_PM1B_CNT_BLK, X_PM2_CNT_BLK, X_GPE0_BLK, X_GPE1_BLK, SLEEP_CONTROL_REG):
        assert raw[offset : offset + 12] == bytes(12)
    assert raw[SLEEP_STATUS_REG : SLEEP_STATUS_REG + 12] == bytes(12)


def test_fadt_flags(acpi: AcpiTables) -> None:
    flags = fadt_field(fadt(acpi), FLAGS, 4)
    assert flags & WBINVD and flags & PROC_C1
    assert flags & TMR_VAL_EXT  # 32-bit PM timer, as pykvm.devices.acpi_pm counts
    assert not flags & RESET_REG_SUP
    assert not flags & HW_REDUCED_ACPI
    assert bool(flags & FORCE_APIC_CLUSTER_MODEL) == (cpus_of(acpi) > 8)


def test_fadt_has_no_reset_register(acpi: AcpiTables) -> None:
    raw = fadt(acpi)
    assert raw[RESET_REG : RESET_REG + 12] == bytes(12)
    assert raw[RESET_VALUE] == 0


def test_fadt_boot_architecture_and_rtc_century(acpi: AcpiTables) -> None:
    raw = fadt(acpi)
    boot_arch = fadt_field(raw, IAPC_BOOT_ARCH, 2)
    assert boot_arch & LEGACY_DEVICES and boot_arch & I8042
    assert raw[CENTURY] == 0x32


def test_pm_base_moves_every_pm_block() -> None:
    raw = fadt(build_acpi_tables(1, pm_base=0xB000))
    assert [fadt_field(raw, offset, 4) for offset in (PM1A_EVT_BLK, PM1A_CNT_BLK, PM_TMR_BLK)] == [
        0xB000,
        0xB004,
        0xB008,
    ]
    assert fadt_gas(raw, X_PM_TMR_BLK).address == 0xB008


# --- MADT ---------------------------------------------------------------------------------------


def test_madt_header(acpi: AcpiTables) -> None:
    header, raw = table(acpi, acpi.tables["APIC"])
    assert header.revision >= 1
    madt = parse_madt(raw)
    assert madt.local_apic_address == layout.LAPIC_ADDR
    assert madt.flags == 1  # PCAT_COMPAT
    assert madt.other == []


def test_madt_has_one_enabled_local_apic_per_cpu(acpi: AcpiTables) -> None:
    madt = parse_madt(table(acpi, acpi.tables["APIC"])[1])
    cpus = len(madt.local_apics)
    assert cpus in CPU_COUNTS
    assert madt.local_apics == [(n, n, 1) for n in range(cpus)]


def test_madt_io_apic(acpi: AcpiTables) -> None:
    madt = parse_madt(table(acpi, acpi.tables["APIC"])[1])
    assert madt.io_apics == [(len(madt.local_apics), layout.IOAPIC_ADDR, 0)]


def test_madt_interrupt_source_overrides(acpi: AcpiTables) -> None:
    madt = parse_madt(table(acpi, acpi.tables["APIC"])[1])
    assert sorted(madt.overrides) == [(0, 0, 2, 0x0000), (0, 9, 9, 0x000D)]


def test_madt_local_apic_nmi_on_lint1_of_every_processor(acpi: AcpiTables) -> None:
    madt = parse_madt(table(acpi, acpi.tables["APIC"])[1])
    assert madt.nmis == [(0xFF, 0, 1)]


@pytest.mark.parametrize("cpus", CPU_COUNTS)
def test_madt_size(cpus: int) -> None:
    acpi = build_acpi_tables(cpus)
    assert table(acpi, acpi.tables["APIC"])[0].length == 44 + 8 * cpus + 12 + 2 * 10 + 6


# --- DSDT ---------------------------------------------------------------------------------------


def test_dsdt_defines_s3_as_package_1_1_0_0_and_s5_as_package_5_5_0_0(acpi: AcpiTables) -> None:
    header, raw = table(acpi, acpi.tables["DSDT"])
    assert header.revision >= 2
    assert raw[36:] == bytes.fromhex("08 5C 5F53335F 12 08 04 0A01 0A01 00 00  08 5C 5F53355F 12 08 04 0A05 0A05 00 00")
    assert aml_package_names(raw[36:]) == {b"\\_S3_": [1, 1, 0, 0], b"\\_S5_": [5, 5, 0, 0]}


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cpus", [0, -1, 255, 1000])
def test_cpu_count_out_of_range_is_a_config_error(cpus: int) -> None:
    with pytest.raises(ConfigError, match="vCPUs"):
        build_acpi_tables(cpus)


def test_254_cpus_is_the_most_and_fits() -> None:
    acpi = build_acpi_tables(254)
    madt = parse_madt(table(acpi, acpi.tables["APIC"])[1])
    assert len(madt.local_apics) == 254 and madt.io_apics[0][0] == 254


@pytest.mark.parametrize("base", [layout.ACPI_START + 8, layout.ACPI_START - 16, layout.ACPI_END])
def test_misplaced_base_is_a_config_error(base: int) -> None:
    with pytest.raises(ConfigError, match="16-byte boundary"):
        build_acpi_tables(1, base=base)


def test_tables_that_run_past_the_area_are_a_config_error() -> None:
    def fits(base: int) -> bool:  # the FACS's 64-byte alignment makes the blob's length depend on the base
        return base + len(build_acpi_tables(64, base=layout.ACPI_START + base % 64).blob) <= layout.ACPI_END

    last_fitting_base = next(base for base in range(layout.ACPI_END - 16, layout.ACPI_START, -16) if fits(base))
    build_acpi_tables(64, base=last_fitting_base)
    with pytest.raises(ConfigError, match="past the end"):
        build_acpi_tables(64, base=last_fitting_base + 16)


def test_tables_at_another_base_point_at_themselves() -> None:
    base = layout.ACPI_START + 0x1000
    acpi = build_acpi_tables(2, base=base)
    rsdp = parse_rsdp(acpi, base)
    assert table_pointers(acpi, rsdp.rsdt, b"RSDT", 4) == [acpi.tables["FACP"], acpi.tables["APIC"]]
    assert min(acpi.tables.values()) == base
