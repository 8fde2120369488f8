"""A real guest drives virtio-blk and virtio-console through virtio-mmio."""

from __future__ import annotations

import re

import pytest

from conftest import guest
from pykvm.config import DiskConfig

pytestmark = pytest.mark.kvm

PATTERN_BYTES = 65536
SEED = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1


def guest_pattern() -> bytes:
    """The guest's xorshift64 (13, 7, 17) stream from SEED, each new state as 8 little-endian bytes."""
    state, words = SEED, []
    for _ in range(PATTERN_BYTES // 8):
        state ^= (state << 13) & MASK
        state ^= state >> 7
        state ^= (state << 17) & MASK
        words.append(state.to_bytes(8, "little"))
    return b"".join(words)


def run_virtio_guest(machine_factory, image, **options):
    machine = machine_factory(console="virtio", disks=(DiskConfig(str(image)),), **options)
    machine.load(guest("virtio_blk.bin"), mode="long")
    return machine, machine.run(timeout=120)


@pytest.mark.parametrize("notify", ["ioeventfd", "sync"])
def test_the_guest_writes_flushes_reads_back_and_reports_on_the_virtio_console(machine_factory, tmp_path, notify) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    machine, result = run_virtio_guest(machine_factory, image, virtio_notify=notify)
    text = result.serial.decode()
    # Each line goes to COM1 and to the virtio console; both end in the captured output.
    assert text.count("virtio-blk: capacity 2048 sectors\n") == 2
    assert text.count("virtio-blk: wrote 65536 bytes, flushed, read back: OK\n") == 2
    assert len(re.findall(r"virtio-blk: id pykvm-[0-9a-f]+\n", text)) == 2
    assert (result.exit_value, result.status) == (0, 1)
    assert image.read_bytes()[:PATTERN_BYTES] == guest_pattern()  # the data really reached the file
    console = machine.devices.virtio[0].transport
    assert console.stats["notifications"] > 0 and console.stats["needs_reset"] == 0
    if notify == "ioeventfd":  # notifications never exited to pykvm
        assert not [key for key in result.stats.exits_by_address if key.startswith("mmio 0xd000") and "0050" in key]


def test_a_read_only_disk_refuses_the_guests_write(machine_factory, tmp_path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    machine = machine_factory(console="virtio", disks=(DiskConfig(str(image), read_only=True),))
    machine.load(guest("virtio_blk.bin"), mode="long")
    result = machine.run(timeout=120)
    assert b"virtio-blk: write failed, status 1\n" in result.serial and result.exit_value == 3
    assert image.read_bytes() == bytes(1 << 20)
