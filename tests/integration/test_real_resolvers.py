"""The prober against real DNS-over-TLS resolvers on loopback: unbound and knot-resolver."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.model import Auth, AuthSpec, Failure, Method, Order, ProbeResult, ProbeSettings, Profile
from agent.model import Path as ProbePath
from agent.probe import probe
from tests.conftest import Certs, require_program, run
from tests.lab.certs import CertFiles
from tests.lab.kresd import Kresd
from tests.lab.unbound import Unbound, UnboundConfig

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Resolver:
    name: str
    dns_port: int
    tls_port: int
    cert: CertFiles


@pytest.fixture(params=["unbound", "kresd"])
def resolver(request: pytest.FixtureRequest, certs: Certs, tmp_path: Path) -> Iterator[Resolver]:
    name: str = request.param
    require_program(name)
    dns_port, tls_port = free_port(), free_port()
    if name == "unbound":
        cfg = UnboundConfig("127.0.0.1", dns_port, tls_port, certs.good.cert, certs.good.key)
        server: Unbound | Kresd = Unbound.start(cfg, tmp_path / name)
    else:
        server = Kresd.start(
            "127.0.0.1",
            dns_port,
            tls_port,
            cert=certs.good.cert,
            key=certs.good.key,
            directory=tmp_path / name,
        )
    try:
        yield Resolver(name, dns_port, tls_port, certs.good)
    finally:
        server.stop()


def probe_it(r: Resolver, auth: AuthSpec, **kw: object) -> ProbeResult:
    s = ProbeSettings(auth=auth, dns_port=r.dns_port, tls_port=r.tls_port, timeout=3, **kw)  # type: ignore[arg-type]
    return run(probe("127.0.0.1", s))


def test_strict_ip_san(resolver: Resolver, certs: Certs) -> None:
    r = probe_it(resolver, AuthSpec(Profile.STRICT, ca_file=str(certs.ca.path)))
    assert r.method is Method.TLS_PORT and r.acceptable
    assert r.auth is Auth.IP_SAN
    assert r.tls is not None and r.tls.pin == resolver.cert.pin
    assert r.resumption is True


def test_wrong_ca_strict_rejects_opportunistic_accepts(resolver: Resolver, certs: Certs) -> None:
    r = probe_it(resolver, AuthSpec(Profile.STRICT, ca_file=str(certs.other_ca.path)))
    assert not r.acceptable
    port = next(p for p in r.paths if p.path is ProbePath.PORT)
    assert port.failure is Failure.CERT_NOT_AUTHENTICATED
    r2 = probe_it(resolver, AuthSpec(Profile.OPPORTUNISTIC))
    assert r2.acceptable and r2.method is Method.TLS_PORT and r2.auth is Auth.NONE


def test_upgrade_first_then_port(resolver: Resolver, certs: Certs) -> None:
    """Neither real resolver upgrades: TO comes back clear, and the port path is tried next."""
    r = probe_it(resolver, AuthSpec(Profile.OPPORTUNISTIC), order=Order.UPGRADE_FIRST)
    assert r.method is Method.TLS_PORT
    paths = {p.path: p for p in r.paths}
    assert paths[ProbePath.UPGRADE].failure is Failure.NO_UPGRADE
    assert paths[ProbePath.UPGRADE].to_in_response is False
    starttls_done = paths[ProbePath.UPGRADE].timings.starttls_ms
    assert starttls_done is not None
    assert paths[ProbePath.PORT].started_ms >= starttls_done
