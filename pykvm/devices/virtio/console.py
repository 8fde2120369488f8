"""virtio-console (device ID 3, virtio 1.2 section 5.3): one port, no multiport.

Queue 0 (receiveq) carries host input to the guest, queue 1 (transmitq) guest output
to the host.  VIRTIO_CONSOLE_F_MULTIPORT and F_SIZE are not offered (so there are no
control queues and ``cols``/``rows`` stay 0); VIRTIO_CONSOLE_F_EMERG_WRITE is: a write
to ``emerg_wr`` sends its low byte to the output at any time, even before the device
is set up (5.3.5.1).

Host input:

- :meth:`VirtioConsole.receive` may be called from any thread (the machine's stdin
  forwarder); it takes the device's lock.  Input is never dropped: it waits in an
  unbounded host-side queue and is copied into receiveq buffers as the driver makes
  them available (a buffer may be filled partly; its used length is the bytes
  written).  A notification of queue 0 (new receive buffers) delivers what waits.
- The console reads no descriptor itself, so :meth:`host_fds` stays empty.

Output: each transmit chain's device-readable bytes go to ``output`` in order, a
buffer at a time (64 KiB pieces at most); the chain is returned with used length 0.
Device-readable buffers in the receiveq and device-writable ones in the transmitq
break a driver MUST (5.3.6.1): they are skipped, logged and counted, never written.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

from ...errors import StateError
from ..state import check_bytes
from .device import VirtioDevice
from .queue import DescriptorChain, QueueError

log = logging.getLogger(__name__)

DEVICE_ID = 3
QUEUE_SIZE = 256
RECEIVEQ, TRANSMITQ = 0, 1
VIRTIO_CONSOLE_F_SIZE = 1 << 0
VIRTIO_CONSOLE_F_MULTIPORT = 1 << 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 1 << 2
CONFIG = struct.Struct("<HHII")  # cols, rows, max_nr_ports, emerg_wr (5.3.4)
EMERG_WR_OFFSET = 8
OUTPUT_PIECE = 64 * 1024
MAX_RESTORED_INPUT = 64 << 20  # host input a saved state may carry


class _HostInput:
    """Bytes from the host waiting for receive buffers: a queue of chunks (no copying on append)."""

    def __init__(self) -> None:
        self._chunks: deque[memoryview] = deque()
        self._lock = threading.Lock()
        self.size = 0

    def append(self, data: bytes) -> None:
        if data:
            with self._lock:
                self._chunks.append(memoryview(bytes(data)))
                self.size += len(data)

    def take(self, limit: int) -> list[memoryview]:
        """Up to ``limit`` bytes from the front, as pieces in order."""
        pieces: list[memoryview] = []
        with self._lock:
            while limit and self._chunks:
                chunk = self._chunks[0]
                piece = chunk[:limit]
                if len(piece) == len(chunk):
                    self._chunks.popleft()
                else:
                    self._chunks[0] = chunk[len(piece) :]
                pieces.append(piece)
                limit -= len(piece)
                self.size -= len(piece)
        return pieces

    def __bool__(self) -> bool:
        return self.size > 0

    def peek(self) -> bytes:
        """Everything waiting, without taking it."""
        with self._lock:
            return b"".join(bytes(chunk) for chunk in self._chunks)


@dataclass(frozen=True)
class ConsoleState:
    """Host input the driver has not taken yet."""

    pending_input: bytes


class VirtioConsole(VirtioDevice):
    """One console port: ``output`` receives what the guest writes; :meth:`receive` feeds it."""

    name = "console"
    device_id = DEVICE_ID
    features = VIRTIO_CONSOLE_F_EMERG_WRITE
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, output: Callable[[bytes], None]) -> None:
        super().__init__()
        self._output = output
        self._input = _HostInput()

    @property
    def pending_input(self) -> int:
        """Host bytes the driver has not taken yet."""
        return self._input.size

    # --- configuration space -----------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return CONFIG.pack(0, 0, 1, 0)

    # --- state ---------------------------------------------------------------------------------
    def save_state(self) -> ConsoleState:
        return ConsoleState(self._input.peek())

    def restore_state(self, state: object | None) -> None:
        if not isinstance(state, ConsoleState):
            raise StateError(f"virtio console: expected a ConsoleState, not {type(state).__name__}")
        pending = check_bytes(state, "pending_input", MAX_RESTORED_INPUT)
        self._input.take(self._input.size)
        self._input.append(pending)

    def write_config(self, offset: int, size: int, value: int) -> None:
        if offset == EMERG_WR_OFFSET:  # allowed at any time, even unconfigured (5.3.5.1)
            self.stats["emergency_writes"] += 1
            self._emit(bytes([value & 0xFF]))
        else:
            super().write_config(offset, size, value)

    # --- host input --------------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Host input for the guest (any thread): queued, then delivered as buffers allow."""
        self._input.append(data)
        with self.lock:
            self.stats["received_bytes"] += len(data)
            try:
                self._deliver()
            except QueueError as err:
                self.broken(err)

    def _deliver(self) -> None:
        """Copy waiting input into receive buffers while there are both (lock held)."""
        if not self.active or not self.queues[RECEIVEQ].ready:
            return
        queue, memory = self.queues[RECEIVEQ], self.memory
        completed = 0
        try:
            while self._input and queue.pending(memory):
                chain = queue.pop(memory)
                if chain is None:
                    break
                self.complete(RECEIVEQ, chain, self._fill(chain))
                completed += 1
        finally:
            if completed:
                self.signal(RECEIVEQ)

    def _fill(self, chain: DescriptorChain) -> int:
        if chain.readable:
            self.stats["receive_chains_malformed"] += 1
            log.debug("virtio console: device-readable buffer in the receiveq (head %d), skipped", chain.head)
            return 0
        written, memory = 0, self.memory
        for buffer in chain.writable:
            offset = 0
            for piece in self._input.take(buffer.len):
                memory.view(buffer.gpa + offset, len(piece))[:] = piece
                offset += len(piece)
            written += offset
            if offset < buffer.len:
                break
        self.stats["delivered_bytes"] += written
        return written

    # --- queues --------------------------------------------------------------------------
    def process(self, queue_index: int) -> None:
        if queue_index == RECEIVEQ:
            self._deliver()
        elif queue_index == TRANSMITQ:
            self._transmit()

    def _transmit(self) -> None:
        completed, memory = 0, self.memory
        try:
            for chain in self.chains(TRANSMITQ):
                if chain.writable:
                    self.stats["transmit_chains_malformed"] += 1
                    log.debug("virtio console: device-writable buffer in the transmitq (head %d), ignored", chain.head)
                for buffer in chain.readable:
                    for start in range(0, buffer.len, OUTPUT_PIECE):
                        length = min(OUTPUT_PIECE, buffer.len - start)
                        self._emit(bytes(memory.view(buffer.gpa + start, length)))
                self.complete(TRANSMITQ, chain, 0)
                completed += 1
        finally:
            if completed:
                self.signal(TRANSMITQ)

    def _emit(self, data: bytes) -> None:
        try:
            self._output(data)
        except OSError as err:
            self.stats["output_errors"] += 1
            log.warning("virtio console: output failed: %s", err)
            return
        self.stats["transmitted_bytes"] += len(data)
