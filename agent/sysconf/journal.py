"""The stub journal: what was changed on the system, written before the change is made.

`restore` reads it to undo everything, also after a crash (SIGKILL, power loss): a
change is journalled (atomically, fsynced) before it is made, and the journal is
removed only once the change is undone.

It is root's: it lives in root's own directory (`stub_state_dir`, mode 0700, checked at
every use, `fsutil.PrivateDir`), never in the daemon's, and is read through that
directory's descriptor, bounded, without following links. What it holds is still checked
before anything is done with it (`check`): modes that make no file writable by others,
symlink targets where resolv.conf's links go (/run, /etc), only the backends' own files.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Collection
from pathlib import PurePosixPath
from typing import Any

from agent.errors import AgentError
from agent.fsutil import PrivateDir, UnsafePath, fsync_dir, read_bounded, write_atomic_at

VERSION = 1
NAME = "stub.json"
MAX_BYTES = 1 << 20  # resolv.conf copies and NM drop-ins: far below
MAX_DEPTH = 8
LINK_DIRS = ("/run/", "/etc/", "/var/run/")
_BUS = re.compile(r"(unix:path=/[A-Za-z0-9_./-]+)?")


class JournalError(AgentError):
    """The journal cannot be read or used; it is kept aside for a human."""


class Journal:
    def __init__(self, directory: PrivateDir) -> None:
        self.dir = directory
        self.path = directory.path / NAME

    def load(self, files: Collection[str] = ()) -> dict[str, Any] | None:
        """The journal, checked (`files`: the paths its entries may name); None if none."""
        try:
            raw = read_bounded(NAME, MAX_BYTES, dir_fd=self.dir.fd)
        except UnsafePath as exc:
            raise JournalError(f"{self.path}: {exc}") from exc
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise JournalError(f"{self.path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("version") != VERSION or "backend" not in data:
            raise JournalError(f"{self.path}: not a stub journal this version understands")
        if not isinstance(data.get("entries"), list) or not all(
            isinstance(e, dict) for e in data["entries"]
        ):
            raise JournalError(f"{self.path}: entries must be a list of objects")
        try:
            check(data["entries"], files)
        except ValueError as exc:
            raise JournalError(f"{self.path}: {exc}") from exc
        return data

    def save(self, backend: str, entries: list[dict[str, Any]]) -> None:
        data = {
            "version": VERSION,
            "backend": backend,
            "written_at": time.time(),
            "entries": entries,
        }
        write_atomic_at(self.dir.fd, NAME, json.dumps(data, indent=1).encode(), mode=0o600)

    def remove(self) -> None:
        try:
            os.unlink(NAME, dir_fd=self.dir.fd)
        except FileNotFoundError:
            return
        fsync_dir(self.dir.fd)

    def set_aside(self) -> str:
        aside = f"{NAME}.unreadable-{int(time.time())}"
        os.replace(NAME, aside, src_dir_fd=self.dir.fd, dst_dir_fd=self.dir.fd)
        return str(self.dir.path / aside)


def check(value: Any, files: Collection[str], depth: int = 0) -> None:
    """ValueError unless every entry is one the backends write: no mode that lets others
    write or run anything set-id, symlinks only to where resolv.conf's go, files only the
    backends' own, bus addresses only local sockets (the one apply talked to)."""
    if depth > MAX_DEPTH:
        raise ValueError("nested too deep")
    if isinstance(value, list):
        for v in value:
            check(v, files, depth + 1)
        return
    if not isinstance(value, dict):
        return
    for key, v in value.items():
        if key == "mode" and not _mode_ok(v):
            raise ValueError(f"mode {v!r} is not one the backends write")
        if key == "symlink" and not _link_ok(v):
            raise ValueError(f"symlink target {v!r} is not where resolv.conf links go")
        if key == "file" and files and v not in files:
            raise ValueError(f"file {v!r} is not one of {sorted(files)}")
        if key == "bus" and not (isinstance(v, str) and _BUS.fullmatch(v)):
            raise ValueError(f"bus {v!r} is not a local D-Bus socket address")
        check(v, files, depth + 1)


def _mode_ok(mode: Any) -> bool:
    """A file's mode no one else may write and nothing set-id, or NetworkManager's DNS mode."""
    if isinstance(mode, str):
        return bool(re.fullmatch(r"[a-z-]{1,32}", mode))
    return isinstance(mode, int) and not isinstance(mode, bool) and not mode & ~0o755


def _link_ok(target: Any) -> bool:
    if not isinstance(target, str) or not target or "\0" in target:
        return False
    absolute = os.path.normpath(PurePosixPath("/etc") / target)  # relative to /etc/resolv.conf
    return absolute.startswith(LINK_DIRS) and ".." not in PurePosixPath(target).parts[1:]
