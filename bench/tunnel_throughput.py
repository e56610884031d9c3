"""Throughput, latency, memory and upstream connections of our tunnel against stubby and unbound.

Everything runs on loopback (127.0.20.0/24), started and stopped by this script, by PID:

    upstream      unbound on 127.0.20.1: :53 plain, :853 TLS with a certificate for IP
                  127.0.20.1 and name upstream.test from a test CA (tests/lab/certs.py);
                  authoritative local-data only (bench.test, --names names n1..nN, TTL 0,
                  so no forwarder can cache them), "." refused: it never recurses
    ours          python -m agent tunnel --upstream 127.0.20.1#upstream.test
                  --listen 127.0.20.6:53 --profile strict --ca-file CA   (asyncio's loop)
    ours-uvloop   the same with --loop uvloop, on 127.0.20.7:53
    stubby        127.0.20.2:53: TLS only, authentication required (auth name, CA),
                  padding 128, idle_timeout 10000 (like anchors-bench.sh)
    unbound-fwd   unbound on 127.0.20.3:53 as a TLS forwarder (forward-tls-upstream,
                  local-zone "test." nodefault)
    direct        no forwarder: dnsperf straight at the upstream over UDP (the ceiling)

The forwarders run on CPU 0 (taskset); the upstream, dnsperf, tcpdump and this script
on CPU 1. Before measuring, each target must answer a query (dig) with the right address.
--reps rounds, each over every target (the order rotates per round); per target and round:

  1. warm-up: 1 s of dnsperf at 1000 qps (connections up; not recorded).
  2. throughput: dnsperf -c 10 -q 100 -l DURATION: qps, lost %, rcodes other than NOERROR.
     Meanwhile: the forwarder's VmRSS (/proc/PID/status, every 50 ms), its CPU time
     (/proc/PID/stat utime+stime, before/after: CPU per answered query) and CPU 1's busy
     share (/proc/stat: near 100 % means the upstream + dnsperf core, not the forwarder,
     was the limit), and the TLS connections to 127.0.20.1:853 (below).
  3. latency: dnsperf -Q 2000 -c 10 -l LATENCY-DURATION -v (default: half of DURATION, which
     keeps the default run under 5 minutes); p50 and p99 are computed here
     from dnsperf's per-query verbose lines (one line per answer, with its latency), since
     dnsperf itself reports only average and standard deviation. At 2000 qps with -c 10
     dnsperf's timing is within ~0.1 ms of the wire (anchors-bench.sh measured it with
     tcpdump); at much lower rates it is not. RSS is sampled here too.

Connections to the upstream during the throughput run, two ways:
  * new connections (exact): tcpdump on lo captures TCP SYNs (SYN set, ACK clear) to
    127.0.20.1:853 from just before to 0.5 s after the run; only the target under load is sent
    queries then, and the warm-up brought its connections up, so every SYN is churn: a
    connection opened while loaded (TFO SYNs are SYNs too). Without tcpdump: "n/a".
    For ours the tunnel's own counter (SIGUSR1 statistics, "connections") is compared.
    The kernel's TCP ActiveOpens counter (/proc/net/snmp) is not used: it counts the
    whole machine.
  * open connections: every 200 ms, the established sockets to 127.0.20.1:853 in
    /proc/net/tcp whose inode is one of the forwarder's file descriptors (what
    `ss -tnp state established dst 127.0.20.1:853` shows, without a process per sample);
    the table gives the largest number seen open at once.

Reading the latency: at 2000 qps the answers of the unbound upstream over TLS wait for
the forwarder's next ACK (unbound writes without TCP_NODELAY, so Nagle holds an answer while
the previous one is unacknowledged, and a forwarder in delayed-ACK mode only acknowledges
with its next query, ~0.5 ms later). stubby and unbound-fwd sit at p50 ~0.6 ms for that
reason; the tunnel sets TCP_QUICKACK while answers are due (before that: 0.65 ms too).

Prints min / median / max per target over the rounds, ratios of ours (and ours-uvloop) to
stubby and unbound-fwd (median qps, median p50, median peak RSS), anomalies (lost queries,
SERVFAILs, connection churn, warnings in the servers' logs) and a markdown table at the end.
Needs root (port 53, taskset, tcpdump) and unbound, stubby, dnsperf, dig. About 4.5 minutes
with the defaults, about 1 minute with --quick.

    python bench/tunnel_throughput.py [--duration 10] [--latency-duration 5] [--reps 3]
                                      [--targets direct,ours,ours-uvloop,stubby,unbound-fwd]
                                      [--names 10000] [--quick] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.lab.certs import CA  # noqa: E402
from tests.lab.proc import Missing, Process, need  # noqa: E402
from tests.lab.tunnel import TunnelProcess  # noqa: E402
from tests.lab.unbound import UnboundConfig, answers, render  # noqa: E402

UP_IP = "127.0.20.1"
AUTH_NAME = "upstream.test"
ZONE = "bench.test"
CPU_FWD = 0
CPU_INFRA = 1
CLIENTS = 10
OUTSTANDING = 100
FIXED_QPS = 2000
WARMUP_QPS = 1000
DNSPERF_TIMEOUT = 5  # s; a query unanswered for this long counts as lost

ADDRESSES = {
    "direct": UP_IP,
    "ours": "127.0.20.6",
    "ours-uvloop": "127.0.20.7",
    "stubby": "127.0.20.2",
    "unbound-fwd": "127.0.20.3",
}
ALL_TARGETS = tuple(ADDRESSES)
COMPARED = ("stubby", "unbound-fwd")


def a_record(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


# -- configuration files -----------------------------------------------------------------


def zone_lines(names: int) -> str:
    lines = [f'    local-zone: "{ZONE}." static']
    lines += [f'    local-data: "n{i}.{ZONE}. 0 IN A {a_record(i)}"' for i in range(1, names + 1)]
    return "\n".join(lines)


UPSTREAM_EXTRA = """    do-ip6: no
    verbosity: 0
    incoming-num-tcp: 1024
    tcp-idle-timeout: 120000
    edns-tcp-keepalive: yes
    edns-tcp-keepalive-timeout: 120000
    outgoing-interface: 127.0.20.1
    do-not-query-localhost: yes
"""


def unbound_fwd_conf(d: Path, ca: Path) -> str:
    ip = ADDRESSES["unbound-fwd"]
    return f"""server:
    verbosity: 1
    use-syslog: no
    logfile: ""
    username: ""
    chroot: ""
    directory: "{d}"
    pidfile: ""
    do-daemonize: no
    interface: {ip}@53
    do-ip6: no
    num-threads: 1
    access-control: 127.0.0.0/8 allow
    module-config: "iterator"
    do-not-query-localhost: no
    outgoing-interface: {ip}
    tls-cert-bundle: "{ca}"
    # unbound serves RFC 6761 "test." as a built-in empty zone; let it be forwarded
    local-zone: "test." nodefault
forward-zone:
    name: "."
    forward-tls-upstream: yes
    forward-addr: {UP_IP}@853#{AUTH_NAME}
remote-control:
    control-enable: no
"""


def stubby_conf(d: Path, ca: Path) -> str:
    return f"""resolution_type: GETDNS_RESOLUTION_STUB
dns_transport_list:
  - GETDNS_TRANSPORT_TLS
tls_authentication: GETDNS_AUTHENTICATION_REQUIRED
tls_query_padding_blocksize: 128
edns_client_subnet_private: 1
idle_timeout: 10000
round_robin_upstreams: 0
appdata_dir: "{d}/stubby-appdata"
tls_ca_file: "{ca}"
listen_addresses:
  - {ADDRESSES["stubby"]}@53
upstream_recursive_servers:
  - address_data: {UP_IP}
    tls_port: 853
    tls_auth_name: "{AUTH_NAME}"
"""


# -- the lab: processes started here, stopped by PID ---------------------------------------


def pinned(cpu: int, *argv: str) -> list[str]:
    return [need("taskset"), "-c", str(cpu), *argv]


def dig_ok(address: str, i: int) -> bool:
    out = subprocess.run(
        [need("dig"), "+time=1", "+tries=1", "+short", f"@{address}", f"n{i}.{ZONE}", "A"],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )
    return out.stdout.split() == [a_record(i)]


def listening(address: str, port: int) -> bool:
    """Something already bound there (UDP or TCP)?"""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:  # connections in TIME_WAIT are no listener
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((address, port))
            except OSError:
                return True
    return False


@dataclass
class Lab:
    tmp: Path
    names: int
    procs: dict[str, Process] = field(default_factory=dict)
    tunnels: dict[str, TunnelProcess] = field(default_factory=dict)
    loop_kind: dict[str, str] = field(default_factory=dict)
    ca: Path = Path()

    def start(self, targets: Sequence[str]) -> None:
        for t in {"direct", *targets}:
            for port in (53, 853) if t == "direct" else (53,):
                if listening(ADDRESSES[t], port):
                    raise RuntimeError(f"{ADDRESSES[t]}:{port} is already in use; another bench?")
        ca = CA.create(self.tmp)
        self.ca = ca.path
        cert = ca.issue(self.tmp, "upstream", ips=(UP_IP,), names=(AUTH_NAME,))
        cert.key.chmod(0o644)  # read by every server, whoever it runs as
        self.start_upstream(cert.cert, cert.key)
        for t in targets:
            if t != "direct":
                self.start_forwarder(t)
        for t in targets:
            self.check(t)

    def start_upstream(self, cert: Path, key: Path) -> None:
        d = self.tmp / "upstream"
        d.mkdir()
        cfg = UnboundConfig(UP_IP, 53, 853, cert, key, UPSTREAM_EXTRA + zone_lines(self.names))
        conf = d / "unbound.conf"
        conf.write_text(render(cfg, d))
        proc = self._spawn("upstream", pinned(CPU_INFRA, need("unbound"), "-d", "-c", str(conf)))
        proc.wait_until(lambda: answers(UP_IP, 53) and self.tls_ready(), 30, "upstream")

    def tls_ready(self) -> bool:
        """A full handshake, authenticated as the forwarders will (a bare TCP connect would
        leave an "ssl handshake failed" in unbound's log)."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        try:
            with (
                socket.create_connection((UP_IP, 853), timeout=1) as raw,
                ctx.wrap_socket(raw, server_hostname=AUTH_NAME) as tls,
            ):
                tls.unwrap()
        except (OSError, ssl.SSLError):
            return False
        return True

    def start_forwarder(self, t: str) -> None:
        d = self.tmp / t
        d.mkdir()
        ip = ADDRESSES[t]
        if t in ("ours", "ours-uvloop"):
            argv = [sys.executable, "-m", "agent", "-v", "tunnel", "--listen", f"{ip}:53"]
            argv += ["--upstream", f"{UP_IP}#{AUTH_NAME}", "--profile", "strict"]
            argv += ["--ca-file", str(self.ca)]
            if t == "ours-uvloop":
                argv += ["--loop", "uvloop"]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            proc = self._spawn(t, pinned(CPU_FWD, *argv), env=env)
            log = proc.log
            proc.wait_until(lambda: "listening on" in log.read_text(), 15, t)
            self.tunnels[t] = TunnelProcess(proc, ip, 53)
        elif t == "stubby":
            (d / "stubby-appdata").mkdir()
            conf = d / "stubby.yml"
            conf.write_text(stubby_conf(d, self.ca))
            self._spawn(t, pinned(CPU_FWD, need("stubby"), "-C", str(conf), "-l", "-v", "5"))
        elif t == "unbound-fwd":
            conf = d / "unbound.conf"
            conf.write_text(unbound_fwd_conf(d, self.ca))
            self._spawn(t, pinned(CPU_FWD, need("unbound"), "-d", "-c", str(conf)))

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        proc = Process(argv, self.tmp / f"{name}.log", env=env)
        self.procs[name] = proc
        return proc

    def check(self, t: str) -> None:
        """The target answers n1, then a few other names, with their own addresses."""
        proc = self.procs.get("upstream" if t == "direct" else t)
        assert proc is not None
        proc.wait_until(lambda: dig_ok(ADDRESSES[t], 1), 20, f"{t} answering {ADDRESSES[t]}")
        for i in (2, 777, self.names):
            if not dig_ok(ADDRESSES[t], i):
                raise RuntimeError(f"{t}: wrong or no answer for n{i}.{ZONE}; log:\n{proc.tail()}")
        if t != "direct":
            self.loop_kind[t] = event_loop_of(proc.pid, t)

    def pid(self, t: str) -> int | None:
        return None if t == "direct" else self.procs[t].pid

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.procs[name].stop()

    def log_problems(self) -> dict[str, list[str]]:
        """Warnings and errors in each server's log (statistics lines excluded)."""
        pattern = re.compile(r"error|warn|fail|critical|refus|timeout|tim(ed)? out", re.I)
        out = {}
        for name, proc in self.procs.items():
            try:
                lines = proc.log.read_text(errors="replace").splitlines()
            except OSError:
                continue
            bad = [ln for ln in lines if pattern.search(ln) and "statistics: " not in ln]
            if bad:
                out[name] = bad
        return out


def event_loop_of(pid: int, t: str) -> str:
    """Which event loop a tunnel process runs on, from the libraries it mapped."""
    if not t.startswith("ours"):
        return ""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "?"
    return "uvloop" if "uvloop" in maps else "asyncio"


# -- measuring -----------------------------------------------------------------------------

_TCP_UPSTREAM = "{:08X}:{:04X}".format(
    int.from_bytes(socket.inet_aton(UP_IP), "little"), 853
)  # 127.0.20.1:853 as /proc/net/tcp writes it


def upstream_sockets() -> set[str]:
    """Inodes of established TCP sockets to the upstream's TLS port."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[2] == _TCP_UPSTREAM and parts[3] == "01":
                inodes.add(parts[9])
    return inodes


def socket_inodes(pid: int) -> set[str]:
    out = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    out.add(link[8:-1])
    return out


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_busy(cpu: int) -> tuple[int, int]:
    """(busy, total) jiffies of one CPU, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            v = [int(x) for x in line.split()[1:]]
            return sum(v) - v[3] - v[4], sum(v)
    return 0, 1


class Sampler:
    """A thread sampling the forwarder's RSS and its open connections to the upstream."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.rss_max = 0
        self.conns_max = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        if self.pid is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        assert self.pid is not None
        n = 0
        while not self._stop.is_set():
            self.rss_max = max(self.rss_max, rss_kb(self.pid) or 0)
            if n % 4 == 0:
                mine = upstream_sockets() & socket_inodes(self.pid)
                self.conns_max = max(self.conns_max, len(mine))
            n += 1
            self._stop.wait(0.05)


@contextlib.contextmanager
def syn_capture(log: Path) -> Iterator[Callable[[], int | None]]:
    """Count SYNs (no ACK) to the upstream's :853 on lo while the block runs (tcpdump)."""
    try:
        tcpdump = need("tcpdump")
    except Missing:
        yield lambda: None
        return
    flt = f"dst host {UP_IP} and tcp dst port 853 and tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn"
    with log.open("w") as out:
        proc = subprocess.Popen(
            pinned(CPU_INFRA, tcpdump, "-i", "lo", "-n", "-l", "-p", flt),
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
        count: list[int | None] = [None]
        try:
            assert proc.stderr is not None
            said = [proc.stderr.readline() for _ in range(2)]  # "listening on lo" when ready
            if not any("listening" in ln for ln in said):
                raise RuntimeError(f"tcpdump did not start: {said}")
            time.sleep(0.2)
            yield lambda: count[0]
            time.sleep(0.5)
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)  # by its PID: tcpdump flushes and exits
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        count[0] = sum(1 for ln in log.read_text().splitlines() if " > " in ln)


def dnsperf(argv: Sequence[str], out: Path, timeout: float) -> str:
    cmd = pinned(CPU_INFRA, need("dnsperf"), *argv, "-t", str(DNSPERF_TIMEOUT))
    with out.open("w") as f:
        # subprocess.run kills its child (by PID) when interrupted
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    return out.read_text(errors="replace")


@dataclass
class Summary:
    qps: float = 0.0
    sent: int = 0
    completed: int = 0
    lost_pct: float = 100.0
    rcodes: dict[str, int] = field(default_factory=dict)
    avg_ms: float | None = None


def parse_summary(text: str) -> Summary:
    s = Summary()
    if m := re.search(r"Queries sent:\s+(\d+)", text):
        s.sent = int(m[1])
    if m := re.search(r"Queries completed:\s+(\d+)", text):
        s.completed = int(m[1])
    if m := re.search(r"Queries lost:\s+\d+ \(([\d.]+)%\)", text):
        s.lost_pct = float(m[1])
    if m := re.search(r"Queries per second:\s+([\d.]+)", text):
        s.qps = float(m[1])
    if m := re.search(r"Response codes:\s+(.*)", text):
        s.rcodes = {k: int(v) for k, v in re.findall(r"([A-Z]+) (\d+) \(", m[1])}
    if m := re.search(r"Average Latency \(s\):\s+([\d.]+)", text):
        s.avg_ms = float(m[1]) * 1000
    return s


_VERBOSE = re.compile(r"^> (\w+) \S+ \S+ ([\d.]+)$", re.M)  # > NOERROR n1.bench.test A 0.000123


def latencies_ms(text: str) -> list[float]:
    return [float(m[2]) * 1000 for m in _VERBOSE.finditer(text)]


@dataclass
class Run:
    target: str
    rep: int
    qps: float
    lost_pct: float
    not_noerror: dict[str, int]
    lat_n: int  # per-query lines parsed from the latency run
    lat_completed: int  # dnsperf's count of answered queries in it
    p50_ms: float | None
    p99_ms: float | None
    lat_lost_pct: float
    dnsperf_avg_ms: float | None
    rss_max_kb: int | None
    cpu_us_per_query: float | None
    fwd_cpu_pct: float | None
    infra_cpu_pct: float
    syns: int | None
    conns_max: int | None
    tunnel_connections: int | None  # the tunnel's own count of connections opened in the run


def tunnel_connections(lab: Lab, t: str) -> int | None:
    tp = lab.tunnels.get(t)
    if tp is None:
        return None
    return sum(int(u["connections"]) for u in tp.statistics()["upstreams"])


def measure(lab: Lab, t: str, rep: int, duration: float, lat_duration: float) -> Run:
    addr = ADDRESSES[t]
    qfile = lab.tmp / "queries.txt"
    pid = lab.pid(t)
    runs = lab.tmp / "runs"
    runs.mkdir(exist_ok=True)
    tag = f"{t}.{rep}"
    base = ["-s", addr, "-d", str(qfile), "-c", str(CLIENTS)]
    slack = duration + DNSPERF_TIMEOUT + 30
    dnsperf([*base, "-Q", str(WARMUP_QPS), "-l", "1"], runs / f"warmup.{tag}.txt", slack)

    conns0 = tunnel_connections(lab, t)
    with syn_capture(runs / f"syn.{tag}.txt") as syns, Sampler(pid) as tput_sampler:
        cpu0 = cpu_seconds(pid) if pid else 0.0
        busy0, total0 = cpu_busy(CPU_INFRA)
        t0 = time.monotonic()
        text = dnsperf(
            [*base, "-q", str(OUTSTANDING), "-l", str(duration)], runs / f"tput.{tag}.txt", slack
        )
        wall = time.monotonic() - t0
        busy1, total1 = cpu_busy(CPU_INFRA)
        cpu1 = cpu_seconds(pid) if pid else 0.0
    conns1 = tunnel_connections(lab, t)
    tput = parse_summary(text)
    if tput.sent == 0:
        raise RuntimeError(f"dnsperf sent nothing to {t}:\n{text[-2000:]}")

    time.sleep(0.5)
    with Sampler(pid) as lat_sampler:
        text = dnsperf(
            [*base, "-Q", str(FIXED_QPS), "-l", str(lat_duration), "-v"],
            runs / f"lat.{tag}.txt",
            slack,
        )
    lat = parse_summary(text)
    ms = latencies_ms(text)
    q = statistics.quantiles(ms, n=100) if len(ms) >= 2 else None
    time.sleep(0.5)

    cpu_used = cpu1 - cpu0
    return Run(
        target=t,
        rep=rep,
        qps=tput.qps,
        lost_pct=tput.lost_pct,
        not_noerror={
            k: v
            for s in (tput, lat)
            for k, v in s.rcodes.items()
            if k != "NOERROR" and v  # both runs together
        },
        lat_n=len(ms),
        lat_completed=lat.completed,
        p50_ms=q[49] if q else None,
        p99_ms=q[98] if q else None,
        lat_lost_pct=lat.lost_pct,
        dnsperf_avg_ms=lat.avg_ms,
        rss_max_kb=max(tput_sampler.rss_max, lat_sampler.rss_max) if pid else None,
        cpu_us_per_query=cpu_used / tput.completed * 1e6 if pid and tput.completed else None,
        fwd_cpu_pct=cpu_used / wall * 100 if pid else None,
        infra_cpu_pct=(busy1 - busy0) / max(1, total1 - total0) * 100,
        syns=syns() if pid else None,
        conns_max=tput_sampler.conns_max if pid else None,
        tunnel_connections=conns1 - conns0 if conns0 is not None and conns1 is not None else None,
    )


# -- report --------------------------------------------------------------------------------


def values(runs: list[Run], t: str, attr: str) -> list[float]:
    return [float(v) for r in runs if r.target == t and (v := getattr(r, attr)) is not None]


def median(runs: list[Run], t: str, attr: str) -> float | None:
    v = values(runs, t, attr)
    return statistics.median(v) if v else None


def spread(v: list[float], fmt: str) -> str:
    """median [min-max], or the one value."""
    if not v:
        return "n/a"
    med = format(statistics.median(v), fmt)
    if len(v) == 1:
        return med
    return f"{med} [{min(v):{fmt}}-{max(v):{fmt}}]"


def table(runs: list[Run], targets: Sequence[str], idle_rss: dict[str, int]) -> str:
    head = (
        "| target | qps | lost % | p50 ms | p99 ms | RSS idle MiB | RSS max MiB "
        "| CPU us/query | fwd CPU % | CPU1 % | new conns/run | open conns (max) |"
    )
    lines = [head, "|---|" + "---|" * 11]
    for t in targets:
        rss = [v / 1024 for v in values(runs, t, "rss_max_kb")]
        idle = f"{idle_rss[t] / 1024:.1f}" if t in idle_rss else "n/a"
        cells = [
            spread(values(runs, t, "qps"), ",.0f"),
            spread(values(runs, t, "lost_pct"), ".2f"),
            spread(values(runs, t, "p50_ms"), ".3f"),
            spread(values(runs, t, "p99_ms"), ".3f"),
            idle,
            spread(rss, ".1f"),
            spread(values(runs, t, "cpu_us_per_query"), ".0f"),
            spread(values(runs, t, "fwd_cpu_pct"), ".0f"),
            spread(values(runs, t, "infra_cpu_pct"), ".0f"),
            spread(values(runs, t, "syns"), ".0f"),
            spread(values(runs, t, "conns_max"), ".0f"),
        ]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(runs: list[Run], targets: Sequence[str]) -> list[str]:
    out = []
    for ours in ("ours", "ours-uvloop"):
        if ours not in targets:
            continue
        for other in COMPARED:
            if other not in targets:
                continue
            parts = []
            for label, attr in (("throughput", "qps"), ("p50", "p50_ms"), ("RSS", "rss_max_kb")):
                a, b = median(runs, ours, attr), median(runs, other, attr)
                parts.append(f"{label} {a / b:.2f}x" if a and b else f"{label} n/a")
            out.append(f"{ours} / {other}: " + ", ".join(parts))
    return out


def anomalies(runs: list[Run], lab: Lab) -> list[str]:
    out = []
    for r in runs:
        where = f"{r.target} round {r.rep}"
        if r.lost_pct > 0 or r.lat_lost_pct > 0:
            out.append(
                f"{where}: lost {r.lost_pct:.2f} % (throughput), {r.lat_lost_pct:.2f} % (latency)"
            )
        if r.lat_n < r.lat_completed:
            out.append(f"{where}: only {r.lat_n} of {r.lat_completed} latency lines parsed")
        if r.not_noerror:
            out.append(f"{where}: answers other than NOERROR: {r.not_noerror}")
        if r.syns:
            extra = ""
            if r.tunnel_connections is not None:
                extra = f" (the tunnel counted {r.tunnel_connections})"
            out.append(f"{where}: {r.syns} new connection(s) to the upstream under load{extra}")
        elif r.tunnel_connections:
            out.append(f"{where}: the tunnel counted {r.tunnel_connections} new connection(s)")
        if r.infra_cpu_pct > 95 and r.target != "direct":
            out.append(f"{where}: CPU 1 (upstream + dnsperf) {r.infra_cpu_pct:.0f} % busy")
    for name, lines in lab.log_problems().items():
        out.append(f"{name} log: {len(lines)} warning/error line(s), e.g. {lines[0][:160]!r}")
    return out


# -- main ----------------------------------------------------------------------------------


def run(args: argparse.Namespace, targets: list[str]) -> None:
    t_start = time.monotonic()
    with contextlib.ExitStack() as stack:
        if args.keep:
            tmp = Path(args.keep)
            tmp.mkdir(parents=True)
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tunnel-tput-")))
        lab = Lab(tmp, args.names)
        try:
            (lab.tmp / "queries.txt").write_text(
                "".join(f"n{i}.{ZONE} A\n" for i in range(1, args.names + 1))
            )
            lab.start(targets)
            time.sleep(1)
            idle_rss = {t: kb for t in targets if (p := lab.pid(t)) and (kb := rss_kb(p))}
            runs: list[Run] = []
            for rep in range(1, args.reps + 1):
                k = (rep - 1) % len(targets)
                for t in targets[k:] + targets[:k]:
                    r = measure(lab, t, rep, args.duration, args.latency_duration)
                    runs.append(r)
                    p50 = f"{r.p50_ms:.3f}" if r.p50_ms is not None else "n/a"
                    print(
                        f"[{time.monotonic() - t_start:5.0f}s] round {rep} {t:12} "
                        f"{r.qps:9,.0f} qps lost {r.lost_pct:.2f} %  p50 {p50} ms  "
                        f"new conns {r.syns if r.syns is not None else 'n/a'}",
                        file=sys.stderr,
                        flush=True,
                    )
            problems = anomalies(runs, lab)
        finally:
            lab.stop()
        report(args, targets, runs, idle_rss, problems, lab, time.monotonic() - t_start)


def report(
    args: argparse.Namespace,
    targets: list[str],
    runs: list[Run],
    idle_rss: dict[str, int],
    problems: list[str],
    lab: Lab,
    elapsed: float,
) -> None:
    loops = ", ".join(f"{t} on {k}" for t, k in lab.loop_kind.items() if k)
    print()
    print(
        f"## DNS over TLS forwarders on loopback: {args.reps} round(s), throughput "
        f"`dnsperf -c {CLIENTS} -q {OUTSTANDING} -l {args.duration:g}`, latency "
        f"`dnsperf -c {CLIENTS} -Q {FIXED_QPS} -l {args.latency_duration:g}`"
    )
    print()
    print(
        f"Forwarder on CPU {CPU_FWD}; upstream unbound, dnsperf and tcpdump on CPU {CPU_INFRA}. "
        f"{args.names} names, TTL 0 (nothing cached). {loops}. Cells: median [min-max] over "
        "the rounds. p50/p99 from dnsperf's per-query lines (-v); RSS = VmRSS; CPU us/query "
        "= the forwarder's CPU time / answered queries; CPU1 % = upstream + dnsperf core busy; "
        "new conns = SYNs to 127.0.20.1:853 during the throughput run (after a warm-up); "
        "open conns = most established to :853 at once."
    )
    print()
    for line in ratios(runs, targets):
        print(f"- {line}")
    print()
    if problems:
        print("Anomalies:")
        for line in problems:
            print(f"- {line}")
    else:
        print("Anomalies: none (no lost queries, only NOERROR, no new connections under load).")
    print()
    print(f"Run time {elapsed:.0f} s.")
    print()
    print(table(runs, targets, idle_rss))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="throughput run, s (10)")
    parser.add_argument(
        "--latency-duration", type=float, help="latency run at 2000 qps, s (half of --duration)"
    )
    parser.add_argument("--reps", type=int, default=3, help="rounds over all targets (3)")
    parser.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated, of {', '.join(ALL_TARGETS)} (all)",
    )
    parser.add_argument("--names", type=int, default=10000, help="names in the zone (10000)")
    parser.add_argument("--quick", action="store_true", help="a smoke check: 1 round of 4 s runs")
    parser.add_argument(
        "--keep", metavar="DIR", help="keep configs, logs and dnsperf outputs in DIR (new)"
    )
    args = parser.parse_args()
    if args.quick:
        args.duration, args.reps = 4.0, 1
    if args.latency_duration is None:
        args.latency_duration = max(1.0, args.duration / 2)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := [t for t in targets if t not in ADDRESSES]:
        parser.error(f"unknown target(s) {unknown}; known: {', '.join(ALL_TARGETS)}")
    if os.geteuid() != 0:
        parser.error("needs root: listeners on port 53, tcpdump")
    try:
        for prog in ("unbound", "dnsperf", "dig", "taskset"):
            need(prog)
    except Missing as exc:
        parser.error(str(exc))
    if "stubby" in targets:
        try:
            need("stubby")
        except Missing as exc:
            print(f"warning: {exc}; no stubby target", file=sys.stderr)
            targets.remove("stubby")
    if (os.cpu_count() or 1) < 2:
        print("warning: fewer than 2 CPUs; forwarder and load share one", file=sys.stderr)
    else:
        os.sched_setaffinity(0, {CPU_INFRA})  # this script and its helpers stay off CPU 0

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # all end in the teardown
        signal.signal(sig, interrupted)
    try:
        run(args, targets)
    except KeyboardInterrupt:
        print("interrupted; everything stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
