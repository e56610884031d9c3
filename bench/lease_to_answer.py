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

    python bench/lease_to_answer.py [--rounds 10] [--debounce default,0.1,0.05]   (root)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.config import Config  # noqa: E402
from tests.lab.agentproc import AgentProcess  # noqa: E402
from tests.lab.certs import CA  # noqa: E402
from tests.lab.leasetiming import LeaseTimes, address, time_lease  # noqa: E402
from tests.lab.netns import SRV_IPS  # noqa: E402
from tests.lab.nmlab import NMLab  # noqa: E402
from tests.lab.unbound import Unbound, UnboundConfig, answers, tls_listening  # noqa: E402

FIRST, SECOND = SRV_IPS  # 198.51.100.1 (also dnsmasq's) and .2
ANSWER = {FIRST: "203.0.113.1", SECOND: "203.0.113.2"}
NAME = "lease.lab.test"
STUB = "127.0.0.153"
WARMUP = 2
ROUND_TIMEOUT = 30.0


def tls(resolver: str) -> str:
    return f"tls-port:{resolver}@853"


def stub_nameserver(lab: NMLab) -> str | None:
    """The first nameserver of the machine's /etc/resolv.conf (what glibc would ask)."""
    for line in lab.resolv_conf().splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            return words[1]
    return None


def label(debounce: float | None) -> str:
    value = Config().debounce if debounce is None else debounce
    return f"{value * 1000:g} ms" + (" (default)" if debounce is None else "")


def measure(
    lab: NMLab, directory: Path, ca: Path, debounce: float | None, rounds: int, interval: float
) -> tuple[list[LeaseTimes], list[LeaseTimes]]:
    """A fresh agent with this debounce: warm-up rounds, then the timed ones."""
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

        def one(target: str) -> LeaseTimes:
            async def private_answer() -> bool:
                if stub_nameserver(lab) != STUB:
                    return False
                return await address(STUB, NAME) == ANSWER[target]

            times = asyncio.run(
                time_lease(lab, target, private_answer, interval=interval, within=ROUND_TIMEOUT)
            )
            agent.wait(lambda s: s["order"] == [tls(target)], 10, f"using {target} over TLS")
            return times

        def run() -> tuple[list[LeaseTimes], list[LeaseTimes]]:
            nonlocal current
            out: list[LeaseTimes] = []
            for i in range(WARMUP + rounds):
                current = SECOND if current == FIRST else FIRST
                out.append(one(current))
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


def report(results: dict[float | None, tuple[list[LeaseTimes], list[LeaseTimes]]]) -> None:
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


def parse_debounce(text: str) -> list[float | None]:
    return [None if v.strip() == "default" else float(v) for v in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument(
        "--debounce",
        type=parse_debounce,
        default=parse_debounce("default,0.1,0.05"),
        help="engine debounce values in seconds (or 'default'), the first one the baseline",
    )
    ap.add_argument("--interval", type=float, default=0.005, help="seconds between queries")
    args = ap.parse_args()
    results: dict[float | None, tuple[list[LeaseTimes], list[LeaseTimes]]] = {}
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
                    lab, d / f"agent{i}", ca.path, debounce, args.rounds, args.interval
                )
    report(results)


if __name__ == "__main__":
    main()
