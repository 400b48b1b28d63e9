"""The evaluation report opens in a real browser: headless Chromium renders a report from a real
`prefalign eval` run and every plot decodes and every table is laid out.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make test`` installs them when it can);
skips with that hint otherwise.
"""

import json
import os
import shutil

import pytest

from conftest import pair_rows, write_jsonl
from prefalign.evaluate.runner import load_eval_config, run_eval

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)"),
]


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for a driver online
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,2000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def report(tmp_path, tiny_model):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": f"How do I do bad thing {i}?"} for i in range(4)])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    contrast = write_jsonl(tmp_path / "contrast.jsonl", [
        {**row, "reward_chosen": float(i % 3), "reward_rejected": 1.0, "meta": {"strategy": ["prefix", "demon"][i % 2]}}
        for i, row in enumerate(pair_rows(6))
    ])
    log = write_jsonl(tmp_path / "train_log.jsonl", [
        {"step": s, "loss": 0.69 - 0.02 * s, "rewards/margin": 0.05 * s, "rewards/accuracy": 0.5 + 0.05 * s} for s in range(1, 6)
    ])
    config = load_eval_config(None, {
        "title": "base vs trained <check escaping>",
        "output_dir": str(tmp_path / "eval"),
        "models": {"base": tiny_model, "trained": tiny_model},
        "prompt_sets": [{"name": "harmful", "source": "file", "path": str(prompts), "kind": "harmful", "split": None, "limit": 4}],
        "sampling": {"max_new_tokens": 6, "batch_size": 4},
        "pairs": str(pairs),
        "contrast_pairs": str(contrast),
        "toxicity_scorer": None,
        "sentiment_scorer": "length",
        "training_logs": {"trained": str(log)},
    })
    _, paths = run_eval(config, show_progress=False)
    return paths["html"]


def test_report_renders_every_plot_and_table_in_chromium(browser, report):
    source = report.read_text()
    browser.get(report.as_uri())
    assert browser.title == "base vs trained <check escaping>"
    headings = [h.text for h in browser.find_elements("tag name", "h2")]
    for section in ("Metrics", "Difference to base", "Metrics per model (95% intervals)", "Training curves", "Reward vs KL",
                    "Contrast agreement", "Example responses"):
        assert section in headings
    images = browser.execute_script(
        "return Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, "
        "natural: i.naturalWidth, shown: i.getBoundingClientRect().width}))")
    # Every plot in the page decoded as an image and takes up space on screen.
    assert len(images) == source.count("<img") == 4
    for image in images:
        assert image["complete"] and image["natural"] > 100 and image["shown"] > 100, image
    tables = browser.execute_script(
        "return Array.from(document.querySelectorAll('table')).map(t => ({rows: t.rows.length, "
        "height: t.getBoundingClientRect().height, first: t.rows[0].cells[0].innerText}))")
    assert len(tables) == source.count("<table") == 4  # metrics, difference to base, contrast agreement, examples
    for table in tables:
        assert table["rows"] >= 2 and table["height"] > 20, table
    assert [t["first"] for t in tables] == ["metric", "metric", "contrast", "prompt"]
    agreement = browser.execute_script(
        "return Array.from(document.querySelectorAll('table')[2].rows).slice(1).map(r => r.cells[0].innerText)")
    assert agreement == ["prefix", "demon", "all"]
    assert json.loads((report.parent / "metrics.json").read_text())["contrast_agreement"][0]["group"] == "prefix"
