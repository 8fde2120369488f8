"""The typed configuration a :class:`~pykvm.machine.Machine` is built from."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TypedDict

from .errors import ConfigError
from .x86.layout import DEBUG_EXIT_PORT, DEBUG_EXIT_PORTS, MIB, PAGE_SIZE

DEFAULT_KVM_PATH = "/dev/kvm"

MIN_MEMORY = 2 * MIB
_UNITS = {"b": 1, "k": 1 << 10, "m": MIB, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
# QEMU's qemu_strtosz(): a decimal number with an optional fraction, or a hex one, then one unit
# letter (B, K, M, G, T, P, E, any case; pykvm also takes KiB/KB forms).  No sign, no exponent.
_SIZE = re.compile(
    r"^\s*(?:(?P<hex>0x[0-9a-f]+)|(?P<int>\d+)(?:\.(?P<frac>\d*))?)(?:(?P<unit>[bkmgtpe])(?<!b)(?:i?b)?|(?P<byte>b))?$",
    re.IGNORECASE,
)
_MAX_SIZE = (1 << 64) - 1


def parse_size(value: str | int) -> int:
    """Bytes from a size as QEMU's ``-m`` reads it: ``64M``, ``1.5G``, ``512k``, ``4096B``, ``size=64M``.

    A bare number is MiB; a fraction needs a unit above bytes (``1.5G``; truncated to whole
    bytes); ``KiB``/``KB`` forms are accepted too.  An int is bytes.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"a size is a string like 64M or a number of bytes, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"a size cannot be negative: {value}")
        return value
    text = value.strip()
    key, equals, rest = text.partition("=")
    if equals:
        if key.strip().lower() != "size" or "," in rest:
            raise ConfigError(f"cannot read {value!r} as a size: of QEMU's -m keys only size= is understood")
        text = rest
    match = _SIZE.match(text)
    if not match or (match["frac"] is not None and (match["hex"] or match["byte"])):
        raise ConfigError(f"cannot read {value!r} as a size: write it like 64M, 1.5G, 512K or 2G")
    unit = 1 if match["byte"] else _UNITS[(match["unit"] or "m").lower()]
    if match["hex"]:
        size = int(match["hex"], 16) * unit
    else:
        fraction = match["frac"] or ""
        if fraction.strip("0") and unit == 1:
            raise ConfigError(f"cannot read {value!r} as a size: a fraction of a byte")
        size = int(match["int"]) * unit + int(fraction or "0") * unit // 10 ** len(fraction)
    if size > _MAX_SIZE:
        raise ConfigError(f"size {value!r} is too large")
    return size


def check_memory_size(size: int) -> None:
    """Reject a RAM size that is too small, unaligned, or larger than this host's RAM."""
    if size < MIN_MEMORY:
        raise ConfigError(f"guest memory of {size} bytes is too small: give at least 2M")
    if size % PAGE_SIZE:
        raise ConfigError(f"guest memory of {size} bytes is not a multiple of 4 KiB")
    host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if size > host:
        raise ConfigError(
            f"guest memory of {size / MIB:.0f} MiB is more than this host's {host / MIB:.0f} MiB of RAM; "
            "ask for less with -m"
        )


# QEMU -serial backends pykvm does not offer (a plain word or a "name:" prefix).
_QEMU_SERIAL_BACKENDS = frozenset(
    ("vc", "pty", "chardev", "pipe", "udp", "tcp", "telnet", "websocket", "unix", "mon", "braille", "msmouse",
     "ringbuf", "memory", "socket", "serial", "tty", "parallel", "spicevmc", "spiceport", "dbus")
)  # fmt: skip


@dataclass(frozen=True)
class SerialConfig:
    """Where the UART's output goes: ``kind`` is ``"stdio"``, ``"null"`` (nowhere) or ``"file"`` (``path``)."""

    kind: str = "null"
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> SerialConfig:
        """QEMU's ``-serial`` forms ``stdio``, ``null``, ``none`` (both discard the output) and
        ``file:PATH``, or a plain path (``./null`` is a file named null)."""
        if text == "stdio":
            return cls("stdio")
        if text in ("null", "none"):
            return cls("null")
        backend, colon, rest = text.partition(":")
        if colon and backend == "file" and rest:
            return cls("file", rest)
        if not text or backend == "file" or backend.lower() in _QEMU_SERIAL_BACKENDS:
            raise ConfigError(f"serial output {text!r} is not one pykvm offers: write stdio, null, file:PATH or a path")
        return cls("file", text)


@dataclass(frozen=True)
class DiskConfig:
    """A virtio-blk disk: a raw image file, optionally read-only or throw-away.

    ``snapshot`` (QEMU's ``-snapshot``) gives the guest a writable copy-on-write overlay of the
    image (:mod:`pykvm.disk_overlay`): nothing the guest writes reaches the image, and its writes
    are gone when the machine closes.  With ``read_only`` it changes nothing (a read-only disk
    writes nothing either), as QEMU takes ``readonly=on,snapshot=on``.
    """

    path: str
    read_only: bool = False
    snapshot: bool = False

    @property
    def throwaway(self) -> bool:
        """Whether the guest writes to a throw-away overlay rather than to the image."""
        return self.snapshot and not self.read_only

    @classmethod
    def parse(cls, text: str) -> DiskConfig:
        """``PATH`` with any of the options ``ro``, ``rw`` and ``snapshot`` after commas (the
        ``--disk`` syntax: ``PATH,ro``, ``PATH,snapshot``)."""
        path, *options = text.split(",")
        unknown = [option for option in options if option not in _DISK_OPTIONS]
        if not path or unknown or len(set(options)) != len(options) or {"ro", "rw"} <= set(options):
            raise ConfigError(f"cannot read disk {text!r}: write it as PATH, PATH,ro or PATH,snapshot")
        return cls(path, "ro" in options, "snapshot" in options)


_DISK_OPTIONS = ("ro", "rw", "snapshot")


@dataclass(frozen=True)
class NetConfig:
    """A virtio-net device on a TAP interface (``tap`` None: the kernel picks a name)."""

    tap: str | None = None

    @classmethod
    def parse(cls, text: str) -> NetConfig:
        """``tap`` or ``tap=NAME`` (the ``--net`` syntax)."""
        kind, _, name = text.partition("=")
        if kind != "tap" or (text.startswith("tap=") and not name):
            raise ConfigError(f"cannot read network {text!r}: write it as tap or tap=NAME")
        return cls(name or None)


@dataclass(frozen=True)
class MachineConfig:
    """What a machine is made of.

    ``memory`` is RAM in bytes (or a size string, see :func:`parse_size`); ``cpus`` the number of vCPUs.
    ``irqchip`` gives the in-kernel PIC, IOAPIC, LAPIC and PIT (off: a minimal machine).
    ``serial`` is where the UART's output goes (:meth:`SerialConfig.parse`: ``"stdio"``,
    ``"null"``/``"none"``, ``"file:PATH"`` or a path);
    ``capture_serial`` also keeps it in the run's result.  ``console="virtio"`` adds a
    virtio-console writing to the same place; ``disks`` are virtio-blk images; ``rng``
    adds a virtio-rng; ``net`` a virtio-net on a TAP device.
    ``virtio_notify`` is how virtqueue notifications reach the devices: ``"ioeventfd"``
    (an I/O thread, no exit to userspace) or ``"sync"`` (an MMIO exit handled on the
    vCPU thread; for debugging).
    """

    memory: int | str = 64 * MIB
    cpus: int = 1
    irqchip: bool = True
    serial: str = "none"
    capture_serial: bool = False
    console: str = "serial"
    disks: tuple[DiskConfig, ...] = ()
    rng: bool = False
    net: NetConfig | None = None
    virtio_notify: str = "ioeventfd"
    kvm_path: str = DEFAULT_KVM_PATH
    # Memory (pykvm/devices/virtio/balloon.py): a virtio-balloon, its optional features, and
    # KSM page sharing of guest RAM.
    balloon: bool = False
    deflate_on_oom: bool = False
    free_page_reporting: bool = False
    share_pages: bool = False
    # QEMU's test devices (pykvm/devices/testdev.py, pykvm/devices/debug_exit.py): pc-testdev, and the
    # (iobase, iosize) of the debug-exit ports.  device_options() reads them from -device specs.
    pc_testdev: bool = False
    debug_exit: tuple[int, int] = (DEBUG_EXIT_PORT, DEBUG_EXIT_PORTS)
    pit: bool = True  # the in-kernel PIT (with the irqchip); QEMU's -machine pit=off leaves it out
    # Debugging (pykvm/debugger/): serve gdb's remote protocol at this address (tcp::PORT,
    # tcp:HOST:PORT or unix:PATH), and hold the vCPUs before the first instruction until gdb
    # continues them (QEMU's -gdb and -S).
    gdb: str | None = None
    gdb_wait: bool = False

    @property
    def memory_bytes(self) -> int:
        return parse_size(self.memory)

    def validate(self) -> None:
        check_memory_size(self.memory_bytes)
        if not isinstance(self.cpus, int) or self.cpus < 1:
            raise ConfigError(f"a machine needs at least one vCPU, not {self.cpus!r}")
        if self.cpus > 1 and not self.irqchip:
            raise ConfigError("several vCPUs need the in-kernel irqchip (their LAPICs start the APs)")
        SerialConfig.parse(self.serial)
        if self.console not in ("serial", "virtio"):
            raise ConfigError(f"console must be 'serial' or 'virtio', not {self.console!r}")
        if self.virtio_notify not in ("ioeventfd", "sync"):
            raise ConfigError(f"virtio_notify must be 'ioeventfd' or 'sync', not {self.virtio_notify!r}")
        if self.balloon and not self.irqchip:
            raise ConfigError("the balloon is a virtio device: it needs the in-kernel irqchip")
        if (self.deflate_on_oom or self.free_page_reporting) and not self.balloon:
            raise ConfigError("deflate_on_oom and free_page_reporting are balloon features: set balloon=True")
        base, size = self.debug_exit
        if not (0 <= base and 1 <= size and base + size <= PORT_SPACE):
            raise ConfigError(f"the debug-exit ports [{base:#x}, {base + size:#x}) must lie in the port space 0-0xffff")
        if self.gdb is not None:
            from .gdbstub.server import parse_address  # only a machine served to gdb needs it

            parse_address(self.gdb)
        elif self.gdb_wait:
            raise ConfigError("gdb_wait holds the guest until gdb continues it: give gdb an address too")


class MachineOptions(TypedDict, total=False):
    """:class:`MachineConfig`'s fields as keyword options of :class:`~pykvm.machine.Machine` (typed)."""

    memory: int | str
    cpus: int
    irqchip: bool
    serial: str
    capture_serial: bool
    console: str
    disks: tuple[DiskConfig, ...]
    rng: bool
    net: NetConfig | None
    virtio_notify: str
    kvm_path: str
    balloon: bool
    deflate_on_oom: bool
    free_page_reporting: bool
    share_pages: bool
    pc_testdev: bool
    debug_exit: tuple[int, int]
    pit: bool
    gdb: str | None
    gdb_wait: bool


PORT_SPACE = 0x10000
# QEMU's isa-debug-exit when -device names no iobase or iosize (hw/misc/debugexit.c).
QEMU_DEBUG_EXIT_DEFAULTS = {"iobase": 0x501, "iosize": 0x02}
TEST_DEVICES = ("pc-testdev", "isa-debug-exit")


def device_options(spec: str) -> dict[str, object]:
    """The :class:`MachineConfig` fields a QEMU ``-device`` spec for a test device sets.

    ``pc-testdev``, or ``isa-debug-exit[,iobase=N][,iosize=N]`` (numbers in any base Python
    reads; QEMU's defaults 0x501 and 2 where one is left out).
    """
    name, *properties = spec.split(",")
    if name == "pc-testdev" and not properties:
        return {"pc_testdev": True}
    if name == "pc-testdev":
        raise ConfigError(f"device pc-testdev has no properties, but {','.join(properties)!r} was given")
    if name != "isa-debug-exit":
        raise ConfigError(f"unknown device {name!r}: pykvm's test devices are {', '.join(TEST_DEVICES)}")
    values = dict(QEMU_DEBUG_EXIT_DEFAULTS)
    for item in properties:
        key, equals, text = item.partition("=")
        if key not in values or not equals:
            raise ConfigError(f"device isa-debug-exit has no property {item!r} (it has iobase=N and iosize=N)")
        try:
            values[key] = int(text, 0)
        except ValueError:
            raise ConfigError(f"device isa-debug-exit: {key}={text!r} is not a number") from None
    return {"debug_exit": (values["iobase"], values["iosize"])}

