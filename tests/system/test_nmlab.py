"""The NetworkManager lab itself (tests/lab/nmlab.py), before anything is tested with it.

A real NM in a namespace gets a DHCP lease from dnsmasq, and DnsManager.Configuration, read
with dbus-next over the private bus from outside, lists the DHCP DNS server for the lab's
interface; a new DNS option plus a renewal changes it, with a PropertiesChanged signal; NM's
resolv.conf lands in the lab, and nothing of the host (resolv.conf, hostname, mounts,
namespaces, processes) is touched or left behind, also when the start-up fails half-way.

Needs root and NetworkManager, dnsmasq, dbus-daemon (runs in CI).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.dbus import MessageType
from tests.conftest import require_program, require_root, run
from tests.lab.machine import Holder, pid_alive
from tests.lab.netns import SRV_IPS
from tests.lab.nmlab import (
    CONNECTION_UUID,
    DNS_IFACE,
    DNS_PATH,
    DOMAIN,
    HOSTNAME,
    NMLab,
    add_match,
    connect,
    dns_configuration,
    nameservers,
    unwrap,
)

pytestmark = pytest.mark.system

OLD, NEW = SRV_IPS[0], "198.51.100.3"
PROGRAMS = ("ip", "NetworkManager", "nmcli", "dnsmasq", "dbus-daemon", "nsenter", "unshare")


@dataclass(frozen=True)
class Host:
    """What of the host the lab must not change."""

    resolv_conf: bytes
    resolv_stat: tuple[int, int, int]
    hostname: str

    @classmethod
    def now(cls) -> Host:
        st = os.lstat("/etc/resolv.conf")
        return cls(
            Path("/etc/resolv.conf").read_bytes(),
            (st.st_ino, st.st_mtime_ns, st.st_mode),
            socket.gethostname(),
        )


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    require_root()
    for program in PROGRAMS:
        require_program(program)
    before = Host.now()
    yield before
    assert Host.now() == before
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()


@dataclass(frozen=True)
class Traces:
    """What a lab leaves to look for once it is gone."""

    dir: Path
    pids: tuple[int, ...]
    netns: tuple[str, str]
    mount_ns: int

    @classmethod
    def of(cls, lab: NMLab) -> Traces:
        return cls(lab.dir, tuple(lab.pids()), (lab.srv_name, lab.cli_name), lab.mount_ns)

    def assert_gone(self) -> None:
        for pid in self.pids:
            assert not pid_alive(pid), f"pid {pid} still running"
        listed = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True
        ).stdout
        for name in self.netns:
            assert name not in listed
        assert not any(_in_mount_ns(pid, self.mount_ns, self.dir) for pid in _all_pids())


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _in_mount_ns(pid: int, mount_ns: int, lab_dir: Path) -> bool:
    """A process still in the lab's mount namespace (its inode and its lab mounts: an
    inode number alone may already be reused by a namespace of someone else)."""
    try:
        if os.stat(f"/proc/{pid}/ns/mnt").st_ino != mount_ns:
            return False
        return str(lab_dir) in Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        return False


async def read_configuration(address: str) -> list[dict[str, Any]]:
    bus = await connect(address)
    try:
        return await dns_configuration(bus)
    finally:
        bus.disconnect()


def test_lease_dns_configuration_and_resolv_conf(tmp_path: Path, host: Host) -> None:
    with NMLab(tmp_path, dns=[OLD]) as lab:
        traces = Traces.of(lab)
        assert lab.startup_seconds < 10, lab.timings

        config = run(read_configuration(lab.bus_address))
        mine = [entry for entry in config if entry.get("interface") == lab.ifname]
        assert [entry["nameservers"] for entry in mine] == [[OLD]], config
        assert mine[0]["domains"] == [DOMAIN]
        assert mine[0]["vpn"] is False

        options = lab.dhcp4_options()
        assert options["domain_name_servers"] == OLD
        assert options["ip_address"].startswith("198.51.100.")

        resolv = lab.resolv_conf()
        assert f"nameserver {OLD}" in resolv.splitlines()
        assert lab.resolv_conf_path.read_text() == resolv  # it lands in the lab's directory
        # inside the machine: NM's resolv.conf, the private bus as the system bus, its hostname
        assert lab.machine is not None
        assert lab.machine.run(["cat", "/etc/resolv.conf"]).stdout == resolv
        assert lab.machine.run(["hostname"]).stdout.strip() == HOSTNAME
        inside = lab.machine.run(["nmcli", "-t", "-f", "DEVICE,STATE,CON-UUID", "device"]).stdout
        assert f"{lab.ifname}:connected:{CONNECTION_UUID}" in inside.splitlines()
        # in the plain client namespace (where the agent runs), through the bus address
        assert lab.cli is not None
        outside = lab.cli.run(
            ["env", f"DBUS_SYSTEM_BUS_ADDRESS={lab.bus_address}", "nmcli", "-t", "device"]
        ).stdout
        assert f"{lab.ifname}:ethernet:connected:nmlab-dhcp" in outside.splitlines()
        assert lab.nm_pid is not None
        assert Path(f"/proc/{lab.nm_pid}/comm").read_text().strip() == "NetworkManager"
        # none of the lab's mounts shows on the host
        assert str(lab.dir) not in Path("/proc/self/mountinfo").read_text()
        assert socket.gethostname() == host.hostname
    traces.assert_gone()


def test_new_dns_option_and_renewal_change_the_configuration(tmp_path: Path, host: Host) -> None:
    with NMLab(tmp_path, dns=[OLD]) as lab:
        traces = Traces.of(lab)
        lab.add_srv_address(NEW)

        async def follow() -> tuple[list[str], list[list[str]]]:
            bus = await connect(lab.bus_address)
            seen: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

            def on_message(msg: Any) -> None:
                if (
                    msg.message_type == MessageType.SIGNAL
                    and msg.member == "PropertiesChanged"
                    and msg.path == DNS_PATH
                    and msg.body[0] == DNS_IFACE
                ):
                    seen.put_nowait(unwrap(msg.body[1]))

            bus.add_message_handler(on_message)
            try:
                rule = (
                    "type='signal',interface='org.freedesktop.DBus.Properties',"
                    f"member='PropertiesChanged',path='{DNS_PATH}'"
                )
                await add_match(bus, rule)
                before = nameservers(await dns_configuration(bus), lab.ifname)  # after AddMatch
                await asyncio.to_thread(lab.set_dns, [NEW])
                await asyncio.to_thread(lab.renew)
                steps: list[list[str]] = []
                while NEW not in (steps[-1] if steps else []):
                    changed = await seen.get()
                    if "Configuration" in changed:
                        steps.append(nameservers(changed["Configuration"], lab.ifname))
                return before, steps
            finally:
                bus.disconnect()

        before, steps = run(follow(), timeout=60)
        assert before == [OLD]
        assert steps[-1] == [NEW]
        assert lab.wait_dns(NEW, 10) == lab.dns_configuration()
        assert lab.wait_dns(OLD, 10, present=False)
        assert lab.dhcp4_options()["domain_name_servers"] == NEW
        lines = lab.resolv_conf().splitlines()
        assert f"nameserver {NEW}" in lines
        assert f"nameserver {OLD}" not in lines
    traces.assert_gone()


DISPATCHER = """#!/bin/sh
echo "$1 $2 $NMLAB_MARK" >> "$NMLAB_EVENTS"
"""


def test_dns_none_and_dispatcher(tmp_path: Path, host: Host) -> None:
    script = tmp_path / "50-record"
    script.write_text(DISPATCHER)
    events = tmp_path / "events"
    env = {"NMLAB_EVENTS": str(events), "NMLAB_MARK": "it's me"}
    deep = tmp_path / ("deep" * 16)  # too long a path for a socket: the lab uses a symlink
    with NMLab(deep, dns=[OLD], nm_dns="none", dispatcher=script, dispatcher_env=env) as lab:
        traces = Traces.of(lab)
        short = Path(lab.bus_address.removeprefix("unix:path="))
        assert short.is_symlink()
        assert short.resolve() == lab.bus_socket
        assert nameservers(lab.dns_configuration(), lab.ifname) == [OLD]
        assert lab.resolv_conf() == ""  # dns=none: NM leaves resolv.conf alone
        end = time.monotonic() + 10
        want = f"{lab.ifname} up it's me"
        while want not in _lines(events) and time.monotonic() < end:
            time.sleep(0.05)
        assert want in _lines(events)
        traces = Traces.of(lab)  # now with the dispatcher's PID
        assert len(traces.pids) > 4
    traces.assert_gone()
    assert not short.parent.exists()


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def test_failed_start_leaves_nothing(
    tmp_path: Path, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Everything is up (NM activated, the dispatcher activated) when __enter__ fails."""
    seen: list[Traces] = []
    ready = NMLab._wait_ready

    async def then_fail(self: NMLab, mark: Any) -> None:
        await ready(self, mark)
        seen.append(Traces.of(self))
        raise RuntimeError("injected")

    monkeypatch.setattr(NMLab, "_wait_ready", then_fail)
    lab = NMLab(tmp_path, dns=[OLD])
    with pytest.raises(RuntimeError, match="injected"), lab:
        pytest.fail("not reached")
    assert seen
    seen[0].assert_gone()
    assert lab.srv is None
    assert lab.cli is None


def test_etc_upper_on_tmpfs_when_overlay_fails(
    tmp_path: Path, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the lab directory cannot be an overlay's upper layer (itself on overlayfs, as
    in some containers), the upper layer goes on a tmpfs only the machine sees."""
    real = Holder.run

    def refuse_lab_dir_upper(
        self: Holder, *argv: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        if "overlay" in argv and any("upperdir=" in a and "/etc-upper," in a for a in argv):
            return subprocess.CompletedProcess(list(argv), 32, "", "mount: injected failure")
        return real(self, *argv, check=check)

    monkeypatch.setattr(Holder, "run", refuse_lab_dir_upper)
    with NMLab(tmp_path, dns=[OLD]) as lab:
        traces = Traces.of(lab)
        assert (lab.dir / "etc-upper-is-on-tmpfs").exists()
        assert f"nameserver {OLD}" in lab.resolv_conf().splitlines()
        assert lab.resolv_conf_path.read_text() == ""  # not in the lab directory this time
    traces.assert_gone()
