"""The gateway's providers by name (``oidc`` is ``default``, ``oidc.providers`` the rest).

Each is a :class:`gateway.oidc.provider.ProviderClient` of its own: its metadata and
JWKS cache, its client authentication, its profile. A reload keeps the client of a
provider whose settings did not change (and its caches), and loads the new ones first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import aiohttp
import structlog

from gateway.errors import ProviderError
from gateway.model import DEFAULT_PROVIDER, Config
from gateway.oidc.provider import ProviderClient


class ProviderSet:
    """The provider clients of one configuration, by name."""

    def __init__(self, clients: dict[str, ProviderClient], fresh: frozenset[str]) -> None:
        self._clients = clients
        self._fresh = fresh  # made for this configuration, not taken over from the last

    @classmethod
    def for_config(
        cls,
        config: Config,
        http: aiohttp.ClientSession,
        *,
        on_error: Callable[[str], None],
        wall_clock: Callable[[], float],
        previous: ProviderSet | None = None,
    ) -> ProviderSet:
        clients: dict[str, ProviderClient] = {}
        fresh: set[str] = set()
        for name in config.provider_names:
            oidc = config.oidc_for(name)
            kept = previous._clients.get(name) if previous is not None else None
            if kept is not None and kept.config == oidc:
                clients[name] = kept
                continue
            clients[name] = ProviderClient(oidc, http, on_error=on_error, wall_clock=wall_clock)
            fresh.add(name)
        return cls(clients, frozenset(fresh))

    def get(self, name: str) -> ProviderClient:
        """The provider ``name`` (a name the config's rules were checked against)."""
        return self._clients[name]

    @property
    def default(self) -> ProviderClient:
        return self._clients[DEFAULT_PROVIDER]

    def __iter__(self) -> Iterator[tuple[str, ProviderClient]]:
        return iter(self._clients.items())

    @property
    def changed(self) -> bool:
        """Whether any client is new (a reload then has something to load first)."""
        return bool(self._fresh)

    async def load_fresh(self) -> None:
        """Load the clients made for this configuration; raises ProviderError."""
        for name in sorted(self._fresh):
            await self._clients[name].load()

    async def load_all(self, log: structlog.typing.FilteringBoundLogger) -> None:
        """Load every client, logging (never raising) the ones that fail."""
        for name, client in self._clients.items():
            try:
                await client.load()
            except ProviderError as exc:
                log.warning("provider_not_loaded", provider=name, reason=exc.reason)

    def named_by_issuer(self, issuer: str) -> list[tuple[str, ProviderClient]]:
        """The providers whose issuer is ``issuer`` (compared exactly, OIDC Core 3.1.3.7)."""
        return [(name, c) for name, c in self._clients.items() if c.config.issuer == issuer]
