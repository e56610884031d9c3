"""The Debian package's block in /etc/dhcp/dhclient.conf that makes ISC dhclient ask for DNR
(options 162 and 144): the postinst adds it at the end, once, whatever was there; the
postrm takes it out again, leaving the file as it was. The scripts run here on a copy, their
path to dhclient.conf (and the postrm's purge of the agent's state) replaced; and what the
block names is what the lease parser reads. (tests/system/test_dnr_dhclient.py gives the
block to the real dhclient.)"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from agent.watchers import leases
from tests.conftest import require_program
from tests.lab.dhcplab import DHCLIENT_CONF
from tests.lab.netns import REPO

DEBIAN = REPO / "packaging" / "debian"
POSTINST = DEBIAN / "dnstls-agent.postinst"
POSTRM = DEBIAN / "dnstls-agent.postrm"
TRIGGERS = DEBIAN / "dnstls-agent.triggers"
CONF = "/etc/dhcp/dhclient.conf"
CONF_LINE = re.compile(r"^dnstls_conf=(.*)$", re.M)
PURGE = "rm -rf /var/lib/dnstls-agent /var/lib/dnstls-agent-stub"
# Debian 12's dhclient.conf: comments, then the request (DHCLIENT_CONF is it without them)
ORIGINAL = "# Configuration file for /sbin/dhclient.\n#\n" + DHCLIENT_CONF + "#}\n"


def script(path: Path, conf: Path, tmp_path: Path) -> Path:
    """`path` with its dhclient.conf at `conf`, and no purge of the host's /var/lib."""
    text = path.read_text()
    assert len(CONF_LINE.findall(text)) == 1
    text = CONF_LINE.sub(f"dnstls_conf={conf}", text)
    if PURGE in text:
        text = text.replace(PURGE, ": purge of the state left out here")
    assert "rm -rf" not in text
    out = tmp_path / path.name
    out.write_text(text)
    return out


def run(path: Path, conf: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    sh = require_program("sh")
    proc = subprocess.run(
        [sh, str(script(path, conf, tmp_path)), *args],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def block(conf: Path) -> list[str]:
    lines = conf.read_text().splitlines()
    begin = [i for i, ln in enumerate(lines) if ln.startswith("# BEGIN dnstls-agent")]
    assert len(begin) == 1, lines
    end = lines.index("# END dnstls-agent", begin[0])
    return lines[begin[0] : end + 1]


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    etc = tmp_path / "etc-dhcp"
    etc.mkdir()
    f = etc / "dhclient.conf"
    f.write_text(ORIGINAL)
    f.chmod(0o640)
    return f


def test_scripts_are_posix_shell_and_name_the_real_file() -> None:
    dash = require_program("dash")
    for path in (POSTINST, POSTRM):
        text = path.read_text()
        assert text.startswith("#!/bin/sh\nset -e\n") and "#DEBHELPER#" in text
        assert CONF_LINE.findall(text) == [CONF]
        assert subprocess.run([dash, "-n", str(path)], check=False).returncode == 0
    markers = [
        re.findall(r'^dnstls_(begin|end)="(.*)"$', p.read_text(), re.M) for p in (POSTINST, POSTRM)
    ]
    assert markers[0] == markers[1] and len(markers[0]) == 2  # the postrm finds the block
    assert TRIGGERS.read_text().split("\n")[-2] == f"interest-noawait {CONF}"


def test_configure_adds_the_block_at_the_end_once(conf: Path, tmp_path: Path) -> None:
    run(POSTINST, conf, tmp_path, "configure", "")
    text = conf.read_text()
    assert text.startswith(ORIGINAL)
    got = block(conf)
    assert text.endswith("\n".join(got) + "\n")  # last: after the `request` statement
    assert got[1:-1] == [
        "option dnr code 162 = string;",
        "option dhcp6.dnr code 144 = string;",
        "also request dnr;",
        "also request dhcp6.dnr;",
    ]
    assert conf.stat().st_mode & 0o777 == 0o640  # the file's mode kept
    before = conf.stat()
    run(POSTINST, conf, tmp_path, "configure", "0.1.0-1")  # an upgrade: nothing to change
    run(POSTINST, conf, tmp_path, "triggered", CONF)  # isc-dhcp-client's file came again
    assert conf.read_text() == text
    assert (conf.stat().st_ino, conf.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_the_lease_parser_reads_the_names_the_block_gives() -> None:
    text = POSTINST.read_text()
    named = dict(re.findall(r'"option ([\w.-]+) code (\d+) = string;"', text))
    assert named == {"dnr": "162", "dhcp6.dnr": "144"}
    read = {name for name, _ in leases._DNR_OPTIONS}
    assert set(named) <= read and "unknown-162" in read


@pytest.mark.parametrize("how", ["remove", "purge", "abort-install"])
def test_postrm_puts_the_file_back(conf: Path, tmp_path: Path, how: str) -> None:
    run(POSTINST, conf, tmp_path, "configure", "")
    run(POSTRM, conf, tmp_path, how)
    assert conf.read_text() == ORIGINAL
    assert conf.stat().st_mode & 0o777 == 0o640


def test_postrm_leaves_a_file_without_the_block_alone(conf: Path, tmp_path: Path) -> None:
    conf.write_text(ORIGINAL.rstrip("\n"))  # not even a newline at the end is added
    before = conf.stat()
    run(POSTRM, conf, tmp_path, "remove")
    run(POSTRM, conf, tmp_path, "upgrade", "0.1.0-2")  # an upgrade keeps the block
    assert conf.read_text() == ORIGINAL.rstrip("\n")
    assert conf.stat().st_ino == before.st_ino


def test_the_block_moves_after_what_the_administrator_added(conf: Path, tmp_path: Path) -> None:
    run(POSTINST, conf, tmp_path, "configure", "")
    added = "request subnet-mask, routers;\n"  # a `request` after ours would undo it
    conf.write_text(conf.read_text() + added)
    run(POSTINST, conf, tmp_path, "configure", "0.1.0-1")
    text = conf.read_text()
    assert text.startswith(ORIGINAL + added) and text.count("# BEGIN dnstls-agent") == 1
    run(POSTRM, conf, tmp_path, "remove")
    assert conf.read_text() == ORIGINAL + added


def test_no_trailing_newline_and_a_symlink(conf: Path, tmp_path: Path) -> None:
    conf.write_text("request subnet-mask;")
    link = tmp_path / "dhclient.conf"
    link.symlink_to(conf)
    run(POSTINST, link, tmp_path, "configure", "")
    assert link.is_symlink()
    lines = conf.read_text().splitlines()
    assert lines[0] == "request subnet-mask;" and lines[1].startswith("# BEGIN dnstls-agent")
    run(POSTRM, link, tmp_path, "remove")
    assert conf.read_text() == "request subnet-mask;\n" and link.is_symlink()


def test_nothing_where_there_is_no_file(tmp_path: Path) -> None:
    missing = tmp_path / "none" / "dhclient.conf"
    run(POSTINST, missing, tmp_path, "configure", "")
    run(POSTRM, missing, tmp_path, "purge")
    assert not missing.exists() and not missing.parent.exists()


def test_the_administrators_own_162_is_respected(conf: Path, tmp_path: Path) -> None:
    own = ORIGINAL + "option v4-dnr code 162 = string;\nalso request v4-dnr;\n"
    conf.write_text(own)
    proc = run(POSTINST, conf, tmp_path, "configure", "")
    assert conf.read_text() == own and "left as it is" in proc.stderr
    commented = ORIGINAL + "#option v4-dnr code 162 = string;\n"  # a comment is no name
    conf.write_text(commented)
    run(POSTINST, conf, tmp_path, "configure", "")
    assert len(block(conf)) == 6


def test_a_damaged_block_loses_nothing(conf: Path, tmp_path: Path) -> None:
    """A BEGIN whose END the administrator deleted: what follows it is not ours to drop."""
    run(POSTINST, conf, tmp_path, "configure", "")
    damaged = conf.read_text().replace("# END dnstls-agent\n", "") + "send host-name = x;\n"
    conf.write_text(damaged)
    run(POSTINST, conf, tmp_path, "configure", "0.1.0-1")
    assert conf.read_text().startswith(damaged)  # all kept; a whole block added after it
    run(POSTRM, conf, tmp_path, "remove")
    assert conf.read_text() == damaged
