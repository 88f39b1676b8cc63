"""Glob compilation and first-match rule lookup (gateway.rules)."""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import errors, model
from gateway.rules import RuleSet, compile_glob


def make_rule(
    name: str,
    path: str,
    *,
    index: int = 0,
    methods: Sequence[str] | None = None,
    host: str | None = None,
) -> model.Rule:
    return model.Rule(
        name=name,
        index=index,
        match=model.Match(
            path=path, methods=frozenset(methods) if methods is not None else None, host=host
        ),
        require=model.Requirement(level=None),
        upstream="app",
    )


def in_order(*rules: model.Rule) -> RuleSet:
    """A rule set whose rules are indexed in the order given, as the config loader does."""
    return RuleSet([dataclasses.replace(rule, index=index) for index, rule in enumerate(rules)])


# ---------------------------------------------------------------------------
# globs


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/api/**", "/api", True),
        ("/api/**", "/api/", True),
        ("/api/**", "/api/x", True),
        ("/api/**", "/api/x/y", True),
        ("/api/**", "/apix", False),
        ("/api/**", "/", False),
        ("/api/**", "/other/api/x", False),
        ("/**", "/", True),
        ("/**", "/anything/at/all/", True),
        ("/", "/", True),
        ("/", "/a", False),
        ("/api", "/api", True),
        ("/api", "/api/", False),
        ("/api/", "/api/", True),
        ("/api/", "/api", False),
        ("/users/*", "/users/42", True),
        ("/users/*", "/users/42/x", False),
        ("/users/*", "/users", False),
        ("/users/*", "/users/", True),  # '*' is any characters but '/', also none
        ("/users/*/profile", "/users/42/profile", True),
        ("/users/*/profile", "/users/profile", False),
        ("/a/**/b", "/a/b", True),
        ("/a/**/b", "/a/x/y/b", True),
        ("/a/**/b", "/a/x/y/c", False),
        ("/**/b", "/b", True),
        ("/**/b", "/x/b", True),
        ("/**/b", "/x/bb", False),
        ("/a/**/**", "/a", True),
        ("/**/a/**/b/**/c", "/x/a/y/b/z/c", True),
        ("/**/a/**/b/**/c", "/x/a/y/c/z/b", False),
        ("/files/*.pdf", "/files/report.pdf", True),
        ("/files/*.pdf", "/files/.pdf", True),
        ("/files/*.pdf", "/files/report.pdf.exe", False),
        ("/files/*.pdf", "/files/a/report.pdf", False),
        ("/files/*-v*.pdf", "/files/a-v2.pdf", True),
        ("/files/*-v*.pdf", "/files/a-v.pdf", True),
        ("/files/*-v*.pdf", "/files/av2.pdf", False),
        ("/files/a*a", "/files/a", False),  # the pieces may not overlap
        ("/files/a*a", "/files/aa", True),
        ("/files/*a*a", "/files/a", False),
        ("/files/*a*a", "/files/xaya", True),
        ("/**/*.pdf", "/x/y/z.pdf", True),
        # the pattern is canonicalised like a request path
        ("/%7euser/**", "/~user/x", True),
        ("/caf\u00e9/**", "/caf%C3%A9/x", True),
        ("/a%20b", "/a%20b", True),
        ("/a%2a", "/a%2A", True),  # an escaped '*' is literal
        ("/a%2a", "/ab", False),
    ],
)
def test_glob(pattern: str, path: str, matches: bool) -> None:
    assert compile_glob(pattern).matches(path) is matches


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("api/**", "must start with '/'"),
        ("", "must start with '/'"),
        ("/api**", "'\\*\\*' must be a whole path segment"),
        ("/api/**.pdf", "'\\*\\*' must be a whole path segment"),
        ("/api/***", "'\\*\\*' must be a whole path segment"),
        ("/a//b", "empty segment"),
        ("/a/./b", "'\\.' or '\\.\\.' segment"),
        ("/a/../b", "'\\.' or '\\.\\.' segment"),
        ("/a%2Fb", "encoded slash"),
        ("/a/%2e%2e/b", "dot-segment"),
        ("/a?x", "'\\?'"),
        ("/a\\b", "backslash"),
    ],
)
def test_compile_glob_refuses(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compile_glob(pattern)


def test_rule_set_names_the_rule_with_a_bad_glob() -> None:
    with pytest.raises(ValueError, match="rule 'broken': path pattern '/a\\*\\*'"):
        in_order(make_rule("ok", "/ok/**"), make_rule("broken", "/a**"))


def test_glob_keeps_pattern_and_literal_prefix() -> None:
    glob = compile_glob("/api/%7ev1/*/x/**")
    assert glob.pattern == "/api/%7ev1/*/x/**"
    assert glob.canonical == "/api/~v1/*/x/**"
    assert glob.literal_prefix == ("api", "~v1")
    assert compile_glob("/*.pdf").literal_prefix == ()
    assert compile_glob("/a/b").literal_prefix == ("a", "b")


def test_many_wildcards_do_not_blow_up() -> None:
    # Backtracking regex engines take O(n^k) here; the matcher must not.
    glob = compile_glob("/**/a/**/b/**/c/**/d/**/e")
    assert not glob.matches("/" + "a/b/c/d/" * 500 + "x")
    in_segment = compile_glob("/*a*b*c*d*e*f")
    assert not in_segment.matches("/" + "abcde" * 1000)


def reference_regex(pattern: str) -> re.Pattern[str]:
    """The glob semantics written as one regex over the whole path string."""
    escaped = re.escape(pattern)
    escaped = re.sub(r"/\\\*\\\*(?=/|$)", "(?:/[^/]*)*", escaped)
    return re.compile(escaped.replace(r"\*", "[^/]*"))


_PATTERN_SEGMENT = st.sampled_from(
    ["a", "b", "ab", "*", "**", "a*", "*b", "*a*", "a*b", "*a*a", "*b*a*", "**"]
)
_PATH_SEGMENT = st.sampled_from(["a", "b", "ab", "ba", "aab", "bab", "c", ""])


def _join(segments: list[str], trailing_slash: bool) -> str:
    return "/" + "/".join(segments) + ("/" if trailing_slash and segments else "")


patterns = st.builds(_join, st.lists(_PATTERN_SEGMENT, max_size=5), st.booleans())
paths = st.builds(_join, st.lists(_PATH_SEGMENT.filter(bool), max_size=6), st.booleans())


@given(patterns, st.lists(_PATH_SEGMENT, max_size=7))
def test_glob_agrees_with_reference_regex(pattern: str, path_segments: list[str]) -> None:
    # Paths here may hold empty segments too: the matcher must not rely on them being absent.
    path = "/" + "/".join(path_segments)
    expected = reference_regex(pattern).fullmatch(path) is not None
    assert compile_glob(pattern).matches(path) is expected, (pattern, path)


# ---------------------------------------------------------------------------
# first match wins


def test_first_match_wins_by_index_not_position() -> None:
    rules = [
        make_rule("catch-all", "/**", index=2),
        make_rule("api", "/api/**", index=1),
        make_rule("transfers", "/api/transfers/**", index=0),
    ]
    rule_set = RuleSet(rules)
    assert [rule.name for rule in rule_set.rules] == ["transfers", "api", "catch-all"]
    assert _name(rule_set.match("GET", None, "/api/transfers/1")) == "transfers"
    assert _name(rule_set.match("GET", None, "/api/accounts")) == "api"
    assert _name(rule_set.match("GET", None, "/")) == "catch-all"


def test_a_shallow_or_wildcard_rule_listed_first_wins_over_a_deeper_one() -> None:
    rules = in_order(
        make_rule("pdfs", "/**/*.pdf"),
        make_rule("api", "/api/**"),
        make_rule("transfers", "/api/transfers/**"),
    )
    assert _name(rules.match("GET", None, "/api/transfers/x.pdf")) == "pdfs"
    assert _name(rules.match("GET", None, "/api/transfers/x")) == "api"


def test_no_match_is_none() -> None:
    rules = in_order(make_rule("api", "/api/**"), make_rule("public", "/public/*"))
    assert rules.match("GET", None, "/") is None
    assert rules.match("GET", None, "/public/a/b") is None
    assert rules.match("GET", None, "not-a-path") is None
    assert RuleSet([]).match("GET", None, "/") is None


def test_host_rules() -> None:
    rules = in_order(
        make_rule("bank-admin", "/admin/**", host="bank.example.com"),
        make_rule("other-admin", "/admin/**", host="Other.Example.com"),
        make_rule("any", "/**"),
    )
    assert _name(rules.match("GET", "bank.example.com", "/admin/x")) == "bank-admin"
    assert _name(rules.match("GET", "BANK.example.com", "/admin/x")) == "bank-admin"
    assert _name(rules.match("GET", "other.example.com", "/admin/x")) == "other-admin"
    assert _name(rules.match("GET", "bank.example.com:8443", "/admin/x")) == "any"
    assert _name(rules.match("GET", None, "/admin/x")) == "any"


# ---------------------------------------------------------------------------
# methods


def test_methods() -> None:
    rules = in_order(
        make_rule("read", "/api/**", methods=["GET"]),
        make_rule("write", "/api/**", methods=["POST", "PUT"]),
        make_rule("dav", "/dav/**", methods=["PROPFIND"]),
        make_rule("rest", "/**"),
    )
    assert _name(rules.match("GET", None, "/api/x")) == "read"
    assert _name(rules.match("HEAD", None, "/api/x")) == "read"  # GET covers HEAD
    assert _name(rules.match("POST", None, "/api/x")) == "write"
    assert _name(rules.match("DELETE", None, "/api/x")) == "rest"
    assert _name(rules.match("PROPFIND", None, "/dav/x")) == "dav"
    assert _name(rules.match("PROPFIND", None, "/api/x")) == "rest"


def test_head_only_rule_does_not_cover_get() -> None:
    rules = in_order(make_rule("head", "/**", methods=["HEAD"]))
    assert _name(rules.match("HEAD", None, "/")) == "head"
    assert rules.match("GET", None, "/") is None


@pytest.mark.parametrize(
    ("method", "known"),
    [
        ("GET", True),
        ("HEAD", True),
        ("DELETE", True),
        ("PROPFIND", True),  # a rule names it
        ("MKCOL", False),
        ("post", False),
        ("Get", False),
        ("FOO", False),
        ("propfind", False),  # names compare exactly
        ("", False),
    ],
)
def test_method_known(method: str, known: bool) -> None:
    rules = in_order(make_rule("dav", "/dav/**", methods=["PROPFIND"]), make_rule("rest", "/**"))
    assert rules.method_known(method) is known
    if known:
        rules.require_known_method(method)
    else:
        with pytest.raises(errors.MethodNotAllowed) as info:
            rules.require_known_method(method)
        assert info.value.status == 405


def test_lower_case_method_allowed_only_when_a_rule_names_it() -> None:
    assert not in_order(make_rule("rest", "/**")).method_known("post")
    named = in_order(make_rule("odd", "/odd", methods=["post"]), make_rule("rest", "/**"))
    assert named.method_known("post")
    assert _name(named.match("post", None, "/odd")) == "odd"
    assert _name(named.match("POST", None, "/odd")) == "rest"


# ---------------------------------------------------------------------------
# the prefix index


def test_index_narrows_candidates() -> None:
    rules = [make_rule(f"svc{i}", f"/svc{i}/**", index=i) for i in range(1000)]
    rules.append(make_rule("pdf", "/*.pdf", index=1000))
    rules.append(make_rule("catch-all", "/**", index=1001))
    rule_set = RuleSet(rules)
    assert [rule.name for rule in rule_set.candidates("/svc500/x/y")] == [
        "svc500",
        "pdf",
        "catch-all",
    ]
    assert [rule.name for rule in rule_set.candidates("/other")] == ["pdf", "catch-all"]
    assert _name(rule_set.match("GET", None, "/svc500/x/y")) == "svc500"
    assert _name(rule_set.match("GET", None, "/svc5000/x")) == "catch-all"
    assert _name(rule_set.match("GET", None, "/svc5.pdf")) == "pdf"


def test_index_merges_candidates_from_every_depth_in_rule_order() -> None:
    rule_set = RuleSet(
        [
            make_rule("deep", "/a/b/c", index=0),
            make_rule("root", "/**", index=1),
            make_rule("mid", "/a/b/**", index=2),
            make_rule("top", "/a/**", index=3),
            make_rule("deep2", "/a/b/c/**", index=4),
        ]
    )
    assert [rule.name for rule in rule_set.candidates("/a/b/c")] == [
        "deep",
        "root",
        "mid",
        "top",
        "deep2",
    ]


_METHOD_SETS = st.sampled_from([None, ("GET",), ("POST",), ("GET", "POST"), ("HEAD",), ("FOO",)])
_HOSTS = st.sampled_from([None, "a.example", "b.example"])
_rule_specs = st.lists(st.tuples(patterns, _METHOD_SETS, _HOSTS), max_size=12)


def naive_match(
    rules: Sequence[model.Rule], method: str, host: str | None, path: str
) -> model.Rule | None:
    for rule in sorted(rules, key=lambda rule: rule.index):
        methods = rule.match.methods
        if methods is not None and not (
            method in methods or (method == "HEAD" and "GET" in methods)
        ):
            continue
        if rule.match.host is not None and rule.match.host != host:
            continue
        if reference_regex(rule.match.path).fullmatch(path):
            return rule
    return None


@given(
    _rule_specs,
    st.randoms(use_true_random=False),
    st.lists(
        st.tuples(st.sampled_from(["GET", "HEAD", "POST", "FOO"]), _HOSTS, paths), max_size=10
    ),
)
def test_rule_set_agrees_with_linear_scan(
    specs: list[tuple[str, tuple[str, ...] | None, str | None]],
    rng: random.Random,
    requests: list[tuple[str, str | None, str]],
) -> None:
    indexes = list(range(len(specs)))
    rng.shuffle(indexes)
    rules = [
        make_rule(f"r{index}", pattern, index=index, methods=methods, host=host)
        for index, (pattern, methods, host) in zip(indexes, specs, strict=True)
    ]
    rule_set = RuleSet(rules)
    for method, host, path in requests:
        assert rule_set.match(method, host, path) == naive_match(rules, method, host, path)


def _name(rule: model.Rule | None) -> str | None:
    return rule.name if rule is not None else None


# ---------------------------------------------------------------------------
# case-insensitive upstreams and known hosts


def _with_upstream(rule: model.Rule, upstream: str, index: int) -> model.Rule:
    return dataclasses.replace(rule, upstream=upstream, index=index)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/transfers/1", "transfers"),
        ("/API/Transfers/1", "transfers"),
        ("/api/TRANSFERS", "transfers"),
        ("/Api/Transfers/X/y", "transfers"),
        ("/files/Report.PDF", "pdf"),
        ("/files/report.pdf", "pdf"),
        ("/caf%C3%A9/x", "cafe"),  # escapes compare case-insensitively too
        ("/CAF%C3%A9/x", "cafe"),
        ("/other", "catch-all"),
    ],
)
def test_rules_for_a_case_insensitive_upstream_ignore_case(path: str, expected: str) -> None:
    rules = [
        _with_upstream(make_rule("transfers", "/api/transfers/**"), "express", 0),
        _with_upstream(make_rule("pdf", "/files/*.pdf"), "express", 1),
        _with_upstream(make_rule("cafe", "/café/**"), "express", 2),
        _with_upstream(make_rule("catch-all", "/**"), "express", 3),
    ]
    rule_set = RuleSet(rules, case_insensitive_upstreams={"express"})
    matched = rule_set.match("POST", None, path)
    assert matched is not None and matched.name == expected
    # The same rules for a case-sensitive upstream: another case is another path.
    plain = RuleSet(rules).match("POST", None, path)
    assert plain is not None
    if path != path.lower() and expected != "cafe":
        assert plain.name == "catch-all"


def test_case_folding_is_per_upstream_and_keeps_rule_order() -> None:
    rules = [
        _with_upstream(make_rule("strict", "/api/transfers/**"), "express", 0),
        _with_upstream(make_rule("jetty-admin", "/admin/**"), "jetty", 1),
        _with_upstream(make_rule("lenient", "/**"), "jetty", 2),
    ]
    rule_set = RuleSet(rules, case_insensitive_upstreams={"express"})
    assert [r.name for r in rule_set.candidates_for("GET", None, "/API/transfers")] == [
        "strict",
        "lenient",
    ]
    matched = rule_set.match("GET", None, "/ADMIN/x")
    assert matched is not None and matched.name == "lenient"  # jetty is case-sensitive


@pytest.mark.parametrize(
    ("host", "known"),
    [
        ("bank.example.com", True),
        ("gw.example.com", True),
        ("10.0.0.5", True),
        ("bank.example.com:8443", False),
        ("10.0.0.6", False),
        ("other.example.com", False),
        (None, False),  # HTTP/1.0 without Host
    ],
)
def test_with_host_scoped_rules_only_known_hosts_are_served(host: str | None, known: bool) -> None:
    rule_set = in_order(
        make_rule("transfers", "/api/**", host="bank.example.com"), make_rule("all", "/**")
    )
    with_extras = RuleSet(rule_set.rules, known_hosts=("gw.example.com", "10.0.0.5"))
    assert with_extras.host_known(host) is known
    # No rule names a host: every host is judged alike.
    assert in_order(make_rule("all", "/**")).host_known(host) is True
