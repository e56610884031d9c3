"""The dhclient side: agent/sysconf/dhclient.py against the real dhclient-script's
make_resolv_conf, `sysconf.dhclient_lease` on a root prefix, and the enter hook as
dhclient-script sources it. The whole path with a real dhclient, dnsmasq and the agent is
tests/system/test_stub_dhclient.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent import sysconf
from agent.sysconf import dhclient
from agent.sysconf.resolvconf_file import ResolvConfFile
from tests.conftest import require_program
from tests.lab.netns import REPO

HOOK = REPO / "dispatcher.d" / "dhclient-enter-hooks.d" / "dnstls-agent"
TUNNEL = ["127.0.0.153"]
OLD = "# old\nnameserver 203.0.113.9\nsearch old.example\noptions edns0\n"
LEASES: dict[str, dict[str, str]] = {
    "servers only": {"new_domain_name_servers": "198.51.100.1 198.51.100.2"},
    "name, search without it": {
        "new_domain_name": "lab.example",
        "new_domain_search": "corp.example vpn.example",
        "new_domain_name_servers": "198.51.100.1",
    },
    "name in search (with a dot)": {
        "new_domain_name": "lab.example",
        "new_domain_search": "corp.example lab.example.",
        "new_domain_name_servers": "198.51.100.1",
    },
    "two domain names": {"new_domain_name": "a.example b.example"},
    "search, no servers: the old ones kept": {"new_domain_search": "corp.example"},
    "dhcpv6": {
        "interface": "eth0",
        "new_dhcp6_name_servers": "2001:db8::53 fe80::1 FE80::2",
        "new_dhcp6_domain_search": "v6.example",
    },
    "dhcpv6 search only": {"new_dhcp6_domain_search": "v6.example"},
    "nothing about DNS": {"new_ip_address": "198.51.100.77"},
}


def real_make_resolv_conf(tmp: Path, env: dict[str, str], old: str) -> str | None:
    """dhclient-script's own wait_for_rw and make_resolv_conf, cut out of the installed
    script and run by /bin/sh with only /etc/ moved under `tmp`."""
    script = Path(require_program("dhclient-script")).read_text()
    functions = re.findall(
        r"^(?:wait_for_rw|make_resolv_conf)\(\) \{\n.*?^\}\n", script, re.M | re.S
    )
    assert len(functions) == 2, "dhclient-script no longer has these two functions"
    etc = tmp / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "fstab").write_text("")
    (etc / "resolv.conf").write_text(old)
    code = "".join(functions).replace("/etc/", f"{etc}/") + "make_resolv_conf\n"
    proc = subprocess.run(
        ["/bin/sh", "-c", code], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True,
        text=True, timeout=10, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    after = (etc / "resolv.conf").read_text()
    return None if after == old else after


@pytest.mark.parametrize("name", LEASES)
def test_render_is_what_dhclient_script_writes(name: str, tmp_path: Path) -> None:
    env = LEASES[name]
    assert dhclient.render(env, OLD) == real_make_resolv_conf(tmp_path, env, OLD)


def test_render_keeps_old_nameservers_only_without_new_ones() -> None:
    out = dhclient.render({"new_domain_search": "corp.example"}, OLD)
    assert out == "search corp.example\nnameserver 203.0.113.9\n"
    out = dhclient.render(LEASES["servers only"], OLD)
    assert out == "nameserver 198.51.100.1\nnameserver 198.51.100.2\n"


def test_a_value_with_a_newline_adds_no_line() -> None:
    """A hostile server's domain search list with a newline: no `options` line of its own."""
    env = {
        "new_domain_search": "corp.example\noptions ndots:15",
        "new_domain_name_servers": "198.51.100.1",
    }
    assert dhclient.render(env, OLD) == "nameserver 198.51.100.1\n"
    env = {"new_domain_name_servers": "198.51.100.1\nsearch evil.example"}
    assert dhclient.render(env, OLD) is None


# -- sysconf.dhclient_lease, on a root prefix -------------------------------------------------
@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root" / "etc").mkdir(parents=True)
    return tmp_path / "root"


def pointed(root: Path, state: Path, original: str | None) -> Path:
    """A resolv.conf (or none) pointed at the tunnel by the resolv.conf backend."""
    path = root / "etc" / "resolv.conf"
    if original is not None:
        path.write_text(original)
    sysconf.apply(state, ResolvConfFile(root), TUNNEL)
    return path


def test_lease_becomes_the_original_and_the_stub_stays(root: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = pointed(root, state, OLD)
    env = LEASES["name, search without it"]
    said = sysconf.dhclient_lease(state, env, TUNNEL, ["corp.example"], root)
    assert "198.51.100.1" in said
    now = path.read_text()
    assert [ln for ln in now.splitlines() if ln.startswith("nameserver")] == [
        "nameserver 127.0.0.153"
    ]
    assert "search lab.example corp.example vpn.example" in now  # the lease's domains
    assert "198.51.100.1" not in now
    entry = sysconf.journal_of(state)["entries"][0]  # type: ignore[index]
    assert entry["content"] == dhclient.render(env)
    assert sysconf.restore(state, root).endswith("put back as it was")
    assert path.read_text() == dhclient.render(env)


def test_lease_without_servers_keeps_the_originals(root: Path, tmp_path: Path) -> None:
    """dhclient keeps the old file's nameservers: the original's, never the tunnel's."""
    state = tmp_path / "state"
    path = pointed(root, state, OLD)
    sysconf.dhclient_lease(state, {"new_domain_search": "new.example"}, TUNNEL, None, root)
    assert "nameserver 127.0.0.153" in path.read_text()
    sysconf.restore(state, root)
    assert path.read_text() == "search new.example\nnameserver 203.0.113.9\n"


def test_lease_through_a_symlink_goes_where_it_points(root: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    (root / "run").mkdir()
    target = root / "run" / "resolv.conf"
    target.write_text(OLD)
    (root / "etc" / "resolv.conf").symlink_to("../run/resolv.conf")
    path = pointed(root, state, None)
    assert not path.is_symlink()
    sysconf.dhclient_lease(state, LEASES["servers only"], TUNNEL, None, root)
    assert target.read_text() == dhclient.render(LEASES["servers only"])
    assert "127.0.0.153" in path.read_text()
    sysconf.restore(state, root)
    assert os.readlink(path) == "../run/resolv.conf"
    assert path.read_text() == dhclient.render(LEASES["servers only"])


def test_lease_with_no_file_before(root: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = pointed(root, state, None)
    sysconf.dhclient_lease(state, LEASES["servers only"], TUNNEL, None, root)
    assert "198.51.100.1" not in path.read_text()
    sysconf.restore(state, root)
    assert path.read_text() == dhclient.render(LEASES["servers only"])


def test_not_pointed_writes_as_dhclient_would_in_place(root: Path, tmp_path: Path) -> None:
    """The agent restored the stub between the hook's look and the command."""
    path = root / "etc" / "resolv.conf"
    path.write_text(OLD)
    inode = path.stat().st_ino
    said = sysconf.dhclient_lease(tmp_path / "state", LEASES["servers only"], TUNNEL, None, root)
    assert "as dhclient would" in said
    assert path.read_text() == dhclient.render(LEASES["servers only"])
    assert path.stat().st_ino == inode  # `cat new > file`: bind mounts keep working
    said = sysconf.dhclient_lease(
        tmp_path / "state", LEASES["nothing about DNS"], TUNNEL, None, root
    )
    assert "left alone" in said


def test_another_backend_keeps_the_file(root: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = root / "etc" / "resolv.conf"
    path.write_text("nameserver 127.0.0.153\n")
    with sysconf.open_journal(state) as journal:
        journal.save("networkmanager", [{"dropins": []}])
    said = sysconf.dhclient_lease(state, LEASES["servers only"], TUNNEL, None, root)
    assert "left to it" in said
    assert path.read_text() == "nameserver 127.0.0.153\n"


# -- the enter hook, sourced as dhclient-script sources it ------------------------------------
def source_hook(
    tmp: Path, command: str, journal: str | None, **extra: str
) -> subprocess.CompletedProcess[str]:
    """/bin/sh: a make_resolv_conf of its own, then `. HOOK` (run_hook's way), then calls
    make_resolv_conf; `logger` is a stand-in writing to tmp/logger (not the host's syslog).
    `journal`: the agent's stub journal's text (None: there is none)."""
    state = tmp / "state"
    state.mkdir(exist_ok=True)
    (state / "stub.json").unlink(missing_ok=True)
    if journal is not None:
        (state / "stub.json").write_text(journal)
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    logger = bin_dir / "logger"
    logger.write_text(f'#!/bin/sh\necho "$@" >> {tmp}/logger\n')
    logger.chmod(0o755)
    code = (
        'make_resolv_conf() { echo "dhclient wrote resolv.conf"; }\n'
        f'. {HOOK}; echo "hook status $?"\n'
        'make_resolv_conf; echo "make_resolv_conf status $?"\n'
    )
    env = {
        "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
        "reason": "RENEW",
        "interface": "eth0",
        "new_domain_name_servers": "198.51.100.1",
        "DNSTLS_AGENT_STUB_DIR": str(state),
        "DNSTLS_AGENT": command,
        **extra,
    }
    return subprocess.run(
        ["/bin/sh", "-c", code], env=env, capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip


def test_hook_hands_the_lease_to_the_agent_when_pointed(tmp_path: Path) -> None:
    record = tmp_path / "called"
    fake = tmp_path / "fake-agent"
    fake.write_text(f'#!/bin/sh\necho "$@ $new_domain_name_servers" > {record}\necho done\n')
    fake.chmod(0o755)
    proc = source_hook(tmp_path, str(fake), "{}")
    assert proc.stdout.splitlines() == ["hook status 0", "make_resolv_conf status 0"]
    assert record.read_text() == "stub --dhclient 198.51.100.1\n"  # the lease, exported
    assert "RENEW" in (tmp_path / "logger").read_text()


def test_hook_changes_nothing_when_not_pointed(tmp_path: Path) -> None:
    proc = source_hook(tmp_path, "/nonexistent", None)
    assert proc.stdout.splitlines() == [
        "hook status 0",
        "dhclient wrote resolv.conf",
        "make_resolv_conf status 0",
    ]


def test_hook_failure_writes_nothing_and_says_so(tmp_path: Path) -> None:
    proc = source_hook(tmp_path, "/nonexistent/dnstls-agent", "{}")
    assert proc.stdout.splitlines() == ["hook status 0", "make_resolv_conf status 0"]
    said = (tmp_path / "logger").read_text()
    assert "daemon.err" in said and "left pointing at the tunnel" in said


def test_hook_runs_the_real_command(tmp_path: Path) -> None:
    """`stub --dhclient` itself through the hook, the lease exported as dhclient-script has
    it. The command's resolv.conf is the host's (no root prefix there), so the journal here
    names a backend that leaves the file alone: what it said reaches syslog (the stand-in)."""
    scratch = tmp_path / "scratch"
    with sysconf.open_journal(scratch) as journal:
        journal.save("networkmanager", [{"dropins": []}])
    config = tmp_path / "agent.toml"
    config.write_text(
        f'stub_state_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n'
    )
    command = f"{sys.executable} -m agent -c {config}"
    text = (scratch / "stub.json").read_text()
    proc = source_hook(tmp_path, command, text, PYTHONPATH=str(REPO))
    assert proc.stdout.splitlines() == ["hook status 0", "make_resolv_conf status 0"], proc
    said = (tmp_path / "logger").read_text()
    assert "daemon.info" in said and "left to it" in said, said
    assert (tmp_path / "state" / "stub.json").read_text() == text


def test_hostile_lease_values_are_checked_word_by_word() -> None:
    """Root renders this from what a DHCP server sent: a 110 KB search list is cut to 32
    names, a word that is not a domain name and a server that is not an address are left
    out, so nothing of the network's choosing but names and addresses reaches the file."""
    env = {
        "new_domain_search": " ".join(f"d{i}.example" for i in range(11000)),
        "new_domain_name": "lab.example",
        "new_domain_name_servers": "198.51.100.1 options;ndots:15 2001:db8::53",
    }
    text = dhclient.render(env)
    assert text is not None
    search = next(line for line in text.splitlines() if line.startswith("search "))
    assert len(search.split()) == 2 + 32 and len(text) < 2000  # "search", the domain, 32
    assert [line for line in text.splitlines() if line.startswith("nameserver")] == [
        "nameserver 198.51.100.1",
        "nameserver 2001:db8::53",
    ]
    bad = dhclient.render({"new_domain_search": 'a.example "quoted" b_c.example x..y'})
    assert bad == "search a.example b_c.example\n"
