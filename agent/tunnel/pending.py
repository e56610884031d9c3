"""One client query on its way through the tunnel."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from agent.dns.packet import QueryInfo

if TYPE_CHECKING:
    from collections.abc import Sequence

    from agent.tunnel.connection import UpstreamConn
    from agent.tunnel.upstream import Upstream


class Sink(Protocol):
    """Where answers go: a UDP listener (addr = the client's) or one TCP client."""

    udp: bool

    def admit(self, addr: Any) -> bool: ...

    def deliver(self, wire: bytes, addr: Any) -> None: ...

    def done(self, addr: Any) -> None: ...


class Pending:
    """A query from its arrival until exactly one answer went back to its client."""

    __slots__ = (
        "added_opt",
        "addr",
        "conn",
        "deadline",
        "done",
        "group",
        "info",
        "query",
        "resends",
        "retransmits",
        "sent",
        "sink",
        "tc_answer",
        "tried",
        "uid",
    )

    def __init__(
        self, sink: Sink, addr: Any, query: bytes, info: QueryInfo, added_opt: bool, deadline: float
    ) -> None:
        self.sink = sink
        self.addr = addr
        self.query = query  # padded, with the client's own ID
        self.info = info
        self.added_opt = added_opt
        self.deadline = deadline
        self.sent = 0.0  # time.monotonic() of its send on `conn` (retransmits leave it)
        self.tried = 0  # bit i set: upstream i failed this query
        self.resends = 0  # times re-sent to the same upstream after it closed cleanly
        self.retransmits = 0  # times sent again on a datagram upstream, for want of an answer
        self.tc_answer: bytes | None = None  # a datagram upstream's truncated answer, kept
        #                                      while the query is asked again over TCP
        self.uid = -1  # ID on the upstream connection
        self.conn: UpstreamConn | None = None
        self.done = False
        self.group: Sequence[Upstream] | None = None  # split DNS: only these upstreams
