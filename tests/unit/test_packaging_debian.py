"""packaging/debian beyond what test_packaging.py checks: the dhclient enter hook with the
package removed, the Conflicts, the units handed to dh_installsystemd, the autopkgtest
suite (and test-install's runner of it), and README.Debian against the code and the
maintainer scripts. packaging/test-install runs all of it for real in a Debian root."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from agent import config
from agent.sysconf import networkmanager, resolvconf, resolved
from tests.conftest import require_program
from tests.lab.netns import REPO

PKG = REPO / "packaging"
DEBIAN = PKG / "debian"
TESTS = DEBIAN / "tests"
HOOK = REPO / "dispatcher.d" / "dhclient-enter-hooks.d" / "dnstls-agent"
RUNNER = PKG / "test-install.d" / "autopkgtest"
GUARD = "[ -x /usr/bin/dnstls-agent ] || return 0"


def deb822(text: str) -> list[dict[str, str]]:
    """Paragraphs of a Debian control file: comments dropped, continuation lines joined."""
    out: list[dict[str, str]] = []
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    for block in re.split(r"\n\s*\n", "\n".join(lines)):
        fields: dict[str, str] = {}
        key = ""
        for ln in block.splitlines():
            if ln[:1] in (" ", "\t"):
                fields[key] += " " + ln.strip()
            elif ln.strip():
                key, _, value = ln.partition(":")
                fields[key.strip()] = value.strip()
        if fields:
            out.append(fields)
    return out


def names(relation: str) -> list[str]:
    return [r.strip() for r in relation.split(",") if r.strip()]


# -- the dhclient enter hook, the package removed but not purged ------------------------------
def source_hook(
    tmp: Path, *, command_present: bool, run_hook: str = ""
) -> subprocess.CompletedProcess[str]:
    """/bin/sh sources a copy of the hook whose /usr/bin/dnstls-agent is `tmp/dnstls-agent`
    (present and recording its calls, or absent), with a stub journal left behind and
    DNSTLS_AGENT unset, as dhclient-script runs it for the package. `run_hook`: the shell
    function that sources it (dhclient-script's own), else a plain `.`."""
    command = tmp / "dnstls-agent"
    if command_present:
        command.write_text(f'#!/bin/sh\necho "$@" >> {tmp}/called\n')
        command.chmod(0o755)
    hook = tmp / "hook"
    text = HOOK.read_text()
    assert text.count("/usr/bin/dnstls-agent") >= 2  # the guard and the default command
    hook.write_text(text.replace("/usr/bin/dnstls-agent", str(command)))
    state = tmp / "state"
    state.mkdir()
    (state / "stub.json").write_text("{}")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "logger").write_text(f'#!/bin/sh\necho "$@" >> {tmp}/logger\n')
    (bin_dir / "logger").chmod(0o755)
    source = f"run_hook {hook}" if run_hook else f". {hook}"
    code = (
        'make_resolv_conf() { echo "dhclient wrote resolv.conf"; }\n'
        f'{run_hook}{source}; echo "hook status $?"\n'
        'make_resolv_conf; echo "after the hooks"\n'
    )
    env = {
        "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
        "reason": "RENEW",
        "interface": "eth0",
        "new_domain_name_servers": "198.51.100.1",
        "DNSTLS_AGENT_STUB_DIR": str(state),
    }
    return subprocess.run(
        ["/bin/sh", "-c", code], env=env, capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip


def test_hook_guards_on_the_packaged_command_with_return() -> None:
    lines = [ln.strip() for ln in HOOK.read_text().splitlines()]
    assert GUARD in lines
    assert not any(ln.startswith("exit") for ln in lines)  # sourced: exit ends dhclient-script


def test_hook_without_the_command_leaves_dhclient_alone(tmp_path: Path) -> None:
    proc = source_hook(tmp_path, command_present=False)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.splitlines() == [
        "hook status 0",
        "dhclient wrote resolv.conf",
        "after the hooks",
    ]
    assert not (tmp_path / "logger").exists()


def test_hook_with_the_command_hands_it_the_lease(tmp_path: Path) -> None:
    """The same copy of the hook with the command there: the guard lets it through."""
    proc = source_hook(tmp_path, command_present=True)
    assert proc.stdout.splitlines() == ["hook status 0", "after the hooks"]
    assert (tmp_path / "called").read_text() == "stub --dhclient\n"


def test_hook_without_the_command_through_dhclient_scripts_run_hook(tmp_path: Path) -> None:
    """dhclient-script's own run_hook (a function that sources the hook and logs a non-zero
    status): `return` leaves the hook only, and with status 0."""
    script = Path(require_program("dhclient-script")).read_text()
    found = re.findall(r"^run_hook\(\) \{\n.*?^\}\n", script, re.M | re.S)
    assert len(found) == 1, "dhclient-script no longer has run_hook"
    proc = source_hook(tmp_path, command_present=False, run_hook=found[0])
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.splitlines() == [
        "hook status 0",
        "dhclient wrote resolv.conf",
        "after the hooks",
    ]
    assert not (tmp_path / "logger").exists()  # run_hook logged no non-zero status


# -- Conflicts --------------------------------------------------------------------------------
def test_conflicts_with_the_other_owners_of_resolv_conf() -> None:
    text = (DEBIAN / "control").read_text()
    source, binary = deb822(text)
    assert source["Source"] == binary["Package"] == "dnstls-agent"
    assert names(binary["Conflicts"]) == ["dnsconfd", "dnssec-trigger"]
    assert "Breaks" not in binary
    assert "Conflicts, not Breaks" in text  # the reason is given where the field is
    spec = (PKG / "rpm" / "dnstls-agent.spec").read_text()
    assert re.findall(r"^Conflicts:\s+(\S+)$", spec, re.M) == ["dnsconfd", "dnssec-trigger"]


# -- the units: dh_installsystemd places them ------------------------------------------------
def test_units_are_handed_to_dh_installsystemd() -> None:
    """No unit in the .install file (its path would be one release's); each of
    packaging/systemd/ copied by debian/rules under the name dh_installsystemd looks for,
    and cleaned by debian/clean."""
    install = (DEBIAN / "dnstls-agent.install").read_text()
    assert "systemd/system" not in install
    assert not any(w.startswith("packaging/systemd/") for w in install.split())
    rules = (DEBIAN / "rules").read_text().replace("\\\n", " ")
    copies = dict(
        re.findall(r"^\tinstall -m 0644 (packaging/systemd/\S+)\s+(debian/\S+)$", rules, re.M)
    )
    clean = [ln for ln in (DEBIAN / "clean").read_text().splitlines() if ln[:1] != "#"]
    for unit in sorted((PKG / "systemd").iterdir()):
        stem, _, kind = unit.name.rpartition(".")
        expected = (
            f"debian/dnstls-agent.{kind}"
            if stem == "dnstls-agent"
            else f"debian/dnstls-agent.{stem}.{kind}"
        )
        assert copies.get(f"packaging/systemd/{unit.name}") == expected, unit.name
        assert expected in clean
        if stem != "dnstls-agent":
            assert f"--name={stem}" in rules
    assert len(copies) == len(list((PKG / "systemd").iterdir())) == len(clean)
    assert "execute_before_dh_installsystemd:" in rules
    assert re.search(r"^\tdh_installsystemd dnstls-agent\.service$", rules, re.M)


# -- autopkgtest ------------------------------------------------------------------------------
def autopkgtests() -> list[dict[str, str]]:
    return deb822((TESTS / "control").read_text())


def test_autopkgtest_control_names_every_script_and_only_those() -> None:
    named = [t for stanza in autopkgtests() for t in stanza["Tests"].split()]
    on_disk = sorted(p.name for p in TESTS.iterdir() if p.name != "control")
    assert sorted(named) == on_disk
    assert {"command", "units", "manpages", "probe-unbound"} <= set(named)
    for stanza in autopkgtests():
        assert set(stanza) <= {"Tests", "Depends", "Restrictions"}, stanza
        assert "@" in names(stanza["Depends"])


@pytest.mark.parametrize("name", sorted(p.name for p in TESTS.iterdir() if p.name != "control"))
def test_autopkgtest_scripts_are_executable_and_parse(name: str) -> None:
    path = TESTS / name
    assert path.stat().st_mode & 0o111 == 0o111, f"{name} is not executable"
    assert path.read_text().startswith("#!/bin/sh\n")
    assert subprocess.run(["sh", "-n", str(path)], check=False).returncode == 0


def test_autopkgtest_restrictions_are_what_the_tests_need() -> None:
    """The probe listens on port 853 (root) of loopback (a container of its own); the
    runner in test-install knows every restriction used, and fails on any other."""
    by_test = {t: s for s in autopkgtests() for t in s["Tests"].split()}
    probe = by_test["probe-unbound"]["Restrictions"].replace(",", " ").split()
    assert {"needs-root", "isolation-container"} <= set(probe)
    assert {"unbound", "openssl"} <= set(names(by_test["probe-unbound"]["Depends"]))
    assert "interface: 127.0.0.1@853" in (TESTS / "probe-unbound").read_text()
    known = re.search(r'^KNOWN_RESTRICTIONS=" (.*) "$', RUNNER.read_text(), re.M)
    assert known
    used = {r for s in autopkgtests() for r in s.get("Restrictions", "").replace(",", " ").split()}
    assert used <= set(known.group(1).split())


@pytest.mark.parametrize("script", ["test-install.d/autopkgtest", "test-install.d/build"])
def test_new_test_install_steps_are_executable_and_parse(script: str) -> None:
    path = PKG / script
    assert path.stat().st_mode & 0o111 == 0o111
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0


def test_test_install_runs_the_autopkgtests_and_knows_trixie() -> None:
    text = (PKG / "test-install").read_text()
    assert 'cp -r "$ROOT/packaging/debian/tests" "$R/tmp/test-install/src/debian/"' in text
    steps = re.findall(r"^\s*in_chroot (\w+)$", text, re.M)
    assert steps == ["build", "checks", "autopkgtest", "purge"]
    assert "trixie) release=" in text
    help_end = int(re.search(r"sed -n '2,(\d+)p'", text).group(1))  # type: ignore[union-attr]
    header = text.splitlines()[:help_end]
    assert header[-1].startswith("#") and not text.splitlines()[help_end].startswith("#")
    assert any("--suite S" in ln for ln in header)


# -- README.Debian ----------------------------------------------------------------------------
def test_readme_debian_names_what_the_package_and_the_service_change() -> None:
    readme = " ".join((DEBIAN / "README.Debian").read_text().split())  # lines joined
    postinst = (DEBIAN / "dnstls-agent.postinst").read_text()
    begin = re.search(r'^dnstls_begin="(.*)"$', postinst, re.M)
    end = re.search(r'^dnstls_end="(.*)"$', postinst, re.M)
    assert begin and end
    assert begin.group(1) in readme and end.group(1) in readme
    assert "code 162" in postinst and "option 162" in readme
    install = (DEBIAN / "dnstls-agent.install").read_text().split()
    links = (DEBIAN / "dnstls-agent.links").read_text()
    hook_dir = install[install.index("dispatcher.d/dhclient-enter-hooks.d/dnstls-agent") + 1]
    defaults = config.Config()
    facts = [
        f"/{hook_dir}dnstls-agent",
        "/usr/lib/NetworkManager/dispatcher.d/no-wait.d/90-dnstls-agent",
        "dispatcher.d/90-dnstls-agent",
        "/etc/dhcp/dhclient.conf",
        f"/{networkmanager.DROPIN_DIRS['run']}/{networkmanager.DROPIN}",
        "/" + networkmanager.DROPIN_DIRS["etc"],
        f"/{resolved.DROPIN_DIR}/{resolved.DROPIN}",
        f"/{networkmanager.DROPIN_DIRS['run']}/{resolved.NM_DROPIN}",
        resolvconf.RECORD,
        defaults.stub_state_dir,
        defaults.state_dir,
        defaults.runtime_dir,
        defaults.listen[0][0],
        "dnstls-agent restore",
        "ExecStopPost=",
        "ExecStartPost=",
    ]
    for fact in facts:
        assert fact in readme, fact
    assert "no-wait.d/90-dnstls-agent" in links
    # the postrm's purge removes what README.Debian says it does; the user stays
    postrm = (DEBIAN / "dnstls-agent.postrm").read_text()
    purged = re.search(r"^\trm -rf (.*)$", postrm, re.M)
    assert purged
    for path in purged.group(1).split():
        assert path in readme.split("Purge")[1], path
    assert "deluser --system dnstls-agent" in readme
