"""agent/sysconf: the resolv.conf backend and the journal, on a root prefix (never /etc)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent import sysconf
from agent.sysconf import resolvconf_file
from agent.sysconf.journal import JournalError
from agent.sysconf.resolvconf_file import ResolvConfFile

ORIGINAL = """# from DHCP
domain lab.example
search corp.example lab.example
nameserver 198.51.100.1
nameserver 198.51.100.2
options edns0 timeout:2
"""
TUNNEL = ["127.0.0.153"]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root" / "etc").mkdir(parents=True)
    return tmp_path / "root"


def resolv(root: Path) -> Path:
    return root / "etc" / "resolv.conf"


def body(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if not ln.startswith("#")]


def test_render_keeps_search_and_options() -> None:
    out = resolvconf_file.render(ORIGINAL, TUNNEL, ["vpn.example", "lab.example"])
    assert body(out) == [
        "nameserver 127.0.0.153",
        "search lab.example corp.example vpn.example",
        "options edns0 timeout:2",
    ]


def test_render_names_a_domain_once_however_written() -> None:
    """dhclient writes the root's dot (`corp.test.`); the daemon's list has none."""
    original = "domain lab.test\nsearch lab.test corp.test.\nnameserver 198.51.100.2\n"
    out = resolvconf_file.render(original, TUNNEL, ["corp.test", "LAB.test", "new.test"])
    assert body(out) == ["nameserver 127.0.0.153", "search lab.test corp.test. new.test"]


def test_render_with_the_networks_domains_of_now() -> None:
    """keep_search=False: the original's domains were the network of then (NM's file)."""
    out = resolvconf_file.render(ORIGINAL, TUNNEL, ["new.example"], keep_search=False)
    assert body(out) == ["nameserver 127.0.0.153", "search new.example", "options edns0 timeout:2"]
    out = resolvconf_file.render(ORIGINAL, TUNNEL, [], keep_search=False)
    assert body(out) == ["nameserver 127.0.0.153", "options edns0 timeout:2"]
    # no word from the agent (None): the original's are all there is
    out = resolvconf_file.render(ORIGINAL, TUNNEL, None, keep_search=False)
    assert "search lab.example corp.example" in out


def test_refresh_follows_the_networks_domains(root: Path, tmp_path: Path) -> None:
    resolv(root).write_text(ORIGINAL)
    state = tmp_path / "state"
    sysconf.apply(state, ResolvConfFile(root), TUNNEL, ["a.example"])
    assert "search lab.example corp.example a.example" in resolv(root).read_text()
    said = sysconf.refresh(state, TUNNEL, ["b.example"], root)
    assert "refreshed: search domains b.example" in said
    text = resolv(root).read_text()
    assert "search lab.example corp.example b.example" in text  # a.example gone: not stale
    assert "a.example" not in text
    before = resolv(root).stat().st_mtime_ns
    sysconf.refresh(state, TUNNEL, ["b.example"], root)
    assert resolv(root).stat().st_mtime_ns == before  # nothing changed: nothing written
    sysconf.restore(state, root)
    assert resolv(root).read_text() == ORIGINAL


def test_refresh_takes_a_rewritten_file_as_the_new_original(root: Path, tmp_path: Path) -> None:
    """dhclient rewrites resolv.conf at a renewal: the tunnel goes back in, and the renewal's
    file (the network's servers of now) is what restore puts back."""
    resolv(root).write_text(ORIGINAL)
    state = tmp_path / "state"
    sysconf.apply(state, ResolvConfFile(root), TUNNEL)
    renewed = "search new.example\nnameserver 203.0.113.1\noptions rotate\n"
    resolv(root).write_text(renewed)
    sysconf.refresh(state, TUNNEL, None, root)
    assert body(resolv(root).read_text()) == [
        "nameserver 127.0.0.153",
        "search new.example",
        "options rotate",
    ]
    assert json.loads((state / "stub.json").read_text())["entries"][0]["content"] == renewed
    assert "put back" in sysconf.restore(state, root)
    assert resolv(root).read_text() == renewed


def test_refresh_does_nothing_when_the_stub_is_not_pointed(root: Path, tmp_path: Path) -> None:
    """After a restore (the unit stopped), a late refresh must not point it at a dead tunnel."""
    resolv(root).write_text(ORIGINAL)
    state = tmp_path / "state"
    sysconf.apply(state, ResolvConfFile(root), TUNNEL)
    sysconf.restore(state, root)
    said = sysconf.refresh(state, TUNNEL, ["b.example"], root)
    assert "not pointed" in said
    assert resolv(root).read_text() == ORIGINAL
    assert not (state / "stub.json").exists()


def test_apply_and_restore_a_file(root: Path, tmp_path: Path) -> None:
    resolv(root).write_text(ORIGINAL)
    os.chmod(resolv(root), 0o640)
    state = tmp_path / "state"
    backend = ResolvConfFile(root)
    said = sysconf.apply(state, backend, TUNNEL)
    assert "points at 127.0.0.153" in said
    text = resolv(root).read_text()
    assert "nameserver 127.0.0.153" in text and "198.51.100.1" not in text
    journal = json.loads((state / "stub.json").read_text())
    assert journal["backend"] == "resolv.conf" and journal["entries"][0]["content"] == ORIGINAL
    # applying again (a restart, or after a crash) keeps the original, not our own file
    sysconf.apply(state, backend, TUNNEL)
    assert json.loads((state / "stub.json").read_text())["entries"][0]["content"] == ORIGINAL
    assert "put back" in sysconf.restore(state, root)
    assert resolv(root).read_text() == ORIGINAL
    assert resolv(root).stat().st_mode & 0o777 == 0o640
    assert not (state / "stub.json").exists()
    assert sysconf.restore(state, root).startswith("nothing to restore")
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["resolv.conf"]  # no temp left


def test_a_symlink_is_put_back_as_a_symlink(root: Path, tmp_path: Path) -> None:
    target = "../run/systemd/resolve/stub-resolv.conf"
    (root / "run" / "systemd" / "resolve").mkdir(parents=True)
    (root / "run" / "systemd" / "resolve" / "stub-resolv.conf").write_text(
        "nameserver 127.0.0.53\nsearch home.example\n"
    )
    resolv(root).symlink_to(target)
    sysconf.apply(tmp_path / "s", ResolvConfFile(root), TUNNEL)
    assert not resolv(root).is_symlink()
    assert "search home.example" in resolv(root).read_text()  # what applications saw, kept
    sysconf.restore(tmp_path / "s", root)
    assert resolv(root).is_symlink() and os.readlink(resolv(root)) == target


def test_no_file_before_means_no_file_after(root: Path, tmp_path: Path) -> None:
    sysconf.apply(tmp_path / "s", ResolvConfFile(root), TUNNEL)
    assert resolv(root).exists()
    sysconf.restore(tmp_path / "s", root)
    assert not resolv(root).exists()


def test_someone_elses_file_is_not_clobbered_on_restore(root: Path, tmp_path: Path) -> None:
    resolv(root).write_text(ORIGINAL)
    sysconf.apply(tmp_path / "s", ResolvConfFile(root), TUNNEL)
    resolv(root).write_text("nameserver 203.0.113.1\n")  # e.g. a DHCP client rewrote it
    said = sysconf.restore(tmp_path / "s", root)
    assert "changed by something else" in said
    assert resolv(root).read_text() == "nameserver 203.0.113.1\n"


def test_crash_between_journal_and_change(root: Path, tmp_path: Path) -> None:
    """The journal is written before the file: a crash in between restores to the same file."""
    resolv(root).write_text(ORIGINAL)
    backend = ResolvConfFile(root)
    with sysconf.open_journal(tmp_path / "s") as journal:
        journal.save(backend.name, [backend.record()])
    assert "put back" in sysconf.restore(tmp_path / "s", root)
    assert resolv(root).read_text() == ORIGINAL


def test_unreadable_journal_is_kept_aside(root: Path, tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "stub.json").write_text("{broken")
    with pytest.raises(JournalError, match="kept as"):
        sysconf.restore(tmp_path / "s", root)
    assert list((tmp_path / "s").glob("stub.json.unreadable-*"))
    assert sysconf.restore(tmp_path / "s", root).startswith("nothing to restore")


def test_choose() -> None:
    assert sysconf.choose("resolv.conf").name == "resolv.conf"
    with pytest.raises(ValueError, match="unknown stub backend"):
        sysconf.choose("dnsmasq")
