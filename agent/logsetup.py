"""Where the log goes: the journal under systemd (priorities, fields, one entry per record),
stderr as plain lines anywhere else; and the level, from -v, the configuration, or at run time.

Under systemd (stderr is the journal's stream: `JOURNAL_STREAM` names its device and inode)
each record is a datagram of the journal's native protocol to /run/systemd/journal/socket:
MESSAGE (a traceback included: one entry), PRIORITY (syslog's, from the level), and the
record's fields. Should the socket refuse (journald restarting, a sandbox), the record goes to
stderr instead as one `<N>`-prefixed line, its newlines escaped: still one entry, still its
priority. The protocol is a few lines (systemd's "Native Journal Protocol"), so no
python3-systemd. DNSTLS_AGENT_JOURNAL_SOCKET replaces the socket's path, for tests only (a
fake journal, or a private journald); the service never sets it.

Fields come with the record, by convention in `extra=` (see `fields()`):

    LOG.warning("%s: %s", alert, text, extra=fields(MESSAGE_ID, INTERFACE="eth0"))

The journal handler turns them into KEY=VALUE fields; the plain formatter ignores them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, TextIO

from agent.errors import UsageError

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# For tests only: a fake journal's socket (a datagram socket the test binds). The service
# never sets it; it is read by setup() alone, and only once stderr is the journal's stream.
SOCKET_ENV = "DNSTLS_AGENT_JOURNAL_SOCKET"
IDENTIFIER = "dnstls-agent"
LOG = logging.getLogger(__name__)
PLAIN_FORMAT = "%(levelname)s %(name)s: %(message)s"

LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# -v: at least info, -vv: debug (whatever the configuration says)
_VERBOSE = (None, logging.INFO, logging.DEBUG)

# journald's rule for a field name: A-Z, 0-9 and _, not first a digit; a leading _ is a
# trusted field, set by journald alone (it drops ours); at most 64 characters.
_FIELD = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
# what the handler sets itself: extra= cannot replace them
_OWN = frozenset(
    {"MESSAGE", "PRIORITY", "MESSAGE_ID", "SYSLOG_IDENTIFIER", "LOGGER"}
    | {"CODE_FILE", "CODE_LINE", "CODE_FUNC"}
)


def priority(levelno: int) -> int:
    """A Python level as a syslog priority (what the journal and `<N>` prefixes carry)."""
    if levelno >= logging.CRITICAL:
        return 2  # LOG_CRIT
    if levelno >= logging.ERROR:
        return 3  # LOG_ERR
    if levelno >= logging.WARNING:
        return 4  # LOG_WARNING
    if levelno >= logging.INFO:
        return 6  # LOG_INFO
    return 7  # LOG_DEBUG


def fields(message_id: str | None = None, **journal: object) -> dict[str, Any]:
    """The `extra=` of a record that carries journal fields: a MESSAGE_ID (messageids) and
    KEY=VALUE pairs (upper case; a None value is left out)."""
    return {
        "message_id": message_id,
        "journal": {k: str(v) for k, v in journal.items() if v is not None},
    }


def valid_field(name: str) -> bool:
    return _FIELD.fullmatch(name) is not None


def encode(items: Iterable[tuple[str, str | bytes]]) -> bytes:
    """One datagram of the native protocol: NAME=value lines; a value with a newline in the
    binary-safe form, NAME, newline, its length as 64-bit little endian, the bytes, newline."""
    out = bytearray()
    for name, value in items:
        if not valid_field(name):
            raise ValueError(f"{name!r} is not a journal field name")
        data = value if isinstance(value, bytes) else value.encode("utf-8", "replace")
        key = name.encode("ascii")
        if b"\n" in data:
            out += key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key + b"=" + data + b"\n"
    return bytes(out)


def under_journal(stream: TextIO | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether `stream` (stderr) is the journal's: JOURNAL_STREAM, "DEVICE:INODE", names it.
    An inherited variable with stderr redirected elsewhere does not match (systemd.exec(5))."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((sys.stderr if stream is None else stream).fileno())
    except (OSError, ValueError, AttributeError):  # no descriptor (closed, or captured)
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class PrefixFormatter(logging.Formatter):
    """`<N>message` on one line: systemd reads the priority from the prefix (SyslogLevelPrefix=,
    on by default), and a newline would start another entry, so newlines are written `\\n`."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", "\\n")
        return f"<{priority(record.levelno)}>{text}"


class JournalHandler(logging.Handler):
    """Records as native journal entries; what the socket refuses goes to `fallback` as a
    `<N>` line (the stream is the journal's too)."""

    def __init__(
        self,
        path: str = JOURNAL_SOCKET,
        *,
        identifier: str = IDENTIFIER,
        fallback: TextIO | None = None,
    ) -> None:
        super().__init__()
        self.path = path
        self.identifier = identifier
        self.setFormatter(logging.Formatter("%(message)s"))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.fallback = logging.StreamHandler(sys.stderr if fallback is None else fallback)
        self.fallback.setFormatter(PrefixFormatter())

    def items(self, record: logging.LogRecord) -> list[tuple[str, str]]:
        out = [
            ("MESSAGE", self.format(record)),
            ("PRIORITY", str(priority(record.levelno))),
            ("SYSLOG_IDENTIFIER", self.identifier),
            ("LOGGER", record.name),
            ("CODE_FILE", record.pathname),
            ("CODE_LINE", str(record.lineno)),
            ("CODE_FUNC", record.funcName),
        ]
        message_id = getattr(record, "message_id", None)
        if isinstance(message_id, str) and message_id:
            out.append(("MESSAGE_ID", message_id))
        extra = getattr(record, "journal", None)
        if isinstance(extra, Mapping):
            out += [
                (str(k), str(v))
                for k, v in extra.items()
                if valid_field(str(k)) and k not in _OWN and v is not None
            ]
        return out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = encode(self.items(record))
        except Exception:  # logging's own rule: a record never raises
            self.handleError(record)
            return
        try:
            self.send(data)
        except OSError:
            self.fallback.emit(record)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendto(data, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        """Too big for one datagram: the entry in a sealed memfd, its descriptor sent
        (journald takes an unsealed file only from root, and only from /dev/shm or /tmp)."""
        fd = os.memfd_create("dnstls-agent-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
            self.sock.sendmsg([], rights, 0, self.path)  # (socket.send_fds drops the address)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.sock.close()
        self.fallback.close()
        super().close()


_floor: int | None = None  # the level -v asked for: the configuration never goes above it
_OURS = "_dnstls_agent"  # the attribute that marks the handler setup() installed


def setup(
    verbosity: int,
    *,
    level: str | None = None,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> logging.Handler:
    """The root logger's one handler and its level: `level` (a LEVELS name; default warning),
    or what -v (`verbosity` 1: info, 2: debug) asks if that shows more. Called again, it
    replaces the handler it installed before."""
    global _floor  # noqa: PLW0603 - the root logger is the process's, so is its -v
    env = os.environ if environ is None else environ
    out = sys.stderr if stream is None else stream
    handler: logging.Handler
    if under_journal(out, env):
        handler = JournalHandler(env.get(SOCKET_ENV) or JOURNAL_SOCKET, fallback=out)
        sys.excepthook = _log_uncaught  # the interpreter's traceback would be one entry a line
    else:
        handler = logging.StreamHandler(out)
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    _floor = _VERBOSE[min(max(verbosity, 0), 2)]
    configure(level or "warning")
    return handler


def configure(name: str, *, announce: bool = False) -> str:
    """The configured level (log_level), unless -v asked for more; the level now in force.
    `announce`: say so when it changes (a reload; at start the command's level is no news)."""
    want = _level(name)
    if _floor is not None:
        want = min(want, _floor)
    return _change(want, "from log_level" if announce else None)[1]


def set_level(name: str) -> tuple[str, str]:
    """At run time (the log-level command): exactly `name`, until the next reload or restart.
    The old level's name and the new one's."""
    return _change(_level(name), "asked by log-level")


def _change(want: int, why: str | None) -> tuple[str, str]:
    """Set the root level; a change is told at info while the more verbose level is in force
    (before a quieter one, after a louder one), so that it shows whenever either shows info."""
    root = logging.getLogger()
    before = root.level
    old, new = level_name(before), level_name(want)
    tell = why is not None and old != new
    if tell and want > before:
        LOG.info("log level %s -> %s, %s", old, new, why)
    root.setLevel(want)
    if tell and want < before:
        LOG.info("log level %s -> %s, %s", old, new, why)
    return old, new


def level_name(levelno: int) -> str:
    """The LEVELS name that shows what `levelno` shows (NOTSET shows everything: debug)."""
    for name, value in sorted(LEVELS.items(), key=lambda kv: kv[1]):
        if levelno <= value:
            return name
    return "error"


def _level(name: str) -> int:
    value = LEVELS.get(name) if isinstance(name, str) else None
    if value is None:
        raise UsageError(f"log level must be one of {', '.join(LEVELS)}, not {name!r}")
    return value


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    with contextlib.suppress(Exception):
        logging.getLogger("agent").critical("uncaught exception", exc_info=(kind, exc, tb))
