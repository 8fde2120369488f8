#!/usr/bin/env python3
"""Boot a kernel under QEMU's microvm machine with KVM and measure each run.

The QEMU figure that pykvm's boot benchmarks are compared with:

    python bench/qemu_run.py --kernel PATH [--runs 5]

runs

    qemu-system-x86_64 -enable-kvm -M microvm,isa-serial=on -nodefaults -no-user-config
        -nographic -serial stdio -device isa-debug-exit,iobase=0xf4,iosize=0x04 -m 64M
        -no-reboot -kernel PATH

``--runs`` times and prints one JSON line per run: wall time from just before the process is
started to its exit (``wall_ms``), its peak resident set size from ``os.wait4``'s rusage
(``peak_rss_kib``, exact, no polling), its exit status and what the guest wrote to the
debug-exit port. A final line with ``"summary": true`` gives medians.

The kernel must be something QEMU can boot on microvm with ``-kernel`` (a multiboot v1 or
PVH ELF kernel, or a Linux bzImage) and should end by writing a byte to port 0xf4: QEMU then
exits with status ``(value << 1) | 1``.

KVM is required. Before the runs QEMU is asked (``info kvm`` on its monitor) whether KVM is in
use; if ``-enable-kvm`` fails or KVM is not in use the script says so and exits 1. It never
falls back to TCG.

Standard library only (Python 3.11).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

DEBUG_EXIT_PORT = "0xf4"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class QemuError(Exception):
    """QEMU cannot be used as asked; the message says why and what to do."""


def qemu_command(qemu: str, kernel: str, memory: str, extra: list[str], debug_exit: bool = True) -> list[str]:
    """The benchmark command line (``debug_exit=False``: without the isa-debug-exit device)."""
    return [
        qemu,
        "-enable-kvm",
        "-M", "microvm,isa-serial=on",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial", "stdio",
        *(["-device", f"isa-debug-exit,iobase={DEBUG_EXIT_PORT},iosize=0x04"] if debug_exit else []),
        "-m", memory,
        # A guest that triple-faults would otherwise be reset forever.
        "-no-reboot",
        "-kernel", kernel,
        *extra,
    ]


def qemu_version(qemu: str) -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30, check=False)
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0] if first else "unknown"


def check_kvm(qemu: str, timeout: float) -> str:
    """Start the same machine paused with a monitor and ask whether KVM is in use.

    Returns the monitor's answer ("kvm support: enabled" ...). Raises QemuError when QEMU
    cannot start with -enable-kvm or reports KVM disabled.
    """
    if not os.path.exists("/dev/kvm"):
        raise QemuError("/dev/kvm does not exist: this host has no KVM, and this benchmark does not use TCG")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise QemuError("/dev/kvm is not readable and writable by this user: run as root or join group kvm")
    cmd = [qemu, "-enable-kvm", "-M", "microvm,isa-serial=on", "-nodefaults", "-no-user-config",
           "-display", "none", "-S", "-m", "64M", "-monitor", "stdio"]
    try:
        out = subprocess.run(cmd, input="info kvm\nquit\n", capture_output=True, text=True,
                             timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise QemuError(f"QEMU did not answer 'info kvm' within {timeout:.0f} s") from err
    answer = next((line.strip() for line in out.stdout.splitlines() if "kvm support" in line), "")
    if out.returncode != 0 or not answer:
        detail = (out.stderr.strip() or out.stdout.strip() or f"exit status {out.returncode}").splitlines()[-1]
        raise QemuError(f"QEMU cannot start a microvm with -enable-kvm here: {detail}")
    if not answer.endswith("enabled"):
        raise QemuError(f"QEMU reports '{answer}': KVM is not in use, refusing to measure TCG")
    return answer


def run_once(cmd: list[str], timeout: float) -> dict:
    """Run QEMU once; wall time, rusage, exit status and serial output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        timed_out = threading.Event()
        t0 = time.perf_counter_ns()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        # A pidfd names this process even after it is reaped, so the watchdog can never
        # signal a recycled pid.
        pidfd = os.pidfd_open(proc.pid)

        def kill() -> None:
            timed_out.set()
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

        watchdog = threading.Timer(timeout, kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            t1 = time.perf_counter_ns()
        finally:
            watchdog.cancel()
            os.close(pidfd)
        proc.returncode = os.waitstatus_to_exitcode(status)   # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        serial = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace").strip()

    signaled = os.WIFSIGNALED(status)
    code = None if signaled else os.WEXITSTATUS(status)
    # isa-debug-exit: QEMU exits with (value << 1) | 1. Status 1 is also QEMU's own error
    # status, so a guest writing 0 is told apart by QEMU having printed no error (warnings,
    # such as the CPUID feature ones this host causes, do not count).
    errors = [line for line in stderr.splitlines() if line.strip() and "warning:" not in line]
    debug_value = (code >> 1) if code is not None and code & 1 and (code > 1 or not errors) else None
    return {
        "wall_ms": round((t1 - t0) / 1e6, 3),
        "peak_rss_kib": usage.ru_maxrss,          # Linux reports KiB
        "user_ms": round(usage.ru_utime * 1e3, 3),
        "sys_ms": round(usage.ru_stime * 1e3, 3),
        "exit_status": code,
        "signal": os.WTERMSIG(status) if signaled else None,
        "debug_exit_value": debug_value,
        "timed_out": timed_out.is_set(),
        "ok": debug_value is not None and not timed_out.is_set(),
        "serial": serial[:2000],
        "stderr": stderr[:2000],
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Boot a kernel under QEMU microvm + KVM; print wall time and peak RSS per run as JSON lines.")
    p.add_argument("--kernel", required=True, help="kernel image for -kernel (multiboot, PVH ELF or bzImage)")
    p.add_argument("--runs", type=int, default=5, help="number of measured runs (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (default 1)")
    p.add_argument("--memory", default="64M", help="guest memory, QEMU -m syntax (default 64M)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a run is killed (default 60)")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary (default: qemu-system-x86_64 on PATH)")
    p.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                   help="extra QEMU argument (repeatable), e.g. --qemu-arg=-append --qemu-arg='console=ttyS0'")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be at least 1 and --warmup at least 0")
    if not os.path.isfile(args.kernel):
        p.error(f"--kernel {args.kernel}: no such file")
    return args


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    qemu = shutil.which(args.qemu)
    if qemu is None:
        emit({"tool": "qemu", "ok": False, "error": f"{args.qemu} not found; install it (apt-get install qemu-system-x86)"})
        return EXIT_FAILED
    try:
        kvm = check_kvm(qemu, args.timeout)
    except QemuError as err:
        print(f"qemu_run: {err}", file=sys.stderr)
        emit({"tool": "qemu", "ok": False, "error": str(err)})
        return EXIT_FAILED

    cmd = qemu_command(qemu, args.kernel, args.memory, args.qemu_arg)
    version = qemu_version(qemu)
    print(f"qemu_run: {version}; {kvm}; {' '.join(cmd)}", file=sys.stderr)
    for _ in range(args.warmup):
        run_once(cmd, args.timeout)
    results = []
    for i in range(args.runs):
        r = run_once(cmd, args.timeout)
        results.append(r)
        emit({"tool": "qemu", "run": i, **r})

    good = [r for r in results if r["ok"]]
    summary = {"tool": "qemu", "summary": True, "ok": len(good) == len(results), "runs": len(results),
               "runs_ok": len(good), "qemu": version, "kvm": kvm, "command": cmd}
    if good:
        walls = [r["wall_ms"] for r in good]
        rss = [r["peak_rss_kib"] for r in good]
        summary.update(wall_ms_median=statistics.median(walls), wall_ms_min=min(walls), wall_ms_max=max(walls),
                       peak_rss_kib_median=statistics.median(rss), peak_rss_kib_max=max(rss))
    emit(summary)
    if len(good) != len(results):
        print(f"qemu_run: {len(results) - len(good)} of {len(results)} runs did not end through the debug-exit "
              "port (see exit_status, timed_out, stderr)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
