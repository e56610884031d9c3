"""The whole product on one lab machine: what `./scripts/dev run` shows (scripts/demo.py).

    network side  nml-srv-TAG: dnsmasq (DHCP), and resolvers of three kinds:
                  198.51.100.1  unbound, DNS over TLS on 853 (its certificate carries its IP)
                  198.51.100.2  the test peer: 853 black-holed (no SYN-ACK), the upgrade on 53
                  198.51.100.3  the test peer as a cleartext-only resolver
                  tcpdump on the veth: what crossed the wire
    the machine   nml-cli-TAG plus a mount and UTS namespace of its own (tests/lab/nmlab.py):
                  a real NetworkManager on a private bus, its DHCP lease from dnsmasq, its own
                  /etc/resolv.conf, and the real daemon (`python -m agent run`, as root,
                  managing that stub), asked with `status --json` inside the machine

Steps are methods (`start_agent`, `lookup`, `change_lease`, `wire`, ...) so that the caller
narrates and times them; `close()` tears everything down by PID and says what is left
(nothing, unless something went wrong).
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.lab.agentproc import AgentProcess
from tests.lab.capture import Capture, cleartext_queries, leaked
from tests.lab.certs import CA
from tests.lab.machine import pid_alive
from tests.lab.nmlab import NMLab
from tests.lab.peer import spawn
from tests.lab.proc import need
from tests.lab.unbound import Unbound, UnboundConfig, answers, tls_listening

UNBOUND, UPGRADE, CLEAR = "198.51.100.1", "198.51.100.2", "198.51.100.3"
KINDS = {
    UNBOUND: "unbound, TLS on 853",
    UPGRADE: "test peer, 853 black-holed, upgrade on 53",
    CLEAR: "test peer, cleartext only",
}
STUB = "127.0.0.153"
TLS_TYPES = (b"\x14", b"\x15", b"\x16", b"\x17")
PROGRAMS = (
    "ip",
    "NetworkManager",
    "nmcli",
    "dnsmasq",
    "dbus-daemon",
    "nsenter",
    "unshare",
    "unbound",
    "tcpdump",
    "getent",
)


def missing_programs() -> list[str]:
    out = []
    for program in PROGRAMS:
        try:
            need(program)
        except RuntimeError:
            out.append(program)
    return out


@dataclass(frozen=True)
class Lookup:
    name: str
    rc: int
    addresses: list[str]
    seconds: float


@dataclass(frozen=True)
class Wire:
    packets: int
    tls_packets: int  # TCP segments that start with a TLS record
    asked: list[str]  # the names the machine looked up
    leaked: list[str]  # of those, the ones seen in cleartext
    cleartext_questions: list[str]  # every question sent as plain DNS (the probe's dummies)


@dataclass(frozen=True)
class Leftovers:
    stopped: int  # processes stopped by PID
    namespaces: list[str]  # the lab's, deleted
    pids: list[int]  # of those stopped, still alive
    netns: list[str]  # of the lab's namespaces, still listed

    @property
    def clean(self) -> bool:
        return not (self.pids or self.netns)


def netns_list() -> list[str]:
    out = subprocess.run([need("ip"), "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


class DemoMachine:
    """`with DemoMachine(directory) as m:`; the network side and NetworkManager are up once
    entered, the agent starts with `start_agent()`."""

    def __init__(self, directory: Path, profile: str = "strict") -> None:
        self.dir = directory
        self.profile = profile
        self.lab = NMLab(directory / "lab", dns=[UNBOUND, UPGRADE, CLEAR], log_level="INFO")
        self.capture: Capture | None = None
        self.agent: AgentProcess | None = None
        self.asked: list[str] = []
        self.nm_log = ""  # what NMLab said on stderr while starting (its timings)
        self.leftovers: Leftovers | None = None

    # -- start-up ----------------------------------------------------------------------------
    def __enter__(self) -> DemoMachine:
        ca = CA.create(self.dir, name="dnstls-agent demo CA")
        self.ca_path = ca.path
        cert = ca.issue(self.dir, "resolvers", ips=(UNBOUND, UPGRADE, CLEAR))
        said = io.StringIO()
        with contextlib.redirect_stderr(said):
            self.lab.__enter__()
        self.nm_log = said.getvalue().strip()
        try:
            srv = self.lab.srv
            assert srv is not None
            self.lab.add_srv_address(CLEAR)  # .1 and .2 are there already
            self.capture = Capture(srv, self.lab.srv_ifname, self.dir / "wire.pcap")
            ub = Unbound.start(
                UnboundConfig(UNBOUND, 53, 853, cert.cert, cert.key),
                self.dir / "unbound",
                netns=srv.name,
            )
            srv.processes.append(ub.proc)
            tls = ("--cert", str(cert.cert), "--key", str(cert.key))
            spawn(
                self.dir / "peer-upgrade.log",
                "--host",
                UPGRADE,
                "--dns-port",
                "53",
                "--tls-port",
                "853",
                *tls,
                "--fault",
                "blackhole-tls",
                netns=srv,
            )
            spawn(
                self.dir / "peer-cleartext.log",
                "--host",
                CLEAR,
                "--dns-port",
                "53",
                "--tls-port",
                "-1",
                "--no-upgrade",
                netns=srv,
            )
            ready = lambda: answers(UNBOUND, 53) and tls_listening(UNBOUND, 853)  # noqa: E731
            _wait(lambda: srv.call(ready, 5), 10, "unbound answering on 53 and 853")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.leftovers is None:
            self.close()

    @property
    def ifname(self) -> str:
        return self.lab.ifname

    @property
    def namespaces(self) -> list[str]:
        return [self.lab.cli_name, self.lab.srv_name]

    def lease(self) -> tuple[str, list[str]]:
        """(the machine's address, the DNS servers) of NetworkManager's DHCP lease now."""
        opts = self.lab.dhcp4_options()
        return opts.get("ip_address", "?"), opts.get("domain_name_servers", "").split()

    def start_agent(self) -> None:
        assert self.lab.machine is not None
        self.agent = AgentProcess(
            self.lab.machine,
            self.dir / "agent",
            f"""
listen = ["{STUB}:53"]
nm_bus = "{self.lab.bus_address}"
lease_dirs = []
profile = "{self.profile}"
ca_file = "{self.ca_path}"
""",
            manage_stub=True,
        )

    # -- asking ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any] | None:
        """`python -m agent -c CONFIG status --json`, run inside the machine."""
        assert self.agent is not None
        return self.agent.status()

    def wait(
        self, ok: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        assert self.agent is not None
        return self.agent.wait(ok, timeout, what)

    def nameservers(self) -> list[str]:
        """The nameserver lines of the machine's own /etc/resolv.conf."""
        text = self.lab.resolv_conf()
        return [ln.split()[1] for ln in text.splitlines() if ln.startswith("nameserver ")]

    def wait_nameservers(self, want: Sequence[str], timeout: float) -> None:
        _wait(lambda: self.nameservers() == list(want), timeout, f"nameserver {want}")

    def lookup(self, name: str) -> Lookup:
        """`getent ahosts NAME` in the machine: glibc, its resolv.conf, the stub."""
        assert self.lab.machine is not None
        self.asked.append(name)
        t0 = time.monotonic()
        out = self.lab.machine.run(["getent", "ahosts", name], check=False)
        seconds = time.monotonic() - t0
        addrs = list(dict.fromkeys(line.split()[0] for line in out.stdout.splitlines() if line))
        return Lookup(name, out.returncode, addrs, seconds)

    def change_lease(self, servers: Sequence[str]) -> None:
        """dnsmasq hands out `servers` from now on; `nmcli device up` runs DHCP again."""
        self.lab.set_dns(servers)
        self.lab.renew()

    def stop_agent(self) -> int | None:
        """SIGTERM the daemon (it puts the stub back as it stops); its exit status."""
        assert self.agent is not None
        self.agent.proc.stop(10)
        return self.agent.proc.popen.returncode

    def wire(self) -> Wire:
        """Stop the capture: what crossed the network side's interface."""
        assert self.capture is not None
        pkts = self.capture.stop()
        hits = leaked(pkts, self.asked)
        # a TLS record's header: content type 20..23, version 3.x (on 853, or 53 upgraded)
        tls = [
            p
            for p in pkts
            if p.proto == "tcp" and p.payload[:1] in TLS_TYPES and p.payload[1:2] == b"\x03"
        ]
        return Wire(
            packets=len(pkts),
            tls_packets=len(tls),
            asked=list(dict.fromkeys(self.asked)),
            leaked=sorted(hits),
            cleartext_questions=sorted(set(cleartext_queries(pkts))),
        )

    # -- teardown ----------------------------------------------------------------------------
    def close(self) -> Leftovers:
        """Everything by PID (the lab's teardown), then look: any PID still alive, any of
        the lab's namespaces still listed."""
        lab = self.lab
        pids = [p.pid for ns in (lab.machine, lab.cli, lab.srv) if ns for p in ns.processes]
        pids += lab.pids()
        lab.close()
        listed = set(netns_list())
        still = [p for p in pids if pid_alive(p)]
        self.leftovers = Leftovers(
            stopped=len(set(pids)),
            namespaces=self.namespaces,
            pids=still,
            netns=[n for n in self.namespaces if n in listed],
        )
        return self.leftovers


def _wait(ok: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > end:
            raise TimeoutError(f"demo machine: not {what} after {timeout}s")
        time.sleep(0.05)
