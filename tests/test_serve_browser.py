"""`mechdiff serve` in a real browser (headless Chromium from the OS packages, driven by Playwright, as
test_report_browser.py): every page loads with no console error and nothing fetched off this server;
sorting, filtering and a text view on the Texts page; a live prompt on two tiny offline pairs (one a
model against itself: KL 0); markup in a run name, a text and a prompt shows as text and never runs.
Screenshots land in tmp (or in $MECHDIFF_SERVE_SHOTS, e.g. docs/img, for the README)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from serve_runs import INJECT, build_runs
from test_report_browser import ARGS, CHROMIUM

from mechdiff.serve import make_app, serve_in_thread
from mechdiff.serve import runs as runs_mod

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium is not installed at "
                                "/usr/bin/chromium (apt-get install chromium chromium-driver; .ci/run installs it)")
PROMPT = "<b>hi</b>" + INJECT + " Where is Paris?"


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    from playwright.sync_api import sync_playwright
    root = tmp_path_factory.mktemp("serve_browser")
    url, server, thread = serve_in_thread(make_app(build_runs(root)))
    shots = Path(os.environ.get("MECHDIFF_SERVE_SHOTS") or root / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    log: dict = {"requests": [], "console": [], "page_errors": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1180, "height": 820})
        page.set_default_timeout(60_000)
        page.on("request", lambda r: log["requests"].append(r.url))
        page.on("console", lambda m: log["console"].append((m.type, m.text)))
        page.on("pageerror", lambda e: log["page_errors"].append(str(e)))
        try:
            yield page, url, shots, log
        finally:
            browser.close()
            server.should_exit = True
            thread.join(10)


def clean_log(page, url: str, log: dict) -> None:
    assert all(u.startswith(url) for u in log["requests"]), [u for u in log["requests"] if not u.startswith(url)]
    errors = [m for m in log["console"] if m[0] in ("error", "warning")]
    assert not errors and not log["page_errors"], (errors, log["page_errors"], log["requests"])
    assert page.evaluate("window.__pwned") is None


def test_overview_figures_hover_zoom(browser_page):
    page, url, shots, log = browser_page
    page.goto(url + "/#overview")
    page.wait_for_selector("#figure-d")
    assert page.inner_text("#run-title") == "Overview — tiny <i>pair</i>"          # markup in a run name: text
    assert page.locator("#run-title i").count() == 0
    stages = page.eval_on_selector_all(".headline", "els => els.map(e => e.dataset.stage)")
    assert {"rq1", "alpha_sweep", "rq3", "rq4", "tokens"} <= set(stages)
    assert "[0.1, 0.3]" in page.inner_text('.headline[data-stage="tokens"]')       # the interval as written
    assert page.locator("#no-verdict").count() == 1 and page.locator("#contrasts li").count() >= 1
    chart = page.locator('[data-chart="A-patch"]')
    n_points = chart.locator("circle").count()
    assert n_points == 15                                                           # layers 0, 2, ..., 28
    chart.scroll_into_view_if_needed()
    box = chart.locator("rect.overlay").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.99, box["y"] + box["height"] / 2)
    tip = page.inner_text("#tooltip")
    assert tip.startswith("layer 28") and "patch KL (mean ± SE): 0.9 ± 0.1" in tip  # (28 - 20 + 1) * 0.1, SE 0.01 + 0.09
    page.screenshot(path=str(shots / "serve_overview.png"))
    assert page.get_attribute("#report-link", "href") == "/api/runs/0/file/report.html"
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + 20)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.95, box["y"] + 30, steps=4)
    page.mouse.up()
    assert 2 <= chart.locator("circle").count() < n_points                          # zoomed on the later layers
    chart.locator("button").click()
    assert chart.locator("circle").count() == n_points
    for key in ("A-cka", "B-maps", "B-patch", "C-share", "C-side", "C-heads", "D-churn", "D-cum"):
        assert page.locator(f'[data-chart="{key}"] svg').count() == 1, key
    clean_log(page, url, log)


def test_texts_sort_filter_and_view(browser_page):
    page, url, shots, log = browser_page
    page.goto(url + "/#texts")
    page.wait_for_selector("#texts-body tr")
    ids = lambda: page.eval_on_selector_all("#texts-body tr", "rs => rs.map(r => r.children[1].textContent)")  # noqa: E731
    assert ids() == ["p-fr", "p-markup", "n-river"]                                 # by mean KL(base||tuned), largest first
    page.click('th[data-key="mean_kl_bt"]')
    assert ids() == ["n-river", "p-markup", "p-fr"]
    page.click('th[data-key="id"]')
    assert ids() == ["p-markup", "p-fr", "n-river"]
    page.select_option("#f-lang", "en")
    assert sorted(ids()) == ["n-river", "p-fr"]
    page.select_option("#f-lang", "")
    page.fill("#f-min", "0.5")
    assert ids() == ["p-fr"]
    page.fill("#f-min", "")
    page.click('#texts-body tr[data-idx="0"]')
    page.wait_for_selector("#text-title")
    strip = page.locator('.strip[data-kl="kl_bt"]')
    shades = strip.locator(".tok").evaluate_all("ts => ts.map(t => [t.textContent, t.style.background])")
    darkest = [t for t, bg in shades if bg.endswith("0.85)")]
    assert darkest == ["Paris"]                                                     # the planted largest KL
    assert strip.locator(".resp").count() == 1
    page.fill("#kl-scale", "0.2")                                                   # full red at 0.2 nats now
    shades = strip.locator(".tok").evaluate_all("ts => ts.map(t => [t.textContent, t.style.background])")
    assert sorted(t for t, bg in shades if bg.endswith("0.85)")) == ["Paris", "is", "the"]
    page.screenshot(path=str(shots / "serve_texts.png"), full_page=True)
    page.click('#texts-body tr[data-idx="1"]')
    page.wait_for_selector("text=Text 1: p-markup")
    text = page.inner_text('.strip[data-kl="kl_tb"]')
    assert INJECT in text and page.locator("#text-view img, #text-view b").count() == 0
    assert page.locator('.strip[data-kl="kl_bt"] .tok.span').count() == 10          # aligned spans drawn as boxes
    clean_log(page, url, log)


def test_live_prompt_with_handle(browser_page):
    page, url, shots, log = browser_page
    page.goto(url + "/#live")
    page.wait_for_selector("#live-form")
    page.fill("#l-prompt", PROMPT)
    page.fill("#l-new", "5")
    page.select_option("#l-handle", "L2_resid_post_diff_k2_steer")
    assert "(resid_post L2, k=2, steer, strength 8)" in page.inner_text("#l-handle")
    assert page.get_attribute("#l-layer", "placeholder") == "2"                    # the handle's own layer
    page.fill("#l-alpha", "40")
    page.click("#l-run")
    page.wait_for_selector("#live-kl")
    assert page.inner_text("#live-prompt") == PROMPT                                # shown as text, never parsed
    assert page.locator("#live-result b, #live-result img").count() == 0
    assert page.locator(".col").count() == 3
    assert "steer, L2, k=2, strength 40" in page.inner_text('.col[data-col="2"] h3')
    kl = page.inner_text("#live-kl")
    assert "KL(base ‖ tuned) = " in kl and "= 0 nats" not in kl
    page.screenshot(path=str(shots / "serve_live.png"), full_page=True)
    page.select_option("#run", "1")                                                 # the model against itself
    page.wait_for_selector("#live-form")
    page.fill("#l-prompt", "Where is Paris?")
    page.fill("#l-new", "3")
    page.click("#l-run")
    page.wait_for_selector("#live-kl")
    assert "KL(base ‖ tuned) = 0 nats, KL(tuned ‖ base) = 0 nats" in page.inner_text("#live-kl")
    a, b = (page.inner_text(f'.col[data-col="{i}"] pre') for i in (0, 1))
    assert a == b
    clean_log(page, url, log)


def test_compare_runs_overlaid(browser_page):
    page, url, shots, log = browser_page
    page.goto(url + "/#compare")
    page.wait_for_selector("#compare-table")
    head = page.eval_on_selector_all("#compare-table th", "ths => ths.map(t => t.textContent)")
    assert head == ["quantity", "tiny <i>pair</i>", "tiny-self"]
    entry = page.eval_on_selector_all("#compare-table tbody tr", "rs => rs.map(r => r.textContent)")[0]
    assert entry == "divergence enters at layer2022"                                # the two runs' entry layers
    rows = page.eval_on_selector_all("#compare-table tbody tr", "rs => rs.map(r => r.textContent)")
    share = [r for r in rows if r.startswith("changed heads (share)")]
    assert share == ["changed heads (share)5.0%5.0%"]                               # compare's own formats
    assert page.locator('[data-chart="A-patch"] .legend > span').count() == 2        # both runs overlaid
    assert page.locator("#stage-table tbody tr").count() >= 5
    assert page.locator("#no-verdict").count() == 1
    page.screenshot(path=str(shots / "serve_compare.png"))
    clean_log(page, url, log)
    page.goto(url + "/api/runs/0/file/report.html")                                 # a run's own page: sandboxed
    assert page.inner_text("h1").startswith("report") and page.evaluate("window.__pwned") is None
    log["console"].clear()                                                          # (the blocked script is logged)
    for name in ("serve_overview", "serve_texts", "serve_live", "serve_compare"):
        assert (shots / f"{name}.png").read_bytes().startswith(b"\x89PNG")


def test_verdict_rows_rendered_from_the_comparison(browser_page, monkeypatch):
    page, url, shots, log = browser_page
    row = {"criterion": "<b>rank</b> of the change", "predicted": "cultural < cognitive", "verdict": "supports",
           "cultural": {"value": 1.0, "lo": 0.5, "hi": 1.5, "note": ""}, "cognitive": {"value": 6.0, "lo": 5.0, "hi": 7.0,
           "note": ""}, "difference": {"value": -5.0, "lo": -6.1, "hi": -3.9, "note": "quadrature"}}
    real = runs_mod.comparison
    def with_verdict(dirs, labels):                                                 # one cultural + one cognitive run's
        return {**real(dirs, labels), "verdict": {"rows": [row]}}                   # rows, as verdict.Row.to_json()
    monkeypatch.setattr(runs_mod, "comparison", with_verdict)
    page.goto(url + "/?hook#compare")                                               # a fresh load, not a same-hash no-op
    page.wait_for_selector("#verdict-table")
    cells = page.eval_on_selector_all("#verdict-table td", "ts => ts.map(t => t.textContent)")
    assert cells == ["<b>rank</b> of the change", "cultural < cognitive", "1 [0.5, 1.5]", "6 [5, 7]",
                     "-5 [-6.1, -3.9] (quadrature)", "supports"]
    assert page.locator("#no-verdict").count() == 0
    clean_log(page, url, log)
