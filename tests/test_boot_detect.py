"""Format detection and dispatch: load_image picks multiboot, ELF or flat, and explains what it cannot."""

from __future__ import annotations

from pathlib import Path

import pytest

from pykvm.boot import FORMATS, detect, load_image
from pykvm.boot.plan import CpuMode
from pykvm.errors import ConfigError, ImageError
from pykvm.x86 import layout
from tests.images import HLT, KERNEL_ADDR, Seg, aout_kernel, build_elf, multiboot_elf, multiboot_header, request

ELF32 = build_elf([Seg(KERNEL_ADDR, HLT * 16)], entry=KERNEL_ADDR)
BZIMAGE = bytes(0x202) + b"HdrS" + bytes(0x200)
TEXT = b"#!/bin/sh\necho hello\n"
UNKNOWN = "cannot tell what kind of image this is (not ELF, multiboot or a Linux bzImage); " \
    "if it is a flat binary, pass --format flat"  # fmt: skip


def detect_error(name: str, image: bytes) -> str:
    with pytest.raises(ImageError) as info:
        detect(Path(name), image)
    assert info.value.path == name
    return info.value.reason


def load_error(name: str, image: bytes, format: str = "auto") -> str:
    with pytest.raises(ImageError) as info:
        load_image(Path(name), image, request(), format)
    return info.value.reason


def test_formats() -> None:
    assert FORMATS == ("auto", "flat", "elf", "multiboot", "linux", "pvh")


# --- detect ---------------------------------------------------------------------------


def test_multiboot_aout_kernel() -> None:
    assert detect(Path("kernel"), aout_kernel()) == "multiboot"


def test_multiboot_header_wins_over_the_elf_magic() -> None:
    assert detect(Path("kernel.elf"), multiboot_elf()) == "multiboot"


def test_elf() -> None:
    assert detect(Path("kernel"), ELF32) == "elf"


def test_elf_with_a_bad_multiboot_checksum_is_an_elf() -> None:
    image = build_elf([Seg(KERNEL_ADDR, multiboot_header(0, checksum=0) + HLT)], entry=KERNEL_ADDR)
    assert detect(Path("kernel"), image) == "elf"


def test_misaligned_multiboot_magic_is_not_a_header() -> None:
    assert detect_error("kernel", b"\0" + aout_kernel()) == UNKNOWN


def test_multiboot_header_after_8_kib_is_not_a_header() -> None:
    assert detect(Path("kernel.bin"), bytes(8192) + aout_kernel()) == "flat"


def test_bzimage_is_recognised_by_its_header_magic() -> None:
    assert detect(Path("bzImage"), BZIMAGE) == "linux"


def test_bzimage_is_recognised_whatever_its_name() -> None:
    assert detect(Path("vmlinuz.bin"), BZIMAGE) == "linux"


@pytest.mark.parametrize("suffix", [".bin", ".img", ".raw", ".flat", ".com", ".BIN"])
def test_flat_by_suffix(suffix: str) -> None:
    assert detect(Path(f"guest{suffix}"), HLT) == "flat"


@pytest.mark.parametrize("name", ["guest", "guest.exe", "guest.txt", "bin"])
def test_unknown_extension(name: str) -> None:
    assert detect_error(name, HLT * 16) == UNKNOWN


def test_text_file() -> None:
    assert detect_error("script.sh", TEXT) == UNKNOWN


def test_empty_file() -> None:
    assert detect_error("guest.bin", b"") == "the file is empty"


# --- load_image -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "image", "format"),
    [
        ("kernel", aout_kernel(), "multiboot"),
        ("kernel.elf", multiboot_elf(), "multiboot"),
        ("kernel", ELF32, "elf"),
        ("boot.bin", HLT, "flat"),
    ],
)
def test_auto_dispatches_to_the_detected_loader(name: str, image: bytes, format: str) -> None:
    assert load_image(Path(name), image, request()).format == format


def test_forced_flat_loads_anything_as_flat() -> None:
    plan = load_image(Path("kernel"), ELF32, request(mode=CpuMode.LONG), "flat")
    assert plan.format == "flat"
    assert plan.writes[0].data == ELF32
    assert plan.writes[0].gpa == layout.HIMEM_START


def test_forced_elf_on_a_multiboot_elf_loads_it_as_elf() -> None:
    plan = load_image(Path("kernel"), multiboot_elf(), request(), "elf")
    assert plan.format == "elf"
    assert dict(plan.entry.regs) == {}


def test_forced_multiboot_without_a_header() -> None:
    assert "has no multiboot header" in load_error("kernel", ELF32, "multiboot")


def test_forced_elf_on_a_flat_binary() -> None:
    assert "is not an ELF file (bad magic" in load_error("boot.bin", HLT * 16, "elf")


@pytest.mark.parametrize("format", FORMATS)
def test_empty_file_is_rejected_whatever_the_format(format: str) -> None:
    assert load_error("guest.bin", b"", format) == "the file is empty"


def test_auto_on_a_bzimage_goes_to_the_linux_loader() -> None:
    # The fixture is only the magic: the Linux loader's own header checks then reject it.
    assert "uses boot protocol 0.00 (version 0x0000); pykvm needs 2.06 or later" in load_error("bzImage", BZIMAGE)


def test_auto_on_an_unknown_file() -> None:
    assert load_error("notes.txt", TEXT) == UNKNOWN


def test_unknown_format_name() -> None:
    with pytest.raises(ConfigError, match="unknown image format 'pe'"):
        load_image(Path("guest.bin"), HLT, request(), "pe")


# --- real files -----------------------------------------------------------------------

QEMU_DIR = Path("/usr/share/qemu")


def real_file(path: Path) -> bytes:
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path.read_bytes()


def test_bin_true_is_detected_as_elf_and_refused() -> None:
    path = Path("/bin/true")
    image = real_file(path)
    assert detect(path, image) == "elf"
    with pytest.raises(ImageError) as info:
        load_image(path, image, request())
    assert "is a dynamically linked program, not a kernel" in info.value.reason


def test_qemu_option_rom_is_flat_by_its_name() -> None:
    path = QEMU_DIR / "multiboot.bin"
    assert detect(path, real_file(path)) == "flat"


def test_qemu_firmware_without_a_known_suffix_is_unknown() -> None:
    path = QEMU_DIR / "qboot.rom"
    image = real_file(path)
    assert detect_error(str(path), image) == UNKNOWN
    plan = load_image(path, image, request(mode=CpuMode.PROTECTED), "flat")
    assert plan.writes[0].data == image
