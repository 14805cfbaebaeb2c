"""What the browser tests share: the hub of the session's embedded facility, headless Debian
chromium driven by Playwright, and the steps a user takes (sign in, start a server, run a
notebook).

Browser test modules import the fixtures from here; the hub, once up, serves them all.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from facility.config import FacilityConfig
from facility.embedded import facility as embedded

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def hub(facility_config: FacilityConfig) -> str:
    """The hub's services, beside the data servers and cluster the session already runs."""
    embedded.up(facility_config, report=lambda _: None, hub=True)
    return f"http://{facility_config.hub.host}:{facility_config.hub.port}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def login(browser: Browser, hub: str, user: str, password: str) -> Page:
    """A new browser context (no cookies) signed in as ``user``."""
    page = browser.new_context().new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{hub}/hub/login")
    sign_in(page, user, password)
    return page


def sign_in(page: Page, user: str, password: str) -> None:
    """From the hub's login page through the provider's form, which must ask who signs in."""
    page.click("text=Sign in with")
    page.wait_for_selector("text=Sign in to the VO")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_load_state()


def start_server(page: Page, profile: str) -> None:
    page.wait_for_url("**/hub/spawn")
    page.check(f"input[value={profile}]")
    page.click("text=Start")


def run_all(page: Page, notebook_url: str) -> None:
    """Open a notebook in JupyterLab and run all its cells."""
    page.goto(notebook_url)
    page.wait_for_selector(".jp-Notebook")
    page.locator(".jp-StatusBar-TextItem", has_text="Idle").first.wait_for()
    page.click("div.lm-MenuBar-itemLabel:text-is('Run')")
    page.locator("li[data-command='runmenu:run-all']").click()
