#!/usr/bin/env python3
"""Write the Linux test guest's initramfs: a gzip'd "newc" cpio archive, byte for byte reproducible.

The archive holds a static busybox, ``/bin/sh`` linking to it, ``/dev/console``,
empty ``/proc`` and ``/sys``, and ``/init`` (a busybox sh script).  The newc
format (the kernel's Documentation/driver-api/early-userspace/buffer-format.rst)
is a 110-byte ASCII header per entry, then the NUL-terminated name and the data,
each padded to 4 bytes, and a ``TRAILER!!!`` entry at the end.  Every timestamp
is 0, owners are root, inode numbers count up from 1 and gzip records no name
or time, so the same inputs always give the same bytes (no ``cpio`` tool needed).

    mkinitramfs.py --busybox BUSYBOX --init INIT_SCRIPT --output initramfs.cpio.gz
"""

from __future__ import annotations

import argparse
import gzip
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
ALIGN = 4
CONSOLE_MAJOR, CONSOLE_MINOR = 5, 1


@dataclass(frozen=True)
class Entry:
    """One archive member: its path (no leading slash), mode (type and permissions) and data."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad(length: int) -> bytes:
    return bytes(-length % ALIGN)


def _header(entry: Entry, ino: int, nlink: int) -> bytes:
    name = entry.name.encode() + b"\0"
    fields = (
        ino, entry.mode, 0, 0, nlink, 0, len(entry.data),  # ino mode uid gid nlink mtime filesize
        0, 0, entry.rdev[0], entry.rdev[1], len(name), 0,  # devmajor devminor rdevmajor rdevminor namesize check
    )  # fmt: skip
    head = MAGIC + b"".join(b"%08X" % field for field in fields) + name
    return head + _pad(len(head))


def newc_archive(entries: list[Entry]) -> bytes:
    """The cpio (newc) archive of ``entries``, in order, with its trailer."""
    out = bytearray()
    for ino, entry in enumerate(entries, start=1):
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        out += _header(entry, ino, nlink) + entry.data + _pad(len(entry.data))
    out += _header(Entry(TRAILER, 0), 0, 1)
    return bytes(out)


def guest_entries(busybox: bytes, init: bytes) -> list[Entry]:
    """What the test guest's initramfs holds."""
    directory, executable = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755
    return [
        Entry(".", directory),
        Entry("bin", directory),
        Entry("bin/busybox", executable, busybox),
        Entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        Entry("dev", directory),
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(CONSOLE_MAJOR, CONSOLE_MINOR)),
        Entry("proc", directory),
        Entry("sys", directory),
        Entry("init", executable, init),
    ]


def gzip_bytes(data: bytes) -> bytes:
    """``data`` gzip'd with no file name and a zero timestamp (reproducible)."""
    return gzip.compress(data, compresslevel=9, mtime=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busybox", type=Path, required=True, help="a statically linked busybox binary")
    parser.add_argument("--init", type=Path, required=True, help="the script to install as /init")
    parser.add_argument("--output", type=Path, required=True, help="where to write the .cpio.gz")
    args = parser.parse_args(argv)
    archive = newc_archive(guest_entries(args.busybox.read_bytes(), args.init.read_bytes()))
    temporary = args.output.with_name(args.output.name + ".tmp")
    temporary.write_bytes(gzip_bytes(archive))
    temporary.replace(args.output)
    print(f"{args.output}: {len(archive)} bytes of cpio, gzip'd")
    return 0


if __name__ == "__main__":
    sys.exit(main())
