"""QEMU's firmware configuration device (fw_cfg), traditional I/O port interface.

As QEMU describes it in ``docs/specs/fw_cfg.rst`` and implements it in
``hw/nvram/fw_cfg.c``: items are byte strings selected by a 16-bit key; the
guest writes a key to the selector and then reads the item a byte at a time.
On x86 both registers live in one 2-byte I/O range at ``FW_CFG_IO_BASE``
(0x510), registered here as one device of :attr:`FwCfg.SIZE` bytes.  Every
access is decoded as QEMU decodes it: ``fw_cfg_comb_mem_ops`` accepts
(``fw_cfg_comb_valid``) 1-byte accesses and 2-byte writes; QEMU's memory core
hands an I/O access at offset 0 to the device whole, even past the end of its
range (``address_space_translate_internal`` does not clamp I/O accesses), cuts
one at offset 1 to a single byte (``memory_access_size`` bounds an access by its
alignment), and turns an access the device does not accept into a read of 0
and a dropped write (``memory_region_dispatch_read``/``_write``):

==========================  ===============================================================
access                      effect
==========================  ===============================================================
2-byte write at 0           selects the key and rewinds the offset (``fw_cfg_comb_write``
                            -> ``fw_cfg_select``); the selector is little-endian
1-byte read at 0 or 1       the next byte of the selected item; 0 past its end, or when
                            the key selects nothing (``fw_cfg_data_read`` ignores addr)
1-byte write at 0 or 1      ignored: the traditional interface is read-only since QEMU
                            2.4 (``fw_cfg_write``); counted in ``stats["data_writes"]``
2- or 4-byte read at 0      reads 0, consumes nothing (``stats["rejected_reads"]``)
4-byte write at 0           dropped, selects nothing (``stats["rejected_writes"]``)
2- or 4-byte access at 1    a 1-byte access at 1, as above, then open-bus lanes
==========================  ===============================================================

A byte lane past the range (offset 2 on) reads 0xff like an open bus and drops
its write, as on the rest of the port-I/O bus.  Accesses of other sizes read all
ones and are dropped (``stats["missed_reads"]`` / ``["missed_writes"]``).

Keys: bit 15 (``FW_CFG_ARCH_LOCAL``) selects the architecture's items; bit 14
(``FW_CFG_WRITE_CHANNEL``) is ignored; a key whose index is past the last file
slot selects nothing.  Files (:meth:`FwCfg.add_file`, at most
``FW_CFG_FILE_SLOTS``, 0x20, as QEMU's default) get keys from
``FW_CFG_FILE_FIRST`` (0x20) in name order, as in QEMU's
``fw_cfg_add_file_callback`` ("Sort by file name"; the legacy order table
applies only to old machine types): adding a file whose name sorts first
moves every other file's key up by one, so a guest finds files by name in the
directory (``FW_CFG_FILE_DIR``, big-endian) rather than by a fixed key.  At reset QEMU
selects ``FW_CFG_SIGNATURE``; so does a new :class:`FwCfg`.

State (:class:`FwCfgState`): the selected key and how far into its item the guest has
read.  The guest cannot change an item (the traditional interface is read-only), so
the items are configuration, which the machine rebuilds before a restore; the state
carries a SHA-256 digest of them, and :meth:`FwCfg.restore_state` refuses a device whose
items differ from the ones the guest was reading (a different command line, RAM size,
ACPI tables...).
"""

from __future__ import annotations

import bisect
import logging
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import ConfigError, StateError
from ..x86.acpi import AcpiTables
from ..x86.e820 import E820Entry
from .ports import ACCESS_SIZES, BITS_PER_BYTE, OPEN_BUS_BYTE, size_mask
from .state import check_bytes, check_int, check_record

log = logging.getLogger(__name__)

# I/O ports: the selector (16-bit, little-endian) and the data register overlap in one range.
FW_CFG_IO_BASE = 0x510
FW_CFG_CTL_SIZE = 2
FW_CFG_SELECTOR_OFFSET = 0
FW_CFG_DATA_OFFSET = 1
SELECTOR_WIDTH = 2

# Well-known keys (QEMU include/standard-headers/linux/qemu_fw_cfg.h).
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MACHINE_ID = 0x06
FW_CFG_KERNEL_ADDR = 0x07
FW_CFG_KERNEL_SIZE = 0x08
FW_CFG_KERNEL_CMDLINE = 0x09
FW_CFG_INITRD_ADDR = 0x0A
FW_CFG_INITRD_SIZE = 0x0B
FW_CFG_BOOT_DEVICE = 0x0C
FW_CFG_NUMA = 0x0D
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_KERNEL_ENTRY = 0x10
FW_CFG_KERNEL_DATA = 0x11
FW_CFG_INITRD_DATA = 0x12
FW_CFG_CMDLINE_ADDR = 0x13
FW_CFG_CMDLINE_SIZE = 0x14
FW_CFG_CMDLINE_DATA = 0x15
FW_CFG_SETUP_ADDR = 0x16
FW_CFG_SETUP_SIZE = 0x17
FW_CFG_SETUP_DATA = 0x18
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_FILE_SLOTS = 0x20  # QEMU's FW_CFG_FILE_SLOTS_DFLT
FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_ENTRY_MASK = ~(FW_CFG_WRITE_CHANNEL | FW_CFG_ARCH_LOCAL) & 0xFFFF
FW_CFG_MAX_ENTRY = FW_CFG_FILE_FIRST + FW_CFG_FILE_SLOTS  # exclusive limit of an index
FW_CFG_MAX_FILE_PATH = 56
KEY_MASK = 0xFFFF

# FW_CFG_SIGNATURE's contents, and FW_CFG_ID's bits (only the traditional interface: no DMA).
FW_CFG_SIGNATURE_DATA = b"QEMU"
FW_CFG_VERSION = 0x01

# The file directory (FW_CFG_FILE_DIR), big-endian: u32 count, then per file u32 size,
# u16 select, u16 reserved, char name[56].  QEMU sizes it for every slot.
FILE_DIR_COUNT = struct.Struct(">I")
FILE_DIR_ENTRY = struct.Struct(f">IHH{FW_CFG_MAX_FILE_PATH}s")
FILE_DIR_SIZE = FILE_DIR_COUNT.size + FILE_DIR_ENTRY.size * FW_CFG_FILE_SLOTS
MAX_ITEM_SIZE = 0xFFFF_FFFE  # QEMU asserts len < UINT32_MAX

# QEMU's struct e820_entry (hw/i386/e820_memory_layout.h): packed little-endian
# u64 address, u64 length, u32 type.
E820_ENTRY = struct.Struct("<QQI")
E820_FILE = "etc/e820"
# QEMU's names (hw/acpi/aml-build.h ACPI_BUILD_TABLE_FILE, ACPI_BUILD_RSDP_FILE).
ACPI_TABLES_FILE = "etc/acpi/tables"
ACPI_RSDP_FILE = "etc/acpi/rsdp"

# The digest of the items: each item as (key or name length, data length, name, data).
DIGEST_COUNT = struct.Struct("<I")
DIGEST_ITEM = struct.Struct("<HQ")
DIGEST_SIZE = 32  # SHA-256


@dataclass(frozen=True)
class FwCfgState:
    """What the guest can observe of a :class:`FwCfg` besides its items."""

    selected: int | None  # the selected key, None when it selects nothing
    offset: int  # the next byte of the selected item a data read returns
    items_digest: bytes  # SHA-256 of every item, to check that the rebuilt ones are the same


class FwCfg:
    """The fw_cfg item store and its I/O port interface (selector at 0, data at 1)."""

    #: Length of the port range the device is registered over (0x510-0x511).
    SIZE = FW_CFG_CTL_SIZE

    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()
        self._items: dict[int, bytes] = {}  # arch bit | index -> data, for keys below the files
        self._file_names: list[str] = []  # sorted; file i has key FW_CFG_FILE_FIRST + i
        self._file_data: list[bytes] = []
        self._directory = b""  # the FW_CFG_FILE_DIR item, rebuilt by add_file
        self._selected: int | None = None  # the selected key, None when it selects nothing
        self._offset = 0
        self.select(FW_CFG_SIGNATURE)

    # --- the VMM's side: items -----------------------------------------------------------------

    def add_bytes(self, key: int, data: bytes, *, replace: bool = False) -> None:
        """Make ``data`` the item of ``key`` (a well-known or ``FW_CFG_ARCH_LOCAL`` key).

        Raises :class:`ConfigError` for a key that is taken (unless ``replace``), out of
        range, the file directory's or a file's (use :meth:`add_file`), or data of 4 GiB
        or more.
        """
        index = key & FW_CFG_ENTRY_MASK
        if not 0 <= key <= KEY_MASK or key & FW_CFG_WRITE_CHANNEL or index >= FW_CFG_MAX_ENTRY:
            raise ConfigError(f"fw_cfg key {key:#x} is out of range")
        if not key & FW_CFG_ARCH_LOCAL and (index == FW_CFG_FILE_DIR or index >= FW_CFG_FILE_FIRST):
            raise ConfigError(f"fw_cfg key {key:#x} is the file directory's or a file's; use add_file()")
        if key in self._items and not replace:
            raise ConfigError(f"fw_cfg key {key:#x} already has an item")
        self._items[key] = _checked_item(bytes(data))

    def add_u16(self, key: int, value: int) -> None:
        """A 16-bit little-endian item, as QEMU's ``fw_cfg_add_i16``."""
        self.add_bytes(key, _little_endian(value, 2))

    def add_u32(self, key: int, value: int) -> None:
        """A 32-bit little-endian item, as QEMU's ``fw_cfg_add_i32``."""
        self.add_bytes(key, _little_endian(value, 4))

    def add_u64(self, key: int, value: int) -> None:
        """A 64-bit little-endian item, as QEMU's ``fw_cfg_add_i64``."""
        self.add_bytes(key, _little_endian(value, 8))

    def add_file(self, name: str, data: bytes) -> int:
        """Add a named file; return the key it has now (files are keyed in name order).

        Raises :class:`ConfigError` for an empty, duplicate or too long name (the
        directory holds 55 bytes and a NUL), for data of 4 GiB or more, and when all
        ``FW_CFG_FILE_SLOTS`` slots are taken.
        """
        encoded = name.encode()
        if not encoded or len(encoded) >= FW_CFG_MAX_FILE_PATH or b"\0" in encoded:
            raise ConfigError(f"fw_cfg file name {name!r}: 1 to {FW_CFG_MAX_FILE_PATH - 1} bytes, no NUL")
        if name in self._file_names:
            raise ConfigError(f"duplicate fw_cfg file name: {name}")
        if len(self._file_names) >= FW_CFG_FILE_SLOTS:
            raise ConfigError(f"fw_cfg file {name!r}: all {FW_CFG_FILE_SLOTS} file slots are taken")
        index = bisect.bisect(self._file_names, name)
        self._file_names.insert(index, name)
        self._file_data.insert(index, _checked_item(bytes(data)))
        self._directory = self._build_directory()
        return FW_CFG_FILE_FIRST + index

    def file_key(self, name: str) -> int:
        """The key file ``name`` has now; raises :class:`KeyError` if there is no such file."""
        try:
            return FW_CFG_FILE_FIRST + self._file_names.index(name)
        except ValueError:
            raise KeyError(name) from None

    def item(self, key: int) -> bytes:
        """What selecting ``key`` reads: the item's bytes, or ``b""`` (zeros) for no item."""
        index = key & FW_CFG_ENTRY_MASK
        if key & FW_CFG_ARCH_LOCAL or index < FW_CFG_FILE_DIR:
            return self._items.get((key & FW_CFG_ARCH_LOCAL) | index, b"")
        if index == FW_CFG_FILE_DIR:
            return self._directory
        file_index = index - FW_CFG_FILE_FIRST
        return self._file_data[file_index] if 0 <= file_index < len(self._file_data) else b""

    def items_digest(self) -> bytes:
        """SHA-256 over every item: keys, file names, lengths and contents."""
        import hashlib  # only snapshots need it: importing it at every start costs milliseconds

        digest = hashlib.sha256(DIGEST_COUNT.pack(len(self._items)))
        for key, data in sorted(self._items.items()):
            digest.update(DIGEST_ITEM.pack(key, len(data)))
            digest.update(data)
        digest.update(DIGEST_COUNT.pack(len(self._file_names)))
        for name, data in zip(self._file_names, self._file_data, strict=True):
            encoded = name.encode()
            digest.update(DIGEST_ITEM.pack(len(encoded), len(data)))
            digest.update(encoded + data)
        return digest.digest()

    def _build_directory(self) -> bytes:
        """The FW_CFG_FILE_DIR item: big-endian, sized for every slot as in QEMU."""
        entries = b"".join(
            FILE_DIR_ENTRY.pack(len(data), FW_CFG_FILE_FIRST + index, 0, name.encode())
            for index, (name, data) in enumerate(zip(self._file_names, self._file_data, strict=True))
        )
        directory = FILE_DIR_COUNT.pack(len(self._file_names)) + entries
        return directory + bytes(FILE_DIR_SIZE - len(directory))

    # --- the guest's side: the ports -----------------------------------------------------------

    def select(self, key: int) -> None:
        """Select ``key`` and rewind to its first byte (``fw_cfg_select``)."""
        key &= KEY_MASK
        self.stats["selects"] += 1
        self._offset = 0
        self._selected = key if _selects_an_item_slot(key) else None
        log.debug("fw_cfg: select %#x", key)

    def read(self, offset: int, size: int) -> int:
        """A ``size``-byte read at ``offset`` (0: 0x510, 1: 0x511), decoded as QEMU does."""
        if size not in ACCESS_SIZES:
            return self._miss("read", offset, size, size_mask(size))
        if offset == FW_CFG_SELECTOR_OFFSET and size > 1:
            return self._reject("read", size)
        value = 0
        for lane in range(size):
            value |= self._read_lane(offset + lane) << (BITS_PER_BYTE * lane)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """A ``size``-byte write of ``value`` at ``offset``, decoded as QEMU does."""
        if size not in ACCESS_SIZES:
            self._miss("write", offset, size, 0)
        elif offset == FW_CFG_SELECTOR_OFFSET and size == SELECTOR_WIDTH:
            self.select(value & size_mask(SELECTOR_WIDTH))
        elif offset == FW_CFG_SELECTOR_OFFSET and size > 1:
            self._reject("write", size)
        elif 0 <= offset < self.SIZE:
            self.stats["data_writes"] += 1
            log.debug("fw_cfg: %d-byte write of %#x at offset %d ignored (read-only)", size, value, offset)
        else:
            self._miss("write", offset, size, 0)

    def _read_lane(self, offset: int) -> int:
        if not 0 <= offset < self.SIZE:
            return self._miss("read", offset, 1, OPEN_BUS_BYTE)
        data = b"" if self._selected is None else self.item(self._selected)
        if self._offset >= len(data):
            return 0
        byte = data[self._offset]
        self._offset += 1
        return byte

    # --- state --------------------------------------------------------------------------------

    def save_state(self) -> FwCfgState:
        """The selection, the read offset and the items' digest."""
        return FwCfgState(self._selected, self._offset, self.items_digest())

    def restore_state(self, state: FwCfgState) -> None:
        """Take ``state`` into a device whose items the machine rebuilt.

        Raises :class:`StateError`, changing nothing, if a field is invalid or the items
        differ from the ones the state was saved with.
        """
        check_record(state, FwCfgState)
        check_bytes(state, "items_digest", DIGEST_SIZE, DIGEST_SIZE)
        if state.selected is None:
            check_int(state, "offset", 0, 0)
        else:
            if not _selects_an_item_slot(check_int(state, "selected", 0, KEY_MASK)):
                raise StateError(f"FwCfgState.selected is {state.selected:#x}, a key that selects nothing")
        if state.items_digest != self.items_digest():
            raise StateError("FwCfgState.items_digest: this machine's fw_cfg items differ from the saved machine's")
        if state.selected is not None:
            check_int(state, "offset", 0, len(self.item(state.selected)))
        self._selected, self._offset = state.selected, state.offset

    def _reject(self, kind: str, size: int) -> int:
        """An access at offset 0 that QEMU's ``fw_cfg_comb_valid`` refuses: reads 0, does nothing."""
        self.stats[f"rejected_{kind}s"] += 1
        log.debug("fw_cfg: %d-byte %s of the selector refused", size, kind)
        return 0

    def _miss(self, kind: str, offset: int, size: int, answer: int) -> int:
        self.stats[f"missed_{kind}s"] += 1
        log.debug("fw_cfg: unanswered %d-byte %s at offset %#x", size, kind, offset)
        return answer


def standard_items(
    fw_cfg: FwCfg,
    *,
    cpus: int,
    max_cpus: int,
    ram_size: int,
    cmdline: str | bytes,
    memory_map: Iterable[E820Entry],
    acpi: AcpiTables | None,
) -> None:
    """Fill ``fw_cfg`` with the items QEMU's PC machine gives (hw/i386/fw_cfg.c, x86.c).

    The signature "QEMU"; FW_CFG_ID 1 (traditional interface, no DMA); the RAM size
    (u64); NOGRAPHIC 1 (u16); the vCPU count and the limit of APIC IDs (u16 each: with
    APIC IDs 0..max_cpus-1 that is ``max_cpus``, QEMU's ``apic_id_limit``); the kernel
    command line, NUL-terminated, and its size with the NUL (u32); the file
    ``etc/e820``; and, given ``acpi``, the files ``etc/acpi/rsdp`` (the RSDP) and
    ``etc/acpi/tables`` (the whole blob, byte i of which is at ``acpi.base + i``).

    There is no ``etc/table-loader``.  In QEMU that linker script tells the firmware
    (SeaBIOS, OVMF) to allocate memory for the tables, copy them there, and patch
    their pointers and checksums.  pykvm runs no firmware: the VMM writes the blob
    itself at ``acpi.base``, every pointer and checksum already final, so there is
    nothing to allocate or link.  The two files let a guest (a test kernel, Linux's
    ``qemu_fw_cfg`` sysfs driver) read the tables through fw_cfg; a QEMU firmware,
    finding no loader script, would not install them.
    """
    if not 1 <= cpus <= max_cpus <= KEY_MASK:
        raise ConfigError(f"fw_cfg: {cpus} vCPUs of at most {max_cpus}: need 1 <= cpus <= max_cpus <= 65535")
    fw_cfg.add_bytes(FW_CFG_SIGNATURE, FW_CFG_SIGNATURE_DATA)
    fw_cfg.add_u32(FW_CFG_ID, FW_CFG_VERSION)
    fw_cfg.add_u64(FW_CFG_RAM_SIZE, ram_size)
    fw_cfg.add_u16(FW_CFG_NOGRAPHIC, 1)
    fw_cfg.add_u16(FW_CFG_NB_CPUS, cpus)
    fw_cfg.add_u16(FW_CFG_MAX_CPUS, max_cpus)
    set_cmdline(fw_cfg, cmdline)
    fw_cfg.add_file(E820_FILE, e820_file(memory_map))
    if acpi is not None:
        fw_cfg.add_file(ACPI_RSDP_FILE, acpi.rsdp)
        fw_cfg.add_file(ACPI_TABLES_FILE, acpi.blob)


def set_cmdline(fw_cfg: FwCfg, cmdline: str | bytes) -> None:
    """Set (or replace, when a kernel is loaded) the command-line items: the NUL-terminated
    string and its size with the NUL, as QEMU's ``x86_load_linux`` does."""
    command_line = _nul_terminated(cmdline)
    fw_cfg.add_bytes(FW_CFG_CMDLINE_SIZE, _little_endian(len(command_line), 4), replace=True)
    fw_cfg.add_bytes(FW_CFG_CMDLINE_DATA, command_line, replace=True)


def e820_file(memory_map: Iterable[E820Entry]) -> bytes:
    """The ``etc/e820`` file: QEMU's packed ``struct e820_entry`` per range."""
    return b"".join(E820_ENTRY.pack(entry.addr, entry.size, int(entry.type)) for entry in memory_map)


def _selects_an_item_slot(key: int) -> bool:
    """Whether ``key``'s index is a slot (an item's, or an empty one) rather than past the last file slot."""
    return (key & FW_CFG_ENTRY_MASK) < FW_CFG_MAX_ENTRY


def _nul_terminated(cmdline: str | bytes) -> bytes:
    data = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    if b"\0" in data:
        raise ConfigError("the kernel command line contains a NUL byte")
    return data + b"\0"


def _little_endian(value: int, size: int) -> bytes:
    if not 0 <= value <= size_mask(size):
        raise ConfigError(f"fw_cfg value {value:#x} does not fit in {size} bytes")
    return value.to_bytes(size, "little")


def _checked_item(data: bytes) -> bytes:
    if len(data) > MAX_ITEM_SIZE:
        raise ConfigError(f"fw_cfg item of {len(data)} bytes: items are below 4 GiB")
    return data
