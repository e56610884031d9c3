"""The agent's main job, shown: the real daemon on a lab machine, narrated with timings.

`./scripts/dev run` runs this. As root, in network namespaces only (nothing of this host's
network, resolver or NetworkManager is touched), it builds tests/lab/demo_machine.py's
machine: a real NetworkManager getting its lease from dnsmasq, resolvers of three kinds on
the network side (unbound with TLS on 853; the test peer speaking only the upgrade on 53
behind a black-holed 853; the test peer as a cleartext-only resolver), and the daemon
(`python -m agent run`) managing that machine's stub. It tells what the daemon found and
did (from `status --json`), looks names up through the machine's own resolver library,
changes the lease, proves on the wire that no name went out in cleartext, and tears it
all down again. Exit status: 0 when every step did what it should, 1 when one did not,
2 when it cannot run here (not root, a program missing).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.lab.demo_machine import (  # noqa: E402
    CLEAR,
    KINDS,
    STUB,
    UNBOUND,
    UPGRADE,
    DemoMachine,
    missing_programs,
)

LEASE_MARK = "device activated (DHCP lease)"  # NMLab's timing of NM's first lease


class Narrator:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.ok = True

    def elapsed(self, at: float | None = None) -> float:
        return (time.monotonic() if at is None else at) - self.t0

    def say(self, text: str, at: float | None = None) -> None:
        print(f"[{self.elapsed(at):4.1f} s] {text}", flush=True)

    def check(self, ok: bool, text: str) -> None:
        """A fact the demo stands on; a false one is said and makes the exit status 1."""
        if not ok:
            self.ok = False
            self.say(f"NOT AS EXPECTED: {text}")


def short(ips: list[str]) -> str:
    """198.51.100.1 .2 .3"""
    if not ips:
        return "none"
    head = ips[0].rsplit(".", 1)[0]
    return " ".join(
        [
            ips[0],
            *("." + ip.rsplit(".", 1)[1] if ip.startswith(head + ".") else ip for ip in ips[1:]),
        ]
    )


def resolvers(st: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for i in st["interfaces"] for r in i["resolvers"]]


def answers_by_upstream(st: dict[str, Any] | None) -> dict[str, int]:
    ups = (st or {}).get("tunnel", {}).get("upstreams", [])
    return {u["upstream"]: u["answers"] for u in ups}


def cache_hits(st: dict[str, Any] | None) -> int:
    return int(((st or {}).get("tunnel", {}).get("cache") or {}).get("hits", 0))


def lookup(n: Narrator, m: DemoMachine, name: str, want: set[str], what: str = "lookup") -> None:
    """getent in the machine; who carried it (the upstreams' answer counts, before/after)."""
    before = answers_by_upstream(m.status())
    got = m.lookup(name)
    after = answers_by_upstream(m.status())
    carried = [u for u, a in after.items() if a > before.get(u, 0)]
    via = f", carried by {', '.join(carried)}" if carried else ""
    n.say(
        f"{what}: getent ahosts {name} (glibc in the machine) -> "
        f"{' '.join(got.addresses) or 'nothing'} in {got.seconds * 1000:.0f} ms{via}"
    )
    n.check(got.rc == 0 and bool(want & set(got.addresses)), f"{name} answered with {want}")


def probed(r: dict[str, Any]) -> str:
    """tls-port, authenticated by ip-san, 9.1 ms; or why it is not used."""
    if not r["method"].startswith("tls"):
        return f"{r['method']}: " + (r["reason"] if r["used"] else f"not used ({r['reason']})")
    auth = "not authenticated" if r["auth"] in (None, "none") else f"authenticated by {r['auth']}"
    lat = f", {r['latency_ms']:.1f} ms" if r["latency_ms"] is not None else ""
    return f"{r['method']}, {auth}{lat}" + ("" if r["used"] else f" (not used: {r['reason']})")


def tls(order: list[str]) -> list[str]:
    """The private entries of an order (opportunistic adds plain DNS ones, last)."""
    return [o for o in order if o.startswith("tls")]


def settled(st: dict[str, Any]) -> bool:
    """Nothing being probed, and the order made from what the probes found (a status taken
    between a probe's result and the next order shows the order from before it)."""
    rs = resolvers(st)
    found = {f"{r['method']}:{r['address']}@" for r in rs if r["used"] and r["method"]}
    return (
        bool(st["order"])
        and not any(r["probing"] for r in rs)
        and all(any(o.startswith(f) for o in st["order"]) for f in found)
    )


def wait_probed(n: Narrator, m: DemoMachine, want: set[str], timeout: float) -> dict[str, Any]:
    """Poll `status --json` until every resolver is probed; say each result as it comes."""
    told: set[str] = set()
    end = time.monotonic() + timeout
    st: dict[str, Any] | None = None
    while time.monotonic() < end:
        st = m.status()
        if st is None:
            time.sleep(0.05)
            continue
        for r in resolvers(st):
            # learnt, and decided on: a status taken between a probe's result and the next
            # decision still gives the reason of the decision before ("not probed yet")
            decided = not r["reason"].startswith("not probed yet")
            if r["method"] and not r["probing"] and decided and r["address"] not in told:
                told.add(r["address"])
                n.say(f"probe {r['address']}: {probed(r)}")
        if told >= want and settled(st):
            return st
        time.sleep(0.1)
    raise TimeoutError(f"not every resolver probed after {timeout}s; status: {st}")


def run(n: Narrator, m: DemoMachine) -> None:
    lab = m.lab
    first = n.elapsed() - lab.startup_seconds
    n.say(
        f"network side ({lab.srv_name}): dnsmasq (DHCP) and tcpdump; resolvers "
        + "; ".join(f"{ip} {KINDS[ip]}" for ip in (UNBOUND, UPGRADE, CLEAR))
    )
    ip, dns = m.lease()
    lease_at = n.t0 + first + lab.timings.get(LEASE_MARK, lab.startup_seconds)
    n.say(
        f"machine ({lab.cli_name}, mount and UTS namespaces of its own): NetworkManager "
        f"up in {lab.startup_seconds:.2f} s",
        lease_at,
    )
    n.say(f"lease: {m.ifname} got {ip}, DNS {short(dns)}", lease_at)
    n.check(dns == [UNBOUND, UPGRADE, CLEAR], f"the lease names the three resolvers: {dns}")

    m.start_agent()
    assert m.agent is not None
    n.say(
        f"agent: python -m agent -c {m.agent.config.name} run (profile {m.profile}, "
        f"manage_stub = true, nm_bus = the machine's), in the machine"
    )
    st = wait_probed(n, m, {UNBOUND, UPGRADE, CLEAR}, 20)
    n.say(
        f"order: {', '.join(st['order'])} ({st['reason']}; tunnel {st['tunnel']['mode']} on "
        f"{', '.join(st['tunnel']['listen'])})"
    )
    private = tls(st["order"])
    n.check(
        {o.split(":")[1].split("@")[0] for o in private} == {UNBOUND, UPGRADE},
        f"both TLS resolvers in the order: {st['order']}",
    )
    m.wait_nameservers([STUB], 10)
    n.say(
        f"stub: the machine's /etc/resolv.conf now says nameserver {STUB} (search "
        f"{' '.join(st['search']) or 'none'})"
    )
    lookup(n, m, "www.lab.test", {"198.51.100.10", "198.51.100.7"})

    n.say(f"lease change: dnsmasq now hands out {UNBOUND} only; nmcli device up {m.ifname}")
    m.change_lease([UNBOUND])
    ip, dns = m.lease()
    n.say(f"lease: {m.ifname} got {ip}, DNS {short(dns)}")
    want = [f"tls-port:{UNBOUND}@853"]
    st = m.wait(lambda s: tls(s["order"]) == want and settled(s), 20, "following the new lease")
    n.say(f"order: {', '.join(st['order'])} (followed over D-Bus, no dispatcher needed)")
    n.check(m.nameservers() == [STUB], f"the stub still pointed: {m.nameservers()}")
    lookup(n, m, "dns.lab.test", {UNBOUND})  # unbound's own record: the peer answers .7
    hits = cache_hits(m.status())
    got = m.lookup("dns.lab.test")
    after = cache_hits(m.status())
    n.say(
        f"cache: dns.lab.test again -> {' '.join(got.addresses) or 'nothing'} in "
        f"{got.seconds * 1000:.0f} ms, from the tunnel's cache (tunnel.cache hits "
        f"{hits} -> {after})"
    )
    n.check(got.rc == 0 and after > hits, "the repeated name answered from the cache")

    code = m.stop_agent()
    back = m.nameservers()
    n.say(
        f"agent stopped (exit {code}): the machine's /etc/resolv.conf is NetworkManager's "
        f"again (nameserver {short(back)})"
    )
    n.check(code == 0 and STUB not in back and back == [UNBOUND], f"stub put back: {back}")
    wire = m.wire()
    plain = ", ".join(wire.cleartext_questions) or "none"
    n.say(
        f"wire (tcpdump on the network side): {wire.packets} packets, {wire.tls_packets} of "
        f"them TLS; {len(wire.asked)} names asked, {len(wire.leaked)} in cleartext (plain "
        f"DNS seen: {plain}: the probe's, naming nothing of the user's)"
    )
    n.check(not wire.leaked, f"names seen in cleartext: {wire.leaked}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--profile",
        choices=("strict", "encrypted", "opportunistic"),
        default="strict",
        help="the agent's profile (default: strict)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print(
            "demo: needs root: it builds network and mount namespaces for its lab machine "
            "(nothing of this host's network is touched); run: sudo ./scripts/dev run",
            file=sys.stderr,
        )
        return 2
    missing = missing_programs()
    if missing:
        print(
            f"demo: not installed: {' '.join(missing)} (./scripts/dev setup installs them)",
            file=sys.stderr,
        )
        return 2

    def terminate(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the teardown

    signal.signal(signal.SIGTERM, terminate)
    n = Narrator()
    print(
        "dnstls-agent: the daemon on a lab machine (network namespaces, documentation "
        "addresses only)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="dnstls-demo-") as tmp:
        m = DemoMachine(Path(tmp), args.profile)
        n.say("starting the lab: namespaces, dnsmasq, NetworkManager, three resolvers")
        try:
            with m:
                run(n, m)
                gone = m.close()
        except (TimeoutError, AssertionError, RuntimeError, subprocess.SubprocessError) as exc:
            n.say(f"FAILED: {exc}")
            return 1
        n.say(
            f"teardown: {gone.stopped} processes stopped by PID, namespaces "
            f"{' '.join(gone.namespaces)} deleted, "
            + ("nothing left" if gone.clean else f"LEFT: pids {gone.pids}, netns {gone.netns}")
        )
        n.check(gone.clean, "teardown clean")
    print(f"done in {n.elapsed():.1f} s: " + ("every step as expected" if n.ok else "see above"))
    return 0 if n.ok else 1


if __name__ == "__main__":
    sys.exit(main())
