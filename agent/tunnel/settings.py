"""The tunnel's settings, apart from the tunnel: the command line's defaults and the
daemon's configuration need them without loading asyncio, ssl and the hot path."""

from __future__ import annotations

from dataclasses import dataclass

from agent.model import Profile, UpstreamSpec

DEFAULT_LISTEN = (("127.0.0.153", 53),)


@dataclass(frozen=True)
class TunnelConfig:
    upstreams: tuple[UpstreamSpec, ...]
    profile: Profile = Profile.OPPORTUNISTIC
    ca_file: str | None = None
    listen: tuple[tuple[str, int], ...] = DEFAULT_LISTEN
    idle_timeout: float = 60.0  # the draft's suggestion for stub-to-recursive
    connect_timeout: float = 3.0
    query_timeout: float = 4.0  # then the client gets SERVFAIL
    stall_timeout: float = 2.5  # queries out, nothing back: the connection is dead
    backoff_min: float = 1.0
    backoff_max: float = 60.0
    max_pending: int = 10000
    max_pending_per_client: int = 256
    max_tcp_clients: int = 256
    tcp_client_idle: float = 10.0
    fastopen: bool = True
    pad: bool = True
    cleartext_port: int = 53  # opportunistic fallback: plain DNS over TCP to this port
