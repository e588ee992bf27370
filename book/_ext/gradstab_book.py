"""Sphinx extension for the book itself (not part of the gradstab package).

* Bibliography labels read "Glorot & Bengio 2010" or "He et al. 2016": names and years only (pybtex's
  default "alpha" labels give junk like "GDollarG+17"); DOIs and URLs become links (pybtex's unsrt style).
* Every notebook's download link serves the *executed* notebook, outputs included, instead of the stored
  source without outputs.
* The gradstab wheel is built with the book and served from ``dist/``; the ``gradstab-wheel`` directive
  prints the link and the ``pip install`` line for it.

Registered in ``_config.yml`` (``sphinx.local_extensions`` and the extension list).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import tomllib
from docutils import nodes
from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle
from sphinx.util.docutils import SphinxDirective

REPO = Path(__file__).resolve().parents[2]
WHEEL_DIR = "dist"


# --- bibliography: author-year labels ------------------------------------------------------------

def _plain(text: str) -> str:
    """A BibTeX name without braces, accents' commands or other LaTeX markup."""
    text = re.sub(r"\\[a-zA-Z]+\s*|\\.", "", text)
    return re.sub(r"[{}]", "", text).strip()


def _surname(person) -> str:
    return _plain(" ".join(person.prelast_names + person.last_names))


class AuthorYearLabels(BaseLabelStyle):
    """"Surname 2010", "A & B 2010" or "A et al. 2010"; a letter tells apart labels that would repeat."""

    def format_labels(self, sorted_entries):
        labels = [self._label(entry) for entry in sorted_entries]
        counts, seen = Counter(labels), Counter()
        for label in labels:
            if counts[label] > 1:
                seen[label] += 1
                yield f"{label}{'abcdefghij'[seen[label] - 1]}"
            else:
                yield label

    @staticmethod
    def _label(entry) -> str:
        people = entry.persons.get("author") or entry.persons.get("editor") or []
        names = [_surname(p) for p in people]
        if not names:
            who = _plain(entry.fields.get("key", "Anonymous"))
        elif len(names) == 1:
            who = names[0]
        elif len(names) == 2:
            who = f"{names[0]} & {names[1]}"
        else:
            who = f"{names[0]} et al."
        year = _plain(entry.fields.get("year", ""))
        return f"{who} {year}".strip()


class BookStyle(UnsrtStyle):
    """pybtex's unsrt entries (DOI, URL and eprint as links), author-year labels, sorted by author and year."""

    default_label_style = "gradstab-authoryear"
    default_sorting_style = "author_year_title"


# --- executed notebooks for download, and the wheel ------------------------------------------------

def _serve_executed_notebooks(app, exception) -> None:
    """Replace each ``_sources/**/*.ipynb`` (stored without outputs) with myst-nb's executed copy."""
    if exception is not None or app.builder.format != "html":
        return
    executed = Path(app.outdir).parent / "jupyter_execute"
    for source in Path(app.outdir, "_sources").rglob("*.ipynb"):
        run = executed / source.relative_to(Path(app.outdir, "_sources"))
        if run.is_file():
            shutil.copyfile(run, source)


def wheel_name() -> str:
    """The file name of the gradstab wheel built from this repository's pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return f"{project['name']}-{project['version']}-py3-none-any.whl"


def _build_wheel(app, exception) -> None:
    """Build the gradstab wheel into ``<html>/dist`` (skipped when it is newer than every source file)."""
    if exception is not None or app.builder.format != "html":
        return
    target = Path(app.outdir, WHEEL_DIR)
    wheel = target / wheel_name()
    sources = [REPO / "pyproject.toml", *(REPO / "src").rglob("*.py")]
    if wheel.is_file() and wheel.stat().st_mtime > max(p.stat().st_mtime for p in sources):
        return
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(target), str(REPO)], check=True)


class WheelDirective(SphinxDirective):
    """``{gradstab-wheel}``: a link to the wheel served with the book and the command that installs it."""

    has_content = False

    def run(self):
        name = wheel_name()
        uri = "../" * self.env.docname.count("/") + f"{WHEEL_DIR}/{name}"
        link = nodes.paragraph("", "Download: ", nodes.reference(name, name, refuri=uri, classes=["gradstab-wheel"]))
        command = f'# in the folder you downloaded it to:\npip install "./{name}[book]"'
        return [link, nodes.literal_block(command, command, language="bash")]


def setup(app):
    register_plugin("pybtex.style.labels", "gradstab-authoryear", AuthorYearLabels)
    register_plugin("pybtex.style.formatting", "gradstab", BookStyle)
    app.add_directive("gradstab-wheel", WheelDirective)
    app.connect("build-finished", _serve_executed_notebooks)
    app.connect("build-finished", _build_wheel)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
