"""NetworkManager over D-Bus: per-interface resolvers, domains, priority, VPN; connectivity.

The watcher subscribes first (AddMatch), then reads a full snapshot, and reads a new
snapshot whenever NM says something relevant changed (DnsManager, devices, DHCP and
IP configs, connectivity, active connections) or NM itself reappears
(NameOwnerChanged). Each snapshot replaces the previous one as a whole: the engine
sweeps what is gone. It reports facts only; it decides nothing.

Where each resolver came from (`NetResolver.origin`): an address among the DHCP4Config's
`domain_name_servers` or the DHCP6Config's `dhcp6_name_servers` is DHCP's; any other is
the connection profile's own (CONFIGURED), except an IPv6 one on a device whose applied
profile has ipv6.method "auto" and does not list it itself: that came with a router
advertisement (RA). NM does not say which RA, nor whether one at all: that is inferred.

DNR (RFC 9463) through NetworkManager 1.42: its internal DHCP clients (the default) neither
ask for DHCPv4 option 162 or DHCPv6 option 144 nor show them, even when the server sends
them unasked (DHCPv4: only the options it knows by name, and 224..254 raw as
`private_NNN`); with `dhcp=dhclient` the DHCP4Config carries 162 as `unknown_162` and the
DHCP6Config 144 as `dhcp6_unknown_144`, in dhclient's hex ("0:1e:c6:..": octets without
their leading zeros). Those are read, and their encrypted resolvers come first (origin
DNR). tests/system/test_dnr_nm.py pins these behaviours.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agent import dbus
from agent.dbus import BusType, Message, MessageBus, MessageType, Variant
from agent.dns import dnr
from agent.errors import AgentError
from agent.model import Link, NetResolver, Origin, Source

LOG = logging.getLogger(__name__)

NM = "org.freedesktop.NetworkManager"
NM_PATH = "/org/freedesktop/NetworkManager"
DNS_PATH = f"{NM_PATH}/DnsManager"
PROPS = "org.freedesktop.DBus.Properties"
DBUS = "org.freedesktop.DBus"
ACTIVATED = 100  # NM_DEVICE_STATE_ACTIVATED
CONNECTIVITY = {0: "unknown", 1: "none", 2: "portal", 3: "limited", 4: "full"}
# DHCP4Config/DHCP6Config keys that carry DNR (DHCPv4 162, DHCPv6 144): NM's dhclient backend
# passes on what dhclient has no name for as unknown_NNN (dhcp6_unknown_NNN); NM's internal
# clients show nothing of either (1.42)
DNR_V4_KEYS = ("unknown_162",)
DNR_V6_KEYS = ("dhcp6_unknown_144",)
_HEX_OCTET = re.compile(r"[0-9A-Fa-f]{1,2}")
MATCHES = (
    f"type='signal',sender='{NM}',interface='{PROPS}',member='PropertiesChanged'",
    f"type='signal',sender='{NM}',interface='{NM}.Device',member='StateChanged'",
    f"type='signal',sender='{DBUS}',interface='{DBUS}',member='NameOwnerChanged',arg0='{NM}'",
)


@dataclass(frozen=True)
class NMSnapshot:
    links: dict[str, Link] = field(default_factory=dict)
    connectivity: str = "unknown"
    running: bool = True  # False: NetworkManager is not on the bus


def unwrap(v: Any) -> Any:
    if isinstance(v, Variant):
        return unwrap(v.value)
    if isinstance(v, dict):
        return {k: unwrap(x) for k, x in v.items()}
    if isinstance(v, list):
        return [unwrap(x) for x in v]
    return v


def _resolvers(values: list[str]) -> tuple[NetResolver, ...]:
    out = []
    for text in values:
        try:
            out.append(NetResolver.parse(text, Source.NM))
        except ValueError:
            LOG.warning("NetworkManager gave an unusable nameserver %r", text)
    return tuple(out)


def _addresses(text: str) -> frozenset[str]:
    """The addresses of a DHCP4Config/DHCP6Config list ("a b c"), normalised."""
    out = set()
    for word in text.split():
        with contextlib.suppress(ValueError):
            out.add(str(ipaddress.ip_address(word)))
    return frozenset(out)


def option_bytes(text: str) -> bytes:
    """An option NM shows as colon-separated hex: its own form ("00:1e:c6") or dhclient's
    for an option it has no format for ("0:1e:c6"). ValueError if it is neither."""
    parts = text.strip().split(":")
    if not all(_HEX_OCTET.fullmatch(p) for p in parts):
        raise ValueError(f"not colon-separated hex octets: {text[:40]!r}")
    return bytes(int(p, 16) for p in parts)


def dnr_resolvers(options: dict[str, str], family: int = 4) -> tuple[NetResolver, ...]:
    """The encrypted resolvers of the DNR option among a DHCP4Config's (family 4: option
    162) or DHCP6Config's (6: option 144) Options; () when there is none or it is unusable."""
    keys, parse = (DNR_V4_KEYS, dnr.parse_v4) if family == 4 else (DNR_V6_KEYS, dnr.parse_v6)
    for key in keys:
        text = options.get(key)
        if not text:
            continue
        try:
            return dnr.resolvers(parse(option_bytes(text)), Source.NM)
        except ValueError as exc:  # dnr.DnrError is one
            LOG.warning("NetworkManager's DHCPv%d DNR (%s) is unusable: %s", family, key, exc)
    return ()


@dataclass(frozen=True)
class Applied:
    """What of a device's applied connection profile tells where its resolvers came from."""

    ipv6_method: str | None = None
    dns: frozenset[str] = frozenset()  # the profile's own ipv6.dns

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> Applied:
        """From GetAppliedConnection's a{sa{sv}} (unwrapped; ipv6.dns is aay). IPv4 needs
        nothing of it: an IPv4 resolver not from DHCP is the profile's own anyway."""
        ip6 = settings.get("ipv6", {})
        dns: set[str] = set()
        for raw in ip6.get("dns", []):
            with contextlib.suppress(ValueError, TypeError):
                dns.add(str(ipaddress.IPv6Address(bytes(raw))))
        method = ip6.get("method")
        return cls(method if isinstance(method, str) else None, frozenset(dns))


def origin(address: str, dhcp: frozenset[str], applied: Applied | None) -> Origin:
    """Where NM got `address` from (the module docstring); NETWORK when the profile could
    not be read."""
    if address in dhcp:
        return Origin.DHCP
    if applied is None:
        return Origin.NETWORK
    if ":" in address and address not in applied.dns and applied.ipv6_method == "auto":
        return Origin.RA
    return Origin.CONFIGURED


class NMWatcher:
    def __init__(
        self,
        on_snapshot: Callable[[NMSnapshot], None],
        *,
        bus_address: str | None = None,
        debounce: float = 0.05,
    ) -> None:
        self.on_snapshot = on_snapshot
        self.bus_address = bus_address or None
        self.debounce = debounce
        self.bus: MessageBus | None = None
        self._dirty = asyncio.Event()

    # -- talking to the bus -----------------------------------------------------------------
    async def _call(
        self,
        path: str,
        iface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        dest: str = NM,
    ) -> list[Any]:
        assert self.bus is not None
        return await dbus.call(
            self.bus, path, iface, member, signature, body, dest=dest, error=NMError
        )

    async def _get(self, path: str, iface: str, prop: str) -> Any:
        return unwrap((await self._call(path, PROPS, "Get", "ss", [iface, prop]))[0])

    async def _get_all(self, path: str, iface: str) -> dict[str, Any]:
        result: dict[str, Any] = unwrap((await self._call(path, PROPS, "GetAll", "s", [iface]))[0])
        return result

    # -- the snapshot -----------------------------------------------------------------------------
    async def snapshot(self) -> NMSnapshot:
        """Everything NetworkManager says about DNS, now."""
        if not await self._nm_running():
            return NMSnapshot(running=False)
        dns = await self._get_all(DNS_PATH, f"{NM}.DnsManager")
        manager = await self._get_all(NM_PATH, NM)
        per_if: dict[str, dict[str, Any]] = {}
        for entry in dns.get("Configuration", []):
            name = entry.get("interface")
            if name and name not in per_if:  # NM lists an interface once per IP family
                per_if[name] = dict(entry)
            elif name:
                per_if[name]["nameservers"] = per_if[name].get("nameservers", []) + entry.get(
                    "nameservers", []
                )
                per_if[name]["domains"] = per_if[name].get("domains", []) + entry.get("domains", [])
        links: dict[str, Link] = {}
        for dpath in manager.get("Devices", []):
            with contextlib.suppress(NMError):  # a device may vanish between the calls
                link = await self._device(dpath, per_if)
                if link is not None:
                    links[link.ifname] = link
        return NMSnapshot(links, CONNECTIVITY.get(int(manager.get("Connectivity", 0)), "unknown"))

    async def _device(self, dpath: str, per_if: dict[str, dict[str, Any]]) -> Link | None:
        dev = await self._get_all(dpath, f"{NM}.Device")
        name = dev.get("IpInterface") or dev.get("Interface")
        if not name or name == "lo":
            return None
        state = int(dev.get("State", 0))
        conn_id = conn_uuid = ssid = None
        vpn = False
        active = dev.get("ActiveConnection", "/")
        if active != "/":
            ac = await self._get_all(active, f"{NM}.Connection.Active")
            conn_id, conn_uuid, vpn = ac.get("Id"), ac.get("Uuid"), bool(ac.get("Vpn"))
        if int(dev.get("DeviceType", 0)) == 2:  # Wi-Fi
            ap = await self._get(dpath, f"{NM}.Device.Wireless", "ActiveAccessPoint")
            if ap and ap != "/":
                raw = await self._get(ap, f"{NM}.AccessPoint", "Ssid")
                ssid = bytes(raw).decode("utf-8", "replace")
        entry = per_if.get(name, {})
        nameservers: list[str] = list(entry.get("nameservers", []))
        dhcp_server = None
        dhcp: frozenset[str] = frozenset()  # what DHCP (v4 option 6, DHCPv6) handed out
        designated: tuple[NetResolver, ...] = ()
        if dev.get("Dhcp4Config", "/") != "/":
            opts = await self._get(dev["Dhcp4Config"], f"{NM}.DHCP4Config", "Options")
            dhcp_server = opts.get("dhcp_server_identifier")
            dhcp |= _addresses(opts.get("domain_name_servers") or "")
            designated = dnr_resolvers(opts)
            if not entry and opts.get("domain_name_servers"):
                nameservers = opts["domain_name_servers"].split()
        if dev.get("Dhcp6Config", "/") != "/":
            opts6 = await self._get(dev["Dhcp6Config"], f"{NM}.DHCP6Config", "Options")
            dhcp |= _addresses(opts6.get("dhcp6_name_servers") or "")
            designated += dnr_resolvers(opts6, 6)
            if not entry:
                nameservers += (opts6.get("dhcp6_name_servers") or "").split()
        plain = _resolvers(nameservers)
        applied = None
        if any(r.address not in dhcp for r in plain):
            applied = await self._applied(dpath)
        plain = tuple(
            dataclasses.replace(r, origin=origin(r.address, dhcp, applied)) for r in plain
        )
        return Link(
            name,
            up=state == ACTIVATED,
            resolvers=designated + plain,
            domains=tuple(d.rstrip(".") for d in entry.get("domains", [])),
            vpn=bool(entry.get("vpn", vpn)),
            priority=int(entry.get("priority", 100)),
            default_route=bool(
                dev.get("Ip4Config", "/") != "/" and entry.get("priority", 100) >= 0
            ),
            connection_id=conn_id,
            connection_uuid=conn_uuid,
            ssid=ssid,
            dhcp_server=dhcp_server,
        )

    async def _applied(self, dpath: str) -> Applied | None:
        """The device's applied connection profile, as far as origins need it; None when
        NM does not give it (no connection, or one the caller may not see)."""
        try:
            settings, _version = await self._call(
                dpath, f"{NM}.Device", "GetAppliedConnection", "u", [0]
            )
        except NMError as exc:
            LOG.debug("no applied connection for %s: %s", dpath, exc)
            return None
        return Applied.from_settings(unwrap(settings))

    async def _nm_running(self) -> bool:
        (has,) = await self._call(
            "/org/freedesktop/DBus", DBUS, "NameHasOwner", "s", [NM], dest=DBUS
        )
        return bool(has)

    # -- following ------------------------------------------------------------------------------
    def _on_message(self, msg: Message) -> None:
        if msg.message_type == MessageType.SIGNAL:
            self._dirty.set()

    async def connect(self) -> None:
        if self.bus_address:
            bus = MessageBus(bus_address=self.bus_address)
        else:
            bus = MessageBus(bus_type=BusType.SYSTEM)
        self.bus = await bus.connect()
        self.bus.add_message_handler(self._on_message)
        for rule in MATCHES:  # subscribe before the first snapshot: no change falls between
            await self._call("/org/freedesktop/DBus", DBUS, "AddMatch", "s", [rule], dest=DBUS)

    async def run(
        self, reconnect_after: Callable[[int], float] = lambda n: min(30.0, 0.5 * 2**n)
    ) -> None:
        """Follow NetworkManager for ever: reconnect to the bus when it goes away."""
        attempt = 0
        while True:
            try:
                await self.connect()
                attempt = 0
                await self._follow()
            except (OSError, NMError, EOFError) as exc:
                level = logging.WARNING if attempt == 0 else logging.DEBUG
                LOG.log(level, "NetworkManager bus: %s; retrying", exc)
            finally:
                if self.bus is not None:
                    self.bus.disconnect()
                    self.bus = None
            await asyncio.sleep(reconnect_after(attempt))
            attempt += 1

    async def _follow(self) -> None:
        assert self.bus is not None
        gone = asyncio.ensure_future(self.bus.wait_for_disconnect())
        try:
            self._dirty.set()
            while not gone.done():
                waiter = asyncio.ensure_future(self._dirty.wait())
                await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if gone.done():
                    break
                await asyncio.sleep(self.debounce)  # let a burst of signals settle
                self._dirty.clear()
                self.on_snapshot(await self.snapshot())
        finally:
            gone.cancel()
        raise EOFError("the bus connection closed")


class NMError(AgentError):
    """A D-Bus call to NetworkManager failed."""


Notify = Callable[[NMSnapshot], Awaitable[None]]
