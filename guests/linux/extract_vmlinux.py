#!/usr/bin/env python3
"""Take the vmlinux ELF out of a bzImage, for pykvm's PVH tests.

What the kernel's scripts/extract-vmlinux does by scanning for compression
magics, the boot protocol (2.08+) says directly: the setup header's
``payload_offset`` and ``payload_length`` locate the compressed kernel inside the
protected-mode part (file offset (setup_sects + 1) * 512).  The payload is
vmlinux (stripped, still an ELF, with its notes) followed by its relocation
table, compressed with gzip, xz, lzma or bzip2 (the ones Python reads; a kernel
built with zstd, lz4 or lzo is refused with the reason).

    extract_vmlinux.py bzImage vmlinux
"""

from __future__ import annotations

import bz2
import lzma
import struct
import sys
import zlib
from pathlib import Path

SECTOR = 512
SETUP_SECTS = 0x1F1
HEADER_MAGIC = 0x202
VERSION = 0x206
PAYLOAD_OFFSET = 0x248
PAYLOAD_LENGTH = 0x24C  # right after payload_offset: both are read at once
MIN_VERSION = 0x208
ELF_MAGIC = b"\x7fELF"


def _xz(data: bytes) -> bytes:
    # The payload may carry padding after the stream: a decompressor stops at its end.
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _lzma(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)


def _gzip(data: bytes) -> bytes:
    # The kernel appends the uncompressed size after the stream; gzip.decompress would
    # take those bytes for a second member, a decompress object stops at the first's end.
    return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(data)


DECOMPRESSORS = (
    (b"\x1f\x8b", "gzip", _gzip),
    (b"\xfd7zXZ\x00", "xz", _xz),
    (b"\x5d\x00\x00", "lzma", _lzma),
    (b"BZh", "bzip2", bz2.decompress),
)
UNSUPPORTED = ((b"\x28\xb5\x2f\xfd", "zstd"), (b"\x02\x21\x4c\x18", "lz4"), (b"\x89LZO", "lzo"))


def payload(image: bytes) -> bytes:
    """The compressed kernel a bzImage carries."""
    if image[HEADER_MAGIC : HEADER_MAGIC + 4] != b"HdrS":
        raise ValueError("not a bzImage (no HdrS magic at 0x202)")
    (version,) = struct.unpack_from("<H", image, VERSION)
    if version < MIN_VERSION:
        raise ValueError(f"boot protocol {version >> 8}.{version & 0xFF:02d} has no payload_offset (2.08+)")
    setup_sects = image[SETUP_SECTS] or 4
    offset, length = struct.unpack_from("<II", image, PAYLOAD_OFFSET)
    start = (setup_sects + 1) * SECTOR + offset
    if not length or start + length > len(image):
        raise ValueError(f"payload_offset {offset:#x} / payload_length {length:#x} do not lie inside the file")
    return image[start : start + length]


def extract(image: bytes) -> bytes:
    """The vmlinux ELF (and the relocations after it) inside a bzImage."""
    data = payload(image)
    for magic, _, decompress in DECOMPRESSORS:
        if data.startswith(magic):
            vmlinux = decompress(data)
            if not vmlinux.startswith(ELF_MAGIC):
                raise ValueError("the decompressed payload is not an ELF")
            return vmlinux
    for magic, name in UNSUPPORTED:
        if data.startswith(magic):
            raise ValueError(f"the payload is {name}-compressed, which Python's standard library cannot read")
    raise ValueError(f"unknown payload compression (first bytes {data[:6].hex()})")


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    try:
        vmlinux = extract(Path(argv[1]).read_bytes())
    except (OSError, ValueError, EOFError, lzma.LZMAError, zlib.error) as err:
        print(f"extract_vmlinux: {argv[1]}: {err}", file=sys.stderr)
        return 1
    output = Path(argv[2])
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_bytes(vmlinux)
    temporary.replace(output)
    print(f"{output}: {len(vmlinux)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
