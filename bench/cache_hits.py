"""Cache hits: our tunnel's cache against unbound's and systemd-resolved's, same upstream.

Everything runs in one throw-away network namespace, started and stopped by this script,
by PID (the namespace last):

    upstream      unbound on 198.51.100.1 (a veth pair inside the namespace: resolved only
                  sends to a server while some non-loopback link is up with a global
                  address, and caches nothing from 127.0.0.0/8): :53 plain, :853 TLS with a
                  certificate for that IP and the name upstream.test from a test CA.
                  Authoritative local-data only: n1..nN.bench.test, each with its own TTL,
                  log-uniform from 5 s to 4 h (fixed seed); "." refused. It only sees misses;
                  its counter (unbound-control stats_noreset, total.num.queries) gives each
                  contender's hit ratio = 1 - upstream queries / client queries.
    ours          python -m agent tunnel --upstream tls:198.51.100.1#upstream.test
                  --profile strict --ca-file CA --listen 127.0.0.2:53 (its cache as it
                  ships; also its own hit count from the statistics it logs on SIGUSR1)
    ours-nocache  the same with --no-cache, on 127.0.0.4 (when the tunnel has that flag)
    unbound       unbound on 127.0.0.3:53, a TLS forwarder (forward-tls-upstream), one
                  thread, its default caches (also its own total.num.cachehits)
    resolved      systemd-resolved (Debian's package, downloaded with apt-get download into
                  --packages and unpacked, never installed), stub 127.0.0.53, Cache=yes,
                  DNSOverTLS=yes, DNS=198.51.100.1#upstream.test, DNSSEC=no, no bus, in a
                  private mount namespace (tests/lab/resolvedstub.py): nothing of the host
                  changes
    direct        no cache in between: the upstream itself over UDP (the floor: client,
                  kernel and an authoritative answer)

The contenders run on CPU 0 (taskset), the upstream, dnsperf and this script on CPU 1;
one contender at a time is alive. The workload (fixed seed): names drawn Zipf (s = --zipf,
1.0) over the N names; one stream, cut into warm-up, measured and latency parts. Per
contender, on a fresh start (its cache empty):

  1. warm-up: dnsperf -n 1 -c 10 -q 100 over --warmup queries (not recorded).
  2. mixed, throughput: dnsperf -n 1 -c 10 -q 100 over the next --queries queries: qps,
     lost %, rcodes.
  3. mixed, latency: the next --latency queries of the same stream, one at a time from a
     Python UDP client of this script (time.perf_counter_ns around send/recv): p50, p90.
     The hit ratio is over 2 and 3 together (upstream queries / client queries).
  4. hits only: the --hot most popular names whose TTL outlives the run (>= 15 min), all
     cached by then: dnsperf -c 10 -q 100 for --hits-duration s (qps), then --hot-latency
     queries one at a time (p50, p90); the upstream count shows they were hits.
Then, on another fresh start of the same contender: VmRSS (/proc/PID/status) before and
after asking each of the N names once (dnsperf -n 1 -c 1 -q 20), and the entries its cache
then holds (ours: its statistics; unbound: unbound-control dump_cache; resolved: the cache
it dumps to its log on SIGUSR1, at most 4096: CACHE_MAX in its source, and when full it
drops the entries closest to expiry, popular or not): growth per 10,000 entries held.
ours-nocache is the control: what the same load grows without a cache.

During each dnsperf run the contender's CPU time, CPU 1's busy time and every other
process's CPU time are read (/proc/PID/stat, /proc/stat): an anomaly is reported when CPU 1
(the load) was saturated while the contender was not (the load was the limit), or when
other processes (named: another job on the machine, or kernel threads) used more than 10 %
of a CPU meanwhile (the numbers may be low).

Prints a table (hit ratio, qps and p50/p90 mixed, qps and p50 hits-only, RSS growth), our
ratios to resolved and unbound, the issue's targets (hit p50 under 0.1 ms; hits qps at least
resolved's) and anomalies. Needs root (namespaces, port 53) and unbound, unbound-control,
dnsperf, taskset; resolved needs apt-get (first run: a download, then cached). About 1.5
minutes with the defaults, under 1 with --quick.

    python bench/cache_hits.py [--targets direct,ours,ours-nocache,unbound,resolved]
                               [--names 10000] [--queries 200000] [--quick] [--keep DIR]
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import itertools
import math
import os
import random
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.lab.certs import CA  # noqa: E402
from tests.lab.netns import Netns, new_tag, run_ip  # noqa: E402
from tests.lab.proc import Missing, Process, need  # noqa: E402
from tests.lab.resolvconflab import LabError  # noqa: E402
from tests.lab.resolvedlab import fetch_resolved  # noqa: E402
from tests.lab.resolvedstub import STUB, resolved_conf, start_resolved  # noqa: E402
from tests.lab.tunnel import TunnelProcess  # noqa: E402

UP_IP = "198.51.100.1"
AUTH_NAME = "upstream.test"
ZONE = "bench.test"
READY_NAME = f"ready.{ZONE}"
READY_A = "198.51.100.200"
CPU_FWD = 0
CPU_INFRA = 1
CLIENTS = 10
OUTSTANDING = 100
DNSPERF_TIMEOUT = 5  # s; a query unanswered for this long counts as lost
CLIENT_TIMEOUT = 2.0  # s; the same for the latency client
TTL_MIN, TTL_MAX = 5, 4 * 3600
HOT_MIN_TTL = 900  # the hits-only names outlive the run
PACKAGES = Path("/var/tmp/dnstls-bench/packages")

ADDRESSES = {
    "direct": UP_IP,
    "ours": "127.0.0.2",
    "ours-nocache": "127.0.0.4",
    "unbound": "127.0.0.3",
    "resolved": STUB,
}
ALL_TARGETS = tuple(ADDRESSES)
OURS = ("ours", "ours-nocache")


def a_record(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def qname(rank: int) -> str:
    return f"n{rank}.{ZONE}"


# -- the workload ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    names: int
    ttls: list[int]  # ttls[k - 1] is the TTL of name rank k (n{k})
    warmup: list[int]  # ranks, in order
    measured: list[int]
    latency: list[int]
    hot: list[int]
    seed: int
    zipf: float


def make_workload(
    names: int, zipf: float, warmup: int, measured: int, latency: int, hot: int, seed: int
) -> Workload:
    rng = random.Random(seed)
    lo, hi = math.log(TTL_MIN), math.log(TTL_MAX)
    ttls = [round(math.exp(rng.uniform(lo, hi))) for _ in range(names)]
    cum = list(itertools.accumulate(1 / k**zipf for k in range(1, names + 1)))
    total = cum[-1]

    def draw(n: int) -> list[int]:
        return [min(names, bisect.bisect_right(cum, rng.random() * total) + 1) for _ in range(n)]

    stream = draw(warmup + measured + latency)
    hot_names = [k for k in range(1, names + 1) if ttls[k - 1] >= HOT_MIN_TTL][:hot]
    return Workload(
        names=names,
        ttls=ttls,
        warmup=stream[:warmup],
        measured=stream[warmup : warmup + measured],
        latency=stream[warmup + measured :],
        hot=hot_names,
        seed=seed,
        zipf=zipf,
    )


def write_queries(path: Path, ranks: Sequence[int]) -> Path:
    path.write_text("".join(f"{qname(k)} A\n" for k in ranks))
    return path


def query_wire(name: str) -> bytes:
    """A query for NAME A IN, RD set, ID 0 (the client sets it), no EDNS (as dnsperf)."""
    out = bytearray(b"\x00\x00\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00")
    for label in name.rstrip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    out += b"\x00\x00\x01\x00\x01"
    return bytes(out)


# -- configuration files ---------------------------------------------------------------------


def upstream_conf(d: Path, cert: Path, key: Path, w: Workload) -> str:
    data = "\n".join(
        f'    local-data: "{qname(k)}. {w.ttls[k - 1]} IN A {a_record(k)}"'
        for k in range(1, w.names + 1)
    )
    return f"""server:
    interface: {UP_IP}@53
    interface: {UP_IP}@853
    tls-port: 853
    tls-service-key: "{key}"
    tls-service-pem: "{cert}"
    access-control: 0.0.0.0/0 allow
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{d}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 1
    num-threads: 1
    do-ip6: no
    module-config: "iterator"
    incoming-num-tcp: 256
    tcp-idle-timeout: 120000
    edns-tcp-keepalive: yes
    edns-tcp-keepalive-timeout: 120000
    local-zone: "." refuse
    local-zone: "{ZONE}." static
    local-data: "{READY_NAME}. 0 IN A {READY_A}"
{data}
remote-control:
    control-enable: yes
    control-interface: "{d}/control.sock"
    control-use-cert: no
"""


def unbound_fwd_conf(d: Path, ca: Path) -> str:
    return f"""server:
    verbosity: 1
    use-syslog: no
    logfile: ""
    username: ""
    chroot: ""
    directory: "{d}"
    pidfile: ""
    do-daemonize: no
    interface: {ADDRESSES["unbound"]}@53
    do-ip6: no
    num-threads: 1
    access-control: 127.0.0.0/8 allow
    module-config: "iterator"
    tls-cert-bundle: "{ca}"
    # unbound serves RFC 6761 "test." as a built-in empty zone; let it be forwarded
    local-zone: "test." nodefault
forward-zone:
    name: "."
    forward-tls-upstream: yes
    forward-addr: {UP_IP}@853#{AUTH_NAME}
remote-control:
    control-enable: yes
    control-interface: "{d}/control.sock"
    control-use-cert: no
"""


# -- reading processes -----------------------------------------------------------------------


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
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cpu_busy(cpu: int) -> tuple[int, int]:
    """(busy, total) jiffies of one CPU, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            v = [int(x) for x in line.split()[1:]]
            idle = v[3] + v[4]  # idle + iowait
            return sum(v) - idle, sum(v)
    return 0, 1


def machine_task_seconds() -> float:
    """CPU time of all tasks on the machine so far: user, nice and system, every CPU."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (v[0] + v[1] + v[2]) / os.sysconf("SC_CLK_TCK")


def children_seconds() -> float:
    """CPU time of this process's reaped children (dnsperf among them)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def process_cpu() -> dict[int, tuple[str, float]]:
    """Every process's (name, CPU seconds so far)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            text = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        comm = text[text.find("(") + 1 : text.rfind(")")]
        f = text.rsplit(")", 1)[1].split()
        out[int(name)] = (comm, (int(f[11]) + int(f[12])) / tick)
    return out


def others_cpu(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], mine: set[int]
) -> list[tuple[str, float]]:
    """CPU seconds of the processes that are not the bench's, most first (a process started
    meanwhile counts whole; one that ended meanwhile is not seen)."""
    used = []
    for pid, (comm, t) in after.items():
        if pid in mine or comm == "dnsperf":
            continue
        d = t - before.get(pid, (comm, 0.0))[1]
        if d > 0:
            used.append((f"{comm}[{pid}]", d))
    return sorted(used, key=lambda x: -x[1])


def unbound_stats(conf: Path) -> dict[str, float]:
    out = subprocess.run(
        [need("unbound-control"), "-c", str(conf), "stats_noreset"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"unbound-control {conf}: {out.stderr.strip() or out.stdout.strip()}")
    stats = {}
    for line in out.stdout.splitlines():
        k, _, v = line.partition("=")
        with contextlib.suppress(ValueError):
            stats[k] = float(v)
    return stats


# -- the lab ---------------------------------------------------------------------------------


def pinned(cpu: int, *argv: str) -> list[str]:
    return [need("taskset"), "-c", str(cpu), *argv]


def ask(address: str, name: str, timeout: float = 0.5) -> list[str] | None:
    """The A records of NAME from ADDRESS:53 (called inside the namespace), or None."""
    wire = query_wire(name)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(b"\x12\x34" + wire[2:], (address, 53))
            data, _ = s.recvfrom(4096)
        except OSError:
            return None
    if data[:2] != b"\x12\x34" or data[3] & 0x0F:
        return None
    ancount = int.from_bytes(data[6:8], "big")
    pos, out = len(wire), []
    for _ in range(ancount):
        while data[pos] and data[pos] < 0xC0:  # owner: labels, or a pointer
            pos += data[pos] + 1
        pos += 2 if data[pos] >= 0xC0 else 1
        rtype, rdlen = (
            int.from_bytes(data[pos : pos + 2], "big"),
            data[pos + 8] * 256 + data[pos + 9],
        )
        pos += 10
        if rtype == 1 and rdlen == 4:
            out.append(socket.inet_ntoa(data[pos : pos + 4]))
        pos += rdlen
    return out


@dataclass
class Contender:
    target: str
    proc: Process
    tunnel: TunnelProcess | None = None
    control_conf: Path | None = None  # unbound's, for its own statistics

    @property
    def pid(self) -> int:
        return self.proc.pid

    def own(self) -> tuple[int, int] | None:
        """(hits, lookups) by the contender's own count, where it keeps one."""
        if self.tunnel is not None:
            cache = self.tunnel.statistics().get("cache")
            if not cache:
                return None
            return int(cache["hits"]), int(cache["hits"] + cache["misses"])
        if self.control_conf is not None:
            s = unbound_stats(self.control_conf)
            return int(s["total.num.cachehits"]), int(s["total.num.queries"])
        return None

    def entries(self) -> int | None:
        """Answers the cache holds now: ours and unbound's say; resolved dumps its cache to
        its log on SIGUSR1 ("CACHE:", then one tab-indented line per entry)."""
        if self.tunnel is not None:
            cache = self.tunnel.statistics().get("cache")
            return int(cache["entries"]) if cache and "entries" in cache else None
        if self.control_conf is not None:
            out = subprocess.run(
                [need("unbound-control"), "-c", str(self.control_conf), "dump_cache"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if out.returncode != 0:
                return None
            return sum(1 for ln in out.stdout.splitlines() if ln.startswith("msg "))
        if self.target == "resolved":
            return resolved_cache_entries(self.proc)
        return None


def resolved_cache_entries(proc: Process, timeout: float = 5.0) -> int | None:
    before = proc.log.read_text(errors="replace").count("CACHE:")
    proc.popen.send_signal(signal.SIGUSR1)  # by its PID
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = proc.log.read_text(errors="replace")
        if text.count("CACHE:") > before:
            dump = text.rsplit("CACHE:", 1)[1].splitlines()[1:]
            if any(not ln.startswith("\t") for ln in dump):  # the dump goes on past the cache
                return len(list(itertools.takewhile(lambda ln: ln.startswith("\t"), dump)))
        time.sleep(0.05)
    return None


@dataclass
class Lab:
    tmp: Path
    workload: Workload
    packages: Path
    ns: Netns | None = None
    procs: list[Process] = field(default_factory=list)
    ca: Path = Path()
    upstream_conf: Path = Path()
    resolved_root: Path | None = None
    starts: int = 0

    def start(self) -> None:
        self.ns = Netns(f"dta-cache-{new_tag()}")
        run_ip(
            "-n", self.ns.name, "link", "add", "dtacb0", "type", "veth", "peer", "name", "dtacb1"
        )
        run_ip("-n", self.ns.name, "addr", "add", f"{UP_IP}/24", "dev", "dtacb0")
        for dev in ("dtacb0", "dtacb1"):
            run_ip("-n", self.ns.name, "link", "set", dev, "up")
        ca = CA.create(self.tmp)
        self.ca = ca.path
        cert = ca.issue(self.tmp, "upstream", ips=(UP_IP,), names=(AUTH_NAME,))
        cert.key.chmod(0o644)
        d = self.tmp / "upstream"
        d.mkdir()
        self.upstream_conf = d / "unbound.conf"
        self.upstream_conf.write_text(upstream_conf(d, cert.cert, cert.key, self.workload))
        argv = pinned(CPU_INFRA, need("unbound"), "-d", "-c", str(self.upstream_conf))
        proc = self.spawn(self.ns.argv(argv), d / "unbound.log")
        proc.wait_until(lambda: self.answers(UP_IP), 30, "upstream")

    def spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Process:
        proc = Process(argv, log, env=env)
        self.procs.append(proc)
        return proc

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        assert self.ns is not None
        return self.ns.call(fn, timeout)

    def answers(self, address: str, rank: int | None = None) -> bool:
        name, want = (READY_NAME, READY_A) if rank is None else (qname(rank), a_record(rank))
        got: list[str] | None = self.call(lambda: ask(address, name), 5)
        return got == [want]

    def upstream_queries(self) -> int:
        return int(unbound_stats(self.upstream_conf)["total.num.queries"])

    def start_contender(self, t: str) -> Contender:
        assert self.ns is not None
        self.starts += 1
        d = self.tmp / f"{t}.{self.starts}"
        ip = ADDRESSES[t]
        c: Contender
        if t in OURS:
            d.mkdir()
            argv = [sys.executable, "-m", "agent", "-v", "tunnel", "--listen", f"{ip}:53"]
            argv += ["--upstream", f"tls:{UP_IP}#{AUTH_NAME}", "--profile", "strict"]
            argv += ["--ca-file", str(self.ca)]
            if t == "ours-nocache":
                argv.append("--no-cache")
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            proc = self.spawn(self.ns.argv(pinned(CPU_FWD, *argv)), d / "tunnel.log", env)
            log = proc.log
            proc.wait_until(lambda: "listening on" in log.read_text(), 15, t)
            c = Contender(t, proc, tunnel=TunnelProcess(proc, ip, 53))
        elif t == "unbound":
            d.mkdir()
            conf = d / "unbound.conf"
            conf.write_text(unbound_fwd_conf(d, self.ca))
            argv = pinned(CPU_FWD, need("unbound"), "-d", "-c", str(conf))
            c = Contender(t, self.spawn(self.ns.argv(argv), d / "unbound.log"), control_conf=conf)
        elif t == "resolved":
            assert self.resolved_root is not None
            text = resolved_conf([f"{UP_IP}#{AUTH_NAME}"])
            prefix = pinned(CPU_FWD)
            proc = start_resolved(self.ns, self.resolved_root, d, text, self.ca, prefix=prefix)
            self.procs.append(proc)
            c = Contender(t, proc)
        else:
            raise ValueError(t)
        c.proc.wait_until(lambda: self.answers(ip), 20, f"{t} answering on {ip}")
        for rank in (1, 2, self.workload.names):
            if not self.answers(ip, rank):
                raise RuntimeError(f"{t}: wrong or no answer for {qname(rank)}:\n{c.proc.tail()}")
        return c

    def stop_contender(self, c: Contender) -> None:
        c.proc.stop()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        if self.ns is not None:
            self.ns.delete()

    def log_problems(self) -> dict[str, list[str]]:
        pattern = re.compile(r"error|warn|fail|critical|refus|timeout|tim(ed)? out", re.I)
        out = {}
        for proc in self.procs:
            try:
                lines = proc.log.read_text(errors="replace").splitlines()
            except OSError:
                continue
            bad = [
                ln
                for ln in lines  # not the tunnel's statistics, nor resolved's state dump
                if pattern.search(ln) and "statistics: " not in ln and not ln.startswith("\t")
            ]
            if bad:
                out[f"{proc.log.parent.name}/{proc.log.name}"] = bad
        return out


# -- load ------------------------------------------------------------------------------------


@dataclass
class Perf:
    qps: float = 0.0
    sent: int = 0
    completed: int = 0
    lost_pct: float = 100.0
    rcodes: dict[str, int] = field(default_factory=dict)


def parse_dnsperf(text: str) -> Perf:
    p = Perf()
    if m := re.search(r"Queries sent:\s+(\d+)", text):
        p.sent = int(m[1])
    if m := re.search(r"Queries completed:\s+(\d+)", text):
        p.completed = int(m[1])
    if m := re.search(r"Queries lost:\s+\d+ \(([\d.]+)%\)", text):
        p.lost_pct = float(m[1])
    if m := re.search(r"Queries per second:\s+([\d.]+)", text):
        p.qps = float(m[1])
    if m := re.search(r"Response codes:\s+(.*)", text):
        p.rcodes = {k: int(v) for k, v in re.findall(r"([A-Z]+) (\d+) \(", m[1])}
    return p


def dnsperf(lab: Lab, args: Sequence[str], out: Path, limit: float) -> Perf:
    assert lab.ns is not None
    cmd = lab.ns.argv(pinned(CPU_INFRA, need("dnsperf"), *args, "-t", str(DNSPERF_TIMEOUT)))
    cmd += ["-l", f"{limit:g}"]
    with out.open("w") as f:
        # subprocess.run kills its child (by PID) when the time is up or on an interrupt
        subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, timeout=limit + 30, check=False, cwd=ROOT
        )
    text = out.read_text(errors="replace")
    perf = parse_dnsperf(text)
    if perf.sent == 0:
        raise RuntimeError(f"dnsperf sent nothing: {' '.join(cmd)}\n{text[-2000:]}")
    return perf


@dataclass
class Latencies:
    ms: list[float]
    sent: int
    lost: int
    not_noerror: int


def one_at_a_time(address: str, names: Sequence[str], budget: float) -> Latencies:
    """Each name in turn, the next once the answer came: per-query latency (send to receive
    in this process, perf_counter_ns), within `budget` seconds in all."""
    wires = {n: query_wire(n) for n in set(names)}
    ms: list[float] = []
    lost = bad = sent = 0
    end = time.monotonic() + budget
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((address, 53))
        s.settimeout(CLIENT_TIMEOUT)
        for i, name in enumerate(names):
            if i % 256 == 0 and time.monotonic() > end:
                break
            w = wires[name]
            qid = (i & 0xFFFF).to_bytes(2, "big")
            pkt = qid + w[2:]
            question = w[12:].lower()
            sent += 1
            t0 = time.perf_counter_ns()
            s.send(pkt)
            try:
                while True:  # skip a late answer to an earlier query that timed out
                    data = s.recv(4096)
                    if data[:2] == qid and data[12 : len(w)].lower() == question:
                        break
            except TimeoutError:
                lost += 1
                continue
            ms.append((time.perf_counter_ns() - t0) / 1e6)
            if data[3] & 0x0F:
                bad += 1
    return Latencies(ms, sent, lost, bad)


@dataclass
class Pass:
    perf: Perf
    lat: Latencies
    client_queries: int
    upstream_queries: int
    fwd_cpu_pct: float | None  # the contender's CPU time / wall time, during dnsperf
    load_cpu_pct: float  # CPU 1 busy (dnsperf, the upstream), during dnsperf
    others: list[tuple[str, float]]  # other live processes' CPU % meanwhile, most first
    unexplained_pct: float  # the machine's task CPU not spent by the bench, % of one CPU
    own_hits: int | None = None
    own_lookups: int | None = None

    @property
    def hit_ratio(self) -> float | None:
        if not self.client_queries:
            return None
        return 1 - self.upstream_queries / self.client_queries

    @property
    def own_ratio(self) -> float | None:
        if self.own_hits is None or not self.own_lookups:
            return None
        return self.own_hits / self.own_lookups

    def pct(self, q: int) -> float | None:
        if len(self.lat.ms) < 2:
            return None
        return statistics.quantiles(self.lat.ms, n=100)[q - 1]


@dataclass
class Result:
    target: str
    mixed: Pass | None = None
    hits: Pass | None = None
    rss_before_kb: int | None = None
    rss_after_kb: int | None = None
    entries_after: int | None = None
    cache_bytes: int | None = None  # the tunnel's own estimate of what its cache holds
    uncached: bool = False  # ours, and its statistics show no cache (--no-cache, or none yet)
    elapsed: float = 0.0

    @property
    def label(self) -> str:
        return (
            f"{self.target} (no cache)" if self.uncached and self.target == "ours" else self.target
        )

    @property
    def rss_growth_mib(self) -> float | None:
        if self.rss_before_kb is None or self.rss_after_kb is None:
            return None
        return (self.rss_after_kb - self.rss_before_kb) / 1024

    def per_10k_mib(self, names: int) -> float | None:
        """RSS growth per 10,000 entries held (per 10,000 names asked where the count of
        entries is unknown, or none are held: the uncached tunnel)."""
        growth = self.rss_growth_mib
        if growth is None:
            return None
        held = self.entries_after if self.entries_after else names
        return growth * 10000 / held


def measured_pass(
    lab: Lab,
    c: Contender | None,
    address: str,
    dnsperf_args: Sequence[str],
    out: Path,
    limit: float,
    latency_names: Sequence[str],
) -> Pass:
    """dnsperf, then the one-at-a-time client; what reached the upstream meanwhile, and the
    contender's own hit count where it keeps one."""
    own0 = c.own() if c else None
    up0 = lab.upstream_queries()
    procs0, cpu0, t0 = process_cpu(), cpu_seconds(c.pid) if c else 0.0, time.time()
    busy0, total0 = cpu_busy(CPU_INFRA)
    all0, kids0 = machine_task_seconds(), children_seconds()
    perf = dnsperf(lab, ["-s", address, *dnsperf_args], out, limit)
    all1, kids1 = machine_task_seconds(), children_seconds()
    procs1, cpu1, t1 = process_cpu(), cpu_seconds(c.pid) if c else 0.0, time.time()
    busy1, total1 = cpu_busy(CPU_INFRA)
    time.sleep(0.3)
    lat = lab.call(lambda: one_at_a_time(address, latency_names, limit), limit + 30)
    time.sleep(0.3)  # answers to late queries land
    up1 = lab.upstream_queries()
    own1 = c.own() if c else None
    fwd = (cpu1 - cpu0) / (t1 - t0) * 100 if c else None
    load = (busy1 - busy0) / max(1, total1 - total0) * 100
    mine = {os.getpid(), *(proc.pid for proc in lab.procs if proc.alive())}
    others = [(n, sec / (t1 - t0) * 100) for n, sec in others_cpu(procs0, procs1, mine)]
    bench = (
        kids1
        - kids0
        + sum(procs1[i][1] - procs0[i][1] for i in mine if i in procs0 and i in procs1)
    )
    unexplained = max(0.0, (all1 - all0 - bench) / (t1 - t0) * 100)
    p = Pass(perf, lat, perf.sent + lat.sent, up1 - up0, fwd, load, others, unexplained)
    if own0 is not None and own1 is not None:
        p.own_hits, p.own_lookups = own1[0] - own0[0], own1[1] - own0[1]
    return p


def measure(lab: Lab, t: str, args: argparse.Namespace, log: Callable[[str], None]) -> Result:
    w = lab.workload
    runs = lab.tmp / "runs"
    runs.mkdir(exist_ok=True)
    r = Result(t)
    t0 = time.monotonic()
    address = ADDRESSES[t]
    load = ["-c", str(CLIENTS), "-q", str(OUTSTANDING)]
    c = None if t == "direct" else lab.start_contender(t)
    if c is not None and c.tunnel is not None:
        r.uncached = not c.tunnel.statistics().get("cache")
    try:
        if c is not None:
            dnsperf(
                lab,
                ["-s", address, "-d", str(lab.tmp / "warmup.txt"), "-n", "1", *load],
                runs / f"{t}.warmup.txt",
                args.limit,
            )
        r.mixed = measured_pass(
            lab,
            c,
            address,
            ["-d", str(lab.tmp / "measured.txt"), "-n", "1", *load],
            runs / f"{t}.mixed.txt",
            args.limit,
            [qname(k) for k in w.latency],
        )
        log(f"{t:12} mixed  {describe(r.mixed, t)}")
        hot = [qname(k) for k in w.hot]
        r.hits = measured_pass(
            lab,
            c,
            address,
            ["-d", str(lab.tmp / "hot.txt"), *load],
            runs / f"{t}.hits.txt",
            args.hits_duration,
            list(itertools.islice(itertools.cycle(hot), args.hot_latency)),
        )
        log(f"{t:12} hits   {describe(r.hits, t)}")
    finally:
        if c is not None:
            lab.stop_contender(c)
    if c is not None:
        c = lab.start_contender(t)
        try:
            time.sleep(0.5)
            r.rss_before_kb = rss_kb(c.pid)
            dnsperf(
                lab,
                ["-s", address, "-d", str(lab.tmp / "all.txt"), "-n", "1", "-c", "1", "-q", "20"],
                runs / f"{t}.fill.txt",
                args.limit,
            )
            time.sleep(0.5)
            r.rss_after_kb = rss_kb(c.pid)
            r.entries_after = c.entries()
            if c.tunnel is not None and (cache := c.tunnel.statistics().get("cache")):
                r.cache_bytes = cache.get("bytes")
        finally:
            lab.stop_contender(c)
        growth = r.rss_growth_mib
        if growth is not None:
            log(f"{t:12} memory {growth:+.1f} MiB for {w.names} names, {r.entries_after} held")
    r.elapsed = time.monotonic() - t0
    return r


def describe(p: Pass, t: str) -> str:
    ratio = "n/a" if t == "direct" else fmt(p.hit_ratio, ".3f")
    return (
        f"{p.perf.qps:9,.0f} qps lost {p.perf.lost_pct:.2f} %  p50 {fmt(p.pct(50), '.3f')} ms  "
        f"hit ratio {ratio}  CPU fwd/load/others {fmt(p.fwd_cpu_pct, '.0f')}/"
        f"{p.load_cpu_pct:.0f}/{p.unexplained_pct:.0f} %"
    )


# -- report ----------------------------------------------------------------------------------


def fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def table(results: Sequence[Result], names: int) -> str:
    head = (
        "| contender | hit ratio | own count | qps (mixed) | lost % | p50 ms (mixed) "
        "| p90 ms (mixed) | qps (hits) | p50 ms (hits) | p90 ms (hits) | hit ratio (hits) "
        f"| CPU % fwd/load (mixed; hits) | RSS MiB | RSS growth MiB, {names} names asked "
        "| MiB per 10k entries held |"
    )
    lines = [head, "|---|" + "---|" * 14]
    for r in results:
        m, h = r.mixed, r.hits
        entries = f" ({r.entries_after} held)" if r.entries_after is not None else ""
        direct = r.target == "direct"
        cpu = "; ".join(
            f"{fmt(p.fwd_cpu_pct, '.0f')}/{p.load_cpu_pct:.0f}" for p in (m, h) if p is not None
        )
        cells = [
            "n/a" if direct or m is None else fmt(m.hit_ratio, ".3f"),
            fmt(m.own_ratio if m else None, ".3f"),
            fmt(m.perf.qps if m else None, ",.0f"),
            fmt(m.perf.lost_pct if m else None, ".2f"),
            fmt(m.pct(50) if m else None, ".3f"),
            fmt(m.pct(90) if m else None, ".3f"),
            fmt(h.perf.qps if h else None, ",.0f"),
            fmt(h.pct(50) if h else None, ".3f"),
            fmt(h.pct(90) if h else None, ".3f"),
            "n/a" if direct or h is None else fmt(h.hit_ratio, ".3f"),
            cpu,
            fmt(r.rss_after_kb / 1024 if r.rss_after_kb else None, ".1f"),
            fmt(r.rss_growth_mib, "+.1f") + entries,
            fmt(r.per_10k_mib(names), "+.1f"),
        ]
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(results: Sequence[Result], names: int) -> list[str]:
    by = {r.target: r for r in results}
    out = []
    for ours in OURS:
        for other in ("resolved", "unbound"):
            a, b = by.get(ours), by.get(other)
            if a is None or b is None or not (a.mixed and b.mixed and a.hits and b.hits):
                continue
            pairs = [
                ("qps mixed", a.mixed.perf.qps, b.mixed.perf.qps),
                ("p50 mixed", a.mixed.pct(50), b.mixed.pct(50)),
                ("qps hits", a.hits.perf.qps, b.hits.perf.qps),
                ("p50 hits", a.hits.pct(50), b.hits.pct(50)),
                ("RSS per 10k entries", a.per_10k_mib(names), b.per_10k_mib(names)),
            ]
            parts = [f"{k} {x / y:.2f}x" if x and y else f"{k} n/a" for k, x, y in pairs]
            out.append(f"{a.label} / {other}: " + ", ".join(parts))
    return out


def targets_met(results: Sequence[Result], names: int) -> list[str]:
    by = {r.target: r for r in results}
    ours = by.get("ours")
    if ours is None or ours.hits is None:
        return []
    out = ["(our tunnel has no cache in this tree: these are the uncached tunnel's)"]
    if not ours.uncached:
        out = []
    p50 = ours.hits.pct(50)
    if p50 is not None:
        verdict = "met" if p50 < 0.1 else "NOT met"
        out.append(f"cache hits p50 under 0.1 ms on loopback: {p50:.3f} ms, {verdict}")
    res, unb = by.get("resolved"), by.get("unbound")
    if res is not None and res.hits is not None:
        q, rq = ours.hits.perf.qps, res.hits.perf.qps
        verdict = "met" if q >= rq else "NOT met"
        out.append(
            f"hit path qps at least resolved's: {q:,.0f} vs {rq:,.0f} ({q / rq:.2f}x), {verdict}"
        )
    if unb is not None and unb.hits is not None:
        q, uq = ours.hits.perf.qps, unb.hits.perf.qps
        out.append(f"hit path qps against unbound's: {q:,.0f} vs {uq:,.0f} ({q / uq:.2f}x)")
    per10k = ours.per_10k_mib(names)
    if per10k is not None:
        held = f" ({ours.entries_after} entries held)" if ours.entries_after is not None else ""
        line = f"memory per 10,000 entries: {per10k:+.1f} MiB RSS{held}"
        if ours.cache_bytes and ours.entries_after:
            est = ours.cache_bytes / 2**20 * 10000 / ours.entries_after
            line += f" (the cache's own estimate: {est:.1f} MiB)"
        control = by.get("ours-nocache")
        if control is not None and control.rss_growth_mib is not None:
            line += f"; the uncached tunnel grew {control.rss_growth_mib:+.1f} MiB on the same load"
        out.append(line)
    return out


def anomalies(results: Sequence[Result], lab: Lab) -> list[str]:
    out = []
    for r in results:
        for label, p in (("mixed", r.mixed), ("hits", r.hits)):
            if p is None:
                continue
            where = f"{r.target} {label}"
            if p.perf.lost_pct > 0 or p.lat.lost:
                out.append(
                    f"{where}: lost {p.perf.lost_pct:.2f} % (dnsperf), "
                    f"{p.lat.lost} of {p.lat.sent} (latency client)"
                )
            bad = {k: v for k, v in p.perf.rcodes.items() if k != "NOERROR" and v}
            if bad or p.lat.not_noerror:
                out.append(
                    f"{where}: answers other than NOERROR: {bad}, "
                    f"{p.lat.not_noerror} (latency client)"
                )
            if label == "hits" and r.target != "direct" and not r.uncached and p.upstream_queries:
                out.append(f"{where}: {p.upstream_queries} queries reached the upstream")
            if p.unexplained_pct > 10:
                top = ", ".join(f"{n} {pct:.0f} %" for n, pct in p.others[:3] if pct >= 1)
                out.append(
                    f"{where}: other processes used {p.unexplained_pct:.0f} % of a CPU meanwhile "
                    f"(still running: {top or 'none'}; the rest ended before the count): its "
                    "numbers may be low"
                )
            if p.load_cpu_pct > 95 and (p.fwd_cpu_pct is None or p.fwd_cpu_pct < 90):
                out.append(
                    f"{where}: CPU {CPU_INFRA} (dnsperf, upstream) {p.load_cpu_pct:.0f} % busy, "
                    f"the contender {fmt(p.fwd_cpu_pct, '.0f')} %: the load, not the contender, "
                    "may have been the limit"
                )
    for name, lines in lab.log_problems().items():
        out.append(f"{name}: {len(lines)} warning/error line(s), e.g. {lines[0][:160]!r}")
    return out


def report(args: argparse.Namespace, lab: Lab, results: list[Result], elapsed: float) -> None:
    w = lab.workload
    short = sum(1 for t in w.ttls if t < 60)
    print()
    print(
        f"## Cache hits: {w.names} names, Zipf s={w.zipf:g}, TTL log-uniform "
        f"{TTL_MIN} s - {TTL_MAX // 3600} h ({short} names under 60 s), seed {w.seed}"
    )
    print()
    print(
        f"Per contender, fresh: warm-up {len(w.warmup):,} queries; mixed = dnsperf "
        f"-c {CLIENTS} -q {OUTSTANDING} over the next {len(w.measured):,} (qps, lost) + "
        f"{len(w.latency):,} more one at a time from a Python UDP client (p50/p90); hit ratio "
        "= 1 - upstream queries / client queries over both; own count = the contender's "
        f"own hits / lookups. Hits = the {len(w.hot)} most popular names with TTL >= "
        f"{HOT_MIN_TTL} s: dnsperf {args.hits_duration:g} s, then {args.hot_latency:,} one at "
        f"a time. RSS = VmRSS after asking each of the {w.names} names once on another fresh "
        "start; per 10k = growth * 10000 / entries held (by the contender's own count; "
        "resolved's from its SIGUSR1 dump). CPU % fwd/load = the contender's CPU time and "
        f"CPU {CPU_INFRA}'s busy share during dnsperf. Contenders on CPU {CPU_FWD}; upstream, "
        f"dnsperf and the client on CPU {CPU_INFRA}. The passes run at full speed, so a run "
        "spans seconds: TTLs of minutes and more never expire in it, and the hit ratios are "
        "those of a cache that is not yet churning by time."
    )
    print()
    for line in targets_met(results, w.names):
        print(f"- {line}")
    for line in ratios(results, w.names):
        print(f"- {line}")
    print()
    problems = anomalies(results, lab)
    if problems:
        print("Anomalies:")
        for line in problems:
            print(f"- {line}")
    else:
        print("Anomalies: none (no lost queries, only NOERROR, hits-only pass all hits).")
    print()
    print(f"Run time {elapsed:.0f} s.")
    print()
    print(table(results, w.names))


# -- main ------------------------------------------------------------------------------------


def run(args: argparse.Namespace, targets: list[str]) -> None:
    t_start = time.monotonic()

    def log(line: str) -> None:
        if line:
            print(f"[{time.monotonic() - t_start:5.0f}s] {line}", file=sys.stderr, flush=True)

    w = make_workload(
        args.names, args.zipf, args.warmup, args.queries, args.latency, args.hot, args.seed
    )
    with contextlib.ExitStack() as stack:
        if args.keep:
            tmp = Path(args.keep)
            tmp.mkdir(parents=True)
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cache-hits-")))
        lab = Lab(tmp, w, Path(args.packages))
        write_queries(tmp / "warmup.txt", w.warmup)
        write_queries(tmp / "measured.txt", w.measured)
        write_queries(tmp / "hot.txt", w.hot)
        write_queries(tmp / "all.txt", range(1, w.names + 1))
        results: list[Result] = []
        try:
            if "resolved" in targets:
                try:
                    lab.resolved_root = fetch_resolved(lab.packages)
                except (LabError, Missing, OSError, subprocess.SubprocessError) as exc:
                    print(
                        f"warning: no systemd-resolved ({exc}); no resolved target", file=sys.stderr
                    )
                    targets.remove("resolved")
            lab.start()
            log(f"upstream up: {w.names} names")
            for t in targets:
                results.append(measure(lab, t, args, log))
        finally:
            lab.stop()
        report(args, lab, results, time.monotonic() - t_start)


def tunnel_has_no_cache() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "agent", "tunnel", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return "--no-cache" in out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated, of {', '.join(ALL_TARGETS)} (all)",
    )
    parser.add_argument("--names", type=int, default=10000, help="names served (10000)")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s (1.0)")
    parser.add_argument("--warmup", type=int, default=50000, help="warm-up queries (50000)")
    parser.add_argument("--queries", type=int, default=200000, help="mixed, dnsperf (200000)")
    parser.add_argument("--latency", type=int, default=20000, help="mixed, one at a time (20000)")
    parser.add_argument("--hot", type=int, default=100, help="names in the hits pass (100)")
    parser.add_argument("--hits-duration", type=float, default=5.0, help="hits, dnsperf s (5)")
    parser.add_argument(
        "--hot-latency", type=int, default=10000, help="hits, one at a time (10000)"
    )
    parser.add_argument("--seed", type=int, default=1, help="workload seed (1)")
    parser.add_argument(
        "--limit", type=float, default=60.0, help="bound on each dnsperf or client run, s (60)"
    )
    parser.add_argument(
        "--packages", default=str(PACKAGES), help=f"where resolved is unpacked ({PACKAGES})"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke check: smaller passes")
    parser.add_argument("--keep", metavar="DIR", help="keep configs, logs and outputs in DIR (new)")
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.queries, args.latency = 20000, 50000, 5000
        args.hits_duration, args.hot_latency = 2.0, 3000
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := [t for t in targets if t not in ADDRESSES]:
        parser.error(f"unknown target(s) {unknown}; known: {', '.join(ALL_TARGETS)}")
    if os.geteuid() != 0:
        parser.error("needs root: network namespaces, mount namespaces, port 53")
    try:
        for prog in ("unbound", "unbound-control", "dnsperf", "taskset", "ip", "unshare"):
            need(prog)
    except Missing as exc:
        parser.error(str(exc))
    if "ours-nocache" in targets and not tunnel_has_no_cache():
        print(
            "note: the tunnel has no --no-cache (no cache yet); no ours-nocache target",
            file=sys.stderr,
        )
        targets.remove("ours-nocache")
    if (os.cpu_count() or 1) < 2:
        print("warning: fewer than 2 CPUs; contenders and load share one", file=sys.stderr)
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
