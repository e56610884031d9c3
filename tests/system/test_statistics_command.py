"""`dnstls-agent statistics` against the real daemon (the world of test_static_only.py: two
unbound on lo in a namespace, the statics alone, strict): the queries asked show in the
counters, --reset zeroes them (the cache keeps its answers) and says since when they ran,
--json parses."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
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

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "agent", "-c", str(self.config), *args]
        return self.ns.run(argv, check=False)

    def json(self, *args: str) -> dict[str, Any]:
        out = self.cli(*args, "--json")
        assert out.returncode == 0, out
        answer: dict[str, Any] = json.loads(out.stdout)
        return answer

    def told(self, what: str, wait: float) -> bool:
        end = time.monotonic() + wait
        while time.monotonic() < end and self.agent.alive():
            try:
                if self.notify.recv(4096).decode() == what:
                    return True
            except BlockingIOError:
                time.sleep(0.02)
        return False


@pytest.fixture
def world(certs: Certs, tmp_path: Path) -> Iterator[World]:
    require_root()
    for program in ("ip", "unbound"):
        require_program(program)
    ns = Netns(f"dta-sc-{new_tag()}")  # lo up, nothing else
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        by_ip = certs.ca.issue(tmp_path, "by-ip", ips=(BY_IP,))
        for host, cert in ((BY_NAME, certs.no_ip), (BY_IP, by_ip)):
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
netlink = false
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


def ask(w: World, name: str = f"www.{ZONE}", tcp: bool = False) -> list[str]:
    query = dns.message.make_query(name, "A")
    send = dns.query.tcp if tcp else dns.query.udp
    answer = w.ns.call(lambda: send(query, STUB, timeout=3), 10)
    return [r.address for rr in answer.answer if rr.rdtype == dns.rdatatype.A for r in rr]


def test_statistics_count_reset_and_say_since_when(world: World) -> None:
    w = world
    assert w.told("READY=1", 15), w.agent.tail(40)
    end = time.monotonic() + 15
    while len([o for o in w.json("status")["order"] if "tls-port" in o]) < 2:
        assert time.monotonic() < end, w.agent.tail(40)
        time.sleep(0.1)
    started = w.json("statistics")["since"]

    for tcp in (False, True, False, False):  # one miss, then the cache
        assert ask(w, tcp=tcp) == [WWW_A]
    st = w.json("statistics")
    assert st["since"] == started and st["now"] >= started
    assert st["clients"]["queries"] == st["clients"]["answered"] == 4, st["clients"]
    assert st["clients"]["tcp_clients"] == 1 and st["clients"]["servfail"] == 0
    assert (st["cache"]["hits"], st["cache"]["misses"]) == (3, 1), st["cache"]
    assert st["cache"]["entries"] >= 1
    assert sum(u["queries"] for u in st["upstreams"]) >= 1
    answered = [u for u in st["upstreams"] if u["answers"]]
    assert answered and all(u["p50_ms"] is not None for u in answered), st["upstreams"]
    assert st["engine"]["probes"] >= 2 and st["engine"]["decisions"] >= 1, st["engine"]

    # the table, for people
    out = w.cli("statistics")
    assert out.returncode == 0, out
    lines = out.stdout.splitlines()
    assert lines[0].startswith("counting since ")
    assert lines[1].split()[:3] == ["CLIENTS", "queries", "answered"]
    assert lines[2].split()[:2] == ["4", "4"]
    assert any(line.startswith(f"tls-port:{BY_NAME}@853#dns.test ") for line in lines), lines

    # --reset: the counters as they ended, then zeroed, and since when they ran
    out = w.cli("statistics", "--reset")
    assert out.returncode == 0, out
    assert out.stdout.splitlines()[2].split()[:2] == ["4", "4"]
    ran_since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    assert re.search(
        rf"counters zeroed at [\d-]+ [\d:]+; they had counted since {ran_since} \(\S+\)",
        out.stdout,
    ), out.stdout
    st = w.json("statistics")
    assert st["since"] > started
    assert st["clients"]["queries"] == st["clients"]["answered"] == 0, st["clients"]
    assert st["cache"]["hits"] == st["cache"]["misses"] == 0 and st["cache"]["entries"] >= 1
    assert all(u["queries"] == 0 and u["p50_ms"] is None for u in st["upstreams"])
    # zeroed; a decision of the engine's own (a kernel event) may come in between, a probe not
    assert st["engine"]["probes"] == 0 and st["engine"]["decisions"] <= 1, st["engine"]

    # counting goes on from zero; the answer is still cached
    assert ask(w) == [WWW_A]
    after = w.json("statistics")
    assert after["clients"]["queries"] == 1 and after["cache"]["hits"] == 1, after
    assert after["since"] == st["since"]

    # --reset --json: the agent's answer
    answer = w.json("statistics", "--reset")
    assert answer["ok"] is True and answer["since"] > st["since"]
    assert answer["statistics"]["clients"]["queries"] == 1

    w.agent.popen.terminate()
    assert w.agent.popen.wait(10) == 0, w.agent.tail(40)
