"""DPoP proofs and introspection, against the real authorization server.

Each DPoP refusal sends a real DPoP-bound token with a proof that fails exactly one
check; the same request with a correct proof is forwarded (the control).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.conftest import StackFactory, free_port
from tests.support.authz import (
    OPAQUE_AUDIENCE,
    AuthorizationServer,
    DpopKey,
    authorize,
    authz,
    challenge_params,
    start_authorization_server,
)
from tests.support.upstream import header_values
from tests.test_access_tokens import RULES, api_section, call, gateway_for
from tests.test_redis_gateway import prefix, redis_session

__all__ = ["authz", "prefix"]  # fixtures, imported for pytest


def refused_reasons(logs: list[dict[str, Any]]) -> list[str]:
    return [e["reason"] for e in logs if e["event"] == "access_token_refused"]


PROOF_FAULTS: dict[str, tuple[dict[str, Any], str]] = {
    "htm": ({"method": "POST"}, "dpop_htm"),
    "htu_path": ({"path": "/api/other"}, "dpop_htu"),
    "htu_host": ({"host": "127.0.0.2"}, "dpop_htu"),
    "ath": ({"ath": "x" * 43}, "dpop_ath"),
    "iat_old": ({"iat": int(time.time()) - 3600}, "dpop_iat"),
    "typ": ({"header": {"typ": "JWT"}}, "dpop_typ"),
    "other_key": ({"key": "other"}, "dpop_key_mismatch"),
    "private_key_in_header": ({"header": {"jwk": "private"}}, "dpop_key"),
}


@pytest.mark.parametrize("case", list(PROOF_FAULTS))
async def test_dpop_proof_failing_one_check_is_refused(
    make_stack: StackFactory, authz: AuthorizationServer, case: str
) -> None:
    stack = await gateway_for(make_stack, authz)
    key = DpopKey.generate()
    token = (await authorize(authz.issuer, dpop=key)).access_token
    path = "/api/accounts"
    control = key.proof("GET", stack.url + path, access_token=token)
    assert (await call(stack, "GET", path, token=token, scheme="DPoP", proof=control))[0] == 200

    fault, reason = PROOF_FAULTS[case]
    fault = dict(fault)
    signer = DpopKey.generate() if fault.pop("key", None) else key
    method = fault.pop("method", "GET")
    url = stack.url.replace("127.0.0.1", fault.pop("host", "127.0.0.1")) + fault.pop("path", path)
    header = fault.pop("header", {})
    if header.get("jwk") == "private":
        jwk = __import__("json").loads(
            __import__("jwt").algorithms.ECAlgorithm.to_jwk(signer.private)
        )
        header = {"jwk": jwk}
    proof = signer.proof(method, url, access_token=token, header=header, **fault)
    with capture_logs() as logs:
        status, headers, body = await call(
            stack, "GET", path, token=token, scheme="DPoP", proof=proof
        )
    assert status == 401
    assert headers["WWW-Authenticate"].startswith('DPoP algs="')
    assert challenge_params(headers["WWW-Authenticate"])["error"] == "invalid_token"
    assert body["error"] == "invalid_token"
    assert refused_reasons(logs) == [reason]
    assert len(stack.seen) == 1  # the control only


async def test_dpop_replay_and_missing_proof(
    make_stack: StackFactory, authz: AuthorizationServer
) -> None:
    stack = await gateway_for(make_stack, authz)
    key = DpopKey.generate()
    token = (await authorize(authz.issuer, dpop=key)).access_token
    proof = key.proof("GET", stack.url + "/api/accounts", access_token=token)
    assert (await call(stack, "GET", "/api/accounts", token=token, scheme="DPoP", proof=proof))[
        0
    ] == 200
    cases = {
        "dpop_replay": {"scheme": "DPoP", "proof": proof},
        "dpop_proof_missing": {"scheme": "DPoP"},
        "bound_token_as_bearer": {"scheme": "Bearer"},
    }
    for reason, kwargs in cases.items():
        with capture_logs() as logs:
            status, headers, _ = await call(stack, "GET", "/api/accounts", token=token, **kwargs)
        assert status == 401, reason
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]
        assert refused_reasons(logs) == [reason]
    assert len(stack.seen) == 1


async def test_dpop_replay_is_refused_across_workers(
    make_stack: StackFactory, authz: AuthorizationServer, prefix: str
) -> None:
    """Two gateways sharing Redis (as workers or replicas do): a proof counts once."""
    stacks = [
        await make_stack(
            rules=RULES,
            extra=api_section(),
            issuer=authz.issuer,
            store="redis",
            session_extra=redis_session(prefix),
        )
        for _ in range(2)
    ]
    key = DpopKey.generate()
    token = (await authorize(authz.issuer, dpop=key)).access_token
    # One public URL for both, as behind one load balancer: the proof names the host.
    path = "/api/accounts"
    host = {"Host": "api.example.com"}
    proof = key.proof("GET", "http://api.example.com" + path, access_token=token)
    for stack in stacks:
        stack.clock.now = time.time()
    first = await call(
        stacks[0], "GET", path, token=token, scheme="DPoP", proof=proof, headers=host
    )
    assert first[0] == 200
    with capture_logs() as logs:
        second = await call(
            stacks[1], "GET", path, token=token, scheme="DPoP", proof=proof, headers=host
        )
    assert second[0] == 401
    assert refused_reasons(logs) == ["dpop_replay"]


async def test_dpop_required_refuses_bearer_tokens(
    make_stack: StackFactory, authz: AuthorizationServer
) -> None:
    stack = await gateway_for(make_stack, authz, dpop="required")
    bearer = (await authorize(authz.issuer)).access_token
    with capture_logs() as logs:
        status, headers, _ = await call(stack, "GET", "/api/accounts", token=bearer)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith('DPoP algs="')
    assert refused_reasons(logs) == ["dpop_required"]
    status, headers, _ = await call(stack, "GET", "/api/accounts")
    assert headers["WWW-Authenticate"] == 'DPoP algs="ES256 ES384 EdDSA PS256 RS256"'


async def test_dpop_off_refuses_dpop_tokens(
    make_stack: StackFactory, authz: AuthorizationServer
) -> None:
    stack = await gateway_for(make_stack, authz, dpop="off")
    key = DpopKey.generate()
    token = (await authorize(authz.issuer, dpop=key)).access_token
    proof = key.proof("GET", stack.url + "/api/accounts", access_token=token)
    status, headers, _ = await call(
        stack, "GET", "/api/accounts", token=token, scheme="DPoP", proof=proof
    )
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer ")
    assert (await call(stack, "GET", "/api/accounts"))[1]["WWW-Authenticate"] == "Bearer"


async def test_dpop_server_nonce(make_stack: StackFactory, authz: AuthorizationServer) -> None:
    stack = await gateway_for(make_stack, authz, dpop_nonce="true")
    key = DpopKey.generate()
    token = (await authorize(authz.issuer, dpop=key)).access_token
    url = stack.url + "/api/accounts"
    status, headers, body = await call(
        stack,
        "GET",
        "/api/accounts",
        token=token,
        scheme="DPoP",
        proof=key.proof("GET", url, access_token=token),
    )
    assert status == 401 and body["error"] == "use_dpop_nonce"  # RFC 9449 9
    assert challenge_params(headers["WWW-Authenticate"])["error"] == "use_dpop_nonce"
    nonce = headers["DPoP-Nonce"]
    wrong = key.proof("GET", url, access_token=token, nonce=nonce[:-2] + "AA")
    assert (await call(stack, "GET", "/api/accounts", token=token, scheme="DPoP", proof=wrong))[
        0
    ] == 401
    proof = key.proof("GET", url, access_token=token, nonce=nonce)
    status, _, _ = await call(
        stack, "GET", "/api/accounts", token=token, scheme="DPoP", proof=proof
    )
    assert status == 200


# --- introspection ----------------------------------------------------------------------


async def test_introspection_cache_and_outage(make_stack: StackFactory) -> None:
    """Its own authorization server, stopped halfway: a cached answer still serves, a
    new token fails closed with 503 and is not forwarded."""
    server = start_authorization_server(free_port())
    try:
        api = f"api:\n  audience: {OPAQUE_AUDIENCE}\n  tokens: [introspection]\n"
        stack = await make_stack(rules=RULES, extra=api, issuer=server.issuer)
        stack.clock.now = time.time()
        opaque = (await authorize(server.issuer, resource=OPAQUE_AUDIENCE)).access_token
        second = (await authorize(server.issuer, resource=OPAQUE_AUDIENCE)).access_token
        assert opaque.count(".") == 0  # opaque: only introspection can tell
        status, _, echoed = await call(stack, "GET", "/api/accounts", token=opaque)
        assert status == 200
        assert header_values(echoed, "X-Auth-Acr") == ["urn:example:loa:1"]
        assert (await call(stack, "GET", "/api/accounts", token="not-a-token"))[0] == 401
        server.stop()
        assert (await call(stack, "GET", "/api/accounts", token=opaque))[0] == 200  # cached
        # So is the inactive answer: a made-up token costs the server one request.
        assert (await call(stack, "GET", "/api/accounts", token="not-a-token"))[0] == 401
        status, _, body = await call(stack, "GET", "/api/accounts", token=second)
        assert status == 503 and body["error"] == "introspection_unreachable"
        assert len(stack.seen) == 2
        # The cache ends at introspection_cache (60 s): then the outage shows.
        stack.clock.advance(61)
        assert (await call(stack, "GET", "/api/accounts", token=opaque))[0] == 503
    finally:
        server.stop()


async def test_introspection_inactive_token(
    make_stack: StackFactory, authz: AuthorizationServer
) -> None:
    api = f"api:\n  audience: {OPAQUE_AUDIENCE}\n  tokens: [jwt, introspection]\n"
    stack = await make_stack(rules=RULES, extra=api, issuer=authz.issuer)
    stack.clock.now = time.time()
    with capture_logs() as logs:
        status, headers, _ = await call(stack, "GET", "/api/accounts", token="unknown-token")
    assert status == 401 and headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    assert refused_reasons(logs) == ["inactive"]
    # A token for another resource is active, but not for this audience.
    jwt_token = (await authorize(authz.issuer)).access_token
    with capture_logs() as logs:
        assert (await call(stack, "GET", "/api/accounts", token=jwt_token))[0] == 401
    assert refused_reasons(logs) == ["aud"]


async def test_the_same_bytes_with_a_proof_are_never_forwarded_again(
    make_stack: StackFactory, authz: AuthorizationServer
) -> None:
    """A request carrying a token is never remembered: its exact bytes sent again (a
    replayed DPoP proof), even to a rule that needs nothing, are judged and refused."""
    from tests.test_decision_memo import send_in_parts

    stack = await gateway_for(make_stack, authz)
    key = DpopKey.generate()
    token = (await authorize(authz.issuer, dpop=key)).access_token
    proof = key.proof("GET", stack.url + "/public/x", access_token=token)
    head = (
        f"GET /public/x HTTP/1.1\r\nHost: {stack.url.split('//')[1]}\r\n"
        f"Authorization: DPoP {token}\r\nDPoP: {proof}\r\n\r\n"
    ).encode()
    first = await send_in_parts(stack, head)
    again = await send_in_parts(stack, head)
    assert [status for status, _ in first + again] == [b"200", b"401"]
    assert b'error="invalid_token"' in again[0][1]
    assert len(stack.gateway.decisions.exact) == 0
