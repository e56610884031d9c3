"""`dnstls-agent run` under systemd's journal: each record one entry with its priority, the
alerts with their MESSAGE_ID and fields, decisions shown at info by default, the log-level
command, SIGUSR1's statistics at info, a multi-line error one entry.

Twice: against a fake journal (a datagram socket of the test's, tests/lab/journal.py), and
against the distribution's own systemd-journald, run as a private instance (no journald runs
on a CI machine or in a container), read back with `journalctl -o json`. stderr is the
journal's stream as systemd would make it (JOURNAL_STREAM names it), so the daemon chooses the
journal by itself; DNSTLS_AGENT_JOURNAL_SOCKET points it at the instance's socket.

The world is test_static_only's, smaller: a namespace with lo only, strict, one static
resolver on 127.0.0.9 where nothing listens: no private DNS, the alert raised.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent import control, logsetup
from agent.messageids import ALERT_RAISED
from agent.policy import Alert
from tests.conftest import missing, require_program, require_root
from tests.lab.journal import FakeJournal, Journald
from tests.lab.netns import REPO, Netns, new_tag
from tests.lab.proc import Missing

pytestmark = pytest.mark.system

NOWHERE = "127.0.0.9"  # inside the namespace: nothing listens, every probe is refused
# the command as systemd runs it: the CLI's main sets the logging up (logsetup.setup)
AGENT = [sys.executable, "-m", "agent"]

Entry = dict[str, Any]


@dataclass
class World:
    ns: Netns
    dir: Path
    config: Path
    daemon: subprocess.Popen[bytes]
    stderr: Path | None  # the fake's stderr file (journald's is its stream)
    wait_for: Callable[[Callable[[Entry], bool], float], Entry | None]
    entries: Callable[[], list[Entry]]

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        return control.ask(self.dir / "run" / control.SOCKET_NAME, request)

    def expect(self, what: str, match: Callable[[Entry], bool], timeout: float = 15) -> Entry:
        found = self.wait_for(match, timeout)
        if found is None:
            seen = [(e.get("PRIORITY"), e.get("MESSAGE")) for e in self.entries()]
            pytest.fail(f"no journal entry {what} in {timeout}s; entries: {seen}")
        return found


def _config(tmp_path: Path, extra: str = "") -> str:
    return f"""
state_dir = "{tmp_path}/state"
stub_state_dir = "{tmp_path}/state"
runtime_dir = "{tmp_path}/run"
listen = ["127.0.0.153:53"]
manage_stub = false  # root in a network namespace only: /etc is the host's
nm_bus = "unix:path={tmp_path}/no-bus"
netlink = false
lease_dirs = []
profile = "strict"
static_resolvers = ["{NOWHERE}"]
{extra}"""


def _start(ns: Netns, config: Path, stderr: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    argv = ns.argv([*AGENT, "-c", str(config), "run"])  # no -v: the default level
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=env,
        start_new_session=True, cwd=REPO,
    )  # fmt: skip


def _stop(daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is None:
        daemon.terminate()
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(5)


@pytest.fixture(params=["fake", "journald"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    require_root()
    require_program("ip")
    journald: Journald | None = None
    fake: FakeJournal | None = None
    if request.param == "journald":
        for program in ("journalctl", "unshare", "mount"):
            require_program(program)
        try:
            journald = Journald(tmp_path)
        except Missing as exc:
            missing(str(exc))
    ns = Netns(f"dta-jr-{new_tag()}")
    daemon: subprocess.Popen[bytes] | None = None
    try:
        config = tmp_path / "agent.toml"
        config.write_text(_config(tmp_path))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("NOTIFY_SOCKET", None)
        stderr_file: Path | None = None
        if journald is not None:
            stream = journald.stream("dnstls-agent")
            st = os.fstat(stream.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            env[logsetup.SOCKET_ENV] = str(journald.socket)
            with stream:
                daemon = _start(ns, config, stream.fileno(), env)
            pid, jd = daemon.pid, journald
            world = World(
                ns, tmp_path, config, daemon, None,
                lambda match, timeout: jd.wait_for(match, timeout, f"_PID={pid}"),
                lambda: jd.entries(f"_PID={pid}"),
            )  # fmt: skip
        else:
            fake = FakeJournal(tmp_path / "journal.sock")
            stderr_file = tmp_path / "stderr"
            with stderr_file.open("wb") as f:
                st = os.fstat(f.fileno())
                env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
                env[logsetup.SOCKET_ENV] = str(fake.path)
                daemon = _start(ns, config, f.fileno(), env)
            world = World(ns, tmp_path, config, daemon, stderr_file, fake.wait_for, fake.drain)
        yield world
    finally:
        if daemon is not None:
            _stop(daemon)
        ns.delete()
        if fake is not None:
            fake.close()
        if journald is not None:
            journald.stop()


def test_the_daemon_logs_to_the_journal(world: World) -> None:
    w = world
    native = (lambda e: e.get("_TRANSPORT") == "journal") if w.stderr is None else (lambda e: True)

    # the alert: a warning, its id, where it applies
    alert = w.expect(
        "for the alert", lambda e: e.get("MESSAGE_ID") == ALERT_RAISED[Alert.NO_PRIVATE_DNS]
    )
    assert native(alert), alert
    assert alert["PRIORITY"] == "4"
    assert (alert["INTERFACE"], alert["PROFILE"], alert["ALERT"]) == (
        "static", "strict", "no-private-dns"
    )  # fmt: skip
    assert alert["SYSLOG_IDENTIFIER"] == "dnstls-agent" and alert["LOGGER"] == "agent.engine"
    assert alert["MESSAGE"].startswith("no-private-dns: ")

    # decisions at info by default (no -v, log_level not set): the probe's result, the order
    probed = w.expect(
        "for the probe result", lambda e: e.get("MESSAGE", "").startswith(f"{NOWHERE} on static:")
    )
    assert probed["PRIORITY"] == "6" and "unreachable" in probed["MESSAGE"], probed
    order = w.expect("for the order", lambda e: e.get("MESSAGE", "").startswith("order ("))
    assert order["PRIORITY"] == "6"
    assert not [e for e in w.entries() if e.get("PRIORITY") == "7"], "debug shown by default"

    # log-level at run time: debug shows, e.g. the engine's re-planning
    sock = str(w.dir / "run" / control.SOCKET_NAME)
    cli = subprocess.run(  # the command, as an admin types it
        [*AGENT, "log-level", "debug", "--socket", sock], capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    assert (cli.returncode, cli.stdout) == (0, "log level info -> debug\n"), cli.stderr
    told = w.expect(
        "for the change of level", lambda e: e.get("MESSAGE", "").startswith("log level info")
    )
    assert (told["MESSAGE"], told["PRIORITY"]) == (
        "log level info -> debug, asked by log-level",
        "6",
    )
    w.ask({"command": "reprobe"})
    replan = w.expect("at debug", lambda e: e.get("MESSAGE") == "re-planning: re-probe asked for")
    assert replan["PRIORITY"] == "7"
    with pytest.raises(control.RequestRefused, match="log level must be one of"):
        w.ask({"command": "log-level", "level": "loud"})

    # SIGUSR1: the statistics, at info
    w.daemon.send_signal(signal.SIGUSR1)
    stats = w.expect("for the statistics", lambda e: e.get("MESSAGE", "").startswith("status: "))
    assert stats["PRIORITY"] == "6"
    assert json.loads(stats["MESSAGE"].removeprefix("status: "))["profile"] == "strict"

    # a multi-line error stays one entry: a reload refused, every problem on its own line
    w.config.write_text(_config(w.dir, 'log_level = "loud"\ncache_size = 0\n'))
    w.daemon.send_signal(signal.SIGHUP)
    refused = w.expect(
        "for the refused reload",
        lambda e: e.get("MESSAGE", "").startswith("configuration not reloaded"),
    )
    assert native(refused), refused
    assert refused["PRIORITY"] == "3"
    lines = refused["MESSAGE"].split("\n")
    assert lines[0] == "configuration not reloaded, keeping the old one:", lines
    assert [ln.split(": ")[1] for ln in lines[1:]] == ["log_level", "cache_size"], lines

    # a reload applies log_level (the run-time level ends), told before it goes quiet
    w.config.write_text(_config(w.dir, 'log_level = "warning"\n'))
    w.daemon.send_signal(signal.SIGHUP)
    w.expect(
        "for the reload's level",
        lambda e: e.get("MESSAGE") == "log level debug -> warning, from log_level",
    )
    w.daemon.terminate()
    assert w.daemon.wait(10) == 0
    time.sleep(0.2)
    if w.stderr is not None:  # everything went to the journal's socket, nothing to stderr
        assert w.stderr.read_text() == ""
    else:  # nothing came through the stream (a traceback split into lines would)
        stray = [e["MESSAGE"] for e in w.entries() if e.get("_TRANSPORT") != "journal"]
        assert not stray, stray
