"""agent/cli/: argument errors, table and JSON output, exit status (against a peer process)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import cli
from agent.cli import EXIT_NOT_PRIVATE, EXIT_OK, EXIT_USAGE, main
from tests.conftest import Certs
from tests.lab.netns import REPO
from tests.lab.peer import spawn


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["probe", "resolver.example"], "'resolver.example' is not an IP address"),
        (["probe", "127.0.0.1", "--pin", "abc"], "pin 'abc'"),
        (["probe", "127.0.0.1", "--timeout", "0"], "must be > 0"),
        (["probe", "127.0.0.1", "--ca-file", "/nonexistent/ca.pem"], "cannot read file"),
        (["probe", "127.0.0.1", "--profile", "paranoid"], "invalid choice: 'paranoid'"),
        (["probe"], "the following arguments are required: IP"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_argument_errors_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1, err


@pytest.fixture
def peer_ports(certs: Certs, tmp_path: Path) -> Iterator[dict[str, int]]:
    proc, ports = spawn(
        tmp_path / "peer.log", "--cert", str(certs.good.cert), "--key", str(certs.good.key)
    )
    try:
        yield ports
    finally:
        proc.stop()


def _ports(ports: dict[str, int]) -> list[str]:
    return ["--tls-port", str(ports["tls_port"]), "--dns-port", str(ports["dns_port"])]


def test_json_output_and_success(
    peer_ports: dict[str, int], certs: Certs, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "probe",
        "127.0.0.1",
        "::1",
        "--json",
        "--profile",
        "strict",
        "--ca-file",
        str(certs.ca.path),
    ]
    rc = main([*argv, *_ports(peer_ports)])
    out = json.loads(capsys.readouterr().out)
    assert rc == EXIT_NOT_PRIVATE  # one of the two has no private path
    assert [r["address"] for r in out] == ["127.0.0.1", "::1"]
    ok, unreachable = out  # the peer listens on 127.0.0.1 only
    assert ok["method"] == "tls-port" and ok["auth"] == "ip-san" and ok["acceptable"] is True
    assert ok["tls"]["pin"] == certs.good.pin
    assert unreachable["method"] == "unreachable" and unreachable["acceptable"] is False
    assert main([*argv[:2], *argv[3:], *_ports(peer_ports)]) == EXIT_OK


def test_strict_failure_exit_status_and_table(
    peer_ports: dict[str, int], certs: Certs, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "probe",
            "127.0.0.1",
            "--profile",
            "strict",
            "--pin",
            certs.expired.pin,
            *_ports(peer_ports),
        ]
    )
    out = capsys.readouterr().out
    assert rc == EXIT_NOT_PRIVATE
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["RESOLVER", "METHOD", "AUTH"]
    assert lines[1].split()[0] == "127.0.0.1"
    assert "cert-not-authenticated: pin" in out
    assert "no private path acceptable under the strict profile" in out


def test_python_dash_m_agent_is_the_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("dnstls-agent ")


def test_status_text_shows_search_stub_trouble_and_udp_counters() -> None:
    st = {
        "profile": "opportunistic",
        "reason": "portal",
        "order": ["udp-plain:198.51.100.1@53"],
        "search": ["lab.example"],
        "stub": {"error": "resolvconf -a failed"},
        "tunnel": {
            "mode": "cleartext",
            "listen": ["127.0.0.153:53"],
            "upstreams": [
                {
                    "upstream": "udp-plain:198.51.100.1@53",
                    "state": "up",
                    "queries": 9,
                    "failures": 0,
                    "resumptions": 0,
                    "p50_ms": 1.5,
                    "retransmits": 2,
                    "tc_retries": 1,
                },
            ],
        },
    }
    text = cli.format_status(st)
    assert "search domains: lab.example" in text
    assert "WARNING system stub: the last refresh failed: resolvconf -a failed" in text
    assert "2 resent, 1 truncated asked again over TCP" in text
    quiet = cli.format_status({**st, "search": [], "stub": {"error": None}})
    assert "search domains: none" in quiet and "WARNING" not in quiet
