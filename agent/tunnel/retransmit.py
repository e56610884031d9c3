"""Retransmission on a datagram upstream: how long to wait for an answer, and what is due again.

A lost UDP datagram would otherwise cost the client a SERVFAIL at the query deadline.
Pure: times are parameters (time.monotonic() seconds), sending is the connection's.
"""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

RTO_MIN = 0.2  # never sooner: a resolver that recurses needs a moment
RTO_MAX = 1.0  # never later: a lost datagram should cost about a second at most
RTO_INITIAL = 0.5  # before the first answer: resends at 0.5 and 1.5 s fit in the tunnel's
#                    stall timeout (2.5 s), 1 s (RFC 6298's choice for TCP) would fit one
RTT_FACTOR = 3.0
MAX_RETRANSMITS = 3  # each wait doubles: resent 1, 3 and 7 RTO after the first send,
#                      as long as the query's deadline (and the stall timeout) allow

T = TypeVar("T")


class RttEstimator:
    """The smoothed RTT of one upstream (RFC 6298 gains) and the retransmit timeout it gives:
    3 x SRTT, or SRTT + 4 x RTTVAR when the RTT varies (cache hits and misses), clamped.

    Only queries sent once give samples (Karn's rule): the answer to a resent query may be
    to any of its sends. A server that turns slow is still learnt from its slow answers that
    come within the timeout; the others are resent at most MAX_RETRANSMITS times.
    """

    __slots__ = ("rttvar", "srtt")

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0

    def sample(self, rtt: float) -> None:
        srtt = self.srtt
        if srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
            return
        self.rttvar += (abs(srtt - rtt) - self.rttvar) / 4
        self.srtt = srtt + (rtt - srtt) / 8

    @property
    def rto(self) -> float:
        srtt = self.srtt
        if srtt is None:
            return RTO_INITIAL
        return min(RTO_MAX, max(RTO_MIN, RTT_FACTOR * srtt, srtt + 4 * self.rttvar))


def wait(rto: float, resends: int) -> float:
    """How long after its last send a query sent `resends` times before is due again."""
    return rto * (1 << resends)


class Schedule(Generic[T]):
    """What was sent when, one FIFO per number of resends so far.

    Within one FIFO every entry waits equally long (`wait(rto, level)`, with the rto of the
    moment), so the due ones are always at the front: a check costs nothing per query that
    is not due, and no query has a timer of its own. Answered queries are not removed
    here; they leave when they come due, and the caller skips them.
    """

    __slots__ = ("levels",)

    def __init__(self, limit: int = MAX_RETRANSMITS) -> None:
        self.levels: tuple[collections.deque[tuple[float, T]], ...] = tuple(
            collections.deque() for _ in range(limit)
        )

    def sent(self, item: T, level: int, at: float) -> None:
        """`item` was sent at `at`, after `level` earlier sends; past the limit: not again."""
        if level < len(self.levels):
            self.levels[level].append((at, item))

    def due(self, now: float, rto: float) -> list[tuple[T, int]]:
        """Take out the entries whose wait is over, with their level (earlier sends)."""
        out: list[tuple[T, int]] = []
        for level, fifo in enumerate(self.levels):
            cutoff = now - wait(rto, level)
            while fifo and fifo[0][0] <= cutoff:
                out.append((fifo.popleft()[1], level))
        return out

    def clear(self) -> None:
        for fifo in self.levels:
            fifo.clear()

    def __len__(self) -> int:
        return sum(map(len, self.levels))
