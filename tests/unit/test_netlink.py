"""agent/watchers/netlink.py without sockets: the watcher over a scripted kernel (the `Rtnl`
seam), RA options out of messages as the installed pyroute2 parses them, ENOBUFS, and the
import of pyroute2's parts only. The real kernel: tests/system/test_netlink.py."""

from __future__ import annotations

import asyncio
import errno
import importlib
import importlib.metadata
import json
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from agent.model import Link
from agent.watchers import netlink
from agent.watchers.netlink import Dump, KernelView, Message, NetlinkWatcher
from tests.conftest import run

RDNSS_ADDR = "2001:db8::53"


class Msg(dict[str, Any]):
    """A dump message as the watcher reads it: fields by key, attributes by get_attr."""

    def __init__(self, attrs: dict[str, Any], **fields: Any) -> None:
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


def link(index: int, name: str, up: bool) -> Msg:
    state = "UP" if up else "DOWN"
    return Msg({"IFLA_IFNAME": name, "IFLA_OPERSTATE": state}, index=index, flags=int(up))


def default_route(oif: int) -> Msg:
    return Msg({"RTA_OIF": oif}, dst_len=0)


def nduseropt(ifindex: int, lifetime: int) -> bytes:
    """RTM_NEWNDUSEROPT as the kernel sends it for an RA with one RDNSS option."""
    option = struct.pack("!BBHI", 25, 3, 0, lifetime) + socket.inet_pton(
        socket.AF_INET6, RDNSS_ADDR
    )
    body = struct.pack("=BxHiBBxxI", socket.AF_INET6, len(option), ifindex, 134, 0, 0) + option
    return struct.pack("=IHHII", 16 + len(body), 68, 0, 0, 0) + body


def parsed(data: bytes) -> list[Message]:
    """The messages the installed pyroute2 makes of these bytes (its rtnetlink marshal)."""
    marshal = importlib.import_module("pyroute2.netlink.rtnl.marshal").MarshalRtnl()
    return list(marshal.parse(data))


class FakeRtnl:
    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.queue: asyncio.Queue[Sequence[Message] | OSError] = asyncio.Queue()
        self.subscribed = self.closed = False

    async def subscribe(self) -> None:
        self.kernel.subscribing.set()
        await self.kernel.gate.wait()
        self.subscribed = True

    async def events(self) -> Sequence[Message]:
        got = await self.queue.get()
        if isinstance(got, OSError):
            raise got
        return got

    async def dump(self) -> Dump:
        return Dump(list(self.kernel.links), list(self.kernel.routes))

    def close(self) -> None:
        self.closed = True


class Kernel:
    """What the fake sockets see; every subscription opened is kept."""

    def __init__(self) -> None:
        self.links: list[Msg] = [link(1, "lo", True), link(2, "eth0", False)]
        self.routes: list[Msg] = []
        self.opened: list[FakeRtnl] = []
        self.subscribing = asyncio.Event()  # set when a subscription is asked for
        self.gate = asyncio.Event()  # which waits for this
        self.gate.set()

    def rtnl(self, rcvbuf: int) -> FakeRtnl:
        self.opened.append(FakeRtnl(self))
        return self.opened[-1]

    def send(self, msgs: Sequence[Message] | OSError) -> None:
        self.opened[-1].queue.put_nowait(msgs)


class Snaps(list[dict[str, Link]]):
    """The watcher's snapshots, as on_snapshot hands them over."""

    def __init__(self) -> None:
        super().__init__()
        self.new = asyncio.Event()

    def __call__(self, snap: dict[str, Link]) -> None:
        self.append(snap)
        self.new.set()

    async def until(self, ok: Callable[[dict[str, Link]], bool]) -> dict[str, Link]:
        async with asyncio.timeout(3):
            while not (self and ok(self[-1])):
                self.new.clear()
                await self.new.wait()
        return self[-1]


def test_snapshots_follow_dumps_and_events() -> None:
    async def go() -> None:
        kernel, snaps = Kernel(), Snaps()
        w = NetlinkWatcher(snaps, debounce=0.001, rtnl=kernel.rtnl)
        task = asyncio.create_task(w.run())
        try:
            first = await snaps.until(lambda s: "eth0" in s)
            assert first == {"eth0": Link("eth0", up=False)}  # lo left out
            kernel.links[1] = link(2, "eth0", True)
            kernel.routes = [default_route(2), Msg({"RTA_OIF": 2}, dst_len=24)]
            kernel.send([Msg({}, header={"type": 16})])  # any event: resync
            got = await snaps.until(lambda s: s["eth0"].up)
            assert got == {"eth0": Link("eth0", up=True, default_route=True)}
            kernel.send(parsed(nduseropt(2, lifetime=600)))
            got = await snaps.until(lambda s: bool(s["eth0"].resolvers))
            assert [(r.address, r.source.value) for r in got["eth0"].resolvers] == [
                (RDNSS_ADDR, "netlink")
            ]
            kernel.send(parsed(nduseropt(2, lifetime=0)))  # withdrawn
            await snaps.until(lambda s: not s["eth0"].resolvers)
            assert kernel.opened[0].subscribed and w.overruns == 0
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert kernel.opened[0].closed

    run(go())


def test_enobufs_resubscribes_and_resyncs() -> None:
    async def go() -> None:
        kernel, snaps = Kernel(), Snaps()
        w = NetlinkWatcher(snaps, debounce=0.001, rtnl=kernel.rtnl)
        task = asyncio.create_task(w.run())
        try:
            await snaps.until(lambda s: "eth0" in s)
            resyncs = w.resyncs
            kernel.links.append(link(3, "wlan0", True))  # the event for it was lost
            kernel.gate.clear()
            kernel.subscribing.clear()
            kernel.send(OSError(errno.ENOBUFS, "No buffer space available"))
            await kernel.subscribing.wait()
            await w.dump()  # while it subscribes again, the old subscription still dumps
            kernel.gate.set()
            await snaps.until(lambda s: "wlan0" in s)
            assert w.overruns == 1 and w.resyncs > resyncs
            assert len(kernel.opened) == 2 and kernel.opened[0].closed
            assert kernel.opened[1].subscribed and not kernel.opened[1].closed
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert kernel.opened[1].closed

    run(go())


def test_other_socket_errors_stop_the_watcher() -> None:
    """The daemon sees the watcher end and says why (not a silent, stale link table)."""

    async def go() -> None:
        kernel = Kernel()
        w = NetlinkWatcher(lambda s: None, debounce=0.001, rtnl=kernel.rtnl)
        task = asyncio.create_task(w.run())
        await asyncio.sleep(0.01)
        kernel.send(OSError(errno.EBADF, "Bad file descriptor"))
        with pytest.raises(OSError, match="Bad file descriptor"):
            await task
        assert kernel.opened[0].closed

    run(go())


def test_an_interrupted_dump_is_taken_as_it_is() -> None:
    """0.7 raises NetlinkDumpInterrupted after the last message of a dump that a change ran
    into; the change's event brings the next resync, the watcher goes on. (0.9 does not
    raise on NLM_F_DUMP_INTR, and the sync backend is not the one used with it.)"""
    if netlink.ASYNC:
        assert netlink.RTNL is netlink.AsyncRtnl
        return

    class Sock:
        def nlm_request(self, request: Any, mtype: int, flags: int) -> Iterator[Msg]:
            yield link(1, "lo", True)
            yield link(2, "eth0", True)
            raise netlink.DumpInterrupted()

    got = run(netlink.SyncRtnl._dump(Sock(), None, 16))
    assert [m.get_attr("IFLA_IFNAME") for m in got] == ["lo", "eth0"]


def test_ra_lifetimes() -> None:
    view = KernelView(names={2: "eth0"}, up={2: True})
    view.note(parsed(nduseropt(2, lifetime=2)), now=100.0)
    assert [r.address for r in view.links(101.0)["eth0"].resolvers] == [RDNSS_ADDR]
    assert view.links(102.5)["eth0"].resolvers == ()  # ran out
    view.note(parsed(nduseropt(2, lifetime=0xFFFFFFFF)), now=100.0)  # infinite
    assert view.links(1e9)["eth0"].resolvers
    view.learn(Dump([link(3, "eth1", True)], []))  # eth0 gone: its RA resolvers too
    assert view.ra == {}


def test_pyroute2_message_bytes_are_the_kernels() -> None:
    data = nduseropt(7, lifetime=300)
    (msg,) = parsed(data)
    assert msg["header"]["type"] == netlink.RTM_NEWNDUSEROPT
    assert netlink.raw(msg) == data


def test_only_pyroute2s_parts_are_imported() -> None:
    """pyroute2's __init__ (all of pyroute2) is not run; a later `import pyroute2` still
    gets the whole package; the backend fits the installed pyroute2's core."""
    code = """
import importlib.metadata, json, sys
from agent.watchers import netlink
before = sorted(m for m in sys.modules if m.split(".")[0] == "pyroute2")
from pyroute2 import IPRoute
print(json.dumps({"before": before, "backend": netlink.RTNL.__name__,
                  "IPRoute": IPRoute.__name__}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    got = json.loads(out.stdout)
    assert "pyroute2" not in got["before"]  # the package module was put back out
    assert not {"pyroute2.ndb", "pyroute2.ipdb", "pyroute2.nftables"} & set(got["before"])
    assert got["IPRoute"] == "IPRoute"
    major, minor = (int(x) for x in importlib.metadata.version("pyroute2").split(".")[:2])
    assert got["backend"] == ("AsyncRtnl" if (major, minor) >= (0, 9) else "SyncRtnl")
