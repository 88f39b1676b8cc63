"""The demo, end to end, in a real browser: sign-in, step-up to a passkey, freshness,
a user who cannot step up, sign-out.

The fixtures and steps (Chromium, the virtual security key, the shared clock,
screenshots) are in :mod:`tests.support.browser`; protecting single actions (kept
form posts, one-time and bound approvals, the bank's own challenge) is in
``tests/test_browser_actions.py``.
"""

from __future__ import annotations

import re

import pytest
from playwright.async_api import Page, expect

# Before the import: the shared steps' asserts then explain themselves when they fail.
pytest.register_assert_rewrite("tests.support.browser")
from tests.support.browser import (  # noqa: E402
    Demo,
    Screenshots,
    Tab,
    approve_first_transfer,
    auth_header,
    create_and_use_passkey,
    fill_transfer,
    heading,
    open_accounts,
    open_transfer_form,
    transfer_sent,
)

pytest_plugins = ["tests.support.browser"]  # the fixtures: demo, chromium, tab, shots

MAX_AGE_S = 5 * 60  # Demo Bank's own rule for large moves to savings


async def test_alice_steps_up_to_a_security_key_and_sends_money(
    demo: Demo, tab: Tab, shots: Screenshots
) -> None:
    await open_accounts(tab, demo, shots, "alice")
    page = tab.page
    await page.get_by_role("link", name="Transfer money").first.click()
    await heading(page, "Transfer money")
    assert await auth_header(page, "X-Auth-Level") == "password"  # the form opens as it is
    await shots.take(page, "transfer-form")

    await fill_transfer(page, "ACME Ltd", "250.00")
    # The post waits at the gateway; the provider, where alice is signed in with her
    # password, asks for a passkey only: no password again. She has none yet, so a
    # one-time code first lets her create one.
    await heading(page, "Enter your one-time code")
    reason = page.locator("#reason")
    await expect(reason).to_contain_text("Demo Bank asks for a passkey to continue")
    await expect(reason).not_to_contain_text("sign in with your password")
    await expect(reason).to_contain_text("a new sign-in even if you are signed in")
    await approve_first_transfer(
        tab, demo, shots, approve="Approve transfer of 250.00 EUR to ACME Ltd"
    )
    await transfer_sent(page, demo, "Sent EUR 250.00 to ACME Ltd.")
    await expect(page.locator("#authorised-by")).to_have_text(
        "The gateway asserted acr=phr amr=hwk (level phishing-resistant)."
    )
    assert await auth_header(page, "X-Auth-Acr") == "phr"
    assert await auth_header(page, "X-Auth-Amr") == "hwk"
    await shots.take(page, "transfer-sent", docs_name="transfer-sent")
    # One round trip to the provider per sign-in: the first, and the step-up.
    assert tab.visits(f"{demo.idp_url}/authorize") == 2


async def test_a_user_without_a_strong_factor_gets_a_page_not_a_loop(
    demo: Demo, tab: Tab, shots: Screenshots
) -> None:
    await open_accounts(tab, demo, shots, "bob")
    page = tab.page
    # One trip to the provider and straight back to a page that says why, each time:
    # bob's provider session answers at once, and no hop leads anywhere else.
    one_attempt = [
        f"{demo.url}/transfers",
        f"{demo.idp_url}/authorize",
        f"{demo.url}/_gateway/callback",
    ]
    for attempt in ("first", "again"):
        await open_transfer_form(page, demo)
        before = len(tab.navigations)
        await fill_transfer(page, "ACME Ltd", "10.00")
        await expect(page).to_have_url(re.compile(re.escape(f"{demo.url}/_gateway/callback?")))
        await expect(page.locator("main")).to_contain_text(
            "no sign-in method strong enough for this action"
        )
        # A redirect loop would keep the network busy; this settles on the page.
        await page.wait_for_load_state("networkidle")
        hops = [url.partition("?")[0] for url in tab.navigations[before:]]
        assert hops == one_attempt, hops
        if attempt == "first":
            await shots.take(page, "stronger-factor-needed", docs_name="stronger-factor-needed")
    # Still signed in as before, at the password level; nothing was sent.
    await page.goto(f"{demo.url}/")
    await heading(page, "Accounts")
    assert await auth_header(page, "X-Auth-Level") == "password"
    assert demo.customer("bob").ledger == []


async def move_to_savings(page: Page, demo: Demo, amount: str) -> None:
    await page.goto(f"{demo.url}/savings")
    await heading(page, "Savings")
    await page.fill("#amount", amount)
    await page.click("#move")


async def moved(page: Page, text: str) -> None:
    await heading(page, "Moved to savings")
    await expect(page.get_by_role("status")).to_have_text(text)


async def test_a_step_up_older_than_five_minutes_is_asked_for_again(
    demo: Demo, tab: Tab, shots: Screenshots
) -> None:
    await open_accounts(tab, demo, shots, "alice")
    page = tab.page
    authorize = f"{demo.idp_url}/authorize"
    await move_to_savings(page, demo, "1200.00")  # Demo Bank asks for a passkey itself
    await create_and_use_passkey(tab, demo, shots)
    await moved(page, "Moved EUR 1,200.00 to savings.")
    first_auth_time = int(await auth_header(page, "X-Auth-Time"))
    asked = tab.visits(authorize)

    demo.clock.advance(MAX_AGE_S - 60)  # still fresh: the next large move goes through
    await move_to_savings(page, demo, "1100.00")
    await moved(page, "Moved EUR 1,100.00 to savings.")
    assert tab.visits(authorize) == asked
    await shots.take(page, "moved-4-minutes-later")

    demo.clock.advance(2 * 60)  # six minutes since the passkey: too old for Demo Bank
    await move_to_savings(page, demo, "1050.00")
    await heading(page, "Use your passkey")  # no one-time code, no new passkey
    await expect(page.locator("#reason")).to_contain_text("from the last 5 minutes only")
    await shots.take(page, "passkey-again-6-minutes-later", docs_name="passkey-again")
    await page.click("#passkey-button")
    await moved(page, "Moved EUR 1,050.00 to savings.")
    assert int(await auth_header(page, "X-Auth-Time")) >= first_auth_time + MAX_AGE_S
    assert tab.visits(authorize) == asked + 1
    assert len(await tab.credentials()) == 1
    assert len(demo.customer("alice").savings_moves) == 3
    await shots.take(page, "moved-again")


async def test_logout_ends_the_gateway_and_the_provider_session(
    demo: Demo, tab: Tab, shots: Screenshots
) -> None:
    await open_accounts(tab, demo, shots, "alice")
    page = tab.page
    assert len(demo.stack.idp.sessions) == 1

    await page.get_by_role("link", name="Sign out").click()
    await expect(page).to_have_url(f"{demo.url}/_gateway/logout")
    await shots.take(page, "sign-out-confirm")
    await page.get_by_role("button", name="Sign out").click()
    await expect(page).to_have_url(f"{demo.url}/_gateway/logged-out")
    await heading(page, "Signed out")
    assert tab.visits(f"{demo.idp_url}/end-session") == 1
    assert demo.stack.idp.sessions == {}
    await shots.take(page, "signed-out")

    # Neither session is left: the password is asked for again, no silent sign-on.
    await page.goto(f"{demo.url}/")
    await expect(page).to_have_url(re.compile(re.escape(demo.idp_url) + "/login/"))
    await heading(page, "Sign in")
    await expect(page.locator("#password")).to_be_empty()
    await shots.take(page, "signed-out-sign-in-again")
