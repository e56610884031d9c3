"""The daemon's request to refresh the system stub: the one way it reaches root.

The daemon runs unprivileged; pointing the stub needs root. When the network's search
domains change, or something rewrote /etc/resolv.conf behind the agent's back (a
dhclient renewal), the daemon writes this small file in its runtime directory. Under
systemd, a path unit (dnstls-agent-stub.path) sees it change and starts
`dnstls-agent stub --refresh` as root, which reads it back here; run by hand as root,
the daemon refreshes itself.

The trust boundary: the file says only *which search domains* the network gave, and
root checks every one (LDH labels, lengths, a bounded count) before using it. The
nameservers are never taken from it: they are the tunnel's listen addresses from the
configuration root reads itself. A daemon taken over could at worst set odd search
domains; it cannot point the system anywhere. Root reads the file as hostile: without
following a link, only a regular file (never blocking on a FIFO), bounded in size and
nesting, every field matched whole (a newline is never part of a name).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from agent.errors import AgentError
from agent.fsutil import UnsafePath, read_bounded, write_atomic
from agent.jsondepth import too_deep

NAME = "stub-request.json"
VERSION = 1
MAX_DOMAINS = 32  # more than any network gives; glibc used to stop at 6
MAX_BYTES = 16384
MAX_DEPTH = 4  # {"search": [...]} is 2 deep
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")  # matched whole (fullmatch)


class RequestError(AgentError):
    """The request file cannot be used; nothing is changed."""


@dataclass(frozen=True)
class Request:
    search: tuple[str, ...]
    reason: str = ""


def domain(text: str) -> str:
    """A search domain as written to resolv.conf: lower case, no final dot; ValueError."""
    name = text.strip().rstrip(".").lower()
    if not name or len(name) > 253:
        raise ValueError(f"{text!r} is not a domain name (empty or over 253 characters)")
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            raise ValueError(f"{text!r} is not a domain name (label {label!r})")
    return name


def path(runtime_dir: Path) -> Path:
    return runtime_dir / NAME


def write(runtime_dir: Path, search: tuple[str, ...], reason: str) -> None:
    """Atomically; the time in it makes each request a change the path unit sees."""
    data = {"version": VERSION, "search": list(search), "reason": reason, "at": time.time()}
    write_atomic(path(runtime_dir), json.dumps(data).encode(), mode=0o644)


def read(runtime_dir: Path) -> Request | None:
    """The request, checked; None when there is none; RequestError when it is unusable."""
    where = path(runtime_dir)
    try:
        raw = read_bounded(where, MAX_BYTES)
    except UnsafePath as exc:
        raise RequestError(str(exc)) from exc
    except OSError as exc:
        raise RequestError(f"{where}: {exc.strerror}") from exc
    if raw is None:
        return None
    if too_deep(raw, MAX_DEPTH):
        raise RequestError(f"{where}: nested deeper than {MAX_DEPTH}")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"{where}: not JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise RequestError(f"{where}: not a stub request this version understands")
    search = data.get("search")
    if not isinstance(search, list) or not all(isinstance(d, str) for d in search):
        raise RequestError(f"{where}: search must be a list of domain names")
    if len(search) > MAX_DOMAINS:
        raise RequestError(f"{where}: {len(search)} search domains, at most {MAX_DOMAINS}")
    try:
        checked = tuple(dict.fromkeys(domain(d) for d in search))
    except ValueError as exc:
        raise RequestError(f"{where}: {exc}") from exc
    reason = data.get("reason")
    return Request(checked, reason[:200] if isinstance(reason, str) else "")
