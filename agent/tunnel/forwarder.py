"""The tunnel: client queries in, routed over the upstream order it was handed, answers back.

Owns the per-query life cycle (limits, deadlines, exactly one answer per query) and
the failover along the order it was handed. It decides nothing about privacy: the
order (policy.py's) says which upstreams are private and which, if any, are
cleartext; the cleartext ones are used only when no private one is usable, and an
order without any never sends a query in cleartext. It implements its upstreams'
`UpstreamEvents` and reports what it learns (failures, recoveries, its mode) to
its owner's `TunnelEvents`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from agent import tls
from agent.dns import packet
from agent.dns.packet import PacketError
from agent.errors import UsageError
from agent.model import AuthSpec, Failure, Method, Profile, UpstreamSpec
from agent.tunnel.cache import Cache
from agent.tunnel.connection import UpstreamConn
from agent.tunnel.events import Mode, NoTunnelEvents, TunnelEvents, UpstreamEvents
from agent.tunnel.listeners import TcpListener, UdpListener
from agent.tunnel.pending import NULL_SINK, Pending, Sink
from agent.tunnel.settings import MAX_UPSTREAMS, TunnelConfig
from agent.tunnel.stats import TunnelStats
from agent.tunnel.upstream import State, Upstream

LOG = logging.getLogger(__name__)

TICK = 0.1  # seconds between sweeps of deadlines, idle and silent connections
NOT_KEPT = b""  # Pending.key: its answer is not to be kept (the cache was emptied meanwhile)

__all__ = ["Answered", "Mode", "Tunnel", "check_upstreams"]


def check_upstreams(specs: Sequence[UpstreamSpec], profile: Profile) -> None:
    """An empty order is allowed: the tunnel then answers SERVFAIL (mode DOWN)."""
    if len(specs) > MAX_UPSTREAMS:
        raise UsageError(f"{len(specs)} upstreams; at most {MAX_UPSTREAMS}")
    for s in specs:
        if s.method is Method.UNREACHABLE:
            raise UsageError(f"upstream {s}: not a way to reach a resolver")
        if not s.private and not profile.allows_cleartext:
            raise UsageError(
                f"upstream {s} is cleartext; the {profile} profile never sends cleartext"
            )


@dataclasses.dataclass(frozen=True)
class Answered:
    """What `Tunnel.resolve` gives back: the answer, where it came from, how long it took."""

    wire: bytes
    upstream: UpstreamSpec | None  # None: the tunnel's cache, or the tunnel's own SERVFAIL
    from_cache: bool
    seconds: float


class _Asker:
    """The sink of one query the tunnel asks on the user's behalf (`dnstls-agent query`).
    Where the answer came from is told to this sink only: an ordinary client's sink costs
    the tunnel one isinstance() per upstream answer, nothing on a cache hit."""

    udp = False  # the whole answer, as a TCP client gets it

    def __init__(self, future: asyncio.Future[Answered]) -> None:
        self.future = future
        self.upstream: UpstreamSpec | None = None
        self.from_cache = True  # what no path says otherwise of: the cache hit's
        self.started = time.monotonic()

    def admit(self, addr: Any) -> bool:
        return True

    def deliver(self, wire: bytes, addr: Any) -> None:
        if not self.future.done():  # its asker may have gone
            seconds = time.monotonic() - self.started
            self.future.set_result(Answered(wire, self.upstream, self.from_cache, seconds))

    def done(self, addr: Any) -> None:
        pass

    def made_here(self) -> None:
        """The answer is the tunnel's own (SERVFAIL, REFUSED): neither cache nor upstream."""
        self.from_cache = False


UpstreamFactory = Callable[[UpstreamSpec, int, AuthSpec, TunnelConfig, UpstreamEvents], Upstream]


class Tunnel:
    def __init__(
        self,
        cfg: TunnelConfig,
        *,
        events: TunnelEvents | None = None,
        upstream_factory: UpstreamFactory = Upstream,
    ) -> None:
        """`upstream_factory`: how an entry of the order becomes an upstream (tests route
        over upstreams in memory)."""
        check_upstreams(cfg.upstreams, cfg.profile)
        self.cfg = cfg
        self._make_upstream = upstream_factory
        self.loop = asyncio.get_running_loop()
        self.stats = TunnelStats()
        self.events: TunnelEvents = events or NoTunnelEvents()
        self.mode = Mode.PRIVATE
        self.upstreams: list[Upstream] = []
        self.private: list[Upstream] = []
        self.plain: list[Upstream] = []
        self._retired: list[Upstream] = []
        self._dirty: set[UpstreamConn] = set()
        self._flush_scheduled = False
        self._order: collections.deque[Pending] = collections.deque()
        self.pending = 0
        self.udp: list[UdpListener] = []
        self.tcp: list[TcpListener] = []
        self._ticker: asyncio.Task[None] | None = None
        self.routes: list[tuple[str, list[Upstream]]] = []  # longest suffix first
        # Answers, by question and route. Its privacy rules: an answer learnt in cleartext is
        # never given once the profile forbids cleartext (and is dropped then); the routes
        # (split DNS) are part of the key; the owner empties it when the network changes.
        self.cache: Cache | None = Cache(cfg.cache) if cfg.cache is not None else None
        self._prefetching: set[bytes] = set()
        self._set(cfg.upstreams)
        self.mode = self._current_mode()  # the starting point: not a change to announce

    # -- life cycle ------------------------------------------------------------------
    async def start(self) -> None:
        try:
            for host, port in self.cfg.listen:
                await self._listen(host, port)
        except OSError as exc:
            await self.stop()
            raise UsageError(f"cannot listen on {self.cfg.listen}: {exc.strerror or exc}") from exc
        self._ticker = asyncio.create_task(self._tick_forever(), name="tunnel ticker")
        tls.warm_up()
        LOG.info(
            "tunnel listening on %s, upstreams: %s",
            self.addresses,
            ", ".join(map(str, self.cfg.upstreams)),
        )

    async def _listen(self, host: str, port: int) -> None:
        """UDP and TCP on the same port (port 0: a free one, the same for both)."""
        for attempt in range(8):
            udp = UdpListener(self, host, port)
            tcp = TcpListener(self, host, udp.address[1])
            try:
                await tcp.start()
            except OSError:
                udp.close()
                if port or attempt == 7:
                    raise
                continue
            self.udp.append(udp)
            self.tcp.append(tcp)
            return

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [u.address for u in self.udp]

    async def stop(self) -> None:
        """Close listeners and upstreams (close_notify); answer what is still pending."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for u in self.udp:
            u.close()
        for t in self.tcp:
            await t.close()
        for up in [*self.upstreams, *self._retired]:
            await up.stop()
        while self._order:
            p = self._order.popleft()
            if not p.done:
                self._finish(p, packet.error_reply(p.query, p.info, packet.SERVFAIL))

    # -- the order ---------------------------------------------------------------------
    def _auth(self, spec: UpstreamSpec) -> AuthSpec:
        return spec.auth_spec(self.cfg.profile, self.cfg.ca_file)

    def _set(self, specs: Sequence[UpstreamSpec]) -> None:
        """The order as handed: private entries in their order, then cleartext ones (if the
        order has any), each used only when every private one is unusable."""
        old = {up.spec: up for up in self.upstreams}
        wanted = [s for s in specs if s.private]
        plain = [s for s in specs if not s.private]
        ups: list[Upstream] = []
        for i, spec in enumerate([*wanted, *plain]):
            up = old.pop(spec, None)
            if up is None:
                up = self._make_upstream(spec, i, self._auth(spec), self.cfg, self)
            else:
                up.place(i)
            ups.append(up)
        self.upstreams = ups
        self.private = [u for u in ups if u.spec.private]
        self.plain = [u for u in ups if not u.spec.private]
        for up in old.values():  # marked, swept below: in-flight queries are re-routed
            up.retire()
            self._retired.append(up)

    def set_upstreams(
        self,
        specs: Sequence[UpstreamSpec],
        *,
        profile: Profile | None = None,
        routes: Sequence[tuple[str, Sequence[UpstreamSpec]]] = (),
    ) -> None:
        """Hand the tunnel a new order (and profile, and split-DNS routes), atomically;
        nothing in flight is lost. A new profile changes how every upstream authenticates:
        their connections are replaced."""
        profile = profile or self.cfg.profile
        check_upstreams(specs, profile)
        if profile is not self.cfg.profile:
            LOG.info("tunnel profile %s -> %s", self.cfg.profile, profile)
            self.cfg = dataclasses.replace(self.cfg, profile=profile)
            for up in self.upstreams:
                up.retire()
                self._retired.append(up)
            self.upstreams = []
            cache = self.cache
            dropped = cache.drop_cleartext() if cache and not profile.allows_cleartext else 0
            if dropped:
                LOG.info("cache: %d answer(s) learnt in cleartext dropped (%s)", dropped, profile)
        self._set(specs)
        old_routes = [d for d, _ in self.routes]
        self.routes = sorted(
            ((d.strip(".").lower(), [u for s in ups if (u := self.upstream(s)) is not None])
             for d, ups in routes),
            key=lambda r: -len(r[0]),
        )  # fmt: skip
        if [d for d, _ in self.routes] != old_routes:
            self.flush_cache("the split-DNS routes changed")
        for p in self._order:
            p.tried = 0  # indexes changed meaning
            p.group = None
        for up in self._retired:
            # waiting for a connection that is not wanted now
            self.reroute(up.take_queue(), None)
            if up.conn is not None and not up.inflight:
                up.close()
        self._update_mode()

    def _route_of(self, wire: bytes, info: packet.QueryInfo) -> tuple[str, list[Upstream] | None]:
        name = packet.qname(wire, info)
        for domain, ups in self.routes:
            if name == domain or name.endswith("." + domain):
                return domain, ups
        return "", None

    def flush_cache(self, why: str) -> int:
        """Forget every answer (the network changed, or the user asked)."""
        if self.cache is None:
            return 0
        n = self.cache.flush()
        for p in self._order:  # an answer on its way from before is not stored either
            p.key = NOT_KEPT
        LOG.info("cache emptied (%s): %d answer(s) dropped", why, n)
        return n

    # -- queries in ---------------------------------------------------------------------
    def on_query(self, wire: bytes, sink: Sink, addr: Any) -> None:
        stats = self.stats
        stats.queries += 1
        try:
            info = packet.parse_query(wire)
        except PacketError as exc:
            stats.malformed += 1
            reply = packet.header_error_reply(wire, exc.rcode) if exc.rcode is not None else None
            if reply is not None:
                sink.deliver(reply, addr)
            return
        now = self.loop.time()
        scope, group = self._route_of(wire, info) if self.routes else ("", None)
        key = None  # made here only when the cache has something to look in; else at the answer
        cache = self.cache
        if cache is not None and len(cache):
            key = cache.key(wire, info, scope)
            allowed = self.cfg.profile.allows_cleartext
            hit = cache.get(key, wire, info, now, cleartext_ok=allowed) if key else None
            if hit is not None and key:
                self._reply(wire, hit.wire, sink, addr, info)
                if hit.prefetch:
                    self._prefetch(wire, info, key, group, now)
                return
        elif cache is not None:
            cache.stats.misses += 1
        if self.pending >= self.cfg.max_pending or not sink.admit(addr):
            stats.dropped_limit += 1
            if isinstance(sink, _Asker):
                sink.made_here()
            if not sink.udp:  # TCP clients wait for an answer; UDP ones just retry
                sink.deliver(packet.error_reply(wire, info, packet.REFUSED), addr)
            return
        p = Pending(sink, addr, wire, info, now + self.cfg.query_timeout)
        p.group, p.key, p.scope = group, key, scope
        self.pending += 1
        self._order.append(p)
        self.route(p, now)

    def resolve(self, wire: bytes) -> asyncio.Future[Answered]:
        """Ask `wire` as a client would (`dnstls-agent query`): the same cache, routes, order,
        failover, padding and deadline, counted once in the clients' statistics. The future
        always completes: with the answer, or the tunnel's SERVFAIL at the deadline (or at
        stop). A query the tunnel would not forward raises PacketError."""
        packet.parse_query(wire)  # a client's malformed query may go unanswered; this one not
        fut: asyncio.Future[Answered] = self.loop.create_future()
        self.on_query(wire, _Asker(fut), None)
        return fut

    def _reply(
        self, query: bytes, wire: bytes, sink: Sink, addr: Any, info: packet.QueryInfo
    ) -> None:
        """An answer the cache gave: to the client at once, shaped for UDP if need be."""
        self.stats.answered += 1
        if sink.udp and len(wire) > packet.udp_limit(info):
            wire = packet.truncated_reply(query, info, wire)
            self.stats.truncated += 1
        sink.deliver(wire, addr)

    def _prefetch(
        self,
        wire: bytes,
        info: packet.QueryInfo,
        key: bytes,
        group: list[Upstream] | None,
        now: float,
    ) -> None:
        """A popular answer about to expire: asked again now, on the tunnel's own account
        (the answer only refills the cache), so the next client does not wait for it."""
        if key in self._prefetching or self.pending >= self.cfg.max_pending // 2:
            return
        self._prefetching.add(key)
        p = Pending(NULL_SINK, None, wire, info, now + self.cfg.query_timeout)
        p.group, p.key = group, key  # the key holds the scope
        self.pending += 1
        self._order.append(p)
        self.route(p, now)

    def route(self, p: Pending, now: float) -> None:
        group = p.group  # split DNS: these names never go anywhere else
        for up in self.private if group is None else [u for u in group if u.spec.private]:
            if not p.tried & up.bit and up.available:
                up.submit(p, now)
                return
        plain = self.plain if group is None else [u for u in group if not u.spec.private]
        if plain:
            for up in plain:
                if not p.tried & up.bit and up.available:
                    self._set_mode(Mode.CLEARTEXT, "no private upstream usable")
                    self.stats.cleartext += 1
                    up.submit(p, now)
                    return
        if self._nothing_available():
            self._set_mode(Mode.DOWN, "no upstream usable")
        self.servfail(p)

    def reroute(self, pendings: Sequence[Pending], failed: Upstream | None) -> None:
        now = self.loop.time()
        for p in pendings:
            if p.done:
                continue
            if failed is not None:
                p.tried |= failed.bit
            self.route(p, now)

    # -- what upstreams report (UpstreamEvents) -----------------------------------------
    def gave_up(self, pendings: Sequence[Pending], failed: Upstream | None) -> None:
        self.reroute(pendings, failed)

    def wants_flush(self, conn: UpstreamConn) -> None:
        self.mark_dirty(conn)

    def answered(self, up: Upstream, p: Pending, frame: bytes) -> None:
        self.on_answer(up, p, frame)

    def changed(self, up: Upstream) -> None:
        self._update_mode()

    def failed(self, up: Upstream, failure: Failure, detail: str) -> None:
        if not up.retired:
            self.events.upstream_failed(up.spec, failure, detail)

    def recovered(self, up: Upstream) -> None:
        if not up.retired:
            self.events.upstream_recovered(up.spec)

    def mark_dirty(self, conn: UpstreamConn) -> None:
        self._dirty.add(conn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what the last wake-up queued: one TLS write and send() per connection."""
        self._flush_scheduled = False
        if self._dirty:
            dirty = self._dirty
            self._dirty = set()
            for conn in dirty:
                conn.flush()

    # -- answers out ---------------------------------------------------------------------
    def on_answer(self, up: Upstream, p: Pending, frame: bytes) -> None:
        if p.done:
            return
        up.stats.answers += 1
        if not frame[2] & 0x80 or not packet.question_matches(p.query, p.info, frame):
            # not a response (QR clear: an echo of the query), or to another question
            up.stats.mismatched += 1
            LOG.warning("%s: answer for ID %d is not a response to its question", up.spec, p.uid)
            self.servfail(p)
            return
        up.stats.latency(time.monotonic() - p.sent)
        resp = p.query[:2] + frame[2:]
        if p.strip:
            try:
                resp = packet.strip_opt(resp, p.info.question_end)
            except PacketError:
                self.servfail(p)
                return
        cache = self.cache
        if cache is not None and p.key != NOT_KEPT and cache.worth(resp, p.info.question_end):
            key = p.key or cache.key(p.query, p.info, p.scope)
            if key is not None:
                now = self.loop.time()
                cache.put(key, resp, now, private=up.spec.private, qend=p.info.question_end)
        if isinstance(p.sink, _Asker):  # `dnstls-agent query` asks who answered
            p.sink.upstream, p.sink.from_cache = up.spec, False
        if p.sink.udp and len(resp) > packet.udp_limit(p.info):
            resp = packet.truncated_reply(p.query, p.info, resp)
            self.stats.truncated += 1
        self._finish(p, resp)

    def servfail(self, p: Pending) -> None:
        """No upstream gave an answer: SERVFAIL, or (serve_stale on) the expired answer."""
        if p.sink is NULL_SINK:
            self._finish(p, b"")
            return
        if p.key and self.cache is not None:
            stale = self.cache.stale(
                p.key, p.query, p.info, self.loop.time(),
                cleartext_ok=self.cfg.profile.allows_cleartext,
            )  # fmt: skip
            if stale is not None:
                if p.sink.udp and len(stale) > packet.udp_limit(p.info):
                    stale = packet.truncated_reply(p.query, p.info, stale)
                self._finish(p, stale)
                return
        if isinstance(p.sink, _Asker):
            p.sink.made_here()
        self.stats.servfail += 1
        self._finish(p, packet.error_reply(p.query, p.info, packet.SERVFAIL))

    def _finish(self, p: Pending, wire: bytes) -> None:
        if p.done:
            return
        p.done = True
        self.pending -= 1
        if p.conn is not None:
            p.conn.forget(p)
        if p.sink is NULL_SINK:  # a prefetch: no client waits
            self._prefetching.discard(p.key or b"")
            return
        self.stats.answered += 1
        p.sink.deliver(wire, p.addr)
        p.sink.done(p.addr)

    # -- time ------------------------------------------------------------------------------
    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.tick(self.loop.time())

    def tick(self, now: float) -> None:
        order = self._order
        while order and (order[0].done or order[0].deadline <= now):
            p = order.popleft()
            if not p.done:
                self._expire(p)
        for up in self.upstreams:
            up.tick(now)
        for up in list(self._retired):
            if not up.inflight:
                up.close()
                self._retired.remove(up)
        for t in self.tcp:
            t.tick(now)
        self._update_mode()

    def _expire(self, p: Pending) -> None:
        """Its deadline passed: SERVFAIL. For a UDP client whose truncated answer is being
        asked again over TCP, that truncated answer (as when the TCP retry fails)."""
        for up in self.upstreams:
            if p.conn is not None and p.conn is up.conn:
                up.stats.timeouts += 1
                break
            if up.retrying(p):
                up.stats.timeouts += 1
                up.tcp_failed([p])
                return
        self.servfail(p)

    # -- mode --------------------------------------------------------------------------------
    def _nothing_available(self) -> bool:
        return not any(u.available for u in self.upstreams)

    def _current_mode(self) -> Mode:
        if any(u.available for u in self.private):
            return Mode.PRIVATE
        if any(u.available for u in self.plain):
            return Mode.CLEARTEXT if self.mode is not Mode.PRIVATE else self.mode
        return Mode.DOWN

    def _update_mode(self) -> None:
        self._set_mode(self._current_mode(), "")

    def _set_mode(self, mode: Mode, why: str) -> None:
        if mode is self.mode:
            return
        errors = "; ".join(f"{u.spec}: {u.last_error}" for u in self.private if u.last_error)
        why = ", ".join(x for x in (why, errors) if x)
        level = logging.INFO if mode is Mode.PRIVATE else logging.WARNING
        LOG.log(level, "tunnel mode %s -> %s%s", self.mode, mode, f" ({why})" if why else "")
        self.mode = mode
        self.events.mode_changed(mode, why)

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "profile": self.cfg.profile.value,
            "listen": [f"{h}:{p}" for h, p in self.addresses],
            "pending": self.pending,
            "clients": self.stats.to_json(),
            "cache": self.cache.to_json() if self.cache is not None else None,
            "upstreams": [
                {
                    "upstream": str(u.spec),
                    "state": u.state.value,
                    "recovering": u.recovering,
                    "last_error": u.last_error,
                    "keepalive_s": u.keepalive,
                    "inflight": u.inflight,
                    **u.stats.to_json(),
                }
                for u in self.upstreams
            ],
        }

    def reset_stats(self, now: float) -> None:
        """Every counter to zero, counting from `now` (wall clock); the cache keeps its
        answers."""
        self.stats.reset(now)
        if self.cache is not None:
            self.cache.reset_stats()
        for up in self.upstreams:
            up.stats.reset(now)

    def upstream(self, spec: UpstreamSpec) -> Upstream | None:
        return next((u for u in self.upstreams if u.spec == spec), None)

    def states(self) -> dict[str, State]:
        return {str(u.spec): u.state for u in self.upstreams}
