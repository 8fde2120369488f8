"""virtio-net (virtio 1.2 section 5.1) on a TAP device.

The device logic is tested against a SOCK_SEQPACKET socket pair standing in for the
TAP (one message per frame, header included, as a TAP with IFF_VNET_HDR behaves).
The real TAP tests run in a private network namespace (``unshare --net``): this file
is started again as a script inside it, so no interface ever appears on the host.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from pykvm.devices.virtio import mmio
from pykvm.devices.virtio.net import (
    MAX_CHAIN,
    RX,
    RX_BUDGET,
    TX,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VirtioNet,
)
from pykvm.devices.virtio.tap import mac_for_tap, open_tap
from pykvm.errors import ConfigError
from pykvm.memory import GuestMemory
from virtio_driver import POISON, VIRTQ_DESC_F_WRITE, Driver, connect

MIB = 1 << 20
MAC = bytes.fromhex("02a0b0c0d0e0")
ETHERTYPE = 0x88B5  # IEEE local experimental: nothing else on the link uses it


def net_header(flags: int = 0, gso_type: int = 0, num_buffers: int = 0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso_type, 0, 0, 0, 0, num_buffers)


def frame(payload: bytes, dst: bytes = b"\xff" * 6, src: bytes = MAC) -> bytes:
    return dst + src + struct.pack(">H", ETHERTYPE) + payload


class FakeTap:
    """A socket pair: ``device_fd`` for the device, ``host`` for the test (the kernel's side)."""

    def __init__(self) -> None:
        self.host, device = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        device.setblocking(False)
        self.host.setblocking(False)
        self._device = device
        self.device_fd = device.fileno()

    def close(self) -> None:
        self.host.close()
        self._device.close()


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, 2 * MIB)]) as mem:
        yield mem


@pytest.fixture
def tap() -> Iterator[FakeTap]:
    fake = FakeTap()
    yield fake
    fake.close()


def nic(memory: GuestMemory, tap: FakeTap, negotiate: bool = True) -> tuple[Driver, VirtioNet, list]:
    device = VirtioNet(tap.device_fd, MAC)
    interest: list[tuple[int, bool]] = []
    device.host_fd_interest = lambda fd, wanted: interest.append((fd, wanted))
    driver = connect(device, memory)
    if negotiate:
        driver.negotiate()
    return driver, device, interest


def received(driver: Driver) -> list[bytes]:
    return [driver.written(RX, head)[:length] for head, length in driver.used(RX)]


# --- identity and configuration (5.1.1-5.1.4) ----------------------------------------------------------
def test_net_identity_features_and_configuration(memory: GuestMemory, tap: FakeTap) -> None:
    driver, device, _ = nic(memory, tap, negotiate=False)
    assert driver.read_reg(mmio.DEVICE_ID) == 1
    features = driver.device_features()
    assert features & VIRTIO_NET_F_MAC and features & VIRTIO_NET_F_STATUS
    assert not features & VIRTIO_NET_F_MRG_RXBUF and not features & 0b111  # no CSUM, GUEST_CSUM, CTRL_GUEST_OFFLOADS
    assert bytes(driver.read_config(i, 1) for i in range(6)) == MAC
    assert driver.read_config(6, 2) == 1  # VIRTIO_NET_S_LINK_UP
    assert device.host_fds() == [tap.device_fd]
    driver.negotiate()
    assert len(driver.queues) == 2


@pytest.mark.parametrize("mac", [b"\x01\x02\x03\x04\x05\x06", b"\x02\x00", b"\x02" * 7], ids=["multicast", "short", "long"])
def test_mac_must_be_a_unicast_address_of_6_bytes(mac: bytes) -> None:
    with pytest.raises(ConfigError, match="not a unicast MAC address"):
        VirtioNet(0, mac)


def test_mac_for_tap_is_locally_administered_unicast_and_stable() -> None:
    mac = mac_for_tap("tap7")
    assert len(mac) == 6 and mac[0] & 0b11 == 0b10
    assert mac_for_tap("tap7") == mac != mac_for_tap("tap8")


# --- transmit (5.1.6.2) -----------------------------------------------------------------------------------
def test_transmit_writes_header_and_frame_in_one_write(memory: GuestMemory, tap: FakeTap) -> None:
    driver, device, _ = nic(memory, tap)
    packet = frame(b"guest to host" * 10)
    head = driver.post(TX, [net_header(), packet[:20], packet[20:]], [])
    driver.notify(TX)
    assert tap.host.recv(65536) == net_header() + packet  # one message: header and frame together
    assert driver.used(TX) == [(head, 0)] and driver.interrupts == 1
    assert device.stats["tx_frames"] == 1 and device.stats["tx_bytes"] == len(packet)


@pytest.mark.parametrize(
    "readable,writable",
    [([net_header()], []), ([b"short"], []), ([net_header(), frame(b"x")], [64]), ([bytes(MAX_CHAIN + 1)], [])],
    ids=["header-only", "shorter-than-header", "device-writable-buffer", "too-long"],
)
def test_malformed_transmit_chain_is_dropped_and_returned(memory: GuestMemory, tap: FakeTap, readable: list, writable: list) -> None:
    driver, device, _ = nic(memory, tap)
    assert driver.request(TX, readable, writable)[0] == 0
    with pytest.raises(BlockingIOError):
        tap.host.recv(65536)
    assert device.stats["tx_dropped"] == 1 and not driver.status & mmio.DEVICE_NEEDS_RESET


def test_transmit_refused_by_the_host_is_counted(memory: GuestMemory, tap: FakeTap) -> None:
    driver, device, _ = nic(memory, tap)
    tap.host.close()  # the peer is gone: the write fails
    assert driver.request(TX, [net_header(), frame(b"lost")], [])[0] == 0
    assert device.stats["tx_errors"] == 1


# --- receive (5.1.6.3, 5.1.6.4) ----------------------------------------------------------------------------
def test_receive_copies_header_and_frame_with_num_buffers_1_and_no_flags(memory: GuestMemory, tap: FakeTap) -> None:
    """5.1.6.4.1: num_buffers 1 without MRG_RXBUF; flags 0 without GUEST_CSUM."""
    driver, device, _ = nic(memory, tap)
    driver.post(RX, [], [1530])
    driver.notify(RX)
    packet = frame(b"host to guest" * 20)
    tap.host.send(net_header(flags=2, num_buffers=0x7777) + packet)  # DATA_VALID from the kernel
    device.on_host_readable(tap.device_fd)
    (data,) = received(driver)
    assert data == net_header(flags=0, num_buffers=1) + packet  # used length = header + frame
    assert driver.interrupts == 1 and device.stats["rx_frames"] == 1


def test_receive_frame_spread_over_the_chains_buffers(memory: GuestMemory, tap: FakeTap) -> None:
    driver, device, _ = nic(memory, tap)
    driver.post(RX, [], [12, 100, 2000], indirect=True)
    driver.notify(RX)
    packet = frame(bytes(range(200)))
    tap.host.send(net_header() + packet)
    device.on_host_readable(tap.device_fd)
    assert received(driver) == [net_header(num_buffers=1) + packet]


def test_frame_larger_than_the_receive_chain_is_dropped(memory: GuestMemory, tap: FakeTap) -> None:
    """Without MRG_RXBUF a frame must fit one chain; one that does not is dropped, the chain returned empty."""
    driver, device, _ = nic(memory, tap)
    small = driver.post(RX, [], [100])
    big = driver.post(RX, [], [1530])
    driver.notify(RX)
    tap.host.send(net_header() + frame(bytes(200)))
    tap.host.send(net_header() + frame(b"fits"))
    device.on_host_readable(tap.device_fd)
    used = driver.used(RX)
    assert used[0] == (small, 0) and driver.written(RX, small) == bytes([POISON]) * 100
    assert used[1] == (big, 12 + 18)
    assert device.stats["rx_dropped_too_big"] == 1


def test_without_receive_buffers_the_frame_waits_and_the_tap_is_not_watched(memory: GuestMemory, tap: FakeTap) -> None:
    """No buffer: keep the frame (never drop it), stop reading, resume when queue 0 is notified."""
    driver, device, interest = nic(memory, tap)
    for i in range(3):
        tap.host.send(net_header() + frame(bytes([i]) * 10))
    device.on_host_readable(tap.device_fd)
    assert interest == [(tap.device_fd, False)]
    driver.post(RX, [], [1530])
    driver.notify(RX)  # delivers the waiting frame, reads the next, which waits in turn
    assert received(driver) == [net_header(num_buffers=1) + frame(bytes([0]) * 10)]
    assert interest == [(tap.device_fd, False)]
    driver.post(RX, [], [1530])
    driver.post(RX, [], [1530])
    driver.notify(RX)
    assert [data[-1] for data in received(driver)] == [1, 2]
    assert interest == [(tap.device_fd, False), (tap.device_fd, True)]  # drained: watch it again
    assert device.stats["rx_frames"] == 3


def test_frames_before_driver_ok_are_dropped_a_budget_at_a_time(memory: GuestMemory, tap: FakeTap) -> None:
    driver, device, interest = nic(memory, tap, negotiate=False)
    for _ in range(RX_BUDGET + 10):
        tap.host.send(net_header() + frame(b"early"))
    device.on_host_readable(tap.device_fd)
    assert device.stats["rx_dropped_not_ready"] == RX_BUDGET
    device.on_host_readable(tap.device_fd)
    assert device.stats["rx_dropped_not_ready"] == RX_BUDGET + 10 and interest == []


def test_reset_drops_the_waiting_frame_and_watches_the_tap_again(memory: GuestMemory, tap: FakeTap) -> None:
    driver, device, interest = nic(memory, tap)
    tap.host.send(net_header() + frame(b"stale"))
    device.on_host_readable(tap.device_fd)
    driver.negotiate()
    assert interest == [(tap.device_fd, False), (tap.device_fd, True)]
    driver.post(RX, [], [1530])
    driver.notify(RX)
    assert driver.used(RX) == []


def test_broken_receive_ring_during_host_input_needs_reset_and_does_not_raise(memory: GuestMemory, tap: FakeTap) -> None:
    driver, device, _ = nic(memory, tap)
    driver.write_desc(RX, 0, 2 * MIB - 8, 1530, VIRTQ_DESC_F_WRITE)  # straddles the end of RAM
    driver.publish(RX, 0)
    tap.host.send(net_header() + frame(b"x"))
    device.on_host_readable(tap.device_fd)  # the I/O thread's call: must not raise
    assert driver.status & mmio.DEVICE_NEEDS_RESET
    assert "buffer outside guest memory" in driver.reset_reasons[0]


def test_segmentation_offload_frame_from_the_host_is_dropped(memory: GuestMemory, tap: FakeTap) -> None:
    driver, device, _ = nic(memory, tap)
    driver.post(RX, [], [1530])
    driver.notify(RX)
    tap.host.send(net_header(gso_type=1) + frame(b"tso"))  # no GUEST_TSO4 was offered
    tap.host.send(net_header() + frame(b"plain"))
    device.on_host_readable(tap.device_fd)
    assert received(driver) == [net_header(num_buffers=1) + frame(b"plain")]
    assert device.stats["rx_dropped_malformed"] == 1


# --- the TAP device --------------------------------------------------------------------------------------
def test_open_tap_reports_a_missing_tun_device(tmp_path: Path) -> None:
    missing = str(tmp_path / "tun")
    with pytest.raises(ConfigError, match="does not exist: load the tun module"):
        open_tap("tap0", path=missing)


@pytest.mark.parametrize("name", ["", "x" * 16, "a/b", "a b"])
def test_open_tap_rejects_bad_interface_names(name: str) -> None:
    with pytest.raises(ConfigError, match="not a valid interface name"):
        open_tap(name)


def _netns_or_skip() -> None:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun does not exist on this host")
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"cannot create a private network namespace: {probe.stderr.strip()}")


def _run_in_netns(case: str, prefix: tuple[str, ...] = ()) -> None:
    _netns_or_skip()
    command = ["unshare", "--net", *prefix, sys.executable, __file__, case]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode == 77:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, f"{case} failed:\n{result.stdout}\n{result.stderr}"


def test_tap_guest_to_host_and_host_to_guest() -> None:
    _run_in_netns("case_tap_round_trip")


@pytest.mark.skipif(not shutil.which("setpriv"), reason="setpriv (util-linux) is not installed")
def test_open_tap_without_cap_net_admin_is_a_clear_error() -> None:
    _run_in_netns("case_no_privilege", ("setpriv", "--inh-caps=-all", "--bounding-set=-all"))


# --- run inside the namespace -------------------------------------------------------------------------------
def case_tap_round_trip() -> None:
    if os.geteuid() != 0:
        print("creating a TAP needs root (CAP_NET_ADMIN) in the namespace")
        sys.exit(77)
    device = VirtioNet.open("pykvmtest0")
    assert device.tap_name == "pykvmtest0" and device.mac == mac_for_tap("pykvmtest0")
    fd, auto_name = open_tap(None)  # the kernel names it
    assert auto_name.startswith("tap")
    os.close(fd)
    try:
        Path("/proc/sys/net/ipv6/conf/pykvmtest0/disable_ipv6").write_text("1")
    except OSError:
        pass  # no IPv6: nothing to silence
    subprocess.run(["ip", "link", "set", "dev", "pykvmtest0", "up"], check=True)
    packet_socket = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    packet_socket.bind(("pykvmtest0", ETHERTYPE))
    packet_socket.settimeout(5)
    with GuestMemory([(0, 2 * MIB)]) as memory:
        driver = connect(device, memory)
        driver.negotiate()
        # guest -> host
        outgoing = frame(b"from the guest" * 30, dst=b"\x02\x11\x22\x33\x44\x55", src=device.mac)
        driver.request(TX, [net_header(), outgoing], [])
        assert device.stats["tx_frames"] == 1, device.stats
        deadline = time.monotonic() + 5
        while True:
            data, address = packet_socket.recvfrom(65536)
            if address[2] != socket.PACKET_OUTGOING and data == outgoing:
                break
            assert time.monotonic() < deadline, "the guest's frame never reached the interface"
        # host -> guest
        for _ in range(4):
            driver.post(RX, [], [1530])
        driver.notify(RX)
        incoming = frame(b"from the host" * 30, dst=device.mac, src=b"\x02\x99\x88\x77\x66\x55")
        packet_socket.send(incoming)
        got: list[bytes] = []
        deadline = time.monotonic() + 5
        while incoming[12:] not in [g[12 + 12 :] for g in got]:
            assert time.monotonic() < deadline, f"the host's frame never reached the guest: {got!r}"
            readable, _, _ = select.select(device.host_fds(), [], [], 1)
            if readable:
                device.on_host_readable(device.tap_fd)
                got.extend(received(driver))
        match = next(g for g in got if g[12:] == incoming)
        assert match[:12] == net_header(num_buffers=1)
    device.close()
    packet_socket.close()


def case_no_privilege() -> None:
    try:
        fd, name = open_tap("pykvmtest1")
    except ConfigError as err:
        message = str(err)
        assert "needs CAP_NET_ADMIN or a pre-created tap owned by you" in message, message
        assert "pykvmtest1" in message, message
        return
    os.close(fd)
    raise AssertionError(f"opened {name} without CAP_NET_ADMIN")


if __name__ == "__main__":
    globals()[sys.argv[1]]()
