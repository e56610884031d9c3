"""A machine configured by hand, for the daemon-level system tests: a network namespace with
only lo, two real unbound on it (DNS over TLS on 853), and `dnstls-agent run` with the two as
its global static_resolvers under strict: one authenticated by its configured #NAME (its
certificate names dns.test only), one by its address (its certificate has no name at all).
No NetworkManager, no lease, no stub to manage (/etc is the host's).

tests/system/test_static_only.py, test_query_command.py and test_statistics_command.py
each run their commands against this one world.
"""

from __future__ import annotations

import contextlib
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

import dns.message
import dns.query
import dns.rdatatype

from tests.conftest import Certs, require_program, require_root
from tests.lab.netns import REPO, Netns, new_tag
from tests.lab.proc import Process
from tests.lab.unbound import ZONE, Unbound, UnboundConfig, answers, tls_listening

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
        """`dnstls-agent -c CONFIG ARGS`, inside the namespace."""
        argv = [sys.executable, "-m", "agent", "-c", str(self.config), *args]
        return self.ns.run(argv, check=False)

    def json(self, *args: str) -> dict[str, Any]:
        """A command's --json answer (it must succeed)."""
        out = self.cli(*args, "--json")
        assert out.returncode == 0, out
        answer: dict[str, Any] = json.loads(out.stdout)
        return answer

    def status(self) -> dict[str, Any] | None:
        """`status --json`, or None while the agent does not answer."""
        out = self.cli("status", "--json")
        return json.loads(out.stdout) if out.returncode == 0 else None

    def told(self, what: str, wait: float) -> bool:
        """Whether the daemon told systemd `what` (READY=1, ...) within `wait` seconds."""
        end = time.monotonic() + wait
        while time.monotonic() < end and self.agent.alive():
            try:
                if self.notify.recv(4096).decode() == what:
                    return True
            except BlockingIOError:
                time.sleep(0.02)
        return False

    def ask(self, name: str = f"www.{ZONE}", tcp: bool = False) -> list[str]:
        """The A records the tunnel answers for `name` (UDP, or TCP)."""
        query = dns.message.make_query(name, "A")
        send = dns.query.tcp if tcp else dns.query.udp
        answer = self.ns.call(lambda: send(query, STUB, timeout=3), 10)
        return [r.address for rr in answer.answer if rr.rdtype == dns.rdatatype.A for r in rr]


@contextlib.contextmanager
def statics_world(
    certs: Certs, tmp_path: Path, tag: str, *, netlink: bool = False
) -> Iterator[World]:
    """The world, torn down (by PID, the namespace deleted) however the test ends."""
    require_root()
    for program in ("ip", "unbound"):
        require_program(program)
    ns = Netns(f"dta-{tag}-{new_tag()}")  # lo up, nothing else
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
netlink = {"true" if netlink else "false"}
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
