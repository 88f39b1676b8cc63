"""W3C Trace Context headers: which a client may pass on, and whether tracing is on.

Pure. A ``traceparent``/``tracestate`` pair that is well-formed (W3C Trace Context
Level 1, version ``00``) is passed to the upstream (or, with tracing on, replaced
by the gateway's own); anything else is dropped, never forwarded: a client must
not inject text into the upstream's logs or a trace backend through them.

The spans are :mod:`gateway.telemetry`'s (the optional ``otel`` extra), switched
on by :mod:`gateway.tracing`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# Every spelling folds to one of these (``Trace_Parent`` too): only the exact name,
# checked, is passed on, so no upstream reads an unchecked copy under a near name.
COMPACT_NAMES = frozenset({TRACEPARENT, TRACESTATE})

# W3C Trace Context 3.2.2: version "00", 32 and 16 lowercase hex digits, 2 of flags.
_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
# 3.3.1.3: a key (simple, or multi-tenant "tenant@system") and a value of printable
# ASCII without "," and "=", not ending in a space.
_TRACESTATE_MEMBER = re.compile(
    r"(?P<key>[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
MAX_TRACESTATE_MEMBERS = 32  # 3.3.1.1
MAX_TRACESTATE_CHARS = 512  # 3.3.1.5: what every vendor must propagate; longer is dropped


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A checked ``traceparent`` and the ``tracestate`` that goes with it (or None)."""

    traceparent: str
    tracestate: str | None

    @property
    def trace_id(self) -> int:
        return int(self.traceparent[3:35], 16)

    @property
    def parent_id(self) -> int:
        return int(self.traceparent[36:52], 16)

    @property
    def flags(self) -> int:
        return int(self.traceparent[53:55], 16)

    def headers(self) -> tuple[tuple[str, str], ...]:
        if self.tracestate is None:
            return ((TRACEPARENT, self.traceparent),)
        return ((TRACEPARENT, self.traceparent), (TRACESTATE, self.tracestate))


def valid_traceparent(value: str) -> bool:
    return _TRACEPARENT.fullmatch(value) is not None


def valid_tracestate(value: str) -> bool:
    """A tracestate list within bounds: at most 32 members, 512 characters, no key twice."""
    if len(value) > MAX_TRACESTATE_CHARS:
        return False
    keys: set[str] = set()
    for member in value.split(","):
        member = member.strip(" \t")
        if not member:
            continue  # 3.3.1.1: empty list members are allowed
        match = _TRACESTATE_MEMBER.fullmatch(member)
        if match is None or match["key"] in keys:
            return False
        keys.add(match["key"])
    return 0 < len(keys) <= MAX_TRACESTATE_MEMBERS


def inbound(traceparents: Iterable[str], tracestates: Iterable[str]) -> TraceContext | None:
    """The client's trace context when it is well-formed; None (drop both) otherwise.

    ``traceparents`` are the values of every ``traceparent`` line (two lines are
    refused: which one an upstream reads is its own choice), ``tracestates``
    those of every ``tracestate`` line (combined, RFC 9110 5.3). A tracestate
    that is malformed or out of bounds is dropped alone (3.3.1.1); without a
    valid traceparent, so is every tracestate (3.3.2.2).
    """
    parents = list(traceparents)
    if len(parents) != 1 or not valid_traceparent(parents[0]):
        return None
    states = [value for value in tracestates]
    state = ",".join(states) if states else None
    if state is not None and not valid_tracestate(state):
        state = None
    return TraceContext(parents[0], state)


def inbound_of(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> TraceContext | None:
    """:func:`inbound` from a request's headers (exact names, any case)."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    parents: list[str] = []
    states: list[str] = []
    for name, value in items:
        lowered = name.lower()
        if lowered == TRACEPARENT:
            parents.append(value)
        elif lowered == TRACESTATE:
            states.append(value)
    return inbound(parents, states) if parents else None
