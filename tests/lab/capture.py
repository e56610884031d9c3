"""A packet capture on the lab's wire (tcpdump), and what crossed it in cleartext.

tcpdump writes a pcap file; `packets()` reads it with nothing but struct (Ethernet,
IPv4, UDP/TCP payloads), and `leaked()` says which query names appear in any payload
in DNS wire form or as text: TLS records never contain them, so a hit is cleartext;
`cleartext_queries()` lists the questions of the DNS messages sent in the clear.
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
# sent before (tcpdump reads the interface's packets in order).
_MARKER_SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sys.argv[1].encode())
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.sendto(sys.argv[2].encode(), ("255.255.255.255", 9))
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


def packets(path: Path) -> list[Packet]:
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    out: list[Packet] = []
    pos = 24
    while pos + 16 <= len(data):
        _s, _us, incl, _orig = struct.unpack(endian + "IIII", data[pos : pos + 16])
        frame = data[pos + 16 : pos + 16 + incl]
        pos += 16 + incl
        ip = frame[14:] if linktype == 1 else frame[16:] if linktype == 113 else frame
        if linktype == 1 and frame[12:14] != b"\x08\x00":
            continue
        if len(ip) < 20 or ip[0] >> 4 != 4:
            continue
        ihl = (ip[0] & 15) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        proto = ip[9]
        src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
        body = ip[ihl:total]
        if proto == 17 and len(body) >= 8:
            sport, dport = struct.unpack("!HH", body[:4])
            out.append(Packet(src, dst, "udp", sport, dport, body[8:]))
        elif proto == 6 and len(body) >= 20:
            sport, dport = struct.unpack("!HH", body[:4])
            off = (body[12] >> 4) * 4
            out.append(Packet(src, dst, "tcp", sport, dport, body[off:]))
    return out


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
