#!/usr/bin/env python3
"""The virtio-blk benchmarks (``bench/run.py`` rows 9 and 10): pykvm and QEMU microvm running the
same guest on the same image, and this process reading the same file.

    python bench/bench_virtio.py [--quick] [--no-qemu]    # standalone: one JSON object

The guest is ``guests/asm/bench_blk_user.asm`` (assembled here with nasm, or
``guests/build/bench_blk_user.bin``): a multiboot kernel that goes to long mode by itself and
runs its whole virtio-blk driver at CPL3 - it finds the disk by its virtio-mmio magic in the
windows of either machine, initialises it, writes descriptors and the available ring, writes
QueueNotify, polls the used ring and checksums every buffer - so that this host's emulated
CPL0 (PLATFORM.md) does not hide what the VMM costs.  It keeps ``depth`` requests of ``size``
bytes in flight (sequential reads from sector 0) and times itself with the TSC from its first
submission to its last completion; the TSC runs at the host's rate (``rawkvm tsc`` measures it).

Each case (request size, depth) runs, in alternating rounds after a warm-up:

- **pykvm**: one :class:`~pykvm.machine.Machine` with the image as its disk (virtio notifications
  through ioeventfd), the patched guest loaded and run again each round;
- **QEMU microvm** with KVM: ``-M microvm`` with ``-device virtio-blk-device`` (virtio-mmio,
  ``force-legacy=false``: virtio 1.x, as the guest requires), the same image, a new process per run;
- **host**: ``os.preadv`` of the same bytes of the same file in this process, one request size at
  a time (the floor: the page cache's speed).

Figures are medians of the guest's own timing (pykvm, QEMU) and of the host loop: MiB/s and
requests/s.  Checked, every run (else :class:`pykvm_bench.WrongResult`): the guest exits through
the debug port with 0 and prints its report; it completed every request on a disk of the image's
size; its checksum (for request i, the sum of the buffer's qwords rotated left by i mod 64,
summed) equals the one computed here from the image's bytes; under pykvm the device counted
exactly the requests and bytes the guest asked for.  The image is random bytes in the temporary
directory, read once before (page cache warm).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import pykvm_bench as pb  # noqa: E402
import qemu_run  # noqa: E402

GUEST_SOURCE = ROOT / "guests" / "asm" / "bench_blk_user.asm"
GUEST_INCLUDES = ROOT / "guests" / "asm"
GUEST_BUILT = ROOT / "guests" / "build" / "bench_blk_user.bin"
RAWKVM = BENCH / "build" / "rawkvm"

MIB = 1 << 20
SECTOR = 512
PARAMS = struct.Struct("<QQQQ")  # count, size, depth, mode at file offset 32
PARAMS_OFF = 32
MODE_READ = 0
MASK64 = (1 << 64) - 1
RUN_TIMEOUT = 120.0
PYKVM_WINDOW = 0xD0000000
REPORT = re.compile(rb"bench_blk_user: done (\d+) checksum ([0-9a-f]{16}) cycles (\d+) capacity (\d+) window ([0-9a-f]{8})")
EXIT_MEANING = {2: "no virtio-blk (virtio-mmio version 2)", 3: "the device refused it or a request failed",
                4: "timeout on the used ring", 5: "bad parameters", 6: "a wrong used element",
                0x7F: "guest fault"}  # fmt: skip
# (request bytes, requests in flight); the requests per run: (full, quick)
CASES = ((65536, 1), (65536, 8), (512, 1), (512, 8))
REQUESTS = {65536: (1024, 256), 512: (5000, 1000)}
IMAGE_MIB = (64, 16)

WrongResult = pb.WrongResult


class Unavailable(Exception):
    """The benchmark cannot run here (no nasm and no built guest, no room for the image, no KVM)."""


def _stderr(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- the guest ------------------------------------------------------------------------------------
def build_guest(tmpdir: str | Path) -> Path:
    """bench_blk_user.bin: assembled from its source into ``tmpdir`` (always current), or the built one
    when nasm is missing.  Raises :class:`Unavailable` otherwise."""
    nasm = shutil.which("nasm")
    if nasm is None:
        if GUEST_BUILT.is_file():
            return GUEST_BUILT
        raise Unavailable(f"nasm is not installed and {GUEST_BUILT.relative_to(ROOT)} is not built")
    out = Path(tmpdir) / GUEST_BUILT.name
    cmd = [nasm, "-I", f"{GUEST_INCLUDES}/", "-f", "bin", "-o", str(out), str(GUEST_SOURCE)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise Unavailable(f"nasm could not assemble {GUEST_SOURCE.name}: {done.stderr.strip()[-300:]}")
    return out


def patched_guest(guest: Path, count: int, size: int, depth: int, tmpdir: str | Path) -> Path:
    """A copy of the guest with its parameters set (reads)."""
    out = Path(tmpdir) / f"bench_blk_user-{count}-{size}-{depth}.bin"
    return pb.patched_copy(guest, out, PARAMS.format, PARAMS_OFF, count, size, depth, MODE_READ)


def parse_report(serial: bytes, label: str) -> dict[str, int]:
    """The guest's report line: done, checksum, cycles, capacity, window."""
    m = REPORT.search(serial)
    if m is None:
        raise WrongResult(f"{label}: no report line in the guest's output {serial[-300:]!r}")
    done, checksum, cycles, capacity, window = m.groups()
    return {"done": int(done), "checksum": int(checksum, 16), "cycles": int(cycles), "capacity": int(capacity),
            "window": int(window, 16)}  # fmt: skip


def tsc_hz() -> float:
    """The TSC's ticks per second (the guest's TSC is the host's on KVM x86: PLATFORM.md)."""
    if not os.access(RAWKVM, os.X_OK):
        raise Unavailable(f"{RAWKVM} is missing: run make -C bench first")
    out = subprocess.run([str(RAWKVM), "tsc"], capture_output=True, text=True, timeout=30, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise Unavailable(f"rawkvm tsc failed: {out.stderr.strip()[-200:]}")
    return float(json.loads(lines[-1])["hz"])


# --- the image ------------------------------------------------------------------------------------
class Image:
    """A raw image of random bytes in ``tmpdir``, in the page cache (written, then read once)."""

    def __init__(self, tmpdir: str | Path, size: int) -> None:
        self.path = Path(tmpdir) / "blk.img"
        self.size = size
        self.sectors = size // SECTOR
        try:
            with open(self.path, "wb") as f:
                for _ in range(size // MIB):
                    f.write(os.urandom(MIB))
            self.data = self.path.read_bytes()  # the page-cache warm-up, and the reference bytes
        except OSError as err:
            raise Unavailable(f"cannot create a {size // MIB} MiB image in {tmpdir}: {err}") from err
        self._sums: dict[int, list[int]] = {}

    def chunk_sums(self, size: int) -> list[int]:
        """For each ``size``-byte chunk: the sum of its little-endian qwords mod 2^64."""
        if size not in self._sums:
            words = array("Q")
            words.frombytes(self.data)
            if sys.byteorder != "little":
                words.byteswap()
            n = size // 8
            self._sums[size] = [sum(words[i : i + n]) & MASK64 for i in range(0, len(words), n)]
        return self._sums[size]

    def expected_checksum(self, count: int, size: int) -> int:
        """bench_blk_user.asm's checksum of ``count`` sequential reads of ``size`` bytes."""
        sums = self.chunk_sums(size)
        chunks = self.sectors // (size // SECTOR)
        total = 0
        for i in range(count):
            s, r = sums[i % chunks], i % 64
            total += ((s << r) | (s >> (64 - r))) & MASK64 if r else s
        return total & MASK64

    def remove(self) -> None:
        self.data = b""
        self._sums.clear()
        self.path.unlink(missing_ok=True)


def check_report(report: dict[str, int], image: Image, count: int, size: int, label: str) -> None:
    if report["done"] != count or report["capacity"] != image.sectors:
        raise WrongResult(f"{label}: the guest completed {report['done']} requests on a {report['capacity']}-sector "
                          f"disk, expected {count} on {image.sectors}")
    expected = image.expected_checksum(count, size)
    if report["checksum"] != expected:
        raise WrongResult(f"{label}: guest checksum {report['checksum']:#018x}, the image's {expected:#018x}")
    if report["cycles"] <= 0:
        raise WrongResult(f"{label}: the guest measured {report['cycles']} TSC ticks")


# --- the three sides ------------------------------------------------------------------------------
class PykvmDisk:
    """One pykvm machine with the image as its virtio-blk disk; each run loads a patched guest."""

    def __init__(self, image: Image) -> None:
        from pykvm.config import DiskConfig
        from pykvm.errors import KvmUnavailableError
        from pykvm.machine import Machine

        self.image = image
        try:
            self.machine = Machine(memory=pb.GUEST_MEMORY, disks=(DiskConfig(str(image.path)),), capture_serial=True)
        except KvmUnavailableError as err:
            raise Unavailable(str(err)) from err
        self.device = self.machine.devices.virtio[0].device

    def run(self, guest: Path, count: int, size: int) -> dict[str, int]:
        from pykvm.result import ExitReason

        label = f"pykvm bench_blk_user {size} B x {count}"
        before = dict(self.device.stats)
        self.machine.load(guest)
        result = self.machine.run(timeout=RUN_TIMEOUT)
        serial = result.serial or b""
        if result.reason is not ExitReason.DEBUG_EXIT or result.exit_value != 0:
            meaning = EXIT_MEANING.get(result.exit_value or 0, "")
            raise WrongResult(f"{label} ended with {result.reason.value}, exit value {result.exit_value} ({meaning}); "
                              f"output {serial[-300:]!r}; {result.diagnosis}")
        report = parse_report(serial, label)
        check_report(report, self.image, count, size, label)
        reads = self.device.stats["reads"] - before.get("reads", 0)
        moved = self.device.stats["bytes_read"] - before.get("bytes_read", 0)
        if reads != count or moved != count * size or self.device.stats["errors"] != before.get("errors", 0):
            raise WrongResult(f"{label}: the device counted {reads} reads of {moved} bytes, expected {count} of "
                              f"{count * size}, and no error")
        if report["window"] != PYKVM_WINDOW:
            raise WrongResult(f"{label}: the guest used the window at {report['window']:#x}, pykvm's is {PYKVM_WINDOW:#x}")
        return report

    def close(self) -> None:
        self.machine.close()


def qemu_disk_args(image: Path) -> list[str]:
    """QEMU microvm's virtio-blk on ``image``: virtio-mmio, virtio 1.x (QEMU defaults to legacy).  Its image
    lock is off: the pykvm machine of the rounds in between keeps the image open and locked."""
    return ["-global", "virtio-mmio.force-legacy=false", "-drive",
            f"id=d0,file={image},format=raw,if=none,file.locking=off",
            "-device", "virtio-blk-device,drive=d0"]  # fmt: skip


def qemu_run_guest(qemu: str, guest: Path, image: Image, count: int, size: int) -> dict[str, int]:
    label = f"QEMU bench_blk_user {size} B x {count}"
    cmd = qemu_run.qemu_command(qemu, str(guest), "64M", qemu_disk_args(image.path))
    r = qemu_run.run_once(cmd, RUN_TIMEOUT)
    if not r["ok"] or r["debug_exit_value"] != 0:
        meaning = EXIT_MEANING.get(r["debug_exit_value"] or 0, "")
        raise WrongResult(f"{label}: status {r['exit_status']}, debug exit {r['debug_exit_value']} ({meaning}), "
                          f"timed out {r['timed_out']}; output {r['serial'][-300:]!r}; stderr {r['stderr'][-300:]!r}")
    report = parse_report(r["serial"].encode(), label)
    check_report(report, image, count, size, label)
    return report


def host_pass(image: Image, count: int, size: int) -> int:
    """ns for ``count`` preadv calls of ``size`` bytes, at the guest's offsets, through one buffer."""
    chunks = image.sectors // (size // SECTOR)
    offsets = [(i % chunks) * size for i in range(count)]
    buf = bytearray(size)
    bufs = [buf]
    fd = os.open(image.path, os.O_RDONLY)
    try:
        t0 = time.perf_counter_ns()
        for off in offsets:
            if os.preadv(fd, bufs, off) != size:
                raise WrongResult(f"host preadv at {off} read a short count")
        t1 = time.perf_counter_ns()
    finally:
        os.close(fd)
    if bytes(buf) != image.data[offsets[-1] : offsets[-1] + size]:
        raise WrongResult("host preadv read other bytes than the image holds")
    return t1 - t0


# --- the measurement --------------------------------------------------------------------------------
def _summary(samples: list[float]) -> dict[str, float | int]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def _rotated(items: list, k: int) -> list:
    k %= len(items)
    return items[k:] + items[:k]


def measure(quick: bool, tmpdir: str | Path, qemu: str | None, progress: Callable[[str], None] = _stderr) -> dict:
    """Every case: pykvm, QEMU (when ``qemu`` is given) and the host, in alternating rounds."""
    which = 1 if quick else 0
    rounds = 2 if quick else 5
    hz = tsc_hz()
    kvm_answer = None
    if qemu is not None:
        try:
            kvm_answer = qemu_run.check_kvm(qemu, 60)
        except qemu_run.QemuError as err:
            progress(f"virtio-blk: QEMU left out: {err}")
            qemu = None
    guest = build_guest(tmpdir)
    image = Image(tmpdir, IMAGE_MIB[which] * MIB)
    disk: PykvmDisk | None = None
    sides = ["pykvm", "host"] + (["qemu"] if qemu else [])
    samples: dict[str, dict[str, list[float]]] = {}
    try:
        disk = PykvmDisk(image)
        for size, depth in CASES:
            count = REQUESTS[size][which]
            patched = patched_guest(guest, count, size, depth, tmpdir)
            key = f"{size}x{depth}"
            series: dict[str, list[float]] = {side: [] for side in sides}

            def one(side: str) -> float:
                """Seconds for the case's requests."""
                if side == "host":
                    return host_pass(image, count, size) / 1e9
                if side == "pykvm":
                    return disk.run(patched, count, size)["cycles"] / hz  # type: ignore[union-attr]
                return qemu_run_guest(qemu, patched, image, count, size)["cycles"] / hz  # type: ignore[arg-type]

            for side in sides:  # warm-up
                one(side)
            for k in range(rounds):
                for side in _rotated(sides, k):
                    series[side].append(one(side))
            samples[key] = series
            progress(f"virtio-blk {size} B, depth {depth}: {rounds} rounds")
    finally:
        if disk is not None:
            disk.close()
        image.remove()
    summary = {}
    for size, depth in CASES:
        key = f"{size}x{depth}"
        count = REQUESTS[size][which]
        summary[key] = {side: {"seconds": _summary(v), "mib_per_s": count * size / MIB / statistics.median(v),
                               "requests_per_s": count / statistics.median(v)}
                        for side, v in samples[key].items()}  # fmt: skip
    return {
        "tsc_hz": hz, "image_bytes": image.size, "rounds": rounds, "guest": str(guest),
        "cases": [{"size": s, "depth": d, "requests": REQUESTS[s][which]} for s, d in CASES],
        "qemu": qemu_run.qemu_version(qemu) if qemu else None, "qemu_kvm": kvm_answer,
        "qemu_disk_args": qemu_disk_args(Path("IMAGE")), "samples_seconds": samples, "summary": summary,
    }  # fmt: skip


# --- the rows run.py prints -----------------------------------------------------------------------
SMALL_GOAL = 5 * 9076  # requests/s: five times the figure of the earlier guest, which submitted from CPL0
DEEP_SMALL_GOAL = 45_000  # requests/s at depth 8: what the C request path is for


def rows(data: dict) -> list[dict]:
    """Rows 9 and 10 as keyword arguments of run.py's ``Row``."""
    st = data["summary"]
    has_qemu = data["qemu"] is not None
    out = []

    def row(id_: str, what: str, key: str, unit: str, baseline: str, **extra: Any) -> None:
        field = "mib_per_s" if unit == "MiB/s" else "requests_per_s"
        fig = st[key]["pykvm"][field]
        base = st[key][baseline][field] if baseline in st[key] else None
        name = {"host": "host preadv", "qemu": "QEMU microvm"}[baseline]
        out.append({"id": id_, "what": what, "pykvm": fig, "baseline": base, "baseline_name": name, "unit": unit,
                    "ratio": fig / base if base else None, "ratio_label": f"pykvm/{baseline}", **extra})

    big, small = "65536x1", "512x1"
    row("9a", "virtio-blk read 64 KiB, depth 1", big, "MiB/s", "host", target=">= 0.5x",
        met=st[big]["pykvm"]["mib_per_s"] >= 0.5 * st[big]["host"]["mib_per_s"])
    row("9b", "virtio-blk read 64 KiB, depth 8", "65536x8", "MiB/s", "host")
    if has_qemu:
        row("9c", "the same, depth 1, against QEMU", big, "MiB/s", "qemu")
        row("9d", "the same, depth 8, against QEMU", "65536x8", "MiB/s", "qemu")
    row("10a", "virtio-blk read 512 B, depth 1", small, "req/s", "qemu" if has_qemu else "host",
        target=f">= {SMALL_GOAL / 1000:.1f}k req/s", met=st[small]["pykvm"]["requests_per_s"] >= SMALL_GOAL)
    row("10b", "virtio-blk read 512 B, depth 8", "512x8", "req/s", "qemu" if has_qemu else "host",
        target=f">= {DEEP_SMALL_GOAL / 1000:.0f}k req/s", met=st["512x8"]["pykvm"]["requests_per_s"] >= DEEP_SMALL_GOAL)
    host_small = st[small]["host"]["requests_per_s"]
    cases = ", ".join(f"{c['size']} B x {c['requests']}" for c in data["cases"])
    out[0]["note"] = (
        f"9, 10: guests/asm/bench_blk_user.asm, the whole driver at CPL3 (descriptors, avail ring, QueueNotify, "
        f"used-ring polling, checksums), on a {data['image_bytes'] // MIB} MiB image of random bytes, page cache "
        f"warm; sequential reads ({cases}); timed by the guest (TSC, {data['tsc_hz'] / 1e9:.3f} GHz) from the first "
        "submission to the last completion; pykvm: one machine, ioeventfd notifications, the reads served in C "
        "(pykvm_blk_serve, on the I/O thread); QEMU microvm: "
        f"{' '.join(data['qemu_disk_args'])}, a process per run; host: os.preadv of the same bytes in this process "
        f"(512 B: {host_small / 1000:.0f}k req/s). Checked: every request completed, the checksum of every byte read "
        f"equals the image's, pykvm's device counters; median of {data['rounds']} alternating rounds after a warm-up. "
        f"10a's goal: 5x {SMALL_GOAL // 5} req/s, the figure with the earlier guest that submitted from (emulated) CPL0"
    )
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="virtio-blk benchmarks: pykvm, QEMU microvm and the host (run.py rows 9, 10)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-qemu", action="store_true", help="leave QEMU out")
    args = p.parse_args(argv)
    qemu = None if args.no_qemu else shutil.which("qemu-system-x86_64")
    try:
        with tempfile.TemporaryDirectory(prefix="pykvm-bench-virtio-") as tmp:
            data = measure(args.quick, tmp, qemu)
    except Unavailable as err:
        print(json.dumps({"ok": False, "skipped": str(err)}))
        return 0
    except WrongResult as err:
        print(json.dumps({"ok": False, "error": str(err)}))
        return 1
    print(json.dumps({"ok": True, **data, "rows": rows(data)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
