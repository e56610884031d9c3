"""One client query on its way through the tunnel."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from agent.dns.packet import QueryInfo, pad_query

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


class _NullSink:
    """Where the answer to a query of the tunnel's own goes (a prefetch): nowhere."""

    udp = False

    def admit(self, addr: Any) -> bool:
        return True

    def deliver(self, wire: bytes, addr: Any) -> None:
        pass

    def done(self, addr: Any) -> None:
        pass


NULL_SINK: Sink = _NullSink()


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
        "key",
        "padded",
        "query",
        "resends",
        "retransmits",
        "scope",
        "sent",
        "sink",
        "strip",
        "tc_answer",
        "tried",
        "uid",
    )

    def __init__(
        self, sink: Sink, addr: Any, query: bytes, info: QueryInfo, deadline: float
    ) -> None:
        self.sink = sink
        self.addr = addr
        self.query = query  # as the client sent it, with the client's own ID
        self.info = info
        self.padded: bytes | None = None  # the padded form, made when first sent inside TLS
        self.added_opt = False  # the padded form has an OPT record the client's had not
        self.strip = False  # the form sent last has our OPT: the answer's is removed
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
        # the cache's key: the answer is stored under it (None: made at the answer; b"": the
        # cache was emptied meanwhile, not stored); `scope`: the split-DNS route it went by
        self.key: bytes | None = None
        self.scope = ""

    def pad(self) -> bytes:
        """The query padded (RFC 7830, 8467), for TLS only: in cleartext, padding MUST NOT be
        used (RFC 7830 section 6), so it is made when a query first goes into TLS. A query
        that padding would grow past a DNS message's limit goes as it is."""
        q, added = pad_query(self.query, self.info)  # as it is when padding cannot fit
        self.padded, self.added_opt = q, added
        return q
