"""The cleartext window a dhclient lease event opens, with the agent's enter hook and without.

The lab of tests/system/test_stub_dhclient.py (tests/lab/dhcplab.py): dnsmasq hands out
leases on a lab network with two real unbound resolvers (198.51.100.1 and .2, TLS on
853); the machine (network, mount and UTS namespaces of its own) runs the real
/sbin/dhclient and dhclient-script, and one agent as root (strict, the lab's CA,
stub_backend resolv.conf, following the lease file), which points the machine's
/etc/resolv.conf at its tunnel (127.0.0.153). Each round the lease names the other
resolver and a search domain of its own, and dhclient is run again (INIT-REBOOT:
dhclient-script with reason REBOOT, whose make_resolv_conf rewrites resolv.conf), either
    hook      with the agent's enter hook installed: make_resolv_conf becomes
              `dnstls-agent stub --dhclient`, which never writes a foreign nameserver, or
    no hook   without it: dhclient-script writes the network's server into resolv.conf,
              the daemon notices (inotify) and has root point the file back.
The modes go hook, no hook, no hook, hook, ... (ABBA), so that each mode sees both
resolvers and the same conditions; two untimed warm-up rounds first (one per mode), so
that every timed round switches to a resolver the agent already knows.

While dhclient runs, three instruments run in the lab: a recorder of every version of the
machine's resolv.conf (inotify and a look every millisecond, monotonic timestamps), glibc
asking for a fresh name every ~2 ms (getaddrinfo through the machine's resolv.conf), and
tcpdump on the network side of the machine's link. Each round ends 0.2 s after the agent
uses the new resolver (its status order) and resolv.conf names only the tunnel, and only
the new lease's search domains (the agent has settled); then, per round:
    foreign     versions of resolv.conf that name a nameserver other than the tunnel
    exposure    ms during which resolv.conf named one (a version lasts until the next)
    leaks       names the client asked for that crossed the wire in cleartext (the
                probe's STARTTLS dummy is not one of them)
    failed      getaddrinfo() calls that got no answer (EAI_AGAIN and the like), of all;
                the summary says how many were asked while resolv.conf was empty
    script      ms from dhclient's start to dhclient-script's end ("bound to" in its log,
                looked for every millisecond): what the hook, a Python command, costs
    order       ms from dhclient's start to the agent's order naming the new resolver
                (its control socket, asked every few milliseconds)

    python bench/dhclient_window.py [--rounds 10] [--keep]                         (root)
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from agent import control  # noqa: E402
from agent.sysconf.watch import nameservers  # noqa: E402
from tests.lab.capture import Packet, cleartext_queries, leaked_with_prefix  # noqa: E402
from tests.lab.certs import CA  # noqa: E402
from tests.lab.dhcplab import DOMAIN, TUNNEL, Answer, DhcpLab, Recording, search  # noqa: E402
from tests.lab.netns import SRV_IPS  # noqa: E402

FIRST, SECOND = SRV_IPS  # 198.51.100.1 (dnsmasq's first lease) and .2
HOOK, NO_HOOK = "hook", "no hook"
WARMUP = 2
LEAD = 0.1  # the instruments run this long before dhclient starts
TAIL = 0.2  # and this long after the round's end
ROUND_TIMEOUT = 10.0
READY_TIMEOUT = 20.0
DUMMIES = ("STARTTLS.", "_dns.resolver.arpa.")  # the probe's cleartext: dummy, DDR question


@dataclass(frozen=True)
class Round:
    n: int  # 1.. for timed rounds, negative for warm-up
    mode: str
    new: str  # the resolver the lease names
    domain: str  # the search domain it names
    versions: int  # versions of resolv.conf recorded
    foreign: int
    exposure: float  # seconds
    leaks: int
    asked: int
    failed: int
    failed_empty: int  # of those, asked while resolv.conf was empty
    script: float  # seconds
    order: float  # seconds
    other_cleartext: tuple[str, ...]  # cleartext query names neither the load's nor DUMMIES


def tls(resolver: str) -> str:
    return f"tls-port:{resolver}@853"


def mode_of(i: int) -> str:
    """hook, no hook, no hook, hook, hook, ...: both modes see both resolvers."""
    return HOOK if (i + 1) // 2 % 2 == 0 else NO_HOOK


def in_use(sock: Path) -> list[str] | None:
    """The agent's order, straight from its control socket (None: no answer)."""
    try:
        answer = control.ask(sock, {"command": "status"}, timeout=1.0)
    except control.ControlError:
        return None
    order = answer.get("status", {}).get("order")
    return [str(u) for u in order] if isinstance(order, list) else None


def pointed(lab: DhcpLab, *domains: str) -> bool:
    """resolv.conf names the tunnel only, and the lease's search domains only (the domain
    name, then its domain-search): the agent has settled on the new lease."""
    text = lab.resolv_conf()
    found = [d.rstrip(".") for d in search(text)]
    return nameservers(text) == [TUNNEL] and found == [DOMAIN, *domains]


def exposure(rec: Recording, end: float) -> tuple[int, float]:
    """Foreign versions, and the seconds they lasted (each until the next version)."""
    versions = rec.versions
    count, total = 0, 0.0
    for i, v in enumerate(versions):
        if any(ns != TUNNEL for ns in v.nameservers):
            count += 1
            total += (versions[i + 1].t if i + 1 < len(versions) else end) - v.t
    return count, total


def while_empty(rec: Recording, answers: Sequence[Answer]) -> int:
    """Failed questions asked while resolv.conf was empty (dhclient-script's `cat new >
    resolv.conf` truncates it first; glibc then asks 127.0.0.1, where nothing listens)."""
    out = 0
    for a in answers:
        current = [v for v in rec.versions if v.t <= a.t]
        out += a.result == "fail" and bool(current) and not (current[-1].text or "").strip()
    return out


def leaks(pkts: Sequence[Packet], answers: Sequence[Answer], prefix: str) -> int:
    """How many of the load's names crossed the wire in cleartext (capture.leaked, looking
    only at packets that carry the load's prefix at all)."""
    return len(leaked_with_prefix(pkts, [a.name for a in answers], prefix))


def wait_switch(lab: DhcpLab, sock: Path, new: str, domain: str) -> tuple[float, float]:
    """Start dhclient; poll until its script is done, the agent uses `new` and resolv.conf
    is pointed again: seconds from dhclient's start to the first two."""
    lab.stop_dhclient()
    t0 = time.monotonic()
    lab.start_dhclient(wait=False)
    script: float | None = None
    order: float | None = None
    while True:
        now = time.monotonic()
        if script is None and lab.bound() >= 1:
            script = now - t0
        if order is None and in_use(sock) == [tls(new)]:
            order = now - t0
        if script is not None and order is not None and pointed(lab, domain):
            return script, order
        if now - t0 > ROUND_TIMEOUT:
            raise RuntimeError(
                f"after {ROUND_TIMEOUT} s: script done {script}, agent order {in_use(sock)} "
                f"(want {tls(new)}), resolv.conf:\n{lab.resolv_conf()}"
            )
        time.sleep(0.001)


def one_round(lab: DhcpLab, sock: Path, n: int, mode: str, new: str) -> Round:
    (lab.install_hook if mode == HOOK else lab.remove_hook)()
    domain = f"r{n}.test" if n > 0 else f"w{-n}.test"
    lab.set_dns([new], search=[domain])
    tag = f"round{n}"
    recorder = lab.record(f"resolv-{tag}")
    capture = lab.capture(f"wire-{tag}")
    prefix = f"{domain[: domain.index('.')]}x{secrets.token_hex(3)}"
    load = lab.query_load(prefix, f"queries-{tag}")
    time.sleep(LEAD)
    script, order = wait_switch(lab, sock, new, domain)
    time.sleep(TAIL)
    answers = load.stop()
    end = time.monotonic()
    rec = recorder.stop()
    pkts = capture.stop()
    if not any(p.dport == 67 for p in pkts):
        raise RuntimeError(f"round {n}: the capture missed the DHCP exchange")
    if not rec.versions or not answers or answers[-1].t < rec.versions[-1].t:
        raise RuntimeError(f"round {n}: the load did not run past resolv.conf's last change")
    foreign, exposed = exposure(rec, end)
    names = {a.name.lower() for a in answers}
    queries = cleartext_queries(pkts)
    other = tuple(
        sorted({q for q in queries if q not in DUMMIES and not _of_load(q, names, prefix)})
    )
    return Round(
        n, mode, new, domain, len(rec.versions), foreign, exposed,
        leaks(pkts, answers, prefix), len(answers), sum(a.result == "fail" for a in answers),
        while_empty(rec, answers), script, order, other,
    )  # fmt: skip


def _of_load(qname: str, names: set[str], prefix: str) -> bool:
    """A question of the load's: one of its names, or one with a search domain appended."""
    return qname.lower().startswith(f"{prefix}-") and any(
        qname.lower().rstrip(".").startswith(n) for n in names
    )


# -- the report ----------------------------------------------------------------------------
def ms(v: float) -> str:
    return f"{v * 1000:.1f}"


def line(r: Round) -> str:
    n = f"{r.n}" if r.n > 0 else f"w{-r.n}"
    return (
        f"{n:>5} {r.mode:8} {r.new:13} {r.domain:9}{r.versions:>9}{r.foreign:>8}"
        f"{ms(r.exposure):>13}{r.leaks:>7}{f'{r.failed}/{r.asked}':>13}"
        f"{ms(r.script):>11}{ms(r.order):>10}"
    )


HEAD = (
    f"{'round':>5} {'mode':8} {'server':13} {'search':9}{'versions':>9}{'foreign':>8}"
    f"{'exposure ms':>13}{'leaks':>7}{'failed/asked':>13}{'script ms':>11}{'order ms':>10}"
)


@dataclass(frozen=True)
class Metric:
    name: str
    get: Callable[[Round], float]
    time: bool  # seconds, shown as ms; otherwise a count
    by: str  # what "hook vs no hook" compares: "total" or "median"


METRICS = (
    Metric("foreign resolv.conf versions", lambda r: r.foreign, False, "total"),
    Metric("exposure, ms", lambda r: r.exposure, True, "total"),
    Metric("cleartext names (leaks)", lambda r: r.leaks, False, "total"),
    Metric("failed queries", lambda r: r.failed, False, "total"),
    Metric("queries asked", lambda r: r.asked, False, "total"),
    Metric("dhclient -> script done, ms", lambda r: r.script, True, "median"),
    Metric("dhclient -> agent order, ms", lambda r: r.order, True, "median"),
)


def show(v: float, time_: bool) -> str:
    return ms(v) if time_ else f"{v:g}"


def cells(values: Sequence[float], time_: bool) -> str:
    if not values:
        return f"{'-':>9}{'-':>17}{'-':>9}"
    span = f"{show(min(values), time_)}-{show(max(values), time_)}"
    return f"{show(statistics.median(values), time_):>9}{span:>17}{show(sum(values), time_):>9}"


def compare(m: Metric, hook: Sequence[float], other: Sequence[float]) -> str:
    """hook vs no hook: the difference and the ratio of the totals or of the medians."""
    if not hook or not other:
        return "-"
    of = sum if m.by == "total" else statistics.median
    h, o = of(hook), of(other)
    ratio = f", x{h / o:.2f}" if o else ""
    return f"{'+' if h >= o else ''}{show(h - o, m.time)}{ratio} ({m.by}s)"


def report(rounds: Sequence[Round]) -> None:
    timed = [r for r in rounds if r.n > 0]
    by = {m: [r for r in timed if r.mode == m] for m in (HOOK, NO_HOOK)}
    print(f"\nper mode: {len(by[HOOK])} rounds with the hook, {len(by[NO_HOOK])} without")
    print(f"{'':30}{'hook':>35}{'no hook':>35}")
    sub = f"{'median':>9}{'min-max':>17}{'total':>9}"
    print(f"{'metric':30}{sub}{sub}   hook vs no hook")
    for m in METRICS:
        h = [m.get(r) for r in by[HOOK]]
        o = [m.get(r) for r in by[NO_HOOK]]
        print(f"{m.name:30}{cells(h, m.time)}{cells(o, m.time)}   {compare(m, h, o)}")
    eh = sum(r.exposure for r in by[HOOK])
    eo = sum(r.exposure for r in by[NO_HOOK])
    sh = statistics.median(r.script for r in by[HOOK]) if by[HOOK] else 0.0
    so = statistics.median(r.script for r in by[NO_HOOK]) if by[NO_HOOK] else 0.0
    print(
        f"exposure: {ms(eh)} ms with the hook against {ms(eo)} ms without, over "
        f"{len(timed)} lease events; dhclient-script with the hook takes "
        + (f"{sh / so:.2f}x as long (+{ms(sh - so)} ms, medians)" if so else "-")
    )
    failed = sum(r.failed for r in timed)
    if failed:
        empty = sum(r.failed_empty for r in timed)
        print(
            f"failed queries: {empty} of {failed} asked while resolv.conf was empty "
            "(dhclient-script truncates it before writing; glibc then asks 127.0.0.1)"
        )
    other = sorted({q for r in timed for q in r.other_cleartext})
    if other:
        print(f"other cleartext queries on the wire (neither the load's nor the probe's): {other}")


# -- the run -------------------------------------------------------------------------------
def run(directory: Path, rounds: int) -> list[Round]:
    ca = CA.create(directory / "ca")
    cert = ca.issue(directory, "resolvers", ips=SRV_IPS, names=("dns.test",))
    out: list[Round] = []
    with DhcpLab(directory / "lab", cert, dns=[FIRST], hook=True) as lab:
        agent = lab.agent("strict", ca.path)
        sock = lab.agent_dir / "run" / control.SOCKET_NAME
        agent.wait(lambda s: s["order"] == [tls(FIRST)], READY_TIMEOUT, f"using {FIRST}")
        end = time.monotonic() + 5
        while not pointed(lab):
            if time.monotonic() > end:
                raise RuntimeError(f"resolv.conf not pointed:\n{lab.resolv_conf()}")
            time.sleep(0.01)
        print(HEAD)
        current = FIRST
        for i in range(-WARMUP, rounds):
            current = SECOND if current == FIRST else FIRST
            mode = mode_of(i + WARMUP) if i < 0 else mode_of(i)
            r = one_round(lab, sock, i + 1 if i >= 0 else i, mode, current)
            print(line(r) + ("   (warm-up)" if i < 0 else ""), flush=True)
            out.append(r)
        agent.proc.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=10, help="timed lease events (after warm-up)")
    ap.add_argument("--keep", action="store_true", help="keep the lab's files and logs")
    args = ap.parse_args()
    print(f"reproduce: python bench/dhclient_window.py --rounds {args.rounds}   (as root)")
    print(
        f"dhclient REBOOT lease events against the agent (strict, resolv.conf): {args.rounds} "
        f"rounds after {WARMUP} warm-up rounds, hook / no hook ABBA, the lease's resolver "
        f"{FIRST} <-> {SECOND}, a search domain per round"
    )
    t0 = time.monotonic()
    directory = Path(tempfile.mkdtemp(prefix="dhclient-window-"))
    try:
        rounds = run(directory, args.rounds)
    finally:
        if args.keep:
            print(f"files and logs kept in {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    report(rounds)
    print(f"whole run {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    main()
