"""NetworkManager over D-Bus: per-interface resolvers, domains, priority, VPN; connectivity.

The watcher subscribes first (AddMatch), then reads a full snapshot, and reads a new
snapshot whenever NM says something relevant changed (DnsManager, devices, DHCP and
IP configs, connectivity, active connections) or NM itself reappears
(NameOwnerChanged). Each snapshot replaces the previous one as a whole: the engine
sweeps what is gone. It reports facts only; it decides nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agent import dbus
from agent.dbus import BusType, Message, MessageBus, MessageType, Variant
from agent.errors import AgentError
from agent.model import Link, NetResolver, Source

LOG = logging.getLogger(__name__)

NM = "org.freedesktop.NetworkManager"
NM_PATH = "/org/freedesktop/NetworkManager"
DNS_PATH = f"{NM_PATH}/DnsManager"
PROPS = "org.freedesktop.DBus.Properties"
DBUS = "org.freedesktop.DBus"
ACTIVATED = 100  # NM_DEVICE_STATE_ACTIVATED
CONNECTIVITY = {0: "unknown", 1: "none", 2: "portal", 3: "limited", 4: "full"}
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
        if dev.get("Dhcp4Config", "/") != "/":
            opts = await self._get(dev["Dhcp4Config"], f"{NM}.DHCP4Config", "Options")
            dhcp_server = opts.get("dhcp_server_identifier")
            if not entry and opts.get("domain_name_servers"):
                nameservers = opts["domain_name_servers"].split()
        if not entry and dev.get("Dhcp6Config", "/") != "/":
            opts6 = await self._get(dev["Dhcp6Config"], f"{NM}.DHCP6Config", "Options")
            nameservers += (opts6.get("dhcp6_name_servers") or "").split()
        return Link(
            name,
            up=state == ACTIVATED,
            resolvers=_resolvers(nameservers),
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
