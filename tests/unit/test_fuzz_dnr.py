"""Fuzzing agent/dns/dnr.py's three parsers and the dhclient lease lines that carry DNR:
random bytes, and valid options mutated. Nothing but DnrError ever comes out of a parser;
what it returns holds addresses, host names and ports; `resolvers` stays DoT and bounded;
a lease with a broken DNR option still parses (the option left out).

Targets: `dnr-v4`, `dnr-v6`, `dnr-ra` (parse_v4, parse_v6, parse_ra on bytes) and
`dnr-lease` (parse_dhclient on a lease whose `option dnr` is mutated). Not in the shared
corpus module list (tests/fuzz_corpus MODULES): the unit tier runs them here.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dns import dnr
from agent.dns.dnr import DnrError, DnrInstance
from agent.model import Origin, Source
from agent.watchers import leases
from tests.fuzz_corpus import UNIT, Target, expect, mutated, mutated_text, property_test

LDH = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")

ADNS = st.sampled_from(["dns.example.test", "a.b", "x" * 63 + ".example", "resolver"])
V4S = st.sampled_from(["198.51.100.53", "203.0.113.1", "127.0.0.1", "224.0.0.1"])
V6S = st.sampled_from(["2001:db8::53", "fe80::1", "::1", "::ffff:198.51.100.1"])
ALPNS = st.lists(st.sampled_from(["dot", "doq", "h2", "h3"]), max_size=3).map(tuple)
PORTS = st.one_of(st.none(), st.integers(1, 65535))
PATHS = st.one_of(st.none(), st.sampled_from(["/dns-query{?dns}", "/q", "é"]))


def instances(addresses: st.SearchStrategy[str]) -> st.SearchStrategy[DnrInstance]:
    return st.builds(
        DnrInstance,
        st.integers(0, 65535),
        ADNS,
        st.lists(addresses, max_size=4).map(tuple),
        ALPNS,
        PORTS,
        PATHS,
        st.one_of(st.none(), st.integers(0, 0xFFFFFFFF)),
    )


V4_SEEDS = st.lists(instances(V4S), min_size=1, max_size=4).map(dnr.encode_v4)
V6_SEEDS = instances(V6S).map(dnr.encode_v6)
RA_SEEDS = instances(V6S).map(dnr.encode_ra)


def payloads(seeds: st.SearchStrategy[bytes]) -> Callable[[bool], st.SearchStrategy[bytes]]:
    def strategy(big: bool) -> st.SearchStrategy[bytes]:
        return st.one_of(
            st.binary(max_size=65536 if big else 300), seeds, mutated(seeds), mutated(seeds)
        )

    return strategy


def _check(parse: Callable[[bytes], tuple[DnrInstance, ...]], data: bytes) -> None:
    try:
        got = parse(data)
    except DnrError:
        return
    for inst in got:
        expect(0 <= inst.priority <= 65535, "dnr: priority", inst.priority)
        expect(LDH.fullmatch(inst.adn) is not None, "dnr: ADN not a host name", inst.adn)
        for a in inst.addresses:
            ip = ipaddress.ip_address(a)
            expect(str(ip) == a, "dnr: address not canonical", a)
            expect(not (ip.is_loopback or ip.is_multicast or ip.is_unspecified), "dnr: bad addr", a)
        expect(inst.port is None or 0 < inst.port < 65536, "dnr: port", inst.port)
        expect(all(inst.alpn), "dnr: an empty alpn-id", inst.alpn)
    out = dnr.resolvers(got, Source.LEASE)
    expect(len(out) <= dnr.MAX_INSTANCES * dnr.MAX_ADDRESSES, "dnr: unbounded", len(out))
    expect(all(r.tls and r.origin is Origin.DNR and r.auth_name for r in out), "dnr: resolver")
    priorities = [r.priority for r in out]
    expect(priorities == sorted(priorities), "dnr: not by priority", priorities)


def check_v4(data: bytes) -> None:
    _check(dnr.parse_v4, data)


def check_v6(data: bytes) -> None:
    _check(dnr.parse_v6, data)


def check_ra(data: bytes) -> None:
    _check(dnr.parse_ra, data)


# -- in a lease file, as dhclient writes it -------------------------------------------------------


def _hex(data: bytes) -> str:
    return ":".join(f"{b:x}" for b in data)


def _quoted(data: bytes) -> str:
    text = data.decode("latin-1").replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


@st.composite
def lease_texts(draw: st.DrawFn) -> str:
    payload = draw(st.one_of(V4_SEEDS, mutated(V4_SEEDS), st.binary(max_size=40)))
    name = draw(st.sampled_from(["dnr", "unknown-162", "dhcp6.dnr"]))
    value = _quoted(payload) if draw(st.booleans()) and payload.isascii() else _hex(payload)
    return (
        'lease {\n  interface "eth0";\n  option domain-name-servers 198.51.100.1;\n'
        f"  option {name} {value};\n}}\n"
    )


def leases_strategy(big: bool) -> st.SearchStrategy[str]:
    return st.one_of(lease_texts(), mutated_text(lease_texts()))


def check_lease(text: str) -> None:
    for lease in leases.parse_dhclient(text).values():
        link = leases.to_link(lease)
        designated = [r for r in link.resolvers if r.origin is Origin.DNR]
        expect(link.resolvers[: len(designated)] == tuple(designated), "lease: DNR not first", link)


TARGETS = [
    Target("dnr-v4", payloads(V4_SEEDS), check_v4, max_examples=400),
    Target("dnr-v6", payloads(V6_SEEDS), check_v6, max_examples=300),
    Target("dnr-ra", payloads(RA_SEEDS), check_ra, max_examples=300),
    Target("dnr-lease", leases_strategy, check_lease, max_examples=200),
]

test_dnr_v4 = property_test(TARGETS[0])
test_dnr_v6 = property_test(TARGETS[1])
test_dnr_ra = property_test(TARGETS[2])
test_dnr_lease = property_test(TARGETS[3])

# -- round trips --------------------------------------------------------------------------------

USABLE_V4 = st.sampled_from(["198.51.100.53", "198.51.100.54", "203.0.113.1"])
USABLE_V6 = st.sampled_from(["2001:db8::53", "2001:db8::54", "fe80::1"])


def _normal(inst: DnrInstance, lifetime: int | None = None) -> DnrInstance:
    """What the parser gives back for `inst`: addresses once each, ADN-only with nothing
    else, the lifetime only an RA carries."""
    addresses = tuple(dict.fromkeys(inst.addresses))
    if not addresses:
        return DnrInstance(inst.priority, inst.adn, lifetime=lifetime)
    return replace(inst, addresses=addresses, lifetime=lifetime)


@settings(UNIT)
@given(st.lists(instances(USABLE_V4), min_size=1, max_size=5))
def test_v4_round_trip(given_instances: list[DnrInstance]) -> None:
    want = tuple(_normal(i) for i in given_instances)
    assert dnr.parse_v4(dnr.encode_v4(given_instances)) == want


@settings(UNIT)
@given(instances(USABLE_V6))
def test_v6_and_ra_round_trip(inst: DnrInstance) -> None:
    assert dnr.parse_v6(dnr.encode_v6(inst)) == (_normal(inst),)
    lifetime = dnr.INFINITY if inst.lifetime is None else inst.lifetime  # encode_ra's default
    assert dnr.parse_ra(dnr.encode_ra(inst)) == (_normal(inst, lifetime),)
