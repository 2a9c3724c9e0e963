"""The playground page in a real browser (Debian's chromium through chromedriver and selenium):
type a prompt, press Run, read the streamed answer and its highlighted blanks from the page."""

import shutil
import tempfile
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from glm130b.generate.api import generate
from glm130b.generate.strategies import Greedy

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PAGE_TIMEOUT_S = 60  # chromium's first start on a busy machine takes several seconds

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, "
    "/usr/bin/chromedriver): apt-get install -y chromium chromium-driver, "
    "as `make install` does",
)


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="glm130b-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def run_prompt(browser, url, prompt, max_tokens):
    browser.get(url + "/")
    wait = WebDriverWait(browser, PAGE_TIMEOUT_S)
    wait.until(lambda d: d.find_element(By.ID, "model-name").text)  # the page has read /v1/models
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    tokens = browser.find_element(By.ID, "max_tokens")
    tokens.clear()
    tokens.send_keys(str(max_tokens))
    browser.find_element(By.ID, "run").click()
    wait.until(
        lambda d: (
            d.find_element(By.ID, "status").text in ("done", "stopped")
            or d.find_element(By.ID, "status").text.startswith("error")
        )
    )
    assert browser.find_element(By.ID, "status").text == "done"
    output = browser.find_element(By.ID, "output").text
    marks = [m.text for m in browser.find_elements(By.CSS_SELECTOR, "#output mark.blank")]
    return output, marks


@pytest.mark.parametrize("prompt", ["a[MASK]d[MASK]h", "abc"], ids=["two-blanks", "continue"])
def test_the_page_streams_the_answer_with_its_blanks_highlighted(browser, server, reference, prompt):
    model, tokenizer = reference
    expected = generate(model, tokenizer, prompt, Greedy(), 8)[0]
    output, marks = run_prompt(browser, server.url, prompt, 8)
    assert output == expected.text
    assert marks == expected.blanks
