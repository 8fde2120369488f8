#!/usr/bin/env python3
"""Where the wall time of ``pykvm run`` goes, from exec to exit (``bench/run.py`` row 4).

    python bench/startup.py [--runs 11] [KERNEL]     # one JSON object: phases, floors, imports

A process running ``pykvm run KERNEL --serial none`` is started the way the console script
starts it (``pykvm.__main__.main``), except that a few lines of driver code (:data:`DRIVER`) come
first: they read the clock when the interpreter hands over (``main``), after ``import pykvm.cli``, and
around :class:`pykvm.machine.Machine`'s ``__init__``, ``load``, ``run`` and ``close``, and write
those times to a file at exit.  This process reads the same clock (``CLOCK_MONOTONIC``, which
``time.perf_counter_ns`` is on Linux) just before ``posix_spawn`` and just after ``waitpid``, so:

- **interpreter**: spawn -> the driver's first line (exec, interpreter start-up, ``site``);
- **imports**: ``import pykvm.cli`` (everything the command imports at start);
- **command line**: click, the configuration, the stdin forwarder: the gaps between the phases below;
- **machine**, **load**, **run**, **close**: the four ``Machine`` calls;
- **exit**: from the end of ``close`` to ``waitpid`` (interpreter finalization, process exit).

The floors, measured the same way (spawn to ``waitpid``): ``python -c pass`` and
``python -S -c pass`` with this interpreter, and ``bench/build/rawkvm boot`` (a C VMM booting
the same kernel on the same machine: memory, in-kernel PIC/IOAPIC/PIT, one vCPU), with and
without the in-kernel interrupt controllers.  ``-X importtime`` of the same command gives the
modules that cost most.

Standard library only; Linux.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RAWKVM = BENCH / "build" / "rawkvm"
KERNEL = ROOT / "guests" / "build" / "multiboot_kludge.bin"
PHASES = ("interpreter", "imports", "command line", "machine", "load", "run", "close", "exit")

# Runs as `python -c DRIVER ARGS...`: the console script's own lines (`from pykvm.__main__ import main`,
# `main()`), with clock readings; the imports are timed as `import pykvm.cli`, which main() then finds done.
DRIVER = r"""
import time
_marks = [("main", time.perf_counter_ns())]
import sys
import pykvm.cli
_marks.append(("imports", time.perf_counter_ns()))
from pykvm.__main__ import main
from pykvm.machine import Machine

def _timed(name):
    inner = getattr(Machine, name)
    def timed(self, *args, **kwargs):
        _marks.append((name + ":start", time.perf_counter_ns()))
        try:
            return inner(self, *args, **kwargs)
        finally:
            _marks.append((name + ":end", time.perf_counter_ns()))
    return timed

for _name in ("__init__", "load", "run", "close"):
    setattr(Machine, _name, _timed(_name))

def _write_marks(path=sys.argv[1]):
    with open(path, "w") as f:
        f.write("\n".join(f"{name} {ns}" for name, ns in _marks))

import atexit
atexit.register(_write_marks)
sys.argv = ["pykvm", *sys.argv[2:]]
sys.exit(main())
"""


class StartupError(Exception):
    """A measured command did not do what it must (wrong status or output)."""


def spawn_wait(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, int, int]:
    """(spawn ns, reaped ns, exit status) of one run of ``cmd``, its standard streams on /dev/null.

    The wait blocks on a pidfd (no polling: this process takes no CPU from the one measured)."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, null, fd) for fd in (0, 1, 2)]
        t0 = time.perf_counter_ns()
        pid = os.posix_spawn(cmd[0], cmd, env if env is not None else os.environ, file_actions=actions)
    finally:
        os.close(null)
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise StartupError(f"{' '.join(cmd)} did not finish within {timeout:.0f} s")
        _, status = os.waitpid(pid, 0)
        return t0, time.perf_counter_ns(), os.waitstatus_to_exitcode(status)
    finally:
        os.close(pidfd)


def breakdown_once(python: str, kernel: Path) -> dict[str, float]:
    """One instrumented ``pykvm run``: ms per phase, and the total."""
    with tempfile.NamedTemporaryFile("r", prefix="pykvm-startup-", suffix=".marks") as marks:
        cmd = [python, "-c", DRIVER, marks.name, "run", str(kernel), "--serial", "none"]
        spawned, reaped, status = spawn_wait(cmd)
        if status != 1:
            raise StartupError(f"instrumented pykvm run {kernel.name}: status {status}, expected 1 (debug exit 0)")
        t = {name: int(ns) for name, ns in (line.split() for line in marks.read().splitlines())}
    need = {"main", "imports", "__init__:start", "__init__:end", "load:start", "load:end", "run:start", "run:end",
            "close:start", "close:end"}  # fmt: skip
    if not need <= t.keys():
        raise StartupError(f"instrumented pykvm run wrote the marks {sorted(t)}, expected {sorted(need)}")
    span = lambda phase: t[f"{phase}:end"] - t[f"{phase}:start"]  # noqa: E731
    gaps = (t["__init__:start"] - t["imports"]) + (t["load:start"] - t["__init__:end"]) + (
        t["run:start"] - t["load:end"]) + (t["close:start"] - t["run:end"])  # fmt: skip
    ns = {
        "interpreter": t["main"] - spawned,
        "imports": t["imports"] - t["main"],
        "command line": gaps,
        "machine": span("__init__"),
        "load": span("load"),
        "run": span("run"),
        "close": span("close"),
        "exit": reaped - t["close:end"],
        "total": reaped - spawned,
    }
    return {name: value / 1e6 for name, value in ns.items()}


def floor_commands(python: str, kernel: Path) -> dict[str, list[str]]:
    """The floors: an interpreter doing nothing, and a C VMM doing what ``pykvm run`` does."""
    return {
        "python -c pass": [python, "-c", "pass"],
        "python -S -c pass": [python, "-S", "-c", "pass"],
        "raw C, same machine": [str(RAWKVM), "boot", "--guest", str(kernel)],
        "raw C, no irqchip": [str(RAWKVM), "boot", "--guest", str(kernel), "--irqchip", "0"],
    }


def floor_once(cmd: list[str]) -> float:
    """ms from spawn to exit of one floor command; a raw C boot must end with pykvm's status 1."""
    spawned, reaped, status = spawn_wait(cmd)
    want = 1 if cmd[0] == str(RAWKVM) else 0
    if status != want:
        raise StartupError(f"{' '.join(cmd)}: status {status}, expected {want}")
    return (reaped - spawned) / 1e6


def import_costs(python: str, kernel: Path, top: int = 8) -> dict:
    """``-X importtime`` of ``pykvm run``: self time per module, summed by group, and the top modules."""
    cmd = [python, "-X", "importtime", "-m", "pykvm", "run", str(kernel), "--serial", "none"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    rows = []
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s*(\S+)", line)
        if m:
            rows.append((m.group(3), int(m.group(1))))
    groups: dict[str, int] = {}
    for name, us in rows:
        group = name.split(".")[0] if name.split(".")[0] in ("pykvm", "click", "cffi", "ioctl_opt") else "stdlib"
        if name.startswith("__editable__") or name == "site":
            group = "site"
        groups[group] = groups.get(group, 0) + us
    return {
        "self_us_by_group": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "top_self_us": [{"module": n, "us": us} for n, us in sorted(rows, key=lambda r: -r[1])[:top]],
        "modules": len(rows),
    }


def compile_bytecode(python: str) -> None:
    """Write pykvm's bytecode caches, as ``pip install`` does for an installed package (an editable
    install imports from the source tree, and PYTHONDONTWRITEBYTECODE would keep them from being written)."""
    package = ROOT / "pykvm"
    subprocess.run([python, "-m", "compileall", "-q", str(package)], check=True, timeout=300)


def measure(python: str, kernel: Path, runs: int) -> dict:
    """Breakdown and floors, alternating, ``runs`` rounds after a warm-up of each."""
    if not os.access(RAWKVM, os.X_OK):
        raise StartupError(f"{RAWKVM} is missing: run make -C bench first")
    compile_bytecode(python)
    floors = floor_commands(python, kernel)
    breakdown_once(python, kernel)
    for cmd in floors.values():
        floor_once(cmd)
    phases: list[dict[str, float]] = []
    floor_ms: dict[str, list[float]] = {name: [] for name in floors}
    for _ in range(runs):
        phases.append(breakdown_once(python, kernel))
        for name, cmd in floors.items():
            floor_ms[name].append(floor_once(cmd))
    return {
        "python": python,
        "kernel": str(kernel),
        "runs": runs,
        "phases_ms_median": {p: statistics.median(r[p] for r in phases) for p in (*PHASES, "total")},
        "phases_ms": phases,
        "floors_ms_median": {name: statistics.median(v) for name, v in floor_ms.items()},
        "floors_ms": floor_ms,
        "floor_commands": floors,
        "imports": import_costs(python, kernel),
    }


def format_breakdown(data: dict) -> str:
    """One line: the median ms of each phase."""
    med = data["phases_ms_median"]
    return ", ".join(f"{p} {med[p]:.1f}" for p in PHASES) + f" (sum {sum(med[p] for p in PHASES):.1f} ms)"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="Where the wall time of `pykvm run` goes, and its floors.")
    p.add_argument("kernel", nargs="?", type=Path, default=KERNEL, help=f"default {KERNEL.relative_to(ROOT)}")
    p.add_argument("--runs", type=int, default=11, help="instrumented runs (and runs of each floor); default 11")
    p.add_argument("--python", default=sys.executable, help="the interpreter pykvm is installed in (default: this one)")
    args = p.parse_args(argv)
    try:
        data = measure(args.python, args.kernel, args.runs)
    except (StartupError, subprocess.CalledProcessError, OSError) as err:
        print(json.dumps({"ok": False, "error": str(err)}))
        return 1
    print(format_breakdown(data), file=sys.stderr)
    print(json.dumps({"ok": True, **data}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
