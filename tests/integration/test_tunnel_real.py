"""The tunnel, run as the real command, between real clients (dig, kdig, dnsperf) and real
DNS-over-TLS resolvers (unbound, knot-resolver) on loopback."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Certs, require_program
from tests.lab.kresd import Kresd
from tests.lab.tunnel import TunnelProcess
from tests.lab.unbound import WWW_A, Unbound, UnboundConfig

pytestmark = pytest.mark.integration

BIG_TXT = " ".join(['"' + "z" * 250 + '"'] * 8)  # ~2 kB: more than a 1232-byte UDP answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Setup:
    tunnel: TunnelProcess
    resolver: str


@pytest.fixture(params=["unbound", "kresd"])
def setup(request: pytest.FixtureRequest, certs: Certs, tmp_path: Path) -> Iterator[Setup]:
    yield from _setup(request.param, certs, tmp_path)


@pytest.fixture
def unbound_setup(certs: Certs, tmp_path: Path) -> Iterator[Setup]:
    yield from _setup("unbound", certs, tmp_path)


def _setup(name: str, certs: Certs, tmp_path: Path) -> Iterator[Setup]:
    require_program(name)
    dns_port, tls_port = free_port(), free_port()
    cert = certs.good
    if name == "unbound":
        quoted = BIG_TXT.replace('"', '\\"')
        extra = f'    local-data: "big.lab.test. 0 IN TXT {quoted}"'
        cfg = UnboundConfig("127.0.0.1", dns_port, tls_port, cert.cert, cert.key, extra=extra)
        server: Unbound | Kresd = Unbound.start(cfg, tmp_path / name)
    else:
        server = Kresd.start(
            "127.0.0.1", dns_port, tls_port, cert=cert.cert, key=cert.key, directory=tmp_path / name
        )
    port = free_port()
    try:
        tunnel = TunnelProcess.start(
            [
                "--upstream",
                f"127.0.0.1@{tls_port}#dns.test",
                "--profile",
                "strict",
                "--ca-file",
                str(certs.ca.path),
                "--idle-timeout",
                "0.5",
            ],
            tmp_path / "tunnel.log",
            host="127.0.0.1",
            port=port,
        )
        try:
            yield Setup(tunnel, name)
        finally:
            tunnel.stop()
    finally:
        server.stop()


def dig(s: Setup, *args: str) -> str:
    digp = require_program("dig")
    out = subprocess.run(
        [digp, "@127.0.0.1", "-p", str(s.tunnel.port), "+time=3", "+tries=1", *args],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    return out.stdout


def test_dig_and_kdig_udp_and_tcp(setup: Setup) -> None:
    assert dig(setup, "+short", "www.lab.test", "A").split() == [WWW_A]
    assert dig(setup, "+short", "+tcp", "www.lab.test", "A").split() == [WWW_A]
    assert "status: NXDOMAIN" in dig(setup, "nothere.lab.test", "A")
    kdig = require_program("kdig")
    for extra in ([], ["+tcp"]):
        out = subprocess.run(
            [kdig, "@127.0.0.1", "-p", str(setup.tunnel.port), "+short", *extra, "www.lab.test"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        ).stdout
        assert out.split() == [WWW_A]
    stats = setup.tunnel.statistics()
    up = stats["upstreams"][0]
    assert up["connections"] == 1 and up["failures"] == 0  # one TLS connection for all of it
    assert stats["mode"] == "private"


def test_truncation_then_tcp_retry_with_dig(unbound_setup: Setup) -> None:
    setup = unbound_setup
    head = dig(setup, "+ignore", "+bufsize=1232", "big.lab.test", "TXT")
    assert re.search(r"flags:[^;]*\btc\b", head), head  # UDP answer too big: TC=1
    full = dig(setup, "+bufsize=1232", "big.lab.test", "TXT")  # dig retries over TCP
    assert "z" * 250 in full and not re.search(r"flags:[^;]*\btc\b", full)


def test_idle_close_then_resumption(setup: Setup) -> None:
    assert dig(setup, "+short", "www.lab.test").split() == [WWW_A]
    time.sleep(1.0)  # past --idle-timeout 0.5
    before = setup.tunnel.statistics()["upstreams"][0]
    assert before["state"] == "idle"
    assert dig(setup, "+short", "www.lab.test").split() == [WWW_A]
    after = setup.tunnel.statistics()["upstreams"][0]
    assert after["connections"] == 2
    assert after["resumptions"] == 1, after


def test_dnsperf_bounded_load_loses_nothing(setup: Setup, tmp_path: Path) -> None:
    dnsperf = require_program("dnsperf")
    queries = tmp_path / "queries"
    queries.write_text("".join(f"www.lab.test A\nnx{i}.lab.test A\n" for i in range(500)))
    out = subprocess.run(
        [
            dnsperf,
            "-s",
            "127.0.0.1",
            "-p",
            str(setup.tunnel.port),
            "-d",
            str(queries),
            "-n",
            "2",
            "-c",
            "4",
            "-q",
            "100",
            "-t",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    sent = int(re.search(r"Queries sent:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    lost = int(re.search(r"Queries lost:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    assert sent == 2000 and lost == 0, out
    stats = setup.tunnel.statistics()
    assert stats["clients"]["servfail"] == 0
    assert stats["upstreams"][0]["connections"] <= 2  # reused, not one per query


@pytest.fixture
def udp_setup(certs: Certs, tmp_path: Path) -> Iterator[Setup]:
    """The tunnel with a plain UDP upstream (the captive-portal exception) to unbound, which
    truncates UDP answers past 1232 bytes (DNS flag day 2020), whatever the client offers."""
    require_program("unbound")
    dns_port, tls_port = free_port(), free_port()
    quoted = BIG_TXT.replace('"', '\\"')
    extra = f'    local-data: "big.lab.test. 0 IN TXT {quoted}"\n    max-udp-size: 1232'
    cfg = UnboundConfig(
        "127.0.0.1", dns_port, tls_port, certs.good.cert, certs.good.key, extra=extra
    )
    server = Unbound.start(cfg, tmp_path / "unbound")
    try:
        tunnel = TunnelProcess.start(
            ["--upstream", f"udp:127.0.0.1@{dns_port}", "--profile", "opportunistic"],
            tmp_path / "tunnel.log",
            host="127.0.0.1",
            port=free_port(),
        )
        try:
            yield Setup(tunnel, "unbound")
        finally:
            tunnel.stop()
    finally:
        server.stop()


def test_udp_upstream_truncated_answers_come_whole_over_tcp(udp_setup: Setup) -> None:
    setup = udp_setup
    tc = re.compile(r"flags:[^;]*\btc\b")
    full = dig(setup, "+tcp", "big.lab.test", "TXT")  # the client over TCP: the whole answer
    assert "z" * 250 in full and not tc.search(full), full
    roomy = dig(setup, "+ignore", "+bufsize=4096", "big.lab.test", "TXT")  # UDP, room for it
    assert "z" * 250 in roomy and not tc.search(roomy), roomy
    small = dig(setup, "+ignore", "+bufsize=1232", "big.lab.test", "TXT")  # UDP, no room
    assert tc.search(small) and "z" * 250 not in small, small
    assert dig(setup, "+short", "www.lab.test", "A").split() == [WWW_A]
    stats = setup.tunnel.statistics()
    up = stats["upstreams"][0]
    assert up["upstream"].startswith("udp-plain:")
    assert up["tc_retries"] == 3 and up["tc_retry_failures"] == 0, up
    assert up["answers"] == 4 and up["retransmits"] == 0, up
    assert stats["clients"]["truncated"] == 1 and stats["clients"]["servfail"] == 0
    assert stats["mode"] == "cleartext"
