"""Query latency through the tunnel across a link with a fixed RTT, against PROTOCOL.md 5.

Set-up (root): two network namespaces joined by a userspace delay line
(tests/lab/delayline.py; this kernel has no netem), RTT 20 ms unless --rtt-ms says
otherwise. In "srv", real unbound with TLS on 853 and a certificate for its address
198.51.100.1 from a test CA; in "cli", our tunnel, the real command:

    python -m agent tunnel --upstream 198.51.100.1 --listen 127.0.0.153:53 --profile strict
                           --ca-file CA --idle-timeout 1 [--no-fastopen]

TCP Fast Open is on in both namespaces (net.ipv4.tcp_fastopen=3; unbound is built with
--enable-tfo-server). Queries are dnspython over UDP from sockets made inside "cli",
timed around each query (A www.lab.test, a local-data answer: no recursion).

Situations, and what PROTOCOL.md 5 says they cost:
    direct UDP     straight to unbound on 198.51.100.1:53                     1 RTT
    warm           through the tunnel on a warm connection, interleaved with
                   the direct queries; target: tunnel / direct <= 1.1         1 RTT
    A+AAAA         both sent at once (as getaddrinfo does), the later answer  1 RTT
    cold           a fresh tunnel process, no TFO cookie cached (tcp_metrics
                   flushed): TCP, a full TLS 1.3 handshake, the query         3 RTT
    cold+cookie    a fresh tunnel process, TFO cookie cached: TFO, full TLS   (2 RTT)
    idle, TFO      the first query after the tunnel closed its idle
                   connection: TFO and TLS resumption                         2 RTT
    idle, no TFO   the same with --no-fastopen: resumption only               3 RTT

For each connection it reports whether TLS resumed and whether the SYN carried data,
from the tunnel's own statistics (SIGUSR1: per-upstream 'resumptions', 'fastopen') and
from the kernel (nstat TcpExtTCPFastOpenActive in "cli", ...Passive in "srv").

Servers: Debian 12's unbound (1.17) does not set TCP_NODELAY on its TLS sockets, so
on every new connection its first answer, written right behind the NewSessionTicket,
waits for the client's ACK of the ticket: one more RTT, whatever the client does;
and of two answers in flight the second waits for the ACK of the first (A+AAAA). Newer
unbound sets it (NLnetLabs/unbound#1214, merged January 2025). The situations are measured
against that stock server, then again with TCP_NODELAY set on its listening socket
(inherited by every accepted one; set from outside, through pidfd_getfd) as newer
servers behave: --server stock|nodelay|both (both).

    python bench/tunnel_latency.py [--rtt-ms 20] [--samples 200] [--rounds 10]
                                   [--server both] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.lab.certs import CA  # noqa: E402
from tests.lab.delayline import DelayLab  # noqa: E402
from tests.lab.netns import Netns  # noqa: E402
from tests.lab.proc import need  # noqa: E402
from tests.lab.tunnel import TunnelProcess  # noqa: E402
from tests.lab.unbound import WWW_A, Unbound, UnboundConfig  # noqa: E402

RESOLVER = "198.51.100.1"
STUB = "127.0.0.153"
QNAME = "www.lab.test"
TFO_COUNTERS = ("TcpExtTCPFastOpenActive", "TcpExtTCPFastOpenActiveFail")
TFO_SERVER = ("TcpExtTCPFastOpenPassive", "TcpExtTCPFastOpenPassiveFail")
SYS_PIDFD_GETFD = 438  # the same number on every architecture


@dataclass
class Row:
    """One situation: latencies (ms) and what each connection did."""

    name: str
    budget: str
    ms: list[float] = field(default_factory=list)
    connections: int = 0
    resumed: int = 0  # the tunnel's 'resumptions' counter
    fastopen: int = 0  # the tunnel's 'fastopen' counter
    kernel_active: int = 0  # TcpExtTCPFastOpenActive in cli
    kernel_passive: int = 0  # TcpExtTCPFastOpenPassive in srv

    def to_json(self, rtt_ms: float) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "ms"}
        out.update(figures(self.ms, rtt_ms))
        out["samples_ms"] = [round(v, 3) for v in self.ms]
        return out


def figures(ms: list[float], rtt_ms: float) -> dict[str, float]:
    v = sorted(ms)
    p90 = v[min(len(v) - 1, int(0.9 * len(v)))]
    med = statistics.median(v)
    return {"median": med, "p90": p90, "min": v[0], "max": v[-1], "median_rtt": med / rtt_ms}


# -- the client side -----------------------------------------------------------------


class Client:
    """A UDP socket made inside the client namespace; queries timed in this process."""

    def __init__(self, ns: Netns) -> None:
        self.sock = ns.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM), 5)
        self.query_ms(RESOLVER)  # dnspython's first-use costs, before anything is timed

    def query_ms(self, where: str, port: int = 53) -> float:
        q = dns.message.make_query(QNAME, "A")
        t0 = time.perf_counter()
        r = dns.query.udp(q, where, timeout=5, port=port, sock=self.sock)
        elapsed = (time.perf_counter() - t0) * 1000
        if r.rcode() != dns.rcode.NOERROR or WWW_A not in r.to_text():
            raise RuntimeError(f"bad answer from {where}:\n{r}")
        return elapsed

    def pair_ms(self, where: str, port: int = 53) -> float:
        """A and AAAA sent at once, as getaddrinfo does: the time to the later answer."""
        made = [dns.message.make_query(QNAME, t) for t in ("A", "AAAA")]
        queries: dict[int, dns.message.Message] = {q.id: q for q in made}
        if len(queries) < 2:  # the same random ID twice
            return self.pair_ms(where, port)
        self.sock.settimeout(5)
        t0 = time.perf_counter()
        for q in queries.values():
            self.sock.sendto(q.to_wire(), (where, port))
        while queries:
            r = dns.message.from_wire(self.sock.recv(65535))
            asked = queries.pop(r.id, None)
            if asked is None or not asked.is_response(r) or r.rcode() != dns.rcode.NOERROR:
                raise RuntimeError(f"unexpected answer from {where}:\n{r}")
        return (time.perf_counter() - t0) * 1000

    def close(self) -> None:
        self.sock.close()


def nstat(ns: Netns, names: tuple[str, ...]) -> dict[str, int]:
    """Absolute TCP counters of a namespace (-s: nstat's history file is left alone)."""
    out = ns.run([need("nstat"), "-asz"]).stdout
    values = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in names:
            values[parts[0]] = int(parts[1])
    return values


def listener_nodelay(pid: int, host: str, port: int, on: bool = True) -> None:
    """TCP_NODELAY on another process's listening socket `host:port` (accepted sockets
    inherit it): a copy of each of its sockets through pidfd_getfd, the option set on
    the copy, which is the same socket; then the copy is closed."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    found = False
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                continue
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"pidfd_getfd {pid}/{name}: {os.strerror(err)}")
            with socket.socket(fileno=fd) as s:
                if (
                    s.type == socket.SOCK_STREAM
                    and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and s.getsockname()[:2] == (host, port)
                ):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(on))
                    found = True
    finally:
        os.close(pidfd)
    if not found:
        raise RuntimeError(f"process {pid} has no socket listening on {host}:{port}")


# -- the world ---------------------------------------------------------------------------


@dataclass
class World:
    lab: DelayLab
    tmp: Path
    ca_file: Path
    idle_timeout: float
    runs: int = 0

    @contextmanager
    def tunnel(self, *extra: str) -> Iterator[TunnelProcess]:
        self.runs += 1
        args = ["--upstream", RESOLVER, "--profile", "strict", "--ca-file", str(self.ca_file)]
        args += ["--idle-timeout", str(self.idle_timeout), *extra]
        log = self.tmp / f"tunnel-{self.runs}.log"
        t = TunnelProcess.start(args, log, host=STUB, port=53, netns=self.lab.cli)
        try:
            yield t
        finally:
            t.stop()

    def forget_cookies(self) -> None:
        """Flush the client's TCP metrics, TFO cookies with them: the next SYN asks anew."""
        self.lab.cli.run([need("ip"), "tcp_metrics", "flush", "all"])

    def measured(
        self, row: Row, t: TunnelProcess, client: Client, check: Callable[[dict[str, Any]], None]
    ) -> None:
        """One timed query through the tunnel, with what its connection did."""
        before, k0, s0 = upstream(t), nstat(self.lab.cli, TFO_COUNTERS), self.passive()
        row.ms.append(client.query_ms(STUB))
        after, k1, s1 = upstream(t), nstat(self.lab.cli, TFO_COUNTERS), self.passive()
        row.connections += after["connections"] - before["connections"]
        row.resumed += after["resumptions"] - before["resumptions"]
        row.fastopen += after.get("fastopen", 0) - before.get("fastopen", 0)
        row.kernel_active += k1.get(TFO_COUNTERS[0], 0) - k0.get(TFO_COUNTERS[0], 0)
        row.kernel_passive += s1 - s0
        check(after)

    def passive(self) -> int:
        return nstat(self.lab.srv, TFO_SERVER).get(TFO_SERVER[0], 0)

    def wait_idle(self, t: TunnelProcess) -> None:
        time.sleep(self.idle_timeout + 0.3)
        end = time.monotonic() + 5
        while upstream(t)["state"] != "idle":
            if time.monotonic() > end:
                raise RuntimeError(
                    f"the tunnel did not close its idle connection:\n{t.proc.tail()}"
                )
            time.sleep(0.1)


def upstream(t: TunnelProcess) -> dict[str, Any]:
    up: dict[str, Any] = t.statistics()["upstreams"][0]
    return up


def one_connection(up: dict[str, Any]) -> None:
    if up["state"] != "up":
        raise RuntimeError(f"upstream not up after a query: {up}")


def measure(world: World, samples: int, rounds: int) -> list[Row]:
    client = Client(world.lab.cli)
    direct = Row("direct UDP to unbound", "1 RTT")
    warm = Row("tunnel, warm connection", "1 RTT")
    direct2 = Row("direct UDP: A+AAAA at once, later", "1 RTT")
    warm2 = Row("tunnel, warm: A+AAAA at once, later", "1 RTT")
    cold = Row("cold: new tunnel, no TFO cookie", "3 RTT")
    cookie = Row("cold: new tunnel, TFO cookie", "2 RTT*")
    idle = Row("after idle close: TFO + resumption", "2 RTT")
    idle_plain = Row("after idle close: --no-fastopen", "3 RTT")
    try:
        world.forget_cookies()
        with world.tunnel() as t:
            world.measured(cold, t, client, one_connection)
            for _ in range(5):  # past the first reads (quick ACKs) and any first-time costs
                client.query_ms(STUB)
                client.query_ms(RESOLVER)
            for i in range(samples):  # interleaved, alternating which goes first
                pair = [(warm, STUB), (direct, RESOLVER)]
                for row, where in pair if i % 2 else reversed(pair):
                    row.ms.append(client.query_ms(where))
            for i in range(max(1, samples // 2)):
                pair = [(warm2, STUB), (direct2, RESOLVER)]
                for row, where in pair if i % 2 else reversed(pair):
                    row.ms.append(client.pair_ms(where))
            for _ in range(rounds):
                world.wait_idle(t)
                world.measured(idle, t, client, one_connection)
        for _ in range(rounds - 1):
            world.forget_cookies()
            with world.tunnel() as t:
                world.measured(cold, t, client, one_connection)
        for _ in range(rounds):
            with world.tunnel() as t:
                world.measured(cookie, t, client, one_connection)
        with world.tunnel("--no-fastopen") as t:
            client.query_ms(STUB)
            for _ in range(rounds):
                world.wait_idle(t)
                world.measured(idle_plain, t, client, one_connection)
    finally:
        client.close()
    return [direct, warm, direct2, warm2, cold, cookie, idle, idle_plain]


# -- report -------------------------------------------------------------------------------


def report(rows: list[Row], rtt_ms: float, server: str) -> None:
    print(f"\nserver: {server}")
    head = f"{'situation':36} {'n':>4} {'median':>9} {'p90':>9} {'min':>9} {'max':>9}"
    print(f"{head} {'RTTs':>5} budget  resumed  TFO: tunnel/kernel(cli/srv)")
    for r in rows:
        f = figures(r.ms, rtt_ms)
        line = (
            f"{r.name:36} {len(r.ms):4} {f['median']:7.2f}ms {f['p90']:7.2f}ms "
            f"{f['min']:7.2f}ms {f['max']:7.2f}ms {f['median_rtt']:5.2f} {r.budget:7}"
        )
        if r.connections:
            line += f" {r.resumed:2}/{r.connections:<2}    "
            line += f" {r.fastopen}/{r.connections}  {r.kernel_active}/{r.kernel_passive}"
        print(line)
    for what, (d, w) in (("", rows[0:2]), (", A+AAAA at once", rows[2:4])):
        fd, fw = figures(d.ms, rtt_ms), figures(w.ms, rtt_ms)
        print(
            f"warm tunnel / direct UDP{what}: median {fw['median'] / fd['median']:.3f}, "
            f"p90 {fw['p90'] / fd['p90']:.3f} (target <= 1.1)"
        )


def header(rtt_ms: float, link: list[float], version: str) -> None:
    echo = statistics.median(link) * 1000
    print(
        f"tunnel query latency: RTT {rtt_ms:g} ms (delay line; UDP echo median {echo:.2f} ms), "
        f"{version}, tunnel --profile strict, TCP Fast Open on in both namespaces"
    )
    print("RTTs = median / RTT; resumed, TFO: per new connection; kernel: TFO SYNs (cli/srv)")
    print("* TFO with a full TLS 1.3 handshake: TLS 1.3 takes one round trip, resumed or not")


def unbound_version() -> str:
    out = subprocess.run([need("unbound"), "-V"], capture_output=True, text=True, check=False)
    text = out.stdout
    return text.splitlines()[0].replace("Version", "unbound").strip() if text else "unbound"


def wait_listening(ns: Netns, host: str, port: int) -> None:
    for _ in range(200):
        if f"{host}:{port}" in ns.run(["ss", "-Htln", f"sport = :{port}"]).stdout:
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def run(args: argparse.Namespace) -> None:
    rtt_ms: float = args.rtt_ms
    with tempfile.TemporaryDirectory() as tmp, DelayLab(rtt_ms / 1000, lifetime=1800) as lab:
        d = Path(tmp)
        for ns in (lab.cli, lab.srv):
            ns.sysctl("net.ipv4.tcp_fastopen", 3)
        ca = CA.create(d)
        cert = ca.issue(d, "unbound", ips=(RESOLVER,))
        ub = Unbound.start(
            UnboundConfig(RESOLVER, 53, 853, cert.cert, cert.key), d / "unbound", netns=lab.srv.name
        )
        lab.srv.processes.append(ub.proc)
        wait_listening(lab.srv, RESOLVER, 853)
        link = lab.check(50)
        world = World(lab, d, ca.path, args.idle_timeout)
        version = unbound_version()
        results: dict[str, list[Row]] = {}
        if not args.json:
            header(rtt_ms, link, version)
        for mode in ("stock", "nodelay") if args.server == "both" else (args.server,):
            listener_nodelay(ub.proc.pid, RESOLVER, 853, on=mode == "nodelay")
            results[mode] = rows = measure(world, args.samples, args.rounds)
            if not args.json:
                label = "as packaged (Nagle on)" if mode == "stock" else "TCP_NODELAY set"
                report(rows, rtt_ms, f"{version}, {label}")
        if args.json:
            out = {
                "rtt_ms": rtt_ms,
                "server": version,
                "link_echo_ms": [round(v * 1000, 3) for v in link],
                "rows": {m: [r.to_json(rtt_ms) for r in rows] for m, rows in results.items()},
            }
            print(json.dumps(out, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="round-trip time (20)")
    parser.add_argument("--samples", type=int, default=200, help="warm query pairs (200)")
    parser.add_argument("--rounds", type=int, default=10, help="cold and idle samples (10)")
    parser.add_argument(
        "--idle-timeout", type=float, default=1.0, help="the tunnel's --idle-timeout (1)"
    )
    parser.add_argument(
        "--server",
        choices=("stock", "nodelay", "both"),
        default="both",
        help="unbound as packaged, with TCP_NODELAY, or one then the other (both)",
    )
    parser.add_argument("--json", action="store_true", help="figures and samples as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root: network namespaces and TUN devices")
    run(args)


if __name__ == "__main__":
    main()
