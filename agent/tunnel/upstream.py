"""One upstream resolver as the tunnel sees it: an explicit state machine, and how to connect.

    IDLE --query--> CONNECTING --ok--> UP --idle/clean close--> IDLE
                        |                 \\--reset/TLS error/silent--> BACKOFF
                        |                 \\--2nd clean close in a row, unanswered--> BACKOFF
                        \\--error--> BACKOFF --backoff over--> CONNECTING (recovering)

A recovering upstream gets no client queries until it is UP again; a clean close
by the server (RFC 7766 allows it at any time) is not a failure, but a server that
closes connection after connection without answering anything at all (e.g. on reading
a query) is: from the second such close in a row it is backed off like a failed one,
longer with each (`unanswered`), so that it cannot make a reconnect storm. Backoffs
double from backoff_min to backoff_max, each +-20 %. A slow answer is not
one either: a connection is dead on evidence only. When it has been silent a while
with queries out, a liveness probe (a query of its own) goes out on it, and only
silence to that probe too counts as a failure; a slow query itself is waited for
until its own deadline.

An upstream reports to its owner through `UpstreamEvents` (events.py) and never
reaches back into it. Plain UDP (the captive-portal exception and the cleartext
entries the policy chose as UDP) resends what gets no answer in time (see
retransmit.py) and asks again over TCP what comes back truncated (`TcpRetry`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Sequence
from enum import StrEnum

import dns.edns
import dns.message

from agent.dns import packet, wire
from agent.dns.transport import Connection, family_of, starttls, syn_data_acked
from agent.errors import Closed, Timeout, TLSHandshakeFailed, TransportError, Unreachable
from agent.model import AuthSpec, Failure, Method, UpstreamSpec
from agent.tls import check_peer, context_for
from agent.tunnel.connection import UpstreamConn
from agent.tunnel.events import UpstreamEvents
from agent.tunnel.pending import Pending
from agent.tunnel.retransmit import RttEstimator
from agent.tunnel.settings import TunnelConfig
from agent.tunnel.stats import UpstreamStats

LOG = logging.getLogger(__name__)

HELLO_NAME = "."  # the tunnel's own first query on a connection: learns edns-tcp-keepalive
PROBE_NAME = "."  # the liveness probe: any resolver answers `. NS` from its cache at once
JITTER = 0.2  # each backoff is its doubling step +-20 %: agents that fail together spread out
_FAILURES = {f.value: f for f in Failure}


def failure_of(exc: TransportError) -> Failure:
    """The stable word for why a connection failed, as probe results say it."""
    return _FAILURES.get(exc.reason, Failure.UNREACHABLE)


def _both(errors: Sequence[tuple[tuple[Method, int], TransportError]]) -> TransportError:
    """Both TLS paths failed: the first one's kind of error, with both details."""
    first = errors[0][1]
    detail = "; ".join(f"{m} (port {p}): {e.detail}" for (m, p), e in errors)
    return type(first)(detail)


class State(StrEnum):
    IDLE = "idle"
    CONNECTING = "connecting"
    UP = "up"
    BACKOFF = "backoff"


_ALLOWED = {
    State.IDLE: {State.CONNECTING},
    State.CONNECTING: {State.UP, State.BACKOFF, State.IDLE},
    State.UP: {State.IDLE, State.BACKOFF},
    State.BACKOFF: {State.CONNECTING, State.IDLE},
}


class Upstream:
    def __init__(
        self,
        spec: UpstreamSpec,
        index: int,
        auth: AuthSpec,
        cfg: TunnelConfig,
        events: UpstreamEvents,
    ) -> None:
        self.spec = spec
        self.index = index
        self.bit = 1 << index
        self.auth = auth
        self.cfg = cfg
        self.events = events
        self.loop = asyncio.get_running_loop()
        self.state = State.IDLE
        self.recovering = False
        self.conn: UpstreamConn | None = None
        self.queue: list[Pending] = []  # waiting for CONNECTING to end
        self.failures = 0  # consecutive
        self.unanswered = 0  # consecutive connections that ended before a single answer
        self.backoff_until = 0.0
        self.last_error = ""
        self.session: object | None = None  # ssl.SSLSession, for resumption
        self.keepalive: float | None = None  # the server's edns-tcp-keepalive, seconds
        self.stats = UpstreamStats()
        self.rtt = RttEstimator()  # datagrams only: when to retransmit
        self.tcp: TcpRetry | None = None  # datagrams only: for truncated answers, made when needed
        self.retired = False
        self._task: asyncio.Task[None] | None = None
        self._hello: Pending | None = None
        self._probe: Pending | None = None  # the liveness probe out now, if any
        self._probe_at = 0.0
        self._first_answer = False  # the current connection has answered nothing yet

    def __repr__(self) -> str:
        return f"<Upstream {self.spec} {self.state}>"

    def _to(self, state: State) -> None:
        if state is not self.state and state not in _ALLOWED[self.state]:
            raise AssertionError(f"{self.spec}: {self.state} -> {state} is not a transition")
        self.state = state

    def place(self, index: int) -> None:
        """Its position in a new order (the bit that marks queries it failed)."""
        self.index, self.bit = index, 1 << index

    @property
    def available(self) -> bool:
        """May a client query be given to this upstream now?"""
        if self.retired:
            return False
        if self.state is State.CONNECTING:
            return not self.recovering
        return self.state is not State.BACKOFF

    @property
    def inflight(self) -> int:
        return len(self.conn.inflight) if self.conn is not None else 0

    # -- queries ---------------------------------------------------------------
    def submit(self, p: Pending, now: float) -> None:
        conn = self.conn
        if self.state is State.UP and conn is not None and conn.submit(p, now):
            self.stats.queries += 1
            self.events.wants_flush(conn)
            return
        self.queue.append(p)
        if self.state is State.IDLE:
            self.connect()

    def take_queue(self) -> list[Pending]:
        """The queries waiting for a connection, taken away (to go elsewhere)."""
        queued, self.queue = self.queue, []
        return queued

    def retrying(self, p: Pending) -> bool:
        """Is `p` being asked again over TCP after a truncated answer here?"""
        return p.tc_answer is not None and self.tcp is not None and self.tcp.holds(p)

    # -- connecting ------------------------------------------------------------
    def connect(self, *, recovering: bool = False) -> None:
        self._to(State.CONNECTING)
        self.recovering = recovering
        self._task = asyncio.create_task(self._connect(), name=f"connect {self.spec}")

    async def _connect(self) -> None:
        """Happy eyeballs on the handshake: when the spec grants an `alt` TLS path and the
        first has not finished its handshake within `fallback_delay` (or failed before),
        the alt path starts too; the first to finish wins, the other is closed."""
        spec = self.spec
        if spec.method is Method.UDP_PLAIN:
            self._up_datagram()
            return
        paths: list[tuple[Method, int]] = [(spec.method, spec.port)]
        if spec.alt is not None and spec.private and spec.alt[0].private:
            paths.append(spec.alt)
        deadline = self.loop.time() + self.cfg.connect_timeout
        tasks: dict[asyncio.Task[Connection], tuple[Method, int]] = {}

        def start(path: tuple[Method, int]) -> None:
            task = asyncio.create_task(self._open(*path, deadline), name=f"connect {spec} {path}")
            tasks[task] = path

        start(paths[0])
        errors: list[tuple[tuple[Method, int], TransportError]] = []
        winner: tuple[Connection, tuple[Method, int]] | None = None
        try:
            while tasks and winner is None:
                raced = len(paths) == 1 or len(tasks) + len(errors) > 1
                done, _ = await asyncio.wait(
                    tasks,
                    timeout=None if raced else self.cfg.fallback_delay,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in done:
                    path = tasks.pop(task)
                    exc = task.exception()
                    if exc is None:
                        winner = (task.result(), path)
                        break
                    if not isinstance(exc, TransportError):
                        raise exc
                    errors.append((path, exc))
                if winner is None and not raced:
                    start(paths[1])  # the first is slow, or failed: the other path too
        finally:
            for task in tasks:
                task.cancel()
            for result in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(result, Connection):
                    result.close()
        if winner is None:
            self._failed(errors[0][1] if len(errors) == 1 else _both(errors))
            return
        conn, path = winner
        if path != paths[0]:  # what the order says first did not work (in time): learnt
            first = next((e for p, e in errors if p == paths[0]), None)
            detail = first.detail if first else f"no handshake in {self.cfg.fallback_delay} s"
            why = f"{paths[0][0]} {detail}; {path[0]} won the race"
            LOG.warning("%s: %s", spec, why)
            self.events.failed(self, failure_of(first) if first else Failure.TIMEOUT, why)
        self._up(conn)

    async def _open(self, method: Method, port: int, deadline: float) -> Connection:
        """One path: TCP, the STARTTLS exchange for the upgrade, TLS and its authentication."""
        spec = self.spec
        conn = await Connection.open(spec.address, port, deadline, fastopen=self.cfg.fastopen)
        try:
            if method is Method.TLS_UPGRADE:
                answer = await starttls(conn, deadline)
                if not wire.has_to(answer):
                    raise TLSHandshakeFailed("TO clear in the answer: the server does not upgrade")
            if method.private:
                tls = await conn.start_tls(
                    context_for(self.auth),
                    deadline,
                    server_hostname=spec.auth_name,
                    session=self.session,  # type: ignore[arg-type]
                )
                if tls.session_reused:
                    self.stats.resumptions += 1
                else:
                    check_peer(tls, spec.address, self.auth)
            if syn_data_acked(conn.sock):
                self.stats.fastopen += 1
        except BaseException:
            conn.close()
            raise
        return conn

    def _up_datagram(self) -> None:
        """Plain DNS over UDP: nothing to connect but a socket."""
        sock = socket.socket(family_of(self.spec.address), socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect((self.spec.address, self.spec.port))
        except OSError as exc:
            sock.close()
            self._failed(Unreachable(f"UDP to {self.spec.address}: {exc.strerror or exc}"))
            return
        self._install(UpstreamConn(sock, None, label=str(self.spec),
                                   on_answer=self._on_datagram_answer, on_lost=self._on_lost,
                                   datagram=True))  # fmt: skip

    def _up(self, c: Connection) -> None:
        if self.retired:  # dropped from the order while connecting
            c.close()
            self._to(State.IDLE)
            self.events.gave_up(self.take_queue(), None)
            return
        conn = UpstreamConn(
            c.sock,
            c.tls,
            label=str(self.spec),
            on_answer=self._on_answer,
            on_lost=self._on_lost,
            pad=self.cfg.pad and self.spec.private,
        )
        self._install(conn)

    def _install(self, conn: UpstreamConn) -> None:
        if self.stats.connections:
            self.stats.reconnects += 1
        self.stats.connections += 1
        came_back = self.failures > 0 or self.recovering
        self.failures = 0
        self.recovering = False
        self.last_error = ""
        self.conn = conn
        self._first_answer = True
        self._to(State.UP)
        resumed = conn.tls is not None and conn.tls.session_reused
        LOG.info("%s: connected%s", self.spec, " (session resumed)" if resumed else "")
        self._send_hello(conn)
        queued = self.take_queue()
        now = self.loop.time()
        for p in queued:
            if not p.done:
                self.submit(p, now)
        self.events.wants_flush(conn)
        if came_back and self.unanswered < 2:  # else: once it answers (`_answering`)
            self.events.recovered(self)
        self.events.changed(self)

    def _own_query(self, conn: UpstreamConn, name: str, *, keepalive: bool) -> Pending | None:
        """A query of the tunnel's own on `conn` (never a client's: never resent, never
        answered to anyone, not counted as pending)."""
        options: list[dns.edns.Option] = (
            [dns.edns.GenericOption(dns.edns.OptionType.KEEPALIVE, b"")] if keepalive else []
        )
        q = dns.message.make_query(
            name, "NS", use_edns=0, payload=wire.EDNS_PAYLOAD, options=options
        )
        data = q.to_wire()
        own = Pending(_NO_SINK, None, data, packet.parse_query(data), float("inf"))
        return own if conn.submit(own, self.loop.time()) else None

    def _send_hello(self, conn: UpstreamConn) -> None:
        """Our own query, inside TLS: asks for the server's edns-tcp-keepalive (RFC 7828)."""
        if self.spec.private:
            self._hello = self._own_query(conn, HELLO_NAME, keepalive=True)

    def _failed(self, exc: TransportError) -> None:
        self.failures += 1
        self.stats.failures += 1
        self.last_error = exc.detail
        # connections that end unanswered each count too (a handshake resets `failures`)
        n = max(self.failures, self.unanswered - 1)
        backoff = min(self.cfg.backoff_max, self.cfg.backoff_min * 2 ** (n - 1))
        backoff *= random.uniform(1 - JITTER, 1 + JITTER)
        self.backoff_until = self.loop.time() + backoff
        self.recovering = False
        self._to(State.BACKOFF)
        LOG.warning("%s: %s; not used for %.1f s", self.spec, exc.detail, backoff)
        queued = self.take_queue()
        self.events.failed(self, failure_of(exc), exc.detail)
        self.events.changed(self)
        self.events.gave_up(queued, self)

    # -- the live connection -------------------------------------------------------
    def _on_answer(self, conn: UpstreamConn, p: Pending | None, frame: bytes) -> None:
        if p is None:
            return  # late: its query timed out or moved on
        if self._first_answer:
            self._answering(conn)
        if p.sink is _NO_SINK:
            if p is self._hello:
                self._hello = None
                self._learn_keepalive(frame)
            elif p is self._probe:
                self._probe = None
            return
        conn.progress += 1
        self.events.answered(self, p, frame)

    def _answering(self, conn: UpstreamConn) -> None:
        """The first answer on `conn` (to a query of ours or a client's)."""
        self._first_answer = False
        if conn.tls is not None:
            self.session = conn.tls.session  # tickets came with (or before) the first answer
        if self.unanswered:
            if self.unanswered > 1:  # it was backed off (and said failed) for it: not now
                LOG.info("%s: answers again, after %d connections that did not",
                         self.spec, self.unanswered)  # fmt: skip
                self.events.recovered(self)
            self.unanswered = 0

    def _on_datagram_answer(self, conn: UpstreamConn, p: Pending | None, frame: bytes) -> None:
        if p is None:
            return
        if self._first_answer:  # (as on a stream: the count of unanswered ends here too)
            self._answering(conn)
        if not p.retransmits:
            self.rtt.sample(time.monotonic() - p.sent)
        if (
            (frame[2] << 8 | frame[3]) & packet.TC
            and not (p.sink.udp and packet.udp_limit(p.info) <= packet.UDP_DEFAULT)
            and packet.question_matches(p.query, p.info, frame)
        ):  # (a UDP client without EDNS could not take the whole answer anyway)
            self._retry_over_tcp(p, frame)
            return
        conn.progress += 1
        self.events.answered(self, p, frame)

    def _retry_over_tcp(self, p: Pending, frame: bytes) -> None:
        """A truncated answer over UDP: ask the same server again over TCP (RFC 7766 5).
        The same cleartext server the order names, over the transport DNS itself requires
        for this answer: not a new destination, and never for a private upstream."""
        self.stats.tc_retries += 1
        p.tc_answer = frame
        p.conn = None  # off the datagram connection (its answer took it out of inflight)
        tcp = self.tcp
        if tcp is None:
            tcp = self.tcp = TcpRetry(self)
        if tcp.available:
            tcp.submit(p, self.loop.time())
        else:  # failed a moment ago, in backoff: not tried again for every truncated answer
            self.tcp_failed([p])

    def tcp_failed(self, pendings: Sequence[Pending]) -> None:
        """The TCP retry of truncated answers did not work. A UDP client gets the truncated
        answer as it came (it may retry over TCP itself: to us, then SERVFAIL if TCP still
        fails); a TCP client gets SERVFAIL: a truncated answer over TCP is of no use to it.
        Once this upstream is retired, they are asked again in the new order instead."""
        if self.retired:
            self.events.gave_up(pendings, None)
            return
        for p in pendings:
            if p.done:
                continue
            self.stats.tc_retry_failures += 1
            tc, p.tc_answer = p.tc_answer, None
            if p.sink.udp and tc is not None:
                self.events.answered(self, p, tc)
            else:
                self.events.servfail(p)

    def _learn_keepalive(self, frame: bytes) -> None:
        try:
            answer = dns.message.from_wire(frame)
        except Exception:  # a broken hello answer only costs the hint
            return
        for option in answer.options:
            data = getattr(option, "data", b"")
            if option.otype == packet.OPTION_KEEPALIVE and len(data) == 2:
                self.keepalive = int.from_bytes(data, "big") / 10
                LOG.info("%s: server keeps idle connections %.1f s", self.spec, self.keepalive)

    def _orphans(self, conn: UpstreamConn) -> list[Pending]:
        """The client queries that were in flight on `conn` (the tunnel's own are dropped)."""
        self._hello = self._probe = None
        return [p for p in conn.take_inflight() if p.sink is not _NO_SINK and not p.done]

    def _on_lost(self, conn: UpstreamConn, exc: TransportError) -> None:
        self.conn = None
        orphans = self._orphans(conn)
        if self._first_answer:  # ended before a single answer (to its own queries too)
            self.unanswered += 1
            if isinstance(exc, Closed) and self.unanswered > 1:
                # and again: backed off, not reconnected at once (that was a storm)
                self.queue.extend(orphans)  # they move on along the order, not resent here
                self._failed(Closed(f"{exc.detail} without answering anything, "
                                    f"{self.unanswered} connections in a row"))  # fmt: skip
                return
        if isinstance(exc, Closed) or conn.progress:
            # RFC 7766: servers may close at any time; not a failure. Nor is a connection
            # that answered and then died (reset, a TLS error, silence): the connection is
            # dead, not the path, and the next one is opened at once. What was in flight
            # goes again on a fresh connection, while connections keep making progress
            # (the query deadline bounds it); a server that closes without answering
            # anything gets each query once more, then it counts as failed for them.
            level = logging.INFO if isinstance(exc, Closed) else logging.WARNING
            LOG.log(level, "%s: %s (%d in flight, %d answered on it): reconnecting",
                    self.spec, exc.detail, len(orphans), conn.progress)  # fmt: skip
            self._to(State.IDLE)
            if conn.progress:
                again, failed = orphans, []
            else:
                again = [p for p in orphans if p.resends == 0]
                failed = [p for p in orphans if p.resends > 0]
            for p in again:
                p.resends += 1
            self.events.gave_up(failed, self)
            now = self.loop.time()
            for p in again:
                self.submit(p, now)
            self.events.changed(self)
            return
        self.queue.extend(orphans)
        self._failed(exc)

    def tick(self, now: float) -> None:
        """Periodic: end backoff, close idle connections, check liveness, retransmit."""
        if self.tcp is not None:
            self.tcp.tick(now)
        if self.state is State.BACKOFF and now >= self.backoff_until and not self.retired:
            self.connect(recovering=True)
            return
        conn = self.conn
        if self.state is not State.UP or conn is None:
            return
        if conn.datagram:  # on the tick: no timer per query (up to TICK late, well below RTO_MIN)
            self.stats.retransmits += conn.retransmit(time.monotonic(), self.rtt.rto)
            if conn.inflight and now - conn.busy_since > self.cfg.stall_timeout:
                # resent and resent again, and not one datagram back: that is evidence
                conn.lose(Timeout(f"no answer to anything for {self.cfg.stall_timeout:.1f} s"))
            return
        if conn.inflight:
            self._check_alive(conn, now)
            return
        idle = self.cfg.idle_timeout
        if self.keepalive is not None:
            idle = min(idle, max(self.keepalive - 0.5, 0.5))
        if now - max(conn.last_rx, conn.last_tx) > idle:
            LOG.debug("%s: idle for %.0f s, closing", self.spec, idle)
            self.close()

    def _check_alive(self, conn: UpstreamConn, now: float) -> None:
        """Queries are out and the connection is quiet. A slow answer is no evidence: ask
        something any resolver answers at once; only silence to that too is."""
        probe = self._probe
        if probe is None:
            if now - conn.busy_since > self.cfg.liveness_after:
                self._probe = self._own_query(conn, PROBE_NAME, keepalive=False)
                self._probe_at = now
                self.stats.liveness_probes += 1
                self.events.wants_flush(conn)
            return
        if conn.last_rx > self._probe_at:  # bytes came since it went out: alive
            conn.forget(probe)
            self._probe = None
            return
        if now - self._probe_at > self.cfg.liveness_timeout:
            quiet = now - conn.busy_since
            conn.lose(Timeout(f"silent for {quiet:.1f} s, also to a liveness probe"))

    def close(self) -> None:
        """Close the connection cleanly (close_notify); nothing in flight is lost."""
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        orphans = self._orphans(conn)
        conn.close()
        if self.state is State.UP:
            self._to(State.IDLE)
        self.events.gave_up(orphans, None)
        if self.retired and self.tcp is not None:
            self.tcp.close()

    def rest(self) -> None:
        """Backoff over, but no reconnect of its own: connects again when next asked."""
        self._to(State.IDLE)

    def retire(self) -> None:
        """Dropped from the order: what it still holds goes elsewhere once it is closed."""
        self.retired = True
        if self.tcp is not None:
            self.tcp.retire()

    async def stop(self) -> None:
        self.retire()
        if self.tcp is not None:
            await self.tcp.stop()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.close()


class TcpRetry:
    """Plain DNS over TCP to a UDP upstream's server (same address and port), for the answers
    that came back truncated over UDP: one connection, pipelined, closed when idle.

    It lives beside its UDP upstream, outside the order: it takes no client query of its
    own, and what it cannot answer goes back to that upstream (`tcp_failed`). It is
    ticked, retired and closed with that upstream. A plain `Upstream` inside, whose
    events come here (`_RetryEvents`).
    """

    def __init__(self, owner: Upstream) -> None:
        spec = UpstreamSpec(owner.spec.address, Method.TCP_PLAIN, owner.spec.port)
        self.up = Upstream(spec, owner.index, owner.auth, owner.cfg, _RetryEvents(owner))
        self.up.bit = 0  # not in the order: marks no query as tried

    @property
    def available(self) -> bool:
        return self.up.available

    def submit(self, p: Pending, now: float) -> None:
        self.up.submit(p, now)

    def holds(self, p: Pending) -> bool:
        """Is `p` in flight here, or waiting for the connection?"""
        up = self.up
        return (p.conn is not None and p.conn is up.conn) or p in up.queue

    def tick(self, now: float) -> None:
        up = self.up
        if up.state is State.BACKOFF:
            if now >= up.backoff_until:
                up.rest()  # connects again for the next truncated answer, if any
            return
        up.tick(now)

    def close(self) -> None:
        self.up.close()

    def retire(self) -> None:
        self.up.retire()

    async def stop(self) -> None:
        await self.up.stop()


class _RetryEvents:
    """The TCP retry's events, for its UDP upstream: answers count as that upstream's."""

    def __init__(self, owner: Upstream) -> None:
        self.owner = owner

    def wants_flush(self, conn: UpstreamConn) -> None:
        self.owner.events.wants_flush(conn)

    def answered(self, up: Upstream, p: Pending, frame: bytes) -> None:
        p.tc_answer = None
        self.owner.events.answered(self.owner, p, frame)

    def gave_up(self, pendings: Sequence[Pending], failed: Upstream | None) -> None:
        self.owner.tcp_failed(pendings)

    def servfail(self, p: Pending) -> None:
        self.owner.events.servfail(p)

    def changed(self, up: Upstream) -> None:
        pass

    def failed(self, up: Upstream, failure: Failure, detail: str) -> None:
        pass  # logged; the UDP answers still come: not this upstream's failure

    def recovered(self, up: Upstream) -> None:
        pass


class _NoSink:
    """The sink of the tunnel's own queries: their answers are consumed by the upstream."""

    udp = False

    def admit(self, addr: object) -> bool:
        return True

    def deliver(self, wire: bytes, addr: object) -> None:
        pass

    def done(self, addr: object) -> None:
        pass


_NO_SINK = _NoSink()
