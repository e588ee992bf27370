"""Sphinx extension for the book itself (not part of the gradstab package).

* Bibliography labels read "Glorot & Bengio 2010" or "He et al. 2016": names and years only (pybtex's
  default "alpha" labels give junk like "GDollarG+17"); DOIs and URLs become links (pybtex's unsrt style).
* Every notebook's download link serves the *executed* notebook, outputs included, instead of the stored
  source without outputs.
* The gradstab wheel and a tarball of the book's sources are built with the book and served from ``dist/``;
  the ``gradstab-download`` directive prints the link and the shell lines for each (the Chinese edition links
  the English edition's ``dist/``).

Registered in ``_config.yml`` (``sphinx.local_extensions`` and the extension list).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import nbformat
import tomllib
from docutils import nodes
from gradstab_i18n import edition, root_of_english
from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

REPO = Path(__file__).resolve().parents[2]
logger = logging.getLogger(__name__)
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
    """Replace each ``_sources/**/*.ipynb`` (stored without outputs) with the executed notebook.

    With ``execute_notebooks: cache`` an unchanged notebook is not executed again, and myst-nb then writes
    it to ``jupyter_execute`` without outputs: the outputs come from jupyter-cache instead, merged into the
    stored notebook exactly as the page shows them. Otherwise (``force``) ``jupyter_execute`` holds them."""
    if exception is not None or app.builder.format != "html":
        return
    sources = Path(app.outdir, "_sources")
    cache = _jupyter_cache(app)
    for served in sources.rglob("*.ipynb"):
        notebook = nbformat.read(served, as_version=4)
        run = Path(app.env.mystnb_config.output_folder, served.relative_to(sources))
        executed = _executed(cache, notebook, run)
        if executed is None:
            logger.warning(f"no executed copy of {served.relative_to(sources)}: its download has no outputs")
        else:
            nbformat.write(executed, served)


def _jupyter_cache(app):
    if app.config.nb_execution_mode != "cache":
        return None
    from jupyter_cache import get_cache

    return get_cache(Path(app.srcdir, app.config.nb_execution_cache_path))


def _executed(cache, notebook, run: Path):
    """The notebook with its outputs, from jupyter-cache or from myst-nb's executed copy; None if neither."""
    if cache is not None:
        try:
            return cache.merge_match_into_notebook(notebook)[1]
        except KeyError:  # not in the cache: fall back to the executed copy
            pass
    if run.is_file():
        copy = nbformat.read(run, as_version=4)
        if any(cell.get("outputs") for cell in copy.cells):
            return copy
    return None


def wheel_name() -> str:
    """The file name of the gradstab wheel built from this repository's pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return f"{project['name']}-{project['version']}-py3-none-any.whl"


SOURCES = "taming-exploding-gradients"  # the folder a reader unpacks the book's sources into


def _sources_of_repo() -> list[str]:
    """The files git tracks in this repository (the book's sources), as paths relative to its root; empty
    when the book is built outside a git checkout (then no tarball is served)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    except FileNotFoundError:  # no git on this machine
        listed = None
    if listed is None or listed.returncode != 0:
        logger.info("not a git checkout: the book's sources are not packed for download")
        return []
    return [name for name in listed.stdout.decode().split("\0") if name and (REPO / name).is_file()]


def _build_downloads(app, exception) -> None:
    """Build the gradstab wheel and a tarball of the book's sources into ``<html>/dist``; each is skipped
    when it is newer than every file it is made of."""
    if exception is not None or app.builder.format != "html" or edition(app.config.language) != "en":
        return  # the other editions link the English edition's downloads
    target = Path(app.outdir, WHEEL_DIR)
    target.mkdir(parents=True, exist_ok=True)
    wheel = target / wheel_name()
    if _stale(wheel, [REPO / "pyproject.toml", *(REPO / "src").rglob("*.py")]):
        for old in target.glob("gradstab-*.whl"):  # an earlier version's wheel
            old.unlink()
        shutil.rmtree(REPO / "build", ignore_errors=True)  # setuptools' staging copy may hold deleted modules
        built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                                "--wheel-dir", str(target), str(REPO)], capture_output=True, text=True)
        if built.returncode != 0:
            raise RuntimeError(f"building the gradstab wheel failed:\n{built.stdout}{built.stderr}")
    sources = _sources_of_repo()
    archive = target / f"{SOURCES}.tar.gz"
    if sources and (_stale(archive, [REPO / name for name in sources]) or _packed(archive) != set(sources)):
        with tarfile.open(archive, "w:gz") as tar:
            for name in sources:
                tar.add(REPO / name, arcname=f"{SOURCES}/{name}", recursive=False)


def _packed(archive: Path) -> set[str]:
    """The repository paths in a sources tarball (empty if there is none): a file newly tracked by git may be
    older than the tarball, so comparing times alone would leave it out."""
    if not archive.is_file():
        return set()
    with tarfile.open(archive) as tar:
        return {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


def _stale(product: Path, inputs: list[Path]) -> bool:
    return not product.is_file() or product.stat().st_mtime <= max(p.stat().st_mtime for p in inputs)


DOWNLOAD_LABEL = {"en": "Download: ", "zh_CN": "下载："}


class DownloadDirective(SphinxDirective):
    """``{gradstab-download} wheel`` or ``{gradstab-download} sources``: a link to the file served with the
    book and the shell lines that use it."""

    required_arguments = 1

    def run(self):
        kind = self.arguments[0]
        if kind == "wheel":
            name = wheel_name()
            command = f'# in the folder you downloaded it to, with your virtual environment active:\n' \
                      f'pip install "./{name}[book]"'
        elif kind == "sources":
            name = f"{SOURCES}.tar.gz"
            command = f"tar xzf {name} && cd {SOURCES}\nmake lab"
        else:
            raise self.error(f"gradstab-download takes 'wheel' or 'sources', got {kind!r}")
        uri = root_of_english(self.env.docname, self.config.language) + f"{WHEEL_DIR}/{name}"
        label = DOWNLOAD_LABEL[edition(self.config.language)]
        link = nodes.paragraph("", label, nodes.reference(name, name, refuri=uri, classes=[f"gradstab-{kind}"]))
        link["translatable"] = False  # the label is chosen by language above; the file name holds the version
        return [link, nodes.literal_block(command, command, language="bash")]


def setup(app):
    register_plugin("pybtex.style.labels", "gradstab-authoryear", AuthorYearLabels)
    register_plugin("pybtex.style.formatting", "gradstab", BookStyle)
    app.add_directive("gradstab-download", DownloadDirective)
    app.connect("build-finished", _serve_executed_notebooks)
    app.connect("build-finished", _build_downloads)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
