"""Fuzzing the DHCP lease files agent/watchers/leases.py reads (dhclient, systemd-networkd):
lease files built from their real shape, values near-valid or anything, then mutated.

Targets: `dhclient-lease` (parse_dhclient), `networkd-lease` (parse_networkd). A lease
never raises, its resolvers are IP addresses, its domains have no root dot, and it
becomes a Link.
"""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from agent.watchers import leases
from tests.fuzz_corpus import Target, expect, mutated_text, property_test, repeats, text_values

ADDRESSES = ["198.51.100.1", "2001:db8::53", "fe80::1%eth0", "::ffff:1.2.3.4", "not-an-ip", ""]
NAMES = ["lab.example", "lab.example.", '"corp.example."', ".", "LAB.Example", "a b", "..."]


ADDRESS = st.one_of(st.sampled_from(ADDRESSES), st.ip_addresses().map(str), text_values())
NAME = st.one_of(st.sampled_from(NAMES), text_values())
ADDRESS_LISTS = st.lists(ADDRESS, max_size=4)
NAME_LISTS = st.lists(NAME, max_size=4)
DHCLIENT_OPTIONS = st.sampled_from(
    ["routers", "domain-name-servers", "dhcp-server-identifier", "dhcp6.name-servers",
     "dhcp6.server-id", "domain-name", "domain-search", "dhcp6.domain-search",
     "subnet-mask", "dhcp-lease-time"]
)  # fmt: skip
OTHER_LINES = st.lists(
    st.sampled_from(
        ["  renew 5 2026/11/27 10:00:00;", "  fixed-address 198.51.100.77;",
         "  ia-na 1a:2b:3c:4d {\n    starts 1795800000;\n  }", "}", "  }", "lease {"]
    ),
    max_size=2,
)  # fmt: skip
NETWORKD_KEYS = st.sampled_from(
    ["ADDRESS", "DNS", "DOMAINNAME", "DOMAIN_SEARCH_LIST", "SERVER_ADDRESS", "ROUTER",
     "NTP", "# ADDRESS", "CLIENTID", " DNS "]
)  # fmt: skip


# -- dhclient.leases --------------------------------------------------------------------------


@st.composite
def dhclient_options(draw: st.DrawFn) -> str:
    name = draw(DHCLIENT_OPTIONS)
    if name in ("domain-name", "domain-search", "dhcp6.domain-search"):
        value = ", ".join(w if w.startswith('"') else f'"{w}"' for w in draw(NAME_LISTS))
    else:
        value = ",".join(draw(ADDRESS_LISTS))
    if draw(st.integers(0, 4)) == 0:
        value = draw(text_values())
    return f"  option {name} {value};"


OPTION_LINES = st.lists(dhclient_options(), max_size=6)
IFNAMES = st.one_of(st.sampled_from(["eth0", "wlan0", "eth1"]), text_values())


@st.composite
def dhclient_blocks(draw: st.DrawFn) -> str:
    lines = [draw(st.sampled_from(["lease {", "lease6 {", "lease{", "  lease {"]))]
    if draw(st.integers(0, 7)):
        lines.append(f'  interface "{draw(IFNAMES)}";')
    lines += draw(OPTION_LINES)
    lines += draw(OTHER_LINES)
    lines.append(draw(st.sampled_from(["}", "}", "}", "  }", "", "};"])))
    return "\n".join(lines)


def dhclient_texts(big: bool) -> st.SearchStrategy[str]:
    files = st.lists(dhclient_blocks(), max_size=4).map("\n".join)
    return st.one_of(
        files,
        mutated_text(files),
        repeats([b"lease {", b"lease{", b'lease {\n interface "a";\n', b"\n}"], big).map(
            lambda b: b.decode("latin-1")
        ),
    )


def _lease_ok(lease: leases.Lease) -> None:
    for r in lease.resolvers:
        expect(str(ipaddress.ip_address(r)) == r, "lease: a resolver that is not an address", r)
    for d in lease.domains:
        expect(isinstance(d, str) and not d.endswith("."), "lease: a domain with the root's dot", d)
    expect(lease.server is None or isinstance(lease.server, str), "lease: server")
    leases.to_link(lease)


def check_dhclient(text: str) -> None:
    found = leases.parse_dhclient(text)
    for ifname, lease in found.items():
        expect(ifname and lease.ifname == ifname and '"' not in ifname, "dhclient: ifname", ifname)
        expect(all(lease.domains), "dhclient: an empty domain", lease.domains)
        lower = [d.lower() for d in lease.domains]
        expect(len(set(lower)) == len(lower), "dhclient: a domain twice", lease.domains)
        _lease_ok(lease)


# -- systemd-networkd ----------------------------------------------------------------------------


@st.composite
def networkd_lines(draw: st.DrawFn) -> str:
    key = draw(NETWORKD_KEYS)
    if key in ("DOMAINNAME", "DOMAIN_SEARCH_LIST"):
        value = " ".join(draw(NAME_LISTS))
    else:
        value = " ".join(draw(ADDRESS_LISTS))
    if draw(st.integers(0, 4)) == 0:
        value = draw(text_values())
    return f"{key}={value}"


def networkd_texts(big: bool) -> st.SearchStrategy[str]:
    files = st.lists(networkd_lines(), max_size=8).map("\n".join)
    return st.one_of(
        files,
        mutated_text(files),
        repeats([b"DNS=1.2.3.4 ", b"ADDRESS=\n", b"="], big).map(lambda b: b.decode("latin-1")),
    )


def check_networkd(text: str) -> None:
    lease = leases.parse_networkd(text, "eth0")
    if lease is not None:
        expect(lease.ifname == "eth0", "networkd: ifname")
        _lease_ok(lease)


TARGETS = [
    Target("dhclient-lease", dhclient_texts, check_dhclient, max_examples=300),
    Target("networkd-lease", networkd_texts, check_networkd, max_examples=300),
]

test_dhclient_lease = property_test(TARGETS[0])
test_networkd_lease = property_test(TARGETS[1])
