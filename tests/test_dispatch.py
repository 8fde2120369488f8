"""The exit dispatcher: exits to buses, everything else to a stop request, counts kept bounded."""

from __future__ import annotations

import threading
import time

import pytest

from pykvm.control import RunControl
from pykvm.devices.bus import Bus
from pykvm.dispatch import ADDRESSES_KEPT, ExitDispatcher, describe_internal_error
from pykvm.errors import DeviceError
from pykvm.kvm.exits import (
    DebugPortExit,
    FailEntryExit,
    GuestDebugExit,
    HltExit,
    InternalErrorExit,
    IoExit,
    MmioExit,
    OtherExit,
    ShutdownExit,
    SystemEventExit,
)
from pykvm.result import ExitReason


class FakeVcpu:
    id = 0

    def request_stop(self) -> None:
        pass

    def clear_stop(self) -> None:
        pass


class Register:
    """One 4-byte register that remembers writes and answers reads."""

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return self.value >> (8 * offset)

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def dispatcher() -> tuple[ExitDispatcher, Bus, Bus]:
    pio, mmio = Bus("port I/O"), Bus("MMIO")
    return ExitDispatcher(pio, mmio), pio, mmio


def control() -> RunControl:
    return RunControl([FakeVcpu()])  # type: ignore[list-item]


def test_port_reads_fill_every_element_of_a_string_access_and_writes_reach_the_device() -> None:
    dispatch, pio, _ = dispatcher()
    device = Register(0x11223344)
    pio.register(0x3E0, 4, device)
    data = bytearray(4)
    dispatch.handle(FakeVcpu(), IoExit(0x3E0, 2, 2, False, data, 0), control())  # type: ignore[arg-type]
    assert data == bytes.fromhex("44334433")
    dispatch.handle(FakeVcpu(), IoExit(0x3E1, 1, 1, True, b"\x7f", 0x7F), control())  # type: ignore[arg-type]
    dispatch.handle(FakeVcpu(), IoExit(0x3E2, 1, 2, True, b"\x01\x02", 0x01), control())  # type: ignore[arg-type]
    assert device.writes == [(1, 1, 0x7F), (2, 1, 0x01), (2, 1, 0x02)]


def test_mmio_writes_are_little_endian_values() -> None:
    dispatch, _, mmio = dispatcher()
    device = Register()
    mmio.register(0xD000_0000, 0x1000, device)
    dispatch.handle(FakeVcpu(), MmioExit(0xD000_0004, 4, True, b"\x01\x02\x03\x04", 0x04030201), control())  # type: ignore[arg-type]
    assert device.writes == [(4, 4, 0x04030201)]


@pytest.mark.parametrize(
    "exit, reason",
    [
        (DebugPortExit(21), ExitReason.DEBUG_EXIT),
        (HltExit(False), ExitReason.HALTED),
        (ShutdownExit(), ExitReason.TRIPLE_FAULT),
        (InternalErrorExit(1, (1, 0x90 << 8 | 1, 0)), ExitReason.INTERNAL_ERROR),
        (FailEntryExit(7, 1), ExitReason.FAIL_ENTRY),
        (SystemEventExit(1, ()), ExitReason.POWEROFF),
        (SystemEventExit(2, ()), ExitReason.RESET),
        (SystemEventExit(99, ()), ExitReason.UNHANDLED),
        (OtherExit(1234), ExitReason.UNHANDLED),
    ],
)
def test_every_other_exit_ends_the_run_with_its_reason(exit, reason) -> None:
    dispatch, _, _ = dispatcher()
    run = control()
    dispatch.handle(FakeVcpu(), exit, run)  # type: ignore[arg-type]
    assert run.stop is not None and run.stop.reason is reason


def test_a_debug_handler_keeps_its_own_events_and_leaves_the_others_to_end_the_run() -> None:
    dispatch, _, _ = dispatcher()
    seen: list[object] = []

    def claim_debug_exits(vcpu, exit, control) -> bool:  # type: ignore[no-untyped-def]
        seen.append(exit)
        return isinstance(exit, GuestDebugExit)

    dispatch.debug_handler = claim_debug_exits
    run = control()
    step, failure = GuestDebugExit(1, 0x1000, 1 << 14, 0), InternalErrorExit(1, ())
    dispatch.handle(FakeVcpu(), step, run)  # type: ignore[arg-type]
    dispatch.handle(FakeVcpu(), HltExit(False), control())  # type: ignore[arg-type]  # not a debug event
    assert run.stop is None and seen == [step]
    dispatch.handle(FakeVcpu(), failure, run)  # type: ignore[arg-type]
    assert seen == [step, failure] and run.stop is not None and run.stop.reason is ExitReason.INTERNAL_ERROR


def test_an_emulation_failure_names_the_instruction_bytes() -> None:
    insn = int.from_bytes(bytes([4, 0xF3, 0x48, 0x0F, 0xB8]), "little")
    assert describe_internal_error(InternalErrorExit(1, (1, insn, 0))).endswith("(bytes f3 48 0f b8)")


# Long mode, CPL0, at 1 MiB: 300 4-byte stores to consecutive addresses from 0xe0000000, where
# nothing is mapped (each one an MMIO exit), then a debug exit.
ADDRESS_SCAN = bytes(
    [0x48, 0xB8, 0x00, 0x00, 0x00, 0xE0, 0, 0, 0, 0,  # mov rax, 0xe0000000
     0xB9, 0x2C, 0x01, 0x00, 0x00,  # mov ecx, 300
     0x89, 0x08,  # loop: mov [rax], ecx
     0x48, 0x83, 0xC0, 0x04,  # add rax, 4
     0xFF, 0xC9,  # dec ecx
     0x75, 0xF6,  # jnz loop
     0x31, 0xC0,  # xor eax, eax
     0xE6, 0xF4]  # out 0xf4, al
)  # fmt: skip


def test_a_scan_of_the_address_space_keeps_a_bounded_table_and_counts_the_rest(machine_factory, tmp_path) -> None:
    image = tmp_path / "scan.bin"
    image.write_bytes(ADDRESS_SCAN)
    machine = machine_factory(memory="64M")
    machine.load(image, format="flat", mode="long")
    assert machine.run(timeout=30).exit_value == 0
    by_address, others = machine.vcpus[0].accesses_by_address()
    assert len(by_address) == ADDRESSES_KEPT and others == 300 - ADDRESSES_KEPT
    assert by_address[(True, 0xE000_0000, True)] == 1
    stats = machine.stats()
    assert 0 < stats.python_handler_ns < stats.wall_ns  # the time from each of those exits to the next entry
    counts = stats.exits_by_address
    assert counts["mmio 0xe0000000 write"] == 1
    assert counts[f"(other addresses, beyond the first {ADDRESSES_KEPT})"] == 300 - ADDRESSES_KEPT


def test_a_device_whose_read_returns_nothing_is_a_clear_error() -> None:
    class Broken:
        def read(self, offset: int, size: int) -> None:
            return None

        def write(self, offset: int, size: int, value: int) -> None:
            pass

    dispatch, pio, _ = dispatcher()
    pio.register(0x3E0, 1, Broken())  # type: ignore[arg-type]
    with pytest.raises(DeviceError, match=r"Broken.read\(0x0, 1\) at 0x3e0 returned None, not an int"):
        dispatch.handle(FakeVcpu(), IoExit(0x3E0, 1, 1, False, bytearray(1), 0), control())  # type: ignore[arg-type]


def test_well_known_ports_are_named_in_the_statistics() -> None:
    from pykvm.dispatch import address_label

    assert address_label("pio", 0x3FD, "read") == "pio 0x03fd read (COM1 LSR)"
    assert address_label("pio", 0x3E0, "write") == "pio 0x03e0 write"
    assert address_label("mmio", 0x3FD, "read") == "mmio 0x03fd read"


def test_the_statistics_label_each_vcpus_time_when_there_are_several() -> None:
    from pykvm.result import RunStats

    stats = RunStats({"io": 3}, {}, wall_ns=10**8, guest_ns=2 * 10**8, guest_ns_by_vcpu={0: 10**8, 1: 10**8})
    assert "in guest 0.200 s of vCPU time (vCPU 0 0.100 s, vCPU 1 0.100 s)" in stats.format()
    assert "of vCPU time" not in RunStats({"io": 1}, {}, guest_ns=5, guest_ns_by_vcpu={0: 5}).format()


def test_with_several_vcpus_device_accesses_take_turns() -> None:
    """Device models need not be thread-safe: two vCPU threads never run one at the same time."""

    class Unsafe:
        def __init__(self) -> None:
            self.inside = False
            self.overlaps = self.writes = 0

        def read(self, offset: int, size: int) -> int:
            return 0

        def write(self, offset: int, size: int, value: int) -> None:
            self.overlaps += self.inside
            self.inside = True
            time.sleep(0.0001)  # widen the window another thread would have to step into
            self.writes += 1
            self.inside = False

    pio, mmio = Bus("port I/O"), Bus("MMIO")
    device = Unsafe()
    pio.register(0x3E0, 1, device)
    dispatch = ExitDispatcher(pio, mmio, vcpus=2)
    threads = [threading.Thread(target=lambda: [dispatch.access(False, 0x3E0, 1, 1, True, b"\x01", 1) for _ in range(200)])
               for _ in range(2)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (device.writes, device.overlaps) == (400, 0)
