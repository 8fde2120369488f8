"""Host memory policy for several machines in one process: balloon targets from an idle-memory tax.

:class:`MemoryManager` holds machines that have a balloon and a host memory *budget*: the
guest memory they may hold together, ``sum(RAM - balloon target) <= budget``.  On
:meth:`~MemoryManager.rebalance` (or every ``interval`` seconds after
:meth:`~MemoryManager.start`) it reads each guest's balloon statistics, works out how much
of its memory is active, decides the targets and applies them.

The decision is VMware ESX's idle memory tax (C. A. Waldspurger, "Memory Resource
Management in VMware ESX Server", OSDI 2002, section 5.2), as a pure function of numbers
(:func:`idle_tax_targets`) so that it is tested without guests.  Each VM has shares ``S``
and holds ``P`` pages, a fraction ``f`` of them active; its shares-per-page ratio is

    rho = S / (P * (f + k * (1 - f))),   k = 1 / (1 - tau)

where ``tau`` (0 <= tau < 1) is the tax rate: an idle page costs ``k`` times an active one.
Memory is reclaimed, a step at a time, from the VM with the lowest ``rho`` until the budget
holds.  ``tau = 0`` is plain proportional sharing; ESX's default 0.75 makes idle pages cost 4x.
A VM's active memory comes from its statistics: ``memtot - avail`` (or ``memtot - memfree``);
a VM without statistics counts as wholly active.  No VM is taken below ``min_memory``.

Also here: :func:`ksm_status`, what the kernel's same-page merging (KSM, used by
``share_pages=True``) reports in ``/sys/kernel/mm/ksm``.  Merging only runs once it is
switched on (as root)::

    echo 1    > /sys/kernel/mm/ksm/run              # start the ksmd scanner (0 stops it, 2 unmerges all)
    echo 1000 > /sys/kernel/mm/ksm/pages_to_scan    # pages per wake-up (default 100)
    echo 20   > /sys/kernel/mm/ksm/sleep_millisecs  # between wake-ups
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from .config import parse_size
from .errors import ConfigError
from .x86.layout import MIB, PAGE_SIZE

if TYPE_CHECKING:
    from .devices.virtio.balloon import VirtioBalloon
    from .machine import Machine

log = logging.getLogger(__name__)

DEFAULT_TAX_RATE = 0.75  # ESX's default: an idle page costs 4 active ones
KSM_DIR = Path("/sys/kernel/mm/ksm")


# --- the policy: numbers in, targets out -------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VmMemory:
    """What the policy knows about one VM (bytes)."""

    name: str
    ram: int  # guest RAM
    active: int  # memory in active use
    shares: float  # its claim on memory (ESX shares); the manager's default is RAM in MiB
    floor: int = 0  # never leave it less than this


def tax_cost(tau: float) -> float:
    """``k = 1 / (1 - tau)``: what an idle page costs, counted in active pages."""
    if not 0 <= tau < 1:
        raise ConfigError(f"the idle memory tax rate must be in [0, 1), not {tau}")
    return 1 / (1 - tau)


def shares_per_page(shares: float, held: int, active: int, tau: float) -> float:
    """Waldspurger's ``rho = S / (P (f + k (1 - f)))`` with ``P = held`` and ``f = active / held``."""
    if held <= 0:
        return float("inf")
    f = min(1.0, active / held)
    return shares / (held * (f + tax_cost(tau) * (1 - f)))


def idle_tax_targets(vms: Iterable[VmMemory], budget: int, tau: float = DEFAULT_TAX_RATE, step: int = MIB) -> dict[str, int]:
    """Balloon targets (bytes, by VM name) that fit the VMs' memory into ``budget``.

    Starting from every VM holding all of its RAM, ``step`` bytes at a time go from the VM
    with the lowest shares-per-page ratio (ties: the first by name) until
    ``sum(ram - target) <= budget`` or every VM is at its floor.
    """
    vms = sorted(vms, key=lambda vm: vm.name)
    tax_cost(tau)  # validates tau
    if step <= 0 or step % PAGE_SIZE:
        raise ConfigError(f"the reclaim step must be a positive multiple of 4 KiB, not {step}")
    held = {vm.name: vm.ram for vm in vms}
    excess = sum(held.values()) - budget
    heap = [(shares_per_page(vm.shares, vm.ram, vm.active, tau), i) for i, vm in enumerate(vms) if vm.ram > vm.floor]
    heapq.heapify(heap)
    while excess > 0 and heap:
        _, i = heapq.heappop(heap)
        vm = vms[i]
        take = min(step, held[vm.name] - vm.floor)
        held[vm.name] -= take
        excess -= take
        if held[vm.name] > vm.floor:
            heapq.heappush(heap, (shares_per_page(vm.shares, held[vm.name], vm.active, tau), i))
    return {vm.name: vm.ram - held[vm.name] for vm in vms}


def active_memory(stats: Mapping[str, int], ram: int) -> int:
    """A guest's active memory from its balloon statistics: ``memtot - avail`` (or
    ``- memfree``), clamped to ``[0, ram]``; all of ``ram`` when it reported nothing usable."""
    total = stats.get("memtot")
    free = stats.get("avail", stats.get("memfree"))
    if total is None or free is None:
        return ram
    return max(0, min(ram, total - free))


# --- the mechanism: machines in, targets applied -------------------------------------------------
@dataclasses.dataclass
class Managed:
    """A machine under the manager, and what the last rebalance saw and decided for it."""

    name: str
    balloon: VirtioBalloon
    ram: int
    shares: float
    active: int | None = None
    target: int | None = None


class MemoryManager:
    """Balloon targets for several machines from one host memory budget (see the module doc).

    >>> manager = MemoryManager("192M", tax_rate=0.75)        # doctest: +SKIP
    >>> manager.add(vm_a); manager.add(vm_b)                  # doctest: +SKIP
    >>> manager.rebalance()                                   # doctest: +SKIP
    {'vm0': 25165824, 'vm1': 75497472}
    """

    def __init__(
        self,
        budget: str | int,
        *,
        tax_rate: float = DEFAULT_TAX_RATE,
        min_memory: str | int = "16M",
        step: str | int = "1M",
        interval: float = 1.0,
        stats_timeout: float = 0.5,
    ) -> None:
        self.budget = parse_size(budget)
        tax_cost(tax_rate)
        self.tax_rate = tax_rate
        self.min_memory = parse_size(min_memory)
        self.step = parse_size(step)
        self.interval = interval
        self.stats_timeout = stats_timeout
        self.vms: dict[str, Managed] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, machine: Machine, *, name: str | None = None, shares: float | None = None) -> str:
        """Manage ``machine`` (it needs ``balloon=True``); returns the name it is known by."""
        balloon = getattr(machine, "balloon", None)
        if balloon is None:
            raise ConfigError("a managed machine needs a balloon (balloon=True)")
        ram = machine.memory.size
        with self._lock:
            name = name or f"vm{len(self.vms)}"
            if name in self.vms:
                raise ConfigError(f"a machine named {name!r} is already managed")
            self.vms[name] = Managed(name, balloon, ram, shares if shares is not None else ram / MIB)
        return name

    def remove(self, name: str) -> None:
        with self._lock:
            self.vms.pop(name, None)

    def observe(self, refresh: bool = True) -> list[VmMemory]:
        """What the policy needs, read from each balloon (fresh statistics first if ``refresh``)."""
        with self._lock:
            vms = list(self.vms.values())
        if refresh:
            before = {vm.name: vm.balloon.stats_generation for vm in vms}
            for vm in vms:  # all requests first, then the answers (a driver refilling already will post)
                vm.balloon.request_stats()
            for vm in vms:
                if vm.balloon.stats_expected():
                    vm.balloon.wait_stats(before[vm.name], self.stats_timeout)
        observed = []
        for vm in vms:
            vm.active = active_memory(vm.balloon.guest_stats(), vm.ram)
            observed.append(VmMemory(vm.name, vm.ram, vm.active, vm.shares, min(self.min_memory, vm.ram)))
        return observed

    def rebalance(self, refresh: bool = True) -> dict[str, int]:
        """Observe, decide and apply the targets; returns them (bytes, by name)."""
        targets = idle_tax_targets(self.observe(refresh), self.budget, self.tax_rate, self.step)
        with self._lock:
            for name, target in targets.items():
                vm = self.vms.get(name)
                if vm is None:
                    continue
                if vm.target != target:
                    log.info("memory policy: %s active %d MiB, balloon %d MiB", name, (vm.active or 0) // MIB, target // MIB)
                vm.balloon.target = target
                vm.target = target
        return targets

    def report(self) -> dict[str, dict[str, int | float | None]]:
        """Per VM: RAM, shares, active memory, target and the driver's ``actual`` (bytes)."""
        with self._lock:
            return {
                vm.name: {"ram": vm.ram, "shares": vm.shares, "active": vm.active, "target": vm.target,
                          "actual": vm.balloon.actual}
                for vm in self.vms.values()
            }  # fmt: skip

    # --- periodic mode ------------------------------------------------------------------------
    def start(self) -> None:
        """Rebalance every ``interval`` seconds on a thread of its own until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="pykvm-memory-policy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.rebalance()
            except Exception as err:  # a policy round that fails must not end the manager
                log.error("memory policy: rebalance failed: %s", err)

    def __enter__(self) -> MemoryManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- kernel same-page merging ----------------------------------------------------------------------
_KSM_FILES = ("run", "pages_to_scan", "sleep_millisecs", "pages_shared", "pages_sharing", "pages_unshared",
              "pages_volatile", "full_scans", "use_zero_pages", "ksm_zero_pages")  # fmt: skip


def ksm_status(ksm_dir: Path | str = KSM_DIR) -> dict[str, object]:
    """What KSM reports: ``available``, its settings (``run``, ``pages_to_scan``,
    ``sleep_millisecs``), its counters (``pages_shared``: distinct merged pages kept,
    ``pages_sharing``: the mappings that now use them, i.e. pages saved), ``shared_bytes``,
    ``saved_bytes``, and this process's ``process_merging_pages`` / ``process_profit`` where the
    kernel has ``/proc/self/ksm_stat``."""
    ksm_dir = Path(ksm_dir)
    if not (ksm_dir / "run").exists():
        return {"available": False, "reason": f"{ksm_dir} does not exist (a kernel without CONFIG_KSM)"}
    status: dict[str, object] = {"available": True}
    for name in _KSM_FILES:
        try:
            status[name] = int((ksm_dir / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    status["shared_bytes"] = int(status.get("pages_shared", 0)) * PAGE_SIZE  # type: ignore[call-overload]
    status["saved_bytes"] = int(status.get("pages_sharing", 0)) * PAGE_SIZE  # type: ignore[call-overload]
    try:
        for line in Path(f"/proc/{os.getpid()}/ksm_stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("ksm_merging_pages", "ksm_process_profit") and value.strip().lstrip("-").isdigit():
                status["process_" + key.removeprefix("ksm_").replace("process_", "")] = int(value)
    except OSError:
        pass
    return status
