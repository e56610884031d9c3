"""packaging/: the shipped configuration, the systemd unit and the two package recipes
against the code, so that they cannot drift (versions, paths, defaults); and
`systemd-analyze verify` on the unit."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from agent import __version__, config
from agent.config import OPTIONS, Scope
from agent.sysconf import request
from tests.conftest import require_program
from tests.lab.netns import REPO
from tests.unit.docs import toml_value

PKG = REPO / "packaging"
SHIPPED = PKG / "agent.toml"
UNIT = PKG / "systemd" / "dnstls-agent.service"
SYSUSERS = PKG / "sysusers.d" / "dnstls-agent.conf"
LAUNCHER = PKG / "dnstls-agent.py"
DEBIAN = PKG / "debian"
SPEC = PKG / "rpm" / "dnstls-agent.spec"
MAN_PAGES = sorted(p.name for p in (REPO / "man").glob("*.[1-8]"))
COMMENTED = re.compile(r"^#(\w+ = .*|\[\[interface\]\])$")


def unit_settings(unit: Path = UNIT) -> dict[str, list[str]]:
    """Key -> every value it is given (a unit may set a key more than once)."""
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_shipped_configuration_is_valid_and_changes_nothing() -> None:
    cfg = config.load(SHIPPED, dropins=False, missing_ok=False)
    assert cfg.interfaces == ()
    assert cfg == config.Config(files=(str(SHIPPED),))


def test_shipped_configuration_shows_every_option_with_its_default() -> None:
    lines = SHIPPED.read_text().splitlines()
    for opt in OPTIONS:
        if opt.scope is not Scope.MATCH:
            assert f"#{opt.key} = {toml_value(opt.default)}" in lines, opt.key
        else:
            assert any(ln.startswith(f"#{opt.key} = ") for ln in lines), opt.key


def test_shipped_configuration_uncommented_is_still_valid(tmp_path: Path) -> None:
    """What an administrator gets by removing the "#" from the option lines."""
    text = "\n".join(
        ln[1:] if COMMENTED.match(ln) else ln for ln in SHIPPED.read_text().splitlines()
    )
    f = tmp_path / "agent.toml"
    f.write_text(text)
    cfg = config.load(f, dropins=False)
    assert cfg.interfaces and cfg.defaults == config.LinkSettings()
    globals_ = [o.key for o in OPTIONS if o.scope is Scope.GLOBAL]
    assert [getattr(cfg, k) for k in globals_] == [getattr(config.Config(), k) for k in globals_]


def test_versions_agree() -> None:
    changelog = (DEBIAN / "changelog").read_text().splitlines()[0]
    assert re.match(rf"dnstls-agent \({re.escape(__version__)}-\d+\) ", changelog), changelog
    spec = SPEC.read_text()
    assert re.search(rf"^Version:\s+{re.escape(__version__)}$", spec, re.MULTILINE)
    assert re.search(rf"^\* .* - {re.escape(__version__)}-\d+$", spec, re.MULTILINE)


def test_unit_fits_the_code() -> None:
    unit = unit_settings()
    assert unit["Type"] == ["notify"]  # the daemon sends READY=1, RELOADING=1, WATCHDOG=1
    assert unit["ExecStart"] == ["/usr/bin/dnstls-agent run"]
    assert unit["ExecStopPost"] == ["+/usr/bin/dnstls-agent restore --unless-restarting"]
    defaults = config.Config()
    assert "/var/lib/" + unit["StateDirectory"][0] == defaults.state_dir
    assert "/run/" + unit["RuntimeDirectory"][0] == defaults.runtime_dir
    assert Path("/etc", unit["ConfigurationDirectory"][0]) == config.DEFAULT_FILE.parent
    # binding port 53 is the one privilege, and the only one
    assert any(port < 1024 for _, port in defaults.listen)
    assert unit["AmbientCapabilities"] == unit["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    sysuser = SYSUSERS.read_text().splitlines()[-1].split()
    assert sysuser[:2] == ["u", unit["User"][0]] and unit["Group"] == unit["User"]


def test_stub_refresh_units_fit_the_code() -> None:
    """The daemon's request file is what the path unit watches; root runs `stub --refresh`."""
    unit = unit_settings()
    path = unit_settings(UNIT.with_name("dnstls-agent-stub.path"))
    service = unit_settings(UNIT.with_name("dnstls-agent-stub.service"))
    assert "dnstls-agent-stub.path" in unit["Wants"]
    assert path["PartOf"] == ["dnstls-agent.service"]
    assert path["PathChanged"] == [str(request.path(Path(config.Config().runtime_dir)))]
    assert path["Unit"] == ["dnstls-agent-stub.service"]
    assert service["Type"] == ["oneshot"]
    assert service["ExecStart"] == ["/usr/bin/dnstls-agent stub --refresh"]
    assert "User" not in service  # root: it writes the system's DNS configuration


def test_debian_and_rpm_install_the_same_things() -> None:
    libdir = re.search(r'sys\.path\.insert\(0, "([^"]+)"\)', LAUNCHER.read_text())
    assert libdir, "the launcher puts the private directory on the path"
    install = (DEBIAN / "dnstls-agent.install").read_text().split()
    assert install[:2] == ["agent", libdir.group(1).lstrip("/") + "/"]
    spec = SPEC.read_text()
    assert "%global libdir %{_prefix}/lib/%{name}" in spec
    assert libdir.group(1) == "/usr/lib/dnstls-agent"
    manpages = (DEBIAN / "dnstls-agent.manpages").read_text().split()
    assert sorted(Path(m).name for m in manpages) == MAN_PAGES
    for page in MAN_PAGES:
        assert page.replace("dnstls-agent", "%{name}") in spec, page
    units = sorted(f"packaging/systemd/{u.name}" for u in UNIT.parent.iterdir())
    for shipped in ("dispatcher.d/90-dnstls-agent", "packaging/agent.toml", *units):
        assert shipped in install or shipped in (DEBIAN / "rules").read_text(), shipped
        assert shipped.replace("dnstls-agent", "%{name}") in spec
    # Debian's dhclient-script sources dhclient-enter-hooks.d/; Fedora's reads one file of
    # the administrator's (/etc/dhcp/dhclient-enter-hooks), and Fedora dropped ISC dhclient.
    assert "dispatcher.d/dhclient-enter-hooks.d/dnstls-agent" in install
    assert "dhclient-enter-hooks.d/%{name}" not in spec


def test_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify, with the command at a stand-in path and the pages on MANPATH
    (it checks that ExecStart= and friends are executable and Documentation= resolves)."""
    analyze = require_program("systemd-analyze")
    require_program("man")
    stand_in = tmp_path / "dnstls-agent"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    units = []
    for source in sorted(UNIT.parent.iterdir()):  # the service, the stub path unit and service
        unit = tmp_path / source.name
        unit.write_text(source.read_text().replace("/usr/bin/dnstls-agent", str(stand_in)))
        units.append(str(unit))
    assert len(units) == 3
    for page in MAN_PAGES:
        section = tmp_path / "man" / f"man{page[-1]}"
        section.mkdir(parents=True, exist_ok=True)
        (section / page).symlink_to(REPO / "man" / page)
    proc = subprocess.run(
        [analyze, "verify", *units],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "MANPATH": str(tmp_path / "man"), "SYSTEMD_LOG_LEVEL": "notice"},
    )
    ours = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "dnstls-agent" in ln]
    assert (proc.returncode, ours) == (0, [])


@pytest.mark.parametrize(
    "script",
    [
        "build-deb",
        "test-install",
        "test-install.d/checks",
        "test-install.d/selftest",
        "test-install.d/purge",
        "rpm/check-spec",
        "debian/rules",
        "debian/dnstls-agent.postrm",
        "debian/dnstls-agent.prerm",
    ],
)
def test_scripts_are_executable_and_parse(script: str) -> None:
    path = PKG / script
    if path.name.startswith("dnstls-agent.p"):  # dpkg makes maintainer scripts executable
        assert path.read_text().startswith("#!/bin/sh\n")
        shell = "sh"
    else:
        assert os.access(path, os.X_OK), f"{script} is not executable"
        if path.name == "rules":
            return
        shell = "bash"
    assert subprocess.run([shell, "-n", str(path)], check=False).returncode == 0


def test_license_is_the_one_the_packages_declare() -> None:
    """LICENSE, debian/copyright's Expat text, pyproject's and the spec's MIT: one license."""
    words = (REPO / "LICENSE").read_text().split()
    copyright_text = (DEBIAN / "copyright").read_text()
    expat = copyright_text.split("License: Expat\n", 2)[2]
    assert words[words.index("Permission") :] == expat.replace("\n .\n", "\n").split()
    assert 'license = { text = "MIT" }' in (REPO / "pyproject.toml").read_text()
    assert re.search(r"^License:\s+MIT$", SPEC.read_text(), re.M)
    assert "%license LICENSE" in SPEC.read_text()
