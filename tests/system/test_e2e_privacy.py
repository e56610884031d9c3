"""End to end, with a privacy proof on the wire.

The network side (namespace): dnsmasq (DHCP), real unbound with TLS on 853 (.1), the test
peer with the STARTTLS upgrade only (.2), a cleartext-only resolver (.3), and a captive
portal's connectivity check. The machine side: a real NetworkManager on a private bus and
the agent (`dnstls-agent run`, as root, managing the stub) in a private mount namespace,
so /etc/resolv.conf is the lab's. glibc (getent) resolves through the system stub.

A packet capture on the network side's interface proves what crossed in cleartext: under
strict and encrypted not one query name (only the STARTTLS dummy); under opportunistic
only towards the cleartext-only resolver.
"""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Certs, require_program, require_root
from tests.lab.agentproc import AgentProcess
from tests.lab.capture import Capture, Packet, leaked
from tests.lab.nmlab import NMLab
from tests.lab.peer import PEER_A, spawn
from tests.lab.portal import Portal
from tests.lab.unbound import WWW_A, Unbound, UnboundConfig

pytestmark = pytest.mark.system

UNBOUND, UPGRADE, CLEAR = "198.51.100.1", "198.51.100.2", "198.51.100.3"
STUB = "127.0.0.153"
PROGRAMS = ("ip", "NetworkManager", "nmcli", "dnsmasq", "dbus-daemon", "nsenter", "unshare",
            "unbound", "tcpdump", "getent", "dig")  # fmt: skip


@dataclass
class World:
    lab: NMLab
    agent: AgentProcess
    unbound: Unbound
    portal: Portal
    capture: Capture
    names: list[str]

    def lookup(self, name: str | None = None) -> tuple[int, str]:
        """getent through the machine's /etc/resolv.conf; a fresh unique name by default."""
        assert self.lab.machine is not None
        name = name or f"q{secrets.token_hex(4)}.lab.test"
        self.names.append(name)
        out = self.lab.machine.run(["getent", "ahostsv4", name], check=False)
        return out.returncode, (out.stdout.split() or [""])[0]

    def wait_order(self, want: set[str], what: str, *, fallback: bool = False) -> dict[str, Any]:
        """The order is `want`; with `fallback`, plus the policy's cleartext fallback to the
        same resolvers (opportunistic), last, over the transport their probe saw answer."""

        def matches(s: dict[str, Any]) -> bool:
            order: list[str] = s["order"]
            if not fallback:
                return set(order) == want
            private = [o for o in order if o.startswith("tls")]
            plain = order[len(private) :]
            hosts = {o.split(":")[1].rsplit("@")[0] for o in want}
            return (
                set(private) == want
                and len(plain) == len(hosts)
                and all(o.startswith(("tcp-plain:", "udp-plain:")) for o in plain)
                and {o.split(":")[1].rsplit("@")[0] for o in plain} == hosts
            )

        return self.agent.wait(matches, 25, what)

    def cleartext(self) -> tuple[list[Packet], dict[str, list[Packet]]]:
        pkts = self.capture.stop()
        return pkts, leaked(pkts, [*self.names, "www.lab.test"])


def make_world(certs: Certs, tmp: Path, profile: str, dns: list[str]) -> Iterator[World]:
    require_root()
    for program in PROGRAMS:
        require_program(program)
    cert = certs.ca.issue(tmp, "resolvers", ips=(UNBOUND, UPGRADE, CLEAR))
    tls = ("--cert", str(cert.cert), "--key", str(cert.key))
    portal_dir = tmp / "portal"
    portal_dir.mkdir()
    uri = f"http://{UNBOUND}:8080/check"
    with NMLab(tmp / "lab", dns=dns, nm_dns="none", connectivity_uri=uri, log_level="INFO") as lab:
        assert lab.srv is not None and lab.machine is not None
        lab.add_srv_address(CLEAR)
        capture = Capture(lab.srv, lab.srv_ifname, tmp / "wire.pcap")
        ub = Unbound.start(
            UnboundConfig(UNBOUND, 53, 853, cert.cert, cert.key), tmp / "ub", netns=lab.srv.name
        )
        lab.srv.processes.append(ub.proc)
        spawn(
            tmp / "upgrade.log",
            "--host",
            UPGRADE,
            "--dns-port",
            "53",
            "--tls-port",
            "-1",
            *tls,
            netns=lab.srv,
        )
        clear = ("--host", CLEAR, "--dns-port", "53", "--tls-port", "-1", "--no-upgrade")
        spawn(tmp / "clear.log", *clear, netns=lab.srv)
        portal = Portal(lab.srv, UNBOUND, 8080, portal_dir)
        portal.login()
        time.sleep(0.3)
        assert lab.check_connectivity() == "full"
        agent = AgentProcess(lab.machine, tmp / "agent", f"""
listen = ["{STUB}:53"]
nm_bus = "{lab.bus_address}"
lease_dirs = []
profile = "{profile}"
ca_file = "{certs.ca.path}"
""", manage_stub=True)  # fmt: skip
        yield World(lab, agent, ub, portal, capture, [])


@pytest.fixture(params=["strict", "encrypted"])
def strict(request: pytest.FixtureRequest, certs: Certs, tmp_path: Path) -> Iterator[World]:
    """strict, and encrypted (TLS required, any certificate): the same no-cleartext rule."""
    yield from make_world(certs, tmp_path, request.param, [UNBOUND, UPGRADE])


@pytest.fixture
def opportunistic(certs: Certs, tmp_path: Path) -> Iterator[World]:
    yield from make_world(certs, tmp_path, "opportunistic", [CLEAR])


def test_strict_lease_switch_failover_crash_and_no_cleartext(strict: World) -> None:
    w = strict
    both = {f"tls-port:{UNBOUND}@853", f"tls-upgrade:{UPGRADE}@53"}
    w.wait_order(both, "using both resolvers of the lease")
    assert f"nameserver {STUB}" in w.lab.resolv_conf()
    rc, addr = w.lookup("www.lab.test")
    assert rc == 0 and addr in (WWW_A, PEER_A)
    for _ in range(3):
        w.lookup()  # names nobody has: NXDOMAIN, fine; they must not leak
    # the lease changes: the upgrade-only resolver alone
    w.lab.set_dns([UPGRADE])
    w.lab.renew()
    w.wait_order({f"tls-upgrade:{UPGRADE}@53"}, "following the new lease")
    # a name not asked before (the same network: www's answer may come from the cache)
    assert w.lookup("renewed.lab.test") == (0, PEER_A)
    # both again; then unbound dies: the other one serves
    w.lab.set_dns([UNBOUND, UPGRADE])
    w.lab.renew()
    w.wait_order(both, "both again")
    w.unbound.stop()
    answers = [w.lookup(f"after{i}.lab.test") for i in range(3)]
    assert all(a == (0, PEER_A) for a in answers), answers
    # SIGKILL: restore (as the unit's ExecStopPost does) leaves no stub pointing at nothing
    w.agent.proc.popen.send_signal(signal.SIGKILL)
    w.agent.proc.popen.wait(5)
    assert f"nameserver {STUB}" in w.lab.resolv_conf()  # a crash leaves it, by nature
    out = w.agent.cli("restore")
    assert out.returncode == 0, out.stderr
    assert STUB not in w.lab.resolv_conf()
    pkts, leaks = w.cleartext()
    assert leaks == {}, {n: [(p.src, p.dst, p.dport) for p in ps] for n, ps in leaks.items()}
    port53 = [p for p in pkts if 53 in (p.sport, p.dport) and p.payload]
    assert port53, "the capture saw nothing: it proves nothing"
    assert any(b"STARTTLS" in p.payload for p in port53)  # the only cleartext DNS allowed


def test_opportunistic_cleartext_only_where_nothing_else_works(opportunistic: World) -> None:
    w = opportunistic
    w.wait_order({f"tcp-plain:{CLEAR}@53"}, "using the cleartext-only resolver")
    st = w.agent.status() or {}
    assert "cleartext" in {x["alert"] for x in st["warnings"]}
    assert w.lookup("plain.lab.test") == (0, PEER_A)
    w.lab.set_dns([UNBOUND])
    w.lab.renew()
    w.wait_order({f"tls-port:{UNBOUND}@853"}, "TLS again", fallback=True)
    assert w.lookup("www.lab.test") == (0, WWW_A)
    secret = f"s{secrets.token_hex(4)}.lab.test"
    w.lookup(secret)
    _pkts, leaks = w.cleartext()
    assert set(leaks) == {"plain.lab.test"}  # only the cleartext-only resolver's query
    assert {p.dst for p in leaks["plain.lab.test"] if p.dport == 53} == {CLEAR}


def test_captive_portal_opportunistic(opportunistic: World) -> None:
    w = opportunistic
    w.lab.set_dns([UNBOUND])
    w.lab.renew()
    w.wait_order({f"tls-port:{UNBOUND}@853"}, "TLS", fallback=True)
    w.portal.logout()
    assert w.lab.check_connectivity() == "portal"
    w.wait_order({f"udp-plain:{UNBOUND}@53"}, "the portal's own DNS")
    assert w.lookup("www.lab.test") == (0, WWW_A)  # the login page would resolve
    w.portal.login()
    assert w.lab.check_connectivity() == "full"
    w.wait_order({f"tls-port:{UNBOUND}@853"}, "TLS after the login", fallback=True)


def test_captive_portal_strict_needs_the_users_word(strict: World) -> None:
    w = strict
    w.wait_order({f"tls-port:{UNBOUND}@853", f"tls-upgrade:{UPGRADE}@53"}, "ready")
    w.portal.logout()
    assert w.lab.check_connectivity() == "portal"
    st = w.agent.wait(lambda s: s["order"] == [], 20, "refusing the portal's DNS")
    assert "portal-blocked" in {x["alert"] for x in st["warnings"]}
    assert w.lookup()[0] != 0  # no DNS at all rather than cleartext
    out = w.agent.cli("portal", "allow", "--minutes", "2")
    assert out.returncode == 0, out.stderr
    w.wait_order({f"udp-plain:{UNBOUND}@53", f"udp-plain:{UPGRADE}@53"}, "the supervised exception")
    assert (w.agent.status() or {})["portal_until"]
    assert w.lookup("www.lab.test")[0] == 0
    w.portal.login()
    assert w.lab.check_connectivity() == "full"
    st = w.wait_order({f"tls-port:{UNBOUND}@853", f"tls-upgrade:{UPGRADE}@53"}, "strict again")
    assert st["portal_until"] is None
