"""agent/watchers/netlink.py against the real kernel, in a throw-away network namespace:
links going up, a default route, an IPv6 router advertisement with RDNSS, lost events;
with the installed pyroute2's backend (0.7, 0.8: SyncRtnl; 0.9: AsyncRtnl)."""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from agent.model import Link
from agent.watchers.netlink import NetlinkWatcher, parse_nduseropt
from tests.conftest import require_program, require_root
from tests.lab.netns import Netns, new_tag

pytestmark = pytest.mark.system

RDNSS_ADDR = "2001:db8::53"


@pytest.fixture
def ns() -> Iterator[Netns]:
    require_root()
    require_program("ip")
    n = Netns(f"dta-nl-{new_tag()}")
    try:
        n.run(["sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0"])
        n.run(["ip", "link", "add", "nla", "type", "veth", "peer", "name", "nlb"])
        yield n
    finally:
        n.delete()


def router_advertisement(lifetime: int) -> bytes:
    ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 60, 0, 0)  # checksum filled by the kernel
    rdnss = struct.pack("!BBHI", 25, 3, 0, lifetime) + socket.inet_pton(socket.AF_INET6, RDNSS_ADDR)
    return ra + rdnss


def send_ra(lifetime: int) -> None:
    """From nlb (the "router"), to all nodes on the link: nla learns the RDNSS option."""
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"nlb")
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, socket.if_nametoindex("nlb"))
        s.sendto(router_advertisement(lifetime), ("ff02::1", 0, 0, socket.if_nametoindex("nlb")))


async def until(
    snaps: list[dict[str, Link]], ok: Callable[[dict[str, Link]], bool], wait: float = 5
) -> dict[str, Link]:
    end = time.monotonic() + wait
    while time.monotonic() < end:
        if snaps and ok(snaps[-1]):
            return snaps[-1]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no such snapshot; last: {snaps[-1] if snaps else None}")


def test_links_routes_and_router_advertisements(ns: Netns) -> None:
    def body() -> None:
        async def go() -> None:
            snaps: list[dict[str, Link]] = []
            w = NetlinkWatcher(snaps.append, debounce=0.01)
            task = asyncio.create_task(w.run())
            try:
                first = await until(snaps, lambda s: "nla" in s)
                assert not first["nla"].up and not first["nla"].default_route
                ns.run(["ip", "link", "set", "nla", "up"])
                ns.run(["ip", "link", "set", "nlb", "up"])
                await until(snaps, lambda s: s["nla"].up and s["nlb"].up)
                ns.run(["ip", "addr", "add", "198.51.100.5/24", "dev", "nla"])
                ns.run(["ip", "route", "add", "default", "via", "198.51.100.1", "dev", "nla"])
                await until(snaps, lambda s: s["nla"].default_route and not s["nlb"].default_route)
                send_ra(lifetime=2)
                got = await until(snaps, lambda s: bool(s["nla"].resolvers))
                assert [r.address for r in got["nla"].resolvers] == [RDNSS_ADDR]
                assert got["nla"].resolvers[0].source.value == "netlink"
                await until(snaps, lambda s: not s["nla"].resolvers, wait=4)  # lifetime ran out
                send_ra(lifetime=600)
                await until(snaps, lambda s: bool(s["nla"].resolvers))
                send_ra(lifetime=0)  # withdrawn
                await until(snaps, lambda s: not s["nla"].resolvers)
                ns.run(["ip", "link", "set", "nla", "down"])
                await until(snaps, lambda s: not s["nla"].up)
                ns.run(["ip", "link", "del", "nla"])
                await until(snaps, lambda s: "nla" not in s and "nlb" not in s)  # swept
            finally:
                task.cancel()

        asyncio.run(asyncio.wait_for(go(), 30))

    ns.call(body, timeout=40)


def test_lost_events_are_recovered_by_a_resync(ns: Netns) -> None:
    def body() -> int:
        async def go() -> int:
            snaps: list[dict[str, Link]] = []
            w = NetlinkWatcher(snaps.append, debounce=0.01, rcvbuf=1024)
            task = asyncio.create_task(w.run())
            try:
                await until(snaps, lambda s: "nla" in s)
                batch = "".join(
                    f"link add nldum{i} type veth peer name nlpeer{i}\n" for i in range(100)
                )
                # the loop is kept busy while the kernel queues 200+ events into a tiny buffer
                subprocess.run(["ip", "-batch", "-"], input=batch, text=True, check=True)  # noqa: ASYNC221
                time.sleep(0.3)  # noqa: ASYNC251
                await until(
                    snaps, lambda s: sum(n.startswith(("nldum", "nlpeer")) for n in s) == 200
                )
                overruns: int = w.overruns
                return overruns
            finally:
                task.cancel()

        return asyncio.run(asyncio.wait_for(go(), 30))

    assert ns.call(body, timeout=40) >= 1


def test_parse_ignores_other_messages() -> None:
    other = struct.pack("=IHHII", 20, 16, 0, 0, 0) + b"\x00" * 4  # RTM_NEWLINK, truncated body
    assert parse_nduseropt(other) == []
    assert parse_nduseropt(b"\x01\x02") == []
