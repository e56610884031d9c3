"""The tunnel as the system's resolver: glibc (getent, getaddrinfo) through resolv.conf, port 53,
across a real link to real unbound. resolv.conf is bind-mounted in a private mount namespace:
the host's own is never touched.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Certs, require_program, require_root
from tests.lab.netns import SRV_IPS, Lab
from tests.lab.tunnel import TunnelProcess
from tests.lab.unbound import WWW_A, Unbound, UnboundConfig

pytestmark = pytest.mark.system

RESOLVER = SRV_IPS[0]
STUB = "127.0.0.153"


@pytest.fixture
def world(certs: Certs, tmp_path: Path) -> Iterator[tuple[Lab, TunnelProcess, Path]]:
    require_root()
    for program in ("ip", "unbound", "unshare", "mount", "getent"):
        require_program(program)
    with Lab() as lab:
        assert lab.srv is not None and lab.cli is not None
        ub = Unbound.start(
            UnboundConfig(RESOLVER, 53, 853, certs.good_lab.cert, certs.good_lab.key),
            tmp_path / "unbound",
            netns=lab.srv.name,
        )
        lab.srv.processes.append(ub.proc)
        lab.cli.run(["ip", "link", "set", "lo", "up"])
        tunnel = TunnelProcess.start(
            ["--upstream", RESOLVER, "--profile", "strict", "--ca-file", str(certs.ca.path)],
            tmp_path / "tunnel.log",
            host=STUB,
            port=53,
            netns=lab.cli,
        )
        resolv = tmp_path / "resolv.conf"
        resolv.write_text(f"nameserver {STUB}\noptions timeout:2 attempts:1\n")
        yield lab, tunnel, resolv


def as_system(lab: Lab, resolv: Path, command: str) -> subprocess.CompletedProcess[str]:
    """Run `command` in the client namespace with its own /etc/resolv.conf."""
    assert lab.cli is not None
    script = f"mount --bind {resolv} /etc/resolv.conf && {command}"
    return lab.cli.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script], check=False
    )


def test_glibc_resolves_through_the_tunnel(world: tuple[Lab, TunnelProcess, Path]) -> None:
    lab, tunnel, resolv = world
    out = as_system(lab, resolv, "getent ahostsv4 www.lab.test")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == WWW_A
    lookup = 'socket.getaddrinfo("www.lab.test", 443, socket.AF_INET)[0][4][0]'
    py = as_system(lab, resolv, f"python3 -c 'import socket; print({lookup})'")
    assert py.stdout.strip() == WWW_A, py.stderr
    missing = as_system(lab, resolv, "getent ahostsv4 nothere.lab.test")
    assert missing.returncode == 2  # NXDOMAIN: "not found", not a timeout
    stats = tunnel.statistics()
    up = stats["upstreams"][0]
    assert up["answers"] >= 2 and up["connections"] == 1 and stats["mode"] == "private"
    assert stats["cache"]["hits"] >= 1  # www.lab.test asked twice: the second from the cache


def test_strict_with_resolver_unreachable_fails_fast(
    world: tuple[Lab, TunnelProcess, Path],
) -> None:
    lab, tunnel, resolv = world
    assert lab.srv is not None
    lab.srv.nft("""
table inet dta {
  chain input { type filter hook input priority 0; policy accept;
    tcp dport { 53, 853 } reject with tcp reset
  }
}""")
    out = as_system(lab, resolv, "getent ahostsv4 www.lab.test; echo rc=$?")
    assert "rc=2" in out.stdout  # SERVFAIL: glibc gives up at once instead of timing out
    assert tunnel.statistics()["mode"] == "down"
