"""agent/tunnel/forwarder.py's routing and failover, in memory: no sockets, no peers.

The tunnel is built with upstreams that live in memory (`MemUpstream`, through the
tunnel's `upstream_factory`): the test says when one answers or fails, the way a real
`Upstream` reports it (UpstreamEvents). What is checked is the tunnel's own job: private
entries first, in order; cleartext entries only once every private one failed; nothing
in cleartext when the order has no cleartext entry; split-DNS groups kept; exactly one
answer per query, and the pending count exact after every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, cast

import dns.message
import dns.rcode

from agent.dns import packet
from agent.model import AuthSpec, Failure, Method, Profile, UpstreamSpec
from agent.tunnel.events import UpstreamEvents
from agent.tunnel.forwarder import Mode, Tunnel
from agent.tunnel.pending import Pending
from agent.tunnel.settings import TunnelConfig
from agent.tunnel.stats import UpstreamStats
from agent.tunnel.upstream import State, Upstream
from tests.conftest import run
from tests.unit.test_tunnel import Events

A, B, C = "198.51.100.1", "198.51.100.2", "198.51.100.3"


class MemUpstream:
    """An upstream in memory: takes queries, answers or fails when the test says so."""

    def __init__(
        self, spec: UpstreamSpec, index: int, auth: AuthSpec, cfg: TunnelConfig,
        events: UpstreamEvents,
    ) -> None:  # fmt: skip
        self.spec, self.auth, self.events = spec, auth, events
        self.index, self.bit = index, 1 << index
        self.available = True
        self.retired = False
        self.state = State.UP
        self.stats = UpstreamStats()
        self.last_error = ""
        self.recovering = False
        self.keepalive: float | None = None
        self.conn = None
        self.got: list[Pending] = []  # in flight here

    @property
    def inflight(self) -> int:
        return len(self.got)

    def submit(self, p: Pending, now: float) -> None:
        self.got.append(p)

    def place(self, index: int) -> None:
        self.index, self.bit = index, 1 << index

    def retire(self) -> None:
        self.retired = True

    def take_queue(self) -> list[Pending]:
        got, self.got = self.got, []
        return got

    def tick(self, now: float) -> None:
        pass

    def close(self) -> None:
        self.events.gave_up(self.take_queue(), None)

    async def stop(self) -> None:
        self.retire()
        self.close()

    def retrying(self, p: Pending) -> bool:
        return False

    def tcp_failed(self, pendings: Sequence[Pending]) -> None:
        raise AssertionError("no datagram upstream here")

    # -- what the test makes happen ------------------------------------------------------------
    def answer(self) -> None:
        for p in self.take_queue():
            reply = dns.message.make_response(dns.message.from_wire(p.query))
            self.events.answered(cast(Upstream, self), p, reply.to_wire())

    def echo(self) -> None:
        """Send each query back as its own answer (QR clear), as a broken upstream did."""
        for p in self.take_queue():
            self.events.answered(cast(Upstream, self), p, p.query)

    def fail(self) -> None:
        self.available = False
        self.state = State.BACKOFF
        self.last_error = "reset by peer"
        me = cast(Upstream, self)
        self.events.failed(me, Failure.RESET, self.last_error)
        self.events.changed(me)
        self.events.gave_up(self.take_queue(), me)


class Client:
    """A sink: what the tunnel delivered, per address."""

    udp = True

    def __init__(self) -> None:
        self.got: list[tuple[bytes, Any]] = []

    def admit(self, addr: Any) -> bool:
        return True

    def deliver(self, wire: bytes, addr: Any) -> None:
        self.got.append((wire, addr))

    def done(self, addr: Any) -> None:
        pass

    def rcodes(self) -> list[str]:
        return [dns.rcode.to_text(dns.message.from_wire(w).rcode()) for w, _ in self.got]


def tunnel(
    *order: UpstreamSpec, profile: Profile = Profile.OPPORTUNISTIC, cache: bool = False
) -> tuple[Tunnel, Events]:
    events = Events()
    cfg = TunnelConfig(upstreams=order, profile=profile, listen=())
    if not cache:  # routing and failover: every query must reach an upstream
        cfg = dataclasses.replace(cfg, cache=None)
    t = Tunnel(cfg, events=events, upstream_factory=lambda *a: cast(Upstream, MemUpstream(*a)))
    return t, events


def mem(t: Tunnel, i: int) -> MemUpstream:
    return cast(MemUpstream, t.upstreams[i])


def mode(t: Tunnel) -> Mode:
    """The tunnel's mode now (a call: each read is a new fact, not a narrowed one)."""
    return t.mode


def ask(t: Tunnel, client: Client, name: str, qid: int = 4242) -> None:
    q = dns.message.make_query(name, "A", use_edns=False)
    q.id = qid
    t.on_query(q.to_wire(), client, ("127.0.0.1", 5353))


def test_private_first_cleartext_only_after_every_private_failed() -> None:
    async def go() -> None:
        t, events = tunnel(UpstreamSpec(A), UpstreamSpec(B), UpstreamSpec(A, Method.UDP_PLAIN, 53))
        client = Client()
        ask(t, client, "one.test")
        assert [len(mem(t, i).got) for i in range(3)] == [1, 0, 0] and t.pending == 1
        mem(t, 0).fail()  # the next private entry, not cleartext
        assert [len(mem(t, i).got) for i in range(3)] == [0, 1, 0]
        assert mode(t) is Mode.PRIVATE and events.modes == []
        mem(t, 1).fail()  # every private path failed, on evidence: the order's cleartext entry
        assert [len(mem(t, i).got) for i in range(3)] == [0, 0, 1]
        assert mode(t) is Mode.CLEARTEXT and events.modes == [Mode.CLEARTEXT]
        assert t.stats.cleartext == 1
        mem(t, 2).answer()
        assert client.rcodes() == ["NOERROR"] and t.pending == 0
        assert dns.message.from_wire(client.got[0][0]).id == 4242  # the client's own ID
        assert [(s.address, f) for s, f, _ in events.failed] == [
            (A, Failure.RESET),
            (B, Failure.RESET),
        ]

    run(go())


def test_an_order_without_cleartext_never_sends_it() -> None:
    async def go() -> None:
        t, events = tunnel(UpstreamSpec(A), UpstreamSpec(B))
        client = Client()
        ask(t, client, "one.test")
        mem(t, 0).fail()
        mem(t, 1).fail()
        assert client.rcodes() == ["SERVFAIL"] and t.pending == 0
        assert t.stats.cleartext == 0 and t.mode is Mode.DOWN and events.modes == [Mode.DOWN]
        ask(t, client, "two.test")  # nothing usable: at once
        assert client.rcodes() == ["SERVFAIL", "SERVFAIL"] and t.pending == 0
        assert all(not mem(t, i).got for i in range(2))

    run(go())


def test_split_dns_names_never_leave_their_group() -> None:
    async def go() -> None:
        vpn = UpstreamSpec(C)
        t, _events = tunnel(UpstreamSpec(A), vpn, UpstreamSpec(A, Method.TCP_PLAIN, 53))
        t.set_upstreams(
            [UpstreamSpec(A), vpn, UpstreamSpec(A, Method.TCP_PLAIN, 53)],
            routes=[("corp.example", [vpn])],
        )
        client = Client()
        ask(t, client, "www.corp.example")
        ask(t, client, "www.example.org", qid=7)
        assert len(mem(t, 0).got) == 1 and len(mem(t, 1).got) == 1
        assert packet.qname(mem(t, 1).got[0].query, mem(t, 1).got[0].info) == "www.corp.example"
        mem(t, 1).fail()  # the VPN's resolver: its names get SERVFAIL, never another's
        assert client.rcodes() == ["SERVFAIL"] and len(mem(t, 0).got) == 1
        assert not mem(t, 2).got
        mem(t, 0).answer()
        assert client.rcodes() == ["SERVFAIL", "NOERROR"] and t.pending == 0

    run(go())


def test_a_new_order_takes_what_the_old_one_held() -> None:
    async def go() -> None:
        t, _events = tunnel(UpstreamSpec(A))
        client = Client()
        ask(t, client, "moved.test")
        old = mem(t, 0)
        t.set_upstreams([UpstreamSpec(B)])
        assert old.retired and [u.spec.address for u in t.upstreams] == [B]
        t.tick(t.loop.time())  # the retired one is swept: what it held goes to the new order
        assert not old.got and len(mem(t, 0).got) == 1 and t.pending == 1
        mem(t, 0).answer()
        assert client.rcodes() == ["NOERROR"] and t.pending == 0

    run(go())


def test_strict_refuses_an_order_with_cleartext() -> None:
    async def go() -> None:
        t, _events = tunnel(UpstreamSpec(A), profile=Profile.STRICT)
        try:
            t.set_upstreams([UpstreamSpec(A), UpstreamSpec(A, Method.TCP_PLAIN, 53)])
        except Exception as exc:  # UsageError: the guard against an order policy never makes
            assert "never sends cleartext" in str(exc)
        else:
            raise AssertionError("a cleartext entry under strict was accepted")
        assert [u.spec for u in t.upstreams] == [UpstreamSpec(A)]

    run(go())


def test_an_echoed_query_is_not_an_answer() -> None:
    async def go() -> None:
        t, _events = tunnel(UpstreamSpec(A))
        client = Client()
        ask(t, client, "echo.test")
        mem(t, 0).echo()
        assert client.rcodes() == ["SERVFAIL"] and t.pending == 0
        assert mem(t, 0).stats.mismatched == 1

    run(go())
