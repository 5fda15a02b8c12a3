# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""Summarizes the `ncu --csv --metrics ...` logs of scripts/gpu_check.sh: one line per
profiled kernel launch with its time, DRAM and SM throughput, issue-slot use, achieved
occupancy, instructions and registers. Prints nothing when no log holds counter values.

  python3 scripts/ncu_table.py build-gpu/logs/ncu_*.log
"""
import csv
import os
import sys

COLUMNS = [  # (metric, header, scale, format; scale None: a duration, shown in ms)
    ("gpu__time_duration.sum", "ms", None, ".3f"),
    ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "DRAM%", 1.0, ".1f"),
    ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "SM%", 1.0, ".1f"),
    ("sm__inst_issued.avg.pct_of_peak_sustained_active", "issue%", 1.0, ".1f"),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "occup%", 1.0, ".1f"),
    ("smsp__inst_executed.sum", "Minstr", 1e-6, ".0f"),
    ("launch__registers_per_thread", "regs", 1.0, ".0f"),
]


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def read(path):
    """{launch id: (kernel, {metric: (unit, value)})} from one log's CSV lines."""
    lines = [l for l in open(path, errors="replace") if l.startswith('"')]
    launches = {}
    for row in csv.DictReader(lines):
        if "Metric Name" not in row or "ID" not in row:
            continue
        kernel, metrics = launches.setdefault(row["ID"], (row.get("Kernel Name", "?"), {}))
        metrics[row["Metric Name"]] = (row.get("Metric Unit", ""), number(row.get("Metric Value", "")))
    return launches


def main(paths):
    out = []
    for path in paths:
        what = os.path.basename(path)[len("ncu_"):].rsplit(".", 1)[0]
        try:
            launches = read(path)
        except (OSError, csv.Error):
            continue
        for _, (kernel, metrics) in sorted(launches.items(), key=lambda kv: int(kv[0])):
            cells = []
            for name, _, scale, fmt in COLUMNS:
                unit, value = metrics.get(name, ("", None))
                if value is None:
                    cells.append("")
                elif scale is None:  # a duration: to ms from its unit
                    factor = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}.get(unit, None)
                    cells.append(format(value * factor, fmt) if factor else f"{value:g}{unit}")
                else:
                    cells.append(format(value * scale, fmt))
            out.append((f"{what}:{kernel}"[:40], cells))
    if not out:
        return
    print("ncu (large shape, one launch per line, --clock-control none):")
    print(f"{'call:kernel':<40} " + " ".join(f"{h:>7}" for _, h, _, _ in COLUMNS))
    for label, cells in out:
        print(f"{label:<40} " + " ".join(f"{c:>7}" for c in cells))


if __name__ == "__main__":
    main(sys.argv[1:])
