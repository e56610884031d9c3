"""The control socket: a Unix stream socket, one JSON request per line, one JSON answer.

Commands: status, statistics (the counters), notify (the dispatcher hook), reprobe,
portal-allow, flush-caches, statistics-reset, log-level (the daemon's log level until the
next reload: {"command": "log-level", "level": "debug"}, answered with the old and the new
level). The socket is created mode 0660 in the runtime directory (0750): its group is the
gate for `status` and `statistics`. `query` ({"command": "query", "name": ..., "type": ...})
is open like them: it asks one question through the tunnel and says which upstream answered
and how, no more than anyone on the machine learns by asking the tunnel's address itself
(`dig @127.0.0.153`). Its handler answers when the tunnel does (a coroutine, awaited), at the
latest at the tunnel's query deadline.
The others change what the agent does (portal-allow lets cleartext DNS through under
strict), so the server checks who asks, from the credentials the kernel took at
connect (SO_PEERCRED, SO_PEERGROUPS): root, the daemon's own user, or a member of
ADMIN_GROUP. A caller is also bounded: connections at once (in all and per user), the
size, nesting and arrival time of its request. Each connection gets one answer or a
clean close; errors become {"ok": false, "error": ..., "reason": ...}.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import platform
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.errors import AgentError, UsageError
from agent.jsondepth import too_deep

if TYPE_CHECKING:  # the server runs in the daemon; the commands that only ask skip asyncio
    import asyncio

LOG = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
# Who may change what the agent does; not created by the packages (groupadd it).
ADMIN_GROUP = "dnstls-agent-admin"
OPEN_COMMANDS = frozenset({"status", "statistics", "query"})  # anyone who can connect
ADMIN_COMMANDS = frozenset(
    {"notify", "reprobe", "portal-allow", "flush-caches", "log-level", "statistics-reset"}
)

MAX_CLIENTS = 64  # connections at once; the unit's LimitNOFILE= leaves room for them
MAX_PER_USER = 16  # of which one uid may hold: one user cannot starve root's hook
MAX_REQUEST = 64 * 1024  # bytes in the request line
MAX_DEPTH = 16  # nesting of [ and { (json.loads recurses: thousands would blow the stack)
TIMEOUT = 5.0  # seconds for the whole request to arrive, and again for the answer to go

# Why an answer is not ok, for the client: "refused" and "bad-request" will not change by
# asking again (the CLI's usage status), "busy" and "failed" may.
REFUSED, BAD_REQUEST, BUSY, FAILED = "refused", "bad-request", "busy", "failed"

# SO_PEERGROUPS (Linux 4.13): 59 but on parisc and sparc; Python 3.11 does not name it.
_SO_PEERGROUPS: int | None = getattr(socket, "SO_PEERGROUPS", None)
if _SO_PEERGROUPS is None and not platform.machine().startswith(("parisc", "sparc")):
    _SO_PEERGROUPS = 59

Handler = Callable[[dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]]


class _Sock(Protocol):  # a socket, or the TransportSocket asyncio hands out
    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...


class ControlError(AgentError):
    """The agent could not be asked (not running, busy, bad answer)."""


class AgentNotRunning(ControlError):
    """Nothing answers on the socket: it is absent, or nobody listens on it."""


class RequestRefused(ControlError, UsageError):
    """The agent, or the socket's permissions, refused the request: the caller may not run
    the command, or a value is not acceptable. Asking again the same way will not help."""


# -- who asks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """The process at the other end, as the kernel saw it at connect."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]  # supplementary; empty when they could not be learnt

    @property
    def name(self) -> str:
        return f"pid {self.pid} (uid {self.uid})"


def peer_of(sock: _Sock) -> Peer:
    pid, uid, gid = struct.unpack(
        "iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("iII"))
    )
    return Peer(pid, uid, gid, _peer_groups(sock, pid, uid))


def _peer_groups(sock: _Sock, pid: int, uid: int) -> frozenset[int]:
    """The process's own supplementary groups (not /etc/group's idea of its user's):
    SO_PEERGROUPS, up to 256 (Python's getsockopt buffer), else /proc/PID/status, which
    the unit's ProtectProc=invisible hides for other users. Neither: none (fail closed)."""
    if _SO_PEERGROUPS is not None:
        with contextlib.suppress(OSError):
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
            return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        if int(fields["Uid"].split()[1]) == uid:  # else the pid is another process by now
            return frozenset(int(g) for g in fields.get("Groups", "").split())
    except (OSError, KeyError, IndexError, ValueError) as exc:
        LOG.debug("control: no groups for pid %d: %s", pid, exc)
    return frozenset()


def may(command: str, peer: Peer, own_uid: int, admin_gid: int | None) -> bool:
    """Whether `peer` may run `command` (one the server knows); for the others, can connect
    is enough: the socket's group decides."""
    if command in OPEN_COMMANDS:
        return True
    if command not in ADMIN_COMMANDS:
        return False
    if peer.uid in (0, own_uid):
        return True
    return admin_gid is not None and (peer.gid == admin_gid or admin_gid in peer.groups)


# -- what is asked -----------------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse(line: bytes) -> dict[str, Any]:
    """One request: a JSON object nested at most MAX_DEPTH deep, checked before json.loads,
    whose recursion some thousand brackets exhaust. Errors are UsageError."""
    if too_deep(line, MAX_DEPTH):
        raise UsageError(f"nested deeper than {MAX_DEPTH}")
    try:
        request = json.loads(line, parse_constant=_no_constant)
    except ValueError as exc:  # UnicodeDecodeError too
        raise UsageError(f"not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise UsageError("a request is a JSON object")
    return request


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def request_number(request: dict[str, Any], key: str, default: float, *, high: float) -> float:
    """A field that must be a number in (0, high]: not a bool or a string, not NaN or
    infinite; an integer of any size is compared as it is, never converted on the way."""
    value = request.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= high:
        raise UsageError(f"{key} must be a number > 0 and <= {high:g}, not {_short(value)}")
    return float(value)


def request_text(request: dict[str, Any], key: str, *, max_len: int = 64) -> str:
    value = request.get(key, "")
    if not isinstance(value, str) or len(value) > max_len:
        raise UsageError(f"{key} must be a string of at most {max_len} characters")
    return value


def _error(reason: str, text: str) -> dict[str, Any]:
    return {"ok": False, "error": text, "reason": reason}


# -- the server --------------------------------------------------------------------------------


class ControlServer:
    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        admin_group: str = ADMIN_GROUP,
        max_clients: int = MAX_CLIENTS,
        max_per_user: int = MAX_PER_USER,
        timeout: float = TIMEOUT,
    ) -> None:
        self.path = path
        self.handler = handler
        self.admin_group = admin_group
        self.max_clients = max_clients
        self.max_per_user = max_per_user
        self.timeout = timeout
        self.own_uid = os.geteuid()
        self.server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[Any]] = set()
        self._per_user: Counter[int] = Counter()
        self._full = False  # said so in the log, once per time it fills up

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        if self.path.exists() or self.path.is_symlink():
            if _alive(self.path):
                raise ControlError(f"another agent answers on {self.path}")
            self.path.unlink()  # left by an agent that died
        import asyncio  # noqa: PLC0415 (see the top)

        old = os.umask(0o117)
        try:
            self.server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o660)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection. Never raises (but when cancelled): a task of asyncio's own, whose
        exception nobody would retrieve."""
        import asyncio  # noqa: PLC0415 (see the top)

        try:
            peer = peer_of(writer.get_extra_info("socket"))
        except OSError as exc:
            LOG.warning("control: a caller without credentials: %s", exc)
            writer.transport.abort()
            return
        if len(self._clients) >= self.max_clients or self._per_user[peer.uid] >= self.max_per_user:
            if not self._full:
                LOG.warning(
                    "control: connections refused, %d open (%d of uid %d); newest: %s",
                    len(self._clients),
                    self._per_user[peer.uid],
                    peer.uid,
                    peer.name,
                )
            self._full = True
            busy = _error(BUSY, f"busy: {len(self._clients)} connections open, try again")
            with contextlib.suppress(OSError):
                writer.write(json.dumps(busy).encode() + b"\n")  # to the socket at once
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        self._per_user[peer.uid] += 1
        try:
            answer = await self._answer(reader, peer)
            if answer is not None:
                await self._reply(writer, answer)
        finally:
            self._clients.discard(task)
            self._per_user[peer.uid] -= 1
            if not self._per_user[peer.uid]:
                del self._per_user[peer.uid]
            if not self._clients:
                self._full = False
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, peer: Peer) -> dict[str, Any] | None:
        """The answer to the one request, or None for a caller that went without asking."""
        import asyncio  # noqa: PLC0415 (see the top)

        command: object = None
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    line = await reader.readline()
            except TimeoutError:
                raise UsageError(f"no request within {self.timeout:g} s") from None
            except ValueError:  # the limit: the line is longer
                raise UsageError(f"longer than {MAX_REQUEST} bytes") from None
            except OSError:
                return None
            if not line.strip():
                return None  # connected and went (an agent starting checks so for another)
            request = parse(line)
            command = request.get("command")
            if not isinstance(command, str) or command not in OPEN_COMMANDS | ADMIN_COMMANDS:
                raise UsageError(f"unknown command {_short(command)}")
            admin_gid = self._admin_gid() if command in ADMIN_COMMANDS else None
            if not may(command, peer, self.own_uid, admin_gid):
                LOG.warning("control: %s refused to %s", command, peer.name)
                return _error(
                    REFUSED,
                    f"refused: {command} needs root or the group {self.admin_group}, "
                    f"which uid {peer.uid} is not in",
                )
            answer = self.handler(request)  # or a coroutine: query waits for the tunnel
            return answer if isinstance(answer, dict) else await answer
        except UsageError as exc:
            return _error(BAD_REQUEST, f"bad request: {exc}")
        except AgentError as exc:
            return _error(FAILED, str(exc))
        except Exception:  # the edge: a bug met by one request must not reach the others
            LOG.exception("control: %s from %s failed", _short(command), peer.name)
            return _error(FAILED, "internal error (the agent's log has it)")

    def _admin_gid(self) -> int | None:
        """Looked up at each request: a group made after the start counts."""
        try:
            return grp.getgrnam(self.admin_group).gr_gid
        except KeyError:
            return None

    async def _reply(self, writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
        import asyncio  # noqa: PLC0415 (see the top)

        try:
            data = json.dumps(answer).encode() + b"\n"
        except (TypeError, ValueError) as exc:
            LOG.error("control: an answer that is not JSON: %s", exc)
            data = json.dumps(_error(FAILED, "internal error (the agent's log has it)")).encode()
            data += b"\n"
        try:
            writer.write(data)
            async with asyncio.timeout(self.timeout):
                await writer.drain()
        except (OSError, TimeoutError):  # gone, or not reading: no fd held for it
            writer.transport.abort()

    async def close(self) -> None:
        import asyncio  # noqa: PLC0415 (see the top)

        if self.server is not None:
            self.server.close()
        for task in self._clients:
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def ask(path: Path, request: dict[str, Any], timeout: float = 3.0) -> dict[str, Any]:
    """One request to a running agent (blocking; for the CLI)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            s.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
        except FileNotFoundError:
            raise AgentNotRunning(f"the agent is not running (no {path})") from None
        except ConnectionRefusedError:
            raise AgentNotRunning(f"the agent is not running ({path} refuses)") from None
        except PermissionError:
            raise RequestRefused(
                f"no permission to talk to the agent at {path} (not in its group)"
            ) from None
        except OSError as exc:
            raise ControlError(f"cannot talk to the agent at {path}: {exc}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ControlError(f"the agent gave no answer on {path}")
    if not answer.get("ok"):
        error = str(answer.get("error", "the agent refused"))
        if answer.get("reason") in (REFUSED, BAD_REQUEST):
            raise RequestRefused(error)
        raise ControlError(error)
    return answer
