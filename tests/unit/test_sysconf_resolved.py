"""agent/sysconf/resolved.py: the pure part, and apply/revert against a fake resolved fed by
a fake NetworkManager (which sends the links' servers again after resolved restarts, on a
reload and on a new lease, unless our drop-in stops it), on a root prefix. The real
resolved and NetworkManager: tests/system/test_stub_resolved.py."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent import sysconf
from agent.sysconf import networkmanager as nmb
from agent.sysconf import resolved
from agent.sysconf.networkmanager import DnsState, NMStubError
from agent.sysconf.resolved import (
    DROPIN,
    DROPIN_DIR,
    NM_DROPIN,
    ResolvedBackend,
    ResolvedStubError,
    Server,
    Snapshot,
)

TUNNEL = ["127.0.0.153"]
LINK = 2
OTHER = 3
LINK_DNS = [Server("198.51.100.1"), Server("2001:db8::1", 53, "dns.test")]


class FakeResolved:
    """resolved as the backend sees it. Global servers come from `config` unless our drop-in
    names others (read at restart, as resolved 252 does); links are fed by "NM" (`nm`, the
    servers it has per link) while `feeding()` says so: it sends them again `nm_lag`
    snapshots after each restart."""

    def __init__(
        self,
        root: Path,
        *,
        config: Sequence[str] = (),
        managed: Sequence[int] = (),
        nm_lag: int = 3,
    ) -> None:
        self.root = root
        self.config = [Server(a) for a in config]
        self.nm: dict[int, list[Server]] = {LINK: list(LINK_DNS), OTHER: [Server("203.0.113.7")]}
        self.links = {i: list(s) for i, s in self.nm.items()}
        self.domains = {LINK: (("lab.test", False),), OTHER: (("corp.example", False),)}
        self.ifnames = {LINK: "wlan0", OTHER: "eth1"}
        self.managed = set(managed)
        self.nm_lag = nm_lag
        self.pending: int | None = None
        self.up = True
        self.restarts = 0
        self.set_calls: list[tuple[int, list[Server]]] = []
        self.global_servers = self._read_config()
        self.feeding: Callable[[], bool] = lambda: True

    def nm_sends(self) -> None:
        """NM sends every link's servers (a reload, a new lease), if it feeds resolved."""
        if self.up and self.feeding():
            self.links.update({i: list(s) for i, s in self.nm.items()})

    where = "a fake bus"

    def _read_config(self) -> list[Server]:
        path = self.root / DROPIN_DIR / DROPIN
        if path.exists():
            return [Server(a) for a in resolved.dropin_nameservers(path.read_text())]
        return list(self.config)

    def on_bus(self) -> bool:
        return self.up

    def snapshot(self) -> Snapshot:
        if not self.up:
            raise ResolvedStubError("not on the bus")
        if self.pending is not None:
            self.pending -= 1
            if self.pending <= 0:
                self.pending = None
                self.links.update({i: list(s) for i, s in self.nm.items()})
        servers: dict[int, tuple[Server, ...]] = {i: tuple(s) for i, s in self.links.items()}
        if self.global_servers:
            servers[0] = tuple(self.global_servers)
        return Snapshot(servers, dict(self.domains), dict(self.ifnames))

    def set_link_dns(self, ifindex: int, servers: Sequence[Server]) -> None:
        if ifindex in self.managed:
            raise ResolvedStubError(f"Link {ifindex} is managed.")
        self.set_calls.append((ifindex, list(servers)))
        self.links[ifindex] = list(servers)

    def restart(self) -> None:
        self.restarts += 1
        self.global_servers = self._read_config()
        self.pending = self.nm_lag if self.feeding() else None

    def reboot(self) -> None:
        """/run starts empty: no drop-in, links as NM feeds them, the configured globals."""
        (self.root / DROPIN_DIR / DROPIN).unlink(missing_ok=True)
        self.links = {i: list(s) for i, s in self.nm.items()}
        self.global_servers = list(self.config)
        self.pending = None


@dataclass
class FakeNM:
    """NetworkManager as the backend sees it: it stops feeding `resolved` once our drop-in is
    in one of the `obeyed` directories (an explicit dns= read later makes /run's lose); in
    `half_obeyed` ones only dns=none wins (systemd-resolved=true is read later)."""

    root: Path
    resolved: FakeResolved
    running: bool = True
    obeyed: tuple[str, ...] = ("run", "etc")
    half_obeyed: tuple[str, ...] = ()
    reloads: list[int] = field(default_factory=list)
    buses: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.resolved.feeding = self.feeds

    def connect(self, bus: str | None) -> FakeNM:
        self.buses.append(bus)
        return self

    def _ours_in(self) -> set[str]:
        return {
            where
            for where, d in nmb.DROPIN_DIRS.items()
            if (self.root / d / NM_DROPIN).exists()
            and resolved.NM_HEADER in (self.root / d / NM_DROPIN).read_text()
        }

    def feeds(self) -> bool:
        """Not on the bus: someone else (systemd-networkd) feeds resolved, or NM once it
        starts, unless it then reads our drop-in."""
        return not self._ours_in() & set(self.obeyed)

    def state(self) -> DnsState | None:
        if not self.running:
            return None
        if self._ours_in() & {*self.obeyed, *self.half_obeyed}:
            return DnsState("none", "unmanaged")
        return DnsState("systemd-resolved", "unmanaged")

    def reload(self, flags: int) -> None:
        if not self.running:
            raise NMStubError("not on the bus")
        self.reloads.append(flags)
        self.resolved.nm_sends()

    def dns_interfaces(self) -> set[str]:
        fake = self.resolved
        return {fake.ifnames[i] for i, s in fake.nm.items() if s} if self.running else set()

    def restart(self) -> None:
        """NM stops and starts: it reads its configuration and sends every link's servers."""
        self.resolved.nm_sends()


@pytest.fixture(autouse=True)
def no_settling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nmb, "SETTLE", 0.0)  # how long NM's Mode may take to say "none"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root" / "etc").mkdir(parents=True)
    (tmp_path / "root" / "etc" / "resolv.conf").symlink_to(
        "../run/systemd/resolve/stub-resolv.conf"
    )
    return tmp_path / "root"


class World:
    def __init__(self, root: Path, state: Path, fake: FakeResolved) -> None:
        self.root = root
        self.state = state
        self.fake = fake
        self.nm = FakeNM(root, fake, running=False)  # not on the bus: as before NM mattered
        self.boot = "boot-1"

    def backend(self) -> ResolvedBackend:
        """A fresh backend, as a fresh process would make (the fakes are the system)."""
        return ResolvedBackend(
            self.root,
            control=self.fake,
            nm=self.nm.connect,
            boot_id=lambda: self.boot,
            quiet=0.05,
            settle=2,
        )

    def apply(self) -> str:
        return sysconf.apply(self.state, self.backend(), TUNNEL)

    def restore(self, monkeypatch: pytest.MonkeyPatch) -> str:
        monkeypatch.setattr(sysconf, "backends", lambda *a, **k: {"resolved": self.backend()})
        return sysconf.restore(self.state, self.root)

    @property
    def dropin(self) -> Path:
        return self.root / DROPIN_DIR / DROPIN

    def nm_dropin(self, where: str) -> Path:
        return self.root / nmb.DROPIN_DIRS[where] / NM_DROPIN


@pytest.fixture
def world(root: Path, tmp_path: Path) -> World:
    return World(root, tmp_path / "state", FakeResolved(root, config=["192.0.2.53"]))


# -- the pure part ---------------------------------------------------------------------------
def test_render_drops_other_globals_and_routes_everything_to_the_tunnel() -> None:
    text = resolved.render(TUNNEL, ["lab.test", "corp.example"])
    assert resolved.is_ours(text)
    body = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert body == [
        "[Resolve]",
        "DNS=",
        "DNS=127.0.0.153",
        "Domains=~. lab.test corp.example",
        "DNSOverTLS=no",
        "LLMNR=no",
    ]
    assert resolved.dropin_nameservers(text) == TUNNEL


def test_dropin_nameservers_follow_resolved_reset_rule() -> None:
    text = "[Resolve]\nDNS=192.0.2.1\nDNS=\nDNS=127.0.0.153 ::1\nDomains=~.\n"
    assert resolved.dropin_nameservers(text) == ["127.0.0.153", "::1"]
    assert resolved.dropin_nameservers("[Resolve]\n") == []


@pytest.mark.parametrize(
    ("link", "content", "expected"),
    [
        ("../run/systemd/resolve/stub-resolv.conf", "", True),
        ("/run/systemd/resolve/stub-resolv.conf", "", True),
        ("/run/systemd/resolve/resolv.conf", "", True),  # "uplink": only the tunnel, then
        ("../usr/lib/systemd/resolv.conf", "", True),
        ("/run/NetworkManager/resolv.conf", "", False),
        ("../run/resolvconf/resolv.conf", "", False),
        (None, "# a copy\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lab.test\n", True),
        (None, "nameserver 127.0.0.53\nnameserver 198.51.100.1\n", False),
        (None, "nameserver 198.51.100.1\n", False),
        (None, "", False),
    ],
)
def test_points_at_resolved(link: str | None, content: str, expected: bool) -> None:
    assert resolved.points_at_resolved(link, content) is expected


def test_servers_to_and_from_dbus_and_json() -> None:
    v4, v6 = Server("198.51.100.1"), Server("2001:db8::1", 853, "dns.test")
    assert v4.to_dbus() == [socket.AF_INET, bytes([198, 51, 100, 1]), 0, ""]
    assert v6.to_dbus()[0] == socket.AF_INET6 and len(v6.to_dbus()[1]) == 16
    for s in (v4, v6):
        assert Server.from_dbus(*s.to_dbus()) == s
        assert Server.from_json(s.to_json()) == s
    assert v4.text() == "198.51.100.1" and v6.text() == "[2001:db8::1]:853#dns.test"


def test_snapshot_search_domains_are_the_links_search_domains() -> None:
    snap = Snapshot(
        domains={
            0: (("admin.test", False), (".", True)),
            2: (("lab.test", False), ("vpn.example", True)),
            3: (("lab.test", False), ("corp.example", False)),
        }
    )
    assert snap.search_domains() == ["lab.test", "corp.example"]
    assert sorted(snap.links()) == [2, 3]


def test_links_to_put_back_only_where_they_are_still_empty_and_the_same() -> None:
    recorded = [
        {"ifindex": 2, "ifname": "wlan0", "servers": [{"address": "198.51.100.1"}]},
        {"ifindex": 3, "ifname": "eth1", "servers": [{"address": "203.0.113.7"}]},
        {"ifindex": 4, "ifname": "eth2", "servers": [{"address": "203.0.113.8"}]},
        {"ifindex": 5, "ifname": "eth3", "servers": [{"address": "203.0.113.9"}]},
    ]
    now = Snapshot(
        servers={2: (), 3: (Server("203.0.113.99"),), 5: ()},  # 3: fed anew since; 4: gone
        ifnames={2: "wlan0", 3: "eth1", 5: "veth7"},  # 5: the index is another interface now
    )
    assert resolved.links_to_put_back(recorded, now) == [(2, [Server("198.51.100.1")])]


# -- apply and revert against the fake --------------------------------------------------------
def test_detect(root: Path, world: World) -> None:
    assert world.backend().detect()
    world.fake.up = False
    assert not world.backend().detect()
    world.fake.up = True
    (root / "etc" / "resolv.conf").unlink()
    (root / "etc" / "resolv.conf").symlink_to("/run/NetworkManager/resolv.conf")
    assert not world.backend().detect()
    (root / "etc" / "resolv.conf").unlink()
    (root / "etc" / "resolv.conf").write_text("nameserver 127.0.0.53\nsearch lab.test\n")
    assert world.backend().detect()


def test_apply_empties_the_links_and_restore_puts_everything_back(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = world.fake
    said = world.apply()
    assert "systemd-resolved" in said and "127.0.0.153" in said
    assert world.dropin.read_text() == resolved.render(TUNNEL, ["lab.test", "corp.example"])
    assert oct(world.dropin.stat().st_mode & 0o777) == "0o644"
    assert fake.restarts == 1 and fake.global_servers == [Server("127.0.0.153")]
    assert fake.links == {LINK: [], OTHER: []}
    # NM sent the servers again after the restart: emptied once more
    assert [i for i, _ in fake.set_calls].count(LINK) == 2
    entry = sysconf.journal_of(world.state)
    assert entry is not None
    (journalled,) = entry["entries"]
    assert journalled["global"] == [Server("192.0.2.53").to_json()]
    assert {link["ifindex"]: link["ifname"] for link in journalled["links"]} == {
        2: "wlan0",
        3: "eth1",
    }

    said = world.restore(monkeypatch)
    assert "wlan0 has its servers again" in said and "removed" in said
    assert fake.links == {LINK: LINK_DNS, OTHER: [Server("203.0.113.7")]}
    assert fake.global_servers == [Server("192.0.2.53")] and fake.restarts == 2
    assert not world.dropin.exists()
    assert sysconf.journal_of(world.state) is None


def test_applying_again_restarts_nothing(world: World) -> None:
    world.apply()
    world.apply()
    assert world.fake.restarts == 1
    assert world.fake.links[LINK] == []


def test_killed_between_the_journal_and_the_change(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal holds only what record() saw; apply had done everything (or anything)."""
    backend = world.backend()
    with sysconf.open_journal(world.state) as journal:
        journal.save(backend.name, [backend.record()])
    backend.apply(TUNNEL, backend.record())  # ...and the process died before saving its entry
    assert world.fake.links[LINK] == []
    said = world.restore(monkeypatch)  # a fresh process
    assert "wlan0 has its servers again" in said
    assert world.fake.links[LINK] == LINK_DNS
    assert world.fake.global_servers == [Server("192.0.2.53")]
    assert not world.dropin.exists()


def test_killed_after_the_dropin_but_before_resolved_read_it(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = world.fake

    def dies() -> None:
        raise ResolvedStubError("killed")

    monkeypatch.setattr(fake, "restart", dies)
    with pytest.raises(ResolvedStubError):
        world.apply()
    monkeypatch.undo()
    assert world.dropin.exists() and fake.links[LINK] == LINK_DNS
    world.restore(monkeypatch)
    assert not world.dropin.exists() and fake.links[LINK] == LINK_DNS
    assert fake.restarts == 1  # the drop-in was there: resolved reads its configuration again


def test_restore_twice_after_a_crash_in_restore(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Revert removed the drop-in and died before restarting resolved: the next one restarts
    it, because resolved still forwards to the tunnel."""
    world.apply()
    world.dropin.unlink()
    world.restore(monkeypatch)
    assert world.fake.global_servers == [Server("192.0.2.53")]


def test_after_a_reboot_there_is_nothing_to_put_back(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.apply()
    world.fake.reboot()
    world.boot = "boot-2"
    calls = len(world.fake.set_calls)
    said = world.restore(monkeypatch)
    assert "nothing of ours left" in said
    assert len(world.fake.set_calls) == calls and world.fake.restarts == 1


def test_apply_after_a_reboot_records_afresh(world: World) -> None:
    world.apply()
    world.fake.reboot()
    world.fake.nm[LINK] = [Server("198.51.100.77")]  # another network this time
    world.fake.links[LINK] = [Server("198.51.100.77")]
    world.boot = "boot-2"
    world.apply()  # the journal of the first boot is still there
    entry = sysconf.journal_of(world.state)
    assert entry is not None
    (link,) = [x for x in entry["entries"][0]["links"] if x["ifindex"] == LINK]
    assert link["servers"] == [{"address": "198.51.100.77", "port": 0, "name": ""}]
    assert entry["entries"][0]["boot_id"] == "boot-2"


def test_servers_fed_since_are_kept(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.apply()
    world.fake.nm[LINK] = [Server("198.51.100.50")]  # NM, after a new lease
    world.fake.links[LINK] = [Server("198.51.100.50")]
    world.restore(monkeypatch)
    assert world.fake.links[LINK] == [Server("198.51.100.50")]
    assert world.fake.links[OTHER] == [Server("203.0.113.7")]


def test_a_link_resolved_will_not_let_go_is_said_and_left(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    world.fake.managed = {OTHER}  # systemd-networkd's: "Link 3 is managed."
    with caplog.at_level(logging.WARNING, logger="agent.sysconf.resolved"):
        world.apply()
    assert world.fake.links == {LINK: [], OTHER: [Server("203.0.113.7")]}
    assert "eth1" in caplog.text and "corp.example" in caplog.text
    world.restore(monkeypatch)
    assert world.fake.links[OTHER] == [Server("203.0.113.7")]


def test_another_global_server_read_after_ours_is_warned_about(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    real = world.fake._read_config
    world.fake._read_config = lambda: [*real(), Server("192.0.2.99")]  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="agent.sysconf.resolved"):
        world.apply()
    assert "192.0.2.99" in caplog.text


def test_a_dropin_that_is_not_ours_is_left(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.apply()
    world.dropin.write_text("[Resolve]\nDNS=192.0.2.1\n")
    said = world.restore(monkeypatch)
    assert "not ours" in said and world.dropin.exists()


def test_restore_at_shutdown_restarts_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.apply()

    def stopping() -> None:
        raise resolved.ShuttingDown("systemd is stopping the system")

    monkeypatch.setattr(world.fake, "restart", stopping)
    said = world.restore(monkeypatch)
    assert "not restarted" in said and "has its servers again" in said
    assert not world.dropin.exists()
    assert sysconf.journal_of(world.state) is None


def test_restore_with_resolved_gone(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.apply()
    world.fake.up = False
    said = world.restore(monkeypatch)
    assert "not running" in said and not world.dropin.exists()


def test_choose_prefers_resolved_when_it_is_the_stub(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resolved.DBusResolved, "on_bus", lambda self: True)
    assert sysconf.choose("auto", root).name == "resolved"
    assert sysconf.choose("resolved", root).name == "resolved"
    (root / "etc" / "resolv.conf").unlink()
    (root / "etc" / "resolv.conf").write_text("nameserver 198.51.100.1\n")
    assert not sysconf.backends(root)["resolved"].detect()


# -- with NetworkManager feeding resolved -----------------------------------------------------
@pytest.fixture
def nm_world(world: World) -> World:
    world.nm.running = True
    return world


def test_render_nm_dropin_stops_both_ways_nm_feeds_resolved() -> None:
    text = resolved.render_nm_dropin()
    body = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert body == ["[main]", "dns=none", "systemd-resolved=false"]
    assert text.startswith(resolved.NM_HEADER)
    assert not nmb.is_ours(text) and not resolved.is_ours(text)  # nobody else's file


def test_nm_stops_feeding_resolved_and_restore_lets_it_again(
    nm_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w, fake, nm = nm_world, nm_world.fake, nm_world.nm
    w.apply()
    assert w.nm_dropin("run").read_text() == resolved.render_nm_dropin()
    assert oct(w.nm_dropin("run").stat().st_mode & 0o777) == "0o644"
    assert not w.nm_dropin("etc").exists()  # /run sufficed: nothing survives a reboot
    # loaded (DNS set up anew: systemd-resolved= alone needs it), then asked to send again
    assert nm.reloads[:2] == [nmb.RELOAD_CONF | nmb.RELOAD_DNS_FULL, nmb.RELOAD_DNS_RC]
    assert fake.links == {LINK: [], OTHER: []}
    entry = sysconf.journal_of(w.state)
    assert entry is not None
    (journalled,) = entry["entries"]
    assert journalled["nm_dropins"]["run"]["absent"] and journalled["nm_dropins"]["etc"]["absent"]
    assert journalled["nm_used"] == [str(w.nm_dropin("run"))]

    # what brought the links' servers back before: a new lease, NM and resolved restarting
    fake.nm[LINK] = [Server("198.51.100.50")]
    fake.nm_sends()
    nm.restart()
    fake.restart()
    for _ in range(5):
        fake.snapshot()
    assert fake.links == {LINK: [], OTHER: []}

    calls = len(fake.set_calls)
    said = w.restore(monkeypatch)
    assert f"{w.nm_dropin('run')} removed" in said and "NetworkManager reloaded" in said
    assert "NetworkManager gave eth1, wlan0 its servers" in said
    assert nm.reloads[-1] == resolved.NM_RELOAD
    assert fake.links == {LINK: [Server("198.51.100.50")], OTHER: [Server("203.0.113.7")]}
    assert len(fake.set_calls) == calls  # NM's servers of now, not the recorded ones
    assert not w.nm_dropin("run").exists() and not w.dropin.exists()
    assert fake.global_servers == [Server("192.0.2.53")]


def test_an_explicit_dns_setting_sends_the_nm_dropin_to_etc(
    nm_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = nm_world
    w.nm.obeyed = ("etc",)  # dns=systemd-resolved in NetworkManager.conf outranks /run
    w.apply()
    assert w.nm_dropin("run").exists() and w.nm_dropin("etc").exists()
    w.fake.nm_sends()
    assert w.fake.links[LINK] == []
    w.restore(monkeypatch)
    assert not w.nm_dropin("run").exists() and not w.nm_dropin("etc").exists()
    assert w.fake.links[LINK] == LINK_DNS


def test_systemd_resolved_true_read_later_is_found_out(nm_world: World) -> None:
    """dns=none wins from /run (Mode says "none") but an explicit systemd-resolved=true read
    later keeps NM feeding resolved: asked to send its configuration again, it does."""
    w = nm_world
    w.nm.obeyed, w.nm.half_obeyed = ("etc",), ("run",)
    w.apply()
    assert w.nm_dropin("etc").exists()
    w.fake.nm_sends()
    assert w.fake.links[LINK] == []


def test_an_nm_that_will_not_stop_is_warned_about_and_left_as_it_was(
    nm_world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    w = nm_world
    w.nm.obeyed = ()
    with caplog.at_level(logging.WARNING, logger="agent.sysconf.resolved"):
        w.apply()
    assert "until `dnstls-agent stub` runs again" in caplog.text
    assert not w.nm_dropin("run").exists() and not w.nm_dropin("etc").exists()
    assert w.nm.reloads[-1] == resolved.NM_RELOAD  # NM re-read its configuration without ours
    assert w.fake.links == {LINK: [], OTHER: []}  # emptied all the same, as before
    entry = sysconf.journal_of(w.state)
    assert entry is not None and entry["entries"][0]["nm_used"] == []
    said = w.restore(monkeypatch)
    assert "wlan0 has its servers again" in said
    assert w.fake.links[LINK] == LINK_DNS


def test_killed_half_way_with_nm_silenced(nm_world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    w = nm_world
    backend = w.backend()
    with sysconf.open_journal(w.state) as journal:
        journal.save(backend.name, [backend.record()])
    backend.apply(TUNNEL, backend.record())  # ...and the process died before saving its entry
    assert w.nm_dropin("run").exists() and w.fake.links[LINK] == []
    said = w.restore(monkeypatch)  # a fresh process, from the journal alone
    assert "removed" in said and "NetworkManager reloaded" in said
    assert not w.nm_dropin("run").exists()
    assert w.fake.links == {LINK: LINK_DNS, OTHER: [Server("203.0.113.7")]}
    w.fake.nm_sends()  # NM feeds resolved again
    assert w.fake.links[LINK] == LINK_DNS


def test_restore_with_nm_away_leaves_it_to_read_the_change_when_it_starts(
    nm_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = nm_world
    w.apply()
    w.nm.running = False
    said = w.restore(monkeypatch)
    assert "NetworkManager is not running: it reads the change when it starts" in said
    assert "wlan0 has its servers again" in said  # the recorded ones, meanwhile
    assert not w.nm_dropin("run").exists()
    w.nm.running = True
    w.nm.restart()
    assert w.fake.links[LINK] == LINK_DNS


def test_restore_at_shutdown_still_lets_nm_feed_resolved(
    nm_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = nm_world
    w.apply()

    def stopping() -> None:
        raise resolved.ShuttingDown("systemd is stopping the system")

    monkeypatch.setattr(w.fake, "restart", stopping)
    said = w.restore(monkeypatch)
    assert "not restarted" in said and "NetworkManager reloaded" in said
    assert not w.nm_dropin("run").exists() and w.fake.links[LINK] == LINK_DNS


def test_an_nm_dropin_left_in_etc_across_a_reboot_is_removed(
    nm_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/etc's drop-in survives a reboot (/run's does not): the next apply, in the new boot,
    must not take it for someone else's, and restore removes it."""
    w = nm_world
    w.nm.obeyed = ("etc",)
    w.apply()
    w.fake.reboot()
    w.nm_dropin("run").unlink()  # a tmpfs
    w.boot = "boot-2"
    w.apply()
    entry = sysconf.journal_of(w.state)
    assert entry is not None and entry["entries"][0]["nm_dropins"]["etc"]["absent"]
    said = w.restore(monkeypatch)
    assert f"{w.nm_dropin('etc')} removed" in said
    assert not w.nm_dropin("etc").exists() and not w.nm_dropin("run").exists()


def test_someone_elses_nm_file_of_that_name_is_kept(
    nm_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = "[main]\ndns=systemd-resolved\n"
    w = nm_world
    w.nm_dropin("etc").parent.mkdir(parents=True)
    w.nm_dropin("etc").write_text(theirs)
    w.apply()  # /run's is obeyed
    w.restore(monkeypatch)
    assert w.nm_dropin("etc").read_text() == theirs
