"""DNR (RFC 9463): the encrypted resolvers a network designates in DHCP and RAs, from the
option's bytes to values, and from those to the resolvers the agent may use (DoT only).

Pure: bytes in, values out. Hostile input raises nothing but `DnrError`, and takes time and
memory linear in its size. The layouts followed (RFC 9463, with its verified errata):

- section 4.1, DHCPv6 option 144 (OPTION_V6_DNR), the payload: Service Priority (2), ADN
  Length (2), ADN, Addr Length (2), IPv6 addresses, SvcParams (the rest);
- section 5.1, DHCPv4 option 162 (OPTION_V4_DNR), the payload: one or more instances,
  each DNR Instance Data Length (2), then Service Priority (2), ADN Length (1), ADN, Addr
  Length (1), IPv4 addresses, SvcParams (the rest of the instance);
- section 6.1, the RA option (type 144), whole: Type (1), Length (1, in units of 8
  octets, the whole option), Service Priority (2), Lifetime (4), ADN Length (2), ADN, Addr
  Length (2), IPv6 addresses, SvcParams Length (2), SvcParams, padding (fewer than 8
  octets);
- section 3.1.6, ADN-only mode: everything after the ADN is absent (in an RA, erratum
  7804: the SvcParams Length too; what follows the ADN is then only padding);
- the ADN is a domain name in DNS wire format, uncompressed (section 4.1 by RFC 8415
  section 10, section 5.1 by RFC 1035 section 3.1): labels of 1..63 octets ending in the
  root's empty label exactly at ADN Length, at most 255 octets; here also LDH only (it
  names the resolver's certificate);
- Addr Length, when present, is non-zero and a multiple of 4 (16) (section 3.1.8: at least
  one address); multicast, loopback and unspecified addresses (and IPv4's broadcast, and
  IPv4-mapped IPv6) are discarded (sections 4.2, 5.2): an instance left with none is
  dropped;
- SvcParams are RFC 9460 section 2.2's wire format (key (2), length (2), value; keys
  strictly ascending), without ipv4hint or ipv6hint (section 3.1.5); "alpn" (RFC 9460
  7.1), "port" (7.2), "dohpath" (RFC 9461) are read; an instance whose "mandatory" (RFC
  9460 section 8) names a key not understood here is dropped, as RFC 9460 asks.

What is malformed (a length, the order of keys, a name, a value) makes the whole option
`DnrError`: a server that frames one instance wrong is not trusted with the others. What
is well formed but of no use here (ADN-only, no "dot" in the ALPN list, an RA's lifetime 0)
is parsed, and `resolvers` leaves it out.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from agent.model import NetResolver, Origin, Source

OPTION_V4 = 162  # DHCPv4 OPTION_V4_DNR
OPTION_V6 = 144  # DHCPv6 OPTION_V6_DNR
RA_TYPE = 144  # the IPv6 ND option
DOT_PORT = 853
MAX_INSTANCES = 16  # `resolvers` uses the best this many (by priority) ...
MAX_ADDRESSES = 8  # ... and this many addresses of each; more is ignored
MAX_PAYLOAD = 65535  # no option of any of the three can be longer
INFINITY = 0xFFFFFFFF  # an RA lifetime that does not end

KEY_MANDATORY, KEY_ALPN, KEY_NO_DEFAULT_ALPN, KEY_PORT = 0, 1, 2, 3
KEY_IPV4HINT, KEY_ECH, KEY_IPV6HINT, KEY_DOHPATH = 4, 5, 6, 7
KEY_INVALID = 65535  # RFC 9460 section 14.3.2: reserved, "Invalid key"
UNDERSTOOD = frozenset({KEY_ALPN, KEY_NO_DEFAULT_ALPN, KEY_PORT, KEY_DOHPATH})

_LABEL = re.compile(rb"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class DnrError(ValueError):
    """A DNR option that is not well formed; the message says where."""


@dataclass(frozen=True)
class DnrInstance:
    """One designated encrypted resolver. `addresses` empty: ADN-only mode (the ADN would
    have to be resolved). `lifetime`: an RA's, in seconds (INFINITY: no end, 0: withdrawn);
    None for DHCP, where the lease's lifetime applies."""

    priority: int
    adn: str
    addresses: tuple[str, ...] = ()
    alpn: tuple[str, ...] = ()
    port: int | None = None
    dohpath: str | None = None
    lifetime: int | None = None

    @property
    def adn_only(self) -> bool:
        return not self.addresses


# -- reading -------------------------------------------------------------------------------------


class _Reader:
    """Bounds-checked reads from one buffer; running past its end is DnrError."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, field: str) -> bytes:
        if n > self.left:
            raise DnrError(f"{self.what}: {field} needs {n} octets, {self.left} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        value: int = _U16.unpack(self.take(2, field))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = _U32.unpack(self.take(4, field))[0]
        return value

    def rest(self) -> bytes:
        return self.take(self.left, "rest")


def _adn(wire: bytes, what: str) -> str:
    """The ADN's wire form -> `name.example` (lower case, no root dot)."""
    if not wire:
        raise DnrError(f"{what}: ADN Length 0")
    if len(wire) > 255:
        raise DnrError(f"{what}: ADN of {len(wire)} octets (at most 255)")
    labels: list[str] = []
    pos = 0
    while True:
        if pos >= len(wire):
            raise DnrError(f"{what}: ADN does not end with the root label")
        n = wire[pos]
        if n == 0:
            if pos + 1 != len(wire):
                raise DnrError(f"{what}: ADN has {len(wire) - pos - 1} octets after its end")
            break
        if n > 63:  # 0xc0..: a compression pointer, 0x40..: extended label types
            raise DnrError(f"{what}: ADN label length octet {n:#04x} (compressed or not a label)")
        label = wire[pos + 1 : pos + 1 + n]
        if len(label) != n or _LABEL.fullmatch(label) is None:
            raise DnrError(f"{what}: ADN label {label!r} is not a host name label")
        labels.append(label.decode("ascii").lower())
        pos += 1 + n
    if not labels:
        raise DnrError(f"{what}: the ADN is the root")
    return ".".join(labels)


def _addresses(raw: bytes, size: int, what: str) -> tuple[str, ...]:
    """The usable addresses of an Addr Length's worth; the others silently left out."""
    if not raw or len(raw) % size:
        raise DnrError(f"{what}: Addr Length {len(raw)} is not a non-zero multiple of {size}")
    out: list[str] = []
    for i in range(0, len(raw), size):
        chunk = raw[i : i + size]
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address
        if size == 4:
            addr = ipaddress.IPv4Address(chunk)
            if addr == ipaddress.IPv4Address("255.255.255.255"):
                continue
        else:
            addr = ipaddress.IPv6Address(chunk)
            if addr.ipv4_mapped is not None:
                continue
        if addr.is_multicast or addr.is_loopback or addr.is_unspecified:
            continue
        text = str(addr)
        if text not in out:
            out.append(text)
    return tuple(out)


@dataclass(frozen=True)
class _Params:
    alpn: tuple[str, ...] = ()
    port: int | None = None
    dohpath: str | None = None
    usable: bool = True  # False: "mandatory" names a key not understood here


def _alpn(value: bytes, what: str) -> tuple[str, ...]:
    if not value:
        raise DnrError(f"{what}: empty alpn")
    r = _Reader(value, f"{what}: alpn")
    out: list[str] = []
    while r.left:
        n = r.u8("alpn-id length")
        if n == 0:
            raise DnrError(f"{what}: empty alpn-id")
        out.append(r.take(n, "alpn-id").decode("latin-1"))
    return tuple(out)


def _svc_params(raw: bytes, what: str) -> _Params:
    """RFC 9460 section 2.2's SvcParams, as far as DNR uses them."""
    r = _Reader(raw, f"{what}: SvcParams")
    values: dict[int, bytes] = {}
    last = -1
    while r.left:
        key = r.u16("SvcParamKey")
        if key <= last:
            raise DnrError(f"{what}: SvcParamKey {key} after {last} (keys must ascend)")
        if key in (KEY_IPV4HINT, KEY_IPV6HINT, KEY_INVALID):
            raise DnrError(f"{what}: SvcParamKey {key} is not allowed in DNR")
        values[key] = r.take(r.u16("SvcParamValue length"), f"SvcParamValue of key {key}")
        last = key
    usable = True
    if KEY_MANDATORY in values:
        mandatory = values[KEY_MANDATORY]
        if not mandatory or len(mandatory) % 2:
            raise DnrError(f"{what}: mandatory of {len(mandatory)} octets")
        keys = [k for (k,) in _U16.iter_unpack(mandatory)]
        if any(b <= a for a, b in itertools.pairwise(keys)) or KEY_MANDATORY in keys:
            raise DnrError(f"{what}: mandatory keys {keys} out of order, repeated or 0")
        if any(k not in values for k in keys):
            raise DnrError(f"{what}: mandatory keys {keys} not all present")
        usable = all(k in UNDERSTOOD for k in keys)
    alpn = _alpn(values[KEY_ALPN], what) if KEY_ALPN in values else ()
    port = None
    if KEY_PORT in values:
        if len(values[KEY_PORT]) != 2:
            raise DnrError(f"{what}: port of {len(values[KEY_PORT])} octets")
        port = _U16.unpack(values[KEY_PORT])[0]
        if port == 0:
            raise DnrError(f"{what}: port 0")
    dohpath = None
    if KEY_DOHPATH in values:
        try:
            dohpath = values[KEY_DOHPATH].decode("utf-8")
        except UnicodeDecodeError:
            raise DnrError(f"{what}: dohpath is not UTF-8") from None
    return _Params(alpn, port, dohpath, usable)


def _instance(
    priority: int,
    adn: str,
    addresses: tuple[str, ...] | None,
    params: bytes,
    what: str,
    lifetime: int | None = None,
) -> DnrInstance | None:
    """None: dropped (no usable address left, or an unknown mandatory key)."""
    if addresses is None:  # ADN-only mode
        return DnrInstance(priority, adn, lifetime=lifetime)
    p = _svc_params(params, what)
    if not addresses or not p.usable:
        return None
    return DnrInstance(priority, adn, addresses, p.alpn, p.port, p.dohpath, lifetime)


def _check_size(data: bytes, what: str) -> None:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DnrError(f"{what}: not bytes")
    if not data:
        raise DnrError(f"{what}: empty")
    if len(data) > MAX_PAYLOAD:
        raise DnrError(f"{what}: {len(data)} octets, more than an option holds")


def parse_v4(payload: bytes) -> tuple[DnrInstance, ...]:
    """DHCPv4 option 162's payload (the concatenation, RFC 3396, when it was split)."""
    _check_size(payload, "DHCPv4 DNR")
    data = bytes(payload)
    out: list[DnrInstance] = []
    r = _Reader(data, "DHCPv4 DNR")
    n = 0
    while r.left:
        n += 1
        what = f"DHCPv4 DNR instance {n}"
        body = _Reader(r.take(r.u16("Instance Data Length"), "instance data"), what)
        priority = body.u16("Service Priority")
        adn = _adn(body.take(body.u8("ADN Length"), "ADN"), what)
        addresses = None
        if body.left:
            addresses = _addresses(body.take(body.u8("Addr Length"), "addresses"), 4, what)
        inst = _instance(priority, adn, addresses, body.rest(), what)
        if inst is not None:
            out.append(inst)
    return tuple(out)


def parse_v6(payload: bytes) -> tuple[DnrInstance, ...]:
    """DHCPv6 option 144's payload: one instance (a message may carry several options)."""
    _check_size(payload, "DHCPv6 DNR")
    what = "DHCPv6 DNR"
    r = _Reader(bytes(payload), what)
    priority = r.u16("Service Priority")
    adn = _adn(r.take(r.u16("ADN Length"), "ADN"), what)
    addresses = None
    if r.left:
        addresses = _addresses(r.take(r.u16("Addr Length"), "addresses"), 16, what)
    inst = _instance(priority, adn, addresses, r.rest(), what)
    return () if inst is None else (inst,)


def parse_ra(option: bytes) -> tuple[DnrInstance, ...]:
    """An RA's Encrypted DNS option, whole (from its Type octet to its last padding octet)."""
    _check_size(option, "RA DNR")
    what = "RA DNR"
    r = _Reader(bytes(option), what)
    kind, units = r.u8("Type"), r.u8("Length")
    if kind != RA_TYPE:
        raise DnrError(f"{what}: type {kind}, not {RA_TYPE}")
    if units * 8 != len(option):
        raise DnrError(f"{what}: Length {units} (x8 octets) for {len(option)} octets")
    priority = r.u16("Service Priority")
    lifetime = r.u32("Lifetime")
    adn = _adn(r.take(r.u16("ADN Length"), "ADN"), what)
    addresses, params = None, b""
    if r.left >= 8 or any(r.data[r.pos :]):  # else padding only: ADN-only mode
        addresses = _addresses(r.take(r.u16("Addr Length"), "addresses"), 16, what)
        params = r.take(r.u16("SvcParams Length"), "SvcParams")
        if r.left >= 8:
            raise DnrError(f"{what}: {r.left} octets after the SvcParams (padding is < 8)")
    inst = _instance(priority, adn, addresses, params, what, lifetime)
    return () if inst is None else (inst,)


# -- to resolvers --------------------------------------------------------------------------------


def resolvers(instances: Iterable[DnrInstance], source: Source) -> tuple[NetResolver, ...]:
    """The DoT resolvers among `instances`, best Service Priority first (lower is better;
    the option's order among equals), one per address: the first MAX_INSTANCES instances
    with "dot" in their ALPN list and an address (not withdrawn by an RA lifetime of 0),
    the first MAX_ADDRESSES addresses of each. An address (and port) named twice is kept
    where it comes first."""
    usable = [i for i in instances if i.addresses and "dot" in i.alpn and i.lifetime != 0]
    usable.sort(key=lambda i: i.priority)
    out: list[NetResolver] = []
    seen: set[tuple[str, int]] = set()
    for inst in usable[:MAX_INSTANCES]:
        port = inst.port or DOT_PORT
        for address in inst.addresses[:MAX_ADDRESSES]:
            if (address, port) in seen:
                continue
            seen.add((address, port))
            out.append(
                NetResolver(
                    address,
                    auth_name=inst.adn,
                    port=port,
                    tls=True,
                    source=source,
                    origin=Origin.DNR,
                    priority=inst.priority,
                )
            )
    return tuple(out)


# -- writing (tests, labs) -----------------------------------------------------------------------


def encode_adn(name: str) -> bytes:
    return b"".join(bytes([len(lb)]) + lb.encode("ascii") for lb in name.split(".") if lb) + b"\0"


def encode_svc_params(inst: DnrInstance) -> bytes:
    """alpn, port and dohpath, in key order."""
    out = b""
    if inst.alpn:
        ids = b"".join(bytes([len(a)]) + a.encode("latin-1") for a in inst.alpn)
        out += _U16.pack(KEY_ALPN) + _U16.pack(len(ids)) + ids
    if inst.port is not None:
        out += _U16.pack(KEY_PORT) + _U16.pack(2) + _U16.pack(inst.port)
    if inst.dohpath is not None:
        path = inst.dohpath.encode("utf-8")
        out += _U16.pack(KEY_DOHPATH) + _U16.pack(len(path)) + path
    return out


def _packed(addresses: Iterable[str]) -> bytes:
    return b"".join(ipaddress.ip_address(a).packed for a in addresses)


def encode_v4(instances: Iterable[DnrInstance]) -> bytes:
    """DHCPv4 option 162's payload; an instance without addresses in ADN-only mode."""
    out = b""
    for inst in instances:
        adn = encode_adn(inst.adn)
        body = _U16.pack(inst.priority) + bytes([len(adn)]) + adn
        if inst.addresses:
            addrs = _packed(inst.addresses)
            body += bytes([len(addrs)]) + addrs + encode_svc_params(inst)
        out += _U16.pack(len(body)) + body
    return out


def encode_v6(inst: DnrInstance) -> bytes:
    """DHCPv6 option 144's payload."""
    adn = encode_adn(inst.adn)
    out = _U16.pack(inst.priority) + _U16.pack(len(adn)) + adn
    if inst.addresses:
        addrs = _packed(inst.addresses)
        out += _U16.pack(len(addrs)) + addrs + encode_svc_params(inst)
    return out


def encode_ra(inst: DnrInstance) -> bytes:
    """The whole RA option, padded with zeros to a multiple of 8 octets."""
    adn = encode_adn(inst.adn)
    lifetime = INFINITY if inst.lifetime is None else inst.lifetime
    body = _U16.pack(inst.priority) + _U32.pack(lifetime) + _U16.pack(len(adn)) + adn
    if inst.addresses:
        addrs, params = _packed(inst.addresses), encode_svc_params(inst)
        body += _U16.pack(len(addrs)) + addrs + _U16.pack(len(params)) + params
    size = -(-(len(body) + 2) // 8) * 8
    return bytes([RA_TYPE, size // 8]) + body + bytes(size - len(body) - 2)
