"""Protecting single actions, in a real browser: the demo's transfers and savings.

A transfer form posted with a password session waits at the gateway while the
provider asks alice to approve exactly that transfer with her passkey, then lands
once; reloading or going back sends nothing again. The approval is good for one
transfer (``once``) and for its values only (``bind``). Demo Bank's own RFC 9470
challenge on a large move to savings makes the gateway run the step-up and send
the form again.

Fixtures and steps: :mod:`tests.support.browser`.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.async_api import Page, expect
from structlog.testing import capture_logs

# Before the import: the shared steps' asserts then explain themselves when they fail.
pytest.register_assert_rewrite("tests.support.browser")
from tests.support.browser import (  # noqa: E402
    Demo,
    Screenshots,
    Tab,
    approval,
    approve_first_transfer,
    auth_header,
    create_and_use_passkey,
    fill_transfer,
    heading,
    ledger_rows,
    open_accounts,
    open_transfer_form,
    transfer_sent,
)

pytest_plugins = ["tests.support.browser"]  # the fixtures: demo, chromium, tab, shots

ACME = "Approve transfer of 250.00 EUR to ACME Ltd"


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


async def first_transfer(tab: Tab, demo: Demo, shots: Screenshots) -> None:
    """alice, signed in with a password, sends 250.00 EUR to ACME Ltd and approves it."""
    await open_accounts(tab, demo, shots, "alice")
    page = tab.page
    await open_transfer_form(page, demo)
    assert await auth_header(page, "X-Auth-Level") == "password"
    await shots.take(page, "transfer-form")
    await fill_transfer(page, "ACME Ltd", "250.00")
    # The post waits at the gateway: the provider shows what it is asked to approve, and
    # asks for a passkey (first a one-time code to create one), not for the password.
    await heading(page, "Enter your one-time code")
    assert await approval(page) == ACME
    await approve_first_transfer(tab, demo, shots, approve=ACME)
    await transfer_sent(page, demo, "Sent EUR 250.00 to ACME Ltd.")
    await expect(page.locator("#authorised-by")).to_have_text(
        "The gateway asserted acr=phr amr=hwk (level phishing-resistant)."
    )


async def test_a_kept_transfer_lands_once(demo: Demo, tab: Tab, shots: Screenshots) -> None:
    page = tab.page
    await first_transfer(tab, demo, shots)
    resume_url = page.url
    await shots.take(page, "transfer-sent-after-approval")
    assert [t.amount for t in demo.customer("alice").ledger] == [250]

    # Reload the answer: the gateway sent the kept post once and will not again.
    await page.reload()
    await heading(page, "Already used")
    await expect(page.locator("main")).to_contain_text("It was not sent again")
    await shots.take(page, "reload-already-sent", docs_name="already-sent")
    # Back, to the provider's finished sign-in: nothing is sent either.
    await page.go_back()
    await page.wait_for_load_state("networkidle")
    await shots.take(page, "back")
    assert page.url != resume_url

    assert await ledger_rows(page, demo) == 1
    await expect(page.locator("#ledger")).to_contain_text("ACME Ltd")
    await shots.take(page, "ledger-one-transfer", docs_name="ledger-one-transfer")
    assert len(demo.customer("alice").ledger) == 1


async def test_a_once_rule_asks_again_for_the_next_transfer(
    demo: Demo, tab: Tab, shots: Screenshots
) -> None:
    page = tab.page
    await first_transfer(tab, demo, shots)
    demo.clock.advance(20)  # well within the rule's five minutes

    # The very same transfer again: approved a moment ago, but that approval is used up.
    await open_transfer_form(page, demo)
    with capture_logs() as logs:
        await fill_transfer(page, "ACME Ltd", "250.00")
        await heading(page, "Use your passkey")  # the passkey only: no password, no code
    assert [e["reason"] for e in events(logs, "step_up_needed")] == ["proof_used"]
    assert await approval(page) == ACME
    await shots.take(page, "approve-again")
    await page.click("#passkey-button")
    await transfer_sent(page, demo, "Sent EUR 250.00 to ACME Ltd.")
    assert await ledger_rows(page, demo) == 2
    await shots.take(page, "ledger-two-transfers")


async def add_payee_option(page: Page, name: str) -> None:
    """What a tampered page (or a script with the session) could post: any payee."""
    await page.locator("#payee").evaluate(
        "(select, name) => select.add(new Option(name, name))", name
    )


async def test_a_bound_approval_does_not_pay_someone_else(
    demo: Demo, tab: Tab, shots: Screenshots
) -> None:
    page = tab.page
    await first_transfer(tab, demo, shots)
    demo.clock.advance(20)

    # 9,000.00 EUR to Mallory, with the session that just approved 250.00 to ACME Ltd.
    await open_transfer_form(page, demo)
    await add_payee_option(page, "Mallory")
    with capture_logs() as logs:
        await fill_transfer(page, "Mallory", "9000.00")
        await heading(page, "Use your passkey")
    # "unbound": the passkey proof is fresh, but it approved other values.
    assert [e["reason"] for e in events(logs, "step_up_needed")] == ["unbound"]
    assert await approval(page) == "Approve transfer of 9000.00 EUR to Mallory"
    await shots.take(page, "approve-other-payee", docs_name="approve-other-payee")

    # alice does not approve it: nothing is sent, and she is still signed in.
    await page.get_by_role("button", name="Cancel").click()
    await expect(page).to_have_url(re.compile(re.escape(f"{demo.url}/_gateway/callback?")))
    await expect(page.locator("main")).to_contain_text("cancelled or refused")
    await shots.take(page, "not-approved")

    # A script with the same session gets the RFC 9470 challenge, not a transfer.
    form_token = await page.request.get(f"{demo.url}/transfers/new")
    token = re.search(r"name='form_token' value='([^']+)'", await form_token.text())
    assert token
    answer = await page.request.post(
        f"{demo.url}/transfers",
        form={
            "form_token": token.group(1),
            "payee": "Mallory",
            "amount": "9000.00",
            "currency": "EUR",
        },
    )
    assert answer.status == 401
    assert "insufficient_user_authentication" in answer.headers["www-authenticate"]

    assert await ledger_rows(page, demo) == 1
    assert [t.payee for t in demo.customer("alice").ledger] == ["ACME Ltd"]


async def test_the_banks_own_challenge_runs_the_step_up(
    demo: Demo, tab: Tab, shots: Screenshots
) -> None:
    await open_accounts(tab, demo, shots, "alice")
    page = tab.page

    # Small: a password is all the gateway and Demo Bank ask for.
    await page.goto(f"{demo.url}/savings")
    await heading(page, "Savings")
    await shots.take(page, "savings-form")
    await page.fill("#amount", "500.00")
    await page.click("#move")
    await heading(page, "Moved to savings")
    assert await auth_header(page, "X-Auth-Acr") == "urn:stepup:loa:1"
    authorize = f"{demo.idp_url}/authorize"
    assert tab.visits(authorize) == 1  # the first sign-in only

    # Large: Demo Bank answers 401 with an RFC 9470 challenge; the browser never sees
    # it, the provider asks for a passkey, and the form is sent again.
    await page.goto(f"{demo.url}/savings")
    with capture_logs() as logs:
        await page.fill("#amount", "1500.00")
        await page.click("#move")
        await heading(page, "Enter your one-time code")
    assert [e["amount"] for e in events(logs, "bank_step_up_asked")] == ["1500.00"]
    (asked,) = events(logs, "upstream_challenge")
    assert (asked["need"], asked["max_age_s"]) == ("phishing-resistant", 300)
    await expect(page.locator("#reason")).to_contain_text("from the last 5 minutes only")
    await create_and_use_passkey(tab, demo, shots)
    await expect(page).to_have_url(re.compile(re.escape(f"{demo.url}/_gateway/resume?r=")))
    await heading(page, "Moved to savings")
    await expect(page.get_by_role("status")).to_have_text("Moved EUR 1,500.00 to savings.")
    await expect(page.locator("#authorised-by")).to_have_text(
        "The gateway asserted acr=phr amr=hwk."
    )
    await shots.take(page, "moved-after-the-banks-challenge")
    assert tab.visits(authorize) == 2
    assert [m.amount for m in demo.customer("alice").savings_moves] == [500, 1500]
