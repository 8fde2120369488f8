"""virtio-net (device ID 1, virtio 1.2 section 5.1) on a TAP device.

Queue 0 is receiveq1 (host to guest), queue 1 transmitq1 (guest to host).  Features:
VIRTIO_NET_F_MAC (the configuration holds the MAC address) and VIRTIO_NET_F_STATUS
(the link is reported up).  No checksum or segmentation offloads are offered, and
VIRTIO_NET_F_MRG_RXBUF is not: every received frame must fit one receive chain.

Each buffer starts with the 12-byte virtio 1.x ``virtio_net_hdr`` (``num_buffers``
included, 5.1.6).  The TAP (see :mod:`.tap`) was opened with ``IFF_VNET_HDR`` and a
12-byte header, so header and frame move in one system call each way:

- transmit: each chain's device-readable bytes (header + frame) go to the TAP in one
  ``writev`` straight from guest memory; the chain is returned with used length 0.  A
  chain with device-writable buffers, shorter than the header or longer than
  :data:`MAX_CHAIN` is dropped and counted (``tx_dropped``); a write the kernel refuses
  is counted in ``tx_errors``.
- receive: frames are read from the TAP into one 12 + 65550-byte buffer while the
  driver has receive chains; the header's ``flags`` are cleared (no GUEST_CSUM was
  offered, 5.1.6.4.1) and ``num_buffers`` set to 1, and header + frame are copied into
  the chain's device-writable buffers; used length = bytes written.  A frame larger
  than the chain is dropped and counted (``rx_dropped_too_big``) and the chain is
  returned with length 0 (Linux counts it as a length error and reuses the buffer).
  When the driver has no receive chain the frame just read is kept (never dropped)
  and reading stops until queue 0 is notified again.  Frames that arrive before the
  driver is ready (DRIVER_OK) are read and dropped (``rx_dropped_not_ready``), as
  from a NIC that is down.

Host input contract (for the machine's I/O thread):

- :meth:`VirtioNet.host_fds` is ``[tap_fd]``; when it is readable, call
  :meth:`VirtioNet.on_host_readable` (any thread: it takes the device's lock).  It
  reads at most :data:`RX_BUDGET` frames per call, so a level-triggered loop
  (epoll/select) is expected.
- Back-pressure: while a frame waits for a receive chain, the TAP should not be
  watched (it may stay readable and a level-triggered loop would spin).  The device
  says so through :attr:`VirtioNet.host_fd_interest`, a callable the machine sets:
  ``host_fd_interest(fd, False)`` when it stops wanting input from ``fd`` and
  ``host_fd_interest(fd, True)`` when it wants it again (after the driver added
  receive buffers, or after a reset).  Calls come in strict alternation, starting
  with False, from whichever thread runs the device (I/O or vCPU thread).
- Queue notifications reach :meth:`VirtioNet.process` through the transport; a notification of queue 0 delivers
  the waiting frame and resumes reading the TAP.

A snapshot or a migration keeps the queues (the transport's state) and nothing of the device's own: a frame
waiting for a receive chain is not kept, so a restored guest never gets it, as a network may lose any frame.
"""

from __future__ import annotations

import logging
import os
import struct

from ...errors import ConfigError
from .device import VirtioDevice
from .queue import DescriptorChain, QueueError
from .tap import VNET_HDR_SIZE, mac_for_tap, open_tap

log = logging.getLogger(__name__)

DEVICE_ID = 1
QUEUE_SIZE = 256
RX, TX = 0, 1
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_S_LINK_UP = 1
HEADER_SIZE = VNET_HDR_SIZE
MAX_FRAME = 65550  # the largest frame a TAP hands over (64 KiB + Ethernet and VLAN headers)
MAX_CHAIN = HEADER_SIZE + MAX_FRAME
RX_BUDGET = 256  # frames per on_host_readable() call
VIRTIO_NET_HDR_GSO_NONE = 0
CONFIG = struct.Struct("<6sHH")  # mac, status, max_virtqueue_pairs (5.1.4)


class VirtioNet(VirtioDevice):
    """A virtio-net device on the TAP descriptor ``tap_fd`` (see :func:`.tap.open_tap`), with MAC ``mac``."""

    name = "net"
    device_id = DEVICE_ID
    features = VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, tap_fd: int, mac: bytes) -> None:
        super().__init__()
        if len(mac) != 6 or mac[0] & 1:
            raise ConfigError(f"{mac.hex(':')} is not a unicast MAC address")
        self.tap_fd = tap_fd
        self.mac = bytes(mac)
        self.tap_name: str | None = None
        self._owns_fd = False
        self._rx_buffer = bytearray(MAX_CHAIN)
        self._waiting: bytes | None = None  # a frame read from the TAP, waiting for a receive chain
        self._watching = True

    @classmethod
    def open(cls, tap: str | None = None, mac: bytes | None = None) -> VirtioNet:
        """Open the TAP ``tap`` (see :func:`.tap.open_tap`); the MAC defaults to one derived from its name."""
        fd, name = open_tap(tap)
        try:
            device = cls(fd, mac if mac is not None else mac_for_tap(name))
        except ConfigError:
            os.close(fd)
            raise
        device.tap_name = name
        device._owns_fd = True
        return device

    def close(self) -> None:
        if self._owns_fd and self.tap_fd >= 0:
            os.close(self.tap_fd)
            self.tap_fd = -1

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1)

    def reset(self) -> None:
        super().reset()
        self._waiting = None
        self._want_input(True)

    # --- host input --------------------------------------------------------------------------
    def host_fds(self) -> list[int]:
        return [self.tap_fd]

    def on_host_readable(self, fd: int) -> None:
        """The TAP is readable: move frames to the guest (any thread)."""
        with self.lock:
            try:
                self._receive()
            except QueueError as err:
                self.broken(err)

    def _want_input(self, wanted: bool) -> None:
        if wanted != self._watching:
            self._watching = wanted
            if self.host_fd_interest is not None:
                self.host_fd_interest(self.tap_fd, wanted)

    def _read_frame(self) -> memoryview | None:
        """One frame (with its header) from the TAP, or None when there is none."""
        try:
            length = os.readv(self.tap_fd, [self._rx_buffer])
        except BlockingIOError:
            return None
        except OSError as err:
            self.stats["rx_errors"] += 1
            log.warning("virtio-net: reading the tap failed: %s", err.strerror)
            return None
        if length == 0:
            return None
        return memoryview(self._rx_buffer)[:length]

    def _receive(self) -> None:
        """Move frames from the TAP into receive chains (lock held)."""
        if not self.active or not self.queues[RX].ready:
            self._drain()
            return
        queue, memory = self.queues[RX], self.memory
        completed = 0
        try:
            for _ in range(RX_BUDGET):
                frame = self._waiting if self._waiting is not None else self._read_frame()
                if frame is None:
                    break
                if len(frame) < HEADER_SIZE or frame[1] != VIRTIO_NET_HDR_GSO_NONE:
                    self._waiting = None
                    self.stats["rx_dropped_malformed"] += 1  # not made by a TAP without offloads
                    continue
                if not queue.pending(memory):
                    if self._waiting is None:
                        self._waiting = bytes(frame)  # the read buffer is reused: keep a copy
                    self.stats["rx_waits_for_buffers"] += 1
                    self._want_input(False)
                    return
                chain = queue.pop(memory)
                self._waiting = None
                if chain is None:
                    break
                self.complete(RX, chain, self._put_frame(chain, frame))
                completed += 1
            self._want_input(True)
        finally:
            if completed:
                self.signal(RX)

    def _put_frame(self, chain: DescriptorChain, frame: bytes | memoryview) -> int:
        room = sum(b.len for b in chain.writable)
        if room < len(frame):
            self.stats["rx_dropped_too_big"] += 1
            log.debug("virtio-net: a %d-byte frame does not fit a %d-byte receive chain", len(frame), room)
            return 0
        data = bytearray(frame)
        data[0] = 0  # flags: no VIRTIO_NET_HDR_F_DATA_VALID / NEEDS_CSUM without GUEST_CSUM
        data[10:12] = b"\x01\x00"  # num_buffers: one chain (no MRG_RXBUF)
        written = chain.write_all(self.memory, bytes(data))
        self.stats["rx_frames"] += 1
        self.stats["rx_bytes"] += written - HEADER_SIZE
        return written

    def _drain(self) -> None:
        """Not ready for frames: read and drop what is there (bounded), as a NIC that is down."""
        self._waiting = None
        for _ in range(RX_BUDGET):
            if self._read_frame() is None:
                return
            self.stats["rx_dropped_not_ready"] += 1

    # --- queues ------------------------------------------------------------------------------
    def process(self, queue_index: int) -> None:
        if queue_index == RX:
            self._receive()
        elif queue_index == TX:
            self._transmit()

    def _transmit(self) -> None:
        completed = 0
        try:
            for chain in self.chains(TX):
                self._send(chain)
                self.complete(TX, chain, 0)
                completed += 1
        finally:
            if completed:
                self.signal(TX)

    def _send(self, chain: DescriptorChain) -> None:
        total = sum(b.len for b in chain.readable)
        if chain.writable or total <= HEADER_SIZE or total > MAX_CHAIN:
            self.stats["tx_dropped"] += 1
            log.debug("virtio-net: dropped a malformed transmit chain (head %d, %d bytes)", chain.head, total)
            return
        memory = self.memory
        views = [memory.view(b.gpa, b.len) for b in chain.readable]
        try:
            sent = os.writev(self.tap_fd, views)
        except OSError as err:
            self.stats["tx_errors"] += 1
            log.debug("virtio-net: the tap refused a %d-byte frame: %s", total - HEADER_SIZE, err.strerror)
            return
        self.stats["tx_frames"] += 1
        self.stats["tx_bytes"] += sent - HEADER_SIZE
