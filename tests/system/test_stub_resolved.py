"""The resolved backend against the real systemd-resolved, fed by a real NetworkManager
(tests/lab/resolvedlab.py): `dnstls-agent stub` and `restore`, run in the lab's machine as
the unit runs them, with the tunnel on 127.0.0.153 in front of a TLS test peer.

What is counted on the server side: the link's own server (what DHCP hands out, plain DNS
on 198.51.100.1) and the tunnel's upstream (TLS on 198.51.100.2:853). While the stub is
pointed, not one query reaches the link's server, whatever the name: one outside every
domain, one in the network's own domain (lab.test, which resolved would route to the link),
a single-label one (expanded with the search domain), through resolved's D-Bus API, the
127.0.0.53 stub and glibc.
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

import pytest

from agent.sysconf.resolved import ResolvedStubError, Server, Snapshot
from tests.conftest import Certs, missing, require_program, require_root
from tests.lab.netns import SRV_IPS
from tests.lab.peer import PEER_A, PeerConfig
from tests.lab.resolvedlab import LINK_DNS, LabError, PeerInNetns, ResolvedLab, fetch_resolved
from tests.lab.tunnel import TunnelProcess

pytestmark = pytest.mark.system

TUNNEL = "127.0.0.153"
UPSTREAM = SRV_IPS[1]  # the tunnel's upstream: TLS on 853
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
    root: Path, certs: Certs, tmp_path: Path, resolved_conf: str | None = None
) -> Iterator[World]:
    cert = certs.ca.issue(tmp_path, "upstream", ips=(UPSTREAM,))
    with ResolvedLab(tmp_path / "lab", root, resolved_conf=resolved_conf) as lab:
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

    got = lookups(w, "on")
    assert set(got.values()) == {PEER_A}, got
    assert w.link.seen() == []  # not one query reached the link's own server
    assert wire_names(w.upstream.names(), "on") == set(got)
    assert {s.via for s in w.upstream.seen()} == {"tls-port"}

    t0 = time.monotonic()
    said = lab.agent("restore").stdout
    restored = time.monotonic() - t0
    assert "has its servers again" in said and "removed" in said
    assert not lab.dropin.exists() and lab.journal() is None
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
    assert "has its servers again" in said
    assert settings(lab.snapshot()) == settings(before)
    assert lab.query("alive.example.org")
    assert "alive.example.org." in w.link.names()


def test_stub_killed_half_way_then_restore(world: World) -> None:
    """SIGKILL while apply is at work (the links emptied, the journal's entry not final)."""
    w = world
    lab = w.lab
    before = lab.snapshot()
    assert lab.nm.machine is not None
    stub = lab.nm.machine.start(
        [sys.executable, "-m", "agent", "-c", str(lab.config), "stub"],
        lab.dir / "logs/stub-killed.log",
    )
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end and stub.alive():
            try:
                snap = lab.snapshot()
            except ResolvedStubError:
                continue  # resolved is restarting
            if snap.links().get(w.ifindex) == () and lab.journal() is not None:
                os.kill(stub.pid, signal.SIGKILL)
                break
        stub.popen.wait(5)
    finally:
        stub.stop()
    assert stub.popen.returncode == -signal.SIGKILL, "apply ended before it could be killed"
    journal = lab.journal()
    assert journal is not None and "nameservers" not in journal["entries"][0]  # type: ignore[index]
    said = lab.agent("restore").stdout  # the link's servers: put back, unless NM was quicker
    assert "removed" in said and "restarted" in said
    assert settings(lab.snapshot()) == settings(before)
    assert not lab.dropin.exists()


def test_a_restart_of_resolved_keeps_the_tunnel_but_nm_feeds_the_link_again(world: World) -> None:
    """What survives a restart: the drop-in. NetworkManager sends the link's servers again
    as soon as resolved is back: names in the network's domain reach the link's server until
    the next `stub`, which empties the link again without restarting resolved."""
    w = world
    lab = w.lab
    before = lab.snapshot()
    lab.agent("stub")
    starts = lab.starts()
    lab.restart_resolved()
    snap = lab._wait(lambda s: bool(s.links().get(w.ifindex)), "NM's servers again", 10)
    assert snap.global_servers() == (Server(TUNNEL),)  # the drop-in survived
    assert snap.links()[w.ifindex] == (Server(LINK_DNS),)  # NM fed the link again
    assert lab.query("kept.example.org") and w.link.seen() == []  # the default route: tunnel
    lab.query("fed.lab.test")
    assert w.link.names() == ["fed.lab.test."] * len(w.link.names())  # the domain: the link
    w.link.clear()
    lab.agent("stub")  # again: idempotent
    assert lab.starts() == starts + 1  # no restart for it: the drop-in was already read
    assert lab.snapshot().links()[w.ifindex] == ()
    lab.query("again.lab.test")
    assert w.link.seen() == []
    lab.agent("restore")
    assert settings(lab.snapshot()) == settings(before)


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
