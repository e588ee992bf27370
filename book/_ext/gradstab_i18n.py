"""The book's two editions: English (the source) and Chinese (sphinx-intl catalogs in ``locales/``).

* What is a message to translate. Prose, headings, captions, admonitions, exercises and the tables the
  notebooks print are; two kinds of text are not, so that the catalogs hold only text that reads the same on
  every machine:

  - text printed by a notebook that contains a digit (a measured number: it differs between CPUs, seeds and
    releases, and a catalog entry keyed on it would go stale with every run), or no word outside inline code
    (per-seed marks such as "x x ✓ x x", a listed file name). Words that notebooks print (table headers, row
    labels) are messages: the catalogs hold those seen in a native build on the reference machine, which
    ``make test`` runs;
  - the API reference generated from gradstab's docstrings (the code's own documentation, in English).

* A language switch in the header bar of every page leads to the same page in the other edition: the English book
  is ``_build/html``, the Chinese one ``_build/html/zh`` (``EDITIONS``).

* The Chinese edition's search splits Chinese text into words with jieba (Sphinx's Chinese search); the
  glossary's Chinese terms are added to jieba's dictionary, so that a reader searching for a term such as
  梯度裁剪 finds it as one word.

Registered in ``_config.yml`` (the extension list). The Chinese edition is built by ``book/_ext/build_zh.py``.
"""
from __future__ import annotations

import re
from pathlib import Path

from docutils import nodes
from sphinx import addnodes
from sphinx.locale import init as init_locale
from sphinx.transforms import SphinxTransform
from sphinx.util.i18n import docname_to_domain

# language code -> (folder of the edition under _build/html, the switch's label in that language)
EDITIONS = {"en": ("", "English"), "zh_CN": ("zh/", "中文")}
DIGIT = re.compile(r"\d")
WORD = re.compile(r"[^\W\d_]{2,}")  # two letters (Latin or Chinese) in a row
DOCSTRING = re.compile(r"(^|:)docstring of ")  # autodoc's source of a docstring ("x.py:docstring of m.f")
# Interface text that comes from settings, not from the pages: the toggles of code cells whose source is
# hidden (myst-nb's settings; "{type}" would be the English "source" or "outputs")
SETTINGS = {"zh_CN": {"nb_code_prompt_show": "显示代码", "nb_code_prompt_hide": "隐藏代码"}}


def edition(language: str | None) -> str:
    """The ``EDITIONS`` key of a Sphinx ``language`` setting (None and "en" are the English edition).

    Raises ValueError for a language the book has no edition in.
    """
    code = language or "en"
    if code not in EDITIONS:
        raise ValueError(f"language must be one of {sorted(EDITIONS)}, got {language!r}")
    return code


def root_of_english(pagename: str, language: str | None) -> str:
    """The relative path from page ``pagename`` of ``language``'s edition to the English edition's root."""
    return "../" * pagename.count("/") + to_english_root(language)


def to_english_root(language: str | None) -> str:
    """The relative path from the root of ``language``'s edition to the English edition's root: ``"../"`` for
    the Chinese edition in ``_build/html/zh``, ``""`` for the English one."""
    return "../" * EDITIONS[edition(language)][0].count("/")


def _inside(node: nodes.Node, test) -> bool:
    parent = node.parent
    while parent is not None:
        if test(parent):
            return True
        parent = parent.parent
    return False


def _prose(node: nodes.Node) -> str:
    """The text of ``node`` outside inline code and math."""
    if isinstance(node, (nodes.literal, nodes.math)):
        return ""
    if isinstance(node, nodes.Text):
        return str(node)
    return "".join(_prose(child) for child in node.children)


def _fixed_text(node: nodes.Node) -> bool:
    """Whether text printed by a notebook is a message: words (a table's header, a row's label) without a
    digit. A measured number, a row of symbols such as "x x ✓ x x", or only code (a file or package name
    that the notebook lists) is not."""
    return not DIGIT.search(node.astext()) and bool(WORD.search(_prose(node)))


def _is_output(node: nodes.Node) -> bool:
    return isinstance(node, nodes.container) and node.get("nb_element") == "cell_code_output"


class MachineTextIsNotAMessage(SphinxTransform):
    """Mark what notebooks print other than fixed words, and the API reference, as not translatable.

    Runs before Sphinx's ``Locale`` transform (priority 20), so neither the gettext builder nor the
    translated build sees them as messages.
    """

    default_priority = 10

    def apply(self, **kwargs) -> None:
        for node in self.document.findall(nodes.TextElement):
            if DOCSTRING.search(node.source or "") or (_inside(node, _is_output) and not _fixed_text(node)):
                node["translatable"] = False


def _catalog(env):
    """The gettext catalog of the page being read, in the edition's language (Sphinx's own lookup)."""
    domain = docname_to_domain(env.docname, env.config.gettext_compact)
    dirs = [str(Path(env.srcdir, d)) for d in env.config.locale_dirs]
    return init_locale(dirs, env.config.language, domain)[0]


class TranslateTocCaptions(SphinxTransform):
    """Translate the captions of the toctrees that sphinx-external-toc inserts (priority 100), after Sphinx's
    ``Locale`` transform has run: the sidebar's "The book" and "Appendices" come from these captions."""

    default_priority = 150

    def apply(self, **kwargs) -> None:
        if edition(self.config.language) == "en":
            return
        trees = [t for t in self.document.findall(addnodes.toctree) if t.get("caption")]
        if trees:
            catalog = _catalog(self.env)
            for tree in trees:
                tree["caption"] = catalog.gettext(tree["caption"])


def _own_output_folder(app) -> None:
    """myst-nb writes the notebooks' images to ``<output folder>/../jupyter_execute``: for the Chinese edition
    in ``_build/html/zh`` that is inside the English site. Each other edition gets its own folder in ``_build``.
    (Runs after myst-nb's own ``builder-inited`` handler, which sets the folder.)"""
    if edition(app.config.language) != "en":
        folder = Path(app.doctreedir).parent / f"jupyter_execute-{app.config.language}"
        app.env.mystnb_config = app.env.mystnb_config.copy(output_folder=str(folder))


def _translated_settings(app, config) -> None:
    for name, value in SETTINGS.get(edition(config.language), {}).items():
        setattr(config, name, value)


def _translated_title(app, config) -> None:
    """The edition's title (sidebar, window title): the first catalog that translates the English title (the
    root page's heading translates it)."""
    if edition(config.language) == "en" or not config.html_title:
        return
    from babel.messages.pofile import read_po

    for po in sorted(Path(app.srcdir, config.locale_dirs[0], config.language).rglob("*.po")):
        with open(po, "rb") as f:
            entry = read_po(f).get(config.html_title)
        if entry is not None and entry.string and not entry.fuzzy:
            config.html_title = entry.string
            return


GLOSSARY = Path(__file__).resolve().parents[1] / "appendix_glossary.md"
CJK_WORD = re.compile(r"[\u4e00-\u9fff]{2,}")


def glossary_terms(glossary: Path = GLOSSARY) -> list[str]:
    """The Chinese terms of the glossary's tables (the 中文 column), without qualifiers such as （损失曲面的）."""
    terms = set()
    for line in glossary.read_text(encoding="utf-8").splitlines():
        cells = line.split("|")
        if len(cells) > 3 and line.startswith("| ") and not line.startswith("| English"):
            chinese = re.sub(r"（[^）]*的）|\$[^$]*\$", " ", cells[2])
            terms.update(CJK_WORD.findall(chinese))
    return sorted(terms)


def _search_dictionary(app, config) -> None:
    """For the Chinese edition, write the glossary's terms as a jieba user dictionary and point the search at it."""
    if edition(config.language) != "zh_CN":
        return
    path = Path(app.doctreedir) / "jieba-glossary.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{term} 100000 n\n" for term in glossary_terms()), encoding="utf-8")
    config.html_search_options = {**(config.html_search_options or {}), "dict": str(path)}


def _language_switch(app, pagename, templatename, context, doctree) -> None:
    """The links of the language switch (``templates/gradstab-lang.html``, in the article's header bar)."""
    here = edition(app.config.language)
    up = root_of_english(pagename, here)
    context["gradstab_lang"] = [
        dict(code=code.replace("_", "-"), label=label, href=None if code == here else f"{up}{folder}{pagename}.html")
        for code, (folder, label) in EDITIONS.items()]


def _switch_in_header(app, config) -> None:
    """Put the switch at the start of the article's header bar, before the theme's buttons."""
    config.templates_path = [*config.templates_path, str(Path(__file__).parent / "templates")]
    options = config.html_theme_options
    end = options.get("article_header_end", ["article-header-buttons.html"])
    end = [item.strip() for item in end.split(",")] if isinstance(end, str) else list(end)
    options["article_header_end"] = ["gradstab-lang.html", *[item for item in end if item != "gradstab-lang.html"]]


def setup(app):
    app.add_transform(MachineTextIsNotAMessage)
    app.add_transform(TranslateTocCaptions)
    app.connect("config-inited", _translated_title)
    app.connect("config-inited", _translated_settings)
    app.connect("builder-inited", _own_output_folder, priority=600)
    app.connect("html-page-context", _language_switch)
    app.connect("config-inited", _search_dictionary)
    app.connect("config-inited", _switch_in_header)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
