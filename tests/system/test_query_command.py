"""`dnstls-agent query` through the real daemon: statics under strict against two real
unbounds (one authenticated by its #NAME, one by its address in the certificate), as in
test_static_only.py. The answer, the upstream that gave it and how it was authenticated;
the second time, the tunnel's cache; --json; NXDOMAIN and NODATA exit 1; a bad type 2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Certs, require_program, require_root
from tests.lab.netns import REPO, Netns, new_tag
from tests.lab.proc import Process
from tests.lab.unbound import WWW_A, ZONE, Unbound, UnboundConfig, answers, tls_listening

pytestmark = pytest.mark.system

BY_NAME, BY_IP = "127.0.0.1", "127.0.0.2"  # unbound x2, on lo inside the namespace
STUB = "127.0.0.153"
DOMAIN = ZONE.rstrip(".")
# how the agent authenticates each: by the configured #NAME, by its address (IP SAN)
AUTH = {
    f"tls-port:{BY_NAME}@853#dns.test": "name",
    f"tls-port:{BY_IP}@853": "ip-san",
}


@dataclass
class World:
    ns: Netns
    config: Path
    agent: Process
    notify: socket.socket

    def agent_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "agent", "-c", str(self.config), *args]
        return self.ns.run(argv, check=False)

    def ready(self, wait: float) -> bool:
        end = time.monotonic() + wait
        while time.monotonic() < end and self.agent.alive():
            try:
                if self.notify.recv(4096).decode() == "READY=1":
                    return True
            except BlockingIOError:
                time.sleep(0.02)
        return False


@pytest.fixture
def world(certs: Certs, tmp_path: Path) -> Iterator[World]:
    require_root()
    for program in ("ip", "unbound"):
        require_program(program)
    ns = Netns(f"dta-q-{new_tag()}")  # lo up, nothing else
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        by_ip = certs.ca.issue(tmp_path, "by-ip", ips=(BY_IP,))  # no name at all
        for host, cert in ((BY_NAME, certs.no_ip), (BY_IP, by_ip)):  # no_ip: dns.test only
            cfg = UnboundConfig(host, 53, 853, cert.cert, cert.key)
            ub = Unbound.start(cfg, tmp_path / f"unbound-{host}", netns=ns.name)
            ns.processes.append(ub.proc)

            def up(h: str = host) -> bool:
                return ns.call(lambda: answers(h, 53) and tls_listening(h, 853), 5)

            ub.proc.wait_until(up, 10, f"unbound on {host}")
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
        yield World(ns, config, agent, notify)
    finally:
        ns.delete()
        notify.close()


def both_in_order(w: World) -> dict[str, Any]:
    """The status once both statics are in the tunnel's order (probed, authenticated)."""
    end = time.monotonic() + 15
    while True:
        out = w.agent_cli("status", "--json")
        status: dict[str, Any] | None = json.loads(out.stdout) if out.returncode == 0 else None
        if status and sorted(status["order"]) == sorted(AUTH):
            return status
        assert time.monotonic() < end, f"status {status}; log:\n{w.agent.tail(40)}"
        time.sleep(0.1)


def test_query_shows_the_answer_who_gave_it_and_how(world: World) -> None:
    w = world
    assert w.ready(15), w.agent.tail(40)
    both_in_order(w)

    first = w.agent_cli("query", f"www.{DOMAIN}")
    assert first.returncode == 0, (first, w.agent.tail(20))
    lines = first.stdout.splitlines()
    assert lines[0] == f"www.{DOMAIN}: {WWW_A}", first.stdout
    assert lines[1].startswith("-- answered by "), first.stdout
    upstream = lines[1].removeprefix("-- answered by ").split(" ")[0]
    assert upstream in AUTH, first.stdout  # one of the order's, named as status names it
    assert f"(tls-port, authenticated by {AUTH[upstream]}, configured)" in lines[1]
    assert lines[2].strip().startswith("in ") and " ms" in lines[2], first.stdout
    assert "resolver of static (configured)" in lines[2], first.stdout

    again = w.agent_cli("query", f"www.{DOMAIN}")
    assert again.returncode == 0, again
    assert again.stdout.splitlines()[0] == f"www.{DOMAIN}: {WWW_A}"
    assert again.stdout.splitlines()[1].startswith("-- from the tunnel's cache in "), again

    js = w.agent_cli("query", "--json", f"www.{DOMAIN}", "a")
    assert js.returncode == 0, js
    answer = json.loads(js.stdout)
    assert answer["rcode"] == "NOERROR" and answer["type"] == "A"
    (record,) = answer["answer"]  # "NAME TTL IN A ADDRESS", the TTL as the cache has it
    assert record.startswith(f"www.{ZONE} ") and record.endswith(f" IN A {WWW_A}"), answer
    assert (answer["from_cache"], answer["upstream"]) == (True, None), answer
    assert isinstance(answer["ms"], float)

    txt = w.agent_cli("query", "--json", f"whoami.{DOMAIN}", "TXT")
    assert txt.returncode == 0, txt
    got = json.loads(txt.stdout)
    assert got["upstream"] in AUTH and got["auth"] == AUTH[got["upstream"]], got
    assert got["auth_source"] == "configured" and got["method"] == "tls-port", got
    ((owner, ttl, rclass, rtype, data),) = [r.split(None, 4) for r in got["answer"]]
    assert (owner, ttl, rclass, rtype) == (f"whoami.{ZONE}", "0", "IN", "TXT"), got
    assert "unbound" in data, got  # unbound's own TTL 0: never from the cache

    nx = w.agent_cli("query", f"nope.{DOMAIN}")
    assert nx.returncode == 1, nx
    assert nx.stdout.splitlines()[0] == f"nope.{DOMAIN}: NXDOMAIN (no such name)", nx.stdout
    nodata = w.agent_cli("query", f"www.{DOMAIN}", "MX")
    assert nodata.returncode == 1, nodata
    assert nodata.stdout.startswith(f"www.{DOMAIN}: NODATA"), nodata.stdout

    bad = w.agent_cli("query", f"www.{DOMAIN}", "NOTATYPE")
    assert bad.returncode == 2 and "NOTATYPE" in bad.stderr, bad
    assert w.agent_cli("query", "a..b").returncode == 2

    # each question that reached the tunnel counted once as a client's (nothing else asks
    # it here); the refused ones never reached it
    clients = both_in_order(w)["tunnel"]["clients"]
    assert (clients["queries"], clients["answered"]) == (6, 6), clients
