"""Whole-book execution under nbmake: as `make test` runs it (two at a time), then each notebook alone.

The first `pytest -n 2 --nbmake --durations=0` run gives the wall time of the whole book (each notebook on one
CPU thread, see gradstab.configure_cpu, beside one other notebook on the second core). The second run executes the
notebooks one after another, so each notebook's duration is its time alone on the machine.
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
BOOK_GOAL, NOTEBOOK_GOAL = 240, 60  # seconds: issue 16's performance goals
DURATION = re.compile(r"^\s*([\d.]+)s call\s+(book/\S+?\.ipynb)", re.MULTILINE)


def execute(workers: int) -> tuple[float, dict[str, float], int]:
    """Wall seconds, {notebook: seconds} and pytest's exit code for the whole book under nbmake."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbmake", "--nbmake-timeout=600",
               "--durations=0", "book"] + (["-n", str(workers)] if workers > 1 else [])
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "0"},
                          capture_output=True, text=True)
    times = {Path(p).name: float(s) for s, p in DURATION.findall(done.stdout)}
    return time.perf_counter() - start, times, done.returncode


def run() -> dict:
    wall, shared, code = execute(WORKERS)
    _, alone, code_alone = execute(1)
    names = sorted(alone or shared, key=lambda n: -alone.get(n, shared.get(n, 0.0)))
    rows = [[name, alone.get(name, float("nan")), shared.get(name, float("nan"))] for name in names]
    rows.append(["**sum of notebooks**", sum(alone.values()), sum(shared.values())])
    failed = [label for label, c in (("two at a time", code), ("alone", code_alone)) if c != 0]
    status = "all passed" if not failed else f"some notebook FAILED ({', '.join(failed)})"
    text = "\n".join([
        f"`pytest --nbmake book`, {len(names)} notebooks, {status}. Per-notebook times from pytest's `--durations`, "
        f"slowest first: alone (one notebook at a time) and as `make test` runs them ({WORKERS} at a time).", "",
        common.table(["notebook", "seconds alone", f"seconds, {WORKERS} at a time"], rows), "",
        f"Whole book, {WORKERS} at a time: **{wall:.0f} s** wall.",
    ])
    slowest = max(alone.values(), default=float("nan"))
    goals = [("whole book under nbmake, 2 at a time (wall)", common.verdict(wall, BOOK_GOAL, True, " s")),
             ("slowest notebook alone", common.verdict(slowest, NOTEBOOK_GOAL, True, " s")
              + (f" ({max(alone, key=alone.get)})" if alone else ""))]
    if failed:
        goals = [(goal, line + ", but a notebook FAILED") for goal, line in goals]
    return {"title": "Whole-book execution under nbmake", "text": text, "goals": goals}


if __name__ == "__main__":
    common.report(run())
