"""The agent following a real NetworkManager (private bus, namespaces) that gets its resolvers
from dnsmasq: real unbound (TLS on 853) and the test peer (the STARTTLS upgrade only). The
agent probes them, picks the order, serves DNS through its tunnel, and follows dnsmasq when
it hands out other resolvers on the next activation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Certs, require_program, require_root
from tests.lab.agentproc import AgentProcess
from tests.lab.nmlab import NMLab
from tests.lab.peer import PEER_A, spawn
from tests.lab.unbound import WWW_A, Unbound, UnboundConfig

pytestmark = pytest.mark.system

UNBOUND, UPGRADE_ONLY, LATER = "198.51.100.1", "198.51.100.2", "198.51.100.3"
STUB = "127.0.0.153"
PROGRAMS = (
    "ip",
    "NetworkManager",
    "nmcli",
    "dnsmasq",
    "dbus-daemon",
    "nsenter",
    "unshare",
    "unbound",
    "dig",
)


@dataclass
class World:
    lab: NMLab
    agent: AgentProcess


@pytest.fixture
def world(certs: Certs, tmp_path: Path) -> Iterator[World]:
    require_root()
    for program in PROGRAMS:
        require_program(program)
    cert = certs.ca.issue(tmp_path, "resolvers", ips=(UNBOUND, UPGRADE_ONLY, LATER))
    with NMLab(tmp_path / "lab", dns=[UNBOUND, UPGRADE_ONLY]) as lab:
        assert lab.srv is not None and lab.cli is not None
        lab.add_srv_address(LATER)
        ub = Unbound.start(
            UnboundConfig(UNBOUND, 53, 853, cert.cert, cert.key),
            tmp_path / "ub",
            netns=lab.srv.name,
        )
        lab.srv.processes.append(ub.proc)
        tls = ("--cert", str(cert.cert), "--key", str(cert.key))
        spawn(
            tmp_path / "upgrade.log",
            "--host",
            UPGRADE_ONLY,
            "--dns-port",
            "53",
            "--tls-port",
            "-1",
            *tls,
            netns=lab.srv,
        )
        spawn(
            tmp_path / "later.log",
            "--host",
            LATER,
            "--dns-port",
            "53",
            "--tls-port",
            "853",
            *tls,
            netns=lab.srv,
        )
        lab.cli.run(["ip", "link", "set", "lo", "up"])
        agent = AgentProcess(lab.cli, tmp_path / "agent", f"""
listen = ["{STUB}:53"]
nm_bus = "{lab.bus_address}"
lease_dirs = []
profile = "strict"
ca_file = "{certs.ca.path}"
""")  # fmt: skip
        yield World(lab, agent)


def resolvers(st: dict[str, Any], ifname: str) -> dict[str, dict[str, Any]]:
    link = next((i for i in st["interfaces"] if i["interface"] == ifname), None)
    return {r["address"]: r for r in link["resolvers"]} if link else {}


def dig(w: World, name: str = "www.lab.test") -> str:
    assert w.lab.cli is not None
    return w.lab.cli.run(
        ["dig", "+short", "+time=2", "+tries=1", f"@{STUB}", name], check=False
    ).stdout.strip()


def test_agent_follows_networkmanager(world: World) -> None:
    w = world
    ifname = w.lab.ifname

    want = {f"tls-port:{UNBOUND}@853", f"tls-upgrade:{UPGRADE_ONLY}@53"}
    st = w.agent.wait(lambda s: set(s["order"]) == want, 20, "using both resolvers NM named")
    rs = resolvers(st, ifname)
    assert (rs[UNBOUND]["method"], rs[UNBOUND]["auth"]) == ("tls-port", "ip-san")
    assert (rs[UPGRADE_ONLY]["method"], rs[UPGRADE_ONLY]["auth"]) == ("tls-upgrade", "ip-san")
    assert all(r["used"] for r in rs.values())
    iface = next(i for i in st["interfaces"] if i["interface"] == ifname)
    assert iface["network"] == f"nm:{w.lab.connection_uuid}" and iface["profile"] == "strict"
    assert st["tunnel"]["mode"] == "private"
    assert dig(w) in (WWW_A, PEER_A)

    # the next activation brings other resolvers: no dispatcher needed, D-Bus says it
    w.lab.set_dns([LATER])
    w.lab.renew()
    st = w.agent.wait(
        lambda s: s["order"] == [f"tls-port:{LATER}@853"], 20, "following the new lease"
    )
    assert set(resolvers(st, ifname)) == {LATER}
    deadline = time.monotonic() + 5
    while dig(w) != PEER_A and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dig(w) == PEER_A  # answered by the new resolver, through the tunnel
    assert not st["warnings"]


def test_networkmanager_restarting(world: World) -> None:
    """NM leaves the bus: what it said is kept (DNS goes on); it comes back: re-read at once."""
    w = world
    first = f"tls-port:{UNBOUND}@853"
    w.agent.wait(lambda s: first in s["order"], 20, "using the first resolvers")
    w.lab.stop_nm()
    time.sleep(0.5)
    assert first in (w.agent.status() or {}).get("order", [])
    assert dig(w) in (WWW_A, PEER_A)
    assert (
        "NetworkManager is not on the bus; keeping what it said last"
        in w.agent.proc.log.read_text()
    )
    w.lab.set_dns([LATER])
    w.lab.start_nm()  # NameOwnerChanged: the agent takes a fresh snapshot
    w.agent.wait(
        lambda s: s["order"] == [f"tls-port:{LATER}@853"], 20, "following the restarted NM"
    )
