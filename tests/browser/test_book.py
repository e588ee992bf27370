"""The rendered book in a real browser with the network cut off: no JavaScript errors, no request
leaving the machine, and every static explorer redraws when its sliders move."""
from __future__ import annotations

import re


def test_pages_load_offline_without_errors(pages, base_url, offline_page):
    problems = []
    for rel in pages:
        offline_page.errors.clear()
        offline_page.blocked.clear()
        offline_page.page.goto(base_url + rel, wait_until="load")
        offline_page.page.wait_for_timeout(150)  # let deferred scripts run and log
        problems += [f"{rel}: console error: {e}" for e in offline_page.errors]
        problems += [f"{rel}: request off the machine: {u}" for u in offline_page.blocked]
    assert not problems, "\n".join(problems)


def test_no_widget_or_cdn_scripts_in_pages(html_root, pages):
    bad = re.compile(r'<script[^>]+src="(https?:)?//|application/vnd\.jupyter\.widget-view\+json')
    offenders = [rel for rel in pages if bad.search((html_root / rel).read_text(encoding="utf-8"))]
    assert not offenders, f"pages load remote scripts or carry ipywidgets output: {offenders}"


def _state(explorer) -> tuple[str, str, str]:
    svg = explorer.locator("svg.gsx-svg")
    return svg.get_attribute("data-setting"), svg.inner_html(), explorer.locator(".gsx-status").inner_text()


def _nudge(explorer, cls: str) -> None:
    """Move a range slider one notch with the keyboard, the way a reader would."""
    slider = explorer.locator(f"input.{cls}")
    at_end = slider.evaluate("s => +s.value >= +s.max")
    slider.focus()
    slider.press("ArrowLeft" if at_end else "ArrowRight")


def test_every_explorer_responds_to_both_sliders(html_root, pages, base_url, offline_page):
    page, shots, seen = offline_page.page, html_root / "_screenshots", 0
    for rel in pages:
        if "gsx-explorer" not in (html_root / rel).read_text(encoding="utf-8"):
            continue
        page.goto(base_url + rel, wait_until="load")
        explorers = page.locator(".gsx-explorer")
        for k in range(explorers.count()):
            explorer = explorers.nth(k)
            explorer.scroll_into_view_if_needed()
            before = _state(explorer)
            assert before[1].count("<path") >= 3, f"{rel} explorer {k}: nothing drawn at load"
            if seen == 0:
                shots.mkdir(exist_ok=True)
                explorer.screenshot(path=str(shots / "explorer-setting-1.png"))
            for cls in ("gsx-depth", "gsx-lr"):
                _nudge(explorer, cls)
                after = _state(explorer)
                assert after[0] != before[0], f"{rel} explorer {k}: {cls} did not change the setting"
                assert after[1] != before[1], f"{rel} explorer {k}: {cls} did not change the figure"
                assert after[2] != before[2], f"{rel} explorer {k}: {cls} did not change the status line"
                before = after
            if seen == 0:
                explorer.screenshot(path=str(shots / "explorer-setting-2.png"))
            seen += 1
    assert offline_page.errors == [] and offline_page.blocked == []
    assert seen, "the built book holds no static explorer"
