"""The pictures of a benchmark run: a markdown table and a chart of every row against its target.

``bench/run.py`` calls :func:`write` after a run; by hand, from a saved run:

    python bench/report.py [bench/results/latest.json]

writes ``bench/results/table.md`` (every row: figure, baseline, ratio, target, met, and the notes)
and ``bench/results/targets.svg``: one bar per row that has a target, its **distance to the
target** on a log scale, so that every row reads the same way whatever its unit and direction:
1 is the target, more is better (a "<= 2x" row at 1.6x scores 2 / 1.6 = 1.25, a ">= 0.5x" row at
0.05x scores 0.1).  The chart needs matplotlib (``make bench`` installs bench/requirements.txt into
the project's virtual environment); without it only the table is written.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
MIB = 1 << 20
_TARGET = re.compile(r"^(<=|>=|<|>)\s*([\d.]+)\s*(k?)\s*(x|MiB|KiB|req/s|ms)$")
_UNIT_SCALE = {"MiB": MIB, "KiB": 1024, "x": 1, "req/s": 1, "ms": 1}


def score(row: dict[str, Any]) -> float | None:
    """How far ``row`` is from its target: bound / figure for an upper bound, figure / bound for a lower
    one (>= 1: met); None for a row without a target or a figure."""
    m = _TARGET.match(str(row.get("target") or "").strip())
    if m is None or row.get("status") != "ok":
        return None
    op, number, kilo, unit = m.groups()
    bound = float(number) * (1000 if kilo else 1) * _UNIT_SCALE[unit]
    actual = row.get("ratio") if unit == "x" else row.get("pykvm")
    if not actual or actual <= 0 or bound <= 0:
        return None
    return bound / actual if op.startswith("<") else actual / bound


def markdown(report: dict[str, Any], fmt_value: Any) -> str:
    """The run's table in markdown (``fmt_value(value, unit)`` formats a figure as run.py prints it)."""
    host = report["host"]
    lines = [
        f"# pykvm benchmarks ({report['mode']} run, {report['generated']})",
        "",
        f"Host: {host['cpu_model']} ({host['host_cpus']} CPUs), KVM {host['kvm_backend']} ({host['kvm_backend_kind']}), "
        f"Linux {host['kernel']}, {host['python']}; load at start {', '.join(f'{x:.2f}' for x in host['load_average_at_start'])}. "
        f"Written by `make bench` (bench/run.py); the chart: [targets.svg](targets.svg).",
        "",
        "| # | what | pykvm | baseline | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        base = fmt_value(r["baseline"], r["unit"])
        if r["baseline_name"]:
            base = f"{base} ({r['baseline_name']})"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        if r["status"] != "ok":
            met = {"skipped": "skipped", "wrong": "**WRONG RESULT**", "error": "**ERROR**"}[r["status"]]
        else:
            met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        cells = (r["id"], r["what"], fmt_value(r["pykvm"], r["unit"]), base, ratio, r["target"], met)
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    notes = [r["note"] for r in report["rows"] if r["note"]]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> bool:
    """The rows with a target as horizontal bars of :func:`score` (log scale); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [(r, s) for r in report["rows"] if (s := score(r)) is not None]
    fig, ax = plt.subplots(figsize=(11, 0.36 * len(rows) + 1.4))
    labels = [f"{r['id']}  {_short(r['what'])}  ({r['target']})" for r, _ in rows]
    values = [s for _, s in rows]
    colors = ["#2e7d32" if s >= 1 else "#c62828" for s in values]
    ax.barh(range(len(rows)), values, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1, color="black", linewidth=1)
    ax.set_xlabel("distance to the target (1 = target, right is better; log scale)")
    ax.set_title(f"pykvm against its targets ({report['mode']} run, {report['generated'][:10]})", fontsize=10)
    for y, s in enumerate(values):
        ax.text(s, y, f" {s:.2f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="svg", metadata={"Date": None})
    plt.close(fig)
    return True


def _short(text: str, width: int = 44) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def write(report: dict[str, Any], fmt_value: Any, directory: Path = RESULTS) -> list[Path]:
    """table.md and (with matplotlib) targets.svg in ``directory``; the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    table = directory / "table.md"
    table.write_text(markdown(report, fmt_value))
    svg = directory / "targets.svg"
    return [table, svg] if chart(report, svg) else [table]


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(BENCH))
    from run import fmt_value

    source = Path(argv[0]) if argv else RESULTS / "latest.json"
    for path in write(json.loads(source.read_text()), fmt_value, source.parent):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
