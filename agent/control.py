"""The control socket: a Unix stream socket, one JSON request per line, one JSON answer.

Commands: status, notify (the dispatcher hook), reprobe. The socket is created
mode 0660 in the runtime directory (0750); errors become {"ok": false, "error": ...}.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import AgentError

if TYPE_CHECKING:  # the server runs in the daemon; the commands that only ask skip asyncio
    import asyncio

LOG = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST = 4096

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(AgentError):
    """The agent could not be asked (not running, no permission, bad answer)."""


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        if self.path.exists() or self.path.is_symlink():
            if _alive(self.path):
                raise ControlError(f"another agent answers on {self.path}")
            self.path.unlink()  # left by an agent that died
        import asyncio  # noqa: PLC0415 (see the top)

        old = os.umask(0o117)
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o660)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio  # noqa: PLC0415 (see the top)

        try:
            async with asyncio.timeout(5):
                line = await reader.readline()
            if len(line) > MAX_REQUEST:
                raise ValueError("request too long")
            request = json.loads(line or b"{}")
            if not isinstance(request, dict):
                raise TypeError("a request is a JSON object")
            answer = self.handler(request)
        except (ValueError, TypeError, TimeoutError) as exc:
            answer = {"ok": False, "error": f"bad request: {exc}"}
        except AgentError as exc:
            answer = {"ok": False, "error": str(exc)}
        with contextlib.suppress(OSError):
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
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
            raise ControlError(f"the agent is not running (no {path})") from None
        except ConnectionRefusedError:
            raise ControlError(f"the agent is not running ({path} refuses)") from None
        except PermissionError:
            raise ControlError(f"no permission to talk to the agent at {path}") from None
        except OSError as exc:
            raise ControlError(f"cannot talk to the agent at {path}: {exc}") from None
    try:
        answer: dict[str, Any] = json.loads(data)
    except ValueError:
        raise ControlError(f"the agent gave no answer on {path}") from None
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "the agent refused")))
    return answer
