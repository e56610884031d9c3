"""Properties of agent/tunnel/cache.py on random answers, clocks and operations.

Served TTLs never exceed what was stored, never grow with time, never go below zero, and
are exactly the stored ones less the whole seconds gone; every answer served parses; the
cache keeps its bounds and evicts the least recently used first (checked against a model);
any bytes given to put() (random, or good answers mutated) never raise.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.dns import packet
from agent.dns.packet import PacketError
from agent.tunnel.cache import ENTRY_OVERHEAD, Cache, CacheSettings
from tests.fuzz_corpus import mutated
from tests.unit.test_cache import NAME, ZONE, query, rrset, soa

FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow],
)

TTL = st.one_of(
    st.integers(1, 400), st.integers(0, 2**31 - 1), st.sampled_from([0, 1, 9, 10, 2**31 - 1])
)
RDATA = {"A": "192.0.2.{i}", "AAAA": "2001:db8::{i}", "TXT": '"t{i}"'}


@dataclass(frozen=True)
class Answer:
    rcode: dns.rcode.Rcode
    rrsets: tuple[tuple[str, str, int, int], ...]  # section, type, TTL, how many records
    soa: tuple[int, int] | None  # TTL, MINIMUM
    edns: bool
    do: bool


@st.composite
def answers(draw: st.DrawFn) -> Answer:
    kind = draw(st.sampled_from(["positive", "nxdomain", "nodata"]))
    rcode = dns.rcode.NXDOMAIN if kind == "nxdomain" else dns.rcode.NOERROR
    sections = ["an", "ns", "ar"] if kind == "positive" else ["ns", "ar"]
    sets = draw(
        st.lists(
            st.tuples(
                st.sampled_from(sections),
                st.sampled_from(list(RDATA)),
                TTL,
                st.integers(1, 3),
            ),
            max_size=5,
        )
    )
    if kind == "positive":
        sets.insert(0, ("an", "A", draw(TTL), draw(st.integers(1, 3))))
    has_soa = kind != "positive" and draw(st.integers(0, 5)) > 0  # sometimes none: uncached
    the_soa = (draw(TTL), draw(TTL)) if has_soa else None
    edns = draw(st.booleans())
    return Answer(rcode, tuple(sets), the_soa, edns, edns and draw(st.booleans()))


def build(a: Answer) -> tuple[bytes, packet.QueryInfo, bytes]:
    qwire, info = query(use_edns=0 if a.edns else False, want_dnssec=a.do, qid=1)
    r = dns.message.make_response(dns.message.from_wire(qwire))
    r.set_rcode(a.rcode)
    for n, (section, rtype, ttl, count) in enumerate(a.rrsets):
        owner = NAME if n == 0 and section == "an" else f"r{n}.{ZONE}"
        rs = rrset(owner, ttl, rtype, *(RDATA[rtype].format(i=i + 1) for i in range(count)))
        {"an": r.answer, "ns": r.authority, "ar": r.additional}[section].append(rs)
    if a.soa is not None:
        r.authority.append(soa(*a.soa))
    return qwire, info, r.to_wire()


SETTINGS = st.builds(
    CacheSettings,
    min_ttl=st.integers(0, 120),
    max_ttl=st.integers(1, 10**6),
    max_negative_ttl=st.integers(0, 5000),
    serve_stale=st.integers(0, 200),
    stale_ttl=st.integers(0, 60),
    prefetch=st.booleans(),
)
STEPS = st.lists(
    st.one_of(st.floats(0, 30, allow_nan=False), st.floats(0, 400, allow_nan=False)),
    min_size=1,
    max_size=8,
)


def served_ttls(wire: bytes, qid: int) -> tuple[dns.rcode.Rcode, list[int]]:
    m = dns.message.from_wire(wire)  # every answer served must parse
    assert m.id == qid and m.flags & dns.flags.QR and not m.flags & dns.flags.TC
    return m.rcode(), [rs.ttl for sec in (m.answer, m.authority, m.additional) for rs in sec]


@FUZZ
@given(answers(), SETTINGS, st.floats(0, 1e6, allow_nan=False), STEPS, st.booleans())
def test_served_ttls_count_down_and_stay_in_bounds(
    a: Answer, s: CacheSettings, t0: float, steps: list[float], private: bool
) -> None:
    c = Cache(s)
    qwire, info, wire = build(a)
    key = c.key(qwire, info, "")
    assert key is not None
    if not c.put(key, wire, t0, private=private):
        assert len(c) == 0 and c.stats.not_cacheable == 1
        if a.rcode != dns.rcode.NOERROR or not any(sec == "an" for sec, *_ in a.rrsets):
            return
        # a positive answer is refused only when its lifetime would be 0
        assert min(min(max(t, s.min_ttl), s.max_ttl) for _, _, t, _ in a.rrsets) == 0
        return
    hit = c.get(key, qwire, info, t0, cleartext_ok=True)
    assert hit is not None and not hit.prefetch
    rcode, stored = served_ttls(hit.wire, 1)
    assert rcode == a.rcode and stored
    lifetime = min(stored)
    assert lifetime > 0
    if a.soa is None:  # positive: every TTL clamped, the smallest is the lifetime
        assert all(min(s.min_ttl, s.max_ttl) <= t <= s.max_ttl for t in stored)
        assert lifetime == min(min(max(t, s.min_ttl), s.max_ttl) for _, _, t, _ in a.rrsets)
    else:
        assert max(stored) <= min(*a.soa, s.max_negative_ttl)
    prev = stored
    now = t0
    for qid, dt in enumerate(steps, start=2):
        now += dt
        qwire2, info2 = query(use_edns=0 if a.edns else False, want_dnssec=a.do, qid=qid)
        key2 = c.key(qwire2, info2, "")
        assert key2 == key
        got = c.get(key2, qwire2, info2, now, cleartext_ok=private)
        age = int(now - t0)
        if now - t0 >= lifetime:
            assert got is None
            old = c.stale(key2, qwire2, info2, now, cleartext_ok=True)
            if now - t0 - lifetime < s.serve_stale:
                assert old is not None
                assert served_ttls(old, qid) == (rcode, [s.stale_ttl] * len(stored))
            else:
                assert old is None and len(c) == 0
                return
            continue
        if not private:
            assert got is None
            got = c.get(key2, qwire2, info2, now, cleartext_ok=True)
        assert got is not None
        rc, ttls = served_ttls(got.wire, qid)
        assert rc == rcode and len(ttls) == len(stored)
        assert ttls == [max(0, t - age) for t in stored]
        assert all(0 <= t <= p <= st_ for t, p, st_ in zip(ttls, prev, stored, strict=True))
        assert min(ttls) >= 1  # fresh: the smallest TTL has not run out
        prev = ttls


# -- bounds and LRU order, against a model ---------------------------------------------------

NAMES = [f"n{i}.{ZONE}" for i in range(4)]
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 3), st.integers(1, 1000), st.integers(0, 255)),
        st.tuples(st.just("put"), st.integers(0, 3), st.integers(1, 1000), st.integers(0, 255)),
        st.tuples(st.just("get"), st.integers(0, 3), st.just(0), st.just(0)),
        st.tuples(st.just("tick"), st.integers(0, 40), st.just(0), st.just(0)),
    ),
    min_size=10,
    max_size=40,
)
MAX_BYTES = st.one_of(st.sampled_from([1200, 2000, 1 << 20]), st.integers(0, 3000))


@FUZZ
@given(st.integers(1, 5), MAX_BYTES, OPS)
def test_bounds_and_lru_order_match_a_model(
    max_entries: int, max_bytes: int, ops: list[tuple[str, int, int, int]]
) -> None:
    c = Cache(CacheSettings(max_entries=max_entries, max_bytes=max_bytes, prefetch=False))
    model: OrderedDict[bytes, tuple[int, float, int]] = OrderedDict()  # size, stored, ttl
    now = 0.0
    for op, i, ttl, txt in ops:
        if op == "tick":
            now += i
            continue
        qwire, info = query(NAMES[i], "TXT", qid=i)
        key = c.key(qwire, info, "")
        assert key is not None
        if op == "put":
            r = dns.message.make_response(dns.message.from_wire(qwire))
            r.answer.append(rrset(NAMES[i], ttl, "TXT", f'"{"x" * txt}"'))
            wire = r.to_wire()
            size = len(wire) + len(key) + ENTRY_OVERHEAD
            stored = c.put(key, wire, now, private=True)
            assert stored == (size <= max_bytes)
            if stored:
                model.pop(key, None)
                model[key] = (size, now, ttl)
                while len(model) > max_entries or sum(v[0] for v in model.values()) > max_bytes:
                    model.popitem(last=False)
        else:
            hit = c.get(key, qwire, info, now, cleartext_ok=True)
            entry = model.get(key)
            fresh = entry is not None and now - entry[1] < entry[2]
            assert (hit is not None) == fresh
            if fresh:
                model.move_to_end(key)
            elif entry is not None:
                del model[key]  # expired, no stale window: gone
        assert len(c) == len(model) <= max_entries
        assert c.bytes_used == sum(v[0] for v in model.values()) <= max_bytes
    assert c.flush() == len(model)
    assert len(c) == 0 and c.bytes_used == 0


# -- hostile bytes ---------------------------------------------------------------------------


def _seeds() -> list[bytes]:
    qwire, _ = query(use_edns=0, want_dnssec=True)
    r = dns.message.make_response(dns.message.from_wire(qwire))
    r.answer.append(rrset(NAME, 300))
    r.additional.append(rrset(f"ns.{ZONE}", 600, "AAAA", "2001:db8::1"))
    nx = dns.message.make_response(dns.message.from_wire(qwire))
    nx.set_rcode(dns.rcode.NXDOMAIN)
    nx.authority.append(soa(900, 300))
    return [r.to_wire(), nx.to_wire()]


SEEDS = _seeds()
HOSTILE = st.one_of(
    st.binary(max_size=300), mutated(st.sampled_from(SEEDS)), mutated(st.sampled_from(SEEDS))
)


@FUZZ
@given(HOSTILE, st.integers(0, 500))
def test_put_never_raises_on_hostile_bytes(wire: bytes, later: int) -> None:
    c = Cache(CacheSettings(serve_stale=1000))
    qwire, info = query(use_edns=0, want_dnssec=True, qid=77)
    key = c.key(qwire, info, "")
    assert key is not None
    stored = c.put(key, wire, 0.0, private=True)
    assert len(c) == int(stored) and c.stats.not_cacheable == int(not stored)
    if not stored:
        return
    assert wire[2] & 0x80 and not wire[2] & 0x02  # QR set, TC clear
    hit = c.get(key, qwire, info, float(later), cleartext_ok=True)
    if hit is None:
        got = c.stale(key, qwire, info, float(later), cleartext_ok=True)
        assert got is not None
    else:
        got = hit.wire
    # as long (or without the upstream's padding), the client's ID and question; the rest of
    # the header as stored
    assert len(got) <= len(wire) and got[:2] == qwire[:2]
    assert got[2:12] == wire[2:12]
    assert got[12 : info.question_end] == qwire[12 : info.question_end]


QUERY_SEEDS = [
    query(use_edns=0, want_dnssec=True)[0],
    query(use_edns=False)[0],
    query("Mixed.Case.example.", "AAAA", use_edns=0, pad=128)[0],
]


@FUZZ
@given(st.one_of(st.binary(max_size=120), mutated(st.sampled_from(QUERY_SEEDS))))
def test_key_never_raises_on_what_parse_query_accepts(wire: bytes) -> None:
    try:
        info = packet.parse_query(wire)
    except PacketError:
        return
    c = Cache(CacheSettings())
    key = c.key(wire, info, "scope")
    if key is None:
        return
    # a key holds the question with its name lower-cased, and ends with the scope
    qe = info.question_end
    assert key[1 : qe - 11] == wire[12 : qe - 4].lower() + wire[qe - 4 : qe]
    assert key.endswith(b"scope") and len(key) == 1 + qe - 12 + len(b"scope")
