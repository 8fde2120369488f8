#!/usr/bin/env python3
"""What each layer of pykvm's Python exit path costs (a microbenchmark beside rows 1c and 2c).

    python bench/exit_path.py [--exits N] [--rounds R]      # one JSON object, a summary on stderr

Rows 1c and 2c time whole runs against a raw-C VMM in another process.  This takes the same
guest (``bench_pio.bin``: N ``out dx, al`` at CPL0) in one process and runs it three ways, in
alternating rounds, measuring each run's thread CPU time (the bootstrap vCPU runs on the calling
thread; CPU time is less disturbed by a loaded host than wall time) and wall time per exit:

- ``c``: to port 0x80, which pykvm's C fast path answers: one Python call per run, the floor;
- ``records``: to port 0x3e0 with no device there, one :meth:`Vcpu.run` per exit: the C loop's
  return to Python and the exit decoded into an :class:`~pykvm.kvm.exits.IoExit`;
- ``device``: to port 0x3e0 with a device there, :meth:`Machine.run`: the whole path, the
  dispatcher, the bus and the device's ``write``.

Each figure is a median over the rounds; ``records`` and ``device`` are also given less ``c``,
what Python adds to each exit.  Uses only the public API, so it measures any version of pykvm
(``PYTHONPATH=other/tree python bench/exit_path.py`` gives another tree's figures).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import pykvm_bench as pb  # noqa: E402

MODES = ("c", "records", "device")


def run_c(machine, image: Path, exits: int) -> None:  # type: ignore[no-untyped-def]
    machine.load(image, format="flat", mode="long")
    pb.check_debug_exit(machine.run(timeout=pb.RUN_TIMEOUT), 0, "exit_path c")


def run_records(machine, image: Path, exits: int) -> None:  # type: ignore[no-untyped-def]
    from pykvm.kvm.exits import IoExit

    machine.load(image, format="flat", mode="long")
    vcpu = machine.vcpus[0]
    vcpu.clear_stop()
    for _ in range(exits):
        exit = vcpu.run()
        if not (isinstance(exit, IoExit) and exit.port == pb.PYTHON_PORT and exit.is_write):
            raise pb.WrongResult(f"exit_path records: expected a write to port {pb.PYTHON_PORT:#x}, got {exit}")


def run_device(machine, image: Path, exits: int) -> None:  # type: ignore[no-untyped-def]
    machine.load(image, format="flat", mode="long")
    pb.check_debug_exit(machine.run(timeout=pb.RUN_TIMEOUT), 0, "exit_path device")


def measure(exits: int, rounds: int) -> dict:
    from pykvm.machine import Machine

    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    wall: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="pykvm-exit-path-") as tmp:
        images = {"c": pb.patched_guest("bench_pio.bin", exits, pb.POST_PORT, tmp),
                  "records": pb.patched_guest("bench_pio.bin", exits, pb.PYTHON_PORT, tmp)}  # fmt: skip
        images["device"] = images["records"]
        quiet, with_device = Machine(memory=pb.GUEST_MEMORY), Machine(memory=pb.GUEST_MEMORY)
        device = pb.CountingDevice()
        with_device.pio.register(pb.PYTHON_PORT, 1, device)
        runs = {"c": (run_c, quiet), "records": (run_records, quiet), "device": (run_device, with_device)}
        try:
            for mode in MODES:  # warm-up
                fn, machine = runs[mode]
                fn(machine, images[mode], exits)
            for k in range(rounds):
                for mode in MODES[k % 3 :] + MODES[: k % 3]:
                    fn, machine = runs[mode]
                    writes = device.writes
                    c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
                    fn(machine, images[mode], exits)
                    c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
                    seen = device.writes - writes
                    if mode == "device" and seen != exits:
                        raise pb.WrongResult(f"exit_path device: the device saw {seen} writes, not {exits}")
                    cpu[mode].append((c1 - c0) / exits)
                    wall[mode].append((w1 - w0) / exits)
        finally:
            quiet.close()
            with_device.close()
    median = {kind: {mode: statistics.median(v[mode]) for mode in MODES} for kind, v in (("cpu", cpu), ("wall", wall))}
    return {
        "exits": exits, "rounds": rounds, "ns_per_exit": median,
        "python_ns_per_exit": {kind: {mode: median[kind][mode] - median[kind]["c"] for mode in ("records", "device")}
                               for kind in median},
        "samples_ns_per_exit": {"cpu": cpu, "wall": wall},
    }  # fmt: skip


def summary(data: dict) -> str:
    med, extra = data["ns_per_exit"], data["python_ns_per_exit"]
    parts = [f"{mode} {med['cpu'][mode] / 1e3:.2f}" for mode in MODES]
    added = ", ".join(f"{mode} +{extra['cpu'][mode] / 1e3:.2f}" for mode in ("records", "device"))
    return f"CPU us per exit: {', '.join(parts)} (Python adds: {added})"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="What each layer of pykvm's Python exit path costs, per exit.")
    p.add_argument("--exits", type=int, default=10000, help="exits per run (default 10000)")
    p.add_argument("--rounds", type=int, default=15, help="alternating rounds (default 15)")
    args = p.parse_args(argv)
    try:
        data = measure(args.exits, args.rounds)
    except pb.WrongResult as err:
        print(json.dumps({"ok": False, "error": str(err)}))
        return 1
    print(summary(data), file=sys.stderr)
    print(json.dumps({"ok": True, **data}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
