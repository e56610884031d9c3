"""Waking up when files change in a directory: libc's inotify through ctypes (the standard
library has none, and this is no new dependency). The agent's watchers drain the events
without parsing them (`Waker`): one woken looks at its files again (a stat() each), and
keeps a slow poll for where inotify is missing (no libc inotify, too many watches, a
directory not there yet). `Inotify.events()` parses them, for whoever needs the names.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import struct
from collections.abc import Iterable
from pathlib import Path

LOG = logging.getLogger(__name__)

# <sys/inotify.h>
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x80, 0x100, 0x200
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
IN_MOVED_FROM, IN_Q_OVERFLOW = 0x40, 0x4000
MASK = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then the name, NUL-padded


class Inotify:
    """Directories watched with inotify, as one file descriptor to read."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.fd: int = fd
        self.watched: set[Path] = set()

    def add(self, directory: Path, mask: int = MASK) -> None:
        """Watch `directory` (by default: anything written, renamed, created or removed)."""
        if self._libc.inotify_add_watch(self.fd, os.fsencode(directory), mask) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {directory}: {os.strerror(err)}")
        self.watched.add(directory)

    def drain(self) -> int:
        """Read every pending event; how many bytes there were."""
        n = 0
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except BlockingIOError:
                return n
            if not chunk:
                return n
            n += len(chunk)

    def events(self) -> list[tuple[int, str]]:
        """Read every pending event: (mask, name) each (name "" for the directory itself)."""
        out: list[tuple[int, str]] = []
        while True:
            try:
                data = os.read(self.fd, 65536)  # whole events only (the kernel's promise)
            except BlockingIOError:
                return out
            pos = 0
            while pos + _EVENT.size <= len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
                raw = data[pos + _EVENT.size : pos + _EVENT.size + length]
                out.append((mask, raw.rstrip(b"\0").decode(errors="replace")))
                pos += _EVENT.size + length

    def close(self) -> None:
        os.close(self.fd)


class Waker:
    """`woken` is set whenever something changes in the watched directories; `add` again
    for those not watched yet (missing at first). Without inotify at all, it never wakes:
    the caller's poll is all there is (said once, as a warning, naming `what`)."""

    def __init__(self, what: str, directories: Iterable[Path]) -> None:
        self.what = what
        self.woken = asyncio.Event()
        self.notify: Inotify | None = None
        try:
            self.notify = Inotify()
        except (OSError, AttributeError) as exc:  # no libc inotify
            LOG.warning("no inotify for %s (%s): looking at intervals only", what, exc)
        else:
            asyncio.get_running_loop().add_reader(self.notify.fd, self._readable)
        self.add(directories)

    def _readable(self) -> None:
        if self.notify is not None and self.notify.drain():
            self.woken.set()

    def add(self, directories: Iterable[Path]) -> None:
        if self.notify is None:
            return
        for directory in directories:
            if directory in self.notify.watched:
                continue
            try:
                self.notify.add(directory)
            except OSError as exc:
                LOG.debug("%s: %s", self.what, exc)

    def watching(self, directory: Path) -> bool:
        return self.notify is not None and directory in self.notify.watched

    async def wait(self, seconds: float) -> None:
        """Until something changed, or for `seconds` at most."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.woken.wait(), seconds)
        self.woken.clear()

    def close(self) -> None:
        if self.notify is not None:
            asyncio.get_running_loop().remove_reader(self.notify.fd)
            self.notify.close()
            self.notify = None
