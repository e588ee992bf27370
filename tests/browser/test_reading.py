"""The built book read as a learner reads it, at 1400 px and at 400 px: output that fits, legible figures,
clean references, one search box, exercises with hidden solutions, and every page runnable (the executed
notebook and the gradstab wheel served with the book)."""
from __future__ import annotations

import json
import re

import pytest

# Elements that overflow their box, and whether they scroll inside it. `pre` in cell outputs must wrap at
# 1400 px; at 400 px anything wider than the column must scroll inside its own box, never be cut off or widen
# the page.
_OVERFLOW = """() => {
  const wide = [];
  for (const e of document.querySelectorAll('article.bd-article pre, article.bd-article table, .cell_output img')) {
    if (e.offsetParent === null) continue;               // hidden (a closed solution, a collapsed cell)
    if (e.scrollWidth <= e.clientWidth + 1) continue;
    const s = getComputedStyle(e);
    wide.push({tag: e.tagName, output: !!e.closest('.cell_output'), scrolls: ['auto', 'scroll'].includes(s.overflowX),
               text: (e.innerText || e.getAttribute('src') || '').slice(0, 60)});
  }
  return {wide, page: document.documentElement.scrollWidth, viewport: window.innerWidth};
}"""


def test_printed_markdown_tables_render_as_tables(html_root, pages):
    """A table a notebook prints with display(Markdown(...)) is an HTML table, not a paragraph of pipes
    (myst-nb renders printed Markdown as CommonMark, which has no tables, unless told to use MyST)."""
    raw = re.compile(r'<div class="cell_output[^"]*">\s*<p>\|[^<]*\n\|[-—:| ]+\|')
    offenders = [rel for rel in pages if raw.search((html_root / rel).read_text(encoding="utf-8"))]
    assert not offenders, f"pages with a printed table shown as raw Markdown: {offenders}"


def test_output_fits_or_scrolls_in_its_own_box(pages, base_url, sized_page):
    page, width, problems = sized_page.page, sized_page.page.viewport_size["width"], []
    for rel in pages:
        page.goto(base_url + rel, wait_until="load")
        found = page.evaluate(_OVERFLOW)
        if found["page"] > found["viewport"] + 1:
            problems.append(f"{rel}: the page is {found['page']} px wide in a {found['viewport']} px window")
        for e in found["wide"]:
            if width >= 1400 and e["output"] and e["tag"] == "PRE":
                problems.append(f"{rel}: output block needs horizontal scrolling at {width} px: {e['text']!r}")
            elif not e["scrolls"]:
                problems.append(f"{rel}: {e['tag'].lower()} cut off at {width} px: {e['text']!r}")
    assert not problems, "\n".join(problems)


# Every figure in an output: an SVG (its smallest type, scaled as displayed) or a raster at >= 2x.
_FIGURES = """async () => {
  const out = [];
  for (const img of document.querySelectorAll('.cell_output img')) {
    const shown = img.getBoundingClientRect().width, src = img.getAttribute('src');
    if (!src.endsWith('.svg')) { out.push({src, svg: false, ratio: img.naturalWidth / shown}); continue; }
    const text = await (await fetch(img.src)).text();
    const box = text.match(/viewBox="[\\d.\\-]+ [\\d.\\-]+ ([\\d.]+)/);
    const sizes = [...text.matchAll(/font(?:-size)?:\\s*(?:[a-z]+\\s+)*([\\d.]+)px/g)].map(m => +m[1]);
    out.push({src, svg: true, smallest: sizes.length ? Math.min(...sizes) * shown / +box[1] : null});
  }
  return out;
}"""


def test_figures_are_vector_or_sharp_with_readable_type(pages, base_url, offline_page):
    page, problems, seen = offline_page.page, [], 0
    page.set_viewport_size({"width": 1400, "height": 900})
    for rel in pages:
        page.goto(base_url + rel, wait_until="load")
        for fig in page.evaluate(_FIGURES):
            seen += 1
            if not fig["svg"] and fig["ratio"] < 2:
                problems.append(f"{rel}: raster figure at {fig['ratio']:.2f}x, not 2x: {fig['src']}")
            elif fig["svg"] and fig["smallest"] is not None and fig["smallest"] < 9:
                problems.append(f"{rel}: text {fig['smallest']:.1f} px as displayed (< 9 px): {fig['src']}")
    assert seen, "no figures found in any page"
    assert not problems, "\n".join(problems)


def test_every_figure_is_numbered_and_captioned(pages, base_url, offline_page):
    """The paragraph after a figure's cell starts with "Figure C.k." (the book's caption convention; "图 C.k" in
    the Chinese edition)."""
    page, problems = offline_page.page, []
    for rel in pages:
        page.goto(base_url + rel, wait_until="load")
        captions = page.evaluate("""() => [...document.querySelectorAll('.cell')]
            .filter(c => c.querySelector('.cell_output img'))
            .map(c => { let n = c.nextElementSibling; while (n && !n.innerText.trim()) n = n.nextElementSibling;
                        return n ? n.innerText.trim().slice(0, 40) : ''; })""")
        problems += [f"{rel}: figure without a numbered caption (next text: {c!r})" for c in captions
                     if not re.match(r"Figure \d+\.\d+\.|图 \d+\.\d+", c)]
    assert not problems, "\n".join(problems)


_NAME = r"(?:[a-z]+ )*[A-Z][\w'\-]+(?: [A-Z][\w'\-]+)*"  # "He", "van Laarhoven", "De"
_LABEL = re.compile(rf"^(Anonymous|{_NAME}(?: & {_NAME}| et al\.)? \d{{4}}[a-j]?)$")


def test_references_have_clean_labels_and_links(html_root, base_url, offline_page):
    page = offline_page.page
    page.goto(base_url + "book/references.html", wait_until="load")
    entries = page.evaluate("""() => [...document.querySelectorAll('div.citation')].map(c => ({
        label: c.querySelector('.label').innerText.replace(/^\\[|\\]$/g, ''),
        text: c.innerText, links: [...c.querySelectorAll('a[href^="http"]')].length}))""")
    assert len(entries) >= 40, f"only {len(entries)} references"
    bad = [e["label"] for e in entries if not _LABEL.match(e["label"])]
    assert not bad, f"labels with something else than names, initials and years: {bad}"
    unlinked = [e["label"] for e in entries if re.search(r"https?://|doi", e["text"], re.I) and not e["links"]]
    assert not unlinked, f"references with a DOI or URL that is not a link: {unlinked}"
    assert any("梯度爆炸防止与缓解在深度学习中的应用" in e["text"] for e in entries), "the source article is not cited"


def test_one_header_bar_and_one_search_box(base_url, offline_page):
    page = offline_page.page
    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto(base_url + "book/intro.html", wait_until="load")
    visible = page.evaluate("""() => [...document.querySelectorAll(
        '.search-button-field, input[type=search], header.bd-header')].filter(e => e.getBoundingClientRect().height > 0)
        .map(e => e.className)""")
    assert sum("search" in c for c in visible) == 1, f"search boxes shown: {visible}"
    assert not any("bd-header " in c + " " for c in visible), f"the theme's top bar is shown: {visible}"


def test_chapters_end_with_exercises_whose_solutions_start_hidden(pages, base_url, offline_page):
    page, missing, shown = offline_page.page, [], []
    chapters = [rel for rel in pages if re.match(r"(zh/)?book/(ch\d|explorer)", rel) and "ch7_faq" not in rel
                and not rel.endswith(("ch2_principles.html", "ch5_optimization.html"))]
    for rel in chapters:
        page.goto(base_url + rel, wait_until="load")
        if page.locator(".exercise").count() == 0:
            missing.append(rel)
        solutions = page.locator(".solution")
        for k in range(solutions.count()):
            body = solutions.nth(k).locator(".solution-content, section").first
            if body.count() and body.is_visible():
                shown.append(f"{rel} solution {k}")
    assert not missing, f"pages without exercises: {missing}"
    assert not shown, f"solutions visible before they are opened: {shown}"


def served_without_outputs(html_root) -> list[str]:
    """The downloadable notebooks (``_sources/book/*.ipynb``) that carry no outputs."""
    empty = []
    for served in sorted((html_root / "_sources" / "book").glob("*.ipynb")):
        cells = json.loads(served.read_text(encoding="utf-8"))["cells"]
        if not any(c.get("outputs") for c in cells if c["cell_type"] == "code"):
            empty.append(served.name)
    return empty


def test_download_serves_the_executed_notebooks(html_root):
    assert len(list((html_root / "_sources" / "book").glob("*.ipynb"))) >= 14
    assert not served_without_outputs(html_root), "downloads without outputs (the unexecuted source)"


@pytest.mark.parametrize("run_page", ["book/run.html", "zh/book/run.html"])
def test_run_page_links_the_wheel_and_the_sources_it_serves(html_root, base_url, offline_page, run_page):
    """Both editions link the files the English build serves (the Chinese edition builds no second copy)."""
    page = offline_page.page
    page.goto(base_url + run_page, wait_until="load")
    for kind, suffix in (("wheel", ".whl"), ("sources", ".gz")):
        href = page.locator(f"a.gradstab-{kind}").get_attribute("href")
        served = (html_root / run_page).parent.joinpath(href).resolve()
        assert served.is_file() and served.suffix == suffix, f"{run_page} links {href}, which was not built"
        assert served.parent == (html_root / "dist").resolve()
    assert "pip install" in page.locator("article").inner_text()
