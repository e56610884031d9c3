"""agent/tunnel/cache.py: answers built with dnspython, cached and served on bytes, with a
fake clock; what is served is read back with dnspython."""

from __future__ import annotations

import struct
from typing import Any, cast

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsigkeyring
import pytest

from agent.dns import packet
from agent.dns.packet import QueryInfo
from agent.tunnel.cache import ENTRY_OVERHEAD, Cache, CacheSettings

NAME = "www.example.test."
ZONE = "example.test."


def stored(c: Cache, key: bytes, wire: bytes, now: float, *, private: bool) -> bool:
    """Whether the cache keeps the answer (put's word for it, and the entry there)."""
    kept = c.put(key, wire, now, private=private)
    assert kept == (key in c._entries)
    return kept


def query(name: str = NAME, rdtype: str = "A", qid: int = 1, **kw: Any) -> tuple[bytes, QueryInfo]:
    m = dns.message.make_query(name, rdtype, **kw)
    m.id = qid
    wire = m.to_wire()
    return wire, packet.parse_query(wire)


def rrset(name: str, ttl: int, rdtype: str = "A", *rdatas: str) -> dns.rrset.RRset:
    return dns.rrset.from_text(name, ttl, "IN", rdtype, *(rdatas or ("192.0.2.1",)))


def soa(ttl: int, minimum: int, zone: str = ZONE) -> dns.rrset.RRset:
    return rrset(zone, ttl, "SOA", f"ns.{zone} host.{zone} 1 7200 900 1209600 {minimum}")


def response(
    qwire: bytes,
    answer: list[dns.rrset.RRset] | None = None,
    authority: list[dns.rrset.RRset] | None = None,
    additional: list[dns.rrset.RRset] | None = None,
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
    flags: int = 0,
) -> bytes:
    r = dns.message.make_response(dns.message.from_wire(qwire))
    r.set_rcode(rcode)
    r.flags |= flags
    r.answer.extend(answer or [])
    r.authority.extend(authority or [])
    r.additional.extend(additional or [])
    return r.to_wire()


def a_answer(qwire: bytes, ttl: int = 300, name: str = NAME) -> bytes:
    return response(qwire, [rrset(name, ttl)])


def parsed(wire: bytes) -> dns.message.Message:
    return dns.message.from_wire(wire)


def ttls(wire: bytes) -> dict[tuple[str, str, str], int]:
    """(section, owner, type) -> TTL of the served answer, read by dnspython."""
    m = parsed(wire)
    out = {}
    for section, rrsets in (("an", m.answer), ("ns", m.authority), ("ar", m.additional)):
        for rr in rrsets:
            out[(section, rr.name.to_text().lower(), dns.rdatatype.to_text(rr.rdtype))] = rr.ttl
    return out


def cached(settings: CacheSettings | None = None) -> Cache:
    return Cache(settings or CacheSettings())


def put(c: Cache, wire: bytes, now: float = 0.0, *, private: bool = True, **kw: Any) -> bytes:
    """Query `kw`'s question, store `wire` (built from that query) for it; its key."""
    qwire, info = query(**kw)
    key = c.key(qwire, info, "")
    assert key is not None
    assert stored(c, key, wire, now, private=private)
    return key


def get(c: Cache, now: float, qid: int = 7, cleartext_ok: bool = True, **kw: Any) -> bytes | None:
    qwire, info = query(qid=qid, **kw)
    key = c.key(qwire, info, "")
    assert key is not None
    hit = c.get(key, qwire, info, now, cleartext_ok=cleartext_ok)
    return None if hit is None else hit.wire


# -- positive answers ------------------------------------------------------------------------


def test_ttls_count_down_with_the_clock_and_expire() -> None:
    c = cached()
    qwire, _ = query()
    wire = response(
        qwire,
        [rrset(NAME, 600, "CNAME", "web.example.test."), rrset("web.example.test.", 300)],
        additional=[rrset("ns.example.test.", 1000)],
    )
    put(c, wire, now=100.0)
    assert ttls(get(c, 100.0) or b"") == {
        ("an", NAME, "CNAME"): 600,
        ("an", "web.example.test.", "A"): 300,
        ("ar", "ns.example.test.", "A"): 1000,
    }
    assert ttls(get(c, 150.7) or b"") == {
        ("an", NAME, "CNAME"): 550,
        ("an", "web.example.test.", "A"): 250,
        ("ar", "ns.example.test.", "A"): 950,
    }
    assert ttls(get(c, 399.9) or b"")[("an", "web.example.test.", "A")] == 1
    assert c.stats.hits == 3
    assert get(c, 400.0) is None  # the smallest TTL is the entry's lifetime
    assert len(c) == 0 and c.bytes_used == 0
    assert c.stats.expired == 1 and c.stats.misses == 1


def test_min_and_max_ttl_clamp_positive_answers() -> None:
    c = cached(CacheSettings(min_ttl=60, max_ttl=3600))
    qwire, _ = query()
    wire = response(qwire, [rrset(NAME, 5)], additional=[rrset("ns.example.test.", 100000)])
    put(c, wire, now=0.0)
    assert ttls(get(c, 0.0) or b"") == {
        ("an", NAME, "A"): 60,
        ("ar", "ns.example.test.", "A"): 3600,
    }
    assert get(c, 59.5) is not None
    assert get(c, 60.0) is None


@pytest.mark.parametrize("ttl", [0, 0x80000000, 0xFFFFFFFF])
def test_a_zero_ttl_is_not_cached(ttl: int) -> None:
    """RFC 2181 8: a TTL with the top bit set reads as zero."""
    c = cached()
    qwire, info = query()
    wire = bytearray(a_answer(qwire, 300))
    struct.pack_into("!I", wire, len(wire) - 10, ttl)  # the A record's TTL
    key = c.key(qwire, info, "")
    assert key is not None
    assert not stored(c, key, bytes(wire), 0.0, private=True)
    assert c.stats.not_cacheable == 1 and len(c) == 0


def test_min_ttl_rescues_a_zero_ttl() -> None:
    c = cached(CacheSettings(min_ttl=10))
    qwire, _ = query()
    put(c, a_answer(qwire, 0))
    assert ttls(get(c, 3.0) or b"") == {("an", NAME, "A"): 7}


# -- negative answers (RFC 2308) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("soa_ttl", "minimum", "cap", "lifetime"),
    [(900, 300, 3600, 300), (120, 300, 3600, 120), (900, 600, 60, 60), (86400, 86400, 3600, 3600)],
)
@pytest.mark.parametrize("rcode", [dns.rcode.NXDOMAIN, dns.rcode.NOERROR])
def test_negative_answers_live_min_of_soa_ttl_and_minimum(
    rcode: dns.rcode.Rcode, soa_ttl: int, minimum: int, cap: int, lifetime: int
) -> None:
    c = cached(CacheSettings(max_negative_ttl=cap, min_ttl=5000))  # min_ttl: positive only
    qwire, _ = query()
    put(c, response(qwire, authority=[soa(soa_ttl, minimum)], rcode=rcode), now=10.0)
    served = get(c, 10.0)
    assert served is not None
    assert parsed(served).rcode() == rcode and not parsed(served).answer
    assert ttls(served) == {("ns", ZONE, "SOA"): lifetime}
    assert ttls(get(c, 10.0 + lifetime - 0.5) or b"") == {("ns", ZONE, "SOA"): 1}
    assert get(c, 10.0 + lifetime) is None


def test_nxdomain_with_a_cname_caps_every_ttl_at_the_negative_lifetime() -> None:
    c = cached()
    qwire, _ = query()
    wire = response(
        qwire,
        [rrset(NAME, 3000, "CNAME", "gone.example.test.")],
        [soa(900, 200)],
        rcode=dns.rcode.NXDOMAIN,
    )
    put(c, wire)
    assert ttls(get(c, 0.0) or b"") == {("an", NAME, "CNAME"): 200, ("ns", ZONE, "SOA"): 200}


@pytest.mark.parametrize("rcode", [dns.rcode.NXDOMAIN, dns.rcode.NOERROR])
def test_negative_answer_without_soa_is_not_cached(rcode: dns.rcode.Rcode) -> None:
    c = cached()
    qwire, info = query()
    key = c.key(qwire, info, "")
    assert key is not None
    ns = rrset(ZONE, 300, "NS", "ns.example.test.")
    assert not stored(c, key, response(qwire, authority=[ns], rcode=rcode), 0.0, private=True)
    assert c.stats.not_cacheable == 1 and len(c) == 0


# -- what is never cached --------------------------------------------------------------------


def _signed_response(qwire: bytes) -> bytes:
    ring = dns.tsigkeyring.from_text({"k.": "c2VjcmV0c2VjcmV0"})
    q = dns.message.make_query(NAME, "A")
    q.use_tsig(ring, keyname="k.")
    r = dns.message.make_response(dns.message.from_wire(q.to_wire(), keyring=ring))
    r.answer.append(rrset(NAME, 300))
    r.id = qwire[0] << 8 | qwire[1]
    return r.to_wire()


def _badvers(qwire: bytes) -> bytes:
    r = dns.message.make_response(dns.message.from_wire(qwire))
    r.set_rcode(dns.rcode.BADVERS)
    r.answer.append(rrset(NAME, 300))
    return r.to_wire()


def _flipped(wire: bytes, mask: int) -> bytes:
    return wire[:2] + struct.pack("!H", struct.unpack_from("!H", wire, 2)[0] ^ mask) + wire[4:]


NOT_CACHED = {
    "servfail": lambda q: response(q, rcode=dns.rcode.SERVFAIL),
    "refused": lambda q: response(q, [rrset(NAME, 300)], rcode=dns.rcode.REFUSED),
    "formerr": lambda q: response(q, rcode=dns.rcode.FORMERR),
    "truncated": lambda q: response(q, [rrset(NAME, 300)], flags=dns.flags.TC),
    "qr clear": lambda q: _flipped(a_answer(q), packet.QR),
    "opcode notify": lambda q: _flipped(a_answer(q), 4 << 11),
    "another question": lambda q: a_answer(query("other.example.test.")[0]),
    "another type": lambda q: a_answer(query(rdtype="AAAA")[0]),
    "trailing bytes": lambda q: a_answer(q) + b"\x00",
    "cut short": lambda q: a_answer(q)[:-1],
    "header only": lambda q: a_answer(q)[:12],
    "empty": lambda q: b"",
    "tsig": _signed_response,
    "badvers": _badvers,
}


@pytest.mark.parametrize("make", NOT_CACHED.values(), ids=NOT_CACHED.keys())
def test_not_cached(make: Any) -> None:
    c = cached()
    qwire, info = query(use_edns=0)
    key = c.key(qwire, info, "")
    assert key is not None
    assert not stored(c, key, make(qwire), 0.0, private=True)
    assert len(c) == 0 and c.bytes_used == 0
    assert c.stats.not_cacheable == 1 and len(c) == 0
    assert c.get(key, qwire, info, 0.0, cleartext_ok=True) is None


def test_a_good_answer_to_that_query_is_cached() -> None:
    """The controls for test_not_cached: its query and a good answer are cacheable."""
    c = cached()
    qwire, info = query(use_edns=0)
    key = c.key(qwire, info, "")
    assert key is not None
    assert stored(c, key, a_answer(qwire), 0.0, private=True)
    assert c.get(key, qwire, info, 0.0, cleartext_ok=True) is not None


# -- what the client gets --------------------------------------------------------------------


def test_served_answer_has_the_clients_id_and_question_case() -> None:
    c = cached()
    put(c, a_answer(query(qid=1)[0]), name="www.example.test.")
    qwire, info = query("WwW.ExAmPlE.tEsT.", qid=4242)
    key = c.key(qwire, info, "")
    assert key is not None
    hit = c.get(key, qwire, info, 2.0, cleartext_ok=True)
    assert hit is not None and not hit.prefetch
    assert hit.wire[:2] == qwire[:2] == struct.pack("!H", 4242)
    assert hit.wire[12 : info.question_end] == qwire[12 : info.question_end]
    m = parsed(hit.wire)
    assert m.id == 4242 and m.question[0].name.to_text() == "WwW.ExAmPlE.tEsT."
    assert m.answer[0].ttl == 298 and m.answer[0][0].to_text() == "192.0.2.1"
    assert m.flags & dns.flags.QR and m.flags & dns.flags.RD


def test_opt_ttl_is_not_rewritten() -> None:
    """The OPT record's TTL holds extended RCODE, version, DO and Z: never a TTL."""
    c = cached()
    qwire, info = query(use_edns=0, want_dnssec=True)
    r = dns.message.make_response(dns.message.from_wire(qwire))
    r.use_edns(0, dns.flags.DO | 0x0001, 1232)  # DO and a Z bit
    r.answer.append(rrset(NAME, 300))
    wire = r.to_wire()
    opt_ttl_at = len(wire) - 11 + 5  # the OPT record (11 bytes, no options) is last
    assert wire[opt_ttl_at : opt_ttl_at + 4] == b"\x00\x00\x80\x01"
    key = c.key(qwire, info, "")
    assert key is not None and c.put(key, wire, 0.0, private=True)
    for now in (0.0, 100.0):
        hit = c.get(key, qwire, info, now, cleartext_ok=True)
        assert hit is not None
        assert hit.wire[opt_ttl_at : opt_ttl_at + 4] == b"\x00\x00\x80\x01"
        m = parsed(hit.wire)
        assert m.ednsflags & dns.flags.DO and m.edns == 0 and m.rcode() == dns.rcode.NOERROR
    stale = Cache(CacheSettings(serve_stale=60))
    stale.put(key, wire, 0.0, private=True)
    old = stale.stale(key, qwire, info, 301.0, cleartext_ok=True)
    assert old is not None and old[opt_ttl_at : opt_ttl_at + 4] == b"\x00\x00\x80\x01"


# -- keys ------------------------------------------------------------------------------------


def _key(c: Cache, scope: str = "", **kw: Any) -> bytes | None:
    qwire, info = query(**kw)
    return c.key(qwire, info, scope)


def test_flags_that_change_an_answer_change_the_key() -> None:
    c = cached()
    variants: dict[str, dict[str, Any]] = {
        "plain": {"use_edns": 0},
        "no edns": {"use_edns": False},
        "do": {"use_edns": 0, "want_dnssec": True},
        "no rd": {"use_edns": 0, "flags": 0},
        "cd": {"use_edns": 0, "flags": dns.flags.RD | dns.flags.CD},
        "ad": {"use_edns": 0, "flags": dns.flags.RD | dns.flags.AD},
        "AAAA": {"use_edns": 0, "rdtype": "AAAA"},
        "other name": {"use_edns": 0, "name": "ftp.example.test."},
    }
    keys = {name: _key(c, **kw) for name, kw in variants.items()}
    assert None not in keys.values()
    assert len(set(keys.values())) == len(keys), keys


def test_what_does_not_change_an_answer_does_not_change_the_key() -> None:
    c = cached()
    base = _key(c, use_edns=0)
    assert base is not None
    assert _key(c, use_edns=0, qid=999) == base
    assert _key(c, use_edns=0, payload=4096) == base
    assert _key(c, use_edns=0, pad=128) == base
    assert _key(c, use_edns=0, options=[dns.edns.GenericOption(cast(Any, 65001), b"x")]) == base
    assert _key(c, use_edns=0, name="WWW.Example.TEST.") == base


def test_type_bytes_are_not_lower_cased() -> None:
    """HTTPS is type 65, 'A': lower-casing the whole question would make it 97, 'a'."""
    c = cached()
    assert _key(c, rdtype="HTTPS") != _key(c, rdtype="TYPE97")


def test_scope_separates() -> None:
    c = cached()
    keys = {_key(c, ""), _key(c, "example.test"), _key(c, "test"), _key(c, "corp.example")}
    assert len(keys) == 4
    qwire, info = query()
    k_lan, k_none = c.key(qwire, info, "lan"), c.key(qwire, info, "")
    assert k_lan is not None and k_none is not None
    assert stored(c, k_lan, a_answer(qwire), 0.0, private=True)
    assert c.get(k_none, qwire, info, 0.0, cleartext_ok=True) is None
    assert c.get(k_lan, qwire, info, 0.0, cleartext_ok=True) is not None


def test_uncacheable_queries_have_no_key() -> None:
    c = cached()
    m = dns.message.make_query(NAME, "A")
    m.use_tsig(dns.tsigkeyring.from_text({"k.": "c2VjcmV0c2VjcmV0"}), keyname="k.")
    signed = m.to_wire()
    ch = dns.message.make_query("version.bind.", "TXT", rdclass=dns.rdataclass.CH).to_wire()
    with_answer = dns.message.make_query(NAME, "A")
    with_answer.answer.append(rrset(NAME, 300))
    hdr = struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0)
    # the name ends with a pointer to the header's first bytes: accepted by parse_query
    pointer = hdr + b"\x03www\xc0\x00" + b"\x00\x01\x00\x01"
    axfr = dns.message.make_query(ZONE, "AXFR").to_wire()
    v1 = dns.message.make_query(NAME, "A")
    v1.use_edns(1)
    badvers = v1.to_wire()
    assert badvers[-5] == 1  # EDNS version 1: the upstream answers BADVERS
    for wire in (signed, ch, with_answer.to_wire(), pointer, axfr, badvers):
        info = packet.parse_query(wire)
        assert c.key(wire, info, "") is None, wire
    ok = hdr + b"\x03www\x00\x00\x01\x00\x01"  # the control: the same, uncompressed
    assert c.key(ok, packet.parse_query(ok), "") is not None


COOKIE = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"\x01" * 8)
ECS = dns.edns.ECSOption("198.51.100.0", 24)


@pytest.mark.parametrize("option", [COOKIE, ECS], ids=["cookie", "ecs"])
def test_one_clients_answers_are_not_cached(option: dns.edns.Option) -> None:
    """A cookie answer holds the client's cookie (another client would discard it, RFC 7873
    5.3); a client subnet answer is tailored to that subnet (RFC 7871 7.3.1)."""
    c = cached()
    assert _key(c, use_edns=0, options=[option]) is None
    assert (
        _key(c, use_edns=0, options=[dns.edns.GenericOption(cast(Any, 65001), b""), option]) is None
    )
    qwire, info = query(use_edns=0)
    key = c.key(qwire, info, "")
    assert key is not None
    r = dns.message.make_response(dns.message.from_wire(qwire))
    r.use_edns(0, 0, 1232, options=[option])
    r.answer.append(rrset(NAME, 300))
    assert not stored(c, key, r.to_wire(), 0.0, private=True)
    r.use_edns(0, 0, 1232, options=[dns.edns.GenericOption(cast(Any, 65001), b"x")])
    assert stored(c, key, r.to_wire(), 0.0, private=True)  # the control


# -- privacy ---------------------------------------------------------------------------------


def test_cleartext_answers_are_served_only_where_cleartext_is_allowed() -> None:
    c = cached()
    qwire, _ = query()
    put(c, a_answer(qwire), private=False)
    put(
        c,
        a_answer(query("tls.example.test.")[0], name="tls.example.test."),
        name="tls.example.test.",
    )
    assert get(c, 1.0, cleartext_ok=False) is None
    assert c.stats.misses == 1
    assert get(c, 1.0, cleartext_ok=True) is not None
    assert get(c, 1.0, cleartext_ok=False, name="tls.example.test.") is not None
    before = c.bytes_used
    assert c.drop_cleartext() == 1
    assert len(c) == 1 and c.bytes_used < before
    assert get(c, 1.0, cleartext_ok=True) is None
    assert get(c, 1.0, cleartext_ok=False, name="tls.example.test.") is not None
    assert c.drop_cleartext() == 0


def test_a_private_answer_replaces_a_cleartext_one() -> None:
    c = cached()
    qwire, _ = query()
    put(c, a_answer(qwire, 100), private=False)
    put(c, a_answer(qwire, 200), private=True)
    assert len(c) == 1
    assert ttls(get(c, 0.0, cleartext_ok=False) or b"")[("an", NAME, "A")] == 200


def test_flush() -> None:
    c = cached()
    for i in range(5):
        name = f"h{i}.example.test."
        put(c, a_answer(query(name)[0], name=name), name=name)
    assert len(c) == 5 and c.bytes_used > 0
    assert c.flush() == 5
    assert len(c) == 0 and c.bytes_used == 0 and c.stats.flushes == 1
    assert get(c, 0.0, name="h0.example.test.") is None
    assert c.flush() == 0 and c.stats.flushes == 2


# -- bounds ----------------------------------------------------------------------------------


def _put_name(c: Cache, name: str, now: float = 0.0, ttl: int = 300) -> bytes:
    return put(c, a_answer(query(name)[0], ttl, name=name), now, name=name)


def test_lru_eviction_by_entries() -> None:
    c = cached(CacheSettings(max_entries=3))
    for n in "abc":
        _put_name(c, f"{n}.test.")
    assert get(c, 1.0, name="a.test.") is not None  # a is now the most recent
    _put_name(c, "d.test.")
    assert len(c) == 3 and c.stats.evictions == 1
    assert get(c, 1.0, name="b.test.") is None
    for n in "acd":
        assert get(c, 1.0, name=f"{n}.test.") is not None


def test_lru_eviction_by_bytes() -> None:
    probe = cached()
    _put_name(probe, "a.test.")
    one = probe.bytes_used
    c = cached(CacheSettings(max_bytes=2 * one + one // 2))
    for n in "abc":
        _put_name(c, f"{n}.test.")
        assert c.bytes_used <= c.settings.max_bytes
    assert len(c) == 2 and c.stats.evictions == 1 and c.bytes_used == 2 * one
    assert get(c, 1.0, name="a.test.") is None
    assert get(c, 1.0, name="b.test.") is not None


def test_an_entry_larger_than_max_bytes_is_not_stored() -> None:
    c = cached(CacheSettings(max_bytes=ENTRY_OVERHEAD + 50))
    qwire, info = query()
    key = c.key(qwire, info, "")
    assert key is not None
    assert not stored(c, key, a_answer(qwire), 0.0, private=True)
    assert len(c) == 0 and c.bytes_used == 0 and c.stats.evictions == 0


def test_put_of_the_same_key_replaces() -> None:
    c = cached()
    _put_name(c, "a.test.", ttl=100)
    used = c.bytes_used
    _put_name(c, "a.test.", now=50.0, ttl=100)
    assert len(c) == 1 and c.bytes_used == used and c.stats.inserts == 2
    assert ttls(get(c, 120.0, name="a.test.") or b"") == {("an", "a.test.", "A"): 30}


def test_to_json() -> None:
    c = cached()
    _put_name(c, "a.test.")
    get(c, 1.0, name="a.test.")
    get(c, 1.0, name="b.test.")
    out = c.to_json()
    assert out["entries"] == 1 and out["bytes"] == c.bytes_used > 0
    assert out["hits"] == 1 and out["misses"] == 1 and out["inserts"] == 1
    assert set(out) >= {"stale_served", "prefetches", "evictions", "expired", "flushes"}


# -- serve stale (RFC 8767) ------------------------------------------------------------------


def test_serve_stale_window_and_ttl() -> None:
    c = cached(CacheSettings(serve_stale=100, stale_ttl=30))
    qwire, info = query()
    wire = response(qwire, [rrset(NAME, 60)], additional=[rrset("ns.example.test.", 500)])
    key = put(c, wire, now=0.0)
    assert c.stale(key, qwire, info, 30.0, cleartext_ok=True) is not None  # fresh: as get
    assert c.stats.stale_served == 0
    assert get(c, 70.0) is None and len(c) == 1  # expired: a miss, kept for stale
    old = c.stale(key, qwire, info, 70.0, cleartext_ok=True)
    assert old is not None and c.stats.stale_served == 1
    assert ttls(old) == {("an", NAME, "A"): 30, ("ar", "ns.example.test.", "A"): 30}
    assert old[:2] == qwire[:2]
    assert c.stale(key, qwire, info, 159.0, cleartext_ok=True) is not None
    assert c.stale(key, qwire, info, 160.0, cleartext_ok=True) is None
    assert len(c) == 0 and c.stats.expired == 1


def test_serve_stale_respects_cleartext() -> None:
    c = cached(CacheSettings(serve_stale=100))
    qwire, info = query()
    key = put(c, a_answer(qwire, 60), private=False)
    assert c.stale(key, qwire, info, 70.0, cleartext_ok=False) is None
    assert c.stale(key, qwire, info, 70.0, cleartext_ok=True) is not None


def test_serve_stale_off() -> None:
    c = cached(CacheSettings(serve_stale=0))
    qwire, info = query()
    key = put(c, a_answer(qwire, 60))
    assert c.stale(key, qwire, info, 61.0, cleartext_ok=True) is None
    assert len(c) == 0


def test_expired_entry_removed_after_the_stale_window_by_get() -> None:
    c = cached(CacheSettings(serve_stale=10))
    put(c, a_answer(query()[0], 60))
    assert get(c, 65.0) is None and len(c) == 1
    assert get(c, 70.0) is None and len(c) == 0 and c.stats.expired == 1


# -- prefetch --------------------------------------------------------------------------------


def _hit(c: Cache, now: float) -> tuple[bool, bool]:
    qwire, info = query()
    key = c.key(qwire, info, "")
    assert key is not None
    hit = c.get(key, qwire, info, now, cleartext_ok=True)
    return hit is not None, bool(hit and hit.prefetch)


def test_prefetch_once_for_a_popular_entry_near_expiry() -> None:
    c = cached()
    put(c, a_answer(query()[0], 100))
    assert _hit(c, 1.0) == (True, False)
    assert _hit(c, 89.0) == (True, False)  # 11 % left
    assert _hit(c, 91.0) == (True, True)
    assert _hit(c, 92.0) == (True, False)  # once
    assert c.stats.prefetches == 1
    put(c, a_answer(query()[0], 100), now=95.0)  # the refreshed answer: a new entry
    assert _hit(c, 96.0) == (True, False)
    assert _hit(c, 191.0) == (True, True)
    assert c.stats.prefetches == 2


def test_no_prefetch_for_one_hit_short_lifetimes_or_when_off() -> None:
    c = cached()
    put(c, a_answer(query()[0], 100))
    assert _hit(c, 95.0) == (True, False)  # the first hit: not popular yet
    short = cached()
    put(short, a_answer(query()[0], 9))
    assert [_hit(short, t) for t in (1.0, 8.5, 8.9)] == [(True, False)] * 3
    off = cached(CacheSettings(prefetch=False))
    put(off, a_answer(query()[0], 100))
    assert [_hit(off, t) for t in (1.0, 95.0, 96.0)] == [(True, False)] * 3
    assert c.stats.prefetches == short.stats.prefetches == off.stats.prefetches == 0


def test_a_query_with_another_question_length_is_a_miss() -> None:
    """get() trusts its key, except for the one thing that would break the answer."""
    c = cached()
    key = put(c, a_answer(query()[0]))
    qwire, info = query("other.example.test.")
    assert c.get(key, qwire, info, 0.0, cleartext_ok=True) is None
    assert c.stale(key, qwire, info, 0.0, cleartext_ok=True) is None


def test_edns_less_answer_served_to_edns_less_query() -> None:
    c = cached()
    qwire, info = query(use_edns=False)
    key = c.key(qwire, info, "")
    assert key is not None
    assert stored(c, key, a_answer(qwire), 0.0, private=True)
    hit = c.get(key, qwire, info, 1.0, cleartext_ok=True)
    assert hit is not None and parsed(hit.wire).edns == -1
    eqwire, einfo = query(use_edns=0)
    ekey = c.key(eqwire, einfo, "")
    assert ekey is not None and c.get(ekey, eqwire, einfo, 1.0, cleartext_ok=True) is None


def test_name_in_the_key_is_the_wire_name() -> None:
    """dns.name sanity: the key holds the question's wire bytes after one flag byte."""
    c = cached()
    k = _key(c, use_edns=False, flags=0)
    name = dns.name.from_text(NAME).to_wire()
    assert name is not None and k == b"\x00" + name + b"\x00\x01\x00\x01"


def test_the_upstreams_padding_is_not_kept() -> None:
    """A resolver pads its answers to a padded query (RFC 8467: 468-byte blocks): the cache
    keeps the answer without the Padding option (the rest of its OPT record as it was)."""
    c = Cache(CacheSettings())
    qwire, info = query(use_edns=0, want_dnssec=True)
    key = c.key(qwire, info, "")
    assert key is not None
    r = dns.message.from_wire(a_answer(qwire, 300))
    nsid = dns.edns.GenericOption(dns.edns.OptionType.NSID, b"ns1")
    padding = dns.edns.GenericOption(dns.edns.OptionType.PADDING, bytes(380))
    r.use_edns(0, ednsflags=dns.flags.DO, options=[nsid, padding])
    wire = r.to_wire()
    assert stored(c, key, wire, 0.0, private=True)
    hit = c.get(key, qwire, info, 1.0, cleartext_ok=True)
    assert hit is not None and len(hit.wire) == len(wire) - 384
    m = dns.message.from_wire(hit.wire)
    assert [o.otype for o in m.options] == [dns.edns.OptionType.NSID]
    assert m.ednsflags & dns.flags.DO and m.answer[0].ttl == 299
    assert c.bytes_used == len(hit.wire) + len(key) + ENTRY_OVERHEAD
