"""The pykvm side of the benchmark suite (``bench/run.py`` drives it; see bench/README.md).

Every function here measures pykvm in this process, through its public API
(:class:`pykvm.machine.Machine`), on the same guests and with the same parameters as
``bench/rawkvm.c``, and checks the result before returning a figure: a wrong exit count,
exit value, eventfd counter or computed value raises :class:`WrongResult`.

The memory figures need a fresh interpreter; ``python bench/pykvm_bench.py memory-probe``
prints them as one JSON object (``run.py`` starts it as a subprocess).

Timing: ``time.perf_counter_ns`` around :meth:`Machine.run` (or around the whole
lifecycle).  Every run is given ``run(timeout=RUN_TIMEOUT)``: pykvm's run monitor thread,
which every run starts anyway, enforces it; a run that times out is a wrong result.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUEST_DIR = ROOT / "guests" / "build"

# The bench guests' parameter block (guests/asm/bench_*.asm, rawkvm.c PARAM_*_OFF).
PARAM_COUNT_OFF = 8
PARAM_TARGET_OFF = 16
DEBUG_EXIT_PORT = 0xF4
POST_PORT = 0x80  # answered by pykvm's C fast path in every Machine (a CONSTANT handler)
PYTHON_PORT = 0x3E0  # unused by pykvm's machine: a Python device is registered there
MMIO_TARGET = 0xD0000000  # in the MMIO hole: no memory slot, every store exits
GUEST_MEMORY = "64M"  # rawkvm's GUEST_RAM_SIZE


class WrongResult(Exception):
    """A benchmark computed or observed something other than what it must: its figure is void."""


# --- guests and checks -------------------------------------------------------------------------
RUN_TIMEOUT = 120.0  # seconds; generous: the longest run (10^9 compute iterations) takes ~1.5 s


def guest_path(name: str) -> Path:
    path = GUEST_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: build the guests first (make guests, or make -C bench)")
    return path


def patched_copy(image: Path, out: Path, layout: str, offset: int, *values: int) -> Path:
    """A copy of the guest ``image`` at ``out`` with ``values`` packed (``struct`` format ``layout``) at
    file offset ``offset``: how a benchmark gives a guest its parameters."""
    data = bytearray(image.read_bytes())
    struct.pack_into(layout, data, offset, *values)
    out.write_bytes(data)
    return out


def patched_guest(name: str, count: int, target: int, directory: str | Path) -> Path:
    """A copy of bench guest ``name`` with its parameter block set, in ``directory``."""
    image = guest_path(name)
    with image.open("rb") as head:
        start = head.read(PARAM_TARGET_OFF + 8)
    if len(start) < PARAM_TARGET_OFF + 8 or start[0] != 0xEB:
        raise WrongResult(f"{name} has no bench parameter block")
    out = Path(directory) / f"{image.stem}-{count}-{target:x}.bin"
    return patched_copy(image, out, "<QQ", PARAM_COUNT_OFF, count, target)


class CountingDevice:
    """The tiniest device a bus accepts: reads give 0, writes are counted."""

    def __init__(self) -> None:
        self.reads = 0
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: after.get(key, 0) - before.get(key, 0) for key in after if after.get(key, 0) != before.get(key, 0)}


def check_debug_exit(result: object, expected: int = 0, what: str = "guest") -> None:
    from pykvm.result import ExitReason

    if result.reason is not ExitReason.DEBUG_EXIT or result.exit_value != expected:  # type: ignore[attr-defined]
        raise WrongResult(
            f"{what} ended with {result.reason.value} (exit value {result.exit_value}), "  # type: ignore[attr-defined]
            f"expected a debug exit with value {expected}: {result.diagnosis}"  # type: ignore[attr-defined]
        )


# --- rows 1 and 2: exit round trips ---------------------------------------------------------
class ExitBench:
    """One machine running ``bench_pio.bin`` / ``bench_mmio.bin`` with ``count`` bench exits.

    ``handler`` is ``"fast"`` (the C fast path answers the bench exit) or ``"python"``
    (a :class:`CountingDevice` on ``machine.pio`` / ``machine.mmio``, no fast handler).
    """

    def __init__(self, kind: str, handler: str, count: int, tmpdir: str | Path) -> None:
        from pykvm.kvm.fastpath import FastKind, Space
        from pykvm.machine import Machine

        if kind not in ("pio", "mmio") or handler not in ("fast", "python"):
            raise ValueError(f"unknown exit bench {kind}/{handler}")
        self.kind, self.handler, self.count = kind, handler, count
        self.machine = Machine(memory=GUEST_MEMORY)
        self.device: CountingDevice | None = None
        self.fast = None
        m = self.machine
        if kind == "pio":
            self.target = POST_PORT if handler == "fast" else PYTHON_PORT
            self.image = patched_guest("bench_pio.bin", count, self.target, tmpdir)
            if handler == "fast":
                # Port 0x80 already has a CONSTANT fast handler and a ConstantPort on machine.pio.
                self.fast = next(h for h in m.devices.fast.handlers if h.space is Space.PIO and h.base == POST_PORT)
            else:
                self.device = CountingDevice()
                m.pio.register(self.target, 1, self.device)
        else:
            self.target = MMIO_TARGET
            self.image = patched_guest("bench_mmio.bin", count, self.target, tmpdir)
            self.device = CountingDevice()
            m.mmio.register(self.target, 4, self.device)  # for completeness: the fast path answers first
            if handler == "fast":
                self.fast = m.devices.fast.add(FastKind.CONSTANT, Space.MMIO, self.target, 4)

    @property
    def label(self) -> str:
        return f"pykvm {self.kind} {self.handler}"

    def run_once(self) -> dict:
        """One run of the guest from its entry point; checked; ns per exit."""
        m = self.machine
        m.load(self.image, format="flat", mode="long")
        before = m.stats().exits_by_reason
        fast_before = self.fast.writes if self.fast is not None else 0
        dev_before = self.device.writes if self.device is not None else 0
        t0 = time.perf_counter_ns()
        result = m.run(timeout=RUN_TIMEOUT)
        t1 = time.perf_counter_ns()
        check_debug_exit(result, 0, self.label)
        exits = _delta(result.stats.exits_by_reason, before)
        expected = {"io": self.count + 1} if self.kind == "pio" else {"mmio": self.count, "io": 1}
        if exits != expected:
            raise WrongResult(f"{self.label}: exits by reason {exits}, expected {expected}")
        fast_writes = (self.fast.writes if self.fast is not None else 0) - fast_before
        dev_writes = (self.device.writes if self.device is not None else 0) - dev_before
        want_fast, want_dev = (self.count, 0) if self.handler == "fast" else (0, self.count)
        if fast_writes != want_fast or dev_writes != want_dev:
            raise WrongResult(
                f"{self.label}: C fast handler saw {fast_writes} writes, Python device {dev_writes}; "
                f"expected {want_fast} and {want_dev}"
            )
        total = sum(exits.values())
        return {"ns": t1 - t0, "exits": total, "ns_per_exit": (t1 - t0) / total}

    def close(self) -> None:
        self.machine.close()


# --- row 3: ioeventfd -----------------------------------------------------------------------
class IoeventfdBench:
    """``bench_pio.bin`` writing ``count`` times to port 0x80, which is an ioeventfd."""

    def __init__(self, count: int, tmpdir: str | Path) -> None:
        from pykvm.machine import Machine

        self.count = count
        self.machine = Machine(memory=GUEST_MEMORY)
        self.image = patched_guest("bench_pio.bin", count, POST_PORT, tmpdir)
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.machine.vm.ioeventfd(self.efd, POST_PORT, 1, pio=True)

    def _drain(self) -> int:
        try:
            return os.eventfd_read(self.efd)
        except BlockingIOError:
            return 0

    def run_once(self) -> dict:
        m = self.machine
        m.load(self.image, format="flat", mode="long")
        self._drain()
        before = m.stats().exits_by_reason
        t0 = time.perf_counter_ns()
        result = m.run(timeout=RUN_TIMEOUT)
        t1 = time.perf_counter_ns()
        check_debug_exit(result, 0, "pykvm ioeventfd")
        counter = self._drain()
        exits = _delta(result.stats.exits_by_reason, before)
        if counter != self.count or exits != {"io": 1}:
            raise WrongResult(
                f"pykvm ioeventfd: eventfd counter {counter} (expected {self.count}), "
                f"exits to userspace {exits} (expected only the debug exit)"
            )
        return {"ns": t1 - t0, "notifications": counter, "ns_per_notification": (t1 - t0) / counter}

    def close(self) -> None:
        self.machine.close()
        os.close(self.efd)


# --- row 5: lifecycle -----------------------------------------------------------------------
LIFECYCLE_PHASES = ("create", "load", "run", "close")


def lifecycle_image(tmpdir: str | Path) -> Path:
    """bench_pio.bin with count 1 and target 0xf4: its first exit is the debug exit."""
    return patched_guest("bench_pio.bin", 1, DEBUG_EXIT_PORT, tmpdir)


def lifecycle_once(image: Path, irqchip: bool, kvm: object) -> dict:
    """Machine() with 64 MiB, load, run to the debug exit, close; ns per phase and in all.

    ``irqchip=False`` is the like-for-like figure against rawkvm (which creates no
    interrupt controllers); ``True`` is pykvm's default PC platform.  ``kvm`` is one open
    /dev/kvm shared by every lifecycle, as rawkvm opens it (and asks for CPUID) once.
    """
    from pykvm.machine import Machine

    t0 = time.perf_counter_ns()
    machine = Machine(memory=GUEST_MEMORY, irqchip=irqchip, kvm=kvm)
    try:
        t1 = time.perf_counter_ns()
        machine.load(image, format="flat", mode="long")
        t2 = time.perf_counter_ns()
        result = machine.run(timeout=RUN_TIMEOUT)
        t3 = time.perf_counter_ns()
    finally:
        machine.close()
    t4 = time.perf_counter_ns()
    check_debug_exit(result, 0, "pykvm lifecycle")
    if result.stats.exits_by_reason != {"io": 1}:
        raise WrongResult(f"pykvm lifecycle: exits {result.stats.exits_by_reason}, expected one debug exit")
    return {"ns": t4 - t0, "phases": dict(zip(LIFECYCLE_PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)))}


# --- row 7: compute at CPL3 -----------------------------------------------------------------
class ComputeBench:
    """``bench_compute.bin`` entered at CPL3 (``user=True``) for ``count`` iterations."""

    def __init__(self, count: int, tmpdir: str | Path) -> None:
        from pykvm.machine import Machine

        self.count = count
        self.machine = Machine(memory=GUEST_MEMORY)
        self.image = patched_guest("bench_compute.bin", count, 0, tmpdir)

    def run_once(self) -> dict:
        m = self.machine
        m.load(self.image, format="flat", mode="long", user=True)
        t0 = time.perf_counter_ns()
        result = m.run(timeout=RUN_TIMEOUT)
        t1 = time.perf_counter_ns()
        from pykvm.result import ExitReason

        if result.reason is not ExitReason.DEBUG_EXIT:
            raise WrongResult(f"pykvm compute ended with {result.reason.value}: {result.diagnosis}")
        rax = m.vcpus[0].exit_regs().rax
        if result.exit_value != rax & 0xFF:
            raise WrongResult(f"pykvm compute: exit value {result.exit_value:#x} but rax is {rax:#018x}")
        return {"ns": t1 - t0, "ns_per_iteration": (t1 - t0) / self.count, "result": result.exit_value, "rax": rax}

    def close(self) -> None:
        self.machine.close()


# --- row 6: memory (run in a fresh interpreter) ---------------------------------------------
def _statm_rss() -> int:
    """Resident bytes of this process, from /proc/self/statm (what psutil's ``rss`` reads)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _smaps_rss(ranges: list[tuple[int, int]]) -> int:
    """Resident bytes (smaps ``Rss``) of the VMAs that lie inside the host ranges ``[start, end)``."""
    total = 0
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = any(lo <= start and end <= hi for lo, hi in ranges)
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


def _guest_ranges(machine: object) -> list[tuple[int, int]]:
    ranges = []
    for region in machine.memory.regions:  # type: ignore[attr-defined]
        base = region.host_addr - region.mapping_offset
        ranges.append((base, base + len(region.mapping)))
    return ranges


def memory_probe(extra_machines: int = 9) -> dict:
    """RSS of this (fresh) process: bare, after importing pykvm, with 1 and 1 + extra VMs."""
    bare = _statm_rss()
    import psutil  # pykvm depends on it (pykvm.config imports it)

    proc = psutil.Process()
    with_psutil = proc.memory_info().rss
    from pykvm.machine import Machine

    imported = proc.memory_info().rss
    hello = guest_path("hello_long.bin")
    machines = []

    def one() -> None:
        m = Machine(memory=GUEST_MEMORY)
        machines.append(m)
        m.load(hello, format="flat", mode="long")
        check_debug_exit(m.run(timeout=RUN_TIMEOUT), 0, "hello_long.bin")

    try:
        one()
        one_vm = proc.memory_info().rss
        guest_one = _smaps_rss(_guest_ranges(machines[0]))
        for _ in range(extra_machines):
            one()
        many = proc.memory_info().rss
        guest_many = _smaps_rss([r for m in machines for r in _guest_ranges(m)])
    finally:
        for m in machines:
            m.close()
    n = extra_machines
    return {
        "rss_bare": bare,
        "rss_with_psutil": with_psutil,
        "rss_after_import": imported,
        "rss_one_vm": one_vm,
        "guest_resident_one_vm": guest_one,
        "machines": 1 + n,
        "rss_all_vms": many,
        "guest_resident_all_vms": guest_many,
        "per_vm_increment": (many - one_vm) / n,
        "per_vm_increment_without_guest_ram": ((many - guest_many) - (one_vm - guest_one)) / n,
        "guest_ram_per_vm": (guest_many - guest_one) / n,
        "thp": _thp_mode(),
    }


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()


def main(argv: list[str]) -> int:
    if argv[:1] == ["memory-probe"]:
        extra = int(argv[1]) if len(argv) > 1 else 9
        print(json.dumps(memory_probe(extra)))
        return 0
    print("usage: python bench/pykvm_bench.py memory-probe [EXTRA_MACHINES]\n"
          "(the benchmarks are run by bench/run.py)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
