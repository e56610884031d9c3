"""DDR (RFC 9462) against a real unbound on loopback: it answers `_dns.resolver.arpa` SVCB
from local-data and serves DNS over TLS on a port other than 853, named only there.

Debian 12's unbound (1.17) takes SVCB records in local-data in their presentation form
(`SVCB 1 dns.test. alpn=dot port=N ipv4hint=...`), so the generic `TYPE64 \\# ...` form is
not needed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.ddr import discover
from agent.model import (
    Auth,
    AuthSource,
    AuthSpec,
    DdrResult,
    Method,
    ProbeResult,
    ProbeSettings,
    Profile,
)
from agent.probe import probe
from tests.conftest import Certs, require_program, run
from tests.lab.unbound import Unbound, UnboundConfig

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
ADN = "dns.test"  # certs.good names dns.test and carries 127.0.0.1 and ::1


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    dns_port: int
    tls_port: int  # where unbound speaks DoT, as its SVCB record says


def start(certs: Certs, directory: Path, record: str, *more: str) -> Iterator[Server]:
    require_program("unbound")
    dns_port, tls_port = free_port(), free_port()
    lines = [
        '    local-zone: "resolver.arpa." static',
        f'    local-data: "_dns.resolver.arpa. 300 IN SVCB {record.format(port=tls_port)}"',
        *(f'    local-data: "{m}"' for m in more),
    ]
    cfg = UnboundConfig(
        HOST, dns_port, tls_port, certs.good.cert, certs.good.key, extra="\n".join(lines)
    )
    server = Unbound.start(cfg, directory)
    try:
        yield Server(dns_port, tls_port)
    finally:
        server.stop()


@pytest.fixture
def unbound(certs: Certs, tmp_path: Path) -> Iterator[Server]:
    yield from start(
        certs, tmp_path / "unbound", f"1 {ADN}. alpn=dot port={{port}} ipv4hint={HOST}"
    )


@pytest.fixture
def unbound_no_hints(certs: Certs, tmp_path: Path) -> Iterator[Server]:
    """No address hints in the record: the client asks unbound for the name's A and AAAA."""
    yield from start(
        certs,
        tmp_path / "unbound",
        f"1 {ADN}. alpn=dot port={{port}}",
        f"{ADN}. 300 IN A {HOST}",
    )


def settings(server: Server, certs: Certs, profile: Profile = Profile.STRICT) -> ProbeSettings:
    """The usual TLS port is one where nothing listens: DoT is only where DDR says."""
    return ProbeSettings(
        auth=AuthSpec(profile, ca_file=str(certs.ca.path)),
        dns_port=server.dns_port,
        tls_port=free_port(),
        timeout=3,
    )


def ddr(server: Server, certs: Certs) -> DdrResult:
    async def go() -> DdrResult:
        s = settings(server, certs)
        return await discover(HOST, s, asyncio.get_running_loop().time() + s.timeout)

    return run(go())


def test_discover_finds_unbound_designation(unbound: Server, certs: Certs) -> None:
    result = ddr(unbound, certs)
    assert result.asked and not result.failure, result
    assert len(result.designations) == 1, result
    d = result.designations[0]
    assert (d.address, d.port, d.adn, d.priority) == (HOST, unbound.tls_port, ADN, 1)
    assert d.verified and d.usable, d


def test_discover_asks_for_the_address_without_hints(
    unbound_no_hints: Server, certs: Certs
) -> None:
    result = ddr(unbound_no_hints, certs)
    assert [(d.address, d.port, d.verified) for d in result.designations] == [
        (HOST, unbound_no_hints.tls_port, True)
    ], result


@pytest.mark.parametrize("profile", [Profile.STRICT, Profile.OPPORTUNISTIC])
def test_probe_private_on_the_designated_port(
    unbound: Server, certs: Certs, profile: Profile
) -> None:
    r: ProbeResult = run(probe(HOST, settings(unbound, certs, profile)))
    assert r.method is Method.TLS_PORT and r.acceptable, r.failures
    assert r.tls_port == unbound.tls_port
    assert r.ddr is not None and r.ddr.usable
    if profile is Profile.STRICT:
        assert r.auth is Auth.NAME and r.auth_source is AuthSource.NETWORK
    assert r.tls is not None and r.tls.pin == certs.good.pin


def test_probe_without_ddr_finds_nothing_private(unbound: Server, certs: Certs) -> None:
    """The control: unbound does not upgrade, and the usual port is closed."""
    s = settings(unbound, certs)
    r = run(probe(HOST, dataclasses.replace(s, ddr=False)))
    assert not r.acceptable and r.tls_port is None and r.ddr is None
