"""What the running kernel hands to user space of an IPv6 router advertisement carrying
DNR (RFC 9463 section 6.1, the Encrypted DNS option, type 144), pinned against the real
thing: a "router" namespace sends RAs from a raw ICMPv6 socket (link-local source, hop
limit 255) to a "machine" namespace (accept_ra 1, not forwarding), where a raw rtnetlink
socket on RTNLGRP_ND_USEROPT and the agent's netlink watcher listen.

What Linux does (6.18 here): RTM_NEWNDUSEROPT carries only the options that
`ndisc_is_useropt` (net/ipv6/ndisc.c) names (RDNSS 25, DNSSL 31, captive portal 37,
PREF64 38; lately also prefix information 3); option 144 is skipped as unknown, whether
alone or beside an RDNSS option, and the RA itself is still accepted (its router lifetime
makes a default route). So the watcher sees the RDNSS resolvers (origin RA) and no
designated ones. The day a kernel passes 144 on, this test fails: then the watcher's
`parse_nduseropt_dnr` (tests/unit/test_dnr_sources.py) takes it.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
import time
from collections.abc import Callable

import pytest

from agent.dns.dnr import DnrInstance, encode_ra
from agent.model import Link, Origin
from agent.watchers.netlink import ND_OPT_DNR, ND_OPT_RDNSS, RTM_NEWNDUSEROPT, NetlinkWatcher
from tests.conftest import require_program, require_root
from tests.lab.netns import SRV_IP6S, Lab, call_in

pytestmark = pytest.mark.system

RTNLGRP_ND_USEROPT = 20
NETLINK_ADD_MEMBERSHIP = 1
SOL_NETLINK = 270
RDNSS_A, RDNSS_B = "2001:db8::53", "2001:db8::54"
DNR = encode_ra(DnrInstance(1, "dns.lab.test", (SRV_IP6S[0],), ("dot",), lifetime=600))


def rdnss(address: str, lifetime: int = 600) -> bytes:
    return struct.pack("!BBHI", ND_OPT_RDNSS, 3, 0, lifetime) + socket.inet_pton(
        socket.AF_INET6, address
    )


def router_advertisement(router_lifetime: int, *options: bytes) -> bytes:
    """Type 134, hop limit 64, no flags; the checksum is filled in by the kernel."""
    return struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, router_lifetime, 0, 0) + b"".join(options)


def send(ifname: str, *packets: bytes) -> None:
    """From the router's side, to all nodes, with hop limit 255 (RFC 4861 6.1.2)."""
    index = socket.if_nametoindex(ifname)
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        for packet in packets:
            s.sendto(packet, ("ff02::1", 0, 0, index))
            time.sleep(0.1)


def useropt_types(data: bytes) -> list[list[int]]:
    """The ND option types of each RTM_NEWNDUSEROPT in a netlink datagram."""
    out = []
    pos = 0
    while pos + 16 <= len(data):
        length, mtype = struct.unpack_from("=IH", data, pos)
        if length < 16:
            break
        if mtype == RTM_NEWNDUSEROPT:
            (opts_len,) = struct.unpack_from("=H", data, pos + 18)
            opts = data[pos + 32 : pos + 32 + opts_len]
            types, at = [], 0
            while at + 2 <= len(opts) and opts[at + 1]:
                types.append(opts[at])
                at += opts[at + 1] * 8
            out.append(types)
        pos += (length + 3) & ~3
    return out


async def until(
    snaps: list[dict[str, Link]], ok: Callable[[dict[str, Link]], bool], wait: float = 5
) -> dict[str, Link]:
    end = time.monotonic() + wait
    while time.monotonic() < end:
        if snaps and ok(snaps[-1]):
            return snaps[-1]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no such snapshot; last: {snaps[-1] if snaps else None}")


def test_kernel_passes_rdnss_on_but_not_dnr() -> None:
    require_root()
    require_program("ip")
    with Lab() as lab:
        assert lab.srv is not None and lab.cli is not None
        srv, cli = lab.srv, lab.cli
        router_if, machine_if = lab.veth_srv, f"dtac{lab.tag}"[:15]
        end = time.monotonic() + 10
        while (
            "fe80"
            not in srv.run(
                ["ip", "-6", "addr", "show", "dev", router_if, "scope", "link", "-tentative"]
            ).stdout
        ):  # an RA must come from a (usable) link-local address
            assert time.monotonic() < end, "the router's link-local address stays tentative"
            time.sleep(0.05)

        def body() -> tuple[list[list[int]], Link]:
            async def go() -> tuple[list[list[int]], Link]:
                raw = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
                raw.bind((0, 0))  # the kernel picks the port id
                raw.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, RTNLGRP_ND_USEROPT)
                snaps: list[dict[str, Link]] = []
                w = NetlinkWatcher(snaps.append, debounce=0.01)
                task = asyncio.create_task(w.run())
                try:
                    await until(snaps, lambda s: machine_if in s)
                    first = (
                        router_advertisement(0, rdnss(RDNSS_A), DNR),  # 144 beside RDNSS
                        router_advertisement(60, DNR),  # 144 alone: only it makes the route
                    )
                    await asyncio.to_thread(call_in, srv.name, lambda: send(router_if, *first))
                    await until(snaps, lambda s: s[machine_if].default_route)
                    then = router_advertisement(60, DNR, rdnss(RDNSS_B))  # 144 first
                    await asyncio.to_thread(call_in, srv.name, lambda: send(router_if, then))
                    await until(snaps, lambda s: len(s[machine_if].resolvers) >= 2)
                    await asyncio.sleep(0.3)  # whatever else the kernel had to say
                    types = []
                    while select.select([raw], [], [], 0)[0]:
                        types += useropt_types(raw.recv(65536))
                    return types, w.snapshot()[machine_if]
                finally:
                    task.cancel()
                    raw.close()

            return asyncio.run(asyncio.wait_for(go(), 30))

        types, link = cli.call(body, timeout=40)
        received = cli.run(["cat", "/proc/net/snmp6"]).stdout
    counters = dict(line.split() for line in received.splitlines() if line.strip())
    assert int(counters["Icmp6InRouterAdvertisements"]) == 3
    kernel = os.uname().release
    # one message per RA that had an RDNSS option, and in it nothing but the RDNSS option
    assert types == [[ND_OPT_RDNSS], [ND_OPT_RDNSS]], (kernel, types)
    assert ND_OPT_DNR not in {t for ts in types for t in ts}, kernel
    assert [(r.address, r.origin) for r in link.resolvers] == [
        (RDNSS_A, Origin.RA),
        (RDNSS_B, Origin.RA),
    ]
    assert not any(r.designated for r in link.resolvers)
    assert link.default_route  # the RA that carried only option 144 was accepted
