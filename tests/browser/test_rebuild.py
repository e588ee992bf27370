"""Fast rebuilds for authors: after a build, a second `jupyter-book build` with nothing changed executes no
notebook and still serves every notebook with its outputs, the Chinese edition is built from the same cache,
and editing the code of one notebook invalidates only that notebook's cached execution (jupyter-cache).
Runs on this repository's own `_build` (after `make book` or `make strict-book`). How long the second build
takes is measured by `make bench` (bench/bench_rebuild.py), not asserted here."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from test_reading import served_without_outputs

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "_build" / ".jupyter_cache"


@pytest.fixture(scope="module")
def cache():
    html = Path(os.environ.get("GRADSTAB_BOOK_HTML", REPO / "_build" / "html"))
    if not CACHE.is_dir() or html.resolve() != (REPO / "_build" / "html").resolve():
        pytest.skip(f"no jupyter-cache at {CACHE}: build the book here first (make book)")
    from jupyter_cache import get_cache

    return get_cache(CACHE)


def test_second_build_executes_nothing_and_serves_outputs(cache):
    command = [str(Path(sys.executable).parent / "jupyter-book"), "build", ".", "--warningiserror", "--nitpick",
               "--keep-going"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Executed notebook" not in done.stdout + done.stderr, "an unchanged notebook was executed again"
    empty = served_without_outputs(REPO / "_build" / "html")
    assert not empty, f"after a rebuild from the cache these downloads have no outputs: {empty}"


def test_chinese_edition_reuses_the_executed_notebooks(cache):
    """The Chinese build (book/_ext/build_zh.py) takes every notebook's outputs from the English build's cache."""
    command = [sys.executable, str(REPO / "book" / "_ext" / "build_zh.py")]
    done = subprocess.run(command, cwd=REPO / "book", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Executed notebook" not in done.stdout + done.stderr, "the Chinese build executed a notebook again"
    assert (REPO / "_build" / "html" / "zh" / "index.html").is_file()
    assert not (REPO / "_build" / "html" / "jupyter_execute").exists(), "myst-nb's folder inside the English site"


def test_editing_one_notebook_invalidates_only_its_cache(cache):
    notebooks = sorted((REPO / "book").glob("*.ipynb"))
    stored = {path: nbformat.read(path, as_version=4) for path in notebooks}
    unmatched = [path.name for path, nb in stored.items() if not _cached(cache, nb)]
    assert not unmatched, f"notebooks without a cached execution after the build: {unmatched}"
    edited = copy.deepcopy(stored[notebooks[0]])
    code = next(cell for cell in edited.cells if cell.cell_type == "code")
    code.source += "\n# an author's edit"
    assert not _cached(cache, edited), "an edited notebook still matches its old cached execution"
    assert all(_cached(cache, nb) for nb in list(stored.values())[1:])
    prose = copy.deepcopy(stored[notebooks[0]])
    next(cell for cell in prose.cells if cell.cell_type == "markdown").source += "\n\nAn edit of the prose."
    assert _cached(cache, prose), "an edit of the prose alone should not execute the notebook again"


def _cached(cache, nb) -> bool:
    try:
        cache.match_cache_notebook(nb)
    except KeyError:  # jupyter-cache: no cached execution with this notebook's code
        return False
    return True
