"""The provider's own session (single sign-on), and who is told when one ends.

Its own module because both the provider (:mod:`stepup_demo.idp`, which keeps the
sessions) and the back-channel logout (:mod:`stepup_demo.backchannel`, which tells
relying parties one ended) need it, and the provider uses the back-channel sender:
kept in either of the two, it would make them import each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from stepup_demo.factors import Authentication
from stepup_demo.oauth_models import DemoClient


@dataclass
class ProviderSession:
    """The provider's own sign-in state for one browser (single sign-on)."""

    sid: str  # also in the ID tokens and the logout tokens
    username: str
    sub: str
    created_at: float
    authentications: dict[str, Authentication] = field(default_factory=dict)  # newest per acr
    clients: set[str] = field(default_factory=set)  # who got codes: told when it ends


class LogoutNotifier(Protocol):
    """Tells relying parties a provider session ended (Back-Channel Logout 1.0).

    :class:`stepup_demo.backchannel.BackchannelLogoutSender` is the real one.
    ``session_ended`` must not raise, and must not keep the sign-out waiting long.
    """

    supported: bool  # advertised as backchannel_logout_supported

    async def session_ended(
        self, session: ProviderSession, clients: Sequence[DemoClient]
    ) -> None: ...
