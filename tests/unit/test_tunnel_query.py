"""`dnstls-agent query` in memory: Tunnel.resolve over upstreams that live in memory, and the
daemon's `query` command (its validation, and the answer it builds from the tunnel and the
engine's knowledge).

What is checked: a query the agent asks goes the way a client's does (order, failover,
split-DNS routes, cache, deadline) and says which upstream answered, or that the cache did,
or that no upstream did (the tunnel's SERVFAIL); it counts once in the clients' statistics;
an ordinary client's answer is what it was.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any, cast

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from agent import cli, control
from agent.commands import query_question
from agent.config import Config
from agent.daemon import Daemon
from agent.dns.packet import PacketError
from agent.engine import Engine
from agent.errors import UsageError
from agent.model import Auth, AuthSource, Method, ProbeResult, ProbeSettings, Profile, UpstreamSpec
from agent.state import Store
from agent.tunnel.cache import CacheSettings
from agent.tunnel.forwarder import Answered, Tunnel
from agent.tunnel.settings import TunnelConfig
from agent.tunnel.upstream import Upstream
from agent.watchers.nm import NMSnapshot
from tests.conftest import run
from tests.unit.test_engine import FakeProber, cfg, eth0, settle
from tests.unit.test_tunnel import Events
from tests.unit.test_tunnel_cache import Clock
from tests.unit.test_tunnel_routing import A, B, C, Client, MemUpstream, mem

ANSWER = "192.0.2.10"


def tunnel(*order: UpstreamSpec, cache: bool = False, **kw: Any) -> tuple[Tunnel, Clock]:
    settings = CacheSettings(**kw) if cache else None
    cfg_ = TunnelConfig(upstreams=order, profile=Profile.OPPORTUNISTIC, listen=(), cache=settings)
    t = Tunnel(cfg_, events=Events(), upstream_factory=lambda *a: cast(Upstream, MemUpstream(*a)))
    clock = Clock(t.loop)
    t.loop = cast(Any, clock)
    return t, clock


def query(name: str, qid: int = 777) -> bytes:
    q = dns.message.make_query(name, "A", use_edns=0)
    q.id = qid
    return q.to_wire()


def answer(up: MemUpstream, ttl: int = 300) -> int:
    """Answer what `up` holds with one A record each; how many it answered."""
    got = up.take_queue()
    for p in got:
        q = dns.message.from_wire(p.query)
        reply = dns.message.make_response(q)
        reply.answer.append(dns.rrset.from_text(q.question[0].name, ttl, "IN", "A", ANSWER))
        up.events.answered(cast(Upstream, up), p, reply.to_wire())
    return len(got)


def got(fut: asyncio.Future[Answered]) -> tuple[str, list[str], Answered]:
    """The rcode and A records of a done resolve, and the whole of it."""
    assert fut.done()
    a = fut.result()
    m = dns.message.from_wire(a.wire)
    records = [r.address for rr in m.answer if rr.rdtype == dns.rdatatype.A for r in rr]
    return dns.rcode.to_text(m.rcode()), records, a


def test_the_upstream_that_answered_after_failover_is_named() -> None:
    async def go() -> None:
        t, _ = tunnel(UpstreamSpec(A), UpstreamSpec(B))
        fut = t.resolve(query("one.test"))
        assert not fut.done() and t.pending == 1 and len(mem(t, 0).got) == 1
        mem(t, 0).fail()  # the next in the order takes it, as for a client
        assert not fut.done() and len(mem(t, 1).got) == 1
        assert answer(mem(t, 1)) == 1
        rcode, records, a = got(fut)
        assert (rcode, records) == ("NOERROR", [ANSWER])
        assert a.upstream == UpstreamSpec(B) and not a.from_cache and a.seconds >= 0
        assert dns.message.from_wire(a.wire).id == 777  # the query's own ID back
        assert t.pending == 0
        assert (t.stats.queries, t.stats.answered) == (1, 1)  # counted once, as one client's

    run(go())


def test_split_dns_routes_it_as_a_clients() -> None:
    async def go() -> None:
        vpn = UpstreamSpec(C)
        t, _ = tunnel(UpstreamSpec(A), vpn)
        t.set_upstreams([UpstreamSpec(A), vpn], routes=[("corp.example", [vpn])])
        fut = t.resolve(query("www.corp.example"))
        assert [len(mem(t, i).got) for i in range(2)] == [0, 1]
        answer(mem(t, 1))
        assert got(fut)[2].upstream == vpn

    run(go())


def test_a_cache_hit_says_so_and_asks_no_upstream() -> None:
    async def go() -> None:
        t, _ = tunnel(UpstreamSpec(A), cache=True)
        first = t.resolve(query("cached.test"))
        answer(mem(t, 0))
        assert got(first)[2].upstream == UpstreamSpec(A)
        second = t.resolve(query("cached.test", qid=778))
        assert second.done() and not mem(t, 0).got  # at once, from the cache
        rcode, records, a = got(second)
        assert (rcode, records, a.upstream, a.from_cache) == ("NOERROR", [ANSWER], None, True)
        assert dns.message.from_wire(a.wire).id == 778
        # and a client asking the same is answered from the cache as before
        client = Client()
        t.on_query(query("cached.test", qid=9), client, ("127.0.0.1", 5353))
        assert client.rcodes() == ["NOERROR"] and not mem(t, 0).got
        assert (t.stats.queries, t.stats.answered) == (3, 3)

    run(go())


def test_a_stale_answer_is_the_caches() -> None:
    async def go() -> None:
        t, clock = tunnel(UpstreamSpec(A), cache=True, serve_stale=3600)
        first = t.resolve(query("old.test"))
        answer(mem(t, 0), ttl=60)
        assert not got(first)[2].from_cache
        clock.offset = 120.0  # expired a minute ago: asked again, the upstream fails
        second = t.resolve(query("old.test"))
        assert not second.done() and len(mem(t, 0).got) == 1
        mem(t, 0).fail()
        rcode, records, a = got(second)
        assert (rcode, records, a.upstream, a.from_cache) == ("NOERROR", [ANSWER], None, True)

    run(go())


def test_servfail_made_by_the_tunnel_names_no_upstream() -> None:
    async def go() -> None:
        t, _ = tunnel(UpstreamSpec(A))
        fut = t.resolve(query("down.test"))
        mem(t, 0).fail()
        rcode, _records, a = got(fut)
        assert (rcode, a.upstream, a.from_cache) == ("SERVFAIL", None, False)
        # nothing usable: at once; an empty order too
        assert got(t.resolve(query("down.test")))[0] == "SERVFAIL"
        empty, _ = tunnel()
        rcode, _records, a = got(empty.resolve(query("none.test")))
        assert (rcode, a.upstream, a.from_cache) == ("SERVFAIL", None, False)

    run(go())


def test_the_deadline_answers_it() -> None:
    async def go() -> None:
        t, clock = tunnel(UpstreamSpec(A))
        fut = t.resolve(query("slow.test"))
        t.tick(clock.time())
        assert not fut.done()
        clock.offset = t.cfg.query_timeout + 0.1
        t.tick(clock.time())
        rcode, _records, a = got(fut)
        assert (rcode, a.upstream, a.from_cache, t.pending) == ("SERVFAIL", None, False, 0)

    run(go())


def test_over_the_limit_it_is_refused_by_the_tunnel() -> None:
    async def go() -> None:
        t, _ = tunnel(UpstreamSpec(A))
        t.cfg = dataclasses.replace(t.cfg, max_pending=1)
        t.on_query(query("busy.test"), Client(), ("127.0.0.1", 5353))
        rcode, _records, a = got(t.resolve(query("me.test")))
        assert (rcode, a.upstream, a.from_cache) == ("REFUSED", None, False)

    run(go())


def test_a_malformed_query_is_refused_not_left_waiting() -> None:
    async def go() -> None:
        t, _ = tunnel(UpstreamSpec(A))
        with pytest.raises(PacketError):
            t.resolve(b"\x00\x01")
        with pytest.raises(PacketError):
            t.resolve(query("x.test")[:-3])
        assert t.pending == 0

    run(go())


def test_an_asker_gone_before_the_answer_harms_nothing() -> None:
    async def go() -> None:
        t, _ = tunnel(UpstreamSpec(A))
        fut = t.resolve(query("gone.test"))
        fut.cancel()  # the control connection closed
        assert answer(mem(t, 0)) == 1 and t.pending == 0

    run(go())


# -- the daemon's `query` command -------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        {"command": "query"},  # no name
        {"command": "query", "name": ""},
        {"command": "query", "name": 5},
        {"command": "query", "name": ["www.test"]},
        {"command": "query", "name": "a..test"},
        {"command": "query", "name": "x" * 64 + ".test"},  # a label over 63
        {"command": "query", "name": ".".join(["x" * 60] * 5)},  # over 255 octets
        {"command": "query", "name": "a" * 2000},
        {"command": "query", "name": "bell\x07.test"},
        {"command": "query", "name": "new\nline.test"},
        {"command": "query", "name": "nul\\000.test"},  # escaped: a control octet all the same
        {"command": "query", "name": "del\\127.test"},
        {"command": "query", "name": "www.test", "type": "NOPE"},
        {"command": "query", "name": "www.test", "type": "TYPE65536"},
        {"command": "query", "name": "www.test", "type": "TYPE0"},
        {"command": "query", "name": "www.test", "type": "AXFR"},
        {"command": "query", "name": "www.test", "type": "OPT"},
        {"command": "query", "name": "www.test", "type": "TSIG"},
        {"command": "query", "name": "www.test", "type": 1},
        {"command": "query", "name": "www.test", "type": "A" * 40},
    ],
)
def test_a_bad_question_is_a_usage_error(request_: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        query_question(request_)


def test_good_questions() -> None:
    def q(**kw: Any) -> tuple[str, str]:
        name, rdtype = query_question({"command": "query", **kw})
        return name.to_text(), dns.rdatatype.to_text(rdtype)

    assert q(name="www.example.test") == ("www.example.test.", "A")
    assert q(name="www.example.test.", type="aaaa") == ("www.example.test.", "AAAA")
    assert q(name="example.test", type="TYPE65") == ("example.test.", "HTTPS")
    assert q(name="example.test", type="TYPE65280") == ("example.test.", "TYPE65280")
    assert q(name=".", type="NS") == (".", "NS")
    assert q(name="x.test", type="ANY") == ("x.test.", "ANY")
    assert q(name="bücher.test") == ("xn--bcher-kva.test.", "A")
    longest = ".".join(["x" * 63] * 3) + "." + "x" * 61  # 255 octets on the wire, root too
    assert q(name=longest) == (longest + ".", "A")


class NetworkProber(FakeProber):
    """As the real prober says of a resolver that showed the address the network gave."""

    async def __call__(self, address: str, settings: ProbeSettings) -> ProbeResult:
        result = await super().__call__(address, settings)
        return dataclasses.replace(result, auth_source=AuthSource.NETWORK)


def test_the_daemon_answers_with_who_answered_and_how(tmp_path: Path) -> None:
    """Through Daemon.handle, as the control server calls it: the tunnel's resolve, and
    what the engine learnt of the resolver that answered (its probe: ip-san, from the
    network's address; the link it was chosen for)."""

    async def go() -> None:
        t, _ = tunnel()
        prober = NetworkProber({A: Method.TLS_PORT}, auth=Auth.IP_SAN)
        config: Config = dataclasses.replace(cfg("strict"), hold_empty=0)
        engine = Engine(config, t, Store(tmp_path), prober=prober)
        task = asyncio.create_task(engine.run())
        daemon = Daemon(config, None)
        daemon.engine, daemon.tunnel = engine, t
        try:
            engine.on_nm(NMSnapshot({"eth0": eth0(A)}, "full"))
            await settle(engine)
            assert [u.spec.address for u in t.upstreams] == [A]
            with pytest.raises(UsageError):
                daemon.handle({"command": "query", "name": "bad..name"})
            pending = daemon.handle({"command": "query", "name": "www.example.test", "type": "a"})
            assert not isinstance(pending, dict)
            asking = asyncio.ensure_future(pending)
            await asyncio.sleep(0)
            sent = mem(t, 0).got[0]
            q = dns.message.from_wire(sent.query)
            assert q.flags & dns.flags.RD and q.edns == 0 and not q.ednsflags & dns.flags.DO
            assert answer(mem(t, 0)) == 1
            reply = await asking
            assert reply == {
                "ok": True,
                "name": "www.example.test.",
                "type": "A",
                "rcode": "NOERROR",
                "answer": [f"www.example.test. 300 IN A {ANSWER}"],
                "upstream": f"tls-port:{A}@853",
                "method": "tls-port",
                "auth": "ip-san",
                "auth_source": "network",
                "origin": "network",
                "interface": "eth0",
                "from_cache": False,
                "ms": reply["ms"],
            }
            assert isinstance(reply["ms"], float) and reply["ms"] >= 0
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await t.stop()

    run(go())


# -- the command's output ----------------------------------------------------------------------

UPSTREAM = {
    "upstream": f"tls-port:{A}@853",
    "method": "tls-port",
    "auth": "ip-san",
    "auth_source": "network",
    "origin": "dhcp",
    "interface": "eth0",
    "from_cache": False,
    "ms": 1.94,
}


def said(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
         answer: dict[str, Any], *argv: str) -> tuple[int, str]:  # fmt: skip
    """`dnstls-agent query ...` against an agent that answers `answer`: status, stdout."""
    asked: list[dict[str, Any]] = []

    def ask(path: Path, request: dict[str, Any], timeout: float = 3.0) -> dict[str, Any]:
        asked.append(request)
        return {"ok": True, **answer}

    monkeypatch.setattr(control, "ask", ask)
    status = cli.main(["query", "--socket", "/nonexistent", *argv])
    assert asked and asked[0]["command"] == "query" and asked[0]["name"] == argv[0]
    return status, capsys.readouterr().out


def test_records_and_who_answered(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [f"www.lab.test. 300 IN A {ANSWER}", "www.lab.test. 300 IN A 192.0.2.11"]
    a = {"name": "www.lab.test.", "type": "A", "rcode": "NOERROR", "answer": records}
    status, out = said(monkeypatch, capsys, {**a, **UPSTREAM}, "www.lab.test")
    assert status == 0
    assert out.splitlines() == [
        f"www.lab.test: {ANSWER}",
        "              192.0.2.11",
        f"-- answered by tls-port:{A}@853 (tls-port, authenticated by ip-san, network)",
        "   in 1.9 ms; resolver of eth0 (dhcp)",
    ]
    cached = {**a, "upstream": None, "from_cache": True, "ms": 0.05}
    status, out = said(monkeypatch, capsys, cached, "www.lab.test", "A")
    assert status == 0 and out.splitlines()[-1] == "-- from the tunnel's cache in 0.05 ms"
    mx = {**a, "type": "MX", "answer": ["lab.test. 300 IN MX 10 mail.lab.test."]}
    status, out = said(monkeypatch, capsys, {**mx, **UPSTREAM}, "lab.test", "MX")
    assert status == 0 and out.splitlines()[0] == "lab.test IN MX 10 mail.lab.test."
    status, out = said(monkeypatch, capsys, {**a, **UPSTREAM}, "www.lab.test", "--json")
    assert status == 0 and json.loads(out) == {**a, **UPSTREAM}


@pytest.mark.parametrize(
    ("rcode", "records", "said_"),
    [
        ("NXDOMAIN", [], "nope.lab.test: NXDOMAIN (no such name)"),
        ("NOERROR", [], "nope.lab.test: NODATA (the name has no A record)"),
        ("SERVFAIL", [], "nope.lab.test: SERVFAIL (no upstream could answer)"),
    ],
)
def test_no_answer_says_which_and_exits_1(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    rcode: str,
    records: list[str],
    said_: str,
) -> None:
    a = {"name": "nope.lab.test.", "type": "A", "rcode": rcode, "answer": records, **UPSTREAM}
    status, out = said(monkeypatch, capsys, a, "nope.lab.test")
    assert status == 1 and out.splitlines()[0] == said_
    made = {**a, "upstream": None, "method": None, "from_cache": False}
    status, out = said(monkeypatch, capsys, made, "nope.lab.test", "--json")
    assert status == 1 and json.loads(out)["rcode"] == rcode


def test_an_agent_away_is_status_3_a_refusal_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["query", "--socket", "/nonexistent/control.sock", "www.test"]) == 3
    assert "not running" in capsys.readouterr().err

    def refuse(path: Path, request: dict[str, Any], timeout: float = 3.0) -> dict[str, Any]:
        try:
            query_question(request)  # the agent's own check
        except UsageError as exc:
            raise control.RequestRefused(f"bad request: {exc}") from None
        raise AssertionError("a bad name was not refused")

    monkeypatch.setattr(control, "ask", refuse)
    assert cli.main(["query", "--socket", "/x", "bad..name"]) == 2
    assert "bad request" in capsys.readouterr().err


def test_the_control_server_awaits_an_answer_given_later(tmp_path: Path) -> None:
    """A handler may answer with a coroutine (query waits for the tunnel); a UsageError it
    raises there is a bad request, like one raised at once."""

    async def go() -> None:
        release = asyncio.Event()

        async def later(request: dict[str, Any]) -> dict[str, Any]:
            await release.wait()
            if request.get("name") == "bad":
                raise UsageError("no such thing")
            return {"ok": True, "name": request.get("name")}

        server = control.ControlServer(tmp_path / "control.sock", later)
        await server.start()
        try:
            ask = asyncio.to_thread(control.ask, server.path, {"command": "query", "name": "x"})
            asking = asyncio.ensure_future(ask)
            await asyncio.sleep(0.2)
            assert not asking.done()  # waits for the handler's answer
            release.set()
            assert await asking == {"ok": True, "name": "x"}
            bad = {"command": "query", "name": "bad"}
            with pytest.raises(control.RequestRefused, match="no such thing"):
                await asyncio.to_thread(control.ask, server.path, bad)
        finally:
            await server.close()

    run(go())
