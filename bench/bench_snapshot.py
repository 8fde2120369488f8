#!/usr/bin/env python3
"""Snapshots (``bench/run.py`` rows 12-15): taking one, restoring to the guest's first instruction,
fast reset, clones, and what a pytest fixture costs per test, with QEMU beside pykvm where it does the
same thing.

    python bench/bench_snapshot.py [--quick] [--no-qemu]        # everything: one JSON object
    python bench/bench_snapshot.py clones SNAPSHOT [--count N]  # one process of clones (run by the above)

The guest is ``guests/asm/bench_snapshot.asm``, a multiboot kernel that pykvm and QEMU boot from the
same file: at CPL3 it writes a qword into every page of ``touch`` bytes (16 MiB here), reaches its
*snapshot point* (a debug exit, where pykvm's run ends), then its first instruction after it is another
debug exit (RESUMED), and each later run rewrites ``redirty`` pages and ends at a third (DIRTIED).

- **Snapshot** (12a-d): a 64 MiB and a 1 GiB guest booted to the snapshot point; the time of
  ``Machine.snapshot`` (state, sparse memory file, every file synced, renamed into place) and the
  snapshot's bytes on disk (``st_blocks``).  QEMU: the same guest (``hold`` set: QEMU cannot end a run
  at a port write, so the guest waits at the point, see the guest's comments) saved by ``migrate
  "exec:cat > FILE"`` over QMP, from the command to the MIGRATION event ``completed``, plus an fsync of
  the file, so that both figures are "on disk"; its size is the stream's ``st_blocks``.
- **Restore to the first instruction** (12e-j): snapshots of 64 MiB, 1 GiB and 4 GiB guests.  In one
  process with a shared ``Kvm``: ``Machine.restore(path, kvm=kvm)`` then ``run()`` until the guest's
  first instruction, the RESUMED debug exit, has been handled.  As a fresh process: ``pykvm run
  --restore``, from ``posix_spawn`` to ``waitpid``, against QEMU started with ``-incoming "exec:cat
  FILE"`` and the debug-exit device, whose process ends at the same instruction (both exit with status
  67); where such a process's time goes, from a Python process that imports pykvm, restores and runs
  (:data:`FIRST_EXIT`) with clock readings between.
- **Fast reset** (13a-d): a machine restored with ``resettable=True`` runs a round (rewrites 1, 64, 256 or
  1024 pages), then ``Machine.reset()`` is timed; each page must hold its snapshot value again and the
  next run must start at the snapshot point again.
- **Clones** (14a-b): 100 machines restored from one 64 MiB snapshot in one fresh process, each run
  to RESUMED and through one round that rewrites 16 pages; RSS and PSS of the process (psutil) per
  clone: (after - before) / 100.
- **Per-test cost in pytest** (15a): a generated test module of 30 tests (6 with ``--quick``), each
  running the guest through a round, in a fresh pytest with one of two fixtures made of pykvm's pytest
  plugin: boot per test (``machine_factory``: a new machine booted to the snapshot point, closed after
  the test) or reset per test (``booted_guest(..., until=0x20)`` saves the guest at its snapshot point
  once per session; ``fresh()`` gives each test the machine restored once, then reset); the median wall
  time of a test's setup, call and teardown.

Standard library, psutil and pykvm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import pykvm_bench as pb  # noqa: E402
import qemu_run  # noqa: E402
import startup  # noqa: E402

GUEST = "bench_snapshot.bin"
MIB = 1 << 20
PAGE = 4096
PARAMS = 32  # the guest's parameter block: touch (bytes), redirty (pages), hold (qwords)
TOUCH = 16 * MIB
TOUCH_BASE = 4 * MIB
TOUCHED_LINE = b"bench_snapshot: touched %d pages\n" % (TOUCH // PAGE)  # what the guest prints at its snapshot point
POINT, RESUMED, DIRTIED = 0x20, 0x21, 0x22  # the guest's debug-exit values
RESUMED_STATUS = (RESUMED << 1) | 1  # a process that ends at RESUMED exits with this (pykvm and QEMU)
SNAPSHOT_SIZES = ("64M", "1G")
RESTORE_SIZES = ("64M", "1G", "4G")
RESET_PAGES = (1, 64, 256, 1024)
CLONE_PAGES = 16
FIXTURE_PAGES = 64
RUN_TIMEOUT = 120.0
QEMU_TIMEOUT = 120.0


@dataclasses.dataclass(frozen=True)
class Plan:
    snapshot_rounds: int  # rows 12a-d: snapshots per size (and QEMU migrations)
    restore_rounds: int  # rows 12e-g: in-process restores per size
    process_rounds: int  # rows 12h-j: fresh processes per size (and QEMU processes)
    reset_rounds: int  # rows 13: resets per page count
    clones: int  # row 14
    fixture_tests: int  # row 15


FULL = Plan(snapshot_rounds=5, restore_rounds=21, process_rounds=7, reset_rounds=31, clones=100, fixture_tests=30)
QUICK = Plan(snapshot_rounds=2, restore_rounds=5, process_rounds=2, reset_rounds=5, clones=10, fixture_tests=6)


# --- the guest ---------------------------------------------------------------------------------------
def guest_image(directory: Path, touch: int = TOUCH, redirty: int = 0, hold: bool = False) -> Path:
    """A copy of the guest with its parameters set, in ``directory``."""
    path = directory / f"bench_snapshot-{touch >> 20}M-{redirty}{'-hold' if hold else ''}.bin"
    return pb.patched_copy(pb.guest_path(GUEST), path, "<QQQ", PARAMS, touch, redirty, int(hold))


def boot_to_point(memory: str, image: Path, kvm: Any) -> Any:
    """A machine booted from ``image`` to the guest's snapshot point, checked."""
    from pykvm import Machine

    machine = Machine(memory=memory, kvm=kvm, capture_serial=True)
    try:
        machine.load(image)
        result = machine.run(timeout=RUN_TIMEOUT)
        pb.check_debug_exit(result, POINT, f"{image.name} ({memory}) booting to its snapshot point")
        if result.serial != TOUCHED_LINE:
            raise pb.WrongResult(f"{image.name} printed {result.serial[:200]!r}, expected {TOUCHED_LINE!r}")
    except BaseException:
        machine.close()
        raise
    return machine


def check_pages(machine: Any, pages: int, rewritten: bool, what: str) -> None:
    """The first qword of the first, middle and last of ``pages`` pages from TOUCH_BASE: each page's
    address as the guest wrote it before the snapshot point, or its complement after a round."""
    for page in sorted({0, pages // 2, pages - 1}):
        gpa = TOUCH_BASE + page * PAGE
        expected = gpa ^ ((1 << 64) - 1) if rewritten else gpa
        found = machine.memory.read_u64(gpa)
        if found != expected:
            raise pb.WrongResult(f"{what}: the qword at {gpa:#x} is {found:#x}, expected {expected:#x}")


def run_round(machine: Any, what: str) -> None:
    pb.check_debug_exit(machine.run(timeout=RUN_TIMEOUT), DIRTIED, what)


def disk_bytes(path: Path) -> int:
    """Bytes a file, or a directory's files, take on disk (``st_blocks``)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_blocks * 512 for p in files)


def ms(ns: int) -> float:
    return ns / 1e6


# --- rows 12a-d: taking a snapshot -------------------------------------------------------------------------
def pykvm_snapshot(memory: str, image: Path, path: Path, kvm: Any) -> dict:
    """Boot to the snapshot point, time ``Machine.snapshot``, check what it wrote by restoring it."""
    from pykvm import Machine

    with boot_to_point(memory, image, kvm) as machine:
        t0 = time.perf_counter_ns()
        manifest = machine.snapshot(path)
        t1 = time.perf_counter_ns()
    if manifest.memory_data_bytes < TOUCH:
        raise pb.WrongResult(f"the {memory} snapshot holds {manifest.memory_data_bytes} bytes of RAM, the guest "
                             f"wrote {TOUCH}")  # fmt: skip
    with Machine.restore(path, kvm=kvm) as restored:
        check_pages(restored, TOUCH // PAGE, False, f"the {memory} snapshot's memory")
        pb.check_debug_exit(restored.run(timeout=RUN_TIMEOUT), RESUMED, f"the {memory} snapshot, restored")
    return {"ms": ms(t1 - t0), "bytes_on_disk": disk_bytes(path), "memory_data_bytes": manifest.memory_data_bytes,
            "state_bytes": manifest.state_size}  # fmt: skip


class Qmp:
    """A QMP connection to QEMU (JSON lines over a UNIX socket): commands and events."""

    def __init__(self, path: Path, process: subprocess.Popen, timeout: float) -> None:
        self._sock = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock.connect(str(path))
                break
            except OSError as err:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise pb.WrongResult(f"QEMU's QMP socket {path} never answered: {err.strerror}") from err
                time.sleep(0.01)
        self._sock.settimeout(timeout)
        self._file = self._sock.makefile("rb")
        self._events: list[dict] = []
        if "QMP" not in self._read():
            raise pb.WrongResult("QEMU's QMP socket sent no greeting")
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        line = self._file.readline()
        if not line:
            raise pb.WrongResult("QEMU closed its QMP connection")
        return json.loads(line)  # type: ignore[no-any-return]

    def execute(self, command: str, **arguments: Any) -> Any:
        self._sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        while True:
            answer = self._read()
            if "event" in answer:
                self._events.append(answer)
            elif "error" in answer:
                raise pb.WrongResult(f"QMP {command}: {answer['error'].get('desc')}")
            elif "return" in answer:
                return answer["return"]

    def event(self, name: str, done: Callable[[dict], bool]) -> dict:
        """The first event ``name`` whose data ``done`` accepts (events seen before included)."""
        while True:
            event = self._events.pop(0) if self._events else self._read()
            if event.get("event") == name and done(event.get("data", {})):
                return event

    def close(self) -> None:
        self._file.close()
        self._sock.close()


def read_serial_line(process: subprocess.Popen, timeout: float) -> bytes:
    """One line of the guest's serial output (QEMU's stdout)."""
    assert process.stdout is not None
    if not select.select([process.stdout], [], [], timeout)[0]:
        raise pb.WrongResult(f"QEMU's guest printed nothing within {timeout:.0f} s")
    return process.stdout.readline()


def qemu_snapshot(qemu: str, memory: str, image: Path, path: Path, directory: Path) -> dict:
    """Boot the (hold) guest under QEMU to its snapshot point and migrate it into the file ``path``."""
    sock = directory / "qmp.sock"
    sock.unlink(missing_ok=True)
    cmd = qemu_run.qemu_command(qemu, str(image), memory, ["-qmp", f"unix:{sock},server=on,wait=off"],
                                debug_exit=False)  # fmt: skip
    with open(directory / "qemu.err", "wb") as err:
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    qmp = None
    try:
        line = read_serial_line(process, QEMU_TIMEOUT)
        if line != TOUCHED_LINE:
            raise pb.WrongResult(f"QEMU's guest printed {line[:200]!r}, expected {TOUCHED_LINE!r} "
                                 f"({(directory / 'qemu.err').read_text()[-300:]})")  # fmt: skip
        qmp = Qmp(sock, process, QEMU_TIMEOUT)
        qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        t0 = time.perf_counter_ns()
        qmp.execute("migrate", uri=f"exec:cat > {shlex.quote(str(path))}")
        status = qmp.event("MIGRATION", lambda data: data.get("status") in ("completed", "failed", "cancelled"))
        t1 = time.perf_counter_ns()
        if status["data"]["status"] != "completed":
            raise pb.WrongResult(f"QEMU's migration to {path} ended {status['data']['status']}")
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        t2 = time.perf_counter_ns()
        qmp.execute("quit")
        process.wait(QEMU_TIMEOUT)
    finally:
        if qmp is not None:
            qmp.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()
    return {"ms": ms(t2 - t0), "migrate_ms": ms(t1 - t0), "bytes_on_disk": disk_bytes(path),
            "size": path.stat().st_size}  # fmt: skip


# --- rows 12e-j: restoring to the first instruction ------------------------------------------------------------
def restore_in_process(path: Path, kvm: Any) -> dict:
    """``Machine.restore`` then ``run()`` to the guest's first instruction (RESUMED), timed."""
    from pykvm import Machine

    cpu0, t0 = time.thread_time_ns(), time.perf_counter_ns()
    machine = Machine.restore(path, kvm=kvm)
    t1 = time.perf_counter_ns()
    try:
        result = machine.run(timeout=RUN_TIMEOUT)
        t2, cpu2 = time.perf_counter_ns(), time.thread_time_ns()
        pb.check_debug_exit(result, RESUMED, f"{path.name}, restored")
    finally:
        machine.close()
    return {"ms": ms(t2 - t0), "restore_ms": ms(t1 - t0), "run_ms": ms(t2 - t1), "cpu_ms": ms(cpu2 - cpu0)}


# A fresh process that restores the snapshot argv[2] and runs it to its first instruction, writing its clock
# readings (CLOCK_MONOTONIC, as perf_counter_ns is on Linux) to argv[1]; it exits with the run's status.
FIRST_EXIT = r"""
import time
_main = time.perf_counter_ns()
import sys
from pykvm import Machine
_imported = time.perf_counter_ns()
with Machine.restore(sys.argv[2]) as vm:
    _restored = time.perf_counter_ns()
    result = vm.run(timeout=120)
    _ran = time.perf_counter_ns()
with open(sys.argv[1], "w") as marks:
    marks.write(f"{_main} {_imported} {_restored} {_ran}")
sys.exit(result.status)
"""
PROCESS_PHASES = ("interpreter", "imports", "restore", "run", "exit")


def restore_fresh_process(path: Path, directory: Path) -> dict:
    """ms from spawn to exit of :data:`FIRST_EXIT`, and its phases."""
    marks = directory / "first-exit.marks"
    spawned, reaped, status = startup.spawn_wait([sys.executable, "-c", FIRST_EXIT, str(marks), str(path)])
    if status != RESUMED_STATUS:
        raise pb.WrongResult(f"a fresh process restoring {path.name}: status {status}, expected {RESUMED_STATUS}")
    main, imported, restored, ran = (int(x) for x in marks.read_text().split())
    phases = (main - spawned, imported - main, restored - imported, ran - restored, reaped - ran)
    return {"ms": ms(reaped - spawned), **{p: ms(t) for p, t in zip(PROCESS_PHASES, phases)}}


def restore_command(path: Path) -> dict:
    """ms from spawn to exit of ``pykvm run --restore``, which the guest's first instruction ends."""
    cmd = [sys.executable, "-m", "pykvm", "run", "--restore", str(path), "--serial", "none"]
    spawned, reaped, status = startup.spawn_wait(cmd)
    if status != RESUMED_STATUS:
        raise pb.WrongResult(f"{' '.join(cmd[1:])}: status {status}, expected {RESUMED_STATUS}")
    return {"ms": ms(reaped - spawned)}


def qemu_fresh_process(qemu: str, memory: str, image: Path, state: Path) -> dict:
    """ms from spawn to exit of QEMU restoring ``state``: its guest's first instruction ends it."""
    cmd = qemu_run.qemu_command(qemu, str(image), memory, ["-incoming", f"exec:cat {shlex.quote(str(state))}"])
    spawned, reaped, status = startup.spawn_wait(cmd, timeout=QEMU_TIMEOUT)
    if status != RESUMED_STATUS:
        raise pb.WrongResult(f"QEMU restoring {state.name}: status {status}, expected {RESUMED_STATUS}")
    return {"ms": ms(reaped - spawned)}


# --- rows 13: fast reset ---------------------------------------------------------------------------------
def reset_series(path: Path, kvm: Any, pages: int, rounds: int) -> list[dict]:
    """A resettable machine restored from ``path`` (whose guest rewrites ``pages`` pages a round): per
    round, the time of ``reset()`` and the bytes it put back, each reset checked."""
    from pykvm import Machine

    samples = []
    with Machine.restore(path, kvm=kvm, resettable=True) as machine:
        for i in range(rounds + 1):  # the first is the warm-up
            pb.check_debug_exit(machine.run(timeout=RUN_TIMEOUT), RESUMED, f"{path.name}, restored or reset")
            run_round(machine, f"{path.name}: a round of {pages} pages")
            check_pages(machine, pages, True, f"{path.name} after a round")
            cpu0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            restored = machine.reset()
            t1, cpu1 = time.perf_counter_ns(), time.thread_time_ns()
            check_pages(machine, pages, False, f"{path.name} after reset")
            if restored < pages * PAGE:
                raise pb.WrongResult(f"reset put back {restored} bytes; the guest had rewritten {pages} pages")
            if i:
                samples.append({"ms": ms(t1 - t0), "bytes": restored, "cpu_ms": ms(cpu1 - cpu0)})
        pb.check_debug_exit(machine.run(timeout=RUN_TIMEOUT), RESUMED, f"{path.name}, after the last reset")
    return samples


# --- row 14: clones -------------------------------------------------------------------------------------------
def memory_now() -> dict[str, int]:
    import psutil

    info = psutil.Process().memory_full_info()
    return {"rss": info.rss, "pss": info.pss}


def clones_child(path: Path, count: int) -> dict:
    """``count`` machines restored from ``path`` in this process, each run to RESUMED and through one
    round; the process's RSS and PSS before and after, and the guest RAM each clone holds privately."""
    from pykvm import Machine
    from pykvm.kvm import Kvm

    with Kvm() as kvm:
        with Machine.restore(path, kvm=kvm) as warm_up:
            pb.check_debug_exit(warm_up.run(timeout=RUN_TIMEOUT), RESUMED, "the warm-up clone")
        before = memory_now()
        clones = []
        t0 = time.perf_counter_ns()
        try:
            for i in range(count):
                clone = Machine.restore(path, kvm=kvm)
                clones.append(clone)
                pb.check_debug_exit(clone.run(timeout=RUN_TIMEOUT), RESUMED, f"clone {i}")
                run_round(clone, f"clone {i}")
                check_pages(clone, CLONE_PAGES, True, f"clone {i}")
            t1 = time.perf_counter_ns()
            after = memory_now()
            private = [clone.memory.resident()["private_dirty"] for clone in clones]
            untouched = TOUCH_BASE + CLONE_PAGES * PAGE  # the first page no round rewrites
            if any(clone.memory.read_u64(untouched) != untouched for clone in clones):
                raise pb.WrongResult(f"a clone's page at {untouched:#x} lost its snapshot contents")
        finally:
            for clone in clones:
                clone.close()
    return {"count": count, "before": before, "after": after, "ms": ms(t1 - t0),
            "guest_private_dirty": statistics.median(private)}  # fmt: skip


def clones(path: Path, count: int) -> dict:
    """:func:`clones_child` in a fresh process (whose RSS and PSS are then the clones' own), and the
    figures per clone."""
    out = subprocess.run([sys.executable, str(Path(__file__)), "clones", str(path), "--count", str(count)],
                         capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    data = json.loads(lines[-1]) if lines else {}
    if out.returncode != 0 or not data.get("ok"):
        raise pb.WrongResult(f"the clones process failed (status {out.returncode}): "
                             f"{data.get('error') or out.stderr.strip()[-500:]}")  # fmt: skip
    for key in ("rss", "pss"):
        data[f"{key}_per_clone"] = (data["after"][key] - data["before"][key]) / count
    return data  # type: ignore[no-any-return]


# --- row 15: per-test cost in a pytest fixture ----------------------------------------------------------------------
FIXTURE_CONFTEST = r'''
"""The same guest for each test: booted for it (pykvm's machine_factory), or as pykvm's booted_guest saved it
at its snapshot point, put back by reset."""
import json, os, resource, time
import pytest

GUEST, MODE, OUT = (os.environ[f"SNAPBENCH_{k}"] for k in ("GUEST", "MODE", "OUT"))
POINT = 0x20
durations = []

if MODE == "boot":
    @pytest.fixture
    def guest(machine_factory):
        machine = machine_factory(memory="64M")
        machine.load(GUEST)
        assert machine.run(timeout=120).exit_value == POINT
        return machine
else:
    @pytest.fixture(scope="session")
    def saved(booted_guest):
        return booted_guest(GUEST, until=POINT, memory="64M")

    @pytest.fixture
    def guest(saved):
        return saved.fresh()


def cpu_ns():
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of the process
    return int((usage.ru_utime + usage.ru_stime) * 1e9)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item):
    started, cpu = time.perf_counter_ns(), cpu_ns()
    yield
    durations.append((time.perf_counter_ns() - started, cpu_ns() - cpu))


def pytest_sessionfinish(session):
    with open(OUT, "w") as out:
        json.dump(durations, out)
'''

FIXTURE_TEST = r'''
import pytest

RESUMED, DIRTIED, TOUCH_BASE, PAGES = 0x21, 0x22, {touch_base}, {pages}


@pytest.mark.parametrize("n", range({tests}))
def test_a_round(guest, n):
    assert guest.run(timeout=120).exit_value == RESUMED
    assert guest.memory.read_u64(TOUCH_BASE + (PAGES - 1) * 4096) == TOUCH_BASE + (PAGES - 1) * 4096
    assert guest.run(timeout=120).exit_value == DIRTIED
    assert guest.memory.read_u64(TOUCH_BASE) == TOUCH_BASE ^ (2**64 - 1)
'''


def fixture_cost(mode: str, image: Path, directory: Path, tests: int) -> dict:
    """One pytest session of ``tests`` tests with the ``mode`` fixture ("boot" or "reset")."""
    suite = directory / f"suite-{mode}"
    shutil.rmtree(suite, ignore_errors=True)
    suite.mkdir()
    (suite / "conftest.py").write_text(FIXTURE_CONFTEST)
    (suite / "test_rounds.py").write_text(FIXTURE_TEST.format(touch_base=TOUCH_BASE, pages=FIXTURE_PAGES, tests=tests))
    out = suite / "durations.json"
    env = {**os.environ, "SNAPBENCH_GUEST": str(image), "SNAPBENCH_MODE": mode, "SNAPBENCH_OUT": str(out)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(suite), str(suite)]
    t0 = time.perf_counter_ns()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False, env=env, cwd=suite)
    t1 = time.perf_counter_ns()
    if done.returncode != 0 or f"{tests} passed" not in done.stdout:
        raise pb.WrongResult(f"the pytest session with a {mode} fixture: status {done.returncode}: "
                             f"{(done.stdout + done.stderr).strip()[-600:]}")  # fmt: skip
    wall, cpu = zip(*((ms(w), ms(c)) for w, c in json.loads(out.read_text())))
    return {"per_test_ms": statistics.median(wall), "per_test_cpu_ms": statistics.median(cpu), "first_test_ms": wall[0],
            "session_ms": ms(t1 - t0), "tests": tests, "durations_ms": wall, "cpu_ms": cpu}  # fmt: skip


# --- everything ------------------------------------------------------------------------------------------------
def summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def median_of(samples: list[dict], key: str = "ms") -> float:
    return statistics.median(s[key] for s in samples)


def measure(quick: bool, tmp: str | Path, qemu: str | None, progress: Callable[[str], None]) -> dict:
    """Every measurement of rows 12-15; QEMU's where ``qemu`` names its binary (after its KVM check)."""
    from pykvm.kvm import Kvm

    plan = QUICK if quick else FULL
    work = Path(tempfile.mkdtemp(prefix="snapshot-", dir=tmp))
    data: dict[str, Any] = {"plan": dataclasses.asdict(plan), "touch": TOUCH, "qemu": None}
    if qemu is not None:
        try:
            data["qemu"] = {"binary": qemu, "version": qemu_run.qemu_version(qemu), "kvm": qemu_run.check_kvm(qemu, 60)}
        except qemu_run.QemuError as err:
            progress(f"rows 12 without QEMU: {err}")
            data["qemu_skipped"], qemu = str(err), None
    image = guest_image(work)
    hold = guest_image(work, hold=True)
    try:
        with Kvm() as kvm:
            data["snapshot"] = snapshots(plan, work, image, hold, qemu, kvm, progress)
            data["restore"] = restores(plan, work, image, hold, qemu, kvm, progress)
            data["reset"] = resets(plan, work, kvm, progress)
        snap = work / "clones"
        with Kvm() as kvm, boot_to_point("64M", guest_image(work, redirty=CLONE_PAGES), kvm) as machine:
            machine.snapshot(snap)
        data["clones"] = clones(snap, plan.clones)
        progress(f"row 14 (clones): {plan.clones} clones")
        fixture_image = guest_image(work, redirty=FIXTURE_PAGES)
        data["fixture"] = {mode: fixture_cost(mode, fixture_image, work, plan.fixture_tests) for mode in ("boot", "reset")}
        progress(f"row 15 (pytest fixture): {plan.fixture_tests} tests per fixture")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return data


def snapshots(plan: Plan, work: Path, image: Path, hold: Path, qemu: str | None, kvm: Any,
              progress: Callable[[str], None]) -> dict:  # fmt: skip
    """Rows 12a-d: pykvm's snapshot and QEMU's migration to a file, alternating, per size."""
    out: dict[str, dict[str, list[dict]]] = {}
    for memory in SNAPSHOT_SIZES:
        runs: dict[str, list[dict]] = {"pykvm": [], "qemu": []}
        for k in range(plan.snapshot_rounds + 1):  # the first round is the warm-up
            for who in (("pykvm", "qemu") if k % 2 else ("qemu", "pykvm")):
                path = work / f"{who}-{memory}-{k}"
                if who == "pykvm":
                    figure = pykvm_snapshot(memory, image, path, kvm)
                elif qemu is not None:
                    figure = qemu_snapshot(qemu, memory, hold, path, work)
                else:
                    continue
                if k:
                    runs[who].append(figure)
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        out[memory] = runs
        progress(f"row 12 (snapshot): {memory}, {plan.snapshot_rounds} rounds")
    return out


def restores(plan: Plan, work: Path, image: Path, hold: Path, qemu: str | None, kvm: Any,
             progress: Callable[[str], None]) -> dict:  # fmt: skip
    """Rows 12e-j: restore to the first instruction, per size: in this process, in a fresh one, QEMU's."""
    paths, states = {}, {}
    for memory in RESTORE_SIZES:
        paths[memory] = work / f"restore-{memory}"
        with boot_to_point(memory, image, kvm) as machine:
            machine.snapshot(paths[memory])
        if qemu is not None:
            states[memory] = work / f"restore-{memory}.qemu"
            qemu_snapshot(qemu, memory, hold, states[memory], work)
    startup.compile_bytecode(sys.executable)
    out: dict[str, dict[str, list[dict]]] = {m: {"in_process": [], "command": [], "process": [], "qemu": []}
                                             for m in RESTORE_SIZES}  # fmt: skip
    for memory in RESTORE_SIZES:  # warm-up: page cache, bytecode
        restore_in_process(paths[memory], kvm)
        restore_command(paths[memory])
        restore_fresh_process(paths[memory], work)
        if qemu is not None:
            qemu_fresh_process(qemu, memory, hold, states[memory])
    for k in range(plan.restore_rounds):
        for memory in (RESTORE_SIZES if k % 2 else RESTORE_SIZES[::-1]):
            out[memory]["in_process"].append(restore_in_process(paths[memory], kvm))
    progress(f"row 12 (restore in one process): {plan.restore_rounds} rounds")
    for k in range(plan.process_rounds):
        for memory in RESTORE_SIZES:
            for who in (("command", "process", "qemu") if k % 2 else ("qemu", "process", "command")):
                if who == "command":
                    out[memory]["command"].append(restore_command(paths[memory]))
                elif who == "process":
                    out[memory]["process"].append(restore_fresh_process(paths[memory], work))
                elif qemu is not None:
                    out[memory]["qemu"].append(qemu_fresh_process(qemu, memory, hold, states[memory]))
    progress(f"row 12 (restore in a fresh process): {plan.process_rounds} rounds")
    for path in [*paths.values(), *states.values()]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return out


def resets(plan: Plan, work: Path, kvm: Any, progress: Callable[[str], None]) -> dict:
    """Rows 13: reset after 1, 64, 256 and 1024 pages rewritten, on a 64 MiB guest."""
    out = {}
    for pages in RESET_PAGES:
        path = work / f"reset-{pages}"
        with boot_to_point("64M", guest_image(work, redirty=pages), kvm) as machine:
            machine.snapshot(path)
        out[str(pages)] = reset_series(path, kvm, pages, plan.reset_rounds)
        shutil.rmtree(path)
    progress(f"row 13 (reset): {plan.reset_rounds} resets per page count")
    return out


# --- the table's rows ------------------------------------------------------------------------------------------------
def rows(data: dict) -> list[dict]:
    """Rows 12-15 as keyword arguments of run.py's ``Row``."""
    return [*snapshot_rows(data), *restore_rows(data), *reset_rows(data), *clone_rows(data), *fixture_rows(data)]


def _vs(figure: float, base: float | None) -> float | None:
    return figure / base if base else None


def snapshot_rows(data: dict) -> list[dict]:
    out = []
    for letters, memory in zip(("ab", "cd"), SNAPSHOT_SIZES):
        runs = data["snapshot"][memory]
        ours, theirs = runs["pykvm"], runs["qemu"]
        t, q = median_of(ours), (median_of(theirs) if theirs else None)
        size, qsize = median_of(ours, "bytes_on_disk"), (median_of(theirs, "bytes_on_disk") if theirs else None)
        name = "QEMU migrate to file" if theirs else ""
        out.append({"id": f"12{letters[0]}", "what": f"snapshot of a {memory} guest that used 16 MiB: time", "pykvm": t,
                    "baseline": q, "baseline_name": name, "unit": "ms", "ratio": _vs(t, q), "ratio_label": "pykvm/qemu"})
        out.append({"id": f"12{letters[1]}", "what": f"snapshot of a {memory} guest that used 16 MiB: on disk",
                    "pykvm": size, "baseline": qsize, "baseline_name": "QEMU migration stream" if theirs else "",
                    "unit": "bytes", "ratio": _vs(size, qsize), "ratio_label": "pykvm/qemu"})  # fmt: skip
    qemu = data.get("qemu")
    parts = []
    for memory in SNAPSHOT_SIZES:
        runs = data["snapshot"][memory]
        part = (f"{memory}: pykvm state {runs['pykvm'][0]['state_bytes'] / 1024:.0f} KiB + "
                f"{median_of(runs['pykvm'], 'memory_data_bytes') / MIB:.1f} MiB of RAM")
        if runs["qemu"]:
            part += (f", QEMU's migration {median_of(runs['qemu'], 'migrate_ms'):.1f} ms + fsync, stream "
                     f"{median_of(runs['qemu'], 'size') / MIB:.1f} MiB")
        parts.append(part)
    out[0]["note"] = (
        "12: guests/asm/bench_snapshot.asm (a multiboot kernel pykvm and QEMU boot from the same file) writes a qword into "
        "every page of 16 MiB at CPL3 and stops at its snapshot point. pykvm: Machine.snapshot (state, sparse memory "
        "file, each file fsynced, renamed into place); QEMU microvm: QMP migrate \"exec:cat > FILE\" until the "
        "MIGRATION event 'completed', then fsync of the file; on disk = st_blocks. Each snapshot is checked by "
        "restoring it (page contents, the first instruction). " + "; ".join(parts)
        + (f". {qemu['version']}" if qemu else f". QEMU not measured: {data.get('qemu_skipped', 'not installed')}")
    )
    return out


def restore_rows(data: dict) -> list[dict]:
    runs = data["restore"]
    inproc = {m: median_of(runs[m]["in_process"]) for m in RESTORE_SIZES}
    out = []
    for letter, memory in zip("efg", RESTORE_SIZES):
        base = inproc[RESTORE_SIZES[0]] if memory != RESTORE_SIZES[0] else None
        out.append({"id": f"12{letter}", "what": f"restore to the first instruction, {memory}, in one process",
                    "pykvm": inproc[memory], "baseline": base, "baseline_name": "pykvm, 64M" if base else "",
                    "unit": "ms", "ratio": _vs(inproc[memory], base), "ratio_label": f"{memory}/64M" if base else "",
                    "target": "<= 5 ms", "met": inproc[memory] <= 5})  # fmt: skip
    for letter, memory in zip("hij", RESTORE_SIZES):
        fig = median_of(runs[memory]["command"])
        q = median_of(runs[memory]["qemu"]) if runs[memory]["qemu"] else None
        out.append({"id": f"12{letter}", "what": f"restore to the first instruction, {memory}, `pykvm run --restore`",
                    "pykvm": fig, "baseline": q, "baseline_name": "QEMU -incoming" if q else "", "unit": "ms",
                    "ratio": _vs(fig, q), "ratio_label": "pykvm/qemu"})  # fmt: skip
    split = ", ".join(
        f"{m} restore() {median_of(runs[m]['in_process'], 'restore_ms'):.2f} + run() {median_of(runs[m]['in_process'], 'run_ms'):.2f}"
        f" (CPU time of the thread {median_of(runs[m]['in_process'], 'cpu_ms'):.2f})"
        for m in RESTORE_SIZES
    )
    phases = runs[RESTORE_SIZES[0]]["process"]
    breakdown = ", ".join(f"{p} {median_of(phases, p):.1f}" for p in PROCESS_PHASES)
    out[0]["note"] = (
        "12e-g: Machine.restore(path, kvm=shared Kvm) then run() until the guest's first instruction after the "
        "snapshot point (a debug exit) has been handled, median ms: " + split + ". 12h-j: `python -m pykvm run "
        "--restore DIR --serial none`, spawn to exit, against QEMU microvm started with -incoming \"exec:cat FILE\" "
        f"and the debug-exit device, which the same instruction ends (both exit with status {RESUMED_STATUS}). Where "
        "a fresh process's time goes (a `python -c` process that imports pykvm, restores and runs; 64M, "
        f"{median_of(phases):.1f} ms), ms: " + breakdown
    )
    return out


def reset_rows(data: dict) -> list[dict]:
    out = []
    for letter, pages in zip("abcd", RESET_PAGES):
        samples = data["reset"][str(pages)]
        fig = median_of(samples)
        row = {"id": f"13{letter}", "what": f"fast reset after {pages} page{'s' if pages > 1 else ''} "
               f"({pages * 4} KiB) rewritten", "pykvm": fig, "baseline": None, "unit": "ms"}  # fmt: skip
        if pages * PAGE == MIB:
            row.update(target="<= 1 ms", met=fig <= 1)
        out.append(row)
    put_back = ", ".join(f"{p}: {median_of(data['reset'][str(p)], 'bytes') // PAGE:.0f}" for p in RESET_PAGES)
    cpu = ", ".join(f"{p}: {median_of(data['reset'][str(p)], 'cpu_ms'):.3f}" for p in RESET_PAGES)
    out[0]["note"] = (
        "13: a 64 MiB guest restored with resettable=True runs to its first instruction, then a round that rewrites "
        "N pages at CPL3 and ends at a debug exit; Machine.reset() is timed (the restored pages come back from the "
        "snapshot's file on the guest's next touch) and checked: the pages hold their snapshot values again and the "
        f"next run starts at the snapshot point. Pages put back per reset (the round's, and the kernel stack its "
        f"debug exit used): {put_back}; CPU time of the thread per reset, ms: {cpu}"
    )
    return out


def clone_rows(data: dict) -> list[dict]:
    c = data["clones"]
    n = c["count"]
    note = (
        f"14: {n} machines restored from one 64 MiB snapshot (16 MiB used) in one fresh process with a shared Kvm, "
        f"each run to its first instruction and through a round that rewrites {CLONE_PAGES} pages; (process RSS or "
        f"PSS after - before) / {n} (psutil). Baseline: the RAM the snapshot holds, what each clone would cost "
        f"without sharing. Guest RAM private to each clone (smaps Private_Dirty): "
        f"{c['guest_private_dirty'] / 1024:.0f} KiB; {n} clones took {c['ms'] / 1000:.2f} s"
    )
    ram = TOUCH
    return [
        {"id": "14a", "what": f"{n} clones of a 64 MiB snapshot: RSS per clone", "pykvm": c["rss_per_clone"],
         "baseline": ram, "baseline_name": "its 16 MiB of RAM", "unit": "bytes", "ratio": c["rss_per_clone"] / ram,
         "ratio_label": "clone/RAM", "note": note},
        {"id": "14b", "what": f"{n} clones of a 64 MiB snapshot: PSS per clone", "pykvm": c["pss_per_clone"],
         "baseline": ram, "baseline_name": "its 16 MiB of RAM", "unit": "bytes", "ratio": c["pss_per_clone"] / ram,
         "ratio_label": "clone/RAM"},
    ]  # fmt: skip


def fixture_rows(data: dict) -> list[dict]:
    boot, reset = data["fixture"]["boot"], data["fixture"]["reset"]
    fig, base = reset["per_test_ms"], boot["per_test_ms"]
    return [{
        "id": "15a", "what": "pytest: per-test cost, reset per test", "pykvm": fig, "baseline": base,
        "baseline_name": "boot per test", "unit": "ms", "ratio": fig / base, "ratio_label": "reset/boot",
        "note": (f"15: {reset['tests']} tests, each running the 64 MiB guest from its snapshot point through a round "
                 f"of {FIXTURE_PAGES} pages, in a fresh pytest per fixture; median of a test's setup + call + teardown "
                 "(pytest_runtest_protocol). Boot per test: pykvm's machine_factory, a machine built, booted to the "
                 "snapshot point and closed per test; reset per test: pykvm's booted_guest(until=0x20), the guest saved "
                 f"once per session (its first test {reset['first_test_ms']:.0f} ms), fresh() restoring it once, then "
                 f"Machine.reset() for each test. CPU time of the pytest process per test (getrusage, every thread): "
                 f"{reset['per_test_cpu_ms']:.1f} ms reset, {boot['per_test_cpu_ms']:.1f} ms boot. Whole sessions: "
                 f"{boot['session_ms'] / 1000:.1f} s and {reset['session_ms'] / 1000:.1f} s"),
    }]  # fmt: skip


# --- main -----------------------------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="Snapshots: take, restore, reset, clones, a pytest fixture; QEMU beside.")
    p.add_argument("side", nargs="?", choices=["clones"], help="one process of clones only (run by the whole)")
    p.add_argument("snapshot", nargs="?", type=Path)
    p.add_argument("--count", type=int, default=FULL.clones)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-qemu", action="store_true", help="pykvm only")
    args = p.parse_args(argv)
    try:
        if args.side == "clones":
            data = clones_child(args.snapshot, args.count)
        else:
            qemu = None if args.no_qemu else shutil.which("qemu-system-x86_64")
            with tempfile.TemporaryDirectory(prefix="pykvm-bench-") as tmp:
                data = measure(args.quick, tmp, qemu, lambda message: print(message, file=sys.stderr, flush=True))
    except (pb.WrongResult, OSError) as err:
        print(json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}"}))
        return 1
    print(json.dumps({"ok": True, **data}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
