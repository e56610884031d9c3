"""agent/sysconf/privacy.py: the resolv.conf backend refused where another program writes
the file (strict, encrypted), and what ExecStopPost does at a restart; the decisions pure,
the detection on a root prefix with stand-in programs and buses (never /etc)."""

from __future__ import annotations

import functools
import json
import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent import cli, config, sysconf
from agent.config import Config, ConfigError
from agent.sysconf import networkmanager as nmb
from agent.sysconf import privacy, resolvconf
from agent.sysconf import resolved as resolvedb
from agent.sysconf.privacy import AtStop, Fit, StopFacts, StubRefused
from agent.sysconf.resolvconf_file import ResolvConfFile
from tests.unit.test_sysconf_networkmanager import FakeNM
from tests.unit.test_sysconf_resolvconf import fake_program

TUNNEL = ["127.0.0.153"]
DHCP = "search lab.test\nnameserver 198.51.100.1\n"
BUS = "unix:path=/nonexistent/test-bus"
STRICT = 'profile = "strict"\n'
STOP_JOB = "1 dnstls-agent.service stop running\n"


# -- the decisions ---------------------------------------------------------------------------
@pytest.mark.parametrize("profile", ["strict", "encrypted"])
@pytest.mark.parametrize(
    ("writer", "who"),
    [
        ("networkmanager", "NetworkManager"),
        ("resolvconf", "resolvconf"),
        ("resolved", "systemd-resolved"),
    ],
)
def test_the_plain_file_is_refused_where_another_program_writes_it(
    writer: str, who: str, profile: str
) -> None:
    fit = privacy.plain_file(writer, {"opportunistic", profile})
    assert fit.fit is Fit.REFUSED
    assert fit.reason.startswith(
        f'{who} manages /etc/resolv.conf: use stub_backend = "{writer}" (or "auto")'
    )
    assert profile in fit.reason


def test_the_plain_file_under_opportunistic_leaks_and_says_so() -> None:
    fit = privacy.plain_file("networkmanager", {"opportunistic", "off"})
    assert fit.fit is Fit.LEAKY
    assert "cleartext" in fit.reason and 'use stub_backend = "networkmanager"' in fit.reason


def test_the_plain_file_where_nothing_else_writes_it() -> None:
    assert privacy.plain_file(None, {"strict"}).fit is Fit.OK


SIGKILL = StopFacts("signal", "killed", "KILL")


@pytest.mark.parametrize(
    ("profiles", "facts", "keep", "why"),
    [
        # strict or encrypted: a stop that systemd follows with a start keeps the stub
        ({"strict"}, SIGKILL, True, "ended by signal (killed/KILL)"),
        ({"encrypted"}, StopFacts("watchdog", "killed", "ABRT"), True, "ended by watchdog"),
        ({"strict"}, StopFacts("core-dump", "dumped", "SEGV"), True, "Restart=always"),
        ({"strict"}, StopFacts("exit-code", "exited", "3"), True, "ended by exit-code"),
        ({"strict"}, StopFacts("success", "exited", "0", "restart"), True, "a restart job"),
        ({"strict"}, StopFacts("success", "killed", "TERM", "start"), True, "a start job"),
        ({"opportunistic", "strict"}, SIGKILL, True, "Restart=always"),  # an interface's
        # ... and one it does not follow with a start restores
        ({"strict"}, StopFacts("success", "exited", "0", "stop"), False, "a stop job"),
        ({"strict"}, StopFacts("timeout", "killed", "KILL", "stop"), False, "a stop job"),
        ({"strict"}, StopFacts("success", "exited", "0"), False, "a clean stop"),
        ({"strict"}, StopFacts("exit-code", "exited", "2"), False, "status 2"),
        ({"strict"}, StopFacts("start-limit-hit"), False, "will not start it again"),
        ({"strict"}, StopFacts(), False, "$SERVICE_RESULT unset"),
        # opportunistic (or off): the network's resolvers may answer meanwhile
        ({"opportunistic"}, SIGKILL, False, "no strict or encrypted"),
        ({"opportunistic", "off"}, StopFacts("success", job="restart"), False, "no strict"),
    ],
)
def test_at_stop(profiles: set[str], facts: StopFacts, keep: bool, why: str) -> None:
    decision = privacy.at_stop(profiles, facts)
    assert decision.keep is keep
    assert why in decision.reason


# -- gathering the facts ---------------------------------------------------------------------
LIST_JOBS = "1021 dnstls-agent-stub.path stop waiting\n1020 dnstls-agent.service restart running\n"


def test_the_units_job_from_systemctl() -> None:
    asked: list[Sequence[str]] = []

    def run(args: Sequence[str]) -> str:
        asked.append(args)
        return LIST_JOBS

    assert privacy.unit_job("dnstls-agent.service", run) == "restart"
    assert asked == [["list-jobs", "--plain", "--no-legend", "--no-pager", "dnstls-agent.service"]]
    assert privacy.unit_job("other.service", run) is None
    assert privacy.unit_job("dnstls-agent.service", lambda _: "") is None


def test_systemctl_failing_is_no_job(caplog: pytest.LogCaptureFixture) -> None:
    def run(args: Sequence[str]) -> str:
        raise subprocess.TimeoutExpired("systemctl", 5)

    assert privacy.unit_job("dnstls-agent.service", run) is None
    assert "cannot tell whether dnstls-agent.service is restarting" in caplog.text


def test_stop_facts_from_execstoppost() -> None:
    env = {"SERVICE_RESULT": "signal", "EXIT_CODE": "killed", "EXIT_STATUS": "KILL"}
    assert privacy.stop_facts(env, run=lambda _: LIST_JOBS) == StopFacts(
        "signal", "killed", "KILL", "restart"
    )

    def never(args: Sequence[str]) -> str:
        raise AssertionError("systemctl asked outside ExecStopPost")

    assert privacy.stop_facts({}, run=never) == StopFacts()


# -- the check where root points the stub, on a root prefix --------------------------------------
@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A machine with no other writer: no resolvconf, NetworkManager or resolved."""
    (tmp_path / "root" / "etc").mkdir(parents=True)
    (tmp_path / "root" / "etc" / "resolv.conf").write_text(DHCP)
    monkeypatch.setattr(resolvconf, "find_program", lambda: None)
    monkeypatch.setattr(nmb, "DBusNM", FakeNM(tmp_path, running=False).connect)
    monkeypatch.setattr(resolvedb, "DBusResolved", lambda bus: OffBus())
    return tmp_path / "root"


class OffBus:
    def on_bus(self) -> bool:
        return False


class OnBus(OffBus):
    def on_bus(self) -> bool:
        return True


def resolvconf_world(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prog = fake_program(tmp_path, "Debian resolvconf 1.91+nmu1")
    monkeypatch.setattr(resolvconf, "find_program", lambda: prog)
    (root / "run/resolvconf").mkdir(parents=True)
    (root / "run/resolvconf/resolv.conf").write_text(DHCP)
    (root / "etc/resolv.conf").unlink()
    (root / "etc/resolv.conf").symlink_to("../run/resolvconf/resolv.conf")


def nm_world(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nmb, "DBusNM", FakeNM(root).connect)


def resolved_world(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resolvedb, "DBusResolved", lambda bus: OnBus())
    (root / "etc/resolv.conf").unlink()
    (root / "etc/resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")


WORLDS = {"resolvconf": resolvconf_world, "networkmanager": nm_world, "resolved": resolved_world}


def test_nothing_else_writes_the_file(root: Path) -> None:
    assert sysconf.other_writer(root, BUS) is None
    sysconf.check_backend(ResolvConfFile(root), {"strict"}, root, BUS)  # no error


@pytest.mark.parametrize("writer", sorted(WORLDS))
def test_each_backends_world_is_found(
    writer: str, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    WORLDS[writer](root, tmp_path, monkeypatch)
    assert sysconf.other_writer(root, BUS) == writer


@pytest.mark.parametrize("profile", ["strict", "encrypted"])
def test_strict_refuses_the_plain_file_where_networkmanager_writes_it(
    profile: str, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nm_world(root, tmp_path, monkeypatch)
    with pytest.raises(StubRefused) as exc:
        sysconf.check_backend(ResolvConfFile(root), {"opportunistic", profile}, root, BUS)
    assert str(exc.value).startswith(
        'NetworkManager manages /etc/resolv.conf: use stub_backend = "networkmanager" (or "auto")'
    )


def test_opportunistic_goes_on_and_warns(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    resolvconf_world(root, tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING):
        sysconf.check_backend(ResolvConfFile(root), {"opportunistic"}, root, BUS)
    assert "DHCP renewals may leak: resolvconf manages /etc/resolv.conf" in caplog.text


def test_another_backend_is_not_checked(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: object) -> str | None:
        raise AssertionError("detection ran for another backend")

    monkeypatch.setattr(sysconf, "other_writer", never)
    sysconf.check_backend(sysconf.backends(root, BUS)["networkmanager"], {"strict"}, root, BUS)


# -- the command -------------------------------------------------------------------------------
def agent_toml(tmp_path: Path, body: str) -> Path:
    (tmp_path / "state").mkdir(exist_ok=True)
    path = tmp_path / "agent.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        f'stub_state_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n{body}'
    )
    return path


def test_stub_refuses_and_changes_nothing(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An interface's strict profile is enough; status 2 (a configuration that needs a
    person); the file and the journal untouched."""
    nm_world(root, tmp_path, monkeypatch)
    monkeypatch.setattr(sysconf, "choose", lambda name, nm_bus=None: ResolvConfFile(root))
    found = sysconf.other_writer
    monkeypatch.setattr(sysconf, "other_writer", lambda _root, _bus: found(root, BUS))
    conf = agent_toml(
        tmp_path,
        'stub_backend = "resolv.conf"\n[[interface]]\nmatch_name = "wlp*"\nprofile = "strict"\n',
    )
    assert cli.main(["-c", str(conf), "stub"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert 'NetworkManager manages /etc/resolv.conf: use stub_backend = "networkmanager"' in err
    assert (root / "etc/resolv.conf").read_text() == DHCP
    assert not (tmp_path / "state" / "stub.json").exists()


def journal_of_a_pointed_stub(state: Path) -> Path:
    """A journal no backend can revert: were the command to restore, it would fail, not
    touch this machine's /etc/resolv.conf."""
    path = state / "stub.json"
    path.write_text(json.dumps({"version": 1, "backend": "none-such", "entries": []}))
    return path


@pytest.mark.parametrize("profile", ["strict", "encrypted"])
def test_restore_unless_restarting_keeps_the_stub_through_a_crash(
    profile: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    conf = agent_toml(tmp_path, f'profile = "{profile}"\n')
    journal = journal_of_a_pointed_stub(tmp_path / "state")
    before = journal.read_text()
    monkeypatch.setattr(privacy, "_systemctl", lambda args: "")
    monkeypatch.setenv("SERVICE_RESULT", "watchdog")
    monkeypatch.setenv("EXIT_CODE", "killed")
    monkeypatch.setenv("EXIT_STATUS", "ABRT")
    assert cli.main(["-c", str(conf), "restore", "--unless-restarting"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "left pointed at the tunnel: ended by watchdog (killed/ABRT)" in out
    assert journal.read_text() == before


def test_restore_unless_restarting_keeps_the_stub_through_systemctl_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = agent_toml(tmp_path, STRICT)
    journal_of_a_pointed_stub(tmp_path / "state")
    monkeypatch.setattr(privacy, "_systemctl", lambda args: LIST_JOBS)
    monkeypatch.setenv("SERVICE_RESULT", "success")
    assert cli.main(["-c", str(conf), "restore", "--unless-restarting"]) == cli.EXIT_OK
    assert "left pointed at the tunnel: a restart job" in capsys.readouterr().out


def broken(path: Path | None) -> Config:
    raise ConfigError([])


@pytest.mark.parametrize(
    ("body", "env", "jobs", "why"),
    [
        (STRICT, {"SERVICE_RESULT": "success"}, STOP_JOB, "stopped by a stop job"),
        (STRICT, {}, "", "not run by systemd's ExecStopPost"),
        ("", {"SERVICE_RESULT": "signal"}, "", "no strict or encrypted profile"),
        ("broken", {"SERVICE_RESULT": "signal"}, "", "no strict or encrypted"),
    ],
    ids=["stop-job", "by-hand", "opportunistic", "broken-config"],
)
def test_restore_unless_restarting_restores_at_a_final_stop(
    body: str,
    env: dict[str, str],
    jobs: str,
    why: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A stop job, a run by hand, opportunistic, and a configuration that cannot be read
    (the daemon refuses it: not restarted) restore."""
    conf = agent_toml(tmp_path, body)
    monkeypatch.setattr(privacy, "_systemctl", lambda args: jobs)
    monkeypatch.delenv("SERVICE_RESULT", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if body == "broken":  # read as the defaults: the daemon will refuse it, not restart
        monkeypatch.setattr(config, "load", broken)
        monkeypatch.setattr(
            config,
            "Config",
            functools.partial(
                Config,
                state_dir=str(tmp_path / "state"),
                stub_state_dir=str(tmp_path / "state"),
            ),
        )
    assert cli.main(["-c", str(conf), "restore", "--unless-restarting"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert f"restoring the system stub: {why}" in out
    assert "nothing to restore" in out


def test_restore_without_the_option_always_restores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = agent_toml(tmp_path, STRICT)
    monkeypatch.setenv("SERVICE_RESULT", "signal")
    monkeypatch.setattr(privacy, "at_stop", lambda *a: AtStop(True, "asked"))
    assert cli.main(["-c", str(conf), "restore"]) == cli.EXIT_OK
    assert capsys.readouterr().out.strip() == "nothing to restore: the system stub was not changed"
