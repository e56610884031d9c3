"""Bytes-level surgery on DNS messages for the tunnel's hot path.

The tunnel never builds dnspython objects per query: it reads the few header and
OPT facts it needs, rewrites the ID, pads, and shapes answers for UDP clients,
all on bytes. Everything here is pure; errors are `PacketError` with the RCODE a
client should get (or None: drop silently).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("!HHHHHH")
RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength

QR = 0x8000
TC = 0x0200
RD = 0x0100
RA = 0x0080
OPCODE_MASK = 0x7800
RCODE_MASK = 0x000F

NOERROR, FORMERR, SERVFAIL, NOTIMP, REFUSED = 0, 1, 2, 4, 5
TYPE_OPT = 41
TYPE_TSIG = 250
TYPE_SIG = 24
OPTION_KEEPALIVE = 11
OPTION_PADDING = 12
PAD_BLOCK = 128
UDP_DEFAULT = 512  # a client without EDNS
EDNS_PAYLOAD = 1232
MAX_MESSAGE = 65535  # the TCP length prefix's limit
MAX_LABELS = 128
MAX_NAME = 255  # octets of a name on the wire (RFC 1035 3.1)


class PacketError(ValueError):
    """A message the tunnel cannot forward. `rcode` is what to answer, None to drop."""

    def __init__(self, message: str, rcode: int | None) -> None:
        super().__init__(message)
        self.rcode = rcode


@dataclass(frozen=True, slots=True)
class QueryInfo:
    """What the tunnel needs to know about a client's query."""

    question_end: int  # offset just past the question section
    opt_start: int  # offset of the OPT RR, -1 when the query has none
    opt_end: int
    payload: int  # the client's UDP payload size (512 without EDNS)
    padded: bool  # the client padded the query itself
    signed: bool  # carries TSIG or SIG(0): must not be modified
    compressed: bool = False  # the question's name holds a compression pointer

    @property
    def edns(self) -> bool:
        return self.opt_start >= 0


def skip_name(buf: bytes, pos: int) -> int:
    """Offset just past the (possibly compressed) name starting at `pos`."""
    end, _compressed = _name_end(buf, pos)
    return end


def _name_end(buf: bytes, pos: int) -> tuple[int, bool]:
    """Offset just past the name at `pos`, and whether it ended in a compression pointer
    (the cache keys only questions whose name has none: `QueryInfo.compressed`)."""
    end = len(buf)
    for _ in range(MAX_LABELS):
        if pos >= end:
            raise PacketError("name runs past the end of the message", FORMERR)
        length = buf[pos]
        if length == 0:
            return pos + 1, False
        if length & 0xC0 == 0xC0:
            if pos + 2 > end:
                raise PacketError("truncated compression pointer", FORMERR)
            return pos + 2, True
        if length & 0xC0:
            raise PacketError("unknown label type", FORMERR)
        pos += 1 + length
    raise PacketError("too many labels", FORMERR)


def _skip_rr(buf: bytes, pos: int) -> tuple[int, int, int, int]:
    """Return (rr_type, rr_class, rdata_start, rr_end) of the RR at `pos`."""
    pos = skip_name(buf, pos)
    if pos + 10 > len(buf):
        raise PacketError("truncated resource record", FORMERR)
    rtype, rclass, _ttl, rdlen = RR_FIXED.unpack_from(buf, pos)
    end = pos + 10 + rdlen
    if end > len(buf):
        raise PacketError("resource record data runs past the end", FORMERR)
    return rtype, rclass, pos + 10, end


def parse_query(buf: bytes) -> QueryInfo:
    """Validate a client query just enough to forward it safely."""
    if len(buf) < 12:
        raise PacketError(f"{len(buf)} bytes is shorter than a DNS header", None)
    _id, flags, qd, an, ns, ar = HEADER.unpack_from(buf)
    if flags & QR:
        raise PacketError("a response where a query was expected", None)
    if flags & OPCODE_MASK:
        raise PacketError(f"opcode {(flags & OPCODE_MASK) >> 11} is not forwarded", NOTIMP)
    if qd != 1:
        raise PacketError(f"{qd} questions; exactly one is supported", FORMERR)
    pos, compressed = _name_end(buf, 12)
    if pos - 12 > MAX_NAME:
        raise PacketError(f"a name of {pos - 12} octets; at most {MAX_NAME}", FORMERR)
    pos += 4
    if pos > len(buf):
        raise PacketError("truncated question", FORMERR)
    question_end = pos
    for _ in range(an + ns):
        pos = _skip_rr(buf, pos)[3]
    opt_start = opt_end = -1
    payload = UDP_DEFAULT
    padded = signed = False
    for _ in range(ar):
        start = pos
        rtype, rclass, rdata, pos = _skip_rr(buf, pos)
        if rtype == TYPE_OPT:
            if opt_start >= 0:
                raise PacketError("more than one OPT record", FORMERR)
            if buf[start] != 0:
                raise PacketError("OPT owner name is not the root", FORMERR)
            opt_start, opt_end = start, pos
            payload = max(UDP_DEFAULT, rclass)
            padded = _has_option(buf, rdata, pos, OPTION_PADDING)
        elif rtype in (TYPE_TSIG, TYPE_SIG):
            signed = True
    if pos != len(buf):
        raise PacketError(f"{len(buf) - pos} bytes of trailing garbage", FORMERR)
    return QueryInfo(question_end, opt_start, opt_end, payload, padded, signed, compressed)


def _has_option(buf: bytes, pos: int, end: int, code: int) -> bool:
    while pos + 4 <= end:
        ocode, olen = struct.unpack_from("!HH", buf, pos)
        if ocode == code:
            return True
        pos += 4 + olen
    return False


def _padding(length_before: int, block: int) -> bytes:
    """A padding option that brings the message to a multiple of `block`."""
    pad = (-(length_before + 4)) % block
    return struct.pack("!HH", OPTION_PADDING, pad) + bytes(pad)


def pad_query(buf: bytes, info: QueryInfo, block: int = PAD_BLOCK) -> tuple[bytes, bool]:
    """Pad a query to `block` bytes (RFC 7830/8467) unless it is padded or signed.

    A query without EDNS gets an OPT record (so it can carry padding); the second
    value says so, and the answer's OPT must then be removed (`strip_opt`). A query that
    padding would take past a message's limit (or its OPT's) goes as it is: padding is a
    SHOULD, a query that cannot be sent is not an option.
    """
    if info.padded or info.signed:
        return buf, False
    if info.edns:
        rdlen_at = info.opt_start + 9
        rdlen = (buf[rdlen_at] << 8) | buf[rdlen_at + 1]
        option = _padding(len(buf), block)
        if len(buf) + len(option) > MAX_MESSAGE or rdlen + len(option) > 0xFFFF:
            return buf, False
        return (
            buf[:rdlen_at]
            + struct.pack("!H", rdlen + len(option))
            + buf[rdlen_at + 2 : info.opt_end]
            + option
            + buf[info.opt_end :]
        ), False
    ar = (buf[10] << 8) | buf[11]
    opt_fixed = b"\x00" + RR_FIXED.pack(TYPE_OPT, EDNS_PAYLOAD, 0, 0)
    option = _padding(len(buf) + len(opt_fixed), block)
    if len(buf) + len(opt_fixed) + len(option) > MAX_MESSAGE or ar == 0xFFFF:
        return buf, False
    opt = b"\x00" + RR_FIXED.pack(TYPE_OPT, EDNS_PAYLOAD, 0, len(option)) + option
    return buf[:10] + struct.pack("!H", ar + 1) + buf[12:] + opt, True


def strip_opt(buf: bytes, question_end: int = 0) -> bytes:
    """Remove the OPT record from a response (for a client that sent no EDNS).
    `question_end`: where its one question ends, when the caller knows (the query's, whose
    question the response's was found to be: `question_matches`). Every answer to a client
    without EDNS comes here: the walk is inlined (owners are mostly pointers)."""
    _id, _flags, qd, an, ns, ar = HEADER.unpack_from(buf)
    pos = 12
    if qd == 1 and question_end:
        pos = question_end
    else:
        for _ in range(qd):
            pos = skip_name(buf, pos) + 4
    n, records = len(buf), an + ns
    for i in range(records + ar):
        start = pos
        if pos < n and buf[pos] & 0xC0 == 0xC0:
            pos += 2
        else:
            pos = skip_name(buf, pos)
        if pos + 10 > n:
            raise PacketError("truncated resource record", FORMERR)
        end = pos + 10 + ((buf[pos + 8] << 8) | buf[pos + 9])
        if end > n:
            raise PacketError("resource record data runs past the end", FORMERR)
        if i >= records and buf[pos] == 0 and buf[pos + 1] == TYPE_OPT:
            return buf[:10] + struct.pack("!H", ar - 1) + buf[12:start] + buf[end:]
        pos = end
    return buf


def _reply(query: bytes, info: QueryInfo, flags: int) -> bytes:
    """Header + the client's own question (+ a bare OPT when the client used EDNS)."""
    has_opt = info.edns
    head = HEADER.pack((query[0] << 8) | query[1], flags, 1, 0, 0, 1 if has_opt else 0)
    opt = b"\x00" + RR_FIXED.pack(TYPE_OPT, EDNS_PAYLOAD, 0, 0) if has_opt else b""
    return head + query[12 : info.question_end] + opt


def error_reply(query: bytes, info: QueryInfo, rcode: int) -> bytes:
    """SERVFAIL, REFUSED, ... for `query`, built from its own bytes."""
    qflags = (query[2] << 8) | query[3]
    return _reply(query, info, QR | (qflags & (OPCODE_MASK | RD)) | RA | rcode)


def header_error_reply(query: bytes, rcode: int) -> bytes | None:
    """FORMERR/NOTIMP for a query whose question could not be read: header only."""
    if len(query) < 12 or query[2] & 0x80:
        return None
    qflags = (query[2] << 8) | query[3]
    return HEADER.pack(
        (query[0] << 8) | query[1], QR | (qflags & (OPCODE_MASK | RD)) | rcode, 0, 0, 0, 0
    )


def truncated_reply(query: bytes, info: QueryInfo, response: bytes) -> bytes:
    """TC=1, question only: the client should retry over TCP."""
    rflags = (response[2] << 8) | response[3]
    return _reply(query, info, (rflags & ~RCODE_MASK & 0xFFFF) | TC | QR | (rflags & RCODE_MASK))


def qname(buf: bytes, info: QueryInfo) -> str:
    """The question's name, lower case, without the trailing dot ("" for the root)."""
    labels = []
    pos, end = 12, info.question_end - 4
    while pos < end and buf[pos] and not buf[pos] & 0xC0:
        n = buf[pos]
        labels.append(buf[pos + 1 : pos + 1 + n].decode("ascii", "replace").lower())
        pos += 1 + n
    return ".".join(labels)


def udp_limit(info: QueryInfo) -> int:
    return info.payload if info.edns else UDP_DEFAULT


def question_matches(query: bytes, info: QueryInfo, response: bytes) -> bool:
    """Is `response` about the query's question? (Exact bytes, else case-insensitively.)"""
    if len(response) < 12:
        return False
    if ((response[4] << 8) | response[5]) == 0:
        return True  # e.g. FORMERR without a question: the ID is all there is
    end = info.question_end
    got, want = response[12:end], query[12:end]
    if got == want:
        return True
    return got[:-4].lower() == want[:-4].lower() and got[-4:] == want[-4:]
