"""The prober across a real link: two namespaces, a real nftables firewall, real unbound.

Needs root (network namespaces); runs in CI. Addresses are documentation ranges only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Certs, require_program, require_root
from tests.lab.netns import SRV_IP6S, SRV_IPS, Lab
from tests.lab.peer import spawn
from tests.lab.unbound import Unbound, UnboundConfig

pytestmark = pytest.mark.system

PEER, UNBOUND = SRV_IPS
CONNECT_TIMEOUT = 3.0


@pytest.fixture
def lab(certs: Certs, tmp_path: Path) -> Iterator[Lab]:
    require_root()
    for program in ("ip", "nft", "unbound"):
        require_program(program)
    with Lab() as lab:
        assert lab.srv is not None
        spawn(
            tmp_path / "peer.log",
            "--host",
            PEER,
            "--dns-port",
            "53",
            "--tls-port",
            "853",
            "--cert",
            str(certs.good_lab.cert),
            "--key",
            str(certs.good_lab.key),
            netns=lab.srv,
        )
        spawn(
            tmp_path / "peer6.log",
            "--host",
            SRV_IP6S[0],
            "--dns-port",
            "53",
            "--tls-port",
            "853",
            "--cert",
            str(certs.good_lab.cert),
            "--key",
            str(certs.good_lab.key),
            netns=lab.srv,
        )
        cfg = UnboundConfig(UNBOUND, 53, 853, certs.good_lab.cert, certs.good_lab.key)
        ub = Unbound.start(cfg, tmp_path / "unbound", netns=lab.srv.name)
        lab.srv.processes.append(ub.proc)
        _wait_listening(lab, UNBOUND, 853)
        yield lab


def _wait_listening(lab: Lab, host: str, port: int) -> None:
    assert lab.srv is not None
    for _ in range(200):
        out = lab.srv.run(["ss", "-Htln", f"sport = :{port}"], check=False).stdout
        if f"{host}:{port}" in out:
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {host}:{port} in the lab")


def probe_json(lab: Lab, *args: str, expect_rc: int) -> list[dict[str, Any]]:
    assert lab.cli is not None
    cmd = lab.cli.python(
        "-m", "agent", "probe", "--json", "--connect-timeout", str(CONNECT_TIMEOUT), *args
    )
    proc = lab.cli.run(cmd, check=False)
    assert proc.returncode == expect_rc, proc.stderr
    data: list[dict[str, Any]] = json.loads(proc.stdout)
    return data


def paths(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["path"]: p for p in result["paths"]}


def test_blackholed_853_falls_back_to_upgrade_fast(lab: Lab, certs: Certs) -> None:
    assert lab.srv is not None
    lab.srv.nft(f"""
table inet dta {{
  chain input {{ type filter hook input priority 0; policy accept;
    ip daddr {PEER} tcp dport 853 drop
  }}
}}""")
    peer, ub = probe_json(
        lab, PEER, UNBOUND, "--profile", "strict", "--ca-file", str(certs.ca.path), expect_rc=0
    )
    assert peer["method"] == "tls-upgrade" and peer["auth"] == "ip-san"
    assert paths(peer)["port"]["failure"] == "abandoned"
    assert peer["decided_ms"] < CONNECT_TIMEOUT * 1000 / 2  # a fraction of the connect timeout
    assert peer["resumption"] is True
    assert ub["method"] == "tls-port" and ub["auth"] == "ip-san"
    assert paths(ub)["udp"]["method"] == "udp-plain"


def test_everything_dropped_holds_the_deadline(lab: Lab) -> None:
    assert lab.srv is not None
    lab.srv.nft(f"""
table inet dta {{
  chain input {{ type filter hook input priority 0; policy accept;
    ip daddr {PEER} drop
  }}
}}""")
    (peer,) = probe_json(lab, PEER, "--timeout", "2", expect_rc=1)
    assert peer["method"] == "unreachable"
    assert {p["failure"] for p in peer["paths"]} == {"timeout"}
    assert peer["total_ms"] <= 2000 + 300


def test_ipv6_across_the_link(lab: Lab, certs: Certs) -> None:
    (peer,) = probe_json(
        lab, SRV_IP6S[0], "--profile", "strict", "--ca-file", str(certs.ca.path), expect_rc=0
    )
    assert peer["method"] == "tls-port" and peer["auth"] == "ip-san"


def test_unbound_does_not_upgrade(lab: Lab) -> None:
    """Real unbound clears the unknown TO flag: the upgrade path says so (tcp-plain)."""
    assert lab.srv is not None
    lab.srv.nft(f"""
table inet dta {{
  chain input {{ type filter hook input priority 0; policy accept;
    ip daddr {UNBOUND} tcp dport 853 reject with tcp reset
  }}
}}""")
    (ub,) = probe_json(lab, UNBOUND, expect_rc=1)
    assert ub["method"] == "tcp-plain"
    assert paths(ub)["port"]["failure"] == "refused"
    assert paths(ub)["upgrade"]["failure"] == "no-upgrade"
    assert paths(ub)["upgrade"]["to_in_response"] is False
