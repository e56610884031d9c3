"""DDR, Discovery of Designated Resolvers (RFC 9462): which encrypted resolvers a resolver
designates for itself, and which of those the RFC lets the agent use without asking anyone.

`discover` asks the resolver, at its own address and DNS port, for `_dns.resolver.arpa.` SVCB
(section 4: "the client issues a query for _dns.resolver.arpa. with the SVCB resource record
type (64)"), over UDP, again over TCP when the answer comes back truncated. The RFC sets no
header flags for it; RD is set as in any stub query, since a forwarder asked with RD clear
may answer from its cache only. EDNS0 (1232 bytes) lets the SVCB records and their addresses
fit one datagram; nothing is padded, as nothing is encrypted (RFC 7830 section 6).

This query, and the A/AAAA queries for a designation's own name when the answer carried no
address for it, are the only cleartext DNS besides the STARTTLS dummy that the strict profile
sends: they name nothing of the user's, only the resolver's own designation.

The rules applied, in the RFC's words:

- Section 3: "If the client encounters a mandatory parameter in an SVCB record it does not
  understand, it MUST NOT use that record to discover a Designated Resolver." Understood
  here: alpn, port, ipv4hint, ipv6hint. Only records whose ALPN set holds "dot" are kept
  (DoH and DoQ are not the agent's); RFC 9461 section 4.1: without alpn a record is
  "incompatible".
- Section 4: ServiceMode responses "MUST NOT use the "." or "resolver.arpa" value for the
  TargetName. Similarly, clients MUST NOT perform A or AAAA queries for "resolver.arpa"."
  Addresses come from the A/AAAA records the resolver "SHOULD include ... in the Additional
  Answers section" (preferred to the hints when present, RFC 9460 section 7.3), else from
  ipv4hint/ipv6hint, else from A and AAAA queries for the TargetName to the same resolver
  (the section's "additional round trip to retrieve the address of the designated
  resolver").
- Section 4.1: "Clients MUST NOT automatically use a Designated Resolver without some sort of
  validation", and "A client MUST NOT re-use a designation discovered using the IP address of
  one Unencrypted DNS Resolver in place of any other Unencrypted DNS Resolver."
- Section 4.2, Verified Discovery: "1. The client MUST verify the chain of certificates up to
  a trust anchor ... This SHOULD use the default system or application trust anchors, unless
  otherwise configured." (here: the CA file of the resolver's AuthSpec, else the system's)
  "2. The client MUST verify that the certificate contains the IP address of the designating
  Unencrypted DNS Resolver in an iPAddress entry of the subjectAltName extension" ... "Even
  when a different IP address is used for the connection, the TLS certificate checks
  described in this section still apply for the original IP address". "If these checks fail,
  the client MUST NOT automatically use the discovered Designated Resolver". The agent asks
  more than the RFC: the certificate must also name the TargetName (the ADN), which then
  authenticates the designation under strict as a name the network handed out.
- Section 4.3, Opportunistic Discovery: "A client MAY use information from the SVCB record
  for "_dns.resolver.arpa" with this Opportunistic Privacy Profile as long as the IP address
  of the Encrypted DNS Resolver does not differ from the IP address of the Unencrypted DNS
  Resolver. Clients SHOULD use this mode only for resolvers using private or local IP
  addresses" (private: RFC 1918; local: ULA, link-local; the agent adds loopback). The
  SHOULD is kept as a MUST here.
- Section 6.3: "Clients MUST NOT use "resolver.arpa" as the server name ... in the TLS Server
  Name Indication": the SNI is the ADN.
- RFC 9461 section 4.2: clients SHOULD NOT support the "port" key unless they exclude "any
  ports where a confusion attack is likely to be possible (e.g., the "bad ports" list from
  the "Port blocking" section of [FETCH])": a record naming such a port is not used, and
  nothing is sent there.

Not done here: AliasMode records (section 3: they "can be used to direct clients to the
needed ServiceMode SVCB record") are not followed, as that would be another cleartext query
for a name of the answer's choosing; a resolver that answers with AliasMode only is treated
as one without DoT designation, and the probe goes on as without DDR. The SVCB TTL (section
4.2: suppressing further queries after a failed validation) is the caller's: this module
keeps no state. Everything it reads is bounded: at most MAX_RECORDS records, MAX_ADDRESSES
addresses each, all within one deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from dataclasses import dataclass
from enum import Enum

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.svcbbase
from dns.rdtypes.svcbbase import ParamKey

from agent.dns import wire
from agent.dns.transport import Connection, udp_exchange
from agent.errors import (
    CertificateRejected,
    TransportError,
)
from agent.model import AuthSpec, DdrResult, Designation, ProbeSettings, Profile
from agent.tls import ALPN_DOT, cert_dns_names, context_for, ip_in_cert, name_matches

LOG = logging.getLogger(__name__)

QNAME = dns.name.from_text("_dns.resolver.arpa.")
SUDN = dns.name.from_text("resolver.arpa.")
DOT_PORT = 853  # RFC 9461 section 4.2: the default port for DoT
MAX_RECORDS = 16  # SVCB records read from one answer
MAX_ADDRESSES = 8  # addresses used per record
MAX_HANDSHAKES = 8  # verification connections at once
# The mandatory keys understood (RFC 9462 section 3); "port" is automatically mandatory.
UNDERSTOOD = frozenset({ParamKey.ALPN, ParamKey.PORT, ParamKey.IPV4HINT, ParamKey.IPV6HINT})
# Fetch's "bad ports" (fetch.spec.whatwg.org, Port blocking), as RFC 9461 section 4.2 suggests.
BAD_PORTS = frozenset(
    {0, 1, 7, 9, 11, 13, 15, 17, 19, 20, 21, 22, 23, 25, 37, 42, 43, 53, 69, 77, 79, 87, 95}
    | {101, 102, 103, 104, 109, 110, 111, 113, 115, 117, 119, 123, 135, 137, 139, 143, 161}
    | {179, 389, 427, 465, 512, 513, 514, 515, 526, 530, 531, 532, 540, 548, 554, 556, 563}
    | {587, 601, 636, 989, 990, 993, 995, 1719, 1720, 1723, 2049, 3659, 4045, 4190, 5060}
    | {5061, 6000, 6566, 6665, 6666, 6667, 6668, 6669, 6679, 6697, 10080}
)


def ddr_query(
    name: dns.name.Name = QNAME, rdtype: dns.rdatatype.RdataType = dns.rdatatype.SVCB
) -> dns.message.QueryMessage:
    """The DDR question (or an A/AAAA question for a designation's name): RD set, EDNS0."""
    return dns.message.make_query(name, rdtype, use_edns=0, payload=wire.EDNS_PAYLOAD)


def private_or_local(address: str) -> bool:
    """Where RFC 9462 section 4.3 allows opportunistic use: RFC 1918, ULA, link-local; and
    loopback. Python's `is_private` also counts the documentation ranges (198.51.100.0/24,
    203.0.113.0/24, 2001:db8::/32, ...), which the test lab uses as its private networks:
    acceptable, as no public resolver lives there."""
    ip = ipaddress.ip_address(address)
    return ip.is_private or ip.is_loopback or ip.is_link_local


# -- the exchange --------------------------------------------------------------------------


async def _tcp(
    address: str, port: int, query: dns.message.Message, until: float
) -> dns.message.Message:
    conn = await Connection.open(address, port, until)
    try:
        await conn.send_message(query.to_wire(), until)
        return wire.parse_response(await conn.recv_message(until), query)
    finally:
        conn.close()


async def _ask(
    address: str, port: int, query: dns.message.Message, until: float
) -> dns.message.Message:
    loop = asyncio.get_running_loop()
    half = loop.time() + max(0.0, until - loop.time()) / 2
    response = await udp_exchange(address, port, query, until, half)
    if response.flags & dns.flags.TC:
        LOG.debug("%s: DDR answer truncated over UDP, asking over TCP", address)
        response = await _tcp(address, port, query, until)
    return response


# -- reading the answer --------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    """One usable-looking DoT ServiceMode record."""

    priority: int
    target: dns.name.Name
    port: int
    hints: tuple[str, ...]  # ipv4hint and ipv6hint addresses, bounded

    @property
    def adn(self) -> str:
        return self.target.to_text(omit_final_dot=True)


def _param(rd: dns.rdtypes.svcbbase.SVCBBase, key: ParamKey) -> object | None:
    return rd.params.get(key)


def _key_text(key: int) -> str:
    try:
        return ParamKey(key).name.lower()
    except ValueError:
        return f"key{key}"


def _unfit(rd: dns.rdtypes.svcbbase.SVCBBase) -> str:
    """Why a record cannot designate a DoT resolver; "" when it can."""
    target = rd.target
    if rd.priority == 0:
        return f"AliasMode record to {target} (not followed)"
    if target == dns.name.root or target.is_subdomain(SUDN):
        return f"TargetName {target} (RFC 9462 section 4 forbids it)"
    mandatory = _param(rd, ParamKey.MANDATORY)
    keys = getattr(mandatory, "keys", ())
    unknown = [k for k in keys if k not in UNDERSTOOD]
    if unknown:
        names = ",".join(_key_text(k) for k in unknown)
        return f"record for {target} with mandatory keys not understood: {names}"
    alpn = _param(rd, ParamKey.ALPN)
    ids = [i.decode("ascii", "replace") for i in getattr(alpn, "ids", ())]
    if ALPN_DOT not in ids:
        return f"record for {target} without ALPN dot ({','.join(ids) or 'no alpn'})"
    port = getattr(_param(rd, ParamKey.PORT), "port", DOT_PORT)
    if port in BAD_PORTS:
        return f"record for {target} on port {port}, a port of another protocol (RFC 9461 4.2)"
    return ""


def _hints(rd: dns.rdtypes.svcbbase.SVCBBase) -> tuple[str, ...]:
    found: list[str] = []
    for key in (ParamKey.IPV4HINT, ParamKey.IPV6HINT):
        found.extend(str(a) for a in getattr(_param(rd, key), "addresses", ()))
    return tuple(found[:MAX_ADDRESSES])


def read_answer(response: dns.message.Message) -> tuple[list[_Record], list[str]]:
    """The DoT ServiceMode records of a `_dns.resolver.arpa` answer, lowest priority first,
    and why the other records were left out."""
    rdatas: list[dns.rdata.Rdata] = []
    for rrset in response.answer:
        if rrset.name == QNAME and rrset.rdtype == dns.rdatatype.SVCB:
            rdatas.extend(rrset)
    skipped: list[str] = []
    if len(rdatas) > MAX_RECORDS:
        skipped.append(f"{len(rdatas) - MAX_RECORDS} records past the first {MAX_RECORDS}")
        rdatas = rdatas[:MAX_RECORDS]
    records: list[_Record] = []
    for rd in rdatas:
        if not isinstance(rd, dns.rdtypes.svcbbase.SVCBBase):
            continue
        why = _unfit(rd)
        if why:
            skipped.append(why)
            continue
        port = getattr(_param(rd, ParamKey.PORT), "port", DOT_PORT)
        records.append(_Record(rd.priority, rd.target, int(port), _hints(rd)))
    records.sort(key=lambda r: r.priority)
    return records, skipped


def _glue(response: dns.message.Message, target: dns.name.Name) -> tuple[str, ...]:
    """The A/AAAA records for `target` that came with the answer (section 4's SHOULD)."""
    found: list[str] = []
    for rrset in response.additional:
        if rrset.name == target and rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            found.extend(rd.to_text() for rd in rrset)
    return tuple(found[:MAX_ADDRESSES])


async def _lookup(address: str, port: int, target: dns.name.Name, until: float) -> tuple[str, ...]:
    """A and AAAA for `target`, asked of the same resolver; what could not be had is left out."""

    async def one(rdtype: dns.rdatatype.RdataType) -> list[str]:
        query = ddr_query(target, rdtype)
        try:
            response = await _ask(address, port, query, until)
        except TransportError as exc:
            LOG.debug("%s: %s %s: %s", address, target, rdtype.name, exc.detail)
            return []
        return [
            rd.to_text()
            for rrset in response.answer
            if rrset.name == target and rrset.rdtype == rdtype
            for rd in rrset
        ]

    v4, v6 = await asyncio.gather(one(dns.rdatatype.A), one(dns.rdatatype.AAAA))
    return tuple([*v4, *v6][:MAX_ADDRESSES])


def _unusable_address(original: str, address: str) -> str:
    """Addresses nothing is sent to: not an address, or one that means this machine or many
    (a remote resolver designating loopback would aim the TLS handshake at a local service)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 reaches what 127.0.0.1 does
    if ip.is_unspecified or ip.is_multicast or (ip.version == 4 and ip.is_reserved):
        return f"{address} cannot be a resolver's address"
    if ip.is_loopback and not ipaddress.ip_address(original).is_loopback:
        return f"{address} is loopback, and {original} is not"
    return ""


# -- verification --------------------------------------------------------------------------


class Verdict(Enum):
    VERIFIED = "verified"  # chain, ADN and the original address all in order
    UNVERIFIED = "unverified"  # TLS spoken there, the certificate did not verify
    NO_TLS = "no-tls"  # no TLS handshake could be had there


async def _verify(
    original: str, address: str, port: int, adn: str, ca_file: str | None, until: float
) -> tuple[Verdict, str]:
    """TLS (ALPN dot, SNI the ADN) to one designated address: does its certificate validate
    against the CA bundle, name the ADN, and carry the original resolver's address?"""
    try:
        ctx = context_for(AuthSpec(Profile.STRICT, ca_file=ca_file))  # a validating context
        conn = await Connection.open(address, port, until)
    except CertificateRejected as exc:
        return Verdict.UNVERIFIED, exc.detail
    except TransportError as exc:
        return Verdict.NO_TLS, exc.detail
    try:
        tls = await conn.start_tls(ctx, until, server_hostname=adn)
        der = tls.peer_cert()
        named = any(name_matches(n, adn) for n in cert_dns_names(der))
        has_ip = ip_in_cert(der, original)
    except CertificateRejected as exc:
        return Verdict.UNVERIFIED, exc.detail
    except TransportError as exc:
        return Verdict.NO_TLS, exc.detail
    except (ssl.SSLError, ValueError) as exc:
        return Verdict.UNVERIFIED, f"unusable certificate: {exc}"
    finally:
        conn.close()
    if named and has_ip:
        return Verdict.VERIFIED, ""
    missing = [what for what, ok in ((adn, named), (original, has_ip)) if not ok]
    return Verdict.UNVERIFIED, f"certificate does not name {' nor '.join(missing)}"


def judge(original: str, address: str, seen: Verdict, why: str) -> tuple[bool, str]:
    """Whether RFC 9462 lets the designation at `address` be used in place of `original`."""
    if seen is Verdict.VERIFIED:
        return True, f"verified (cert names it and {original})"
    if seen is Verdict.NO_TLS:
        return False, f"no TLS there: {why}"
    if address != original:
        return False, f"unverified, at another address: RFC 9462 forbids its use ({why})"
    if not private_or_local(original):
        return False, (
            f"unverified, at a public address: RFC 9462 allows opportunistic use only at a "
            f"private or local one ({why})"
        )
    return True, f"opportunistic (same private address, cert not verified: {why})"


# -- discovery -----------------------------------------------------------------------------


async def discover(address: str, settings: ProbeSettings, deadline: float) -> DdrResult:
    """Ask the resolver at `address` for its designated DoT resolvers and judge each one.

    Bounded by `settings.ddr_timeout` within `deadline` (event-loop time). Never raises but
    for cancellation: what goes wrong is the result's `failure`.
    """
    loop = asyncio.get_running_loop()
    until = min(deadline, loop.time() + settings.ddr_timeout)
    if until <= loop.time():
        return DdrResult(asked=False, failure="not asked: no time left")
    try:
        return await _discover(str(ipaddress.ip_address(address)), settings, until)
    except TransportError as exc:
        return DdrResult(asked=True, failure=exc.detail)
    except Exception as exc:  # isolation boundary: what a resolver answers must not sink a probe
        LOG.exception("DDR with %s failed unexpectedly", address)
        return DdrResult(asked=True, failure=f"internal error: {exc!r}")


async def _discover(address: str, settings: ProbeSettings, until: float) -> DdrResult:
    response = await _ask(address, settings.dns_port, ddr_query(), until)
    rcode = response.rcode()
    if rcode != dns.rcode.NOERROR:
        return DdrResult(asked=True, failure=dns.rcode.to_text(rcode))
    records, skipped = read_answer(response)
    for why in skipped:
        LOG.info("%s: DDR: left out: %s", address, why)

    targets = {r.target for r in records if not r.hints and not _glue(response, r.target)}
    looked_up = dict(
        zip(
            targets,
            await asyncio.gather(*(_lookup(address, settings.dns_port, t, until) for t in targets)),
            strict=True,
        )
    )
    candidates: dict[tuple[str, int, str], _Record] = {}
    for r in records:
        # RFC 9460 section 7.3: address records at hand are preferred to the hints
        addresses = _glue(response, r.target) or r.hints or looked_up.get(r.target, ())
        if not addresses:
            skipped.append(f"no address for {r.adn}")
        for a in addresses:
            why = _unusable_address(address, a)
            if why:
                skipped.append(f"{r.adn}: {why}")
                continue
            key = (str(ipaddress.ip_address(a)), r.port, r.adn.lower())
            candidates.setdefault(key, r)  # records are sorted: the lowest priority stays

    limit = asyncio.Semaphore(MAX_HANDSHAKES)

    async def check(key: tuple[str, int, str], r: _Record) -> Designation:
        at, port, _ = key
        async with limit:
            seen, why = await _verify(address, at, port, r.adn, settings.auth.ca_file, until)
        usable, reason = judge(address, at, seen, why)
        return Designation(at, port, r.adn, r.priority, seen is Verdict.VERIFIED, usable, reason)

    designations = await asyncio.gather(*(check(k, r) for k, r in candidates.items()))
    for d in designations:
        LOG.info(
            "%s: DDR: dot %s@%s:%d %s", address, d.adn, d.address, d.port,
            d.reason if d.usable else f"not used: {d.reason}",
        )  # fmt: skip
    failure = ""
    if not designations and skipped:
        failure = "no DoT designation: " + "; ".join(skipped)
    return DdrResult(asked=True, designations=tuple(designations), failure=failure)
