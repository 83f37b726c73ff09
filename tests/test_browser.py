"""report.html and compare.html in headless Chromium at 1280 px: no console error, no horizontal
scroll, search and sorting work, every image has alt text. Screenshots go to test-artifacts/."""

import shutil
from pathlib import Path

import pytest

from jobs import compare

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


def open_page(browser, path: Path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_selector(".explorer[data-ready='1']")
    return page, errors


def column(page, key: str) -> list[str]:
    index = page.eval_on_selector_all("#tokens thead th", "ths => ths.map(t => t.dataset.key)").index(key)
    return page.eval_on_selector_all(f"#tokens tbody tr td:nth-child({index + 1})", "tds => tds.map(t => t.textContent)")


def check_page(browser, path: Path, sort_key: str, name: str) -> None:
    page, errors = open_page(browser, path)
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280  # no horizontal scroll
    assert page.eval_on_selector_all("img", "imgs => imgs.filter(i => !i.alt).length") == 0
    assert page.eval_on_selector_all("img", "imgs => imgs.length") > 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    page.fill("#tokens input[type=search]", "#37")  # by id
    assert column(page, "token")[0] == "37"
    page.fill("#tokens input[type=search]", "#5")  # by text: #5, #50…#59, #500…
    assert set(column(page, "token_str")) and all(s.startswith("#5") for s in column(page, "token_str"))
    page.fill("#tokens input[type=search]", "")

    header = page.locator(f"#tokens th[data-key='{sort_key}'] button")
    header.click()
    values = [float(v) for v in column(page, sort_key)]
    assert values == sorted(values, reverse=True) and len(values) == 64
    header.click()
    values = [float(v) for v in column(page, sort_key)]
    assert values == sorted(values)
    page.screenshot(path=str(ARTIFACTS / f"{name}-sorted.png"))
    assert errors == []
    page.close()


def test_the_report_in_chromium(browser, toy_runs):
    check_page(browser, Path(toy_runs["seed0"]) / "report.html", "b_power", "report")


def test_the_comparison_in_chromium(browser, toy_runs, tmp_path):
    compare.compare([toy_runs["seed0"], toy_runs["seed1"], toy_runs["random"]], str(tmp_path))
    check_page(browser, tmp_path / "compare.html", "b_diff_1", "compare")
