"""What NetworkManager (1.42 on Debian 12) does with DNR (RFC 9463), pinned against the real
thing, so that a change in NM's behaviour is noticed: a real NM on a private bus
(tests/lab/nmlab.py) gets DHCP from dnsmasq, which sends DHCPv4 option 162 and DHCPv6
option 144 whether asked for them or not (`dhcp-option-force`).

- NM's internal DHCP clients (its default): option 162 (and 144) reach the machine but
  appear nowhere in the DHCP4Config (DHCP6Config) Options, nor in `nmcli`. The same bytes
  sent as option 224 do appear, as `private_224` (NM 1.42 lists by name what it knows and
  passes 224..254 raw, src/core/dhcp/nm-dhcp-nettools.c, lease_parse_private_options).
- NM's dhclient backend (`dhcp=dhclient`): dhclient has no name for 162 (144), so it hands
  the option to NM's helper as `unknown_162` (`dhcp6_unknown_144`), in its hex form with
  the leading zeros dropped ("0:1e:0:1:..."), and NM puts it in the Options as it is. The
  watcher (agent/watchers/nm.py) reads it: the designated resolvers come first, origin DNR.

Besides, the origins of the plain resolvers: DHCP for what DHCP handed out, CONFIGURED for
the connection profile's own ipv4.dns and ipv6.dns (the latter read from the applied
connection: with ipv6.method auto, an IPv6 resolver NM has from neither is the RA's).

Needs root, NetworkManager, dnsmasq, dbus-daemon, dhclient (isc-dhcp-client).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.dns.dnr import DnrInstance, encode_v4, encode_v6
from agent.model import Link, NetResolver, Origin, Source
from agent.watchers.nm import NMWatcher, option_bytes
from tests.conftest import host_untouched, run
from tests.lab.netns import SRV_IPS
from tests.lab.nmlab import (
    CONNECTION_ID,
    DEVICE_IFACE,
    SRV_IP6,
    NMLab,
    connect,
    get_property,
)

pytestmark = pytest.mark.system

PROGRAMS = ("ip", "NetworkManager", "nmcli", "dnsmasq", "dbus-daemon", "nsenter", "unshare")
DHCP_DNS = SRV_IPS[0]  # option 6
DESIGNATED = SRV_IPS[1]  # only in option 162
STATIC_V4, STATIC_V6 = "198.51.100.9", "2001:db8::9"  # the profile's own ipv4.dns, ipv6.dns
DESIGNATED_V6 = "2001:db8::2"
ADN = "dns.lab.test"
V4 = encode_v4(
    [
        DnrInstance(2, "backup.lab.test", (DHCP_DNS,), ("dot",)),
        DnrInstance(1, ADN, (DESIGNATED,), ("dot",), port=8853),
    ]
)
V6 = encode_v6(DnrInstance(1, ADN, (DESIGNATED_V6,), ("dot",)))


def colon_hex(data: bytes) -> str:
    return ":".join(f"{b:02x}" for b in data)


class DnrLab(NMLab):
    """The NM lab, with dnsmasq forcing DNR options on NM, which runs `client` as its DHCP
    client; the connection profile may carry DNS servers of its own."""

    def __init__(
        self,
        directory: Path,
        *,
        client: str = "internal",
        profile_dns: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(directory, **kwargs)
        self.client = client
        self.profile_dns = list(profile_dns)

    def _write_dnsmasq_config(self) -> None:
        super()._write_dnsmasq_config()
        conf = self.dir / "srv/dnsmasq.conf"
        extra = f"dhcp-option-force=162,{colon_hex(V4)}\ndhcp-option-force=224,{colon_hex(V4)}\n"
        if self.ipv6:
            extra += f"dhcp-option-force=option6:144,{colon_hex(V6)}\n"
        conf.write_text(conf.read_text() + extra)

    def _write_nm_config(self) -> None:
        super()._write_nm_config()
        conf = self.dir / "etc-nm/NetworkManager.conf"
        conf.write_text(conf.read_text().replace("dhcp=internal\n", f"dhcp={self.client}\n"))
        keyfile = self.dir / f"etc-nm/system-connections/{CONNECTION_ID}.nmconnection"
        text = keyfile.read_text()
        for family, section in ((4, "[ipv4]\n"), (6, "[ipv6]\n")):
            mine = [a for a in self.profile_dns if (":" in a) == (family == 6)]
            if mine:
                text = text.replace(section, f"{section}dns={';'.join(mine)};\n")
        keyfile.write_text(text)

    def dnsmasq_log(self) -> str:
        return (self.logs / "dnsmasq.log").read_text(errors="replace")

    def options(self, family: int) -> dict[str, str]:
        """The DHCP4Config (DHCP6Config) Options; {} while there is none."""

        async def get() -> dict[str, str]:
            bus = await connect(self.bus_address)
            try:
                path = await get_property(
                    bus, self.device_path, DEVICE_IFACE, f"Dhcp{family}Config"
                )
                if path == "/":
                    return {}
                iface = f"org.freedesktop.NetworkManager.DHCP{family}Config"
                opts: dict[str, str] = await get_property(bus, path, iface, "Options")
                return opts
            finally:
                bus.disconnect()

        return run(get())

    def link(self, ready: Callable[[Link], bool], timeout: float = 30) -> Link:
        """The watcher's Link for the lab's device, once `ready` holds."""

        async def poll() -> Link:
            w = NMWatcher(lambda _s: None, bus_address=self.bus_address)
            await w.connect()
            try:
                while True:
                    link = (await w.snapshot()).links.get(self.ifname)
                    if link is not None and ready(link):
                        return link
                    await asyncio.sleep(0.2)
            finally:
                bus: Any = w.bus
                bus.disconnect()

        try:
            return run(poll(), timeout)
        except TimeoutError:
            raise AssertionError(f"no such link; options: {self.options(4)}") from None


@pytest.fixture
def programs() -> Iterator[None]:
    with host_untouched(PROGRAMS):
        yield


def nm_version() -> str:
    out = subprocess.run(
        ["NetworkManager", "--version"], capture_output=True, text=True, check=False
    )
    return out.stdout.strip()


def carries(options: dict[str, str], payload: bytes) -> list[str]:
    """The option keys whose value is `payload` (NM's hex or dhclient's)."""
    out = []
    for key, value in options.items():
        try:
            if option_bytes(value) == payload:
                out.append(key)
        except ValueError:
            continue
    return sorted(out)


def wait_for(what: str, ok: Callable[[], bool], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > end:
            raise AssertionError(f"no {what} after {timeout}s")
        time.sleep(0.2)


def test_internal_client_shows_no_dhcpv4_dnr(tmp_path: Path, programs: None) -> None:
    """Option 162 is on the wire, NM's internal client drops it; 224, same bytes, shows."""
    lab = DnrLab(tmp_path, dns=[DHCP_DNS], profile_dns=[STATIC_V4])
    with lab:
        log = lab.dnsmasq_log()
        assert "option:162" in log and "option:224" in log  # sent, in the OFFER and the ACK
        options = lab.options(4)
        version = nm_version()
        # what NM 1.42 does: only the private-range copy is there, as NM's own hex
        assert carries(options, V4) == ["private_224"], (version, options)
        assert options["private_224"] == colon_hex(V4)
        assert not [k for k in options if "162" in k or "dnr" in k.lower()], (version, options)
        shown = lab.nmcli("-f", "DHCP4", "device", "show", lab.ifname).stdout
        assert f"private_224 = {colon_hex(V4)}" in shown
        assert "162" not in shown
        # so the watcher has no designated resolver, only the plain ones with their origins
        link = lab.link(lambda li: len(li.resolvers) == 2)
        assert sorted((r.address, r.origin) for r in link.resolvers) == [
            (DHCP_DNS, Origin.DHCP),
            (STATIC_V4, Origin.CONFIGURED),
        ], link.resolvers
        assert not any(r.designated for r in link.resolvers)


def test_dhclient_backend_passes_dhcpv4_dnr_on(tmp_path: Path, programs: None) -> None:
    """With dhcp=dhclient, 162 is `unknown_162` in dhclient's hex; the watcher puts its
    DoT resolvers first, best priority first."""
    lab = DnrLab(tmp_path, dns=[DHCP_DNS], client="dhclient")
    with lab:
        options = lab.options(4)
        assert "unknown_162" in options, (nm_version(), options)
        assert option_bytes(options["unknown_162"]) == V4
        assert options["unknown_162"] != colon_hex(V4)  # dhclient's form: no leading zeros
        assert options["unknown_162"].startswith("0:")
        link = lab.link(lambda li: any(r.designated for r in li.resolvers))
        assert link.resolvers == (
            NetResolver(DESIGNATED, ADN, 8853, True, Source.NM, Origin.DNR, 1),
            NetResolver(DHCP_DNS, "backup.lab.test", 853, True, Source.NM, Origin.DNR, 2),
            NetResolver(DHCP_DNS, source=Source.NM, origin=Origin.DHCP),
        )


@pytest.mark.parametrize("client", ["internal", "dhclient"])
def test_dhcpv6_dnr_and_ipv6_origins(tmp_path: Path, programs: None, client: str) -> None:
    """Option 144 in the DHCPv6 reply (stateless, after dnsmasq's RA): NM's internal client
    drops it, dhclient's backend passes it on as `dhcp6_unknown_144`. The DHCPv6 server is
    DHCP's, the profile's own ipv6.dns CONFIGURED although ipv6.method is auto."""
    dns = [DHCP_DNS, SRV_IP6]
    lab = DnrLab(tmp_path, dns=dns, ipv6=True, client=client, profile_dns=[STATIC_V6])
    with lab:
        wait_for("DHCPv6 options", lambda: "dhcp6_name_servers" in lab.options(6))
        log = lab.dnsmasq_log()
        assert "option:144" in log
        options = lab.options(6)
        keys = carries(options, V6)
        if client == "internal":
            assert keys == [], (nm_version(), options)
            assert not [k for k in options if "144" in k or "dnr" in k.lower()], options
        else:
            assert keys == ["dhcp6_unknown_144"], (nm_version(), options)

        def complete(link: Link) -> bool:
            return {SRV_IP6, STATIC_V6} <= {r.address for r in link.resolvers}

        link = lab.link(complete)
        origins = {(r.address, r.origin) for r in link.resolvers if not r.designated}
        assert origins >= {
            (DHCP_DNS, Origin.DHCP),
            (SRV_IP6, Origin.DHCP),
            (STATIC_V6, Origin.CONFIGURED),
        }, link.resolvers
        designated = [r for r in link.resolvers if r.designated]
        if client == "internal":
            assert designated == []
        else:
            assert NetResolver(DESIGNATED_V6, ADN, 853, True, Source.NM, Origin.DNR, 1) in (
                designated
            )
            first = len(designated)
            assert all(r.designated for r in link.resolvers[:first])  # before the plain ones
