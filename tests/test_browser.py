"""The web chat in headless Chromium (Debian's `chromium`, driven by Playwright): type a question,
see the route, the answer and its retrieved passages."""

import shutil
from pathlib import Path

import pytest

from ragtune.bundle import Bundle
from ragtune.serve import ServeConfig, create_app, serve_in_thread
from tests.bundle_fixtures import MATHS_QUESTION, READING_QUESTION, build_small_bundle

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def server(mirror, base_generator, tmp_path_factory):
    bundle = Bundle.load(build_small_bundle(mirror, base_generator, tmp_path_factory.mktemp("browser")))
    with serve_in_thread(create_app(bundle, ServeConfig(token_env=None))) as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-extensions", "--no-first-run"],
        )
        page = browser.new_page()
        page.set_default_timeout(120_000)
        page.goto(server)
        yield page
        browser.close()


def ask(page, question):
    before = page.locator(".turn").count()
    page.fill("#question", question)
    page.click("#send")
    # The newest turn is prepended; wait until it is the new one and finished.
    page.wait_for_function(
        "n => document.querySelectorAll('.turn').length === n && document.querySelector('.turn').dataset.done === '1'",
        arg=before + 1,
    )
    return page.locator(".turn").first


def test_reading_question_shows_route_answer_and_sources(page):
    turn = ask(page, READING_QUESTION)
    assert turn.locator(".error").count() == 0
    assert turn.locator(".route").get_attribute("data-route") == "reading"
    assert turn.locator(".answer").inner_text().strip()
    sources = turn.locator(".sources li")
    assert sources.count() == 3 and "DEV_0-" in sources.first.inner_text()


def test_maths_question_shows_maths_route(page):
    turn = ask(page, MATHS_QUESTION)
    assert turn.locator(".route").get_attribute("data-route") == "maths"
    assert turn.locator(".answer").inner_text().strip()
    assert turn.locator(".sources li").count() == 0
