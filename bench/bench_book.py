"""Whole-book execution: every book/*.ipynb under nbmake, as `make test` runs it (two at a time).

One `pytest -n 2 --nbmake --durations=0` run gives the wall time of the whole book and, from
pytest's duration report, the time of each notebook (which runs on one CPU thread, see
gradstab.use_threads, beside one other notebook on the second core).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
DURATION = re.compile(r"^\s*([\d.]+)s call\s+(book/\S+?\.ipynb)", re.MULTILINE)


def execute() -> tuple[float, str, int]:
    """Wall seconds, pytest's output and its exit code for the whole book under nbmake."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(WORKERS), "--nbmake",
               "--nbmake-timeout=600", "--durations=0", "book"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "0"},
                          capture_output=True, text=True)
    return time.perf_counter() - start, done.stdout, done.returncode


def run() -> dict:
    wall, output, code = execute()
    times = sorted(((float(s), Path(p).name) for s, p in DURATION.findall(output)), reverse=True)
    notebooks = sorted((ROOT / "book").glob("*.ipynb"))
    rows = [[name, seconds] for seconds, name in times]
    rows.append(["**sum of notebooks**", sum(s for s, _ in times)])
    rows.append([f"**whole book, {WORKERS} at a time (wall)**", wall])
    status = "all passed" if code == 0 else f"pytest exit code {code}: some notebook FAILED"
    text = "\n".join([
        f"`pytest -n {WORKERS} --nbmake book` ({len(notebooks)} notebooks, {status}); per-notebook times "
        "from pytest's `--durations`, slowest first.", "", common.table(["notebook", "seconds"], rows), "",
        f"Whole book: **{wall:.0f} s** wall.",
    ])
    goal = common.verdict(wall, 180, True, " s") + ("" if code == 0 else ", but a notebook FAILED")
    slowest = f"{times[0][1]}: {times[0][0]:.0f} s" if times else "none measured"
    return {"title": "Whole-book execution under nbmake", "text": text,
            "goals": [("whole book under nbmake (wall)", goal), ("slowest notebook", slowest)]}


if __name__ == "__main__":
    result = run()
    print(result["text"])
    for goal, line in result["goals"]:
        print(f"{goal}: {line}")
