"""What the agent remembers across restarts: knowledge per (network, resolver), preferred orders.

One JSON file under the state directory, versioned, written atomically (fsutil: temp
file in the same directory, fsync, rename, fsync of the directory), readable by the
daemon's user only (0600: what networks the machine joined is nobody else's business).
A file that cannot be read or understood is logged, kept aside (renamed
*.corrupt-TIMESTAMP) and replaced: never fatal. Temporary files of a save that was
killed half-way are removed at the next load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from agent.fsutil import write_atomic
from agent.model import Auth, AuthSource, Knowledge, Method, Order

LOG = logging.getLogger(__name__)

VERSION = 1
FILENAME = "state.json"
MAX_ENTRIES = 2000  # oldest probes are forgotten first


@dataclass
class State:
    knowledge: dict[tuple[str, str], Knowledge] = field(default_factory=dict)
    orders: dict[str, list[str]] = field(default_factory=dict)  # network -> upstreams, as text

    def remember(self, k: Knowledge) -> None:
        self.knowledge[k.key] = k

    def for_network(self, network: str) -> list[Knowledge]:
        return [k for (net, _), k in self.knowledge.items() if net == network]


def _encode(k: Knowledge) -> dict[str, Any]:
    d = asdict(k)
    d["method"] = k.method.value
    d["auth"] = k.auth.value if k.auth else None
    d["auth_source"] = k.auth_source.value if k.auth_source else None
    d["path_first"] = k.path_first.value if k.path_first else None
    d["plain"] = k.plain.value if k.plain else None
    d["pins_seen"] = list(k.pins_seen)
    d["failures"] = list(k.failures)
    return d


_KNOWN = {f.name for f in fields(Knowledge)}


def _decode(d: Mapping[str, Any]) -> Knowledge:
    values = {k: v for k, v in d.items() if k in _KNOWN}  # newer fields are ignored
    values["method"] = Method(values.get("method", Method.UNREACHABLE.value))
    values["auth"] = Auth(values["auth"]) if values.get("auth") else None
    source = values.get("auth_source")  # absent from files written before it was kept
    values["auth_source"] = AuthSource(source) if source else None
    values["path_first"] = Order(values["path_first"]) if values.get("path_first") else None
    values["plain"] = Method(values["plain"]) if values.get("plain") else None
    values["pins_seen"] = tuple(values.get("pins_seen", ()))
    values["failures"] = tuple(values.get("failures", ()))
    for key in ("network", "address"):
        if not isinstance(values.get(key), str):
            raise TypeError(f"entry without {key}")
    return Knowledge(**values)


class Store:
    """The state file. `load()` never raises for bad content; `save()` is atomic."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / FILENAME

    def load(self) -> State:
        self._sweep()
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return State()
        except (OSError, UnicodeDecodeError) as exc:
            LOG.error("state %s unreadable (%s); kept aside, starting afresh", self.path, exc)
            self._set_aside()
            return State()
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("version") != VERSION:
                raise ValueError(
                    f"unknown version {data.get('version') if isinstance(data, dict) else data!r}"
                )
            state = State()
            for entry in data.get("knowledge", []):
                state.remember(_decode(entry))
            for net, order in data.get("orders", {}).items():
                if isinstance(net, str) and isinstance(order, list):
                    state.orders[net] = [str(x) for x in order]
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            LOG.error("state %s is corrupt (%s); kept aside, starting afresh", self.path, exc)
            self._set_aside()
            return State()
        return state

    def save(self, state: State) -> None:
        entries = sorted(state.knowledge.values(), key=lambda k: k.probed_at)[-MAX_ENTRIES:]
        data = {
            "version": VERSION,
            "saved_at": time.time(),
            "knowledge": [_encode(k) for k in entries],
            "orders": state.orders,
        }
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        text = json.dumps(data, indent=1, sort_keys=True)
        write_atomic(self.path, text.encode("utf-8"), mode=0o600)

    def _sweep(self) -> None:
        """Temporary files of saves killed half-way (SIGKILL, power loss) never pile up."""
        with contextlib.suppress(OSError):
            for tmp in self.directory.glob(f".{FILENAME}.*"):
                with contextlib.suppress(OSError):
                    tmp.unlink()
                    LOG.info("removed %s, left by an interrupted save", tmp)

    def _set_aside(self) -> None:
        aside = self.path.with_name(f"{FILENAME}.corrupt-{int(time.time())}")
        with contextlib.suppress(OSError):
            os.replace(self.path, aside)
            LOG.warning("the unreadable state is at %s", aside)


def merge(state: State, learnt: Iterable[Knowledge]) -> None:
    for k in learnt:
        state.remember(k)
