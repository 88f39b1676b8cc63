"""Remembered decisions: an ``Allow`` reused for the same request, for a second at most.

The same client asks the same thing many times a second (a page's assets, an API
client's calls, nginx asking ``/auth`` for each of them), and each answer is the
same until something it rests on changes. This memo keeps recent ``Allow``
answers, keyed by everything the decision read, until the earliest moment one of
them could change:

- the rule set: the memo is made anew when the configuration is (re)loaded;
- the session: its idle and absolute timeouts, and the moment its idle timer is
  due to be saved again (that answer sets a cookie, so it is never remembered);
- the proof: the ``max_age`` of the rule, counted from the newest proof that met it;
- the signed assertion: reused only while the signer itself would reuse it;
- ``server.decision_memo`` (1 s by default; 0: nothing is remembered): a sign-out
  in this process forgets every remembered answer at once, but one in another
  worker or replica (a revocation or a deleted session in Redis) is seen here
  only when a remembered answer expires, so this bounds how long that takes.

The same request arrives again byte for byte (a browser's or an API client's
repeated GET, nginx asking ``/auth``): for a whole request head without a body that
came alone (:meth:`gateway.early.EarlyHandler.exact_head`), the proxy's forward and
``/auth``'s answer are remembered by those bytes and the peer, so the request is not
parsed or judged again (:mod:`gateway.early`: the framing checks, path, host, cookie
and decision); the bytes are the request, so nothing it carries can differ. A request
traced (``telemetry``) is decided every time.

Only ``Allow`` answers for a session (a cookie's, never an access token's) are
remembered, and only for rules that read nothing but the session: a rule with
``when``, ``risk``, ``bind`` or ``once`` is decided every time (a one-time proof
must be spent by each request). Each memo holds at most
``server.decision_memo_entries`` answers and :data:`MEMO_BYTES` of them (as
estimated: a signed-in client choosing its headers chooses the size of ``/auth``'s
keys), least recently used dropped first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from aiohttp import web
from multidict import CIMultiDict

from gateway.early import EarlyHandler
from gateway.memo import HEADER_OVERHEAD_BYTES
from gateway.metrics import Counter, Histogram, Metrics
from gateway.model import ServerConfig, SessionConfig
from gateway.policy import Allow, Decision
from gateway.session.model import TOUCH_INTERVAL_S, Session

V = TypeVar("V")
# The proxy's key: the session cookie's exact value, the method, canonical host, path.
ProxiedKey = tuple[str, str, str | None, str]
# A whole answer's key: the peer's address and the request's exact bytes.
ExactKey = tuple[str | None, bytes]

# Each memo's entries take at most about this much memory: 10,000 answers to requests
# with the headers a browser sends behind nginx (about 6 KB each, as estimated) fit.
MEMO_BYTES = 64 * 1024 * 1024
# What remembering one of the proxy's decisions takes beside its cookie and path, about
# (the key's tuple, the entry, the session when the store made it for this request).
PROXIED_ENTRY_BYTES = 2048


@dataclass(frozen=True, slots=True)
class _Entry(Generic[V]):
    value: V
    until: float  # remembered while now < until
    size: int  # bytes, as the caller estimates them


def exact_key(request: web.BaseRequest) -> ExactKey | None:
    """(the peer, the request's exact bytes) when they are known: a whole head without a
    body that came alone (:meth:`EarlyHandler.exact_head`); the key of the memos of
    whole answers (the proxy's forwards, ``/auth``'s answers)."""
    protocol = request.protocol
    if not isinstance(protocol, EarlyHandler):
        return None
    head = protocol.exact_head(request.raw_headers)
    return None if head is None else (protocol.peer_address(), head)


def rememberable(decision: Decision | None, *, by_token: bool) -> bool:
    """Whether ``decision`` may be reused: an ``Allow`` for a cookie's session (never an
    access token's: a DPoP proof is single-use) by a rule that reads nothing but the
    session and the clock."""
    if by_token or not isinstance(decision, Allow):
        return False
    rule = decision.rule
    require = rule.require
    return (
        rule.when is None
        and rule.risk is None
        and not require.bind
        and not require.once
        and rule.credentials != "token"
    )


def allow_until(decision: Allow, session: Session, settings: SessionConfig) -> float:
    """The first moment ``decision`` for ``session`` could be decided differently.

    Earliest of: the idle timer due to be saved, the idle timeout, the absolute
    lifetime, and the rule's ``max_age`` counted from the proof that met it.
    """
    until = min(
        session.last_seen + min(TOUCH_INTERVAL_S, settings.idle_timeout_s),
        session.created_at + settings.lifetime_s,
    )
    max_age_s = decision.rule.require.max_age_s
    if max_age_s is not None and decision.proof is not None:
        until = min(until, decision.proof.auth_time + max_age_s)
    return until


class DecisionMemo(Generic[V]):
    """Recent answers by key, each until its own deadline and for ``cap_s`` at most.

    ``on_lookup(hit)`` counts lookups for ``/metrics``.
    """

    def __init__(
        self,
        *,
        cap_s: float,
        max_entries: int,
        max_bytes: int = MEMO_BYTES,
        on_lookup: Callable[[bool], None] = lambda hit: None,
    ) -> None:
        self.cap_s = cap_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._on_lookup = on_lookup
        self._entries: OrderedDict[Hashable, _Entry[V]] = OrderedDict()
        self._bytes = 0

    @property
    def enabled(self) -> bool:
        return self.cap_s > 0 and self.max_entries > 0

    def get(self, key: Hashable, now: float) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            self._on_lookup(False)
            return None
        if now >= entry.until:
            self._drop(key)
            self._on_lookup(False)
            return None
        self._entries.move_to_end(key)
        self._on_lookup(True)
        return entry.value

    def put(self, key: Hashable, value: V, *, until: float, now: float, size: int) -> None:
        """Remember ``value`` for ``key`` until ``until`` (never beyond ``now + cap_s``);
        ``size``: what the entry takes, in bytes, about."""
        until = min(until, now + self.cap_s)
        if not self.enabled or until <= now or size > self.max_bytes:
            return
        self._drop(key)
        self._entries[key] = _Entry(value, until, size)
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._bytes -= self._entries.popitem(last=False)[1].size

    def _drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.size

    def forget_all(self) -> None:
        """A sign-out in this process: nothing remembered may outlive it."""
        self._entries.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True, slots=True)
class Answer:
    """A remembered ``/auth`` answer: its status line and headers, up to X-Request-Id."""

    head: bytes
    method: str  # for the access log
    path: str  # normalised, for the access log
    requests: Counter  # stepup_requests_total{rule, decision="allow"}
    request_id: str | None  # the request's own X-Request-Id, when it is well-formed


@dataclass(frozen=True, slots=True)
class Prepared:
    """A remembered forward: everything the proxy did for a request up to the upstream
    call, for the very same bytes (:meth:`RememberedDecisions.prepared_for`)."""

    rule_name: str
    method: str
    path: str  # normalised, for the access log
    path_qs: str  # as sent upstream
    upstream: str
    headers: CIMultiDict[str]  # the upstream request's, but X-Request-Id; never changed
    requests: Counter  # stepup_requests_total{rule, decision="allow"}
    latency: Histogram  # stepup_upstream_latency_seconds{upstream}
    request_id: str | None  # the request's own X-Request-Id, when it is well-formed
    # Over the upstream's pool: the request head as sent, up to X-Request-Id (last).
    head: bytes | None


class RememberedDecisions:
    """The gateway's memos, for one configuration: made anew when it is (re)loaded, so
    nothing decided under the old rules is reused.

    ``proxied``: the proxy's ``(Allow, Session)`` by :meth:`find`'s key; ``exact``: the
    proxy's whole forward (:class:`Prepared`) by the exact bytes of the request and its
    peer, so the same request is sent on without being read again; ``auth``: ``/auth``'s
    whole answer by the exact request that asked (:mod:`gateway.endpoints.forward_auth`).
    """

    def __init__(self, server: ServerConfig, session: SessionConfig, metrics: Metrics) -> None:
        self.session_settings = session
        counts = metrics.decision_memo.counts

        def count(found: bool) -> None:
            counts["hit" if found else "miss"] += 1

        def memo(on_lookup: Callable[[bool], None] = count) -> DecisionMemo[Any]:
            return DecisionMemo(
                cap_s=server.decision_memo_s,
                max_entries=server.decision_memo_entries,
                max_bytes=MEMO_BYTES,
                on_lookup=on_lookup,
            )

        self.proxied: DecisionMemo[tuple[Allow, Session]] = memo()
        self.auth: DecisionMemo[Answer] = memo()
        # Looked up before the proxy's own key: a miss there is no miss yet.
        self.exact: DecisionMemo[Prepared] = memo(lambda hit: count(True) if hit else None)

    def find(
        self, cookie: str | None, method: str, host: str | None, path: str, now: float
    ) -> tuple[ProxiedKey | None, tuple[Allow, Session] | None]:
        """The proxy's key (the exact session cookie, the method, canonical host and path;
        None without a cookie) and the Allow remembered for it."""
        if not cookie or not self.proxied.enabled:
            return None, None
        key = (cookie, method, host, path)
        return key, self.proxied.get(key, now)

    def remember(
        self,
        key: ProxiedKey | None,
        decision: Decision | None,
        session: Session | None,
        now: float,
        *,
        by_token: bool,
    ) -> None:
        """Remember the proxy's ``decision`` when it is an Allow that may be remembered."""
        if (
            key is not None
            and session is not None
            and isinstance(decision, Allow)
            and rememberable(decision, by_token=by_token)
        ):
            until = allow_until(decision, session, self.session_settings)
            size = PROXIED_ENTRY_BYTES + len(key[0]) + len(key[3])
            self.proxied.put(key, (decision, session), until=until, now=now, size=size)

    def prepared_for(self, request: web.BaseRequest, now: float) -> Prepared | None:
        """The forward remembered for ``request``'s exact bytes and peer, if any."""
        key = exact_key(request) if self.exact.enabled else None
        return None if key is None else self.exact.get(key, now)

    def remember_prepared(
        self, request: web.BaseRequest, prepared: Prepared, until: float, now: float
    ) -> None:
        """Remember the forward ``prepared`` for ``request``'s exact bytes, when known."""
        key = exact_key(request) if self.exact.enabled else None
        if key is None:
            return
        headers = prepared.headers.items()
        size = PROXIED_ENTRY_BYTES + 2 * len(key[1]) + len(prepared.head or b"")
        size += sum(HEADER_OVERHEAD_BYTES + len(name) + len(value) for name, value in headers)
        self.exact.put(key, prepared, until=until, now=now, size=size)

    def forget_all(self) -> None:
        """A sign-out in this process: nothing remembered may outlive it."""
        self.proxied.forget_all()
        self.auth.forget_all()
        self.exact.forget_all()
