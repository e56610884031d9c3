"""A Debian machine on ifupdown's DHCP client: the real dhclient and dhclient-script, whose
`make_resolv_conf` rewrites /etc/resolv.conf in place at every lease event, on a lab
network with real DNS-over-TLS resolvers. Built to watch that file, and the wire, while a
lease changes under the agent.

    network  netns dhl-srv-TAG: veth dhsTAG with 198.51.100.1/24 and .2/24 (SRV_IPS); dnsmasq,
             DHCP only (port=0), no-ping, its DNS options (dns-server, domain-name,
             domain-search) read from a dhcp-optsfile that `set_dns` rewrites before a
             SIGHUP, T1 = `renewal` when given; a real unbound on each address, cleartext
             on 53 and TLS on 853 with the caller's certificate (tests.lab.unbound)
    machine  netns dhl-cli-TAG: veth dhcTAG, no address (dhclient-script sets it), plus a
             mount and UTS namespace pinned by a holder process (`sleep inf`), in which
               /etc          an overlay: the host's /etc the read-only lower layer, writes in
                             DIR/etc-upper; /etc/resolv.conf a plain file, at first empty
               /etc/dhcp     a bind mount of DIR/etc-dhcp: dhclient.conf (Debian's requests),
                             dhclient-enter-hooks.d with the agent's hook only (when `hook`),
                             an empty dhclient-exit-hooks.d; none of the host's hooks
               /var/lib/dhcp a bind mount of DIR/var-lib-dhcp (the lease file; the agent's
                             lease_dirs)
               /run          a tmpfs (dhclient's pid file; no way to the host's services)
             and the hostname "dhcplab" (dhclient-script may set it from the lease).
             `/sbin/dhclient -d -v -4` runs there in the foreground, stopped by PID.

The lease changes two ways, both real: `rerun_dhclient()` stops dhclient and starts it
again (INIT-REBOOT: it asks for its old address at once, dnsmasq ACKs with the options of
now, and dhclient-script runs with reason REBOOT; about 0.05 s), and `renewal=N` makes
dnsmasq send T1 = N seconds, so that dhclient RENEWs every N*3/4..N seconds (dnsmasq's
shortest lease is 2 minutes, but T1 may be anything from 3 s to the lease).

In the machine, for the tests (each a process started with `python -m tests.lab.dhcplab`):
`record()` keeps every version of /etc/resolv.conf it sees (inotify on /etc, and a look
every millisecond besides) and every event on a resolv.conf* file (dhclient-script's own
writes go through `resolv.conf.dhclient-new.PID`, then `cat new > resolv.conf`: an
in-place IN_MODIFY); `query_load()` asks glibc (getaddrinfo, through the machine's
resolv.conf) for a fresh name every few milliseconds and logs each outcome.

The agent runs as root in the machine (`agent()`: AgentProcess with manage_stub, allowed
only because the machine's /etc is its own), stub_backend resolv.conf, lease_dirs the
machine's /var/lib/dhcp; dhclient gets DNSTLS_AGENT (`python -m agent -c ITS_CONFIG`) and
DNSTLS_AGENT_STUB_DIR for the hook through `-e` (dhclient hands its script an environment
of its own making, not its own).

Teardown, also when `__enter__` fails half-way: what was started in the machine (by PID),
any straggler in the machine's mount namespace (a hook's command dhclient left running),
the holder (the mount namespace and its mounts go with the last process in it), then
dnsmasq and unbound with the network namespaces (and the veth pair with them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_MODIFY,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    MASK,
    Inotify,
)
from agent.sysconf.watch import nameservers
from tests.lab.agentproc import AgentProcess
from tests.lab.capture import Capture
from tests.lab.certs import CertFiles
from tests.lab.machine import Holder, Machine
from tests.lab.netns import REPO, SRV_IPS, Netns, new_tag, run_ip
from tests.lab.proc import ClosedOnExit, Process, Teardown, need
from tests.lab.unbound import Unbound, UnboundConfig, answers, tls_listening

HOOK = REPO / "dispatcher.d/dhclient-enter-hooks.d/dnstls-agent"
HOOK_NAME = "dnstls-agent"
DHCLIENT = "/sbin/dhclient"
DHCLIENT_SCRIPT = "/sbin/dhclient-script"
TUNNEL = "127.0.0.153"
HOSTNAME = "dhcplab"
DOMAIN = "lab.test"
DHCP_RANGE = ("198.51.100.50", "198.51.100.150")
# Debian's dhclient.conf, less the comments: what an ifupdown machine asks for
DHCLIENT_CONF = """option rfc3442-classless-static-routes code 121 = array of unsigned integer 8;
send host-name = gethostname();
request subnet-mask, broadcast-address, time-offset, routers,
        domain-name, domain-name-servers, domain-search, host-name,
        dhcp6.name-servers, dhcp6.domain-search, dhcp6.fqdn, dhcp6.sntp-servers,
        netbios-name-servers, netbios-scope, interface-mtu,
        rfc3442-classless-static-routes, ntp-servers;
"""


class LabError(RuntimeError):
    """The lab could not be set up, or did not do what was asked in time."""


# -- what the machine's watchers saw -----------------------------------------------------------
@dataclass(frozen=True)
class Version:
    """One content of /etc/resolv.conf (None: not there, or unreadable) from time t on."""

    t: float  # time.monotonic() (CLOCK_MONOTONIC: the same clock in every process)
    text: str | None

    @property
    def nameservers(self) -> list[str]:
        return nameservers(self.text or "")


@dataclass(frozen=True)
class Event:
    """An inotify event on a file in /etc whose name starts with "resolv.conf" or
    ".resolv.conf" (the agent's temp files)."""

    t: float
    name: str
    mask: int

    @property
    def kinds(self) -> list[str]:
        return [k for bit, k in _MASK_NAMES if self.mask & bit]


@dataclass(frozen=True)
class Recording:
    versions: list[Version]
    events: list[Event]

    def foreign(self, ours: Sequence[str] = (TUNNEL,)) -> list[Version]:
        """The versions that name a nameserver other than `ours`."""
        return [v for v in self.versions if any(ns not in ours for ns in v.nameservers)]

    def in_place_writes(self) -> list[Event]:
        """Writes into resolv.conf itself (not a rename over it): dhclient-script's `cat`."""
        return [e for e in self.events if e.name == "resolv.conf" and e.mask & IN_MODIFY]

    def dhclient_temp_files(self) -> list[str]:
        """Names of the temp files stock make_resolv_conf writes before its `cat`."""
        return sorted({e.name for e in self.events if ".dhclient-new." in e.name})


@dataclass(frozen=True)
class Answer:
    """One getaddrinfo() of the query load: "ok" (an address), "nxdomain" (EAI_NONAME: an
    answer that the name does not exist), or "fail" (EAI_AGAIN and the like: no answer)."""

    t: float
    name: str
    result: str
    took: float


def search(text: str) -> list[str]:
    """The search line's domains, as written (dhclient writes them with a trailing dot)."""
    return [d for ln in text.splitlines() if ln.split()[:1] == ["search"] for d in ln.split()[1:]]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSON-lines file that is perhaps still being written."""
    out = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


class Recorder:
    """Every version of the machine's /etc/resolv.conf, recorded inside the machine."""

    def __init__(self, machine: Machine, out: Path) -> None:
        self.out = out
        argv = [sys.executable, "-m", "tests.lab.dhcplab", "record", str(out)]
        self.proc = machine.start(argv, out.with_suffix(".log"))
        self.proc.wait_until(
            lambda: any("ready" in r for r in _jsonl(out)), 10, "resolv.conf recorder"
        )

    def recording(self) -> Recording:
        versions, events = [], []
        for r in _jsonl(self.out):
            t = float(r["t"])
            if "text" in r:
                text = r["text"]
                versions.append(Version(t, text if isinstance(text, str) else None))
            elif "event" in r:
                events.append(Event(t, str(r["event"]), int(r["mask"])))
        return Recording(versions, events)

    def stop(self) -> Recording:
        time.sleep(0.05)  # a last look
        self.proc.stop()
        return self.recording()


class QueryLoad:
    """Questions through the machine's resolv.conf, one after the other, each a fresh name
    under `prefix`, until stopped."""

    def __init__(self, machine: Machine, out: Path, prefix: str, pause: float = 0.002) -> None:
        self.out = out
        argv = [sys.executable, "-m", "tests.lab.dhcplab", "query", str(out), prefix, str(pause)]
        self.proc = machine.start(argv, out.with_suffix(".log"))
        self.proc.wait_until(lambda: len(_jsonl(out)) > 0, 10, "query load")

    def answers(self) -> list[Answer]:
        return [
            Answer(float(r["t"]), str(r["name"]), str(r["result"]), float(r["took"]))
            for r in _jsonl(self.out)
        ]

    def stop(self) -> list[Answer]:
        self.proc.stop()
        return self.answers()


# -- the lab -----------------------------------------------------------------------------------
class DhcpLab(ClosedOnExit):
    """`with DhcpLab(tmp_path, certs.good_lab) as lab: ...`

    tls        the resolvers' certificate (for 198.51.100.1 and .2, by a CA the agent trusts)
    dns        the DNS servers dnsmasq hands out at first; `domain` its domain-name,
               `search` its domain-search (none by default)
    hook       install the agent's dhclient enter hook (HOOK) in the machine's /etc/dhcp
    renewal    T1 in seconds, 3 or more (dhclient RENEWs that often); None: dnsmasq's (half
               the lease)
    dhclient   start dhclient in __enter__ and wait for its lease (BOUND)

    Once entered: srv, cli (tests.lab.netns.Netns), machine (tests.lab.nmlab.Machine: cli's
    network namespace plus the machine's mount and UTS namespaces), ifname, srv_ifname, dir
    (DIR, with logs/), lease_file (as seen from the host), agent_dir, timings,
    startup_seconds; start_dhclient(), stop_dhclient(), rerun_dhclient(), bound(),
    wait_bound(), set_dns(), install_hook(), remove_hook(), resolv_conf(), agent(),
    record(), query_load(), capture(). Everything started through `machine` or `srv` is
    stopped at teardown.
    """

    def __init__(
        self,
        directory: Path,
        tls: CertFiles,
        *,
        dns: Sequence[str] = (SRV_IPS[0],),
        domain: str = DOMAIN,
        search: Sequence[str] = (),
        hook: bool = True,
        renewal: int | None = None,
        dhclient: bool = True,
        timeout: float = 15.0,
    ) -> None:
        self.tag = new_tag()
        self.parent = directory
        self.tls = tls
        self.dns, self.domain, self.search = list(dns), domain, list(search)
        self.hook = hook
        if renewal is not None and renewal < 3:
            raise ValueError("dnsmasq ignores a T1 of 2 s or less")
        self.renewal = renewal
        self.start_with_dhclient = dhclient
        self.timeout = timeout
        self.ifname = f"dhc{self.tag}"[:15]
        self.srv_ifname = f"dhs{self.tag}"[:15]
        self.dir = Path()
        self.srv: Netns | None = None
        self.cli: Netns | None = None
        self.machine: Machine | None = None
        self.dhclient: Process | None = None
        self.dhclient_runs = 0
        self.timings: dict[str, float] = {}
        self.startup_seconds = 0.0
        self._dnsmasq: Process | None = None
        self._holder: Holder | None = None

    # -- paths ---------------------------------------------------------------------------------
    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def lease_file(self) -> Path:
        """dhclient's lease file, from the host (in the machine: /var/lib/dhcp/...)."""
        return self.dir / "var-lib-dhcp" / f"dhclient.{self.ifname}.leases"

    @property
    def agent_dir(self) -> Path:
        """Where `agent()` keeps the agent's config (agent.toml), state and log."""
        return self.dir / "agent"

    @property
    def hook_path(self) -> Path:
        return self.dir / "etc-dhcp/dhclient-enter-hooks.d" / HOOK_NAME

    def dhclient_env(self) -> dict[str, str]:
        """What dhclient passes on to dhclient-script (and so to the hook) with `-e`."""
        agent = f"{sys.executable} -m agent -c {self.agent_dir / 'agent.toml'}"
        return {"DNSTLS_AGENT": agent, "DNSTLS_AGENT_STUB_DIR": str(self.agent_dir / "state")}

    # -- start-up ------------------------------------------------------------------------------
    def __enter__(self) -> DhcpLab:
        t0 = time.monotonic()

        def mark(what: str) -> None:
            self.timings[what] = time.monotonic() - t0

        try:
            self._layout()
            mark("files")
            self._namespaces()
            mark("netns+veth")
            self._start_dnsmasq()
            mark("dnsmasq")
            self._start_unbound()
            mark("unbound x2")
            self._start_machine()
            mark("machine (mount+uts ns)")
            if self.start_with_dhclient:
                self.start_dhclient()
                mark("dhclient bound")
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.monotonic() - t0
        report = ", ".join(f"{k} +{v:.2f}s" for k, v in self.timings.items())
        (self.dir / "timings.txt").write_text(report + "\n")
        print(f"dhcplab {self.tag}: up in {self.startup_seconds:.2f}s ({report})", file=sys.stderr)
        return self

    def _layout(self) -> None:
        self.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="dhcplab-", dir=self.parent))
        if any(c in str(self.dir) for c in ",: "):
            raise LabError(f"{self.dir}: overlayfs options (and the hook) cannot take ',: '")
        hooks = ("etc-dhcp/dhclient-enter-hooks.d", "etc-dhcp/dhclient-exit-hooks.d")
        for sub in ("srv", "logs", "etc-upper", "etc-work", "var-lib-dhcp", "agent", *hooks):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        for target in ("/etc/dhcp", "/var/lib/dhcp"):
            if not Path(target).is_dir():  # a mount point; the host's own stays untouched
                raise LabError(f"{target} is missing: is isc-dhcp-client installed?")
        (self.dir / "etc-upper/resolv.conf").write_text("")
        (self.dir / "etc-dhcp/dhclient.conf").write_text(DHCLIENT_CONF)
        if self.hook:
            self.install_hook()
        # dnsmasq sends a T1 of ours only when it is more than 2 s (and less than the lease)
        t1 = "" if self.renewal is None else f"dhcp-option=option:T1,{self.renewal}\n"
        (self.dir / "srv/dnsmasq.conf").write_text(
            f"""port=0
interface={self.srv_ifname}
bind-interfaces
except-interface=lo
no-resolv
no-hosts
dhcp-authoritative
# dnsmasq pings an address before offering it; that costs ~3 s on the first lease
no-ping
dhcp-range={DHCP_RANGE[0]},{DHCP_RANGE[1]},255.255.255.0,2m
dhcp-option=option:router,{SRV_IPS[0]}
{t1}dhcp-optsfile={self.dir / "srv/dhcp-opts"}
dhcp-leasefile={self.dir / "srv/dnsmasq.leases"}
log-dhcp
log-facility=-
user=root
group=root
"""
        )
        self._write_dhcp_opts()

    def _write_dhcp_opts(self) -> None:
        lines = [f"option:domain-name,{self.domain}", "option:dns-server," + ",".join(self.dns)]
        if self.search:
            lines.append("option:domain-search," + ",".join(self.search))
        opts = self.dir / "srv/dhcp-opts"
        tmp = opts.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(opts)

    def _namespaces(self) -> None:
        self.srv = Netns(f"dhl-srv-{self.tag}")
        self.cli = Netns(f"dhl-cli-{self.tag}")
        run_ip("link", "add", self.srv_ifname, "netns", self.srv.name, "type", "veth",
            "peer", "name", self.ifname, "netns", self.cli.name)  # fmt: skip
        for ip in SRV_IPS:
            run_ip("-n", self.srv.name, "addr", "add", f"{ip}/24", "dev", self.srv_ifname)
        run_ip("-n", self.srv.name, "link", "set", self.srv_ifname, "up")
        # the machine's side stays down and bare: dhclient-script's PREINIT brings it up

    def _start_dnsmasq(self) -> None:
        assert self.srv is not None
        conf = self.dir / "srv/dnsmasq.conf"
        argv = [need("dnsmasq"), "--keep-in-foreground", f"--conf-file={conf}"]
        self._dnsmasq = self.srv.start(argv, self.logs / "dnsmasq.log")
        self._dnsmasq.wait_until(lambda: "DHCP, IP range" in self._dnsmasq_log(), 10, "dnsmasq")

    def _dnsmasq_log(self) -> str:
        try:
            return (self.logs / "dnsmasq.log").read_text(errors="replace")
        except OSError:
            return ""

    def _start_unbound(self) -> None:
        srv = self.srv
        assert srv is not None
        started = []
        for n, ip in enumerate(SRV_IPS, 1):
            cfg = UnboundConfig(ip, 53, 853, self.tls.cert, self.tls.key)
            ub = Unbound.start(cfg, self.dir / f"unbound{n}", netns=srv.name, wait=False)
            srv.processes.append(ub.proc)
            started.append(ub)
        for ub in started:
            host = ub.cfg.host

            def ready(host: str = host) -> bool:
                return srv.call(lambda: answers(host, 53) and tls_listening(host, 853), 5)

            ub.proc.wait_until(ready, 10, f"unbound on {host}")

    def _start_machine(self) -> None:
        assert self.cli is not None
        holder = Holder.start(self.cli, self.logs / "holder.log")
        self._holder = holder
        self.machine = holder.machine
        holder.overlay_etc(self.dir, "dhcplab")
        mount = need("mount")
        holder.run(mount, "--bind", str(self.dir / "etc-dhcp"), "/etc/dhcp")
        holder.run(mount, "--bind", str(self.dir / "var-lib-dhcp"), "/var/lib/dhcp")
        holder.run(mount, "-t", "tmpfs", "-o", "mode=0755", "dhcplab-run", "/run")
        holder.run(need("hostname"), HOSTNAME)
        if self.resolv_conf() != "":
            raise LabError("the machine's /etc/resolv.conf is not the lab's")

    # -- dhclient ------------------------------------------------------------------------------
    def start_dhclient(self, *, wait: bool = True) -> float:
        """dhclient in the foreground; with `wait`, returns once dhclient-script has run for
        the lease (dhclient logs "bound to" after the script): the seconds that took."""
        assert self.machine is not None
        if self.dhclient is not None and self.dhclient.alive():
            raise LabError("dhclient is already running")
        pidfile = f"/run/dhclient.{self.ifname}.pid"
        if self._holder is not None:  # a stale pid file: dhclient may signal that PID
            with contextlib.suppress(FileNotFoundError):
                self._holder.file(pidfile).unlink()
        env = [a for k, v in self.dhclient_env().items() for a in ("-e", f"{k}={v}")]
        argv = [DHCLIENT, "-d", "-v", "-4", "-sf", DHCLIENT_SCRIPT,
                "-lf", f"/var/lib/dhcp/dhclient.{self.ifname}.leases", "-pf", pidfile,
                *env, self.ifname]  # fmt: skip
        self.dhclient_runs += 1
        log = self.logs / f"dhclient-{self.dhclient_runs}.log"
        t0 = time.monotonic()
        proc = self.machine.start(argv, log)
        self.dhclient = proc
        if wait:
            self.wait_bound()
        return time.monotonic() - t0

    def bound(self) -> int:
        """How many times the running dhclient has bound (BOUND, REBOOT, RENEW...)."""
        if self.dhclient is None:
            return 0
        try:
            return self.dhclient.log.read_text(errors="replace").count("bound to ")
        except OSError:
            return 0

    def wait_bound(self, times: int = 1, timeout: float | None = None) -> None:
        """Until the running dhclient has bound `times` times in all."""
        assert self.dhclient is not None
        self.dhclient.wait_until(
            lambda: self.bound() >= times,
            timeout or self.timeout,
            f"dhclient bound {times}x\ndnsmasq:\n{self._dnsmasq_log()[-1500:]}",
        )

    def stop_dhclient(self) -> None:
        """SIGTERM: dhclient exits without running its script (the address stays)."""
        if self.dhclient is not None:
            self.dhclient.stop()

    def rerun_dhclient(self) -> float:
        """Stop dhclient and start it again (INIT-REBOOT -> reason REBOOT, with the options
        dnsmasq hands out now); the seconds from the start to dhclient-script's end."""
        self.stop_dhclient()
        return self.start_dhclient()

    def set_dns(
        self,
        servers: Sequence[str],
        *,
        domain: str | None = None,
        search: Sequence[str] | None = None,
        timeout: float = 5.0,
    ) -> None:
        """dnsmasq hands out these from now on (dhclient sees them at its next exchange:
        `rerun_dhclient()`, or the next RENEW with `renewal`)."""
        assert self._dnsmasq is not None
        self.dns = list(servers)
        self.domain = domain or self.domain
        self.search = list(search) if search is not None else self.search
        marker = f"read {self.dir}/srv/dhcp-opts"
        before = self._dnsmasq_log().count(marker)
        self._write_dhcp_opts()
        self._dnsmasq.popen.send_signal(signal.SIGHUP)
        self._dnsmasq.wait_until(
            lambda: self._dnsmasq_log().count(marker) > before, timeout, "dnsmasq reload"
        )

    def install_hook(self) -> None:
        """The agent's enter hook, as the package installs it (sourced, so 0644)."""
        if not HOOK.is_file():
            raise LabError(f"{HOOK} is missing")
        shutil.copyfile(HOOK, self.hook_path)
        self.hook_path.chmod(0o644)

    def remove_hook(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.hook_path.unlink()

    # -- the machine ---------------------------------------------------------------------------
    def resolv_conf(self) -> str:
        """The machine's /etc/resolv.conf."""
        assert self._holder is not None
        return self._holder.file("/etc/resolv.conf").read_text()

    def agent(self, profile: str = "strict", ca_file: Path | None = None) -> AgentProcess:
        """`dnstls-agent run` as root in the machine, pointing its stub (stub_backend
        resolv.conf) at the tunnel on TUNNEL:53, following the machine's dhclient leases."""
        assert self.machine is not None
        ca = f'ca_file = "{ca_file}"\n' if ca_file else ""
        config = (
            f'listen = ["{TUNNEL}:53"]\n'
            'stub_backend = "resolv.conf"\n'
            'lease_dirs = ["/var/lib/dhcp"]\n'
            f'nm_bus = "unix:path={self.agent_dir}/no-bus"\n'
            f'profile = "{profile}"\n{ca}'
        )
        return AgentProcess(self.machine, self.agent_dir, config, manage_stub=True)

    def record(self, name: str = "resolv-conf") -> Recorder:
        assert self.machine is not None
        return Recorder(self.machine, self.logs / f"{name}.jsonl")

    def query_load(self, prefix: str, name: str = "queries") -> QueryLoad:
        assert self.machine is not None
        return QueryLoad(self.machine, self.logs / f"{name}.jsonl", prefix)

    def capture(self, name: str = "wire") -> Capture:
        """tcpdump on the network side of the veth: all the machine sends and receives."""
        assert self.srv is not None
        return Capture(self.srv, self.srv_ifname, self.dir / f"{name}.pcap")

    # -- teardown ------------------------------------------------------------------------------
    def close(self) -> None:
        """Tear everything down, whatever state it is in; idempotent."""
        step = Teardown()
        if self.machine is not None:
            for proc in reversed(self.machine.processes):
                step(proc.stop)
        if self._holder is not None:  # a hook's command dhclient left running; then the pin
            step(self._holder.sweep)
            step(self._holder.stop)
        for ns in (self.cli, self.srv):  # dnsmasq and unbound are srv's
            if ns is not None:
                step(ns.delete)
        self.cli = self.srv = self.machine = None
        self._holder = None
        step.done()

    def describe(self) -> str:
        return f"dhcplab {self.tag}"


# -- the machine's watchers, run as `python -m tests.lab.dhcplab record|query ...` --------------
_MASK_NAMES = ((IN_MODIFY, "modify"), (IN_ATTRIB, "attrib"), (IN_CLOSE_WRITE, "close_write"),
               (IN_MOVED_FROM, "moved_from"), (IN_MOVED_TO, "moved_to"), (IN_CREATE, "create"),
               (IN_DELETE, "delete"), (IN_Q_OVERFLOW, "overflow"))  # fmt: skip


def record_main(out: Path, path: str = "/etc/resolv.conf", every: float = 0.001) -> None:
    """Every version of `path` (inotify on its directory, and a look every `every` s), and
    every event on a file named like it; JSON lines, until SIGTERM."""
    notify = Inotify()
    notify.add(Path(path).parent, MASK | IN_MOVED_FROM)
    fd = notify.fd
    base = os.path.basename(path)
    last: object = ()  # nothing yet
    with out.open("a", buffering=1) as f:

        def write(**kw: object) -> None:
            f.write(json.dumps({"t": time.monotonic(), **kw}) + "\n")

        write(ready=True)
        while True:
            select.select([fd], [], [], every)
            for mask, name in notify.events():
                if name.lstrip(".").startswith(base) or mask & IN_Q_OVERFLOW:
                    write(event=name, mask=mask)
            try:
                with open(path, errors="replace") as r:
                    text: str | None = r.read()
            except OSError:
                text = None
            if text != last:
                write(text=text)
                last = text


def query_main(out: Path, prefix: str, pause: float) -> None:
    """getaddrinfo() of PREFIX-N.lab.test, N = 0, 1, ...; one JSON line per outcome."""
    with out.open("a", buffering=1) as f:
        n = 0
        while True:
            name = f"{prefix}-{n}.{DOMAIN}"
            t0 = time.monotonic()
            try:
                socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_DGRAM)
                result = "ok"
            except socket.gaierror as exc:
                result = "nxdomain" if exc.errno == socket.EAI_NONAME else "fail"
            took = time.monotonic() - t0
            f.write(json.dumps({"t": t0, "name": name, "result": result, "took": took}) + "\n")
            n += 1
            time.sleep(pause)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.lab.dhcplab")
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="record every version of /etc/resolv.conf")
    rec.add_argument("out", type=Path)
    q = sub.add_parser("query", help="ask glibc for fresh names until stopped")
    q.add_argument("out", type=Path)
    q.add_argument("prefix")
    q.add_argument("pause", type=float)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.cmd == "record":
        record_main(args.out)
    else:
        # glibc: give up on a silent server after 1 s, once (the default is 5 s, twice)
        os.environ.setdefault("RES_OPTIONS", "timeout:1 attempts:1")
        query_main(args.out, args.prefix, args.pause)


if __name__ == "__main__":
    main()
