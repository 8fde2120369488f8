"""virtio-rng (device ID 4, virtio 1.2 section 5.4): entropy from the host's getrandom().

One request queue; each chain's device-writable buffers are filled with random bytes
(at most :data:`MAX_REQUEST` per chain, so a guest cannot make the host do unbounded
work in one request).
"""

from __future__ import annotations

import os
from typing import Callable

from .device import VirtioDevice

DEVICE_ID = 4
QUEUE_SIZE = 256
MAX_REQUEST = 64 * 1024


class VirtioRng(VirtioDevice):
    name = "rng"
    device_id = DEVICE_ID
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, source: Callable[[int], bytes] = os.getrandom) -> None:
        super().__init__()
        self._source = source

    def process(self, queue_index: int) -> None:
        completed = 0
        for chain in self.chains(queue_index):
            wanted = min(sum(b.len for b in chain.writable), MAX_REQUEST)
            written = chain.write_all(self.memory, self._source(wanted))
            self.stats["bytes"] += written
            self.complete(queue_index, chain, written)
            completed += 1
        if completed:  # no used buffer, no interrupt (Linux counts those as spurious)
            self.signal(queue_index)
