"""``server.trusted_proxies``: whether a peer address is one of them, remembered.

Asked on every request that carries forwarded headers (and on every forward-auth
check); parsing the address each time costs more than the rest of the check.
The connections on ``server.unix_socket`` (peer :data:`UNIX_PEER`) are trusted
when ``unix`` is listed; an ``X-Forwarded-For`` hop spelled like that never is.
"""

from __future__ import annotations

import ipaddress

from gateway.connections import UNIX_PEER
from gateway.model import IPNetwork

# Distinct peer addresses remembered; beyond this the memory starts over.
MAX_REMEMBERED_PEERS = 4096


class TrustedPeers:
    """For one configuration; made anew when it is reloaded."""

    __slots__ = ("_answers", "_networks", "_unix")

    def __init__(self, networks: tuple[IPNetwork, ...], *, unix: bool = False) -> None:
        self._networks = networks
        self._unix = unix
        self._answers: dict[str, bool] = {}

    def __call__(self, peer: str) -> bool:
        """Whether the connection's peer (``request.remote``) is a trusted proxy."""
        if peer == UNIX_PEER:
            return self._unix
        return self.hop(peer)

    def hop(self, address: str) -> bool:
        """Whether an address a trusted proxy forwarded (an ``X-Forwarded-For`` hop) is one."""
        answer = self._answers.get(address)
        if answer is None:
            answer = self._decide(address)
            if len(self._answers) >= MAX_REMEMBERED_PEERS:
                self._answers.clear()
            self._answers[address] = answer
        return answer

    def _decide(self, peer: str) -> bool:
        if not self._networks or not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self._networks)
