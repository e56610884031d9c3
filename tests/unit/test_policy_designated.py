"""agent/policy.py and designated resolvers: DNR (the network designates an encrypted
resolver, RFC 9463) and DDR (a resolver designates one for itself, RFC 9462).

The rules, each with a test that fails if broken: designated resolvers come before the
plain addresses; a DDR designation at another address is used only when verified, and
its name then authenticates it (strict); one at the resolver's own address moves TLS to
the announced port; DNR's ADN authenticates under strict as a name the network handed
out (a configured name still comes first); the DDR question is asked only of resolvers
the network named; what was learnt is remembered per network (`learn`).
"""

from __future__ import annotations

import dataclasses

from agent import policy
from agent.model import (
    Auth,
    AuthSource,
    DdrResult,
    Designation,
    Link,
    Method,
    NetResolver,
    Origin,
    ProbeResult,
    Profile,
    Source,
    Timings,
    UpstreamSpec,
)
from tests.unit.test_policy import T0, conf, kmap, know, link

A, D = "198.51.100.1", "198.51.100.53"  # the DHCP resolver; the encrypted one it designates
ADN = "dns.example.test"


def dnr(address: str = D, port: int = 853, name: str = ADN) -> NetResolver:
    return NetResolver(address, name, port, True, Source.LEASE, Origin.DNR, 1)


def test_dnr_resolvers_come_first_and_are_probed_first() -> None:
    ln = Link("eth0", resolvers=(NetResolver(A, origin=Origin.DHCP), dnr()))
    plan = policy.decide([ln], conf(), {}, T0)
    assert [p.address for p in plan.probes] == [A, D]  # the order the link has them in
    assert plan.upstreams[0] == UpstreamSpec(
        D, Method.TLS_PORT, 853, ADN, name_source=AuthSource.NETWORK
    )
    # both probed, the plain one even faster and authenticated: the designated one still first
    ks = kmap(
        know(ln, A, Method.TLS_PORT, Auth.IP_SAN, latency_ms=1.0),
        know(ln, D, Method.TLS_PORT, Auth.NONE, latency_ms=50.0),
    )
    plan = policy.decide([ln], conf(), ks, T0)
    assert [u.address for u in plan.upstreams] == [D, A]
    assert "(dnr)" in next(c.reason for c in plan.choices if c.address == D)


def test_dnr_adn_is_the_name_probed_and_authenticated_under_strict() -> None:
    ln = Link("eth0", resolvers=(dnr(port=8853),))
    plan = policy.decide([ln], conf("strict"), {}, T0)
    (probe,) = plan.probes
    assert probe.settings.auth.auth_name == ADN
    assert probe.settings.auth.name_source is AuthSource.NETWORK
    assert probe.settings.tls_port == 8853
    assert not probe.settings.ddr  # a designated resolver is not asked to designate another
    ks = kmap(know(ln, D, Method.TLS_PORT, Auth.NAME))
    (up,) = policy.decide([ln], conf("strict"), ks, T0).upstreams
    assert (up.address, up.port, up.auth_name, up.name_source) == (
        D, 8853, ADN, AuthSource.NETWORK,
    )  # fmt: skip
    # a configured name comes first: the network's ADN does not replace it
    plan = policy.decide([ln], conf("strict", auth_name="mine.example"), {}, T0)
    assert plan.probes[0].settings.auth.auth_name == "mine.example"
    assert plan.probes[0].settings.auth.name_source is AuthSource.CONFIGURED


def test_ddr_is_asked_of_the_networks_resolvers_only_and_can_be_turned_off() -> None:
    ln = link("eth0", A)
    (probe,) = policy.decide([ln], conf(), {}, T0).probes
    assert probe.settings.ddr
    (probe,) = policy.decide([ln], conf(ddr=False), {}, T0).probes
    assert not probe.settings.ddr
    statics = (UpstreamSpec.parse("203.0.113.9#static.example"),)
    plan = policy.decide([], conf(static_resolvers=statics), {}, T0)
    assert [p.settings.ddr for p in plan.probes] == [False]  # configured exactly: not asked


def verified(address: str = D, port: int = 853) -> Designation:
    return Designation(address, port, ADN, 1, verified=True, usable=True, reason="verified")


def test_a_verified_ddr_designation_elsewhere_is_used_first_and_named() -> None:
    ln = link("eth0", A)
    ks = kmap(know(ln, A, Method.TCP_PLAIN, designated=(verified(),)))
    plan = policy.decide([ln], conf("strict"), ks, T0)
    # the designated resolver is probed, by its name; the plain one is not used under strict
    (probe,) = plan.probes
    assert (probe.address, probe.settings.auth.auth_name) == (D, ADN)
    assert plan.upstreams == (
        UpstreamSpec(D, Method.TLS_PORT, 853, ADN, name_source=AuthSource.NETWORK),
    )
    ks = kmap(
        know(ln, A, Method.TCP_PLAIN, designated=(verified(),)),
        know(ln, D, Method.TLS_PORT, Auth.NAME, auth_source=AuthSource.NETWORK),
    )
    plan = policy.decide([ln], conf("strict"), ks, T0)
    assert [u.address for u in plan.upstreams] == [D] and not plan.probes
    shown = policy.link_resolvers(ln, conf("strict"), ks)
    assert [(r.address, r.origin) for r in shown] == [(D, Origin.DDR), (A, Origin.NETWORK)]


def test_an_unverified_designation_elsewhere_is_never_used() -> None:
    ln = link("eth0", A)
    for d in (
        dataclasses.replace(verified(), verified=False, usable=False),
        dataclasses.replace(verified(), verified=False),  # even if something called it usable
    ):
        ks = kmap(know(ln, A, Method.TLS_PORT, Auth.NONE, designated=(d,)))
        plan = policy.decide([ln], conf(), ks, T0)
        assert [u.address for u in plan.upstreams] == [A]
        assert D not in [p.address for p in plan.probes]


def test_a_designation_at_the_resolvers_own_address_moves_tls_to_its_port() -> None:
    ln = link("eth0", A)
    same = Designation(A, 8853, ADN, 1, verified=False, usable=True, reason="opportunistic")
    ks = kmap(know(ln, A, Method.TLS_PORT, Auth.NONE, designated=(same,), tls_port=8853))
    (up,) = policy.decide([ln], conf("encrypted"), ks, T0).upstreams
    assert (up.address, up.method, up.port) == (A, Method.TLS_PORT, 8853)
    assert up.alt == (Method.TLS_UPGRADE, 53)


def test_learn_remembers_what_ddr_found_per_network() -> None:
    ln = link("eth0", A)
    unusable = Designation("203.0.113.7", 853, "far.example", 2, reason="unverified")
    result = ProbeResult(
        A, Profile.OPPORTUNISTIC, Method.TLS_PORT, True, Auth.NONE, None, Timings(), 1, 1,
        None, None, ddr=DdrResult(True, (verified(), unusable)), tls_port=None,
    )  # fmt: skip
    k = policy.learn(None, result, network=ln.network_id, now=T0, negative_cache=60)
    assert k.designated == (verified(),)  # only what may be used is kept
    again = dataclasses.replace(result, ddr=DdrResult(True, ()))
    k = policy.learn(k, again, network=ln.network_id, now=T0 + 1, negative_cache=60)
    assert k.designated == ()  # withdrawn: forgotten
