"""virtio-blk (virtio 1.2 section 5.2) on a raw image, against a driver in real guest memory.

Each test is named for the rule it checks.  Requests are built as Linux builds them
(16-byte header, data, 1-byte status, each its own descriptor) unless a test is about
the layout (2.6.4: the device must not assume one).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from pykvm.devices.virtio import blk, mmio
from pykvm.devices.virtio.blk import (
    CONFIG,
    MAX_DISCARD_SEG,
    MAX_REQUEST_BYTES,
    MAX_WRITE_ZEROES_SECTORS,
    SEG_MAX,
    SIZE_MAX,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_GET_LIFETIME,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VirtioBlock,
)
from pykvm.errors import ConfigError
from pykvm.memory import GuestMemory
from virtio_driver import POISON, Driver, connect

MIB = 1 << 20
SECTORS = 256  # a 128 KiB image unless a test says otherwise


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, 16 * MIB)]) as mem:
        yield mem


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(i % 251 for i in range(SECTORS * 512)))
    return path


@pytest.fixture(params=[True, False], ids=["C", "Python"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    """Both ways of serving IN, OUT and FLUSH: in C (pykvm_blk_serve), and in Python (the reference)."""
    return request.param  # type: ignore[no-any-return]


def disk(memory: GuestMemory, path: Path, read_only: bool = False, accept: int = ~0, **kwargs: object) -> tuple[Driver, VirtioBlock]:
    device = VirtioBlock(path, read_only=read_only, **kwargs)  # type: ignore[arg-type]
    driver = connect(device, memory)
    driver.negotiate(accept=accept)
    return driver, device


def header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


def request(driver: Driver, kind: int, sector: int = 0, out: bytes = b"", in_len: int = 0, indirect: bool = False) -> tuple[int, int, bytes]:
    """One request; returns (status, used length, data read)."""
    readable = [header(kind, sector)] + ([out] if out else [])
    writable = ([in_len] if in_len else []) + [1]
    length, written = driver.request(0, readable, writable, indirect)
    return written[-1], length, written[:-1]


def segment(sector: int, count: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, count, flags)


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


# --- identity and configuration (5.2.1-5.2.5) ------------------------------------------------------------
def test_blk_identity_features_and_configuration_layout(memory: GuestMemory, image: Path, fast_path: bool) -> None:
    driver, device = disk(memory, image, fast_path=fast_path)
    assert driver.read_reg(mmio.DEVICE_ID) == 2
    features = driver.device_features()
    wanted = VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
    assert features & wanted == wanted
    assert features & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES) and not features & VIRTIO_BLK_F_RO
    assert CONFIG.size == 60  # struct virtio_blk_config up to unused1[3]
    assert driver.read_config(0, 8) == SECTORS  # capacity in 512-byte sectors
    assert driver.read_config(8, 4) == SIZE_MAX and driver.read_config(12, 4) == SEG_MAX
    assert SIZE_MAX * SEG_MAX == MAX_REQUEST_BYTES
    assert driver.read_config(20, 4) == 512  # blk_size
    assert driver.read_config(33, 1) == 0  # unused0 (5.2.5: MUST be 0)
    assert driver.read_config(36, 4) == blk.MAX_DISCARD_SECTORS
    assert driver.read_config(40, 4) == MAX_DISCARD_SEG
    assert driver.read_config(44, 4) == blk.DISCARD_SECTOR_ALIGNMENT
    assert driver.read_config(48, 4) == MAX_WRITE_ZEROES_SECTORS
    assert driver.read_config(52, 4) == 1
    assert driver.read_config(56, 1) == 1  # write_zeroes_may_unmap
    assert driver.read_config(57, 3) == 0  # unused1 (5.2.5: MUST be 0)
    assert len(driver.queues) == 1


def test_read_only_disk_offers_ro_and_neither_discard_nor_write_zeroes(
    memory: GuestMemory, image: Path, fast_path: bool
) -> None:
    driver, _ = disk(memory, image, fast_path=fast_path, read_only=True)
    assert driver.features & VIRTIO_BLK_F_RO
    assert not driver.features & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES)
    assert driver.read_config(36, 24) == 0


# --- opening the image ------------------------------------------------------------------------------------
def test_missing_image_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such disk image"):
        VirtioBlock(tmp_path / "nope.img")


@pytest.mark.parametrize("read_only", [False, True])
def test_directory_is_a_config_error(tmp_path: Path, read_only: bool) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        VirtioBlock(tmp_path, read_only=read_only)


def test_character_device_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a regular file or block device"):
        VirtioBlock("/dev/null", read_only=True)


@pytest.mark.parametrize("read_only", [False, True])
def test_a_fifo_is_refused_not_waited_on(tmp_path: Path, read_only: bool) -> None:
    os.mkfifo(tmp_path / "fifo")  # opened read-only and blocking, it would wait for a writer forever
    with pytest.raises(ConfigError, match="not a regular file or block device"):
        VirtioBlock(tmp_path / "fifo", read_only=read_only)


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv (to drop CAP_DAC_OVERRIDE)"
)
def test_image_without_permission_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "locked.img"
    path.write_bytes(bytes(512))
    path.chmod(0)
    code = (
        "from pykvm.devices.virtio.blk import VirtioBlock\n"
        "from pykvm.errors import ConfigError\n"
        f"try:\n    VirtioBlock({str(path)!r})\nexcept ConfigError as err:\n    print(err)\n"
    )
    without_capabilities = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
    result = subprocess.run([*without_capabilities, sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == f"{path}: permission denied (use PATH,ro for a read-only disk)", result.stderr


def test_size_not_a_multiple_of_512_is_rounded_down_with_a_warning(
    memory: GuestMemory, tmp_path: Path, caplog: pytest.LogCaptureFixture, fast_path: bool
) -> None:
    """A short image file: the partial last sector is not visible (Firecracker's choice; see blk.py)."""
    path = tmp_path / "short.img"
    path.write_bytes(b"A" * 512 + b"B" * 488)
    with caplog.at_level(logging.WARNING, logger="pykvm.devices.virtio.blk"):
        driver, device = disk(memory, path, fast_path=fast_path)
    assert device.capacity == 1 and driver.read_config(0, 8) == 1
    assert "not a multiple of 512" in caplog.text and "last 488 bytes" in caplog.text
    assert request(driver, VIRTIO_BLK_T_IN, 0, in_len=512) == (VIRTIO_BLK_S_OK, 513, b"A" * 512)
    status, length, data = request(driver, VIRTIO_BLK_T_IN, 1, in_len=512)
    assert (status, length, data) == (VIRTIO_BLK_S_IOERR, 1, bytes([POISON]) * 512)


def test_empty_image_has_capacity_zero_and_refuses_io(memory: GuestMemory, tmp_path: Path, fast_path: bool) -> None:
    path = tmp_path / "empty.img"
    path.write_bytes(b"")
    driver, _ = disk(memory, path, fast_path=fast_path)
    assert driver.read_config(0, 8) == 0
    assert request(driver, VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_IOERR
    assert request(driver, VIRTIO_BLK_T_OUT, 0, out=bytes(512))[0] == VIRTIO_BLK_S_IOERR
    assert path.stat().st_size == 0


# --- reads, writes, flush (5.2.6) ---------------------------------------------------------------------------
def test_write_flush_and_read_back(memory: GuestMemory, image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    driver, device = disk(memory, image, fast_path=False)
    pattern = bytes((i * 7 + 3) % 256 for i in range(8 * 512))
    assert request(driver, VIRTIO_BLK_T_OUT, 10, out=pattern) == (VIRTIO_BLK_S_OK, 1, b"")
    assert file_bytes(image, 10 * 512, len(pattern)) == pattern  # in the file once completed
    assert request(driver, VIRTIO_BLK_T_FLUSH) == (VIRTIO_BLK_S_OK, 1, b"")
    assert synced == [device.fd]
    status, length, data = request(driver, VIRTIO_BLK_T_IN, 10, in_len=len(pattern))
    assert (status, length, data) == (VIRTIO_BLK_S_OK, len(pattern) + 1, pattern)
    # the neighbours are untouched
    assert request(driver, VIRTIO_BLK_T_IN, 9, in_len=512)[2] == bytes(i % 251 for i in range(9 * 512, 10 * 512))
    assert device.stats["writes"] == 1 and device.stats["reads"] == 2 and device.stats["flushes"] == 1
    assert device.stats["bytes_written"] == len(pattern) and device.stats["errors"] == 0


def test_read_into_several_buffers_and_an_indirect_chain(memory: GuestMemory, image: Path, fast_path: bool) -> None:
    driver, _ = disk(memory, image, fast_path=fast_path)
    expected = file_bytes(image, 3 * 512, 3 * 512)
    length, written = driver.request(0, [header(VIRTIO_BLK_T_IN, 3)], [512, 1024, 1], indirect=True)
    assert length == 3 * 512 + 1 and written == expected + bytes([VIRTIO_BLK_S_OK])


def test_used_length_counts_the_data_read_and_the_status_byte(memory: GuestMemory, image: Path, fast_path: bool) -> None:
    """2.7.8.1: used length = bytes written by the device (IN data + status; just the status otherwise)."""
    driver, _ = disk(memory, image, fast_path=fast_path)
    assert request(driver, VIRTIO_BLK_T_IN, 0, in_len=4096)[1] == 4097
    assert request(driver, VIRTIO_BLK_T_OUT, 0, out=bytes(4096))[1] == 1
    assert request(driver, VIRTIO_BLK_T_IN, SECTORS, in_len=512)[1] == 1  # refused: nothing read


def test_without_negotiated_flush_a_write_is_stable_before_it_completes(
    memory: GuestMemory, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5.2.6.2: FLUSH offered but not negotiated: completed writes are stable (write-through)."""
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    driver, device = disk(memory, image, fast_path=False, accept=~VIRTIO_BLK_F_FLUSH)
    request(driver, VIRTIO_BLK_T_OUT, 0, out=bytes(512))
    assert synced == [device.fd]
    device.close()  # one writer at a time (the image is locked)
    driver2, device2 = disk(memory, image, fast_path=False)  # FLUSH negotiated: write-back, no sync per write
    synced.clear()
    request(driver2, VIRTIO_BLK_T_OUT, 0, out=bytes(512))
    assert synced == []


def test_read_only_disk_refuses_writes_with_ioerr_and_writes_nothing(memory: GuestMemory, image: Path, fast_path: bool) -> None:
    """5.2.6.2: IOERR for a write request when VIRTIO_BLK_F_RO is offered, and MUST NOT write any data."""
    before = image.read_bytes()
    driver, device = disk(memory, image, fast_path=fast_path, read_only=True)
    assert request(driver, VIRTIO_BLK_T_OUT, 0, out=b"\xff" * 512) == (VIRTIO_BLK_S_IOERR, 1, b"")
    for kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        assert request(driver, kind, out=segment(0, 8))[0] in (VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP)
    assert image.read_bytes() == before
    assert request(driver, VIRTIO_BLK_T_IN, 0, in_len=512)[2] == before[:512]  # reads still work
    assert request(driver, VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
    assert device.stats["rejected_read_only"] == 1


def test_flush_ignores_the_sector_and_accepts_no_data(memory: GuestMemory, image: Path, fast_path: bool) -> None:
    driver, _ = disk(memory, image, fast_path=fast_path)
    assert request(driver, VIRTIO_BLK_T_FLUSH, sector=12345)[0] == VIRTIO_BLK_S_OK


# --- bounds --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sector,sectors",
    [(SECTORS, 1), (SECTORS - 1, 2), (SECTORS - 4, 8), (1 << 63, 1), ((1 << 64) - 1, 1), ((1 << 55), 8)],
    ids=["at-end", "straddles-end", "straddles-end-more", "huge", "max", "overflowing-offset"],
)
def test_io_past_the_capacity_is_ioerr_with_no_partial_io(
    memory: GuestMemory, image: Path, sector: int, sectors: int, fast_path: bool
) -> None:
    """A request reaching past the capacity is refused whole (5.2.6.1: the driver MUST NOT send it)."""
    before = image.read_bytes()
    driver, device = disk(memory, image, fast_path=fast_path)
    status, length, data = request(driver, VIRTIO_BLK_T_IN, sector, in_len=sectors * 512)
    assert (status, length, data) == (VIRTIO_BLK_S_IOERR, 1, bytes([POISON]) * sectors * 512)
    assert request(driver, VIRTIO_BLK_T_OUT, sector, out=b"\x55" * sectors * 512)[0] == VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == before
    assert device.stats["rejected_out_of_range"] == 2


def test_io_ending_exactly_at_the_capacity_is_accepted(memory: GuestMemory, image: Path, fast_path: bool) -> None:
    driver, _ = disk(memory, image, fast_path=fast_path)
    assert request(driver, VIRTIO_BLK_T_OUT, SECTORS - 2, out=b"\x11" * 1024)[0] == VIRTIO_BLK_S_OK
    assert file_bytes(image, (SECTORS - 2) * 512, 2048) == b"\x11" * 1024


@pytest.mark.parametrize("length", [1, 511, 513, 1000])
def test_data_length_not_a_multiple_of_512_is_ioerr(memory: GuestMemory, image: Path, length: int, fast_path: bool) -> None:
    """5.2.6.1: the data of IN and OUT MUST be a multiple of 512 bytes."""
    before = image.read_bytes()
    driver, _ = disk(memory, image, fast_path=fast_path)
    assert request(driver, VIRTIO_BLK_T_IN, 0, in_len=length)[:2] == (VIRTIO_BLK_S_IOERR, 1)
    assert request(driver, VIRTIO_BLK_T_OUT, 0, out=b"\x01" * length)[0] == VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == before


def test_request_larger_than_4_mib_is_ioerr(memory: GuestMemory, tmp_path: Path, fast_path: bool) -> None:
    path = tmp_path / "big.img"
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
    driver, device = disk(memory, path, fast_path=fast_path)
    chunk = 2 * MIB + 512  # two buffers (over the same guest memory) make 4 MiB + 1 KiB
    gpa = driver.alloc(chunk)
    status_gpa = driver.alloc(1)
    driver.post_buffers(0, [(driver.buffer(header(VIRTIO_BLK_T_IN, 0)), 16, False), (gpa, chunk, True), (gpa, chunk, True), (status_gpa, 1, True)])
    driver.notify(0)
    assert driver.used(0)[0][1] == 1 and memory.read(status_gpa, 1)[0] == VIRTIO_BLK_S_IOERR
    assert device.stats["rejected_too_large"] == 1
    status, length, _ = request(driver, VIRTIO_BLK_T_IN, 0, in_len=MAX_REQUEST_BYTES)  # exactly 4 MiB: fine
    assert (status, length) == (VIRTIO_BLK_S_OK, MAX_REQUEST_BYTES + 1)


def test_more_segments_than_seg_max_is_ioerr(memory: GuestMemory, image: Path, fast_path: bool) -> None:
    driver, device = disk(memory, image, fast_path=fast_path)
    length, written = driver.request(0, [header(VIRTIO_BLK_T_IN, 0)], [512] * (SEG_MAX + 1) + [1], indirect=True)
    assert (length, written[-1]) == (1, VIRTIO_BLK_S_IOERR)
    assert device.stats["rejected_too_many_segments"] == 1
    length, written = driver.request(0, [header(VIRTIO_BLK_T_IN, 0)], [512] * SEG_MAX + [1], indirect=True)
    assert (length, written[-1]) == (SEG_MAX * 512 + 1, VIRTIO_BLK_S_OK)


# --- GET_ID and other types ------------------------------------------------------------------------------------
def test_get_id_returns_a_20_byte_nul_padded_serial_derived_from_the_file(
    memory: GuestMemory, image: Path, tmp_path: Path, fast_path: bool
) -> None:
    driver, device = disk(memory, image, fast_path=fast_path)
    status, length, serial = request(driver, VIRTIO_BLK_T_GET_ID, in_len=20)
    assert (status, length) == (VIRTIO_BLK_S_OK, 21)
    assert serial == device.serial and len(serial) == 20
    text = serial.rstrip(b"\0")
    assert text.startswith(b"pykvm-") and text.isascii() and serial[len(text):] == bytes(20 - len(text))
    device.close()  # one writer at a time (the image is locked)
    assert VirtioBlock(image).serial == serial  # stable for the same file
    other = tmp_path / "other.img"
    other.write_bytes(bytes(512))
    assert VirtioBlock(other).serial != serial


def test_get_id_of_exactly_20_characters_has_no_terminator(memory: GuestMemory, image: Path, fast_path: bool) -> None:
    driver, _ = disk(memory, image, fast_path=fast_path, serial="ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert request(driver, VIRTIO_BLK_T_GET_ID, in_len=20)[2] == b"ABCDEFGHIJKLMNOPQRST"


def test_get_id_into_a_short_buffer_writes_what_fits(memory: GuestMemory, image: Path, fast_path: bool) -> None:
    driver, _ = disk(memory, image, fast_path=fast_path, serial="serial-1")
    assert request(driver, VIRTIO_BLK_T_GET_ID, in_len=4) == (VIRTIO_BLK_S_OK, 5, b"seri")


@pytest.mark.parametrize("kind", [2, 3, VIRTIO_BLK_T_GET_LIFETIME, 14, 15, 0xFFFFFFFF])
def test_unknown_request_types_are_unsupp(memory: GuestMemory, image: Path, kind: int, fast_path: bool) -> None:
    driver, device = disk(memory, image, fast_path=fast_path)
    assert request(driver, kind, in_len=512) == (VIRTIO_BLK_S_UNSUPP, 1, bytes([POISON]) * 512)
    assert device.stats["unsupported"] == 1


# --- layout (2.6.4) and malformed requests --------------------------------------------------------------------------
def test_header_and_data_may_share_descriptors(memory: GuestMemory, image: Path, fast_path: bool) -> None:
    """2.6.4: the device MUST NOT assume a particular arrangement of descriptors."""
    driver, _ = disk(memory, image, fast_path=fast_path)
    data = b"\x42" * 1024
    hdr = header(VIRTIO_BLK_T_OUT, 4)
    # header split over two descriptors, the second also holding the first data bytes
    length, written = driver.request(0, [hdr[:5], hdr[5:] + data[:100], data[100:]], [1])
    assert (length, written) == (1, bytes([VIRTIO_BLK_S_OK]))
    assert file_bytes(image, 4 * 512, 1024) == data
    # IN data and the status byte in one descriptor
    length, written = driver.request(0, [header(VIRTIO_BLK_T_IN, 4)], [1025])
    assert (length, written) == (1025, data + bytes([VIRTIO_BLK_S_OK]))


def test_chain_without_a_device_writable_status_byte_is_returned_with_length_zero(
    memory: GuestMemory, image: Path, fast_path: bool
) -> None:
    before = image.read_bytes()
    driver, device = disk(memory, image, fast_path=fast_path)
    assert driver.request(0, [header(VIRTIO_BLK_T_OUT, 0), b"\x99" * 512], []) == (0, b"")
    # device-writable data, but the last buffer is device-readable: no status to write
    head = driver.post(0, [header(VIRTIO_BLK_T_IN, 0)], [512])
    extra = driver.buffer(b"r")
    chain = driver.queues[0].chains[head]
    last = chain.descriptors[-1]
    gpa, size, _ = chain.buffers[-1]
    driver.write_desc(0, last, gpa, size, 2 | 1, 15)  # WRITE | NEXT -> 15
    driver.write_desc(0, 15, extra, 1, 0)
    driver.set_avail_idx(0, driver.queues[0].avail_idx - 1)
    driver.publish(0, head)
    driver.notify(0)
    assert driver.used(0) == [(head, 0)]
    assert memory.read(extra, 1) == b"r" and image.read_bytes() == before
    assert device.stats["malformed"] == 2 and not driver.status & mmio.DEVICE_NEEDS_RESET
    assert request(driver, VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK  # carries on


@pytest.mark.parametrize("size", [0, 1, 8, 15])
def test_header_shorter_than_16_bytes_is_ioerr(memory: GuestMemory, image: Path, size: int, fast_path: bool) -> None:
    driver, device = disk(memory, image, fast_path=fast_path)
    readable = [header(VIRTIO_BLK_T_IN, 0)[:size]] if size else []
    assert driver.request(0, readable, [1]) == (1, bytes([VIRTIO_BLK_S_IOERR]))
    assert device.stats["malformed"] == 1


def test_device_readable_buffer_after_a_device_writable_one_is_ioerr(memory: GuestMemory, image: Path, fast_path: bool) -> None:
    """2.7.4.2: device-writable descriptors come after all device-readable ones."""
    before = image.read_bytes()
    driver, device = disk(memory, image, fast_path=fast_path)
    buffers = [
        (driver.buffer(header(VIRTIO_BLK_T_OUT, 0)), 16, False),
        (driver.alloc(512), 512, True),
        (driver.buffer(b"\x77" * 512), 512, False),
        (driver.alloc(1), 1, True),
    ]
    head = driver.post_buffers(0, buffers)
    driver.notify(0)
    assert driver.used(0) == [(head, 1)] and memory.read(buffers[-1][0], 1)[0] == VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == before and device.stats["malformed"] == 1


def test_data_in_the_wrong_direction_is_ioerr(memory: GuestMemory, image: Path, fast_path: bool) -> None:
    before = image.read_bytes()
    driver, device = disk(memory, image, fast_path=fast_path)
    # IN with device-readable data, OUT with device-writable data
    assert driver.request(0, [header(VIRTIO_BLK_T_IN, 0), bytes(512)], [1]) == (1, bytes([VIRTIO_BLK_S_IOERR]))
    length, written = driver.request(0, [header(VIRTIO_BLK_T_OUT, 0)], [512, 1])
    assert (length, written) == (1, bytes([POISON]) * 512 + bytes([VIRTIO_BLK_S_IOERR]))
    assert image.read_bytes() == before and device.stats["rejected_wrong_direction"] == 2


# --- host errors ---------------------------------------------------------------------------------------------------
def test_host_read_error_is_ioerr_and_logged(
    memory: GuestMemory, image: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    driver, device = disk(memory, image, fast_path=False)

    def failing(fd: int, buffers: list, offset: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", failing)
    with caplog.at_level(logging.WARNING, logger="pykvm.devices.virtio.blk"):
        assert request(driver, VIRTIO_BLK_T_IN, 0, in_len=512)[:2] == (VIRTIO_BLK_S_IOERR, 1)
    assert "Input/output error" in caplog.text and device.stats["io_errors"] == 1


def test_host_write_error_is_ioerr(memory: GuestMemory, image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    driver, device = disk(memory, image, fast_path=False)

    def full(fd: int, buffers: list, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwritev", full)
    assert request(driver, VIRTIO_BLK_T_OUT, 0, out=bytes(512))[0] == VIRTIO_BLK_S_IOERR
    assert device.stats["io_errors"] == 1


def test_short_reads_and_writes_are_continued(memory: GuestMemory, image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """preadv/pwritev may move fewer bytes than asked: the device loops until all moved."""
    driver, _ = disk(memory, image, fast_path=False)
    real_preadv, real_pwritev = os.preadv, os.pwritev
    calls = []

    def bounded(real):  # type: ignore[no-untyped-def]
        def call(fd: int, buffers: list, offset: int) -> int:
            calls.append(offset)
            return real(fd, [memoryview(buffers[0])[:300]], offset)

        return call

    monkeypatch.setattr(os, "preadv", bounded(real_preadv))
    monkeypatch.setattr(os, "pwritev", bounded(real_pwritev))
    data = bytes(range(256)) * 8
    assert request(driver, VIRTIO_BLK_T_OUT, 2, out=data)[0] == VIRTIO_BLK_S_OK
    status, _, back = request(driver, VIRTIO_BLK_T_IN, 2, in_len=2048)
    assert status == VIRTIO_BLK_S_OK and back == data and len(calls) == 14


# --- IN, OUT and FLUSH in C, beside the Python reference ---------------------------------------------------------
def test_the_c_path_serves_plain_requests_without_python_file_calls(
    memory: GuestMemory, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def not_here(*args: object) -> None:
        raise AssertionError("a plain request reached Python")

    for name in ("preadv", "pwritev", "fsync", "fdatasync"):
        monkeypatch.setattr(os, name, not_here)
    driver, device = disk(memory, image)
    pattern = bytes((i * 5 + 1) % 256 for i in range(2048))
    assert request(driver, VIRTIO_BLK_T_OUT, 7, out=pattern) == (VIRTIO_BLK_S_OK, 1, b"")
    assert request(driver, VIRTIO_BLK_T_FLUSH) == (VIRTIO_BLK_S_OK, 1, b"")
    assert request(driver, VIRTIO_BLK_T_IN, 7, in_len=2048) == (VIRTIO_BLK_S_OK, 2049, pattern)
    assert file_bytes(image, 7 * 512, 2048) == pattern
    assert {k: device.stats[k] for k in ("reads", "writes", "bytes_read", "bytes_written", "flushes", "errors")} == {
        "reads": 1, "writes": 1, "bytes_read": 2048, "bytes_written": 2048, "flushes": 1, "errors": 0}  # fmt: skip


def test_requests_in_flight_are_served_in_order_in_one_batch_with_one_interrupt(
    memory: GuestMemory, image: Path, fast_path: bool
) -> None:
    """The C path serves the plain ones and leaves each other one to Python, then carries on."""
    driver, device = disk(memory, image, fast_path=fast_path, serial="batch")
    posted = [
        driver.post(0, [header(VIRTIO_BLK_T_IN, 1)], [512, 1]),
        driver.post(0, [header(VIRTIO_BLK_T_GET_ID)], [20, 1]),
        driver.post(0, [header(VIRTIO_BLK_T_OUT, 2), b"\x33" * 1024], [1]),
        driver.post(0, [header(VIRTIO_BLK_T_IN, SECTORS)], [512, 1]),  # past the end: Python's IOERR
        driver.post(0, [header(VIRTIO_BLK_T_FLUSH)], [1]),
        driver.post(0, [header(VIRTIO_BLK_T_IN, 2)], [1024, 1]),
    ]
    driver.notify(0)
    assert [head for head, _ in driver.used(0)] == posted and driver.interrupts == 1
    written = [driver.written(0, head) for head in posted]
    assert written[0] == file_bytes(image, 512, 512) + bytes([VIRTIO_BLK_S_OK])
    assert written[1] == b"batch".ljust(20, b"\0") + bytes([VIRTIO_BLK_S_OK])
    assert [w[-1] for w in written[2:5]] == [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK]
    assert written[5] == b"\x33" * 1024 + bytes([VIRTIO_BLK_S_OK])
    assert device.stats["reads"] == 2 and device.stats["rejected_out_of_range"] == 1


def test_event_idx_asks_for_the_next_notification_after_a_batch(memory: GuestMemory, image: Path, fast_path: bool) -> None:
    """2.7.10: with VIRTIO_F_EVENT_IDX the device's avail_event says when it wants the next notification."""
    driver, _ = disk(memory, image, fast_path=fast_path)
    assert driver.features & mmio.VIRTIO_F_RING_EVENT_IDX
    for sector in range(5):
        driver.post(0, [header(VIRTIO_BLK_T_IN, sector)], [512, 1])
    driver.notify(0)
    assert len(driver.used(0)) == 5 and driver.avail_event(0) == 5
    driver.post(0, [header(VIRTIO_BLK_T_IN, 0)], [512, 1])
    assert driver.kick(0) and len(driver.used(0)) == 1


def test_pages_a_request_wrote_are_noted_as_host_writes(memory: GuestMemory, image: Path, fast_path: bool) -> None:
    """Snapshots, fast reset and migration rely on it: KVM's dirty log does not see the device's writes."""
    driver, _ = disk(memory, image, fast_path=fast_path)
    head = driver.post(0, [header(VIRTIO_BLK_T_IN, 0)], [3 * 4096, 1])
    data, status = driver.queues[0].chains[head].buffers[1:]
    memory.track_host_writes()
    driver.notify(0)
    written = memory.track_host_writes()
    used = driver.queues[0].used
    expected = {page for page in range(data[0] // 4096, (data[0] + data[1] - 1) // 4096 + 1)}
    expected |= {status[0] // 4096, used // 4096, (used + 4 + 8 * driver.queues[0].size + 1) // 4096}
    assert written >= expected and len(driver.used(0)) == 1
    assert memory.track_host_writes() == set()


def test_a_sync_that_fails_in_c_is_ioerr_and_logged(
    memory: GuestMemory, image: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The kernel reports a failed sync once: C answers it (IOERR) rather than let a second try succeed."""
    driver, device = disk(memory, image, accept=~VIRTIO_BLK_F_FLUSH)  # write-through: each write is synced
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, device.fd)  # writes succeed, fsync and fdatasync fail (EINVAL)
    os.close(null)
    with caplog.at_level(logging.WARNING, logger="pykvm.devices.virtio.blk"):
        assert request(driver, VIRTIO_BLK_T_OUT, 0, out=bytes(512)) == (VIRTIO_BLK_S_IOERR, 1, b"")
        assert request(driver, VIRTIO_BLK_T_FLUSH) == (VIRTIO_BLK_S_IOERR, 1, b"")
    assert caplog.text.count("a sync failed: Invalid argument") == 2
    assert {k: device.stats[k] for k in ("writes", "write_through_syncs", "flushes", "io_errors", "errors")} == {
        "writes": 1, "write_through_syncs": 0, "flushes": 0, "io_errors": 2, "errors": 2}  # fmt: skip


def test_a_transfer_that_fails_in_c_is_answered_by_python(
    memory: GuestMemory, image: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    driver, device = disk(memory, image)
    directory = os.open(tmp_path, os.O_RDONLY)
    os.dup2(directory, device.fd)  # preadv and pwritev fail (EISDIR, EBADF)
    os.close(directory)
    with caplog.at_level(logging.WARNING, logger="pykvm.devices.virtio.blk"):
        assert request(driver, VIRTIO_BLK_T_IN, 0, in_len=512)[:2] == (VIRTIO_BLK_S_IOERR, 1)
        assert request(driver, VIRTIO_BLK_T_OUT, 0, out=bytes(512))[:2] == (VIRTIO_BLK_S_IOERR, 1)
    assert "Is a directory" in caplog.text and device.stats["io_errors"] == 2
    assert device.stats["reads"] == device.stats["writes"] == 1  # Python's tries: C did not count its own


def test_a_closed_disk_answers_ioerr_and_never_uses_its_old_descriptor(memory: GuestMemory, image: Path, tmp_path: Path) -> None:
    """A notification served after close (the I/O thread stops after the disks close) must not reach
    whatever file reuses the descriptor's number."""
    driver, device = disk(memory, image)
    number = device.fd
    device.close()
    other = tmp_path / "other.img"
    other.write_bytes(bytes(4096))
    reused = os.open(other, os.O_RDWR)
    try:
        assert reused == number
        assert request(driver, VIRTIO_BLK_T_OUT, 0, out=b"\x77" * 512)[0] == VIRTIO_BLK_S_IOERR
        assert other.read_bytes() == bytes(4096)
    finally:
        os.close(reused)


def test_a_recorded_disk_reads_in_python_so_that_the_recorder_sees_the_data(memory: GuestMemory, image: Path) -> None:
    seen: list[tuple[int, bytes]] = []
    driver, device = disk(memory, image, on_read=lambda offset, views: seen.append((offset, b"".join(views))))
    assert not device.fast_path
    assert request(driver, VIRTIO_BLK_T_IN, 3, in_len=512)[0] == VIRTIO_BLK_S_OK
    assert seen == [(3 * 512, file_bytes(image, 3 * 512, 512))]


# --- discard and write zeroes (5.2.6) ----------------------------------------------------------------------------
def test_discard_punches_a_hole(memory: GuestMemory, tmp_path: Path, fast_path: bool) -> None:
    path = tmp_path / "sparse.img"
    path.write_bytes(b"\xaa" * (4 * MIB))
    driver, device = disk(memory, path, fast_path=fast_path)
    blocks = path.stat().st_blocks
    assert request(driver, VIRTIO_BLK_T_DISCARD, out=segment(0, 2048) + segment(4096, 2048)) == (VIRTIO_BLK_S_OK, 1, b"")
    assert device.stats["discards"] == 1
    if device.stats["discards_not_supported_by_host"] == 0:
        assert path.stat().st_blocks < blocks
        assert file_bytes(path, 0, MIB) == bytes(MIB)  # after a hole punch the file reads zeros
    assert file_bytes(path, MIB, MIB) == b"\xaa" * MIB  # between the segments: untouched


def test_discard_with_the_unmap_flag_or_unknown_flags_is_unsupp(memory: GuestMemory, image: Path, fast_path: bool) -> None:
    """5.2.6.2: UNSUPP for unknown flags, and for discard commands with unmap set."""
    before = image.read_bytes()
    driver, _ = disk(memory, image, fast_path=fast_path)
    assert request(driver, VIRTIO_BLK_T_DISCARD, out=segment(0, 8, 1))[0] == VIRTIO_BLK_S_UNSUPP
    assert request(driver, VIRTIO_BLK_T_DISCARD, out=segment(0, 8, 2))[0] == VIRTIO_BLK_S_UNSUPP
    assert request(driver, VIRTIO_BLK_T_WRITE_ZEROES, out=segment(0, 8, 1 << 31))[0] == VIRTIO_BLK_S_UNSUPP
    # one bad segment among good ones: nothing is done
    assert request(driver, VIRTIO_BLK_T_DISCARD, out=segment(0, 8) + segment(8, 8, 4))[0] == VIRTIO_BLK_S_UNSUPP
    assert image.read_bytes() == before


def test_discard_and_write_zeroes_bounds(memory: GuestMemory, image: Path, fast_path: bool) -> None:
    before = image.read_bytes()
    driver, _ = disk(memory, image, fast_path=fast_path)
    bad = [
        (VIRTIO_BLK_T_DISCARD, segment(SECTORS - 1, 2)),  # past the capacity
        (VIRTIO_BLK_T_DISCARD, segment(1 << 63, 1)),
        (VIRTIO_BLK_T_DISCARD, segment(0, 1) * (MAX_DISCARD_SEG + 1)),  # more than max_discard_seg
        (VIRTIO_BLK_T_DISCARD, segment(0, 1)[:12]),  # not a whole segment
        (VIRTIO_BLK_T_DISCARD, b""),  # no segment at all
        (VIRTIO_BLK_T_WRITE_ZEROES, segment(0, 1) * 2),  # max_write_zeroes_seg is 1
        (VIRTIO_BLK_T_WRITE_ZEROES, segment(0, MAX_WRITE_ZEROES_SECTORS + 1)),
    ]
    for kind, data in bad:
        assert request(driver, kind, out=data)[0] == VIRTIO_BLK_S_IOERR, (kind, data)
    assert image.read_bytes() == before


@pytest.mark.parametrize("unmap", [0, 1])
def test_write_zeroes_makes_the_range_read_zeros(memory: GuestMemory, image: Path, unmap: int, fast_path: bool) -> None:
    """5.2.6.2: after write zeroes, reads of the range MUST return zeroes, whether unmap was set or not."""
    driver, device = disk(memory, image, fast_path=fast_path)
    assert request(driver, VIRTIO_BLK_T_WRITE_ZEROES, out=segment(5, 9, unmap))[0] == VIRTIO_BLK_S_OK
    assert request(driver, VIRTIO_BLK_T_IN, 5, in_len=9 * 512)[2] == bytes(9 * 512)
    assert file_bytes(image, 4 * 512, 512) == bytes(i % 251 for i in range(4 * 512, 5 * 512))
    assert file_bytes(image, 14 * 512, 512) == bytes(i % 251 for i in range(14 * 512, 15 * 512))
    assert image.stat().st_size == SECTORS * 512 and device.stats["write_zeroes"] == 1


def test_write_zeroes_falls_back_to_writing_zeros(
    memory: GuestMemory, image: Path, monkeypatch: pytest.MonkeyPatch, fast_path: bool
) -> None:
    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(blk, "fallocate", unsupported)
    driver, device = disk(memory, image, fast_path=fast_path)
    assert request(driver, VIRTIO_BLK_T_WRITE_ZEROES, out=segment(1, 3, 1))[0] == VIRTIO_BLK_S_OK
    assert file_bytes(image, 512, 3 * 512) == bytes(3 * 512)
    assert device.stats["write_zeroes_written"] == 1
    # a discard the host cannot do is still OK: it is a hint (5.2.6.2 "MAY deallocate")
    assert request(driver, VIRTIO_BLK_T_DISCARD, out=segment(100, 8))[0] == VIRTIO_BLK_S_OK
    assert device.stats["discards_not_supported_by_host"] == 1


def test_discard_and_write_zeroes_not_negotiated_are_unsupp(memory: GuestMemory, image: Path, fast_path: bool) -> None:
    before = image.read_bytes()
    driver, _ = disk(memory, image, fast_path=fast_path, accept=~(VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES))
    assert request(driver, VIRTIO_BLK_T_DISCARD, out=segment(0, 8))[0] == VIRTIO_BLK_S_UNSUPP
    assert request(driver, VIRTIO_BLK_T_WRITE_ZEROES, out=segment(0, 8))[0] == VIRTIO_BLK_S_UNSUPP
    assert image.read_bytes() == before
