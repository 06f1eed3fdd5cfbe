"""report.html and compare.html in a real browser (headless Chromium from the OS packages, driven by
Playwright): every figure decodes (naturalWidth > 0), nothing is requested over http(s), no console
error or script runs; a full-page screenshot is written next to the page (report.png)."""
from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium is not installed at "
                                "/usr/bin/chromium (apt-get install chromium chromium-driver; .ci/run installs it)")


def render(page_path: Path) -> dict:
    """Open ``page_path`` in headless Chromium; images, requests, console messages, scripts, screenshot."""
    from playwright.sync_api import sync_playwright
    out: dict = {"requests": [], "console": [], "page_errors": []}
    shot = page_path.with_suffix(".png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("request", lambda r: out["requests"].append(r.url))
            page.on("console", lambda m: out["console"].append((m.type, m.text)))
            page.on("pageerror", lambda e: out["page_errors"].append(str(e)))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            out["images"] = page.evaluate("Array.from(document.images).map(i => ({src: i.src.slice(0, 30), "
                                          "complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}))")
            out["scripts"] = page.evaluate("document.querySelectorAll('script').length")
            out["title"] = page.title()
            out["h1"] = page.inner_text("h1")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    out["screenshot"] = shot
    return out


def check_page(r: dict, min_images: int) -> None:
    assert len(r["images"]) >= min_images, r["images"]
    for img in r["images"]:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, img
        assert img["src"].startswith("data:image/png;base64,"), img
    web = [u for u in r["requests"] if u.startswith(("http://", "https://"))]
    assert not web, f"the page requested the network: {web}"
    assert all(u.startswith(("file://", "data:")) for u in r["requests"]), r["requests"]
    errors = [m for m in r["console"] if m[0] in ("error", "warning")]
    assert not errors and not r["page_errors"], (errors, r["page_errors"])
    assert r["scripts"] == 0
    data = r["screenshot"].read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_study_report_in_chromium(tmp_path):
    from test_plots_report import HOSTILE, fake_run

    from mechdiff.report import write_report
    run = fake_run(tmp_path / "run", name="planted-cultural <b>x</b>")
    html, _ = write_report(run.path)
    r = render(html)
    check_page(r, min_images=4)
    assert r["h1"] == "mechdiff report — planted-cultural <b>x</b>"      # markup shown as text, not run
    assert (run.path / "report.png").is_file()
    assert HOSTILE.split("</script>")[0] not in html.read_text()


def test_compare_page_in_chromium(tmp_path):
    from test_plots_report import fake_run

    from mechdiff.compare import compare_runs
    a = fake_run(tmp_path / "a", "planted-cultural")
    b = fake_run(tmp_path / "b", "planted-cognitive", entry=4, churn=0.3)
    out = compare_runs([a.path, b.path], out=tmp_path / "cmp")
    check_page(render(out / "compare.html"), min_images=4)


@pytest.mark.real
def test_real_rq1_report_in_chromium(planted_rq1):
    from mechdiff.report import write_report
    html, _ = write_report(planted_rq1[0])
    r = render(html)
    check_page(r, min_images=3)                     # Figure A + the stage's CKA and patch figures
    assert "planted-cultural" in r["h1"]
