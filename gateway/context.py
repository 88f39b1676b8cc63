"""What the steps after the decision may use of the gateway: :class:`Context`.

The endpoints, the challenge and the forwarding get this view of
:class:`gateway.app.Gateway` (which satisfies it; mypy checks that where they
are called) instead of the class, so they import nothing from
:mod:`gateway.app` and the list below is the whole of what they share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from gateway.assertion import AssertionSigner
from gateway.decision import DECISION_LABEL, Decision
from gateway.decision_memo import RememberedDecisions
from gateway.metrics import Metrics
from gateway.model import Config, Rule
from gateway.oidc.provider import ProviderClient
from gateway.oidc.providers import ProviderSet
from gateway.proxy import Upstreams
from gateway.risk_policy import RiskFacts, RiskOutcome
from gateway.rules import RuleSet
from gateway.session.aux import AuxStore
from gateway.session.cookies import SetCookieKwargs
from gateway.session.model import Session
from gateway.session.stores import SessionStore
from gateway.session.transaction import TransactionCodec
from gateway.tokens.gate import Presented, TokenGate
from gateway.transactional import KeptLedger

if TYPE_CHECKING:
    from gateway.forward import Forwarder
    from gateway.telemetry import Tracing


class Context(Protocol):
    """Configuration, shared clients and the request steps the endpoints build on.

    Every attribute is read at the moment of use, never kept: a reload swaps them.
    """

    config: Config
    rules: RuleSet
    clock: Callable[[], float]
    metrics: Metrics
    store: SessionStore
    aux: AuxStore  # one-time claims, kept requests, revocations
    kept_ledger: KeptLedger
    signer: AssertionSigner
    tx_codec: TransactionCodec
    tx_base: str  # the sign-in transaction cookies' base name
    session_cookie: str
    secure: bool  # cookies are Secure (and __Host-)
    prefix: str  # server.internal_prefix
    auth_target: bytes  # prefix + "/auth", as a request line has it
    redirect_uri: str
    upstreams: Upstreams
    forwarder: Forwarder  # decided requests to the upstreams, with the assurance headers
    tracing: Tracing | None  # None: tracing is off
    tokens: TokenGate | None  # the api section: API clients' access tokens
    decisions: RememberedDecisions  # forgotten at a sign-out (gateway.decision_memo)

    @property
    def provider(self) -> ProviderClient:
        """The ``default`` provider."""
        ...

    @property
    def providers(self) -> ProviderSet:
        """Every provider by name (``oidc.providers``)."""
        ...

    @property
    def draining(self) -> bool:
        """SIGTERM received: finishing what is in flight (gateway.connections)."""
        ...

    # -- the request ------------------------------------------------------------

    def judged_host(self, request: web.BaseRequest, rules: RuleSet) -> str | None: ...

    def checked_host(self, host: str | None, rules: RuleSet | None = None) -> str | None: ...

    def client_ip(self, request: web.BaseRequest) -> str | None: ...

    async def ask_risk_engine(
        self, rule: Rule, facts: RiskFacts, session_id: str | None, now: float
    ) -> RiskOutcome: ...

    def session_cookie_value(self, request: web.BaseRequest) -> str | None: ...

    async def load_session(self, request: web.BaseRequest) -> Session | None: ...

    async def claim_once(self, name: str, *, rule: str, sub: str) -> bool: ...

    async def revoke(
        self,
        *,
        session: Session | None = None,
        sub: str | None = None,
        provider_sid: str | None = None,
    ) -> None: ...

    async def provider_reachable(self, name: str = "default") -> bool: ...

    def client_hops(self, request: web.BaseRequest, peer: str) -> tuple[str, ...]: ...

    def peer_trusted(self, peer: str) -> bool: ...

    # -- responses --------------------------------------------------------------

    def public_origin(self) -> str: ...

    def session_cookie_kwargs(self) -> SetCookieKwargs: ...

    def metrics_response(self) -> web.Response: ...

    def session_set_cookie(self, value: str) -> str: ...

    def page_response(
        self,
        request: web.BaseRequest,
        status: int,
        title: str,
        paragraphs: list[str],
        *,
        error: str = "error",
        raw_html: str = "",
        force_html: bool = False,
    ) -> web.Response: ...


def decided(ctx: Context, decision: Decision, started_ns: int, presented: Presented | None) -> None:
    """What follows every decision, in proxy mode and at ``/auth`` alike: it is traced
    and counted, and an API client's refusal (RFC 6750, 9449, 9470: never a redirect)
    is raised."""
    if ctx.tracing is not None:
        ctx.tracing.decision(started_ns, decision)
    rule_name = decision.rule.name if decision.rule is not None else ""
    ctx.metrics.requests.labels(rule_name, DECISION_LABEL[type(decision)]).inc()
    tokens = ctx.tokens
    if tokens is not None and (refused := tokens.refusal(decision, presented)) is not None:
        raise refused
