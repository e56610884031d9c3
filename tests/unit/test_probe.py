"""agent/probe.py against the in-process test peer on loopback: every path, every fault.

Each fault pins the resulting method, the failure reason and that the deadline held.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path as FsPath
from typing import Any

import dns.message
import pytest

from agent import policy
from agent.config import Config, ConfigProfile, LinkSettings
from agent.dns.wire import TO_FLAG, frame, starttls_query
from agent.engine import Engine
from agent.model import (
    Auth,
    AuthSource,
    AuthSpec,
    Failure,
    Link,
    Method,
    NetResolver,
    Order,
    Path,
    ProbeResult,
    ProbeSettings,
    Profile,
    Source,
    UpstreamSpec,
)
from agent.probe import probe
from agent.state import Store
from tests.conftest import Certs, run
from tests.lab.certs import CertFiles
from tests.lab.peer import Fault, Peer, PeerConfig

TIMEOUT = 1.5  # the probe deadline in these tests; loopback answers in milliseconds
SLACK_MS = 150  # scheduling slack on top of a deadline


def opportunistic(**kw: object) -> AuthSpec:
    return AuthSpec(Profile.OPPORTUNISTIC, **kw)  # type: ignore[arg-type]


def strict(**kw: object) -> AuthSpec:
    return AuthSpec(Profile.STRICT, **kw)  # type: ignore[arg-type]


def probe_peer(
    config: PeerConfig,
    auth: AuthSpec | None = None,
    *,
    host: str = "127.0.0.1",
    tls_closed: bool = False,
    **settings: object,
) -> tuple[ProbeResult, Peer]:
    """Start a peer, probe it once, stop it; return the result and the peer (with what it saw)."""

    async def go() -> tuple[ProbeResult, Peer]:
        config.host = host
        if tls_closed:
            config.tls_port = None
        async with Peer(config) as peer:
            tls_port = peer.tls_port
            if tls_port is None:  # nothing listens on the TLS port: take a port that refuses
                tls_port = _closed_port(host)
            s = ProbeSettings(
                auth=auth or opportunistic(),
                tls_port=tls_port,
                dns_port=peer.dns_port,
                timeout=TIMEOUT,
                **settings,  # type: ignore[arg-type]
            )
            return await probe(host, s), peer

    return run(go())


def _closed_port(host: str) -> int:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def peer(cert: CertFiles, *faults: Fault, **kw: object) -> PeerConfig:
    return PeerConfig(cert=cert.cert, key=cert.key, faults=frozenset(faults), **kw)  # type: ignore[arg-type]


def path(result: ProbeResult, which: Path):  # type: ignore[no-untyped-def]
    return next(p for p in result.paths if p.path is which)


def deadline_held(result: ProbeResult, timeout: float = TIMEOUT) -> None:
    assert result.total_ms <= timeout * 1000 + SLACK_MS, result.total_ms


# The only cleartext a probe sends: the STARTTLS dummy and the DDR question (RFC 9462), both
# naming nothing of the user's.
DUMMIES = {"STARTTLS./CH/TXT", "_dns.resolver.arpa./IN/SVCB"}


def cleartext(peer_: Peer) -> Iterable[str]:
    return [f"{s.qname}/{s.qclass}/{s.qtype}" for s in peer_.seen if s.via in ("udp", "tcp")]


# -- healthy servers -------------------------------------------------------------------------


def test_port_853_healthy(certs: Certs) -> None:
    r, p = probe_peer(peer(certs.good, udp_to=True))
    assert r.method is Method.TLS_PORT and r.acceptable
    assert r.auth is Auth.NONE  # opportunistic: not authenticated, but pinned
    assert r.tls is not None and r.tls.pin == certs.good.pin
    assert r.tls.version in ("TLSv1.2", "TLSv1.3")
    assert r.tls.alpn == "dot"
    t = r.timings
    assert t.connect_ms is not None and t.handshake_ms is not None and t.answer_ms is not None
    assert 0 < t.connect_ms <= t.handshake_ms <= t.answer_ms
    assert r.resumption is True
    assert r.udp_to_hint is True
    assert path(r, Path.PORT).rcode == "NOERROR"
    assert not r.failures
    # the real query went inside TLS, padded; cleartext carried only the dummy
    assert any(s.via == "tls-port" and s.qname == "." and s.padded for s in p.seen)
    assert set(cleartext(p)) <= DUMMIES
    deadline_held(r)


def test_udp_hint_off_when_server_does_not_advertise(certs: Certs) -> None:
    r, _ = probe_peer(peer(certs.good))
    assert r.udp_to_hint is False


def test_ipv6(certs: Certs) -> None:
    r, _ = probe_peer(peer(certs.good), strict(ca_file=str(certs.ca.path)), host="::1")
    assert r.address == "::1"
    assert r.method is Method.TLS_PORT and r.auth is Auth.IP_SAN


def test_upgrade_when_853_refused(certs: Certs) -> None:
    r, p = probe_peer(peer(certs.good), tls_closed=True)
    assert r.method is Method.TLS_UPGRADE and r.acceptable
    port, upgrade = path(r, Path.PORT), path(r, Path.UPGRADE)
    assert port.failure is Failure.REFUSED
    assert upgrade.to_in_response is True
    assert upgrade.timings.starttls_ms is not None
    # refused at once: the upgrade starts without waiting for the fallback delay
    assert upgrade.started_ms < 200
    assert r.resumption is True  # resumed over a second upgrade
    assert [s.via for s in p.seen if s.qname == "."] == ["tls-upgrade", "tls-upgrade"]
    assert set(cleartext(p)) == DUMMIES


def test_upgrade_first_order(certs: Certs) -> None:
    r, _ = probe_peer(peer(certs.good), order=Order.UPGRADE_FIRST)
    assert r.method is Method.TLS_UPGRADE
    assert path(r, Path.UPGRADE).started_ms < 50
    # the upgrade connected in time, so port 853 was never tried
    assert Path.PORT not in {o.path for o in r.paths}


def test_no_upgrade_and_no_853_is_tcp_plain(certs: Certs) -> None:
    r, _ = probe_peer(peer(certs.good, upgrade=False), tls_closed=True)
    assert r.method is Method.TCP_PLAIN and not r.acceptable
    assert path(r, Path.UPGRADE).failure is Failure.NO_UPGRADE
    assert path(r, Path.UPGRADE).to_in_response is False
    assert r.tls is None and r.auth is None and r.resumption is None


def test_nothing_listening_is_unreachable() -> None:
    async def go() -> ProbeResult:
        port = _closed_port("127.0.0.1")
        s = ProbeSettings(tls_port=port, dns_port=port, timeout=TIMEOUT)
        return await probe("127.0.0.1", s)

    r = run(go())
    assert r.method is Method.UNREACHABLE and not r.acceptable
    assert set(r.failures) == {"port", "upgrade", "udp"}
    assert r.failures["port"].startswith("refused: connect 127.0.0.1 port")
    assert path(r, Path.PORT).failure is Failure.REFUSED
    assert path(r, Path.UPGRADE).failure is Failure.REFUSED
    assert path(r, Path.UDP).failure is Failure.REFUSED  # ICMP port unreachable
    assert r.total_ms < 500  # refusals are immediate: nothing waits for a timeout


# -- authentication ----------------------------------------------------------------------------


def test_strict_ip_san(certs: Certs) -> None:
    r, _ = probe_peer(peer(certs.good), strict(ca_file=str(certs.ca.path)))
    assert r.method is Method.TLS_PORT and r.acceptable and r.auth is Auth.IP_SAN


def test_strict_name(certs: Certs) -> None:
    r, _ = probe_peer(peer(certs.no_ip), strict(ca_file=str(certs.ca.path), auth_name="dns.test"))
    assert r.acceptable and r.auth is Auth.NAME


def test_strict_without_ip_or_name_rejects(certs: Certs) -> None:
    r, p = probe_peer(peer(certs.no_ip), strict(ca_file=str(certs.ca.path)))
    assert not r.acceptable
    port = path(r, Path.PORT)
    assert port.failure is Failure.CERT_NOT_AUTHENTICATED
    assert "does not name 127.0.0.1" in port.detail
    assert not [s for s in p.seen if s.via.startswith("tls")]  # no query sent to it


def test_strict_configured_name_rejects_a_certificate_for_the_address(certs: Certs) -> None:
    """The rogue DHCP server: the certificate names the address it handed out (and a
    name of its choosing), but not the configured name: rejected, nothing sent in TLS."""
    spec = strict(ca_file=str(certs.ca.path), auth_name="resolver.example")
    r, p = probe_peer(peer(certs.good), spec)
    assert not r.acceptable and r.auth is None and r.auth_source is None
    for which in (Path.PORT, Path.UPGRADE):
        o = path(r, which)
        assert o.failure is Failure.CERT_NOT_AUTHENTICATED
        assert "does not name resolver.example, the configured name" in o.detail
    assert not [s for s in p.seen if s.via.startswith("tls")]


def _strict_link(certs: Certs, auth_name: str | None = None) -> LinkSettings:
    return dataclasses.replace(
        LinkSettings(),
        profile=ConfigProfile.STRICT,
        ca_file=str(certs.ca.path),
        auth_name=auth_name,
    )


def test_a_network_name_does_not_replace_the_configured_one(certs: Certs) -> None:
    """NetworkManager says 127.0.0.1#dns.test, which the certificate carries; the
    configuration says resolver.example, which it does not: configuration wins."""
    s = _strict_link(certs, auth_name="resolver.example")
    spec = policy.auth_spec(Profile.STRICT, s, NetResolver.parse("127.0.0.1#dns.test"))
    assert spec.auth_name == "resolver.example" and spec.name_source is AuthSource.CONFIGURED
    r, _ = probe_peer(peer(certs.good), spec)
    assert not r.acceptable
    assert path(r, Path.PORT).failure is Failure.CERT_NOT_AUTHENTICATED


class _NoTunnel:
    def set_upstreams(self, specs: Sequence[UpstreamSpec], **kw: Any) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {}

    def flush_cache(self, why: str) -> int:
        return 0


def test_nothing_configured_the_address_authenticates_and_status_says_network(
    certs: Certs, tmp_path: FsPath
) -> None:
    """Probe as the daemon would (policy's settings for a resolver NetworkManager handed
    out), learn, and report: ip-san, from the network."""
    s = _strict_link(certs)
    resolver = NetResolver.parse("127.0.0.1")
    spec = policy.auth_spec(Profile.STRICT, s, resolver)
    assert spec.address_source is AuthSource.NETWORK
    r, _ = probe_peer(peer(certs.good), spec)
    assert r.acceptable and r.auth is Auth.IP_SAN and r.auth_source is AuthSource.NETWORK
    ln = Link("eth0", resolvers=(resolver,), connection_uuid="u-1")
    k = policy.learn(None, r, network=ln.network_id, now=1.0, negative_cache=60)
    engine = Engine(Config(defaults=s), _NoTunnel(), Store(tmp_path))
    engine.state.remember(k)
    engine.links.replace(Source.NM, {"eth0": ln})
    (res,) = engine.status()["interfaces"][0]["resolvers"]
    assert (res["auth"], res["auth_source"]) == ("ip-san", "network")
    # a static resolver's address is configured
    static = policy.auth_spec(
        Profile.STRICT,
        dataclasses.replace(s, static_resolvers=(UpstreamSpec.parse("127.0.0.1"),)),
        resolver,
    )
    r2, _ = probe_peer(peer(certs.good), static)
    assert r2.auth is Auth.IP_SAN and r2.auth_source is AuthSource.CONFIGURED


def test_strict_pin(certs: Certs) -> None:
    r, _ = probe_peer(peer(certs.self_signed), strict(pins=frozenset({certs.self_signed.pin})))
    assert r.acceptable and r.auth is Auth.PIN


def test_strict_pin_mismatch_sends_no_query(certs: Certs) -> None:
    r, p = probe_peer(peer(certs.good), strict(pins=frozenset({certs.expired.pin})))
    assert r.method is not Method.TLS_PORT and not r.acceptable
    for which in (Path.PORT, Path.UPGRADE):
        o = path(r, which)
        assert o.failure is Failure.CERT_NOT_AUTHENTICATED
        assert o.tls is not None and o.tls.pin == certs.good.pin  # what it showed is recorded
    assert not [s for s in p.seen if s.via.startswith("tls")]
    assert set(cleartext(p)) == DUMMIES  # strict: the dummy and the DDR question only
    deadline_held(r)


@pytest.mark.parametrize(
    ("which", "reason"),
    [
        ("wrong_ca", "certificate verification failed"),
        ("expired", "expired"),
        ("self_signed", "self-signed"),
    ],
)
def test_bad_certificates_strict_rejects_opportunistic_accepts(
    certs: Certs, which: str, reason: str
) -> None:
    cert: CertFiles = getattr(certs, which)
    r, _ = probe_peer(peer(cert), strict(ca_file=str(certs.ca.path)))
    assert not r.acceptable
    port = path(r, Path.PORT)
    assert port.failure is Failure.CERT_NOT_AUTHENTICATED
    assert reason in port.detail
    r2, _ = probe_peer(peer(cert), opportunistic())
    assert r2.acceptable and r2.method is Method.TLS_PORT and r2.auth is Auth.NONE
    assert r2.tls is not None and r2.tls.pin == cert.pin


def test_opportunistic_reports_matching_pin(certs: Certs) -> None:
    r, _ = probe_peer(peer(certs.good), opportunistic(pins=frozenset({certs.good.pin})))
    assert r.auth is Auth.PIN


# -- faults: middleboxes and broken servers ----------------------------------------------------


def test_blackholed_853_costs_the_fallback_delay_not_the_timeout(certs: Certs) -> None:
    r, _ = probe_peer(peer(certs.good, Fault.BLACKHOLE_TLS), connect_timeout=1.2)
    assert r.method is Method.TLS_UPGRADE and r.acceptable
    port, upgrade = path(r, Path.PORT), path(r, Path.UPGRADE)
    assert port.failure is Failure.ABANDONED and port.timings.connect_ms is None
    assert 240 <= upgrade.started_ms < 400  # started by the fallback delay (0.25 s)
    assert r.decided_ms < 1200 / 2  # a fraction of the connect timeout


def test_blackholed_853_without_upgrade_times_out_within_deadline(certs: Certs) -> None:
    r, _ = probe_peer(peer(certs.good, Fault.BLACKHOLE_TLS, upgrade=False))
    assert r.method is Method.TCP_PLAIN
    assert path(r, Path.PORT).failure is Failure.TIMEOUT
    deadline_held(r)


@pytest.mark.parametrize("profile", [Profile.OPPORTUNISTIC, Profile.STRICT])
def test_853_stalled_after_accept_costs_the_fallback_delay(certs: Certs, profile: Profile) -> None:
    """A middlebox that accepts TCP on 853 and never answers the ClientHello: connected is
    not enough, the upgrade starts when 853 has not finished its handshake in time."""
    auth, expected = opportunistic(), Auth.NONE
    if profile is Profile.STRICT:
        auth, expected = strict(ca_file=str(certs.ca.path)), Auth.IP_SAN
    r, p = probe_peer(peer(certs.good, Fault.STALL_TLS), auth)
    assert r.method is Method.TLS_UPGRADE and r.acceptable
    assert r.auth is expected
    port, upgrade = path(r, Path.PORT), path(r, Path.UPGRADE)
    assert port.failure is Failure.ABANDONED
    assert port.detail == "connected, another path succeeded first"
    assert port.timings.connect_ms is not None and port.timings.handshake_ms is None
    assert port.tls is None
    assert 240 <= upgrade.started_ms < 400  # started by the fallback delay (0.25 s)
    assert upgrade.failure is None and upgrade.timings.handshake_ms is not None
    assert r.decided_ms < TIMEOUT * 1000 / 2  # well within the deadline
    assert r.resumption is True  # checked over the upgrade, the path that worked
    assert p.handshakes == 2  # both on the upgrade: 853 never got a ServerHello out
    assert set(cleartext(p)) == DUMMIES
    deadline_held(r)


def test_853_stalled_without_upgrade_times_out_within_deadline(certs: Certs) -> None:
    r, _ = probe_peer(peer(certs.good, Fault.STALL_TLS, upgrade=False))
    assert r.method is Method.TCP_PLAIN and not r.acceptable
    port = path(r, Path.PORT)
    assert port.failure is Failure.TIMEOUT and port.timings.connect_ms is not None
    assert path(r, Path.UPGRADE).started_ms < 400  # not held back until the deadline
    deadline_held(r)


def test_no_answer_to_to_query(certs: Certs) -> None:
    r, _ = probe_peer(peer(certs.good, Fault.NO_TO_ANSWER), tls_closed=True)
    assert r.method is Method.UDP_PLAIN and not r.acceptable
    assert path(r, Path.UPGRADE).failure is Failure.TO_NO_ANSWER
    deadline_held(r)


def test_to_stripped(certs: Certs) -> None:
    r, _ = probe_peer(peer(certs.good, Fault.STRIP_TO), tls_closed=True)
    assert r.method is Method.TCP_PLAIN
    assert path(r, Path.UPGRADE).failure is Failure.NO_UPGRADE


@pytest.mark.parametrize(
    ("fault", "detail"),
    [(Fault.RESET_AFTER_TO, "reset"), (Fault.GARBAGE_AFTER_TO, "wrong version number")],
)
def test_to_answered_then_handshake_fails(certs: Certs, fault: Fault, detail: str) -> None:
    r, _ = probe_peer(peer(certs.good, fault), tls_closed=True)
    assert r.method is Method.UDP_PLAIN and not r.acceptable
    upgrade = path(r, Path.UPGRADE)
    assert upgrade.failure is Failure.TO_HANDSHAKE_FAILED
    assert upgrade.to_in_response is True
    assert detail in upgrade.detail
    deadline_held(r)


def test_reset_connections(certs: Certs) -> None:
    r, _ = probe_peer(peer(certs.good, Fault.RESET))
    assert r.method is Method.UDP_PLAIN and not r.acceptable
    port, upgrade = path(r, Path.PORT), path(r, Path.UPGRADE)
    assert port.failure is Failure.RESET
    assert port.timings.connect_ms is not None  # it was the handshake that got reset
    assert upgrade.failure is Failure.RESET
    deadline_held(r)


def test_slow_server_times_out_within_deadline(certs: Certs) -> None:
    r, _ = probe_peer(peer(certs.good, Fault.SLOW, delay=5.0))
    assert r.method is Method.UNREACHABLE
    assert path(r, Path.PORT).failure is Failure.TIMEOUT
    assert "no answer to the probe query inside TLS" in path(r, Path.PORT).detail
    # the port path connected at once, so the upgrade waited for it, and ran out of time
    assert path(r, Path.UPGRADE).failure is Failure.TIMEOUT
    assert "deadline had passed" in path(r, Path.UPGRADE).detail
    assert path(r, Path.UDP).failure is Failure.TIMEOUT
    deadline_held(r)


def test_truncated_answers(certs: Certs) -> None:
    r, _ = probe_peer(peer(certs.good, Fault.TRUNCATED))
    assert r.method is Method.UNREACHABLE
    assert path(r, Path.PORT).failure is Failure.CLOSED
    assert path(r, Path.UPGRADE).failure is Failure.CLOSED
    assert path(r, Path.UDP).failure is Failure.MALFORMED_RESPONSE
    deadline_held(r)


def test_mismatched_answers(certs: Certs) -> None:
    r, _ = probe_peer(peer(certs.good, Fault.MISMATCHED))
    assert r.method is Method.UNREACHABLE
    assert path(r, Path.PORT).failure is Failure.MISMATCHED_RESPONSE
    assert path(r, Path.UPGRADE).failure is Failure.MISMATCHED_RESPONSE
    assert path(r, Path.UDP).failure is Failure.MISMATCHED_RESPONSE
    deadline_held(r)


def _one_shot_server(reply: bytes):  # type: ignore[no-untyped-def]
    """A TCP server that answers whatever arrives first with `reply`, then closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65535)
        writer.write(reply)
        await writer.drain()
        writer.close()

    return asyncio.start_server(handle, "127.0.0.1", 0)


def test_not_tls_on_853() -> None:
    """Something that is not TLS where TLS is expected: the handshake fails with a reason."""

    async def go() -> ProbeResult:
        server = await _one_shot_server(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        async with server:
            port = server.sockets[0].getsockname()[1]
            s = ProbeSettings(tls_port=port, dns_port=port, timeout=TIMEOUT)
            return await probe("127.0.0.1", s)

    r = run(go())
    port = path(r, Path.PORT)
    assert port.failure is Failure.TLS_HANDSHAKE_FAILED
    assert port.detail.startswith("TLS handshake failed")
    deadline_held(r)


def test_cleartext_injected_after_to_answer_is_refused(certs: Certs) -> None:
    """Bytes that arrive with the TO answer, before our ClientHello, are not fed to TLS."""

    async def go() -> ProbeResult:
        q = starttls_query()
        answer = dns.message.make_response(q)
        answer.use_edns(0, TO_FLAG, 1232)
        # the reply must carry the ID of the query it answers: patched in per connection

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read(65535)
            got = dns.message.from_wire(data[2:])
            answer.id = got.id
            writer.write(frame(answer.to_wire()) + b"\x16\x03\x01injected")
            await writer.drain()
            await reader.read(65535)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            s = ProbeSettings(tls_port=_closed_port("127.0.0.1"), dns_port=port, timeout=TIMEOUT)
            return await probe("127.0.0.1", s)

    r = run(go())
    upgrade = path(r, Path.UPGRADE)
    assert upgrade.failure is Failure.TO_HANDSHAKE_FAILED
    assert "unexpected cleartext" in upgrade.detail


def test_cancelling_a_probe_leaves_nothing_behind(certs: Certs) -> None:
    async def go() -> int:
        async with Peer(peer(certs.good, Fault.SLOW, delay=5.0)) as p:
            s = ProbeSettings(tls_port=p.tls_port or 0, dns_port=p.dns_port, timeout=3)
            task = asyncio.create_task(probe("127.0.0.1", s))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0)
            return len([t for t in asyncio.all_tasks() if "probe" in t.get_name()])

    assert run(go()) == 0
