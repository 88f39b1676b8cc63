"""The load suite, long: what the gateway does under saturation, a worker crash and
SIGTERM, with the figures README quotes.

The same parts as ``tests/test_load.py`` (tests/support/loadsuite.py): a gateway
with two workers and Redis sessions (Redis on 127.0.0.1:6379, database 13, a key
prefix of this run's, removed afterwards) in front of ``bench/floor.py alone``, the
test OpenID Provider in this process for the sign-in, and keep-alive clients in this
process that account for every request: answered (by status), lost (written on a
connection, no complete answer) or refused (never sent).

Usage: ``python bench/load.py [--seconds 20] [--json PATH]``. Everything runs on
127.0.0.1 and is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import CLIENT_SECRET
from tests.support.loadsuite import (
    GatewayUnderLoad,
    Tally,
    kill_a_worker,
    saturate,
    terminate_under_load,
)
from tests.support.op import OpClient, start_op


async def _server(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


def _row(name: str, tally: Tally, **extra: Any) -> dict[str, Any]:
    summary = tally.summary()
    answered = summary["ok"] + summary["status_503"] + summary["other_status"] + summary["lost"]
    times = [at for at, _ in tally.outcomes]
    span_s = max(times) - min(times) if times else 0.0
    return {
        "scenario": name,
        **summary,
        "success_pct": round(100 * summary["ok"] / max(answered, 1), 3),
        "seconds": round(span_s, 1),
        "requests_per_s": round(answered / max(span_s, 0.001)),
        **extra,
    }


async def run(seconds: float) -> list[dict[str, Any]]:
    op = await start_op(
        _server, clients=[OpClient(client_id="gateway", client_secret=CLIENT_SECRET)]
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="stepup-load-") as tmp:
        started: list[GatewayUnderLoad] = []

        async def gateway(workers: int) -> GatewayUnderLoad:
            g = GatewayUnderLoad(Path(tmp), op.issuer, workers=workers)
            op.clients["gateway"].redirect_uris.append(g.redirect_uri)
            started.append(g)
            await g.start()
            return g

        try:
            g = await gateway(2)
            for connections in (256, 1024):
                tally = await saturate(g, connections, seconds)
                rss = max(g.rss_mb().values())
                rows.append(_row(f"saturate {connections}", tally, max_worker_rss_mb=round(rss)))
                print(json.dumps(rows[-1]), flush=True)
            result = await kill_a_worker(g, 256, before_s=seconds / 2, after_s=max(10, seconds / 2))
            window = result.tally.summary(result.killed_at, result.killed_at + 10)
            after = result.tally.summary(result.killed_at + 1, result.killed_at + 10)
            rows.append(
                {
                    **_row("kill -9 one worker, 256", result.tally),
                    "lost_in_10s_after_kill": window["lost"],
                    "success_pct_1_to_10s_after": round(
                        100 * after["ok"] / max(sum(after.values()) - after["refused"], 1), 3
                    ),
                    "restart_s": round((result.restarted_at or 0) - result.killed_at, 2),
                    "new_worker_share_pct": round(100 * result.share_of_new_worker),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            for workers in (1, 2):
                g = await gateway(workers)
                stopped = await terminate_under_load(g, 64, before_s=seconds / 2)
                rows.append(
                    {
                        **_row(f"SIGTERM, {workers} worker(s), 64", stopped.tally),
                        "exit_code": stopped.exit_code,
                        "stop_s": round(stopped.stop_s, 2),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
        finally:
            for g in started:
                await g.stop()
            await op.server.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per saturation phase")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = asyncio.run(run(args.seconds))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
