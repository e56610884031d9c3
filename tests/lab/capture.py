"""A packet capture on the lab's wire (tcpdump), and what crossed it in cleartext.

tcpdump writes a pcap file; `packets()` reads it with nothing but struct (Ethernet or
Linux cooked v1/v2 frames; IPv4, and IPv6 through its hop-by-hop, routing, fragment and
destination-options headers; UDP/TCP payloads; non-first fragments are skipped), and
`leaked()` says which query names appear in any payload in DNS wire form or as text: TLS
records never contain them, so a hit is cleartext; `cleartext_queries()` lists the
questions of the DNS messages sent in the clear.
"""

from __future__ import annotations

import secrets
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dns.message

from tests.lab.netns import Netns
from tests.lab.proc import Process, need


@dataclass(frozen=True)
class Packet:
    src: str
    dst: str
    proto: str  # udp | tcp
    sport: int
    dport: int
    payload: bytes


def wire_name(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in name.strip(".").split("."))


# Sent last, out of the captured interface: once the pcap holds it, it holds everything
# sent before (tcpdump reads the interface's packets in order). As an IPv4 broadcast and
# to the IPv6 all-nodes group, so that a link with only one of the two carries it too.
_MARKER_SENDER = """
import socket, sys
dev, marker = sys.argv[1], sys.argv[2].encode()
sent = []
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.sendto(marker, ("255.255.255.255", 9))
    sent.append("ipv4")
except OSError as exc:
    print("ipv4 marker:", exc, file=sys.stderr)
try:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
    s.sendto(marker, ("ff02::1", 9, 0, socket.if_nametoindex(dev)))
    sent.append("ipv6")
except OSError as exc:
    print("ipv6 marker:", exc, file=sys.stderr)
sys.exit(0 if sent else 1)
"""


class Capture:
    def __init__(self, ns: Netns, ifname: str, path: Path) -> None:
        self.ns, self.ifname, self.path = ns, ifname, path
        # --immediate-mode: without it libpcap hands tcpdump packets in blocks, up to a
        # second late, and a capture stopped in between loses what crossed last
        argv = [need("tcpdump"), "-i", ifname, "--immediate-mode", "-U", "-n", "-s", "0",
                "-w", str(path), "ip or ip6"]  # fmt: skip
        self.proc: Process = ns.start(argv, path.with_suffix(".log"))
        self.proc.wait_until(lambda: "listening on" in self.proc.log.read_text(), 10, "tcpdump")

    def stop(self, timeout: float = 10.0) -> list[Packet]:
        """Stop once everything that crossed is in the file (a marker sent last is)."""
        time.sleep(0.1)  # answers in flight
        marker = f"dnstls-capture-end-{secrets.token_hex(8)}".encode()
        self.ns.run([sys.executable, "-c", _MARKER_SENDER, self.ifname, marker.decode()])
        end = time.monotonic() + timeout
        while marker not in self.path.read_bytes():
            if time.monotonic() > end:
                raise AssertionError(f"tcpdump did not capture its end marker in {timeout} s")
            time.sleep(0.02)
        self.proc.stop()
        return [p for p in packets(self.path) if p.payload != marker]


# Link types (pcap header) and what their frames put before the network layer.
_ETHERNET, _LINUX_SLL, _LINUX_SLL2 = 1, 113, 276
_ETH_IPV4, _ETH_IPV6, _ETH_VLAN = b"\x08\x00", b"\x86\xdd", b"\x81\x00"
# IPv6 extension headers walked to reach the transport: hop-by-hop, routing, destination
# options ((len + 1) * 8 bytes each) and fragment (8 bytes).
_IPV6_EXTENSIONS = frozenset({0, 43, 60})
_IPV6_FRAGMENT = 44
_UDP, _TCP = 17, 6


def packets(path: Path) -> list[Packet]:
    """The UDP and TCP segments of a pcap file, IPv4 and IPv6, in capture order."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0] & 0xFFFF  # upper bits: FCS info
    out: list[Packet] = []
    pos = 24
    while pos + 16 <= len(data):
        _s, _us, incl, _orig = struct.unpack(endian + "IIII", data[pos : pos + 16])
        frame = data[pos + 16 : pos + 16 + incl]
        pos += 16 + incl
        packet = _packet(_network(linktype, frame))
        if packet is not None:
            out.append(packet)
    return out


def _network(linktype: int, frame: bytes) -> bytes:
    """The IP packet a frame carries; empty when it carries something else (ARP, ...)."""
    if linktype == _ETHERNET:
        ethertype, ip = frame[12:14], frame[14:]
        if ethertype == _ETH_VLAN:  # one 802.1Q tag
            ethertype, ip = frame[16:18], frame[18:]
    elif linktype == _LINUX_SLL:  # 16 bytes, the protocol last
        ethertype, ip = frame[14:16], frame[16:]
    elif linktype == _LINUX_SLL2:  # 20 bytes, the protocol first
        ethertype, ip = frame[0:2], frame[20:]
    else:  # raw IP (LINKTYPE_RAW, IPV4, IPV6): the version nibble says which
        return frame
    return ip if ethertype in (_ETH_IPV4, _ETH_IPV6) else b""


def _packet(ip: bytes) -> Packet | None:
    if len(ip) >= 20 and ip[0] >> 4 == 4:
        return _ipv4(ip)
    if len(ip) >= 40 and ip[0] >> 4 == 6:
        return _ipv6(ip)
    return None


def _ipv4(ip: bytes) -> Packet | None:
    ihl = (ip[0] & 15) * 4
    total = struct.unpack("!H", ip[2:4])[0]
    if struct.unpack("!H", ip[6:8])[0] & 0x1FFF:  # a later fragment: no transport header
        return None
    src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    return _transport(src, dst, ip[9], ip[ihl:total])


def _ipv6(ip: bytes) -> Packet | None:
    length = struct.unpack("!H", ip[4:6])[0]
    body = ip[40 : 40 + length] if length else ip[40:]  # 0: a jumbogram, to the frame's end
    proto = ip[6]
    src = socket.inet_ntop(socket.AF_INET6, ip[8:24])
    dst = socket.inet_ntop(socket.AF_INET6, ip[24:40])
    while proto in _IPV6_EXTENSIONS or proto == _IPV6_FRAGMENT:
        if len(body) < 8:
            return None
        if proto == _IPV6_FRAGMENT:
            if struct.unpack("!H", body[2:4])[0] >> 3:  # a later fragment
                return None
            proto, body = body[0], body[8:]
        else:
            proto, body = body[0], body[(body[1] + 1) * 8 :]
    return _transport(src, dst, proto, body)


def _transport(src: str, dst: str, proto: int, body: bytes) -> Packet | None:
    if proto == _UDP and len(body) >= 8:
        sport, dport = struct.unpack("!HH", body[:4])
        return Packet(src, dst, "udp", sport, dport, body[8:])
    if proto == _TCP and len(body) >= 20:
        sport, dport = struct.unpack("!HH", body[:4])
        return Packet(src, dst, "tcp", sport, dport, body[(body[12] >> 4) * 4 :])
    return None


def leaked(pkts: Sequence[Packet], names: Sequence[str]) -> dict[str, list[Packet]]:
    """For each name, the packets whose payload carries it in cleartext."""
    hits: dict[str, list[Packet]] = {}
    for name in names:
        forms = (wire_name(name).lower(), name.strip(".").lower().encode())
        found = [p for p in pkts if any(f in p.payload.lower() for f in forms)]
        if found:
            hits[name] = found
    return hits


def leaked_with_prefix(
    pkts: Sequence[Packet], names: Sequence[str], prefix: str
) -> dict[str, list[Packet]]:
    """`leaked` for names that all start with PREFIX- (a query load's), sped up: a packet
    that does not carry PREFIX- (in the first label, so in wire form too) is not looked at
    name by name (thousands of names times tens of thousands of packets otherwise)."""
    token = f"{prefix}-".lower().encode()
    return leaked([p for p in pkts if token in p.payload.lower()], list(names))


def cleartext_queries(pkts: Sequence[Packet]) -> list[str]:
    """The question names of every DNS query sent in the clear: UDP to port 53, and TCP to
    53 before any TLS (a payload that parses as a message)."""
    names = []
    for p in pkts:
        if p.dport != 53 or not p.payload:
            continue
        wire = p.payload[2:] if p.proto == "tcp" else p.payload
        try:
            msg = dns.message.from_wire(wire)
        except Exception:  # TLS records, or a segment that is not a message's start
            continue
        names += [q.name.to_text() for q in msg.question]
    return names
