"""agent/dns/packet.py: bytes-level parsing and surgery, checked against dnspython."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import dns.tsigkeyring
import pytest

from agent.dns import packet
from agent.dns.packet import PacketError


def q(name: str = "www.example.test", rdtype: str = "A", **kw: object) -> bytes:
    return dns.message.make_query(name, rdtype, **kw).to_wire()  # type: ignore[arg-type]


def test_parse_plain_query() -> None:
    wire = q(use_edns=False)
    info = packet.parse_query(wire)
    assert not info.edns and info.payload == 512 and not info.padded and not info.signed
    assert info.question_end == len(wire)


def test_parse_edns_query() -> None:
    wire = q(use_edns=0, payload=4096)
    info = packet.parse_query(wire)
    assert info.edns and info.payload == 4096 and not info.padded
    assert info.opt_end == len(wire)


def test_parse_padded_and_signed() -> None:
    assert packet.parse_query(q(use_edns=0, pad=128)).padded
    m = dns.message.make_query("a.test", "A")
    m.use_tsig(dns.tsigkeyring.from_text({"k.": "c2VjcmV0c2VjcmV0"}), keyname="k.")
    assert packet.parse_query(m.to_wire()).signed


@pytest.mark.parametrize(
    ("wire", "rcode", "text"),
    [
        (b"\x00" * 5, None, "shorter than a DNS header"),
        (
            dns.message.make_response(dns.message.make_query("a.test", "A")).to_wire(),
            None,
            "a response",
        ),
        (q()[:-3], packet.FORMERR, "truncated question"),
        (q() + b"xx", packet.FORMERR, "trailing garbage"),
        (q()[:4] + b"\x00\x02" + q()[6:], packet.FORMERR, "2 questions"),
        (bytes([0, 1, 0x28, 0]) + q()[4:], packet.NOTIMP, "opcode 5"),
        (q()[:12] + b"\x3f" + b"a" * 10, packet.FORMERR, "past the end"),
        (q()[:12] + b"\x80abc\x00\x00\x01\x00\x01", packet.FORMERR, "unknown label type"),
        (q()[:12] + b"\x01a" * 130 + b"\x00\x00\x01\x00\x01", packet.FORMERR, "too many labels"),
    ],
)
def test_parse_rejects(wire: bytes, rcode: int | None, text: str) -> None:
    with pytest.raises(PacketError, match=text) as exc:
        packet.parse_query(wire)
    assert exc.value.rcode == rcode


@pytest.mark.parametrize("use_edns", [False, 0])
@pytest.mark.parametrize("name", ["a.test", "x" * 63 + ".example.test", "."])
def test_pad_query(use_edns: int | bool, name: str) -> None:
    wire = q(name, "AAAA", use_edns=use_edns)
    info = packet.parse_query(wire)
    padded, added = packet.pad_query(wire, info)
    assert added is (use_edns is False)
    assert len(padded) % 128 == 0
    m = dns.message.from_wire(padded)
    assert m.question[0].name.to_text() == name if name == "." else name + "."
    assert any(o.otype == dns.edns.OptionType.PADDING for o in m.options)
    assert packet.parse_query(padded).padded


def test_pad_leaves_signed_and_padded_alone() -> None:
    wire = q(use_edns=0, pad=128)
    assert packet.pad_query(wire, packet.parse_query(wire)) == (wire, False)


def test_strip_opt_keeps_everything_else() -> None:
    query = dns.message.make_query("a.test", "A", use_edns=0)
    r = dns.message.make_response(query)
    r.answer.append(dns.rrset.from_text("a.test.", 60, "IN", "A", "198.51.100.7"))
    r.additional.append(dns.rrset.from_text("ns.test.", 60, "IN", "A", "198.51.100.8"))
    stripped = dns.message.from_wire(packet.strip_opt(r.to_wire()))
    assert stripped.edns == -1
    assert stripped.answer == r.answer and stripped.additional == r.additional
    plain = dns.message.make_response(
        dns.message.make_query("a.test", "A", use_edns=False)
    ).to_wire()
    assert packet.strip_opt(plain) == plain


def test_error_and_truncated_replies() -> None:
    wire = q(use_edns=0)
    info = packet.parse_query(wire)
    sf = dns.message.from_wire(packet.error_reply(wire, info, packet.SERVFAIL))
    query = dns.message.from_wire(wire)
    assert sf.id == query.id and sf.rcode() == dns.rcode.SERVFAIL and sf.flags & dns.flags.QR
    assert query.is_response(sf) and sf.edns == 0
    big = dns.message.make_response(query)
    big.answer.append(
        dns.rrset.from_text("www.example.test.", 60, "IN", "TXT", *['"' + "x" * 200 + '"'] * 20)
    )
    tc = dns.message.from_wire(packet.truncated_reply(wire, info, big.to_wire()))
    assert tc.flags & dns.flags.TC and not tc.answer and query.is_response(tc)
    nohead = packet.header_error_reply(b"\x12\x34\x01\x00" + b"\x00" * 8, packet.FORMERR)
    assert nohead is not None and struct.unpack("!HH", nohead[:4]) == (0x1234, 0x8101)


def test_question_matches() -> None:
    wire = q("WwW.Example.test")
    info = packet.parse_query(wire)
    same = dns.message.make_response(dns.message.from_wire(wire)).to_wire()
    assert packet.question_matches(wire, info, same)
    lower = dns.message.make_response(dns.message.make_query("www.example.test", "A")).to_wire()
    assert packet.question_matches(wire, info, lower)
    other = dns.message.make_response(dns.message.make_query("www.example.test", "AAAA")).to_wire()
    assert not packet.question_matches(wire, info, other)
    assert not packet.question_matches(wire, info, b"\x00")


def test_a_question_name_over_255_octets_is_refused() -> None:
    ok = b"\x3f" + b"a" * 63
    name = ok * 3 + b"\x3d" + b"b" * 61 + b"\x00"  # 255 octets: the longest there is
    assert len(name) == 255
    query = packet.HEADER.pack(7, 0x0100, 1, 0, 0, 0) + name + b"\x00\x01\x00\x01"
    assert packet.parse_query(query).question_end == len(query)
    longer = ok * 3 + b"\x3e" + b"b" * 62 + b"\x00"  # 256
    too_long = packet.HEADER.pack(7, 0x0100, 1, 0, 0, 0) + longer + b"\x00\x01\x00\x01"
    with pytest.raises(packet.PacketError) as info:
        packet.parse_query(too_long)
    assert info.value.rcode == packet.FORMERR
