"""/favicon.ico and /robots.txt never start a sign-in, unless a rule names them.

Behind a catch-all rule that needs a sign-in, a browser's icon fetch or a
crawler would otherwise be sent to the identity provider (and a tab would
start a sign-in no one asked for). The gateway answers them itself; a rule
whose path is exactly one of them hands it back to the rules.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Browser, StackFactory
from tests.test_cli import CONFIG, explained

CATCH_ALL = """\
rules:
  - name: everything
    match: {path: /**}
    require: {level: password}
"""

ROBOTS_RULE = """\
rules:
  - name: robots
    match: {path: /robots.txt}
    require: none
  - name: everything
    match: {path: /**}
    require: {level: password}
"""


async def test_behind_a_catch_all_rule_the_gateway_answers_them(
    make_stack: StackFactory, browser: Browser, api
) -> None:
    stack = await make_stack(rules=CATCH_ALL)
    icon = await browser.get(f"{stack.url}/favicon.ico")
    assert icon.status == 204 and "Location" not in icon.headers
    robots = await browser.get(f"{stack.url}/robots.txt?from=crawler")
    assert robots.status == 200 and "Location" not in robots.headers
    assert robots.body == "User-agent: *\nDisallow: /\n"
    assert robots.headers["Content-Type"].startswith("text/plain")
    async with api.head(f"{stack.url}/robots.txt") as resp:
        assert resp.status == 200
    assert not any("_tx_" in hop.headers.get("Set-Cookie", "") for hop in browser.hops)
    # Other methods, and paths below them, are the rules' as ever.
    async with api.post(f"{stack.url}/robots.txt", data=b"x") as resp:
        assert resp.status == 401
    hop = await browser.get(f"{stack.url}/favicon.ico/x")
    assert hop.status == 302 and hop.headers["Location"].startswith(stack.op.issuer)
    assert stack.seen == []


async def test_a_rule_that_names_the_path_wins(make_stack: StackFactory, browser: Browser) -> None:
    stack = await make_stack(rules=ROBOTS_RULE)
    robots = await browser.get(f"{stack.url}/robots.txt")
    assert robots.status == 200
    assert [seen["path_qs"] for seen in stack.seen] == ["/robots.txt"]  # the upstream answered
    icon = await browser.get(f"{stack.url}/favicon.ico")
    assert icon.status == 204
    assert len(stack.seen) == 1


def test_explain_says_the_gateway_answers(tmp_path: Path) -> None:
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(CONFIG)
    status, output = explained(config_file, "GET", "/robots.txt")
    assert (status, output) == (
        0,
        {
            "rule": None,
            "decision": "gateway",
            "endpoint": "/robots.txt",
            "normalized_path": "/robots.txt",
            "host": "gw.example.com",
        },
    )
    assert explained(config_file, "POST", "/robots.txt")[1]["decision"] == "deny"
