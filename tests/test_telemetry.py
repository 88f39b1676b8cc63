"""Tracing: W3C Trace Context in and out, and the spans of a real sign-in and step-up.

The gateway runs in-process in front of the recording echo upstream and the test
OP, with an in-memory span exporter; a subprocess test sends spans with the real
OTLP/HTTP exporter to a loopback receiver that decodes them, and another runs the
gateway with the OpenTelemetry packages made unimportable.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway import tracecontext, tracing
from gateway.model import TelemetryConfig
from gateway.telemetry import Tracing
from tests.conftest import CLIENT_SECRET, SESSION_SECRET, free_port
from tests.support.op import OpUser
from tests.support.upstream import header_values
from tests.test_redis_gateway import prefix, redis_session  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parent.parent
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
PHR_USER = OpUser(acr="phr", amr=["hwk"])


# -- which client trace headers are passed on (pure) -------------------------------


@pytest.mark.parametrize(
    "value",
    [
        TRACEPARENT,
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-ff",
    ],
)
def test_a_well_formed_traceparent_is_accepted(value: str) -> None:
    assert tracecontext.valid_traceparent(value)


MALFORMED_TRACEPARENTS = [
    "",
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # only version 00
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # uppercase
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero parent id
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # 31 digits
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
    " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nX-Evil: 1",
    "<script>alert(1)</script>",
]


@pytest.mark.parametrize("value", MALFORMED_TRACEPARENTS)
def test_a_malformed_traceparent_is_refused(value: str) -> None:
    assert not tracecontext.valid_traceparent(value)
    assert tracecontext.inbound([value], [TRACESTATE]) is None


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (TRACESTATE, True),
        ("congo=t61rcWkgMzE", True),
        ("tenant@vendor=x, ,other=y", True),  # empty members are allowed
        (",".join(f"k{i}=v" for i in range(32)), True),
        (",".join(f"k{i}=v" for i in range(33)), False),  # over 32 members
        ("a=" + "x" * 256, True),  # a value: up to 256 characters
        ("a=" + "x" * 257, False),
        (",".join(f"key{i}=" + "v" * 40 for i in range(11)), True),  # 505 characters
        (",".join(f"key{i}=" + "v" * 40 for i in range(12)), False),  # 551: over 512
        ("congo=1,congo=2", False),  # one key twice
        ("Congo=1", False),
        ("congo=a=b", False),
        ("congo", False),
        ("congo=1 ", True),  # spaces around a member are list syntax
        ("congo=\x01", False),
        ("", False),
    ],
)
def test_tracestate_is_bounded_and_well_formed(value: str, valid: bool) -> None:
    assert tracecontext.valid_tracestate(value) is valid


def test_a_bad_tracestate_is_dropped_alone_and_two_traceparents_drop_both() -> None:
    kept = tracecontext.inbound([TRACEPARENT], ["Bad State"])
    assert kept == tracecontext.TraceContext(TRACEPARENT, None)
    both = tracecontext.inbound([TRACEPARENT], ["congo=1", "rojo=2"])
    assert both is not None and both.tracestate == "congo=1,rojo=2"
    assert tracecontext.inbound([TRACEPARENT, TRACEPARENT], [TRACESTATE]) is None
    assert tracecontext.inbound([], [TRACESTATE]) is None


def test_tracing_is_on_only_with_an_endpoint() -> None:
    off = TelemetryConfig()
    on = TelemetryConfig(otlp_endpoint="http://127.0.0.1:4318")
    assert tracing.otlp_endpoint(off, {}) is None
    assert tracing.otlp_endpoint(on, {}) == "http://127.0.0.1:4318"
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4319"}
    assert tracing.otlp_endpoint(off, env) == "http://127.0.0.1:4319"
    assert tracing.otlp_endpoint(on, {**env, "OTEL_SDK_DISABLED": "true"}) is None


# -- tracing off: the gateway passes a client's well-formed context on, unchanged -----


async def test_tracing_off_passes_a_valid_context_unchanged(stack, api) -> None:
    assert stack.gateway.tracing is None
    headers = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    async with api.get(f"{stack.url}/public/x", headers=headers) as resp:
        record = await resp.json()
    assert header_values(record, "traceparent") == [TRACEPARENT]
    assert header_values(record, "tracestate") == [TRACESTATE]


@pytest.mark.parametrize(
    "sent",
    [
        [("traceparent", bad), ("tracestate", TRACESTATE)]
        for bad in MALFORMED_TRACEPARENTS
        if "\r" not in bad and bad.strip() == bad and bad
    ]
    + [
        [("traceparent", TRACEPARENT), ("traceparent", TRACEPARENT)],
        [("trace_parent", TRACEPARENT), ("Trace.State", TRACESTATE)],  # near names
        [("tracestate", TRACESTATE)],  # no parent
    ],
)
async def test_malformed_trace_headers_never_reach_the_upstream(stack, api, sent) -> None:
    async with api.get(f"{stack.url}/public/x", headers=CIMultiDict(sent)) as r:
        record = await r.json()
    names = {name.lower().replace("_", "").replace(".", "") for name, _ in record["headers"]}
    assert "traceparent" not in names and "tracestate" not in names


async def test_a_malformed_tracestate_is_dropped_the_traceparent_kept(stack, api) -> None:
    headers = {"traceparent": TRACEPARENT, "tracestate": "x=" + "y" * 600}
    async with api.get(f"{stack.url}/public/x", headers=headers) as resp:
        record = await resp.json()
    assert header_values(record, "traceparent") == [TRACEPARENT]
    assert header_values(record, "tracestate") == []


# -- tracing on: a sign-in and a step-up, span by span --------------------------------


def in_memory() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def traceparent_of(span: ReadableSpan) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def assert_no_secret(spans: list[ReadableSpan], secrets: list[str]) -> None:
    """No secret in any span's name, attribute key or value, event or status."""
    secrets = [value for value in secrets if value and len(value) >= 6]
    assert secrets
    for span in spans:
        texts = [span.name, str(span.status.description or "")]
        for key, value in (span.attributes or {}).items():
            texts += [key, str(value)]
        for event in span.events:
            texts += [event.name, *(f"{k}={v}" for k, v in (event.attributes or {}).items())]
        for text in texts:
            for secret in secrets:
                assert secret not in text, (span.name, text)


async def test_spans_of_a_sign_in_and_a_step_up(make_stack, browser) -> None:
    tracer, exporter = in_memory()
    stack = await make_stack(tracer=tracer, oidc_extra="par: true\n")
    first = await browser.follow(
        f"{stack.url}/app/home", headers={"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    )
    assert first.status == 200
    stack.op.behaviour.user = PHR_USER
    stack.op.rotate_keys("EC")  # the step-up's id token has a new kid: the JWKS is fetched
    stepped = await browser.follow(f"{stack.url}/transfers/new")
    assert stepped.status == 200
    async with browser.http.get(
        f"{stack.url}/transfers/new",
        headers={"traceparent": TRACEPARENT, "tracestate": TRACESTATE, "Accept": "text/html"},
    ) as resp:
        assert resp.status == 200
        record = await resp.json()
    spans = list(exporter.get_finished_spans())
    by_id = {span.get_span_context().span_id: span for span in spans}

    # The last request: the client's span is the parent; decision and upstream its children.
    client_traced = [s for s in spans if s.get_span_context().trace_id == int(TRACE_ID, 16)]
    servers = [s for s in named(client_traced, "HTTP GET") if parent_of(s) == int(CLIENT_SPAN, 16)]
    assert len(servers) == 2  # the first request and the last; the hops between are new traces
    server = servers[-1]
    assert server.parent is not None and server.parent.is_remote
    assert server.attributes["gateway.rule"] == "transfer-page"
    assert server.attributes["gateway.decision"] == "allow"
    assert server.attributes["http.response.status_code"] == 200
    children = [s for s in spans if parent_of(s) == server.get_span_context().span_id]
    assert sorted(s.name for s in children) == ["decision", "upstream"]
    upstream = named(children, "upstream")[0]
    assert upstream.attributes["gateway.upstream"] == "app"
    assert upstream.attributes["http.response.status_code"] == 200
    # The upstream saw the gateway's span as the parent, and the client's tracestate.
    assert header_values(record, "traceparent") == [traceparent_of(upstream)]
    assert header_values(record, "tracestate") == [TRACESTATE]
    decision = named(children, "decision")[0]
    assert decision.attributes == {
        "gateway.decision": "allow",
        "gateway.rule": "transfer-page",
        "gateway.required_level": "phishing-resistant",
        "gateway.level": "phishing-resistant",
    }

    # The step-up: a challenge decided, then PAR, then (at the callback) token and JWKS.
    challenges = [
        s for s in named(spans, "decision") if s.attributes["gateway.decision"] == "challenge"
    ]
    assert {(s.attributes["gateway.rule"], s.attributes["gateway.reason"]) for s in challenges} == {
        ("signed-in", "no_session"),
        ("transfer-page", "insufficient_level"),
    }
    assert all(
        s.attributes["gateway.required_level"] in ("password", "phishing-resistant")
        for s in challenges
    )
    for name in ("oidc.par", "oidc.token", "oidc.jwks"):
        calls = named(spans, name)
        assert calls, name
        for call in calls:
            assert by_id[parent_of(call)].name == "HTTP GET"  # inside the request's trace
            assert call.attributes["http.response.status_code"] in (200, 201)
    # The provider saw each call's own span as the parent.
    seen = stack.op.traceparents
    for path, name in (("/par", "oidc.par"), ("/token", "oidc.token"), ("/jwks", "oidc.jwks")):
        expected = {traceparent_of(span) for span in named(spans, name)}
        assert {tp for p, tp in seen if p == path and tp is not None} == expected, path
    # Discovery and the first JWKS at start-up are outside any request: not traced.
    assert ("/.well-known/openid-configuration", None) in seen

    session_cookie = browser.cookie("stepup_session")
    assert session_cookie
    secrets = [session_cookie, CLIENT_SECRET, SESSION_SECRET]
    for request in stack.op.token_requests:
        secrets += [request.get("code", ""), request.get("code_verifier", "")]
    for request in stack.op.pushed_requests + stack.op.authorization_requests:
        secrets += [request.get("state", ""), request.get("nonce", "")]
    secrets += [request.get("request_uri", "") for request in stack.op.authorization_requests]
    assert_no_secret(spans, secrets)


async def spans_of_a_signed_in_request(
    make_stack, browser, key_prefix: str, **stack_options: Any
) -> list[ReadableSpan]:
    """The spans of one request after a sign-in, none of them carrying a secret."""
    tracer, exporter = in_memory()
    stack = await make_stack(tracer=tracer, **stack_options)
    assert (await browser.follow(f"{stack.url}/app/home")).status == 200
    exporter.clear()
    async with browser.http.get(f"{stack.url}/app/x", headers={"Accept": "text/html"}) as resp:
        assert resp.status == 200
    spans = list(exporter.get_finished_spans())
    assert_no_secret(spans, [browser.cookie("stepup_session") or "", key_prefix])
    return spans


def redis_span_of_the_request(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    """The one span ``name``, a Redis call made for the request, with no argument."""
    (server,) = named(spans, "HTTP GET")
    (call,) = named(spans, name)
    assert parent_of(call) == server.get_span_context().span_id
    assert call.attributes == {"db.system.name": "redis"}
    return call


async def test_session_store_calls_have_spans_with_redis(make_stack, browser, prefix) -> None:  # noqa: F811
    spans = await spans_of_a_signed_in_request(
        make_stack, browser, prefix, store="redis", session_extra=redis_session(prefix)
    )
    assert redis_span_of_the_request(spans, "session.load")


async def test_revocation_lookups_in_redis_have_spans(make_stack, browser, prefix) -> None:  # noqa: F811
    """Cookie sessions with session.redis_url: each request asks Redis whether the
    session was signed out, and that call is a span of the request (no argument)."""
    spans = await spans_of_a_signed_in_request(
        make_stack, browser, prefix, session_extra=redis_session(prefix)
    )
    assert redis_span_of_the_request(spans, "store.get_records")
    assert named(spans, "session.load") == []  # the cookie store does no I/O


async def test_forward_auth_requests_are_traced(make_stack, api) -> None:
    tracer, exporter = in_memory()
    stack = await make_stack(
        tracer=tracer, server_extra="mode: both\ntrusted_proxies: [127.0.0.1/32]\n"
    )
    headers = {
        "X-Original-Method": "GET",
        "X-Original-URL": f"{stack.url}/app/x?code=secret-code-123&state=secret-state-456",
        "traceparent": TRACEPARENT,
        "Accept": "application/json",
    }
    async with api.get(f"{stack.url}/_gateway/auth", headers=headers) as resp:
        assert resp.status == 401
    spans = list(exporter.get_finished_spans())
    (server,) = named(spans, "HTTP GET")
    assert server.get_span_context().trace_id == int(TRACE_ID, 16)
    assert server.attributes["http.response.status_code"] == 401
    assert server.attributes["gateway.decision"] == "challenge"
    (decision,) = named(spans, "decision")
    assert parent_of(decision) == server.get_span_context().span_id
    assert decision.attributes["gateway.rule"] == "signed-in"
    assert decision.attributes["gateway.reason"] == "no_session"
    assert_no_secret(spans, ["secret-code-123", "secret-state-456"])


async def test_every_repeated_request_is_traced(make_stack, browser) -> None:
    """With tracing on, the same bytes sent again are decided and traced again (never
    forwarded as remembered, which would skip the decision and the upstream spans)."""
    from tests.test_decision_memo import page_head, send_in_parts
    from tests.test_gateway import COOKIE

    tracer, exporter = in_memory()
    stack = await make_stack(tracer=tracer)
    assert (await browser.follow(f"{stack.url}/app/home")).status == 200
    head = page_head(stack, browser.cookie(COOKIE) or "", "/app/again")
    exporter.clear()
    for _ in range(3):
        assert [status for status, _ in await send_in_parts(stack, head)] == [b"200"]
    spans = list(exporter.get_finished_spans())
    assert len(named(spans, "decision")) == len(named(spans, "upstream")) == 3
    assert len(stack.gateway.decisions.exact) == 0


# -- the CLI, the real exporter, and the gateway without the extra --------------------


def write_config(path: Path, *, port: int, upstream: str, telemetry: str = "") -> None:
    path.write_text(
        textwrap.dedent(f"""\
        server:
          listen: 127.0.0.1:{port}
          public_url: http://127.0.0.1:{port}
        upstreams:
          app: {upstream}
        oidc:
          issuer: http://127.0.0.1:{free_port()}
          client_id: gateway
          client_secret: {CLIENT_SECRET}
        session:
          secret: {SESSION_SECRET}
          cookie_secure: false
        assurance:
          levels:
            - name: password
              acr: [urn:example:loa:1]
        rules:
          - name: public
            match: {{path: /public/**}}
            require: none
        """)
        + telemetry
    )


# Makes every opentelemetry module unimportable, as on an install without the extra.
BLOCK_OTEL = """\
import sys
class _NoOtel:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoOtel())
from gateway.cli import main
sys.argv[0] = "stepup-gateway"
sys.exit(main())
"""


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def cli(*args: str, block_otel: bool = False) -> subprocess.CompletedProcess[str]:
    command = ["-c", BLOCK_OTEL] if block_otel else ["-m", "gateway"]
    return subprocess.run(
        [sys.executable, *command, *args],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_says_tracing_is_on_and_refuses_it_without_the_extra(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    telemetry = "telemetry:\n  otlp_endpoint: http://127.0.0.1:4318\n"
    write_config(path, port=free_port(), upstream="http://127.0.0.1:9", telemetry=telemetry)
    on = cli("check", "--config", str(path))
    assert (on.returncode, on.stdout) == (
        0,
        "ok\ntracing: on, spans to http://127.0.0.1:4318 (OTLP/HTTP)\n",
    )
    missing = cli("check", "--config", str(path), block_otel=True)
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert "otel extra" in missing.stdout and "Traceback" not in missing.stdout + missing.stderr
    run = cli("run", "--config", str(path), block_otel=True)
    assert run.returncode == 1 and "otel extra" in run.stderr
    write_config(path, port=free_port(), upstream="http://127.0.0.1:9")
    assert cli("check", "--config", str(path), block_otel=True).stdout == "ok\n"


class Child:
    """A `run` process; its output kept for the failure message."""

    def __init__(self, path: Path, *, block_otel: bool = False, **env: str) -> None:
        command = ["-c", BLOCK_OTEL] if block_otel else ["-m", "gateway"]
        self.proc = subprocess.Popen(
            [sys.executable, *command, "run", "--config", str(path)],
            cwd=REPO,
            env=environment(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    async def wait_listening(self, url: str) -> None:
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.output()
                try:
                    async with http.get(f"{url}/_gateway/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(self.output())

    def output(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


async def test_the_gateway_runs_without_the_extra(tmp_path: Path, upstream) -> None:
    port = free_port()
    path = tmp_path / "config.yaml"
    write_config(path, port=port, upstream=str(upstream.make_url("")).rstrip("/"))
    child = Child(path, block_otel=True)
    try:
        await child.wait_listening(f"http://127.0.0.1:{port}")
        async with aiohttp.ClientSession() as http:
            headers = {"traceparent": TRACEPARENT, "tracestate": "bad state"}
            async with http.get(f"http://127.0.0.1:{port}/public/x", headers=headers) as resp:
                assert resp.status == 200
                record = await resp.json()
    finally:
        child.stop()
    assert header_values(record, "traceparent") == [TRACEPARENT]
    assert header_values(record, "tracestate") == []


async def test_spans_reach_an_otlp_collector(tmp_path: Path, upstream, aiohttp_server) -> None:
    received: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        received.append(message)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    collector = await aiohttp_server(app)
    port = free_port()
    path = tmp_path / "config.yaml"
    telemetry = (
        f"telemetry:\n  otlp_endpoint: {str(collector.make_url('')).rstrip('/')}\n"
        "  service_name: gateway-under-test\n"
    )
    write_config(
        path, port=port, upstream=str(upstream.make_url("")).rstrip("/"), telemetry=telemetry
    )
    child = Child(path, OTEL_BSP_SCHEDULE_DELAY="100")
    try:
        await child.wait_listening(f"http://127.0.0.1:{port}")
        async with aiohttp.ClientSession() as http:
            headers = {"traceparent": TRACEPARENT}
            async with http.get(f"http://127.0.0.1:{port}/public/x", headers=headers) as resp:
                assert resp.status == 200
                record = await resp.json()
        spans: dict[str, Any] = {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(spans) < 3:
            await asyncio.sleep(0.1)
            for message in received:
                for resource_spans in message.resource_spans:
                    attributes = {
                        a.key: a.value.string_value for a in resource_spans.resource.attributes
                    }
                    assert attributes["service.name"] == "gateway-under-test"
                    for scope in resource_spans.scope_spans:
                        for span in scope.spans:
                            if span.trace_id.hex() == TRACE_ID:
                                spans[span.name] = span
    finally:
        child.stop()
    assert set(spans) == {"HTTP GET", "decision", "upstream"}, json.dumps(sorted(spans))
    server = spans["HTTP GET"]
    assert server.parent_span_id.hex() == CLIENT_SPAN
    assert spans["upstream"].parent_span_id == server.span_id
    (sent,) = header_values(record, "traceparent")
    assert sent.startswith(f"00-{TRACE_ID}-{spans['upstream'].span_id.hex()}-")
