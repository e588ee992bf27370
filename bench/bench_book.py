"""Whole-book execution: every book/*.ipynb under nbmake, one pytest process each, and the total."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent.parent


def execute(notebook: Path) -> tuple[float, bool]:
    """Wall seconds of ``pytest --nbmake notebook`` and whether it passed."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbmake",
               "--nbmake-timeout=600", str(notebook)]
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONHASHSEED": "0"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done.returncode == 0


def run() -> dict:
    notebooks = sorted((ROOT / "book").glob("*.ipynb"))
    rows, total = [], 0.0
    for nb in notebooks:
        elapsed, ok = execute(nb)
        total += elapsed
        rows.append([nb.name, elapsed, "passed" if ok else "FAILED"])
        print(f"  {nb.name}: {elapsed:.1f} s {'passed' if ok else 'FAILED'}", flush=True)
    failed = sum(r[2] == "FAILED" for r in rows)
    rows.append(["**total**", total, f"{len(rows) - failed}/{len(rows)} passed"])
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    text = "\n".join([
        f"`pytest --nbmake` per notebook (each includes pytest's and the kernel's start-up), "
        f"OMP_NUM_THREADS={threads}.", "", common.table(["notebook", "seconds", "result"], rows), "",
        f"Whole book: **{total:.0f} s** for {len(notebooks)} notebooks.",
    ])
    goal = common.verdict(total, 180, True, " s") + ("" if not failed else f", but {failed} notebook(s) FAILED")
    return {"title": "Whole-book execution under nbmake", "text": text, "goals": [("whole book under nbmake", goal)]}


if __name__ == "__main__":
    result = run()
    print(result["text"])
    for goal, line in result["goals"]:
        print(f"{goal}: {line}")
