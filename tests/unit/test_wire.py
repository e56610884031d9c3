"""agent/dns/wire.py: the TO flag, the STARTTLS dummy, framing and response matching."""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.rdataclass
import dns.rdatatype
import pytest

from agent.dns import wire
from agent.errors import MalformedMessage, MismatchedMessage


def test_starttls_dummy_is_the_standard_one() -> None:
    q = wire.starttls_query()
    parsed = dns.message.from_wire(q.to_wire())
    assert parsed.question[0].name.to_text() == "STARTTLS."
    assert parsed.question[0].rdclass == dns.rdataclass.CH
    assert parsed.question[0].rdtype == dns.rdatatype.TXT
    assert not parsed.flags & dns.flags.RD
    assert parsed.edns == 0
    assert wire.has_to(parsed)
    assert not parsed.ednsflags & dns.flags.DO  # TO is its own bit, not DO


def test_to_flag_is_bit_after_do_on_the_wire() -> None:
    raw = wire.starttls_query().to_wire()
    # The OPT RR ends the message: ... TYPE(41) CLASS(payload) TTL(ext-rcode, version, flags) RDLEN
    opt = raw.rindex(struct.pack("!H", 41))
    ext_rcode, version, flags = struct.unpack("!BBH", raw[opt + 4 : opt + 8])
    assert (ext_rcode, version, flags) == (0, 0, 0x4000)


def test_has_to_false_without_edns_or_flag() -> None:
    assert not wire.has_to(dns.message.make_query("example.test", "A"))
    assert not wire.has_to(wire.starttls_query(to=False))


def test_probe_query_is_padded_to_128_blocks() -> None:
    for name in ("a.test", "x" * 60 + ".test", "."):
        raw = wire.probe_query(name, "A").to_wire()
        assert len(raw) % 128 == 0, (name, len(raw))


def test_frame_reader_handles_splits_and_batches() -> None:
    msgs = [b"\x01" * 17, b"\x02" * 300, b"", b"\x03" * 5]
    stream = b"".join(wire.frame(m) for m in msgs)
    for cut in range(len(stream) + 1):
        r = wire.FrameReader()
        got = r.feed(stream[:cut]) + r.feed(stream[cut:])
        assert got == msgs
        assert r.pending == 0
    byte_by_byte = wire.FrameReader()
    got = [f for i in range(len(stream)) for f in byte_by_byte.feed(stream[i : i + 1])]
    assert got == msgs


def test_frame_rejects_oversize() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        wire.frame(b"x" * 70000)


def _response_to(q: dns.message.Message) -> dns.message.Message:
    return dns.message.make_response(q)


def test_parse_response_accepts_the_answer() -> None:
    q = wire.probe_query(".", "NS")
    r = wire.parse_response(_response_to(q).to_wire(), q)
    assert r.id == q.id


@pytest.mark.parametrize(
    ("mangle", "error", "text"),
    [
        (lambda w: w[:5], MalformedMessage, "shorter than a DNS header"),
        (lambda w: w + b"\x00junk", MalformedMessage, "unparsable"),
        (lambda w: bytes([w[0] ^ 0xFF]) + w[1:], MismatchedMessage, "id"),
        (lambda w: w[:2] + bytes([w[2] & 0x7F]) + w[3:], MalformedMessage, "QR bit"),
        (lambda w: b"\xff" * 40, MalformedMessage, "unparsable"),
    ],
)
def test_parse_response_rejects(mangle, error, text) -> None:  # type: ignore[no-untyped-def]
    q = wire.probe_query("a.test", "A")
    with pytest.raises(error, match=text):
        wire.parse_response(mangle(_response_to(q).to_wire()), q)


def test_parse_response_rejects_other_question() -> None:
    q = wire.probe_query("a.test", "A")
    other = dns.message.make_query("b.test", "A", id=q.id)
    with pytest.raises(MismatchedMessage, match="question"):
        wire.parse_response(_response_to(other).to_wire(), q)
