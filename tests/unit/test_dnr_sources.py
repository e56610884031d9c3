"""Where the watchers find DNR (RFC 9463) and how they mark the origin of resolvers:
NetworkManager's DHCP options (agent/watchers/nm.py) and the kernel's RTM_NEWNDUSEROPT
(agent/watchers/netlink.py), on bytes made here. What the real NM and kernel do is pinned
by tests/system/test_dnr_nm.py and tests/system/test_dnr_ra.py."""

from __future__ import annotations

import importlib
import logging
import socket
import struct

import pytest

from agent.dns.dnr import INFINITY, DnrInstance, encode_ra, encode_v4, encode_v6
from agent.model import NetResolver, Origin, Source
from agent.watchers.netlink import (
    ND_OPT_DNR,
    Dump,
    KernelView,
    Message,
    RaDnr,
    parse_nduseropt,
    parse_nduseropt_dnr,
)
from agent.watchers.nm import Applied, dnr_resolvers, option_bytes, origin

ADN = "dns.example.net"
V4 = encode_v4(
    [
        DnrInstance(20, "slow.example.net", ("192.0.2.9",), ("dot",)),
        DnrInstance(10, ADN, ("192.0.2.53", "192.0.2.54"), ("h2", "dot"), port=8853),
        DnrInstance(5, "doh.example.net", ("192.0.2.80",), ("h2",), dohpath="/q{?dns}"),
    ]
)


def dhclient_hex(data: bytes) -> str:
    """How dhclient writes an option it has no format for: hex octets, no leading zeros."""
    return ":".join(f"{b:x}" for b in data)


# -- NetworkManager --------------------------------------------------------------------------


def test_option_bytes_reads_both_hex_forms() -> None:
    assert option_bytes("00:1e:c6:33") == b"\x00\x1e\xc6\x33"  # NM's own (private_NNN)
    assert option_bytes("0:1e:c6:3") == b"\x00\x1e\xc6\x03"  # dhclient's
    assert option_bytes(dhclient_hex(V4)) == V4
    assert option_bytes("AB") == b"\xab"
    assert option_bytes(" 1:2\n") == b"\x01\x02"  # surrounding blanks stripped


@pytest.mark.parametrize("text", ["", '"dns"', "1:2g", "123:4", "1::2", "0x1e", "1: 2", "1,2"])
def test_option_bytes_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        option_bytes(text)


def test_dhcpv4_dnr_from_dhclient_backend_key() -> None:
    got = dnr_resolvers({"unknown_162": dhclient_hex(V4), "domain_name_servers": "192.0.2.1"})
    assert got == (  # DoT only, priority order, one per address
        NetResolver("192.0.2.53", ADN, 8853, True, Source.NM, Origin.DNR, 10),
        NetResolver("192.0.2.54", ADN, 8853, True, Source.NM, Origin.DNR, 10),
        NetResolver("192.0.2.9", "slow.example.net", 853, True, Source.NM, Origin.DNR, 20),
    )
    assert all(r.designated for r in got)


def test_dhcpv6_dnr_from_dhclient_backend_key() -> None:
    payload = encode_v6(DnrInstance(1, ADN, ("2001:db8::53",), ("dot",)))
    got = dnr_resolvers({"dhcp6_unknown_144": dhclient_hex(payload)}, 6)
    assert got == (NetResolver("2001:db8::53", ADN, 853, True, Source.NM, Origin.DNR, 1),)
    assert dnr_resolvers({"unknown_162": dhclient_hex(payload)}, 6) == ()  # other family's key


def test_no_dnr_where_nm_shows_none() -> None:
    """NM's internal client: no key for 162 at all; `private_224` is not 162."""
    assert dnr_resolvers({"private_224": dhclient_hex(V4), "domain_name_servers": "x"}) == ()
    assert dnr_resolvers({}) == ()


@pytest.mark.parametrize(
    "text",
    ["zz:1", dhclient_hex(V4[:-3]), dhclient_hex(b"\x00\x02\x00\x01")],  # not hex, cut, no ADN
)
def test_unusable_dhcp_dnr_is_a_warning_not_an_error(
    text: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.watchers.nm"):
        assert dnr_resolvers({"unknown_162": text}) == ()
    assert "unusable" in caplog.text


def test_origins() -> None:
    dhcp = frozenset({"192.0.2.1", "2001:db8::1"})
    auto = Applied("auto", frozenset({"2001:db8::9"}))
    assert origin("192.0.2.1", dhcp, auto) is Origin.DHCP
    assert origin("2001:db8::1", dhcp, auto) is Origin.DHCP  # DHCPv6 even with SLAAC
    assert origin("2001:db8::2", dhcp, auto) is Origin.RA
    assert origin("2001:db8::9", dhcp, auto) is Origin.CONFIGURED  # the profile's own
    assert origin("192.0.2.9", dhcp, auto) is Origin.CONFIGURED
    for method in ("manual", "dhcp", "link-local", "ignore", None):
        assert origin("2001:db8::2", dhcp, Applied(method)) is Origin.CONFIGURED
    assert origin("2001:db8::2", dhcp, None) is Origin.NETWORK  # the profile was not readable
    assert origin("192.0.2.1", dhcp, None) is Origin.DHCP


def test_applied_connection_settings() -> None:
    settings = {
        "ipv4": {"method": "auto", "dns": [0x0900A8C0]},
        "ipv6": {
            "method": "auto",
            "dns": [socket.inet_pton(socket.AF_INET6, "2001:db8::9"), b"\x01\x02"],  # one bad
        },
    }
    assert Applied.from_settings(settings) == Applied("auto", frozenset({"2001:db8::9"}))
    assert Applied.from_settings({}) == Applied()
    assert Applied.from_settings({"ipv6": {"method": 6, "dns": "x"}}) == Applied()


# -- the kernel ------------------------------------------------------------------------------


def nduseropt(ifindex: int, *options: bytes) -> bytes:
    """RTM_NEWNDUSEROPT as the kernel builds it (ndisc_ra_useropt), with these ND options."""
    opts = b"".join(options)
    body = struct.pack("=BxHiBBxxI", socket.AF_INET6, len(opts), ifindex, 134, 0, 0) + opts
    src = struct.pack("=HH", 20, 1) + socket.inet_pton(socket.AF_INET6, "fe80::1")  # SRCADDR
    return struct.pack("=IHHII", 16 + len(body) + len(src), 68, 0, 0, 0) + body + src


def rdnss(address: str, lifetime: int = 600) -> bytes:
    return struct.pack("!BBHI", 25, 3, 0, lifetime) + socket.inet_pton(socket.AF_INET6, address)


def ra_dnr(lifetime: int, addresses: tuple[str, ...] = ("2001:db8::53",), prio: int = 1) -> bytes:
    return encode_ra(DnrInstance(prio, ADN, addresses, ("dot",), lifetime=lifetime))


def parsed(data: bytes) -> list[Message]:
    """The messages the installed pyroute2 makes of these bytes (its rtnetlink marshal)."""
    marshal = importlib.import_module("pyroute2.netlink.rtnl.marshal").MarshalRtnl()
    return list(marshal.parse(data))


def test_nduseropt_with_option_144_would_be_read() -> None:
    data = nduseropt(3, rdnss("2001:db8::1"), ra_dnr(600))
    assert ra_dnr(600)[0] == ND_OPT_DNR
    assert [r.address for r in parse_nduseropt(data)] == ["2001:db8::1"]  # RDNSS untouched
    (got,) = parse_nduseropt_dnr(data)
    assert got == RaDnr(3, DnrInstance(1, ADN, ("2001:db8::53",), ("dot",), lifetime=600))
    assert parse_nduseropt_dnr(nduseropt(3, rdnss("2001:db8::1"))) == []  # what 6.18 sends


def test_kernel_view_puts_ra_dnr_first_and_marks_rdnss_ra() -> None:
    view = KernelView(names={3: "eth0"}, up={3: True})
    msgs = parsed(nduseropt(3, rdnss("2001:db8::1", 100), ra_dnr(20, prio=7)))
    msgs += parsed(nduseropt(3, ra_dnr(INFINITY, ("2001:db8::54",), prio=2)))
    view.note(msgs, now=1000.0)
    assert view.links(1001.0)["eth0"].resolvers == (
        NetResolver("2001:db8::54", ADN, 853, True, Source.NETLINK, Origin.DNR, 2),
        NetResolver("2001:db8::53", ADN, 853, True, Source.NETLINK, Origin.DNR, 7),
        NetResolver("2001:db8::1", source=Source.NETLINK, origin=Origin.RA),
    )
    assert 1020.0 in view.expiries() and 1100.0 in view.expiries()  # the watcher wakes then
    later = view.links(1030.0)["eth0"].resolvers  # the lifetime-20 one ran out
    assert [(r.address, r.origin) for r in later] == [
        ("2001:db8::54", Origin.DNR),
        ("2001:db8::1", Origin.RA),
    ]
    view.note(parsed(nduseropt(3, ra_dnr(0, ("2001:db8::54",)))), now=1040.0)  # withdrawn
    assert [r.origin for r in view.links(1041.0)["eth0"].resolvers] == [Origin.RA]


def test_kernel_view_forgets_ra_dnr_of_a_link_that_is_gone() -> None:
    view = KernelView(names={3: "eth0"}, up={3: True})
    view.note(parsed(nduseropt(3, ra_dnr(INFINITY))), now=0.0)
    assert view.links(1e9)["eth0"].resolvers[0].origin is Origin.DNR
    assert view.dnr
    view.learn(Dump([], []))
    assert view.dnr == {}


def test_malformed_ra_dnr_is_skipped_rdnss_still_taken(caplog: pytest.LogCaptureFixture) -> None:
    bad = bytearray(ra_dnr(600))
    bad[8:10] = b"\x00\xff"  # ADN Length past the option's end
    view = KernelView(names={3: "eth0"}, up={3: True})
    with caplog.at_level(logging.WARNING, logger="agent.watchers.netlink"):
        view.note(parsed(nduseropt(3, bytes(bad), rdnss("2001:db8::1"))), now=0.0)
    assert "unusable" in caplog.text
    assert [(r.address, r.origin) for r in view.links(1.0)["eth0"].resolvers] == [
        ("2001:db8::1", Origin.RA)
    ]
