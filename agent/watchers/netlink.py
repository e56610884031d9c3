"""The kernel over netlink: links up or down, default routes, and RA RDNSS resolvers.

Events are read from our own non-blocking rtnetlink socket, drained completely on
each wake-up; any link, address or route event marks the table dirty and the
watcher resyncs from a full dump (pyroute2), so a lost event costs nothing. When
the kernel drops events (ENOBUFS: we fell behind) the socket is reopened and the
state resynced. IPv6 router advertisements' RDNSS options (RFC 8106) arrive as
nd_useropt messages, which have no dump: they are kept with their lifetimes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyroute2 import IPRoute

from agent.model import Link, NetResolver, Source

LOG = logging.getLogger(__name__)

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
GROUPS = {  # rtnetlink multicast groups (linux/rtnetlink.h)
    "link": 1,
    "ipv4_ifaddr": 5,
    "ipv4_route": 7,
    "ipv6_ifaddr": 9,
    "ipv6_route": 11,
    "nd_useropt": 20,
}
RTM_NEWNDUSEROPT = 68
ND_OPT_RDNSS = 25
NLMSG = struct.Struct("=IHHII")
NDUSEROPT = struct.Struct("=BxHiBBxxI")  # family, opts_len, ifindex, icmp type, code, pad
IFF_UP = 0x1


@dataclass(frozen=True)
class RDNSS:
    ifindex: int
    address: str
    lifetime: int  # seconds; 0 withdraws


def parse_nduseropt(data: bytes) -> list[RDNSS]:
    """RDNSS options out of a buffer of netlink messages (others are skipped)."""
    out: list[RDNSS] = []
    pos = 0
    while pos + NLMSG.size <= len(data):
        length, mtype, _flags, _seq, _pid = NLMSG.unpack_from(data, pos)
        if length < NLMSG.size or pos + length > len(data):
            break
        if mtype == RTM_NEWNDUSEROPT and length >= NLMSG.size + NDUSEROPT.size:
            body = pos + NLMSG.size
            _fam, opts_len, ifindex, _t, _c, _pad = NDUSEROPT.unpack_from(data, body)
            opts = data[body + NDUSEROPT.size : body + NDUSEROPT.size + opts_len]
            out.extend(_rdnss(opts, ifindex))
        pos += (length + 3) & ~3
    return out


def _rdnss(opts: bytes, ifindex: int) -> list[RDNSS]:
    out = []
    pos = 0
    while pos + 8 <= len(opts):
        otype, olen = opts[pos], opts[pos + 1] * 8
        if olen == 0 or pos + olen > len(opts):
            break
        if otype == ND_OPT_RDNSS and olen >= 24:
            lifetime = struct.unpack_from("!I", opts, pos + 4)[0]
            for a in range(pos + 8, pos + olen - 15, 16):
                addr = str(ipaddress.IPv6Address(opts[a : a + 16]))
                out.append(RDNSS(ifindex, addr, lifetime))
        pos += olen
    return out


@dataclass
class KernelView:
    """What a dump says, plus the RA resolvers kept from events."""

    names: dict[int, str] = field(default_factory=dict)
    up: dict[int, bool] = field(default_factory=dict)
    default_route: set[int] = field(default_factory=set)
    ra: dict[tuple[int, str], float] = field(default_factory=dict)  # -> expiry (monotonic)

    def links(self, now: float) -> dict[str, Link]:
        out: dict[str, Link] = {}
        for index, name in self.names.items():
            if name == "lo":
                continue
            ra = tuple(
                NetResolver(addr, source=Source.NETLINK)
                for (i, addr), until in sorted(self.ra.items())
                if i == index and until > now
            )
            out[name] = Link(
                name,
                up=self.up.get(index, False),
                resolvers=ra,
                default_route=index in self.default_route,
            )
        return out


class NetlinkWatcher:
    def __init__(
        self,
        on_snapshot: Callable[[dict[str, Link]], None],
        *,
        debounce: float = 0.05,
        rcvbuf: int = 1 << 20,
    ) -> None:
        self.on_snapshot = on_snapshot
        self.debounce = debounce
        self.rcvbuf = rcvbuf
        self.overruns = 0  # times the kernel dropped events for us (ENOBUFS)
        self.view = KernelView()
        self.loop = asyncio.get_running_loop()
        self.sock: socket.socket | None = None
        self._dirty = asyncio.Event()
        self.resyncs = 0  # full dumps taken (tests check ENOBUFS recovery with it)

    def _open(self) -> None:
        self._close()
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE
        )
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind((0, 0))
        for group in GROUPS.values():
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._readable)

    def _close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def _readable(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    LOG.warning("netlink: events were lost (ENOBUFS); reopening and resyncing")
                    self._open()
                    self._dirty.set()
                    return
                raise
            now = time.monotonic()
            for r in parse_nduseropt(data):
                key = (r.ifindex, r.address)
                if r.lifetime == 0:
                    self.view.ra.pop(key, None)
                else:
                    self.view.ra[key] = now + (r.lifetime if r.lifetime != 0xFFFFFFFF else 1e12)
            self._dirty.set()

    def dump(self) -> None:
        """Resync the link table from a full dump."""
        self.resyncs += 1
        names: dict[int, str] = {}
        up: dict[int, bool] = {}
        default: set[int] = set()
        with IPRoute() as ipr:
            for msg in ipr.get_links():
                index = msg["index"]
                names[index] = msg.get_attr("IFLA_IFNAME")
                up[index] = bool(msg["flags"] & IFF_UP) and msg.get_attr("IFLA_OPERSTATE") in (
                    "UP",
                    "UNKNOWN",
                )
            for family in (socket.AF_INET, socket.AF_INET6):
                for route in ipr.get_routes(family=family, table=254):
                    if route["dst_len"] == 0 and route.get_attr("RTA_OIF"):
                        default.add(route.get_attr("RTA_OIF"))
        self.view.names, self.view.up, self.view.default_route = names, up, default
        known = set(names)
        self.view.ra = {k: v for k, v in self.view.ra.items() if k[0] in known}

    def snapshot(self) -> dict[str, Link]:
        return self.view.links(time.monotonic())

    async def run(self) -> None:
        self._open()
        try:
            self._dirty.set()
            while True:
                expiries = [t for t in self.view.ra.values() if t > time.monotonic()]
                with contextlib.suppress(TimeoutError):  # an RA resolver's lifetime ran out
                    wait = min(expiries) - time.monotonic() if expiries else None
                    await asyncio.wait_for(self._dirty.wait(), wait)
                await asyncio.sleep(self.debounce)
                self._dirty.clear()
                self.dump()
                self.on_snapshot(self.snapshot())
        finally:
            self._close()
