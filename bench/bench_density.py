#!/usr/bin/env python3
"""Consolidation (``bench/run.py`` row 11): how many idle 64 MiB guests one pykvm process holds, what
each costs, and the same number of QEMU microvm processes beside it.

    python bench/bench_density.py [--quick]                       # everything: one JSON object
    python bench/bench_density.py pykvm --config plain --count N  # one pykvm process (run by the above)
    python bench/bench_density.py qemu --count N

The guest is ``guests/asm/bench_idle.asm`` (a multiboot kernel both VMMs boot from the same file): it
writes one byte into every page of ``touch`` MiB (the same bytes in every guest: a guest that has
used some memory), prints that it is ready and halts with interrupts enabled, for ever.

- **pykvm**, in one fresh process: guests are started one after the other (``Machine(memory="64M")``,
  ``load``, ``run`` on a thread of its own) until ``count`` run or the host's MemAvailable would fall
  below :data:`MEMORY_FLOOR`; the process's PSS (``/proc/self/smaps_rollup``) is read after each.
  Configurations: ``plain``; ``share`` (``share_pages=True``: KSM may merge identical guest pages; KSM
  must be running, see below; PSS is read again once KSM has stopped merging more, bounded by
  :data:`KSM_SETTLE_S`); ``balloon`` (``balloon=True`` running ``guests/build/balloon.bin``, which has a
  balloon driver: it touches the same ``touch`` MiB, then the host sets the balloon to all of its pool
  but a 1 MiB working set and waits for the driver to reach it).
- **QEMU microvm**: ``count`` processes of the same guest, each started and waited for until ready;
  the PSS of each (shared libraries and the QEMU binary counted once across them).

Per guest: the PSS increment per added guest, (PSS with N guests - PSS with 1) / (N - 1) for pykvm, and
the mean PSS per process for QEMU; the kernel's own memory per VM (Slab + KernelStack + PageTables +
SecPageTables of /proc/meminfo, system-wide, so other processes add noise) is given apart.  How many
guests one pykvm process could hold is **extrapolated** from the measured per-guest cost: the memory
available at the start divided by (PSS + kernel memory) per guest, and the process's file-descriptor
and thread limits; the experiment itself stops at ``count`` guests or the memory floor.

KSM: ``--share-pages`` only helps while ``/sys/kernel/mm/ksm/run`` is 1.  If it is 0 and this process
may write it (root), the ``share`` configuration turns it on for its run and restores the old value
afterwards; otherwise that configuration is skipped, with the reason.

Standard library only (and pykvm).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import pykvm_bench as pb  # noqa: E402
import qemu_run  # noqa: E402

IDLE_GUEST = ROOT / "guests" / "build" / "bench_idle.bin"
BALLOON_GUEST = ROOT / "guests" / "build" / "balloon.bin"
KSM = Path("/sys/kernel/mm/ksm")
MIB = 1 << 20
GUEST_MIB = 64
TOUCH_MIB = 8
TOUCH_OFF = 32  # bench_idle.asm's parameter block
READY = b"bench_idle: ready"
BALLOON_WORKING_SET_MIB = 1
MEMORY_FLOOR = 4 << 30  # stop adding guests below this much MemAvailable
KSM_SETTLE_S = 90.0
KERNEL_FIELDS = ("Slab", "KernelStack", "PageTables", "SecPageTables")
COUNTS = (24, 4)  # guests per configuration: full, quick


class DensityError(Exception):
    """A guest did not come up, or a measurement could not be taken."""


# --- what the host says ---------------------------------------------------------------------------
def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":", 1)
        out[name] = int(value.split()[0]) * 1024
    return out


def kernel_bytes(info: dict[str, int]) -> int:
    return sum(info.get(name, 0) for name in KERNEL_FIELDS)


def pss(pid: int | str = "self") -> int:
    """Proportional set size of a process, bytes (shared pages divided among their mappers)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise DensityError(f"/proc/{pid}/smaps_rollup has no Pss line")


def ksm_counter(name: str) -> int:
    return int((KSM / name).read_text())


def wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise DensityError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.005)


def patched_idle_guest(touch_mib: int, directory: str | Path) -> Path:
    return pb.patched_copy(IDLE_GUEST, Path(directory) / f"bench_idle-{touch_mib}.bin", "<I", TOUCH_OFF, touch_mib)


# --- pykvm: many guests in this process ---------------------------------------------------------
class IdleMachine:
    """One pykvm machine running an idle guest on a thread of its own."""

    def __init__(self, config: str, guest: Path, kvm: object) -> None:
        from pykvm.machine import Machine

        balloon = config == "balloon"
        self.machine = Machine(memory=f"{GUEST_MIB}M", kvm=kvm, capture_serial=True, share_pages=config == "share",
                               balloon=balloon)  # fmt: skip
        if balloon:
            self.machine.load(guest, mode="long", cmdline=f"ws={BALLOON_WORKING_SET_MIB} touch={TOUCH_MIB}")
        else:
            self.machine.load(guest)
        self.outcome: list[Any] = []
        self.thread = threading.Thread(target=lambda: self.outcome.append(self.machine.run()), daemon=True)
        self.thread.start()

    def wait_ready(self, balloon: bool) -> None:
        m = self.machine
        if balloon:
            wait(lambda: "avail" in m.balloon.guest_stats() or bool(self.outcome), 60, "the balloon guest's statistics")
            self._check_running()
            target = m.balloon.guest_stats()["avail"]  # the pool but the working set
            m.balloon.target = target
            wait(lambda: m.balloon.actual == target or bool(self.outcome), 60, "the balloon to reach its target")
        else:
            wait(lambda: READY in (m.serial_output.captured() or b"") or bool(self.outcome), 60, "the guest")
        self._check_running()

    def _check_running(self) -> None:
        if self.outcome:
            r = self.outcome[0]
            raise DensityError(f"an idle guest stopped: {r.reason.value}: {r.diagnosis}; output {r.serial!r}")

    def close(self) -> None:
        self.machine.stop()
        self.thread.join(30)
        self.machine.close()


def pykvm_child(config: str, count: int, touch_mib: int) -> dict:
    """In this (fresh) process: up to ``count`` idle guests; PSS and kernel memory after each."""
    from pykvm.kvm import Kvm

    balloon = config == "balloon"
    with tempfile.TemporaryDirectory(prefix="pykvm-bench-density-") as tmp:
        guest = BALLOON_GUEST if balloon else patched_idle_guest(touch_mib, tmp)
        kvm = Kvm()
        machines: list[IdleMachine] = []
        start_info = meminfo()
        points = [{"guests": 0, "pss": pss(), "kernel": kernel_bytes(start_info), "available": start_info["MemAvailable"]}]
        stopped_by = "count"
        try:
            while len(machines) < count:
                if meminfo()["MemAvailable"] < MEMORY_FLOOR:
                    stopped_by = "memory floor"
                    break
                machine = IdleMachine(config, guest, kvm)
                machines.append(machine)
                machine.wait_ready(balloon)
                info = meminfo()
                points.append({"guests": len(machines), "pss": pss(), "kernel": kernel_bytes(info),
                               "available": info["MemAvailable"]})  # fmt: skip
            ksm = None
            if config == "share":
                ksm = settle_ksm()
                info = meminfo()
                points.append({"guests": len(machines), "pss": pss(), "kernel": kernel_bytes(info),
                               "available": info["MemAvailable"], "after_ksm": True})  # fmt: skip
            threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
        finally:
            for machine in machines:
                machine.close()
            kvm.close()
    return {"ok": True, "config": config, "count": count, "touch_mib": touch_mib, "points": points, "stopped_by": stopped_by,
            "ksm": ksm, "threads": threads, "fds": fds,
            "limits": {"nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                       "threads_max": int(Path("/proc/sys/kernel/threads-max").read_text())}}  # fmt: skip


def settle_ksm() -> dict:
    """Wait until KSM merges no more pages for two of its full scans (at most KSM_SETTLE_S)."""
    deadline = time.monotonic() + KSM_SETTLE_S
    last, scans = -1, ksm_counter("full_scans")
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if ksm_counter("full_scans") >= scans + 2:
            sharing = ksm_counter("pages_sharing")
            if sharing == last:
                break
            last, scans = sharing, ksm_counter("full_scans")
    return {name: ksm_counter(name) for name in ("pages_shared", "pages_sharing", "full_scans", "pages_to_scan")}


# --- QEMU: one process per guest ------------------------------------------------------------------
def qemu_processes(qemu: str, count: int, touch_mib: int) -> dict:
    """``count`` QEMU microvm processes of the idle guest, each up before the next; PSS of each."""
    with tempfile.TemporaryDirectory(prefix="pykvm-bench-density-") as tmp:
        guest = patched_idle_guest(touch_mib, tmp)
        cmd = qemu_run.qemu_command(qemu, str(guest), f"{GUEST_MIB}M", [])
        procs: list[tuple[subprocess.Popen, Path]] = []
        start = meminfo()
        stopped_by = "count"
        try:
            while len(procs) < count:
                if meminfo()["MemAvailable"] < MEMORY_FLOOR:
                    stopped_by = "memory floor"
                    break
                out = Path(tmp) / f"serial-{len(procs)}"
                with open(out, "wb") as f:
                    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.DEVNULL)
                procs.append((proc, out))
                wait(lambda: READY in out.read_bytes() or proc.poll() is not None, 60, "a QEMU guest")
                if proc.poll() is not None:
                    raise DensityError(f"QEMU exited with status {proc.returncode}: {out.read_bytes()[-300:]!r}")
            end = meminfo()
            sizes = [pss(proc.pid) for proc, _ in procs]
        finally:
            for proc, _ in procs:
                proc.kill()
            for proc, _ in procs:
                proc.wait(30)
    return {"count": len(sizes), "stopped_by": stopped_by, "pss": sizes, "command": cmd,
            "kernel_per_guest": (kernel_bytes(end) - kernel_bytes(start)) / len(sizes),
            "available_drop_per_guest": (start["MemAvailable"] - end["MemAvailable"]) / len(sizes)}  # fmt: skip


# --- orchestration --------------------------------------------------------------------------------
def per_guest(run: dict) -> dict:
    """PSS and kernel memory per guest.  Without KSM: the increment per added guest, from the first to
    the last guest.  With KSM: (PSS once KSM settled - PSS before the first guest) / guests, as merged
    pages are shared by all of them."""
    zero = run["points"][0]
    points = [p for p in run["points"] if p["guests"] > 0 and not p.get("after_ksm")]
    first, last = points[0], points[-1]
    if last["guests"] < 2:
        raise DensityError(f"{run['config']}: only {last['guests']} guest(s) came up")
    cost = {
        "guests": last["guests"],
        "pss_per_guest": (last["pss"] - first["pss"]) / (last["guests"] - first["guests"]),
        "pss_all_per_guest": (last["pss"] - zero["pss"]) / last["guests"],
        "kernel_per_guest": (last["kernel"] - zero["kernel"]) / last["guests"],
        "process_pss": last["pss"],
        "fds_per_guest": run["fds"] / last["guests"],
        "threads_per_guest": run["threads"] / last["guests"],
    }
    settled = [p for p in run["points"] if p.get("after_ksm")]
    if settled:
        cost["pss_per_guest_before_ksm"] = cost["pss_per_guest"]
        cost["pss_per_guest"] = (settled[-1]["pss"] - zero["pss"]) / settled[-1]["guests"]
        cost["process_pss"] = settled[-1]["pss"]
    return cost


def capacity(cost: dict, available: int, limits: dict) -> dict:
    """How many guests one pykvm process could hold, extrapolated: memory, file descriptors, threads."""
    per_guest_memory = cost["pss_per_guest"] + max(cost["kernel_per_guest"], 0)
    by = {
        "memory": int((available - MEMORY_FLOOR) / per_guest_memory),
        "file descriptors": int(limits["nofile"] / cost["fds_per_guest"]),
        "threads": int(limits["threads_max"] / cost["threads_per_guest"]),
    }
    limit = min(by, key=by.get)  # type: ignore[arg-type]
    return {"guests": by[limit], "limited_by": limit, "by": by}


def run_child(config: str, count: int, touch_mib: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "pykvm", "--config", config, "--count", str(count),
           "--touch", str(touch_mib)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise DensityError(f"pykvm {config}: status {out.returncode}: {(lines or [out.stderr.strip()[-500:]])[-1]}")
    return json.loads(lines[-1])


class KsmRunning:
    """KSM on for the duration (if it was off and this process may turn it on); ``reason`` if it cannot."""

    def __init__(self) -> None:
        self.previous: str | None = None
        self.reason: str | None = None

    def __enter__(self) -> KsmRunning:
        run = KSM / "run"
        if not run.exists():
            self.reason = "this kernel has no KSM (/sys/kernel/mm/ksm)"
        elif run.read_text().strip() != "1":
            try:
                self.previous = run.read_text().strip()
                run.write_text("1")
            except OSError as err:
                self.previous, self.reason = None, f"KSM is off (/sys/kernel/mm/ksm/run = 0) and cannot be turned on: {err}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            (KSM / "run").write_text(self.previous)


# The measured configurations: (name, pykvm configuration, MiB the guest touched).  A tiny idle guest
# touches nothing; a guest that used 8 MiB shows what the balloon gives back.
CONFIGS = (("idle", "plain", 0), ("idle, --share-pages", "share", 0), ("used 8 MiB", "plain", TOUCH_MIB),
           ("used 8 MiB, balloon inflated", "balloon", TOUCH_MIB))  # fmt: skip


def measure(quick: bool, qemu: str | None, progress: Callable[[str], None]) -> dict:
    if not IDLE_GUEST.is_file() or not BALLOON_GUEST.is_file():
        raise DensityError(f"{IDLE_GUEST.name} or {BALLOON_GUEST.name} is missing: run make guests")
    count = COUNTS[1 if quick else 0]
    available = meminfo()["MemAvailable"]
    runs: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name, config, touch in CONFIGS:
        if config == "share":
            with KsmRunning() as ksm:
                if ksm.reason:
                    skipped[name] = ksm.reason
                    continue
                runs[name] = run_child(config, count, touch)
                runs[name]["ksm_turned_on_for_the_run"] = ksm.previous is not None
        else:
            runs[name] = run_child(config, count, touch)
        if not runs[name].get("ok"):
            raise DensityError(f"pykvm {name}: {runs[name].get('error')}")
        progress(f"row 11 (density): pykvm {name}, {count} guests")
    costs = {name: per_guest(run) for name, run in runs.items()}
    caps = {name: capacity(cost, available, runs[name]["limits"]) for name, cost in costs.items()}
    qemu_data = {}
    if qemu is not None:
        for touch in sorted({touch for _, _, touch in CONFIGS}):
            q = qemu_processes(qemu, count, touch)
            q["pss_per_guest"] = statistics.fmean(q["pss"])
            qemu_data[touch] = q
            progress(f"row 11 (density): QEMU microvm, {q['count']} processes, guests touching {touch} MiB")
    return {"count": count, "guest_mib": GUEST_MIB, "available_at_start": available, "memory_floor": MEMORY_FLOOR,
            "configs": [list(c) for c in CONFIGS], "runs": runs, "skipped": skipped, "per_guest": costs,
            "capacity": caps, "qemu": qemu_data}  # fmt: skip


def rows(data: dict) -> list[dict]:
    """Row 11 as keyword arguments of run.py's ``Row``."""
    costs, caps, qemu = data["per_guest"], data["capacity"], data["qemu"]
    out = []
    for letter, (name, config, touch) in zip("abcd", data["configs"]):
        if name not in costs:
            continue
        fig = costs[name]["pss_per_guest"]
        q = qemu.get(touch) or qemu.get(str(touch))
        base = q["pss_per_guest"] if q else None
        ratio = base / fig if base else None
        out.append({"id": f"11{letter}", "what": f"memory per {data['guest_mib']} MiB guest: {name}", "pykvm": fig,
                    "baseline": base, "baseline_name": "QEMU microvm process" if q else "", "unit": "bytes",
                    "ratio": ratio, "ratio_label": "qemu/pykvm",
                    "target": ">= 10x" if touch == 0 and base else "-",
                    "met": ratio >= 10 if touch == 0 and ratio else None})  # fmt: skip
    cap = caps["idle"]
    out.append({"id": "11e", "what": "idle guests one pykvm process holds, EXTRAPOLATED", "pykvm": cap["guests"],
                "baseline": None, "unit": "guests"})
    parts = []
    for name, cost in costs.items():
        extra = ""
        if "pss_per_guest_before_ksm" in cost:
            run = data["runs"][name]
            ksm = run["ksm"]
            extra = (f"; {cost['pss_per_guest_before_ksm'] / MIB:.2f} MiB per added guest before KSM merged, "
                     f"pages_sharing {ksm['pages_sharing']}" + (", KSM turned on for the run" if run["ksm_turned_on_for_the_run"] else ""))
        parts.append(f"{name}: {cost['guests']} guests, process PSS {cost['process_pss'] / MIB:.0f} MiB, kernel "
                     f"~{cost['kernel_per_guest'] / MIB:.2f} MiB/VM{extra}")
    for touch, q in qemu.items():
        parts.append(f"QEMU, guests touching {touch} MiB: {q['count']} processes, PSS {q['pss_per_guest'] / MIB:.1f} "
                     f"MiB each, kernel ~{q['kernel_per_guest'] / MIB:.2f} MiB/VM")
    parts += [f"{name} skipped: {why}" for name, why in data["skipped"].items()]
    by = ", ".join(f"{k} {v:,}" for k, v in cap["by"].items())
    others = ", ".join(f"{name} {c['guests']:,} ({c['limited_by']})" for name, c in caps.items() if name != "idle")
    out[0]["note"] = (
        "11: guests/asm/bench_idle.asm, a multiboot kernel both VMMs boot (writes a byte into every page of 0 or 8 "
        "MiB, then hlt with interrupts on); 'balloon inflated': guests/build/balloon.bin touching 8 MiB, the balloon "
        f"then set to all of its pool but a {BALLOON_WORKING_SET_MIB} MiB working set. pykvm: all guests in one fresh "
        "process, PSS per added guest (with KSM: process PSS once KSM settled, less before any guest, over the "
        "guests); QEMU: one microvm process per guest, mean PSS (shared libraries counted once across them). "
        + "; ".join(parts) + ". Kernel memory (Slab+KernelStack+PageTables+SecPageTables, system-wide, noisy) is "
        f"in neither figure. 11e is EXTRAPOLATED from the measured cost, not run: {by} (limit: {cap['limited_by']}; "
        f"memory = MemAvailable at the start, {data['available_at_start'] / (1 << 30):.1f} GiB, less a "
        f"{MEMORY_FLOOR >> 30} GiB floor, over PSS + kernel memory per guest); the others: {others}; the experiment "
        f"itself stopped at {data['count']} guests per configuration"
    )
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="Consolidation: idle guests per pykvm process, and QEMU microvm beside it.")
    p.add_argument("side", nargs="?", choices=["pykvm", "qemu"], help="one side only (default: everything)")
    p.add_argument("--config", choices=["plain", "share", "balloon"], default="plain")
    p.add_argument("--count", type=int, default=COUNTS[0])
    p.add_argument("--touch", type=int, default=TOUCH_MIB)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.side == "pykvm":
            data = pykvm_child(args.config, args.count, args.touch)
        elif args.side == "qemu":
            data = qemu_processes(shutil.which("qemu-system-x86_64") or "qemu-system-x86_64", args.count, args.touch)
        else:
            data = measure(args.quick, shutil.which("qemu-system-x86_64"), lambda m: print(m, file=sys.stderr))
            data["rows"] = rows(data)
    except DensityError as err:
        print(json.dumps({"ok": False, "error": str(err)}))
        return 1
    print(json.dumps({"ok": True, **data}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
