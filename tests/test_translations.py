"""The Chinese edition's machinery (book/_ext): the catalog check, what is a message, the language switch's
paths, the search dictionary. The built pages themselves are tested in tests/browser/test_editions.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from babel.messages.catalog import Catalog
from docutils import nodes
from docutils.frontend import get_default_settings
from docutils.parsers.rst import Parser
from docutils.utils import new_document

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))

import check_catalogs as catalogs  # noqa: E402
import gradstab_i18n  # noqa: E402


def _catalogs(entries: dict[str, str], fuzzy: tuple[str, ...] = ()) -> tuple[Catalog, Catalog]:
    template, catalog = Catalog(), Catalog(locale="zh_CN")
    for msgid, msgstr in entries.items():
        template.add(msgid)
        if msgstr is not None:
            catalog.add(msgid, msgstr, flags=("fuzzy",) if msgid in fuzzy else ())
    return catalog, template


def test_kept_pieces_are_code_math_role_targets_and_links():
    text = "See {ref}`the claims <claim-1>`, {cite}`he2016deep`, `x = 1`, $\\eta < 2/\\lambda$ and [2.1](ch2_1.ipynb)"
    assert catalogs.kept(text) == {"{ref}claim-1": 1, "{cite}he2016deep": 1, "code:x = 1": 1,
                                   "math:$\\eta < 2/\\lambda$": 1, "link:ch2_1.ipynb": 1}
    # a role's title may be translated, its target may not
    assert catalogs.kept("{ref}`论断 1 <claim-1>`") == catalogs.kept("{ref}`Claim 1 <claim-1>`")
    assert catalogs.kept("{ref}`论断 1 <claim-2>`") != catalogs.kept("{ref}`Claim 1 <claim-1>`")
    # CommonMark cannot close **原文：** before a Chinese character: the asterisks would be printed
    assert catalogs.kept("**原文：**神经网络") != catalogs.kept("**The article:** 神经网络")
    assert catalogs.kept("**原文**：神经网络") == catalogs.kept("**The article:** 神经网络")


def test_one_paragraph_rejects_what_sphinx_would_drop():
    assert catalogs.one_paragraph("1\\. DDP：先平均，再裁剪") and catalogs.one_paragraph("梯度 *爆炸*")
    assert not catalogs.one_paragraph("1. DDP：先平均，再裁剪")  # a list: Sphinx keeps the English heading
    assert not catalogs.one_paragraph("- 一项")
    assert not catalogs.one_paragraph("第一段\n\n第二段")


def test_problems_name_every_kind_and_pass_a_good_catalog():
    good = {"Clip by global norm": "按全局范数裁剪", "`torch`": "`torch`", "#": "#"}
    assert not any(catalogs.problems_of(*_catalogs(good)).values())
    bad = {"missing one": None, "untranslated one": "", "fuzzy one": "模糊", "code `x` here": "这里的代码",
           "1. Heading": "1. 标题"}
    catalog, template = _catalogs(bad, fuzzy=("fuzzy one",))
    del catalog["missing one"]
    found = catalogs.problems_of(catalog, template)
    assert found["missing"] == ["missing one"] and found["untranslated"] == ["untranslated one"]
    assert found["fuzzy"] == ["fuzzy one"] and len(found["markup"]) == 2
    assert "code:x" in found["markup"][0] and "one Markdown paragraph" in found["markup"][1]


def test_check_names_the_file_and_counts(tmp_path, monkeypatch):
    pot_dir = tmp_path / "gettext" / "book"
    pot_dir.mkdir(parents=True)
    (pot_dir / "page.pot").write_text('msgid ""\nmsgstr ""\n\nmsgid "Hello"\nmsgstr ""\n\nmsgid "World"\nmsgstr ""\n')
    po_dir = tmp_path / "locales" / "zh_CN" / "LC_MESSAGES" / "book"
    po_dir.mkdir(parents=True)
    (po_dir / "page.po").write_text('msgid ""\nmsgstr ""\n\nmsgid "Hello"\nmsgstr "你好"\n')
    monkeypatch.setattr(catalogs, "ROOT", tmp_path)
    report = catalogs.check("zh_CN", tmp_path / "gettext")
    assert report[0] == "locales/zh_CN/LC_MESSAGES/book/page.po: 1 missing (of 2 messages)"
    (po_dir / "page.po").write_text((po_dir / "page.po").read_text() + '\nmsgid "World"\nmsgstr "世界"\n')
    assert catalogs.check("zh_CN", tmp_path / "gettext") == []
    with pytest.raises(ValueError, match="no .pot"):
        catalogs.check("zh_CN", tmp_path / "locales")


def _document(text: str, source: str, *, output: bool) -> nodes.document:
    document = new_document("page", get_default_settings(Parser))
    code = text.startswith("`") and text.endswith("`")
    paragraph = nodes.paragraph(text, "", nodes.literal(text, text.strip("`")) if code else nodes.Text(text))
    paragraph.source = source
    if output:
        container = nodes.container(nb_element="cell_code_output")
        container += paragraph
        document += container
    else:
        document += paragraph
    return document


@pytest.mark.parametrize(("text", "source", "output", "message"), [
    ("final accuracy 0.93", "book/page.ipynb", True, False),  # a measured number printed by the notebook
    ("x x ✓ x x", "book/page.ipynb", True, False),            # per-seed marks: no word to translate
    ("`test_translations.py`", "book/page.ipynb", True, False),  # a file name the notebook lists: code
    ("`torch` and friends", "book/page.ipynb", True, True),   # words beside the code
    ("final accuracy", "book/page.ipynb", True, True),        # a table header printed by the notebook
    ("It trains 5 seeds.", "book/page.ipynb", False, True),   # prose with a number is a message
    ("Which device to compute on.", "src/gradstab/device.py:docstring of gradstab.device", False, False),
    ("Chance accuracy.", "docstring of gradstab.explore.CHANCE_ACCURACY", False, False),  # a constant's doc
])
def test_what_is_a_message(text, source, output, message):
    document = _document(text, source, output=output)
    transform = gradstab_i18n.MachineTextIsNotAMessage(document)
    transform.apply()
    paragraph = next(document.findall(nodes.paragraph))
    assert paragraph.get("translatable", True) is message


def test_editions_paths_and_languages():
    assert gradstab_i18n.edition(None) == "en" and gradstab_i18n.edition("zh_CN") == "zh_CN"
    assert gradstab_i18n.to_english_root("zh_CN") == "../" and gradstab_i18n.to_english_root("en") == ""
    with pytest.raises(ValueError, match="language must be one of"):
        gradstab_i18n.edition("fr")


def test_the_glossary_terms_feed_the_chinese_search():
    terms = gradstab_i18n.glossary_terms()
    assert {"梯度爆炸", "梯度裁剪", "批量归一化", "学习率预热"} <= set(terms)
    assert all(len(term) >= 2 and not any(c.isascii() for c in term) for term in terms)
    assert "损失曲面的" not in terms  # a qualifier in parentheses is not a term
