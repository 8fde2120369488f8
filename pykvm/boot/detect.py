"""Telling what kind of guest image a file is, from its contents and then its name.

The order matters: a multiboot header wins over the ELF magic (a multiboot
kernel is usually also an ELF), and a flat binary has no signature at all, so it
is only assumed from a file name suffix.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ImageError
from . import elf, multiboot
from .flat import check_not_empty

# The Linux boot protocol's setup header signature ("HdrS") and its file offset.
BZIMAGE_MAGIC = b"HdrS"
BZIMAGE_MAGIC_OFFSET = 0x202
BZIMAGE = "bzimage"

# File name suffixes taken to mean a flat binary.
FLAT_SUFFIXES = (".bin", ".img", ".raw", ".flat", ".com")

UNSUPPORTED = {BZIMAGE: "is a Linux bzImage; Linux bzImage boot is not supported yet"}
UNKNOWN_REASON = (
    "cannot tell what kind of image this is (not ELF, multiboot or a Linux bzImage); "
    "if it is a flat binary, pass --format flat"
)


def is_bzimage(image: bytes) -> bool:
    """Whether ``image`` carries the Linux boot protocol header magic."""
    return image[BZIMAGE_MAGIC_OFFSET : BZIMAGE_MAGIC_OFFSET + len(BZIMAGE_MAGIC)] == BZIMAGE_MAGIC


def sniff(image: bytes) -> str | None:
    """The format ``image``'s contents identify, or ``None`` (a flat binary has no signature)."""
    if multiboot.find_header(image) is not None:
        return multiboot.FORMAT
    if elf.is_elf(image):
        return elf.FORMAT
    if is_bzimage(image):
        return BZIMAGE
    return None


def detect(path: Path, image: bytes) -> str:
    """The loader format for ``image``: ``"multiboot"``, ``"elf"`` or ``"flat"``.

    Raises :class:`ImageError` for an empty file, a format pykvm recognizes but
    cannot boot yet (a Linux bzImage), and a file it cannot identify.
    """
    check_not_empty(path, image)
    kind = sniff(image)
    if kind in UNSUPPORTED:
        raise ImageError(str(path), UNSUPPORTED[kind])
    if kind is not None:
        return kind
    if Path(path).suffix.lower() in FLAT_SUFFIXES:
        return "flat"
    raise ImageError(str(path), UNKNOWN_REASON)
