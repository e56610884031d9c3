"""Queries lost while the tunnel is handed new orders, under load.

Two upstreams (the test peer, TLS on loopback, answers after 20 ms so that queries are
always in flight). TCP clients pipeline 20 queries each, UDP clients send one at a time;
meanwhile the order is switched every 50 ms between [A, B], [B, A], [B] (A retired with
its in-flight queries) and [A]. Lost = no answer within 3 s, or SERVFAIL.

    python bench/switch_loss.py [--seconds 10] [--tcp 8] [--udp 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dns.asyncquery  # noqa: E402
import dns.exception  # noqa: E402
import dns.message  # noqa: E402
import dns.rcode  # noqa: E402

from agent.dns.wire import frame  # noqa: E402
from agent.model import Method, UpstreamSpec  # noqa: E402
from agent.tunnel.forwarder import Tunnel  # noqa: E402
from agent.tunnel.settings import TunnelConfig  # noqa: E402
from tests.lab.certs import CA  # noqa: E402
from tests.lab.peer import Peer, PeerConfig  # noqa: E402

Counts = dict[str, int]


async def tcp_client(host: str, port: int, until: float, c: Counts) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    n = 0
    while time.monotonic() < until:
        qs = [dns.message.make_query(f"delay-20.t{n}-{i}.test", "A") for i in range(20)]
        n += 1
        writer.write(b"".join(frame(q.to_wire()) for q in qs))
        c["sent"] += len(qs)
        try:
            async with asyncio.timeout(3):
                for _ in qs:
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                    r = dns.message.from_wire(await reader.readexactly(size))
                    c["servfail" if r.rcode() == dns.rcode.SERVFAIL else "ok"] += 1
        except (TimeoutError, asyncio.IncompleteReadError):
            c["timeout"] += 1
            break
    writer.close()


async def udp_client(host: str, port: int, until: float, c: Counts) -> None:
    n = 0
    while time.monotonic() < until:
        q = dns.message.make_query(f"delay-20.u{n}.test", "A")
        n += 1
        c["sent"] += 1
        try:
            r = await dns.asyncquery.udp(q, host, port=port, timeout=3)
            c["servfail" if r.rcode() == dns.rcode.SERVFAIL else "ok"] += 1
        except dns.exception.Timeout:
            c["timeout"] += 1


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cert = CA.create(d).issue(d, "srv", ips=("127.0.0.1",))
        cfg = PeerConfig(cert=cert.cert, key=cert.key)
        async with Peer(cfg) as a, Peer(PeerConfig(cert=cert.cert, key=cert.key)) as b:
            ua = UpstreamSpec("127.0.0.1", Method.TLS_PORT, a.tls_port or 0)
            ub = UpstreamSpec("127.0.0.1", Method.TLS_PORT, b.tls_port or 0)
            t = Tunnel(TunnelConfig(upstreams=(ua, ub), listen=(("127.0.0.1", 0),), cache=None))
            await t.start()
            host, port = t.addresses[0]
            until = time.monotonic() + args.seconds
            tcp: Counts = {"sent": 0, "ok": 0, "servfail": 0, "timeout": 0}
            udp: Counts = dict.fromkeys(tcp, 0)
            clients = [tcp_client(host, port, until, tcp) for _ in range(args.tcp)]
            clients += [udp_client(host, port, until, udp) for _ in range(args.udp)]
            orders = [[ua, ub], [ub, ua], [ub], [ua]]
            switches = 0

            async def switcher() -> None:
                nonlocal switches
                while time.monotonic() < until:
                    t.set_upstreams(orders[switches % len(orders)])
                    switches += 1
                    await asyncio.sleep(0.05)

            await asyncio.gather(switcher(), *clients)
            await t.stop()
    print(f"{switches} order switches in {args.seconds:.0f} s (every 50 ms); answers after 20 ms")
    for name, c in (("TCP", tcp), ("UDP", udp)):
        lost = c["servfail"] + (c["sent"] - c["ok"] - c["servfail"])
        print(f"{name}: {c['sent']} sent, {c['ok']} answered, {c['servfail']} SERVFAIL, "
              f"{c['sent'] - c['ok'] - c['servfail']} unanswered -> lost {lost}")  # fmt: skip


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--tcp", type=int, default=8)
    ap.add_argument("--udp", type=int, default=8)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(ap.parse_args()))
