"""Check the translation catalogs (``locales/<language>/LC_MESSAGES/**/*.po``) against the English source.

    python book/_ext/check_catalogs.py [--locale zh_CN] [--pot _build/gettext]

Fails (exit status 1), naming each file and its counts, when

* a message of the current templates (``.pot``, written by ``book/_ext/build_zh.py --builder gettext``) has no
  entry in the catalog: the English changed and ``sphinx-intl update`` was not run;
* an entry is untranslated or fuzzy (``sphinx-intl update`` marks an entry fuzzy when its English changed);
* a translation does not read as one paragraph, so Sphinx would drop it and show the English (a heading
  translated as "1. 标题" is a Markdown list: write "1\\. 标题");
* a translation lost or altered what must stay as written: inline code, math, a role's target (``{cite}``,
  ``{ref}``, ``{doc}``...), a link's target; or it shows asterisks the English does not (CommonMark does not
  close ``**原文：**`` before a Chinese character, so the asterisks would be printed; ``**原文**：`` works).

Contributors' workflow: README.md, "Translating the book".
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

from babel.messages.pofile import read_po
from markdown_it import MarkdownIt
from mdit_py_plugins.dollarmath import dollarmath_plugin

ROOT = Path(__file__).resolve().parents[2]
# what a translation keeps verbatim: code spans, $$..$$ and $..$ math, role targets, link targets
CODE = re.compile(r"(`+)(.+?)\1", re.S)
MATH = re.compile(r"\$\$.+?\$\$|\$[^$\n]+\$", re.S)
ROLE = re.compile(r"\{([\w:-]+)\}`([^`]*)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
INLINE = MarkdownIt("commonmark").use(dollarmath_plugin)  # how MyST reads a paragraph's emphasis and math


def kept(text: str) -> Counter:
    """The multiset of pieces of a message that its translation must contain unchanged.

    A role's displayed text may be translated (``{ref}`Title <label>``` keeps only ``label``); code spans
    inside a role are not counted twice. Asterisks that CommonMark leaves as text (an emphasis it cannot
    close) count too.
    """
    pieces = Counter()
    for name, body in ROLE.findall(text):
        target = re.search(r"<([^<>]+)>\s*$", body)
        pieces[f"{{{name}}}{target.group(1) if target else body}"] += 1
    text = ROLE.sub(" ", text)
    pieces.update(f"code:{m.group(2)}" for m in CODE.finditer(text))
    text = CODE.sub(" ", text)
    pieces.update(f"math:{m}" for m in MATH.findall(text))
    pieces.update(f"link:{m}" for m in LINK.findall(text))
    stray = sum(child.content.count("*") for block in INLINE.parse(text) for child in block.children or ()
                if child.type == "text")
    if stray:
        pieces["asterisks shown as text"] = stray
    return pieces


def one_paragraph(text: str) -> bool:
    """Whether ``text`` parses as one Markdown paragraph: Sphinx puts a translation in place only then."""
    return [token.type for token in INLINE.parse(text)] == ["paragraph_open", "inline", "paragraph_close"]


def problems_of(catalog, template) -> dict[str, list[str]]:
    """The problems of one catalog against its template, by kind: missing, untranslated, fuzzy, markup."""
    found = {"missing": [], "untranslated": [], "fuzzy": [], "markup": []}
    for message in template:
        if not message.id:
            continue
        entry = catalog.get(message.id) if catalog is not None else None
        if entry is None:
            found["missing"].append(message.id)
        elif not entry.string:
            found["untranslated"].append(message.id)
        elif entry.fuzzy:
            found["fuzzy"].append(message.id)
        elif entry.string != message.id and not one_paragraph(entry.string):
            found["markup"].append(f"{message.id[:60]!r}: the translation is not one Markdown paragraph "
                                   f"({entry.string[:30]!r}...; a leading '1. ', '- ' or '#' needs a backslash)")
        elif (source := kept(message.id)) != (translation := kept(entry.string)):
            found["markup"].append(f"{message.id[:60]!r}: lost {sorted(source - translation)}, "
                                   f"added {sorted(translation - source)}")
    return found


def check(locale: str, pot_dir: Path) -> list[str]:
    """One line per catalog with a problem, naming the file and its counts (empty when all is well)."""
    templates = sorted(pot_dir.rglob("*.pot"))
    if not templates:
        raise ValueError(f"pot_dir {pot_dir} holds no .pot templates: run book/_ext/build_zh.py --builder gettext")
    report = []
    for pot in templates:
        name = pot.relative_to(pot_dir).with_suffix(".po")
        po = ROOT / "locales" / locale / "LC_MESSAGES" / name
        with open(pot, "rb") as f:
            template = read_po(f)
        catalog = None
        if po.is_file():
            with open(po, "rb") as f:
                catalog = read_po(f, locale=locale)
        found = problems_of(catalog, template)
        total = sum(1 for m in template if m.id)
        counts = ", ".join(f"{len(v)} {k}" for k, v in found.items() if v)
        if counts:
            report.append(f"{po.relative_to(ROOT)}: {counts} (of {total} messages)")
            report.extend(f"    {kind}: {line[:160]!s}" for kind, lines in found.items() for line in lines[:3])
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--locale", default="zh_CN")
    parser.add_argument("--pot", type=Path, default=ROOT / "_build" / "gettext")
    args = parser.parse_args(argv)
    report = check(args.locale, args.pot)
    if report:
        print("The translation catalogs are not complete:", *report, sep="\n")
        print("Update them: README.md, 'Translating the book'.")
        return 1
    print(f"locales/{args.locale}: every message translated, none fuzzy, markup kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
