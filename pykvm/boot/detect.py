"""Telling what kind of guest image a file is, from its contents and then its name.

The order matters: a multiboot header wins over the ELF magic (a multiboot
kernel is usually also an ELF); an ELF with a PVH entry note
(XEN_ELFNOTE_PHYS32_ENTRY) is a PVH kernel, other ELFs are plain ELF kernels;
the "HdrS" magic at 0x202 makes a Linux bzImage; and a flat binary has no
signature at all, so it is only assumed from a file name suffix.

Each format's module is imported when its check is reached, so that telling a
multiboot kernel costs no import of the ELF, Linux and PVH loaders.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ImageError
from . import multiboot
from .flat import check_not_empty

# File name suffixes taken to mean a flat binary.
FLAT_SUFFIXES = (".bin", ".img", ".raw", ".flat", ".com")

UNKNOWN_REASON = (
    "cannot tell what kind of image this is (not ELF, multiboot or a Linux bzImage); "
    "if it is a flat binary, pass --format flat"
)


def sniff(image: bytes) -> str | None:
    """The format ``image``'s contents identify, or ``None`` (a flat binary has no signature)."""
    if multiboot.find_header(image) is not None:
        return multiboot.FORMAT
    from . import elf, linux, pvh

    if elf.is_elf(image):
        return pvh.FORMAT if pvh.is_pvh(image) else elf.FORMAT
    if linux.is_bzimage(image):
        return linux.FORMAT
    return None


def detect(path: Path, image: bytes) -> str:
    """The loader format for ``image``: ``"multiboot"``, ``"pvh"``, ``"elf"``, ``"linux"`` or ``"flat"``.

    Raises :class:`ImageError` for an empty file and a file it cannot identify.
    """
    check_not_empty(path, image)
    kind = sniff(image)
    if kind is not None:
        return kind
    if Path(path).suffix.lower() in FLAT_SUFFIXES:
        return "flat"
    raise ImageError(str(path), UNKNOWN_REASON)
