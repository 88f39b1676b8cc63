"""Demo Bank: the sample upstream app behind the gateway in ``stepup-gateway demo``.

It knows nothing of OpenID Connect. It reads the ``X-Auth-*`` headers the gateway
sets, shows them on every page, and checks ``X-Auth-Assertion`` (the gateway's
signed copy of them) with a few lines of pyjwt
(:func:`stepup_demo.bank_assertion.verify_assertion`). Money moves and payees
change only when that check passes.

Pages: ``/`` accounts, ``/transfers/new`` + ``POST /transfers``, ``/transfers``
ledger, ``/standing-orders`` (+ ``POST``), ``/savings`` (+ ``POST``), ``/payees``
(+ ``POST``), ``/admin``, ``/public/about`` (no sign-in).

Moving money to savings shows an app with a step-up policy of its own: above
1,000 Demo Bank itself asks for a passkey, with the RFC 9470 challenge
(``401``, ``WWW-Authenticate: Bearer error="insufficient_user_authentication",
acr_values="phr", max_age=300``). The gateway, told to (``upstream_challenge``),
runs that step-up for the browser and sends the form again.

Its values (customers, transfers, amounts) are :mod:`stepup_demo.bank_model`, the
page around every answer :mod:`stepup_demo.bank_pages`; this module holds
:class:`DemoBank`: its routes and handlers.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal

import jwt
import structlog
from aiohttp import web
from multidict import MultiDictProxy

from stepup_demo.bank_assertion import verify_assertion
from stepup_demo.bank_model import (
    ASSERTION_HEADER,
    CURRENCIES,
    FREQUENCIES,
    IBAN,
    MAX_TRANSFER,
    SAVINGS_STEP_UP_ABOVE,
    SAVINGS_STEP_UP_ACR,
    SAVINGS_STEP_UP_MAX_AGE_S,
    SHOWN_HEADERS,
    Customer,
    Payee,
    Seen,
    StandingOrder,
    Transfer,
    asserted,
    parse_amount,
)
from stepup_demo.bank_pages import content_security_policy, page, refused, step_up_needed
from stepup_demo.pages import esc, static_file

log = structlog.get_logger("stepup_demo.bank")


class DemoBank:
    def __init__(
        self,
        *,
        jwks_url: str,
        issuer: str,
        audience: str = "bank",
        clock: Callable[[], float] = time.time,
        form_targets: tuple[str, ...] = (),
    ) -> None:
        # PyJWKClient caches the key set and refetches it when it meets a new kid.
        self.jwks = jwt.PyJWKClient(jwks_url, cache_keys=True, timeout=5)
        self.issuer = issuer
        self.audience = audience
        self.clock = clock
        self.csp = content_security_policy(form_targets)
        self.customers: dict[str, Customer] = {}
        self._form_key = secrets.token_bytes(32)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._security_headers])
        app.router.add_get("/", self.accounts)
        app.router.add_get("/transfers/new", self.transfer_form)
        app.router.add_post("/transfers", self.make_transfer)
        app.router.add_get("/transfers", self.ledger)
        app.router.add_get("/standing-orders", self.standing_orders)
        app.router.add_post("/standing-orders", self.add_standing_order)
        app.router.add_get("/savings", self.savings)
        app.router.add_post("/savings", self.move_to_savings)
        app.router.add_get("/payees", self.payees)
        app.router.add_post("/payees", self.change_payee)
        app.router.add_get("/admin", self.admin)
        app.router.add_get("/public/about", self.about)
        app.router.add_get("/public/demo.css", self.stylesheet)
        return app

    @web.middleware
    async def _security_headers(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await handler(request)
        if response.content_type == "text/html":
            response.headers["Content-Security-Policy"] = self.csp
        return response

    async def seen(self, request: web.Request) -> Seen:
        headers = {name: request.headers[name] for name in SHOWN_HEADERS if name in request.headers}
        token = request.headers.get(ASSERTION_HEADER)
        if not token:
            return Seen(headers, None, "no X-Auth-Assertion header: is the gateway in front?")
        try:
            # PyJWKClient fetches keys with blocking I/O: keep it off the event loop
            # (in the demo the gateway answering that fetch runs on this very loop).
            claims = await asyncio.to_thread(
                verify_assertion,
                token,
                self.jwks,
                audience=self.audience,
                issuer=self.issuer,
                now=self.clock(),
            )
        except jwt.PyJWTError as exc:
            log.info("bank_assertion_rejected", reason=type(exc).__name__)
            return Seen(headers, None, f"{type(exc).__name__}: {exc}")
        return Seen(headers, claims, None)

    def customer(self, seen: Seen) -> Customer:
        """The signed-in customer; without a verified assertion, an empty stand-in."""
        if seen.claims is None:
            return Customer(balance=Decimal("0.00"), payees={})
        return self.customers.setdefault(str(seen.claims["sub"]), Customer())

    def form_token(self, seen: Seen, form: str) -> str:
        subject = str(seen.claims["sub"]) if seen.claims else ""
        mac = hmac.new(self._form_key, f"{form}|{subject}".encode(), hashlib.sha256)
        return mac.hexdigest()

    def form_token_ok(self, seen: Seen, form: str, token: object) -> bool:
        if not isinstance(token, str):
            return False
        return hmac.compare_digest(self.form_token(seen, form).encode(), token.encode())

    # --- pages ---

    async def accounts(self, request: web.Request) -> web.Response:
        seen = await self.seen(request)
        customer = self.customer(seen)
        body = (
            "<table><caption>Your accounts</caption>"
            "<tr><th scope='col'>Account</th><th scope='col'>Balance</th></tr>"
            f"<tr><td>Current account</td><td id='balance'>EUR {customer.balance:,.2f}</td></tr>"
            f"<tr><td>Savings</td><td id='savings'>EUR {customer.savings:,.2f}</td></tr>"
            "</table><ul>"
            "<li><a href='/transfers/new'>Transfer money</a> (you approve each one with a"
            " passkey)</li>"
            "<li><a href='/standing-orders'>Set up a standing order</a> (a one-time code; a"
            " passkey above 1,000)</li>"
            "<li><a href='/savings'>Move money to savings</a> (above 1,000 Demo Bank itself"
            " asks for a passkey)</li></ul>"
        )
        return page("Accounts", body, seen)

    async def transfer_form(self, request: web.Request) -> web.Response:
        seen = await self.seen(request)
        return page("Transfer money", self._transfer_form(seen), seen)

    def _payment_fields(self, seen: Seen, amount: str) -> str:
        """Payee (by name), amount and currency: the fields a payment's approval shows."""
        options = "".join(
            f"<option value='{esc(p.name)}'>{esc(p.name)} ({esc(p.iban)})</option>"
            for p in self.customer(seen).payees.values()
        )
        currencies = "".join(f"<option value='{c}'>{c}</option>" for c in CURRENCIES)
        return (
            "<p><label for='payee'>Payee</label>"
            f"<select id='payee' name='payee'>{options}</select></p>"
            "<p><label for='amount'>Amount</label><input id='amount' name='amount'"
            f" inputmode='decimal' required value='{esc(amount)}'></p>"
            "<p><label for='currency'>Currency</label>"
            f"<select id='currency' name='currency'>{currencies}</select></p>"
        )

    def _transfer_form(self, seen: Seen, *, error: str | None = None, amount: str = "") -> str:
        return (
            (f"<p id='error' class='error' role='alert'>{esc(error)}</p>" if error else "")
            + "<form method='post' action='/transfers'>"
            f"<input type='hidden' name='form_token' value='{self.form_token(seen, 'transfer')}'>"
            f"{self._payment_fields(seen, amount)}"
            "<p><button type='submit' id='send'>Send money</button></p></form>"
        )

    def _payment(
        self, customer: Customer, form: Mapping[str, object], *, limit: Decimal
    ) -> tuple[Payee, Decimal, str] | str:
        """(payee, amount, currency) from a payment form, or what is wrong with it."""
        raw_amount = form.get("amount")
        amount = parse_amount(raw_amount if isinstance(raw_amount, str) else "")
        payee = customer.payee_named(form.get("payee"))
        currency = form.get("currency")
        if payee is None:
            return "Choose one of your payees."
        if not isinstance(currency, str) or currency not in CURRENCIES:
            return f"Choose a currency: {', '.join(CURRENCIES)}."
        if amount is None:
            return f"Enter an amount between 0.01 and {MAX_TRANSFER:,.2f}, like 25.50."
        if amount > limit:
            return "That is more than your balance."
        return payee, amount, currency

    async def checked_post(
        self, request: web.Request, form_name: str, what: str
    ) -> tuple[Seen, MultiDictProxy[str | bytes | bytearray | web.FileField]] | web.Response:
        """A form post's assertion and form token checked: (seen, form), or the refusal."""
        seen = await self.seen(request)
        form = await request.post()
        if not seen.verified:
            return refused(seen)
        if not self.form_token_ok(seen, form_name, form.get("form_token")):
            return page("Form expired", f"<p>Reload the {what} and try again.</p>", seen, 403)
        return seen, form

    async def make_transfer(self, request: web.Request) -> web.Response:
        checked = await self.checked_post(request, "transfer", "transfer form")
        if isinstance(checked, web.Response):
            return checked
        seen, form = checked
        customer = self.customer(seen)
        payment = self._payment(customer, form, limit=customer.balance)
        if isinstance(payment, str):
            typed = form.get("amount")
            body = self._transfer_form(
                seen, error=payment, amount=typed if isinstance(typed, str) else ""
            )
            return page("Transfer money", body, seen, 400)
        payee, amount, currency = payment
        acr, amr = asserted(seen)
        customer.balance -= amount
        customer.ledger.append(Transfer(self.clock(), payee.name, amount, acr, amr, currency))
        log.info("bank_transfer", sub=seen.claims["sub"] if seen.claims else None, acr=acr)
        body = (
            f"<p class='ok' role='status'>Sent {currency} {amount:,.2f} to {esc(payee.name)}.</p>"
            f"<p id='authorised-by'>The gateway asserted acr={esc(acr)} amr={esc(amr)}"
            f" (level {esc(seen.claims.get('level', '') if seen.claims else '')}).</p>"
            "<p><a href='/transfers'>See the ledger</a></p>"
        )
        return page("Transfer sent", body, seen)

    async def ledger(self, request: web.Request) -> web.Response:
        seen = await self.seen(request)
        rows = "".join(
            f"<tr class='transfer'><td>{esc(_when(t.at))}</td><td>{esc(t.payee)}</td>"
            f"<td>{esc(t.currency)} {t.amount:,.2f}</td>"
            f"<td>acr={esc(t.acr)} amr={esc(t.amr)}</td></tr>"
            for t in reversed(self.customer(seen).ledger)
        )
        body = (
            "<table id='ledger'><caption>Transfers, newest first</caption><tr>"
            "<th scope='col'>When (UTC)</th><th scope='col'>Payee</th>"
            "<th scope='col'>Amount</th><th scope='col'>Authorised with</th></tr>"
            f"{rows or '<tr><td colspan=4>No transfers yet.</td></tr>'}</table>"
        )
        return page("Ledger", body, seen)

    async def standing_orders(self, request: web.Request) -> web.Response:
        seen = await self.seen(request)
        return page("Standing orders", self._standing_orders(seen), seen)

    def _standing_orders(self, seen: Seen, *, error: str | None = None, amount: str = "") -> str:
        rows = "".join(
            f"<tr class='standing-order'><td>{esc(o.payee)}</td>"
            f"<td>{esc(o.currency)} {o.amount:,.2f}</td><td>{esc(o.frequency)}</td>"
            f"<td>acr={esc(o.acr)} amr={esc(o.amr)}</td></tr>"
            for o in self.customer(seen).standing_orders
        )
        frequencies = "".join(f"<option value='{f}'>{f}</option>" for f in FREQUENCIES)
        token = self.form_token(seen, "standing-order")
        return (
            "<table id='standing-orders'><caption>Your standing orders</caption><tr>"
            "<th scope='col'>Payee</th><th scope='col'>Amount</th><th scope='col'>Every</th>"
            "<th scope='col'>Authorised with</th></tr>"
            f"{rows or '<tr><td colspan=4>No standing orders yet.</td></tr>'}</table>"
            "<h2>New standing order</h2>"
            "<p>You approve it with a one-time code; the risk service asks for a passkey"
            " above 1,000.</p>"
            + (f"<p id='error' class='error' role='alert'>{esc(error)}</p>" if error else "")
            + "<form method='post' action='/standing-orders'>"
            f"<input type='hidden' name='form_token' value='{token}'>"
            f"{self._payment_fields(seen, amount)}"
            "<p><label for='frequency'>Every</label>"
            f"<select id='frequency' name='frequency'>{frequencies}</select></p>"
            "<p><button type='submit' id='save-standing-order'>Set up</button></p></form>"
        )

    async def add_standing_order(self, request: web.Request) -> web.Response:
        checked = await self.checked_post(request, "standing-order", "form")
        if isinstance(checked, web.Response):
            return checked
        seen, form = checked
        customer = self.customer(seen)
        payment = self._payment(customer, form, limit=MAX_TRANSFER)
        frequency = form.get("frequency")
        if not isinstance(payment, str) and frequency not in FREQUENCIES:
            payment = "Choose how often."
        if isinstance(payment, str) or not isinstance(frequency, str):
            typed = form.get("amount")
            body = self._standing_orders(
                seen, error=str(payment), amount=typed if isinstance(typed, str) else ""
            )
            return page("Standing orders", body, seen, 400)
        payee, amount, currency = payment
        acr, amr = asserted(seen)
        order = StandingOrder(self.clock(), payee.name, amount, currency, frequency, acr, amr)
        customer.standing_orders.append(order)
        body = (
            f"<p class='ok' role='status'>Standing order set up: {currency} {amount:,.2f}"
            f" to {esc(payee.name)}, {esc(frequency)}.</p>"
            f"<p id='authorised-by'>The gateway asserted acr={esc(acr)} amr={esc(amr)}.</p>"
            "<p><a href='/standing-orders'>Back to standing orders</a></p>"
        )
        return page("Standing order set up", body, seen)

    async def savings(self, request: web.Request) -> web.Response:
        seen = await self.seen(request)
        return page("Savings", self._savings_form(seen), seen)

    def _savings_form(self, seen: Seen, *, error: str | None = None, amount: str = "") -> str:
        customer = self.customer(seen)
        return (
            f"<p>Current account: EUR {customer.balance:,.2f}."
            f" Savings: <span id='savings'>EUR {customer.savings:,.2f}</span>.</p>"
            f"<p>Moving more than {SAVINGS_STEP_UP_ABOVE:,.2f} needs a passkey from the last"
            " five minutes: Demo Bank asks for it itself.</p>"
            + (f"<p id='error' class='error' role='alert'>{esc(error)}</p>" if error else "")
            + "<form method='post' action='/savings'>"
            f"<input type='hidden' name='form_token' value='{self.form_token(seen, 'savings')}'>"
            "<p><label for='amount'>Amount (EUR)</label><input id='amount' name='amount'"
            f" inputmode='decimal' required value='{esc(amount)}'></p>"
            "<p><button type='submit' id='move'>Move to savings</button></p></form>"
        )

    def strong_enough(self, seen: Seen) -> bool:
        """Demo Bank's own rule for large moves: a passkey, recently (from the assertion)."""
        claims = seen.claims or {}
        auth_time = claims.get("auth_time")
        return (
            claims.get("acr") == SAVINGS_STEP_UP_ACR
            and isinstance(auth_time, int)
            and self.clock() - auth_time <= SAVINGS_STEP_UP_MAX_AGE_S
        )

    async def move_to_savings(self, request: web.Request) -> web.Response:
        checked = await self.checked_post(request, "savings", "savings form")
        if isinstance(checked, web.Response):
            return checked
        seen, form = checked
        customer = self.customer(seen)
        typed = form.get("amount")
        amount_text = typed if isinstance(typed, str) else ""
        amount = parse_amount(amount_text)
        if amount is None or amount > customer.balance:
            problem = (
                "That is more than your balance."
                if amount is not None
                else f"Enter an amount between 0.01 and {MAX_TRANSFER:,.2f}, like 25.50."
            )
            body = self._savings_form(seen, error=problem, amount=amount_text)
            return page("Savings", body, seen, 400)
        if amount > SAVINGS_STEP_UP_ABOVE and not self.strong_enough(seen):
            log.info("bank_step_up_asked", amount=str(amount), acr=asserted(seen)[0])
            return step_up_needed(seen, amount)
        acr, amr = asserted(seen)
        customer.balance -= amount
        customer.savings += amount
        customer.savings_moves.append(Transfer(self.clock(), "Savings", amount, acr, amr))
        body = (
            f"<p class='ok' role='status'>Moved EUR {amount:,.2f} to savings.</p>"
            f"<p id='authorised-by'>The gateway asserted acr={esc(acr)} amr={esc(amr)}.</p>"
            "<p><a href='/savings'>Back to savings</a></p>"
        )
        return page("Moved to savings", body, seen)

    async def payees(self, request: web.Request) -> web.Response:
        seen = await self.seen(request)
        return page("Payees", self._payee_form(seen), seen)

    def _payee_form(self, seen: Seen, *, error: str | None = None) -> str:
        customer = self.customer(seen)
        rows = "".join(
            f"<tr><td>{esc(key)}</td><td>{esc(p.name)}</td><td>{esc(p.iban)}</td></tr>"
            for key, p in customer.payees.items()
        )
        options = "".join(f"<option value='{esc(k)}'>{esc(k)}</option>" for k in customer.payees)
        return (
            "<table><caption>Your payees</caption><tr><th scope='col'>Key</th>"
            f"<th scope='col'>Name</th><th scope='col'>IBAN</th></tr>{rows}</table>"
            "<h2>Change a payee's bank details</h2>"
            "<p>Needs two-step verification (password and one-time code).</p>"
            + (f"<p id='error' class='error' role='alert'>{esc(error)}</p>" if error else "")
            + "<form method='post' action='/payees'>"
            f"<input type='hidden' name='form_token' value='{self.form_token(seen, 'payee')}'>"
            f"<p><label for='payee'>Payee</label><select id='payee' name='payee'>{options}"
            "<option value='new'>a new payee</option></select></p>"
            "<p><label for='name'>Name</label><input id='name' name='name' required></p>"
            "<p><label for='iban'>IBAN</label><input id='iban' name='iban' required"
            " autocomplete='off'></p>"
            "<p><button type='submit' id='save-payee'>Save payee</button></p></form>"
        )

    async def change_payee(self, request: web.Request) -> web.Response:
        checked = await self.checked_post(request, "payee", "payee form")
        if isinstance(checked, web.Response):
            return checked
        seen, form = checked
        customer = self.customer(seen)
        key, name, iban = (form.get(k) for k in ("payee", "name", "iban"))
        iban_text = iban.replace(" ", "").upper() if isinstance(iban, str) else ""
        if not isinstance(key, str) or (key != "new" and key not in customer.payees):
            problem: str | None = "Choose a payee."
        elif not isinstance(name, str) or not name.strip() or len(name) > 70:
            problem = "Enter the payee's name (up to 70 characters)."
        elif not IBAN.fullmatch(iban_text):
            problem = "Enter an IBAN: two letters, two digits, then 11 to 30 letters or digits."
        elif any(p.name == name.strip() for k, p in customer.payees.items() if k != key):
            # Payments name their payee by name (that is what an approval shows): unique.
            problem = "Another payee has that name already."
        else:
            problem = None
        if problem is not None or not isinstance(key, str) or not isinstance(name, str):
            return page("Payees", self._payee_form(seen, error=problem), seen, 400)
        if key == "new":
            key = f"payee{len(customer.payees) + 1}"
        customer.payees[key] = Payee(name.strip(), iban_text)
        acr, amr = asserted(seen)
        body = (
            f"<p class='ok' role='status'>Saved {esc(name.strip())} ({esc(iban_text)}).</p>"
            f"<p id='authorised-by'>The gateway asserted acr={esc(acr)} amr={esc(amr)}.</p>"
            "<p><a href='/payees'>Back to payees</a></p>"
        )
        return page("Payee saved", body, seen)

    async def admin(self, request: web.Request) -> web.Response:
        seen = await self.seen(request)
        if not seen.verified:
            return refused(seen)  # every customer's balance: only with a gateway assertion
        rows = "".join(
            f"<tr><td>{esc(sub)}</td><td>EUR {c.balance:,.2f}</td><td>{len(c.ledger)}</td></tr>"
            for sub, c in sorted(self.customers.items())
        )
        body = (
            "<table><caption>Customers seen since start</caption><tr><th scope='col'>Subject</th>"
            f"<th scope='col'>Balance</th><th scope='col'>Transfers</th></tr>{rows}</table>"
        )
        return page("Admin", body, seen)

    async def about(self, request: web.Request) -> web.Response:
        seen = await self.seen(request)
        body = (
            "<p>Demo Bank is a sample app behind stepup-gateway. It does not know how you"
            " signed in: the gateway tells it, in the headers below, and signs what it says.</p>"
            "<p>This page is public: the gateway lets anyone see it, so it gets no"
            " X-Auth headers.</p>"
        )
        return page("About Demo Bank", body, seen)

    async def stylesheet(self, request: web.Request) -> web.Response:
        return web.Response(body=static_file("demo.css"), content_type="text/css")


def _when(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%S")
