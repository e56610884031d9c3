"""`dnstls-agent run` where users install it by hand: a server, a container, a VM with static
configuration. No NetworkManager on the bus, no lease, no interface but lo: the global
static_resolvers alone are probed, ordered and served, under strict, authenticated as
configured (one by its #NAME, one by its address in the certificate)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
import pytest

from tests.conftest import Certs, require_program, require_root
from tests.lab.netns import REPO, Netns, new_tag
from tests.lab.proc import Process
from tests.lab.unbound import WWW_A, ZONE, Unbound, UnboundConfig, answers, tls_listening

pytestmark = pytest.mark.system

BY_NAME, BY_IP = "127.0.0.1", "127.0.0.2"  # unbound x2, on lo inside the namespace
STUB = "127.0.0.153"


@dataclass
class World:
    ns: Netns
    dir: Path
    config: Path
    agent: Process
    notify: socket.socket

    def status(self) -> dict[str, Any] | None:
        argv = [sys.executable, "-m", "agent", "-c", str(self.config), "status", "--json"]
        out = self.ns.run(argv, check=False)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def told(self, what: str, wait: float) -> bool:
        """Whether the daemon told systemd `what` within `wait` seconds."""
        end = time.monotonic() + wait
        while time.monotonic() < end and self.agent.alive():
            try:
                if self.notify.recv(4096).decode() == what:
                    return True
            except BlockingIOError:
                time.sleep(0.02)
        return False


@pytest.fixture(params=[False, True], ids=["netlink-off", "netlink-on"])
def world(request: pytest.FixtureRequest, certs: Certs, tmp_path: Path) -> Iterator[World]:
    require_root()
    for program in ("ip", "unbound"):
        require_program(program)
    ns = Netns(f"dta-st-{new_tag()}")  # lo up, nothing else
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        by_ip = certs.ca.issue(tmp_path, "by-ip", ips=(BY_IP,))  # no name at all
        for host, cert in ((BY_NAME, certs.no_ip), (BY_IP, by_ip)):  # no_ip: dns.test only
            cfg = UnboundConfig(host, 53, 853, cert.cert, cert.key)
            ub = Unbound.start(cfg, tmp_path / f"unbound-{host}", netns=ns.name)
            ns.processes.append(ub.proc)

            def ready(h: str = host) -> bool:
                return ns.call(lambda: answers(h, 53) and tls_listening(h, 853), 5)

            ub.proc.wait_until(ready, 10, f"unbound on {host}")
        config = tmp_path / "agent.toml"
        config.write_text(f"""
state_dir = "{tmp_path}/state"
stub_state_dir = "{tmp_path}/state"
runtime_dir = "{tmp_path}/run"
listen = ["{STUB}:53"]
manage_stub = false  # root in a network namespace only: /etc is the host's
nm_bus = "unix:path={tmp_path}/no-bus"
netlink = {"true" if request.param else "false"}
lease_dirs = []
profile = "strict"
ca_file = "{certs.ca.path}"
static_resolvers = ["tls:{BY_NAME}#dns.test", "{BY_IP}"]
""")
        notify.bind(str(tmp_path / "notify.sock"))
        notify.setblocking(False)
        env = {**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(notify.getsockname())}
        argv = ns.argv([sys.executable, "-m", "agent", "-v", "-c", str(config), "run"])
        agent = Process(argv, tmp_path / "agent.log", env=env)
        ns.processes.append(agent)
        yield World(ns, tmp_path, config, agent, notify)
    finally:
        ns.delete()
        notify.close()


def ask(w: World, tcp: bool = False) -> list[str]:
    query = dns.message.make_query(f"www.{ZONE}", "A")
    send = dns.query.tcp if tcp else dns.query.udp
    answer = w.ns.call(lambda: send(query, STUB, timeout=3), 10)
    return [r.address for rr in answer.answer if rr.rdtype == dns.rdatatype.A for r in rr]


def test_static_resolvers_alone_are_probed_ordered_and_served(world: World) -> None:
    w = world
    assert w.told("READY=1", 15), w.agent.tail(40)
    end = time.monotonic() + 15
    status = w.status()
    while not (status and len([o for o in status["order"] if "tls-port" in o]) == 2):
        assert time.monotonic() < end, f"status {status}; log:\n{w.agent.tail(40)}"
        time.sleep(0.1)
        status = w.status()
    assert status["profile"] == "strict", status
    assert sorted(status["order"]) == [
        f"tls-port:{BY_NAME}@853#dns.test",
        f"tls-port:{BY_IP}@853",
    ]
    (iface,) = status["interfaces"]
    assert (iface["interface"], iface["network"], iface["profile"]) == (
        "static", "if:static", "strict"
    )  # fmt: skip
    seen = {r["address"]: (r["method"], r["auth"], r["used"]) for r in iface["resolvers"]}
    assert seen == {BY_NAME: ("tls-port", "name", True), BY_IP: ("tls-port", "ip-san", True)}
    assert not status["warnings"], status["warnings"]
    assert status["tunnel"]["mode"] == "private"
    assert ask(w) == [WWW_A]
    assert ask(w, tcp=True) == [WWW_A]

    # the tunnel's cache: asked again, answered without the upstreams (counted in status),
    # until flush-caches empties it
    def upstream_queries() -> int:
        st = w.status()
        assert st is not None
        return sum(u["queries"] for u in st["tunnel"]["upstreams"])

    before = upstream_queries()
    for tcp in (False, True, False):
        assert ask(w, tcp=tcp) == [WWW_A]
    st = w.status()
    assert st is not None
    assert st["tunnel"]["cache"]["hits"] >= 3, st["tunnel"]["cache"]
    assert upstream_queries() == before
    argv = [sys.executable, "-m", "agent", "-c", str(w.config), "flush-caches"]
    out = w.ns.run(argv, check=False)
    assert out.returncode == 0 and out.stdout.split()[0].isdigit(), out
    assert int(out.stdout.split()[0]) >= 1, out.stdout
    assert ask(w) == [WWW_A]
    assert upstream_queries() > before
    # a clean stop; what was learnt is kept for the statics' own network
    w.agent.popen.terminate()
    assert w.agent.popen.wait(10) == 0, w.agent.tail(40)
    state = json.loads((w.dir / "state" / "state.json").read_text())
    learnt = {(k["network"], k["address"]) for k in state["knowledge"]}
    assert learnt == {("if:static", BY_NAME), ("if:static", BY_IP)}
