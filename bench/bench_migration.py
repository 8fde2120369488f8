#!/usr/bin/env python3
"""Live migration: pykvm beside QEMU, the same guest on the same host, over loopback TCP.

    python bench/bench_migration.py                       # 256 MiB and 1 GiB; idle, 10 and 100 MiB/s
    python bench/bench_migration.py --sizes 256M --rates 0,100 --repeat 1 --json PATH --no-qemu

The guest is guests/build/dirty_rate.bin (a multiboot image both VMMs boot with ``-kernel``),
patched to write N MiB/s at CPL3 over half of its RAM and to print a line every 20 ms.  Each
run boots it on a source, lets it write for WARMUP seconds, migrates it to a destination
process on the same host over ``tcp:127.0.0.1``, then sends EOT to the guest at the
destination and takes its last line: the guest checks there that every page holds what it
wrote last, and a run whose guest reports an error (or no line) is a WRONG RESULT (exit
status 1).

pykvm: the source is this process (``Machine.migrate``, default downtime limit 300 ms,
auto-converge on, no bandwidth limit); the destination is ``bench_migration.py --receive``
(``Machine.incoming``).  Figures are the :class:`~pykvm.migration.MigrationResult`'s: total
time (from the call to the destination's acceptance), downtime (from pausing the guest to the
acceptance, which includes the destination putting the state in), rounds (pre-copy rounds and
the final one) and bytes sent.

QEMU (``qemu-system-x86_64 -enable-kvm -M microvm,pic=on,pit=on``, the same image): the
destination is started with ``-incoming tcp:127.0.0.1:PORT``; on the source's HMP monitor
``migrate_set_capability auto-converge on``, ``migrate_set_parameter max-bandwidth`` 10 GiB/s
(its default would cap the link at 128 MiB/s), downtime limit left at its 300 ms default,
``migrate -d``, then ``info migrate`` until it completes: total time, downtime, "dirty sync
count" as the rounds, "transferred ram" as the bytes.

Every figure is the median of ``--repeat`` runs; the table puts pykvm's and QEMU's side by side
with the ratio of their downtimes (the goal: pykvm's no higher than QEMU's).  The figures and
every sample go to bench/results/migration.json (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pykvm_bench as pb

ROOT = Path(__file__).resolve().parent.parent
GUEST = ROOT / "guests" / "build" / "dirty_rate.bin"
PARAMS_OFFSET = 0x20  # dirty_rate.bin: pages per second, area pages, ticks per line
PAGE = 4096
MIB = 1 << 20
LINE_TICKS = 20
WARMUP = 2.0  # seconds the guest writes before the migration starts
EOT = b"\x04"
DONE = re.compile(rb"done lines (\d+) passes (\d+) pages (\d+) input \d+ sum [0-9a-f]{16} errors (\d+)\n")
QEMU_MACHINE = ["-enable-kvm", "-M", "microvm,pic=on,pit=on,isa-serial=on,rtc=off", "-nodefaults",
                "-no-user-config", "-display", "none", "-serial", "stdio"]  # fmt: skip


class WrongResult(Exception):
    """A run whose guest did not come through intact (or did not come through at all)."""


def guest_image(directory: Path, size: int, rate_mib: int) -> Path:
    """dirty_rate.bin patched to write ``rate_mib`` MiB/s over half of ``size`` bytes of RAM."""
    area = 0 if not rate_mib else (size // 2) // PAGE
    path = directory / f"dirty_rate-{size >> 20}M-{rate_mib}.bin"
    return pb.patched_copy(GUEST, path, "<QQQ", PARAMS_OFFSET, rate_mib * MIB // PAGE, area, LINE_TICKS)


def check_done(output: bytes, vmm: str) -> dict[str, int]:
    match = DONE.search(output)
    if match is None:
        raise WrongResult(f"{vmm}: the migrated guest never reported: ...{output[-200:]!r}")
    lines, passes, pages, errors = (int(x) for x in match.groups())
    if errors:
        raise WrongResult(f"{vmm}: the migrated guest found {errors} pages that were not as it left them")
    return {"lines": lines, "passes": passes, "pages": pages}


# --- pykvm ------------------------------------------------------------------------------------------
def receive(uri: str) -> None:
    """The destination process: print where it listens, take the guest, run it, end it, report."""
    from pykvm.migration import Incoming

    with Incoming(uri) as incoming:
        print(incoming.uri, flush=True)
        machine = incoming.receive(capture_serial=True, timeout=600)
    with machine:
        result: dict[str, Any] = {}
        runner = threading.Thread(target=lambda: result.update(run=machine.run(timeout=600)))
        runner.start()
        while (machine.serial_output.captured() or b"").count(b"\n") < 3:
            time.sleep(0.005)
        machine.serial.receive(EOT)
        runner.join()
        sys.stdout.buffer.write(result["run"].serial)
        sys.stdout.flush()


def pykvm_run(image: Path, size: int) -> dict[str, Any]:
    from pykvm import Machine

    destination = subprocess.Popen([sys.executable, __file__, "--receive", "tcp:127.0.0.1:0"], stdout=subprocess.PIPE)
    try:
        assert destination.stdout is not None
        uri = destination.stdout.readline().decode().strip()
        with Machine(memory=size, capture_serial=True) as source:
            source.load(image)
            runner = threading.Thread(target=source.run, kwargs={"timeout": 600})
            runner.start()
            time.sleep(WARMUP)
            result = source.migrate(uri)
            runner.join()
        output, _ = destination.communicate(timeout=600)
    finally:
        destination.kill()
        destination.wait()
    return {
        "total_ms": result.total_ms, "downtime_ms": result.downtime_ms, "final_copy_ms": result.final_copy_ms,
        "rounds": result.rounds, "mib_sent": result.bytes_sent / MIB, "throttle": result.max_throttle,
        "guest": check_done(output, "pykvm"),
    }  # fmt: skip


# --- QEMU -------------------------------------------------------------------------------------------
class Monitor:
    """QEMU's human monitor on a UNIX socket: one command at a time, its answer (terminal codes removed)."""

    def __init__(self, path: Path) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                self._sock = socket.socket(socket.AF_UNIX)
                self._sock.connect(str(path))
                break
            except OSError:
                self._sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._read()

    def _read(self) -> str:
        data = b""
        while not data.endswith(b"(qemu) "):
            chunk = self._sock.recv(65536)
            if not chunk:
                raise WrongResult("QEMU's monitor closed")
            data += chunk
        return re.sub(rb"\x1b\[[0-9;]*[A-Za-z]", b"", data).decode(errors="replace")

    def command(self, line: str) -> str:
        self._sock.sendall(line.encode() + b"\n")
        return self._read()

    def close(self) -> None:
        self._sock.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def qemu_run(qemu: str, image: Path, size: int, directory: Path) -> dict[str, Any]:
    port = free_port()
    base = [qemu, *QEMU_MACHINE, "-m", f"{size >> 20}M", "-kernel", str(image)]
    monitors = {role: directory / f"{role}.sock" for role in ("source", "destination")}
    for path in monitors.values():
        path.unlink(missing_ok=True)
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.DEVNULL}
    destination = subprocess.Popen(
        [*base, "-monitor", f"unix:{monitors['destination']},server=on,wait=off", "-incoming", f"tcp:127.0.0.1:{port}"],
        **pipes,  # type: ignore[arg-type]
    )
    source = subprocess.Popen([*base, "-monitor", f"unix:{monitors['source']},server=on,wait=off"], **pipes)  # type: ignore[arg-type]
    try:
        monitor = Monitor(monitors["source"])
        Monitor(monitors["destination"]).close()  # listening by now
        time.sleep(WARMUP)
        monitor.command("migrate_set_capability auto-converge on")
        monitor.command(f"migrate_set_parameter max-bandwidth {10 << 30}")
        monitor.command(f"migrate -d tcp:127.0.0.1:{port}")
        while True:
            info = monitor.command("info migrate")
            status = re.search(r"Migration status: (\S+)", info)
            if status and status[1] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.05)
        monitor.close()
        if status[1] != "completed":
            raise WrongResult(f"QEMU: migration {status[1]}")
        time.sleep(3 * LINE_TICKS / 1000)
        assert destination.stdin is not None
        destination.stdin.write(EOT)
        destination.stdin.flush()
        output = read_until(destination, DONE)
    finally:
        for process in (source, destination):
            process.kill()
            process.wait()
    figure = {name: int(re.search(rf"{label}: (\d+)", info)[1])  # type: ignore[index]
              for name, label in (("total_ms", "total time"), ("downtime_ms", "downtime"),
                                  ("rounds", "dirty sync count"), ("kib", "transferred ram"))}  # fmt: skip
    return {
        "total_ms": figure["total_ms"], "downtime_ms": figure["downtime_ms"], "rounds": figure["rounds"],
        "mib_sent": figure["kib"] / 1024, "guest": check_done(output, "QEMU"),
    }  # fmt: skip


def read_until(process: subprocess.Popen, pattern: re.Pattern[bytes], timeout: float = 60) -> bytes:  # type: ignore[type-arg]
    assert process.stdout is not None
    output = b""
    deadline = time.monotonic() + timeout
    while not pattern.search(output) and time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            output += chunk
    return output


# --- the table ----------------------------------------------------------------------------------------
def median(samples: list[dict[str, Any]], key: str) -> float:
    return statistics.median(sample[key] for sample in samples)


FULL = {"sizes": ("256M", "1G"), "rates": (0, 10, 100), "repeat": 3}
QUICK = {"sizes": ("256M",), "rates": (0, 100), "repeat": 1}


def measure(plan: dict[str, Any], tmp: str, qemu: str | None, progress: Callable[[str], None]) -> dict[str, Any]:
    """Every (size, rate) of ``plan``, ``plan["repeat"]`` times, pykvm and (if ``qemu``) QEMU in
    alternation; a run whose guest did not come through is listed under ``wrong``."""
    from pykvm.config import parse_size

    rows, wrong = [], []
    for size_text in plan["sizes"]:
        size = parse_size(size_text)
        for rate in plan["rates"]:
            image = guest_image(Path(tmp), size, rate)
            row: dict[str, Any] = {"size": size_text, "rate_mib_s": rate, "pykvm": [], "qemu": []}
            for attempt in range(plan["repeat"]):
                progress(f"migration: {size_text} guest writing {rate} MiB/s, run {attempt + 1} of {plan['repeat']}")
                for vmm, run in (("pykvm", lambda: pykvm_run(image, size)),
                                 ("qemu", lambda: qemu_run(qemu, image, size, Path(tmp)) if qemu else None)):  # fmt: skip
                    try:
                        sample = run()
                    except WrongResult as err:
                        wrong.append(str(err))
                        progress(f"WRONG RESULT: {err}")
                        continue
                    if sample is not None:
                        row[vmm].append(sample)
            rows.append(row)
    return {"rows": rows, "wrong": wrong, "warmup_s": WARMUP}


def rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Row 16 as keyword arguments of run.py's ``Row``: one per guest, the pause measured as QEMU
    measures it (from pausing the guest to the last byte sent), pykvm's full downtime and the
    totals in the note."""
    out, notes = [], []
    for letter, row in zip("abcdefghijklmnop", data["rows"]):
        pykvm, qemu = row["pykvm"], row["qemu"]
        if not pykvm:
            continue
        ours, theirs = median(pykvm, "final_copy_ms"), (median(qemu, "downtime_ms") if qemu else None)
        out.append({"id": f"16{letter}", "what": f"live migration, {row['size']} guest writing {row['rate_mib_s']} MiB/s: "
                    "pause to last byte sent", "pykvm": ours, "baseline": theirs,
                    "baseline_name": "QEMU microvm downtime" if qemu else "", "unit": "ms",
                    "ratio": ours / max(theirs, 1) if theirs is not None else None, "ratio_label": "pykvm/qemu",
                    "target": "<= 300 ms", "met": ours <= 300})  # fmt: skip
        note = (f"16{letter}: pykvm total {median(pykvm, 'total_ms'):.0f} ms, downtime to the destination's acceptance "
                f"{median(pykvm, 'downtime_ms'):.1f} ms, {median(pykvm, 'rounds'):.0f} rounds, {median(pykvm, 'mib_sent'):.1f} MiB")
        if qemu:
            note += (f"; QEMU total {median(qemu, 'total_ms'):.0f} ms, {median(qemu, 'rounds'):.0f} rounds, "
                     f"{median(qemu, 'mib_sent'):.1f} MiB")
        notes.append(note)
    if out:
        out[0]["note"] = ("; ".join(notes) + f". Medians of {len(data['rows'][0]['pykvm'])} runs, loopback TCP, "
                          f"guests/build/dirty_rate.bin writing at CPL3 for {data['warmup_s']:g} s first; every guest "
                          "checked its pages at the destination")  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256M,1G", help="guest RAM sizes (default 256M,1G)")
    parser.add_argument("--rates", default="0,10,100", help="MiB/s the guest writes (default 0,10,100)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "migration.json")
    parser.add_argument("--no-qemu", action="store_true", help="pykvm only")
    parser.add_argument("--receive", metavar="URI", help=argparse.SUPPRESS)  # the destination process
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # pykvm from this tree (built in place by `make install`)
    if args.receive:
        receive(args.receive)
        return 0
    if not GUEST.exists():
        print(f"{GUEST} is missing: build the guests first with 'make guests'", file=sys.stderr)
        return 2
    qemu = None if args.no_qemu else shutil.which("qemu-system-x86_64")
    if not args.no_qemu and qemu is None:
        print("qemu-system-x86_64 is missing (apt-get install qemu-system-x86), or pass --no-qemu", file=sys.stderr)
        return 2
    plan = {"sizes": args.sizes.split(","), "rates": [int(r) for r in args.rates.split(",")], "repeat": args.repeat}
    with tempfile.TemporaryDirectory(prefix="pykvm-bench-migration-") as tmp:
        data = measure(plan, tmp, qemu, lambda message: print(message, file=sys.stderr))
    print_table(data["rows"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=1) + "\n")
    print(f"\nfigures and samples: {args.json}")
    for message in data["wrong"]:
        print(f"WRONG RESULT: {message}")
    return 1 if data["wrong"] else 0


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'guest':>5} {'writes':>9} | {'pykvm total':>11} {'downtime':>8} {'to sent':>8} {'rounds':>6} {'MiB':>6} | "
            f"{'QEMU total':>10} {'downtime':>8} {'rounds':>6} {'MiB':>6} | {'ratio':>6}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for row in rows:
        cells = [f"{row['size']:>5} {str(row['rate_mib_s']) + ' MiB/s':>9}"]
        pykvm, qemu = row["pykvm"], row["qemu"]
        cells.append(
            f"{median(pykvm, 'total_ms'):>8.0f} ms {median(pykvm, 'downtime_ms'):>5.1f} ms {median(pykvm, 'final_copy_ms'):>5.1f} ms "
            f"{median(pykvm, 'rounds'):>6.0f} {median(pykvm, 'mib_sent'):>6.1f}" if pykvm else f"{'-':>47}"
        )  # fmt: skip
        cells.append(
            f"{median(qemu, 'total_ms'):>7.0f} ms {median(qemu, 'downtime_ms'):>5.0f} ms {median(qemu, 'rounds'):>6.0f} "
            f"{median(qemu, 'mib_sent'):>6.1f}" if qemu else f"{'-':>35}"
        )  # fmt: skip
        if pykvm and qemu:  # QEMU's downtime ends at the last byte sent, in whole ms
            cells.append(f"{median(pykvm, 'final_copy_ms') / max(median(qemu, 'downtime_ms'), 1):>5.2f}x")
        print(" | ".join(cells))
    print("pykvm downtime: pausing the guest to the destination's acceptance; to sent: to the last byte sent, "
          "where QEMU's downtime ends (whole ms).  ratio: pykvm's to-sent / QEMU's downtime")


if __name__ == "__main__":
    sys.exit(main())
