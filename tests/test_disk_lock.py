"""Disk image locks: one writer or many readers, never both; the error names the image and its holder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from command import assert_one_line_error, pykvm
from conftest import guest
from pykvm.devices.virtio.blk import VirtioBlock
from pykvm.errors import ConfigError


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * 1024))
    return path


def test_a_second_writer_is_refused_with_the_holder_named(image: Path) -> None:
    first = VirtioBlock(image)
    try:
        with pytest.raises(ConfigError) as refused:
            VirtioBlock(image)
        message = str(refused.value)
        assert message.startswith(f"{image}: the disk image is in use, writable, by pid {os.getpid()} (")
    finally:
        first.close()
    VirtioBlock(image).close()  # the lock went with the descriptor


def test_readers_share_an_image_and_keep_a_writer_out(image: Path) -> None:
    readers = [VirtioBlock(image, read_only=True) for _ in range(3)]
    try:
        with pytest.raises(ConfigError, match="a writable disk needs it alone .*PATH,ro"):
            VirtioBlock(image)
    finally:
        for reader in readers:
            reader.close()


def test_a_writer_keeps_readers_out(image: Path) -> None:
    writer = VirtioBlock(image)
    try:
        with pytest.raises(ConfigError, match="in use, writable"):
            VirtioBlock(image, read_only=True)
    finally:
        writer.close()


def test_a_refused_open_leaves_no_descriptor_behind(image: Path) -> None:
    writer = VirtioBlock(image)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        with pytest.raises(ConfigError):
            VirtioBlock(image)
    assert len(os.listdir("/proc/self/fd")) == before
    writer.close()


@pytest.mark.kvm
def test_a_second_pykvm_run_cannot_write_a_disk_another_one_has(image: Path, tmp_path: Path) -> None:
    spin = tmp_path / "spin.bin"
    spin.write_bytes(b"\xeb\xfe")  # jmp $
    first = subprocess.Popen([sys.executable, "-m", "pykvm", "run", str(spin), "--mode", "real", "--disk", str(image),
                              "--timeout", "120", "--control", str(tmp_path / "vm.sock")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        while not (tmp_path / "vm.sock").exists():  # the control socket comes last: the disk is open
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.01)
        second = pykvm("run", str(guest("hello_real.bin")), "--disk", str(image))
        assert_one_line_error(second, str(image), f"in use, writable, by pid {first.pid} (", "pykvm")
        assert_one_line_error(pykvm("run", str(guest("hello_real.bin")), "--disk", f"{image},ro"), "in use, writable")
    finally:
        first.terminate()
        first.wait(timeout=120)
