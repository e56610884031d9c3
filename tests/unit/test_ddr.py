"""agent/ddr.py (DDR, RFC 9462) against in-process test peers on 127.0.0.x loopback.

The designating resolver is a test peer at 127.0.0.1 answering `_dns.resolver.arpa` SVCB;
designated DoT servers are peers at 127.0.0.1 or other loopback addresses, with
certificates that do or do not carry the designating resolver's address and the ADN.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import struct
import typing
from collections.abc import Callable
from pathlib import Path as FsPath

import dns.message
import dns.rdatatype
import pytest

from agent.cli import format_table
from agent.ddr import (
    MAX_ADDRESSES,
    MAX_RECORDS,
    QNAME,
    Verdict,
    discover,
    judge,
    private_or_local,
    read_answer,
)
from agent.ddr import _unusable_address as unusable_address
from agent.model import (
    Auth,
    AuthSource,
    AuthSpec,
    DdrResult,
    Designation,
    Failure,
    Method,
    Path,
    ProbeResult,
    ProbeSettings,
    Profile,
)
from agent.probe import designated_port, probe
from tests.conftest import Certs, run
from tests.lab.certs import CertFiles
from tests.lab.peer import Peer, PeerConfig

RESOLVER = "127.0.0.1"
OTHER = "127.0.0.2"
ADN = "dot.ddr.test"
DDR_TIMEOUT = 0.5
SLACK = 0.3  # seconds of scheduling slack on top of a bound


def settings(
    peer: Peer, certs: Certs, profile: Profile = Profile.STRICT, **kw: object
) -> ProbeSettings:
    return ProbeSettings(
        auth=AuthSpec(profile, ca_file=str(certs.ca.path)),
        dns_port=peer.dns_port,
        ddr_timeout=DDR_TIMEOUT,
        timeout=2.0,
        **kw,  # type: ignore[arg-type]
    )


async def ddr_of(peer: Peer, certs: Certs) -> DdrResult:
    s = settings(peer, certs)
    loop = asyncio.get_running_loop()
    return await discover(peer.config.host, s, loop.time() + s.timeout)


def dot_peer(cert: CertFiles, host: str) -> PeerConfig:
    """A designated DoT server: TLS only (its DNS port is bound too, and unused)."""
    return PeerConfig(host=host, cert=cert.cert, key=cert.key, upgrade=False)


def resolver(*svcb: str, **kw: object) -> PeerConfig:
    """The designating resolver: plain DNS only, unless told otherwise."""
    return PeerConfig(host=RESOLVER, tls_port=None, svcb=list(svcb), **kw)  # type: ignore[arg-type]


def only(result: DdrResult) -> Designation:
    assert len(result.designations) == 1, result
    return result.designations[0]


def questions(peer: Peer) -> list[str]:
    return [f"{s.qname}/{s.qtype}" for s in peer.seen]


@pytest.fixture
def dot_certs(certs: Certs, tmp_path: FsPath) -> dict[str, CertFiles]:
    """Certificates for the designated servers, by what they carry."""
    return {
        "name+ip": certs.ca.issue(tmp_path, "name-ip", ips=(RESOLVER,), names=(ADN,)),
        "name+own-ip": certs.ca.issue(tmp_path, "own-ip", ips=(OTHER,), names=(ADN,)),
        "ip-only": certs.ca.issue(tmp_path, "ip-only", ips=(RESOLVER,), names=("other.test",)),
    }


# -- Verified Discovery (section 4.2) -------------------------------------------------------


def test_verified_at_another_address(certs: Certs, dot_certs: dict[str, CertFiles]) -> None:
    """The certificate validates, names the ADN and carries the designating resolver's
    address: verified and usable, though the designation is at another address."""

    async def go() -> tuple[DdrResult, Peer, Peer]:
        async with Peer(dot_peer(dot_certs["name+ip"], OTHER)) as dot, Peer(resolver()) as res:
            res.config.svcb = [f"1 {ADN}. alpn=dot port={dot.tls_port} ipv4hint={OTHER}"]
            return await ddr_of(res, certs), res, dot

    result, res, dot = run(go())
    d = only(result)
    assert (d.address, d.port, d.adn, d.priority) == (OTHER, dot.tls_port, ADN, 1)
    assert d.verified and d.usable, d
    assert d.reason == f"verified (cert names it and {RESOLVER})"
    assert result.usable == (d,) and result.asked and not result.failure
    # one cleartext question, the DDR one; the designated server saw a handshake, no query
    assert questions(res) == ["_dns.resolver.arpa./SVCB"]
    assert dot.handshakes == 1 and dot.seen == []


def test_certificate_without_the_resolver_address_is_not_verified(
    certs: Certs, dot_certs: dict[str, CertFiles]
) -> None:
    async def go() -> DdrResult:
        async with Peer(dot_peer(dot_certs["name+own-ip"], OTHER)) as dot, Peer(resolver()) as res:
            res.config.svcb = [f"1 {ADN}. alpn=dot port={dot.tls_port} ipv4hint={OTHER}"]
            return await ddr_of(res, certs)

    d = only(run(go()))
    assert not d.verified and not d.usable
    assert d.reason.startswith("unverified, at another address: RFC 9462 forbids its use"), d
    assert RESOLVER in d.reason  # says what the certificate lacks


def test_certificate_without_the_adn_is_not_verified(
    certs: Certs, dot_certs: dict[str, CertFiles]
) -> None:
    async def go() -> DdrResult:
        async with Peer(dot_peer(dot_certs["ip-only"], OTHER)) as dot, Peer(resolver()) as res:
            res.config.svcb = [f"1 {ADN}. alpn=dot port={dot.tls_port} ipv4hint={OTHER}"]
            return await ddr_of(res, certs)

    d = only(run(go()))
    assert not d.verified and not d.usable
    assert f"does not name {ADN}" in d.reason, d


def test_chain_not_valid_at_another_address_is_not_usable(certs: Certs) -> None:
    async def go() -> DdrResult:
        async with Peer(dot_peer(certs.wrong_ca, OTHER)) as dot, Peer(resolver()) as res:
            res.config.svcb = [f"1 dns.test. alpn=dot port={dot.tls_port} ipv4hint={OTHER}"]
            return await ddr_of(res, certs)

    d = only(run(go()))
    assert not d.verified and not d.usable
    assert "certificate verification failed" in d.reason, d


def test_verified_over_ipv6(certs: Certs) -> None:
    """certs.good carries ::1 and dns.test: a designation at the resolver's own v6 address."""

    async def go() -> DdrResult:
        async with Peer(PeerConfig(host="::1", cert=certs.good.cert, key=certs.good.key)) as res:
            res.config.svcb = [f"1 dns.test. alpn=dot port={res.tls_port} ipv6hint=::1"]
            return await ddr_of(res, certs)

    d = only(run(go()))
    assert d.address == "::1" and d.verified and d.usable


# -- Opportunistic Discovery (section 4.3) --------------------------------------------------


def test_opportunistic_at_the_same_private_address(certs: Certs) -> None:
    """A self-signed certificate at the resolver's own (loopback) address: not verified, but
    usable opportunistically."""

    async def go() -> DdrResult:
        cfg = PeerConfig(host=RESOLVER, cert=certs.self_signed.cert, key=certs.self_signed.key)
        async with Peer(cfg) as res:
            res.config.svcb = [f"1 dns.test. alpn=dot port={res.tls_port} ipv4hint={RESOLVER}"]
            return await ddr_of(res, certs)

    d = only(run(go()))
    assert d.address == RESOLVER and not d.verified and d.usable
    assert d.reason.startswith("opportunistic (same private address"), d


def test_no_tls_at_the_designated_port_is_not_usable(certs: Certs) -> None:
    """Even where opportunistic use is allowed, a port that does not speak TLS is no use."""
    port = closed_port(RESOLVER)

    async def go() -> DdrResult:
        async with Peer(resolver(f"1 dns.test. alpn=dot port={port} ipv4hint={RESOLVER}")) as res:
            return await ddr_of(res, certs)

    d = only(run(go()))
    assert not d.usable and d.reason.startswith("no TLS there:"), d


@pytest.mark.parametrize(
    ("address", "private"),
    [
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("192.168.1.1", True),
        ("fd00::53", True),
        ("fe80::1", True),
        ("169.254.0.53", True),
        ("127.0.0.1", True),
        ("::1", True),
        ("198.51.100.1", True),  # documentation range, the lab's: Python counts it private
        ("9.9.9.9", False),
        ("2620:fe::fe", False),
        ("100.64.0.1", False),  # shared address space (RFC 6598): not in RFC 9462's list
    ],
)
def test_private_or_local(address: str, private: bool) -> None:
    assert private_or_local(address) is private


def test_judge_follows_rfc9462() -> None:
    ok, why = judge("9.9.9.9", "149.112.112.112", Verdict.VERIFIED, "")
    assert ok and why == "verified (cert names it and 9.9.9.9)"
    ok, why = judge("192.168.1.1", "192.168.1.1", Verdict.UNVERIFIED, "self-signed")
    assert ok and "opportunistic" in why
    ok, why = judge("9.9.9.9", "9.9.9.9", Verdict.UNVERIFIED, "self-signed")
    assert not ok and "public address" in why  # same address, but a public one
    ok, why = judge("192.168.1.1", "192.168.1.2", Verdict.UNVERIFIED, "self-signed")
    assert not ok and why.startswith("unverified, at another address: RFC 9462 forbids its use")
    ok, why = judge("192.168.1.1", "192.168.1.1", Verdict.NO_TLS, "connection refused")
    assert not ok and "connection refused" in why


def test_unusable_addresses() -> None:
    assert unusable_address("192.168.1.1", "0.0.0.0")
    assert unusable_address("192.168.1.1", "::")
    assert unusable_address("192.168.1.1", "224.0.0.1")
    assert unusable_address("192.168.1.1", "240.0.0.1")
    assert unusable_address("192.168.1.1", "127.0.0.1")  # a remote resolver names this host
    assert unusable_address("192.168.1.1", "not-an-address")
    assert unusable_address("192.168.1.1", "::ffff:127.0.0.1")
    assert unusable_address("192.168.1.1", "::1")
    assert unusable_address("::1", "::1") == ""
    assert unusable_address("127.0.0.1", "127.0.0.2") == ""
    assert unusable_address("192.168.1.1", "192.168.1.2") == ""


# -- what is read, what is left out --------------------------------------------------------


def test_alias_mode_is_not_followed(certs: Certs) -> None:
    async def go() -> tuple[DdrResult, Peer]:
        async with Peer(resolver(f"0 {ADN}.", svcb_hosts={ADN: [RESOLVER]})) as res:
            return await ddr_of(res, certs), res

    result, res = run(go())
    assert result.asked and result.designations == ()
    assert "AliasMode" in result.failure
    assert questions(res) == ["_dns.resolver.arpa./SVCB"]  # no query for the alias target


def test_doh_only_is_ignored(certs: Certs) -> None:
    async def go() -> DdrResult:
        svcb = f"1 doh.ddr.test. alpn=h2 key7=/dns-query{{?dns}} ipv4hint={RESOLVER}"
        async with Peer(resolver(svcb)) as res:
            return await ddr_of(res, certs)

    result = run(go())
    assert result.designations == ()
    assert "without ALPN dot (h2)" in result.failure


def test_dot_kept_beside_doh_and_doq(certs: Certs) -> None:
    async def go() -> DdrResult:
        cfg = PeerConfig(host=RESOLVER, cert=certs.good.cert, key=certs.good.key)
        async with Peer(cfg) as res:
            res.config.svcb = [
                f"1 dns.test. alpn=h2 key7=/q{{?dns}} ipv4hint={RESOLVER}",
                f"2 dns.test. alpn=doq ipv4hint={RESOLVER}",
                f"3 dns.test. alpn=dot,h2 port={res.tls_port} ipv4hint={RESOLVER}",
            ]
            return await ddr_of(res, certs)

    d = only(run(go()))
    assert d.priority == 3 and d.verified and d.usable


def test_addresses_asked_for_when_no_hints(certs: Certs) -> None:
    """No ipv4hint/ipv6hint, no additional records: A and AAAA of the target are asked of
    the same resolver (and only of it)."""

    async def go() -> tuple[DdrResult, Peer]:
        cfg = PeerConfig(host=RESOLVER, cert=certs.good.cert, key=certs.good.key)
        async with Peer(cfg) as res:
            res.config.svcb = [f"1 dns.test. alpn=dot port={res.tls_port}"]
            res.config.svcb_hosts = {"dns.test": [RESOLVER]}
            return await ddr_of(res, certs), res

    result, res = run(go())
    d = only(result)
    assert d.address == RESOLVER and d.verified
    assert sorted(questions(res)) == sorted(
        ["_dns.resolver.arpa./SVCB", "dns.test./A", "dns.test./AAAA"]
    )


def test_additional_records_spare_the_lookup(certs: Certs) -> None:
    async def go() -> tuple[DdrResult, Peer]:
        cfg = PeerConfig(host=RESOLVER, cert=certs.good.cert, key=certs.good.key, svcb_glue=True)
        async with Peer(cfg) as res:
            res.config.svcb = [f"1 dns.test. alpn=dot port={res.tls_port}"]
            res.config.svcb_hosts = {"dns.test": [RESOLVER, "::1"]}
            return await ddr_of(res, certs), res

    result, res = run(go())
    assert {d.address for d in result.designations} == {RESOLVER, "::1"}
    assert questions(res) == ["_dns.resolver.arpa./SVCB"]


def test_additional_records_preferred_to_hints(certs: Certs) -> None:
    """RFC 9460 section 7.3: address records at hand win over ipv4hint."""

    async def go() -> DdrResult:
        cfg = PeerConfig(host=RESOLVER, cert=certs.good.cert, key=certs.good.key, svcb_glue=True)
        async with Peer(cfg) as res:
            res.config.svcb = [f"1 dns.test. alpn=dot port={res.tls_port} ipv4hint=127.0.0.3"]
            res.config.svcb_hosts = {"dns.test": [RESOLVER]}
            return await ddr_of(res, certs)

    assert only(run(go())).address == RESOLVER


def test_same_designation_twice_keeps_the_lowest_priority(certs: Certs) -> None:
    async def go() -> DdrResult:
        cfg = PeerConfig(host=RESOLVER, cert=certs.good.cert, key=certs.good.key)
        async with Peer(cfg) as res:
            rr = f"dns.test. alpn=dot port={res.tls_port} ipv4hint={RESOLVER}"
            res.config.svcb = [f"5 {rr}", f"2 {rr}"]
            return await ddr_of(res, certs)

    assert only(run(go())).priority == 2


@pytest.mark.parametrize(
    ("record", "why"),
    [
        ("1 . alpn=dot ipv4hint=127.0.0.1", "TargetName ."),
        ("1 resolver.arpa. alpn=dot ipv4hint=127.0.0.1", "TargetName resolver.arpa."),
        ("1 x.resolver.arpa. alpn=dot ipv4hint=127.0.0.1", "TargetName x.resolver.arpa."),
        ("1 dns.test. alpn=dot port=25 ipv4hint=127.0.0.1", "port 25"),
        ("1 dns.test. alpn=dot port=0 ipv4hint=127.0.0.1", "port 0"),
        ("1 dns.test. mandatory=key65000 alpn=dot key65000=x ipv4hint=127.0.0.1", "key65000"),
        ("1 dns.test. ipv4hint=127.0.0.1", "no alpn"),
        ("1 dns.test. alpn=dot ipv4hint=0.0.0.0", "0.0.0.0 cannot be"),
        ("1 dns.test. alpn=dot ipv4hint=224.0.0.1", "224.0.0.1 cannot be"),
    ],
)
def test_records_left_out(certs: Certs, record: str, why: str) -> None:
    """Nothing is sent for these (no TLS listens anywhere here: a try would say no TLS)."""

    async def go() -> tuple[DdrResult, Peer]:
        async with Peer(resolver(record)) as res:
            return await ddr_of(res, certs), res

    result, res = run(go())
    assert result.designations == (), result
    assert why in result.failure, result.failure
    assert questions(res) == ["_dns.resolver.arpa./SVCB"]


def test_bounded_and_truncated_answer_retried_over_tcp(
    certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """20 records of 10 addresses each: too big for UDP (TC, then TCP), and only the first
    MAX_RECORDS records, MAX_ADDRESSES addresses each, are tried."""
    caplog.set_level(logging.INFO, logger="agent.ddr")
    port = closed_port(RESOLVER)
    records = [
        f"1 d{i}.ddr.test. alpn=dot port={port} ipv4hint="
        + ",".join(f"127.0.{i + 1}.{j + 1}" for j in range(10))
        for i in range(20)
    ]

    async def go() -> tuple[DdrResult, Peer]:
        async with Peer(resolver(*records)) as res:
            return await ddr_of(res, certs), res

    result, res = run(go())
    assert [s.via for s in res.seen] == ["udp", "tcp"]  # truncated over UDP
    assert len(result.designations) == MAX_RECORDS * MAX_ADDRESSES
    adns = [d.adn for d in result.designations]  # which 16: the answer's order (same priority)
    assert len(set(adns)) == MAX_RECORDS
    assert all(adns.count(a) == MAX_ADDRESSES for a in adns)
    assert "4 records past the first 16" in caplog.text
    assert not result.usable  # nothing listens there


# -- failures ------------------------------------------------------------------------------


def test_nxdomain(certs: Certs) -> None:
    async def go() -> DdrResult:
        async with Peer(resolver()) as res:  # the peer knows no SVCB: NXDOMAIN
            return await ddr_of(res, certs)

    result = run(go())
    assert result.asked and result.designations == () and result.failure == "NXDOMAIN"


def test_no_answer_is_bounded_by_ddr_timeout(certs: Certs) -> None:
    async def go() -> tuple[DdrResult, float]:
        with silent_udp(RESOLVER) as port:
            s = ProbeSettings(dns_port=port, ddr_timeout=0.3)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            result = await discover(RESOLVER, s, t0 + 5)
            return result, loop.time() - t0

    result, took = run(go())
    assert result.asked and result.designations == ()
    assert "no answer" in result.failure
    assert 0.25 <= took <= 0.3 + SLACK, took


def test_the_deadline_bounds_it_too(certs: Certs) -> None:
    async def go() -> tuple[DdrResult, float]:
        with silent_udp(RESOLVER) as port:
            s = ProbeSettings(dns_port=port, ddr_timeout=5)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            return await discover(RESOLVER, s, t0 + 0.2), loop.time() - t0

    result, took = run(go())
    assert result.failure and took <= 0.2 + SLACK


def test_nothing_listening(certs: Certs) -> None:
    async def go() -> DdrResult:
        s = ProbeSettings(dns_port=closed_udp_port(RESOLVER), ddr_timeout=1)
        return await discover(RESOLVER, s, asyncio.get_running_loop().time() + 2)

    result = run(go())
    assert result.asked and "refused" in result.failure


ALPN = b"\x00\x01\x00\x04\x03dot"  # alpn=dot, on the wire
PORT = b"\x00\x03\x00\x02\x22\x95"  # port=8853


def svcb(priority: int, params: bytes, target: bytes = b"\x03dns\x04test\x00") -> bytes:
    """SVCB RDATA on the wire, whatever `params` holds."""
    return struct.pack("!H", priority) + target + params


def _answer_with(rdata: bytes) -> Callable[[bytes], bytes]:
    """A responder: the question echoed, one SVCB record with this raw RDATA."""

    def respond(query: bytes) -> bytes:
        q = dns.message.from_wire(query)
        head = struct.pack("!HHHHHH", q.id, 0x8180, 1, 1, 0, 0)
        question = query[12:]  # the client's question (no EDNS: see below)
        question = question[: question.index(b"\x00") + 5]
        rr = b"\xc0\x0c" + struct.pack("!HHIH", 64, 1, 300, len(rdata)) + rdata
        return head + question + rr

    return respond


@pytest.mark.parametrize(
    "responder",
    [
        pytest.param(lambda q: b"\x00" * 5, id="too-short"),
        pytest.param(lambda q: q, id="echo-of-query"),
        pytest.param(lambda q: bytes([q[0] ^ 0xFF]) + q[1:2] + b"\x81\x80" + q[4:], id="wrong-id"),
        pytest.param(lambda q: b"\xff" * 300, id="garbage"),
        pytest.param(_answer_with(b"\x00"), id="svcb-cut-short"),
        pytest.param(_answer_with(svcb(1, b"\x00\x01\x00\x05\x03dot")), id="alpn-overrun"),
        pytest.param(_answer_with(svcb(1, b"\x00\x01\x00\x01\x00")), id="alpn-empty-id"),
        pytest.param(_answer_with(svcb(1, b"\x00\x03\x00\x01\x03")), id="port-short"),
        pytest.param(_answer_with(svcb(1, PORT + ALPN)), id="keys-out-of-order"),
        pytest.param(_answer_with(svcb(1, ALPN + ALPN)), id="key-twice"),
        pytest.param(_answer_with(svcb(1, b"\x00\x04\x00\x03\x7f\x00\x00")), id="v4hint-3B"),
        pytest.param(_answer_with(svcb(1, b"\x00\x06\x00\x04\x00\x00\x00\x01")), id="v6hint-4B"),
        pytest.param(_answer_with(svcb(1, b"\x00\x00\x00\x02\x00\x00" + ALPN)), id="mandatory-0"),
        pytest.param(_answer_with(svcb(1, ALPN)[:-2]), id="rdata-ends-mid-value"),
        pytest.param(_answer_with(b"\x00\x01\x3fabc"), id="bad-target-label"),
    ],
)
def test_malformed_answers_never_raise(responder: Callable[[bytes], bytes]) -> None:
    async def go() -> tuple[DdrResult, float]:
        async with udp_responder(RESOLVER, responder) as port:
            s = ProbeSettings(dns_port=port, ddr_timeout=0.3)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            return await discover(RESOLVER, s, t0 + 2), loop.time() - t0

    result, took = run(go())
    assert result.asked and result.designations == () and result.failure
    assert "no answer" not in result.failure  # it answered: what was wrong is named
    assert took <= 0.3 + SLACK


def test_read_answer_of_an_empty_answer() -> None:
    response = dns.message.make_response(dns.message.make_query(QNAME, dns.rdatatype.SVCB))
    assert read_answer(response) == ([], [])


# -- the probe ------------------------------------------------------------------------------


def port_only(cert: CertFiles, **kw: object) -> PeerConfig:
    """A resolver whose only DoT is on a port its DDR answer announces: no upgrade, and the
    probe's usual TLS port refuses."""
    return PeerConfig(host=RESOLVER, cert=cert.cert, key=cert.key, upgrade=False, **kw)  # type: ignore[arg-type]


def probe_port_only(
    cert: CertFiles, certs: Certs, profile: Profile, *, ddr: bool = True
) -> tuple[ProbeResult, Peer]:
    async def go() -> tuple[ProbeResult, Peer]:
        async with Peer(port_only(cert)) as res:
            res.config.svcb = [f"1 dns.test. alpn=dot port={res.tls_port} ipv4hint={RESOLVER}"]
            s = settings(res, certs, profile, tls_port=closed_port(RESOLVER), ddr=ddr)
            return await probe(RESOLVER, s), res

    return run(go())


def test_probe_uses_the_designated_port_strict(certs: Certs) -> None:
    r, res = probe_port_only(certs.good, certs, Profile.STRICT)
    assert r.method is Method.TLS_PORT and r.acceptable, r.failures
    assert r.tls_port == res.tls_port
    assert r.ddr is not None and only(r.ddr).verified
    # the verified designation's name authenticated it, as a name the network handed out
    assert r.auth is Auth.NAME and r.auth_source is AuthSource.NETWORK
    # cleartext: the STARTTLS dummy and the DDR question, nothing else
    cleartext = {f"{s.qname}/{s.qclass}/{s.qtype}" for s in res.seen if s.via in ("udp", "tcp")}
    assert cleartext == {"STARTTLS./CH/TXT", "_dns.resolver.arpa./IN/SVCB"}
    assert any(s.via == "tls-port" and s.qname == "." for s in res.seen)
    assert r.total_ms <= 2000 + SLACK * 1000


def test_probe_without_ddr_finds_no_private_path(certs: Certs) -> None:
    """The same resolver, DDR off: the port path knocks at the usual (closed) port."""
    r, res = probe_port_only(certs.good, certs, Profile.STRICT, ddr=False)
    assert not r.acceptable and r.tls_port is None and r.ddr is None
    assert not any(s.qname == "_dns.resolver.arpa." for s in res.seen)


def test_probe_opportunistic_designation(certs: Certs) -> None:
    r, _ = probe_port_only(certs.self_signed, certs, Profile.OPPORTUNISTIC)
    assert r.method is Method.TLS_PORT and r.acceptable and r.tls_port is not None
    assert r.auth is Auth.NONE
    assert r.ddr is not None and only(r.ddr).usable and not only(r.ddr).verified


def test_probe_strict_is_not_weakened_by_an_opportunistic_designation(certs: Certs) -> None:
    """The port moves to the designated one, but strict still demands authentication."""
    r, res = probe_port_only(certs.self_signed, certs, Profile.STRICT)
    assert not r.acceptable and r.tls_port is None
    port = next(p for p in r.paths if p.path is Path.PORT)
    assert port.failure is Failure.CERT_NOT_AUTHENTICATED
    assert not [s for s in res.seen if s.via.startswith("tls")]  # no query sent to it


def test_probe_runs_when_ddr_gets_no_answer(certs: Certs) -> None:
    """The DDR question (and its retransmission) dropped: DDR fails within ddr_timeout, and
    the probe goes on within its own deadline."""

    async def go() -> ProbeResult:
        cfg = PeerConfig(host=RESOLVER, cert=certs.good.cert, key=certs.good.key, drop_udp=2)
        async with Peer(cfg) as res:
            s = settings(res, certs, tls_port=res.tls_port)
            return await probe(RESOLVER, s)

    r = run(go())
    assert r.method is Method.TLS_PORT and r.acceptable and r.tls_port is None
    assert r.ddr is not None and "no answer" in r.ddr.failure
    assert DDR_TIMEOUT * 1000 <= r.total_ms <= 2000 + SLACK * 1000


def test_probe_runs_after_nxdomain(certs: Certs) -> None:
    async def go() -> ProbeResult:
        async with Peer(PeerConfig(host=RESOLVER, cert=certs.good.cert, key=certs.good.key)) as res:
            return await probe(RESOLVER, settings(res, certs, tls_port=res.tls_port))

    r = run(go())
    assert r.method is Method.TLS_PORT and r.acceptable and r.auth is Auth.IP_SAN
    assert r.ddr == DdrResult(asked=True, failure="NXDOMAIN")


def test_designated_port_choice() -> None:
    s = ProbeSettings(tls_port=853)

    def d(
        address: str, port: int, *, verified: bool, usable: bool = True, prio: int = 1
    ) -> Designation:
        return Designation(address, port, "x.test", prio, verified, usable)

    def pick(*ds: Designation) -> int | None:
        chosen = designated_port("192.168.1.1", s, DdrResult(True, ds))
        return None if chosen is None else chosen.port

    assert pick() is None
    assert pick(d("192.168.1.1", 8853, verified=False, usable=False)) is None
    assert pick(d("192.168.1.2", 8853, verified=True)) is None  # another address: not here
    assert pick(d("192.168.1.1", 853, verified=True)) is None  # the port already probed
    assert pick(d("192.168.1.1", 8853, verified=False)) == 8853
    assert (
        pick(d("192.168.1.1", 8853, verified=False), d("192.168.1.1", 9953, verified=True)) == 9953
    )
    assert (
        pick(d("192.168.1.1", 8853, verified=True, prio=2), d("192.168.1.1", 9953, verified=True))
        == 9953
    )


def test_cli_ddr_lines(certs: Certs) -> None:
    r, res = probe_port_only(certs.good, certs, Profile.STRICT)
    text = format_table([r])
    assert (
        f"  {RESOLVER} DDR: dot dns.test@{RESOLVER}:{res.tls_port}, the port path's, "
        f"verified (cert names it and {RESOLVER})"
    ) in text.splitlines()
    bad = Designation(
        "127.0.0.2",
        853,
        "evil.test",
        1,
        False,
        False,
        "unverified, at another address: RFC 9462 forbids its use",
    )
    other = dataclasses.replace(r, ddr=DdrResult(True, (bad,)), tls_port=None)
    assert (
        f"  {RESOLVER} DDR: dot evil.test@127.0.0.2:853, not used: unverified, at another "
        "address: RFC 9462 forbids its use"
    ) in format_table([other]).splitlines()
    none = dataclasses.replace(r, ddr=DdrResult(True, failure="NXDOMAIN"))
    assert f"  {RESOLVER} DDR: none (NXDOMAIN)" in format_table([none]).splitlines()
    assert r.to_json()["ddr"]["designations"][0]["adn"] == "dns.test"
    assert r.to_json()["tls_port"] == res.tls_port


# -- helpers --------------------------------------------------------------------------------


def closed_port(host: str) -> int:
    """A TCP port nothing listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def closed_udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class silent_udp:
    """A UDP port that is bound and never answers."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))

    def __enter__(self) -> int:
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


class udp_responder:
    """A UDP server answering every datagram with `respond(datagram)`."""

    def __init__(self, host: str, respond: Callable[[bytes], bytes]) -> None:
        self.host = host
        self.respond = respond
        self.transport: asyncio.DatagramTransport | None = None

    async def __aenter__(self) -> int:
        respond = self.respond

        class Protocol(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = typing.cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                self.transport.sendto(respond(data), addr)

        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(Protocol, local_addr=(self.host, 0))
        return int(self.transport.get_extra_info("sockname")[1])

    async def __aexit__(self, *exc: object) -> None:
        if self.transport is not None:
            self.transport.close()
