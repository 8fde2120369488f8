#!/usr/bin/env python3
"""The virtio benchmarks (issue 5, item 7): virtio-blk throughput, and notifications per second
through ioeventfd against synchronous MMIO exits.  ``bench/run.py`` rows 9 and 10 run them.

    python bench/bench_virtio.py [--quick] [--only blk|notify]   # standalone: one JSON object

The guest is ``guests/asm/bench_blk.asm`` (assembled here with nasm into the temporary
directory, or ``guests/build/bench_blk.bin``): a long-mode guest that runs at CPL3 and enters
CPL0 by int3 only for the kernel calls of lib/virtio.inc (device setup, and per request
VSYS_SUBMIT: three descriptors, the available ring, the QueueNotify write).  It sends ``count``
requests, one in flight, polls the used ring at CPL3, checksums every buffer at CPL3, leaves
its results in its parameter block (read back from guest memory here) and exits through port
0xf4.

Row 9, throughput: ``count`` sequential 64 KiB reads (mode 0) or writes (mode 1) from sector 0,
wrapping at the capacity, on a 64 MiB image (16 MiB with ``--quick``) of random bytes in the
temporary directory, read once before (warm page cache); reads cover the image once per run,
writes a quarter of it.  Figure: bytes / wall time of ``Machine.run()`` (guest entry to the
debug exit; nothing subtracted: the guest's own setup, measured apart with count 0, is
included).  Baseline: this process reading (``os.preadv``) or writing (``os.pwritev`` +
``os.fdatasync``: the guest does not negotiate VIRTIO_BLK_F_FLUSH, so the device writes through)
the same file sequentially through one 64 KiB buffer, the same bytes.

Row 10, notifications: ``count`` 512-byte reads (mode 2), each notified and waited for, once
with ``virtio_notify="ioeventfd"`` (KVM_IOEVENTFD: the QueueNotify write is absorbed by the
kernel and wakes pykvm's I/O thread) and once with ``"sync"`` (every QueueNotify write is an
MMIO exit handled on the vCPU thread).  Figures: µs per request and requests/s (wall time of
``run()`` / count), and the MMIO exits of each run from ``result.stats``.

Checked, every run (a failure raises :class:`pykvm_bench.WrongResult`): debug exit 0; the
guest completed ``count`` requests and saw the image's capacity; its checksum equals the one
computed here from the image's bytes (mode 1: from the pattern it writes, and the image is
read back and compared after the run); the device counted exactly ``count`` reads (writes) of
the right size and no error; QueueNotify MMIO exits are exactly 0 with ioeventfd and exactly
``count`` when synchronous.  Each series is warmed up once; pykvm and its baseline (or the two
notification modes) alternate in rounds whose order rotates; figures are medians.

After the measured rounds, one more run of each kind wraps ``VirtioBlock.process`` (and the
``preadv``/``pwritev`` inside it) with a timer: where the time per request goes, reported in
the notes and the JSON; those runs are not in the figures.
"""

from __future__ import annotations

import argparse
import json
import os
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

GUEST_SOURCE = ROOT / "guests" / "asm" / "bench_blk.asm"
GUEST_INCLUDES = ROOT / "guests" / "asm"
GUEST_BUILT = ROOT / "guests" / "build" / "bench_blk.bin"

MIB = 1 << 20
SECTOR = 512
BIG = 65536  # row 9's request size
SMALL = 512  # row 10's
MODE_READ, MODE_WRITE, MODE_SMALL = 0, 1, 2
LOAD_ADDR = 0x100000  # bench_blk.asm's org
PARAM = struct.Struct("<QQQ")  # count, mode, flags at file offset 8
PARAM_OFF = 8
RESULT = struct.Struct("<QQQQ")  # checksum, done, capacity, detail at offset 32
RESULT_OFF = 32
MASK64 = (1 << 64) - 1
RUN_TIMEOUT = 120.0
EXIT_MEANING = {2: "no virtio-blk device", 3: "device refused initialisation or a request failed",
                4: "timeout on the used ring", 5: "bad parameters", 6: "wrong used length",
                0x7F: "guest fault"}  # fmt: skip

WrongResult = pb.WrongResult


class Unavailable(Exception):
    """The benchmark cannot run here (no nasm and no built guest, no room for the image, no KVM)."""


def _stderr(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- the guest ------------------------------------------------------------------------------------
def build_guest(tmpdir: str | Path) -> Path:
    """bench_blk.bin: assembled from guests/asm/bench_blk.asm into ``tmpdir`` (always current), or
    guests/build/bench_blk.bin when nasm is missing.  Raises :class:`Unavailable` otherwise."""
    nasm = shutil.which("nasm")
    if nasm is None:
        if GUEST_BUILT.is_file():
            return GUEST_BUILT
        raise Unavailable(f"nasm is not installed and {GUEST_BUILT.relative_to(ROOT)} is not built")
    if not GUEST_SOURCE.is_file():
        raise Unavailable(f"{GUEST_SOURCE.relative_to(ROOT)} is missing")
    out = Path(tmpdir) / "bench_blk.bin"
    cmd = [nasm, "-I", f"{GUEST_INCLUDES}/", "-f", "bin", "-o", str(out), str(GUEST_SOURCE)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise Unavailable(f"nasm could not assemble bench_blk.asm: {done.stderr.strip()[-300:]}")
    return out


def patched_guest(guest: Path, count: int, mode: int, tmpdir: str | Path) -> Path:
    """A copy of bench_blk.bin with ``count`` and ``mode`` set and the COM1 summary off."""
    data = bytearray(guest.read_bytes())
    if len(data) < RESULT_OFF + RESULT.size or data[0] != 0xEB:
        raise Unavailable(f"{guest} has no bench_blk parameter block")
    PARAM.pack_into(data, PARAM_OFF, count, mode, 0)
    out = Path(tmpdir) / f"bench_blk-{count}-{mode}.bin"
    out.write_bytes(data)
    return out


# --- the images -----------------------------------------------------------------------------------
class Image:
    """A raw image of random bytes in ``tmpdir``, in the page cache (written, then read once)."""

    def __init__(self, tmpdir: str | Path, name: str, size: int) -> None:
        self.path = Path(tmpdir) / name
        self.size = size
        self.sectors = size // SECTOR
        try:
            with open(self.path, "wb") as f:
                for _ in range(size // MIB):
                    f.write(os.urandom(MIB))
            self.data = self.path.read_bytes()  # the page-cache warm-up, and the reference bytes
        except OSError as err:
            raise Unavailable(f"cannot create a {size // MIB} MiB image in {tmpdir}: {err}") from err
        if len(self.data) != size:
            raise Unavailable(f"{self.path}: wrote {size} bytes, read back {len(self.data)}")
        self._sums: dict[int, list[int]] = {}

    def chunk_sums(self, request_bytes: int) -> list[int]:
        """For each request-sized chunk of the image: the sum of its little-endian qwords mod 2^64."""
        if request_bytes not in self._sums:
            self._sums[request_bytes] = _qword_sums(self.data, request_bytes)
        return self._sums[request_bytes]

    def remove(self) -> None:
        self.data = b""
        self._sums.clear()
        try:
            self.path.unlink()
        except OSError:
            pass


def _qword_sums(data: bytes, chunk: int) -> list[int]:
    try:
        import numpy as np
    except ImportError:
        words = array("Q")
        words.frombytes(data)
        if sys.byteorder != "little":
            words.byteswap()
        n = chunk // 8
        return [sum(words[i : i + n]) & MASK64 for i in range(0, len(words), n)]
    arr = np.frombuffer(data, dtype="<u8").reshape(-1, chunk // 8)
    return [int(x) for x in arr.sum(axis=1, dtype=np.uint64)]


def request_chunks(count: int, request_bytes: int, capacity_sectors: int) -> list[int]:
    """Which request-sized chunk each of ``count`` requests touches: bench_blk.asm's sequence
    (from sector 0 upward, back to 0 when a request would cross the capacity)."""
    per = request_bytes // SECTOR
    chunks, sector = [], 0
    for _ in range(count):
        if sector + per > capacity_sectors:
            sector = 0
        chunks.append(sector // per)
        sector += per
    return chunks


def combine(sums: list[int]) -> int:
    """bench_blk.asm's checksum: c = rol64(c, 1) + s_i for each request in order."""
    c = 0
    for s in sums:
        c = (((c << 1) | (c >> 63)) + s) & MASK64
    return c


def write_pattern_sum(i: int, request_bytes: int) -> int:
    """The qword sum of mode 1's buffer for request i: qwords (i << 32) | j, j < n."""
    n = request_bytes // 8
    return (n * (i << 32) + n * (n - 1) // 2) & MASK64


def write_pattern(i: int, request_bytes: int) -> bytes:
    n = request_bytes // 8
    words = array("Q", range(i << 32, (i << 32) + n))
    if sys.byteorder != "little":
        words.byteswap()
    return words.tobytes()


# --- pykvm runs -------------------------------------------------------------------------------------
class BlkGuest:
    """One machine with one virtio-blk disk (``image``) and bench_blk.bin, run again and again."""

    def __init__(self, guest: Path, image: Image, notify: str, tmpdir: str | Path) -> None:
        from pykvm.config import DiskConfig
        from pykvm.devices.virtio.mmio import QUEUE_NOTIFY
        from pykvm.errors import KvmUnavailableError
        from pykvm.machine import Machine

        self.guest, self.image, self.notify, self.tmpdir = guest, image, notify, tmpdir
        try:
            self.machine = Machine(memory=pb.GUEST_MEMORY, disks=(DiskConfig(str(image.path)),),
                                   virtio_notify=notify, capture_serial=True)  # fmt: skip
        except KvmUnavailableError as err:
            raise Unavailable(str(err)) from err
        slot = self.machine.virtio[0]
        self.device = slot.transport.device
        self.transport = slot.transport
        self.notify_key = f"mmio {slot.base + QUEUE_NOTIFY:#06x} write"
        self._images: dict[tuple[int, int], Path] = {}

    def close(self) -> None:
        self.machine.close()

    def run_once(self, count: int, mode: int) -> dict[str, Any]:
        """One run of ``count`` requests in ``mode``; checked; wall time and what the stats say."""
        key = (count, mode)
        if key not in self._images:
            self._images[key] = patched_guest(self.guest, count, mode, self.tmpdir)
        m = self.machine
        m.load(self._images[key], format="flat", mode="long")
        before = m.stats()
        dev_before = dict(self.device.stats)
        notes_before = self.transport.stats["notifications"]
        t0 = time.perf_counter_ns()
        result = m.run(timeout=RUN_TIMEOUT)
        t1 = time.perf_counter_ns()
        after = result.stats
        checksum, done, capacity, detail = RESULT.unpack(m.memory.read(LOAD_ADDR + RESULT_OFF, RESULT.size))
        label = f"pykvm bench_blk mode {mode} ({self.notify})"
        from pykvm.result import ExitReason

        if result.reason is not ExitReason.DEBUG_EXIT or result.exit_value != 0:
            meaning = EXIT_MEANING.get(result.exit_value or 0, "")
            serial = (result.serial or b"").decode(errors="replace").strip()
            raise WrongResult(f"{label} ended with {result.reason.value}, exit value {result.exit_value} "
                              f"({meaning}; request {done}, detail {detail}, serial {serial!r}): {result.diagnosis}")
        if done != count or capacity != self.image.sectors:
            raise WrongResult(f"{label}: the guest reports {done} requests on a {capacity}-sector disk, "
                              f"expected {count} on {self.image.sectors}")
        size = SMALL if mode == MODE_SMALL else BIG
        chunks = request_chunks(count, size, self.image.sectors)
        if mode == MODE_WRITE:
            expected = combine([write_pattern_sum(i, size) for i in range(count)])
        else:
            sums = self.image.chunk_sums(size)
            expected = combine([sums[c] for c in chunks])
        if checksum != expected:
            raise WrongResult(f"{label}: guest checksum {checksum:#018x}, the host's {expected:#018x}")
        dev = {k: self.device.stats[k] - dev_before.get(k, 0) for k in self.device.stats}
        verb, moved = ("writes", "bytes_written") if mode == MODE_WRITE else ("reads", "bytes_read")
        if dev.get(verb, 0) != count or dev.get(moved, 0) != count * size or dev.get("errors", 0):
            raise WrongResult(f"{label}: the device counted {dev.get(verb, 0)} {verb} of {dev.get(moved, 0)} bytes "
                              f"and {dev.get('errors', 0)} errors, expected {count} of {count * size} bytes")
        by_address = lambda s: s.exits_by_address.get(self.notify_key, 0)  # noqa: E731
        notify_exits = by_address(after) - by_address(before)
        want = count if self.notify == "sync" else 0
        if notify_exits != want:
            raise WrongResult(f"{label}: {notify_exits} MMIO exits at QueueNotify ({self.notify_key}), expected {want}")
        if mode == MODE_WRITE:
            self._verify_written(count, size, chunks)
        exits = {k: after.exits_by_reason.get(k, 0) - before.exits_by_reason.get(k, 0) for k in after.exits_by_reason}
        return {
            "ns": t1 - t0,
            "bytes": count * size,
            "checksum": f"{checksum:#018x}",
            "exits": {k: v for k, v in exits.items() if v},
            "mmio_exits": exits.get("mmio", 0),
            "queue_notify_exits": notify_exits,
            "notifications": self.transport.stats["notifications"] - notes_before,
            "guest_ns": after.guest_ns - before.guest_ns,
            "python_handler_ns": after.python_handler_ns - before.python_handler_ns,
        }

    def _verify_written(self, count: int, size: int, chunks: list[int]) -> None:
        """After a mode-1 run: every chunk holds the pattern of the last request that wrote it."""
        last = {chunk: i for i, chunk in enumerate(chunks)}
        fd = os.open(self.image.path, os.O_RDONLY)
        try:
            for chunk, i in last.items():
                got = os.pread(fd, size, chunk * size)
                if got != write_pattern(i, size):
                    raise WrongResult(f"pykvm bench_blk mode 1: image bytes {chunk * size}..{(chunk + 1) * size} "
                                      f"are not request {i}'s pattern")
        finally:
            os.close(fd)

    def profile_once(self, count: int, mode: int) -> dict[str, Any]:
        """An extra (unmeasured) run with ``VirtioBlock.process``, and the preadv/pwritev and
        write-through fdatasync inside it, timed (instance attributes wrap the methods)."""
        device = self.device
        spans: list[tuple[int, int, int]] = []  # (start, end, chains) of each process() call
        inner: dict[str, list[int]] = {"_transfer": [], "_write_through": []}
        originals = {name: getattr(device, name) for name in ("process", *inner)}

        def process(queue_index: int) -> None:
            before = device.stats["reads"] + device.stats["writes"]
            t0 = time.perf_counter_ns()
            try:
                originals["process"](queue_index)
            finally:
                spans.append((t0, time.perf_counter_ns(), device.stats["reads"] + device.stats["writes"] - before))

        def timed(name: str) -> Callable[..., Any]:
            def call(*args: Any) -> Any:
                t0 = time.perf_counter_ns()
                try:
                    return originals[name](*args)
                finally:
                    inner[name].append(time.perf_counter_ns() - t0)

            return call

        device.process = process
        for name in inner:
            setattr(device, name, timed(name))
        try:
            run = self.run_once(count, mode)
        finally:
            for name in originals:
                delattr(device, name)  # back to the class's methods
        chains = max(sum(c for _, _, c in spans), 1)
        calls = [end - start for start, end, _ in spans]
        in_process, transfer, sync = sum(calls), sum(inner["_transfer"]), sum(inner["_write_through"])
        # From the end of one process() call to the start of the next: the guest sees the used ring,
        # checksums, enters CPL0 (int3), submits (emulated), notifies; the notification reaches process().
        gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:])]
        return {
            "wall_ns": run["ns"],
            "requests": count,
            "process_calls": len(calls),
            "chains": chains,
            "process_ns_total": in_process,
            "process_ns_per_request": in_process / chains,
            "process_ns_median_call": statistics.median(calls) if calls else None,
            "transfer_ns_per_request": transfer / chains,
            "write_through_sync_ns_per_request": sync / chains,
            "python_ns_per_request": (in_process - transfer - sync) / chains,
            "process_share_of_wall": in_process / run["ns"],
            "gap_ns_median": statistics.median(gaps) if gaps else None,
            "gap_ns_mean": statistics.fmean(gaps) if gaps else None,
            "gap_ns_p99": sorted(gaps)[int(0.99 * (len(gaps) - 1))] if gaps else None,
            "gaps_over_1ms_share_of_wall": sum(g for g in gaps if g > 1_000_000) / run["ns"],
            "guest_ns_per_request": run["guest_ns"] / count,
            "python_handler_ns_per_request": run["python_handler_ns"] / count,
        }


# --- the host baseline ----------------------------------------------------------------------------
def host_pass(image: Image, count: int, write: bool, sync: bool = False) -> int:
    """ns for ``count`` sequential 64 KiB preadv (pwritev) calls on ``image`` through one buffer,
    at the offsets bench_blk.bin uses; ``sync``: fdatasync after each write, as the device does."""
    offsets = [c * BIG for c in request_chunks(count, BIG, image.sectors)]
    buf = bytearray(image.data[:BIG]) if write else bytearray(BIG)
    bufs = [buf]
    fd = os.open(image.path, os.O_RDWR if write else os.O_RDONLY)
    try:
        call = os.pwritev if write else os.preadv
        t0 = time.perf_counter_ns()
        for off in offsets:
            if call(fd, bufs, off) != BIG:
                raise WrongResult(f"host {'pwritev' if write else 'preadv'} at {off} moved a short count")
            if sync:
                os.fdatasync(fd)
        t1 = time.perf_counter_ns()
    finally:
        os.close(fd)
    if not write and bytes(buf) != image.data[offsets[-1] : offsets[-1] + BIG]:
        raise WrongResult("host preadv read other bytes than the image holds")
    return t1 - t0


# --- the measurements -----------------------------------------------------------------------------
def _summary(samples: list[float]) -> dict[str, float | int]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def _rotated(items: list, k: int) -> list:
    k %= len(items)
    return items[k:] + items[:k]


def measure_throughput(quick: bool, tmpdir: str | Path, progress: Callable[[str], None] = _stderr) -> dict:
    """Row 9: 64 KiB sequential reads and writes, pykvm against the host, on one image each.

    bench_blk.asm's driver accepts VIRTIO_F_VERSION_1 alone, so VIRTIO_BLK_F_FLUSH is not negotiated
    and the device writes through (an fdatasync after every write, virtio 1.2 5.2.6.2): the write
    baseline is pwritev + fdatasync per 64 KiB (plain pwritev is measured too, for the note).  Those
    syncs take milliseconds, so writes cover a quarter of the image."""
    size = (16 if quick else 64) * MIB
    rounds = 2 if quick else 7
    counts = {"read": size // BIG, "write": size // BIG // 4}
    guest = build_guest(tmpdir)
    images = {"read": Image(tmpdir, "blk-read.img", size), "write": Image(tmpdir, "blk-write.img", size)}
    guests: dict[str, BlkGuest] = {}
    try:
        guests = {kind: BlkGuest(guest, images[kind], "ioeventfd", tmpdir) for kind in images}
        modes = {"read": MODE_READ, "write": MODE_WRITE}
        series = ["pykvm read", "host read", "pykvm write", "host write", "host write-nosync"]
        samples: dict[str, list[float]] = {s: [] for s in series}
        runs: dict[str, list[dict]] = {"read": [], "write": []}

        def one(who: str) -> float:
            side, kind = who.split()
            base = kind.split("-")[0]
            if side == "host":
                ns = host_pass(images[base], counts[base], base == "write", sync=kind == "write")
            else:
                run = guests[kind].run_once(counts[kind], modes[kind])
                runs[kind].append(run)
                ns = run["ns"]
            return counts[base] * BIG / MIB / (ns / 1e9)

        for who in series:  # warm-up
            one(who)
        runs = {"read": [], "write": []}
        setup = [guests["read"].run_once(0, MODE_READ)["ns"]]  # the guest's fixed cost: setup, exit
        for k in range(rounds):
            for who in _rotated(series, k):
                samples[who].append(one(who))
            setup.append(guests["read"].run_once(0, MODE_READ)["ns"])
            progress(f"row 9 (virtio-blk throughput): round {k + 1}/{rounds}")
        profile = {kind: guests[kind].profile_once(counts[kind], modes[kind]) for kind in guests}
    finally:
        for g in guests.values():
            g.close()
        for image in images.values():
            image.remove()
    stats = {who: _summary(v) for who, v in samples.items()}
    return {
        "image_bytes": size, "request_bytes": BIG, "requests_per_run": counts, "in_flight": 1, "rounds": rounds,
        "notify": "ioeventfd", "samples_mib_per_s": samples, "summary": stats, "runs": runs,
        "setup_ns": _summary(setup), "profile": profile, "guest": str(guest),
    }  # fmt: skip


def measure_notify(quick: bool, tmpdir: str | Path, progress: Callable[[str], None] = _stderr) -> dict:
    """Row 10: 512-byte reads, notify + wait each, with ioeventfd and with synchronous exits."""
    count = 1000 if quick else 5000
    rounds = 2 if quick else 5
    guest = build_guest(tmpdir)
    image = Image(tmpdir, "blk-notify.img", 16 * MIB)  # 32768 sectors: no wrap below that many requests
    guests: dict[str, BlkGuest] = {}
    try:
        guests = {notify: BlkGuest(guest, image, notify, tmpdir) for notify in ("ioeventfd", "sync")}
        samples: dict[str, list[float]] = {n: [] for n in guests}
        runs: dict[str, list[dict]] = {n: [] for n in guests}
        for g in guests.values():  # warm-up
            g.run_once(count, MODE_SMALL)
        setup = {n: [g.run_once(0, MODE_SMALL)["ns"]] for n, g in guests.items()}
        for k in range(rounds):
            for notify in _rotated(list(guests), k):
                run = guests[notify].run_once(count, MODE_SMALL)
                runs[notify].append(run)
                samples[notify].append(run["ns"] / count)
            for n, g in guests.items():
                setup[n].append(g.run_once(0, MODE_SMALL)["ns"])
            progress(f"row 10 (virtio notifications): round {k + 1}/{rounds}")
        profile = {n: g.profile_once(count, MODE_SMALL) for n, g in guests.items()}
    finally:
        for g in guests.values():
            g.close()
        image.remove()
    stats = {n: _summary(v) for n, v in samples.items()}
    mmio = {n: statistics.median(r["mmio_exits"] for r in rs) for n, rs in runs.items()}
    at_notify = {n: statistics.median(r["queue_notify_exits"] for r in rs) for n, rs in runs.items()}
    return {
        "requests_per_run": count, "request_bytes": SMALL, "rounds": rounds, "samples_ns_per_request": samples,
        "summary": stats, "runs": runs, "mmio_exits_per_run": mmio, "queue_notify_exits_per_run": at_notify,
        "setup_ns": {n: _summary(v) for n, v in setup.items()}, "profile": profile, "guest": str(guest),
    }  # fmt: skip


# --- the rows run.py prints -----------------------------------------------------------------------
def throughput_rows(data: dict) -> list[dict]:
    """Row 9 as keyword arguments of run.py's ``Row``."""
    st, prof, counts = data["summary"], data["profile"], data["requests_per_run"]
    mib = data["image_bytes"] // MIB
    us = lambda ns: f"{ns / 1e3:.0f} us"  # noqa: E731
    per_req = {k: us(data["request_bytes"] / MIB / st[f"pykvm {k}"]["median"] * 1e9) for k in ("read", "write")}
    pr, pw = prof["read"], prof["write"]
    note = (
        f"9: guests/asm/bench_blk.asm at CPL3, sequential 64 KiB requests on a {mib} MiB image of random bytes in "
        f"the temp dir, page cache warm: reads {counts['read'] * BIG // MIB} MiB, writes "
        f"{counts['write'] * BIG // MIB} MiB per run; one request in flight (header, one 64 KiB buffer, status; int3 "
        "-> CPL0 VSYS_SUBMIT writes 3 descriptors, the avail ring and QueueNotify (an ioeventfd); CPL3 polls the used "
        "ring). pykvm = bytes / wall time of run(), guest entry to debug exit, nothing subtracted (a count-0 run, "
        f"the guest's own setup, takes {data['setup_ns']['median'] / 1e6:.1f} ms). host = os.preadv / os.pwritev of "
        "the same file into / from one 64 KiB buffer in this process; the guest's driver does not negotiate FLUSH, "
        "so the device writes through (fdatasync after each write) and the write baseline does too (plain pwritev: "
        f"{st['host write-nosync']['median']:.0f} MiB/s). Per request: read {per_req['read']}, write "
        f"{per_req['write']}; in an instrumented extra run VirtioBlock.process on the I/O thread took "
        f"{us(pr['process_ns_per_request'])} (read: preadv {us(pr['transfer_ns_per_request'])}, Python "
        f"{us(pr['python_ns_per_request'])}) / {us(pw['process_ns_per_request'])} (write: pwritev "
        f"{us(pw['transfer_ns_per_request'])}, fdatasync {us(pw['write_through_sync_ns_per_request'])}, Python "
        f"{us(pw['python_ns_per_request'])}), and from one completion to the next request's process() "
        f"{us(pr['gap_ns_median'])} (median; guest CPL0 submit + notify + I/O-thread wake-up). Checked: the guest's "
        "checksum over every byte read = the host's; the written image is read back; device counters; median of "
        f"{data['rounds']} alternating rounds after a warm-up"
    )
    rows = []
    for kind, letter, host in (("read", "a", "host preadv"), ("write", "b", "host pwritev+fdatasync")):
        fig, base = st[f"pykvm {kind}"]["median"], st[f"host {kind}"]["median"]
        rows.append({"id": f"9{letter}", "what": f"virtio-blk {kind}, 64 KiB requests, 1 in flight",
                     "pykvm": fig, "baseline": base, "baseline_name": host, "unit": "MiB/s",
                     "ratio": fig / base, "ratio_label": "pykvm/host", "note": note if letter == "a" else ""})
    return rows


def notify_rows(data: dict) -> list[dict]:
    """Row 10 as keyword arguments of run.py's ``Row``."""
    st, prof, n = data["summary"], data["profile"], data["requests_per_run"]
    io, sync = st["ioeventfd"]["median"], st["sync"]["median"]
    pi, ps = prof["ioeventfd"], prof["sync"]
    us = lambda ns: f"{ns / 1e3:.0f} us"  # noqa: E731
    note = (
        f"10: bench_blk.bin mode 2: {n} reads of 512 bytes, each submitted (int3 -> CPL0 VSYS_SUBMIT, ending with "
        "the QueueNotify write) and polled to completion at CPL3; ioeventfd = KVM_IOEVENTFD + pykvm's I/O thread, "
        "sync = an MMIO exit per QueueNotify, handled on the vCPU thread. Per request = wall time of run() / N "
        f"(guest setup included: count-0 runs take {data['setup_ns']['ioeventfd']['median'] / 1e6:.1f} / "
        f"{data['setup_ns']['sync']['median'] / 1e6:.1f} ms). Instrumented extra runs, ioeventfd / sync: "
        f"VirtioBlock.process {us(pi['process_ns_per_request'])} / {us(ps['process_ns_per_request'])} per request "
        f"(preadv {us(pi['transfer_ns_per_request'])} / {us(ps['transfer_ns_per_request'])}); completion to the "
        f"next process() {us(pi['gap_ns_median'])} / {us(ps['gap_ns_median'])} (median), {us(pi['gap_ns_p99'])} / "
        f"{us(ps['gap_ns_p99'])} (99th percentile), gaps over 1 ms {pi['gaps_over_1ms_share_of_wall']:.0%} / "
        f"{ps['gaps_over_1ms_share_of_wall']:.0%} of the wall time; sync: in KVM_RUN "
        f"{us(ps['guest_ns_per_request'])} per request (CPL3 -> int3 -> emulated CPL0 submit -> exit), in the "
        f"Python exit handler {us(ps['python_handler_ns_per_request'])}. Checked: QueueNotify exits exactly 0 "
        f"(ioeventfd) and N (sync), checksums, device counters; median of {data['rounds']} alternating rounds"
    )
    mmio, at_notify = data["mmio_exits_per_run"], data["queue_notify_exits_per_run"]
    return [
        {"id": "10a", "what": "virtio-blk 512 B read, notify + wait, per request", "pykvm": io, "baseline": sync,
         "baseline_name": "sync MMIO exit", "unit": "ns", "ratio": io / sync, "ratio_label": "ioeventfd/sync",
         "note": note},
        {"id": "10b", "what": "the same, requests per second", "pykvm": 1e9 / io, "baseline": 1e9 / sync,
         "baseline_name": "sync MMIO exit", "unit": "req/s", "ratio": sync / io, "ratio_label": "ioeventfd/sync"},
        {"id": "10c", "what": f"MMIO exits per run ({n} requests), all", "pykvm": mmio["ioeventfd"],
         "baseline": mmio["sync"], "baseline_name": "sync", "unit": "exits"},
        {"id": "10d", "what": "MMIO exits per run at QueueNotify", "pykvm": at_notify["ioeventfd"],
         "baseline": at_notify["sync"], "baseline_name": "sync", "unit": "exits"},
    ]  # fmt: skip


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="virtio-blk throughput and notification benchmarks (bench/run.py rows 9, 10)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=["blk", "notify"])
    args = p.parse_args(argv)
    out: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="pykvm-bench-virtio-") as tmp:
            if args.only in (None, "blk"):
                out["throughput"] = measure_throughput(args.quick, tmp)
                out["throughput_rows"] = throughput_rows(out["throughput"])
            if args.only in (None, "notify"):
                out["notify"] = measure_notify(args.quick, tmp)
                out["notify_rows"] = notify_rows(out["notify"])
    except Unavailable as err:
        print(json.dumps({"ok": False, "skipped": str(err)}))
        return 0
    except WrongResult as err:
        print(json.dumps({"ok": False, "error": str(err)}))
        return 1
    out["ok"] = True
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
