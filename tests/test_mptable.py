"""The MP tables, parsed back as an OS finds them (Intel MultiProcessor Specification 1.4)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest

from pykvm.errors import ConfigError
from pykvm.x86 import layout
from pykvm.x86.mptable import build_mptable

CPU_COUNTS = (1, 2, 4, 64)
# Entry types and their lengths (section 4.3, table 4-3).
PROCESSOR, BUS, IOAPIC, IO_INTERRUPT, LOCAL_INTERRUPT = 0, 1, 2, 3, 4
ENTRY_LENGTH = {PROCESSOR: 20, BUS: 8, IOAPIC: 8, IO_INTERRUPT: 8, LOCAL_INTERRUPT: 8}
INT, NMI, EXTINT = 0, 1, 3
CPU_EN, CPU_BP = 1, 2


@dataclass
class MpTable:
    config_address: int
    spec_rev: int
    features: bytes
    oem_id: bytes = b""
    product_id: bytes = b""
    local_apic_address: int = 0
    entry_count: int = 0
    types: list[int] = field(default_factory=list)
    processors: list[tuple[int, int, int, int, int]] = field(default_factory=list)  # id, ver, flags, sig, features
    buses: list[tuple[int, bytes]] = field(default_factory=list)
    ioapics: list[tuple[int, int, int, int]] = field(default_factory=list)  # id, version, flags, address
    io_interrupts: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    local_interrupts: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)


def parse(blob: bytes, base: int = layout.MPTABLE_START) -> MpTable:
    """Find and check the floating pointer (section 4.1) and the configuration table (4.2, 4.3)."""
    mpf = blob[:16]
    assert mpf[:4] == b"_MP_" and sum(mpf) % 256 == 0
    config_address, length, spec_rev, _, features = struct.unpack("<4xIBBB5s", mpf)
    assert length == 1
    mp = MpTable(config_address, spec_rev, features)
    config = blob[config_address - base :]
    assert config[:4] == b"PCMP"
    base_length, config_rev = struct.unpack_from("<HB", config, 4)
    config = config[:base_length]
    assert sum(config) % 256 == 0, "configuration table checksum"
    assert config_rev == 4
    mp.oem_id, mp.product_id, _, _, mp.entry_count, mp.local_apic_address = struct.unpack_from("<8s12sIHHI", config, 8)
    assert struct.unpack_from("<HB", config, 40) == (0, 0)  # no extended table
    _parse_entries(mp, config[44:])
    return mp


def _parse_entries(mp: MpTable, entries: bytes) -> None:
    offset = 0
    while offset < len(entries):
        kind = entries[offset]
        entry = entries[offset : offset + ENTRY_LENGTH[kind]]
        mp.types.append(kind)
        if kind == PROCESSOR:
            mp.processors.append(struct.unpack("<xBBBII8x", entry))
        elif kind == BUS:
            mp.buses.append(struct.unpack("<xB6s", entry))
        elif kind == IOAPIC:
            mp.ioapics.append(struct.unpack("<xBBBI", entry))
        elif kind == IO_INTERRUPT:
            mp.io_interrupts.append(struct.unpack("<xBHBBBB", entry))
        else:
            mp.local_interrupts.append(struct.unpack("<xBHBBBB", entry))
        offset += len(entry)
    assert offset == len(entries)


@pytest.fixture(params=CPU_COUNTS, ids=lambda n: f"{n}cpu")
def mp(request: pytest.FixtureRequest) -> MpTable:
    return parse(build_mptable(request.param))


def test_floating_pointer_points_right_after_itself(mp: MpTable) -> None:
    assert mp.config_address == layout.MPTABLE_START + 16
    assert mp.spec_rev == 4
    assert mp.features == bytes(5)  # a configuration table is present; virtual wire mode


def test_header(mp: MpTable) -> None:
    assert mp.oem_id.rstrip() == b"PYKVM"
    assert len(mp.product_id) == 12 and mp.product_id.strip()
    assert mp.local_apic_address == layout.LAPIC_ADDR
    assert mp.entry_count == len(mp.types)


def test_entries_are_sorted_by_type(mp: MpTable) -> None:
    assert mp.types == sorted(mp.types)


def test_one_enabled_processor_per_cpu_and_only_apic_0_is_the_bsp(mp: MpTable) -> None:
    cpus = len(mp.processors)
    assert cpus in CPU_COUNTS
    assert [p[0] for p in mp.processors] == list(range(cpus))
    assert all(flags & CPU_EN for _, _, flags, _, _ in mp.processors)
    assert [bool(flags & CPU_BP) for _, _, flags, _, _ in mp.processors] == [True] + [False] * (cpus - 1)
    assert all(version == 0x14 and signature and features for _, version, _, signature, features in mp.processors)


def test_one_isa_bus(mp: MpTable) -> None:
    assert mp.buses == [(0, b"ISA   ")]


def test_io_apic(mp: MpTable) -> None:
    assert mp.ioapics == [(len(mp.processors), 0x11, 1, layout.IOAPIC_ADDR)]


def test_isa_irqs_route_as_qemu_does(mp: MpTable) -> None:
    ioapic_id = len(mp.processors)
    routes = {irq: intin for kind, flags, bus, irq, dest, intin in mp.io_interrupts}
    assert routes == {0: 2, **{irq: irq for irq in range(1, 16) if irq != 2}}
    assert len(mp.io_interrupts) == 15
    assert all(entry[:3] == (INT, 0, 0) and entry[4] == ioapic_id for entry in mp.io_interrupts)


def test_local_interrupts_extint_on_bsp_lint0_and_nmi_on_every_lint1(mp: MpTable) -> None:
    assert mp.local_interrupts == [(EXTINT, 0, 0, 0, 0, 0), (NMI, 0, 0, 0, 0xFF, 1)]


@pytest.mark.parametrize("cpus", CPU_COUNTS)
def test_size(cpus: int) -> None:
    assert len(build_mptable(cpus)) == 16 + 44 + 20 * cpus + 8 + 8 + 15 * 8 + 2 * 8


def test_another_base() -> None:
    base = layout.MPTABLE_START + 0x100
    mp = parse(build_mptable(2, base=base), base=base)
    assert mp.config_address == base + 16


# --- errors -------------------------------------------------------------------------------------


def test_the_most_cpus_that_fit_and_one_more() -> None:
    most = (layout.MPTABLE_END - layout.MPTABLE_START - (16 + 44 + 8 + 8 + 15 * 8 + 2 * 8)) // 20
    assert len(parse(build_mptable(most)).processors) == most
    with pytest.raises(ConfigError, match="past the end"):
        build_mptable(most + 1)


@pytest.mark.parametrize("cpus", [0, -1, 255])
def test_cpu_count_out_of_range_is_a_config_error(cpus: int) -> None:
    with pytest.raises(ConfigError, match="vCPUs"):
        build_mptable(cpus)


@pytest.mark.parametrize("base", [layout.MPTABLE_START + 4, layout.MPTABLE_START - 16, layout.MPTABLE_END])
def test_misplaced_base_is_a_config_error(base: int) -> None:
    with pytest.raises(ConfigError, match="16-byte boundary"):
        build_mptable(1, base=base)
