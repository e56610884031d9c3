"""agent/policy.py: table-driven decisions with a fake clock (time is just a number here)."""

from __future__ import annotations

import dataclasses

import pytest

from agent import config as cfgmod
from agent import policy
from agent.config import Config, ConfigProfile, LinkSettings
from agent.model import (
    Auth,
    AuthSource,
    Failure,
    Knowledge,
    Link,
    Method,
    NetResolver,
    Order,
    PathOutcome,
    ProbeResult,
    Profile,
    Timings,
    TLSInfo,
    UpstreamSpec,
)
from agent.model import (
    Path as ProbePath,
)
from agent.policy import Alert
from agent.tunnel.settings import MAX_UPSTREAMS

A, B, C = "198.51.100.1", "198.51.100.2", "203.0.113.3"
T0 = 1_000_000.0
PIN1 = "pOXrpUt9kgPgbWxBFFcBTbRH2heo2wHwXp1fd4AEVXI="
PIN2 = "YLh1dUR9y6Kja30RrAn7JKnbQG/uEtLMkBgFF2Fuihg="


def link(name: str = "eth0", *addrs: str, **kw: object) -> Link:
    return Link(name, resolvers=tuple(NetResolver(a) for a in addrs), **kw)  # type: ignore[arg-type]


def conf(profile: str = "opportunistic", **kw: object) -> Config:
    defaults = dataclasses.replace(LinkSettings(), profile=ConfigProfile(profile), **kw)  # type: ignore[arg-type]
    return Config(defaults=defaults)


def know(ln: Link, addr: str, method: Method, auth: Auth | None = None, **kw: object) -> Knowledge:
    base = Knowledge(ln.network_id, addr, method, auth, probed_at=T0, latency_ms=10.0,
                     tls_ok_at=T0 if method.private else 0.0)  # fmt: skip
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def kmap(*ks: Knowledge) -> dict[tuple[str, str], Knowledge]:
    return {k.key: k for k in ks}


def test_nothing_to_manage() -> None:
    assert policy.decide([], conf(), {}, T0).profile is None
    off = policy.decide([link("eth0", A)], conf("off"), {}, T0)
    assert off.profile is None and off.upstreams == ()
    down = policy.decide([dataclasses.replace(link("eth0", A), up=False)], conf(), {}, T0)
    assert down.profile is None


def test_unknown_resolvers_are_probed_and_tried_on_853_meanwhile() -> None:
    plan = policy.decide([link("eth0", A, B)], conf(), {}, T0)
    assert [p.address for p in plan.probes] == [A, B]
    assert all(p.reason == "not probed on this network yet" for p in plan.probes)
    assert plan.upstreams == (UpstreamSpec(A), UpstreamSpec(B))
    assert not plan.warnings


def test_known_order_tls_first_then_latency_then_dhcp_order() -> None:
    ln = link("eth0", A, B, C)
    ks = kmap(
        know(ln, A, Method.TCP_PLAIN),
        know(ln, B, Method.TLS_UPGRADE, Auth.NONE, latency_ms=30.0),
        know(ln, C, Method.TLS_PORT, Auth.NONE, latency_ms=5.0),
    )
    plan = policy.decide([ln], conf(), ks, T0 + 10)
    assert plan.upstreams == (
        UpstreamSpec(C, Method.TLS_PORT, 853),
        UpstreamSpec(B, Method.TLS_UPGRADE, 53),
        UpstreamSpec(A, Method.TCP_PLAIN, 53),  # cleartext last, opportunistic only
    )
    assert plan.probes == ()  # all fresh
    assert plan.wake_at == T0 + 1800


@pytest.mark.parametrize(
    ("profile", "auth", "used"),
    [
        ("opportunistic", Auth.NONE, True),
        ("encrypted", Auth.NONE, True),
        ("strict", Auth.NONE, False),
        ("strict", Auth.IP_SAN, True),
        ("strict", Auth.PIN, True),
    ],
)
def test_profiles_and_authentication(profile: str, auth: Auth, used: bool) -> None:
    ln = link("eth0", A)
    plan = policy.decide([ln], conf(profile), kmap(know(ln, A, Method.TLS_PORT, auth)), T0)
    assert (plan.upstreams == (UpstreamSpec(A),)) is used
    assert plan.profile is Profile(profile)
    assert (Alert.NO_PRIVATE_DNS in {w.alert for w in plan.warnings}) is (not used)


@pytest.mark.parametrize("profile", ["strict", "encrypted"])
def test_no_cleartext_outside_opportunistic(profile: str) -> None:
    ln = link("wlan0", A)
    plan = policy.decide([ln], conf(profile), kmap(know(ln, A, Method.UDP_PLAIN)), T0)
    assert plan.upstreams == ()
    (w,) = plan.warnings
    assert w.alert is Alert.NO_PRIVATE_DNS and "wlan0" in w.text
    assert "does not use it" in plan.choices[0].reason


def test_opportunistic_cleartext_only_network_is_announced() -> None:
    ln = link("eth0", A)
    plan = policy.decide([ln], conf(), kmap(know(ln, A, Method.UDP_PLAIN)), T0)
    # the transport the probe saw answer: only UDP did, so UDP (not TCP, which may be closed)
    assert plan.upstreams == (UpstreamSpec(A, Method.UDP_PLAIN, 53),)
    assert [w.alert for w in plan.warnings] == [Alert.CLEARTEXT]
    nofallback = policy.decide(
        [ln], conf(cleartext_fallback=False), kmap(know(ln, A, Method.UDP_PLAIN)), T0
    )
    assert nofallback.upstreams == ()


def test_negative_cache_holds_then_expires() -> None:
    ln = link("eth0", A)
    k = know(ln, A, Method.TCP_PLAIN, negative_until=T0 + 3600)
    during = policy.decide([ln], conf("strict"), kmap(k), T0 + 100)
    assert during.probes == () and during.wake_at == T0 + 3600
    assert "not asked again for 3500 s" in during.choices[0].reason
    after = policy.decide([ln], conf("strict"), kmap(k), T0 + 3600)
    assert [p.address for p in after.probes] == [A]
    assert after.probes[0].reason.startswith("re-probe")


def test_reprobe_interval_and_in_flight_probes() -> None:
    ln = link("eth0", A)
    k = know(ln, A, Method.TLS_PORT, Auth.NONE)
    assert policy.decide([ln], conf(), kmap(k), T0 + 1799).probes == ()
    assert len(policy.decide([ln], conf(), kmap(k), T0 + 1800).probes) == 1
    busy = policy.decide([ln], conf(), kmap(k), T0 + 1800, probing={(ln.network_id, A)})
    assert busy.probes == ()
    # while re-probing, the known-good resolver stays in use
    assert busy.upstreams == (UpstreamSpec(A),)


def test_downgrade_detected() -> None:
    ln = link("eth0", A)
    k = know(ln, A, Method.TCP_PLAIN, tls_ok_at=T0 - 60, failures=("port: refused",))
    strict = policy.decide([ln], conf("strict"), kmap(k), T0)
    assert {w.alert for w in strict.warnings} == {Alert.DOWNGRADE, Alert.NO_PRIVATE_DNS}
    assert strict.upstreams == ()
    opp = policy.decide([ln], conf(), kmap(k), T0)
    assert Alert.DOWNGRADE in {w.alert for w in opp.warnings}
    assert opp.upstreams == (UpstreamSpec(A, Method.TCP_PLAIN, 53),)  # still works, visibly
    assert "port: refused" in next(w.text for w in opp.warnings if w.alert is Alert.DOWNGRADE)


def test_key_change_warns() -> None:
    ln = link("eth0", A)
    k = know(ln, A, Method.TLS_PORT, Auth.NONE, pin=PIN2, pins_seen=(PIN1, PIN2))
    plan = policy.decide([ln], conf(), kmap(k), T0)
    assert [w.alert for w in plan.warnings] == [Alert.KEY_CHANGED]
    assert plan.upstreams == (UpstreamSpec(A),)


def test_key_change_warning_clears_once_the_new_key_is_stable() -> None:
    ln = link("eth0", A)
    k = know(ln, A, Method.TLS_PORT, Auth.NONE, pin=PIN1, pins_seen=(PIN1,), pin_stable=5)
    for i in range(1, policy.KEY_STABLE_PROBES + 1):  # the new key, probe after probe
        k = policy.learn(
            k, _result(Method.TLS_PORT, pin=PIN2), network=ln.network_id, now=T0 + i,
            negative_cache=3600,
        )  # fmt: skip
        assert k.pin_stable == i
        alerts = [w.alert for w in policy.decide([ln], conf(), kmap(k), T0 + i).warnings]
        assert (Alert.KEY_CHANGED in alerts) is (i < policy.KEY_STABLE_PROBES)
    back = policy.learn(
        k, _result(Method.TLS_PORT, pin=PIN1), network=ln.network_id, now=T0 + 9,
        negative_cache=3600,
    )  # fmt: skip
    assert back.pin_stable == 1  # another change: warned again
    assert [w.alert for w in policy.decide([ln], conf(), kmap(back), T0 + 9).warnings] == [
        Alert.KEY_CHANGED
    ]


@pytest.mark.parametrize(
    ("profile", "fallback", "plain", "want"),
    [
        ("opportunistic", True, Method.UDP_PLAIN, (Method.TLS_PORT, Method.UDP_PLAIN)),
        ("opportunistic", True, Method.TCP_PLAIN, (Method.TLS_PORT, Method.TCP_PLAIN)),
        ("opportunistic", True, None, (Method.TLS_PORT,)),  # nothing answered in cleartext
        ("opportunistic", False, Method.UDP_PLAIN, (Method.TLS_PORT,)),
        ("encrypted", True, Method.UDP_PLAIN, (Method.TLS_PORT,)),
        ("strict", True, Method.UDP_PLAIN, (Method.TLS_PORT,)),
    ],
)
def test_cleartext_fallback_is_in_the_order_or_nowhere(
    profile: str, fallback: bool, plain: Method | None, want: tuple[Method, ...]
) -> None:
    """The one decider: the cleartext fallback of a private resolver is an entry of the
    order (last, over what the probe saw answer), or there is none at all."""
    ln = link("eth0", A, B)
    ks = kmap(
        know(ln, A, Method.TLS_PORT, Auth.IP_SAN, plain=plain),
        know(ln, B, Method.TLS_PORT, Auth.IP_SAN, plain=plain, latency_ms=20.0),
    )
    plan = policy.decide([ln], conf(profile, cleartext_fallback=fallback), ks, T0)
    private = [u for u in plan.upstreams if u.private]
    assert [u.address for u in private] == [A, B]
    tail = plan.upstreams[len(private) :]
    assert all(not u.private for u in tail)  # cleartext only ever after every private entry
    assert tuple(u.method for u in plan.upstreams if u.address == A) == want
    assert all(u.port == 53 for u in tail)


def test_plain_seen_follows_the_probe() -> None:
    udp = PathOutcome(ProbePath.UDP, Method.UDP_PLAIN, to_in_response=False)
    upgrade = PathOutcome(ProbePath.UPGRADE, Method.UNREACHABLE, to_in_response=False)
    res = dataclasses.replace(_result(Method.TLS_PORT, pin=PIN1), paths=(udp,))
    assert policy.plain_seen(res) is Method.UDP_PLAIN
    assert policy.plain_seen(dataclasses.replace(res, paths=(udp, upgrade))) is Method.TCP_PLAIN
    assert policy.plain_seen(dataclasses.replace(res, paths=())) is None
    k = policy.learn(None, res, network="n", now=T0, negative_cache=3600)
    assert k.plain is Method.UDP_PLAIN


def test_tunnel_failure_reprobes_upgrade_first_at_most_so_often() -> None:
    ln = link("eth0", A)
    k = know(ln, A, Method.TLS_PORT, Auth.IP_SAN, plain=Method.UDP_PLAIN)
    spec = UpstreamSpec(A)
    now = T0 + 10
    # a cleartext entry's failure, or one of another method, teaches nothing
    assert policy.tunnel_failed(k, UpstreamSpec(A, Method.UDP_PLAIN, 53), Failure.TIMEOUT,
                                "x", now) is None  # fmt: skip
    assert policy.tunnel_failed(None, spec, Failure.RESET, "x", now) is None
    suspect = policy.tunnel_failed(k, spec, Failure.TIMEOUT, "silent", now)
    assert suspect is not None and suspect.suspect_at == now
    plan = policy.decide([ln], conf(), kmap(suspect), now)
    assert plan.probes == ()  # probed 10 s ago: not again before SUSPECT_REPROBE_MIN
    assert plan.wake_at == T0 + policy.SUSPECT_REPROBE_MIN
    later = T0 + policy.SUSPECT_REPROBE_MIN
    (req,) = policy.decide([ln], conf(), kmap(suspect), later).probes
    assert "tunnel's connection failed" in req.reason and "silent" in req.reason
    assert req.settings.order is Order.UPGRADE_FIRST  # port 853 just failed: the other first
    upgrade = dataclasses.replace(suspect, method=Method.TLS_UPGRADE)
    (req,) = policy.decide([ln], conf(), kmap(upgrade), later).probes
    assert req.settings.order is Order.PORT_FIRST  # and the other way round
    # the order meanwhile is unchanged: the tunnel's own backoff handles the moment
    assert plan.upstreams == (UpstreamSpec(A), UpstreamSpec(A, Method.UDP_PLAIN, 53))
    relearnt = policy.learn(suspect, _result(Method.TLS_UPGRADE, pin=PIN1), network=ln.network_id,
                            now=later, negative_cache=3600)  # fmt: skip
    assert relearnt.suspect_at == 0 and relearnt.method is Method.TLS_UPGRADE


@pytest.mark.parametrize(
    ("mode", "alert"),
    [("cleartext", Alert.TUNNEL_CLEARTEXT), ("down", Alert.TUNNEL_DOWN), ("private", None)],
)
def test_tunnel_mode_at_run_time_is_told(mode: str, alert: Alert | None) -> None:
    ln = link("eth0", A)
    ks = kmap(know(ln, A, Method.TLS_PORT, Auth.IP_SAN))
    plan = policy.decide([ln], conf("strict"), ks, T0, tunnel_mode=(mode, "reset by peer"))
    alerts = [w for w in plan.warnings if w.ifname == policy.TUNNEL]
    assert [w.alert for w in alerts] == ([alert] if alert else [])
    assert all("reset by peer" in w.text for w in alerts)


def test_strictest_link_sets_the_machine_profile() -> None:
    wl, eth = link("wlan0", A, priority=600), link("eth0", B, priority=100)
    ks = kmap(know(wl, A, Method.TLS_PORT, Auth.IP_SAN), know(eth, B, Method.TLS_PORT, Auth.NONE))
    c = Config(
        interfaces=(cfgmod.InterfaceRule("t", names=("wlan*",), overrides={"profile": "strict"}),)
    )
    plan = policy.decide([wl, eth], c, ks, T0)
    assert plan.profile is Profile.STRICT
    assert plan.upstreams == (UpstreamSpec(A),)  # B did not authenticate


def test_link_priority_orders_resolvers_and_vpn_domains_are_routed() -> None:
    vpn = link("tun0", C, priority=50, vpn=True, domains=("corp.example",))
    eth = link("eth0", A, priority=100, default_route=True, domains=("home.example",))
    ks = kmap(know(vpn, C, Method.TLS_PORT, Auth.NONE), know(eth, A, Method.TLS_PORT, Auth.NONE))
    plan = policy.decide([eth, vpn], conf(), ks, T0)
    assert [u.address for u in plan.upstreams] == [C, A]
    assert [(r.domain, [u.address for u in r.upstreams]) for r in plan.routes] == [
        ("corp.example", [C])
    ]
    split = policy.decide([eth, vpn], dataclasses.replace(conf(), split_dns=True), ks, T0)
    assert {r.domain for r in split.routes} == {"corp.example", "home.example"}


def test_ignored_own_and_static_resolvers() -> None:
    ln = link("eth0", A, B, "127.0.0.153")
    c = conf(
        ignore_resolvers=frozenset({B}),
        static_resolvers=(UpstreamSpec.parse("203.0.113.3#dns.example"),),
    )
    plan = policy.decide([ln], c, {}, T0, own_addresses={"127.0.0.153"})
    assert [p.address for p in plan.probes] == [A, C]
    assert plan.probes[1].settings.auth.auth_name == "dns.example"
    assert [u.address for u in plan.upstreams] == [A, C]


def test_a_network_name_never_replaces_a_configured_one() -> None:
    """NetworkManager's ADDR#name is the network's word, like the address: a configured
    auth_name (or a static resolver's #NAME) wins, in the probe and in the tunnel's order."""
    ln = Link("eth0", resolvers=(NetResolver.parse(f"{A}#net.example"), NetResolver(B)))
    plan = policy.decide([ln], conf("strict", auth_name="conf.example"), {}, T0)
    for req in plan.probes:
        assert req.settings.auth.auth_name == "conf.example"
        assert req.settings.auth.name_source is AuthSource.CONFIGURED
        assert req.settings.auth.address_source is AuthSource.NETWORK
    assert [(u.auth_name, u.name_source) for u in plan.upstreams] == [
        ("conf.example", AuthSource.CONFIGURED)
    ] * 2
    assert plan.upstreams[0].auth_spec(Profile.STRICT).name_source is AuthSource.CONFIGURED
    # a static resolver's own name, for the same address the network hands out
    static = (UpstreamSpec.parse(f"{A}#static.example"),)
    plan = policy.decide([ln], conf("strict", static_resolvers=static), {}, T0)
    auth = plan.probes[0].settings.auth
    assert (auth.auth_name, auth.name_source, auth.address_source) == (
        "static.example", AuthSource.CONFIGURED, AuthSource.CONFIGURED
    )  # fmt: skip
    # nothing configured: the network's name may be used, marked as the network's
    plan = policy.decide([ln], conf("strict"), {}, T0)
    auth = plan.probes[0].settings.auth
    assert (auth.auth_name, auth.name_source) == ("net.example", AuthSource.NETWORK)
    assert not auth.name_configured
    up = plan.upstreams[0]
    assert (up.auth_name, up.name_source) == ("net.example", AuthSource.NETWORK)
    assert up.auth_spec(Profile.STRICT, "/ca.pem").name_source is AuthSource.NETWORK
    assert plan.probes[1].settings.auth.auth_name is None


def test_learn_keeps_where_authentication_came_from() -> None:
    r = dataclasses.replace(
        _result(Method.TLS_PORT, pin=PIN1), auth=Auth.IP_SAN, auth_source=AuthSource.NETWORK
    )
    k = policy.learn(None, r, network="n", now=T0, negative_cache=3600)
    assert (k.auth, k.auth_source) == (Auth.IP_SAN, AuthSource.NETWORK)


def test_probe_settings_follow_learnt_path_and_link_config() -> None:
    ln = link("eth0", A)
    k = know(
        ln, A, Method.TLS_UPGRADE, Auth.NONE, path_first=Order.UPGRADE_FIRST, probed_at=T0 - 4000
    )
    (req,) = policy.decide([ln], conf(), kmap(k), T0).probes
    assert req.settings.order is Order.UPGRADE_FIRST
    (req,) = policy.decide(
        [ln], conf(order="port-first", pins=frozenset({PIN1})), kmap(k), T0
    ).probes
    assert req.settings.order is Order.PORT_FIRST and req.settings.auth.pins == {PIN1}


def _result(method: Method, *, pin: str | None = None, failed: bool = False) -> ProbeResult:
    tls = TLSInfo("TLSv1.3", "x", pin, Auth.NONE) if pin else None
    paths = (
        (PathOutcome(ProbePath.PORT, Method.UNREACHABLE, failure=None, detail="refused"),)
        if failed
        else ()
    )
    auth = Auth.NONE if pin else None
    return ProbeResult(A, Profile.OPPORTUNISTIC, method, method.private, auth, tls,
                       Timings(answer_ms=12.0), 20.0, 30.0, True, False, paths)  # fmt: skip


def test_learn_folds_results() -> None:
    first = policy.learn(
        None, _result(Method.TLS_PORT, pin=PIN1), network="n", now=T0, negative_cache=3600
    )
    assert (
        first.tls_ok_at == T0 and first.path_first is Order.PORT_FIRST and first.latency_ms == 12.0
    )
    assert first.negative_until == 0 and first.pins_seen == (PIN1,)
    again = policy.learn(
        first, _result(Method.TLS_PORT, pin=PIN2), network="n", now=T0 + 1, negative_cache=3600
    )
    assert again.pins_seen == (PIN1, PIN2)
    refused = policy.learn(
        again, _result(Method.TCP_PLAIN), network="n", now=T0 + 2, negative_cache=3600
    )
    assert (
        refused.negative_until == T0 + 3602 and refused.tls_ok_at == T0 + 1
    )  # downgrade evidence kept
    gone = policy.learn(
        again, _result(Method.UNREACHABLE), network="n", now=T0 + 3, negative_cache=3600
    )
    assert gone.negative_until == 0  # offline is not "refused TLS"


def test_rejoined_network_uses_what_it_knows_and_revalidates() -> None:
    ln = link("wlan0", A, connection_uuid="u-home")
    k = know(ln, A, Method.TLS_UPGRADE, Auth.NONE, probed_at=T0 - 600)
    plan = policy.decide([ln], conf(), kmap(k), T0, joined={ln.network_id: T0})
    assert plan.upstreams == (UpstreamSpec(A, Method.TLS_UPGRADE, 53),)  # at once
    (req,) = plan.probes
    assert req.reason.startswith("network rejoined") and req.settings.order is Order.PORT_FIRST
    quiet = policy.decide([ln], conf(), kmap(k), T0, joined={ln.network_id: T0 - 700})
    assert quiet.probes == ()


@pytest.mark.parametrize("profile", ["opportunistic", "encrypted", "strict"])
def test_captive_portal(profile: str) -> None:
    ln = link("wlan0", A, B)
    ks = kmap(know(ln, A, Method.TLS_PORT, Auth.IP_SAN))
    plan = policy.decide([ln], conf(profile), ks, T0, connectivity="portal")
    portal_dns = (UpstreamSpec(A, Method.UDP_PLAIN, 53), UpstreamSpec(B, Method.UDP_PLAIN, 53))
    if profile == "opportunistic":
        assert plan.upstreams == portal_dns and plan.profile is Profile.OPPORTUNISTIC
        assert [w.alert for w in plan.warnings] == [Alert.PORTAL]
        return
    assert plan.upstreams == () and plan.profile is Profile(profile)  # still refusing
    (w,) = plan.warnings
    assert w.alert is Alert.PORTAL_BLOCKED and "dnstls-agent portal allow" in w.text
    allowed = policy.decide(
        [ln], conf(profile), ks, T0, connectivity="portal", portal_until=T0 + 300
    )
    assert allowed.upstreams == portal_dns and allowed.profile is Profile.OPPORTUNISTIC
    assert allowed.wake_at == T0 + 300 and "5 more minute" in allowed.warnings[0].text
    over = policy.decide(
        [ln], conf(profile), ks, T0 + 301, connectivity="portal", portal_until=T0 + 300
    )
    assert over.upstreams == ()  # the exception ran out by itself
    full = policy.decide([ln], conf(profile), ks, T0, connectivity="full", portal_until=T0 + 300)
    assert full.upstreams[0] == UpstreamSpec(A)  # connectivity full: TLS again
    assert all(u.private for u in full.upstreams)


# -- the global static resolvers alone (a server, a container, a VM configured by hand) ----------

STATICS = (UpstreamSpec.parse(f"{A}#dns.example"), UpstreamSpec.parse(f"tls:{C}"))


def static_link(c: Config) -> Link:
    (ln,) = [x for x in policy.with_statics([], c) if policy.is_static(x)]
    return ln


@pytest.mark.parametrize(
    "links",
    [
        [],  # no NetworkManager, no lease, netlink off or only lo
        [link("eth0", A, up=False)],  # nothing up
        [link("eth1", B)],  # up, but left alone by its section (below)
    ],
    ids=["no-links", "all-down", "all-off"],
)
def test_static_resolvers_alone_make_a_machine_wide_interface(links: list[Link]) -> None:
    c = dataclasses.replace(
        conf("strict", static_resolvers=STATICS),
        interfaces=(cfgmod.InterfaceRule("t:1", names=("eth1",), overrides={"profile": "off"}),),
    )
    plan = policy.decide(links, c, {}, T0)
    assert plan.profile is Profile.STRICT  # the global profile
    assert plan.upstreams == (UpstreamSpec(A, auth_name="dns.example"), UpstreamSpec(C))
    assert [(p.network, p.ifname, p.address) for p in plan.probes] == [
        ("if:static", policy.STATIC, A),
        ("if:static", policy.STATIC, C),
    ]
    a, c3 = (p.settings.auth for p in plan.probes)
    # authenticated as configured: A by its #NAME, C (no name, no pin) by its address
    assert (a.profile, a.auth_name, a.name_source, a.address_source) == (
        Profile.STRICT, "dns.example", AuthSource.CONFIGURED, AuthSource.CONFIGURED
    )  # fmt: skip
    assert (c3.auth_name, c3.address_source) == (None, AuthSource.CONFIGURED)
    assert {ch.ifname for ch in plan.choices} == {policy.STATIC}
    assert not plan.warnings


def test_machine_wide_statics_are_ordered_cached_and_warned_about_like_a_link() -> None:
    c = conf("strict", static_resolvers=STATICS, pins=frozenset({PIN1}))
    ln = static_link(c)
    assert ln.network_id == "if:static" and policy.settings_for(c, ln) is c.defaults
    ks = kmap(
        know(ln, A, Method.TLS_UPGRADE, Auth.PIN, latency_ms=20.0),
        know(ln, C, Method.TLS_PORT, Auth.PIN, latency_ms=5.0),
    )
    plan = policy.decide([], c, ks, T0 + 10)
    assert plan.upstreams == (  # by latency, each with the pins configured
        UpstreamSpec(C, pins=frozenset({PIN1})),
        UpstreamSpec(A, Method.TLS_UPGRADE, 53, "dns.example", frozenset({PIN1})),
    )
    assert plan.probes == () and plan.wake_at == T0 + 1800
    # strict: a certificate that did not authenticate is not used; refused TLS is cached
    ks = kmap(
        know(ln, A, Method.TLS_PORT, Auth.NONE),
        know(ln, C, Method.TCP_PLAIN, negative_until=T0 + 3600),
    )
    plan = policy.decide([], c, ks, T0 + 10)
    assert plan.upstreams == () and plan.wake_at == T0 + 1800
    assert "not asked again for 3590 s" in plan.choices[1].reason
    (w,) = plan.warnings
    assert w.alert is Alert.NO_PRIVATE_DNS and w.ifname == policy.STATIC
    # opportunistic: the same knowledge, cleartext last and told
    opp = policy.decide([], conf(static_resolvers=STATICS), ks, T0 + 10)
    assert opp.upstreams == (
        UpstreamSpec(A, auth_name="dns.example"),
        UpstreamSpec(C, Method.TCP_PLAIN, 53),
    )


def test_machine_wide_statics_only_while_no_interface_is_managed() -> None:
    c = conf(static_resolvers=STATICS)
    eth0 = link("eth0", B)
    assert policy.with_statics([eth0], c) == [eth0]  # the statics go with eth0
    plan = policy.decide([eth0], c, {}, T0)
    assert {p.network for p in plan.probes} == {eth0.network_id}
    assert [u.address for u in plan.upstreams] == [B, A, C]
    # an interface up with no resolvers of its own still carries them
    assert policy.with_statics([link("eth0")], c) == [link("eth0")]
    # nothing to add: no statics, or the global profile is off
    assert policy.with_statics([], conf()) == []
    assert policy.with_statics([], conf("off", static_resolvers=STATICS)) == []
    assert policy.decide([], conf("off", static_resolvers=STATICS), {}, T0).profile is None
    # once there, it is managed itself: added once, whoever calls first
    once = policy.with_statics([], c)
    assert policy.with_statics(once, c) == once
    assert policy.decide(once, c, {}, T0) == policy.decide([], c, {}, T0)
    # a real interface called "static" is not taken for it
    assert not policy.is_static(link("static", A))


# -- hostile networks: more resolvers and domains than anything should hand out -------------------


def many(n: int) -> list[str]:
    return [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(n)]


def test_more_resolvers_than_the_tunnel_takes_keeps_the_best_and_says_so() -> None:
    addrs = many(MAX_UPSTREAMS + 1)
    ln = link("eth0", *addrs)
    best = know(ln, addrs[-1], Method.TLS_PORT, Auth.IP_SAN)  # the last one handed out
    plan = policy.decide([ln], conf(), kmap(best), T0)
    assert len(plan.upstreams) == MAX_UPSTREAMS == 60
    assert plan.upstreams[0] == UpstreamSpec(addrs[-1])  # the best, first
    assert [u.address for u in plan.upstreams[1:]] == addrs[:59]  # then in its order
    (left,) = [c for c in plan.choices if c.upstream is None]
    assert (left.address, left.reason) == (addrs[59], "over the limit of 60: not used")
    (w,) = plan.warnings
    assert w.alert is Alert.TOO_MANY and "61" in w.text and "60" in w.text
    assert "60 upstream(s)" in plan.reason


def test_the_limit_counts_the_cleartext_fallbacks_and_keeps_them_last() -> None:
    addrs = many(40)
    ln = link("eth0", *addrs)
    ks = kmap(*(know(ln, a, Method.TLS_UPGRADE, Auth.NONE, plain=Method.TCP_PLAIN) for a in addrs))
    plan = policy.decide([ln], conf(), ks, T0)
    assert len(plan.upstreams) == 60
    assert all(u.private for u in plan.upstreams[:40])
    assert not any(u.private for u in plan.upstreams[40:])
    dropped = [c for c in plan.choices if c.upstream is None]
    assert len(dropped) == 20 and {c.address for c in dropped} == set(addrs[20:])


def test_probes_per_network_are_bounded_the_rest_later() -> None:
    addrs = many(100)
    ln = link("eth0", *addrs)
    plan = policy.decide([ln], conf(), {}, T0)
    first = [p.address for p in plan.probes]
    assert first == addrs[: policy.MAX_PROBES_PER_NETWORK]
    running = {(ln.network_id, a) for a in first[:10]}  # ten still running, six ended
    later = policy.decide([ln], conf(), {}, T0, probing=running)
    assert len(later.probes) == policy.MAX_PROBES_PER_NETWORK - 10
    other = link("wlan0", *many(3), connection_uuid="u-2")  # another network has its own
    both = policy.decide([ln, other], conf(), {}, T0, probing=running)
    assert sum(p.network == other.network_id for p in both.probes) == 3


def test_a_captive_portal_with_too_many_resolvers_stays_within_the_limit() -> None:
    plan = policy.decide([link("wlan0", *many(70))], conf(), {}, T0, connectivity="portal")
    assert len(plan.upstreams) == MAX_UPSTREAMS
    assert sum(c.upstream is None for c in plan.choices) == 10
    assert [w.alert for w in plan.warnings] == [Alert.PORTAL, Alert.TOO_MANY]


def test_search_domains_per_interface_are_bounded() -> None:
    doms = tuple(f"d{i}.example" for i in range(200))
    eth = link("eth0", A, domains=doms, vpn=True)
    wl = link("wlan0", B, domains=("home.example",), priority=600, connection_uuid="u-2")
    search = policy.search_domains([eth, wl])
    assert search == (*doms[: policy.MAX_LINK_DOMAINS], "home.example")
    plan = policy.decide([eth, wl], conf(), {}, T0)
    assert [r.domain for r in plan.routes] == list(doms[: policy.MAX_LINK_DOMAINS])
    (w,) = [w for w in plan.warnings if w.alert is Alert.TOO_MANY]
    assert w.ifname == "eth0" and "200" in w.text
