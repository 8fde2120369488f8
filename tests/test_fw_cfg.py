"""QEMU's fw_cfg, read through a port-I/O bus the way a guest's driver reads it."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from pykvm.devices.bus import Bus
from pykvm.devices.fw_cfg import (
    FW_CFG_ARCH_LOCAL,
    FW_CFG_CMDLINE_DATA,
    FW_CFG_CMDLINE_SIZE,
    FW_CFG_FILE_DIR,
    FW_CFG_FILE_FIRST,
    FW_CFG_FILE_SLOTS,
    FW_CFG_ID,
    FW_CFG_IO_BASE,
    FW_CFG_MAX_CPUS,
    FW_CFG_NB_CPUS,
    FW_CFG_NOGRAPHIC,
    FW_CFG_RAM_SIZE,
    FW_CFG_SIGNATURE,
    FW_CFG_WRITE_CHANNEL,
    FwCfg,
    standard_items,
)
from pykvm.errors import ConfigError, StateError
from pykvm.x86.acpi import AcpiTables, build_acpi_tables
from pykvm.x86.e820 import E820Entry, E820Type, build_memory_map

SELECTOR = FW_CFG_IO_BASE
DATA = FW_CFG_IO_BASE + 1
MIB = 1 << 20
GIB = 1 << 30
RAM_SIZE = 4 * GIB  # crosses the MMIO hole: the e820 map has RAM above 4 GiB
CMDLINE = "console=ttyS0 root=/dev/vda"


class Guest:
    """A guest's fw_cfg driver: 16-bit key to 0x510, then bytes from 0x511."""

    def __init__(self, fw_cfg: FwCfg) -> None:
        self.fw_cfg = fw_cfg
        self.bus = Bus("pio")
        self.bus.register(FW_CFG_IO_BASE, FwCfg.SIZE, fw_cfg)

    def select(self, key: int) -> None:
        self.bus.write(SELECTOR, 2, key)

    def read(self, length: int) -> bytes:
        return bytes(self.bus.read(DATA, 1) for _ in range(length))

    def item(self, key: int, length: int) -> bytes:
        self.select(key)
        return self.read(length)

    def u16(self, key: int) -> int:
        return int.from_bytes(self.item(key, 2), "little")

    def u32(self, key: int) -> int:
        return int.from_bytes(self.item(key, 4), "little")

    def u64(self, key: int) -> int:
        return int.from_bytes(self.item(key, 8), "little")

    def directory(self) -> dict[str, tuple[int, int]]:
        """name -> (select, size), in directory order (fw_cfg.rst: big-endian FWCfgFiles)."""
        self.select(FW_CFG_FILE_DIR)
        (count,) = struct.unpack(">I", self.read(4))
        files = {}
        for _ in range(count):
            size, select, _reserved, name = struct.unpack(">IHH56s", self.read(64))
            files[name.rstrip(b"\0").decode()] = (select, size)
        return files

    def file(self, name: str) -> bytes:
        select, size = self.directory()[name]
        return self.item(select, size)


@pytest.fixture(scope="module")
def acpi() -> AcpiTables:
    return build_acpi_tables(2)


@pytest.fixture
def guest(acpi: AcpiTables) -> Guest:
    fw_cfg = FwCfg()
    standard_items(
        fw_cfg,
        cpus=2,
        max_cpus=4,
        ram_size=RAM_SIZE,
        cmdline=CMDLINE,
        memory_map=build_memory_map(RAM_SIZE),
        acpi=acpi,
    )
    return Guest(fw_cfg)


# --- standard items -----------------------------------------------------------------------------


def test_signature(guest: Guest) -> None:
    assert guest.item(FW_CFG_SIGNATURE, 4) == b"QEMU"


def test_id_is_the_traditional_interface_only(guest: Guest) -> None:
    assert guest.u32(FW_CFG_ID) == 1


def test_cpu_counts_ram_size_and_nographic(guest: Guest) -> None:
    assert guest.u16(FW_CFG_NB_CPUS) == 2
    assert guest.u16(FW_CFG_MAX_CPUS) == 4
    assert guest.u64(FW_CFG_RAM_SIZE) == RAM_SIZE
    assert guest.u16(FW_CFG_NOGRAPHIC) == 1


def test_cmdline_size_counts_the_nul_and_data_ends_with_it(guest: Guest) -> None:
    size = guest.u32(FW_CFG_CMDLINE_SIZE)
    assert size == len(CMDLINE) + 1
    assert guest.item(FW_CFG_CMDLINE_DATA, size) == CMDLINE.encode() + b"\0"


def test_empty_cmdline_is_a_lone_nul() -> None:
    fw_cfg = FwCfg()
    standard_items(fw_cfg, cpus=1, max_cpus=1, ram_size=MIB, cmdline=b"", memory_map=(), acpi=None)
    assert Guest(fw_cfg).u32(FW_CFG_CMDLINE_SIZE) == 1
    assert Guest(fw_cfg).item(FW_CFG_CMDLINE_DATA, 2) == b"\0\0"


def test_directory_lists_the_files_sorted_by_name_from_key_0x20(guest: Guest, acpi: AcpiTables) -> None:
    directory = guest.directory()
    assert list(directory) == ["etc/acpi/rsdp", "etc/acpi/tables", "etc/e820"]
    assert [select for select, _ in directory.values()] == [0x20, 0x21, 0x22]
    assert directory["etc/acpi/rsdp"][1] == 36
    assert directory["etc/acpi/tables"][1] == len(acpi.blob)


def test_directory_is_big_endian(guest: Guest) -> None:
    raw = guest.item(FW_CFG_FILE_DIR, 4 + 64)
    assert raw[:4] == b"\0\0\0\3"
    assert raw[8:10] == b"\x00\x20"  # the first file's select, big-endian


def test_e820_file_reads_back_to_the_memory_map(guest: Guest) -> None:
    raw = guest.file("etc/e820")
    entries = [E820Entry(a, s, E820Type(t)) for a, s, t in struct.iter_unpack("<QQI", raw)]
    assert tuple(entries) == build_memory_map(RAM_SIZE)


def test_acpi_files_hold_the_rsdp_and_the_whole_blob(guest: Guest, acpi: AcpiTables) -> None:
    assert guest.file("etc/acpi/rsdp") == acpi.blob[:36]
    assert guest.file("etc/acpi/tables") == acpi.blob


def test_no_acpi_no_acpi_files() -> None:
    fw_cfg = FwCfg()
    standard_items(fw_cfg, cpus=1, max_cpus=1, ram_size=MIB, cmdline="", memory_map=(), acpi=None)
    assert list(Guest(fw_cfg).directory()) == ["etc/e820"]


@pytest.mark.parametrize(
    ("cpus", "max_cpus"), [(0, 1), (2, 1), (1, 0x10000)], ids=["no cpu", "max below count", "max too big"]
)
def test_bad_cpu_counts_are_config_errors(cpus: int, max_cpus: int) -> None:
    with pytest.raises(ConfigError):
        standard_items(FwCfg(), cpus=cpus, max_cpus=max_cpus, ram_size=MIB, cmdline="", memory_map=(), acpi=None)


def test_cmdline_with_a_nul_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="NUL"):
        standard_items(FwCfg(), cpus=1, max_cpus=1, ram_size=MIB, cmdline="a\0b", memory_map=(), acpi=None)


# --- the data port ------------------------------------------------------------------------------


def test_reading_past_the_end_reads_zeros(guest: Guest) -> None:
    assert guest.item(FW_CFG_SIGNATURE, 8) == b"QEMU\0\0\0\0"


@pytest.mark.parametrize("key", [0x02, 0x1A, 0x1F, 0x23, 0x3F, 0x40, 0x3FFF, FW_CFG_ARCH_LOCAL | 0x10, 0xFFFF])
def test_unknown_key_reads_zeros(guest: Guest, key: int) -> None:
    assert guest.item(key, 16) == bytes(16)


def test_reselecting_rewinds(guest: Guest) -> None:
    guest.select(FW_CFG_SIGNATURE)
    assert guest.read(2) == b"QE"
    guest.select(FW_CFG_SIGNATURE)
    assert guest.read(4) == b"QEMU"


def test_a_new_device_has_the_signature_selected() -> None:
    fw_cfg = FwCfg()
    fw_cfg.add_bytes(FW_CFG_SIGNATURE, b"QEMU")
    assert Guest(fw_cfg).read(4) == b"QEMU"


def test_write_channel_bit_is_ignored(guest: Guest) -> None:
    assert guest.item(FW_CFG_WRITE_CHANNEL | FW_CFG_SIGNATURE, 4) == b"QEMU"


def test_data_writes_are_ignored(guest: Guest) -> None:
    guest.select(FW_CFG_SIGNATURE)
    guest.bus.write(DATA, 1, 0x41)
    assert guest.read(4) == b"QEMU"
    assert guest.fw_cfg.stats["data_writes"] == 1


# --- wrong widths, as QEMU's fw_cfg_comb_mem_ops -------------------------------------------------


def test_byte_write_to_the_selector_is_ignored(guest: Guest) -> None:
    guest.select(FW_CFG_SIGNATURE)
    guest.bus.write(SELECTOR, 1, FW_CFG_NB_CPUS)
    assert guest.read(4) == b"QEMU"


def test_byte_read_of_the_selector_port_reads_data(guest: Guest) -> None:
    guest.select(FW_CFG_SIGNATURE)
    assert bytes(guest.bus.read(SELECTOR, 1) for _ in range(2)) + guest.read(2) == b"QEMU"


def test_dword_write_to_the_selector_is_refused(guest: Guest) -> None:
    guest.select(FW_CFG_SIGNATURE)
    guest.bus.write(SELECTOR, 4, FW_CFG_NB_CPUS)
    assert guest.read(4) == b"QEMU"
    assert guest.fw_cfg.stats["rejected_writes"] == 1


@pytest.mark.parametrize("size", [2, 4])
def test_wide_read_of_the_selector_reads_zero_and_consumes_nothing(guest: Guest, size: int) -> None:
    guest.select(FW_CFG_SIGNATURE)
    assert guest.bus.read(SELECTOR, size) == 0
    assert guest.read(4) == b"QEMU"
    assert guest.fw_cfg.stats["rejected_reads"] == 1


@pytest.mark.parametrize(("size", "high"), [(2, 0xFF00), (4, 0xFFFFFF00)])
def test_wide_read_of_the_data_port_reads_one_byte_then_open_bus(guest: Guest, size: int, high: int) -> None:
    guest.select(FW_CFG_SIGNATURE)
    assert guest.bus.read(DATA, size) == high | ord("Q")
    assert guest.read(3) == b"EMU"


def test_wide_write_to_the_data_port_selects_nothing(guest: Guest) -> None:
    guest.select(FW_CFG_SIGNATURE)
    guest.bus.write(DATA, 2, FW_CFG_NB_CPUS)
    assert guest.read(4) == b"QEMU"


# --- items and files ----------------------------------------------------------------------------


def test_integers_are_little_endian() -> None:
    fw_cfg = FwCfg()
    fw_cfg.add_u16(0x05, 0x0102)
    fw_cfg.add_u32(0x14, 0x01020304)
    fw_cfg.add_u64(0x03, 0x0102030405060708)
    assert fw_cfg.item(0x05) == bytes.fromhex("0201")
    assert fw_cfg.item(0x14) == bytes.fromhex("04030201")
    assert fw_cfg.item(0x03) == bytes.fromhex("0807060504030201")


def test_arch_local_items_are_separate_from_common_ones() -> None:
    fw_cfg = FwCfg()
    fw_cfg.add_u32(FW_CFG_ARCH_LOCAL | 0x02, 1)  # QEMU's FW_CFG_IRQ0_OVERRIDE
    guest = Guest(fw_cfg)
    assert guest.u32(FW_CFG_ARCH_LOCAL | 0x02) == 1
    assert guest.u32(0x02) == 0


def test_files_are_keyed_in_name_order_whatever_order_they_come_in() -> None:
    fw_cfg = FwCfg()
    assert fw_cfg.add_file("etc/b", b"B") == 0x20
    assert fw_cfg.add_file("etc/a", b"AA") == 0x20  # sorts first: "etc/b" moves to 0x21
    assert fw_cfg.add_file("etc/c", b"CCC") == 0x22
    guest = Guest(fw_cfg)
    assert guest.directory() == {"etc/a": (0x20, 2), "etc/b": (0x21, 1), "etc/c": (0x22, 3)}
    assert [guest.item(key, 3) for key in (0x20, 0x21, 0x22)] == [b"AA\0", b"B\0\0", b"CCC"]
    assert fw_cfg.file_key("etc/b") == 0x21


def test_directory_is_sized_for_every_slot_as_in_qemu() -> None:
    fw_cfg = FwCfg()
    fw_cfg.add_file("x", b"")
    assert len(fw_cfg.item(FW_CFG_FILE_DIR)) == 4 + 64 * FW_CFG_FILE_SLOTS


def test_no_files_no_directory() -> None:
    assert Guest(FwCfg()).item(FW_CFG_FILE_DIR, 8) == bytes(8)


def test_file_slots_run_out() -> None:
    fw_cfg = FwCfg()
    for n in range(FW_CFG_FILE_SLOTS):
        fw_cfg.add_file(f"f{n:02}", b"")
    with pytest.raises(ConfigError, match="slots"):
        fw_cfg.add_file("one/too/many", b"")


@pytest.mark.parametrize("name", ["", "x" * 56, "a\0b"])
def test_bad_file_names_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError, match="name"):
        FwCfg().add_file(name, b"")


def test_duplicate_file_is_a_config_error() -> None:
    fw_cfg = FwCfg()
    fw_cfg.add_file("etc/e820", b"")
    with pytest.raises(ConfigError, match="duplicate"):
        fw_cfg.add_file("etc/e820", b"")


@pytest.mark.parametrize("key", [FW_CFG_FILE_DIR, FW_CFG_FILE_FIRST, 0x3F, 0x40, FW_CFG_WRITE_CHANNEL, 0x10000, -1])
def test_add_bytes_refuses_keys_it_cannot_own(key: int) -> None:
    with pytest.raises(ConfigError):
        FwCfg().add_bytes(key, b"x")


def test_add_bytes_refuses_a_taken_key() -> None:
    fw_cfg = FwCfg()
    fw_cfg.add_bytes(FW_CFG_SIGNATURE, b"QEMU")
    with pytest.raises(ConfigError, match="already"):
        fw_cfg.add_bytes(FW_CFG_SIGNATURE, b"QEMU")


@pytest.mark.parametrize(("method", "value"), [("add_u16", 0x10000), ("add_u32", -1), ("add_u64", 1 << 64)])
def test_integers_that_do_not_fit_are_config_errors(method: str, value: int) -> None:
    with pytest.raises(ConfigError, match="does not fit"):
        getattr(FwCfg(), method)(FW_CFG_NB_CPUS, value)


# --- hostile input ------------------------------------------------------------------------------


def test_hostile_accesses_never_raise(guest: Guest) -> None:
    keys = (0, 1, 0x19, 0x20, 0x22, 0x3F, 0x40, 0x4000, 0x8000, 0xFFFF, 0x1_0000, -1)
    for offset in range(-1, FwCfg.SIZE + 3):
        for size in (0, 1, 2, 3, 4, 8):
            for value in (*keys, 0xFFFFFFFF, 0xFFFF_FFFF_FFFF_FFFF):
                guest.fw_cfg.write(offset, size, value)
                for _ in range(3):
                    assert 0 <= guest.fw_cfg.read(offset, size) <= max((1 << (8 * size)) - 1, 0)


def test_a_guest_can_read_every_key_to_the_end() -> None:
    fw_cfg = FwCfg()
    standard_items(fw_cfg, cpus=1, max_cpus=1, ram_size=MIB, cmdline="x", memory_map=build_memory_map(MIB), acpi=None)
    guest = Guest(fw_cfg)
    for key in range(0x10000):
        guest.select(key)
        assert guest.read(1) == (fw_cfg.item(key)[:1] or b"\0")


# --- state -----------------------------------------------------------------------------------------


def rebuilt(acpi: AcpiTables, cmdline: str = CMDLINE) -> Guest:
    """A fw_cfg built the way the ``guest`` fixture builds one (with another command line if asked)."""
    fw_cfg = FwCfg()
    standard_items(fw_cfg, cpus=2, max_cpus=4, ram_size=RAM_SIZE, cmdline=cmdline,
                   memory_map=build_memory_map(RAM_SIZE), acpi=acpi)  # fmt: skip
    return Guest(fw_cfg)


def test_a_restored_fw_cfg_reads_on_from_the_saved_offset(guest: Guest, acpi: AcpiTables) -> None:
    guest.select(FW_CFG_CMDLINE_DATA)
    assert guest.read(8) == CMDLINE.encode()[:8]
    restored = rebuilt(acpi)
    restored.fw_cfg.restore_state(guest.fw_cfg.save_state())
    assert restored.read(len(CMDLINE) - 8 + 2) == CMDLINE.encode()[8:] + b"\0\0"


def test_restore_refuses_items_other_than_the_saved_ones(guest: Guest, acpi: AcpiTables) -> None:
    other = rebuilt(acpi, cmdline="console=ttyS0")
    before = other.fw_cfg.save_state()
    with pytest.raises(StateError, match="FwCfgState.items_digest: this machine's fw_cfg items differ"):
        other.fw_cfg.restore_state(guest.fw_cfg.save_state())
    assert other.fw_cfg.save_state() == before


def test_the_digest_tells_apart_items_that_hold_the_same_bytes_differently() -> None:
    def digest(*items: tuple[int, bytes], files: tuple[tuple[str, bytes], ...] = ()) -> bytes:
        fw_cfg = FwCfg()
        for key, data in items:
            fw_cfg.add_bytes(key, data)
        for name, data in files:
            fw_cfg.add_file(name, data)
        return fw_cfg.items_digest()

    digests = {
        digest((FW_CFG_ID, b"ab"), (FW_CFG_NB_CPUS, b"")),
        digest((FW_CFG_ID, b"a"), (FW_CFG_NB_CPUS, b"b")),
        digest((FW_CFG_ID, b"ab"), (FW_CFG_ARCH_LOCAL | FW_CFG_NB_CPUS, b"")),
        digest((FW_CFG_ID, b"ab")),
        digest((FW_CFG_ID, b"ab"), files=(("etc/a", b""),)),
        digest((FW_CFG_ID, b"ab"), files=(("etc/b", b""),)),
        digest((FW_CFG_ID, b"ab"), files=(("etc/a", b""), ("etc/b", b""))),
    }
    assert len(digests) == 7


@pytest.mark.parametrize(
    ("selected", "offset", "field"),
    [(None, 1, "offset"), (FW_CFG_SIGNATURE, 5, "offset"), (FW_CFG_SIGNATURE, -1, "offset"),
     (FW_CFG_FILE_FIRST + FW_CFG_FILE_SLOTS, 0, "selected"), (0x10000, 0, "selected"), (True, 0, "selected"),
     ("0", 0, "selected")],
)  # fmt: skip
def test_restore_refuses_a_selection_or_offset_the_device_cannot_have(
    guest: Guest, selected: object, offset: int, field: str
) -> None:
    before = guest.fw_cfg.save_state()
    bad = dataclasses.replace(before, selected=selected, offset=offset)
    with pytest.raises(StateError, match=f"FwCfgState.{field}"):
        guest.fw_cfg.restore_state(bad)
    assert guest.fw_cfg.save_state() == before
