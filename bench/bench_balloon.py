#!/usr/bin/env python3
"""The balloon benchmark: how much host memory a guest's balloon really returns, and how fast.

    python bench/bench_balloon.py [--mib N] [--rounds R] [--memory M]

One fresh process (this one) runs guests/build/balloon.bin on pykvm with a virtio-balloon.
The guest touches all of its memory first (so every page it will give back is resident on the
host) and keeps a 16 MiB working set.  Each round:

1. RSS before (psutil, this process), then ``vm.balloon.target = N MiB`` at t0;
2. the time until the RSS has fallen by 90 % of N MiB (sampled every ~0.2 ms), and until the
   driver's ``actual`` reaches the target (its last inflate batch is done);
3. RSS after, once ``actual`` is reached: returned = before - after, fraction = returned / N;
4. deflate (target 0): the time until ``actual`` is 0; then the guest touches all of its
   memory again (serial command ``w<MiB>``, back to ``w16``) so the next round starts resident.

The last stdout line is JSON: every sample, medians, and the THP (AnonHugePages) share of the
guest's resident memory before and after inflating.  ``bench/run.py`` (row 8) runs this and
puts the medians in its table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
GUEST = ROOT / "guests" / "build" / "balloon.bin"
MIB = 1 << 20
POLL = 0.0002


def wait(condition, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    """Poll ``condition`` until true; the seconds it took.  Raises RuntimeError on timeout."""
    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(POLL)
    return time.perf_counter() - start


def measure(mib: int, rounds: int, memory_mib: int) -> dict:
    from pykvm.machine import Machine

    if not GUEST.exists():
        raise RuntimeError(f"{GUEST} is missing: run make guests first")
    size = mib * MIB
    process = psutil.Process()
    rss = lambda: process.memory_info().rss  # noqa: E731
    samples: dict[str, list[float]] = {"returned_bytes": [], "fraction": [], "ms_to_rss_90": [], "ms_to_actual": [],
                                       "ms_to_deflated": []}  # fmt: skip
    thp: list[dict] = []
    with Machine(memory=memory_mib * MIB, balloon=True, capture_serial=True) as vm:
        vm.load(GUEST, mode="long", cmdline="ws=16")
        outcome: list = []
        runner = threading.Thread(target=lambda: outcome.append(vm.run(timeout=600)), name="balloon-bench")
        runner.start()
        try:
            wait(lambda: "memtot" in vm.balloon.guest_stats(), 60, "the guest's statistics")
            pool = vm.balloon.guest_stats()["avail"] + 16 * MIB
            if size > pool:
                raise RuntimeError(f"{mib} MiB does not fit the guest's {pool // MIB} MiB pool: use more --memory")
            for _ in range(rounds + 1):  # the first round warms up and is not kept
                time.sleep(0.1)
                before, guest_before = rss(), vm.memory.resident()
                t0 = time.perf_counter()
                vm.balloon.target = size
                wait(lambda: before - rss() >= 0.9 * size, 60, "the RSS to fall")
                rss_90 = time.perf_counter() - t0
                wait(lambda: vm.balloon.actual == size, 60, "actual to reach the target")
                actual = time.perf_counter() - t0
                after, guest_after = rss(), vm.memory.resident()
                vm.balloon.target = 0
                deflated = wait(lambda: vm.balloon.actual == 0, 60, "the deflate")
                samples["returned_bytes"].append(before - after)
                samples["fraction"].append((before - after) / size)
                samples["ms_to_rss_90"].append(rss_90 * 1e3)
                samples["ms_to_actual"].append(actual * 1e3)
                samples["ms_to_deflated"].append(deflated * 1e3)
                thp.append({"guest_rss_before": guest_before["rss"], "guest_thp_before": guest_before["anon_huge"],
                            "guest_rss_after": guest_after["rss"], "guest_thp_after": guest_after["anon_huge"]})  # fmt: skip
                low = rss()
                vm.serial.receive(f"w{memory_mib}\n".encode())  # touch everything again for the next round
                wait(lambda: rss() - low >= 0.9 * size, 60, "the guest to touch its memory again")
                vm.serial.receive(b"w16\n")
        finally:
            vm.serial.receive(b"q\n")
            runner.join(60)
    for series in samples.values():
        del series[0]
    del thp[0]
    result = outcome[0] if outcome else None
    if result is None or result.status != 1:
        raise RuntimeError(f"the balloon guest did not end cleanly: {result and result.diagnosis}")
    return {
        "mib": mib,
        "memory_mib": memory_mib,
        "rounds": rounds,
        "samples": samples,
        "median": {key: statistics.median(values) for key, values in samples.items()},
        "thp": thp,
        "guest_output_lines": result.serial.decode().count("\n"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB to inflate each round (default 64)")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5, after one warm-up)")
    parser.add_argument("--memory", type=int, default=256, help="guest RAM in MiB (default 256)")
    args = parser.parse_args(argv)
    try:
        out = measure(args.mib, args.rounds, args.memory)
    except RuntimeError as err:
        print(json.dumps({"ok": False, "error": str(err)}))
        return 1
    print(json.dumps({"ok": True, **out}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
