"""The cache inside the tunnel (agent/tunnel/forwarder.py with agent/tunnel/cache.py), in
memory: its privacy rules, each with a test that fails if the rule is broken.

- an answer learnt in cleartext is never given once the profile forbids cleartext;
- split-DNS routes are cached apart, and a route's answers go when the route does;
- `flush_cache` (the network changed, or flush-caches) leaves nothing, not even an answer
  that was on its way;
- serve-stale only when asked for, prefetch on the tunnel's own account.

The cache's byte-level rules (TTLs, negative answers, bounds) are tests/unit/test_cache.py's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import dns.message
import dns.rcode
import dns.rrset

from agent.model import Method, Profile, UpstreamSpec
from agent.tunnel.cache import CacheSettings
from agent.tunnel.forwarder import Tunnel
from agent.tunnel.settings import TunnelConfig
from agent.tunnel.upstream import Upstream
from tests.conftest import run
from tests.unit.test_tunnel import Events
from tests.unit.test_tunnel_routing import A, B, C, Client, MemUpstream, mem

ANSWER = "192.0.2.10"


class Clock:
    """The tunnel's loop, its time moved by the test (the cache counts TTLs down by it)."""

    def __init__(self, loop: Any) -> None:
        self.loop, self.offset = loop, 0.0

    def time(self) -> float:
        return float(self.loop.time()) + self.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loop, name)


def tunnel(
    *order: UpstreamSpec, profile: Profile = Profile.OPPORTUNISTIC, **cache: Any
) -> tuple[Tunnel, Clock]:
    cfg = TunnelConfig(upstreams=order, profile=profile, listen=())
    cfg = dataclasses.replace(cfg, cache=CacheSettings(**cache))
    t = Tunnel(cfg, events=Events(), upstream_factory=lambda *a: cast(Upstream, MemUpstream(*a)))
    clock = Clock(t.loop)
    t.loop = cast(Any, clock)
    return t, clock


def ask(t: Tunnel, client: Client, name: str, qid: int = 4242) -> None:
    q = dns.message.make_query(name, "A", use_edns=False)
    q.id = qid
    t.on_query(q.to_wire(), client, ("127.0.0.1", 5353))


def answer(up: MemUpstream, ttl: int = 300) -> int:
    """Answer what `up` holds with one A record each; how many it answered."""
    got = up.take_queue()
    for p in got:
        q = dns.message.from_wire(p.query)
        reply = dns.message.make_response(q)
        reply.answer.append(dns.rrset.from_text(q.question[0].name, ttl, "IN", "A", ANSWER))
        up.events.answered(cast(Upstream, up), p, reply.to_wire())
    return len(got)


def asked(t: Tunnel) -> list[int]:
    return [len(mem(t, i).got) for i in range(len(t.upstreams))]


def last(client: Client) -> dns.message.Message:
    return dns.message.from_wire(client.got[-1][0])


def test_a_second_question_is_answered_from_the_cache() -> None:
    async def go() -> None:
        t, clock = tunnel(UpstreamSpec(A))
        client = Client()
        ask(t, client, "www.example.test", qid=1)
        assert answer(mem(t, 0)) == 1
        clock.offset = 100.0
        ask(t, client, "WWW.Example.TEST", qid=2)  # another case, another ID: the same question
        assert asked(t) == [0] and t.pending == 0  # nothing went upstream
        r = last(client)
        assert r.id == 2 and str(r.question[0].name) == "WWW.Example.TEST."
        assert r.answer[0].ttl == 200 and r.answer[0][0].to_text() == ANSWER
        assert t.cache is not None and t.cache.stats.hits == 1
        status = t.status()["cache"]
        assert (status["hits"], status["misses"], status["entries"]) == (1, 1, 1)
        clock.offset = 301.0  # expired: asked again
        ask(t, client, "www.example.test", qid=3)
        assert asked(t) == [1]

    run(go())


def test_a_cleartext_answer_is_never_given_once_the_profile_forbids_cleartext() -> None:
    async def go() -> None:
        plain = UpstreamSpec(A, Method.TCP_PLAIN, 53)
        t, _clock = tunnel(UpstreamSpec(A), plain)
        client = Client()
        mem(t, 0).fail()  # every private path failed: the order's cleartext entry answers
        ask(t, client, "leak.example.test")
        assert asked(t) == [0, 1]
        assert answer(mem(t, 1)) == 1
        ask(t, client, "leak.example.test")  # opportunistic allows it: from the cache
        assert asked(t) == [0, 0] and len(client.got) == 2
        for profile in (Profile.ENCRYPTED, Profile.STRICT):
            t.set_upstreams([UpstreamSpec(B)], profile=profile)
            ask(t, client, "leak.example.test")
            assert asked(t) == [1], f"{profile}: the cleartext answer was given from the cache"
            assert answer(mem(t, 0)) == 1  # learnt over TLS now: that one may be given
            ask(t, client, "leak.example.test")
            assert asked(t) == [0]
            assert t.cache is not None
            t.cache.flush()
            t.set_upstreams([UpstreamSpec(A), plain], profile=Profile.OPPORTUNISTIC)
            mem(t, 0).fail()
            ask(t, client, "leak.example.test")
            assert answer(mem(t, 1)) == 1

    run(go())


def test_the_cache_follows_the_profile_even_without_a_new_order() -> None:
    """An entry's `private` is checked when it is given, not only dropped at the switch."""

    async def go() -> None:
        t, _clock = tunnel(UpstreamSpec(A), UpstreamSpec(A, Method.UDP_PLAIN, 53))
        client = Client()
        mem(t, 0).fail()
        ask(t, client, "late.example.test")
        assert answer(mem(t, 1)) == 1
        t.cfg = dataclasses.replace(t.cfg, profile=Profile.STRICT)  # not through set_upstreams
        ask(t, client, "late.example.test")
        assert t.cache is not None and t.cache.stats.hits == 0

    run(go())


def test_split_dns_routes_are_cached_apart_and_go_with_their_route() -> None:
    async def go() -> None:
        vpn = UpstreamSpec(C)
        t, _clock = tunnel(UpstreamSpec(A), vpn)
        t.set_upstreams([UpstreamSpec(A), vpn], routes=[("corp.example", [vpn])])
        client = Client()
        ask(t, client, "intranet.corp.example")
        assert asked(t) == [0, 1]
        assert answer(mem(t, 1)) == 1
        ask(t, client, "intranet.corp.example")  # the route's own answer: from the cache
        assert asked(t) == [0, 0]
        # the VPN goes: its answers are not given to the name now routed elsewhere
        t.set_upstreams([UpstreamSpec(A)], routes=[])
        ask(t, client, "intranet.corp.example")
        assert asked(t) == [1]
        assert t.cache is not None and t.cache.stats.flushes == 2  # the route came, went

    run(go())


def test_a_flush_leaves_nothing_not_even_an_answer_on_its_way() -> None:
    async def go() -> None:
        t, _clock = tunnel(UpstreamSpec(A))
        client = Client()
        ask(t, client, "one.example.test")
        assert answer(mem(t, 0)) == 1
        ask(t, client, "two.example.test")  # in flight while the network changes
        assert t.flush_cache("network changed") == 1
        assert answer(mem(t, 0)) == 1  # answered after the flush: given, not kept
        assert last(client).answer
        for name in ("one.example.test", "two.example.test"):
            ask(t, client, name)
        assert asked(t) == [2]
        assert t.cache is not None and len(t.cache) == 0

    run(go())


def test_serve_stale_only_when_configured() -> None:
    async def go() -> None:
        for window, want in ((0, "SERVFAIL"), (3600, "NOERROR")):
            t, clock = tunnel(UpstreamSpec(A), serve_stale=window)
            client = Client()
            ask(t, client, "old.example.test")
            assert answer(mem(t, 0), ttl=60) == 1
            clock.offset = 120.0  # expired a minute ago
            ask(t, client, "old.example.test")
            assert asked(t) == [1]  # a stale answer is never given while one may come
            mem(t, 0).fail()
            assert dns.rcode.to_text(last(client).rcode()) == want
            if window:
                assert last(client).answer[0].ttl == 30  # RFC 8767's suggestion

    run(go())


def test_prefetch_refreshes_a_popular_answer_on_the_tunnels_own_account() -> None:
    async def go() -> None:
        t, clock = tunnel(UpstreamSpec(A))
        client = Client()
        ask(t, client, "popular.example.test")
        assert answer(mem(t, 0), ttl=100) == 1
        ask(t, client, "popular.example.test")
        clock.offset = 95.0  # 5 % left, asked twice: refreshed now, the client answered at once
        ask(t, client, "popular.example.test")
        assert len(client.got) == 3 and asked(t) == [1]
        assert t.pending == 1 and t.stats.answered == 3
        assert answer(mem(t, 0), ttl=100) == 1
        assert len(client.got) == 3 and t.pending == 0  # nobody waited for the refresh
        clock.offset = 150.0  # past the first answer's end: the refreshed one is given
        ask(t, client, "popular.example.test")
        assert asked(t) == [0] and last(client).answer[0].ttl == 45

    run(go())


def test_an_answer_with_ttl_0_is_never_given_from_the_cache() -> None:
    async def go() -> None:
        for min_ttl, again in ((0, [1]), (60, [0])):  # min_ttl lifts it: then it is kept
            t, _clock = tunnel(UpstreamSpec(A), min_ttl=min_ttl)
            client = Client()
            ask(t, client, "zero.example.test")
            assert answer(mem(t, 0), ttl=0) == 1
            ask(t, client, "zero.example.test")
            assert asked(t) == again, min_ttl
            assert t.cache is not None
            assert t.cache.stats.not_cacheable == (1 if min_ttl == 0 else 0)

    run(go())


def test_an_answer_is_kept_under_the_route_it_went_by_even_if_the_order_changed_meanwhile() -> None:
    async def go() -> None:
        vpn = UpstreamSpec(C)
        t, _clock = tunnel(UpstreamSpec(A), vpn)
        routes = [("corp.example", [vpn])]
        t.set_upstreams([UpstreamSpec(A), vpn], routes=routes)
        assert t.cache is not None
        client = Client()
        ask(t, client, "warm.example.test")  # the cache is not empty: keys made at the query
        assert answer(mem(t, 0)) == 1
        for warm in (True, False):
            if not warm:
                t.cache.flush()  # empty: the key is made when the answer comes
            name = f"wiki{int(warm)}.corp.example"
            ask(t, client, name)
            t.set_upstreams([UpstreamSpec(A), vpn, UpstreamSpec(B)], routes=routes)  # in flight
            assert answer(mem(t, 1)) == 1
            ask(t, client, name)  # the route's answer, from the cache: its scope kept
            assert asked(t) == [0, 0, 0], warm
            t.set_upstreams([UpstreamSpec(A), vpn], routes=routes)

    run(go())
