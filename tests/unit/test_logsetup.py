"""agent/logsetup.py and agent/messageids.py: the journal's native protocol, priorities, `<N>`
lines, the level (configuration, -v, run time), and the fields alerts carry.

The datagrams are read back with tests/lab/journal.py's decoder, written from systemd's
description of the protocol rather than from the encoder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO, cast

import pytest

from agent import config, daemon, logsetup, messageids, sdnotify
from agent import engine as engine_mod
from agent.engine import Engine
from agent.errors import UsageError
from agent.model import Method, Profile
from agent.policy import Alert, Warning
from agent.watchers.nm import NMSnapshot
from tests.conftest import run
from tests.lab.journal import FakeJournal, decode
from tests.unit.test_engine import A, FakeProber, cfg, eth0, settle, started, stopped

LOG = logging.getLogger("agent.test_logsetup")


@pytest.fixture(autouse=True)
def root_logger() -> Iterator[None]:
    """setup() changes the process's root logger: put it back as it was."""
    root = logging.getLogger()
    level, handlers, hook, floor = root.level, list(root.handlers), sys.excepthook, logsetup._floor
    yield
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
        h.close()
    root.setLevel(level)
    sys.excepthook, logsetup._floor = hook, floor


def stream_of(path: Path) -> tuple[TextIO, dict[str, str]]:
    """A file to be stderr, and the environment that names it the journal's stream."""
    f = path.open("w+", encoding="utf-8")
    st = os.fstat(f.fileno())
    return f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[FakeJournal]:
    j = FakeJournal(tmp_path / "journal.sock")
    yield j
    j.close()


# -- the protocol -------------------------------------------------------------------------------


def test_encoding_plain_and_binary_safe_fields() -> None:
    text = "configuration not reloaded:\n/etc/x.toml:3: listen: bad"
    data = logsetup.encode([("MESSAGE", text), ("PRIORITY", "3"), ("EMPTY", "")])
    # the multi-line value: NAME \n, 64-bit little-endian length, the bytes, \n
    raw = text.encode()
    assert data == (
        b"MESSAGE\n" + struct.pack("<Q", len(raw)) + raw + b"\n" + b"PRIORITY=3\n" + b"EMPTY=\n"
    )
    assert decode(data) == {"MESSAGE": text, "PRIORITY": "3", "EMPTY": ""}
    # not text only: a length counts bytes, and anything may follow a length
    odd = "caf\u00e9 =\n\x00\n=="
    assert decode(logsetup.encode([("X", odd), ("Y", b"a\nb")])) == {"X": odd, "Y": "a\nb"}


@pytest.mark.parametrize("name", ["message", "_PID", "1ST", "A-B", "", "X" * 65, "\u00c9T\u00c9"])
def test_field_names_journald_would_refuse_are_refused(name: str) -> None:
    assert not logsetup.valid_field(name)
    with pytest.raises(ValueError, match="journal field"):
        logsetup.encode([(name, "x")])


def test_field_names_journald_accepts() -> None:
    for name in ("MESSAGE_ID", "INTERFACE", "A", "X" * 64, "CODE_LINE2"):
        assert logsetup.valid_field(name), name


@pytest.mark.parametrize(
    ("level", "prio"),
    [
        (logging.DEBUG, 7),
        (logging.INFO, 6),
        (logging.WARNING, 4),
        (logging.ERROR, 3),
        (logging.CRITICAL, 2),
        (5, 7),  # below debug
        (25, 6),  # between info and warning: as info
        (45, 3),
        (60, 2),
    ],
)
def test_priority_mapping(level: int, prio: int) -> None:
    assert logsetup.priority(level) == prio


# -- which handler ------------------------------------------------------------------------------


def test_under_journal_only_when_stderr_is_the_named_stream(tmp_path: Path) -> None:
    f, env = stream_of(tmp_path / "err")
    other, _ = stream_of(tmp_path / "other")
    with f, other:
        assert logsetup.under_journal(f, env)
        assert not logsetup.under_journal(other, env)  # inherited, stderr elsewhere
        assert not logsetup.under_journal(f, {})
        assert not logsetup.under_journal(f, {"JOURNAL_STREAM": "x:y"})
        dev, ino = env["JOURNAL_STREAM"].split(":")
        assert not logsetup.under_journal(f, {"JOURNAL_STREAM": f"{dev}:{int(ino) + 1}"})


def test_without_systemd_plain_lines_and_no_fields(tmp_path: Path) -> None:
    f, _ = stream_of(tmp_path / "err")
    with f:
        logsetup.setup(0, stream=f, environ={})
        LOG.warning("no-private-dns: eth0", extra=logsetup.fields("ab" * 16, INTERFACE="eth0"))
        LOG.info("not shown: the default for commands is warning")
        f.flush()
        assert f.name and Path(f.name).read_text() == (
            "WARNING agent.test_logsetup: no-private-dns: eth0\n"
        )


def test_under_systemd_native_entries_with_fields(tmp_path: Path, journal: FakeJournal) -> None:
    f, env = stream_of(tmp_path / "err")
    mid = messageids.ALERT_RAISED[Alert.NO_PRIVATE_DNS]
    with f:
        handler = logsetup.setup(
            0, level="info", stream=f, environ={**env, logsetup.SOCKET_ENV: str(journal.path)}
        )
        assert isinstance(handler, logsetup.JournalHandler)
        extra = logsetup.fields(
            mid, INTERFACE="eth0", RESOLVER=None, PROFILE="strict", MESSAGE="not mine", _PID="1"
        )
        LOG.warning("no-private-dns: %s", "eth0", extra=extra)
        LOG.info("order (strict): none")
        LOG.debug("not shown at info")
        f.flush()
        assert Path(f.name).read_text() == ""  # nothing on stderr: all in the journal
    warning, info = journal.drain()
    assert warning["MESSAGE"] == "no-private-dns: eth0"  # the field cannot replace it
    assert (warning["PRIORITY"], warning["MESSAGE_ID"]) == ("4", mid)
    assert (warning["INTERFACE"], warning["PROFILE"]) == ("eth0", "strict")
    assert "RESOLVER" not in warning and "_PID" not in warning  # None, and a trusted name
    assert warning["SYSLOG_IDENTIFIER"] == "dnstls-agent"
    assert warning["LOGGER"] == "agent.test_logsetup"
    assert warning["CODE_FILE"] == __file__ and warning["CODE_FUNC"].startswith("test_under")
    assert (info["MESSAGE"], info["PRIORITY"]) == ("order (strict): none", "6")
    assert "MESSAGE_ID" not in info and "INTERFACE" not in info


def test_a_traceback_stays_one_entry(tmp_path: Path, journal: FakeJournal) -> None:
    f, env = stream_of(tmp_path / "err")
    with f:
        logsetup.setup(0, stream=f, environ={**env, logsetup.SOCKET_ENV: str(journal.path)})
        try:
            raise ValueError("line one\nline two")
        except ValueError:
            LOG.exception("the engine stopped")
    (entry,) = journal.drain()
    assert entry["PRIORITY"] == "3"
    lines = entry["MESSAGE"].split("\n")
    assert lines[0] == "the engine stopped" and lines[1] == "Traceback (most recent call last):"
    assert lines[-2:] == ["ValueError: line one", "line two"]


def test_too_big_for_a_datagram_goes_as_a_sealed_memfd(
    tmp_path: Path, journal: FakeJournal
) -> None:
    f, env = stream_of(tmp_path / "err")
    status = json.dumps({"upstreams": ["x" * 100] * 4000})  # ~400 kB: above any SO_SNDBUF
    with f:
        logsetup.setup(
            0, level="info", stream=f, environ={**env, logsetup.SOCKET_ENV: str(journal.path)}
        )
        LOG.info("status: %s", status)
        f.flush()
        assert Path(f.name).read_text() == ""
    (entry,) = journal.drain()
    assert entry["MESSAGE"] == f"status: {status}"
    assert journal.sealed == 1


def test_socket_refuses_then_one_prefixed_line(tmp_path: Path) -> None:
    """journald away (restarting, or a sandbox): the record still reaches the journal, through
    stderr, as one `<N>` line, its newlines escaped."""
    f, env = stream_of(tmp_path / "err")
    with f:
        logsetup.setup(
            0, stream=f, environ={**env, logsetup.SOCKET_ENV: str(tmp_path / "nobody-here")}
        )
        LOG.error("configuration not reloaded, keeping the old one:\n%s", "/etc/a.toml:2: x")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            LOG.critical("stopping", exc_info=True)
        f.flush()
        lines = Path(f.name).read_text().split("\n")
    assert lines[-1] == ""  # ends in a newline: each record one line
    first, second = lines[:-1]
    assert first == (
        "<3>agent.test_logsetup: configuration not reloaded, keeping the old one:\\n"
        "/etc/a.toml:2: x"
    )
    assert second.startswith("<2>agent.test_logsetup: stopping\\nTraceback (most recent call")
    assert second.endswith("RuntimeError: boom")


def test_prefix_formatter_alone() -> None:
    record = logging.LogRecord("agent.x", logging.WARNING, __file__, 1, "a\nb\n\nc", None, None)
    assert logsetup.PrefixFormatter().format(record) == "<4>agent.x: a\\nb\\n\\nc"


def test_uncaught_exception_under_journal_is_one_entry(
    tmp_path: Path, journal: FakeJournal
) -> None:
    f, env = stream_of(tmp_path / "err")
    with f:
        logsetup.setup(0, stream=f, environ={**env, logsetup.SOCKET_ENV: str(journal.path)})
        try:
            raise OSError("no such thing")
        except OSError as exc:
            sys.excepthook(type(exc), exc, exc.__traceback__)
    (entry,) = journal.drain()
    assert entry["PRIORITY"] == "2"
    assert entry["MESSAGE"].startswith("uncaught exception\nTraceback")
    assert entry["MESSAGE"].endswith("OSError: no such thing")


def test_setup_again_replaces_its_own_handler_only(tmp_path: Path) -> None:
    f, _ = stream_of(tmp_path / "err")
    root = logging.getLogger()
    before = list(root.handlers)
    with f:
        first = logsetup.setup(0, stream=f, environ={})
        second = logsetup.setup(1, stream=f, environ={})
        assert first not in root.handlers and second in root.handlers
        assert [h for h in root.handlers if h is not second] == before


# -- the level ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verbosity", "configured", "effective"),
    [
        (0, "info", "info"),
        (0, "warning", "warning"),
        (0, "debug", "debug"),
        (1, "warning", "info"),  # -v shows at least info
        (1, "error", "info"),
        (1, "debug", "debug"),  # and never less than configured
        (2, "warning", "debug"),
        (5, "error", "debug"),
    ],
)
def test_configured_level_and_verbosity(
    tmp_path: Path, verbosity: int, configured: str, effective: str
) -> None:
    f, _ = stream_of(tmp_path / "err")
    with f:
        logsetup.setup(verbosity, stream=f, environ={})
        assert logsetup.configure(configured) == effective
        assert logging.getLogger().level == logsetup.LEVELS[effective]


def test_commands_default_to_warning_and_setup_takes_a_level(tmp_path: Path) -> None:
    f, _ = stream_of(tmp_path / "err")
    with f:
        logsetup.setup(0, stream=f, environ={})
        assert logging.getLogger().level == logging.WARNING
        logsetup.setup(0, level="debug", stream=f, environ={})
        assert logging.getLogger().level == logging.DEBUG


def test_a_change_is_told_while_the_louder_level_is_in_force(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logsetup._floor = None
    logging.getLogger().setLevel(logging.WARNING)
    assert logsetup.set_level("debug") == ("warning", "debug")  # told after the change
    assert logsetup.configure("error", announce=True) == "error"  # told before it
    assert logsetup.set_level("warning") == ("error", "warning")  # neither shows info
    assert logsetup.configure("warning", announce=True) == "warning"  # no change
    logsetup.set_level("info")
    assert logsetup.configure("debug") == "debug"  # at start: not news
    told = [r.getMessage() for r in caplog.records if r.name == "agent.logsetup"]
    assert told == [
        "log level warning -> debug, asked by log-level",
        "log level debug -> error, from log_level",
        "log level warning -> info, asked by log-level",
    ]


def test_set_level_at_run_time_is_exact_and_checked() -> None:
    logsetup._floor = logging.DEBUG  # -vv: a run-time level still wins until the next reload
    logging.getLogger().setLevel(logging.INFO)
    assert logsetup.set_level("warning") == ("info", "warning")
    assert logging.getLogger().level == logging.WARNING
    for bad in ("verbose", "WARNING", "", "10"):
        with pytest.raises(UsageError, match="debug, info, warning, error"):
            logsetup.set_level(bad)
    assert logging.getLogger().level == logging.WARNING
    assert logsetup.level_name(logging.NOTSET) == "debug"
    assert logsetup.level_name(logging.CRITICAL) == "error"


# -- the option, the daemon, the control command ---------------------------------------------


def test_log_level_option() -> None:
    assert config.Config().log_level == "info"
    opt = config.BY_KEY["log_level"]
    assert opt.scope is config.Scope.GLOBAL and opt.default == "info"
    assert opt.check is not None
    assert all(opt.check(name) is None for name in logsetup.LEVELS)
    assert opt.check("verbose") is not None


def test_log_level_option_in_a_file(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text('log_level = "debug"\n')
    assert config.load(p).log_level == "debug"
    p.write_text('\nlog_level = "loud"\n')
    with pytest.raises(config.ConfigError, match=r"agent.toml:2: log_level: must be one of"):
        config.load(p)
    p.write_text('[[interface]]\nmatch_name = "eth0"\nlog_level = "debug"\n')
    with pytest.raises(config.ConfigError, match="global option"):
        config.load(p)


class _StubEngine:
    def __init__(self) -> None:
        self.reloaded = 0

    def status(self) -> dict[str, Any]:
        return {"order": ["tls-port:198.51.100.1@853"]}

    def reload(self, cfg: config.Config) -> None:
        self.reloaded += 1


def _daemon(tmp_path: Path, text: str) -> tuple[daemon.Daemon, Path]:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    d = daemon.Daemon(config.load(p), p)
    d.engine = cast(Engine, _StubEngine())
    return d, p


def test_the_log_level_command(tmp_path: Path) -> None:
    d, _ = _daemon(tmp_path, "")
    logging.getLogger().setLevel(logging.INFO)
    answer = d.handle({"command": "log-level", "level": "debug"})
    assert answer == {"ok": True, "old": "info", "new": "debug"}
    assert logging.getLogger().level == logging.DEBUG
    for request in ({"level": "loud"}, {"level": 7}, {}, {"level": "x" * 100}):
        with pytest.raises(UsageError):
            d.handle({"command": "log-level", **request})
    assert logging.getLogger().level == logging.DEBUG


def test_reload_applies_log_level_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sdnotify, "notify", lambda message: True)
    d, p = _daemon(tmp_path, 'log_level = "warning"\n')
    logsetup._floor = None
    d.handle({"command": "log-level", "level": "debug"})
    p.write_text('log_level = "error"\n')
    d.reload()
    assert d.cfg.log_level == "error"
    assert logging.getLogger().level == logging.ERROR  # the run-time level ends at a reload
    assert "log level debug -> error, from log_level" in caplog.text


def test_statistics_are_information_not_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d, _ = _daemon(tmp_path, "")
    caplog.set_level(logging.DEBUG)
    d._log_status()
    (record,) = [r for r in caplog.records if r.getMessage().startswith("status: ")]
    assert record.levelno == logging.INFO
    assert json.loads(record.getMessage().removeprefix("status: ")) == _StubEngine().status()


# -- the alerts' ids, and the fields the engine gives them ---------------------------------------


def test_every_alert_has_its_own_fixed_message_id() -> None:
    ids = dict(messageids.ALERT_RAISED)
    assert set(ids) == set(Alert)
    every = [*ids.values(), messageids.ALERT_CLEARED]
    assert len(set(every)) == len(every)
    for mid in every:
        assert re.fullmatch(r"[0-9a-f]{32}", mid), mid
        assert uuid.UUID(mid).hex == mid


def test_the_engine_gives_alerts_their_fields(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.engine")

    async def go() -> None:
        engine, tunnel, task = await started(
            tmp_path, FakeProber({A: Method.TCP_PLAIN}), cfg("strict")
        )
        try:
            engine.on_nm(NMSnapshot({"eth0": eth0(A)}))
            await settle(engine)
            engine.on_nm(NMSnapshot({}))
            await settle(engine)
        finally:
            await stopped(tunnel, task)

    run(go())
    alerts = [r for r in caplog.records if getattr(r, "message_id", None)]
    raised, cleared = alerts
    assert (raised.levelno, raised.message_id) == (  # type: ignore[attr-defined]
        logging.WARNING,
        messageids.ALERT_RAISED[Alert.NO_PRIVATE_DNS],
    )
    assert raised.journal == {  # type: ignore[attr-defined]
        "ALERT": "no-private-dns",
        "INTERFACE": "eth0",
        "PROFILE": "strict",
    }  # no RESOLVER: the alert is the interface's (its address is None)
    assert (cleared.levelno, cleared.message_id) == (  # type: ignore[attr-defined]
        logging.INFO,
        messageids.ALERT_CLEARED,
    )
    assert cleared.journal["ALERT"] == "no-private-dns"  # type: ignore[attr-defined]
    assert cleared.journal["INTERFACE"] == "eth0"  # type: ignore[attr-defined]


def test_a_resolvers_alert_names_it() -> None:
    w = Warning(Alert.KEY_CHANGED, "wlan0", "203.0.113.9", "another key")
    extra = engine_mod._journal(w, Profile.OPPORTUNISTIC, cleared=False)
    assert extra == {
        "message_id": messageids.ALERT_RAISED[Alert.KEY_CHANGED],
        "journal": {
            "ALERT": "key-changed",
            "INTERFACE": "wlan0",
            "RESOLVER": "203.0.113.9",
            "PROFILE": "opportunistic",
        },
    }
    assert engine_mod._journal(w, None, cleared=True)["message_id"] == messageids.ALERT_CLEARED
