"""From "NetworkManager reports new resolvers" to "the tunnel answers through the new upstream".

A real NetworkManager in the lab (tests/lab/nmlab.py) gets its resolvers from dnsmasq:
unbound (answers www.lab.test with 198.51.100.10) or the test peer (198.51.100.7), both with
TLS on 853. The agent (`dnstls-agent run`, strict) follows NM. Each round hands out the
other resolver and re-activates the connection (`nmcli device up`), and measures, from a
thread inside the client's network namespace:
    nm    renew started -> DnsManager.Configuration names the new resolver (PropertiesChanged)
    agent that signal -> the first answer through 127.0.0.153 that comes from the new one
(a UDP query every 2 ms from the renew on, not waiting for the one before:
tests/lab/leasetiming.py). The agent has no knowledge of a resolver the first time it sees
it (it tries TLS on 853 at once and probes beside it); rounds after the first two switch
to resolvers it already knows.

    python bench/nm_switch.py [--rounds 10]        (root)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.lab.agentproc import AgentProcess  # noqa: E402
from tests.lab.certs import CA  # noqa: E402
from tests.lab.leasetiming import address, time_lease  # noqa: E402
from tests.lab.netns import call_in  # noqa: E402
from tests.lab.nmlab import NMLab  # noqa: E402
from tests.lab.peer import PEER_A, spawn  # noqa: E402
from tests.lab.unbound import WWW_A, Unbound, UnboundConfig  # noqa: E402

UNBOUND, PEER = "198.51.100.1", "198.51.100.3"
ANSWER = {UNBOUND: WWW_A, PEER: PEER_A}
STUB = "127.0.0.153"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ca = CA.create(d)
        cert = ca.issue(d, "resolvers", ips=(UNBOUND, PEER))
        with NMLab(d / "lab", dns=[UNBOUND], log_level="INFO") as lab:
            assert lab.srv is not None and lab.cli is not None
            lab.add_srv_address(PEER)
            ub = Unbound.start(
                UnboundConfig(UNBOUND, 53, 853, cert.cert, cert.key), d / "ub", netns=lab.srv.name
            )
            lab.srv.processes.append(ub.proc)
            spawn(d / "peer.log", "--host", PEER, "--dns-port", "53", "--tls-port", "853",
                  "--cert", str(cert.cert), "--key", str(cert.key), netns=lab.srv)  # fmt: skip
            lab.cli.run(["ip", "link", "set", "lo", "up"])
            agent = AgentProcess(lab.cli, d / "agent", f"""
listen = ["{STUB}:53"]
nm_bus = "{lab.bus_address}"
lease_dirs = []
profile = "strict"
ca_file = "{ca.path}"
""")  # fmt: skip
            agent.wait(lambda s: s["order"] == [f"tls-port:{UNBOUND}@853"], 20, "ready")
            results: list[tuple[str, float, float]] = []

            def rounds() -> None:
                for i in range(args.rounds):
                    target = PEER if i % 2 == 0 else UNBOUND

                    async def new_answer(target: str = target) -> bool:
                        return await address(STUB, "www.lab.test") == ANSWER[target]

                    times = asyncio.run(time_lease(lab, target, new_answer, interval=0.002))
                    results.append((target, times.nm, times.nm_to_answer))

            call_in(lab.cli.name, rounds, timeout=args.rounds * 60)  # a thread in the client netns
    print(f"NM re-activation -> tunnel answering through the new resolver, {args.rounds} rounds")
    print(f"{'round':>5} {'resolver':15} {'renew->NM signal':>17} {'NM signal->answer':>18}")
    for i, (target, nm, ag) in enumerate(results):
        print(f"{i:>5} {target:15} {nm * 1000:15.1f}ms {ag * 1000:16.1f}ms")
    first, known = [r[2] for r in results[:2]], [r[2] for r in results[2:]]
    for label, v in (("new resolver", first), ("known resolver", known)):
        if v:
            print(f"{label:15} NM signal->answer: min {min(v) * 1000:.1f} ms, median "
                  f"{statistics.median(v) * 1000:.1f} ms, max {max(v) * 1000:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
