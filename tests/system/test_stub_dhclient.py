"""ifupdown's dhclient against the agent's stub: the window in which dhclient-script's
make_resolv_conf has written the network's nameservers and the agent has not yet pointed
/etc/resolv.conf back at its tunnel is closed by the agent's dhclient enter hook.

Everything runs in tests.lab.dhcplab: dnsmasq hands out leases on a lab network with two
real unbound resolvers (TLS on 853); the machine (network, mount and UTS namespaces of its
own, /etc/resolv.conf a plain file of the lab's, /etc/dhcp holding the agent's hook only)
runs the real /sbin/dhclient and dhclient-script, and the agent as root (strict, the lab's
CA, stub_backend resolv.conf, following the lease file). While the lease changes servers
and search domains, a recorder in the machine keeps every version of /etc/resolv.conf, a
client there asks glibc for fresh names all the time, and tcpdump watches the wire.

What must hold: resolv.conf never names anything but the tunnel and is never written in
place; no name the client asked for crosses the wire in cleartext (the probe's STARTTLS
dummy is all the cleartext DNS there is); the agent follows the new lease, and resolv.conf's
search line too; `restore` puts back exactly what dhclient would have written for the new
lease, also after a crash. The controls: without the agent (no journal) the hook changes
nothing, and both instruments see dhclient's servers in the file and the client's names
on the wire; without the hook, the same change of lease with the agent puts the network's
server in resolv.conf for the few milliseconds the agent takes to point it back.

Needs root, isc-dhcp-client, dnsmasq, unbound, tcpdump, dig (runs in CI).
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.sysconf.watch import nameservers
from tests.conftest import Certs, host_untouched
from tests.lab.agentproc import AgentProcess
from tests.lab.capture import cleartext_queries, leaked_with_prefix
from tests.lab.dhcplab import (
    DHCLIENT,
    DHCLIENT_SCRIPT,
    TUNNEL,
    Answer,
    DhcpLab,
    Recording,
    search,
)
from tests.lab.netns import SRV_IPS
from tests.lab.unbound import WWW_A

pytestmark = pytest.mark.system

OLD, NEW = SRV_IPS
NEW_SEARCH = "corp.test"
PROGRAMS = ("ip", "nsenter", "unshare", "mount", "dnsmasq", "unbound", "tcpdump", "dig",
            "getent", "run-parts", DHCLIENT, DHCLIENT_SCRIPT)  # fmt: skip
# what dhclient-script's make_resolv_conf writes for dnsmasq's leases here: the domain
# name first in the search list, dhclient's domain-search with trailing dots
STOCK_OLD = f"domain lab.test\nsearch lab.test\nnameserver {OLD}\n"
STOCK_NEW = f"domain lab.test\nsearch lab.test {NEW_SEARCH}.\nnameserver {NEW}\n"


def order_is(address: str) -> set[str]:
    return {f"tls-port:{address}@853"}


@pytest.fixture
def host() -> Iterator[None]:
    with host_untouched(PROGRAMS):
        yield


@pytest.fixture
def lab(tmp_path: Path, certs: Certs, host: None) -> Iterator[DhcpLab]:
    """The lab with the hook installed and the first lease (OLD, lab.test) bound."""
    with DhcpLab(tmp_path, certs.good_lab) as lab:
        yield lab


def start_agent(lab: DhcpLab, certs: Certs) -> AgentProcess:
    """The agent on the lease's resolver, resolv.conf pointed at the tunnel."""
    agent = lab.agent("strict", certs.ca.path)
    agent.wait(lambda s: set(s["order"]) == order_is(OLD), 15, f"using {OLD}")
    wait_for(lambda: nameservers(lab.resolv_conf()) == [TUNNEL], 5, "resolv.conf pointed")
    return agent


def wait_for(ok: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `ok()` every 10 ms; the seconds it took."""
    t0 = time.monotonic()
    while not ok():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not {what} after {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - t0


def describe(rec: Recording) -> str:
    lines = [f"{v.t:.4f} {v.text!r}" for v in rec.versions]
    lines += [f"{e.t:.4f} {e.name} {','.join(e.kinds)}" for e in rec.events]
    return "\n".join(sorted(lines))


def answered(answers: list[Answer]) -> Counter[str]:
    return Counter(a.result for a in answers)


def test_a_fresh_lease_then_the_agent_points_resolv_conf_at_the_tunnel(
    lab: DhcpLab, certs: Certs
) -> None:
    # no agent yet, so no journal: the hook leaves dhclient-script's own file
    assert lab.resolv_conf() == STOCK_OLD
    t0 = time.monotonic()
    agent = start_agent(lab, certs)
    took = time.monotonic() - t0
    now = lab.resolv_conf()
    assert nameservers(now) == [TUNNEL], now
    assert search(now) == ["lab.test"], now
    assert lab.machine is not None
    dug = lab.machine.run(["dig", "+time=2", "+tries=1", "www.lab.test"], check=False)
    assert dug.returncode == 0 and "status: NOERROR" in dug.stdout, dug.stdout
    assert f"SERVER: {TUNNEL}#53" in dug.stdout, dug.stdout  # from resolv.conf
    assert f"\t{WWW_A}" in dug.stdout, dug.stdout
    got = lab.machine.run(["getent", "ahostsv4", "www.lab.test"], check=False)
    assert got.returncode == 0 and got.stdout.split()[0] == WWW_A, got
    status = agent.status() or {}
    assert set(status["order"]) == order_is(OLD), status
    print(f"agent: the lease's resolver in use and resolv.conf pointed {took:.2f}s after its "
          "start", file=sys.stderr)  # fmt: skip


def test_the_first_lease_after_the_agent_never_puts_the_server_in_resolv_conf(
    tmp_path: Path, certs: Certs, host: None
) -> None:
    """Boot order the other way round: the agent points resolv.conf (then empty) at the
    tunnel before there is a lease; dhclient's first lease (DISCOVER, reason BOUND) goes
    through the hook, becomes the file restore puts back, and is never in resolv.conf."""
    with DhcpLab(tmp_path, certs.good_lab, dhclient=False) as lab:
        agent = lab.agent("strict", certs.ca.path)
        wait_for(lambda: nameservers(lab.resolv_conf()) == [TUNNEL], 15, "resolv.conf pointed")
        recorder = lab.record()
        started = lab.start_dhclient()
        agent.wait(lambda s: set(s["order"]) == order_is(OLD), 10, f"using {OLD}")
        rec = recorder.stop()
        assert lab.machine is not None
        got = lab.machine.run(["getent", "ahostsv4", "www.lab.test"], check=False)
        agent.proc.stop()  # restores, as root
        restored = lab.resolv_conf()
    assert rec.foreign() == [] and rec.in_place_writes() == [], describe(rec)
    assert rec.dhclient_temp_files() == [], describe(rec)
    assert search(rec.versions[-1].text or "") == ["lab.test"], describe(rec)
    assert got.returncode == 0 and got.stdout.split()[0] == WWW_A, got
    assert restored == STOCK_OLD
    print(f"first lease: dhclient-script done {started:.2f}s after dhclient started",
          file=sys.stderr)  # fmt: skip


def rebind(lab: DhcpLab, agent: AgentProcess, how: str = "reboot") -> tuple[float, float]:
    """dnsmasq hands out NEW and the search domain NEW_SEARCH from now on, and dhclient gets
    them: "reboot" runs it again (INIT-REBOOT, reason REBOOT), "renew" waits for its next
    RENEW (the lab's `renewal`). Returns once resolv.conf's search line carries NEW_SEARCH
    and the agent uses NEW: when dhclient started (or dnsmasq changed), and the seconds from
    then to the agent using NEW."""
    lab.set_dns([NEW], search=[NEW_SEARCH])
    t0 = time.monotonic()
    if how == "reboot":
        lab.rerun_dhclient()
    wait_for(lambda: NEW_SEARCH in lab.resolv_conf(), 6, "search line of the new lease")
    # the agent learns the servers from the lease file, which dhclient writes at start and
    # then at most every 15 s (MIN_LEASE_WRITE): a RENEW sooner after the last write is
    # not in the file; with the lab's T1 of 3 s, one 15 to 18 s after the lease is
    wait = 10 if how == "reboot" else 25
    agent.wait(lambda s: set(s["order"]) == order_is(NEW), wait, f"using {NEW}")
    return t0, time.monotonic() - t0


@pytest.mark.parametrize("how", ["reboot", "renew"])
def test_a_lease_with_new_servers_never_puts_them_in_resolv_conf(
    tmp_path: Path, certs: Certs, host: None, how: str
) -> None:
    renewal = 3 if how == "renew" else None  # RENEW every 2.25-3 s
    with DhcpLab(tmp_path, certs.good_lab, renewal=renewal) as lab:
        agent = start_agent(lab, certs)
        recorder = lab.record()
        capture = lab.capture()
        prefix = f"q{secrets.token_hex(3)}"
        load = lab.query_load(prefix)
        time.sleep(0.2)  # the load runs before
        bound = lab.bound()
        t0, used = rebind(lab, agent, how)
        time.sleep(0.3)  # and after
        answers = load.stop()
        rec = recorder.stop()
        pkts = capture.stop()
        status = agent.status() or {}
        leases = lab.bound() - (0 if how == "reboot" else bound)
        now = lab.resolv_conf()
        daemon = agent.proc.pid

    counts = answered(answers)
    cleartext = Counter(cleartext_queries(pkts))
    hook = next((v.t for v in rec.versions if NEW_SEARCH in (v.text or "")), t0) - t0
    writers = {e.name.rsplit(".", 1)[1] for e in rec.events if e.name.startswith(".resolv")}
    print(
        f"{how}: {leases} lease event(s) while recording; the new lease's search line in "
        f"resolv.conf {hook:.2f}s and the agent on {NEW} {used:.2f}s after "
        f"{'dhclient started' if how == 'reboot' else 'dnsmasq changed'}; "
        f"{len(rec.versions)} resolv.conf versions, written by {len(writers - {str(daemon)})} "
        f"hook run(s) and {int(str(daemon) in writers)} daemon; {len(answers)} queries "
        f"{dict(counts)}; {len(pkts)} packets, cleartext DNS {dict(cleartext)}",
        file=sys.stderr,
    )
    # resolv.conf: only ever the tunnel, never written in place, no stock temp file
    assert rec.foreign() == [], describe(rec)
    assert all(v.nameservers == [TUNNEL] for v in rec.versions), describe(rec)
    assert rec.in_place_writes() == [], describe(rec)
    assert rec.dhclient_temp_files() == [], describe(rec)
    # the wire: not one name the client asked for in cleartext; the probe's dummy only
    leaks = leaked_with_prefix(pkts, [a.name for a in answers], prefix)
    assert leaks == {}, {n: [(p.src, p.dst, p.dport) for p in ps] for n, ps in leaks.items()}
    assert set(cleartext) <= {"STARTTLS.", "_dns.resolver.arpa."}, cleartext  # the probe's
    assert any(p.dport == 853 and p.dst == NEW and p.payload for p in pkts), "no TLS to NEW"
    assert any(p.dport == 67 for p in pkts), "the capture missed the DHCP exchange"
    # the client was answered all along, through the tunnel; the agent follows the lease
    assert counts["nxdomain"] > 0 and counts["fail"] == 0, counts
    assert any(a.t > rec.versions[-1].t for a in answers), "no query after the last change"
    assert status["order"] == [f"tls-port:{NEW}@853"], status
    # the search line follows the lease: dhclient's domain name, then its domain-search,
    # each once (a trailing dot, as dhclient writes them, names the same domain)
    assert rec.versions[-1].text == now
    assert [d.rstrip(".") for d in search(now)] == ["lab.test", NEW_SEARCH], now


def test_restore_puts_back_what_dhclient_wrote_for_the_new_lease(
    lab: DhcpLab, certs: Certs
) -> None:
    agent = start_agent(lab, certs)
    rebind(lab, agent)
    assert nameservers(lab.resolv_conf()) == [TUNNEL]
    agent.proc.stop()  # as root, the daemon restores at stop (the unit: ExecStopPost)
    restored = lab.resolv_conf()
    assert restored == STOCK_NEW, restored
    out = agent.cli("restore")
    assert out.returncode == 0 and "nothing to restore" in out.stdout, out
    assert lab.resolv_conf() == STOCK_NEW
    # and that is byte for byte what dhclient-script writes for this lease (no journal
    # now: the hook leaves make_resolv_conf alone)
    lab.rerun_dhclient()
    assert lab.resolv_conf() == restored


def test_after_a_crash_the_hook_still_keeps_the_server_out_and_restore_has_the_new_lease(
    lab: DhcpLab, certs: Certs
) -> None:
    """SIGKILL: the journal stays, so does the hook's make_resolv_conf. A new lease before
    `restore` (the unit's ExecStopPost) is not written into resolv.conf (no DNS rather than
    cleartext), and is what `restore` puts back, not the lease of before the crash."""
    agent = start_agent(lab, certs)
    os.kill(agent.proc.pid, signal.SIGKILL)
    agent.proc.popen.wait(5)
    lab.set_dns([NEW], search=[NEW_SEARCH])
    lab.rerun_dhclient()
    now = lab.resolv_conf()
    assert nameservers(now) == [TUNNEL], now
    assert [d.rstrip(".") for d in search(now)] == ["lab.test", NEW_SEARCH], now
    out = agent.cli("restore")
    assert out.returncode == 0, out
    assert lab.resolv_conf() == STOCK_NEW


def test_control_without_the_agent_dhclient_writes_the_networks_servers(
    lab: DhcpLab,
) -> None:
    """No journal: the hook changes nothing, with it and without it alike; and the
    instruments see what dhclient-script does (its temp file, the in-place write, the
    network's server in the file) and the client's questions going to it in cleartext."""
    assert lab.resolv_conf() == STOCK_OLD
    recorder = lab.record()
    capture = lab.capture()
    prefix = f"n{secrets.token_hex(3)}"
    load = lab.query_load(prefix)
    lab.set_dns([NEW], search=[NEW_SEARCH])
    lab.rerun_dhclient()
    with_hook = lab.resolv_conf()
    assert with_hook == STOCK_NEW
    lab.remove_hook()
    lab.set_dns([OLD], search=[])
    lab.rerun_dhclient()
    assert lab.resolv_conf() == STOCK_OLD
    lab.set_dns([NEW], search=[NEW_SEARCH])
    lab.rerun_dhclient()
    assert lab.resolv_conf() == with_hook
    time.sleep(0.2)
    answers = load.stop()
    rec = recorder.stop()
    pkts = capture.stop()
    # the file as it was when the recorder started, then dhclient's three (each after an
    # empty one: `cat new > resolv.conf` truncates first)
    assert [v.nameservers for v in rec.foreign()] == [[OLD], [NEW], [OLD], [NEW]], describe(rec)
    assert len(rec.in_place_writes()) >= 3, describe(rec)
    assert len(rec.dhclient_temp_files()) == 3, describe(rec)
    leaks = leaked_with_prefix(pkts, [a.name for a in answers], prefix)
    assert {p.dst for ps in leaks.values() for p in ps if p.dport == 53} == {OLD, NEW}
    assert answered(answers)["nxdomain"] > 0


def test_control_without_the_hook_a_new_lease_puts_the_networks_server_in_resolv_conf(
    tmp_path: Path, certs: Certs, host: None
) -> None:
    """The same change of lease with the agent but no hook: the network's server is in
    resolv.conf until the agent points it back (what the hook is there to prevent); glibc
    reads it meanwhile, the client's questions that fall in that window go out in cleartext."""
    with DhcpLab(tmp_path, certs.good_lab, hook=False) as lab:
        agent = start_agent(lab, certs)
        recorder = lab.record()
        capture = lab.capture()
        prefix = f"c{secrets.token_hex(3)}"
        load = lab.query_load(prefix)
        time.sleep(0.2)
        _t0, used = rebind(lab, agent)
        wait_for(lambda: nameservers(lab.resolv_conf()) == [TUNNEL], 5, "pointed back")
        time.sleep(0.3)
        answers = load.stop()
        rec = recorder.stop()
        pkts = capture.stop()
    foreign = rec.foreign()
    assert [v.nameservers for v in foreign] == [[NEW]], describe(rec)
    assert rec.in_place_writes() and rec.dhclient_temp_files(), describe(rec)
    after = [v for v in rec.versions if v.t > foreign[0].t]
    assert after and after[0].nameservers == [TUNNEL], describe(rec)
    window = after[0].t - foreign[0].t
    leaks = leaked_with_prefix(pkts, [a.name for a in answers], prefix)
    print(
        f"control: {NEW} in resolv.conf for {window * 1000:.1f} ms until the agent pointed it "
        f"back; {len(leaks)} of {len(answers)} names in cleartext to "
        f"{sorted({p.dst for ps in leaks.values() for p in ps if p.dport == 53})}; agent on "
        f"{NEW} {used:.2f}s after dhclient started",
        file=sys.stderr,
    )
