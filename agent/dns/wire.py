"""DNS messages as the agent needs them: the TO flag, the STARTTLS dummy, framing, matching.

No sockets and no clocks here: everything is bytes in, bytes or messages out.
"""

from __future__ import annotations

import struct

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from agent.errors import MalformedMessage, MismatchedMessage

TO_FLAG = 0x4000  # "TLS OK": the EDNS0 flag right after DO (0x8000)
EDNS_PAYLOAD = 1232
PAD_BLOCK = 128  # RFC 8467 block length for queries
STARTTLS_QNAME = "STARTTLS"
MAX_FRAME = 0xFFFF


def starttls_query(*, to: bool = True) -> dns.message.QueryMessage:
    """The dummy that opens an upgrade: STARTTLS/CH/TXT, RD=0, EDNS0 with TO set.

    It reveals nothing private, so it is, with DDR's `_dns.resolver.arpa` question (agent/ddr.py),
    the only cleartext DNS the strict profile sends.
    """
    return dns.message.make_query(
        STARTTLS_QNAME,
        dns.rdatatype.TXT,
        dns.rdataclass.CH,
        use_edns=0,
        ednsflags=TO_FLAG if to else 0,
        payload=EDNS_PAYLOAD,
        flags=0,
    )


def probe_query(name: str, rdtype: str, *, pad: bool = True) -> dns.message.QueryMessage:
    """A real query, sent only inside TLS by the prober; padded to 128-byte blocks."""
    return dns.message.make_query(
        name,
        rdtype,
        use_edns=0,
        payload=EDNS_PAYLOAD,
        pad=PAD_BLOCK if pad else 0,
    )


def has_to(message: dns.message.Message) -> bool:
    """True when the message carries EDNS0 with the TO flag set."""
    return message.edns >= 0 and bool(message.ednsflags & TO_FLAG)


def frame(wire: bytes) -> bytes:
    """Prefix a message with its 2-byte big-endian length (RFC 1035 4.2.2)."""
    if len(wire) > MAX_FRAME:
        raise ValueError(f"DNS message of {len(wire)} bytes does not fit a TCP frame")
    return struct.pack("!H", len(wire)) + wire


class FrameReader:
    """Turns a byte stream into whole DNS messages; keeps partial frames for later."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames: list[bytes] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 2:
            size = (buf[pos] << 8) | buf[pos + 1]
            if len(buf) - pos - 2 < size:
                break
            frames.append(bytes(buf[pos + 2 : pos + 2 + size]))
            pos += 2 + size
        if pos:
            del buf[:pos]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)


def parse_response(wire: bytes, query: dns.message.Message) -> dns.message.Message:
    """Check first that `wire` is really the answer to `query`, then return it.

    Raises MalformedMessage for bytes that are not a DNS response and
    MismatchedMessage for a response to some other question.
    """
    if len(wire) < 12:
        raise MalformedMessage(f"{len(wire)} bytes is shorter than a DNS header")
    try:
        response = dns.message.from_wire(wire, ignore_trailing=False)
    except (dns.exception.DNSException, ValueError, struct.error) as exc:
        raise MalformedMessage(f"unparsable response: {exc}") from exc
    if not response.flags & dns.flags.QR:
        raise MalformedMessage("QR bit clear: a query, not a response")
    if response.id != query.id:
        raise MismatchedMessage(f"response id {response.id} != query id {query.id}")
    if not query.is_response(response):
        raise MismatchedMessage("response question does not match the query")
    return response


def rcode_text(message: dns.message.Message) -> str:
    return dns.rcode.to_text(message.rcode())
