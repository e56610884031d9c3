"""The fault matrix's two system rows: the system stub under lease changes and a crash.

The tunnel-level rows (tests/system/test_fault_matrix.py) ask the tunnel directly; these ask
as a program does, through glibc and the machine's /etc/resolv.conf. The lab is the one of
tests/system/test_e2e_privacy.py: a real NetworkManager (dns=default: it writes the
machine's resolv.conf) on a private bus, dnsmasq handing out the DNS servers, two real
unbounds with TLS on 853 (198.51.100.1 and .2, each answering any name under
live.lab.test with an address of its own, 203.0.113.1 or .2), and the agent
(`dnstls-agent run`, strict, manage_stub = true, stub_backend = "auto": the networkmanager
backend) in the machine. A loop there runs `getent ahostsv4` for a fresh name under
live.lab.test, one after the other, for the whole row; tcpdump on the network side's
interface sees everything the machine sends.

    lease-changes    the lease's DNS servers change three times (.2, then .1 and .2, then
                     .1) while glibc asks; plus the refusal: stub_backend = "resolv.conf"
                     where NetworkManager writes the file is refused under strict (exit 2)
    sigkill-restart  the agent is SIGKILLed; ExecStopPost's `restore --unless-restarting`
                     (SERVICE_RESULT=signal) keeps the stub pointed at the tunnel: no DNS
                     rather than cleartext; the agent started again answers again; a plain
                     `restore` puts the network's resolv.conf back

The rule, in both: not one asked name in cleartext on the wire. Each prints a one-line
summary (names asked, answered, seen in cleartext).
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Certs, host_untouched
from tests.lab.agentproc import AgentProcess
from tests.lab.capture import Capture, Packet, leaked_with_prefix
from tests.lab.netns import Netns
from tests.lab.nmlab import NMLab
from tests.lab.proc import Process
from tests.lab.unbound import Unbound, UnboundConfig

pytestmark = pytest.mark.system

FIRST, SECOND = "198.51.100.1", "198.51.100.2"
ANSWER = {FIRST: "203.0.113.1", SECOND: "203.0.113.2"}
STUB = "127.0.0.153"
LIVE = "live.lab.test"
PROGRAMS = ("ip", "NetworkManager", "nmcli", "dnsmasq", "dbus-daemon", "nsenter", "unshare",
            "unbound", "tcpdump", "getent", "env")  # fmt: skip
# The share of lookups of existing names that must be answered while the lease changes
# (each `nmcli device up` takes the device down and up again: a moment without resolvers)
MIN_ANSWERED = 0.8
DWELL = 2.0  # seconds of asking in each state (a lease, the agent down, the agent back)

# glibc asking continuously: one `getent ahostsv4` after the other (20 ms apart), each for
# a fresh name, until the stop file exists; one JSON line per lookup.
ASKER = r"""
import json, subprocess, sys, time
from pathlib import Path
prefix, out, stop, zone = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
i = 0
with out.open("a") as f:
    while not stop.exists():
        i += 1
        name = f"{prefix}-{i:05d}.{zone}"
        t0 = time.time()
        try:
            res = subprocess.run(["getent", "ahostsv4", name], capture_output=True, text=True,
                                 timeout=15)
            rc, addr = res.returncode, (res.stdout.split() or [""])[0]
        except subprocess.TimeoutExpired:
            rc, addr = -1, ""
        f.write(json.dumps({"t0": t0, "t1": time.time(), "name": name, "rc": rc,
                            "addr": addr}) + "\n")
        f.flush()
        time.sleep(0.02)
"""


@dataclass(frozen=True)
class Lookup:
    t0: float  # wall clock, when getent started
    t1: float  # and when it ended
    name: str
    rc: int
    addr: str

    @property
    def answered(self) -> bool:
        return self.rc == 0 and self.addr in ANSWER.values()


class Asker:
    """The loop of getent in the machine (a process of the lab: stopped at teardown)."""

    def __init__(self, machine: Netns, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.prefix = f"fr-{secrets.token_hex(4)}"
        self.out = directory / "lookups.jsonl"
        self.stop_file = directory / "stop"
        argv = [sys.executable, "-c", ASKER, self.prefix, str(self.out), str(self.stop_file), LIVE]
        self.proc: Process = machine.start(argv, directory / "asker.log")

    def lookups(self) -> list[Lookup]:
        if not self.out.exists():
            return []
        lines = self.out.read_text().splitlines()
        return [Lookup(**json.loads(line)) for line in lines if line.endswith("}")]

    def wait(self, ok: Callable[[list[Lookup]], bool], timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ok(self.lookups()):
                return
            if not self.proc.alive():
                raise AssertionError(f"the getent loop died: {self.proc.tail(10)}")
            time.sleep(0.05)
        last = self.lookups()[-5:]
        raise AssertionError(f"glibc: not {what} after {timeout}s; last lookups {last}")

    def stop(self) -> list[Lookup]:
        self.stop_file.touch()
        try:
            self.proc.popen.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.stop()
        self.proc.stop()  # closes the log
        return self.lookups()


@dataclass
class World:
    lab: NMLab
    capture: Capture
    tmp: Path
    ca: Path

    @property
    def machine(self) -> Netns:
        assert self.lab.machine is not None
        return self.lab.machine

    def config(self, backend: str = "auto") -> str:
        """The agent's (beside AgentProcess's state_dir and runtime_dir); root's journal of
        the stub in the test's directory, not the host's /var/lib."""
        return f"""listen = ["{STUB}:53"]
stub_state_dir = "{self.tmp}/stub-state-{backend}"
nm_bus = "{self.lab.bus_address}"
lease_dirs = []
profile = "strict"
ca_file = "{self.ca}"
stub_backend = "{backend}"
"""

    def agent(self) -> AgentProcess:
        """The agent (again: the same directory, so the same state_dir), ready and pointed."""
        agent = AgentProcess(self.machine, self.tmp / "agent", self.config(), manage_stub=True)
        self.wait_order(agent, self.lab.initial_dns, "ready")
        wait_for(lambda: nameservers(self.lab.resolv_conf()) == [STUB], 10, "the stub pointed")
        return agent

    def wait_order(self, agent: AgentProcess, servers: list[str], what: str) -> None:
        want = {f"tls-port:{ip}@853" for ip in servers}
        agent.wait(lambda s: set(s["order"]) == want, 25, what)

    def cli(
        self, conf: Path, *args: str, env: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """`dnstls-agent -c CONF ARGS` in the machine, as root (as the unit's ExecStopPost=+)."""
        argv = ["env", *env, sys.executable, "-m", "agent", "-c", str(conf), *args]
        return self.machine.run(argv, check=False)

    def cleartext(
        self, names: list[str], prefix: str
    ) -> tuple[list[Packet], dict[str, list[Packet]]]:
        pkts = self.capture.stop()
        assert any(p.dport == 853 and p.payload for p in pkts), "no TLS captured: proves nothing"
        return pkts, leaked_with_prefix(pkts, names, prefix)


def nameservers(text: str) -> list[str]:
    return [ln.split()[1] for ln in text.splitlines() if ln.startswith("nameserver ")]


def wait_for(ok: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > end:
            raise AssertionError(f"not {what} after {timeout}s")
        time.sleep(0.05)


def answered_by(after: float, addrs: set[str]) -> Callable[[list[Lookup]], bool]:
    """A lookup started after `after` got one of `addrs` (the resolvers of the lease)."""
    return lambda ls: any(lk.t0 > after and lk.answered and lk.addr in addrs for lk in ls)


def evidence(leaks: dict[str, list[Packet]], lookups: list[Lookup], t_start: float) -> str:
    """Which names, when they were asked (seconds into the row), to which address."""
    asked = {lk.name: lk for lk in lookups}
    out = []
    for name, pkts in sorted(leaks.items()):
        lk = asked.get(name)
        when = f"{lk.t0 - t_start:.2f}s (rc {lk.rc})" if lk else "?"
        where = sorted({f"{p.proto} {p.src}:{p.sport}->{p.dst}:{p.dport}" for p in pkts})
        out.append(f"{name} asked at {when}: {', '.join(where)}")
    return "\n".join(out)


@pytest.fixture
def world(certs: Certs, tmp_path: Path) -> Iterator[World]:
    with host_untouched(PROGRAMS):
        cert = certs.ca.issue(tmp_path, "resolvers", ips=(FIRST, SECOND))
        with NMLab(tmp_path / "lab", dns=[FIRST], log_level="INFO") as lab:
            assert lab.srv is not None
            capture = Capture(lab.srv, lab.srv_ifname, tmp_path / "wire.pcap")
            for ip in (FIRST, SECOND):
                extra = (f'    local-zone: "{LIVE}." redirect\n'
                         f'    local-data: "{LIVE}. 0 IN A {ANSWER[ip]}"\n')  # fmt: skip
                cfg = UnboundConfig(ip, 53, 853, cert.cert, cert.key, extra)
                ub = Unbound.start(cfg, tmp_path / f"ub-{ip}", netns=lab.srv.name)
                lab.srv.processes.append(ub.proc)
            yield World(lab, capture, tmp_path, certs.ca.path)


def test_lease_changes_strict(world: World) -> None:
    w = world
    t_start = time.time()
    # the refusal first, with NetworkManager writing resolv.conf: nothing changes
    refused = w.tmp / "refused"
    refused.mkdir()
    conf = refused / "agent.toml"
    conf.write_text(
        f'state_dir = "{refused}/state"\nruntime_dir = "{refused}/run"\nmanage_stub = true\n'
        + w.config("resolv.conf")
    )
    before = w.lab.resolv_conf()
    assert nameservers(before) == [FIRST]
    out = w.cli(conf, "stub")
    assert out.returncode == 2, out.stdout + out.stderr
    assert 'stub_backend = "networkmanager"' in out.stderr, out.stderr
    assert w.lab.resolv_conf() == before
    assert not (w.tmp / "stub-state-resolv.conf/stub.json").exists()

    agent = w.agent()
    asker = Asker(w.machine, w.tmp / "asker")
    asker.wait(lambda ls: sum(lk.answered for lk in ls) >= 5, 15, "answering")
    for servers in ([SECOND], [FIRST, SECOND], [FIRST]):
        w.lab.set_dns(servers)
        w.lab.renew()
        w.wait_order(agent, servers, f"following the lease to {servers}")
        changed = time.time()
        assert nameservers(w.lab.resolv_conf()) == [STUB]
        expect = {ANSWER[ip] for ip in servers}
        asker.wait(answered_by(changed, expect), 10, f"answered by {servers}")
        time.sleep(DWELL)
    lookups = asker.stop()
    names = [lk.name for lk in lookups]
    _pkts, leaks = w.cleartext(names, asker.prefix)
    answered = sum(lk.answered for lk in lookups)
    print(f"\nlease-changes strict: {len(leaks)} names in cleartext of {len(names)} asked, "
          f"{answered} answered")  # fmt: skip
    assert leaks == {}, evidence(leaks, lookups, t_start)
    assert answered >= MIN_ANSWERED * len(lookups), [lk for lk in lookups if not lk.answered]


def test_sigkill_restart_strict(world: World) -> None:
    w = world
    t_start = time.time()
    agent = w.agent()
    conf = agent.config
    asker = Asker(w.machine, w.tmp / "asker")
    asker.wait(lambda ls: sum(lk.answered for lk in ls) >= 5, 15, "answering")

    agent.proc.popen.send_signal(signal.SIGKILL)
    agent.proc.popen.wait(5)
    killed = time.time()
    # what systemd's ExecStopPost sees after a SIGKILL under Restart=always
    facts = ("SERVICE_RESULT=signal", "EXIT_CODE=killed", "EXIT_STATUS=KILL")
    out = w.cli(conf, "restore", "--unless-restarting", env=facts)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "left pointed at the tunnel" in out.stdout, out.stdout
    assert nameservers(w.lab.resolv_conf()) == [STUB]
    # no DNS meanwhile (nothing listens on the stub), rather than cleartext
    time.sleep(DWELL)
    asker.wait(lambda ls: sum(lk.t0 > killed for lk in ls) >= 5, 15, "asking while down")
    down = [lk for lk in asker.lookups() if lk.t0 > killed]
    assert nameservers(w.lab.resolv_conf()) == [STUB]

    restarted = time.time()
    agent = w.agent()
    asker.wait(
        lambda ls: any(lk.t0 > restarted and lk.answered for lk in ls), 15, "answering again"
    )
    back = min(lk.t1 for lk in asker.lookups() if lk.t0 > restarted and lk.answered)
    time.sleep(DWELL)
    lookups = asker.stop()

    # the final stop by hand: killed again, then a plain restore puts the network's back
    agent.proc.popen.send_signal(signal.SIGKILL)
    agent.proc.popen.wait(5)
    final = w.cli(conf, "restore")
    end = time.monotonic() + 10
    while nameservers(w.lab.resolv_conf()) != [FIRST] and time.monotonic() < end:
        time.sleep(0.05)
    after = w.lab.resolv_conf()

    names = [lk.name for lk in lookups]
    _pkts, leaks = w.cleartext(names, asker.prefix)
    answered = sum(lk.answered for lk in lookups)
    put_back = "put back" if nameservers(after) == [FIRST] else f"NOT put back ({final.returncode})"
    print(f"\nsigkill-restart strict: {len(leaks)} names in cleartext of {len(names)} asked, "
          f"{answered} answered; {len(down)} asked while down, "
          f"{sum(lk.answered for lk in down)} answered (stub kept at {STUB}); answers again "
          f"{back - restarted:.1f}s after the restart; final restore: network's resolv.conf "
          f"{put_back}")  # fmt: skip
    assert leaks == {}, evidence(leaks, lookups, t_start)
    assert not any(lk.answered for lk in down), [lk for lk in down if lk.answered]
    assert final.returncode == 0, final.stdout + final.stderr
    assert nameservers(after) == [FIRST] and STUB not in after, after
