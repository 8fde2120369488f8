"""The host memory policy: the idle memory tax as numbers, then the manager over real balloons.

Pure policy first (ESX's shares-per-page ratio, Waldspurger OSDI 2002, 5.2), then the
mechanism against balloons driven by the test harness, then (KVM) two or three balloon
guests whose working sets differ and change.
"""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from pykvm.devices.virtio import mmio
from pykvm.devices.virtio.balloon import F_STATS_VQ, VirtioBalloon
from pykvm.errors import ConfigError
from pykvm.memory import GuestMemory
from pykvm.memory_policy import MemoryManager, VmMemory, active_memory, idle_tax_targets, shares_per_page, tax_cost
from pykvm.x86.layout import MIB

from conftest import guest
from virtio_driver import connect

M = MIB


def vm(name: str, ram: int, active: int, shares: float | None = None, floor: int = 0) -> VmMemory:
    return VmMemory(name, ram * M, active * M, ram if shares is None else shares, floor * M)


# --- the ratio ------------------------------------------------------------------------------------
def test_shares_per_page_is_waldspurgers_rho() -> None:
    # rho = S / (P (f + k (1 - f))), k = 1 / (1 - tau): S 1000, P 100, f 0.5, tau 0.75 -> k 4 -> 1000 / 250
    assert shares_per_page(1000, 100, 50, 0.75) == pytest.approx(4.0)
    assert shares_per_page(1000, 100, 100, 0.75) == pytest.approx(10.0)  # all active: S / P
    assert shares_per_page(1000, 100, 0, 0.0) == pytest.approx(10.0)  # no tax: idle counts as active
    assert shares_per_page(1000, 0, 0, 0.5) == float("inf")


@pytest.mark.parametrize("tau", [-0.1, 1.0, 2.0])
def test_the_tax_rate_is_in_0_to_1(tau: float) -> None:
    with pytest.raises(ConfigError, match="tax rate"):
        tax_cost(tau)


# --- targets -------------------------------------------------------------------------------------
def test_nothing_is_reclaimed_when_everything_fits() -> None:
    assert idle_tax_targets([vm("a", 128, 10), vm("b", 128, 100)], 256 * M) == {"a": 0, "b": 0}


def test_the_sum_of_what_the_vms_keep_fits_the_budget() -> None:
    vms = [vm("a", 128, 84), vm("b", 128, 20), vm("c", 256, 200)]
    targets = idle_tax_targets(vms, 300 * M)
    assert sum(v.ram - targets[v.name] for v in vms) <= 300 * M
    assert sum(v.ram - targets[v.name] for v in vms) > 300 * M - M  # and by no more than a step


def test_idle_memory_is_taxed_the_idle_vm_gives_most() -> None:
    # a: 84 MiB active of 128, b: 20 of 128, 96 MiB to reclaim, tau 0.75 (k = 4).
    # b's idle pages cost more: it gives 48 MiB alone (its cost 20 + 4 * 60 = a's 84 + 4 * 44),
    # then the two give the remaining 48 MiB in turn: b 72 MiB, a 24 MiB.
    targets = idle_tax_targets([vm("a", 128, 84), vm("b", 128, 20)], 160 * M, 0.75)
    assert targets["b"] == pytest.approx(72 * M, abs=M) and targets["a"] == pytest.approx(24 * M, abs=M)


def test_without_the_tax_memory_is_shared_by_shares_alone() -> None:
    targets = idle_tax_targets([vm("a", 128, 120), vm("b", 128, 0)], 128 * M, 0.0)
    assert targets == {"a": 64 * M, "b": 64 * M}
    weighted = idle_tax_targets([vm("a", 128, 0, shares=300), vm("b", 128, 0, shares=100)], 128 * M, 0.0)
    assert weighted["a"] == pytest.approx(32 * M, abs=M) and weighted["b"] == pytest.approx(96 * M, abs=M)


def test_a_higher_tax_rate_takes_more_from_the_idle_vm() -> None:
    vms = [vm("busy", 128, 100), vm("idle", 128, 10)]
    taken = [idle_tax_targets(vms, 160 * M, tau)["idle"] for tau in (0.0, 0.5, 0.75, 0.9)]
    assert taken == sorted(taken) and taken[0] < taken[-1]


def test_swapping_working_sets_swaps_targets() -> None:
    first = idle_tax_targets([vm("a", 128, 80), vm("b", 128, 16)], 160 * M)
    second = idle_tax_targets([vm("a", 128, 16), vm("b", 128, 80)], 160 * M)
    assert first["b"] > first["a"] and second == {"a": first["b"], "b": first["a"]}


def test_no_vm_goes_below_its_floor_even_when_the_budget_cannot_be_met() -> None:
    targets = idle_tax_targets([vm("a", 64, 0, floor=32), vm("b", 64, 0, floor=48)], 16 * M)
    assert targets == {"a": 32 * M, "b": 16 * M}


def test_the_step_is_whole_pages() -> None:
    with pytest.raises(ConfigError):
        idle_tax_targets([vm("a", 64, 0)], 0, step=1000)


def test_active_memory_from_the_statistics() -> None:
    assert active_memory({"memtot": 100 * M, "avail": 70 * M, "memfree": 10 * M}, 128 * M) == 30 * M
    assert active_memory({"memtot": 100 * M, "memfree": 10 * M}, 128 * M) == 90 * M
    assert active_memory({}, 128 * M) == 128 * M  # nothing reported: all of it counts as active
    assert active_memory({"memtot": 200 * M, "avail": 0}, 128 * M) == 128 * M


# --- the manager over harness-driven balloons --------------------------------------------------------
def harness_machine(ram: int, memtot: int, avail: int):  # type: ignore[no-untyped-def]
    memory = GuestMemory([(0, ram)])
    device = VirtioBalloon()
    driver = connect(device, memory, 0x1000, buffer_area=(0x40000, 0x40000))
    driver.negotiate(mmio.VIRTIO_F_VERSION_1 | 1 << F_STATS_VQ)

    def post_stats(total: int, available: int) -> None:
        driver.post(2, [struct.pack("<HQHQ", 5, total, 6, available)], [])
        driver.notify(2)

    post_stats(memtot, avail)
    return SimpleNamespace(balloon=device, memory=memory, post_stats=post_stats, driver=driver)


def test_the_manager_reads_the_statistics_and_applies_the_targets() -> None:
    a = harness_machine(128 * M, 124 * M, 40 * M)  # 84 MiB active
    b = harness_machine(128 * M, 124 * M, 104 * M)  # 20 MiB active
    try:
        manager = MemoryManager("160M", tax_rate=0.75, stats_timeout=0.05)
        assert manager.add(a, name="a") == "a" and manager.add(b, name="b") == "b"
        targets = manager.rebalance()
        assert a.balloon.target == targets["a"] and b.balloon.target == targets["b"]
        assert targets["b"] == pytest.approx(72 * M, abs=M)
        # each balloon's statistics buffer went back to its driver: "fresh numbers, please"
        assert len(a.driver.used(2)) == 1 and a.balloon.stats["stats_requests"] == 1
        a.post_stats(124 * M, 104 * M)  # the working sets swap
        b.post_stats(124 * M, 40 * M)
        swapped = manager.rebalance(refresh=False)
        assert swapped == {"a": targets["b"], "b": targets["a"]}
        assert manager.report()["a"]["active"] == 20 * M
    finally:
        a.memory.close()
        b.memory.close()


def test_the_manager_wants_a_balloon() -> None:
    with pytest.raises(ConfigError, match="balloon"):
        MemoryManager("1G").add(SimpleNamespace(balloon=None, memory=None))  # type: ignore[arg-type]


# --- guests (KVM): the policy moves memory as working sets change --------------------------------------
RAM = 128 * M


def wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.kvm
def test_the_policy_moves_memory_between_guests_as_their_working_sets_change(machine_factory) -> None:
    image: Path = guest("balloon.bin")
    working_sets = {"a": 72, "b": 16}
    machines = {}
    for name, ws in working_sets.items():
        machine = machine_factory(memory=RAM, balloon=True)
        machine.load(image, mode="long", cmdline=f"ws={ws}")
        machines[name] = machine
    results: dict[str, object] = {}
    threads = [threading.Thread(target=lambda n=n, m=m: results.setdefault(n, m.run(timeout=120))) for n, m in machines.items()]
    for thread in threads:
        thread.start()
    process = psutil.Process()
    try:
        for name, machine in machines.items():
            wait_for(lambda m=machine: "memtot" in m.balloon.guest_stats(), 30, f"{name}'s first statistics")
        rss_full = process.memory_info().rss
        manager = MemoryManager("160M", tax_rate=0.75)
        for name, machine in machines.items():
            manager.add(machine, name=name)
        first = manager.rebalance()
        for name, machine in machines.items():
            assert machine.balloon.wait_actual(first[name], 30), (name, machine.balloon.actual, first[name])
        assert first["b"] > first["a"] + 32 * M  # the idle guest gives most
        given = sum(first.values())
        assert rss_full - process.memory_info().rss >= 0.9 * given

        machines["a"].serial.receive(b"w16\n")  # the working sets swap
        machines["b"].serial.receive(b"w72\n")
        wait_for(lambda: machines["a"].balloon.refresh_stats(1) and
                 active_memory(machines["a"].balloon.guest_stats(), RAM) < 24 * M, 30, "a's smaller working set")  # fmt: skip
        # b's working set cannot grow into its balloon: its statistics show it pressed against it
        # (all of its memory active), the policy gives it more, it grows, and so on: a few rounds.
        rounds, previous, second = 0, first, {}
        while rounds < 8:
            second = manager.rebalance()
            for name, machine in machines.items():
                assert machine.balloon.wait_actual(second[name], 30), (name, machine.balloon.actual, second[name])
            rounds += 1
            if second == previous:
                break
            previous = second
        assert second["a"] > second["b"] + 32 * M, (rounds, second)  # now a is the idle one
        assert second["a"] == pytest.approx(first["b"], abs=2 * M), (rounds, second, first)
        assert manager.report()["b"]["active"] >= 72 * M
    finally:
        for machine in machines.values():
            machine.serial.receive(b"q\n")
        for thread in threads:
            thread.join(60)
    for name, result in results.items():
        assert result.status == 1, (name, result.diagnosis, result.serial)  # type: ignore[attr-defined]
