"""Fast rebuilds for authors: `jupyter-book build .` again on an up-to-date `_build` (jupyter-cache keeps every
notebook's execution, Sphinx rereads nothing), against a goal of 30 s (issue 15).

Needs a built book here (`make book`); without its jupyter-cache it reports that nothing was measured, rather
than spending minutes on a cold build.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent.parent
GOAL = 30.0  # seconds
REPEATS = 3


def build() -> tuple[float, bool]:
    """Wall seconds of one `jupyter-book build .`, and whether it executed any notebook."""
    command = [str(Path(sys.executable).parent / "jupyter-book"), "build", ".", "--warningiserror", "--nitpick",
               "--keep-going"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, "Executed notebook" in done.stdout + done.stderr


def run() -> dict:
    if not (ROOT / "_build" / ".jupyter_cache").is_dir():
        text = "Not measured: no `_build/.jupyter_cache` here. Run `make book` first, then `make bench`."
        return {"title": "Rebuild of an up-to-date book", "text": text,
                "goals": [("second `make book` with nothing changed", "not measured (no built book)")]}
    build()  # bring _build up to date with the sources as they are now
    runs = [build() for _ in range(REPEATS)]
    times = sorted(seconds for seconds, _ in runs)
    executed = any(ran for _, ran in runs)
    text = (f"`jupyter-book build .` on an up-to-date `_build`, {REPEATS} times after one build that brought it up "
            f"to date: {', '.join(f'{t:.1f}' for t in times)} s; notebooks executed: "
            f"{'some (the cache missed)' if executed else 'none'}.")
    return {"title": "Rebuild of an up-to-date book", "text": text,
            "goals": [("second `make book` with nothing changed (median)",
                       common.verdict(times[len(times) // 2], GOAL, True, " s"))]}


if __name__ == "__main__":
    common.report(run())
