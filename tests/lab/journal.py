"""Journals for tests: a fake one (a datagram socket that reads the native protocol the way
journald does), and the real systemd-journald, run as a throw-away instance.

Each datagram is one entry, NAME=value lines, or NAME, newline, a 64-bit little-endian length,
the bytes and a newline for a value that holds newlines. An entry too big for a datagram comes
as a sealed memfd (SCM_RIGHTS) with no data. `decode` is written from systemd's description of
the protocol, independently of agent/logsetup.py, so that the two check each other.

`Journald` runs the distribution's systemd-journald in a private mount namespace whose /run is a
tmpfs, with /run/systemd/journal and /run/log/journal bound to directories of the test's: its
sockets and its (volatile) journal files appear there, and nothing of the host's is touched
(the host's journal, if any, is elsewhere and never written).
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.lab.proc import Missing, Process, need

JOURNALD = ("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald")

Entry = dict[str, str]


def decode(data: bytes) -> Entry:
    """One datagram's fields (a field given twice: the last value)."""
    out: Entry = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            i = nl + 1
        else:
            name = line
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            value = data[nl + 9 : nl + 9 + size]
            if data[nl + 9 + size : nl + 10 + size] != b"\n":
                raise ValueError(f"{name!r}: the binary value does not end in a newline")
            i = nl + 10 + size
        out[name.decode("ascii")] = value.decode("utf-8")
    return out


class FakeJournal:
    """Bound at `path`; `entries` holds what arrived, decoded; `sealed` how many came as a
    sealed memfd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.entries: list[Entry] = []
        self.sealed = 0

    def drain(self) -> list[Entry]:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 20, 4)
            except BlockingIOError:
                return self.entries
            for fd in fds:
                try:
                    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                    if seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK:
                        self.sealed += 1
                    size = os.fstat(fd).st_size
                    data = os.pread(fd, size, 0)
                finally:
                    os.close(fd)
            self.entries.append(decode(data))

    def wait_for(self, match: Callable[[Entry], bool], timeout: float) -> Entry | None:
        end = time.monotonic() + timeout
        seen = 0
        while True:
            entries = self.drain()
            for e in entries[seen:]:
                if match(e):
                    return e
            seen = len(entries)
            if time.monotonic() >= end:
                return None
            time.sleep(0.02)

    def close(self) -> None:
        self.sock.close()


def journald_binary() -> str:
    path = next((p for p in JOURNALD if os.access(p, os.X_OK)), None)
    if path is None:
        raise Missing("systemd-journald is not installed (the systemd package)")
    return path


class Journald:
    """A private systemd-journald: `socket` is its native socket, `stream()` a connection to
    its stdout socket (what systemd gives a service as stderr), `entries()` what it stored."""

    def __init__(self, where: Path) -> None:
        journald, unshare, mount = journald_binary(), need("unshare"), need("mount")
        self.journalctl = need("journalctl")
        self.run_dir, self.log_dir = where / "run-journal", where / "log-journal"
        self.run_dir.mkdir()
        self.log_dir.mkdir()
        conf = (
            "[Journal]\nStorage=volatile\nReadKMsg=no\nForwardToSyslog=no\nForwardToWall=no\n"
            "ForwardToConsole=no\nForwardToKMsg=no\nRateLimitBurst=0\n"
        )
        script = "\n".join(
            [
                "set -e",
                f"{mount} -t tmpfs tmpfs /run",
                "mkdir -p /run/systemd/journal /run/log/journal /run/systemd/journald.conf.d",
                f"{mount} --bind {shlex.quote(str(self.run_dir))} /run/systemd/journal",
                f"{mount} --bind {shlex.quote(str(self.log_dir))} /run/log/journal",
                f"printf {shlex.quote(conf)} > /run/systemd/journald.conf.d/test.conf",
                f"exec {journald}",
            ]
        )
        argv = [unshare, "--mount", "--propagation", "private", "sh", "-c", script]
        self.proc = Process(argv, where / "journald.log")
        self.socket = self.run_dir / "socket"
        self.proc.wait_until(
            lambda: self.socket.is_socket() and (self.run_dir / "stdout").is_socket(),
            10,
            "systemd-journald",
        )

    def stream(self, identifier: str, priority: int = 6) -> socket.socket:
        """A stdout stream, as systemd opens it for a service: the header, then lines."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.run_dir / "stdout"))
        s.shutdown(socket.SHUT_RD)
        # identifier, unit id, priority, level prefix, to syslog, to kmsg, to console
        s.sendall(f"{identifier}\n\n{priority}\n1\n0\n0\n0\n".encode())
        return s

    def entries(self, *matches: str) -> list[dict[str, str]]:
        out = subprocess.run(
            [self.journalctl, "-D", str(self.log_dir), "-o", "json", "--all", "--no-pager",
             *matches],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    def wait_for(
        self, match: Callable[[dict[str, str]], bool], timeout: float, *matches: str
    ) -> dict[str, str] | None:
        end = time.monotonic() + timeout
        while True:
            found = next((e for e in self.entries(*matches) if match(e)), None)
            if found is not None or time.monotonic() >= end:
                return found
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.stop()
