"""The tunnel's settings, apart from the tunnel: the command line's defaults and the
daemon's configuration need them without loading asyncio, ssl and the hot path."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.model import Profile, UpstreamSpec
from agent.tunnel.cache import CacheSettings

DEFAULT_LISTEN = (("127.0.0.153", 53),)
MAX_UPSTREAMS = 60  # entries of one order: the tunnel refuses more; the policy never hands more


@dataclass(frozen=True)
class TunnelConfig:
    upstreams: tuple[UpstreamSpec, ...]
    profile: Profile = Profile.OPPORTUNISTIC
    ca_file: str | None = None
    listen: tuple[tuple[str, int], ...] = DEFAULT_LISTEN
    idle_timeout: float = 60.0  # the draft's suggestion for stub-to-recursive
    connect_timeout: float = 3.0
    fallback_delay: float = 0.25  # then an upstream's `alt` TLS path races the first
    query_timeout: float = 5.0  # one query's deadline: then the client gets SERVFAIL
    # A slow answer is no evidence that a connection is dead. Quiet this long with queries
    # out, a stream connection gets a liveness probe (a query of ours); no byte back within
    # liveness_timeout after it: dead.
    # 1.5 + 2.5: a server slow on everything, up to 4 s, is still alive; a dead connection's
    # queries are asked again elsewhere with a second left of the default 5 s deadline.
    liveness_after: float = 1.5
    liveness_timeout: float = 2.5
    stall_timeout: float = 2.5  # datagrams only: queries resent, not one datagram back: dead
    backoff_min: float = 1.0
    backoff_max: float = 60.0
    max_pending: int = 10000
    max_pending_per_client: int = 256
    max_tcp_clients: int = 256
    tcp_client_idle: float = 10.0
    fastopen: bool = True
    pad: bool = True
    cache: CacheSettings | None = field(default_factory=CacheSettings)  # None: no cache
