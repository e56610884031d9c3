"""The resolved backend against the real systemd-resolved, fed by a real NetworkManager
(tests/lab/resolvedlab.py): `dnstls-agent stub` and `restore`, run in the lab's machine as
the unit runs them, with the tunnel on 127.0.0.153 in front of a TLS test peer.

What is counted on the server side: the link's own server (what DHCP hands out, plain DNS
on 198.51.100.1) and the tunnel's upstream (TLS on 198.51.100.2:853). While the stub is
pointed, not one query reaches the link's server, whatever the name: one outside every
domain, one in the network's own domain (lab.test, which resolved would route to the link),
a single-label one (expanded with the search domain), through resolved's D-Bus API, the
127.0.0.53 stub and glibc; nor after what used to bring the link's servers back into
resolved (NetworkManager sending them again after a new lease, its own restart or
resolved's), since NetworkManager stops feeding resolved while the stub is pointed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from agent.sysconf import request
from agent.sysconf.resolved import ResolvedStubError, Server, Snapshot
from tests.conftest import Certs, missing, require_program, require_root
from tests.lab.netns import SRV_IPS
from tests.lab.peer import PEER_A, PeerConfig
from tests.lab.resolvedlab import (
    LINK_DNS,
    STUB_RESOLV_CONF,
    LabError,
    PeerInNetns,
    ResolvedLab,
    fetch_resolved,
)
from tests.lab.tunnel import TunnelProcess

pytestmark = pytest.mark.system

TUNNEL = "127.0.0.153"
UPSTREAM = SRV_IPS[1]  # the tunnel's upstream: TLS on 853
NEW_DNS = "198.51.100.3"  # another server of the network's, handed out by a later lease
PROGRAMS = ("ip", "NetworkManager", "nmcli", "dnsmasq", "dbus-daemon", "nsenter", "unshare",
            "apt-get", "dpkg", "dig", "getent")  # fmt: skip


@pytest.fixture(scope="session")
def resolved_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_root()
    for program in PROGRAMS:
        require_program(program)
    try:
        return fetch_resolved(tmp_path_factory.mktemp("packages"))
    except LabError as exc:
        missing(str(exc))
        raise


@dataclass
class World:
    lab: ResolvedLab
    link: PeerInNetns  # the link's own server: must see nothing while the stub is pointed
    upstream: PeerInNetns  # behind the tunnel
    tunnel: TunnelProcess
    ifindex: int


@contextlib.contextmanager
def world_of(
    root: Path,
    certs: Certs,
    tmp_path: Path,
    resolved_conf: str | None = None,
    nm_dns: Literal["systemd-resolved", "auto"] = "systemd-resolved",
) -> Iterator[World]:
    cert = certs.ca.issue(tmp_path, "upstream", ips=(UPSTREAM,))
    with ResolvedLab(tmp_path / "lab", root, resolved_conf=resolved_conf, nm_dns=nm_dns) as lab:
        assert lab.nm.srv is not None and lab.nm.machine is not None
        srv = lab.nm.srv.name
        link_cfg = PeerConfig(host=LINK_DNS, dns_port=53, tls_port=None)
        up_cfg = PeerConfig(host=UPSTREAM, dns_port=0, tls_port=853, cert=cert.cert, key=cert.key)
        with PeerInNetns(srv, link_cfg) as link, PeerInNetns(srv, up_cfg) as upstream:
            tunnel = TunnelProcess.start(
                ["--upstream", f"tls:{UPSTREAM}", "--ca-file", str(certs.ca.path)],
                tmp_path / "tunnel.log",
                host=TUNNEL,
                port=53,
                netns=lab.nm.machine,
            )
            ifindex = next(iter(lab.snapshot().links()))
            yield World(lab, link, upstream, tunnel, ifindex)


@pytest.fixture
def world(resolved_root: Path, certs: Certs, tmp_path: Path) -> Iterator[World]:
    with world_of(resolved_root, certs, tmp_path) as w:
        yield w


def settings(snap: Snapshot) -> tuple[object, ...]:
    """What restore must bring back: global and per-link servers and domains."""
    return (snap.global_servers(), snap.links(), snap.domains)


def lookups(w: World, tag: str) -> dict[str, str]:
    """One lookup of each kind; the name each one asked for -> the address it got."""
    lab = w.lab
    got: dict[str, str] = {}
    for name in (f"{tag}.example.org", f"{tag}.lab.test", f"{tag}single"):
        out = lab.query(name)  # resolved's own API (nss-resolve and resolvectl use it)
        fqdn = name if "." in name else f"{name}.lab.test"
        got[fqdn] = out.split(":", 1)[1].split()[0]
    for name in (f"{tag}-glibc.example.net", f"{tag}glibc"):  # glibc -> 127.0.0.53
        out = lab.run(["getent", "ahostsv4", name]).stdout
        fqdn = name if "." in name else f"{name}.lab.test"
        got[fqdn] = out.split()[0]
    dig = lab.run(["dig", "+short", "+tries=1", "@127.0.0.53", f"{tag}-dig.lab.test"]).stdout
    got[f"{tag}-dig.lab.test"] = dig.strip()
    return got


def wire_names(names: list[str], tag: str) -> set[str]:
    return {n.rstrip(".") for n in names if n.startswith(tag)}


def test_every_query_goes_through_the_tunnel_and_restore_puts_resolved_back(world: World) -> None:
    w = world
    lab = w.lab
    before = lab.snapshot()
    assert before.links()[w.ifindex] == (Server(LINK_DNS),)
    assert ("lab.test", False) in before.domains[w.ifindex]
    assert lab.query("before.example.org")  # the link's server answers, before
    assert "before.example.org." in w.link.names()
    w.link.clear()

    assert "backend: resolved" in lab.agent("stub", "--show").stdout
    t0 = time.monotonic()
    out = lab.agent("stub").stdout
    applied = time.monotonic() - t0
    assert "systemd-resolved" in out and TUNNEL in out
    assert lab.dropin.exists()
    snap = lab.snapshot()
    assert snap.global_servers() == (Server(TUNNEL),)
    assert snap.links()[w.ifindex] == ()  # the link keeps its domains, not its servers
    assert ("lab.test", False) in snap.domains[w.ifindex]
    assert lab.run(["cat", "/etc/resolv.conf"]).stdout.count("nameserver 127.0.0.53") == 1
    # NetworkManager.conf says dns=systemd-resolved, which outranks /run: /etc it is too
    assert set(lab.nm_dropins()) == {"run", "etc"}

    got = lookups(w, "on")
    assert set(got.values()) == {PEER_A}, got
    assert w.link.seen() == []  # not one query reached the link's own server
    assert wire_names(w.upstream.names(), "on") == set(got)
    assert {s.via for s in w.upstream.seen()} == {"tls-port"}

    t0 = time.monotonic()
    said = lab.agent("restore").stdout
    restored = time.monotonic() - t0
    assert "NetworkManager gave" in said and "removed" in said  # it feeds resolved again
    assert not lab.dropin.exists() and lab.journal() is None and not lab.nm_dropins()
    assert lab.resolv_conf_link() == STUB_RESOLV_CONF
    assert settings(lab.snapshot()) == settings(before)
    assert lab.query("after.example.org")
    assert "after.example.org." in w.link.names()  # back to the link's server: it works
    print(f"stub {applied:.2f}s, restore {restored:.2f}s, resolved starts {lab.starts()}",
          file=sys.stderr)  # fmt: skip


def test_the_tunnel_killed_then_restore_from_a_fresh_process(world: World) -> None:
    w = world
    lab = w.lab
    before = lab.snapshot()
    lab.agent("stub")
    os.kill(w.tunnel.proc.pid, signal.SIGKILL)  # the agent dies; its stub stays pointed
    w.tunnel.proc.popen.wait(5)
    failed = lab.resolvectl("query", "--cache=no", "dead.example.org", check=False)
    assert failed.returncode != 0  # no answer, and no leak either:
    assert w.link.seen() == []
    said = lab.agent("restore").stdout  # a fresh process, from the journal alone
    assert "NetworkManager gave" in said
    assert settings(lab.snapshot()) == settings(before) and not lab.nm_dropins()
    assert lab.query("alive.example.org")
    assert "alive.example.org." in w.link.names()


@pytest.mark.parametrize("when", ["nm-dropin-in-run", "links-emptied"])
def test_stub_killed_half_way_then_restore(world: World, when: str) -> None:
    """SIGKILL while apply is at work, the journal's entry not final: as soon as NM's drop-in
    is in /run (resolved restarted, NM not yet reloaded, or checked), or once the links are
    emptied (NM silenced with the drop-in in /etc too)."""
    w = world
    lab = w.lab
    before = lab.snapshot()
    assert lab.nm.machine is not None

    def now() -> bool:
        if when == "nm-dropin-in-run":
            return "run" in lab.nm_dropins()
        try:
            snap = lab.snapshot()
        except ResolvedStubError:
            return False  # resolved is restarting
        return snap.links().get(w.ifindex) == () and "etc" in lab.nm_dropins()

    stub = lab.nm.machine.start(
        [sys.executable, "-m", "agent", "-c", str(lab.config), "stub"],
        lab.dir / "logs/stub-killed.log",
    )
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end and stub.alive():
            if now():
                os.kill(stub.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        stub.popen.wait(5)
    finally:
        stub.stop()
    assert stub.popen.returncode == -signal.SIGKILL, "apply ended before it could be killed"
    journal = lab.journal()
    assert journal is not None and "nameservers" not in journal["entries"][0]  # type: ignore[index]
    assert lab.nm_dropins()
    said = lab.agent("restore").stdout  # NM feeds the link again; put back if NM was slower
    assert "removed" in said and "restarted" in said and "NetworkManager reloaded" in said
    assert settings(lab.snapshot()) == settings(before)
    assert not lab.dropin.exists() and not lab.nm_dropins()
    lab.query("fed-again.lab.test")  # the network's own server, as before
    assert "fed-again.lab.test." in w.link.names()


def stays_empty(w: World, seconds: float = 1.0) -> bool:
    """The link has no servers in resolved now and for `seconds` (NM sends them at once when
    it does: the renewal, its restart or resolved's restart is already over)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if w.lab.snapshot().links().get(w.ifindex) != ():
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("nm_dns", ["systemd-resolved", "auto"])
def test_what_used_to_feed_the_link_again_no_longer_does(
    resolved_root: Path, certs: Certs, tmp_path: Path, nm_dns: Literal["systemd-resolved", "auto"]
) -> None:
    """A lease with other servers, a restart of NetworkManager and one of resolved: each made
    NM send the link's servers to resolved again, and names in the network's domain went to
    them in cleartext until the next `stub`. With NM no longer feeding resolved, none does;
    the search domain keeps working (the drop-in's Domains=), NM's own view follows the
    network (the watcher's source), and restore lets NM feed resolved the servers of now.
    NetworkManager.conf as the lab writes it (dns=systemd-resolved, explicit: the drop-in goes
    to /etc too) and as a stock one (nothing said: /run suffices)."""
    with world_of(resolved_root, certs, tmp_path, nm_dns=nm_dns) as w:
        lab = w.lab
        assert lab.nm.srv is not None
        lab.nm.add_srv_address(NEW_DNS)
        new_cfg = PeerConfig(host=NEW_DNS, dns_port=53, tls_port=None)
        with PeerInNetns(lab.nm.srv.name, new_cfg) as new:
            before = lab.snapshot()
            lab.agent("stub")
            assert set(lab.nm_dropins()) == ({"run"} if nm_dns == "auto" else {"run", "etc"})

            def private(tag: str) -> None:
                assert stays_empty(w), lab.snapshot().links()
                got = lookups(w, tag)
                assert set(got.values()) == {PEER_A}, got
                assert w.link.seen() == [] and new.seen() == []  # the network's servers: nothing
                assert wire_names(w.upstream.names(), tag) == set(got)
                assert lab.snapshot().global_servers() == (Server(TUNNEL),)
                assert lab.resolv_conf_link() == STUB_RESOLV_CONF  # NM wrote nothing there

            private("applied")
            lab.nm.set_dns([LINK_DNS, NEW_DNS])
            lab.nm.renew()
            lab.nm.wait_dns(NEW_DNS)  # NM has the new servers: the watcher sees them
            private("renewed")
            lab.restart_resolved()
            private("resolved-restarted")
            lab.nm.stop_nm()
            lab.nm.start_nm()
            private("nm-restarted")

            said = lab.agent("restore").stdout
            assert "NetworkManager gave" in said and not lab.nm_dropins()
            now = lab.snapshot()
            assert now.links()[w.ifindex] == (Server(LINK_DNS), Server(NEW_DNS))  # of now
            assert (now.global_servers(), now.domains) == (before.global_servers(), before.domains)
            assert lab.query("after.lab.test")
            assert "after.lab.test." in w.link.names() + new.names()  # the network's: it works
            assert lab.resolv_conf_link() == STUB_RESOLV_CONF


def test_an_explicit_systemd_resolved_true_is_found_out(
    resolved_root: Path, certs: Certs, tmp_path: Path
) -> None:
    """dns=none from /run wins (DnsManager.Mode says "none"), but systemd-resolved=true read
    later from /etc keeps NM feeding resolved, which Mode does not show: asked to send its
    configuration again, NM gives the emptied link its servers, so the drop-in goes to /etc
    too (read after the administrator's 50-...)."""
    with world_of(resolved_root, certs, tmp_path, nm_dns="auto") as w:
        lab = w.lab
        admin = lab.dir / "etc-nm/conf.d/50-admin.conf"
        admin.write_text("[main]\nsystemd-resolved=true\n")
        out = lab.agent("stub")
        assert "kept sending the links' servers to systemd-resolved" in out.stderr
        assert set(lab.nm_dropins()) == {"run", "etc"}
        lab.nm.stop_nm()
        lab.nm.start_nm()
        assert stays_empty(w)
        lab.query("admin.lab.test")
        assert w.link.seen() == []
        lab.agent("restore")
        assert not lab.nm_dropins() and admin.exists()
        assert lab.snapshot().links()[w.ifindex] == (Server(LINK_DNS),)


def test_an_administrators_global_servers_are_set_aside_and_come_back(
    resolved_root: Path, certs: Certs, tmp_path: Path
) -> None:
    conf = "[Resolve]\nDNS=198.51.100.9\nDomains=admin.test\n"
    with world_of(resolved_root, certs, tmp_path, resolved_conf=conf) as w:
        lab = w.lab
        before = lab.snapshot()
        assert before.global_servers() == (Server("198.51.100.9"),)
        lab.agent("stub")
        snap = lab.snapshot()
        assert snap.global_servers() == (Server(TUNNEL),)  # DNS= first: theirs set aside
        assert ("admin.test", False) in snap.domains[0]  # their domains are kept
        got = lookups(w, "adm")
        assert set(got.values()) == {PEER_A} and w.link.seen() == []
        lab.agent("restore")
        assert settings(lab.snapshot()) == settings(before)


def test_refresh_brings_the_networks_domains_of_now(world: World) -> None:
    """NM, silenced, sends resolved no new domains: the daemon's request does (stub
    --refresh as root, as dnstls-agent-stub.service runs it); single-label names then expand
    to the new domain. The same request again restarts nothing."""
    w = world
    lab = w.lab
    lab.agent("stub")
    (lab.dir / "runtime").mkdir(exist_ok=True)
    request.write(lab.dir / "runtime", ("new.test",), "search domains new.test")
    starts = lab.starts()
    said = lab.agent("stub", "--refresh").stdout
    assert "refreshed: search domains new.test" in said
    assert lab.starts() == starts + 1  # the drop-in changed: resolved read it again
    assert "Domains=~. new.test\n" in lab.dropin.read_text()
    assert ("new.test", False) in lab.snapshot().domains.get(0, ())
    stub_conf = lab.run(["cat", "/etc/resolv.conf"]).stdout  # what glibc's search list is
    assert "new.test" in next(ln for ln in stub_conf.splitlines() if ln.startswith("search "))
    lab.agent("stub", "--refresh")
    assert lab.starts() == starts + 1  # nothing to change: no restart
    lab.agent("restore")
    assert not lab.dropin.exists()
