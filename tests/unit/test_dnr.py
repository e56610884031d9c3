"""agent/dns/dnr.py: RFC 9463's three option formats, what is malformed, and which of the
designated resolvers the agent uses (DoT only, by priority, bounded)."""

from __future__ import annotations

import struct

import pytest

from agent.dns import dnr
from agent.dns.dnr import DnrError, DnrInstance
from agent.model import NetResolver, Origin, Source

ADN = "dns.example.test"
ADN_WIRE = b"\x03dns\x07example\x04test\x00"
DOT = DnrInstance(1, ADN, ("198.51.100.53",), ("dot",))
# DOT as DHCPv4 option 162's payload, written out by hand from RFC 9463 section 5.1
V4_DOT = (
    b"\x00\x22"  # DNR Instance Data Length: 34
    b"\x00\x01"  # Service Priority 1
    b"\x12"
    + ADN_WIRE  # ADN Length 18, ADN
    + b"\x04\xc6\x33\x64\x35"  # Addr Length 4, 198.51.100.53
    + b"\x00\x01\x00\x04\x03dot"  # SvcParams: alpn (key 1), length 4, "dot"
)


def u16(n: int) -> bytes:
    return struct.pack("!H", n)


def param(key: int, value: bytes) -> bytes:
    return u16(key) + u16(len(value)) + value


def v4_instance(body: bytes) -> bytes:
    return u16(len(body)) + body


def v4_body(
    params: bytes = param(1, b"\x03dot"), addrs: bytes = b"\xc6\x33\x64\x35", prio: int = 1
) -> bytes:
    return u16(prio) + bytes([len(ADN_WIRE)]) + ADN_WIRE + bytes([len(addrs)]) + addrs + params


# -- the formats, both ways --------------------------------------------------------------------


def test_v4_by_hand_and_by_the_encoder() -> None:
    assert dnr.encode_v4([DOT]) == V4_DOT
    assert dnr.parse_v4(V4_DOT) == (DOT,)


def test_v4_round_trip_of_several_instances() -> None:
    instances = (
        DnrInstance(2, "a.example", ("198.51.100.1", "198.51.100.2"), ("dot", "doq"), 8853),
        DnrInstance(1, "b.example", ("203.0.113.9",), ("h2", "h3"), None, "/dns-query{?dns}"),
        DnrInstance(3, "only.example"),  # ADN-only mode: everything after the ADN absent
    )
    payload = dnr.encode_v4(instances)
    assert dnr.parse_v4(payload) == instances
    assert dnr.parse_v4(payload)[2].adn_only


def test_v6_round_trip() -> None:
    inst = DnrInstance(7, ADN, ("2001:db8::53", "2001:db8::54"), ("dot",), 853)
    payload = dnr.encode_v6(inst)
    assert payload[:4] == b"\x00\x07\x00\x12" and payload[4:22] == ADN_WIRE
    assert payload[22:24] == u16(32)  # Addr Length: two IPv6 addresses
    assert dnr.parse_v6(payload) == (inst,)
    assert dnr.parse_v6(dnr.encode_v6(DnrInstance(1, ADN))) == (DnrInstance(1, ADN),)


def test_ra_round_trip_with_lifetime_and_padding() -> None:
    inst = DnrInstance(1, ADN, ("2001:db8::53",), ("dot",), None, None, 1800)
    option = dnr.encode_ra(inst)
    assert option[0] == 144 and option[1] * 8 == len(option)
    assert option[4:8] == struct.pack("!I", 1800)
    assert dnr.parse_ra(option) == (inst,)
    only = DnrInstance(2, ADN, lifetime=dnr.INFINITY)  # ADN-only: padding after the ADN
    assert dnr.parse_ra(dnr.encode_ra(only)) == (only,)


def test_ra_layout_by_hand() -> None:
    body = (
        u16(3) + struct.pack("!I", 600) + u16(len(ADN_WIRE)) + ADN_WIRE
        + u16(16) + bytes.fromhex("20010db8000000000000000000000053")
        + u16(8) + param(1, b"\x03dot") + b""
    )  # fmt: skip
    pad = -(len(body) + 2) % 8
    option = bytes([144, (len(body) + 2 + pad) // 8]) + body + bytes(pad)
    assert dnr.parse_ra(option) == (
        DnrInstance(3, ADN, ("2001:db8::53",), ("dot",), None, None, 600),
    )


def test_names_are_lower_case_without_the_root_dot() -> None:
    wire = b"\x03DNS\x07Example\x04TEST\x00"
    body = u16(1) + bytes([len(wire)]) + wire + b"\x04\xc6\x33\x64\x35" + param(1, b"\x03dot")
    assert dnr.parse_v4(v4_instance(body))[0].adn == ADN


# -- malformed: DnrError ------------------------------------------------------------------------


def test_dnr_error_is_a_value_error() -> None:
    assert issubclass(DnrError, ValueError)


@pytest.mark.parametrize("cut", range(len(V4_DOT)))
def test_every_truncation_is_an_error(cut: int) -> None:
    with pytest.raises(DnrError):
        dnr.parse_v4(V4_DOT[:cut])


V6_DOT = dnr.encode_v6(DnrInstance(1, ADN, ("2001:db8::1",), ("dot",)))
V6_ADN_END = 4 + len(ADN_WIRE)  # Service Priority, ADN Length, ADN
V6_ADDR_END = V6_ADN_END + 2 + 16  # Addr Length, one address


@pytest.mark.parametrize("cut", range(len(V6_DOT)))
def test_every_v6_truncation_is_an_error_but_at_a_field_boundary(cut: int) -> None:
    prefix = V6_DOT[:cut]
    if cut == V6_ADN_END:  # ends right after the ADN: a valid ADN-only option
        assert dnr.parse_v6(prefix) == (DnrInstance(1, ADN),)
    elif cut == V6_ADDR_END:  # ends right after the address: no SvcParams, so no alpn
        assert dnr.parse_v6(prefix) == (DnrInstance(1, ADN, ("2001:db8::1",)),)
    else:
        with pytest.raises(DnrError):
            dnr.parse_v6(prefix)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(u16(40) + v4_body(), id="instance length past the end"),
        pytest.param(V4_DOT + b"\x00", id="a byte after the last instance"),
        pytest.param(V4_DOT + u16(1) + b"\x00", id="an instance too short for its fields"),
        pytest.param(v4_instance(u16(1) + b"\x00"), id="ADN Length 0"),
        pytest.param(v4_instance(u16(1) + b"\x01\x00"), id="the root as ADN"),
        pytest.param(v4_instance(u16(1) + b"\x04\x03dns"), id="ADN without the root label"),
        pytest.param(v4_instance(u16(1) + b"\x06\x03dns\xc0\x0c"), id="compressed ADN"),
        pytest.param(v4_instance(u16(1) + b"\x06\x03d s\x00" + b"\x00"), id="bad ADN label"),
        pytest.param(v4_instance(u16(1) + b"\x06\x03dns\x00\x00"), id="octets after the ADN"),
        pytest.param(v4_instance(v4_body(addrs=b"\xc6\x33\x64")), id="Addr Length 3"),
        pytest.param(v4_instance(v4_body(addrs=b"\xc6\x33\x64\x35\x01")), id="Addr Length 5"),
        pytest.param(v4_instance(v4_body(addrs=b"")), id="Addr Length 0"),
        pytest.param(
            v4_instance(v4_body(param(3, u16(853)) + param(1, b"\x03dot"))), id="keys descending"
        ),
        pytest.param(
            v4_instance(v4_body(param(1, b"\x03dot") + param(1, b"\x03doq"))), id="a key twice"
        ),
        pytest.param(v4_instance(v4_body(param(1, b"\x03dot")[:-1])), id="SvcParam truncated"),
        pytest.param(v4_instance(v4_body(param(1, b"\x03dot") + b"\x00")), id="half a key"),
        pytest.param(v4_instance(v4_body(param(1, b""))), id="empty alpn"),
        pytest.param(v4_instance(v4_body(param(1, b"\x00"))), id="empty alpn-id"),
        pytest.param(v4_instance(v4_body(param(1, b"\x04dot"))), id="alpn-id past its value"),
        pytest.param(v4_instance(v4_body(param(1, b"\x03dot") + param(3, b"\x03"))), id="port 1B"),
        pytest.param(v4_instance(v4_body(param(1, b"\x03dot") + param(3, u16(0)))), id="port 0"),
        pytest.param(
            v4_instance(v4_body(param(1, b"\x03dot") + param(4, b"\xc6\x33\x64\x35"))),
            id="ipv4hint",
        ),
        pytest.param(
            v4_instance(v4_body(param(1, b"\x03dot") + param(6, bytes(16)))), id="ipv6hint"
        ),
        pytest.param(
            v4_instance(v4_body(param(0, u16(3)) + param(1, b"\x03dot"))),
            id="mandatory key absent",
        ),
        pytest.param(
            v4_instance(
                v4_body(param(0, u16(3) + u16(1)) + param(1, b"\x03dot") + param(3, u16(1)))
            ),
            id="mandatory out of order",
        ),
        pytest.param(
            v4_instance(v4_body(param(1, b"\x03dot") + param(7, b"\xff"))), id="dohpath not UTF-8"
        ),
        pytest.param(b"", id="empty"),
        pytest.param(bytes(70000), id="longer than any option"),
    ],
)
def test_malformed_v4(payload: bytes) -> None:
    with pytest.raises(DnrError):
        dnr.parse_v4(payload)


def test_one_bad_instance_spoils_the_option() -> None:
    bad = v4_instance(v4_body(addrs=b"\xc6\x33\x64"))
    with pytest.raises(DnrError):
        dnr.parse_v4(V4_DOT + bad)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(u16(1) + u16(0), id="ADN Length 0"),
        pytest.param(u16(1) + u16(len(ADN_WIRE)) + ADN_WIRE + u16(4) + bytes(4), id="Addr 4"),
        pytest.param(u16(1) + u16(len(ADN_WIRE)) + ADN_WIRE + u16(17) + bytes(17), id="Addr 17"),
        pytest.param(u16(1) + u16(200) + ADN_WIRE, id="ADN Length past the end"),
    ],
)
def test_malformed_v6(payload: bytes) -> None:
    with pytest.raises(DnrError):
        dnr.parse_v6(payload)


def test_malformed_ra() -> None:
    good = dnr.encode_ra(DnrInstance(1, ADN, ("2001:db8::53",), ("dot",), lifetime=60))
    with pytest.raises(DnrError, match="type"):
        dnr.parse_ra(b"\x19" + good[1:])
    with pytest.raises(DnrError, match="Length"):
        dnr.parse_ra(good[:1] + bytes([good[1] + 1]) + good[2:])
    with pytest.raises(DnrError, match="Length"):
        dnr.parse_ra(good[:-8])
    with pytest.raises(DnrError, match="padding"):  # 8 octets more, and Length says so
        dnr.parse_ra(good[:1] + bytes([good[1] + 1]) + good[2:] + bytes(8))
    only = dnr.encode_ra(DnrInstance(1, ADN, lifetime=60))
    with pytest.raises(DnrError):  # not padding after the ADN, and no room for the fields
        dnr.parse_ra(only[:-1] + b"\x01")


# -- what is left out without an error ----------------------------------------------------------


def test_unusable_addresses_are_discarded() -> None:
    addrs = b"".join(
        bytes(int(o) for o in a.split("."))
        for a in ("224.0.0.1", "127.0.0.1", "0.0.0.0", "255.255.255.255", "198.51.100.53")
    )
    assert dnr.parse_v4(v4_instance(v4_body(addrs=addrs)))[0].addresses == ("198.51.100.53",)
    only_bad = v4_instance(v4_body(addrs=bytes([127, 0, 0, 1])))
    assert dnr.parse_v4(V4_DOT + only_bad) == (DOT,)  # the instance left with none: dropped
    v6 = DnrInstance(1, ADN, ("::1", "ff02::1", "::ffff:127.0.0.1", "::", "2001:db8::53"), ("dot",))
    assert dnr.parse_v6(dnr.encode_v6(v6))[0].addresses == ("2001:db8::53",)


def test_an_unknown_mandatory_key_drops_the_instance() -> None:
    ech = v4_instance(v4_body(param(0, u16(5)) + param(1, b"\x03dot") + param(5, b"\x01")))
    assert dnr.parse_v4(ech + V4_DOT) == (DOT,)
    known = v4_instance(
        v4_body(param(0, u16(1) + u16(3)) + param(1, b"\x03dot") + param(3, u16(5353)))
    )
    assert dnr.parse_v4(known)[0].port == 5353


def test_unknown_keys_are_ignored() -> None:
    extra = v4_instance(v4_body(param(1, b"\x03dot") + param(5, b"ech") + param(9999, b"x")))
    assert dnr.parse_v4(extra) == (DOT,)


# -- to resolvers -------------------------------------------------------------------------------


def test_resolvers_are_dot_only_with_their_name() -> None:
    instances = (
        DnrInstance(1, "doh.example", ("198.51.100.1",), ("h2", "h3"), None, "/dns-query{?dns}"),
        DnrInstance(2, "doq.example", ("198.51.100.2",), ("doq",)),
        DnrInstance(3, "both.example", ("198.51.100.3",), ("h2", "dot"), 8853),
        DnrInstance(4, "adn-only.example"),
        DnrInstance(5, "none.example", ("198.51.100.5",)),
    )
    got = dnr.resolvers(dnr.parse_v4(dnr.encode_v4(instances)), Source.LEASE)
    assert got == (
        NetResolver("198.51.100.3", "both.example", 8853, True, Source.LEASE, Origin.DNR, 3),
    )
    assert got[0].designated


def test_resolvers_by_priority_then_wire_order() -> None:
    instances = [
        DnrInstance(30, "c.example", ("198.51.100.30",), ("dot",)),
        DnrInstance(10, "a.example", ("198.51.100.10", "198.51.100.11"), ("dot",)),
        DnrInstance(20, "b1.example", ("198.51.100.20",), ("dot",)),
        DnrInstance(20, "b2.example", ("198.51.100.21",), ("dot",)),
    ]
    got = dnr.resolvers(instances, Source.LEASE)
    assert [(r.address, r.priority) for r in got] == [
        ("198.51.100.10", 10), ("198.51.100.11", 10), ("198.51.100.20", 20),
        ("198.51.100.21", 20), ("198.51.100.30", 30),
    ]  # fmt: skip
    assert all(r.port == 853 and r.tls and r.origin is Origin.DNR for r in got)


def test_resolvers_are_bounded() -> None:
    many = [
        DnrInstance(i, f"r{i}.example", (f"198.51.100.{i}",), ("dot",)) for i in range(40, 0, -1)
    ]
    got = dnr.resolvers(many, Source.NETLINK)
    assert len(got) == dnr.MAX_INSTANCES
    assert [r.priority for r in got] == list(range(1, dnr.MAX_INSTANCES + 1))  # the best ones
    wide = DnrInstance(1, ADN, tuple(f"203.0.113.{i}" for i in range(1, 60)), ("dot",))
    payload = dnr.encode_v4([wide])  # 59 addresses: Addr Length 236
    got = dnr.resolvers(dnr.parse_v4(payload), Source.LEASE)
    assert [r.address for r in got] == [f"203.0.113.{i}" for i in range(1, dnr.MAX_ADDRESSES + 1)]


def test_resolvers_skip_a_withdrawn_ra_instance_and_repeats() -> None:
    gone = DnrInstance(1, ADN, ("2001:db8::1",), ("dot",), lifetime=0)
    kept = DnrInstance(2, ADN, ("2001:db8::2",), ("dot",), lifetime=600)
    again = DnrInstance(3, "other.example", ("2001:db8::2",), ("dot",))
    got = dnr.resolvers([gone, kept, again], Source.NETLINK)
    assert [(r.address, r.auth_name) for r in got] == [("2001:db8::2", ADN)]
