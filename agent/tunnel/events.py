"""What the tunnel's lower rooms tell the room above them, and what the tunnel tells its owner.

Events go up through these small interfaces, never through a back-reference: an
`Upstream` knows only an `UpstreamEvents` (the forwarder implements it; the plain-TCP
retry of truncated answers implements it too, for its UDP upstream), and the tunnel
knows only a `TunnelEvents` (the engine's side: what the running tunnel learnt goes
through the policy into what is known, and every change of mode reaches the user).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from agent.model import Failure, UpstreamSpec

if TYPE_CHECKING:
    from agent.tunnel.connection import UpstreamConn
    from agent.tunnel.pending import Pending
    from agent.tunnel.upstream import Upstream


class Mode(StrEnum):
    """What the tunnel can offer right now; the user is told when it is not PRIVATE."""

    PRIVATE = "private"  # at least one private upstream is usable
    CLEARTEXT = "cleartext"  # the order's cleartext entries are in use (opportunistic only)
    DOWN = "down"  # nothing usable: every query is answered SERVFAIL


class UpstreamEvents(Protocol):
    """What one upstream reports to its owner; the owner decides what follows."""

    def wants_flush(self, conn: UpstreamConn) -> None:
        """Queries were queued on `conn`: write them at the end of this wake-up."""

    def answered(self, up: Upstream, p: Pending, frame: bytes) -> None:
        """An answer (a whole DNS message, the upstream's ID) for the client query `p`."""

    def gave_up(self, pendings: Sequence[Pending], failed: Upstream | None) -> None:
        """Queries this upstream cannot carry; `failed`: it failed them (do not come back)."""

    def servfail(self, p: Pending) -> None:
        """`p` has no answer to be had: the client gets SERVFAIL."""

    def changed(self, up: Upstream) -> None:
        """Its state changed (connected, failed, idle)."""

    def failed(self, up: Upstream, failure: Failure, detail: str) -> None:
        """It failed on evidence (refused, reset, TLS error, silent to a liveness probe)."""

    def recovered(self, up: Upstream) -> None:
        """It is up again after failing."""


class TunnelEvents(Protocol):
    """What the tunnel reports to its owner (the engine, through the daemon)."""

    def upstream_failed(self, spec: UpstreamSpec, failure: Failure, detail: str) -> None: ...

    def upstream_recovered(self, spec: UpstreamSpec) -> None: ...

    def mode_changed(self, mode: Mode, why: str) -> None: ...


class NoTunnelEvents:
    """For a tunnel nobody listens to (the `tunnel` command logs what happens)."""

    def upstream_failed(self, spec: UpstreamSpec, failure: Failure, detail: str) -> None:
        pass

    def upstream_recovered(self, spec: UpstreamSpec) -> None:
        pass

    def mode_changed(self, mode: Mode, why: str) -> None:
        pass
