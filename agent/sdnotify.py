"""systemd's notify protocol (sd_notify), without libsystemd: one datagram per message."""

from __future__ import annotations

import contextlib
import os
import socket


def notify(message: str) -> bool:
    """Send e.g. "READY=1" or "STATUS=..." to $NOTIFY_SOCKET; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s,
        contextlib.suppress(OSError),
    ):
        s.sendto(message.encode(), address)
        return True
    return False


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC, in seconds, when the watchdog is for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
