"""``server.trusted_proxies``: whether a peer address is one of them, remembered.

Asked on every request that carries forwarded headers (and on every forward-auth
check); parsing the address each time costs more than the rest of the check.
"""

from __future__ import annotations

import ipaddress

from gateway.model import IPNetwork

# Distinct peer addresses remembered; beyond this the memory starts over.
MAX_REMEMBERED_PEERS = 4096


class TrustedPeers:
    """For one configuration; made anew when it is reloaded."""

    __slots__ = ("_answers", "_networks")

    def __init__(self, networks: tuple[IPNetwork, ...]) -> None:
        self._networks = networks
        self._answers: dict[str, bool] = {}

    def __call__(self, peer: str) -> bool:
        answer = self._answers.get(peer)
        if answer is None:
            answer = self._decide(peer)
            if len(self._answers) >= MAX_REMEMBERED_PEERS:
                self._answers.clear()
            self._answers[peer] = answer
        return answer

    def _decide(self, peer: str) -> bool:
        if not self._networks or not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self._networks)
