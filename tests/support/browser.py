"""The demo in a real browser: fixtures and steps shared by the browser tests.

Debian's Chromium (``/usr/bin/chromium``; never a downloaded one) driven by
Playwright, with a virtual WebAuthn authenticator (Chrome DevTools Protocol) in
place of a USB security key. The provider, Demo Bank, the risk service and the
gateway all run in the test's process on loopback and share one clock that the
tests move by hand: a step-up "older than five minutes" takes no waiting.

Every step is saved as a screenshot under ``tests/artifacts/browser/<test>/``. With
``SCREENSHOTS_TO_DOCS=1`` the key ones are also copied to ``docs/screenshots/``.

A test module gets the fixtures (``demo``, ``chromium``, ``tab``, ``shots``) with::

    pytest_plugins = ["tests.support.browser"]
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP
from playwright.async_api import (
    Browser,
    Page,
    Request,
    ViewportSize,
    async_playwright,
    expect,
)

from stepup_demo import DemoStack
from stepup_demo.bank import Customer
from tests.conftest import Clock
from tests.support.serving import serving_demo

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # tests run as root in containers, where the sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT: ViewportSize = {"width": 1000, "height": 700}
ROOT = Path(__file__).resolve().parent.parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts" / "browser"
DOCS_SCREENSHOTS = ROOT / "docs" / "screenshots"
STEP_TIMEOUT_MS = 10_000  # one page or ceremony; a hang fails in seconds, not minutes
# A USB security key: roaming ("cross-platform") and device-bound (not backup
# eligible), so the provider reports amr "hwk" (stepup_demo.factors.passkey_amr).
SECURITY_KEY = {
    "protocol": "ctap2",
    "transport": "usb",
    "hasResidentKey": True,
    "hasUserVerification": True,
    "isUserVerified": True,
    "defaultBackupEligibility": False,
    "defaultBackupState": False,
}


def demo_users() -> dict[str, dict[str, str]]:
    """The shipped users.yaml: names, passwords and TOTP secrets are public by design."""
    text = resources.files("stepup_demo").joinpath("users.yaml").read_text(encoding="utf-8")
    users: dict[str, dict[str, str]] = yaml.safe_load(text)["users"]
    return users


def totp_now(secret: str, now: float) -> str:
    """RFC 6238 with the authenticator-app defaults: SHA-1, 6 digits, 30 s steps."""
    key = base64.b32decode(secret)
    return TOTP(key, 6, SHA1(), 30, enforce_key_length=False).generate(int(now)).decode()


# --- fixtures ----------------------------------------------------------------------------


@dataclass
class Demo:
    """The running demo: provider, bank, risk service and gateway, on one movable clock."""

    stack: DemoStack
    clock: Clock

    @property
    def url(self) -> str:
        return self.stack.gateway_url

    @property
    def idp_url(self) -> str:
        return self.stack.idp_url

    def customer(self, username: str) -> Customer:
        """Demo Bank's own record of a customer (what its pages show)."""
        return self.stack.bank.customers[username]


@pytest.fixture
async def demo() -> AsyncIterator[Demo]:
    # Now, not a fixed date: the browser expires cookies by its own (real) clock.
    clock = Clock(time.time())
    async with serving_demo(clock) as (stack, _):
        yield Demo(stack, clock)


@pytest.fixture
async def chromium() -> AsyncIterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install"
            " chromium, as scripts/test does). These tests never download a browser.",
            pytrace=False,
        )
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class Tab:
    """One browser page with a security key plugged in, and what it navigated to."""

    page: Page
    cdp: Any
    authenticator_id: str
    navigations: list[str] = field(default_factory=list)

    def visits(self, url_prefix: str) -> int:
        return sum(1 for url in self.navigations if url.startswith(url_prefix))

    async def credentials(self) -> list[dict[str, Any]]:
        reply = await self.cdp.send(
            "WebAuthn.getCredentials", {"authenticatorId": self.authenticator_id}
        )
        credentials: list[dict[str, Any]] = reply["credentials"]
        return credentials


@pytest.fixture
async def tab(chromium: Browser) -> AsyncIterator[Tab]:
    context = await chromium.new_context(viewport=VIEWPORT)
    context.set_default_timeout(STEP_TIMEOUT_MS)
    page = await context.new_page()
    cdp = await context.new_cdp_session(page)
    await cdp.send("WebAuthn.enable")
    added = await cdp.send("WebAuthn.addVirtualAuthenticator", {"options": SECURITY_KEY})
    tab = Tab(page, cdp, added["authenticatorId"])

    def record(request: Request) -> None:
        # Redirect hops included: each is a request of its own.
        if request.is_navigation_request() and request.frame == page.main_frame:
            tab.navigations.append(request.url)

    page.on("request", record)
    try:
        yield tab
    finally:
        await context.close()


_copied_to_docs: set[str] = set()  # the first test to show a page supplies its picture


@dataclass
class Screenshots:
    directory: Path
    to_docs: bool
    count: int = 0

    async def take(self, page: Page, step: str, *, docs_name: str | None = None) -> Path:
        self.count += 1
        path = self.directory / f"{self.count:02d}-{step}.png"
        await page.screenshot(path=str(path))
        if docs_name is not None and self.to_docs and docs_name not in _copied_to_docs:
            _copied_to_docs.add(docs_name)
            DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, DOCS_SCREENSHOTS / f"{docs_name}.png")
        return path


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Iterator[Screenshots]:
    directory = ARTIFACTS / request.node.name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    yield Screenshots(directory, to_docs=os.environ.get("SCREENSHOTS_TO_DOCS") == "1")


# --- steps ----------------------------------------------------------------------------------


async def heading(page: Page, text: str) -> None:
    await expect(page.get_by_role("heading", level=1)).to_have_text(text)


async def sign_in_with_password(page: Page, demo: Demo, username: str) -> None:
    await expect(page).to_have_url(re.compile(re.escape(demo.idp_url) + "/login/"))
    await heading(page, "Sign in")
    await page.fill("#username", username)
    await page.fill("#password", demo_users()[username]["password"])
    await page.click("#sign-in")


async def auth_header(page: Page, name: str) -> str:
    """A row of Demo Bank's "What the gateway told Demo Bank" table."""
    row = page.locator("#auth-headers tr", has=page.locator("th", has_text=name))
    return (await row.locator("td").inner_text()).strip()


async def open_accounts(tab: Tab, demo: Demo, shots: Screenshots, username: str) -> None:
    """Password sign-in from a fresh browser: the accounts page at level 'password'."""
    page = tab.page
    await page.goto(f"{demo.url}/")
    await expect(page.locator("#reason")).to_have_text(
        "Demo Bank asks you to sign in with your password."
    )
    await shots.take(page, "sign-in", docs_name="sign-in")
    await sign_in_with_password(page, demo, username)
    await expect(page).to_have_url(f"{demo.url}/")
    await heading(page, "Accounts")
    await expect(page.locator("#assertion-status")).to_have_text("assertion verified")
    assert await auth_header(page, "X-Auth-Level") == "password"
    await shots.take(page, "accounts")


async def open_transfer_form(page: Page, demo: Demo) -> None:
    """The transfer form opens with whatever the session holds: a password will do."""
    await page.goto(f"{demo.url}/transfers/new")
    await heading(page, "Transfer money")
    await expect(page.locator("#assertion-status")).to_have_text("assertion verified")


async def fill_transfer(page: Page, payee: str, amount: str) -> None:
    """Fill in the transfer form and send it (the gateway keeps it if it needs a step-up)."""
    await page.select_option("#payee", payee)
    await page.fill("#amount", amount)
    await page.select_option("#currency", "EUR")
    await page.click("#send")


async def approval(page: Page) -> str:
    """What the provider's page asks the user to approve."""
    return (await page.locator("#approval-text").inner_text()).strip()


async def create_and_use_passkey(
    tab: Tab, demo: Demo, shots: Screenshots, *, approve: str | None = None
) -> None:
    """At the provider, for alice's first passkey: a one-time code, a new passkey, then
    the passkey itself. ``approve``: the text every page must show, if any."""
    page = tab.page
    await heading(page, "Enter your one-time code")
    reason = page.locator("#reason")
    await expect(reason).to_contain_text("Demo Bank asks for a passkey to continue")
    await expect(reason).to_contain_text("this action needs phishing-resistant sign-in")
    await expect(reason).to_contain_text("You have no passkey yet")
    if approve is not None:
        assert await approval(page) == approve
    await shots.take(page, "step-up-one-time-code", docs_name="step-up")
    await page.fill("#totp", totp_now(demo_users()["alice"]["totp_secret"], demo.clock()))
    await page.click("#verify")

    await heading(page, "Create a passkey")
    await shots.take(page, "create-passkey", docs_name="create-passkey")
    assert await tab.credentials() == []
    await page.click("#passkey-button")
    # Created, and straight away used: the sign-in needs an assertion, not a registration.
    await heading(page, "Use your passkey")
    (credential,) = await tab.credentials()
    assert credential["isResidentCredential"] is True
    if approve is not None:
        assert await approval(page) == approve
        await shots.take(page, "approve-with-passkey", docs_name="approve-transfer")
    else:
        await shots.take(page, "use-new-passkey")
    await page.click("#passkey-button")


async def approve_first_transfer(tab: Tab, demo: Demo, shots: Screenshots, *, approve: str) -> None:
    """Sent the transfer form with a password session: the provider asks alice for a
    passkey and nothing else (not her password again, though a once rule asks for a new
    sign-in); she has none yet, so a one-time code lets her create one first."""
    page = tab.page
    await expect(page.locator("#password")).to_have_count(0)
    await create_and_use_passkey(tab, demo, shots, approve=approve)


async def transfer_sent(page: Page, demo: Demo, text: str) -> None:
    """Demo Bank's answer to the kept transfer, shown at the gateway's resume URL."""
    await expect(page).to_have_url(re.compile(re.escape(f"{demo.url}/_gateway/resume?r=")))
    await heading(page, "Transfer sent")
    await expect(page.get_by_role("status")).to_have_text(text)
    await expect(page.locator("#assertion-status")).to_have_text("assertion verified")


async def ledger_rows(page: Page, demo: Demo) -> int:
    """Open Demo Bank's ledger and count its transfers."""
    await page.goto(f"{demo.url}/transfers")
    await heading(page, "Ledger")
    return await page.locator("#ledger tr.transfer").count()
