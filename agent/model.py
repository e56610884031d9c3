"""Frozen values shared by the rooms: profiles, probe settings and probe results (and the
one form of a key pin they are written in)."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from agent.errors import UsageError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Profile(StrEnum):
    """How much privacy is demanded of a resolver (PROTOCOL.md section 3)."""

    OPPORTUNISTIC = "opportunistic"  # TLS when possible, any certificate; cleartext fallback
    ENCRYPTED = "encrypted"  # TLS required, any certificate; never cleartext
    STRICT = "strict"  # TLS required and authenticated; never cleartext

    @property
    def allows_cleartext(self) -> bool:
        return self is Profile.OPPORTUNISTIC

    @property
    def requires_auth(self) -> bool:
        return self is Profile.STRICT


class Order(StrEnum):
    PORT_FIRST = "port-first"
    UPGRADE_FIRST = "upgrade-first"


class Path(StrEnum):
    """One way of reaching a resolver that the prober tries."""

    PORT = "port"  # TLS on port 853
    UPGRADE = "upgrade"  # STARTTLS with the EDNS0 TO flag on TCP/53
    UDP = "udp"  # the cheap UDP hint


class Method(StrEnum):
    """The best way the resolver could be used, in decreasing order of privacy."""

    TLS_PORT = "tls-port"
    TLS_UPGRADE = "tls-upgrade"
    TCP_PLAIN = "tcp-plain"
    UDP_PLAIN = "udp-plain"
    UNREACHABLE = "unreachable"

    @property
    def private(self) -> bool:
        return self in (Method.TLS_PORT, Method.TLS_UPGRADE)


class Auth(StrEnum):
    """How the server's certificate authenticated, if it did."""

    NONE = "none"  # not authenticated (opportunistic accepts it)
    PIN = "pin"  # SPKI SHA-256 pin set (RFC 7858 4.2)
    IP_SAN = "ip-san"  # chain valid and the resolver's IP address is in subjectAltName
    NAME = "name"  # chain valid and the name asked for (AuthSpec.auth_name) matches


class AuthSource(StrEnum):
    """Where the identity that authenticated a resolver came from (kept apart from Auth,
    whose values the state file holds)."""

    CONFIGURED = "configured"  # pins, the configuration's auth_name, a command line, a static
    #                            resolver's address or #NAME
    NETWORK = "network"  # what the network handed out: the resolver's address, NM's ADDR#name


class Failure(StrEnum):
    """Why a path did not give what it was tried for. Failures are data."""

    REFUSED = "refused"
    TIMEOUT = "timeout"
    RESET = "reset"
    CLOSED = "closed"
    UNREACHABLE = "unreachable"
    TLS_HANDSHAKE_FAILED = "tls-handshake-failed"
    CERT_NOT_AUTHENTICATED = "cert-not-authenticated"
    NO_UPGRADE = "no-upgrade"  # TO clear in the answer: the server does not upgrade
    TO_NO_ANSWER = "to-no-answer"  # no answer at all to the TO query
    TO_HANDSHAKE_FAILED = "to-handshake-failed"  # TO answered but the handshake failed
    MALFORMED_RESPONSE = "malformed-response"
    MISMATCHED_RESPONSE = "mismatched-response"
    ABANDONED = "abandoned"  # stopped because another path already succeeded


@dataclass(frozen=True)
class AuthSpec:
    """What authenticates a resolver, and how much authentication is demanded.

    Under `strict`, configuration comes first: a configured pin set is the
    authentication (no chain needed, RFC 7858 4.2); else the chain must validate
    against the CA bundle (`ca_file`, else the system's) and the certificate must
    carry a configured `auth_name`; only when neither is configured does the
    resolver's IP address in the certificate (or a name the network handed out)
    authenticate. The network decides which address is asked: were its address
    enough despite a configured name, a rogue DHCP server holding a certificate for
    an address of its own would be trusted. Under `opportunistic` any certificate
    is accepted and its pin recorded; a matching pin is still reported.

    `name_source` says where `auth_name` came from, `address_source` where the
    address did; both default to configured (a command line), the safe side.
    """

    profile: Profile = Profile.OPPORTUNISTIC
    pins: frozenset[str] = frozenset()
    auth_name: str | None = None
    ca_file: str | None = None
    name_source: AuthSource = AuthSource.CONFIGURED
    address_source: AuthSource = AuthSource.CONFIGURED

    @property
    def name_configured(self) -> bool:
        return bool(self.auth_name) and self.name_source is AuthSource.CONFIGURED


@dataclass(frozen=True)
class UpstreamSpec:
    """One resolver as the tunnel is told to reach it (the order of a list is the caller's)."""

    address: str
    method: Method = Method.TLS_PORT  # TLS_PORT, TLS_UPGRADE or, opportunistic only, TCP_PLAIN
    port: int = 853
    auth_name: str | None = None
    pins: frozenset[str] = frozenset()
    ca_file: str | None = None  # CA bundle for this resolver; None: the tunnel's, else the system's
    # The other TLS path to the same resolver (method, port) that the tunnel may race when
    # the first has not finished its handshake within its fallback delay: the policy's to
    # grant; never a cleartext one. Not part of the text form, nor of equality: the same
    # resolver reached the same way first is the same upstream.
    alt: tuple[Method, int] | None = field(default=None, compare=False)
    # Where `auth_name` came from: a name the network handed out authenticates only beside
    # the address (see AuthSpec). Not part of the text form; `parse` reads a configured one.
    name_source: AuthSource = AuthSource.CONFIGURED

    @property
    def private(self) -> bool:
        return self.method.private

    def auth_spec(self, profile: Profile, ca_file: str | None = None) -> AuthSpec:
        """How the tunnel authenticates this upstream (`ca_file`: the tunnel's, when the
        upstream has none of its own)."""
        return AuthSpec(
            profile, self.pins, self.auth_name, self.ca_file or ca_file, self.name_source
        )

    SCHEMES: ClassVar[dict[str, tuple[Method, int]]] = {
        "tls": (Method.TLS_PORT, 853),
        "upgrade": (Method.TLS_UPGRADE, 53),
        "tcp": (Method.TCP_PLAIN, 53),
        "udp": (Method.UDP_PLAIN, 53),
        # the method names, as str(spec) and `status` print them, are accepted too
        "tls-port": (Method.TLS_PORT, 853),
        "tls-upgrade": (Method.TLS_UPGRADE, 53),
        "tcp-plain": (Method.TCP_PLAIN, 53),
        "udp-plain": (Method.UDP_PLAIN, 53),
    }

    @classmethod
    def parse(cls, text: str, *, pins: frozenset[str] = frozenset()) -> UpstreamSpec:
        """`[tls:|upgrade:|tcp:]ADDR[@PORT][#NAME]`; IPv6 may be bracketed."""
        rest = text.strip()
        method, port = Method.TLS_PORT, 853
        scheme, sep, after = rest.partition(":")
        if sep and scheme in cls.SCHEMES and not after.startswith(":"):
            method, port = cls.SCHEMES[scheme]
            rest = after.lstrip("/")
        rest, _, name = rest.partition("#")
        host, at, port_text = rest.rpartition("@")
        if not at:
            host, port_text = rest, ""
        host = host.strip("[]")
        try:
            address = str(ipaddress.ip_address(host))
        except ValueError:
            raise UsageError(f"upstream {text!r}: {host!r} is not an IP address") from None
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise UsageError(f"upstream {text!r}: {port_text!r} is not a port")
            port = int(port_text)
        if name and not all(label and len(label) < 64 for label in name.rstrip(".").split(".")):
            raise UsageError(f"upstream {text!r}: {name!r} is not a host name")
        return cls(address, method, port, name or None, pins)

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        name = f"#{self.auth_name}" if self.auth_name else ""
        return f"{self.method.value}:{host}@{self.port}{name}"


@dataclass(frozen=True)
class ProbeSettings:
    """Knobs of one probe. Ports are configurable for tests and unusual resolvers."""

    auth: AuthSpec = AuthSpec()
    order: Order = Order.PORT_FIRST
    timeout: float = 5.0  # the one overall deadline, seconds
    connect_timeout: float = 3.0  # ceiling for one TCP connect, within the deadline
    fallback_delay: float = 0.25  # start the other path if the first has not finished
    #                               its TLS handshake by then
    udp_timeout: float = 1.0
    probe_name: str = "."
    probe_type: str = "NS"
    tls_port: int = 853
    dns_port: int = 53
    check_resumption: bool = True
    # ask the resolver for its designated encrypted resolvers first (DDR, RFC 9462: the
    # `_dns.resolver.arpa` SVCB query, in cleartext, names nothing of the user's)
    ddr: bool = True
    ddr_timeout: float = 1.0


@dataclass(frozen=True)
class TLSInfo:
    version: str
    cipher: str
    pin: str  # base64 SHA-256 of the server's SubjectPublicKeyInfo
    auth: Auth
    alpn: str | None = None
    auth_source: AuthSource | None = None  # None: not authenticated


@dataclass(frozen=True)
class Timings:
    """Milliseconds from the start of the path's own attempt; None when not reached."""

    connect_ms: float | None = None
    starttls_ms: float | None = None  # the cleartext TO exchange (upgrade path only)
    handshake_ms: float | None = None
    answer_ms: float | None = None  # the first real answer (inside TLS when there is TLS)


@dataclass(frozen=True)
class PathOutcome:
    """What one path achieved, or why it failed."""

    path: Path
    method: Method  # UNREACHABLE when the path gave nothing usable
    failure: Failure | None = None
    detail: str = ""
    started_ms: float = 0.0  # offset from the start of the probe
    timings: Timings = Timings()
    tls: TLSInfo | None = None
    to_in_response: bool | None = None  # the TO flag seen in the answer (UPGRADE, UDP)
    rcode: str | None = None


class Origin(StrEnum):
    """How a resolver was designated: shown in `status`, and designated ones (DNR, DDR)
    come before the plain addresses in the order."""

    DHCP = "dhcp"  # DHCPv4 option 6, DHCPv6 DNS servers
    RA = "ra"  # an IPv6 router advertisement's RDNSS
    DNR = "dnr"  # an encrypted resolver the network designated (RFC 9463: DHCP 162, 144; RA 144)
    DDR = "ddr"  # an encrypted resolver a resolver designated for itself (RFC 9462)
    CONFIGURED = "configured"  # the configuration, or a connection profile's own DNS
    NETWORK = "network"  # handed out by the network, by a means the watcher cannot tell


@dataclass(frozen=True)
class Designation:
    """An encrypted resolver that a resolver designated for itself (DDR, RFC 9462 section 4):
    one SVCB ServiceMode record of `_dns.resolver.arpa` with ALPN "dot", one address of it.

    `verified`: its certificate, validated against the CA bundle, names `adn` and carries
    the designating resolver's IP address (Verified Discovery, section 4.2): `adn` then
    authenticates it under strict. An unverified one is usable only at the designating
    resolver's own address, and only when that address is private or local
    (Opportunistic Discovery, section 4.3); it is then authenticated by nothing but what
    the address itself can prove."""

    address: str
    port: int = 853
    adn: str = ""  # the SVCB TargetName, without the trailing dot
    priority: int = 1
    verified: bool = False
    usable: bool = False  # as the RFC allows (verified, or opportunistic at the same address)
    reason: str = ""  # why (not) usable, for humans


@dataclass(frozen=True)
class DdrResult:
    """What asking a resolver for `_dns.resolver.arpa` SVCB gave."""

    asked: bool = False
    designations: tuple[Designation, ...] = ()
    failure: str = ""  # no answer, NXDOMAIN, malformed...; "" when it answered

    @property
    def usable(self) -> tuple[Designation, ...]:
        return tuple(d for d in self.designations if d.usable)


@dataclass(frozen=True)
class ProbeResult:
    """Everything learnt about one resolver in one probe."""

    address: str
    profile: Profile
    method: Method
    acceptable: bool  # has a private path that the profile accepts
    auth: Auth | None
    tls: TLSInfo | None
    timings: Timings
    decided_ms: float  # from probe start to the decision
    total_ms: float
    resumption: bool | None  # None: not tested (no TLS, or no time left)
    udp_to_hint: bool | None  # None: no UDP answer
    paths: tuple[PathOutcome, ...] = field(default=())
    auth_source: AuthSource | None = None  # where what authenticated it came from
    ddr: DdrResult | None = None  # None: DDR not asked
    tls_port: int | None = None  # the port TLS was found on when not 853 (a DDR designation's)

    @property
    def failures(self) -> dict[str, str]:
        return {
            p.path.value: f"{p.failure.value}: {p.detail}" if p.detail else p.failure.value
            for p in self.paths
            if p.failure is not None
        }

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = dataclasses.asdict(self)
        data["failures"] = self.failures
        return data


# -- the network, as the watchers report it (issue: the agent daemon) ------------------------------


class Source(StrEnum):
    """Where a fact about a link came from."""

    NM = "nm"  # NetworkManager over D-Bus
    NETLINK = "netlink"  # the kernel: links, addresses, routes, RA RDNSS
    LEASE = "lease"  # DHCP lease files
    STATIC = "static"  # the configuration


@dataclass(frozen=True)
class NetResolver:
    """A resolver address a network handed out (or the config added)."""

    address: str
    auth_name: str | None = None  # NM's "ADDR#name" or dns+tls://ADDR#name
    port: int | None = None  # a port given with dns+tls://ADDR:PORT
    tls: bool = False  # the network said it speaks DNS over TLS (dns+tls://, DNR, DDR)
    source: Source = Source.NM
    origin: Origin = Origin.NETWORK
    priority: int = 0  # DNR's service priority (lower first); 0 for the others

    @classmethod
    def parse(cls, text: str, source: Source = Source.NM) -> NetResolver:
        """NM's nameserver forms: `ADDR`, `ADDR#NAME`, `dns+tls://ADDR[:PORT][#NAME]`."""
        rest = text.strip()
        tls = rest.startswith("dns+tls://")
        if tls:
            rest = rest[len("dns+tls://") :]
        rest, _, name = rest.partition("#")
        port: int | None = None
        if rest.startswith("["):
            host, _, after = rest[1:].partition("]")
            if after.startswith(":") and after[1:].isdigit():
                port = int(after[1:])
        elif rest.count(":") == 1:
            host, _, p = rest.partition(":")
            port = int(p) if p.isdigit() else None
        else:
            host = rest
        host = host.split("%")[0]  # fe80::1%eth0: the scope is the link's
        address = str(ipaddress.ip_address(host))
        return cls(address, name or None, port, tls, source)

    @property
    def designated(self) -> bool:
        """Designated as an encrypted resolver (DNR, DDR): before the plain addresses."""
        return self.origin in (Origin.DNR, Origin.DDR)


@dataclass(frozen=True)
class Link:
    """One interface and what the network told about its DNS."""

    ifname: str
    up: bool = True
    resolvers: tuple[NetResolver, ...] = ()
    domains: tuple[str, ...] = ()
    vpn: bool = False
    priority: int = 100  # NetworkManager's DNS priority: lower is preferred
    default_route: bool = False
    connection_id: str | None = None
    connection_uuid: str | None = None
    ssid: str | None = None
    gateway_mac: str | None = None
    dhcp_server: str | None = None

    @property
    def network_id(self) -> str:
        """Which network this is, for remembering what worked on it."""
        if self.connection_uuid:
            return f"nm:{self.connection_uuid}"
        if self.gateway_mac:
            return f"gw:{self.ifname}:{self.gateway_mac}"
        if self.dhcp_server:
            return f"dhcp:{self.ifname}:{self.dhcp_server}"
        return f"if:{self.ifname}"

    @property
    def connection(self) -> tuple[str, ...]:
        return tuple(c for c in (self.connection_id, self.connection_uuid) if c)


@dataclass(frozen=True)
class Knowledge:
    """What was learnt about one resolver on one network; persisted by state.py.

    Times are wall-clock seconds (time.time()): they must survive restarts.
    """

    network: str
    address: str
    method: Method = Method.UNREACHABLE
    auth: Auth | None = None
    pin: str | None = None
    pins_seen: tuple[str, ...] = ()  # every key it showed on this network, newest last
    latency_ms: float | None = None  # time to the first answer inside TLS
    probed_at: float = 0.0
    tls_ok_at: float = 0.0  # the last time TLS worked (0: never on this network)
    negative_until: float = 0.0  # refused TLS or failed the handshake: not asked before then
    path_first: Order | None = None  # the TLS path that worked, tried first next time
    resumption: bool | None = None
    failures: tuple[str, ...] = ()  # why the failed paths failed, last probe
    plain: Method | None = None  # the cleartext transport that answered (TCP_PLAIN, UDP_PLAIN)
    pin_stable: int = 0  # probes in a row that showed the current key
    suspect_at: float = 0.0  # the running tunnel's connection to it failed then
    suspect: str = ""  # ... and why
    auth_source: AuthSource | None = None  # where what authenticated it came from, last probe
    designated: tuple[Designation, ...] = ()  # what DDR found usable, last probe
    tls_port: int | None = None  # TLS on this port, not 853 (a DDR designation at its address)

    @property
    def key(self) -> tuple[str, str]:
        return (self.network, self.address)


def parse_pin(text: str) -> str:
    """Accept `BASE64`, `pin-sha256="BASE64"` or `sha256/BASE64`; return the bare BASE64."""
    value = text.strip()
    for prefix in ("pin-sha256=", "sha256/"):
        if value.lower().startswith(prefix):
            value = value[len(prefix) :]
    value = value.strip().strip('"')
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UsageError(f"pin {text!r} is not base64") from exc
    if len(raw) != 32:
        raise UsageError(f"pin {text!r} decodes to {len(raw)} bytes, a SHA-256 pin has 32")
    return base64.b64encode(raw).decode("ascii")
