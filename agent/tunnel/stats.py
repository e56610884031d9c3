"""Counters and latency percentiles the status and statistics commands show, per upstream.

Each set of counters knows since when it counts (`since`, wall clock): its making, or the
last `reset()` (the statistics command's --reset).
"""

from __future__ import annotations

import array
import time
from dataclasses import dataclass, field, fields
from typing import Any

WINDOW = 4096  # latencies kept for percentiles


@dataclass
class UpstreamStats:
    queries: int = 0  # sent upstream (resends included)
    answers: int = 0
    failures: int = 0  # connection attempts or connections that failed
    reconnects: int = 0  # connections opened after the first
    connections: int = 0
    resumptions: int = 0  # TLS handshakes that resumed a session
    fastopen: int = 0  # connections whose SYN carried data (TCP Fast Open)
    timeouts: int = 0  # queries that got no answer in time
    mismatched: int = 0  # answers that did not match their question
    retransmits: int = 0  # UDP only: queries sent again for want of an answer in time
    tc_retries: int = 0  # UDP only: truncated answers asked again over TCP
    tc_retry_failures: int = 0  # ... where TCP did not answer (the client got TC or SERVFAIL)
    liveness_probes: int = 0  # queries of our own on a quiet connection with queries out
    since: float = field(default_factory=time.time)  # counting since (wall clock)
    _lat: array.array[float] = field(default_factory=lambda: array.array("d"))
    _next: int = 0

    def reset(self, now: float | None = None) -> None:
        """Every counter to zero and the latencies forgotten, but `connections`: it tells a
        reconnect from the first connection (the upstream counts reconnects by it)."""
        for f in fields(self):
            if isinstance(f.default, int) and f.name != "connections":
                setattr(self, f.name, f.default)
        self._lat = array.array("d")
        self.since = time.time() if now is None else now

    def latency(self, seconds: float) -> None:
        if len(self._lat) < WINDOW:
            self._lat.append(seconds)
        else:
            self._lat[self._next] = seconds
            self._next = (self._next + 1) % WINDOW

    def percentiles(self) -> dict[str, float | None]:
        if not self._lat:
            return {"p50_ms": None, "p90_ms": None, "p99_ms": None}
        v = sorted(self._lat)

        def pick(q: float) -> float:
            return round(v[min(len(v) - 1, int(q * len(v)))] * 1000, 3)

        return {"p50_ms": pick(0.5), "p90_ms": pick(0.9), "p99_ms": pick(0.99)}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        out.update(self.percentiles())
        return out


@dataclass
class TunnelStats:
    queries: int = 0  # from clients
    answered: int = 0
    servfail: int = 0  # answered SERVFAIL by the tunnel itself
    truncated: int = 0  # UDP answers replaced by TC=1
    malformed: int = 0  # client packets dropped or answered FORMERR/NOTIMP
    dropped_limit: int = 0  # over a per-client or global limit
    cleartext: int = 0  # sent in cleartext (opportunistic fallback only)
    tcp_clients: int = 0
    tcp_refused: int = 0
    since: float = field(default_factory=time.time)  # counting since (wall clock)

    def reset(self, now: float | None = None) -> None:
        for f in fields(self):
            if isinstance(f.default, int):
                setattr(self, f.name, f.default)
        self.since = time.time() if now is None else now

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)
