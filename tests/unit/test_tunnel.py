"""agent/tunnel against the in-process test peer: pipelining, IDs, failover, limits, profiles.

The tunnel, the peer(s) and the clients (dnspython's async queries, raw sockets) share
one event loop; every test is bounded by `run`'s timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from agent.dns.wire import frame
from agent.errors import UsageError
from agent.model import Failure, Method, Profile, UpstreamSpec
from agent.policy import tunnel_order
from agent.tunnel.forwarder import Mode, Tunnel
from agent.tunnel.retransmit import MAX_RETRANSMITS, RTO_INITIAL, RTO_MIN
from agent.tunnel.settings import TunnelConfig
from agent.tunnel.upstream import State
from tests.conftest import Certs, run
from tests.lab.certs import CertFiles
from tests.lab.peer import PEER_A, Fault, Peer, PeerConfig

HOST = "127.0.0.1"


def tls_up(p: Peer, name: str | None = None) -> UpstreamSpec:
    assert p.tls_port is not None
    return UpstreamSpec(HOST, Method.TLS_PORT, p.tls_port, name)


class Events:
    """The tunnel's owner, as a recorder (the engine's side of TunnelEvents)."""

    def __init__(self) -> None:
        self.failed: list[tuple[UpstreamSpec, Failure, str]] = []
        self.recovered: list[UpstreamSpec] = []
        self.modes: list[Mode] = []

    def upstream_failed(self, spec: UpstreamSpec, failure: Failure, detail: str) -> None:
        self.failed.append((spec, failure, detail))

    def upstream_recovered(self, spec: UpstreamSpec) -> None:
        self.recovered.append(spec)

    def mode_changed(self, mode: Mode, why: str) -> None:
        self.modes.append(mode)


@contextlib.asynccontextmanager
async def tunnel(
    *upstreams: UpstreamSpec, events: Events | None = None, **kw: Any
) -> AsyncIterator[Tunnel]:
    kw.setdefault("listen", ((HOST, 0),))
    kw.setdefault("profile", Profile.OPPORTUNISTIC)
    kw.setdefault("cache", None)  # these tests are about forwarding: test_tunnel_cache.py
    t = Tunnel(TunnelConfig(upstreams=upstreams, **kw), events=events)
    await t.start()
    try:
        yield t
    finally:
        await t.stop()


@contextlib.asynccontextmanager
async def peer(cert: CertFiles | None, *faults: Fault, **kw: Any) -> AsyncIterator[Peer]:
    cfg = PeerConfig(
        cert=cert.cert if cert else None,
        key=cert.key if cert else None,
        faults=frozenset(faults),
        **kw,
    )
    async with Peer(cfg) as p:
        yield p


async def ask(
    t: Tunnel, name: str, rdtype: str = "A", *, tcp: bool = False, wait: float = 3, **kw: Any
) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kw)
    host, port = t.addresses[0]
    if tcp:
        return await dns.asyncquery.tcp(q, host, port=port, timeout=wait)
    return await dns.asyncquery.udp(q, host, port=port, timeout=wait, ignore_trailing=False)


def a_of(m: dns.message.Message) -> str:
    return m.answer[0][0].address if m.answer else dns.rcode.to_text(m.rcode())


# -- the basics -------------------------------------------------------------------------------


def test_forwards_over_tls_padded(certs: Certs) -> None:
    async def go() -> None:
        async with (
            peer(certs.good) as p,
            tunnel(tls_up(p), profile=Profile.STRICT, ca_file=str(certs.ca.path)) as t,
        ):
            r = await ask(t, "www.example.test")
            assert a_of(r) == PEER_A
            r2 = await ask(t, "www.example.test", use_edns=False)  # a client without EDNS
            assert a_of(r2) == PEER_A and r2.edns == -1  # no OPT comes back to it
            r3 = await ask(t, "www.example.test", tcp=True)
            assert a_of(r3) == PEER_A
            seen = [s for s in p.seen if s.qname == "www.example.test."]
            assert [s.via for s in seen] == ["tls-port"] * 3
            assert all(s.padded for s in seen)
            assert not [s for s in p.seen if s.via in ("udp", "tcp")]  # no cleartext at all
            assert p.connections == 1  # one connection, reused for every client
            assert t.stats.answered == 3

    run(go())


def test_pipelining_answers_out_of_order(certs: Certs) -> None:
    async def go() -> None:
        async with peer(certs.good) as p, tunnel(tls_up(p)) as t:
            await ask(t, "warm.test")
            done: list[str] = []

            async def one(name: str) -> None:
                r = await ask(t, name)
                assert a_of(r) == PEER_A
                done.append(name)

            names = ["delay-400.test", "delay-200.test", "delay-1.test"]
            await asyncio.gather(*(one(n) for n in names))
            assert done == list(reversed(names))  # the fast ones did not wait for the slow
            assert p.connections == 1

    run(go())


def test_tcp_client_pipelines(certs: Certs) -> None:
    async def go() -> None:
        async with peer(certs.good) as p, tunnel(tls_up(p)) as t:
            host, port = t.addresses[0]
            reader, writer = await asyncio.open_connection(host, port)
            queries = [
                dns.message.make_query(n, "A")
                for n in ("delay-300.test", "delay-100.test", "now.test")
            ]
            writer.write(b"".join(frame(q.to_wire()) for q in queries))  # all in one segment
            got = []
            for _ in queries:
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                got.append(dns.message.from_wire(await reader.readexactly(size)))
            writer.close()
            assert [m.question[0].name.to_text() for m in got] == [
                "now.test.",
                "delay-100.test.",
                "delay-300.test.",
            ]
            assert all(q.is_response(m) for m in got for q in queries if q.id == m.id)

    run(go())


def test_same_id_from_two_clients(certs: Certs) -> None:
    """Two clients, one ID: each gets the answer to its own question."""

    async def go() -> None:
        async with peer(certs.good) as p, tunnel(tls_up(p)) as t:
            qa = dns.message.make_query("delay-150.alpha.test", "A", id=4242)
            qb = dns.message.make_query("delay-100.beta.test", "AAAA", id=4242)
            host, port = t.addresses[0]
            ra, rb = await asyncio.gather(
                dns.asyncquery.udp(qa, host, port=port, timeout=3),
                dns.asyncquery.udp(qb, host, port=port, timeout=3),
            )
            assert qa.is_response(ra) and qb.is_response(rb)
            assert ra.question[0].name.to_text() == "delay-150.alpha.test."
            assert rb.question[0].rdtype == dns.rdatatype.AAAA

    run(go())


# -- upstream trouble -------------------------------------------------------------------------


def test_upstream_closes_mid_flight(certs: Certs) -> None:
    async def go() -> None:
        async with peer(certs.good, close_after=4) as p, tunnel(tls_up(p)) as t:
            names = [f"q{i}.test" for i in range(10)]
            answers = await asyncio.gather(*(ask(t, n) for n in names))
            assert [a_of(r) for r in answers] == [PEER_A] * 10
            assert [r.question[0].name.to_text() for r in answers] == [n + "." for n in names]
            up = t.upstreams[0]
            assert up.stats.reconnects >= 2 and p.connections >= 3
            assert t.stats.servfail == 0

    run(go())


def test_failover_in_order_and_recovery(certs: Certs) -> None:
    async def go() -> None:
        async with peer(certs.good) as a, peer(certs.good) as b:
            spec_a, spec_b = tls_up(a), tls_up(b)
            async with tunnel(spec_a, spec_b, backoff_min=0.3) as t:
                assert a_of(await ask(t, "one.test")) == PEER_A
                assert [s.qname for s in a.seen].count("one.test.") == 1 and not b.seen
                await a.stop()  # A goes away: connection reset/closed, then refused
                assert a_of(await ask(t, "two.test")) == PEER_A
                assert "two.test." in [s.qname for s in b.seen]
                assert t.upstream(spec_a) is not None
                # A comes back on the same port; after its backoff it is first again
                a2 = Peer(dataclasses.replace(a.config, tls_port=spec_a.port))
                async with a2:
                    for _ in range(40):
                        await asyncio.sleep(0.1)
                        up = t.upstream(spec_a)
                        if up is not None and up.state is State.UP:
                            break
                    assert a_of(await ask(t, "three.test")) == PEER_A
                    assert "three.test." in [s.qname for s in a2.seen]

    run(go())


def test_silent_upstream_fails_over_on_evidence(certs: Certs) -> None:
    """Silent to the query and to the liveness probe after it: dead, on evidence; the
    query goes to the next private upstream and the owner is told."""

    async def go() -> None:
        events = Events()
        async with (
            peer(certs.good, Fault.SLOW, delay=30) as a,
            peer(certs.good) as b,
            tunnel(
                tls_up(a), tls_up(b), events=events, liveness_after=0.3, liveness_timeout=0.3
            ) as t,
        ):
            t0 = time.monotonic()
            r = await ask(t, "stuck.test")
            assert a_of(r) == PEER_A
            assert "stuck.test." in [s.qname for s in b.seen]
            assert 0.55 < time.monotonic() - t0 < 1.5
            up = t.upstreams[0]
            assert up.state is State.BACKOFF and up.stats.liveness_probes == 1
            assert "liveness probe" in up.last_error
            assert [(s, f) for s, f, _ in events.failed] == [(tls_up(a), Failure.TIMEOUT)]
            assert events.modes == []  # b was there all along: still private

    run(go())


def test_slow_answer_is_waited_for_and_never_sent_in_cleartext(certs: Certs) -> None:
    """A 3 s answer (a cold cache) on a quiet, healthy TLS connection, with a cleartext
    fallback in the order: waited for inside TLS; nothing goes out in cleartext."""

    async def go() -> None:
        events = Events()
        async with peer(certs.good) as p:
            order = tunnel_order([tls_up(p)], Profile.OPPORTUNISTIC, cleartext_port=p.dns_port)
            assert not order[-1].private  # the fallback is there, and unused
            async with tunnel(*order, events=events) as t:
                t0 = time.monotonic()
                r = await ask(t, "delay-3000.test", wait=6)
                assert a_of(r) == PEER_A
                assert 2.9 < time.monotonic() - t0 < 4.0
                up = t.upstreams[0]
                assert up.state is State.UP and up.stats.liveness_probes >= 1
                assert [s.via for s in p.seen if s.qname == "delay-3000.test."] == ["tls-port"]
                assert not [s for s in p.seen if s.via in ("tcp", "udp")]
                assert t.stats.cleartext == 0 and t.mode is Mode.PRIVATE
                assert events.failed == [] and events.modes == []

    run(go())


def test_idle_close_then_resumed_reconnect(certs: Certs) -> None:
    async def go() -> None:
        async with peer(certs.good) as p, tunnel(tls_up(p), idle_timeout=0.3) as t:
            assert a_of(await ask(t, "first.test")) == PEER_A
            for _ in range(30):
                await asyncio.sleep(0.05)
                if p.open_connections == 0:
                    break
            assert p.open_connections == 0  # closed by us, for being idle
            assert t.upstreams[0].state is State.IDLE
            assert a_of(await ask(t, "second.test")) == PEER_A
            assert p.connections == 2
            assert p.resumed == 1  # the server saw a resumed session
            assert t.upstreams[0].stats.resumptions == 1

    run(go())


def test_server_keepalive_is_honoured(certs: Certs) -> None:
    async def go() -> None:
        async with peer(certs.good, keepalive=0.8) as p, tunnel(tls_up(p), idle_timeout=60) as t:
            assert a_of(await ask(t, "a.test")) == PEER_A
            up = t.upstreams[0]
            for _ in range(40):
                await asyncio.sleep(0.05)
                if up.keepalive is not None:
                    break
            assert up.keepalive == pytest.approx(0.8)
            await asyncio.sleep(1.0)
            assert up.state is State.IDLE and p.open_connections == 0

    run(go())


def test_query_timeout_answers_servfail(certs: Certs) -> None:
    async def go() -> None:
        async with (
            peer(certs.good) as p,
            tunnel(tls_up(p), query_timeout=0.4, stall_timeout=5) as t,
        ):
            t0 = time.monotonic()
            r = await ask(t, "delay-3000.test")
            assert r.rcode() == dns.rcode.SERVFAIL
            assert 0.35 < time.monotonic() - t0 < 1.0
            assert t.upstreams[0].stats.timeouts == 1

    run(go())


# -- clients ----------------------------------------------------------------------------------


def test_truncation_for_udp(certs: Certs) -> None:
    async def go() -> None:
        async with peer(certs.good) as p, tunnel(tls_up(p)) as t:
            r = await ask(t, "big-3000.test", "TXT", use_edns=0, payload=1232)
            assert r.flags & dns.flags.TC and not r.answer
            r = await ask(t, "big-600.test", "TXT", use_edns=False)
            assert r.flags & dns.flags.TC and not r.answer and r.edns == -1
            r = await ask(t, "big-600.test", "TXT", use_edns=0, payload=1232)
            assert not r.flags & dns.flags.TC and r.answer
            r = await ask(t, "big-3000.test", "TXT", tcp=True)
            assert not r.flags & dns.flags.TC
            assert sum(len(s) for s in r.answer[0][0].strings) >= 3000
            assert t.stats.truncated == 2

    run(go())


def test_malformed_client_packets(certs: Certs) -> None:
    async def go() -> None:
        async with peer(certs.good) as p, tunnel(tls_up(p)) as t:
            host, port = t.addresses[0]
            good = dns.message.make_query("ok.test", "A")
            bad_question = good.to_wire()[:12] + b"\x3fabc"
            loop = asyncio.get_running_loop()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.setblocking(False)
                await loop.sock_connect(s, (host, port))
                for junk in (b"", b"\x00", b"\xff" * 11, b"\xff" * 300, bad_question):
                    s.send(junk)
                async with asyncio.timeout(2):
                    reply = await loop.sock_recv(s, 512)
            formerr = dns.message.from_wire(reply)
            assert formerr.rcode() == dns.rcode.FORMERR and formerr.id == good.id
            # TCP: a frame of garbage, then a good query on the same connection
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(frame(b"\x01\x02\x03") + frame(good.to_wire()))
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            assert good.is_response(dns.message.from_wire(await reader.readexactly(size)))
            writer.close()
            assert a_of(await ask(t, "still.works.test")) == PEER_A
            assert t.stats.malformed == 6

    run(go())


def test_limits_hold_under_a_bounded_flood(certs: Certs) -> None:
    async def go() -> None:
        async with peer(certs.good) as p, tunnel(tls_up(p), max_pending_per_client=20) as t:
            await ask(t, "warm.test")
            host, port = t.addresses[0]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
                flood.setblocking(False)
                flood.connect((host, port))
                for i in range(500):  # bounded: 500 slow queries, one client
                    with contextlib.suppress(BlockingIOError):
                        flood.send(dns.message.make_query(f"delay-500.f{i}.test", "A").to_wire())
                t0 = time.monotonic()
                r = await ask(t, "other.client.test")  # another client is not starved
                assert a_of(r) == PEER_A and time.monotonic() - t0 < 0.3
                await asyncio.sleep(0.7)
                answers = 0
                with contextlib.suppress(BlockingIOError):
                    while flood.recv(512):
                        answers += 1
            assert answers == 20  # exactly its share
            assert t.stats.dropped_limit == 480
            assert t.pending == 0

    run(go())


# -- profiles ---------------------------------------------------------------------------------


def test_strict_unavailable_answers_servfail_at_once_no_cleartext(certs: Certs) -> None:
    async def go() -> None:
        async with (
            peer(certs.wrong_ca) as p,
            tunnel(
                tls_up(p),
                UpstreamSpec(HOST, Method.TLS_UPGRADE, p.dns_port),
                profile=Profile.STRICT,
                ca_file=str(certs.ca.path),
            ) as t,
        ):
            t0 = time.monotonic()
            r = await ask(t, "secret.example.test")
            assert r.rcode() == dns.rcode.SERVFAIL
            assert time.monotonic() - t0 < 1.0
            t1 = time.monotonic()
            r = await ask(t, "secret2.example.test")  # both in backoff now: immediate
            assert r.rcode() == dns.rcode.SERVFAIL and time.monotonic() - t1 < 0.1
            assert t.mode is Mode.DOWN
            assert not [s for s in p.seen if "secret" in s.qname]  # never on the wire, in any form
            assert {f"{s.via}:{s.qname}" for s in p.seen} == {"tcp:STARTTLS."}  # the dummy only
            assert t.plain == []

    run(go())


def test_encrypted_takes_any_certificate_strict_does_not(certs: Certs) -> None:
    async def go() -> None:
        async with peer(certs.self_signed) as p:
            async with tunnel(tls_up(p), profile=Profile.ENCRYPTED) as t:
                assert a_of(await ask(t, "a.test")) == PEER_A
            async with tunnel(tls_up(p), profile=Profile.STRICT, ca_file=str(certs.ca.path)) as t:
                assert (await ask(t, "a.test")).rcode() == dns.rcode.SERVFAIL
            async with tunnel(
                UpstreamSpec(
                    HOST, Method.TLS_PORT, p.tls_port or 0, pins=frozenset({certs.self_signed.pin})
                ),
                profile=Profile.STRICT,
            ) as t:
                assert a_of(await ask(t, "a.test")) == PEER_A

    run(go())


def test_opportunistic_falls_back_to_cleartext_and_says_so(certs: Certs) -> None:
    async def go() -> None:
        modes: list[Mode] = []
        async with peer(None, tls_port=None, upgrade=False) as p:
            closed = socket.socket()
            closed.bind((HOST, 0))
            dead_tls = UpstreamSpec(HOST, Method.TLS_PORT, closed.getsockname()[1])
            closed.close()
            events = Events()
            order = tunnel_order([dead_tls], Profile.OPPORTUNISTIC, cleartext_port=p.dns_port)
            async with tunnel(*order, events=events) as t:
                r = await ask(t, "plain.test", use_edns=False)
                assert a_of(r) == PEER_A and r.edns == -1
                assert t.mode is Mode.CLEARTEXT and events.modes == [Mode.CLEARTEXT]
                assert [(s.via, s.padded) for s in p.seen if s.qname == "plain.test."] == [
                    ("tcp", False)  # as the client sent it: no OPT, no padding (RFC 7830 6)
                ]
                assert t.stats.cleartext == 1
                assert [(s, f) for s, f, _ in events.failed] == [(dead_tls, Failure.REFUSED)]
            del modes

    run(go())


def test_order_without_cleartext_never_sends_cleartext(certs: Certs) -> None:
    """Opportunistic, but the order (the policy's, e.g. cleartext_fallback = false) has no
    cleartext entry: the tunnel adds none. Every private path dead: SERVFAIL, said."""

    async def go() -> None:
        async with peer(None, tls_port=None, upgrade=False) as p:
            closed = socket.socket()
            closed.bind((HOST, 0))
            dead_tls = UpstreamSpec(HOST, Method.TLS_PORT, closed.getsockname()[1])
            closed.close()
            order = tunnel_order([dead_tls], Profile.OPPORTUNISTIC, cleartext_fallback=False)
            assert order == (dead_tls,)
            events = Events()
            async with tunnel(*order, events=events) as t:
                assert [u.spec for u in t.upstreams] == [dead_tls]
                r = await ask(t, "never.test")
                assert r.rcode() == dns.rcode.SERVFAIL
                assert p.seen == [] and t.stats.cleartext == 0
                assert t.mode is Mode.DOWN and events.modes == [Mode.DOWN]

    run(go())


def test_upgrade_upstream(certs: Certs) -> None:
    async def go() -> None:
        async with (
            peer(certs.good, Fault.BLACKHOLE_TLS) as p,
            tunnel(
                UpstreamSpec(HOST, Method.TLS_UPGRADE, p.dns_port),
                profile=Profile.STRICT,
                ca_file=str(certs.ca.path),
            ) as t,
        ):
            assert a_of(await ask(t, "up.test")) == PEER_A
            assert [s.via for s in p.seen if s.qname == "up.test."] == ["tls-upgrade"]
            assert {s.qname for s in p.seen if s.via in ("tcp", "udp")} == {"STARTTLS."}

    run(go())


def test_new_order_switches_atomically(certs: Certs) -> None:
    async def go() -> None:
        async with peer(certs.good) as a, peer(certs.good) as b, tunnel(tls_up(a)) as t:
            await ask(t, "warm.test")
            slow = [asyncio.create_task(ask(t, f"delay-300.s{i}.test")) for i in range(5)]
            await asyncio.sleep(0.1)
            t.set_upstreams([tls_up(b), tls_up(a)])
            assert a_of(await ask(t, "after.test")) == PEER_A
            assert "after.test." in [s.qname for s in b.seen]
            assert [a_of(r) for r in await asyncio.gather(*slow)] == [PEER_A] * 5
            assert t.stats.servfail == 0

    run(go())


def test_split_dns_routes_and_profile_switch(certs: Certs) -> None:
    async def go() -> None:
        async with peer(certs.good) as home, peer(certs.good) as corp, tunnel(tls_up(home)) as t:
            t.set_upstreams([tls_up(home), tls_up(corp)], routes=[("corp.example", [tls_up(corp)])])
            assert a_of(await ask(t, "intranet.corp.example")) == PEER_A
            assert a_of(await ask(t, "www.example.org")) == PEER_A
            assert [s.qname for s in corp.seen if s.via.startswith("tls")].count(
                "intranet.corp.example."
            ) == 1
            assert "intranet.corp.example." not in [s.qname for s in home.seen]  # never elsewhere
            assert "www.example.org." not in [s.qname for s in corp.seen]
            # the group is down: its names get SERVFAIL rather than leaking to another resolver
            await corp.stop()
            r = await ask(t, "mail.corp.example")
            assert r.rcode() == dns.rcode.SERVFAIL
            assert "mail.corp.example." not in [s.qname for s in home.seen]
            # strict now: the same order, authenticated (by IP address) or nothing
            t.set_upstreams([tls_up(home)], profile=Profile.STRICT)
            assert t.cfg.profile is Profile.STRICT and t.routes == []
            r = await ask(t, "after.switch.test")
            assert r.rcode() == dns.rcode.SERVFAIL  # the system CA does not know our test CA
            t.set_upstreams([tls_up(home, "dns.test")], profile=Profile.OPPORTUNISTIC)
            assert a_of(await ask(t, "back.test")) == PEER_A

    run(go())


def test_empty_order_answers_servfail(certs: Certs) -> None:
    async def go() -> None:
        async with peer(certs.good) as p, tunnel(tls_up(p)) as t:
            t.set_upstreams([])
            assert t.mode is Mode.DOWN
            r = await ask(t, "nothing.test")
            assert r.rcode() == dns.rcode.SERVFAIL

    run(go())


def test_plain_udp_upstream_for_the_portal_exception(certs: Certs) -> None:
    async def go() -> None:
        async with peer(None, tls_port=None) as p:
            udp = UpstreamSpec(HOST, Method.UDP_PLAIN, p.dns_port)
            async with tunnel(udp) as t:
                assert a_of(await ask(t, "portal.test")) == PEER_A
                assert a_of(await ask(t, "portal2.test", tcp=True)) == PEER_A
                assert [s.via for s in p.seen if s.qname.startswith("portal")] == ["udp", "udp"]
                assert t.mode is Mode.CLEARTEXT
            with pytest.raises(UsageError, match="never sends cleartext"):
                Tunnel(TunnelConfig(upstreams=(udp,), profile=Profile.STRICT))

    run(go())


def _udp_upstream(p: Peer) -> UpstreamSpec:
    return UpstreamSpec(HOST, Method.UDP_PLAIN, p.dns_port)


def test_udp_upstream_retransmits_lost_datagrams(certs: Certs) -> None:
    """Two lost datagrams cost two resends under the same ID, not a SERVFAIL at the deadline."""

    async def go() -> None:
        async with peer(None, tls_port=None, drop_udp=2) as p, tunnel(_udp_upstream(p)) as t:
            up = t.upstreams[0]
            assert up.rtt.rto == RTO_INITIAL  # nothing learnt yet
            # the first query: resent RTO_INITIAL and 3 x RTO_INITIAL after its first send
            assert a_of(await ask(t, "warm.test")) == PEER_A  # dropped twice, then answered
            assert up.stats.retransmits == 2 and p.udp_dropped == 2
            assert up.rtt.rto == RTO_INITIAL  # an answer to a resent query is no RTT sample
            assert a_of(await ask(t, "warm.test")) == PEER_A  # not dropped: once is enough
            assert up.stats.retransmits == 2
            assert up.rtt.rto == RTO_MIN  # loopback: the floor from now on
            r = await ask(t, "lossy.test", tcp=True)
            assert a_of(r) == PEER_A
            assert up.stats.retransmits == 4 and p.udp_dropped == 4
            assert [s.qname for s in p.seen] == ["warm.test.", "warm.test.", "lossy.test."]
            assert up.stats.timeouts == 0 and t.stats.servfail == 0
            assert up.stats.answers == 3 and up.state is State.UP

    run(go())


def test_udp_upstream_slow_answer_resent_once_answered_once(certs: Certs) -> None:
    """A query slower than the timeout is resent; both copies are answered, the client gets
    one answer and the late one is dropped."""

    async def go() -> None:
        async with peer(None, tls_port=None) as p, tunnel(_udp_upstream(p)) as t:
            up = t.upstreams[0]
            assert a_of(await ask(t, "warm.test")) == PEER_A
            assert up.rtt.rto == RTO_MIN
            host, port = t.addresses[0]
            loop = asyncio.get_running_loop()
            q = dns.message.make_query("delay-500.slow.test", "A")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.setblocking(False)
                await loop.sock_connect(s, (host, port))
                await loop.sock_sendall(s, q.to_wire())
                r = dns.message.from_wire(await loop.sock_recv(s, 512))
                assert q.is_response(r) and a_of(r) == PEER_A
                for _ in range(100):  # until the peer has answered both copies
                    await asyncio.sleep(0.02)
                    copies = [x for x in p.seen if x.qname.startswith("delay")]
                    if len(copies) == 2 and not p._tasks:
                        break
                await asyncio.sleep(0.1)  # the late answer reaches the tunnel, which drops it
                with pytest.raises(BlockingIOError):
                    s.recv(512)  # no second answer
            assert up.stats.retransmits == 1  # at RTO_MIN; the next would be due after 0.6 s
            assert up.stats.answers == 2 and t.stats.answered == 2
            assert up.rtt.rto == RTO_MIN  # the answer to a resent query taught nothing

    run(go())


def test_udp_upstream_retransmits_a_bounded_number_of_times(certs: Certs) -> None:
    async def go() -> None:
        async with (
            peer(None, tls_port=None, drop_udp=99) as p,
            tunnel(_udp_upstream(p), query_timeout=4.0, stall_timeout=10) as t,
        ):
            up = t.upstreams[0]
            up.rtt.sample(0.001)  # as if warmed up on loopback: the timeout is RTO_MIN
            r = await ask(t, "gone.test", wait=6)
            assert r.rcode() == dns.rcode.SERVFAIL  # the deadline: every send was lost
            # resent at 0.2, 0.6 and 1.4 s; a fourth (at 3 s) would fit the deadline
            assert up.stats.retransmits == MAX_RETRANSMITS == 3
            assert p.udp_dropped == MAX_RETRANSMITS + 1 and p.seen == []
            assert up.stats.timeouts == 1

    run(go())


def test_udp_upstream_truncated_answer_is_asked_again_over_tcp(certs: Certs) -> None:
    async def go() -> None:
        async with peer(None, tls_port=None) as p, tunnel(_udp_upstream(p)) as t:
            up = t.upstreams[0]
            r = await ask(t, "big-3000.test", "TXT", tcp=True)  # the peer truncates over UDP
            assert not r.flags & dns.flags.TC and r.rcode() == dns.rcode.NOERROR
            assert sum(len(s) for s in r.answer[0][0].strings) >= 3000
            assert [s.via for s in p.seen] == ["udp", "tcp"]
            # a UDP client with room for it gets the whole answer, over UDP
            r = await ask(t, "big-2000.test", "TXT", use_edns=0, payload=4096)
            assert not r.flags & dns.flags.TC and r.answer
            # one without room gets TC=1 from the tunnel, as for any answer too large for it
            r = await ask(t, "big-3000.test", "TXT", use_edns=0, payload=1232)
            assert r.flags & dns.flags.TC and not r.answer
            assert up.stats.tc_retries == 3 and up.stats.tc_retry_failures == 0
            assert t.stats.truncated == 1
            assert [s.via for s in p.seen] == ["udp", "tcp"] * 3
            # a UDP client without EDNS (512 bytes) could never take what the server truncated:
            # its truncated answer goes back at once
            r = await ask(t, "big-3000.test", "TXT", use_edns=False)
            assert r.flags & dns.flags.TC and not r.answer and r.edns == -1
            assert up.stats.tc_retries == 3 and [s.via for s in p.seen][6:] == ["udp"]
            assert p.connections == 1  # one TCP connection, reused
            assert up.stats.answers == 4 and t.stats.servfail == 0
            # answers that fit are not asked again
            assert a_of(await ask(t, "small.test", tcp=True)) == PEER_A
            assert up.stats.tc_retries == 3

    run(go())


def test_udp_upstream_truncated_and_tcp_fails(certs: Certs) -> None:
    """TCP to the server does not work: UDP clients get the truncated answer as it came (they
    may retry over TCP themselves), TCP clients SERVFAIL; the UDP upstream stays up."""

    async def go() -> None:
        async with peer(None, Fault.RESET, tls_port=None) as p, tunnel(_udp_upstream(p)) as t:
            up = t.upstreams[0]
            r = await ask(t, "big-3000.test", "TXT", tcp=True)
            assert r.rcode() == dns.rcode.SERVFAIL
            r = await ask(t, "big-3000.test", "TXT", use_edns=0, payload=1232)
            assert r.flags & dns.flags.TC and r.rcode() == dns.rcode.NOERROR
            assert up.stats.tc_retries == 2 and up.stats.tc_retry_failures == 2
            assert p.connections >= 1  # it did try
            assert up.state is State.UP and t.mode is Mode.CLEARTEXT
            assert a_of(await ask(t, "small.test", tcp=True)) == PEER_A

    run(go())


def test_udp_upstream_truncated_and_tcp_never_answers(certs: Certs) -> None:
    """The TCP retry is still waiting at the deadline: the same as a failed one."""

    async def go() -> None:
        async with (
            peer(None, Fault.SILENT_TCP, tls_port=None) as p,
            tunnel(_udp_upstream(p), query_timeout=0.5) as t,
        ):
            up = t.upstreams[0]
            udp_client = ask(t, "big-3000.test", "TXT", use_edns=0, payload=1232)
            tcp_client = ask(t, "big-3000.test", "TXT", tcp=True)
            r_udp, r_tcp = await asyncio.gather(udp_client, tcp_client)
            assert r_udp.flags & dns.flags.TC and r_udp.rcode() == dns.rcode.NOERROR
            assert r_tcp.rcode() == dns.rcode.SERVFAIL
            assert up.stats.tc_retries == 2 and up.stats.tc_retry_failures == 2
            assert up.stats.timeouts == 2
            assert [s.via for s in p.seen] == ["udp", "udp"]  # TCP read, never answered

    run(go())


# -- happy eyeballs on the handshake ------------------------------------------------------------


@pytest.mark.parametrize("fault", [Fault.STALL_TLS, Fault.BLACKHOLE_TLS])
def test_slow_handshake_races_the_other_tls_path(certs: Certs, fault: Fault) -> None:
    """Port 853 accepts and then says nothing (a transparent proxy), or swallows SYNs: the
    policy granted the upgrade as the entry's other path; it starts after fallback_delay
    and wins. Only the STARTTLS dummy crosses in cleartext; the owner learns of it."""

    async def go() -> None:
        events = Events()
        async with peer(certs.good, fault) as p:
            assert p.tls_port is not None
            spec = UpstreamSpec(
                HOST, Method.TLS_PORT, p.tls_port, alt=(Method.TLS_UPGRADE, p.dns_port)
            )
            async with tunnel(spec, events=events, profile=Profile.STRICT,
                              ca_file=str(certs.ca.path), fallback_delay=0.2) as t:  # fmt: skip
                t0 = time.monotonic()
                assert a_of(await ask(t, "raced.test")) == PEER_A
                assert 0.2 < time.monotonic() - t0 < 1.5
                assert [s.via for s in p.seen if s.qname == "raced.test."] == ["tls-upgrade"]
                assert {s.qname for s in p.seen if s.via in ("tcp", "udp")} == {"STARTTLS."}
                (failed,) = events.failed
                assert failed[0] == spec and "won the race" in failed[2]
                assert t.upstreams[0].state is State.UP and t.mode is Mode.PRIVATE

    run(go())


def test_without_an_alt_path_a_stalled_handshake_is_a_failure(certs: Certs) -> None:
    async def go() -> None:
        events = Events()
        async with peer(certs.good, Fault.STALL_TLS) as p:
            assert p.tls_port is not None
            spec = UpstreamSpec(HOST, Method.TLS_PORT, p.tls_port)
            async with tunnel(spec, events=events, connect_timeout=0.5, fallback_delay=0.1) as t:
                r = await ask(t, "stalled.test")
                assert r.rcode() == dns.rcode.SERVFAIL
                assert [f for _, f, _ in events.failed] == [Failure.TIMEOUT]
                assert p.seen == []  # the upgrade was not the order's to try: nothing else
                assert t.mode is Mode.DOWN

    run(go())


# -- hostile upstreams ----------------------------------------------------------------------------


def test_a_server_closing_on_every_query_is_backed_off_not_stormed(certs: Certs) -> None:
    """The server reads each query and closes, answering nothing, while clients keep asking
    (for 2 s). Consecutive closes without an answer back the upstream off (backoff_min
    doubling to backoff_max, jittered) instead of a connection per query; only client
    queries are resent, once, never the tunnel's own; the pending count is exact after
    every query. Once the server answers again, so does the upstream, and the count of
    unanswered connections starts over."""

    async def go() -> None:
        events = Events()
        async with (
            peer(certs.good, Fault.CLOSE_ON_QUERY) as p,
            tunnel(tls_up(p), events=events, backoff_min=0.1, backoff_max=0.4) as t,
        ):
            cpu0, t0 = time.process_time(), time.monotonic()
            asked = 0
            while time.monotonic() - t0 < 2.0:
                r = await ask(t, f"q{asked}.test", wait=2)
                asked += 1
                assert r.rcode() == dns.rcode.SERVFAIL and t.pending == 0
                await asyncio.sleep(0.02)
            cpu = time.process_time() - cpu0
            assert asked > 20  # SERVFAIL comes at once while backed off
            assert 4 <= p.connections <= 12, p.connections  # was 138 (two per query)
            assert cpu < 0.6, cpu  # tunnel, peer and clients: 0.1 s; the storm took 0.6 s
            hellos = [s for s in p.seen if s.qname == "." and s.qtype == "NS"]
            assert len(hellos) <= p.handshakes  # one per connection: never resent
            for i in range(asked):
                assert [s.qname for s in p.seen].count(f"q{i}.test.") <= 2  # resent once at most
            up = t.upstreams[0]
            assert up.state in (State.BACKOFF, State.CONNECTING, State.UP)
            assert {f for _, f, _ in events.failed} == {Failure.CLOSED}
            assert Mode.DOWN in events.modes
            # the server answers again: back in use within a backoff, counting from zero
            await p.set_faults([])
            for _ in range(30):
                r = await ask(t, "back.test", wait=2)
                assert t.pending == 0
                if r.rcode() == dns.rcode.NOERROR:
                    break
                await asyncio.sleep(0.05)
            assert a_of(r) == PEER_A
            assert up.unanswered == 0 and up.state is State.UP and t.mode is Mode.PRIVATE
            assert events.recovered == [tls_up(p)]

    run(go())
