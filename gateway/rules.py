"""Which rule a request falls under: path globs compiled once, matched through an index.

Globs
    A glob is an absolute path pattern, matched segment by segment against the
    path produced by :func:`gateway.paths.normalize_path`:

    * ``*`` matches any characters except ``/`` (zero or more), whether it is a
      whole segment (``/users/*/profile``) or part of one (``/files/*.pdf``);
    * ``**`` as a whole segment matches any number of segments, including
      none: ``/api/**`` matches ``/api``, ``/api/`` and ``/api/x/y``;
    * everything else is literal and compared as written. Its spelling is
      canonicalised like a request path (``%7e`` -> ``~``, ``é`` -> ``%C3%A9``)
      so that a pattern and a request that mean the same path compare equal.

    Matching never backtracks exponentially: segment lists and the pieces
    around an in-segment ``*`` are matched greedily with a single restart
    point, so the cost is at most (segments x pattern segments).

The prefix index
    Most rules start with literal segments (``/api/transfers/**``). The rule
    set stores every rule in a trie keyed by those leading literal segments;
    a rule whose first segment already holds a wildcard sits at the root. To
    match a path, :meth:`RuleSet.match` walks the trie along the path's
    segments, collecting the rules stored on each node it visits. Only those
    candidates can match: any other rule has a leading literal segment that
    differs from the path's. The candidates are tested in rule order (lowest
    :attr:`gateway.model.Rule.index` first), so the answer is exactly that of
    a linear first-match scan, at a cost that grows with the path's depth and
    the number of candidates instead of with the number of rules.

Case-insensitive upstreams
    Express (its default router), IIS, ASP.NET and Spring with some settings route
    ``/API/Transfers`` to the handler for ``/api/transfers``. A rule whose upstream
    is marked ``case_insensitive_paths`` compares its literal text and the path with
    ASCII letters lower-cased, so every spelling its upstream treats as one path
    gets the same rule. Those rules live in a second trie keyed by lower-cased
    segments; both tries' candidates are merged in rule order.

Hosts
    When any rule names a host, a request for a host the configuration does not
    know (:meth:`RuleSet.host_known`) must be refused: otherwise
    ``Host: bank.example.com:8443``, an IP or any other spelling would skip the
    host's rules and fall through to a weaker catch-all.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gateway import errors, model
from gateway.memo import Memo
from gateway.paths import STANDARD_METHODS, canonical_rule_host, normalize_path

# Recent requests' matches: most requests repeat a method, host and path seen shortly
# before; a flood of distinct paths only clears the memo.
MATCH_MEMO_ENTRIES = 4096
MATCH_MEMO_BYTES = 1024 * 1024


class _AnySegments:
    """Token for a whole-segment ``**``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "**"


ANY_SEGMENTS = _AnySegments()

# A compiled segment: a literal string, the pieces around in-segment "*"
# (at least two, "*" alone is ("", "")), or ANY_SEGMENTS.
Token = str | tuple[str, ...] | _AnySegments


@dataclass(frozen=True, slots=True)
class Glob:
    """A compiled path glob. Build with :func:`compile_glob`."""

    pattern: str  # as written
    canonical: str  # the pattern with its literal text normalised like a path
    tokens: tuple[Token, ...]
    literal_prefix: tuple[str, ...]  # the leading literal segments, keys of the index

    def matches(self, path: str) -> bool:
        """True if the (normalised) ``path`` matches this glob."""
        if not path.startswith("/"):
            return False
        return _match_segments(self.tokens, path[1:].split("/"))


def compile_glob(pattern: str) -> Glob:
    """Compile ``pattern``; ``ValueError`` with an operator-facing message if invalid."""
    if not pattern.startswith("/"):
        raise ValueError(f"path pattern {pattern!r} must start with '/'")
    raw_segments = pattern[1:].split("/")
    for position, segment in enumerate(raw_segments):
        if "**" in segment and segment != "**":
            raise ValueError(
                f"path pattern {pattern!r}: '**' must be a whole path segment "
                f"(as in /api/**); use '*' inside a segment"
            )
        if segment == "" and position != len(raw_segments) - 1:
            raise ValueError(
                f"path pattern {pattern!r} contains an empty segment ('//'), "
                "which no normalised request path has"
            )
        if segment in (".", ".."):
            raise ValueError(
                f"path pattern {pattern!r} contains a '.' or '..' segment, "
                "which no normalised request path has"
            )
    try:
        # Structure was checked above, so this only changes the spelling of
        # literal text ('*' is a sub-delimiter and passes through unchanged).
        canonical = normalize_path(pattern)
    except errors.BadRequest as exc:
        raise ValueError(
            f"path pattern {pattern!r} can never match a request: {exc.message}"
        ) from exc
    tokens = tuple(_compile_segment(segment) for segment in canonical[1:].split("/"))
    prefix: list[str] = []
    for token in tokens:
        if not isinstance(token, str):
            break
        prefix.append(token)
    return Glob(pattern=pattern, canonical=canonical, tokens=tokens, literal_prefix=tuple(prefix))


def _compile_segment(segment: str) -> Token:
    if segment == "**":
        return ANY_SEGMENTS
    if "*" in segment:
        return tuple(segment.split("*"))
    return segment


def _segment_matches(token: str | tuple[str, ...], segment: str) -> bool:
    if isinstance(token, str):
        return token == segment
    head, *middle, tail = token
    if len(segment) < len(head) + len(tail):
        return False
    if not (segment.startswith(head) and segment.endswith(tail)):
        return False
    # Leftmost placement of each middle piece is always safe: the '*' after it
    # can absorb whatever a later placement would have skipped.
    position, end = len(head), len(segment) - len(tail)
    for piece in middle:
        found = segment.find(piece, position, end)
        if found < 0:
            return False
        position = found + len(piece)
    return True


def _match_segments(tokens: Sequence[Token], segments: Sequence[str]) -> bool:
    """Glob matching over segments with one restart point per '**' (no exponential blow-up)."""
    token_count, segment_count = len(tokens), len(segments)
    t = s = 0
    restart_token = -1  # index of the last '**' seen
    restart_segment = 0  # first segment that '**' has not absorbed yet
    while s < segment_count:
        token = tokens[t] if t < token_count else None
        if isinstance(token, _AnySegments):
            restart_token, restart_segment = t, s
            t += 1
        elif token is not None and _segment_matches(token, segments[s]):
            t += 1
            s += 1
        elif restart_token >= 0:
            restart_segment += 1
            t, s = restart_token + 1, restart_segment
        else:
            return False
    while t < token_count and isinstance(tokens[t], _AnySegments):
        t += 1
    return t == token_count


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    rank: int  # position in first-match order
    rule: model.Rule
    glob: Glob
    host: str | None
    methods: frozenset[str] | None  # with HEAD added where GET is named
    fold_case: bool  # tokens are lower-cased; compare with lower-cased segments


@dataclass(slots=True)
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    rules: list[_CompiledRule] = field(default_factory=list)  # ascending rank


def _rank(compiled: _CompiledRule) -> int:
    return compiled.rank


def _fold_token(token: Token) -> Token:
    if isinstance(token, str):
        return token.lower()
    if isinstance(token, tuple):
        return tuple(piece.lower() for piece in token)
    return token


def _fold_glob(glob: Glob) -> Glob:
    """``glob`` matching any ASCII case: its (canonical, ASCII-only) literal text lowered."""
    tokens = tuple(_fold_token(token) for token in glob.tokens)
    prefix = tuple(segment.lower() for segment in glob.literal_prefix)
    return Glob(glob.pattern, glob.canonical.lower(), tokens, prefix)


class RuleSet:
    """The configured rules, compiled once and indexed by literal path prefix.

    Rules whose upstream is in ``case_insensitive_upstreams`` match paths ignoring
    ASCII case. ``known_hosts`` are the canonical hosts the gateway answers for
    besides those the rules name (see :meth:`host_known`).
    """

    def __init__(
        self,
        rules: Sequence[model.Rule],
        *,
        case_insensitive_upstreams: Collection[str] = (),
        known_hosts: Iterable[str] = (),
    ) -> None:
        ordered = sorted(enumerate(rules), key=lambda item: (item[1].index, item[0]))
        self._root = _Node()
        self._root_folded = _Node()  # rules matched ignoring case, by lower-cased prefix
        self._rules = tuple(rule for _, rule in ordered)
        rule_hosts = {rule.match.host for rule in self._rules if rule.match.host is not None}
        self._host_scoped = bool(rule_hosts)
        self._known_hosts = frozenset(rule_hosts | set(known_hosts))
        for rank, rule in enumerate(self._rules):
            methods = rule.match.methods
            if methods is not None and "GET" in methods:
                # A GET rule covers HEAD (RFC 9110 9.3.2: HEAD is GET without content).
                methods = methods | {"HEAD"}
            host = rule.match.host.lower() if rule.match.host is not None else None
            try:
                glob = compile_glob(rule.match.path)
            except ValueError as exc:
                raise ValueError(f"rule {rule.name!r}: {exc}") from exc
            fold_case = rule.upstream in case_insensitive_upstreams
            if fold_case:
                glob = _fold_glob(glob)
            compiled = _CompiledRule(rank, rule, glob, host, methods, fold_case)
            node = self._root_folded if fold_case else self._root
            for segment in compiled.glob.literal_prefix:
                node = node.children.setdefault(segment, _Node())
            node.rules.append(compiled)
        self._folds = bool(self._root_folded.children or self._root_folded.rules)
        self._named_methods = frozenset(
            method for rule in self._rules for method in (rule.match.methods or ())
        )
        # (method, host, path) -> the rules that match, for requests that repeat.
        self._matched: Memo[tuple[str, str | None, str], tuple[model.Rule, ...]] = Memo(
            max_entries=MATCH_MEMO_ENTRIES, max_bytes=MATCH_MEMO_BYTES
        )

    @classmethod
    def for_config(cls, config: model.Config) -> RuleSet:
        """The rule set of ``config``, with its case-insensitive upstreams and known hosts."""
        server = config.server
        folded = {
            name
            for name, upstream in config.upstreams.items()
            if upstream.case_insensitive_paths or server.case_insensitive_paths
        }
        public = urlsplit(server.public_url)
        public_host = canonical_rule_host(public.netloc.rpartition("@")[2], public.scheme)
        return cls(
            config.rules,
            case_insensitive_upstreams=frozenset(folded),
            known_hosts=(public_host, *server.hosts),
        )

    def host_known(self, host: str | None) -> bool:
        """False when some rule is host-scoped and ``host`` is none the config knows.

        ``host`` is :func:`gateway.paths.canonical_host`'s. Without host-scoped rules
        every host is judged alike, so any host is fine.
        """
        return not self._host_scoped or host in self._known_hosts

    @property
    def rules(self) -> tuple[model.Rule, ...]:
        """The rules in first-match order."""
        return self._rules

    def __len__(self) -> int:
        return len(self._rules)

    def method_known(self, method: str) -> bool:
        """True for a standard method in upper case, or a method some rule names exactly."""
        return method in STANDARD_METHODS or method in self._named_methods

    def require_known_method(self, method: str) -> None:
        """Raise :class:`gateway.errors.MethodNotAllowed` unless :meth:`method_known`."""
        if not self.method_known(method):
            raise errors.MethodNotAllowed(
                "This method is not allowed here.", reason="unknown_method"
            )

    def match(self, method: str, host: str | None, path: str) -> model.Rule | None:
        """The first rule (lowest index) that matches, or ``None`` (the caller answers 403).

        ``path`` must come from :func:`gateway.paths.normalize_path` and ``host``
        from :func:`gateway.paths.canonical_host`; a rule with a host never
        matches a request without one. Check :meth:`method_known` first: a rule
        without methods matches any method.
        """
        return next(self.candidates_for(method, host, path), None)

    def candidates_for(self, method: str, host: str | None, path: str) -> Iterator[model.Rule]:
        """Every rule that matches, in first-match order (remembered for recent requests).

        :meth:`match` is the first of these. A rule with ``when`` applies only when
        its condition holds, so the caller walks on to the next one otherwise.
        """
        key = (method, host, path)
        matched = self._matched.get(key)
        if matched is None:
            matched = tuple(self._matching(method, host, path))
            self._matched.put(key, matched, len(method) + len(host or "") + len(path))
        return iter(matched)

    def _matching(self, method: str, host: str | None, path: str) -> Iterator[model.Rule]:
        if not path.startswith("/"):
            return
        segments = path[1:].split("/")
        folded = [segment.lower() for segment in segments] if self._folds else segments
        request_host = host.lower() if host is not None else None
        for candidate in self._candidates(segments, folded):
            if candidate.methods is not None and method not in candidate.methods:
                continue
            if candidate.host is not None and candidate.host != request_host:
                continue
            if _match_segments(candidate.glob.tokens, folded if candidate.fold_case else segments):
                yield candidate.rule

    def candidates(self, path: str) -> tuple[model.Rule, ...]:
        """The rules the index leaves to test for ``path``, in first-match order.

        For checking that the index narrows the search.
        """
        if not path.startswith("/"):
            return ()
        segments = path[1:].split("/")
        folded = [segment.lower() for segment in segments]
        return tuple(compiled.rule for compiled in self._candidates(segments, folded))

    def _candidates(
        self, segments: Sequence[str], folded: Sequence[str]
    ) -> Iterable[_CompiledRule]:
        found: list[list[_CompiledRule]] = []
        for root, keys in ((self._root, segments), (self._root_folded, folded)):
            node = root
            if node.rules:
                found.append(node.rules)
            for segment in keys:
                child = node.children.get(segment)
                if child is None:
                    break
                node = child
                if node.rules:
                    found.append(node.rules)
        if not found:
            return ()
        if len(found) == 1:
            return found[0]
        return heapq.merge(*found, key=_rank)

    def __iter__(self) -> Iterator[model.Rule]:
        return iter(self._rules)
