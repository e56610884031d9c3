"""`dnstls-agent run` as systemd would run it, in a namespace: a DHCP lease names a real unbound,
the daemon probes it, tells systemd READY=1, serves DNS through its tunnel, answers `status`,
reloads on SIGHUP (refusing a broken file) and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Certs, require_program, require_root
from tests.lab.netns import REPO, Netns, new_tag
from tests.lab.proc import Process
from tests.lab.unbound import WWW_A, Unbound, UnboundConfig

pytestmark = pytest.mark.system

RESOLVER = "198.51.100.1"
STUB = "127.0.0.153"


@dataclass
class World:
    ns: Netns
    dir: Path
    config: Path
    agent: Process
    notify: socket.socket

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.ns.run(
            [sys.executable, "-m", "agent", "-c", str(self.config), *args], check=False
        )

    def messages(self, until: str | None = None, wait: float = 0.0) -> list[str]:
        """What systemd would have been told, waiting up to `wait` s for `until`."""
        out: list[str] = []
        end = time.monotonic() + wait
        while True:
            try:
                out.append(self.notify.recv(4096).decode())
                continue
            except BlockingIOError:
                pass
            if until in out or time.monotonic() >= end or not self.agent.alive():
                return out
            time.sleep(0.02)


def config_text(d: Path, ca: Path, profile: str = "strict") -> str:
    return f"""
state_dir = "{d}/state"
stub_state_dir = "{d}/state"
runtime_dir = "{d}/run"
listen = ["{STUB}:53"]
lease_dirs = ["{d}/leases"]
manage_stub = false  # root in a network namespace only: /etc is the host's
nm_bus = "unix:path={d}/no-bus"
profile = "{profile}"
ca_file = "{ca}"
"""


@pytest.fixture
def world(certs: Certs, tmp_path: Path) -> Iterator[World]:
    require_root()
    for program in ("ip", "unbound", "dig"):
        require_program(program)
    ns = Netns(f"dta-d-{new_tag()}")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        ns.run(["ip", "link", "add", "dte0", "type", "veth", "peer", "name", "dte1"])
        ns.run(["ip", "addr", "add", f"{RESOLVER}/24", "dev", "dte1"])
        ns.run(["ip", "addr", "add", "198.51.100.100/24", "dev", "dte0"])
        for dev in ("dte0", "dte1"):
            ns.run(["ip", "link", "set", dev, "up"])
        cert = certs.good_lab
        ub_cfg = UnboundConfig(RESOLVER, 53, 853, cert.cert, cert.key)
        ub = Unbound.start(ub_cfg, tmp_path / "unbound", netns=ns.name)
        ns.processes.append(ub.proc)
        (tmp_path / "leases").mkdir()
        (tmp_path / "leases" / "dhclient.dte0.leases").write_text(
            f'lease {{\n  interface "dte0";\n  option domain-name-servers {RESOLVER};\n'
            f"  option dhcp-server-identifier {RESOLVER};\n}}\n"
        )
        config = tmp_path / "agent.toml"
        config.write_text(config_text(tmp_path, certs.ca.path))
        notify.bind(str(tmp_path / "notify.sock"))
        notify.setblocking(False)
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
        }
        argv = ns.argv([sys.executable, "-m", "agent", "-v", "-c", str(config), "run"])
        agent = Process(argv, tmp_path / "agent.log", env=env)
        ns.processes.append(agent)
        yield World(ns, tmp_path, config, agent, notify)
    finally:
        ns.delete()
        notify.close()


def dig(w: World, name: str = "www.lab.test") -> str:
    out = w.ns.run(["dig", "+short", "+time=2", "+tries=1", f"@{STUB}", name], check=False)
    return out.stdout.strip()


def test_daemon_life(world: World) -> None:
    w = world
    assert "READY=1" in w.messages(until="READY=1", wait=10), w.agent.tail()
    deadline = time.monotonic() + 10
    while dig(w) != WWW_A and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dig(w) == WWW_A
    st = w.cli("status", "--json")
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["profile"] == "strict" and status["tunnel"]["mode"] == "private"
    (iface,) = status["interfaces"]
    assert iface["interface"] == "dte0" and iface["network"] == f"dhcp:dte0:{RESOLVER}"
    (r,) = iface["resolvers"]
    assert (r["address"], r["method"], r["auth"], r["used"]) == (
        RESOLVER,
        "tls-port",
        "ip-san",
        True,
    )
    assert "tls-port" in w.cli("status").stdout
    # a broken configuration is refused, the old one kept
    good = w.config.read_text()
    w.config.write_text(good + "\nprofile = 'paranoid'\n")
    w.agent.popen.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert "configuration not reloaded" in w.agent.log.read_text()
    assert dig(w) == WWW_A
    # a good one is taken: opportunistic now
    w.config.write_text(good.replace('profile = "strict"', 'profile = "opportunistic"'))
    w.agent.popen.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while json.loads(w.cli("status", "--json").stdout)["profile"] != "opportunistic":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert dig(w) == WWW_A
    # stop: clean exit, socket gone, state kept
    w.agent.popen.send_signal(signal.SIGTERM)
    assert w.agent.popen.wait(10) == 0
    assert not (w.dir / "run" / "control.sock").exists()
    state = json.loads((w.dir / "state" / "state.json").read_text())
    assert [k["address"] for k in state["knowledge"]] == [RESOLVER]
    assert "STOPPING=1" in w.messages()
    notify = w.cli("notify", "dte0", "up")  # the agent is gone: notify still succeeds
    assert notify.returncode == 0


def test_broken_config_refused_at_start(world: World) -> None:
    w = world
    w.agent.stop()
    w.config.write_text('profile = "strict"\nlisten = ["nowhere"]\n')
    out = w.cli("run")
    assert out.returncode == 2
    assert f"{w.config}:2: listen:" in out.stderr


def test_hostile_configuration_strings(world: World) -> None:
    """A NUL in a string: a reload is refused and systemd is told READY=1 again (not left
    "reloading"); at start, `run` and `config check` refuse it with file:line (exit 2)."""
    w = world
    assert "READY=1" in w.messages(until="READY=1", wait=10), w.agent.tail()
    good = w.config.read_text()
    lines = good.splitlines()

    def spoilt(bad: str) -> tuple[str, int]:
        key = bad.split(" ", maxsplit=1)[0]
        line = next(n for n, text in enumerate(lines, 1) if text.startswith(key + " "))
        w.config.write_text("\n".join(bad if n == line else t for n, t in enumerate(lines, 1)))
        return key, line

    spoilt('ca_file = "/etc/hosts\\u0000"')  # os.access raised ValueError in the reload
    w.agent.popen.send_signal(signal.SIGHUP)
    told = w.messages(until="READY=1", wait=5)
    assert told[told.index("RELOADING=1") :][:2] == ["RELOADING=1", "READY=1"], told
    assert w.agent.alive() and "configuration not reloaded" in w.agent.log.read_text()
    deadline = time.monotonic() + 10
    while dig(w) != WWW_A and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dig(w) == WWW_A  # still serving, with the old configuration
    w.agent.stop()
    for bad in ('lease_dirs = ["/x\\u0000"]', 'ca_file = "/etc/hosts\\u0000"'):
        key, line = spoilt(bad)
        for args in (("config", "check"), ("run",)):
            out = w.cli(*args)
            assert out.returncode == 2, (args, out.stderr)
            assert f"{w.config}:{line}: {key}: " in out.stderr and "Traceback" not in out.stderr
