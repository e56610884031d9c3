"""Pointing the system's stub resolver at the tunnel, and back.

One small interface, one backend per world (resolv.conf written directly,
resolvconf, systemd-resolved, NetworkManager), chosen by detection or by config.
Every change is recorded first in a journal (journal.py) in root's own directory
(`stub_state_dir`, 0700, never the daemon's), so that `restore` - at stop, from the
unit's ExecStopPost, or after a crash - undoes it and nothing is lost. The agent
never reads its own address back as an upstream (the engine excludes the tunnel's
addresses).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from agent.fsutil import O_FLAGS, PrivateDir, UnsafePath
from agent.sysconf import dhclient
from agent.sysconf.journal import Journal, JournalError
from agent.sysconf.privacy import Fit, StubRefused, plain_file
from agent.sysconf.resolvconf_file import ResolvConfFile, write_in_place

LOG = logging.getLogger(__name__)

LOCK = "stub.lock"


class Backend(Protocol):
    name: str

    def detect(self) -> bool:
        """Is this the world the system is in?"""

    def describe(self) -> str:
        """What it manages, for logs and status."""

    def record(self) -> dict[str, Any]:
        """What is there now (journalled before anything changes)."""

    def apply(
        self,
        nameservers: Sequence[str],
        previous: dict[str, Any],
        search: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Point the stub at `nameservers`; returns the journal entry (previous + what it did).

        `search`: the network's search domains as the agent sees them (None: as the backend
        finds them). Called again with its own entry as `previous` (a refresh), it changes
        only what differs."""

    def revert(self, entry: dict[str, Any]) -> str:
        """Undo `entry`; a sentence saying what was done."""


def backends(root: Path = Path("/"), nm_bus: str | None = None) -> dict[str, Backend]:
    # Imported here: D-Bus (dbus-next, asyncio) is not for commands that do not need it,
    # such as the dhclient hook's `stub --dhclient`, which dhclient waits for.
    from agent.sysconf.networkmanager import NetworkManagerBackend  # noqa: PLC0415
    from agent.sysconf.resolvconf import ResolvconfBackend  # noqa: PLC0415
    from agent.sysconf.resolved import ResolvedBackend  # noqa: PLC0415

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


def other_writer(root: Path = Path("/"), nm_bus: str | None = None) -> str | None:
    """The backend whose program writes /etc/resolv.conf here, other than the file's own
    (each backend's detect()); None when nothing else does."""
    for backend in backends(root, nm_bus).values():
        if backend.name != "resolv.conf" and backend.detect():
            return backend.name
    return None


def check_backend(
    backend: Backend,
    profiles: Collection[str],
    root: Path = Path("/"),
    nm_bus: str | None = None,
) -> None:
    """Refuse (StubRefused) the resolv.conf backend where another program writes the file,
    under strict or encrypted; under opportunistic, warn (privacy.plain_file)."""
    if backend.name != "resolv.conf":
        return
    fit = plain_file(other_writer(root, nm_bus), profiles)
    if fit.fit is Fit.REFUSED:
        raise StubRefused(fit.reason)
    if fit.fit is Fit.LEAKY:
        LOG.warning("DHCP renewals may leak: %s", fit.reason)


@contextlib.contextmanager
def open_journal(stub_dir: Path) -> Iterator[Journal]:
    """One change of the stub at a time (ExecStartPost=, a refresh, ExecStopPost=), with the
    journal, both in root's own directory (checked: `fsutil.PrivateDir`)."""
    try:
        with PrivateDir(stub_dir) as directory:
            fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | O_FLAGS, 0o600, dir_fd=directory.fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield Journal(directory)
            finally:
                os.close(fd)
    except UnsafePath as exc:
        raise JournalError(str(exc)) from exc


def journal_of(stub_dir: Path) -> dict[str, Any] | None:
    """What the journal says now (for `stub --show`)."""
    with open_journal(stub_dir) as journal:
        return journal.load()


def apply(
    stub_dir: Path,
    backend: Backend,
    nameservers: Sequence[str],
    search: Sequence[str] | None = None,
) -> str:
    """Point the system stub at the tunnel; journalled first, idempotent."""
    with open_journal(stub_dir) as journal:
        existing = journal.load()
        if existing is not None and existing["backend"] != backend.name:
            _restore(journal, Path("/"))  # another backend's change first
            existing = None
        previous = existing["entries"][0] if existing else backend.record()
        journal.save(backend.name, [previous])  # before the change: a crash now loses nothing
        entry = backend.apply(nameservers, previous, search)
        journal.save(backend.name, [entry])
    return f"system stub ({backend.describe()}) points at {', '.join(nameservers)}"


def refresh(
    stub_dir: Path,
    nameservers: Sequence[str],
    search: Sequence[str] | None,
    root: Path = Path("/"),
    nm_bus: str | None = None,
) -> str:
    """Apply again what the journal says is applied, with the network's search domains of
    now; nothing when the stub is not pointed (stopped, restored: never a stub pointing at a
    tunnel that is not there)."""
    with open_journal(stub_dir) as journal:
        data = journal.load()
        if data is None:
            return "the system stub is not pointed at the tunnel: nothing to refresh"
        backend = backends(root, nm_bus).get(data["backend"])
        if backend is None:
            raise JournalError(f"{journal.path}: unknown backend {data['backend']!r}")
        entry = backend.apply(nameservers, data["entries"][0], search)
        journal.save(backend.name, [entry])
    domains = " ".join(search) if search else "none"
    return f"system stub ({backend.describe()}) refreshed: search domains {domains}"


def dhclient_lease(
    stub_dir: Path,
    env: Mapping[str, str],
    nameservers: Sequence[str],
    search: Sequence[str] | None,
    root: Path = Path("/"),
) -> str:
    """dhclient-script's make_resolv_conf, as the enter hook hands it over (`stub --dhclient`).

    The stub pointed by the resolv.conf backend: what dhclient would have written for the
    lease in `env` becomes the original restore puts back, and the file keeps pointing at
    the tunnel (its search domains follow the lease); not one cleartext nameserver is
    written. Pointed by another backend: the file is left to it. Not pointed (the agent
    restored the stub in the meantime): the file is written as dhclient-script would."""
    resolv = ResolvConfFile(root)
    with open_journal(stub_dir) as journal:
        data = journal.load()
        if data is None:
            try:
                old = resolv.path.read_text()
            except OSError:
                old = ""
            text = dhclient.render(env, old)
            if text is None:
                return "the lease names no DNS: resolv.conf left alone"
            target = resolv.path.resolve()
            write_in_place(target, text)
            return f"the stub is not pointed at the tunnel: {target} written as dhclient would"
        if data["backend"] != resolv.name:
            return (
                f"the stub is pointed through {data['backend']}: {resolv.path} left to it "
                "(no cleartext nameserver written)"
            )
        previous = data["entries"][0]
        text = dhclient.render(env, previous.get("content", previous.get("seen", "")))
        if text is None:
            return "the lease names no DNS: resolv.conf left alone"
        entry = resolv.adopt(previous, text)
        journal.save(resolv.name, [entry])  # the lease's file first: a crash now loses nothing
        journal.save(resolv.name, [resolv.apply(nameservers, entry, search)])
    servers = " ".join(
        line.split()[1] for line in text.splitlines() if line.startswith("nameserver")
    )
    return (
        f"the lease's resolv.conf (nameservers {servers or 'none'}) is what restore puts back; "
        f"{resolv.path} still points at {', '.join(nameservers)}"
    )


def restore(stub_dir: Path, root: Path = Path("/")) -> str:
    """Undo what the journal records; a human sentence saying what was done."""
    with open_journal(stub_dir) as journal:
        return _restore(journal, root)


def _restore(journal: Journal, root: Path) -> str:
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


__all__ = [
    "Backend",
    "Journal",
    "JournalError",
    "StubRefused",
    "apply",
    "backends",
    "check_backend",
    "choose",
    "dhclient_lease",
    "journal_of",
    "open_journal",
    "other_writer",
    "refresh",
    "restore",
]
