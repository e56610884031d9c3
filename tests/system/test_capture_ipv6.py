"""What crosses an IPv6 link, seen by the capture helper: the tunnel's queries to a cleartext
upstream at 2001:db8::1 are all found on the wire; to a TLS upstream at the same address
(strict, authenticated by its IPv6 SAN) none is, while every answer comes back.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Sequence
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from tests.conftest import Certs, require_program, require_root
from tests.lab.capture import Capture, Packet, cleartext_queries, leaked
from tests.lab.netns import CLI_IP6, SRV_IP6S, Lab
from tests.lab.peer import PEER_A, spawn
from tests.lab.tunnel import TunnelProcess

pytestmark = pytest.mark.system

SERVER = SRV_IP6S[0]
STUB = "127.0.0.153"


def resolve_through_tunnel(
    tmp: Path, peer_args: Sequence[str], tunnel_args: Sequence[str]
) -> tuple[list[str], list[Packet]]:
    """Peer on SERVER in the network namespace, the tunnel in the machine's, a capture on the
    link between them; a few unique names asked through the tunnel (each must be answered).
    The names, and what crossed the link."""
    require_root()
    for program in ("ip", "tcpdump"):
        require_program(program)
    names = [f"v6-{secrets.token_hex(4)}-{i}.lab.test" for i in range(3)]
    with Lab() as lab:
        assert lab.srv is not None and lab.cli is not None
        capture = Capture(lab.srv, lab.veth_srv, tmp / "wire.pcap")
        spawn(tmp / "peer.log", "--host", SERVER, "--dns-port", "53", *peer_args, netns=lab.srv)
        tunnel = TunnelProcess.start(
            [*tunnel_args, "--connect-timeout", "3", "--query-timeout", "4"],
            tmp / "tunnel.log",
            host=STUB,
            port=53,
            netns=lab.cli,
        )
        for name in names:
            query = dns.message.make_query(name, "A")
            ask = functools.partial(dns.query.udp, query, STUB, timeout=5, port=53)
            response = lab.cli.call(ask, timeout=8)
            assert response.rcode() == dns.rcode.NOERROR, f"{name}; tunnel:\n{tunnel.proc.tail()}"
            assert [rr.to_text() for rrset in response.answer for rr in rrset] == [PEER_A]
        return names, capture.stop()


def test_cleartext_upstream_over_ipv6_is_seen(tmp_path: Path) -> None:
    names, pkts = resolve_through_tunnel(
        tmp_path,
        ["--tls-port", "-1", "--no-upgrade"],
        ["--profile", "opportunistic", "--upstream", f"tcp:[{SERVER}]@53"],
    )
    hits = leaked(pkts, names)
    assert sorted(hits) == sorted(names)
    for name in names:
        assert {(p.src, p.dst, p.proto, p.dport) for p in hits[name]} >= {
            (CLI_IP6, SERVER, "tcp", 53)
        }, name
    assert set(cleartext_queries(pkts)) >= {f"{name}." for name in names}


def test_tls_upstream_over_ipv6_leaks_nothing(tmp_path: Path, certs: Certs) -> None:
    cert = certs.ca.issue(tmp_path, "v6-only", ips=(SERVER,))
    names, pkts = resolve_through_tunnel(
        tmp_path,
        ["--tls-port", "853", "--cert", str(cert.cert), "--key", str(cert.key)],
        [
            "--profile",
            "strict",
            "--upstream",
            f"tls:[{SERVER}]@853",
            "--ca-file",
            str(certs.ca.path),
        ],
    )
    assert leaked(pkts, names) == {}
    assert cleartext_queries(pkts) == []
    # the capture did see the queries go by, encrypted, over IPv6
    tls = [p for p in pkts if p.proto == "tcp" and p.payload and 853 in (p.sport, p.dport)]
    assert tls and all({p.src, p.dst} == {CLI_IP6, SERVER} for p in tls)
    assert any(p.payload[0] == 0x17 for p in tls)  # TLS application data records
