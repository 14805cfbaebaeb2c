"""Signing in and out in a real browser: logout ends the provider's session too, so another
account can sign in; a user outside the VO groups reads why once, whom to ask, and can sign
out; the profile page says what each environment is for and which this machine cannot serve,
before anything starts.

Headless Debian chromium driven by Playwright against the embedded facility's real provider,
proxy and hub. No user server is started here.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
from playwright.sync_api import Browser, Page

from facility.config import FacilityConfig
from facility.hub.profiles import unavailable_reason
from facility.hub.spawner import this_machine
from tests.browser import login, sign_in

pytestmark = pytest.mark.integration


def signed_in_as(page: Page) -> str:
    """The user the hub's page names in its top bar."""
    return page.locator("#login_widget .me-1").inner_text().strip()


def sign_out_at_the_provider(page: Page) -> None:
    """The provider asks before it ends its session; the user confirms, and comes back to the
    hub's login page."""
    page.wait_for_selector("text=Sign out of the VO")
    page.click("button[name=logout][value=yes]")
    page.wait_for_url("**/hub/login**")


def landed_as(page: Page, hub: str, user: str) -> str:
    """Who the hub says is signed in, once the sign-in has landed: on the profile page, or on
    the user's server when an earlier test left it running."""
    page.wait_for_url(re.compile(rf"/hub/spawn|/user/{user}/"))
    page.goto(f"{hub}/hub/home")
    return signed_in_as(page)


def test_after_logout_another_account_signs_in(hub: str, browser: Browser) -> None:
    page = login(browser, hub, "alice", "alice-dev")
    page.wait_for_url("**/hub/spawn**")
    assert signed_in_as(page) == "alice"
    page.click("#logout")
    assert "signed in to the VO as alice" in page.locator("body").inner_text()
    asked = parse_qs(urlsplit(page.url).query)  # the provider's end-session request
    hint = jwt.decode(asked["id_token_hint"][0], options={"verify_signature": False})
    assert (hint["sub"], hint["aud"]) == ("alice", asked["client_id"][0])
    assert asked["post_logout_redirect_uri"] == [f"{hub}/hub/login"]
    sign_out_at_the_provider(page)
    sign_in(page, "bob", "bob-dev")  # the provider asks who signs in, instead of alice again
    assert landed_as(page, hub, "bob") == "bob"


def test_a_user_outside_the_vo_reads_why_once_whom_to_ask_and_signs_out(
        hub: str, browser: Browser) -> None:
    page = login(browser, hub, "eve", "eve-dev")
    text = page.locator("body").inner_text()
    reason = ("eve may not use this facility: membership in one of the VO groups cms is "
              "required; your identity provider reports the groups: other-vo.")
    assert text.count(reason) == 1
    assert "403 : Access refused" in text
    contact = page.locator("a.facility-support")
    assert contact.inner_text() == "facility-support@vo.invalid"
    assert contact.get_attribute("href") == "mailto:facility-support@vo.invalid"
    page.click("a.facility-sign-out")
    sign_out_at_the_provider(page)
    sign_in(page, "bob", "bob-dev")
    assert landed_as(page, hub, "bob") == "bob"


def test_profiles_the_machine_cannot_serve_are_disabled_with_the_reason_and_refused_if_forced(
        hub: str, browser: Browser, facility_config: FacilityConfig) -> None:
    """The test configuration asks one core more than this machine has (CPU, large) and one
    GPU more (GPU)."""
    profiles = {p.slug: p for p in facility_config.hub.profiles}
    reasons = {slug: unavailable_reason(p, this_machine()) for slug, p in profiles.items()}
    assert reasons["cpu-small"] is None
    page = login(browser, hub, "alice", "alice-dev")  # in cms/gpu: GPU is shown to her
    page.wait_for_url("**/hub/spawn**")
    form = page.locator("#spawn_form")
    for slug, profile in profiles.items():
        choice = page.locator(f".facility-profile:has(input[value={slug}])")
        assert profile.description in choice.inner_text()
        assert page.locator(f"input[value={slug}]").is_disabled() == (reasons[slug] is not None)
        if reasons[slug]:
            assert choice.locator(".facility-profile-unavailable").inner_text() == reasons[slug]
    assert page.locator("input[value=cpu-small]").is_checked()

    for slug in ("gpu", "cpu-large"):
        page.evaluate("slug => { const choice = document.querySelector(`input[value=${slug}]`);"
                      " choice.disabled = false; choice.checked = true; }", slug)
        with page.expect_response(lambda r: r.request.method == "POST") as posted:
            form.locator("[type=submit]").click()
        assert posted.value.status == 400
        page.wait_for_load_state()
        assert page.locator(".spawn-error-msg").inner_text() == f"Error: {reasons[slug]}"
        assert page.locator(f"input[value={slug}]").is_disabled()
    page.goto(f"{hub}/hub/home")
    assert " ".join(page.locator("#start").inner_text().split()) == "Start My Server"
    assert page.locator("#stop").count() == 0  # nothing started
