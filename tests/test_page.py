"""The workstation web page in headless Chromium, driven by Playwright: a question asked with a thinking
budget set on the slider, the thinking streamed apart and collapsed after, the answer, tokens/s and
memory shown. Skipped where Chromium is not installed (Debian's package: /usr/bin/chromium).
`NANO_SCREENSHOT=path` keeps the screenshot (the one in demos/workstation/ was taken so)."""

from __future__ import annotations

import os
import re
import shutil

import pytest

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no Chromium (apt install chromium)")

from serving import running  # noqa: E402

import nano  # noqa: E402
from demos.workstation.server import create_app  # noqa: E402

# As a closed network needs: no background connections, no sandbox as root, a fresh profile.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_the_page_asks_with_a_budget_and_shows_thinking_answer_speed_and_memory(tmp_path):
    model = nano.load("nano-tiny", device="cpu")
    with running(create_app(model, "nano-tiny", default_max_tokens=512)) as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(url)
        playwright.expect(page.locator("#model")).to_have_text("nano-tiny")
        page.locator("#budget").evaluate("(el) => { el.value = 16; el.dispatchEvent(new Event('input')); }")
        playwright.expect(page.locator("#budget-value")).to_have_text("16 tokens")
        page.fill("#prompt", "What is 345 - 67?")
        page.click("#send")
        answer = page.locator(".assistant .answer").last
        playwright.expect(answer).to_contain_text("boxed", timeout=60_000)
        playwright.expect(page.locator("#send")).to_be_enabled(timeout=60_000)
        summary = page.locator(".assistant details.thinking summary").last.inner_text()
        thought = int(re.fullmatch(r"thought for (\d+) tokens", summary).group(1))
        local = nano.generate(model, "What is 345 - 67?", budget=16, max_new_tokens=512)
        assert thought == local.reasoning_tokens and 16 <= thought <= 16 + 2  # cut by the budget, grace 2
        assert answer.inner_text().strip() == local.answer.strip()
        assert page.locator(".assistant details.thinking").last.get_attribute("open") is None  # collapsed after
        assert re.fullmatch(r"\d+\.\d tokens/s", page.locator("#speed").inner_text())
        playwright.expect(page.locator("#memory")).to_contain_text("MiB resident")
        page.click(".assistant details.thinking summary")  # open it again, for the picture
        page.screenshot(path=os.environ.get("NANO_SCREENSHOT") or str(tmp_path / "page.png"), full_page=True)
        browser.close()
