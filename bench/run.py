#!/usr/bin/env python3
"""pykvm's benchmark suite: pykvm against a raw-C KVM floor and QEMU, side by side.

    python bench/run.py [--quick] [--json PATH] [--rows 1,2,...] [--install-qemu]

(``make bench`` builds bench/build/rawkvm and the guests, then runs this.)

Every figure is measured in this run: the raw-C baseline (``bench/build/rawkvm``, one JSON
line per subcommand), QEMU microvm (``bench/qemu_run.py``'s command and measurement) and
pykvm (``bench/pykvm_bench.py``, in this process or, for memory, in a fresh one).  The
machine is noisy, so each series is warmed up once, pykvm and its baseline are run
alternately in rounds, and medians are reported.

stdout: the host, then one table (figure, baseline, ratio, target, met).  The same figures,
with every sample, go to bench/results/latest.json (or --json PATH), and beside it the table in
markdown (table.md) and a chart of every row against its target (targets.svg, bench/report.py).
Progress goes to stderr.

Exit status: 0 if every benchmark produced a correct result (missed targets are only
reported in the table); 1 if any benchmark computed a wrong result or failed; 2 bad usage.
See bench/README.md for what each row measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RAWKVM = BENCH / "build" / "rawkvm"
DEFAULT_JSON = BENCH / "results" / "latest.json"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import pykvm_bench as pb  # noqa: E402
import qemu_run  # noqa: E402

MIB = 1 << 20
KERNEL = ROOT / "guests" / "build" / "multiboot_kludge.bin"
ROWS = tuple(range(1, 17))


# --- settings --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
    exits_count: int  # bench exits per run (rows 1-3)
    exit_rounds: int  # alternating rounds; each round: rawkvm --repeat R, then R pykvm runs of each kind
    exit_repeat: int
    cli_runs: int  # row 4: measured runs of each command (after one warm-up each)
    lifecycle_count: int  # row 5: pykvm lifecycles (rawkvm runs twice as many)
    lifecycle_rounds: int
    memory_probes: int  # row 6: fresh processes; median
    compute_count: int  # row 7: loop iterations
    compute_rounds: int


FULL = Settings(exits_count=20000, exit_rounds=7, exit_repeat=3, cli_runs=11, lifecycle_count=100,
                lifecycle_rounds=4, memory_probes=3, compute_count=1_000_000_000, compute_rounds=3)
QUICK = Settings(exits_count=5000, exit_rounds=2, exit_repeat=2, cli_runs=3, lifecycle_count=20,
                 lifecycle_rounds=2, memory_probes=1, compute_count=50_000_000, compute_rounds=2)


# --- errors and progress ---------------------------------------------------------------------
class Skipped(Exception):
    """A row cannot be measured on this host (e.g. no QEMU); the message says why."""


WrongResult = pb.WrongResult


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- the table ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    id: str
    what: str
    pykvm: float | None = None  # the pykvm figure, in `unit`
    baseline: float | None = None  # the baseline figure, in `unit`
    baseline_name: str = ""
    unit: str = ""  # ns, ms, bytes
    ratio: float | None = None
    ratio_label: str = ""  # how the ratio is formed, e.g. "pykvm/raw"
    target: str = "-"
    met: bool | None = None  # None: no target, or not measured
    status: str = "ok"  # ok, skipped, wrong, error
    note: str = ""
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ns":
        if value >= 1e6:
            return f"{value / 1e6:.2f} ms"
        if value >= 1e3:
            return f"{value / 1e3:.2f} us"
        return f"{value:.3f} ns"
    if unit == "ms":
        return f"{value:.3f} ms" if value < 1 else f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"
    if unit == "bytes":
        if abs(value) >= MIB:
            return f"{value / MIB:.1f} MiB"
        return f"{value / 1024:.1f} KiB"
    if unit in ("MiB/s", "req/s", "guests"):
        return f"{value:,.0f} {unit}"
    return f"{value:g} {unit}"


def render_table(rows: list[Row]) -> str:
    header = ("#", "what", "pykvm", "baseline", "ratio", "target", "met")
    lines = []
    for r in rows:
        base = fmt_value(r.baseline, r.unit)
        if r.baseline_name:
            base = f"{base} ({r.baseline_name})" if r.baseline is not None else f"- ({r.baseline_name})"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        if r.status != "ok":
            met = {"skipped": "skipped", "wrong": "WRONG RESULT", "error": "ERROR"}[r.status]
        else:
            met = "-" if r.met is None else ("yes" if r.met else "NO")
        lines.append((r.id, r.what, fmt_value(r.pykvm, r.unit), base, ratio, r.target, met))
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]
    out = []
    for n, line in enumerate([header, *lines]):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    notes = [f"  {r.note}" for r in rows if r.note]
    if notes:
        out.append("")
        out.append("notes:")
        out.extend(notes)
    return "\n".join(out)


# --- statistics --------------------------------------------------------------------------------
def summary(samples: list[float]) -> dict[str, float | int]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def rotated(items: list, k: int) -> list:
    """``items`` rotated by ``k``: the order of the alternating series changes every round."""
    k %= len(items)
    return items[k:] + items[:k]


# --- the raw-C baseline ------------------------------------------------------------------------
def rawkvm(*args: str, timeout: float = 600) -> dict:
    """Run one rawkvm subcommand; its JSON line.  A failure is a wrong result."""
    if not os.access(RAWKVM, os.X_OK):
        raise WrongResult(f"{RAWKVM} is missing: run make -C bench first")
    cmd = [str(RAWKVM), *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise WrongResult(f"{' '.join(cmd)} did not finish within {timeout:.0f} s") from err
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise WrongResult(f"{' '.join(cmd)} printed no result (status {out.returncode}): {out.stderr.strip()}")
    result = json.loads(lines[-1])
    if out.returncode != 0 or not result.get("ok"):
        raise WrongResult(f"{' '.join(cmd)} failed (status {out.returncode}): {result.get('error') or out.stderr.strip()}")
    return result


# A small process that starts a command and reports its wall time and rusage.  Peak RSS from
# wait4 cannot be measured from this process: a child started with vfork/posix_spawn (which
# subprocess uses) records, at exec, the high-water RSS of the mm it leaves - this process's
# (about 20-100 MiB here) - and ru_maxrss reports that when it is larger than the child's own
# peak.  Started from `python -I -S`, the floor is that interpreter's RSS (about 9 MiB), which
# is reported with each result; a figure at or below it is marked floored.
LAUNCHER = r"""
import os, signal, sys, time
timeout, out, err = float(sys.argv[1]), sys.argv[2], sys.argv[3]
cmd = sys.argv[4:]
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
           (os.POSIX_SPAWN_OPEN, 1, out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
           (os.POSIX_SPAWN_OPEN, 2, err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)]
floor = hwm()
timed_out = []
t0 = time.perf_counter_ns()
pid = os.posix_spawnp(cmd[0], cmd, os.environ, file_actions=actions)
def kill(*_):
    timed_out.append(1)
    os.kill(pid, signal.SIGKILL)
signal.signal(signal.SIGALRM, kill)
signal.setitimer(signal.ITIMER_REAL, timeout)
_, status, usage = os.wait4(pid, 0)
t1 = time.perf_counter_ns()
print(t1 - t0, status, usage.ru_maxrss, usage.ru_utime, usage.ru_stime, floor, len(timed_out))
"""


def wait4_run(cmd: list[str], timeout: float = 120) -> dict:
    """Wall time (spawn to wait4) and peak RSS (wait4) of one run of ``cmd``; the fields of
    ``qemu_run.run_once`` (same definitions), measured from a small launcher process."""
    with tempfile.TemporaryDirectory(prefix="pykvm-bench-run-") as d:
        out, err = os.path.join(d, "out"), os.path.join(d, "err")
        launcher = subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, str(timeout), out, err, *cmd],
                                  capture_output=True, text=True, timeout=timeout + 30, check=False)
        if launcher.returncode != 0:
            raise WrongResult(f"the launcher could not run {cmd[0]}: {launcher.stderr.strip()[-300:]}")
        ns, status, maxrss, utime, stime, floor, timed_out = launcher.stdout.split()
        serial = Path(out).read_text(errors="replace")
        stderr = Path(err).read_text(errors="replace").strip()
    status = int(status)
    signaled = os.WIFSIGNALED(status)
    code = None if signaled else os.WEXITSTATUS(status)
    # The debug-exit rule of qemu_run.run_once: status (value << 1) | 1; status 1 only without errors.
    errors = [line for line in stderr.splitlines() if line.strip() and "warning:" not in line]
    debug_value = (code >> 1) if code is not None and code & 1 and (code > 1 or not errors) else None
    return {
        "wall_ms": round(int(ns) / 1e6, 3),
        "peak_rss_kib": int(maxrss),
        "rss_floor_kib": int(floor),
        "rss_floored": int(maxrss) <= int(floor),
        "user_ms": round(float(utime) * 1e3, 3),
        "sys_ms": round(float(stime) * 1e3, 3),
        "exit_status": code,
        "signal": os.WTERMSIG(status) if signaled else None,
        "debug_exit_value": debug_value,
        "timed_out": timed_out == "1",
        "ok": debug_value is not None and timed_out != "1",
        "serial": serial[:2000],
        "stderr": stderr[:2000],
    }


def gnu_time_peak_rss(cmd: list[str], timeout: float = 60) -> int | None:
    """Peak RSS in KiB of ``cmd`` as GNU time (a small C process) reports it; None without it."""
    time_bin = Path("/usr/bin/time")
    if not os.access(time_bin, os.X_OK):
        return None
    out = subprocess.run([str(time_bin), "-f", "pykvm-bench-maxrss %M", *cmd], capture_output=True, text=True,
                         timeout=timeout, check=False)
    if out.returncode != 0:
        raise WrongResult(f"{' '.join(cmd)} failed under /usr/bin/time: {out.stderr.strip()[-300:]}")
    marks = [line.split()[1] for line in out.stderr.splitlines() if line.startswith("pykvm-bench-maxrss ")]
    return int(marks[-1]) if marks else None


# --- host --------------------------------------------------------------------------------------
def host_description() -> dict[str, Any]:
    from pykvm.info import host_info

    info = host_info()
    try:
        clocksource = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource").read_text().strip()
    except OSError:
        clocksource = "unknown"
    return {
        "cpu_model": info["cpu_model"],
        "host_cpus": info["host_cpus"],
        "kvm_backend": info["backend"],
        "kvm_backend_kind": info["backend_kind"],
        "kvm_api_version": info["api_version"],
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "clocksource": clocksource,
        "load_average_at_start": list(os.getloadavg()),
    }


def format_host(host: dict[str, Any]) -> str:
    load = ", ".join(f"{x:.2f}" for x in host["load_average_at_start"])
    return "\n".join([
        f"CPU:     {host['cpu_model']} ({host['host_cpus']} CPUs)",
        f"KVM:     {host['kvm_backend'] or 'unknown'}: {host['kvm_backend_kind']} (API {host['kvm_api_version']})",
        f"kernel:  Linux {host['kernel']}, clocksource {host['clocksource']}",
        f"Python:  {host['python']} ({host['python_executable']})",
        f"load:    {load} (1, 5, 15 min, at start)",
    ])


# --- rows 1-3: exits and ioeventfd -------------------------------------------------------------
def bench_exits(kind: str, s: Settings, tmp: str, results: dict) -> list[Row]:
    """Rows 1 (pio) / 2 (mmio): raw C floor, pykvm C fast path, pykvm Python device."""
    row = "1" if kind == "pio" else "2"
    benches = {h: pb.ExitBench(kind, h, s.exits_count, tmp) for h in ("fast", "python")}
    samples: dict[str, list[float]] = {"raw": [], "fast": [], "python": []}
    raw_lines = []
    try:
        for b in benches.values():  # warm-up, unmeasured
            b.run_once()
        for k in range(s.exit_rounds):
            for who in rotated(["raw", "fast", "python"], k):
                if who == "raw":
                    line = rawkvm("exits", "--kind", kind, "--count", str(s.exits_count),
                                  "--repeat", str(s.exit_repeat))
                    if line["exits"] != s.exits_count:
                        raise WrongResult(f"rawkvm exits counted {line['exits']}, expected {s.exits_count}")
                    raw_lines.append(line)
                    samples["raw"].extend(line["samples_ns"])
                else:
                    for _ in range(s.exit_repeat):
                        samples[who].append(benches[who].run_once()["ns_per_exit"])
            progress(f"row {row} ({kind} exits): round {k + 1}/{s.exit_rounds}")
    finally:
        for b in benches.values():
            b.close()
    stats = {who: summary(v) for who, v in samples.items()}
    results[f"exits_{kind}"] = {"count": s.exits_count, "samples_ns_per_exit": samples, "summary": stats,
                                "rawkvm": raw_lines,
                                "targets": {"fast": benches["fast"].target, "python": benches["python"].target}}
    raw = stats["raw"]["median"]
    name = kind.upper()
    where_fast = f"port {pb.POST_PORT:#x}" if kind == "pio" else f"{pb.MMIO_TARGET:#x}"
    where_py = f"port {pb.PYTHON_PORT:#x}" if kind == "pio" else f"{pb.MMIO_TARGET:#x}"
    rows = []
    for who, letter, what, limit in (("fast", "b", f"{name} exit, C fast path ({where_fast}), CPL0", 1.05),
                                     ("python", "c", f"{name} exit, Python device ({where_py}), CPL0", 1.3)):
        fig = stats[who]["median"]
        rows.append(Row(f"{row}{letter}", what, fig, raw, "raw C", "ns", fig / raw, "pykvm/raw",
                        f"<= {limit:g}x", fig / raw <= limit,
                        details={"per": "exit", "n_exits_per_run": s.exits_count + 1}))
    return rows


def bench_ioeventfd(s: Settings, tmp: str, results: dict, sync_fast_ns: float | None) -> list[Row]:
    """Row 3: pykvm ioeventfd vs rawkvm ioeventfd, and vs pykvm's synchronous C-fast-path exit."""
    bench = pb.IoeventfdBench(s.exits_count, tmp)
    samples: dict[str, list[float]] = {"raw": [], "pykvm": []}
    raw_lines = []
    try:
        bench.run_once()
        for k in range(s.exit_rounds):
            for who in rotated(["raw", "pykvm"], k):
                if who == "raw":
                    line = rawkvm("ioeventfd", "--kind", "pio", "--count", str(s.exits_count),
                                  "--repeat", str(s.exit_repeat))
                    if line["eventfd_count"] != s.exits_count:
                        raise WrongResult(f"rawkvm ioeventfd counter {line['eventfd_count']}, expected {s.exits_count}")
                    raw_lines.append(line)
                    samples["raw"].extend(line["samples_ns"])
                else:
                    for _ in range(s.exit_repeat):
                        samples["pykvm"].append(bench.run_once()["ns_per_notification"])
    finally:
        bench.close()
    stats = {who: summary(v) for who, v in samples.items()}
    results["ioeventfd_pio"] = {"count": s.exits_count, "port": pb.POST_PORT, "samples_ns_per_notification": samples,
                                "summary": stats, "rawkvm": raw_lines}
    fig, raw = stats["pykvm"]["median"], stats["raw"]["median"]
    rows = [Row("3a", f"PIO ioeventfd write (port {pb.POST_PORT:#x}), CPL0", fig, raw, "raw C ioeventfd", "ns",
                fig / raw, "pykvm/raw", note="3a, 3b: no target; shown for comparison")]
    if sync_fast_ns is not None:
        rows.append(Row("3b", "PIO ioeventfd vs synchronous exit (1b)", fig, sync_fast_ns, "pykvm C fast path", "ns",
                        fig / sync_fast_ns, "ioeventfd/sync"))
    return rows


# --- row 4: the CLI against QEMU -----------------------------------------------------------------
def pykvm_script() -> str:
    """The console script pip installed next to this interpreter (not a pyenv shim)."""
    beside = Path(sys.executable).parent / "pykvm"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("pykvm")
    if found is None:
        raise Skipped("the pykvm console script is not installed (pip install -e .)")
    return found


def ensure_qemu(install: bool) -> str:
    """The QEMU binary; installed with apt-get when allowed (root, and CI or --install-qemu)."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        return qemu
    allowed = os.geteuid() == 0 and (install or os.environ.get("CI"))
    if not allowed:
        raise Skipped("qemu-system-x86_64 is not installed (install qemu-system-x86, or run as root with "
                      "--install-qemu or CI set to let this script apt-get install it)")
    progress("installing qemu-system-x86 with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "qemu-system-x86"]
    if subprocess.run(cmd, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=False)
        subprocess.run(cmd, env=env, check=False)
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise Skipped("apt-get could not install qemu-system-x86")
    return qemu


def qemu_if_any(install: bool, rows: str) -> str | None:
    """The QEMU binary, or None (said on stderr) where there is none: ``rows`` then show pykvm alone."""
    try:
        return ensure_qemu(install)
    except Skipped as err:
        progress(f"{rows} without QEMU: {err}")
        return None


def bench_cli(s: Settings, results: dict, install_qemu: bool) -> list[Row]:
    """Row 4: process start to exit of ``pykvm run`` and of QEMU microvm, same kernel; wall and peak RSS;
    the floors (an idle interpreter, a C VMM booting the same kernel on the same machine) and where
    pykvm's time goes (bench/startup.py)."""
    import startup

    pb.guest_path(KERNEL.name)
    qemu = ensure_qemu(install_qemu)
    try:
        kvm_answer = qemu_run.check_kvm(qemu, 60)
    except qemu_run.QemuError as err:
        raise Skipped(f"QEMU cannot be used as a baseline here: {err}") from err
    qemu_cmd = qemu_run.qemu_command(qemu, str(KERNEL), "64M", [])
    script = pykvm_script()
    startup.compile_bytecode(sys.executable)  # as pip install does; PYTHONDONTWRITEBYTECODE may be set
    commands = {
        "script": [script, "run", str(KERNEL), "--serial", "none"],
        "module": [sys.executable, "-m", "pykvm", "run", str(KERNEL), "--serial", "none"],
        "qemu": qemu_cmd,
        **startup.floor_commands(sys.executable, KERNEL),
    }
    floors = [who for who in commands if who not in ("script", "module", "qemu")]

    # Correctness, unmeasured: pykvm and the raw-C VMM boot the kernel and print the multiboot report.
    for who, cmd in (("pykvm", [script, "run", str(KERNEL), "--serial", "stdio"]),
                     ("rawkvm", [str(RAWKVM), "boot", "--guest", str(KERNEL), "--serial", "stdio"])):
        check = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60, check=False)
        if check.returncode != 1 or not check.stdout.startswith("multiboot: magic ok"):
            raise WrongResult(f"{who} run of {KERNEL.name}: status {check.returncode}, output {check.stdout[:200]!r}, "
                              f"stderr {check.stderr[:200]!r} (expected status 1 and the multiboot report)")

    def measured(who: str) -> dict:
        r = wait4_run(commands[who], 60)
        if who in floors:
            want = 1 if commands[who][0] == str(RAWKVM) else 0
            if r["exit_status"] != want or r["timed_out"]:
                raise WrongResult(f"{who} ({' '.join(commands[who][:3])}...): status {r['exit_status']}, expected {want}")
            return r
        if not r["ok"] or r["debug_exit_value"] != 0:
            raise WrongResult(f"{who} run of {KERNEL.name} did not end with debug exit 0: status {r['exit_status']}, "
                              f"signal {r['signal']}, timed out {r['timed_out']}, stderr {r['stderr'][:300]!r}")
        if who == "qemu" and not r["serial"].startswith("multiboot: magic ok"):
            raise WrongResult(f"QEMU's serial output is not the multiboot report: {r['serial'][:200]!r}")
        return r

    for who in commands:  # warm-up
        measured(who)
    startup.breakdown_once(sys.executable, KERNEL)
    runs: dict[str, list[dict]] = {who: [] for who in commands}
    phases = []
    for k in range(s.cli_runs):
        for who in rotated([*commands, "breakdown"], k):
            if who == "breakdown":
                phases.append(startup.breakdown_once(sys.executable, KERNEL))
            else:
                runs[who].append(measured(who))
    imports = startup.import_costs(sys.executable, KERNEL)
    progress(f"row 4 (CLI vs QEMU): {s.cli_runs} runs each")
    stats = {who: {"wall_ms": summary([r["wall_ms"] for r in rs]),
                   "peak_rss_kib": summary([r["peak_rss_kib"] for r in rs]),
                   "user_ms": summary([r["user_ms"] for r in rs]),
                   "sys_ms": summary([r["sys_ms"] for r in rs])} for who, rs in runs.items()}
    for rs in runs.values():
        for r in rs:
            r.pop("serial", None)
    breakdown = {p: statistics.median(r[p] for r in phases) for p in (*startup.PHASES, "total")}
    results["cli_vs_qemu"] = {"kernel": str(KERNEL), "commands": commands, "qemu_version": qemu_run.qemu_version(qemu),
                              "qemu_kvm": kvm_answer, "runs": runs, "summary": stats,
                              "breakdown_ms_median": breakdown, "breakdown_ms": phases, "imports": imports,
                              "pythondontwritebytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))}
    q_wall, q_rss = stats["qemu"]["wall_ms"]["median"], stats["qemu"]["peak_rss_kib"]["median"] * 1024
    rows = []
    for who, letter, label in (("script", "a", "`pykvm run` script"), ("module", "c", "`python -m pykvm run`")):
        wall, rss = stats[who]["wall_ms"]["median"], stats[who]["peak_rss_kib"]["median"] * 1024
        rows.append(Row(f"4{letter}", f"{label}: wall, start to exit", wall, q_wall, "QEMU microvm", "ms",
                        wall / q_wall, "pykvm/qemu", "<= 0.5x", wall / q_wall <= 0.5))
        rows.append(Row(f"4{chr(ord(letter) + 1)}", f"{label}: peak RSS (wait4)", rss, q_rss, "QEMU microvm", "bytes",
                        rss / q_rss, "pykvm/qemu", "< 1x", rss < q_rss))
    for letter, who in zip("efgh", floors):
        wall = stats[who]["wall_ms"]["median"]
        rows.append(Row(f"4{letter}", f"floor: {who}, wall", wall, q_wall, "QEMU microvm", "ms", wall / q_wall,
                        "floor/qemu"))
    floors_kib = sorted({r["rss_floor_kib"] for who in ("script", "module", "qemu") for r in runs[who]})
    floored = sorted(who for who in ("script", "module", "qemu") if any(r["rss_floored"] for r in runs[who]))
    groups = ", ".join(f"{g} {us / 1e3:.1f}" for g, us in imports["self_us_by_group"].items())
    top = ", ".join(f"{m['module']} {m['us'] / 1e3:.1f}" for m in imports["top_self_us"][:6])
    rows[0].note = (f"4: {KERNEL.name}, --serial none; script {script}; median of {s.cli_runs} alternating runs "
                    "after one warm-up each; 4a/4b are the reported figures, 4c/4d the same via -m. Wall = spawn "
                    "to wait4; peak RSS = wait4 ru_maxrss, measured from a small launcher process (its own RSS, "
                    f"{floors_kib[0] / 1024:.1f}-{floors_kib[-1] / 1024:.1f} MiB, is the floor of what it can see)"
                    + (f"; AT THE FLOOR (not measured): {', '.join(floored)}" if floored else "")
                    + ". pykvm's bytecode is compiled first (as pip install does). 4a breakdown, ms (median of "
                    f"{len(phases)} instrumented runs, bench/startup.py): {startup.format_breakdown({'phases_ms_median': breakdown})}. "
                    f"-X importtime self time, ms: {groups}; most: {top}. 4e-4h: floors; raw C = bench/build/rawkvm "
                    "boot, a C VMM booting the same kernel on the same machine (64 MiB, in-kernel PIC/IOAPIC/PIT, "
                    "one vCPU) as one process; 'no irqchip' without the interrupt controllers (their teardown is "
                    "most of the difference). QEMU microvm uses a split irqchip (PIC/IOAPIC/PIT in QEMU)")
    return rows


# --- row 5: lifecycle ----------------------------------------------------------------------------
def bench_lifecycle(s: Settings, tmp: str, results: dict) -> list[Row]:
    """Row 5: create, load, run to the first exit, close; pykvm's minimal machine against rawkvm's, and
    pykvm's default machine (in-kernel PIC/IOAPIC/LAPIC/PIT) against rawkvm creating the same."""
    from pykvm.kvm import Kvm

    image = pb.lifecycle_image(tmp)
    per_round = max(1, s.lifecycle_count // s.lifecycle_rounds)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    raw_lines: dict[bool, list[dict]] = {False: [], True: []}
    kvm = Kvm()
    for irqchip in runs:
        pb.lifecycle_once(image, irqchip, kvm)  # warm-up
    series = ["raw minimal", "pykvm minimal", "raw platform", "pykvm platform"]
    for k in range(s.lifecycle_rounds):
        for who in rotated(series, k):
            irqchip = who.endswith("platform")
            if who.startswith("raw"):
                raw_lines[irqchip].append(rawkvm("lifecycle", "--count", str(per_round), "--irqchip", str(int(irqchip))))
            else:
                runs[irqchip].extend(pb.lifecycle_once(image, irqchip, kvm) for _ in range(per_round))
        progress(f"row 5 (lifecycle): round {k + 1}/{s.lifecycle_rounds}")
    kvm.close()
    results["lifecycle"] = {}
    rows = []
    for irqchip, label, limit in ((False, "5a", 2.0), (True, "5b", 1.2)):
        kind = "with_irqchip" if irqchip else "minimal"
        samples = [r["ns"] for r in runs[irqchip]]
        phases = {p: statistics.median(r["phases"][p] for r in runs[irqchip]) for p in pb.LIFECYCLE_PHASES}
        raw_samples = [x for line in raw_lines[irqchip] for x in line["samples_ns"]]
        raw_phases = {p: statistics.median(line["phases_median_ns"][p] for line in raw_lines[irqchip])
                      for p in raw_lines[irqchip][0]["phases_median_ns"]}
        results["lifecycle"][kind] = {"pykvm_samples_ns": samples, "pykvm_summary": summary(samples),
                                      "pykvm_phases_median_ns": phases, "rawkvm": raw_lines[irqchip],
                                      "rawkvm_summary": summary(raw_samples), "rawkvm_phases_median_ns": raw_phases}
        fig, raw = statistics.median(samples), statistics.median(raw_samples)
        phase_text = ", ".join(f"{p} {phases[p] / 1e3:.0f}" for p in pb.LIFECYCLE_PHASES)
        raw_text = ", ".join(f"{p} {v / 1e3:.0f}" for p, v in raw_phases.items() if v >= 500)
        what = ("VM lifecycle, minimal machine (as rawkvm)" if not irqchip
                else "VM lifecycle, + PIC/IOAPIC/LAPIC/PIT (rawkvm too)")
        rows.append(Row(label, what, fig, raw, "raw C", "ns", fig / raw, "pykvm/raw", f"<= {limit:g}x", fig / raw <= limit,
                        note=f"{label}: median phases, us: pykvm {phase_text}; raw C {raw_text} (phases under 0.5 us "
                             "left out)" + ("" if not irqchip else "; both register guest RAM before "
                             "KVM_CREATE_IRQCHIP; the teardown is the kernel destroying the in-kernel "
                             "PIC/IOAPIC/PIT (SRCU grace periods; shorter while the host is busy)")))
    return rows


# --- row 6: memory ---------------------------------------------------------------------------------
def bench_memory(s: Settings, results: dict) -> list[Row]:
    probes = []
    for _ in range(s.memory_probes):
        out = subprocess.run([sys.executable, str(BENCH / "pykvm_bench.py"), "memory-probe", "9"],
                             capture_output=True, text=True, timeout=120, check=False)
        if out.returncode != 0:
            raise WrongResult(f"memory probe failed (status {out.returncode}): {out.stderr.strip()[-500:]}")
        probes.append(json.loads(out.stdout.strip().splitlines()[-1]))
    # The raw-C figure: peak RSS of a C VMM with one 64 MiB VM (rawkvm lifecycle --count 1). It is
    # about 1-2 MiB, below the python launcher's floor, so GNU time (a C process) measures it.
    raw_kib = []
    raw_how = "GNU time"
    for _ in range(s.memory_probes):
        kib = gnu_time_peak_rss([str(RAWKVM), "lifecycle", "--count", "1"])
        if kib is None:
            r = wait4_run([str(RAWKVM), "lifecycle", "--count", "1"], 60)
            if r["exit_status"] != 0:
                raise WrongResult(f"rawkvm lifecycle --count 1 failed: {r['stderr'][:300]}")
            raw_how = "wait4, floored" if r["rss_floored"] else "wait4"
            kib = None if r["rss_floored"] else r["peak_rss_kib"]
        if kib is not None:
            raw_kib.append(kib)
    progress(f"row 6 (memory): {len(probes)} fresh processes")
    med = {key: statistics.median(p[key] for p in probes) for key in probes[0] if key != "thp"}
    raw_rss = statistics.median(raw_kib) * 1024 if raw_kib else None
    results["memory"] = {"probes": probes, "median": med, "rawkvm_one_vm_peak_rss_bytes": [k * 1024 for k in raw_kib],
                         "rawkvm_measured_with": raw_how}
    n = probes[0]["machines"]
    guest_kib = med["guest_resident_one_vm"] / 1024
    return [
        Row("6a", "RSS after `import pykvm.machine`", med["rss_after_import"], med["rss_bare"], "python, no pykvm",
            "bytes", med["rss_after_import"] / med["rss_bare"], "pykvm/bare"),
        Row("6b", "process RSS, one idle VM (hello_long run)", med["rss_one_vm"], raw_rss, "raw C VMM, 1 VM",
            "bytes", med["rss_one_vm"] / raw_rss if raw_rss else None, "pykvm/raw", "<= 30 MiB", med["rss_one_vm"] <= 30 * MIB,
            note=(f"6: RSS of a fresh process (psutil; bare = before any import). 6b includes the guest RAM "
                  f"resident in the VM's mapping ({guest_kib:.0f} KiB, smaps; THP {probes[0]['thp']}); raw C = "
                  f"peak RSS of rawkvm lifecycle --count 1 ({raw_how}). 6c/6d: ({n} VMs - 1 VM) / {n - 1}, each VM "
                  "loaded and run once; 6c counts everything, 6d subtracts the guest RAM resident in each "
                  "VM's mapping (smaps Rss), so it is pykvm's own per-VM cost; KVM's kernel memory is in neither")),
        Row("6c", f"RSS per additional VM ({n} at once), all", med["per_vm_increment"], None, "", "bytes",
            target="-", met=None),
        Row("6d", "RSS per additional VM, without guest RAM", med["per_vm_increment_without_guest_ram"], None, "",
            "bytes", target="<= 1 MiB", met=med["per_vm_increment_without_guest_ram"] <= MIB),
    ]


# --- row 7: compute at CPL3 ------------------------------------------------------------------------
def bench_compute(s: Settings, tmp: str, results: dict) -> list[Row]:
    count = s.compute_count
    bench = pb.ComputeBench(count, tmp)
    samples: dict[str, list[float]] = {"native": [], "raw": [], "pykvm": []}
    lines: dict[str, list[dict]] = {"native": [], "raw": []}
    pykvm_runs = []
    timeout = max(60.0, count * 20e-9)
    try:
        bench.run_once()  # warm-up
        for k in range(s.compute_rounds):
            for who in rotated(["native", "raw", "pykvm"], k):
                if who == "pykvm":
                    r = bench.run_once()
                    pykvm_runs.append(r)
                    samples["pykvm"].append(r["ns_per_iteration"])
                else:
                    sub = "native" if who == "native" else "compute"
                    line = rawkvm(sub, "--count", str(count), "--repeat", "1", timeout=10 * timeout)
                    lines[who].append(line)
                    samples[who].extend(line["samples_ns"])
            progress(f"row 7 (compute): round {k + 1}/{s.compute_rounds}")
    finally:
        bench.close()
    expected = int(lines["native"][0]["expected64"], 16)
    for r in pykvm_runs:
        if r["rax"] != expected:
            raise WrongResult(f"pykvm compute: rax {r['rax']:#018x}, rawkvm's reference {expected:#018x}")
    for line in lines["raw"]:
        if line["result"] != pykvm_runs[0]["result"]:
            raise WrongResult(f"rawkvm compute result byte {line['result']}, pykvm {pykvm_runs[0]['result']}")
    stats = {who: summary(v) for who, v in samples.items()}
    results["compute"] = {"count": count, "samples_ns_per_iteration": samples, "summary": stats, "rawkvm": lines,
                          "result_byte": pykvm_runs[0]["result"], "result64": f"{pykvm_runs[0]['rax']:#018x}"}
    fig, native, raw = stats["pykvm"]["median"], stats["native"]["median"], stats["raw"]["median"]
    return [
        Row("7a", f"compute loop at CPL3 ({f'{count:.0e}'.replace('e+0', 'e')} iter.), per iter.", fig, native, "host native", "ns",
            native / fig, "native/pykvm", ">= 0.95x", native / fig >= 0.95,
            note=f"7: result byte {pykvm_runs[0]['result']} (rax {pykvm_runs[0]['rax']:#018x}) checked against "
                 "rawkvm's C reference; ratio = baseline time / pykvm time (higher is better)"),
        Row("7b", "the same, against rawkvm compute (CPL3)", fig, raw, "raw C guest", "ns", raw / fig, "raw/pykvm"),
    ]


# --- row 8: the balloon -----------------------------------------------------------------------------
def bench_balloon(s: Settings, results: dict) -> list[Row]:
    """Row 8: host RSS returned by inflating N MiB in a guest's balloon, and how long it takes
    (bench/bench_balloon.py, in a fresh process: the RSS it measures is its own)."""
    pb.guest_path("balloon.bin")
    mib, rounds = (32, 2) if s is QUICK else (64, 5)
    cmd = [sys.executable, str(BENCH / "bench_balloon.py"), "--mib", str(mib), "--rounds", str(rounds)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise WrongResult(f"bench_balloon.py printed no result (status {out.returncode}): {out.stderr.strip()[-500:]}")
    data = json.loads(lines[-1])
    if not data.get("ok"):
        raise WrongResult(f"bench_balloon.py: {data.get('error')}")
    progress(f"row 8 (balloon): {rounds} rounds of {mib} MiB")
    results["balloon"] = data
    med = data["median"]
    size = mib * MIB
    note = (f"8: guests/build/balloon.bin (256 MiB, all touched) inflates {mib} MiB (chains of 8 x 256 PFNs); "
            f"RSS = psutil, this process; median of {rounds} rounds after a warm-up. 8b: from `vm.balloon.target = ...` until the "
            "RSS is down by 90 % of it; 8c: until the driver's `actual` reaches it; 8d: deflating it again")
    return [
        Row("8a", f"balloon: host RSS returned when inflating {mib} MiB", med["returned_bytes"], size, "inflated",
            "bytes", med["returned_bytes"] / size, "returned/inflated", ">= 0.90x", med["returned_bytes"] >= 0.9 * size,
            note=note),
        Row("8b", "balloon: new target -> RSS down by 90 %", med["ms_to_rss_90"], None, "", "ms"),
        Row("8c", "balloon: new target -> `actual` reached", med["ms_to_actual"], None, "", "ms"),
        Row("8d", f"balloon: deflate {mib} MiB -> `actual` 0", med["ms_to_deflated"], None, "", "ms"),
    ]


# --- rows 9 and 10: virtio-blk (bench/bench_virtio.py) ---------------------------------------------------
def bench_virtio_blk(s: Settings, tmp: str, results: dict, install_qemu: bool) -> list[Row]:
    """Rows 9 and 10: the CPL3 virtio-blk guest under pykvm and QEMU microvm, and the host's preadv."""
    import bench_virtio as bv

    qemu = qemu_if_any(install_qemu, "rows 9, 10")
    try:
        data = bv.measure(s is QUICK, tmp, qemu, progress)
    except bv.Unavailable as err:
        raise Skipped(str(err)) from err
    results["virtio_blk"] = data
    return [Row(**row) for row in bv.rows(data)]


# --- row 11: consolidation (bench/bench_density.py) ---------------------------------------------------------
def bench_density(s: Settings, results: dict, install_qemu: bool) -> list[Row]:
    """Row 11: idle 64 MiB guests in one pykvm process against QEMU microvm processes: memory per guest."""
    import bench_density as bd

    qemu = qemu_if_any(install_qemu, "row 11")
    try:
        data = bd.measure(s is QUICK, qemu, progress)
    except bd.DensityError as err:
        raise WrongResult(str(err)) from err
    results["density"] = data
    return [Row(**row) for row in bd.rows(data)]


# --- rows 12-15: snapshots (bench/bench_snapshot.py) --------------------------------------------------------
def bench_snapshots(s: Settings, tmp: str, results: dict, install_qemu: bool) -> list[Row]:
    """Rows 12-15: taking a snapshot, restoring to the first instruction, fast reset, clones, the per-test
    cost of a pytest fixture; QEMU's migration to a file and -incoming beside pykvm."""
    import bench_snapshot as bs

    data = bs.measure(s is QUICK, tmp, qemu_if_any(install_qemu, "rows 12-15"), progress)
    results["snapshots"] = data
    return [Row(**row) for row in bs.rows(data)]


# --- row 16: live migration (bench/bench_migration.py) ----------------------------------------------------
def bench_migration(s: Settings, tmp: str, results: dict, install_qemu: bool) -> list[Row]:
    """Row 16: guests moved between two processes over loopback TCP, idle and writing; QEMU microvm beside."""
    import bench_migration as bm

    data = bm.measure(bm.QUICK if s is QUICK else bm.FULL, tmp, qemu_if_any(install_qemu, "row 16"), progress)
    results["migration"] = data
    if data["wrong"]:
        raise WrongResult("; ".join(data["wrong"]))
    return [Row(**row) for row in bm.rows(data)]


# --- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="pykvm benchmarks against a raw-C KVM floor and QEMU microvm.")
    p.add_argument("--quick", action="store_true", help="smaller N and fewer repeats: a smoke run")
    p.add_argument("--json", metavar="PATH", type=Path, default=DEFAULT_JSON,
                   help=f"where to write the figures (default {DEFAULT_JSON.relative_to(ROOT)})")
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated rows to run (default all)")
    p.add_argument("--install-qemu", action="store_true",
                   help="if QEMU is missing and this runs as root, apt-get install qemu-system-x86")
    args = p.parse_args(argv)
    try:
        args.row_set = {int(x) for x in args.rows.split(",") if x.strip()}
    except ValueError:
        p.error(f"--rows takes numbers {ROWS[0]}-{ROWS[-1]}, e.g. --rows 1,2")
    if not args.row_set <= set(ROWS):
        p.error(f"--rows takes numbers {ROWS[0]}-{ROWS[-1]}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    s = QUICK if args.quick else FULL
    started = time.monotonic()
    try:
        host = host_description()
    except Exception as err:  # no /dev/kvm, no pykvm: nothing can be measured
        print(f"bench: cannot describe the host ({type(err).__name__}: {err}); is /dev/kvm usable and pykvm "
              "installed (pip install -e .)?", file=sys.stderr)
        return 1
    print(f"pykvm benchmarks ({'quick' if args.quick else 'full'} run)")
    print(format_host(host), flush=True)
    results: dict[str, Any] = {}
    rows: list[Row] = []
    failures: list[str] = []

    def attempt(number: int, title: str, fn: Callable[[], list[Row]]) -> None:
        if number not in args.row_set:
            return
        progress(f"row {number}: {title}")
        try:
            rows.extend(fn())
        except Skipped as err:
            progress(f"row {number} skipped: {err}")
            rows.append(Row(str(number), title, status="skipped", note=f"{number}: skipped: {err}"))
        except WrongResult as err:
            progress(f"row {number}: WRONG RESULT: {err}")
            failures.append(f"row {number}: {err}")
            rows.append(Row(str(number), title, status="wrong", note=f"{number}: wrong result: {err}"))
        except Exception as err:  # a benchmark that crashed has no figure either
            progress(f"row {number}: ERROR: {type(err).__name__}: {err}")
            failures.append(f"row {number}: {type(err).__name__}: {err}")
            rows.append(Row(str(number), title, status="error", note=f"{number}: error: {type(err).__name__}: {err}"))

    with tempfile.TemporaryDirectory(prefix="pykvm-bench-") as tmp:
        attempt(1, "PIO exit round trip", lambda: bench_exits("pio", s, tmp, results))
        attempt(2, "MMIO exit round trip", lambda: bench_exits("mmio", s, tmp, results))
        sync = next((r.pykvm for r in rows if r.id == "1b"), None)
        attempt(3, "ioeventfd", lambda: bench_ioeventfd(s, tmp, results, sync))
        attempt(4, "pykvm run vs QEMU microvm", lambda: bench_cli(s, results, args.install_qemu))
        attempt(5, "VM lifecycle", lambda: bench_lifecycle(s, tmp, results))
        attempt(6, "memory overhead", lambda: bench_memory(s, results))
        attempt(7, "guest compute at CPL3", lambda: bench_compute(s, tmp, results))
        attempt(8, "memory balloon", lambda: bench_balloon(s, results))
        if 10 in args.row_set:  # rows 9 and 10 come from one measurement
            args.row_set.add(9)
        attempt(9, "virtio-blk: pykvm, QEMU microvm, host", lambda: bench_virtio_blk(s, tmp, results, args.install_qemu))
        attempt(11, "consolidation: idle guests per pykvm process", lambda: bench_density(s, results, args.install_qemu))
        if args.row_set & {13, 14, 15}:  # rows 12-15 come from one measurement
            args.row_set.add(12)
        attempt(12, "snapshots: take, restore, reset, clones, pytest", lambda: bench_snapshots(s, tmp, results, args.install_qemu))
        attempt(16, "live migration", lambda: bench_migration(s, tmp, results, args.install_qemu))

    elapsed = time.monotonic() - started
    print()
    print(render_table(rows))
    missed = [r.id for r in rows if r.status == "ok" and r.met is False]
    print()
    print(f"targets missed: {', '.join(missed) if missed else 'none'}; "
          f"wrong results / errors: {len(failures)}; {elapsed:.0f} s")

    report = {
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "settings": dataclasses.asdict(s),
        "host": host,
        "load_average_at_end": list(os.getloadavg()),
        "elapsed_s": round(elapsed, 1),
        "rows": [dataclasses.asdict(r) for r in rows],
        "targets_missed": missed,
        "failures": failures,
        "measurements": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    progress(f"wrote {args.json}")
    import report as pictures

    written = pictures.write(report, fmt_value, args.json.parent)
    progress(f"wrote {', '.join(str(p) for p in written)}"
             + ("" if len(written) > 1 else " (no chart: matplotlib is missing; pip install -r bench/requirements.txt)"))
    for failure in failures:
        print(f"bench: FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
