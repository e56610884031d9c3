"""Fuzzing what clients and upstreams send: agent/dns/packet.py, agent/dns/wire.py, and the
tunnel's answer path, on near-valid DNS messages (built, then mutated byte by byte).

Targets (see tests/fuzz_corpus): `query` (a client's query: parse_query and the surgery
on what it accepts), `answer` (an upstream's answer to it, through the tunnel in memory),
`frames` (FrameReader on a stream cut anywhere), `response` (the prober's parse_response).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, cast

import dns.message
import dns.rdatatype
import dns.rrset
from hypothesis import strategies as st

from agent.dns import packet, wire
from agent.dns.packet import HEADER, RR_FIXED, PacketError
from agent.errors import MalformedMessage, MismatchedMessage
from agent.model import Method, Profile, UpstreamSpec
from agent.tunnel.forwarder import Tunnel
from agent.tunnel.pending import Pending
from agent.tunnel.settings import TunnelConfig
from agent.tunnel.upstream import Upstream
from tests.fuzz_corpus import MUTATIONS, Target, expect, mutate, mutated, property_test
from tests.unit.test_tunnel_routing import MemUpstream

U16 = st.integers(0, 0xFFFF)
LABELS = [b"www", b"example", b"test", b"WwW", b"a", b"xn--bcher-kva", b"_dns", b"*", b"STARTTLS"]
NAME_ENDS = [
    b"\x00",
    b"\x00",
    b"\x00",
    b"\x00",
    b"\xc0\x0c",
    b"\xc0",
    b"\x40\x00",
    b"\x80\x00",
    b"",
]
# strategies are built once (hypothesis spends its time building them, not drawing)
LABEL_LISTS = st.lists(
    st.one_of(st.sampled_from(LABELS), st.binary(min_size=1, max_size=63)), max_size=6
)
RTYPES = st.one_of(st.sampled_from([1, 28, 5, 16, 41, 250, 24]), U16)
RCLASSES = st.one_of(st.sampled_from([1, 255, 512, 1232, 4096]), U16)
OPTION_CODES = st.lists(st.one_of(st.sampled_from([12, 11, 10, 8]), U16), max_size=3)
PAYLOADS = st.one_of(st.sampled_from([0, 512, 1232, 4096, 65535]), U16)
FLAGS = st.one_of(st.sampled_from([0x0100, 0, 0x0110, 0x8100, 0x2900]), U16)


@st.composite
def dns_names(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 15)) == 0:  # around MAX_LABELS
        return b"\x01a" * draw(st.integers(120, 135)) + b"\x00"
    labels = draw(LABEL_LISTS)
    return b"".join(bytes([len(x)]) + x for x in labels) + draw(st.sampled_from(NAME_ENDS))


NAMES = dns_names()


@st.composite
def records(draw: st.DrawFn, rtype: int | None = None) -> bytes:
    name = draw(st.one_of(st.sampled_from([b"\x00", b"\xc0\x0c"]), NAMES))
    if rtype is None:
        rtype = draw(RTYPES)
    rdata = draw(st.binary(max_size=24))
    ttl = draw(st.integers(0, 2**32 - 1))
    return name + RR_FIXED.pack(rtype, draw(RCLASSES), ttl, len(rdata)) + rdata


RECORDS, TSIGS = records(), records(packet.TYPE_TSIG)


@st.composite
def opts(draw: st.DrawFn) -> bytes:
    """An OPT record: payload, DO/TO flags, options (padding, keepalive, cookie, any)."""
    options = b""
    for code in draw(OPTION_CODES):
        data = draw(st.binary(max_size=20))
        length = draw(st.one_of(st.just(len(data)), U16))  # a lying length, sometimes
        options += struct.pack("!HH", code, length) + data
    ttl = draw(st.sampled_from([0, 0x8000, 0xC000, 0x4000, 0x01000000]))
    return b"\x00" + RR_FIXED.pack(packet.TYPE_OPT, draw(PAYLOADS), ttl, len(options)) + options


OPTS = opts()


@st.composite
def query_messages(draw: st.DrawFn, *, valid_header: bool = False) -> bytes:
    """A query as clients send them: one question, maybe EDNS, maybe TSIG, rarely more."""
    flags = packet.RD if valid_header else draw(FLAGS)
    question = draw(NAMES) + struct.pack(
        "!HH", draw(st.sampled_from([1, 28, 16, 255, 65])), draw(st.sampled_from([1, 3, 255]))
    )
    an = [draw(RECORDS)] if draw(st.integers(0, 15)) == 0 else []
    ar = []
    if draw(st.booleans()):
        ar.append(draw(OPTS))
    if draw(st.integers(0, 7)) == 0:
        ar.append(draw(TSIGS))
    if draw(st.integers(0, 7)) == 0:
        ar.append(draw(RECORDS))
    ar = draw(st.permutations(ar))
    head = HEADER.pack(draw(U16), flags, 1, len(an), 0, len(ar))
    return head + question + b"".join(an) + b"".join(ar)


QUERIES, VALID_QUERIES = query_messages(), query_messages(valid_header=True)


@st.composite
def near_limit(draw: st.DrawFn) -> bytes:
    """A query a few bytes short of the TCP frame's 65,535: one big record (the OPT, with an
    option nobody knows, or some other) fills it."""
    question = draw(NAMES) + b"\x00\x01\x00\x01"
    head = HEADER.pack(draw(U16), packet.RD, 1, 0, 0, 1) + question
    total = draw(st.one_of(st.integers(65_533, 65_535), st.integers(65_400, 65_535)))
    rdlen = max(4, total - len(head) - 11)
    if draw(st.booleans()):
        rdata = struct.pack("!HH", 65001, rdlen - 4) + bytes(rdlen - 4)
        return head + b"\x00" + RR_FIXED.pack(packet.TYPE_OPT, 1232, 0, rdlen) + rdata
    return head + b"\x00" + RR_FIXED.pack(16, 1, 0, rdlen) + bytes(rdlen)


NEAR_LIMIT = near_limit()
QUERY_INPUTS = st.one_of(QUERIES, mutated(QUERIES), NEAR_LIMIT, st.binary(max_size=40))


def queries(big: bool) -> st.SearchStrategy[bytes]:
    return QUERY_INPUTS


# -- query: parse_query, then what the tunnel does with what it accepts -------------------------


class NullSink:
    udp = True

    def admit(self, addr: Any) -> bool:
        return True

    def deliver(self, wire: bytes, addr: Any) -> None:
        pass

    def done(self, addr: Any) -> None:
        pass


def check_query(wire_: bytes) -> None:
    try:
        info = packet.parse_query(wire_)
    except PacketError as exc:
        expect(exc.rcode in (None, packet.FORMERR, packet.NOTIMP), "parse_query: rcode", exc.rcode)
        reply = packet.header_error_reply(wire_, exc.rcode) if exc.rcode is not None else None
        expect(reply is None or (len(reply) == 12 and reply[:2] == wire_[:2]), "header reply")
        return
    n = len(wire_)
    expect(12 < info.question_end <= n, "parse_query: question_end", info)
    if info.edns:
        expect(info.question_end <= info.opt_start < info.opt_end <= n, "parse_query: OPT", info)
    expect(packet.UDP_DEFAULT <= info.payload <= 0xFFFF, "parse_query: payload", info.payload)
    expect(isinstance(packet.qname(wire_, info), str), "qname")
    for rcode in (packet.SERVFAIL, packet.REFUSED):
        reply = packet.error_reply(wire_, info, rcode)
        expect(len(reply) == info.question_end + 11 * info.edns, "error_reply: size", len(reply))
        expect(
            reply[:2] == wire_[:2] and reply[2] & 0x80 and reply[3] & 0xF == rcode, "error_reply"
        )
    # padding, as the tunnel does it before a query goes into TLS
    p = Pending(NullSink(), None, wire_, info, 0.0)
    padded = p.pad()
    expect(len(padded) <= packet.MAX_MESSAGE, "pad: grows past 65,535", len(padded))
    if padded is wire_:
        return
    try:
        again = packet.parse_query(padded)
    except PacketError as exc:
        raise AssertionError(f"pad: the padded query does not parse: {exc}") from None
    expect(len(padded) % packet.PAD_BLOCK == 0, "pad: not a multiple of the block")
    expect(again.padded or not _options_whole(wire_, info), "pad: no padding option")
    expect(p.added_opt == (not info.edns), "pad: added_opt")
    if p.added_opt:
        expect(packet.strip_opt(padded) == wire_, "strip_opt: does not undo pad_query's OPT")


def _options_whole(buf: bytes, info: packet.QueryInfo) -> bool:
    """The OPT's options fill its data exactly (else a padding option after them is
    misaligned: garbage in, garbage out)."""
    if not info.edns:
        return True
    pos, end = info.opt_start + 11, info.opt_end
    while pos + 4 <= end:
        pos += 4 + (buf[pos + 2] << 8 | buf[pos + 3])
    return pos == end


# -- answer: an upstream's answer, through the tunnel in memory ---------------------------------

A = "198.51.100.1"


class Sink(NullSink):
    def __init__(self, udp: bool) -> None:
        self.udp = udp
        self.got: list[bytes] = []

    def deliver(self, wire: bytes, addr: Any) -> None:
        self.got.append(wire)


class PaddingUpstream(MemUpstream):
    """Takes a query the way a TLS connection does: padded, and the frame must fit."""

    def submit(self, p: Pending, now: float) -> None:
        q = (p.padded or p.pad()) if self.spec.private else p.query
        p.strip = p.added_opt if self.spec.private else False
        struct.pack("!H", len(q))  # the length prefix (connection.py)
        super().submit(p, now)


def _case_flip(data: bytes, mask: int) -> bytes:
    return bytes(b ^ 0x20 if 0x41 <= b & 0xDF <= 0x5A and mask >> (i % 32) & 1 else b
                 for i, b in enumerate(data))  # fmt: skip


@st.composite
def answer_cases(draw: st.DrawFn, big: bool) -> tuple[bytes, bytes, bool, bool]:
    """(client query, the upstream's frame, private upstream?, UDP client?)"""
    query = draw(st.one_of(VALID_QUERIES, NEAR_LIMIT))
    try:
        info = packet.parse_query(query)
    except PacketError:
        info = None
    end = info.question_end if info else min(len(query), 40)
    flags = packet.QR | packet.RD | packet.RA | draw(st.sampled_from([0, 0, 2, 3, 5, 0x0200]))
    question = query[12:end]
    if draw(st.booleans()):
        question = _case_flip(question, draw(st.integers(0, 2**32 - 1)))  # 0x20 upstreams
    n_an = draw(st.integers(0, 600 if big else 40))
    answers = (
        b"\xc0\x0c" + RR_FIXED.pack(1, 1, 60, 4) + draw(st.binary(min_size=4, max_size=4))
    ) * n_an
    extra = [draw(OPTS)] if draw(st.booleans()) else []
    if draw(st.integers(0, 7)) == 0:
        extra.append(draw(OPTS))  # two OPTs: FORMERR by the RFC, yet they come
    qd = 1 if end > 12 else 0
    frame = HEADER.pack(draw(U16), flags, qd, n_an, 0, len(extra)) + question + answers
    frame += b"".join(extra)
    how = draw(st.integers(0, 3))  # as it is (twice as likely), mutated, or the query's echo
    if how == 2:
        frame = mutate(frame, draw(MUTATIONS))
    elif how == 3:
        frame = query
    return query, frame.ljust(12, b"\x00"), draw(st.booleans()), draw(st.booleans())


def check_answer(case: tuple[bytes, bytes, bool, bool]) -> None:
    query, frame, private, udp = case
    try:
        info = packet.parse_query(query)
    except PacketError:
        return  # never forwarded (the query target covers it)

    async def go() -> None:
        spec = UpstreamSpec(A) if private else UpstreamSpec(A, Method.UDP_PLAIN, 53)
        cfg = TunnelConfig(upstreams=(spec,), profile=Profile.OPPORTUNISTIC, listen=())
        t = Tunnel(cfg, upstream_factory=lambda *a: cast(Upstream, PaddingUpstream(*a)))
        up = cast(PaddingUpstream, t.upstreams[0])
        sink = Sink(udp)
        t.on_query(query, sink, ("127.0.0.1", 5353))
        expect(len(up.got) == 1, "tunnel: the query did not go upstream")
        p = up.take_queue()[0]
        t.answered(cast(Upstream, up), p, frame)
        expect(len(sink.got) == 1 and t.pending == 0, "tunnel: not exactly one answer")
        reply = sink.got[0]
        expect(len(reply) >= 12 and reply[:2] == query[:2] and reply[2] & 0x80, "answer: header")
        if udp and len(reply) > packet.udp_limit(info):
            expect(
                reply[2] << 8 & packet.TC and len(reply) == info.question_end + 11 * info.edns,
                "answer: over the UDP client's limit",
                f"{len(reply)} > {packet.udp_limit(info)}",
            )
        expect(packet.question_matches(query, info, reply), "answer: another question")

    asyncio.run(go())


# -- frames: FrameReader on a stream cut anywhere -----------------------------------------------


def _frames(stream: bytes) -> tuple[list[bytes], int]:
    """The reference: whole frames, and where the incomplete rest starts."""
    out, pos = [], 0
    while len(stream) - pos >= 2:
        size = stream[pos] << 8 | stream[pos + 1]
        if len(stream) - pos - 2 < size:
            break
        out.append(stream[pos + 2 : pos + 2 + size])
        pos += 2 + size
    return out, pos


MESSAGE_LISTS = st.lists(st.one_of(QUERIES, st.binary(max_size=30)), max_size=5)


@st.composite
def frame_cases(draw: st.DrawFn, big: bool) -> tuple[list[bytes], bytes, list[int]]:
    """(messages, a tail of anything, where the stream is cut into reads)"""
    messages = draw(MESSAGE_LISTS)
    if draw(st.integers(0, 7)) == 0:
        messages.append(bytes(draw(st.sampled_from([0, 1, 65534, 65535]))))
    tail = draw(st.one_of(st.binary(max_size=8), st.just(b"\xff\xff" + bytes(100))))
    cuts = draw(st.lists(st.integers(0, 70_000 if big else 2_000), max_size=12))
    return messages, tail, cuts


def check_frames(case: tuple[list[bytes], bytes, list[int]]) -> None:
    messages, tail, cuts = case
    stream = b"".join(wire.frame(m) for m in messages) + tail
    want, used = _frames(stream)
    expect(want[: len(messages)] == messages, "frame: does not round-trip")
    reader = wire.FrameReader()
    got: list[bytes] = []
    at = 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        got += reader.feed(stream[at:cut])
        at = max(at, cut)
    expect(got == want, "FrameReader: other frames than the stream holds")
    expect(reader.pending == len(stream) - used, "FrameReader: pending", reader.pending)


# -- response: the prober's check of an answer ----------------------------------------------------


RESPONSE_LABELS = st.lists(st.sampled_from(["www", "example", "test", "a", "STARTTLS"]), max_size=4)


@st.composite
def response_cases(draw: st.DrawFn, big: bool) -> tuple[str, int, bool, int, bytes]:
    """(qname, qtype, EDNS?, query ID, the response's wire)"""
    labels = draw(RESPONSE_LABELS)
    name = ".".join(labels) + "."
    rdtype = draw(st.sampled_from([1, 28, 2, 16]))
    edns = draw(st.booleans())
    qid = draw(U16)
    q = _query(name, rdtype, edns, qid)
    r = dns.message.make_response(q)
    if draw(st.booleans()):
        r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "192.0.2.1"))
    if draw(st.booleans()):
        r.id = draw(U16)
    out = r.to_wire()
    if draw(st.booleans()):
        out = mutate(out, draw(MUTATIONS))
    return name, rdtype, edns, qid, out


def _query(name: str, rdtype: int, edns: bool, qid: int) -> dns.message.Message:
    q = dns.message.make_query(name, dns.rdatatype.RdataType(rdtype), use_edns=0 if edns else False)
    q.id = qid
    return q


def check_response(case: tuple[str, int, bool, int, bytes]) -> None:
    name, rdtype, edns, qid, data = case
    q = _query(name, rdtype, edns, qid)
    try:
        r = wire.parse_response(data, q)
    except (MalformedMessage, MismatchedMessage):
        return
    expect(r.id == q.id and r.flags & 0x8000 and q.is_response(r), "parse_response: accepted")


TARGETS = [
    Target("query", queries, check_query, max_examples=500),
    Target("answer", answer_cases, check_answer, max_examples=250),
    Target("frames", frame_cases, check_frames, max_examples=250),
    Target("response", response_cases, check_response, max_examples=250),
]

test_query = property_test(TARGETS[0])
test_answer = property_test(TARGETS[1])
test_frames = property_test(TARGETS[2])
test_response = property_test(TARGETS[3])
