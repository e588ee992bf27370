"""Run every benchmark and write bench/RESULTS.md (``make bench``).

Usage: ``python bench/run_all.py [--only sweep,monitor,explorer,book,clip,rebuild] [--out PATH]``.
Run it on a quiet machine: other processes on the same cores inflate every number.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
BENCHES = {"sweep": "bench_sweep", "monitor": "bench_monitor", "explorer": "bench_explorer", "book": "bench_book",
           "clip": "bench_clip", "rebuild": "bench_rebuild"}


def report(machine: dict, results: list[dict], load_after: str) -> str:
    lines = ["# Benchmark results", "",
             f"Written by `make bench` (bench/run_all.py) on {datetime.date.today()}.", "",
             "## Machine", "", common.table(["", ""], [[k, v] for k, v in machine.items()]),
             f"\nLoad average at the end (1 min): {load_after}; well above the thread count, it means other work "
             "shared the cores.",
             "", "## Goals", "",
             common.table(["benchmark", "result"], [list(g) for r in results for g in r["goals"]])]
    for r in results:
        lines += ["", f"## {r['title']}", "", r["text"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ", ".join(BENCHES))
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(BENCHES)
    if unknown:
        parser.error(f"--only takes {', '.join(BENCHES)}; got {', '.join(sorted(unknown))}")
    machine, results = common.machine(), []
    for name in names:
        print(f"== {name}", flush=True)
        result = importlib.import_module(BENCHES[name]).run()
        print(result["text"], flush=True)
        results.append(result)
    load = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "unknown"
    Path(args.out).write_text(report(machine, results, load))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
