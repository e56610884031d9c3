"""The stub journal: what was changed on the system, written before the change is made.

`restore` reads it to undo everything, also after a crash (SIGKILL, power loss): a
change is journalled (atomically, fsynced) before it is made, and the journal is
removed only once the change is undone.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from agent.errors import AgentError

VERSION = 1
NAME = "stub.json"


class JournalError(AgentError):
    """The journal cannot be read; it is kept aside for a human."""


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / NAME

    def load(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise JournalError(f"{self.path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("version") != VERSION or "backend" not in data:
            raise JournalError(f"{self.path}: not a stub journal this version understands")
        return data

    def save(self, backend: str, entries: list[dict[str, Any]]) -> None:
        data = {
            "version": VERSION,
            "backend": backend,
            "written_at": time.time(),
            "entries": entries,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        write_atomic(self.path, json.dumps(data, indent=1).encode(), mode=0o600)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
            fsync_dir(self.path.parent)

    def set_aside(self) -> Path:
        aside = self.path.with_name(f"{NAME}.unreadable-{int(time.time())}")
        os.replace(self.path, aside)
        return aside


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Temp file in the same directory, fsync, rename (over a file or a symlink), fsync dir."""
    tmp = path.with_name(f".{path.name}.dnstls-agent.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def symlink_atomic(path: Path, target: str) -> None:
    tmp = path.with_name(f".{path.name}.dnstls-agent.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
