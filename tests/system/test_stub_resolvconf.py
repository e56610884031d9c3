"""The resolvconf backend against the real programs: Debian's resolvconf and openresolv.

Each runs in a tests.lab.resolvconflab lab (a private mount and network namespace whose
/etc, /usr and /run are the lab's), with another interface's record already there, as
on a machine that got its resolver by DHCP. The agent runs there as its own command
(`dnstls-agent stub` / `restore`, stub_backend auto), every step a fresh process, as
the unit runs it. What must hold: after `stub` the tunnel is the only nameserver (none
of the network's after it, where glibc would fall back in cleartext), the network's
search domains are kept, also when the interface rewrites its record later; `restore`
gives back the file as it was; a crash at any point leaves nothing that `restore` from
a fresh process cannot undo.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import missing, require_program, require_root
from tests.lab.resolvconflab import PACKAGES, Kind, LabError, ResolvconfLab, fetch

pytestmark = pytest.mark.system

TUNNEL = "127.0.0.153"
RECORD = "lo.dnstls-agent"
ETH0 = "nameserver 198.51.100.1\nsearch lab.test\n"
# Debian's records are named interface.program (ifupdown: eth0.inet); openresolv's bare
OTHER: dict[Kind, str] = {"debian": "eth0.inet", "openresolv": "eth0"}


def nameservers(text: str) -> list[str]:
    return [ln.split()[1] for ln in text.splitlines() if ln.startswith("nameserver ")]


def search(text: str) -> list[str]:
    return [d for ln in text.splitlines() if ln.startswith("search ") for d in ln.split()[1:]]


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[Kind, Path]:
    require_root()
    for program in ("apt-get", "dpkg", "unshare", "nsenter", "mount", "run-parts", "flock"):
        require_program(program)
    into = tmp_path_factory.mktemp("packages")
    try:
        return {kind: fetch(package, into) for kind, package in PACKAGES.items()}
    except LabError as exc:
        missing(str(exc))
        raise  # not reached


@pytest.fixture(params=["debian", "openresolv"])
def lab(
    request: pytest.FixtureRequest, packages: dict[Kind, Path], tmp_path: Path
) -> Iterator[ResolvconfLab]:
    kind: Kind = request.param
    with ResolvconfLab(tmp_path, kind, packages[kind]) as lab:
        lab.add(OTHER[kind], ETH0)
        print(f"{kind} lab up in {lab.startup_seconds:.2f}s", file=sys.stderr)
        yield lab


def journal(lab: ResolvconfLab) -> dict[str, object] | None:
    path = lab.state_dir / "stub.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_stub_makes_the_tunnel_the_only_nameserver_and_restore_puts_back(
    lab: ResolvconfLab,
) -> None:
    before = lab.resolv_conf()
    assert nameservers(before) == ["198.51.100.1"] and search(before) == ["lab.test"]
    shown = lab.agent("stub", "--show").stdout
    assert "backend: resolvconf" in shown, shown  # detected, before the resolv.conf fallback
    assert lab.kind in shown

    t0 = time.monotonic()
    said = lab.agent("stub").stdout
    took = time.monotonic() - t0
    assert f"points at {TUNNEL}" in said
    now = lab.resolv_conf()
    assert nameservers(now) == [TUNNEL], now
    assert search(now) == ["lab.test"], now
    assert lab.records()[0] == RECORD  # sorts first
    entry = journal(lab)
    assert entry is not None and entry["backend"] == "resolvconf"
    entries = entry["entries"]
    assert isinstance(entries, list) and str(entries[0].pop("program")).endswith("/resolvconf")
    assert entries == [
        {
            "record": RECORD,
            "implementation": lab.kind,
            "existed": False,
            "added": True,
            "nameservers": [TUNNEL],
        }
    ]
    lab.agent("stub")  # again (a restart): same result, the journal keeps what was first
    assert nameservers(lab.resolv_conf()) == [TUNNEL]
    again = journal(lab)
    assert again is not None and again["entries"][0]["existed"] is False  # type: ignore[index]

    said = lab.agent("restore").stdout
    assert f"record {RECORD} removed" in said and "198.51.100.1" in said, said
    assert lab.resolv_conf() == before
    assert RECORD not in lab.records()
    assert journal(lab) is None
    assert lab.agent("restore").stdout.startswith("nothing to restore")
    print(f"{lab.kind}: dnstls-agent stub took {took:.2f}s", file=sys.stderr)


def test_the_network_rewriting_its_record_does_not_come_back_before_the_tunnel(
    lab: ResolvconfLab,
) -> None:
    lab.agent("stub")
    # a DHCP renewal with other resolvers and domains; a second interface coming up
    lab.add(
        OTHER[lab.kind],
        "nameserver 198.51.100.2\nnameserver 198.51.100.3\nsearch lab.test corp.test\n",
    )
    lab.add("wlan0", "nameserver 203.0.113.1\nsearch wifi.test\n")
    now = lab.resolv_conf()
    assert nameservers(now) == [TUNNEL], now
    assert search(now) == ["lab.test", "corp.test", "wifi.test"], now
    lab.delete("wlan0")
    assert nameservers(lab.resolv_conf()) == [TUNNEL]
    lab.agent("restore")
    after = lab.resolv_conf()
    assert nameservers(after) == ["198.51.100.2", "198.51.100.3"], after  # the network's, current
    assert search(after) == ["lab.test", "corp.test"]


def test_a_setting_that_would_leak_is_refused_and_nothing_is_left(lab: ResolvconfLab) -> None:
    """With the administrator's setting that lists the network's nameservers after a
    loopback one, `stub` fails, says which setting, and takes its record back."""
    before = lab.resolv_conf()
    if lab.kind == "debian":
        lab.write("/etc/default/resolvconf", "TRUNCATE_NAMESERVER_LIST_AFTER_LOOPBACK_ADDRESS=no\n")
        setting = "TRUNCATE_NAMESERVER_LIST_AFTER_LOOPBACK_ADDRESS"
    else:
        lab.write("/etc/resolvconf.conf", "resolv_conf_local_only=NO\n", append=True)
        setting = "resolv_conf_local_only"
    res = lab.agent("stub", check=False)
    assert res.returncode != 0
    assert setting in res.stderr and "198.51.100.1" in res.stderr, res.stderr
    assert lab.resolv_conf() == before
    assert RECORD not in lab.records()
    assert "no resolvconf record" in lab.agent("restore").stdout
    assert journal(lab) is None


def test_killed_between_the_record_and_the_journal_entry(lab: ResolvconfLab) -> None:
    """SIGKILL right after `resolvconf -a`, before the journal says so: the journal
    written before the change is enough for `restore` from a fresh process."""
    before = lab.resolv_conf()
    mark = lab.dir / "record-added"
    wrapper = lab.dir / "resolvconf-then-hang"
    wrapper.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            /sbin/resolvconf "$@" || exit $?
            if [ "$1" = -a ]; then touch {mark}; exec sleep 60; fi
            """
        )
    )
    wrapper.chmod(0o755)
    script = textwrap.dedent(
        f"""\
        from pathlib import Path
        from agent import sysconf
        from agent.sysconf.resolvconf import ResolvconfBackend
        backend = ResolvconfBackend(program={str(wrapper)!r})
        sysconf.apply(Path({str(lab.state_dir)!r}), backend, [{TUNNEL!r}])
        """
    )
    proc = lab.start([sys.executable, "-c", script], "apply")
    proc.wait_until(mark.exists, 30, "apply up to resolvconf -a")
    os.killpg(proc.pid, signal.SIGKILL)  # the agent and its resolvconf, as a crash would
    proc.popen.wait(10)
    assert nameservers(lab.resolv_conf()) == [TUNNEL]  # the change was made
    entry = journal(lab)
    assert entry is not None and entry["backend"] == "resolvconf"
    assert "added" not in entry["entries"][0]  # type: ignore[index]  # journalled before

    said = lab.agent("restore").stdout
    assert f"record {RECORD} removed" in said, said
    assert lab.resolv_conf() == before
    assert journal(lab) is None


def test_killed_while_pointed_and_a_leftover_record(lab: ResolvconfLab) -> None:
    """The agent dies while the stub points at it: `restore` puts the network's back.
    A record of ours found with no journal (the journal lost) is a leftover: removed too."""
    before = lab.resolv_conf()
    lab.add(RECORD, f"nameserver {TUNNEL}\n")  # left by a run whose state is gone
    lab.agent("stub")
    entry = journal(lab)
    assert entry is not None and entry["entries"][0]["existed"] is True  # type: ignore[index]
    said = lab.agent("restore").stdout
    assert "leftover" in said, said
    assert lab.resolv_conf() == before
