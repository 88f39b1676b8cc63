"""examples/stepup_client.py against the gateway and the real authorization server."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import httpx

from tests.conftest import StackFactory
from tests.support.authz import AuthorizationServer, DpopKey, authorize, authz
from tests.test_access_tokens import gateway_for

__all__ = ["authz"]  # the fixture, imported for pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "stepup_client.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stepup_client", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["stepup_client"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


async def test_client_steps_up_and_retries(
    make_stack: StackFactory, authz: AuthorizationServer
) -> None:
    client_module = load_example()
    stack = await gateway_for(make_stack, authz)
    asked: list[object] = []

    async def reauthorize(step_up: object) -> str:
        asked.append(step_up)
        tokens = await authorize(
            authz.issuer,
            acr_values=" ".join(step_up.acr_values),  # type: ignore[attr-defined]
            max_age=step_up.max_age,  # type: ignore[attr-defined]
        )
        return tokens.access_token

    weak = (await authorize(authz.issuer)).access_token
    auth = client_module.StepUpAuth(weak, reauthorize)
    async with httpx.AsyncClient(auth=auth, base_url=stack.url) as client:
        response = await client.get("/api/accounts")  # enough as it is: no step-up
        assert response.status_code == 200 and asked == []
        response = await client.post("/api/transfers/1", content=b"{}")
        assert response.status_code == 200
        headers = dict(response.json()["headers"])
        assert headers["X-Auth-Level"] == "phishing-resistant"
    assert len(asked) == 1
    step_up = asked[0]
    assert step_up.acr_values == ("phr", "phrh")  # type: ignore[attr-defined]
    assert step_up.max_age == 300  # type: ignore[attr-defined]
    assert auth.token != weak  # kept for the next calls
    assert [record["method"] for record in stack.seen] == ["GET", "POST"]


async def dpop_transfer(authz: AuthorizationServer, base_url: str) -> httpx.Response:
    """The example client, with a DPoP key and a password-level token, posts a transfer
    (which needs a step-up) to ``base_url``; its answer."""
    client_module = load_example()
    key = DpopKey.generate()

    async def reauthorize(step_up: object) -> str:
        tokens = await authorize(
            authz.issuer,
            acr_values=" ".join(step_up.acr_values),  # type: ignore[attr-defined]
            max_age=step_up.max_age,  # type: ignore[attr-defined]
            dpop=key,
        )
        return tokens.access_token

    def proof(method: str, url: str, token: str) -> str:
        return key.proof(method, url, access_token=token)

    weak = (await authorize(authz.issuer, dpop=key)).access_token
    auth = client_module.StepUpAuth(weak, reauthorize, proof=proof)
    async with httpx.AsyncClient(auth=auth, base_url=base_url) as client:
        return await client.post("/api/transfers/1?x=1", content=b"{}")


async def test_client_with_dpop(make_stack: StackFactory, authz: AuthorizationServer) -> None:
    stack = await gateway_for(make_stack, authz)
    response = await dpop_transfer(authz, stack.url)
    assert response.status_code == 200
    assert dict(response.json()["headers"])["X-Auth-Level"] == "phishing-resistant"


def test_challenge_parser() -> None:
    client_module = load_example()
    response = httpx.Response(
        401,
        headers=[
            ("WWW-Authenticate", 'Basic realm="x"'),
            (
                "WWW-Authenticate",
                'DPoP algs="ES256", error="insufficient_user_authentication", '
                'error_description="needs \\"mfa\\"", acr_values="a b", max_age=0',
            ),
        ],
    )
    step_up = client_module.step_up_asked(response)
    assert step_up == client_module.StepUp(("a", "b"), 0, 'needs "mfa"')
    assert client_module.step_up_asked(httpx.Response(403)) is None
    invalid = httpx.Response(401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    assert client_module.step_up_asked(invalid) is None
