"""Noticing that /etc/resolv.conf no longer points at the tunnel.

On a machine where a DHCP client writes /etc/resolv.conf itself (Debian's ifupdown with
isc-dhcp-client, and no resolvconf: dhclient-script rewrites the file at every renewal),
the agent's file is replaced behind its back and queries go out in cleartext to the
network's servers. The daemon is woken by inotify when anything in the file's directory is
written or renamed (agent/inotify.py), and also looks once a second (one stat()) should
inotify not be there; the file is read only when it changed. When it names a nameserver
that is neither the tunnel nor systemd-resolved's stub, the daemon asks for a refresh,
which writes the tunnel back (and keeps the new file as the one restore puts back).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection
from pathlib import Path

from agent.inotify import Waker

LOG = logging.getLogger(__name__)

BURST = 3  # asks in a row before backing off
BACKOFF, BACKOFF_MAX = 10.0, 300.0
RESOLVED_STUBS = frozenset({"127.0.0.53", "127.0.0.54"})  # resolved forwards to the tunnel


def nameservers(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            out.append(words[1])
    return out


def foreign(text: str, ours: Collection[str]) -> list[str]:
    """The nameservers in `text` that are neither ours nor resolved's stub."""
    return [ns for ns in nameservers(text) if ns not in ours and ns not in RESOLVED_STUBS]


class ResolvConfWatch:
    def __init__(
        self,
        path: Path,
        ours: Collection[str],
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.ours = frozenset(ours)
        self.interval = interval
        self.clock = clock
        self.seen: tuple[int, ...] | None = None  # the file last looked at
        self.in_a_row = 0  # asks with no clean file in between
        self.quiet_until = 0.0

    def _key(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)  # through a symlink: the file applications read
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    async def run(self, ask: Callable[[str], None]) -> None:
        """Forever: `ask(reason)` each time the file changes to name foreign nameservers.

        A refresh that does not help (the file comes back foreign again and again: something
        fights over it) is asked for less and less often: after BURST asks in a row, at most
        once per BACKOFF seconds, doubling up to BACKOFF_MAX, with one error in the log."""
        self.seen = self._key()  # as it is now: pointed at start, or being pointed
        waker = Waker(str(self.path), [self.path.parent])
        if waker.notify is not None and not waker.watching(self.path.parent):
            LOG.warning("no inotify for %s: looking every %.1f s", self.path, self.interval)
        try:
            while True:
                await waker.wait(self.interval)
                self.look(ask)
        finally:
            waker.close()

    def look(self, ask: Callable[[str], None]) -> None:
        """One look: if the file changed and names foreign nameservers, ask (or back off)."""
        now = self._key()
        if now == self.seen:
            return
        try:
            text = self.path.read_text()
        except OSError as exc:
            LOG.debug("%s: %s", self.path, exc)
            self.seen = now
            return
        others = foreign(text, self.ours)
        if not others:
            self.seen, self.in_a_row, self.quiet_until = now, 0, 0.0
            return
        if self.clock() < self.quiet_until:
            return  # not marked seen: looked at again once the quiet time is over
        self.seen = now
        self.in_a_row += 1
        if self.in_a_row <= BURST:
            LOG.warning(
                "%s was rewritten by something else and names %s: pointing it back",
                self.path,
                ", ".join(others),
            )
        else:
            wait = min(BACKOFF * 2 ** (self.in_a_row - BURST - 1), BACKOFF_MAX)
            self.quiet_until = self.clock() + wait
            if self.in_a_row == BURST + 1:
                LOG.error(
                    "%s keeps being rewritten with %s after each refresh: something else "
                    "manages it (asking again at most every %.0f-%.0f s)",
                    self.path,
                    ", ".join(others),
                    BACKOFF,
                    BACKOFF_MAX,
                )
        ask(f"{self.path} rewritten (nameservers {', '.join(others)})")
