"""Build one more edition of the book: the same sources and _config.yml, another Sphinx ``language``.

    python book/_ext/build_zh.py [--builder html|gettext] [--strict]

``html`` (the default) builds the Chinese edition into ``_build/html/zh`` from the catalogs in ``locales/``;
``gettext`` writes the message templates (.pot) to ``_build/gettext`` for ``sphinx-intl update``. Both reuse
the notebooks jupyter-cache executed for the English build (``_build/.jupyter_cache``): a notebook whose code
has not changed is not executed again. Each keeps its own doctrees, so the English build stays incremental.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gradstab_i18n import EDITIONS
from jupyter_book.sphinx import build_sphinx

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {  # builder -> (language, output folder, doctrees folder)
    "html": ("zh_CN", ROOT / "_build/html" / EDITIONS["zh_CN"][0], ROOT / "_build/.doctrees-zh"),
    "gettext": ("en", ROOT / "_build/gettext", ROOT / "_build/.doctrees-gettext"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builder", choices=sorted(TARGETS), default="html")
    parser.add_argument("--strict", action="store_true", help="warnings are errors, nitpicky references")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # _config.yml's paths (the jupyter-cache in _build/.jupyter_cache) are relative to the root
    language, outdir, doctrees = TARGETS[args.builder]
    # what `jupyter-book build .` passes for a whole book, plus the language
    overrides = {"language": language, "external_toc_path": (ROOT / "_toc.yml").as_posix(),
                 "latex_individualpages": False}
    if args.strict:
        overrides["nitpicky"] = True
    result = build_sphinx(ROOT, outdir, noconfig=True, path_config=ROOT / "_config.yml", confoverrides=overrides,
                          doctreedir=doctrees, builder=args.builder, warningiserror=args.strict, keep_going=True,
                          freshenv=args.builder == "gettext")  # extraction always reads every page (seconds)
    if isinstance(result, Exception):
        raise result
    if result == 0 and args.builder == "html":
        print(f"The Chinese edition is at file://{outdir}/index.html")
    return result


if __name__ == "__main__":
    sys.exit(main())
