"""agent/cli/: --json on every command that prints, errors included; `statistics` against a
real control server over the daemon's own handler; `probe` printing each resolver as it is
decided; `notifications` saying when the agent is out of reach.

The control server is the real one on a socket in tmp_path (as in test_control.py); its
handler is the daemon's handle() over a real tunnel (not listening) and a real engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.rrset
import pytest

from agent import control
from agent.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from agent.cli import control as cli_control
from agent.cli.statistics import format_statistics
from agent.config import Config
from agent.control import ControlServer
from agent.daemon import Daemon
from agent.dns import packet
from agent.engine import Engine
from agent.model import UpstreamSpec
from agent.state import Store
from agent.tunnel.forwarder import Tunnel
from agent.tunnel.settings import TunnelConfig
from tests.conftest import Certs, require_root, run
from tests.lab.netns import REPO
from tests.lab.peer import spawn

# -- --json against an agent that is not there -------------------------------------------------

TALKERS = [
    ["status"],
    ["reprobe"],
    ["flush-caches"],
    ["log-level", "debug"],
    ["portal", "allow"],
    ["statistics"],
    ["statistics", "--reset"],
]


@pytest.mark.parametrize("argv", TALKERS, ids=" ".join)
def test_no_agent_is_json_with_the_same_status(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "absent.sock"
    rc_text = main([*argv, "--socket", str(sock)])
    text = capsys.readouterr()
    assert text.out == "" and "the agent is not running" in text.err
    rc = main([*argv, "--socket", str(sock), "--json"])
    out, err = capsys.readouterr()
    assert err == ""
    answer = json.loads(out)
    assert rc == rc_text == EXIT_FAILURE
    assert answer["ok"] is False and answer["exit"] == rc
    assert str(sock) in answer["error"] and "not running" in answer["error"]
    if argv == ["status"]:  # and whether it runs, and where it was looked for
        assert answer["running"] is False and answer["socket"] == str(sock)
    else:
        assert "running" not in answer


def test_status_json_when_the_socket_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock))  # bound, never listening: connect() is refused
        rc = main(["status", "--json", "--socket", str(sock)])
    answer = json.loads(capsys.readouterr().out)
    assert rc == EXIT_FAILURE
    assert answer == {
        "ok": False,
        "error": f"the agent is not running ({sock} refuses)",
        "running": False,
        "socket": str(sock),
        "exit": EXIT_FAILURE,
    }


def test_config_check_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('bogus = 1\nprofile = "paranoid"\n')
    assert main(["config", "check", str(bad), "--json"]) == EXIT_USAGE
    answer = json.loads(capsys.readouterr().out)
    assert answer["ok"] is False and answer["exit"] == EXIT_USAGE
    assert len(answer["problems"]) == 2 and "2 problems" in answer["error"]
    assert any("bogus" in p for p in answer["problems"])
    good = tmp_path / "good.toml"
    good.write_text('profile = "strict"\n[[interface]]\nmatch_name = "eth*"\n')
    assert main(["config", "check", str(good), "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == {
        "ok": True,
        "files": [str(good)],
        "interfaces": 1,
    }


def test_stub_and_restore_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("bogus = 1\n")
    for argv in (["stub", "--show", "--json"], ["stub", "--json"]):
        assert main(["-c", str(bad), *argv]) == EXIT_USAGE
        answer = json.loads(capsys.readouterr().out)
        assert (answer["ok"], answer["exit"]) == (False, EXIT_USAGE)
        assert "bogus: unknown option" in answer["error"]
    # restore: nothing journalled, said so; a directory others may write: refused (status 3)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'stub_state_dir = "{tmp_path}/stub"\n')
    if os.geteuid() == 0:  # the journal's directory must be its owner's only: root's here
        assert main(["-c", str(cfg), "restore", "--json"]) == EXIT_OK
        answer = json.loads(capsys.readouterr().out)
        assert answer["ok"] is True and "nothing to restore" in answer["message"]
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    cfg.write_text(f'stub_state_dir = "{shared}"\n')
    assert main(["-c", str(cfg), "restore", "--json"]) == EXIT_FAILURE
    answer = json.loads(capsys.readouterr().out)
    assert (answer["ok"], answer["exit"]) == (False, EXIT_FAILURE)
    assert str(shared) in answer["error"]


# -- statistics, from the daemon's handler ---------------------------------------------------


@dataclass
class Agent:
    """The daemon's handler over a real tunnel and engine, behind a real control server."""

    daemon: Daemon
    tunnel: Tunnel
    engine: Engine
    server: ControlServer

    @property
    def sock(self) -> Path:
        return self.server.path


def cached_answer(tunnel: Tunnel) -> None:
    """One answer in the tunnel's cache."""
    q = dns.message.make_query("www.example.test.", "A")
    wire = q.to_wire()
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("www.example.test.", 300, "IN", "A", "192.0.2.1"))
    assert tunnel.cache is not None
    key = tunnel.cache.key(wire, packet.parse_query(wire), "")
    assert key is not None and tunnel.cache.put(key, r.to_wire(), time.time(), private=True)


@contextlib.asynccontextmanager
async def agent(tmp_path: Path, **server: Any) -> AsyncIterator[Agent]:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o711, exist_ok=True)
    run_dir.chmod(0o711)  # other users may reach the socket; its own mode decides
    spec = UpstreamSpec("127.0.0.1", port=1, auth_name="dns.test")
    tunnel = Tunnel(TunnelConfig(upstreams=(spec,)))
    daemon = Daemon(Config(), None)
    engine = Engine(Config(), tunnel, Store(tmp_path / "state"))
    daemon.tunnel, daemon.engine = tunnel, engine
    srv = ControlServer(run_dir / "control.sock", daemon.handle, **server)
    await srv.start()
    try:
        yield Agent(daemon, tunnel, engine, srv)
    finally:
        await srv.close()
        await tunnel.stop()


def count_some(a: Agent) -> None:
    """Counters as a few queries would leave them."""
    a.tunnel.stats.queries, a.tunnel.stats.answered, a.tunnel.stats.servfail = 7, 6, 1
    a.tunnel.stats.tcp_clients = 2
    cached_answer(a.tunnel)
    assert a.tunnel.cache is not None
    a.tunnel.cache.stats.hits, a.tunnel.cache.stats.misses = 3, 1
    (up,) = a.tunnel.upstreams
    up.stats.queries, up.stats.answers, up.stats.timeouts = 4, 3, 1
    up.stats.connections, up.stats.reconnects = 2, 1
    for ms in (10, 20, 30, 40):
        up.stats.latency(ms / 1000)
    a.engine.probes_run, a.engine.decisions = 2, 5


def test_statistics_table_json_and_reset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def go() -> None:
        async with agent(tmp_path) as a:
            count_some(a)
            started = a.tunnel.stats.since
            sock = ["--socket", str(a.sock)]
            assert await asyncio.to_thread(main, ["statistics", *sock]) == EXIT_OK
            table = capsys.readouterr().out.splitlines()
            assert table[0].startswith("counting since " + time.strftime("%Y-%m-%d"))
            head, values = table[1].split(), table[2].split()
            assert head[:4] == ["CLIENTS", "queries", "answered", "servfail"]
            assert values[:3] == ["7", "6", "1"] and values[-1] == "2"  # ..., tcp-clients
            assert len(table[1]) == len(table[2])  # the values under their headings
            head, values = table[3].split(), table[4].split()
            assert head[:6] == ["CACHE", "hits", "misses", "hit-ratio", "entries", "bytes"]
            assert values[:4] == ["3", "1", "75%", "1"]
            assert table[5].split() == ["ENGINE", "probes", "decisions"]
            assert table[6].split() == ["2", "5"]
            assert table[7].split()[:3] == ["UPSTREAM", "STATE", "queries"]
            row = table[8].split()
            assert row[0] == "tls-port:127.0.0.1@1#dns.test"
            assert row[2:7] == ["4", "3", "0", "1", "1"]  # queries answers failures reconn. t/o
            assert row[7:] == ["30.0ms", "40.0ms", "40.0ms"]  # p50 p90 p99

            assert await asyncio.to_thread(main, ["statistics", "--json", *sock]) == EXIT_OK
            st = json.loads(capsys.readouterr().out)
            assert st["since"] == started and st["now"] >= started
            assert st["clients"]["queries"] == 7 and st["clients"]["tcp_clients"] == 2
            assert (st["cache"]["hits"], st["cache"]["entries"]) == (3, 1)
            assert st["engine"] == {"probes": 2, "decisions": 5}
            (up,) = st["upstreams"]
            assert (up["queries"], up["reconnects"], up["p99_ms"]) == (4, 1, 40.0)

            # --reset: shows them as they ended, zeroes them, says since when they ran
            before = time.time()
            assert await asyncio.to_thread(main, ["statistics", "--reset", *sock]) == EXIT_OK
            out = capsys.readouterr().out
            assert "CLIENTS" in out and out.splitlines()[2].split()[0] == "7"
            zeroed = time.strftime("%Y-%m-%d %H:%M", time.localtime(a.tunnel.stats.since))
            assert f"counters zeroed at {zeroed}" in out
            ran_since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
            assert f"they had counted since {ran_since}" in out
            assert a.tunnel.stats.since >= before
            assert await asyncio.to_thread(main, ["statistics", "--json", *sock]) == EXIT_OK
            st = json.loads(capsys.readouterr().out)
            assert st["since"] == a.tunnel.stats.since >= before
            assert set(st["clients"].values()) == {0, st["since"]}
            assert st["cache"]["hits"] == st["cache"]["misses"] == 0
            assert st["cache"]["entries"] == 1  # the answers stay
            assert st["engine"] == {"probes": 0, "decisions": 0}
            (up,) = st["upstreams"]
            assert up["queries"] == up["reconnects"] == 0 and up["p50_ms"] is None
            assert up["since"] == st["since"]
            assert up["connections"] == 2  # kept: the next connection is a reconnect

            # --reset --json: the agent's answer, the counters as they ended
            count_some(a)
            argv = ["statistics", "--reset", "--json", *sock]
            assert await asyncio.to_thread(main, argv) == EXIT_OK
            answer = json.loads(capsys.readouterr().out)
            assert answer["ok"] is True and answer["since"] == a.tunnel.stats.since
            assert answer["statistics"]["clients"]["queries"] == 7
            assert answer["statistics"]["since"] == st["since"] <= answer["since"]

    run(go())


def test_statistics_without_cache_or_upstreams() -> None:
    text = format_statistics({"since": 0.0, "now": 90.0, "clients": {}, "cache": None})
    lines = text.splitlines()
    assert lines[0].endswith("(1m30s)")
    assert "CACHE      off" in lines and lines[-1] == "UPSTREAMS  none"


CALLER = 47_430  # in the socket's group: may read the counters
ADMIN = 47_431  # ... and in the admin group: may reset them
STATUS_GID = 47_432


async def cli_as(sock: Path, uid: int, groups: tuple[int, ...], *args: str) -> tuple[int, str]:
    """`dnstls-agent ARGS --socket control.sock` as another user, in the socket's directory."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *args, "--socket", "control.sock",
        cwd=sock.parent, user=uid, group=uid, extra_groups=list(groups),
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def test_reading_is_for_the_socket_group_resetting_for_admins(tmp_path: Path) -> None:
    require_root()
    admin = min(
        (g for g in grp.getgrall() if g.gr_gid not in (0, STATUS_GID)), key=lambda g: g.gr_gid
    )

    async def go() -> None:
        async with agent(tmp_path, admin_group=admin.gr_name) as a:
            os.chown(a.sock, -1, STATUS_GID)
            count_some(a)
            rc, out = await cli_as(a.sock, CALLER, (STATUS_GID,), "statistics", "--json")
            assert rc == EXIT_OK and json.loads(out)["clients"]["queries"] == 7, out
            for json_flag in ((), ("--json",)):
                args = ("statistics", "--reset", *json_flag)
                rc, out = await cli_as(a.sock, CALLER, (STATUS_GID,), *args)
                assert rc == EXIT_USAGE, out
                assert f"refused: statistics-reset needs root or the group {admin.gr_name}" in out
                if json_flag:
                    assert json.loads(out)["exit"] == EXIT_USAGE
            assert a.tunnel.stats.queries == 7  # nothing was reset
            groups = (STATUS_GID, admin.gr_gid)
            rc, out = await cli_as(a.sock, ADMIN, groups, "statistics", "--reset", "--json")
            assert rc == EXIT_OK, out
            assert json.loads(out)["statistics"]["clients"]["queries"] == 7
            assert a.tunnel.stats.queries == 0

    run(go(), timeout=60)


# -- probe: each resolver as soon as it is decided ---------------------------------------------


@pytest.fixture
def fast_and_slow(certs: Certs, tmp_path: Path) -> Iterator[dict[str, int]]:
    """127.0.0.1 answers at once; 127.0.0.2, on the same ports, answers after SLOW s."""
    cert = ["--cert", str(certs.good.cert), "--key", str(certs.good.key)]
    fast, ports = spawn(tmp_path / "fast.log", *cert)
    try:
        same = ["--dns-port", str(ports["dns_port"]), "--tls-port", str(ports["tls_port"])]
        slow_args = [*cert, *same, "--host", "127.0.0.2", "--fault", "slow", "--delay", str(SLOW)]
        slow, _ = spawn(tmp_path / "slow.log", *slow_args)
        try:
            yield ports
        finally:
            slow.stop()
    finally:
        fast.stop()


SLOW = 3.0  # seconds; the fast one is decided well within that, even on a loaded machine


def lines_of(proc: subprocess.Popen[str]) -> queue.Queue[tuple[float, str | None]]:
    """The process's stdout, line by line as it comes, with when it came (None: the end)."""
    q: queue.Queue[tuple[float, str | None]] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            q.put((time.monotonic(), line.rstrip("\n")))
        q.put((time.monotonic(), None))

    threading.Thread(target=read, daemon=True).start()
    return q


def test_probe_prints_each_resolver_when_it_is_decided(fast_and_slow: dict[str, int]) -> None:
    ports = fast_and_slow
    argv = [sys.executable, "-m", "agent", "probe", "127.0.0.2", "127.0.0.1", "--no-resumption"]
    argv += ["--timeout", "8", "--tls-port", str(ports["tls_port"])]
    argv += ["--dns-port", str(ports["dns_port"])]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO
    )
    try:
        q = lines_of(proc)
        got: list[tuple[float, str, bool]] = []  # (seconds in, line, the process still running)
        while True:
            at, line = q.get(timeout=30)
            if line is None:
                break
            got.append((at - t0, line, proc.poll() is None))
        assert proc.wait(10) == EXIT_OK
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = [line for _, line, _ in got]
    assert text[0].split()[:3] == ["RESOLVER", "METHOD", "AUTH"]
    rows = [i for i, line in enumerate(text) if line.startswith(("127.0.0.1 ", "127.0.0.2 "))]
    assert [text[i].split()[0] for i in rows] == ["127.0.0.1", "127.0.0.2"]  # as decided
    fast_at, _, running = got[rows[0]]
    slow_at = got[rows[1]][0]
    assert running, "the fast resolver's row came while the slow one was probed"
    assert slow_at - fast_at > 1.0, got  # not printed together at the end
    # the columns line up: every row's cells start where the header's do
    starts = [text[0].index(h) for h in ("METHOD", "AUTH", "CONNECT", "TLS", "PIN")]
    for i in rows:
        line = text[i]
        assert all(line[s - 1] == " " and line[s] != " " for s in starts), (text[0], line)
    # each resolver's DDR line right below its row, before the next resolver's
    assert text[rows[0] + 1].startswith("  127.0.0.1 DDR: ")
    assert any(line.startswith("  127.0.0.2 DDR: ") for line in text[rows[1] + 1 :])


def test_probe_json_is_one_document_in_the_order_given(
    fast_and_slow: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    ports = fast_and_slow
    argv = ["probe", "127.0.0.2", "127.0.0.1", "--json", "--no-resumption", "--no-ddr"]
    argv += ["--tls-port", str(ports["tls_port"]), "--dns-port", str(ports["dns_port"])]
    assert main(argv) == EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert [r["address"] for r in out] == ["127.0.0.2", "127.0.0.1"]
    assert all(r["method"] == "tls-port" for r in out)


# -- notifications: the agent out of reach, said once per change ------------------------------


def test_notifications_say_when_the_agent_is_away_once_per_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)  # warnings on stderr
    sock = tmp_path / "control.sock"
    warnings: list[dict[str, str]] = []

    def handler(request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "status": {"warnings": warnings}}

    looks = 0
    ask = control.ask

    def counted(*args: Any, **kw: Any) -> dict[str, Any]:
        nonlocal looks
        looks += 1
        return ask(*args, **kw)

    monkeypatch.setattr(control, "ask", counted)

    async def said() -> list[str]:
        """What it said over the next five looks (however slow they are)."""
        end = looks + 5
        async with asyncio.timeout(10):
            while looks < end:  # noqa: ASYNC110 (counted in to_thread's worker thread)
                await asyncio.sleep(0.01)
        return [line for line in capsys.readouterr().err.splitlines() if line]

    async def go() -> None:
        relay = asyncio.create_task(cli_control._relay_warnings(sock, 0.02, once=False))
        try:
            assert await said() == [  # many looks, one line
                f"dnstls-agent: cannot reach the agent: the agent is not running (no {sock}); "
                "looking again every 0.02 s"
            ]
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.bind(str(sock))  # there, but nobody listens: another state, another line
                (line,) = await said()
                assert f"the agent is not running ({sock} refuses)" in line
            sock.unlink()
            server = ControlServer(sock, handler)
            await server.start()
            warnings.append({"alert": "downgrade", "text": "eth0: TLS no more"})
            assert await said() == [
                f"dnstls-agent: the agent answers again on {sock}",
                "downgrade: eth0: TLS no more",
            ]
            await server.close()  # gone again: said once more
            (line,) = await said()
            assert line.startswith("dnstls-agent: cannot reach the agent: ")
        finally:
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay

    run(go())


def test_notifications_once_says_it_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    sock = tmp_path / "absent.sock"
    assert main(["notifications", "--once", "--socket", str(sock)]) == EXIT_OK
    err = capsys.readouterr().err
    assert err == f"dnstls-agent: cannot reach the agent: the agent is not running (no {sock})\n"


def test_the_socket_group_may_read_statistics() -> None:
    assert "statistics" in control.OPEN_COMMANDS
    assert "statistics-reset" in control.ADMIN_COMMANDS
