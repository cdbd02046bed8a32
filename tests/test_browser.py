"""The web chat in headless Chromium (Debian's `chromium`, driven by Playwright): type a question,
see the route, the answer and its retrieved passages; a server exposed without a token shows a
warning banner; a bearer token is used but never stored."""

import shutil
from pathlib import Path

import pytest

from ragtune.bundle import Bundle
from ragtune.serve import ServeConfig, create_app, serve_in_thread
from tests.bundle_fixtures import MATHS_QUESTION, READING_QUESTION, build_small_bundle
from tests.test_serve_http import FakeBundle

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def server(mirror, base_generator, tmp_path_factory):
    bundle = Bundle.load(build_small_bundle(mirror, base_generator, tmp_path_factory.mktemp("browser")))
    with serve_in_thread(create_app(bundle, ServeConfig(token_env=None))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-extensions", "--no-first-run"],
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(server, browser):
    page = browser.new_page()
    page.set_default_timeout(120_000)
    page.goto(server)
    yield page
    page.close()


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


def test_an_exposed_server_without_token_shows_a_warning_banner(browser, monkeypatch):
    monkeypatch.delenv("RAGTUNE_BROWSER_TOKEN", raising=False)
    exposed = ServeConfig(host="0.0.0.0", token_env="RAGTUNE_BROWSER_TOKEN")  # bound to loopback all the same
    with serve_in_thread(create_app(FakeBundle(), exposed)) as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#warning", state="visible", timeout=30_000)
        assert "without a bearer token" in page.inner_text("#warning")
        page.close()
    with serve_in_thread(create_app(FakeBundle(), ServeConfig(token_env=None))) as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_load_state("networkidle")
        assert not page.is_visible("#warning")
        page.close()


def test_the_token_is_used_but_never_stored(browser, monkeypatch):
    monkeypatch.setenv("RAGTUNE_BROWSER_TOKEN", "s3cret")
    with serve_in_thread(create_app(FakeBundle(), ServeConfig(token_env="RAGTUNE_BROWSER_TOKEN"))) as url:
        page = browser.new_page()
        page.set_default_timeout(30_000)
        page.goto(url)
        page.fill("#token", "wrong")
        assert "Error" in ask(page, "hello").locator(".error").inner_text()
        page.fill("#token", "s3cret")
        turn = ask(page, "hello again")
        assert turn.locator(".error").count() == 0 and "w0" in turn.locator(".answer").inner_text()
        assert page.evaluate("() => [localStorage.length, sessionStorage.length]") == [0, 0]
        page.reload()
        assert page.input_value("#token") == ""
        page.close()
