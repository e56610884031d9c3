"""Designated resolvers and the cache through the real daemon (`python -m agent run`), end to
end: a dhclient lease file the daemon follows (`lease_dirs`) names the network's resolver A,
and the encrypted resolver D is found either by DDR (A's `_dns.resolver.arpa` SVCB, RFC 9462)
or by DNR (the lease's option 162, RFC 9463). Strict, no pins, no auth_name anywhere: D's name
is the only thing that can authenticate it.

    srv  netns: A = the test peer on 198.51.100.1:53, no TLS at all (853 refused, the STARTTLS
         dummy answered without TO; one DNR case gives it TLS on 853, to see D come first),
         with or without an SVCB answer designating D;
         D = unbound on 198.51.100.53, DoT on port 8853 only (not 853, where nothing
         listens: the designated port must be used), its certificate from the lab CA
    cli  netns: the daemon; its tunnel on 127.0.0.153:53; the lease file names veth dtacTAG

A and D answer `www.lab.test` differently (the peer says PEER_A for any name, unbound
WWW_A), so an answer tells who gave it. A packet capture on the server side of the veth shows
what crossed in cleartext. The cache test changes the lease's DHCP server identifier, which
makes another network (`Link.network_id`), and watches the daemon empty the tunnel's cache.

Every wait is bounded (WAIT); processes are stopped by PID and the namespaces deleted, also
when a test fails. Needs root, ip, unbound, tcpdump (runs in CI).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from agent.dns import dnr
from tests.conftest import Certs, host_untouched
from tests.lab.capture import Capture, Packet, cleartext_queries, leaked
from tests.lab.certs import CertFiles
from tests.lab.netns import CLI_IP, REPO, SRV_IPS, Lab, run_ip
from tests.lab.peer import PEER_A, spawn
from tests.lab.proc import Process
from tests.lab.unbound import WWW_A, ZONE, Unbound, UnboundConfig, answers, tls_listening

pytestmark = pytest.mark.system

A = SRV_IPS[0]  # the resolver the network names: plain DNS only
OTHER_SERVER = SRV_IPS[1]  # another DHCP server identifier: another network
D = "198.51.100.53"  # the designated encrypted resolver
ADN = "dns.example.test"
DOT_PORT = 8853
STUB = "127.0.0.153"
NAME = f"www.{ZONE}".rstrip(".")  # D answers WWW_A, A would answer PEER_A
SVCB = f"1 {ADN}. alpn=dot port={DOT_PORT} ipv4hint={D}"
D_UPSTREAM = f"tls-port:{D}@{DOT_PORT}#{ADN}"
# The only cleartext questions strict may send (to A, and to D when probing it): DDR's and
# the STARTTLS dummy (over TCP, and the UDP hint beside it)
ALLOWED_CLEARTEXT = {"_dns.resolver.arpa.", "STARTTLS."}
WAIT = 20.0  # seconds: the daemon probing and deciding (a few s here)


@dataclass
class World:
    lab: Lab
    dir: Path
    ifname: str
    config: Path
    agent: Process
    unbound: Process  # D
    capture: Capture

    def status(self) -> dict[str, Any] | None:
        assert self.lab.cli is not None
        argv = [sys.executable, "-m", "agent", "-c", str(self.config), "status", "--json"]
        out = self.lab.cli.run(argv, check=False, timeout=10)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def cache(self) -> dict[str, Any]:
        """The tunnel's cache counters, now."""
        st = self.status()
        assert st is not None, self.agent.tail(40)
        cache: dict[str, Any] = st["tunnel"]["cache"]
        return cache

    def wait(self, ok: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """The first status `ok` holds for, within WAIT seconds."""
        end = time.monotonic() + WAIT
        st = self.status()
        while st is None or not ok(st):
            assert self.agent.alive(), f"the daemon exited; log:\n{self.agent.tail(40)}"
            assert time.monotonic() < end, (
                f"{what}: not within {WAIT}s; status {json.dumps(st, indent=1)}\n"
                f"log:\n{self.agent.tail(40)}"
            )
            time.sleep(0.1)
            st = self.status()
        return st

    def ask(self, name: str = NAME) -> dns.message.Message | None:
        """A question to the daemon's tunnel; None when nothing came back."""
        assert self.lab.cli is not None
        query = dns.message.make_query(name, "A")
        try:
            return self.lab.cli.call(lambda: dns.query.udp(query, STUB, timeout=4), 8)
        except dns.exception.Timeout:
            return None

    def d_queries(self, name: str = NAME) -> int:
        """How many questions for `name` D (unbound, log-queries) received from the machine
        (not the lab's own readiness check, which comes from A's address)."""
        text = self.unbound.log.read_text(errors="replace")
        return len(re.findall(rf"info: {re.escape(CLI_IP)} {re.escape(name)}\. A IN", text))

    def write_lease(self, server: str, *, dnr_option: bytes = b"") -> None:
        """The lease as dhclient writes it (hex octets without leading zeros, `option dnr`
        as the package's dhclient.conf block names it), replaced atomically."""
        lines = [
            f'  interface "{self.ifname}";',
            f"  fixed-address {CLI_IP};",
            "  option subnet-mask 255.255.255.0;",
            f"  option domain-name-servers {A};",
            f"  option dhcp-server-identifier {server};",
        ]
        if dnr_option:
            lines.append(f"  option dnr {':'.join(f'{b:x}' for b in dnr_option)};")
        text = "lease {\n" + "\n".join(lines) + "\n}\n"
        path = self.dir / "leases" / f"dhclient.{self.ifname}.leases"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def resolvers(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["address"]: r for i in st["interfaces"] for r in i["resolvers"]}


def settled(st: dict[str, Any], order: list[str], *probed: str) -> bool:
    """`order` in use, the tunnel private, no warning, and the resolvers at `probed` probed:
    the daemon puts a resolver not probed yet in the order as TLS (the tunnel then
    authenticates it as the profile says), so the order alone is not the probe's verdict."""
    by = resolvers(st)
    return (
        st["order"] == order
        and st["tunnel"]["mode"] == "private"
        and not st["warnings"]
        and all(by.get(a, {}).get("method") for a in probed)
    )


def a_answers(msg: dns.message.Message | None) -> list[str]:
    assert msg is not None, "no answer from the tunnel"
    assert msg.rcode() == dns.rcode.NOERROR, dns.rcode.to_text(msg.rcode())
    return [r.address for rr in msg.answer if rr.rdtype == dns.rdatatype.A for r in rr]


def config_text(d: Path, certs: Certs) -> str:
    return f"""
state_dir = "{d}/state"
stub_state_dir = "{d}/state"
runtime_dir = "{d}/run"
listen = ["{STUB}:53"]
lease_dirs = ["{d}/leases"]
manage_stub = false  # root in a network namespace only: /etc is the host's
nm_bus = "unix:path={d}/no-bus"
profile = "strict"
ca_file = "{certs.ca.path}"
"""


@contextmanager
def world(
    tmp: Path,
    certs: Certs,
    cert: CertFiles,
    *,
    svcb: bool,
    dnr_option: bytes = b"",
    a_cert: CertFiles | None = None,
) -> Iterator[World]:
    """A (with DDR's answer when `svcb`, with TLS on 853 when `a_cert`), D, a capture, the
    lease, the daemon; all stopped by PID and the namespaces deleted on the way out (and the
    host's resolv.conf checked untouched)."""
    with host_untouched(("ip", "unbound", "tcpdump")), Lab() as lab:
        assert lab.srv is not None and lab.cli is not None
        srv, cli = lab.srv, lab.cli
        run_ip("-n", srv.name, "addr", "add", f"{D}/24", "dev", lab.veth_srv)
        capture = Capture(srv, lab.veth_srv, tmp / "wire.pcap")
        tls = ["--tls-port", "-1"]
        if a_cert is not None:
            tls = ["--tls-port", "853", "--cert", str(a_cert.cert), "--key", str(a_cert.key)]
        spawn(tmp / "peer-a.log", "--host", A, "--dns-port", "53", *tls, "--no-upgrade",
              *(["--svcb", SVCB] if svcb else []), netns=srv)  # fmt: skip
        cfg = UnboundConfig(D, 53, DOT_PORT, cert.cert, cert.key, extra="    log-queries: yes")
        ub = Unbound.start(cfg, tmp / "unbound-d", netns=srv.name)
        srv.processes.append(ub.proc)
        ub.proc.wait_until(
            lambda: srv.call(lambda: answers(D, 53) and tls_listening(D, DOT_PORT), 5),
            10,
            "unbound (D)",
        )
        (tmp / "leases").mkdir()
        config = tmp / "agent.toml"
        config.write_text(config_text(tmp, certs))
        ifname = f"dtac{lab.tag}"[:15]
        argv = cli.argv([sys.executable, "-m", "agent", "-v", "-c", str(config), "run"])
        agent = Process(argv, tmp / "agent.log", env={**os.environ, "PYTHONPATH": str(REPO)})
        cli.processes.append(agent)
        w = World(lab, tmp, ifname, config, agent, ub.proc, capture)
        w.write_lease(A, dnr_option=dnr_option)
        yield w


def d_cert(tmp: Path, certs: Certs, *ips: str) -> CertFiles:
    """D's certificate, from the lab CA: names ADN, carries `ips`."""
    return certs.ca.issue(tmp, "d-" + "-".join(ips), ips=ips, names=(ADN,))


def cleartext_to(pkts: list[Packet], host: str) -> list[str]:
    return cleartext_queries([p for p in pkts if p.dst == host])


# -- 1. DDR ------------------------------------------------------------------------------------


def test_ddr_verified_designation_authenticates_under_strict(tmp_path: Path, certs: Certs) -> None:
    """A (no TLS) designates D; D's certificate names the ADN and carries A's address: D is
    used, authenticated by its name, and answers; A is sent nothing of the user's."""
    cert = d_cert(tmp_path, certs, A)
    with world(tmp_path, certs, cert, svcb=True) as w:
        st = w.wait(lambda s: settled(s, [D_UPSTREAM], A, D), "D, designated by A, in use")
        assert st["profile"] == "strict"
        by = resolvers(st)
        d, a = by[D], by[A]
        assert list(by) == [D, A]  # the designation before the one that designated it
        assert (d["origin"], d["auth_name"], d["port"]) == ("ddr", ADN, DOT_PORT), d
        assert (d["method"], d["auth"], d["auth_source"], d["used"]) == (
            "tls-port", "name", "network", True
        ), d  # fmt: skip
        assert a["origin"] == "dhcp" and not a["used"], a
        assert a["method"] not in ("tls-port", "tls-upgrade"), a  # A has no TLS at all
        assert a["designated"] == [f"{ADN}@{D}:{DOT_PORT} (verified)"], a
        assert a_answers(w.ask()) == [WWW_A] != [PEER_A]  # D's answer, not A's
        assert w.d_queries() == 1, w.unbound.tail()
        pkts = w.capture.stop()

    assert leaked(pkts, [NAME]) == {}
    to_a = cleartext_to(pkts, A)
    assert "_dns.resolver.arpa." in to_a and "STARTTLS." in to_a, to_a
    assert set(cleartext_queries(pkts)) <= ALLOWED_CLEARTEXT, cleartext_queries(pkts)
    to_d = {(p.proto, p.dport) for p in pkts if p.dst == D and p.payload}
    assert ("tcp", DOT_PORT) in to_d, to_d  # the verification handshake, the probe, the query


def test_ddr_designation_without_the_resolvers_address_is_not_used(
    tmp_path: Path, certs: Certs
) -> None:
    """The same, but D's certificate carries D's own address instead of A's: the designation
    is not verified and at another address, so it is never used; strict gives no DNS, and
    nothing goes out in cleartext."""
    cert = d_cert(tmp_path, certs, D)
    with world(tmp_path, certs, cert, svcb=True) as w:
        st = w.wait(
            lambda s: (
                resolvers(s).get(A, {}).get("method") is not None
                and any(x["alert"] == "no-private-dns" for x in s["warnings"])
            ),
            "A probed, no private DNS",
        )
        assert st["order"] == [] and D not in resolvers(st), st
        assert resolvers(st)[A]["designated"] == [], st
        assert "not used: unverified, at another address" in w.agent.log.read_text()
        answer = w.ask()  # no DNS: the tunnel says so at once
        assert answer is not None and answer.rcode() == dns.rcode.SERVFAIL, answer
        st = w.wait(lambda s: s["tunnel"]["mode"] == "down", "the tunnel down")
        assert st["tunnel"]["upstreams"] == [] and st["tunnel"]["clients"]["servfail"] >= 1
        assert w.d_queries() == 0
        pkts = w.capture.stop()

    assert leaked(pkts, [NAME]) == {}
    assert set(cleartext_queries(pkts)) <= ALLOWED_CLEARTEXT, cleartext_queries(pkts)
    assert "_dns.resolver.arpa." in cleartext_to(pkts, A)
    # D saw the verification handshake on its DoT port, and nothing else: never probed, never
    # asked
    assert {(p.proto, p.dport) for p in pkts if p.dst == D and p.payload} == {("tcp", DOT_PORT)}


# -- 2. DNR ------------------------------------------------------------------------------------


DNR_OPTION = dnr.encode_v4([dnr.DnrInstance(1, ADN, (D,), ("dot",), DOT_PORT)])


@pytest.mark.parametrize("a_tls", [False, True], ids=["a-plain", "a-private"])
def test_dnr_lease_designates_the_first_resolver(tmp_path: Path, certs: Certs, a_tls: bool) -> None:
    """The lease's option dnr names D by its ADN (D's certificate: the name only, no
    address); A offers no DDR. Strict, no pins: D is used, authenticated by the ADN, first;
    when A speaks TLS too (authenticated by its address), it comes after D."""
    cert = d_cert(tmp_path, certs)
    a_cert = certs.good_lab if a_tls else None
    with world(tmp_path, certs, cert, svcb=False, dnr_option=DNR_OPTION, a_cert=a_cert) as w:
        want = [D_UPSTREAM, f"tls-port:{A}@853"] if a_tls else [D_UPSTREAM]
        st = w.wait(lambda s: settled(s, want, A, D), f"order {want}")
        by = resolvers(st)
        assert list(by) == [D, A]
        d, a = by[D], by[A]
        assert (d["origin"], d["auth_name"], d["port"], d["designated"]) == (
            "dnr", ADN, DOT_PORT, []
        ), d  # fmt: skip
        assert (d["method"], d["auth"], d["auth_source"], d["used"]) == (
            "tls-port", "name", "network", True
        ), d  # fmt: skip
        assert (a["origin"], a["used"], a["designated"]) == ("dhcp", a_tls, []), a
        if a_tls:
            assert (a["method"], a["auth"]) == ("tls-port", "ip-san"), a
        assert a_answers(w.ask()) == [WWW_A]
        assert w.d_queries() == 1
        pkts = w.capture.stop()

    assert leaked(pkts, [NAME]) == {}
    assert set(cleartext_queries(pkts)) <= ALLOWED_CLEARTEXT, cleartext_queries(pkts)


# -- 3. the cache follows the network ------------------------------------------------------------


def test_cache_is_emptied_when_the_network_changes(tmp_path: Path, certs: Certs) -> None:
    cert = d_cert(tmp_path, certs)
    with world(tmp_path, certs, cert, svcb=False, dnr_option=DNR_OPTION) as w:
        first_net = f"dhcp:{w.ifname}:{A}"
        st = w.wait(lambda s: settled(s, [D_UPSTREAM], A, D), "D in use")
        assert [i["network"] for i in st["interfaces"]] == [first_net]
        assert a_answers(w.ask()) == [WWW_A]
        cache = w.cache()
        assert cache["entries"] == 1 and cache["misses"] >= 1, cache
        assert a_answers(w.ask()) == [WWW_A]  # from the cache: D is not asked again
        after = w.cache()
        assert after["hits"] == cache["hits"] + 1, (cache, after)
        assert after["misses"] == cache["misses"], (cache, after)
        assert w.d_queries() == 1, w.unbound.tail()

        # another DHCP server identifier: another network; no answer is carried over
        w.write_lease(OTHER_SERVER, dnr_option=DNR_OPTION)
        second_net = f"dhcp:{w.ifname}:{OTHER_SERVER}"
        st = w.wait(
            lambda s: s["tunnel"]["cache"]["flushes"] > after["flushes"],
            "the cache emptied",
        )
        assert st["tunnel"]["cache"]["entries"] == 0, st["tunnel"]["cache"]
        assert [i["network"] for i in st["interfaces"]] == [second_net]
        assert "network changed" in w.agent.log.read_text()
        w.wait(lambda s: settled(s, [D_UPSTREAM], A, D), "D in use on the new network")
        assert a_answers(w.ask()) == [WWW_A]  # asked of D again
        assert w.d_queries() == 2, w.unbound.tail()
        now = w.cache()
        assert now["misses"] == after["misses"] + 1 and now["entries"] == 1, now
        assert now["flushes"] == after["flushes"] + 1, now
