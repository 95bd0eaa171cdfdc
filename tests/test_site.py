"""The static leaderboard page (bench/analysis/site.py) in a real headless Chromium, loaded from disk: no console
errors, every setting's table rendered, sortable by clicking a header, the drill-down and plots present, and a
screenshot written."""

from __future__ import annotations

import shutil

import pytest

from bench.analysis.leaderboard import write
from bench.analysis.site import write_site
from test_leaderboard import flags, record


@pytest.fixture
def page(tmp_path):
    runs = tmp_path / "runs"
    record(runs / "1", "k1", "single", 0, {"a": flags(0.5), "b": flags(0.7)}, variant="expert=x")
    record(runs / "2", "k2", "linear", 0, {"a": flags(0.4), "b": flags(0.6)})
    record(runs / "3", "k3", "ties", 0, {"a": flags(0.1), "b": flags(0.2)})
    write([runs], tmp_path / "results", plots=True)
    built = tmp_path / "results" / "site" / "index.html"  # the build writes the page beside its tables
    page = write_site(tmp_path / "results", tmp_path / "site")
    assert built.read_bytes() == page.read_bytes()
    return page


def test_the_page_is_self_contained(page):
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # opens offline, from disk or any static host
    assert text.count("data:image/png;base64,") == 2 and "per subtask" in text
    assert "python -m bench method=ties task=t profile=p" in text
    assert "<th data-name=\"subtasks_tied\">tasks tied</th>" in text
    single_on_a = text.split("<td class=text>a</td>")[1].split("</tr>")[0]  # drill-down row of subtask a
    assert "0.500 [" in single_on_a and single_on_a.count("●") >= 1  # the subtask's best is marked


def test_the_page_renders_and_sorts_in_headless_chromium(page, tmp_path):
    driver_path, browser = shutil.which("chromedriver"), shutil.which("chromium")
    if not driver_path or not browser:
        pytest.skip("chromium and chromium-driver are not installed (.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(page.as_uri())
        rows = driver.find_elements(By.CSS_SELECTOR, "section table.sortable tbody tr")
        assert len(rows) >= 3
        methods = lambda: [r.find_elements(By.TAG_NAME, "td")[1].text  # noqa: E731
                           for r in driver.find_elements(By.CSS_SELECTOR, "section > table.sortable tbody tr")]
        assert methods() == ["single", "linear", "ties"]  # by mean, as written
        header = driver.find_element(By.CSS_SELECTOR, 'section > table.sortable th[data-name="mean"]')
        header.click()  # numbers: high to low first
        assert methods() == ["single", "linear", "ties"]
        header.click()  # then reversed
        assert methods() == ["ties", "linear", "single"]
        driver.find_element(By.CSS_SELECTOR, 'section > table.sortable th[data-name="method"]').click()
        assert methods() == ["linear", "single", "ties"]
        driver.get(page.as_uri() + "#sort=-method")
        driver.refresh()
        assert methods() == ["ties", "single", "linear"]
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        shot = tmp_path / "leaderboard.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        driver.quit()
