"""How long the prober takes to decide, per network situation, against the connect timeout.

Situations (as root: test peers behind a real nftables firewall in network namespaces;
otherwise on loopback, where a full accept queue stands in for a firewall DROP):
    open          TLS on 853 answers
    853-dropped   853 silently dropped (no SYN-ACK), the STARTTLS upgrade on 53 works
    both-refused  nothing listens: 853 and 53 refuse
    all-dropped   everything silently dropped (only the deadline ends it)

Prints min / median / max of the decision time over --rounds probes each, and the median
as a fraction of the connect timeout: a black-holed 853 should cost the fallback delay,
not the timeout.

    python bench/probe_decision.py [--rounds 20] [--connect-timeout 3] [--timeout 5]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.model import ProbeSettings  # noqa: E402
from agent.probe import probe  # noqa: E402
from tests.lab.certs import CA  # noqa: E402
from tests.lab.netns import SRV_IPS, Lab  # noqa: E402
from tests.lab.peer import Blackhole, Fault, Peer, PeerConfig, spawn  # noqa: E402

SITUATIONS = ("open", "853-dropped", "both-refused", "all-dropped")
Target = tuple[str, int, int]  # host, dns port, tls port
Figures = dict[str, tuple[str, list[float]]]  # situation -> (method, decision times in ms)


async def measure(targets: dict[str, Target], rounds: int, settings: ProbeSettings) -> Figures:
    out: Figures = {}
    for _ in range(rounds):
        for name, (host, dns_port, tls_port) in targets.items():
            s = dataclasses.replace(
                settings, dns_port=dns_port, tls_port=tls_port, check_resumption=False
            )
            r = await probe(host, s)
            out.setdefault(name, (r.method.value, []))[1].append(r.decided_ms)
    return out


def report(figures: Figures, settings: ProbeSettings, where: str) -> None:
    ct = settings.connect_timeout * 1000
    print(
        f"probe decision time ({where}): connect timeout {ct:.0f} ms, fallback delay "
        f"{settings.fallback_delay * 1000:.0f} ms, deadline {settings.timeout * 1000:.0f} ms"
    )
    head = f"{'situation':14} {'method':12} {'min':>9} {'median':>9} {'max':>9}"
    print(f"{head}  median/connect-timeout")
    for name in SITUATIONS:
        method, v = figures[name]
        med = statistics.median(v)
        print(f"{name:14} {method:12} {min(v):7.1f}ms {med:7.1f}ms {max(v):7.1f}ms  {med / ct:.3f}")


def settings_of(args: argparse.Namespace) -> ProbeSettings:
    return ProbeSettings(
        timeout=args.timeout,
        connect_timeout=args.connect_timeout,
        fallback_delay=args.fallback_delay,
    )


def inner(args: argparse.Namespace) -> None:
    """Runs inside the client namespace; targets come as JSON, figures go out as JSON."""
    targets = {k: (v[0], v[1], v[2]) for k, v in json.loads(args.inner).items()}
    print(json.dumps(asyncio.run(measure(targets, args.rounds, settings_of(args)))))


def in_namespaces(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp, Lab() as lab:
        assert lab.srv is not None and lab.cli is not None
        d = Path(tmp)
        extra = ("198.51.100.3", "198.51.100.4")
        for ip in extra:
            subprocess.run(
                ["ip", "-n", lab.srv.name, "addr", "add", f"{ip}/24", "dev", lab.veth_srv],
                check=True,
            )
        cert = CA.create(d).issue(d, "srv", ips=(*SRV_IPS, *extra))
        for ip in SRV_IPS:
            spawn(
                d / f"peer-{ip}.log",
                *("--host", ip, "--dns-port", "53", "--tls-port", "853"),
                *("--cert", str(cert.cert), "--key", str(cert.key)),
                netns=lab.srv,
            )
        lab.srv.nft(f"""
table inet bench {{
  chain input {{ type filter hook input priority 0; policy accept;
    ip daddr {SRV_IPS[1]} tcp dport 853 drop
    ip daddr {extra[1]} drop
  }}
}}""")
        targets = {
            "open": (SRV_IPS[0], 53, 853),
            "853-dropped": (SRV_IPS[1], 53, 853),
            "both-refused": (extra[0], 53, 853),
            "all-dropped": (extra[1], 53, 853),
        }
        knobs = ["--timeout", str(args.timeout), "--connect-timeout", str(args.connect_timeout)]
        knobs += ["--fallback-delay", str(args.fallback_delay), "--rounds", str(args.rounds)]
        cmd = lab.cli.python(str(Path(__file__)), "--inner", json.dumps(targets), *knobs)
        proc = lab.cli.run(cmd, timeout=args.rounds * 4 * (args.timeout + 1) + 30)
        report(json.loads(proc.stdout), settings_of(args), "network namespaces, nftables DROP")


def on_loopback(args: argparse.Namespace) -> None:
    async def go() -> Figures:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            cert = CA.create(d).issue(d, "srv", ips=("127.0.0.1",))
            ok_cfg = PeerConfig(cert=cert.cert, key=cert.key)
            bh_cfg = dataclasses.replace(ok_cfg, faults=frozenset({Fault.BLACKHOLE_TLS}))
            async with Peer(ok_cfg) as ok, Peer(bh_cfg) as bh:
                holes = [Blackhole("127.0.0.1"), Blackhole("127.0.0.1")]
                refused = Blackhole("127.0.0.1")
                refused.close()  # a port just freed: it refuses
                try:
                    targets = {
                        "open": ("127.0.0.1", ok.dns_port, ok.tls_port or 0),
                        "853-dropped": ("127.0.0.1", bh.dns_port, bh.tls_port or 0),
                        "both-refused": ("127.0.0.1", refused.port, refused.port),
                        "all-dropped": ("127.0.0.1", holes[0].port, holes[1].port),
                    }
                    return await measure(targets, args.rounds, settings_of(args))
                finally:
                    for h in holes:
                        h.close()

    report(asyncio.run(go()), settings_of(args), "loopback, full accept queues as black holes")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--connect-timeout", type=float, default=3.0)
    parser.add_argument("--fallback-delay", type=float, default=0.25)
    parser.add_argument("--loopback", action="store_true", help="even as root, no namespaces")
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args)
    elif os.geteuid() == 0 and not args.loopback:
        in_namespaces(args)
    else:
        on_loopback(args)


if __name__ == "__main__":
    main()
