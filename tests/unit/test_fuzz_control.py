"""Fuzzing the control socket's request decoding (agent/control.py): parse, the field
checks request_number and request_text, and the server's whole answer to one line (as
ControlServer._answer gives it, with a handler that checks fields like the daemon's).

Target `control`: parse gives a dict or a UsageError; a field is in its bounds or a
UsageError; every line gets a JSON answer (or, for nothing, none), never an internal error.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from agent import control
from agent.errors import UsageError
from tests.fuzz_corpus import Target, expect, mutated, property_test, repeats, text_values

ANY = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), text_values()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(text_values(), inner, max_size=2)
    ),
    max_leaves=5,
)
COMMANDS = ["status", "notify", "reprobe", "portal-allow", "", "STATUS", "shutdown"]
MINUTES = [5, 60, 60.0001, 0, -1, 1e308, 10**300, True, "5"]


REQUESTS = st.fixed_dictionaries(
    {"command": st.one_of(st.sampled_from(COMMANDS), ANY)},
    optional={
        "minutes": st.one_of(st.sampled_from(MINUTES), ANY),
        "interface": st.one_of(text_values(), st.text(min_size=60, max_size=70), ANY),
        "action": st.one_of(st.sampled_from(["up", "dhcp4-change"]), ANY),
    },
)
ENDS = st.sampled_from([b"\n", b"", b"\r\n"])
LINES = st.builds(lambda r, end: json.dumps(r).encode() + end, st.one_of(REQUESTS, ANY), ENDS)


def lines(big: bool) -> st.SearchStrategy[bytes]:
    return st.one_of(
        LINES,
        mutated(LINES),
        st.sampled_from(
            [b'{"minutes": NaN}\n', b'{"command": "portal-allow", "minutes": -Infinity}']
        ),
        st.binary(max_size=40),
        repeats([b"[", b'{"a":', b'"\\"', b'\\"', b"\\", b'"'], big),
    )


def handler(request: dict[str, Any]) -> dict[str, Any]:
    """The daemon's field checks (daemon.handle), without a daemon."""
    if request.get("command") == "notify":
        return {
            "ok": True,
            "got": [control.request_text(request, k) for k in ("interface", "action")],
        }
    if request.get("command") == "portal-allow":
        return {"ok": True, "minutes": control.request_number(request, "minutes", 5.0, high=60)}
    return {"ok": True}


PEER = control.Peer(os.getpid(), os.geteuid(), os.getegid(), frozenset())


async def answer(line: bytes) -> dict[str, Any] | None:
    server = control.ControlServer(Path("/nonexistent/control.sock"), handler)
    reader = asyncio.StreamReader(limit=control.MAX_REQUEST)
    reader.feed_data(line)
    reader.feed_eof()
    return await server._answer(reader, PEER)


def check_control(line: bytes) -> None:
    try:
        req = control.parse(line)
    except UsageError:
        pass
    else:
        expect(isinstance(req, dict), "parse: not a dict")
        try:
            minutes = control.request_number(req, "minutes", 5.0, high=60)
            expect(math.isfinite(minutes) and 0 < minutes <= 60, "request_number", minutes)
        except UsageError:
            pass
        try:
            text = control.request_text(req, "interface")
            expect(isinstance(text, str) and len(text) <= 64, "request_text", text)
        except UsageError:
            pass
    got = asyncio.run(answer(line))
    if got is None:  # the server reads one line: nothing in it, nothing to answer
        expect(not line.partition(b"\n")[0].strip(), "server: no answer to a request")
        return
    json.dumps(got)
    expect(isinstance(got.get("ok"), bool), "server: an answer without ok", got)
    expect("internal error" not in str(got.get("error", "")), "server: internal error", got)


TARGETS = [Target("control", lines, check_control, max_examples=300)]

test_control = property_test(TARGETS[0])
