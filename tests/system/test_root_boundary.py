"""Root trusts nothing the daemon can write: the attacker's moves, as root, with an
unprivileged uid playing the daemon taken over.

Root's side is the real code (`agent.sysconf`, `agent.fsutil`, `dnstls-agent stub
--refresh`) on a root-prefix tree in a temporary directory: its /etc/resolv.conf, root's
stub directory, the daemon's runtime directory. The attacker (uid DAEMON) owns what the
daemon owns there and plants what the daemon could plant: a forged journal, symlinks at
the names root writes, FIFOs, hostile requests. Each test ends with the victim files
unchanged and a clear error. Root is needed to own files as another uid (chown).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import fsutil, sysconf
from agent.sysconf import request
from agent.sysconf.journal import JournalError
from agent.sysconf.resolvconf_file import ResolvConfFile
from tests.conftest import require_root

pytestmark = pytest.mark.system

DAEMON = 65534  # nobody: the daemon's user, taken over
ORIGINAL = "nameserver 198.51.100.1\n"
SECRET = "root:x:0:0:root:/root:/bin/bash\n"


@pytest.fixture
def world(tmp_path: Path) -> Path:
    """A root-prefix tree: /etc/resolv.conf (root's), a victim file only root may write
    (a stand-in for /etc/passwd or /etc/ld.so.preload), and the daemon's directories."""
    require_root()
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "resolv.conf").write_text(ORIGINAL)
    (etc / "passwd").write_text(SECRET)
    (etc / "passwd").chmod(0o600)
    for d in ("daemon-state", "daemon-run"):
        (tmp_path / d).mkdir(mode=0o750)
        os.chown(tmp_path / d, DAEMON, DAEMON)
    return tmp_path


def unchanged(world: Path) -> None:
    assert (world / "etc/resolv.conf").read_text() == ORIGINAL
    assert (world / "etc/passwd").read_text() == SECRET
    assert (world / "etc/passwd").stat().st_mode & 0o777 == 0o600


def as_daemon(path: Path) -> Path:
    os.chown(path, DAEMON, DAEMON, follow_symlinks=False)
    return path


def test_a_stub_directory_the_daemon_owns_is_refused(world: Path) -> None:
    """The old layout: root's journal in the daemon's StateDirectory. A forged journal there
    (restore writes its content and mode into resolv.conf, or a symlink to any path) is
    never read: the directory is not root's."""
    forged = {"version": 1, "backend": "resolv.conf", "entries": [
        {"file": str(world / "etc/resolv.conf"), "symlink": str(world / "etc/passwd")},
    ]}  # fmt: skip
    journal = world / "daemon-state/stub.json"
    journal.write_text(json.dumps(forged))
    as_daemon(journal)
    with pytest.raises(JournalError, match="owned by uid 65534"):
        sysconf.restore(world / "daemon-state", root=world)
    unchanged(world)


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_a_stub_directory_others_can_write_is_refused(world: Path, mode: int) -> None:
    stub = world / "stub"
    stub.mkdir()
    stub.chmod(mode)
    with pytest.raises(JournalError, match="only its owner"):
        sysconf.apply(stub, ResolvConfFile(world), ["127.0.0.153"])
    unchanged(world)
    assert not (stub / "stub.json").exists()


def test_a_stub_directory_that_is_a_symlink_is_refused(world: Path) -> None:
    (world / "stub").symlink_to(world / "daemon-state")
    with pytest.raises(JournalError, match="cannot open as a directory"):
        sysconf.apply(world / "stub", ResolvConfFile(world), ["127.0.0.153"])
    unchanged(world)
    assert not (world / "daemon-state/stub.json").exists()


def test_a_forged_journal_entry_is_refused_even_in_roots_directory(world: Path) -> None:
    """Defence in depth: a journal root did not write (a mode that lets others write, a
    symlink to a root-only file, a bus address that is not a local socket) is refused."""
    stub = world / "stub"
    for entry in (
        {"file": str(world / "etc/resolv.conf"), "content": "x", "mode": 0o666},
        {"file": str(world / "etc/resolv.conf"), "symlink": "/root/.ssh/id_ed25519"},
        {"file": str(world / "etc/resolv.conf"), "symlink": "../run/../root/x"},
        {"resolv_conf": {"content": "x"}, "bus": "tcp:host=203.0.113.9,port=1"},
    ):
        with sysconf.open_journal(stub) as journal:
            journal.save("resolv.conf", [entry])
        with pytest.raises(JournalError):
            sysconf.restore(stub, root=world)
        unchanged(world)


def test_planted_symlinks_at_roots_temporary_names_are_never_followed(world: Path) -> None:
    """Root's writes go to a new file (O_EXCL|O_NOFOLLOW) under an unpredictable name: a
    symlink planted at the old, predictable name is not followed, nor one at the new name
    if it were guessed (the write then fails; the victim is untouched)."""
    etc = world / "etc"
    old_name = etc / f".resolv.conf.dnstls-agent.{os.getpid()}"
    old_name.symlink_to(etc / "passwd")
    fsutil.write_atomic(etc / "resolv.conf", b"nameserver 127.0.0.153\n")
    assert (etc / "resolv.conf").read_text() == "nameserver 127.0.0.153\n"
    assert (etc / "passwd").read_text() == SECRET and old_name.is_symlink()
    (etc / "resolv.conf").write_text(ORIGINAL)

    guessed = "cafe" * 3
    (etc / f".resolv.conf.dnstls-agent.{os.getpid()}.{guessed}").symlink_to(etc / "passwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(secrets, "token_hex", lambda _n: guessed)  # as fsutil sees it
        with pytest.raises(FileExistsError):
            fsutil.write_atomic(etc / "resolv.conf", b"nameserver 127.0.0.153\n")
    unchanged(world)


def test_a_planted_lock_or_journal_symlink_is_not_followed(world: Path) -> None:
    stub = world / "stub"
    stub.mkdir(mode=0o700)
    (stub / "stub.lock").symlink_to(world / "etc/passwd")
    with pytest.raises(OSError):  # ELOOP: O_NOFOLLOW
        sysconf.apply(stub, ResolvConfFile(world), ["127.0.0.153"])
    (stub / "stub.lock").unlink()
    (stub / "stub.json").symlink_to(world / "etc/passwd")
    with pytest.raises(JournalError, match="symlink"):
        sysconf.restore(stub, root=world)
    unchanged(world)


def refresh(world: Path) -> subprocess.CompletedProcess[str]:
    """`dnstls-agent stub --refresh` as the path unit runs it, on the root-prefix tree's
    directories (its /etc/resolv.conf is the host's: it must end before touching it)."""
    conf = world / "agent.toml"
    conf.write_text(
        f'state_dir = "{world}/daemon-state"\nruntime_dir = "{world}/daemon-run"\n'
        f'stub_state_dir = "{world}/stub"\n'
    )
    return subprocess.run(
        [sys.executable, "-m", "agent", "-c", str(conf), "stub", "--refresh"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("plant", "why"),
    [
        ("fifo", "not a regular file"),
        ("symlink", "symlink"),
        ("newline", "not a domain name"),
        ("deep", "nested deeper"),
        ("huge", "bytes"),
    ],
)
def test_hostile_requests_change_nothing_and_exit_1(world: Path, plant: str, why: str) -> None:
    req = world / "daemon-run" / request.NAME
    if plant == "fifo":
        os.mkfifo(req)  # root's refresh once hung on one
    elif plant == "symlink":
        req.symlink_to(world / "etc/passwd")  # root would read a root-only file
    elif plant == "newline":  # `$` accepted it: an indented ` nameserver` line dnsmasq obeyed
        req.write_text(json.dumps({"version": 1, "search": ["x.y\n nameserver 203.0.113.9"]}))
    elif plant == "deep":
        req.write_text("[" * 3000)
    else:
        req.write_text(json.dumps({"version": 1, "search": ["a" * 60] * 400}))
    if req.exists() or req.is_symlink():
        as_daemon(req)
    t0 = time.monotonic()
    out = refresh(world)
    assert time.monotonic() - t0 < 15
    assert out.returncode == 1, out
    assert "not usable, nothing changed" in out.stderr and why in out.stderr, out.stderr
    unchanged(world)
