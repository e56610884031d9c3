"""Backend: systemd-resolved is the system's stub; every query it gets goes to the tunnel.

Applications keep asking 127.0.0.53 (or resolved over D-Bus and nss-resolve); resolved
keeps running, and forwards everything to the tunnel. Three parts, because resolved offers
no single way that does it all (found with the real resolved 252 of Debian 12, fed by a
real NetworkManager 1.42 in tests/lab/resolvedlab.py):

1. **Global: a drop-in plus a restart.** resolved's D-Bus API has no way to set *global*
   DNS servers (Manager.DNS is read-only; only SetLink* methods exist). The tunnel could be
   every link's server over D-Bus (SetLinkDNS to 127.0.0.153 works: loopback servers are
   reached through lo), but links are their manager's to set. Global settings are nobody
   else's. So `run/systemd/resolved.conf.d/zz-dnstls-agent.conf` says
   `DNS=` (dropping any global servers configured before: they would share the default
   route), `DNS=127.0.0.153`, `Domains=~. <the links' search domains>` (the tunnel is the
   default route, and single-label names keep their search domains for resolved's own
   clients), `DNSOverTLS=no` (the tunnel speaks plain DNS on loopback and does TLS itself)
   and `LLMNR=no` (single-label names multicast in cleartext on every link). resolved 252
   reads it only at start: systemd's ReloadOrTryRestartUnit restarts it (a newer resolved
   that can reload just reloads), and apply waits until resolved shows the tunnel as its
   global server. In /run, a tmpfs: it survives a restart of resolved, and is gone at
   reboot, so a machine that loses power while the agent runs boots with resolved as it was,
   whether the agent starts again or not. Named `zz-` to be read after other drop-ins.
2. **NetworkManager stops feeding resolved: its drop-in, `[main] dns=none` and
   `systemd-resolved=false`.** NM sends each link's servers and domains to resolved
   (SetLink*) whenever its DNS configuration changes (a lease with other servers, a new
   connection), whenever it starts and whenever resolved comes (back) on the bus; a
   network's own domain then routed names to the link's servers in cleartext again (part
   3) until the next `dnstls-agent stub`. NM has two ways of feeding resolved and both must
   stop (NM 1.42, its source and the lab agree): `dns=systemd-resolved` (set, or picked by
   NM itself when resolv.conf is resolved's symlink) makes resolved NM's DNS plugin, and
   `systemd-resolved=true` (the default) feeds it next to any other dns= mode, so `dns=none`
   alone does not stop it and `systemd-resolved=false` alone is ignored in resolved mode.
   `dns=none` also makes rc-manager "unmanaged" whatever it says: NM writes nothing to
   /etc/resolv.conf (with `dns=default` instead, rc-manager=file would write through
   resolved's symlink). NM keeps following the network (DnsManager.Configuration follows
   every lease: the watcher sees what it saw), and the links keep the domains NM last sent.
   The drop-in is placed as the networkmanager backend places its own (networkmanager.py,
   NMDropin): `/run/NetworkManager/conf.d/99-dnstls-agent-resolved.conf`, gone at reboot;
   also in /etc/NetworkManager/conf.d only when a setting read after /run outranks it (an
   explicit `dns=` in NetworkManager.conf). Reload's DNS_FULL flag loads it (without it a
   change of systemd-resolved= alone waits for NM's restart), and it is checked: Mode must
   say "none", and, since no property shows systemd-resolved=, NM asked to send its DNS
   configuration again (Reload's DNS_RC) must give no emptied link servers within `quiet`
   (this can tell only while NM has servers for some link). NM that will not stop, or is
   not there (systemd-networkd or nobody feeds resolved), is as before: a warning, and the
   links are emptied all the same.
3. **Per link: D-Bus SetLinkDNS(ifindex, []).** The drop-in alone leaks: resolved routes a
   name to the link whose search or routing domain matches it best, and a network's own
   domain (DHCP's `lab.test`) always beats `~.`: `www.lab.test` and the expansions of
   single-label names went to the link's own server in cleartext (seen on the server side).
   A link without servers gets no unicast DNS, but keeps its domains (the search list of
   stub-resolv.conf is unchanged). Each link's servers are journalled first; on revert NM
   sends every link's servers of *now* (revert gives it `settle` seconds), and the
   journalled ones are put back only on links that still have none.

Why not something else: per-connection settings (ignore-auto-dns, dns-priority) would
change NM's stored profiles, which outlive a crash and a reboot; resolved has no global
setting that outranks a link's domain (a global `Domains=~lab.test` ties with the link's
and resolved then asks both); emptying the links again after each change (the daemon
follows NM) cannot be done unprivileged (SetLinkDNS wants CAP_NET_ADMIN or polkit's yes)
and would always be late: NM sends first.

What survives what:
- a restart of resolved: the drop-in (a file) and the emptied links (resolved keeps them in
  /run/systemd/resolve/netif); NM, silenced, sends nothing.
- a restart of NM, a new lease, a new connection: NM reads its drop-in at start and sends
  nothing; a new link has no servers (everything goes to the tunnel); the network's search
  domains follow in the drop-in's Domains= (the daemon asks for a refresh when they change,
  request.py: a restart of resolved each time they do).
- a link that systemd-networkd manages: resolved refuses SetLinkDNS for it ("Link ... is
  managed", by its source; not exercised here): a warning says which domains keep going to
  which servers, and apply goes on (the default route is the tunnel's all the same).
- a reboot: nothing of ours in /run (the drop-ins and resolved's link state); an NM drop-in
  that had to go to /etc is recorded as absent by the next record() (it is ours) and
  removed by restore; the links are put back in the boot they were emptied in only (the
  boot ID in the journal tells).
Costs: each apply that changes the drop-in and each revert restart resolved (its cache is
lost; its stub is away for some milliseconds); NM is reloaded at apply and at revert; the
search domains in the drop-in are the network's as the daemon sees them (at the first
apply without a daemon's word: the links' as resolved has them).

Crash safety: record() journals the global servers, every link's servers and NM's drop-in
files before any change; revert works from that alone (apply may have died anywhere): it
removes our drop-in (recognised by its header) and restarts resolved when the drop-in was
there or resolved still forwards to the addresses it named, waiting until it no longer
does; removes our NM drop-ins and reloads NM (it feeds resolved again); then puts back the
servers of each recorded link that has none now (same name, same boot).

The D-Bus library (agent/dbus.py) is asynchronous and sysconf is not: each conversation runs
to its end with asyncio.run in a worker thread (the daemon, run as root, calls this from inside
its loop).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent import dbus
from agent.dbus import Variant
from agent.errors import AgentError
from agent.fsutil import write_atomic
from agent.sysconf.networkmanager import (
    RELOAD_CONF,
    RELOAD_DNS_FULL,
    RELOAD_DNS_RC,
    DBusNM,
    DnsState,
    NMControl,
    NMDropin,
    NMStubError,
    settled,
)

LOG = logging.getLogger(__name__)

T = TypeVar("T")

RESOLVE1 = "org.freedesktop.resolve1"
RESOLVE1_PATH = "/org/freedesktop/resolve1"
RESOLVE1_MANAGER = f"{RESOLVE1}.Manager"
RESOLVE1_LINK = f"{RESOLVE1}.Link"
SYSTEMD1 = "org.freedesktop.systemd1"
SYSTEMD1_PATH = "/org/freedesktop/systemd1"
SYSTEMD1_MANAGER = f"{SYSTEMD1}.Manager"
UNIT = "systemd-resolved.service"
DBUS = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
PROPS = "org.freedesktop.DBus.Properties"
TIMEOUT = 10.0  # one D-Bus conversation; also how long a restart may take to show
QUIET = 0.5  # after apply, how long the links must keep no servers (NM sends them again)
SETTLE = 5.0  # ... and how long apply keeps emptying links that get servers back
POLL = 0.05
DROPIN_DIR = "run/systemd/resolved.conf.d"
DROPIN = "zz-dnstls-agent.conf"
HEADER = "# Written by dnstls-agent: systemd-resolved forwards every query to its tunnel.\n"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# NetworkManager's drop-in (in /run/NetworkManager/conf.d, or also /etc/...: networkmanager.py)
NM_DROPIN = "99-dnstls-agent-resolved.conf"
NM_RELOAD = RELOAD_CONF | RELOAD_DNS_FULL  # systemd-resolved= alone takes effect only so
NM_HEADER = (
    "# Written by dnstls-agent: NetworkManager stops feeding systemd-resolved while the "
    "agent runs.\n"
)
# /etc/resolv.conf pointing at resolved: its stub file, its static stub file, or the file
# listing its upstreams ("uplink": those are then only the tunnel, the links having none)
RESOLVED_FILES = (
    "run/systemd/resolve/stub-resolv.conf",
    "run/systemd/resolve/resolv.conf",
    "usr/lib/systemd/resolv.conf",
    "lib/systemd/resolv.conf",
)
STUB_ADDRESSES = frozenset({"127.0.0.53", "127.0.0.54"})


class ResolvedStubError(AgentError):
    """systemd-resolved cannot be reached, or would not take the change."""


class ShuttingDown(ResolvedStubError):
    """systemd is stopping the system: no unit is restarted any more (and none need be)."""


# -- the pure part ------------------------------------------------------------------------
@dataclass(frozen=True)
class Server:
    """One DNS server as resolved holds it (DNSEx: address, port, TLS server name)."""

    address: str
    port: int = 0  # 0: the default
    name: str = ""

    def text(self) -> str:
        addr = f"[{self.address}]" if ":" in self.address and self.port else self.address
        return (
            addr + (f":{self.port}" if self.port else "") + (f"#{self.name}" if self.name else "")
        )

    def to_dbus(self) -> list[Any]:
        """(iayqs) for SetLinkDNSEx: family, address bytes, port, server name."""
        ip = ipaddress.ip_address(self.address)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        return [int(family), ip.packed, self.port, self.name]

    @classmethod
    def from_dbus(cls, family: int, raw: bytes, port: int = 0, name: str = "") -> Server:
        del family  # the length of the address says it
        return cls(str(ipaddress.ip_address(bytes(raw))), int(port), str(name))

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "port": self.port, "name": self.name}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Server:
        return cls(str(data["address"]), int(data.get("port", 0)), str(data.get("name", "")))


@dataclass(frozen=True)
class Snapshot:
    """What resolved says now: servers and domains per interface index (0: global)."""

    servers: dict[int, tuple[Server, ...]] = field(default_factory=dict)
    domains: dict[int, tuple[tuple[str, bool], ...]] = field(default_factory=dict)  # route-only
    ifnames: dict[int, str] = field(default_factory=dict)

    def global_servers(self) -> tuple[Server, ...]:
        return self.servers.get(0, ())

    def links(self) -> dict[int, tuple[Server, ...]]:
        """Every link resolved knows (by its servers or its domains) with its servers."""
        ids = {i for i in (*self.servers, *self.domains) if i != 0}
        return {i: self.servers.get(i, ()) for i in sorted(ids)}

    def search_domains(self) -> list[str]:
        """The links' search domains (not route-only), in order, once each."""
        out: list[str] = []
        for ifindex in sorted(self.domains):
            for domain, route_only in self.domains[ifindex]:
                if (
                    ifindex != 0
                    and not route_only
                    and domain not in ("", ".")
                    and domain not in out
                ):
                    out.append(domain)
        return out


def render(nameservers: Sequence[str], search: Sequence[str] = ()) -> str:
    """The drop-in: only `nameservers`, as the default route for every name."""
    domains = " ".join(["~.", *[d for d in search if d not in ("~.", ".")]])
    return (
        HEADER
        + "# Removed by `dnstls-agent restore` (the unit's ExecStopPost); gone at reboot.\n"
        + "[Resolve]\n"
        + "# no global servers but the tunnel: they would share the default route\n"
        + "DNS=\n"
        + "".join(f"DNS={ns}\n" for ns in nameservers)
        + f"Domains={domains}\n"
        + "DNSOverTLS=no\n"
        + "LLMNR=no\n"
    )


def render_nm_dropin() -> str:
    """NetworkManager's drop-in: no link's settings reach resolved, and resolv.conf stays
    resolved's (dns=none makes rc-manager "unmanaged", whatever it says)."""
    return (
        NM_HEADER
        + "# Removed by `dnstls-agent restore` (the unit's ExecStopPost): do not edit.\n"
        + "[main]\n"
        + "# no DNS plugin (systemd-resolved was one) and resolv.conf left alone\n"
        + "dns=none\n"
        + "# nor the systemd-resolved plugin that works next to any other dns= mode\n"
        + "systemd-resolved=false\n"
    )


def is_ours(text: str) -> bool:
    return text.startswith(HEADER)


def dropin_nameservers(text: str) -> list[str]:
    """The servers a drop-in of ours names (what resolved forwards to while it is there)."""
    out: list[str] = []
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "DNS":
            out = [] if not value.strip() else out + value.split()
    return out


def points_at_resolved(link: str | None, content: str) -> bool:
    """Is /etc/resolv.conf resolved's? `link` its symlink target (None: a file)."""
    if link is not None:
        target = os.path.normpath(os.path.join("/etc", link)).lstrip("/")
        return target in RESOLVED_FILES
    servers = [
        w[1]
        for w in (ln.split() for ln in content.splitlines())
        if w[:1] == ["nameserver"] and len(w) > 1
    ]
    return bool(servers) and set(servers) <= STUB_ADDRESSES


def links_to_put_back(
    recorded: Sequence[dict[str, Any]], now: Snapshot
) -> list[tuple[int, list[Server]]]:
    """The recorded links that have no servers now (and are still the same interface)."""
    out: list[tuple[int, list[Server]]] = []
    current = now.links()
    for link in recorded:
        ifindex, servers = int(link["ifindex"]), [Server.from_json(s) for s in link["servers"]]
        if not servers or ifindex not in current or current[ifindex]:
            continue
        name = link.get("ifname", "")
        if name and now.ifnames.get(ifindex, name) != name:
            continue  # the index belongs to another interface now
        out.append((ifindex, servers))
    return out


def record_links(recorded: Sequence[dict[str, Any]], now: Snapshot) -> list[dict[str, Any]]:
    """`recorded`, updated with every link that has servers now (the latest are right)."""
    links = {int(link["ifindex"]): dict(link) for link in recorded}
    for ifindex, servers in now.links().items():
        if servers:
            links[ifindex] = {
                "ifindex": ifindex,
                "ifname": now.ifnames.get(ifindex, ""),
                "servers": [s.to_json() for s in servers],
            }
    return [links[i] for i in sorted(links)]


# -- talking to resolved (and to systemd, to restart it) ----------------------------------
class ResolvedControl(Protocol):
    """The little of resolved (and systemd) this backend needs (a fake in the unit tests)."""

    @property
    def where(self) -> str:
        """Which bus, for messages."""

    def on_bus(self) -> bool:
        """Is org.freedesktop.resolve1 there?"""

    def snapshot(self) -> Snapshot:
        """Manager.DNSEx and Manager.Domains; raises ResolvedStubError when not on the bus."""

    def set_link_dns(self, ifindex: int, servers: Sequence[Server]) -> None:
        """Manager.SetLinkDNSEx."""

    def restart(self) -> None:
        """systemd: ReloadOrTryRestartUnit(systemd-resolved.service); ShuttingDown when
        systemd's SystemState is "stopping" (the restore at shutdown: resolved is being
        stopped too, and a restart job would be refused as destructive)."""


class NMFeeder(Protocol):
    """NetworkManager as this backend sees it, the one that feeds resolved's links (DBusNM of
    networkmanager.py; a fake in the unit tests)."""

    def state(self) -> DnsState | None:
        """DnsManager's Mode and RcManager; None when NM is not on the bus."""

    def reload(self, flags: int) -> None:
        """NetworkManager.Reload(flags)."""

    def dns_interfaces(self) -> set[str]:
        """The interfaces NM has DNS servers for (DnsManager.Configuration)."""


class DBusResolved:
    """ResolvedControl over D-Bus (agent.dbus); one short connection per question."""

    def __init__(self, bus_address: str | None = None, unit: str = UNIT) -> None:
        self.bus_address = bus_address or None
        self.unit = unit

    @property
    def where(self) -> str:
        return self.bus_address or "the system bus"

    def on_bus(self) -> bool:
        async def ask(bus: Any) -> bool:
            (has,) = await _call(bus, DBUS_PATH, DBUS, "NameHasOwner", "s", [RESOLVE1], dest=DBUS)
            return bool(has)

        return self._talk(ask)

    def snapshot(self) -> Snapshot:
        """Manager.DNSEx lists the global servers and every link's, each with the interface
        it is reached through, not whose it is (a global server on loopback says 1, lo): a
        link's own come from its Link object, the global ones are the rest."""

        async def ask(bus: Any) -> Snapshot:
            dnsex = await _get(bus, RESOLVE1_PATH, "DNSEx")
            everything = [_server(entry[1:]) for entry in dnsex]
            doms: dict[int, list[tuple[str, bool]]] = {}
            for ifindex, domain, route_only in await _get(bus, RESOLVE1_PATH, "Domains"):
                doms.setdefault(int(ifindex), []).append((str(domain), bool(route_only)))
            ids = {i for i, _ in socket.if_nameindex()} | set(doms) | {int(e[0]) for e in dnsex}
            servers: dict[int, tuple[Server, ...]] = {}
            rest = Counter(everything)  # minus each link's own: the global ones
            for ifindex in sorted(ids - {0}):
                try:
                    (path,) = await _call(
                        bus, RESOLVE1_PATH, RESOLVE1_MANAGER, "GetLink", "i", [ifindex]
                    )
                except ResolvedStubError:
                    continue  # not a link resolved knows
                own = tuple(_server(e) for e in await _get(bus, path, "DNSEx", RESOLVE1_LINK))
                rest.subtract(own)
                if own or ifindex in doms:
                    servers[ifindex] = own
            glob: list[Server] = []
            for server in everything:  # in resolved's order
                if rest[server] > 0:
                    rest[server] -= 1
                    glob.append(server)
            return Snapshot(
                {0: tuple(glob), **servers} if glob else servers,
                {i: tuple(d) for i, d in doms.items()},
                {i: _ifname(i) for i in servers},
            )

        return self._talk(ask)

    def set_link_dns(self, ifindex: int, servers: Sequence[Server]) -> None:
        async def ask(bus: Any) -> None:
            body = [ifindex, [s.to_dbus() for s in servers]]
            await _call(bus, RESOLVE1_PATH, RESOLVE1_MANAGER, "SetLinkDNSEx", "ia(iayqs)", body)

        self._talk(ask)

    def restart(self) -> None:
        async def ask(bus: Any) -> None:
            state = await _get(bus, SYSTEMD1_PATH, "SystemState", SYSTEMD1_MANAGER, SYSTEMD1)
            if state == "stopping":
                raise ShuttingDown(f"systemd on {self.where} is stopping the system")
            await _call(
                bus,
                SYSTEMD1_PATH,
                SYSTEMD1_MANAGER,
                "ReloadOrTryRestartUnit",
                "ss",
                [self.unit, "replace"],
                dest=SYSTEMD1,
            )

        self._talk(ask)

    def _talk(self, work: Callable[[Any], Awaitable[T]]) -> T:
        return dbus.talk(
            self.bus_address, work, error=ResolvedStubError, where=f"D-Bus on {self.where}"
        )


def _ifname(ifindex: int) -> str:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return ""


async def _call(
    bus: Any,
    path: str,
    iface: str,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
    dest: str = RESOLVE1,
) -> list[Any]:
    return await dbus.call(
        bus, path, iface, member, signature, body, dest=dest, error=ResolvedStubError
    )


async def _get(
    bus: Any, path: str, prop: str, iface: str = RESOLVE1_MANAGER, dest: str = RESOLVE1
) -> Any:
    (value,) = await _call(bus, path, PROPS, "Get", "ss", [iface, prop], dest=dest)
    return value.value if isinstance(value, Variant) else value


def _server(entry: Sequence[Any]) -> Server:
    """(family, address, port, name), as in DNSEx without the interface index."""
    family, raw, port, name = entry
    return Server.from_dbus(family, raw, port, name)


def _addresses(servers: Sequence[Server]) -> set[str]:
    return {s.address for s in servers}


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


# -- the backend --------------------------------------------------------------------------
class ResolvedBackend:
    name = "resolved"

    def __init__(
        self,
        root: Path = Path("/"),
        bus_address: str | None = None,
        *,
        control: ResolvedControl | None = None,
        nm: Callable[[str | None], NMFeeder] | None = None,
        boot_id: Callable[[], str] = _boot_id,
        quiet: float = QUIET,
        settle: float = SETTLE,
        timeout: float = TIMEOUT,
    ) -> None:
        self.root = root
        self.bus_address = bus_address or None
        self.control: ResolvedControl = control or DBusResolved(self.bus_address)
        self.nm: Callable[[str | None], NMFeeder] = nm or DBusNM
        self.boot_id = boot_id
        self.quiet = quiet
        self.settle = settle
        self.timeout = timeout
        self.resolv_conf = root / "etc" / "resolv.conf"
        self.dropin = root / DROPIN_DIR / DROPIN
        self.nm_dropin = NMDropin(root, render_nm_dropin(), NM_DROPIN, NM_RELOAD)

    def detect(self) -> bool:
        """/etc/resolv.conf is resolved's (its stub) and resolved is on the bus."""
        path = self.resolv_conf
        link = os.readlink(path) if path.is_symlink() else None
        try:
            content = path.read_text() if link is None else ""
        except OSError:
            return False
        if not points_at_resolved(link, content):
            return False
        try:
            return self.control.on_bus()
        except ResolvedStubError as exc:
            LOG.debug("no systemd-resolved to point: %s", exc)
            return False

    def describe(self) -> str:
        return f"systemd-resolved on {self.control.where}, drop-in {self.dropin}"

    def record(self) -> dict[str, Any]:
        """The global servers and each link's, before anything changes."""
        snap = self.control.snapshot()
        return {
            "dropin": str(self.dropin),
            "bus": self.bus_address or "",
            "boot_id": self.boot_id(),
            "global": [s.to_json() for s in snap.global_servers()],
            "links": record_links([], snap),
            "nm_dropins": self.nm_dropin.record(),
        }

    def apply(
        self,
        nameservers: Sequence[str],
        previous: dict[str, Any],
        search: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """`search`: the network's domains as the agent sees them (NM, silenced, no longer
        sends the links' own); None: the links' domains as resolved has them."""
        if previous.get("boot_id") != self.boot_id():
            previous = self.record()  # journalled in another boot: nothing of it is left
        snap = self.control.snapshot()
        links = record_links(previous.get("links", []), snap)
        text = render(nameservers, snap.search_domains() if search is None else list(search))
        entry = {**previous, "links": links, "nameservers": list(nameservers)}
        try:
            written = self.dropin.read_text() == text
        except OSError:
            written = False
        if not written:
            self.dropin.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            write_atomic(self.dropin, text.encode(), mode=0o644)
        want = set(nameservers)
        if not written or _addresses(snap.global_servers()) != want:
            LOG.info("restarting systemd-resolved to read %s", self.dropin)
            self.control.restart()
            snap = self._wait(
                self.control,
                "resolved to forward to " + ", ".join(nameservers),
                lambda s: want <= _addresses(s.global_servers()),
            )
        extra = [s.text() for s in snap.global_servers() if s.address not in want]
        if extra:
            LOG.warning(
                "systemd-resolved also has global servers %s (a drop-in read after %s?): "
                "they share the default route with the tunnel",
                ", ".join(extra),
                self.dropin,
            )
        if previous.get("nm_used") and self.nm_dropin.in_place():
            entry["links"] = self._empty_links(entry["links"])  # a refresh: NM is silenced
        else:
            entry["links"], entry["nm_used"] = self._silence_nm(entry["links"], previous)
        return entry

    def revert(self, entry: dict[str, Any]) -> str:
        """resolved's drop-in gone (resolved restarted), NM's drop-in gone (NM reloaded: it
        feeds resolved again with the links' servers of now), then the recorded servers put
        back on the links that still have none (same boot only)."""
        control = self.control
        if isinstance(control, DBusResolved) and entry.get("bus", "") != (self.bus_address or ""):
            control = DBusResolved(entry["bus"] or None)  # the resolved that apply changed
        said: list[str] = []
        try:
            text: str | None = self.dropin.read_text()
        except FileNotFoundError:
            text = None
        ours = is_ours(text) if text is not None else False
        forwarded = set(dropin_nameservers(text) if ours and text else entry.get("nameservers", []))
        on_bus = control.on_bus()
        snap = control.snapshot() if on_bus else Snapshot()
        if text is not None and not ours:
            said.append(f"{self.dropin} is not ours: left as it is")
        elif text is not None:
            self.dropin.unlink(missing_ok=True)
            said.append(f"{self.dropin} removed")
        still = _addresses(snap.global_servers()) & forwarded
        if on_bus and (ours or still):
            try:
                control.restart()
            except ShuttingDown as exc:
                said.append(f"not restarted: {exc}")
            else:
                self._wait(
                    control,
                    "resolved to stop forwarding to " + ", ".join(sorted(forwarded)),
                    lambda s: not (_addresses(s.global_servers()) & forwarded),
                )
                said.append("systemd-resolved restarted without it")
        elif not on_bus and ours:
            said.append(
                "systemd-resolved is not running: it reads its configuration when it starts"
            )
        fed = self._unsilence_nm(entry, said)
        if on_bus and entry.get("boot_id") == self.boot_id():
            said.extend(self._put_back_links(control, entry.get("links", []), fed))
        if not said:
            return "systemd-resolved: nothing of ours left (after a reboot, /run starts empty)"
        return "systemd-resolved: " + "; ".join(said)

    # -- helpers ----------------------------------------------------------------------------
    def _wait(
        self, control: ResolvedControl, what: str, done: Callable[[Snapshot], bool]
    ) -> Snapshot:
        """Poll resolved until `done` (it may be away for a moment while it restarts)."""
        end = time.monotonic() + self.timeout
        last: Exception | None = None
        while True:
            try:
                snap = control.snapshot()
                if done(snap):
                    return snap
            except ResolvedStubError as exc:
                last = exc
            if time.monotonic() > end:
                raise ResolvedStubError(
                    f"waited {self.timeout:.0f}s for {what}" + (f" ({last})" if last else "")
                )
            time.sleep(POLL)

    def _empty_links(self, recorded: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Empty every link's servers, until none got them back for `quiet` seconds (after a
        restart, NetworkManager sends them again); new ones are recorded first."""
        end = time.monotonic() + self.settle
        quiet_since = time.monotonic()
        refused: dict[int, str] = {}
        while True:
            snap = self.control.snapshot()
            busy = {i: s for i, s in snap.links().items() if s and i not in refused}
            recorded = record_links(recorded, snap)
            for ifindex, servers in busy.items():
                try:
                    self.control.set_link_dns(ifindex, [])
                except ResolvedStubError as exc:
                    refused[ifindex] = str(exc)
                    domains = [d for d, _ in snap.domains.get(ifindex, ())] or ["(none)"]
                    LOG.warning(
                        "%s: its servers %s cannot be taken from systemd-resolved (%s): names "
                        "in its domains %s still go to them",
                        snap.ifnames.get(ifindex) or f"link {ifindex}",
                        ", ".join(s.text() for s in servers),
                        exc,
                        " ".join(domains),
                    )
            now = time.monotonic()
            if busy:
                quiet_since = now
            elif now - quiet_since >= self.quiet:
                return recorded
            if now > end:
                raise ResolvedStubError(
                    f"links {sorted(busy)} keep getting DNS servers back in systemd-resolved"
                )
            time.sleep(POLL)

    def _silence_nm(
        self, recorded: list[dict[str, Any]], previous: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """NetworkManager stops feeding resolved (our drop-in, as the networkmanager backend
        places its own), then every link is emptied: the links as recorded, and the drop-ins
        used. Without NM (systemd-networkd, or nobody, feeds resolved), or with an NM that
        will not stop, the links are emptied all the same."""
        links = recorded
        try:
            nm = self.nm(self.bus_address)
            present = nm.state() is not None
        except NMStubError as exc:
            LOG.debug("no NetworkManager to stop feeding systemd-resolved: %s", exc)
            present = False
        if not present:
            LOG.info("no NetworkManager on %s: it feeds no link of resolved", self.control.where)
            return self._empty_links(links), []

        def silenced(nm: NMControl) -> str | None:
            nonlocal links
            state = settled(nm, "none")
            if state is None:
                return "left the bus"
            if state.mode != "none":
                return f"kept managing DNS (mode {state.mode})"
            links = self._empty_links(links)
            if self._fed_again(nm):  # dns=none won, systemd-resolved=false did not
                return "kept sending the links' servers to systemd-resolved"
            return None

        try:
            used = self.nm_dropin.place(nm, previous.get("nm_dropins", {}), silenced)
        except NMStubError as exc:
            LOG.warning(
                "%s: names in the links' own domains go to the links' own servers again "
                "whenever NetworkManager sends them to systemd-resolved (a new lease, a "
                "restart), until `dnstls-agent stub` runs again",
                exc,
            )
            return self._empty_links(links), []
        return links, used

    def _fed_again(self, nm: NMControl) -> bool:
        """Asked to send its DNS configuration again (Reload's DNS_RC flag: nothing else
        happens with dns=none), does NM give any emptied link servers within `quiet`?"""
        empty = {i for i, s in self.control.snapshot().links().items() if not s}
        nm.reload(RELOAD_DNS_RC)
        end = time.monotonic() + self.quiet
        while True:
            links = self.control.snapshot().links()
            if any(links.get(i) for i in empty):
                return True
            if time.monotonic() > end:
                return False
            time.sleep(POLL)

    def _unsilence_nm(self, entry: dict[str, Any], said: list[str]) -> set[str]:
        """Our NM drop-ins gone and NM reloaded (when they were there or apply used them):
        it sends every link's settings to resolved again. The interfaces it has servers
        for (it sends those), empty when NM was not touched or not reached."""
        changed = self.nm_dropin.put_back(entry.get("nm_dropins", {}))
        said.extend(changed)
        if not changed and not entry.get("nm_used"):
            return set()
        nm = self.nm(entry.get("bus") or self.bus_address)
        try:
            state = nm.state()
            if state is None:
                said.append("NetworkManager is not running: it reads the change when it starts")
                return set()
            nm.reload(NM_RELOAD)
            state = nm.state()
            fed = nm.dns_interfaces()
        except NMStubError as exc:
            said.append(f"NetworkManager not reached ({exc}): it reads the change when it starts")
            return set()
        said.append(f"NetworkManager reloaded (mode {state.mode if state else 'unknown'})")
        return fed

    def _put_back_links(
        self, control: ResolvedControl, recorded: Sequence[dict[str, Any]], fed: set[str]
    ) -> list[str]:
        """The recorded servers back on each link that has none, once NM has had `settle`
        seconds to send its own for the links in `fed` (those of now are right)."""
        names = {str(link.get("ifname", "")) for link in recorded} & fed
        end = time.monotonic() + self.settle
        snap = Snapshot()
        have: set[str] = set()
        while True:
            try:
                snap = control.snapshot()
            except ResolvedStubError:
                pass  # just restarted
            else:
                have = {snap.ifnames.get(i, "") for i, s in snap.links().items() if s}
                if names <= have:
                    break
            if time.monotonic() > end:
                break
            time.sleep(POLL)
        said: list[str] = []
        for ifindex, servers in links_to_put_back(recorded, snap):
            name = snap.ifnames.get(ifindex) or f"link {ifindex}"
            try:
                control.set_link_dns(ifindex, servers)
            except ResolvedStubError as exc:
                said.append(f"{name}: servers not put back ({exc})")
                continue
            said.append(f"{name} has its servers again ({', '.join(s.text() for s in servers)})")
        if names & have:
            said.append("NetworkManager gave " + ", ".join(sorted(names & have)) + " its servers")
        return said
