"""The kernel over netlink: links up or down, default routes, and RA RDNSS resolvers.

Any link, address or route event marks the table dirty and the watcher resyncs from a
full dump, so a lost event costs nothing; when the kernel drops events (ENOBUFS: we fell
behind) the subscription is reopened and the state resynced. IPv6 router advertisements'
RDNSS options (RFC 8106) arrive as RTM_NEWNDUSEROPT messages, which have no dump: they
are kept with their lifetimes.

pyroute2 is reached through one small seam, `Rtnl` (subscribe, events, dump, close), one
backend per pyroute2 core, chosen at import by what the installed pyroute2 offers:

- `AsyncRtnl`, pyroute2 >= 0.9, whose core is asyncio: `AsyncIPRoute`, events by
  `async for msg in ipr.get()`, dumps by `async for msg in await ipr.get_links()`. (0.9's
  sync `IPRoute` drives a loop of its own, which cannot run inside ours.)
- `SyncRtnl`, pyroute2 0.7 and 0.8: `IPRSocket`, the rtnetlink socket `IPRoute` is built
  on, which pyroute2 documents for threadless monitoring (bind, then `get()`). Its fd is
  watched with `loop.add_reader`; each wake-up takes one datagram with `get()`, so it never
  waits. No thread: nothing to hand over between threads, no malloc arena of its own, and
  the socket belongs to the loop thread's network namespace. Dumps are what `IPRoute`'s
  get_links/get_routes send (`nlm_request` of an ifinfmsg/rtmsg dump), read as a generator
  with a turn for the loop after each message: the kernel fills a dump from within recvmsg,
  so a read does not wait either. `IPRoute` itself would add 1.6 MiB (its RTNL_API, request
  filters and test lab, which imports unittest.mock) and nothing used here.

What pyroute2 does not serve: it has no message class for RTM_NEWNDUSEROPT (0.7 to 0.9);
its marshal hands such a message over undecoded, and `parse_nduseropt` reads the RDNSS
options from the message's bytes.

RDNSS resolvers are origin RA. An RA's Encrypted DNS option (DNR, RFC 9463 section 6.1,
type 144) would be read too (`parse_nduseropt_dnr`: its DoT resolvers come first, origin
DNR, with the option's lifetime), but Linux does not pass it on: RTM_NEWNDUSEROPT carries
only the options `ndisc_is_useropt` (net/ipv6/ndisc.c) names, RDNSS, DNSSL, captive
portal, PREF64 (and, lately, prefix information); 144 is dropped as unknown. Shown on
6.18 by tests/system/test_dnr_ra.py, which fails the day a kernel passes it.

pyroute2's own `__init__` imports every protocol it speaks (IPDB, NDB, nftables,
WireGuard, ...): 6 to 8 MiB of the daemon's idle memory. Only the parts used here are
imported (`_pyroute2_parts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import importlib.util
import ipaddress
import logging
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.dns import dnr
from agent.model import Link, NetResolver, Origin, Source

LOG = logging.getLogger(__name__)

RTM_NEWNDUSEROPT = 68
ND_OPT_RDNSS = 25
ND_OPT_DNR = 144  # RFC 9463 section 6.1 (the kernel does not pass it on: module docstring)
NLMSG = struct.Struct("=IHHII")
NDUSEROPT = struct.Struct("=BxHiBBxxI")  # family, opts_len, ifindex, icmp type, code, pad
IFF_UP = 0x1
RT_TABLE_MAIN = 254

Message = Any  # a pyroute2 message (nlmsg): msg["index"], msg.get_attr("IFLA_IFNAME")


@contextlib.contextmanager
def _pyroute2_parts() -> Iterator[None]:
    """Import parts of pyroute2 without running `pyroute2/__init__.py`, which imports
    all of pyroute2: the package's module is put in place unexecuted for the imports and
    taken out again, so that a later `import pyroute2` anywhere gets the whole package as
    usual. Already imported, the package is used as it is."""
    if "pyroute2" in sys.modules:
        yield
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None:
        raise ImportError("pyroute2 is not installed", name="pyroute2")
    shell = importlib.util.module_from_spec(spec)
    sys.modules["pyroute2"] = shell
    try:
        yield
    finally:
        if sys.modules.get("pyroute2") is shell:
            del sys.modules["pyroute2"]


with _pyroute2_parts():
    _nl = importlib.import_module("pyroute2.netlink")
    _rtnl = importlib.import_module("pyroute2.netlink.rtnl")
    ASYNC = hasattr(importlib.import_module("pyroute2.netlink.nlsocket"), "AsyncNetlinkSocket")
    if ASYNC:  # 0.9: asyncio at its core
        AsyncIPRoute = importlib.import_module("pyroute2.iproute").AsyncIPRoute
    else:  # 0.7, 0.8
        IPRSocket = importlib.import_module("pyroute2.netlink.rtnl.iprsocket").IPRSocket
        ifinfmsg = importlib.import_module("pyroute2.netlink.rtnl.ifinfmsg").ifinfmsg
        rtmsg = importlib.import_module("pyroute2.netlink.rtnl.rtmsg").rtmsg
        DumpInterrupted = importlib.import_module(
            "pyroute2.netlink.exceptions"
        ).NetlinkDumpInterrupted

GROUPS = (  # rtnetlink multicast groups, as bind() takes them
    _rtnl.RTMGRP_LINK
    | _rtnl.RTMGRP_IPV4_IFADDR
    | _rtnl.RTMGRP_IPV4_ROUTE
    | _rtnl.RTMGRP_IPV6_IFADDR
    | _rtnl.RTMGRP_IPV6_ROUTE
    | 1 << (_rtnl.RTNLGRP_ND_USEROPT - 1)
)


@dataclass(frozen=True)
class RDNSS:
    ifindex: int
    address: str
    lifetime: int  # seconds; 0 withdraws


@dataclass(frozen=True)
class RaDnr:
    ifindex: int
    instance: dnr.DnrInstance  # its lifetime: seconds, 0 withdraws, dnr.INFINITY no end


def _useropts(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(ifindex, the ND options) of each RTM_NEWNDUSEROPT in a buffer of netlink messages
    (others are skipped)."""
    pos = 0
    while pos + NLMSG.size <= len(data):
        length, mtype, _flags, _seq, _pid = NLMSG.unpack_from(data, pos)
        if length < NLMSG.size or pos + length > len(data):
            break
        if mtype == RTM_NEWNDUSEROPT and length >= NLMSG.size + NDUSEROPT.size:
            body = pos + NLMSG.size
            _fam, opts_len, ifindex, _t, _c, _pad = NDUSEROPT.unpack_from(data, body)
            yield ifindex, data[body + NDUSEROPT.size : body + NDUSEROPT.size + opts_len]
        pos += (length + 3) & ~3


def _nd_options(opts: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, the whole option) of each ND option; stops at a malformed length."""
    pos = 0
    while pos + 8 <= len(opts):
        otype, olen = opts[pos], opts[pos + 1] * 8
        if olen == 0 or pos + olen > len(opts):
            break
        yield otype, opts[pos : pos + olen]
        pos += olen


def parse_nduseropt(data: bytes) -> list[RDNSS]:
    """RDNSS options out of a buffer of netlink messages (others are skipped)."""
    return [r for ifindex, opts in _useropts(data) for r in _rdnss(opts, ifindex)]


def parse_nduseropt_dnr(data: bytes) -> list[RaDnr]:
    """Encrypted DNS options (type 144) out of a buffer of netlink messages; a malformed
    one is logged and skipped."""
    out: list[RaDnr] = []
    for ifindex, opts in _useropts(data):
        for otype, option in _nd_options(opts):
            if otype != ND_OPT_DNR:
                continue
            try:
                out.extend(RaDnr(ifindex, inst) for inst in dnr.parse_ra(option))
            except dnr.DnrError as exc:
                LOG.warning("an RA's Encrypted DNS option on link %d is unusable: %s", ifindex, exc)
    return out


def _rdnss(opts: bytes, ifindex: int) -> list[RDNSS]:
    out = []
    for otype, option in _nd_options(opts):
        if otype == ND_OPT_RDNSS and len(option) >= 24:
            lifetime = struct.unpack_from("!I", option, 4)[0]
            for a in range(8, len(option) - 15, 16):
                addr = str(ipaddress.IPv6Address(option[a : a + 16]))
                out.append(RDNSS(ifindex, addr, lifetime))
    return out


def raw(msg: Message) -> bytes:
    """A message's own bytes, as the kernel sent them."""
    start: int = msg.offset
    return bytes(msg.data[start : start + msg["header"]["length"]])


@dataclass(frozen=True)
class Dump:
    links: list[Message]
    routes: list[Message]  # the main table's, IPv4 and IPv6


class Rtnl(Protocol):
    """One subscription to the rtnetlink groups (GROUPS), and dumps."""

    async def subscribe(self) -> None: ...

    async def events(self) -> Sequence[Message]:
        """The next messages the kernel sent; OSError(ENOBUFS) when it had to drop some
        (then this object is done with: close it and open another)."""
        ...

    async def dump(self) -> Dump: ...

    def close(self) -> None: ...


class AsyncRtnl:
    """pyroute2 >= 0.9: AsyncIPRoute."""

    def __init__(self, rcvbuf: int) -> None:
        self.ipr = AsyncIPRoute(rcvbuf=rcvbuf)

    async def subscribe(self) -> None:
        await self.ipr.bind(groups=GROUPS)

    async def events(self) -> Sequence[Message]:
        return [msg async for msg in self.ipr.get()]

    async def dump(self) -> Dump:
        async with AsyncIPRoute() as ipr:
            links = [msg async for msg in await ipr.get_links()]
            routes = [
                msg
                for family in (socket.AF_INET, socket.AF_INET6)
                async for msg in await ipr.get_routes(family=family, table=RT_TABLE_MAIN)
            ]
        return Dump(links, routes)

    def close(self) -> None:
        self.ipr.close()


class SyncRtnl:
    """pyroute2 0.7 and 0.8: IPRSocket, its fd watched by the loop (module docstring)."""

    def __init__(self, rcvbuf: int) -> None:
        self.sock = IPRSocket(rcvbuf=rcvbuf)
        self.loop = asyncio.get_running_loop()
        self.received: asyncio.Queue[Sequence[Message] | OSError] = asyncio.Queue()
        self.fd: int | None = None

    async def subscribe(self) -> None:
        self.sock.bind(groups=GROUPS)
        self.sock.setblocking(False)  # readable means one datagram; never wait for another
        self.fd = self.sock.fileno()
        self.loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        try:
            msgs = self.sock.get()
        except BlockingIOError:
            return
        except OSError as exc:
            self._unwatch()
            self.received.put_nowait(exc)
            return
        self.received.put_nowait(msgs)

    async def events(self) -> Sequence[Message]:
        got = await self.received.get()
        if isinstance(got, OSError):
            raise got
        return got

    async def dump(self) -> Dump:
        sock = IPRSocket(nlm_generator=True)  # its own: the subscribed one carries events only
        try:
            links = await self._dump(sock, ifinfmsg(), _rtnl.RTM_GETLINK)
            routes = []
            for family in (socket.AF_INET, socket.AF_INET6):
                req = rtmsg()
                req["family"] = family
                routes += [
                    msg
                    for msg in await self._dump(sock, req, _rtnl.RTM_GETROUTE)
                    if msg.get_attr("RTA_TABLE", msg["table"]) == RT_TABLE_MAIN
                ]
        finally:
            sock.close()
        return Dump(links, routes)

    @staticmethod
    async def _dump(sock: Any, request: Message, mtype: int) -> list[Message]:
        """The loop gets a turn after each message, as with AsyncIPRoute. A dump that a
        change ran into (NLM_F_DUMP_INTR) is taken as it is, as 0.9 does: the change sent
        an event, and that brings the next resync."""
        out = []
        with contextlib.suppress(DumpInterrupted):  # raised after the last message
            for msg in sock.nlm_request(request, mtype, _nl.NLM_F_REQUEST | _nl.NLM_F_DUMP):
                out.append(msg)
                await asyncio.sleep(0)
        return out

    def _unwatch(self) -> None:
        if self.fd is not None:
            self.loop.remove_reader(self.fd)
            self.fd = None

    def close(self) -> None:
        self._unwatch()
        self.sock.close()


RTNL: Callable[[int], Rtnl] = AsyncRtnl if ASYNC else SyncRtnl


@dataclass
class KernelView:
    """What a dump says, plus the RA resolvers kept from events."""

    names: dict[int, str] = field(default_factory=dict)
    up: dict[int, bool] = field(default_factory=dict)
    default_route: set[int] = field(default_factory=set)
    ra: dict[tuple[int, str], float] = field(default_factory=dict)  # -> expiry (monotonic)
    # an RA's DNR resolvers: (ifindex, address, port) -> (resolver, expiry)
    dnr: dict[tuple[int, str, int], tuple[NetResolver, float]] = field(default_factory=dict)

    def expiries(self) -> list[float]:
        return [*self.ra.values(), *(until for _r, until in self.dnr.values())]

    def links(self, now: float) -> dict[str, Link]:
        out: dict[str, Link] = {}
        for index, name in self.names.items():
            if name == "lo":
                continue
            designated = sorted(
                (r for (i, _a, _p), (r, until) in self.dnr.items() if i == index and until > now),
                key=lambda r: (r.priority, r.address, r.port or 0),
            )
            ra = tuple(
                NetResolver(addr, source=Source.NETLINK, origin=Origin.RA)
                for (i, addr), until in sorted(self.ra.items())
                if i == index and until > now
            )
            out[name] = Link(
                name,
                up=self.up.get(index, False),
                resolvers=(*designated, *ra),
                default_route=index in self.default_route,
            )
        return out

    def learn(self, dump: Dump) -> None:
        names: dict[int, str] = {}
        up: dict[int, bool] = {}
        default: set[int] = set()
        for msg in dump.links:
            index = msg["index"]
            names[index] = msg.get_attr("IFLA_IFNAME")
            up[index] = bool(msg["flags"] & IFF_UP) and msg.get_attr("IFLA_OPERSTATE") in (
                "UP",
                "UNKNOWN",
            )
        for route in dump.routes:
            if route["dst_len"] == 0 and route.get_attr("RTA_OIF"):
                default.add(route.get_attr("RTA_OIF"))
        self.names, self.up, self.default_route = names, up, default
        self.ra = {k: v for k, v in self.ra.items() if k[0] in names}
        self.dnr = {k: v for k, v in self.dnr.items() if k[0] in names}

    def note(self, msgs: Sequence[Message], now: float) -> None:
        """RA resolvers out of the events (RTM_NEWNDUSEROPT), with their lifetimes."""
        for msg in msgs:
            if msg["header"]["type"] != RTM_NEWNDUSEROPT:
                continue
            for r in parse_nduseropt(raw(msg)):
                key = (r.ifindex, r.address)
                if r.lifetime == 0:
                    self.ra.pop(key, None)
                else:
                    self.ra[key] = now + (r.lifetime if r.lifetime != 0xFFFFFFFF else 1e12)
            for d in parse_nduseropt_dnr(raw(msg)):
                self._note_dnr(d, now)

    def _note_dnr(self, d: RaDnr, now: float) -> None:
        """One RA DNR instance: its DoT resolvers kept for its lifetime; lifetime 0 withdraws
        what was kept for its addresses (or, ADN-only, for its ADN) on that link."""
        inst = d.instance
        if inst.lifetime == 0:
            gone = set(inst.addresses)
            self.dnr = {
                k: v
                for k, v in self.dnr.items()
                if k[0] != d.ifindex or (k[1] not in gone and v[0].auth_name != inst.adn)
            }
            return
        lifetime = inst.lifetime if inst.lifetime is not None else 0
        until = now + (lifetime if lifetime != dnr.INFINITY else 1e12)
        for r in dnr.resolvers([inst], Source.NETLINK):
            self.dnr[(d.ifindex, r.address, r.port or dnr.DOT_PORT)] = (r, until)


class NetlinkWatcher:
    def __init__(
        self,
        on_snapshot: Callable[[dict[str, Link]], None],
        *,
        debounce: float = 0.05,
        rcvbuf: int = 1 << 20,
        rtnl: Callable[[int], Rtnl] = RTNL,
    ) -> None:
        self.on_snapshot = on_snapshot
        self.debounce = debounce
        self.rcvbuf = rcvbuf
        self.new_rtnl = rtnl
        self.rtnl: Rtnl | None = None
        self.overruns = 0  # times the kernel dropped events for us (ENOBUFS)
        self.view = KernelView()
        self._dirty = asyncio.Event()
        self.resyncs = 0  # full dumps taken (tests check ENOBUFS recovery with it)

    async def _subscribe(self) -> Rtnl:
        """A new subscription; the one it replaces serves dumps until it is there."""
        rtnl = self.new_rtnl(self.rcvbuf)
        try:
            await rtnl.subscribe()
        except BaseException:
            rtnl.close()
            raise
        self._close()
        self.rtnl = rtnl
        return rtnl

    def _close(self) -> None:
        if self.rtnl is not None:
            self.rtnl.close()
            self.rtnl = None

    async def _read(self, rtnl: Rtnl) -> None:
        """Drain the events as they come, each marking the table dirty; on ENOBUFS,
        subscribe again and resync."""
        while True:
            try:
                msgs = await rtnl.events()
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1
                LOG.warning("netlink: events were lost (ENOBUFS); resubscribing and resyncing")
                rtnl = await self._subscribe()
            else:
                self.view.note(msgs, time.monotonic())
            self._dirty.set()

    async def dump(self) -> None:
        """Resync the link table from a full dump."""
        assert self.rtnl is not None
        self.resyncs += 1
        self.view.learn(await self.rtnl.dump())

    def snapshot(self) -> dict[str, Link]:
        return self.view.links(time.monotonic())

    async def run(self) -> None:
        reader = asyncio.create_task(self._read(await self._subscribe()), name="netlink events")
        reader.add_done_callback(lambda _: self._dirty.set())
        try:
            self._dirty.set()
            while True:
                expiries = [t for t in self.view.expiries() if t > time.monotonic()]
                with contextlib.suppress(TimeoutError):  # an RA resolver's lifetime ran out
                    wait = min(expiries) - time.monotonic() if expiries else None
                    await asyncio.wait_for(self._dirty.wait(), wait)
                if reader.done():
                    reader.result()  # the events stopped: why is this watcher's failure
                await asyncio.sleep(self.debounce)
                self._dirty.clear()
                await self.dump()
                self.on_snapshot(self.snapshot())
        finally:
            reader.cancel()
            self._close()  # before any await: a second cancel() would skip what follows one
            await asyncio.gather(reader, return_exceptions=True)
