"""Pointing the system's stub resolver at the tunnel, and back.

One small interface, one backend per world (resolv.conf written directly,
resolvconf, systemd-resolved, NetworkManager), chosen by detection or by config.
Every change is recorded first in a journal (journal.py) in the state directory, so
that `restore` - at stop, from the unit's ExecStopPost, or after a crash - undoes it
and nothing is lost. The agent never reads its own address back as an upstream
(the engine excludes the tunnel's addresses).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from agent.sysconf.journal import Journal, JournalError
from agent.sysconf.networkmanager import NetworkManagerBackend
from agent.sysconf.resolvconf import ResolvconfBackend
from agent.sysconf.resolvconf_file import ResolvConfFile
from agent.sysconf.resolved import ResolvedBackend

LOG = logging.getLogger(__name__)

JOURNAL = "stub.json"


class Backend(Protocol):
    name: str

    def detect(self) -> bool:
        """Is this the world the system is in?"""

    def describe(self) -> str:
        """What it manages, for logs and status."""

    def record(self) -> dict[str, Any]:
        """What is there now (journalled before anything changes)."""

    def apply(
        self, nameservers: Sequence[str], previous: dict[str, Any], extra_search: Sequence[str] = ()
    ) -> dict[str, Any]:
        """Point the stub at `nameservers`; returns the journal entry (previous + what it did)."""

    def revert(self, entry: dict[str, Any]) -> str:
        """Undo `entry`; a sentence saying what was done."""


def backends(root: Path = Path("/"), nm_bus: str | None = None) -> dict[str, Backend]:
    return {
        "resolved": ResolvedBackend(root, nm_bus),  # the stub applications ask, whoever feeds it
        "networkmanager": NetworkManagerBackend(root, nm_bus),  # before resolvconf, which NM feeds
        "resolvconf": ResolvconfBackend(root),
        "resolv.conf": ResolvConfFile(root),
    }


def choose(name: str = "auto", root: Path = Path("/"), nm_bus: str | None = None) -> Backend:
    known = backends(root, nm_bus)
    if name != "auto":
        if name not in known:
            raise ValueError(f"unknown stub backend {name!r}; known: {', '.join(known)}")
        return known[name]
    for backend in known.values():  # most specific first; resolv.conf is the fallback
        if backend.detect():
            return backend
    return known["resolv.conf"]


def apply(state_dir: Path, backend: Backend, nameservers: Sequence[str]) -> str:
    """Point the system stub at the tunnel; journalled first, idempotent."""
    journal = Journal(state_dir)
    existing = journal.load()
    if existing is not None and existing["backend"] != backend.name:
        restore(state_dir)  # another backend's change is undone before this one's
        existing = None
    previous = existing["entries"][0] if existing else backend.record()
    journal.save(backend.name, [previous])  # before the change: a crash now loses nothing
    entry = backend.apply(nameservers, previous)
    journal.save(backend.name, [entry])
    return f"system stub ({backend.describe()}) points at {', '.join(nameservers)}"


def restore(state_dir: Path, root: Path = Path("/")) -> str:
    """Undo what the journal records; a human sentence saying what was done."""
    journal = Journal(state_dir)
    try:
        data = journal.load()
    except JournalError as exc:
        aside = journal.set_aside()
        raise JournalError(f"{exc}; kept as {aside} for a human to look at") from exc
    if data is None:
        return "nothing to restore: the system stub was not changed"
    backend = backends(root).get(data["backend"])
    if backend is None:
        raise JournalError(f"{journal.path}: unknown backend {data['backend']!r}")
    said = [backend.revert(entry) for entry in reversed(data.get("entries", []))]
    journal.remove()
    return "; ".join(said) or "nothing to restore"


__all__ = ["Backend", "Journal", "JournalError", "apply", "backends", "choose", "restore"]
