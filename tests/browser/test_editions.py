"""The two editions: every page has its twin in the other language and links to it, the Chinese pages are
Chinese (prose, explorers, search) and render with the reader's system fonts."""
from __future__ import annotations

import re
from urllib.parse import quote

import pytest

ZH = "zh/"
CJK = re.compile(r"[\u4e00-\u9fff]")


def _english(pages: list[str]) -> list[str]:
    return [rel for rel in pages if not rel.startswith(ZH)]


def _switch(html: str) -> tuple[str, str]:
    """(language of the page's switch, href of the link to the other edition)."""
    nav = re.search(r'<nav class="gradstab-lang"[^>]*>(.*?)</nav>', html, re.S)
    assert nav, "no language switch"
    current = re.search(r'class="gradstab-lang-current" lang="([\w-]+)"', nav.group(1))
    other = re.search(r'class="gradstab-lang-other"[^>]*href="([^"]+)"', nav.group(1))
    return current.group(1), other.group(1)


def test_every_page_has_a_twin_and_links_to_it(html_root, pages):
    english = _english(pages)
    assert len(english) >= 25 and sorted(ZH + rel for rel in english) == sorted(set(pages) - set(english)), \
        "the Chinese edition must have exactly the English edition's pages"
    problems = []
    for rel in pages:
        lang, href = _switch((html_root / rel).read_text(encoding="utf-8"))
        twin = rel[len(ZH):] if rel.startswith(ZH) else ZH + rel
        expected = "zh-CN" if rel.startswith(ZH) else "en"
        target = (html_root / rel).parent.joinpath(href).resolve()
        if lang != expected or target != (html_root / twin).resolve():
            problems.append(f"{rel}: switch says {lang}, links {href} (expected {twin})")
    assert not problems, "\n".join(problems)


def test_the_switch_leads_to_the_same_page_in_the_other_language(base_url, offline_page):
    page = offline_page.page
    page.goto(base_url + "book/ch2_1_concepts.html#exercises", wait_until="load")
    assert page.evaluate("document.documentElement.lang") == "en"
    page.locator("nav.gradstab-lang a").click()
    page.wait_for_load_state("load")
    assert page.url.endswith("/zh/book/ch2_1_concepts.html#exercises"), "the reader's place is kept"
    assert page.evaluate("document.documentElement.lang") == "zh-CN"
    assert CJK.search(page.locator("article h1").first.inner_text())
    page.locator("nav.gradstab-lang a").click()
    page.wait_for_load_state("load")
    assert page.url.endswith("/book/ch2_1_concepts.html#exercises") and "/zh/" not in page.url
    assert offline_page.errors == [] and offline_page.blocked == []


# Paragraphs, list items, headings, table cells and captions of the article, outside code, outputs, math
# and the API reference's docstrings, that hold several English words and no Chinese character. Table
# columns headed 英文 or 英译 (the glossary's English terms, the article's claims in English) are English on
# purpose.
_ENGLISH_LEFT = """() => {
  const skip = 'pre, code, .cell_output, .output, dl.py, .math, mjx-container, .citation, .gradstab-lang, ' +
               '.gsx-explorer, nav, .headerlink, .toc-entry';
  const englishColumn = (cell) => {
    const row = cell.closest('tr'), table = cell.closest('table');
    if (!row || !table) return false;
    const head = table.querySelectorAll('thead th')[[...row.children].indexOf(cell.closest('td, th'))];
    return !!head && /英文|英译/.test(head.innerText);
  };
  const out = [];
  for (const e of document.querySelectorAll(
      'article.bd-article :is(p, li, h1, h2, h3, th, figcaption, td:not(:has(p)))')) {
    if (e.closest(skip) || englishColumn(e)) continue;
    const clone = e.cloneNode(true);
    clone.querySelectorAll(skip).forEach(x => x.remove());
    const text = clone.innerText.trim();
    if (!/[\\u4e00-\\u9fff]/.test(text) && (text.match(/[A-Za-z]{3,}/g) || []).length >= 4) out.push(text.slice(0, 80));
  }
  return out;
}"""


def test_chinese_pages_are_written_in_chinese(pages, base_url, offline_page):
    page, problems = offline_page.page, []
    for rel in pages:
        # the API reference is gradstab's docstrings, English in both editions (the page says so)
        if not rel.startswith(ZH) or rel.endswith(("genindex.html", "py-modindex.html", "search.html",
                                                   "appendix_api.html")):
            continue
        page.goto(base_url + rel, wait_until="load")
        problems += [f"{rel}: {text!r}" for text in page.evaluate(_ENGLISH_LEFT)]
    assert not problems, "English left in the Chinese edition:\n" + "\n".join(problems)


def test_chinese_explorers_speak_chinese(html_root, pages, base_url, offline_page):
    page, seen = offline_page.page, 0
    for rel in pages:
        if not rel.startswith(ZH) or "gsx-explorer" not in (html_root / rel).read_text(encoding="utf-8"):
            continue
        page.goto(base_url + rel, wait_until="load")
        explorers = page.locator(".gsx-explorer")
        for k in range(explorers.count()):
            explorer = explorers.nth(k)
            assert explorer.locator(".gsx-t-depth").inner_text() == "深度"
            assert explorer.locator(".gsx-t-lr").inner_text() == "学习率"
            assert CJK.search(explorer.locator(".gsx-title").inner_text()), f"{rel}: English explorer title"
            status = explorer.locator(".gsx-status").inner_text()
            assert status.startswith("深度 ") and re.search("发散|停滞|学会", status), status
            seen += 1
    assert seen >= 3, f"only {seen} explorers in the Chinese edition"
    page.goto(base_url + "book/explorer.html", wait_until="load")  # the same output on an English page
    assert page.locator(".gsx-explorer .gsx-t-depth").first.inner_text() == "depth"
    assert page.locator(".gsx-explorer .gsx-status").first.inner_text().startswith("depth ")
    assert offline_page.errors == []


@pytest.mark.parametrize("term", ["梯度裁剪", "批量归一化", "学习率"])
def test_chinese_search_finds_chinese_terms(base_url, offline_page, term):
    page = offline_page.page
    page.goto(base_url + f"zh/search.html?q={quote(term)}", wait_until="load")
    results = page.locator("#search-results ul.search li")
    results.first.wait_for(timeout=20000)
    links = results.locator("a")
    found = [links.nth(k).evaluate("a => a.href") for k in range(min(links.count(), 5))]
    assert results.count() >= 3 and all(h.startswith(base_url + ZH + "book/") for h in found), found
    assert offline_page.errors == [] and offline_page.blocked == []


def test_chinese_pages_use_system_fonts(base_url, offline_page):
    """CJK type comes from the reader's system fonts: a Chinese face in the font stack, no web font loaded."""
    page = offline_page.page
    requested: list[str] = []
    page.on("request", lambda r: r.resource_type == "font" and requested.append(r.url))
    page.goto(base_url + "zh/book/ch1_introduction.html", wait_until="load")
    family = page.evaluate("getComputedStyle(document.querySelector('article p')).fontFamily")
    assert "Noto Sans CJK SC" in family and "Microsoft YaHei" in family and "PingFang SC" in family, family
    faces = page.evaluate("[...document.fonts].map(f => f.family)")
    assert not [f for f in faces if re.search("CJK|Han|Hei|Song|Kai", f)], f"CJK web fonts: {faces}"
    # the book serves only its icon and MathJax fonts, from its own folder; the Chinese text needs none
    served = ("/_static/vendor/fontawesome/", "/_static/mathjax/")
    assert not [u for u in requested if not (u.startswith(base_url) and any(s in u for s in served))], requested
