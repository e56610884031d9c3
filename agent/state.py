"""What the agent remembers across restarts: knowledge per (network, resolver), preferred orders.

One JSON file under the state directory, versioned, written atomically (fsutil: temp
file in the same directory, fsync, rename, fsync of the directory), readable by the
daemon's user only (0600: what networks the machine joined is nobody else's business).
A file that cannot be read or understood, whatever is wrong with it (too big, nested
too deep, a field of the wrong type, a number that is not finite, a string too long, a
value no enum knows), is logged, kept aside (renamed *.corrupt-TIMESTAMP) and replaced:
never fatal. What `save` writes is within the same bounds. Temporary files of a save
that was killed half-way are removed at the next load.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.fsutil import write_atomic
from agent.jsondepth import too_deep
from agent.model import Auth, AuthSource, Designation, Knowledge, Method, Order

LOG = logging.getLogger(__name__)

VERSION = 1
FILENAME = "state.json"
MAX_ENTRIES = 2000  # oldest probes are forgotten first
MAX_BYTES = 4 << 20  # a bigger file is not read: set aside
MAX_DEPTH = 8  # of nested lists and objects (the file has 4), checked before json.loads
MAX_TEXT = 4096  # characters of one string; longer ones are cut at save
MAX_LIST = 64  # strings in one list of an entry (pins seen, failures); the newest kept at save
MAX_DESIGNATED = 16  # designations kept per resolver (DDR): as many as are asked for
MAX_COUNT = 1 << 31  # of an integer field (probes in a row)


class Corrupt(ValueError):
    """The state file's content is not what `save` writes."""


@dataclass
class State:
    knowledge: dict[tuple[str, str], Knowledge] = field(default_factory=dict)
    orders: dict[str, list[str]] = field(default_factory=dict)  # network -> upstreams, as text

    def remember(self, k: Knowledge) -> None:
        self.knowledge[k.key] = k

    def for_network(self, network: str) -> list[Knowledge]:
        return [k for (net, _), k in self.knowledge.items() if net == network]


def _clip(text: str) -> str:
    return text[:MAX_TEXT]


def _encode(k: Knowledge) -> dict[str, Any]:
    """The entry as saved: within the bounds `_decode` checks (long strings cut)."""
    d = asdict(k)
    for key, value in d.items():
        if isinstance(value, str):
            d[key] = _clip(value)
    d["method"] = k.method.value
    d["auth"] = k.auth.value if k.auth else None
    d["auth_source"] = k.auth_source.value if k.auth_source else None
    d["path_first"] = k.path_first.value if k.path_first else None
    d["plain"] = k.plain.value if k.plain else None
    d["pins_seen"] = [_clip(p) for p in k.pins_seen[-MAX_LIST:]]
    d["failures"] = [_clip(f) for f in k.failures[-MAX_LIST:]]
    d["designated"] = [
        {**asdict(x), "adn": _clip(x.adn), "reason": _clip(x.reason)}
        for x in k.designated[:MAX_DESIGNATED]
    ]
    return d


# -- decoding: every field's type checked, nothing trusted -----------------------------------------

Check = Callable[[object, str], object]


def _text(value: object, key: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise Corrupt(f"{key}: not a string of at most {MAX_TEXT} characters")
    return value


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Corrupt(f"{key}: not a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise Corrupt(f"{key}: not a finite number")
    return number


def _count(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_COUNT:
        raise Corrupt(f"{key}: not a count")
    return value


def _flag(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise Corrupt(f"{key}: not true or false")
    return value


def _texts(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise Corrupt(f"{key}: not a list of at most {MAX_LIST} strings")
    return tuple(_text(v, key) for v in value)


def _enum(kind: type[StrEnum]) -> Check:
    def check(value: object, key: str) -> StrEnum:
        if not isinstance(value, str) or value not in kind._value2member_map_:
            raise Corrupt(f"{key}: not one of {', '.join(m.value for m in kind)}")
        return kind(value)

    return check


def _port(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise Corrupt(f"{key}: not a port")
    return value


def _address(value: object, key: str) -> str:
    try:
        return str(ipaddress.ip_address(_text(value, key)))
    except ValueError:
        raise Corrupt(f"{key}: not an IP address") from None


DESIGNATION: dict[str, Check] = {
    "address": _address,
    "port": _port,
    "adn": _text,
    "priority": _count,
    "verified": _flag,
    "usable": _flag,
    "reason": _text,
}


def _designations(value: object, key: str) -> tuple[Designation, ...]:
    if not isinstance(value, list) or len(value) > MAX_DESIGNATED:
        raise Corrupt(f"{key}: not a list of at most {MAX_DESIGNATED} designations")
    out = []
    for d in value:
        if not isinstance(d, dict) or "address" not in d:
            raise Corrupt(f"{key}: a designation is not an object with an address")
        fields: dict[str, Any] = {
            f: c(d[f], f"{key}.{f}") for f, c in DESIGNATION.items() if f in d
        }
        out.append(Designation(**fields))
    return tuple(out)


# every field of Knowledge, and whether null is allowed
FIELDS: dict[str, tuple[Check, bool]] = {
    "network": (_text, False),
    "address": (_text, False),
    "method": (_enum(Method), False),
    "auth": (_enum(Auth), True),
    "pin": (_text, True),
    "pins_seen": (_texts, False),
    "latency_ms": (_number, True),
    "probed_at": (_number, False),
    "tls_ok_at": (_number, False),
    "negative_until": (_number, False),
    "path_first": (_enum(Order), True),
    "resumption": (_flag, True),
    "failures": (_texts, False),
    "plain": (_enum(Method), True),
    "pin_stable": (_count, False),
    "suspect_at": (_number, False),
    "suspect": (_text, False),
    "auth_source": (_enum(AuthSource), True),
    "designated": (_designations, False),
    "tls_port": (_port, True),
}


def _decode(d: object) -> Knowledge:
    """One entry: every field checked (absent: the default; fields of newer versions ignored)."""
    if not isinstance(d, dict):
        raise Corrupt("an entry is not an object")
    values: dict[str, Any] = {}
    for key, (check, nullable) in FIELDS.items():
        if key in d:
            value = d[key]
            values[key] = None if value is None and nullable else check(value, key)
    for key in ("network", "address"):
        if key not in values:
            raise Corrupt(f"entry without {key}")
    return Knowledge(**values)


def _reject_constant(name: str) -> float:
    raise Corrupt(f"{name} is not a number JSON knows")


def _parse(raw: str) -> State:
    if too_deep(raw, MAX_DEPTH):
        raise Corrupt(f"nested more than {MAX_DEPTH} deep")
    data = json.loads(raw, parse_constant=_reject_constant)
    if not isinstance(data, dict) or data.get("version") != VERSION:
        found = data.get("version") if isinstance(data, dict) else data
        raise Corrupt(f"unknown version {str(found)[:40]!r}")
    knowledge = data.get("knowledge", [])
    orders = data.get("orders", {})
    if not isinstance(knowledge, list) or not isinstance(orders, dict):
        raise Corrupt("knowledge is not a list or orders not an object")
    state = State()
    for entry in knowledge:
        state.remember(_decode(entry))
    for net, order in orders.items():
        if not isinstance(order, list):  # as long as it is: the file's size bounds it
            raise Corrupt("orders: not lists of strings")
        state.orders[_text(net, "orders")] = [_text(u, "orders") for u in order]
    return state


class Store:
    """The state file. `load()` never raises for bad content; `save()` is atomic."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / FILENAME

    def load(self) -> State:
        self._sweep()
        try:
            with self.path.open("rb") as f:
                data = f.read(MAX_BYTES + 1)
            if len(data) > MAX_BYTES:
                raise Corrupt(f"larger than {MAX_BYTES} bytes")
            raw = data.decode("utf-8")
        except FileNotFoundError:
            return State()
        except (OSError, UnicodeDecodeError, Corrupt) as exc:
            LOG.error("state %s unreadable (%s); kept aside, starting afresh", self.path, exc)
            self._set_aside()
            return State()
        try:
            return _parse(raw)
        except (ValueError, TypeError, RecursionError) as exc:  # Corrupt, JSONDecodeError too
            LOG.error("state %s is corrupt (%s); kept aside, starting afresh", self.path, exc)
            self._set_aside()
            return State()

    def save(self, state: State) -> None:
        entries = sorted(state.knowledge.values(), key=lambda k: k.probed_at)[-MAX_ENTRIES:]
        orders = {_clip(net): [_clip(u) for u in order] for net, order in state.orders.items()}
        while True:  # what load would refuse is never written: the oldest entries go first
            data = {
                "version": VERSION,
                "saved_at": time.time(),
                "knowledge": [_encode(k) for k in entries],
                "orders": orders,
            }
            text = json.dumps(data, indent=1, sort_keys=True).encode("utf-8")
            if len(text) <= MAX_BYTES:
                break
            entries = entries[(len(entries) + 1) // 2 :]  # none left at last: orders {} too
            nets = {k.network for k in entries}
            orders = {net: order for net, order in orders.items() if net in nets}
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.path, text, mode=0o600)

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
