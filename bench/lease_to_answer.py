"""From a new DHCP lease to the first private answer through the system stub.

The lab of tests/system/test_e2e_privacy.py: on the network side dnsmasq (DHCP) and two real
unbounds with TLS on 853 (198.51.100.1 answers lease.lab.test with 203.0.113.1, .2 with
203.0.113.2); on the machine side a real NetworkManager on a private bus and the agent
(`dnstls-agent run`, strict, manage_stub = true) in the machine's private mount namespace,
so /etc/resolv.conf there is the agent's. Each round hands out the other unbound and
re-activates the connection (`nmcli device up`: a fresh DHCP exchange), and measures from
that moment (tests/lab/leasetiming.py):
    lease->NM signal   DnsManager.Configuration names the new resolver (PropertiesChanged)
    lease->answer      the first answer from the new resolver through the nameserver that
                       the machine's /etc/resolv.conf names (re-read for every query, and
                       only the agent's stub counts): a UDP query every 5 ms, not waiting
                       for the one before
Strict: the tunnel forwards over authenticated TLS only, so an answer from the new resolver
came over TLS; the agent's order is checked after each round, and glibc (getent) resolves
through the stub once per run. Two untimed warm-up rounds first, so that every timed round
switches to a resolver the agent already knows. The whole thing is repeated with the
engine's debounce at its default and lowered (a fresh agent each time, in the same lab).

What a shorter debounce may cost: `nmcli device up` takes the device through deactivating
and disconnected before it is activated again, so DNS configuration changes twice, and the
agent may apply the state in between (no resolvers: the tunnel answers SERVFAIL). Hence,
for every round, the orders the agent applied (its log: "order (profile): upstreams",
"none" for an empty one), and with --loss a steady load through the system stub (the
nameserver of the machine's resolv.conf, re-read for every query, as above): one query
every --interval per protocol, not waiting for the one before, from the renew until 2 s
after the first answer from the new resolver, each counted as answered by the old or the
new resolver, or failed (SERVFAIL, REFUSED, no answer within 5 s: longer than the tunnel's
own deadline, so a timeout is a question the tunnel dropped, ...).

    python bench/lease_to_answer.py [--rounds 10] [--debounce default,0.2,0.05]
                                    [--loss [udp,tcp]]                              (root)
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dns.asyncquery  # noqa: E402
import dns.exception  # noqa: E402
import dns.message  # noqa: E402
import dns.rcode  # noqa: E402
import dns.rdatatype  # noqa: E402

from agent.config import Config  # noqa: E402
from tests.lab.agentproc import AgentProcess  # noqa: E402
from tests.lab.certs import CA  # noqa: E402
from tests.lab.leasetiming import Ask, LeaseTimes, Outcome, address, time_lease  # noqa: E402
from tests.lab.netns import SRV_IPS  # noqa: E402
from tests.lab.nmlab import DEVICE_ACTIVATED, NMLab  # noqa: E402
from tests.lab.unbound import Unbound, UnboundConfig, answers, tls_listening  # noqa: E402

FIRST, SECOND = SRV_IPS  # 198.51.100.1 (also dnsmasq's) and .2
ANSWER = {FIRST: "203.0.113.1", SECOND: "203.0.113.2"}
NAME = "lease.lab.test"
STUB = "127.0.0.153"
WARMUP = 2
ROUND_TIMEOUT = 30.0
LOSS_TAIL = 2.0  # the load goes on this long after the first answer from the new resolver
QUERY_TIMEOUT = 5.0  # the tunnel's own deadline is 4 s (then SERVFAIL), glibc's timeout 5 s
ORDER = re.compile(r"INFO agent\.engine: order \((?P<profile>[^)]*)\): (?P<upstreams>.*)$")
NEW, OLD = "new", "old"  # answered by the new / the old resolver; any other kind failed
T = TypeVar("T")


@dataclass(frozen=True)
class Round:
    old: str  # the resolver before the renew
    new: str  # the resolver the new lease names
    times: LeaseTimes
    orders: tuple[str, ...]  # what the agent applied, "profile: upstreams", since last round

    def shape(self) -> str:
        """The orders applied, the resolvers by role: e.g. "none -> new"."""
        names = {f"strict: {tls(self.old)}": "old", f"strict: {tls(self.new)}": "new"}
        return " -> ".join("none" if empty(o) else names.get(o, o) for o in self.orders)


def tls(resolver: str) -> str:
    return f"tls-port:{resolver}@853"


def stub_nameserver(lab: NMLab) -> str | None:
    """The first nameserver of the machine's /etc/resolv.conf (what glibc would ask)."""
    for line in lab.resolv_conf().splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            return words[1]
    return None


def applied(log: str) -> tuple[str, ...]:
    """The orders in an agent log, as "profile: upstreams" ("none": the empty order)."""
    out = []
    for line in log.splitlines():
        if m := ORDER.search(line):
            out.append(f"{m['profile']}: {m['upstreams']}")
    return tuple(out)


def empty(order: str) -> bool:
    return order.endswith(": none")


def asker(lab: NMLab, proto: str, old: str, new: str) -> Ask:
    """One query for NAME through the system stub over `proto`, as the kind of its outcome."""
    query = dns.asyncquery.udp if proto == "udp" else dns.asyncquery.tcp

    async def ask() -> str:
        server = stub_nameserver(lab)
        if server != STUB:
            return f"resolv.conf names {server}"
        try:
            r = await query(dns.message.make_query(NAME, "A"), STUB, timeout=QUERY_TIMEOUT)
        except dns.exception.Timeout:
            return "timeout"
        except (OSError, dns.exception.DNSException) as exc:
            return type(exc).__name__
        if r.rcode() != dns.rcode.NOERROR:
            return dns.rcode.to_text(r.rcode())
        got = [str(rr) for rrset in r.answer if rrset.rdtype == dns.rdatatype.A for rr in rrset]
        if got == [ANSWER[new]]:
            return NEW
        if got == [ANSWER[old]]:
            return OLD
        return f"answer {' '.join(got) or '(empty)'}"

    return ask


def label(debounce: float | None) -> str:
    value = Config().debounce if debounce is None else debounce
    return f"{value * 1000:g} ms" + (" (default)" if debounce is None else "")


def measure(
    lab: NMLab,
    directory: Path,
    ca: Path,
    debounce: float | None,
    rounds: int,
    interval: float,
    loss: Sequence[str],
) -> tuple[list[Round], list[Round]]:
    """A fresh agent with this debounce: warm-up rounds, then the timed ones (with the
    load of `loss`, protocols, if any, in both)."""
    assert lab.machine is not None and lab.cli is not None
    setting = "" if debounce is None else f"debounce = {debounce}\n"
    agent = AgentProcess(lab.machine, directory, f"""
listen = ["{STUB}:53"]
nm_bus = "{lab.bus_address}"
lease_dirs = []
profile = "strict"
ca_file = "{ca}"
{setting}""", manage_stub=True)  # fmt: skip
    try:
        current = lab.initial_dns[0]
        agent.wait(lambda s: s["order"] == [tls(current)], ROUND_TIMEOUT, "ready")
        if stub_nameserver(lab) != STUB:
            raise RuntimeError(
                f"the machine's resolv.conf is not the agent's:\n{lab.resolv_conf()}"
            )

        log = agent.proc.log
        seen = log.stat().st_size

        def one(old: str, target: str) -> Round:
            nonlocal seen

            async def private_answer() -> bool:
                if stub_nameserver(lab) != STUB:
                    return False
                return await address(STUB, NAME) == ANSWER[target]

            load = {proto: asker(lab, proto, old, target) for proto in loss}
            times = asyncio.run(
                time_lease(lab, target, private_answer, interval=interval, within=ROUND_TIMEOUT,
                           load=load, tail=LOSS_TAIL)
            )  # fmt: skip
            agent.wait(lambda s: s["order"] == [tls(target)], 10, f"using {target} over TLS")
            with log.open("rb") as f:  # the agent's log from the last round's end to now
                f.seek(seen)
                text = f.read()
            seen += len(text)
            return Round(old, target, times, applied(text.decode(errors="replace")))

        def run() -> tuple[list[Round], list[Round]]:
            nonlocal current
            out: list[Round] = []
            for i in range(WARMUP + rounds):
                old, current = current, SECOND if current == FIRST else FIRST
                out.append(one(old, current))
                if i == WARMUP - 1:  # glibc through the machine's resolv.conf, once
                    assert lab.machine is not None
                    got = lab.machine.run(["getent", "ahostsv4", NAME], check=False).stdout
                    if (got.split() or [""])[0] != ANSWER[current]:
                        raise RuntimeError(f"getent {NAME}: {got!r}, not {ANSWER[current]}")
            return out[:WARMUP], out[WARMUP:]

        # a thread in the client's network namespace, where the stub listens
        return lab.cli.call(run, timeout=(WARMUP + rounds) * (2 * ROUND_TIMEOUT + 15))
    finally:
        agent.proc.stop()  # the agent puts the machine's resolv.conf back


def ms(v: float) -> str:
    return f"{v * 1000:.1f}"


Results = dict[float | None, tuple[list[Round], list[Round]]]


def report(all_results: Results, interval: float) -> None:
    results = {c: ([r.times for r in w], [r.times for r in t]) for c, (w, t) in all_results.items()}
    phases: tuple[tuple[str, Callable[[LeaseTimes], float]], ...] = (
        ("lease->NM signal", lambda t: t.nm),
        ("NM signal->answer", lambda t: t.nm_to_answer),
        ("lease->answer", lambda t: t.answer),
    )
    configs = list(results)
    base = configs[0]
    rounds = len(results[base][1])
    print(f"DHCP lease -> first private answer through the system stub, {rounds} rounds "
          f"per debounce (after {WARMUP} warm-up rounds); ms")  # fmt: skip
    head = f"{'engine debounce':18}" + "".join(
        f"{label(c):>30}" + ("" if c == base else f"{'':>7}") for c in configs
    )
    print(head)
    sub = f"{'phase':18}" + "".join(
        f"{'median':>10}{'min':>10}{'max':>10}" + ("" if c == base else f"{'ratio':>7}")
        for c in configs
    )
    print(sub)
    for name, get in phases:
        line = f"{name:18}"
        base_median = statistics.median(get(t) for t in results[base][1])
        for c in configs:
            v = [get(t) for t in results[c][1]]
            median = statistics.median(v)
            line += f"{ms(median):>10}{ms(min(v)):>10}{ms(max(v)):>10}"
            if c != base:
                line += f"{median / base_median:>7.2f}" if base_median > 0 else f"{'-':>7}"
        print(line)
    print("ratio: median / median at the first debounce")
    print("lease->answer per round:")
    for c in configs:
        warm, timed = results[c]
        print(f"  {label(c):18} {' '.join(ms(t.answer) for t in timed)}"
              f"   (warm-up: {', '.join(ms(t.answer) for t in warm)})")  # fmt: skip
    report_nm(all_results)
    report_orders(all_results)
    if any(t.load for _, timed in results.values() for t in timed):
        report_loss(all_results, interval)


def window(changes: Sequence[tuple[float, T]], gone: Callable[[T], bool],
           back: Callable[[T], bool]) -> tuple[float, float] | None:  # fmt: skip
    """From the first change after which `gone` holds to the first one after it where
    `back` does (seconds from the renew), if both came."""
    start = next((t for t, v in changes if gone(v)), None)
    end = next((t for t, v in changes if start is not None and t > start and back(v)), None)
    return None if start is None or end is None else (start, end)


def nm_windows(r: Round) -> dict[str, tuple[float, float] | None]:
    """What the agent may see in between: the device not activated (its own resolvers not
    in use), and DnsManager.Configuration without a resolver, until it names the new one."""
    return {
        "device not activated": window(
            r.times.device, lambda s: s != DEVICE_ACTIVATED, lambda s: s == DEVICE_ACTIVATED
        ),
        "DNS config empty": window(r.times.dns, lambda v: not v, lambda v: r.new in v),
    }


def report_nm(results: Results) -> None:
    print("NetworkManager during the switch (D-Bus signals as the bench saw them), timed "
          "rounds; ms after the renew, min..max:")  # fmt: skip
    for c, (_, timed) in results.items():
        for i, what in enumerate(("device not activated", "DNS config empty")):
            spans = [w for r in timed if (w := nm_windows(r)[what]) is not None]
            head = f"  {label(c) if i == 0 else '':18} {what:21}"
            if not spans:
                print(f"{head} never ({len(timed)} rounds)")
                continue
            starts, ends, lengths = zip(*((a, b, b - a) for a, b in spans), strict=True)
            print(f"{head} in {len(spans)} of {len(timed)} rounds: from {ms(min(starts))}.."
                  f"{ms(max(starts))} to {ms(min(ends))}..{ms(max(ends))}, lasting "
                  f"{ms(min(lengths))}..{ms(max(lengths))} (median "
                  f"{ms(statistics.median(lengths))})")  # fmt: skip


def report_orders(results: Results) -> None:
    print('orders the agent applied per round (its log, "order (profile): upstreams"), '
          "timed rounds; an empty order makes the tunnel answer SERVFAIL:")  # fmt: skip
    for c, (_, timed) in results.items():
        gaps = [sum(map(empty, r.orders)) for r in timed]
        print(f"  {label(c):18} empty order applied {sum(gaps)} times, in "
              f"{sum(1 for g in gaps if g)} of {len(timed)} rounds")  # fmt: skip
        shapes = Counter(r.shape() or "(no order logged)" for r in timed)
        for shape, n in shapes.most_common():
            print(f"  {'':18}   {n:>3} x {shape}")
        down = [(any(map(empty, r.orders)), w[1] - w[0])
                for r in timed if (w := nm_windows(r)["device not activated"])]  # fmt: skip
        gappy = [d for gap, d in down if gap]
        rest = [d for gap, d in down if not gap]
        if gappy and rest:
            print(f"  {'':18}   NM's device was not activated for {', '.join(map(ms, gappy))} ms "
                  f"in those rounds, {ms(statistics.median(rest))} ms (median; max "
                  f"{ms(max(rest))}) in the others")  # fmt: skip


def report_loss(results: Results, interval: float) -> None:
    rounds = len(next(iter(results.values()))[1])
    print(f"queries through the system stub from the renew until {LOSS_TAIL:g} s after the "
          f"first answer from the new resolver, one every {interval * 1000:g} ms per protocol "
          f"(overlapping), timeout {QUERY_TIMEOUT:g} s; summed over {rounds} rounds")  # fmt: skip
    failed_kinds = ("SERVFAIL", "REFUSED", "timeout")
    print(f"{'engine debounce':18}{'proto':>6}{'sent':>7}{'old':>7}{'new':>7}{'failed':>8}"
          + "".join(f"{k:>10}" for k in failed_kinds)
          + f"{'other':>7}{'rounds w/ fail':>16}{'slowest ok ms':>15}")  # fmt: skip
    others: list[str] = []
    for c, (_, timed) in results.items():
        protos = sorted({p for r in timed for p in r.times.load})
        for proto in protos:
            per_round = [r.times.load.get(proto, ()) for r in timed]
            everything: list[Outcome] = [o for r in per_round for o in r]
            kinds = Counter(o.kind for o in everything)
            failed = sum(n for k, n in kinds.items() if k not in (NEW, OLD))
            other = {k: n for k, n in kinds.items() if k not in (NEW, OLD, *failed_kinds)}
            bad_rounds = sum(1 for r in per_round if any(o.kind not in (NEW, OLD) for o in r))
            ok = [o.took for o in everything if o.kind in (NEW, OLD)]
            print(f"{label(c) if proto == protos[0] else '':18}{proto.upper():>6}"
                  f"{len(everything):>7}{kinds[OLD]:>7}{kinds[NEW]:>7}{failed:>8}"
                  + "".join(f"{kinds[k]:>10}" for k in failed_kinds)
                  + f"{sum(other.values()):>7}{bad_rounds:>16}"
                  f"{ms(max(ok)) if ok else '-':>15}")  # fmt: skip
            if other:
                kinds_text = ", ".join(f"{k} {n}" for k, n in sorted(other.items()))
                others.append(f"  {label(c)} {proto.upper()}: {kinds_text}")
            fails = [o.sent for o in everything if o.kind not in (NEW, OLD)]
            if fails:
                gappy = [r.times.load[proto] for r in timed if any(map(empty, r.orders))]
                gap = sum(1 for out in gappy for o in out if o.kind not in (NEW, OLD))
                others.append(f"  {label(c)} {proto.upper()}: failures sent "
                              f"{ms(min(fails))}..{ms(max(fails))} ms after the renew; {gap} of "
                              f"{len(fails)} in rounds with an empty order")  # fmt: skip
    for line in others:
        print(line)


def parse_debounce(text: str) -> list[float | None]:
    return [None if v.strip() == "default" else float(v) for v in text.split(",")]


def parse_protocols(text: str) -> list[str]:
    protocols = [v.strip() for v in text.split(",")]
    if not protocols or any(p not in ("udp", "tcp") for p in protocols):
        raise argparse.ArgumentTypeError(f"{text!r}: udp, tcp or both")
    return protocols


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument(
        "--debounce",
        type=parse_debounce,
        default=parse_debounce("default,0.2,0.05"),
        help="engine debounce values in seconds (or 'default'), the first one the baseline",
    )
    ap.add_argument("--interval", type=float, default=0.005, help="seconds between queries")
    ap.add_argument(
        "--loss",
        type=parse_protocols,
        nargs="?",
        const=parse_protocols("udp,tcp"),
        default=[],
        help="also count the queries that fail during each switch, over these protocols "
        "(udp, tcp; both if none given)",
    )
    args = ap.parse_args()
    results: Results = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ca = CA.create(d)
        cert = ca.issue(d, "resolvers", ips=(FIRST, SECOND))
        with NMLab(d / "lab", dns=[FIRST], nm_dns="none", log_level="INFO") as lab:
            assert lab.srv is not None and lab.cli is not None
            srv = lab.srv
            for ip in (FIRST, SECOND):
                extra = f'    local-data: "{NAME}. 0 IN A {ANSWER[ip]}"'
                ub = Unbound.start(
                    UnboundConfig(ip, 53, 853, cert.cert, cert.key, extra=extra),
                    d / f"unbound-{ip}",
                    netns=srv.name,
                )
                srv.processes.append(ub.proc)

                def serving(ip: str = ip) -> bool:
                    return srv.call(lambda: answers(ip, 53) and tls_listening(ip, 853), 5)

                ub.proc.wait_until(serving, 10, f"unbound on {ip}")
            for i, debounce in enumerate(args.debounce):
                results[debounce] = measure(
                    lab, d / f"agent{i}", ca.path, debounce, args.rounds, args.interval, args.loss
                )
    report(results, args.interval)


if __name__ == "__main__":
    main()
