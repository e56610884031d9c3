"""The capture helper's pcap reader, on pcap files written here by hand (no root, no tcpdump):
IPv4 and IPv6, UDP and TCP, IPv6 extension headers, Ethernet and Linux cooked frames."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import dns.message
import pytest

from tests.lab.capture import Packet, cleartext_queries, leaked, packets

CLI4, SRV4 = "198.51.100.100", "198.51.100.1"
CLI6, SRV6 = "2001:db8::100", "2001:db8::1"
MAC_CLI, MAC_SRV = bytes.fromhex("020000000064"), bytes.fromhex("020000000001")
UDP, TCP, HOP_BY_HOP, ROUTING, FRAGMENT, DEST_OPTS = 17, 6, 0, 43, 44, 60


def query(name: str) -> bytes:
    return dns.message.make_query(name, "A").to_wire()


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(sport: int, dport: int, payload: bytes) -> bytes:
    flags = 0x18  # PSH, ACK
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 65535, 0, 0) + payload


def ipv4(proto: int, body: bytes, *, frag_offset: int = 0) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(body),
        1,
        frag_offset >> 3,
        64,
        proto,
        0,
        socket.inet_aton(CLI4),
        socket.inet_aton(SRV4),
    )
    return header + body


def ipv6(next_header: int, body: bytes) -> bytes:
    src, dst = socket.inet_pton(socket.AF_INET6, CLI6), socket.inet_pton(socket.AF_INET6, SRV6)
    return struct.pack("!IHBB", 6 << 28, len(body), next_header, 64) + src + dst + body


def options_header(next_header: int, size: int = 8) -> bytes:
    """Hop-by-hop or destination options of `size` bytes (a multiple of 8): one PadN."""
    return bytes([next_header, size // 8 - 1, 1, size - 4]) + bytes(size - 4)


def routing_header(next_header: int) -> bytes:
    """Type 4 (segment routing) with no segments left: 8 bytes, then one address."""
    return bytes([next_header, 2, 4, 0, 0, 0, 0, 0]) + socket.inet_pton(socket.AF_INET6, SRV6)


def fragment_header(next_header: int, offset: int, more: bool) -> bytes:
    return struct.pack("!BBHI", next_header, 0, offset | int(more), 0x1234)


def ethernet(ethertype: int, payload: bytes) -> bytes:
    return MAC_SRV + MAC_CLI + struct.pack("!H", ethertype) + payload


def write_pcap(path: Path, linktype: int, frames: list[bytes], endian: str = "<") -> Path:
    out = struct.pack(endian + "IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)
    for i, frame in enumerate(frames):
        out += struct.pack(endian + "IIII", 1700000000, i, len(frame), len(frame)) + frame
    path.write_bytes(out)
    return path


def test_ethernet_ipv4_and_ipv6(tmp_path: Path) -> None:
    names = ["v4-udp.lab.test", "v6-udp.lab.test", "v6-tcp.lab.test", "v6-hbh.lab.test"]
    v6_udp, v6_tcp = query(names[1]), query(names[2])
    frames = [
        ethernet(0x0806, bytes(28)),  # ARP: not IP, skipped
        ethernet(0x0800, ipv4(UDP, udp(40000, 53, query(names[0]))) + bytes(6)),  # + padding
        ethernet(0x86DD, ipv6(UDP, udp(40001, 53, v6_udp))),
        ethernet(0x86DD, ipv6(TCP, tcp(40002, 53, struct.pack("!H", len(v6_tcp)) + v6_tcp))),
        ethernet(0x86DD, ipv6(HOP_BY_HOP, options_header(UDP) + udp(40003, 53, query(names[3])))),
        ethernet(0x86DD, ipv6(58, bytes([135, 0, 0, 0]) + bytes(20))),  # ICMPv6: skipped
    ]
    pkts = packets(write_pcap(tmp_path / "wire.pcap", 1, frames))

    assert [(p.src, p.dst, p.proto, p.sport, p.dport) for p in pkts] == [
        (CLI4, SRV4, "udp", 40000, 53),
        (CLI6, SRV6, "udp", 40001, 53),
        (CLI6, SRV6, "tcp", 40002, 53),
        (CLI6, SRV6, "udp", 40003, 53),
    ]
    assert pkts[1] == Packet(CLI6, SRV6, "udp", 40001, 53, v6_udp)
    assert pkts[2].payload[2:] == v6_tcp
    hits = leaked(pkts, [*names, "never-sent.lab.test"])
    assert sorted(hits) == sorted(names)
    assert [p.sport for name in names for p in hits[name]] == [40000, 40001, 40002, 40003]
    assert cleartext_queries(pkts) == [f"{name}." for name in names]


def test_ipv6_extension_chain_and_fragments(tmp_path: Path) -> None:
    chain = options_header(ROUTING, 16) + routing_header(DEST_OPTS) + options_header(UDP)
    first = fragment_header(UDP, 0, more=True) + udp(40010, 53, query("first.lab.test"))
    later = fragment_header(UDP, 64, more=False) + udp(40011, 53, query("later.lab.test"))
    frames = [
        ethernet(0x86DD, ipv6(HOP_BY_HOP, chain + udp(40012, 53, query("chain.lab.test")))),
        ethernet(0x86DD, ipv6(FRAGMENT, first)),
        ethernet(0x86DD, ipv6(FRAGMENT, later)),  # no transport header in it: skipped
        ethernet(0x0800, ipv4(UDP, udp(40013, 53, query("later4.lab.test")), frag_offset=64)),
    ]
    pkts = packets(write_pcap(tmp_path / "wire.pcap", 1, frames))

    assert [(p.src, p.sport) for p in pkts] == [(CLI6, 40012), (CLI6, 40010)]
    assert sorted(leaked(pkts, ["chain.lab.test", "first.lab.test", "later.lab.test"])) == [
        "chain.lab.test",
        "first.lab.test",
    ]


@pytest.mark.parametrize(
    ("linktype", "header"),
    [
        pytest.param(113, struct.pack("!HHH8sH", 4, 1, 6, MAC_CLI, 0x86DD), id="sll"),
        pytest.param(276, struct.pack("!HHIHBB8s", 0x86DD, 0, 2, 1, 4, 6, MAC_CLI), id="sll2"),
        pytest.param(101, b"", id="raw"),
    ],
)
@pytest.mark.parametrize("endian", ["<", ">"])
def test_cooked_and_raw_captures(tmp_path: Path, linktype: int, header: bytes, endian: str) -> None:
    frames = [header + ipv6(UDP, udp(40020, 53, query("cooked.lab.test")))]
    pkts = packets(write_pcap(tmp_path / "wire.pcap", linktype, frames, endian))
    assert [(p.src, p.dst, p.proto) for p in pkts] == [(CLI6, SRV6, "udp")]
    assert cleartext_queries(pkts) == ["cooked.lab.test."]
