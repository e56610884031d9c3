"""Fuzzing what a resolver answers to DDR's question (agent/ddr.py `read_answer`): near-valid
`_dns.resolver.arpa` SVCB answers, built, then mutated byte by byte.

Target `ddr-answer`: whatever bytes come back, either dnspython refuses them (the prober
then reports a malformed answer) or `read_answer` returns records within its bounds, each
with ALPN dot, a port, and addresses that are IP addresses, never raising.
"""

from __future__ import annotations

import ipaddress
import itertools

import dns.exception
import dns.message
import dns.rdatatype
import dns.rrset
from hypothesis import strategies as st

from agent import ddr
from tests.fuzz_corpus import Target, expect, mutated, property_test

SVCB = [
    '1 dot.example.test. alpn="dot" port=853 ipv4hint=198.51.100.53',
    '2 dot.example.test. alpn="h2,dot" ipv6hint=2001:db8::53',
    '1 doh.example.test. alpn="h2" key7="/q{?dns}"',  # dohpath, by number (dnspython 2.3)
    "0 alias.example.test.",
    '1 . alpn="dot"',
    '3 m.example.test. mandatory=alpn,port alpn="dot" port=8853',
    '1 bad.example.test. alpn="dot" port=25',
]


def _answer(records: list[str], glue: bool) -> bytes:
    q = dns.message.make_query(ddr.QNAME, dns.rdatatype.SVCB, id=4242)  # no randomness
    r = dns.message.make_response(q)
    if records:
        r.answer.append(dns.rrset.from_text(ddr.QNAME, 300, "IN", "SVCB", *records))
    if glue:
        r.additional.append(
            dns.rrset.from_text("dot.example.test.", 300, "IN", "A", "198.51.100.54")
        )
    return r.to_wire()


# built once, here (dnspython draws random numbers while building: not in a strategy)
SEEDS = st.sampled_from(
    [
        _answer(list(records), glue)
        for n in range(4)
        for records in itertools.combinations(SVCB, n)
        for glue in (False, True)
    ]
)


def strategy(big: bool) -> st.SearchStrategy[bytes]:
    return mutated(SEEDS)  # the same sizes both ways: answers are small


def check(data: bytes) -> None:
    try:
        message = dns.message.from_wire(data)
    except (dns.exception.DNSException, ValueError, UnicodeError):
        return  # refused before DDR looks at it: a malformed answer, as the prober says
    records, skipped = ddr.read_answer(message)
    expect(len(records) <= ddr.MAX_RECORDS, "records beyond the bound", len(records))
    expect(all(isinstance(s, str) for s in skipped), "a reason that is not text")
    for rec in records:
        expect(0 < rec.port < 65536, "a port out of range", rec.port)
        expect(len(rec.hints) <= ddr.MAX_ADDRESSES, "hints beyond the bound", len(rec.hints))
        for a in rec.hints:
            ipaddress.ip_address(a)  # raises: a crash the signature names
        rec.adn  # noqa: B018 - the name as text must not raise either


TARGETS = [Target("ddr-answer", strategy, check)]

test_ddr_answer = property_test(TARGETS[0])
