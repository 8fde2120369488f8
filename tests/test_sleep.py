"""ACPI S3: the guest suspends, an RTC alarm or Machine.wake() wakes it at its FACS waking vector.

The guest is guests/asm/s3.asm (see guests/README.md): it reports the state the wake left it in.
The pure parts (the wake's register state, the LAPIC's power-on page, which wake events a
machine has) are checked without KVM first.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from pykvm.devices.acpi_pm import RTC_EN, SLP_EN, SLP_TYP_SHIFT, AcpiPm
from pykvm.devices.cmos import HOURS_ALARM, MINUTES_ALARM, REG_B, REG_B_24H, REG_B_AIE, SECONDS_ALARM, Cmos
from pykvm.events import Event
from pykvm.machine import Machine
from pykvm.native import lib
from pykvm.result import ExitReason, RunResult
from pykvm.sleep import Sleep
from pykvm.x86.acpi import FACS_WAKING_VECTOR_OFFSET, SLP_TYP_S3
from pykvm.x86.layout import LAPIC_ADDR
from pykvm.x86.wake import (
    LAPIC_DFR,
    LAPIC_ID,
    LAPIC_LVT_LINT0,
    LAPIC_LVT_TIMER,
    LAPIC_SVR,
    LAPIC_VERSION,
    RESET_DEBUGREGS,
    reset_lapic,
    waking_regs,
    waking_sregs,
)
from tests.conftest import guest

VECTOR = 0x8008  # where s3.elf's wake routine starts
BEFORE = "s3: _S3_ type 1, waking vector 00008008\n"
WOKEN = "s3: woken at 0800:0008, cr0.pe=0, if=0, ds=0000, ss=0000\n"
BY_ALARM = (
    BEFORE + "s3: suspending, waking on the rtc alarm\n" + WOKEN + "s3: pm1_sts wak=1 rtc=1\ns3: rtc c=a0\n"
    "s3: irq 8 pending=1\ns3: irq 8 delivered\ns3: resumed\n"
)
BY_HOST = (
    BEFORE + "s3: suspending until woken\n" + WOKEN + "s3: pm1_sts wak=1 rtc=0\ns3: rtc c=00\n"
    "s3: irq 8 pending=0\ns3: resumed\n"
)
WAIT = 60  # seconds a test waits for the guest to suspend, far above what it takes


# --- the wake's vCPU state, without KVM ---------------------------------------------------------


@pytest.mark.parametrize(
    ("vector", "cs", "ip"),
    [(0x8008, 0x0800, 0x8), (0x1000, 0x0100, 0), (0x9FFFF, 0x9FFF, 0xF), (0x12345678, 0x4567, 0x8)],
)
def test_the_bsp_enters_the_waking_vector_as_segment_and_offset(vector: int, cs: int, ip: int) -> None:
    regs, sregs = waking_regs(vector), waking_sregs(vector, bsp=True)
    assert (sregs.cs.selector, sregs.cs.base, regs.rip) == (cs, cs << 4, ip)  # above 1 MiB: SeaBIOS's 16 bits


def test_the_wake_leaves_real_mode_with_zeroed_registers_and_interrupts_off() -> None:
    regs, sregs = waking_regs(VECTOR), waking_sregs(VECTOR, bsp=True)
    assert (regs.rflags, regs.rsp) == (0x2, 0x1000)
    assert [getattr(regs, name) for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r15")] == [0] * 9
    data = (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss)
    assert [(segment.selector, segment.base, segment.limit) for segment in data] == [(0, 0, 0xFFFF)] * 5
    assert (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer) == (0x10, 0, 0, 0)
    assert (sregs.idt.base, sregs.idt.limit) == (0, 0x3FF)


@pytest.mark.parametrize(("bsp", "apic_base"), [(True, LAPIC_ADDR | 0x900), (False, LAPIC_ADDR | 0x800)])
def test_the_apic_is_back_in_xapic_mode_at_its_default_base(bsp: bool, apic_base: int) -> None:
    assert waking_sregs(VECTOR, bsp).apic_base == apic_base


def register(page: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", page, offset)[0])


@pytest.mark.parametrize(("bsp", "lint0"), [(True, 0x700), (False, 0x10000)])
def test_the_lapic_page_is_the_power_on_one(bsp: bool, lint0: int) -> None:
    current = bytes(range(256)) * 4  # whatever the guest left, version register included
    page = reset_lapic(current, apic_id=3, bsp=bsp)
    assert len(page) == len(current)
    assert register(page, LAPIC_VERSION) == register(current, LAPIC_VERSION)
    assert register(page, LAPIC_ID) == 3 << 24
    assert (register(page, LAPIC_DFR), register(page, LAPIC_SVR)) == (0xFFFFFFFF, 0xFF)  # flat, software-disabled
    assert (register(page, LAPIC_LVT_LINT0), register(page, LAPIC_LVT_TIMER)) == (lint0, 0x10000)
    assert register(page, 0x380) == 0  # the timer's initial count: stopped
    assert page[0x100:0x280] == bytes(0x180)  # ISR, TMR and IRR: nothing in service or pending


def test_the_debug_registers_are_those_of_a_reset() -> None:
    assert struct.unpack("<16Q", RESET_DEBUGREGS)[4:6] == (0xFFFF0FF0, 0x400)


# --- which wake events a machine has, without KVM -------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_795_000_000_250_000_000  # a quarter of a second into a second

    def __call__(self) -> int:
        return self.now


def sleep_of(rtc_en: bool, aie: bool) -> Sleep:
    pm = AcpiPm(lambda: None, lambda: None)
    cmos = Cmos(64 << 20, clock=Clock())
    pm.write(2, 2, RTC_EN if rtc_en else 0)
    alarm = ((SECONDS_ALARM, 0xC0), (MINUTES_ALARM, 0xC0), (HOURS_ALARM, 0xC0))  # "don't care": the next update
    for index, value in (*alarm, (REG_B, REG_B_24H | (REG_B_AIE if aie else 0))):
        cmos.write(0, 1, index)
        cmos.write(1, 1, value)
    pm.write(4, 2, SLP_EN | SLP_TYP_S3 << SLP_TYP_SHIFT)
    return Sleep(pm, cmos, [], None, 0, None)  # type: ignore[arg-type]  # alarm() needs neither


@pytest.mark.parametrize(("rtc_en", "aie", "alarm"), [(True, True, 0.75), (True, False, None), (False, True, None)])
def test_the_rtc_alarm_wakes_the_machine_only_with_rtc_en_and_aie(rtc_en: bool, aie: bool, alarm: float | None) -> None:
    sleep = sleep_of(rtc_en, aie)
    assert sleep.asleep
    assert sleep.alarm() == alarm


# --- on KVM -------------------------------------------------------------------------------------------


@pytest.fixture
def s3_machine(machine_factory: Callable[..., Machine]) -> Callable[..., tuple[Machine, list[Event]]]:
    def make(cmdline: str = "", cpus: int = 1) -> tuple[Machine, list[Event]]:
        machine = machine_factory(memory="64M", cpus=cpus)
        events: list[Event] = []
        machine.events.listen(events.append)
        machine.load(guest("s3.elf"), cmdline=cmdline)
        return machine, events

    return make


@contextlib.contextmanager
def running(machine: Machine) -> Iterator[list[RunResult]]:
    """``machine`` runs on another thread inside; afterwards the list holds how the run ended."""
    results: list[RunResult] = []
    thread = threading.Thread(target=lambda: results.append(machine.run(timeout=120)), name="test-run")
    thread.start()
    try:
        yield results
    except BaseException:
        machine.stop()
        raise
    finally:
        thread.join()


def wait_for(machine: Machine, name: str, happened: Callable[[], bool]) -> None:
    """Wait until the event ``name``, unless ``happened()`` says it came already."""
    seen = threading.Event()
    machine.events.listen(lambda event: seen.set() if event.name == name else None)
    if not happened():
        assert seen.wait(WAIT), f"no {name} event"


def wait_until_suspended(machine: Machine) -> None:
    wait_for(machine, "suspended", lambda: machine.suspended)


def names(events: list[Event]) -> list[tuple[str, dict[str, Any]]]:
    return [(event.name, event.properties) for event in events if event.name in ("suspended", "woken")]


def test_an_rtc_alarm_wakes_the_guest_at_its_waking_vector(s3_machine) -> None:
    machine, events = s3_machine("alarm")
    result = machine.run(timeout=120)
    assert (result.reason, result.status, result.serial.decode()) == (ExitReason.DEBUG_EXIT, 1, BY_ALARM)
    assert names(events) == [("suspended", {}), ("woken", {"reason": "rtc", "vector": VECTOR})]
    assert not machine.suspended


def test_machine_wake_wakes_a_guest_that_set_no_alarm(s3_machine) -> None:
    machine, events = s3_machine()
    with running(machine) as results:
        wait_until_suspended(machine)
        assert machine.status().state == "suspended"
        assert machine.wake()
    assert (results[0].reason, results[0].serial.decode()) == (ExitReason.DEBUG_EXIT, BY_HOST)
    assert names(events) == [("suspended", {}), ("woken", {"reason": "host", "vector": VECTOR})]
    assert not machine.wake()  # it no longer sleeps


def vcpu_cpu_seconds(thread_ids: set[int]) -> float:
    return sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in thread_ids)


def test_a_suspended_machine_waits_without_spinning(s3_machine) -> None:
    machine, _ = s3_machine(cpus=2)
    with running(machine):
        wait_until_suspended(machine)
        threads = {t.native_id for t in threading.enumerate() if t.name in ("test-run", "pykvm-vcpu1")}
        exits, cpu = machine.stats().exits_by_reason, vcpu_cpu_seconds(threads)
        time.sleep(1.0)
        assert machine.stats().exits_by_reason == exits  # no vCPU entered the guest
        assert vcpu_cpu_seconds(threads) - cpu <= 0.02  # their threads waited (a spinning one takes ~1 s)
        assert machine.suspended
        machine.wake()


def test_after_the_wake_the_aps_wait_for_a_sipi(s3_machine) -> None:
    machine, _ = s3_machine(cpus=2)
    assert machine.vcpus[1].get_mp_state() == lib.KVM_MP_STATE_UNINITIALIZED  # never started
    with running(machine) as results:
        wait_until_suspended(machine)
        machine.wake()
    assert results[0].serial.decode() == BY_HOST
    assert machine.vcpus[1].get_mp_state() == lib.KVM_MP_STATE_INIT_RECEIVED


def test_a_machine_sleeps_across_runs_and_wakes_between_them(s3_machine) -> None:
    machine, _ = s3_machine()
    with running(machine) as results:
        wait_until_suspended(machine)
        machine.stop()
    assert results[0].reason is ExitReason.STOPPED
    assert machine.suspended
    assert machine.wake()  # no run: the machine is reset here for the next one
    result = machine.run(timeout=120)
    assert results[0].serial.decode() + result.serial.decode() == BY_HOST


def test_a_run_of_a_suspended_machine_starts_asleep(s3_machine) -> None:
    machine, _ = s3_machine()
    with running(machine) as results:
        wait_until_suspended(machine)
        machine.stop()
    with running(machine) as again:
        wait_for(machine, "started", lambda: machine.running)
        assert machine.status().state == "suspended"
        assert machine.wake()
    assert results[0].serial.decode() + again[0].serial.decode() == BY_HOST


def test_a_wake_without_a_waking_vector_resets_the_machine(s3_machine) -> None:
    machine, events = s3_machine()
    with running(machine) as results:
        wait_until_suspended(machine)
        machine.memory.write_u32(machine.acpi.tables["FACS"] + FACS_WAKING_VECTOR_OFFSET, 0)  # as if the OS wrote none
        machine.wake()
    assert (results[0].reason, results[0].status) == (ExitReason.RESET, 0)
    assert "no waking vector" in results[0].diagnosis
    assert names(events)[-1] == ("woken", {"reason": "host", "vector": 0})


def test_a_snapshot_of_a_suspended_machine_restores_suspended(s3_machine, tmp_path) -> None:
    machine, _ = s3_machine()
    with running(machine) as results:
        wait_until_suspended(machine)
        machine.snapshot(tmp_path / "snap")
        assert machine.suspended
        machine.wake()
    assert results[0].serial.decode() == BY_HOST
    with Machine.restore(tmp_path / "snap", capture_serial=True) as restored:
        assert restored.suspended
        with running(restored) as again:
            wait_until_suspended(restored)
            assert restored.wake()
        assert BEFORE + "s3: suspending until woken\n" + again[0].serial.decode() == BY_HOST


def test_a_machine_that_does_not_sleep_is_not_woken(machine_factory) -> None:
    with_acpi, without = machine_factory(), machine_factory(irqchip=False)
    for machine in (with_acpi, without):
        assert not machine.suspended
        assert not machine.wake()
