"""agent/engine.py: snapshots in, decisions carried out, state kept, in the real tunnel.

The prober is replaced by a table (`FakeProber`): the real one is tested on its own
against real servers, and the engine's job is the sequencing around it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import dns.asyncquery
import dns.message
import pytest

from agent.config import Config, ConfigProfile, LinkSettings
from agent.engine import Engine, LinkTable
from agent.errors import UsageError
from agent.model import (
    Auth,
    Failure,
    Link,
    Method,
    NetResolver,
    ProbeResult,
    ProbeSettings,
    Profile,
    Source,
    Timings,
    TLSInfo,
    UpstreamSpec,
)
from agent.policy import SUSPECT_REPROBE_MIN, Alert, Warning
from agent.state import Store
from agent.tunnel.forwarder import Tunnel
from agent.tunnel.settings import MAX_UPSTREAMS, TunnelConfig
from agent.watchers.nm import NMSnapshot
from tests.conftest import Certs, run
from tests.lab.peer import PEER_A, Peer, PeerConfig

A, B = "198.51.100.1", "198.51.100.2"
PIN = "pOXrpUt9kgPgbWxBFFcBTbRH2heo2wHwXp1fd4AEVXI="


class FakeProber:
    def __init__(
        self, methods: dict[str, Method], delay: float = 0.01, auth: Auth = Auth.NONE
    ) -> None:
        self.methods = methods
        self.delay = delay
        self.auth = auth  # how every TLS resolver authenticates
        self.calls: list[str] = []

    async def __call__(self, address: str, settings: ProbeSettings) -> ProbeResult:
        self.calls.append(address)
        await asyncio.sleep(self.delay)
        m = self.methods.get(address, Method.UNREACHABLE)
        tls = TLSInfo("TLSv1.3", "x", PIN, self.auth) if m.private else None
        return ProbeResult(address, settings.auth.profile, m, m.private, self.auth if tls else None,
                           tls, Timings(answer_ms=5.0), 10, 10, None, None)  # fmt: skip


def cfg(profile: str = "opportunistic") -> Config:
    return Config(
        defaults=dataclasses.replace(LinkSettings(), profile=ConfigProfile(profile)), debounce=0.01
    )


def eth0(*addrs: str, up: bool = True) -> Link:
    return Link(
        "eth0", up=up, resolvers=tuple(NetResolver(a) for a in addrs), connection_uuid="u-1"
    )


async def settle(engine: Engine, rounds: int = 40) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0.02)
        if not engine.probing and not engine._dirty.is_set():
            return


async def started(
    tmp: Path, prober: FakeProber, config: Config
) -> tuple[Engine, Tunnel, asyncio.Task[None]]:
    tunnel = Tunnel(TunnelConfig(upstreams=(), listen=(("127.0.0.1", 0),)))
    await tunnel.start()
    config = dataclasses.replace(config, hold_empty=0)  # see the hold's own test
    engine = Engine(config, tunnel, Store(tmp), prober=prober, own_addresses={"127.0.0.1"})
    return engine, tunnel, asyncio.create_task(engine.run())


async def stopped(tunnel: Tunnel, task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await tunnel.stop()


def test_snapshot_probe_decide_apply_save(tmp_path: Path) -> None:
    async def go() -> None:
        prober = FakeProber({A: Method.TLS_UPGRADE, B: Method.TCP_PLAIN})
        engine, tunnel, task = await started(tmp_path, prober, cfg())
        try:
            engine.on_nm(NMSnapshot({"eth0": eth0(A, B)}, "full"))
            await settle(engine)
            assert sorted(prober.calls) == [A, B]
            assert [str(u.spec) for u in tunnel.upstreams if u.spec.private] == [
                "tls-upgrade:198.51.100.1@53"
            ]
            assert engine.plan is not None and engine.plan.profile is Profile.OPPORTUNISTIC
            st = engine.status()
            assert st["connectivity"] == "full"
            (iface,) = st["interfaces"]
            assert [(r["address"], r["method"], r["used"]) for r in iface["resolvers"]] == [
                (A, "tls-upgrade", True),
                (B, "tcp-plain", True),  # opportunistic: cleartext, last
            ]
            assert st["order"] == ["tls-upgrade:198.51.100.1@53", "tcp-plain:198.51.100.2@53"]
        finally:
            await stopped(tunnel, task)
        saved = Store(tmp_path).load()
        assert {k.address for k in saved.knowledge.values()} == {A, B}
        assert saved.orders["nm:u-1"] == st["order"]

    run(go())


def test_rejoining_uses_what_was_learnt_at_once(tmp_path: Path) -> None:
    async def go() -> None:
        first = FakeProber({A: Method.TLS_PORT})
        engine, tunnel, task = await started(tmp_path, first, cfg())
        engine.on_nm(NMSnapshot({"eth0": eth0(A)}))
        await settle(engine)
        await stopped(tunnel, task)
        # a new agent process, the same network: the saved order is used before any probe ends
        slow = FakeProber({A: Method.TLS_PORT}, delay=0.5)
        engine, tunnel, task = await started(tmp_path, slow, cfg())
        try:
            engine.on_nm(NMSnapshot({"eth0": eth0(A)}))
            await asyncio.sleep(0.05)
            assert engine.plan is not None
            assert engine.plan.upstreams == (UpstreamSpec(A, Method.TLS_PORT, 853),)
            assert engine.plan.probes[0].reason.startswith("network rejoined")
            await settle(engine)
            assert slow.calls == [A]  # revalidated in the background
        finally:
            await stopped(tunnel, task)

    run(go())


def test_mark_and_sweep_and_sources(tmp_path: Path) -> None:
    async def go() -> None:
        prober = FakeProber({A: Method.TLS_PORT, B: Method.TLS_PORT})
        engine, tunnel, task = await started(tmp_path, prober, cfg())
        try:
            engine.on_nm(NMSnapshot({"eth0": eth0(A)}))
            engine.on_leases(
                {"eth1": Link("eth1", resolvers=(NetResolver(B, source=Source.LEASE),))}
            )
            await settle(engine)
            assert engine.plan is not None and {u.address for u in engine.plan.upstreams} == {A, B}
            engine.on_nm(NMSnapshot({}))  # eth0 went away
            await settle(engine)
            assert [u.address for u in engine.plan.upstreams] == [B]
            engine.on_nm(NMSnapshot(running=False))  # NM restarting: what it said is kept
            engine.on_netlink({"eth1": Link("eth1", up=False)})  # the kernel: eth1 is down
            await settle(engine)
            assert engine.plan.upstreams == ()
            assert tunnel.mode.value == "down"
        finally:
            await stopped(tunnel, task)

    run(go())


def test_warnings_are_raised_once_and_cleared(tmp_path: Path) -> None:
    async def go() -> None:
        seen: list[tuple[list[Warning], list[Warning]]] = []
        prober = FakeProber({A: Method.TCP_PLAIN})
        tunnel = Tunnel(TunnelConfig(upstreams=(), listen=(("127.0.0.1", 0),)))
        await tunnel.start()
        engine = Engine(cfg("strict"), tunnel, Store(tmp_path), prober=prober,
                        on_warnings=lambda r, c: seen.append((r, c)))  # fmt: skip
        task = asyncio.create_task(engine.run())
        try:
            engine.on_nm(NMSnapshot({"eth0": eth0(A)}))
            await settle(engine)
            engine.poke("again")
            await settle(engine)
            raised = [w.alert for r, _ in seen for w in r]
            assert raised == [Alert.NO_PRIVATE_DNS]  # once, though decided twice
            engine.on_nm(NMSnapshot({}))
            await settle(engine)
            assert [w.alert for _, c in seen for w in c] == [Alert.NO_PRIVATE_DNS]
        finally:
            await stopped(tunnel, task)

    run(go())


def test_the_loop_is_closed(tmp_path: Path) -> None:
    """What the running tunnel reports goes through the policy: a failed TLS path is probed
    again (the other path first) and the order follows; a change of mode is told."""

    async def go() -> None:
        seen: list[tuple[list[Warning], list[Warning]]] = []
        now = [1_000_000.0]
        prober = FakeProber({A: Method.TLS_PORT})
        tunnel = Tunnel(TunnelConfig(upstreams=(), listen=(("127.0.0.1", 0),)))
        await tunnel.start()
        engine = Engine(
            cfg("encrypted"),
            tunnel,
            Store(tmp_path),
            prober=prober,
            clock=lambda: now[0],
            on_warnings=lambda r, c: seen.append((r, c)),
        )
        task = asyncio.create_task(engine.run())
        try:
            engine.on_nm(NMSnapshot({"eth0": eth0(A)}))
            await settle(engine)
            assert [str(u.spec) for u in tunnel.upstreams] == ["tls-port:198.51.100.1@853"]
            # the tunnel: port 853 went silent; meanwhile only the upgrade works
            prober.methods[A] = Method.TLS_UPGRADE
            now[0] += SUSPECT_REPROBE_MIN
            engine.upstream_failed(UpstreamSpec(A), Failure.TIMEOUT, "silent to a probe")
            await settle(engine)
            assert prober.calls == [A, A]
            assert [str(u.spec) for u in tunnel.upstreams] == ["tls-upgrade:198.51.100.1@53"]
            k = engine.state.knowledge[("nm:u-1", A)]
            assert k.method is Method.TLS_UPGRADE and k.suspect_at == 0
            # and every change of mode at run time reaches the user, and clears
            engine.mode_changed("down", "tls-upgrade:198.51.100.1@53: reset")
            await settle(engine)
            assert [w.alert for r, _ in seen for w in r] == [Alert.TUNNEL_DOWN]
            assert "reset" in seen[-1][0][0].text
            engine.mode_changed("private", "")
            await settle(engine)
            assert [w.alert for _, c in seen for w in c] == [Alert.TUNNEL_DOWN]
        finally:
            await stopped(tunnel, task)

    run(go())


def test_link_table_merge() -> None:
    t = LinkTable()
    t.replace(Source.NM, {"eth0": eth0(A)})
    ra1 = (NetResolver("2001:db8::53", source=Source.NETLINK),)
    ra2 = (NetResolver("2001:db8::1", source=Source.NETLINK),)
    t.replace(Source.NETLINK, {
        "eth0": Link("eth0", up=True, default_route=True, resolvers=ra1),
        "wlan0": Link("wlan0", up=True, resolvers=ra2),
        "lo2": Link("lo2", up=True),
    })  # fmt: skip
    merged = {link.ifname: link for link in t.merged()}
    assert set(merged) == {"eth0", "wlan0"}  # no resolvers anywhere: not a DNS link
    assert [r.address for r in merged["eth0"].resolvers] == [A]  # NM's view is the whole truth
    assert merged["eth0"].default_route
    assert [r.address for r in merged["wlan0"].resolvers] == ["2001:db8::1"]  # RA, no NM
    assert not t.replace(Source.NM, {"eth0": eth0(A)})  # the same again: no change


def order(engine: Engine) -> list[UpstreamSpec]:
    assert engine.plan is not None
    return list(engine.plan.upstreams)


def profile(tunnel: Tunnel) -> Profile:
    return tunnel.cfg.profile


def test_portal_exception_and_return_to_tls(tmp_path: Path) -> None:
    async def go() -> None:
        prober = FakeProber({A: Method.TLS_PORT})
        engine, tunnel, task = await started(tmp_path, prober, cfg("encrypted"))
        try:
            engine.on_nm(NMSnapshot({"eth0": eth0(A)}, "portal"))
            await settle(engine)
            assert order(engine) == []
            engine.allow_portal(1)
            await settle(engine)
            assert order(engine) == [UpstreamSpec(A, Method.UDP_PLAIN, 53)]
            assert profile(tunnel) is Profile.OPPORTUNISTIC
            assert engine.status()["portal_until"] is not None
            calls = len(prober.calls)
            engine.on_nm(NMSnapshot({"eth0": eth0(A)}, "full"))  # logged in
            await settle(engine)
            assert engine.portal_until == 0.0 and engine.status()["portal_until"] is None
            assert len(prober.calls) > calls  # re-probed right away
            assert order(engine) == [UpstreamSpec(A)]
            assert profile(tunnel) is Profile.ENCRYPTED
        finally:
            await stopped(tunnel, task)

    run(go())


def test_portal_allow_needs_a_portal(tmp_path: Path) -> None:
    async def go() -> None:
        engine, tunnel, task = await started(tmp_path, FakeProber({}), cfg("strict"))
        try:
            engine.on_nm(NMSnapshot({"eth0": eth0(A)}, "full"))
            with pytest.raises(UsageError, match="no captive portal"):
                engine.allow_portal(5)
        finally:
            await stopped(tunnel, task)

    run(go())


def test_the_order_in_use_is_kept_a_moment_while_no_link_has_resolvers(tmp_path: Path) -> None:
    """NM re-activating a device: its DNS is empty for a moment. The tunnel keeps the order
    that served (not an empty one, which fails every query) unless it lasts."""

    async def go() -> None:
        prober = FakeProber({A: Method.TLS_PORT, B: Method.TLS_PORT})
        tunnel = Tunnel(TunnelConfig(upstreams=(), listen=(("127.0.0.1", 0),)))
        await tunnel.start()
        config = dataclasses.replace(cfg(), hold_empty=0.3)
        engine = Engine(config, tunnel, Store(tmp_path), prober=prober)
        task = asyncio.create_task(engine.run())

        def in_tunnel() -> list[str]:
            return sorted({u.spec.address for u in tunnel.upstreams})

        try:
            engine.on_nm(NMSnapshot({"eth0": eth0(A)}))
            await settle(engine)
            assert in_tunnel() == [A]
            engine.on_nm(NMSnapshot({"eth0": eth0()}))  # deactivating: no DNS for a moment
            await settle(engine)
            assert engine.plan is not None and engine.plan.upstreams == ()
            assert in_tunnel() == [A] and engine.held_until is not None
            assert engine.status()["order"][0] == "tls-port:198.51.100.1@853"
            engine.on_nm(NMSnapshot({"eth0": eth0(B)}))  # activated: the new lease
            await settle(engine)
            assert in_tunnel() == [B] and engine.held_until is None
            engine.on_nm(NMSnapshot({}))  # the interface is gone for good
            await settle(engine)
            assert in_tunnel() == [B]
            await asyncio.sleep(0.4)  # past the hold: emptied by the engine's own wake-up
            assert in_tunnel() == [] and engine.held_until is None
            assert engine.status()["order"] == []
        finally:
            await stopped(tunnel, task)

    run(go())


def with_statics(config: Config, *texts: str, **kw: object) -> Config:
    statics = tuple(UpstreamSpec.parse(t) for t in texts)
    defaults = dataclasses.replace(config.defaults, static_resolvers=statics)
    return dataclasses.replace(config, defaults=defaults, **kw)  # type: ignore[arg-type]


def test_static_resolvers_alone_are_probed_used_learnt_and_shown(tmp_path: Path) -> None:
    """No NetworkManager, no lease, no interface but lo: the global static_resolvers are
    the machine's resolvers (policy.with_statics), known on their own network."""

    async def go() -> None:
        prober = FakeProber({A: Method.TLS_PORT, B: Method.TLS_PORT}, auth=Auth.NAME)
        config = with_statics(cfg("strict"), f"tls:{A}#dns.example")
        engine, tunnel, task = await started(tmp_path, prober, config)
        try:
            engine.on_nm(NMSnapshot(running=False))  # nothing from any watcher
            engine.on_netlink({})
            await settle(engine)
            assert prober.calls == [A]
            assert [str(u.spec) for u in tunnel.upstreams] == [
                "tls-port:198.51.100.1@853#dns.example"
            ]
            assert profile(tunnel) is Profile.STRICT and tunnel.mode.value == "private"
            st = engine.status()
            (iface,) = st["interfaces"]
            assert (iface["interface"], iface["network"], iface["profile"]) == (
                "static", "if:static", "strict"
            )  # fmt: skip
            assert [
                (r["address"], r["method"], r["auth"], r["used"]) for r in iface["resolvers"]
            ] == [(A, "tls-port", "name", True)]
            # what the tunnel learns comes back for it as for any link
            engine.upstream_failed(UpstreamSpec(A, auth_name="dns.example"), Failure.RESET, "x")
            assert engine.state.knowledge[("if:static", A)].suspect_at > 0
            # an interface comes up: the statics go with it, learnt on its network
            engine.on_nm(NMSnapshot({"eth0": eth0(B)}))
            await settle(engine)
            assert sorted(prober.calls) == [A, A, B]
            assert [i["interface"] for i in engine.status()["interfaces"]] == ["eth0"]
            assert ("nm:u-1", A) in engine.state.knowledge
        finally:
            await stopped(tunnel, task)
        assert ("if:static", A) in Store(tmp_path).load().knowledge

    run(go())


def test_a_moment_without_the_network_is_held_not_handed_to_the_statics(tmp_path: Path) -> None:
    """NM re-activating a device on a machine with global statics: the order in use is kept
    for hold_empty; only if the network stays away do the statics alone take over (their
    probes and warnings too)."""

    async def go() -> None:
        seen: list[tuple[list[Warning], list[Warning]]] = []
        prober = FakeProber({B: Method.TLS_PORT})  # A (static) unreachable: offline
        tunnel = Tunnel(TunnelConfig(upstreams=(), listen=(("127.0.0.1", 0),)))
        await tunnel.start()
        config = with_statics(cfg("encrypted"), A, hold_empty=0.3)
        engine = Engine(config, tunnel, Store(tmp_path), prober=prober,
                        on_warnings=lambda r, c: seen.append((r, c)))  # fmt: skip
        task = asyncio.create_task(engine.run())

        def in_tunnel() -> list[str]:
            return sorted({u.spec.address for u in tunnel.upstreams})

        try:
            engine.on_nm(NMSnapshot({"eth0": eth0(B)}))
            await settle(engine)
            assert in_tunnel() == [B] and sorted(prober.calls) == [A, B]
            calls = len(prober.calls)
            engine.on_nm(NMSnapshot({"eth0": eth0(B, up=False)}))  # re-activating
            await settle(engine)
            assert in_tunnel() == [B] and engine.held_until is not None
            assert len(prober.calls) == calls and not seen[1:]  # nothing of the statics yet
            engine.on_nm(NMSnapshot({"eth0": eth0(B)}))  # back within the hold
            await settle(engine)
            assert in_tunnel() == [B] and engine.held_until is None
            calls = len(prober.calls)  # (rejoined: revalidated)
            engine.on_nm(NMSnapshot({"eth0": eth0(B, up=False)}))  # gone for longer
            await asyncio.sleep(0.4)
            await settle(engine)
            assert engine.held_until is None and engine.plan is not None
            assert [i["interface"] for i in engine.status()["interfaces"]] == ["eth0", "static"]
            assert prober.calls[calls:] == [A]  # probed on its own network, unreachable
            assert engine.plan.upstreams == ()
            assert [(w.alert, w.ifname) for r, _ in seen for w in r] == [
                (Alert.NO_PRIVATE_DNS, "static")
            ]
        finally:
            await stopped(tunnel, task)

    run(go())


# -- hostile networks: a lease naming more resolvers than the tunnel takes ----------------------


def test_a_lease_with_more_resolvers_than_the_tunnel_takes_never_stops_it(
    tmp_path: Path, certs: Certs
) -> None:
    """A rogue DHCP server naming 70 resolvers: the best 60 are used, the rest said so, and
    the engine (and the tunnel it feeds) keeps serving."""

    async def go() -> None:
        cfgp = PeerConfig(host="0.0.0.0", cert=certs.good.cert, key=certs.good.key)
        async with Peer(cfgp) as p:
            assert p.tls_port is not None
            addrs = [f"127.0.1.{i}" for i in range(1, 71)]  # loopback: all reach the peer
            prober = FakeProber(dict.fromkeys(addrs, Method.TLS_PORT), delay=0.001)
            engine, tunnel, task = await started(tmp_path, prober, cfg())
            try:
                rs = tuple(NetResolver(a, None, p.tls_port, source=Source.LEASE) for a in addrs)
                engine.on_leases({"eth0": Link("eth0", resolvers=rs)})
                await settle(engine, rounds=200)
                assert not task.done(), task.exception()
                assert engine.plan is not None and len(engine.plan.upstreams) == MAX_UPSTREAMS
                assert sorted(prober.calls) == sorted(addrs)  # every one probed, in turns
                st = engine.status()
                reasons = [r["reason"] for r in st["interfaces"][0]["resolvers"]]
                assert reasons.count(f"over the limit of {MAX_UPSTREAMS}: not used") == 10
                assert [w["alert"] for w in st["warnings"]] == [Alert.TOO_MANY.value]
                q = dns.message.make_query("www.example.test", "A")
                host, port = tunnel.addresses[0]
                r = await dns.asyncquery.udp(q, host, port=port, timeout=3)
                assert r.answer and r.answer[0][0].address == PEER_A  # still serving
            finally:
                await stopped(tunnel, task)

    run(go())


class RefusingTunnel:
    """A tunnel that refuses every order (a limit the policy did not know)."""

    def set_upstreams(self, specs: object, **kw: object) -> None:
        raise UsageError("61 upstreams; at most 60")

    def status(self) -> dict[str, object]:
        return {}

    def flush_cache(self, why: str) -> int:
        return 0


def test_an_order_the_tunnel_refuses_is_logged_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> None:
        engine = Engine(cfg(), RefusingTunnel(), Store(tmp_path), prober=FakeProber({}))
        task = asyncio.create_task(engine.run())
        try:
            engine.on_nm(NMSnapshot({"eth0": eth0(A)}))
            await settle(engine)
            assert not task.done() and engine.applied is None
            assert "the tunnel refused the order" in caplog.text
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(go())


def test_the_cache_is_emptied_when_the_network_changes_not_for_a_moment_without_it(
    tmp_path: Path,
) -> None:
    """No answer is carried from one network to the next; NetworkManager re-activating a
    device (no DNS for a moment, then the same network) keeps it."""

    async def go() -> None:
        prober = FakeProber({A: Method.TLS_PORT, B: Method.TLS_PORT})
        engine, tunnel, task = await started(tmp_path, prober, cfg())
        flushes: list[str] = []
        real = tunnel.flush_cache

        def flush(why: str) -> int:
            flushes.append(why)
            return real(why)

        tunnel.flush_cache = flush  # type: ignore[method-assign]
        try:
            engine.on_nm(NMSnapshot({"eth0": eth0(A)}))
            await settle(engine)
            assert flushes == []  # the first network: nothing to carry
            engine.on_nm(NMSnapshot({"eth0": eth0()}))  # re-activating: no DNS a moment
            await settle(engine)
            engine.on_nm(NMSnapshot({"eth0": eth0(A)}))
            await settle(engine)
            assert flushes == []
            other = dataclasses.replace(eth0(B), connection_uuid="u-2")  # another network
            engine.on_nm(NMSnapshot({"eth0": other}))
            await settle(engine)
            assert len(flushes) == 1 and "nm:u-1 -> nm:u-2" in flushes[0]
            vpn = Link("tun0", resolvers=(NetResolver(A),), vpn=True, connection_uuid="v-1")
            engine.on_nm(NMSnapshot({"eth0": other, "tun0": vpn}))  # a VPN joins
            await settle(engine)
            assert len(flushes) == 2
        finally:
            await stopped(tunnel, task)

    run(go())
