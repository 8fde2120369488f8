"""Machine configuration: sizes as QEMU reads them, serial output forms, and the checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.config import DiskConfig, MachineConfig, SerialConfig, parse_size
from pykvm.errors import ConfigError

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


@pytest.mark.parametrize(
    "text, size",
    [
        ("64M", 64 * MIB),
        ("64", 64 * MIB),  # a bare number is MiB, as QEMU's -m
        ("1.5G", 3 * GIB // 2),
        ("1.5", 3 * MIB // 2),
        ("512k", 512 * KIB),
        ("512K", 512 * KIB),
        ("2g", 2 * GIB),
        ("1T", 1 << 40),
        ("1P", 1 << 50),
        ("1E", 1 << 60),
        ("4096B", 4096),
        ("4096b", 4096),
        ("0x10", 16 * MIB),
        ("0x1000k", 4 * MIB),
        ("size=64M", 64 * MIB),
        ("SIZE=1.5G", 3 * GIB // 2),
        ("0.5k", 512),
        ("1.25k", 1280),
        ("1.0", MIB),
        ("512KiB", 512 * KIB),  # pykvm's own forms stay accepted
        ("64MB", 64 * MIB),
        (" 8M", 8 * MIB),
    ],
)
def test_sizes_qemu_accepts(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("lots", "write it like 64M"),
        ("", "write it like 64M"),
        ("-1M", "write it like 64M"),
        ("1e3", "write it like 64M"),  # no exponents
        ("nan", "write it like 64M"),
        ("inf", "write it like 64M"),
        ("1.5.3", "write it like 64M"),
        ("0x1.8M", "write it like 64M"),  # hex has no fraction
        ("1.5B", "write it like 64M"),  # nor do bytes
        ("8bb", "write it like 64M"),
        ("size=1G,slots=2,maxmem=4G", "only size= is understood"),
        ("mem=4G", "only size= is understood"),
        ("99999999999E", "too large"),
    ],
)
def test_sizes_qemu_refuses(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_size(text)


def test_an_int_is_bytes_and_must_not_be_negative() -> None:
    assert parse_size(4096) == 4096
    with pytest.raises(ConfigError, match="cannot be negative"):
        parse_size(-1)
    with pytest.raises(ConfigError, match="not True"):
        parse_size(True)


@given(st.integers(min_value=0, max_value=1 << 20), st.sampled_from(["", "k", "M", "g", "T"]))
def test_an_integer_with_a_unit_is_that_many_units(number: int, unit: str) -> None:
    scale = {"": MIB, "k": KIB, "M": MIB, "g": GIB, "T": 1 << 40}[unit]
    assert parse_size(f"{number}{unit}") == number * scale


@pytest.mark.parametrize(
    "text, serial",
    [
        ("stdio", SerialConfig("stdio")),
        ("null", SerialConfig("null")),
        ("none", SerialConfig("null")),
        ("file:serial.log", SerialConfig("file", "serial.log")),
        ("file:null", SerialConfig("file", "null")),
        ("./null", SerialConfig("file", "./null")),
        ("/tmp/out.txt", SerialConfig("file", "/tmp/out.txt")),
        ("logs:1.txt", SerialConfig("file", "logs:1.txt")),  # not a QEMU backend: a path
    ],
)
def test_serial_forms(text: str, serial: SerialConfig) -> None:
    assert SerialConfig.parse(text) == serial


@pytest.mark.parametrize("text", ["pty", "vc", "tcp:localhost:4444", "unix:/tmp/s,server", "mon:stdio", "file:", ""])
def test_serial_backends_pykvm_does_not_offer(text: str) -> None:
    with pytest.raises(ConfigError, match="stdio, null, file:PATH or a path"):
        SerialConfig.parse(text)
    with pytest.raises(ConfigError):
        MachineConfig(serial=text).validate()


@pytest.mark.parametrize(
    "text, disk",
    [
        ("disk.img", DiskConfig("disk.img")),
        ("disk.img,ro", DiskConfig("disk.img", read_only=True)),
        ("disk.img,rw", DiskConfig("disk.img")),
        ("disk.img,snapshot", DiskConfig("disk.img", snapshot=True)),
        ("disk.img,rw,snapshot", DiskConfig("disk.img", snapshot=True)),
        ("disk.img,snapshot,ro", DiskConfig("disk.img", read_only=True, snapshot=True)),
        ("disk.img,ro,snapshot", DiskConfig("disk.img", read_only=True, snapshot=True)),
    ],
)
def test_disk_forms(text: str, disk: DiskConfig) -> None:
    assert DiskConfig.parse(text) == disk


def test_only_a_writable_snapshot_disk_is_throwaway() -> None:
    assert DiskConfig("a", snapshot=True).throwaway
    assert not DiskConfig("a", read_only=True, snapshot=True).throwaway  # read-only: nothing to throw away
    assert not DiskConfig("a").throwaway


@pytest.mark.parametrize(
    "text", ["", ",ro", "disk.img,", "disk.img,snap", "disk.img,ro,rw", "disk.img,snapshot,snapshot", "disk.img,RO"]
)
def test_disk_forms_pykvm_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match=r"write it as PATH, PATH,ro or PATH,snapshot$"):
        DiskConfig.parse(text)


def test_memory_takes_every_size_form() -> None:
    assert MachineConfig(memory="size=1.5G").memory_bytes == 3 * GIB // 2
