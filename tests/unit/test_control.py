"""agent/control.py: who may run which command, and callers that are hostile or many.

The server is the real one on a socket in tmp_path. Callers of other users are real
processes (the CLI, or a flood of connections) started as made-up uids: those tests need
root (skipped on a developer's machine, failed under CI without it). The socket's group
is made up as well, and so is the daemon's "admin" group: one that exists here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import grp
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent import control
from agent.cli import EXIT_OK, EXIT_USAGE
from agent.control import (
    ADMIN_COMMANDS,
    MAX_PER_USER,
    ControlError,
    ControlServer,
    Peer,
    RequestRefused,
    ask,
    may,
    parse,
    request_number,
    request_text,
)
from agent.errors import UsageError
from tests.conftest import require_root, run
from tests.lab.netns import REPO

STATUS_GID = 47_420  # the socket's group (the unit's Group=)
MEMBER = 47_421  # a user in it: may ask for status
ADMIN = 47_422  # a user in it and in the admin group
STRANGER = 47_423  # in neither: cannot even connect
FLOODER = 47_424  # in the socket's group, and opens many connections
SOCK = "--socket=control.sock"  # callers run in the socket's directory (tmp_path is 0700)


def admin_group() -> grp.struct_group:
    """A group that exists here, to stand for dnstls-agent-admin."""
    return min(
        (g for g in grp.getgrall() if g.gr_gid not in (0, STATUS_GID)), key=lambda g: g.gr_gid
    )


# -- in memory ---------------------------------------------------------------------------------


def test_who_may_run_what() -> None:
    own, admin = 990, 991
    root = Peer(1, 0, 0, frozenset())
    daemon = Peer(2, own, own, frozenset())
    member = Peer(3, 1000, 1000, frozenset({STATUS_GID}))
    by_group = Peer(4, 1001, 1001, frozenset({STATUS_GID, admin}))
    by_primary_gid = Peer(5, 1002, admin, frozenset())
    for command in ("status", *sorted(ADMIN_COMMANDS)):
        for peer in (root, daemon, by_group, by_primary_gid):
            assert may(command, peer, own, admin), (command, peer)
    assert may("status", member, own, admin)
    for command in ADMIN_COMMANDS:
        assert not may(command, member, own, admin)
        assert not may(command, by_group, own, None)  # no such group here: nobody by group
    assert not may("shutdown", root, own, admin)  # what the server does not know: nobody


@pytest.mark.parametrize("via", ["SO_PEERGROUPS", "/proc"])
def test_the_peer_is_what_the_kernel_says(via: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if via == "/proc":  # an old kernel: the groups from /proc/PID/status
        monkeypatch.setattr(control, "_SO_PEERGROUPS", None)
    a, b = socket.socketpair()
    with a, b:
        peer = control.peer_of(a)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert peer.groups == frozenset(os.getgroups())


def test_nesting_is_checked_before_json_loads() -> None:
    with pytest.raises(UsageError, match="nested deeper than 16"):
        parse(b"[" * 3000)
    with pytest.raises(UsageError, match="nested deeper"):
        parse(b'{"a":' * 17 + b"1" + b"}" * 17)
    assert parse(b'{"a":' * 15 + b"1" + b"}" * 15)  # 16 levels with the outer object
    deep_text = {"command": "status", "pad": "[{" * 3000 + '\\"[[['}
    assert parse(json.dumps(deep_text).encode()) == deep_text  # brackets in strings: text
    for bad, why in ((b"[1]", "a JSON object"), (b"{", "not JSON"), (b"\xff", "not JSON")):
        with pytest.raises(UsageError, match=why):
            parse(bad)
    with pytest.raises(UsageError, match="NaN is not a JSON number"):
        parse(b'{"minutes": NaN}')


def test_numbers_and_text_are_checked() -> None:
    assert request_number({}, "minutes", 5.0, high=60) == 5.0
    assert request_number({"minutes": 60}, "minutes", 5.0, high=60) == 60.0
    assert request_number({"minutes": 0.5}, "minutes", 5.0, high=60) == 0.5
    bad: object
    for bad in (0, -1, 61, 10**400, -(10**400), float("inf"), float("nan"), True, "5", None, []):
        with pytest.raises(UsageError, match=r"minutes must be a number > 0 and <= 60"):
            request_number({"minutes": bad}, "minutes", 5.0, high=60)
    assert request_text({"interface": "eth0"}, "interface") == "eth0"
    assert request_text({}, "interface") == ""
    for bad in (1, ["eth0"], "x" * 65):
        with pytest.raises(UsageError, match="interface must be a string"):
            request_text({"interface": bad}, "interface")


# -- a real server -----------------------------------------------------------------------------


@dataclass
class World:
    dir: Path  # the socket's directory: callers' working directory
    sock: Path
    server: ControlServer
    got: list[dict[str, Any]] = field(default_factory=list)


def handler_for(got: list[dict[str, Any]]) -> Any:
    def handler(request: dict[str, Any]) -> dict[str, Any]:
        got.append(request)
        command = request["command"]
        if command == "status":
            return {"ok": True, "status": {"profile": "strict"}}
        if command == "portal-allow":
            minutes = request_number(request, "minutes", 5.0, high=60)
            return {"ok": True, "until": time.time() + 60 * minutes}
        if command == "notify":  # as the daemon's handle() checks them
            request_text(request, "interface"), request_text(request, "action")
        if command == "reprobe" and request.get("boom"):
            raise RuntimeError("a bug met by one request")
        if command == "reprobe" and request.get("unanswerable"):
            return {"ok": True, "what": object()}  # not JSON
        return {"ok": True}

    return handler


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, **kwargs: Any) -> AsyncIterator[World]:
    """The server, the socket in the unit's group. At the end, no connection's task (one of
    asyncio's, whose exception nobody would retrieve) ended with an exception, and the loop
    reported none."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o711)
    run_dir.chmod(0o711)  # other users may reach the socket; its own mode decides
    got: list[dict[str, Any]] = []
    server = ControlServer(run_dir / "control.sock", handler_for(got), **kwargs)
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: unhandled.append(ctx))
    tasks: list[asyncio.Task[Any]] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        tasks.append(asyncio.Task(coro, loop=loop, **kw))
        return tasks[-1]

    loop.set_task_factory(factory)
    await server.start()
    try:
        if os.geteuid() == 0:
            os.chown(server.path, -1, STATUS_GID)
        yield World(run_dir, server.path, server, got)
    finally:
        await server.close()
        loop.set_task_factory(None)
    served = [
        t for t in tasks if getattr(t.get_coro(), "__qualname__", "") == "ControlServer._serve"
    ]
    assert served and all(t.done() for t in served)
    assert [t.exception() for t in served if not t.cancelled() and t.exception()] == []
    gc.collect()
    await asyncio.sleep(0)
    assert unhandled == []


async def exchange(path: Path, data: bytes) -> dict[str, Any] | None:
    """Send `data` as it is; the one answer (None: closed without one), then the close."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(data)
        await writer.drain()
        line = await reader.readline()
        with contextlib.suppress(ConnectionResetError):  # the kernel's, for a request left unread
            assert await reader.read() == b"", "one answer, then the server closes"
        return json.loads(line) if line else None
    finally:
        writer.close()


async def status_answered(w: World) -> None:
    answer = await asyncio.to_thread(ask, w.sock, {"command": "status"})
    assert answer["status"] == {"profile": "strict"}


async def cli(w: World, *args: str, uid: int, groups: tuple[int, ...]) -> tuple[int, str, str]:
    """`dnstls-agent ARGS` as another user, in the socket's directory."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        *args,
        cwd=w.dir,
        user=uid,
        group=uid,
        extra_groups=list(groups),
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


ADMIN_CALLS = (
    ("reprobe", SOCK),
    ("portal", "allow", "--minutes", "5", SOCK),
    ("notify", SOCK, "--", "eth0", "up"),
)


def test_the_socket_group_reads_status_and_only_admins_change_things(tmp_path: Path) -> None:
    require_root()
    admin = admin_group()

    async def go() -> None:
        async with serving(tmp_path, admin_group=admin.gr_name) as w:
            rc, out, err = await cli(w, "status", "--json", SOCK, uid=MEMBER, groups=(STATUS_GID,))
            assert (rc, json.loads(out)) == (EXIT_OK, {"profile": "strict"}), err
            for call in ADMIN_CALLS:  # the status group: refused, with the usage status
                rc, out, err = await cli(w, *call, uid=MEMBER, groups=(STATUS_GID,))
                command = "portal-allow" if call[0] == "portal" else call[0]
                assert rc == EXIT_USAGE, (call, err)
                assert f"refused: {command} needs root or the group {admin.gr_name}" in err
            assert [r["command"] for r in w.got] == ["status"]  # nothing reached the handler
            w.got.clear()
            for call in ADMIN_CALLS:  # the admin group: allowed
                rc, out, err = await cli(w, *call, uid=ADMIN, groups=(STATUS_GID, admin.gr_gid))
                assert rc == EXIT_OK, (call, err)
            assert [r["command"] for r in w.got] == ["reprobe", "portal-allow", "notify"]
            w.got.clear()
            for request in ({"command": "reprobe"}, {"command": "portal-allow", "minutes": 1}):
                assert (await asyncio.to_thread(ask, w.sock, request))["ok"]  # root
            assert len(w.got) == 2
            # not in the socket's group: no connection at all, the same status
            rc, _, err = await cli(w, "status", SOCK, uid=STRANGER, groups=())
            assert rc == EXIT_USAGE and "no permission to talk to the agent" in err

    run(go(), timeout=60)


FLOOD = r"""
import json, select, socket, sys, time
n, held = int(sys.argv[1]), int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("control.sock")
    socks.append(s)
answers, deadline = {}, time.monotonic() + 10  # until all but `held` have an answer
while len(answers) < n - held and time.monotonic() < deadline:
    for s in select.select([s for s in socks if s not in answers], [], [], 0.1)[0]:
        answers[s] = json.loads(s.recv(4096))["reason"]
time.sleep(0.2)  # and no more come
ready = select.select([s for s in socks if s not in answers], [], [], 0)[0]
busy = sum(r == "busy" for r in answers.values())
print(json.dumps({"busy": busy, "idle": n - len(answers) - len(ready)}), flush=True)
sys.stdin.read()
"""


def test_a_flood_of_idle_connections_does_not_starve_the_others(tmp_path: Path) -> None:
    require_root()

    async def go() -> None:
        async with serving(tmp_path, timeout=30) as w:  # the flood's idle ones stay
            flood = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-c",
                FLOOD,
                "200",
                str(MAX_PER_USER),
                cwd=w.dir,
                user=FLOODER,
                group=FLOODER,
                extra_groups=[STATUS_GID],
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            assert flood.stdout is not None and flood.stdin is not None
            seen = json.loads(await flood.stdout.readline())
            # one user holds at most MAX_PER_USER; each one more is told so and closed at once
            assert seen == {"busy": 200 - MAX_PER_USER, "idle": MAX_PER_USER}
            await status_answered(w)  # root, while the flood holds its connections
            rc, _, err = await cli(w, "status", SOCK, uid=MEMBER, groups=(STATUS_GID,))
            assert rc == EXIT_OK, err
            flood.stdin.close()
            assert await flood.wait() == 0

    run(go(), timeout=60)


def test_the_connection_over_the_cap_gets_an_error_and_is_closed(tmp_path: Path) -> None:
    async def go() -> None:
        # (a long timeout: on a loaded machine the idle ones must not go by themselves)
        async with serving(tmp_path, max_clients=64, max_per_user=64, timeout=30) as w:
            idle = [await asyncio.open_unix_connection(str(w.sock)) for _ in range(64)]
            deadline = time.monotonic() + 5
            while len(w.server._clients) < 64:  # accepted in this same loop
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            reader, writer = await asyncio.open_unix_connection(str(w.sock))
            answer = json.loads(await reader.readline())
            assert answer["ok"] is False and answer["reason"] == "busy"
            assert "busy: 64 connections open" in answer["error"]
            assert await reader.read() == b""  # closed at once
            writer.close()
            with pytest.raises(ControlError, match="busy") as exc:  # the CLI: status 3
                await asyncio.to_thread(ask, w.sock, {"command": "status"})
            assert not isinstance(exc.value, RequestRefused)
            for _, idle_writer in idle[:1]:
                idle_writer.close()
            deadline = time.monotonic() + 5
            while len(w.server._clients) > 63:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            await status_answered(w)
            for _, idle_writer in idle[1:]:
                idle_writer.close()

    run(go())


def test_a_caller_that_sends_nothing_is_dropped(tmp_path: Path) -> None:
    async def go() -> None:
        async with serving(tmp_path, timeout=0.3) as w:
            t0 = time.monotonic()
            silent, half = await asyncio.gather(
                exchange(w.sock, b""), exchange(w.sock, b'{"command": "sta')
            )
            assert time.monotonic() - t0 < 3
            for answer in (silent, half):
                assert answer is not None
                assert answer["error"] == "bad request: no request within 0.3 s"
            await status_answered(w)

    run(go())


HOSTILE = (
    (b"[" * 3000 + b"\n", "bad-request", "nested deeper than 16"),
    (b'{"command": "portal-allow", "minutes": ' + b"9" * 400 + b"}\n", "bad-request", "minutes"),
    (b'{"command": "portal-allow", "minutes": 1e999}\n', "bad-request", "minutes"),
    (b'{"command": "portal-allow", "minutes": NaN}\n', "bad-request", "NaN"),
    (b'{"command": "portal-allow", "minutes": 61}\n', "bad-request", "<= 60"),
    (b'{"command": "notify", "interface": ["eth0"]}\n', "bad-request", "interface"),
    (b'{"command": "shutdown"}\n', "bad-request", "unknown command 'shutdown'"),
    (b'{"command": {"a": [1]}}\n', "bad-request", "unknown command"),
    (b"[1, 2]\n", "bad-request", "a JSON object"),
    (b"\xff\xfe\n", "bad-request", "not JSON"),
    (b"x" * 70_000 + b"\n", "bad-request", "longer than 65536 bytes"),
    (b'{"command": "reprobe", "boom": true}\n', "failed", "internal error"),
    (b'{"command": "reprobe", "unanswerable": true}\n', "failed", "internal error"),
)


def test_hostile_requests_get_an_error_answer_and_the_server_goes_on(tmp_path: Path) -> None:
    async def go() -> None:
        async with serving(tmp_path) as w:
            for data, reason, text in HOSTILE:
                answer = await exchange(w.sock, data)
                assert answer is not None and answer["ok"] is False, data[:60]
                assert answer["reason"] == reason and text in answer["error"], answer
                await status_answered(w)
            # all at once (as many as one user may), good ones among them: each its own answer
            good = MAX_PER_USER - len(HOSTILE)
            requests = [d for d, _, _ in HOSTILE] + [b'{"command": "status"}\n'] * good
            answers = await asyncio.gather(*(exchange(w.sock, d) for d in requests))
            assert [a and a.get("reason") for a in answers] == [r for _, r, _ in HOSTILE] + [
                None
            ] * good

    run(go())


def test_a_caller_that_connects_and_goes_gets_a_clean_close(tmp_path: Path) -> None:
    async def go() -> None:
        async with serving(tmp_path) as w:
            reader, writer = await asyncio.open_unix_connection(str(w.sock))
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
            assert w.got == []
            await status_answered(w)

    run(go())
