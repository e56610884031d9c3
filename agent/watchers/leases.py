"""DHCP lease files for systems without NetworkManager: dhclient and systemd-networkd.

Parsing is pure (text in, facts out); a missing or half-written file is not an
error, just no facts. The watcher looks at modification times when inotify says a
lease directory changed (a new lease is followed at once), and every 2 s anyway.
Files are read and parsed in a worker thread (the event loop carries the tunnel's
queries), in one pass, and only up to MAX_LEASE_FILE: a larger file is skipped, said.

dhclient's leases may carry DNR (RFC 9463, agent/dns/dnr.py): the package's dhclient.conf
block names option 162 `dnr` and asks for it, and dhclient writes it as it writes any
`string` option, `option dnr 0:22:0:1:12:3:64:6e:...;` (hex, one or two digits an octet)
or, when every octet is printable, a quoted string with backslash escapes; without the
name (a server that sends 162 unasked) as `option unknown-162 ...`. The designated DoT
resolvers come first in the link's resolvers; a broken option is left out, said.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.dns import dnr
from agent.fsutil import UnsafePath, read_bounded
from agent.inotify import Waker
from agent.model import Link, NetResolver, Origin, Source

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    ifname: str
    resolvers: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    server: str | None = None  # DHCP server identifier: names the network
    router: str | None = None
    dnr: tuple[dnr.DnrInstance, ...] = ()  # DHCPv4 option 162 / DHCPv6 option 144 (RFC 9463)


def _addresses(values: Iterable[str]) -> tuple[str, ...]:
    out = []
    for v in values:
        with contextlib.suppress(ValueError):
            out.append(str(ipaddress.ip_address(v.strip().strip('"'))))
    return tuple(out)


MAX_LEASE_FILE = 1024 * 1024  # bytes; dhclient compacts its file long before (~20 leases)

_START = re.compile(r"\s*lease6?\s*\{(.*)")  # a block starts: `lease {`, `lease6 {`
_IFACE = re.compile(r'^\s*interface\s+"([^"]+)"\s*;', re.M)


def _names(value: str, sep: str | None) -> list[str]:
    """Domain names of a lease option: quotes and the root's dot gone."""
    names = (w.strip().strip('"').strip() for w in value.split(sep))
    return [n.rstrip(".") for n in names if n.rstrip(".")]


def _dhclient_domains(opts: dict[str, str]) -> tuple[str, ...]:
    """The search list as dhclient-script writes it: domain-search, with the domain name
    in front when it is not in it (DHCPv6: its domain-search)."""
    search = _names(opts.get("domain-search", ""), ",")
    name = _names(opts.get("domain-name", "").strip('"'), None)
    if name and not any(d.lower() == name[0].lower() for d in search):
        search = name + search
    if not search:
        search = _names(opts.get("dhcp6.domain-search", ""), ",")
    seen: set[str] = set()
    out: list[str] = []
    for d in search:
        if d.lower() not in seen:
            seen.add(d.lower())
            out.append(d)
    return tuple(out)


# dhclient's names for the DNR options: the package's dhclient.conf block's, and its own for
# an option 162 it was not told the name of
_DNR_OPTIONS = (("dnr", dnr.parse_v4), ("unknown-162", dnr.parse_v4), ("dhcp6.dnr", dnr.parse_v6))
_ESCAPE = re.compile(r"\\([0-7]{3}|.)", re.S)  # dhclient's \" \\ \' and \ooo
_HEX = frozenset("0123456789abcdefABCDEF")


def _octets(value: str) -> bytes:
    """A `string` option's value as dhclient writes it: `0:1d:ff`, or `"te\\"xt"` when
    every octet is printable. DnrError when it is neither."""
    if value.startswith('"'):
        if len(value) < 2 or not value.endswith('"') or not value.isascii():
            raise dnr.DnrError("a quoted value that is not dhclient's")
        text = _ESCAPE.sub(
            lambda m: chr(int(m[1], 8) & 0xFF) if len(m[1]) == 3 else m[1], value[1:-1]
        )
        return text.encode("latin-1")
    parts = value.split(":")
    if not all(0 < len(p) <= 2 and _HEX.issuperset(p) for p in parts):
        raise dnr.DnrError("neither hex octets nor a quoted string")
    return bytes(int(p, 16) for p in parts)


def _dhclient_dnr(opts: dict[str, str], ifname: str) -> tuple[dnr.DnrInstance, ...]:
    out: list[dnr.DnrInstance] = []
    for name, parse in _DNR_OPTIONS:
        value = opts.get(name)
        if value is None or (name == "unknown-162" and "dnr" in opts):
            continue
        try:
            out += parse(_octets(value))
        except dnr.DnrError as exc:
            LOG.warning("lease of %s: option %s left out: %s", ifname, name, exc)
    return tuple(out)


def _blocks(text: str) -> Iterator[list[str]]:
    """The complete lease blocks, one pass over the lines: from a `lease {` line to the next
    line that starts with `}` (nested blocks' closers are indented). A block cut short by a
    new `lease {` line (a torn write) is dropped; so is one never closed."""
    block: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("}"):
            if block is not None:
                yield block
            block = None
            continue
        start = _START.match(line)
        if start is not None:
            block = [start.group(1)]
        elif block is not None:
            block.append(line)


def parse_dhclient(text: str) -> dict[str, Lease]:
    """dhclient.leases (v4 and v6): the last complete lease block per interface wins."""
    out: dict[str, Lease] = {}
    for block in _blocks(text):
        ifname = None
        opts: dict[str, str] = {}
        for raw in block:
            if ifname is None and (m := _IFACE.match(raw)):
                ifname = m.group(1)
            line = raw.strip().rstrip(";")
            if line.startswith("option "):
                name, _, value = line[len("option ") :].partition(" ")
                opts[name] = value.strip()
        if ifname is None:
            continue
        dns = opts.get("domain-name-servers") or opts.get("dhcp6.name-servers") or ""
        out[ifname] = Lease(
            ifname,
            _addresses(dns.split(",")),
            _dhclient_domains(opts),
            opts.get("dhcp-server-identifier") or opts.get("dhcp6.server-id"),
            (opts.get("routers") or "").split(",")[0] or None,
            _dhclient_dnr(opts, ifname),
        )
    return out


def parse_networkd(text: str, ifname: str) -> Lease | None:
    """/run/systemd/netif/leases/IFINDEX: KEY=value lines."""
    kv = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            kv[key.strip()] = value.strip()
    if "ADDRESS" not in kv:
        return None  # half-written, or not a lease
    domains = (kv.get("DOMAIN_SEARCH_LIST") or kv.get("DOMAINNAME") or "").split()
    return Lease(
        ifname,
        _addresses(kv.get("DNS", "").split()),
        tuple(d.rstrip(".") for d in domains),
        kv.get("SERVER_ADDRESS"),
        (kv.get("ROUTER") or "").split()[0] if kv.get("ROUTER") else None,
    )


def to_link(lease: Lease) -> Link:
    """The network designated DoT resolvers (DNR) first, then the plain DHCP ones."""
    plain = tuple(NetResolver(a, source=Source.LEASE, origin=Origin.DHCP) for a in lease.resolvers)
    return Link(
        lease.ifname,
        resolvers=dnr.resolvers(lease.dnr, Source.LEASE) + plain,
        domains=lease.domains,
        dhcp_server=lease.server,
    )


def _ifname_of_index(index: str, sysfs: Path = Path("/sys/class/net")) -> str | None:
    with contextlib.suppress(OSError):
        for d in sysfs.iterdir():
            if (d / "ifindex").read_text().strip() == index:
                return d.name
    return None


def read_dirs(dirs: Iterable[Path]) -> dict[str, Link]:
    """Every lease found under `dirs`, as links (the newest file per interface wins)."""
    found: dict[str, tuple[float, Lease]] = {}
    for d in dirs:
        try:
            files = [p for p in d.iterdir() if p.is_file()]
        except OSError:
            continue
        for p in files:
            if not (p.name.isdigit() or "lease" in p.name):
                continue
            try:
                raw = read_bounded(p, MAX_LEASE_FILE)
                mtime = p.stat().st_mtime
            except UnsafePath as exc:  # over MAX_LEASE_FILE, a link, a FIFO: not read
                LOG.warning("lease file skipped: %s", exc)
                continue
            except OSError:
                continue
            if raw is None:
                continue
            text = raw.decode("utf-8", errors="replace")
            leases: list[Lease] = []
            if p.name.isdigit():
                name = _ifname_of_index(p.name)
                lease = parse_networkd(text, name) if name else None
                leases = [lease] if lease else []
            elif "lease" in p.name:
                leases = list(parse_dhclient(text).values())
            for lease in leases:
                if lease.ifname not in found or found[lease.ifname][0] <= mtime:
                    found[lease.ifname] = (mtime, lease)
    return {name: to_link(lease) for name, (_, lease) in found.items()}


class LeaseWatcher:
    """Polls lease directories; on any change, calls `on_snapshot` with every lease found."""

    def __init__(
        self,
        dirs: Iterable[str],
        on_snapshot: Callable[[dict[str, Link]], None],
        interval: float = 2.0,
    ) -> None:
        self.dirs = [Path(d) for d in dirs]
        self.on_snapshot = on_snapshot
        self.interval = interval
        self._stamp: tuple[tuple[str, float], ...] | None = None

    def _stamps(self) -> tuple[tuple[str, float], ...]:
        out = []
        for d in self.dirs:
            with contextlib.suppress(OSError):
                for p in d.iterdir():
                    with contextlib.suppress(OSError):
                        out.append((str(p), p.stat().st_mtime))
        return tuple(sorted(out))

    def poll(self) -> bool:
        """A look, here and now (tests, tools); `run` looks from a worker thread."""
        stamp = self._stamps()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        self.on_snapshot(read_dirs(self.dirs))
        return True

    def _look(self) -> tuple[tuple[tuple[str, float], ...], dict[str, Link] | None]:
        """The stamps, and the leases when they changed (run in a worker thread)."""
        stamp = self._stamps()
        return stamp, None if stamp == self._stamp else read_dirs(self.dirs)

    async def poll_off_loop(self) -> bool:
        """`poll`, with the files read and parsed in a worker thread; `on_snapshot` is
        called on the loop."""
        stamp, links = await asyncio.to_thread(self._look)
        if links is None:
            return False
        self._stamp = stamp
        self.on_snapshot(links)
        return True

    async def run(self) -> None:
        """Forever: a look at once, then whenever inotify says something changed in a lease
        directory (dhclient writes its lease right after its script ran), and at least every
        `interval` (directories that appear later are watched from then on)."""
        waker = Waker("DHCP lease files", self.dirs)
        try:
            while True:
                await self.poll_off_loop()
                await waker.wait(self.interval)
                waker.add(self.dirs)
        finally:
            waker.close()
