"""Noticing that /etc/resolv.conf no longer points at the tunnel.

On a machine where a DHCP client writes /etc/resolv.conf itself (Debian's ifupdown with
isc-dhcp-client, and no resolvconf: dhclient-script rewrites the file at every renewal),
the agent's file is replaced behind its back and queries go out in cleartext to the
network's servers. The daemon looks at the file once a second (one stat(); the file is read
only when it changed) and, when it names a nameserver that is neither the tunnel nor
systemd-resolved's stub, asks for a refresh, which writes the tunnel back (and keeps the
new file as the one restore puts back). Polling, not inotify: the standard library has no
inotify, and a second's stat() costs nothing measurable.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Collection
from pathlib import Path

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
    def __init__(self, path: Path, ours: Collection[str], interval: float = 1.0) -> None:
        self.path = path
        self.ours = frozenset(ours)
        self.interval = interval

    def _key(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)  # through a symlink: the file applications read
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    async def run(
        self, ask: Callable[[str], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Forever: `ask(reason)` each time the file changes to name foreign nameservers.

        A refresh that does not help (the file comes back foreign again and again: something
        fights over it) is asked for less and less often: after BURST asks in a row, at most
        once per BACKOFF seconds, doubling up to BACKOFF_MAX, with one error in the log."""
        key = self._key()  # as it is now: pointed at start, or being pointed (ExecStartPost=)
        in_a_row = 0
        quiet_until = 0.0
        while True:
            await asyncio.sleep(self.interval)
            now = self._key()
            if now == key:
                continue
            try:
                text = self.path.read_text()
            except OSError as exc:
                LOG.debug("%s: %s", self.path, exc)
                key = now
                continue
            others = foreign(text, self.ours)
            if not others:
                key, in_a_row, quiet_until = now, 0, 0.0
                continue
            if clock() < quiet_until:
                continue  # key kept: looked at again once the quiet time is over
            key = now
            in_a_row += 1
            if in_a_row > BURST:
                wait = min(BACKOFF * 2 ** (in_a_row - BURST - 1), BACKOFF_MAX)
                quiet_until = clock() + wait
                if in_a_row == BURST + 1:
                    LOG.error(
                        "%s keeps being rewritten with %s after each refresh: something else "
                        "manages it (asking again at most every %.0f-%.0f s)",
                        self.path,
                        ", ".join(others),
                        BACKOFF,
                        BACKOFF_MAX,
                    )
            else:
                LOG.warning(
                    "%s was rewritten by something else and names %s: pointing it back",
                    self.path,
                    ", ".join(others),
                )
            ask(f"{self.path} rewritten (nameservers {', '.join(others)})")
