"""Which Redis deployments ``session.redis_url`` can name, and parsing of Sentinel URLs.

Pure: no I/O, no redis import, so the config loader can validate a URL at start-up.

Supported:

- ``redis://[[user]:password@]host[:port][/db]``: one server over TCP.
- ``rediss://...``: the same over TLS; the server certificate is verified
  against the system CAs (redis-py's ``ssl_cert_reqs="required"``).
- ``unix://[[user]:password@]/path/to/redis.sock[?db=N]``: a local socket.
- ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]``:
  Redis Sentinel. The gateway asks the sentinels (port 26379 unless given) for
  the current master of ``service`` and follows failovers. The credentials are
  for the Redis servers, not for the sentinels, which are asked without AUTH.
- ``rediss+sentinel://...``: the same, with TLS to the sentinels and the servers.

The first three are handed to redis-py's ``Redis.from_url``, so its query
options (``?socket_timeout=2``, ``?ssl_ca_certs=/path``, ...) work there and
override the gateway's defaults. Sentinel URLs take no query options.

Not supported: Redis Cluster. Each session write changes the session's key and
the index keys of its subject and provider session in one Lua script, and
Cluster refuses a script whose keys live in different hash slots. Use one
primary with replicas under Sentinel (or a managed service's single endpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

PLAIN_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
REDIS_SCHEMES = PLAIN_SCHEMES + SENTINEL_SCHEMES
SENTINEL_PORT = 26379  # the port redis-sentinel listens on unless configured otherwise


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int
    username: str | None
    password: str | None
    ssl: bool


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-cased ("" when it has none)."""
    return urlsplit(url).scheme.lower()


def is_sentinel_url(url: str) -> bool:
    return scheme_of(url) in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse ``redis+sentinel://...``; ValueError with a message an operator can act on."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SENTINEL_SCHEMES:
        raise ValueError("a Sentinel URL starts with redis+sentinel:// or rediss+sentinel://")
    if parts.query or parts.fragment:
        raise ValueError("a Sentinel URL takes no ?query or #fragment")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    sentinels = tuple(_host_port(item) for item in hostlist.split(","))
    segments = [unquote(s) for s in parts.path.split("/")[1:]]
    if not segments or not segments[0]:
        raise ValueError("name the monitored service: redis+sentinel://host:26379/SERVICE[/db]")
    if len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise ValueError("the path is /SERVICE or /SERVICE/DB (DB a number)")
    db = int(segments[1]) if len(segments) == 2 else 0
    return SentinelUrl(
        sentinels=sentinels,
        service_name=segments[0],
        db=db,
        username=username,
        password=password,
        ssl=scheme == "rediss+sentinel",
    )


def _host_port(item: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    elif item.count(":") == 1:
        host, _, port_text = item.partition(":")
    else:
        host, port_text = item, ""
    if not host:
        raise ValueError(f"sentinel address {item!r} has no host")
    if not port_text:
        return host, SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"sentinel address {item!r} has an invalid port")
    return host, int(port_text)
