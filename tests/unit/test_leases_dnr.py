"""agent/watchers/leases.py with DNR: dhclient's lease lines for options 162 and 144, as
dhclient 4.4.3 wrote them (tests/system/test_dnr_dhclient.py runs the real one), become the
link's designated DoT resolvers, ahead of the plain DHCP ones; a broken option is left out
and said, the rest of the lease stands."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.dns import dnr
from agent.model import NetResolver, Origin, Source
from agent.watchers import leases

# as dhclient 4.4.3-P1 wrote it (a dnsmasq lab, the package's dhclient.conf block)
DNR_LINE = (
    "  option dnr 0:22:0:1:12:3:64:6e:73:7:65:78:61:6d:70:6c:65:4:74:65:73:74:0:4:c6:33:64:"
    "35:0:1:0:4:3:64:6f:74;"
)
DHCP6_DNR_LINE = (
    "  option dhcp6.dnr 0:1:0:12:3:64:6e:73:7:65:78:61:6d:70:6c:65:4:74:65:73:74:0:0:10:20:1:"
    "d:b8:0:0:0:0:0:0:0:0:0:0:0:53:0:1:0:4:3:64:6f:74;"
)
DESIGNATED = NetResolver(
    "198.51.100.53", "dns.example.test", 853, True, Source.LEASE, Origin.DNR, 1
)
PLAIN = NetResolver("198.51.100.1", source=Source.LEASE, origin=Origin.DHCP)


def lease(*lines: str, ifname: str = "eth0") -> str:
    body = "\n".join(lines)
    return (
        f'lease {{\n  interface "{ifname}";\n  fixed-address 198.51.100.59;\n'
        "  option routers 198.51.100.1;\n  option domain-name-servers 198.51.100.1;\n"
        f"  option dhcp-server-identifier 198.51.100.1;\n{body}\n"
        "  renew 0 2026/12/06 15:39:23;\n}\n"
    )


def link_of(text: str, ifname: str = "eth0") -> tuple[NetResolver, ...]:
    return leases.to_link(leases.parse_dhclient(text)[ifname]).resolvers


def test_dhclients_line_gives_the_designated_resolver_first() -> None:
    got = leases.parse_dhclient(lease(DNR_LINE))["eth0"]
    assert got.dnr == (dnr.DnrInstance(1, "dns.example.test", ("198.51.100.53",), ("dot",)),)
    assert got.resolvers == ("198.51.100.1",)
    assert link_of(lease(DNR_LINE)) == (DESIGNATED, PLAIN)


def test_without_dnr_the_dhcp_resolvers_say_so() -> None:
    assert link_of(lease()) == (PLAIN,)


def test_the_name_dhclient_gives_an_unnamed_162() -> None:
    line = DNR_LINE.replace("option dnr ", "option unknown-162 ")
    assert link_of(lease(line)) == (DESIGNATED, PLAIN)
    both = lease(DNR_LINE, line)  # the same option under both names: once
    assert link_of(both) == (DESIGNATED, PLAIN)


def test_dhcp6_dnr() -> None:
    text = (
        'lease6 {\n  interface "eth1";\n  ia-na 1a:2b:3c:4d {\n    starts 1796571644;\n'
        "  }\n  option dhcp6.name-servers 2001:db8::1;\n"
        f"{DHCP6_DNR_LINE}\n}}\n"
    )
    designated = NetResolver("2001:db8::53", "dns.example.test", 853, True, Source.LEASE,
                             Origin.DNR, 1)  # fmt: skip
    plain = NetResolver("2001:db8::1", source=Source.LEASE, origin=Origin.DHCP)
    assert link_of(text, "eth1") == (designated, plain)


def test_the_last_block_wins_dnr_too() -> None:
    other = DNR_LINE.replace("c6:33:64:35", "cb:0:71:9")  # 203.0.113.9
    text = lease(DNR_LINE) + lease(other)
    assert [r.address for r in link_of(text)] == ["203.0.113.9", "198.51.100.1"]
    assert link_of(lease(DNR_LINE) + lease()) == (PLAIN,)  # the newer lease has none


def test_a_quoted_value_is_unescaped() -> None:
    """dhclient quotes a `string` option whose octets are all printable (`\\"`, `\\\\`,
    `\\'`, `\\ooo` escapes); such a payload is never a valid DNR option, but it is read as
    the octets it stands for, and then refused."""
    assert leases._octets(r'"AB\"C\\D;E}F G\'#"') == b"AB\"C\\D;E}F G'#"
    assert leases._octets(r'"a\001\377"') == b"a\x01\xff"
    assert leases._octets("0:22:ff:a") == b"\x00\x22\xff\x0a"


@pytest.mark.parametrize(
    "value",
    [
        '"AB\\"C\\\\D;E}F G\\\'#"',  # printable: what dhclient writes for such octets
        "0:22:0:1",  # truncated
        "0:zz:1",  # not hex
        "100:1",  # three digits
        "0::1",  # an empty octet
        '"unterminated',
        "",
        ":".join(["ff"] * 70000),  # longer than any option
    ],
)
def test_a_broken_option_is_left_out_and_said(value: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="agent.watchers.leases")
    text = lease(f"  option dnr {value};")
    assert link_of(text) == (PLAIN,)  # the rest of the lease stands
    assert any("eth0" in r.getMessage() and "option dnr" in r.getMessage() for r in caplog.records)


def test_a_doh_only_network_gives_no_designated_resolver() -> None:
    doh = dnr.DnrInstance(1, "doh.example", ("198.51.100.53",), ("h2",), None, "/dns-query{?dns}")
    line = "  option dnr " + ":".join(f"{b:x}" for b in dnr.encode_v4([doh])) + ";"
    got = leases.parse_dhclient(lease(line))["eth0"]
    assert got.dnr == (doh,)  # parsed, but not a DoT resolver
    assert link_of(lease(line)) == (PLAIN,)


def test_read_dirs_and_networkd(tmp_path: Path) -> None:
    (tmp_path / "dhclient.eth0.leases").write_text(lease(DNR_LINE))
    links = leases.read_dirs([tmp_path])
    assert links["eth0"].resolvers == (DESIGNATED, PLAIN)
    networkd = leases.parse_networkd("ADDRESS=198.51.100.9\nDNS=198.51.100.1\n", "eth9")
    assert networkd is not None
    assert leases.to_link(networkd).resolvers == (
        NetResolver("198.51.100.1", source=Source.LEASE, origin=Origin.DHCP),
    )
