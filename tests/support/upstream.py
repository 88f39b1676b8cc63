"""A real upstream app for tests: it echoes, as JSON, exactly what it received."""

from __future__ import annotations

import hashlib

from aiohttp import WSMsgType, web

SEEN = web.AppKey("seen", list)  # every request record, in order


def make_echo_app() -> web.Application:
    seen: list[dict[str, object]] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str("echo:" + msg.data)
            return ws
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            digest.update(chunk)
            size += len(chunk)
        record = {
            "method": request.method,
            "path_qs": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_size": size,
            "body_sha256": digest.hexdigest(),
        }
        seen.append(record)
        return web.json_response(record)

    app = web.Application()
    app[SEEN] = seen
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def header_values(record: dict[str, object], name: str) -> list[str]:
    """All values the upstream received for ``name`` (case-insensitive)."""
    pairs = record["headers"]
    assert isinstance(pairs, list)
    return [v for k, v in pairs if k.lower() == name.lower()]
