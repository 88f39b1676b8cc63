"""The floor under the gateway: aiohttp serving, with none of the gateway's work.

Two servers for the benchmark's reference rows, built from exactly the parts
the gateway runs on (uvloop, aiohttp's low-level ``web.Server``, the
gateway's own upstream connection pool) and nothing else:

    alone  answers ``200 ok`` from memory (what aiohttp's server costs)
    proxy  forwards every request to the upstream over the pool and relays the
           answer (what serving plus forwarding costs, before any rule,
           session, header filtering, assertion, metric or log line)

Usage: ``python bench/floor.py alone|proxy --port N [--upstream-port M]``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import uvloop
from aiohttp import web
from multidict import CIMultiDict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.proxy import CHUNK_SIZE, KEEPALIVE_TIMEOUT_S, POOL_LIMIT
from gateway.upstream_pool import UpstreamPool


async def serve(mode: str, port: int, upstream_port: int | None) -> None:
    handler: web.Server
    if mode == "alone":

        async def alone(request: web.BaseRequest) -> web.StreamResponse:
            return web.Response(body=b"ok", content_type="text/plain")

        handler = web.Server(alone, access_log=None)
    else:
        assert upstream_port is not None
        pool = UpstreamPool(
            "127.0.0.1",
            upstream_port,
            limit=POOL_LIMIT,  # the gateway's own pool settings
            connect_timeout_s=5,
            sock_connect_timeout_s=5,
            read_timeout_s=30,
            keepalive_timeout_s=KEEPALIVE_TIMEOUT_S,
            read_bufsize=CHUNK_SIZE,
        )
        host = f"127.0.0.1:{upstream_port}"

        async def proxy(request: web.BaseRequest) -> web.StreamResponse:
            pooled = await pool.request(request.method, request.raw_path, CIMultiDict(Host=host))
            try:
                body = await pooled.payload.read()
            finally:
                pooled.release()
            headers = CIMultiDict(pooled.message.headers)
            for name in ("Connection", "Keep-Alive", "Transfer-Encoding"):
                headers.popall(name, None)
            return web.Response(status=pooled.message.code, body=body, headers=headers)

        handler = web.Server(proxy, access_log=None)
    server = await asyncio.get_running_loop().create_server(handler, "127.0.0.1", port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("mode", choices=("alone", "proxy"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int)
    args = parser.parse_args()
    if args.mode == "proxy" and args.upstream_port is None:
        parser.error("proxy needs --upstream-port")
    uvloop.run(serve(args.mode, args.port, args.upstream_port))


if __name__ == "__main__":
    main()
