"""agent/config.py: the option table, TOML parsing, matching, and errors with file:line:key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import cli, config
from agent.config import ConfigError, ConfigProfile
from agent.model import Method


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_table_defaults_are_the_dataclass_defaults() -> None:
    assert config.defaults_agree() == []


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    c = config.load(tmp_path / "none.toml")
    assert c.files == () and c.defaults == config.LinkSettings()


def test_full_file(tmp_path: Path) -> None:
    pin = "pOXrpUt9kgPgbWxBFFcBTbRH2heo2wHwXp1fd4AEVXI="
    p = write(
        tmp_path,
        f"""
profile = "encrypted"
listen = ["127.0.0.153:53", "[::1]:5353"]
negative_cache = 600
static_resolvers = ["198.51.100.53#dns.example.net", "upgrade:203.0.113.1"]

[[interface]]
match_name = "wlp*"
profile = "strict"
pins = ["{pin}"]

[[interface]]
match_ssid = ["CoffeeShop"]
profile = "opportunistic"
""",
    )
    c = config.load(p)
    assert c.listen == (("127.0.0.153", 53), ("::1", 5353))
    assert c.defaults.profile is ConfigProfile.ENCRYPTED
    assert c.defaults.negative_cache == 600.0
    assert [s.method for s in c.defaults.static_resolvers] == [Method.TLS_PORT, Method.TLS_UPGRADE]
    wl = c.for_link("wlp2s0")
    assert wl.profile is ConfigProfile.STRICT and wl.pins == {pin}
    assert wl.negative_cache == 600.0  # inherited
    cafe = c.for_link("wlp2s0", ssid="CoffeeShop")  # later sections win
    assert cafe.profile is ConfigProfile.OPPORTUNISTIC and cafe.pins == {pin}
    assert c.for_link("eth0").profile is ConfigProfile.ENCRYPTED


def test_match_by_connection(tmp_path: Path) -> None:
    p = write(tmp_path, '[[interface]]\nmatch_connection = "Home"\nprofile = "off"\n')
    c = config.load(p)
    assert c.for_link("eth0", connection=("Home", "uuid-1")).profile is ConfigProfile.OFF
    assert c.for_link("eth0", connection=("Work",)).profile is ConfigProfile.OPPORTUNISTIC


def test_dropins_override_and_add(tmp_path: Path) -> None:
    p = write(tmp_path, 'profile = "strict"\n')
    (tmp_path / "agent.toml.d").mkdir()
    write(tmp_path / "agent.toml.d", 'profile = "encrypted"\n', "10-site.toml")
    write(
        tmp_path / "agent.toml.d",
        '[[interface]]\nmatch_name = "eth*"\nprofile = "off"\n',
        "20-eth.toml",
    )
    c = config.load(p)
    assert c.defaults.profile is ConfigProfile.ENCRYPTED
    assert c.for_link("eth0").profile is ConfigProfile.OFF
    assert len(c.files) == 3


def test_every_problem_is_reported_with_file_line_and_key(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """# comment
profile = "paranoid"
negative_cache = "long"
listen = ["localhost"]
pins = ["abc"]
prfile = "strict"

[[interface]]
profile = "strict"

[[interface]]
match_name = "eth*"
state_dir = "/tmp"
order = 3
""",
    )
    with pytest.raises(ConfigError) as exc:
        config.load(p)
    got = {(pr.line, pr.key) for pr in exc.value.problems}
    assert got == {
        (2, "profile"),
        (3, "negative_cache"),
        (4, "listen"),
        (5, "pins"),
        (6, "prfile"),
        (8, "interface"),
        (13, "interface.state_dir"),
        (14, "interface.order"),
    }
    text = str(exc.value)
    assert f"{p}:2: profile: must be one of off, opportunistic, encrypted, strict" in text
    assert "did you mean 'profile'?" in text
    assert "is a global option" in text


def test_broken_toml_names_the_line(tmp_path: Path) -> None:
    p = write(tmp_path, 'profile = "strict"\nlisten = [\n')
    with pytest.raises(ConfigError) as exc:
        config.load(p)
    (problem,) = exc.value.problems
    assert (
        problem.file == str(p) and problem.line is not None and "not valid TOML" in problem.message
    )


def test_unreadable_file(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(p)


def test_ca_file_must_be_readable(tmp_path: Path) -> None:
    p = write(tmp_path, f'ca_file = "{tmp_path}/missing.pem"\n')
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(p)
    (tmp_path / "ca.pem").write_text("x")
    ok = write(tmp_path, f'ca_file = "{tmp_path}/ca.pem"\n')
    assert config.load(ok).defaults.ca_file == f"{tmp_path}/ca.pem"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('listen = ["0.0.0.0:53"]', "not a loopback address"),
        ('listen = ["[::]:53"]', "not a loopback address"),
        ('listen = ["198.51.100.1:53"]\nmanage_stub = false', "serve_network = true"),
        ('listen = ["127.0.0.153:5353"]', "cannot name a port"),
    ],
)
def test_combinations_that_cannot_work_are_refused(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text))
    (p,) = err.value.problems
    assert p.key == "listen" and problem in p.message


@pytest.mark.parametrize(
    "text",
    [
        'listen = ["0.0.0.0:53"]\nserve_network = true',  # meant: said so
        'listen = ["127.0.0.153:5353"]\nmanage_stub = false',  # clients pointed by hand
        'listen = ["[::1]:53", "127.0.0.153:5353"]',  # the stub names the first
    ],
)
def test_combinations_that_work(tmp_path: Path, text: str) -> None:
    config.load(write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('state_dir = "/x\\u0000"', "state_dir", "NUL"),
        ('lease_dirs = ["/x\\u0000"]', "lease_dirs", "NUL"),
        ('ca_file = "/etc/hosts\\u0000"', "ca_file", "NUL"),  # os.access raised ValueError
        ('auth_name = "dns\\u0000.example"', "auth_name", "NUL"),
        ('nm_bus = "unix:path=/x\\u0000"', "nm_bus", "NUL"),
        ('static_resolvers = ["198.51.100.1#a\\u0000"]', "static_resolvers", "NUL"),
        ('auth_name = "dns\\n.example"', "auth_name", "control character"),
        ('runtime_dir = "/run/\\u001b[31m"', "runtime_dir", "control character"),
        ('lease_dirs = ["var/lib/dhcp"]', "lease_dirs", "absolute"),
        ('lease_dirs = [""]', "lease_dirs", "absolute"),
        ('state_dir = ""', "state_dir", "absolute"),
        ('listen = ["127.0.0.1:\\u0665\\u0663"]', "listen", "not a port"),
        ('listen = ["127.0.0.1:99999"]', "listen", "not a port"),
        ('static_resolvers = ["198.51.100.1@\\u0665\\u0663"]', "static_resolvers", "ASCII"),
        ("auth_name = '" + "a" * 5000 + "'", "auth_name", "characters at most"),
        (
            '[[interface]]\nmatch_ssid = "x"\nmatch_name = "eth\\u0000"',
            "interface.match_name",
            "NUL",
        ),
        (
            '[[interface]]\nmatch_name = "x"\nmatch_ssid = "Caf\\u0000"',
            "interface.match_ssid",
            "NUL",
        ),
    ],
)
def test_strings_with_what_makes_no_sense_are_refused(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    p = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as err:
        config.load(p)
    (pr,) = err.value.problems
    assert (pr.line, pr.key) == (text.count("\n") + 1, key) and problem in pr.message, pr


def test_text_that_makes_sense_is_kept(tmp_path: Path) -> None:
    p = write(tmp_path, '[[interface]]\nmatch_ssid = "Café\\tbar"\nprofile = "strict"\n')
    assert config.load(p).for_link("wlan0", ssid="Café\tbar").profile is ConfigProfile.STRICT


def test_config_check_reports_a_nul_as_a_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = write(tmp_path, 'profile = "strict"\nca_file = "/etc/hosts\\u0000"\n')
    assert cli.main(["config", "check", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{p}:2: ca_file: " in err and "Traceback" not in err


def test_a_reload_that_fails_in_any_way_is_refused_and_ready_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """systemd is told READY=1 after every RELOADING=1, or it shows "reloading" for ever."""
    from agent import daemon, sdnotify  # noqa: PLC0415 - the daemon's imports are heavy

    told: list[str] = []

    def notify(message: str) -> bool:
        told.append(message)
        return True

    monkeypatch.setattr(sdnotify, "notify", notify)
    p = write(tmp_path, 'profile = "strict"\n')
    good = config.load(p)
    d = daemon.Daemon(good, p)
    write(tmp_path, 'profile = "strict"\nlease_dirs = ["/x\\u0000"]\n')
    d.reload()
    assert told == ["RELOADING=1", "READY=1"] and d.cfg is good
    assert f"{p}:2: lease_dirs" in caplog.text

    def unforeseen(path: Path | None = None) -> config.Config:
        raise ValueError("embedded null byte")

    monkeypatch.setattr(config, "load", unforeseen)
    told.clear()
    d.reload()
    assert told == ["RELOADING=1", "READY=1"] and d.cfg is good
    assert "configuration not reloaded" in caplog.text and "embedded null byte" in caplog.text
