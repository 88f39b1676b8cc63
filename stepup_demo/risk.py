"""The demo's risk service: a passkey for payments over 1,000, nothing more otherwise.

stepup-gateway POSTs a request's facts to a rule's ``risk.url`` (see
:mod:`gateway.risk` for the exchange) and takes the answer as what the request
needs on top of the rule's own ``require``. A real engine weighs the payee's
history, the device, the place; this one looks at the amount only, so the demo's
behaviour is easy to predict::

    {"fields": {"amount": "1500.00", ...}, ...}  ->  {"require": "phishing-resistant"}
    {"fields": {"amount": "50.00", ...}, ...}    ->  {"require": "allow"}

An amount it cannot read counts as large: unknown risk is high risk.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal

import structlog
from aiohttp import web

log = structlog.get_logger("stepup_demo.risk")

LARGE_AMOUNT = Decimal("1000")  # above this, a passkey (demo.yaml's phishing-resistant)
STRONG_LEVEL = "phishing-resistant"
ALLOW = "allow"
# The gateway sends a few hundred bytes; anything far larger is not its request.
MAX_REQUEST_BYTES = 64 * 1024
_AMOUNT = re.compile(r"[0-9]{1,12}(\.[0-9]{1,2})?")


def amount_of(fields: object) -> Decimal | None:
    """The request's ``amount`` field as a number, or None when it is not one."""
    if not isinstance(fields, Mapping):
        return None
    text = fields.get("amount")
    if not isinstance(text, str) or not _AMOUNT.fullmatch(text.strip()):
        return None
    return Decimal(text.strip())


def assess(facts: object) -> dict[str, str]:
    """The answer for the gateway's facts (pure)."""
    fields = facts.get("fields") if isinstance(facts, Mapping) else None
    amount = amount_of(fields)
    if amount is None or amount > LARGE_AMOUNT:
        return {"require": STRONG_LEVEL}
    return {"require": ALLOW}


async def handle_assess(request: web.Request) -> web.Response:
    if (request.content_length or 0) > MAX_REQUEST_BYTES:
        return web.json_response({"error": "too large"}, status=413)
    try:
        facts = json.loads(await request.read())
    except ValueError:
        return web.json_response({"error": "send the facts as JSON"}, status=400)
    answer = assess(facts)
    log.info(
        "risk_service_answered",
        rule=facts.get("rule") if isinstance(facts, dict) else None,
        require=answer["require"],
    )
    return web.json_response(answer, headers={"Cache-Control": "no-store"})


def risk_app() -> web.Application:
    """The service: ``POST /assess``."""
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app.router.add_post("/assess", handle_assess)
    return app
