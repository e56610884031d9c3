"""agent/tunnel/retransmit.py (pure: the timeout and the schedule) and its use by a datagram
UpstreamConn, over a connected pair of loopback UDP sockets: times are given, not waited for."""

from __future__ import annotations

import asyncio
import socket

import dns.message
import pytest

from agent.dns import packet
from agent.errors import TransportError
from agent.tunnel.connection import UpstreamConn
from agent.tunnel.pending import Pending
from agent.tunnel.retransmit import (
    MAX_RETRANSMITS,
    RTO_INITIAL,
    RTO_MAX,
    RTO_MIN,
    RttEstimator,
    Schedule,
    wait,
)
from agent.tunnel.upstream import _NoSink
from tests.conftest import run

# -- the timeout --------------------------------------------------------------------------------


def test_rto_before_any_sample_is_the_initial_one() -> None:
    assert RttEstimator().rto == RTO_INITIAL
    assert RTO_MIN <= RTO_INITIAL <= RTO_MAX


def test_rto_is_three_srtt_within_the_clamp() -> None:
    est = RttEstimator()
    est.sample(0.001)  # loopback / LAN: the floor
    assert est.rto == RTO_MIN
    est = RttEstimator()
    est.sample(0.1)  # first sample: RTTVAR = RTT / 2, so SRTT + 4 RTTVAR = 3 SRTT
    assert est.rto == pytest.approx(0.3)
    for _ in range(50):
        est.sample(0.1)  # steady: RTTVAR -> 0, 3 x SRTT is what is left
    assert est.rto == pytest.approx(0.3, abs=0.01)
    est.sample(5.0)  # a satellite, or a server busy recursing: the ceiling
    assert est.rto == RTO_MAX


def test_rto_follows_a_varying_rtt() -> None:
    """Fast cache hits and slow misses: the variance keeps the timeout above the misses."""
    est = RttEstimator()
    for i in range(40):
        est.sample(0.002 if i % 2 else 0.150)
    assert est.srtt is not None and est.srtt < 0.1
    assert est.rto > 0.150 + 0.05
    assert est.rto > 3 * est.srtt


def test_waits_double_per_resend() -> None:
    assert [wait(0.2, k) for k in range(MAX_RETRANSMITS)] == pytest.approx([0.2, 0.4, 0.8])
    # resent at 0.2, 0.6 and 1.4 s after the first send: all within a 4 s query deadline
    assert sum(wait(RTO_MIN, k) for k in range(MAX_RETRANSMITS)) < 4.0


# -- the schedule ----------------------------------------------------------------------------------


def test_schedule_gives_what_is_due_by_level_in_order() -> None:
    s: Schedule[str] = Schedule(limit=3)
    s.sent("a", 0, 10.0)
    s.sent("b", 0, 10.1)
    s.sent("c", 1, 10.0)
    assert s.due(10.19, 0.2) == []
    assert s.due(10.2, 0.2) == [("a", 0)]  # c waits twice as long: it was resent once
    assert s.due(10.35, 0.2) == [("b", 0)]
    assert s.due(10.4, 0.2) == [("c", 1)]
    assert len(s) == 0


def test_schedule_uses_the_rto_of_the_moment() -> None:
    s: Schedule[str] = Schedule(limit=3)
    s.sent("a", 0, 0.0)
    assert s.due(0.5, 1.0) == []  # not yet with a 1 s timeout
    assert s.due(0.5, 0.2) == [("a", 0)]  # the RTT learnt meanwhile says it is late


def test_schedule_stops_at_its_limit() -> None:
    s: Schedule[str] = Schedule(limit=2)
    s.sent("a", 1, 0.0)
    s.sent("a", 2, 0.0)  # sent after two resends already: not due again, ever
    assert len(s) == 1
    assert s.due(100.0, 0.2) == [("a", 1)]
    s.sent("b", 0, 0.0)
    s.clear()
    assert s.due(100.0, 0.2) == [] and len(s) == 0


# -- a datagram connection ------------------------------------------------------------------------


def _pending(name: str) -> Pending:
    wire = dns.message.make_query(name, "A").to_wire()
    return Pending(_Sink(), None, wire, packet.parse_query(wire), float("inf"))


class _Sink(_NoSink):
    udp = True


def test_datagram_connection_resends_same_id_then_stops() -> None:
    async def go() -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", 0))
        server.settimeout(2)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.setblocking(False)
        client.connect(server.getsockname())
        answered: list[Pending | None] = []
        lost: list[TransportError] = []
        conn = UpstreamConn(
            client,
            None,
            label="test",
            on_answer=lambda _c, p, _f: answered.append(p),
            on_lost=lambda _c, exc: lost.append(exc),
            datagram=True,
        )
        try:
            a, b = _pending("a.test"), _pending("b.test")
            assert conn.submit(a, 0.0) and conn.submit(b, 0.0)
            conn.flush()
            first = [server.recv(512), server.recv(512)]
            assert [m[:2] for m in first] == [a.uid.to_bytes(2, "big"), b.uid.to_bytes(2, "big")]
            t0 = a.sent
            assert conn.retransmit(t0 + 0.1, 0.2) == 0  # not due yet
            # b is answered: it leaves in-flight, and is not resent
            server.sendto(b.uid.to_bytes(2, "big") + first[1][2:], client.getsockname())
            for _ in range(100):
                if answered:
                    break
                await asyncio.sleep(0.01)
            assert answered == [b]
            assert conn.retransmit(t0 + 0.25, 0.2) == 1
            again = server.recv(512)
            assert again == first[0]  # the same bytes, under the same ID
            assert a.retransmits == 1 and a.sent == t0  # latency still counts from the first
            assert conn.retransmit(t0 + 0.5, 0.2) == 0  # the second wait is twice as long
            assert conn.retransmit(t0 + 0.7, 0.2) == 1
            assert conn.retransmit(t0 + 1.6, 0.2) == 1
            assert conn.retransmit(t0 + 100, 0.2) == 0  # MAX_RETRANSMITS reached
            assert a.retransmits == MAX_RETRANSMITS
            for _ in range(MAX_RETRANSMITS - 1):
                assert server.recv(512) == first[0]
            # moved on (e.g. timed out): in-flight no longer has it, nothing is due
            c = _pending("c.test")
            assert conn.submit(c, 0.0)
            conn.flush()
            server.recv(512)
            conn.inflight.clear()
            assert conn.retransmit(c.sent + 100, 0.2) == 0
            assert conn.sends is not None and len(conn.sends) == 0
            assert lost == []
        finally:
            conn.close()
            server.close()

    run(go())


def test_stream_connection_has_no_retransmits() -> None:
    async def go() -> None:
        a, b = socket.socketpair()
        a.setblocking(False)
        conn = UpstreamConn(
            a, None, label="stream", on_answer=lambda *_: None, on_lost=lambda *_: None
        )
        try:
            p = _pending("a.test")
            assert conn.submit(p, 0.0)
            assert conn.sends is None and conn.retransmit(p.sent + 100, 0.2) == 0
        finally:
            conn.close()
            b.close()

    run(go())
