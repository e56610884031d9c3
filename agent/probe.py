"""One resolver in, one ProbeResult out: which private path works, how fast, how authenticated.

Port-based TLS (853) and the STARTTLS upgrade on TCP/53 race happy-eyeballs
style: the second path starts when the first has not finished its TLS handshake
within `fallback_delay`, or as soon as the first fails. Waiting for the handshake,
not just the TCP connect, matters because some middleboxes accept TCP on 853 and
then say nothing. A UDP query with the TO flag runs beside them as a hint.
Everything shares one absolute deadline; failures are recorded as data and never
raised.

Before the race, when `settings.ddr`, the resolver is asked for its designated resolvers
(DDR, `agent.ddr`): one cleartext round trip that names nothing of the user's, bounded by
`ddr_timeout` and taken out of the same deadline. A designation the RFC lets us use, at the
probed address itself but on another port, moves the port path there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import ssl
from collections.abc import Callable, Iterable

from agent.ddr import discover
from agent.dns import wire
from agent.dns.transport import Connection, starttls, udp_exchange
from agent.errors import (
    CertificateRejected,
    Closed,
    MalformedMessage,
    MismatchedMessage,
    Refused,
    Reset,
    Timeout,
    TLSHandshakeFailed,
    TransportError,
    UsageError,
)
from agent.model import (
    AuthSource,
    AuthSpec,
    DdrResult,
    Designation,
    Failure,
    Method,
    Order,
    Path,
    PathOutcome,
    ProbeResult,
    ProbeSettings,
    Timings,
    TLSInfo,
)
from agent.tls import check_peer, context_for

LOG = logging.getLogger(__name__)

MAX_CONCURRENT_PROBES = 32

_FAILURE_OF: dict[type[TransportError], Failure] = {
    Timeout: Failure.TIMEOUT,
    Refused: Failure.REFUSED,
    Reset: Failure.RESET,
    Closed: Failure.CLOSED,
    TLSHandshakeFailed: Failure.TLS_HANDSHAKE_FAILED,
    CertificateRejected: Failure.CERT_NOT_AUTHENTICATED,
    MalformedMessage: Failure.MALFORMED_RESPONSE,
    MismatchedMessage: Failure.MISMATCHED_RESPONSE,
}


def failure_of(exc: TransportError) -> Failure:
    for cls in type(exc).__mro__:
        if cls in _FAILURE_OF:
            return _FAILURE_OF[cls]
    return Failure.UNREACHABLE


class _Trace:
    """The progress of one path, filled in as it goes; survives cancellation."""

    def __init__(self, path: Path, probe_t0: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.path = path
        self.t0 = self.loop.time()
        self.started_ms = (self.t0 - probe_t0) * 1000
        self.handshake_done = asyncio.Event()
        self.marks: dict[str, float] = {}
        self.tls: TLSInfo | None = None
        self.session: ssl.SSLSession | None = None
        self.to_in_response: bool | None = None
        self.rcode: str | None = None

    def mark(self, what: str) -> None:
        self.marks[what] = (self.loop.time() - self.t0) * 1000
        if what == "handshake":
            self.handshake_done.set()

    def outcome(
        self, method: Method, failure: Failure | None = None, detail: str = ""
    ) -> PathOutcome:
        m = self.marks
        return PathOutcome(
            path=self.path,
            method=method,
            failure=failure,
            detail=detail,
            started_ms=round(self.started_ms, 3),
            timings=Timings(
                connect_ms=_r(m.get("connect")),
                starttls_ms=_r(m.get("starttls")),
                handshake_ms=_r(m.get("handshake")),
                answer_ms=_r(m.get("answer")),
            ),
            tls=self.tls,
            to_in_response=self.to_in_response,
            rcode=self.rcode,
        )


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


async def _handshake(
    conn: Connection,
    address: str,
    spec: AuthSpec,
    deadline: float,
    trace: _Trace,
    *,
    session: ssl.SSLSession | None = None,
) -> bool:
    """TLS on `conn`, then authentication per profile. Returns whether the session resumed."""
    tls = await conn.start_tls(
        context_for(spec), deadline, server_hostname=spec.auth_name, session=session
    )
    trace.mark("handshake")
    if session is not None and tls.session_reused:
        return True
    try:
        trace.tls = check_peer(tls, address, spec)
    except CertificateRejected as exc:
        trace.tls = exc.tls if isinstance(exc.tls, TLSInfo) else None
        raise
    return tls.session_reused


async def _real_query(
    conn: Connection, settings: ProbeSettings, deadline: float, trace: _Trace
) -> None:
    """One real query inside TLS: proves the server serves DNS, not just TLS."""
    query = wire.probe_query(settings.probe_name, settings.probe_type)
    await conn.send_message(query.to_wire(), deadline)
    try:
        answer = await conn.recv_message(deadline)
    except Timeout as exc:
        raise Timeout("no answer to the probe query inside TLS") from exc
    response = wire.parse_response(answer, query)
    trace.mark("answer")
    trace.rcode = wire.rcode_text(response)
    assert conn.tls is not None
    trace.session = conn.tls.session


async def _starttls(conn: Connection, deadline: float, trace: _Trace) -> bool:
    """The cleartext TO exchange; True when TO came back set."""
    try:
        response = await starttls(conn, deadline)
    except Timeout as exc:
        raise _NoToAnswer(
            "no answer to the TO query (a middlebox dropping unknown flags?)"
        ) from exc
    trace.mark("starttls")
    trace.rcode = wire.rcode_text(response)
    trace.to_in_response = wire.has_to(response)
    return trace.to_in_response


class _NoToAnswer(TransportError):
    reason = "to-no-answer"


class _ToHandshakeFailed(TransportError):
    reason = "to-handshake-failed"


_FAILURE_OF[_NoToAnswer] = Failure.TO_NO_ANSWER
_FAILURE_OF[_ToHandshakeFailed] = Failure.TO_HANDSHAKE_FAILED


async def _open(
    address: str, port: int, settings: ProbeSettings, deadline: float, trace: _Trace
) -> Connection:
    if trace.loop.time() >= deadline:
        raise Timeout("not tried: the probe deadline had passed")
    connect_deadline = min(deadline, trace.t0 + settings.connect_timeout)
    conn = await Connection.open(address, port, connect_deadline)
    trace.mark("connect")
    return conn


async def _port_path(
    address: str, settings: ProbeSettings, deadline: float, trace: _Trace
) -> PathOutcome:
    conn = await _open(address, settings.tls_port, settings, deadline, trace)
    try:
        await _handshake(conn, address, settings.auth, deadline, trace)
        await _real_query(conn, settings, deadline, trace)
    finally:
        conn.close()
    return trace.outcome(Method.TLS_PORT)


async def _upgrade_path(
    address: str, settings: ProbeSettings, deadline: float, trace: _Trace
) -> PathOutcome:
    conn = await _open(address, settings.dns_port, settings, deadline, trace)
    try:
        if not await _starttls(conn, deadline, trace):
            return trace.outcome(
                Method.TCP_PLAIN,
                Failure.NO_UPGRADE,
                "TO clear in the answer: the server does not upgrade",
            )
        try:
            await _handshake(conn, address, settings.auth, deadline, trace)
        except (TLSHandshakeFailed, Timeout, Closed, Reset) as exc:
            raise _ToHandshakeFailed(f"TO answered, then {exc.detail}") from exc
        await _real_query(conn, settings, deadline, trace)
    finally:
        conn.close()
    return trace.outcome(Method.TLS_UPGRADE)


async def _run_path(
    address: str, settings: ProbeSettings, deadline: float, trace: _Trace
) -> PathOutcome:
    run = _port_path if trace.path is Path.PORT else _upgrade_path
    try:
        return await run(address, settings, deadline, trace)
    except TransportError as exc:
        return trace.outcome(Method.UNREACHABLE, failure_of(exc), exc.detail)
    except Exception as exc:  # isolation boundary: a bug in one path must not sink the probe
        LOG.exception("probe of %s via %s failed unexpectedly", address, trace.path)
        return trace.outcome(Method.UNREACHABLE, Failure.UNREACHABLE, f"internal error: {exc!r}")


async def _udp_hint(
    address: str, settings: ProbeSettings, probe_t0: float, deadline: float
) -> PathOutcome:
    """The STARTTLS dummy over UDP: does the server answer, and does it set TO?"""
    trace = _Trace(Path.UDP, probe_t0)
    until = min(deadline, trace.t0 + settings.udp_timeout)
    query = wire.starttls_query()
    resend_at = trace.t0 + settings.udp_timeout / 2  # one retransmission
    try:
        response = await udp_exchange(address, settings.dns_port, query, until, resend_at)
    except TransportError as err:
        return trace.outcome(Method.UNREACHABLE, failure_of(err), err.detail)
    trace.mark("answer")
    trace.to_in_response = wire.has_to(response)
    trace.rcode = wire.rcode_text(response)
    return trace.outcome(Method.UDP_PLAIN)


async def _resumes(
    address: str,
    settings: ProbeSettings,
    winner: PathOutcome,
    *,
    session: ssl.SSLSession | None,
    deadline: float,
    probe_t0: float,
) -> bool | None:
    """Reconnect the way that worked, offering the saved session; did the server resume it?"""
    if session is None:
        return False
    trace = _Trace(winner.path, probe_t0)
    port = settings.tls_port if winner.path is Path.PORT else settings.dns_port
    try:
        conn = await _open(address, port, settings, deadline, trace)
        try:
            if winner.path is Path.UPGRADE and not await _starttls(conn, deadline, trace):
                return False
            resumed = await _handshake(
                conn, address, settings.auth, deadline, trace, session=session
            )
            await _real_query(conn, settings, deadline, trace)  # and it still serves DNS
            return resumed
        finally:
            conn.close()
    except TransportError as exc:
        LOG.debug("resumption check of %s failed: %s", address, exc.detail)
        return None if isinstance(exc, Timeout) else False


_RANK = {
    Method.TLS_PORT: 0,
    Method.TLS_UPGRADE: 0,
    Method.TCP_PLAIN: 2,
    Method.UDP_PLAIN: 3,
    Method.UNREACHABLE: 9,
}


async def _race(
    address: str, settings: ProbeSettings, t0: float, deadline: float
) -> tuple[list[PathOutcome], dict[Path, _Trace]]:
    """Run the two TCP paths happy-eyeballs style until one gives acceptable TLS or both end.

    The second path starts when the first has not finished its TLS handshake by
    `fallback_delay` after the race began, or as soon as the first ends without TLS.
    """
    loop = asyncio.get_running_loop()
    race_t0 = loop.time()  # DDR may have taken some of the probe's time already
    first, second = (Path.PORT, Path.UPGRADE)
    if settings.order is Order.UPGRADE_FIRST:
        first, second = second, first
    traces: dict[asyncio.Task[PathOutcome], _Trace] = {}

    def start(path: Path) -> asyncio.Task[PathOutcome]:
        trace = _Trace(path, t0)
        run = _run_path(address, settings, deadline, trace)
        task = asyncio.create_task(run, name=f"probe {address} {path}")
        traces[task] = trace
        return task

    first_task = start(first)
    first_handshake = traces[first_task].handshake_done
    second_task: asyncio.Task[PathOutcome] | None = None
    pending = {first_task}
    outcomes: list[PathOutcome] = []
    try:
        while pending:
            timeout = None
            if second_task is None and not first_handshake.is_set():
                timeout = max(0.0, race_t0 + settings.fallback_delay - loop.time())
            done, pending = await asyncio.wait(
                pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            outcomes.extend(t.result() for t in done)
            if any(o.method.private for o in outcomes):
                break
            if second_task is None and (done or not first_handshake.is_set()):
                second_task = start(second)
                pending.add(second_task)
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for task in pending:
        trace = traces[task]
        if trace.handshake_done.is_set():
            detail = "handshake done, "
        elif "connect" in trace.marks:
            detail = "connected, "
        else:
            detail = ""
        detail += "another path succeeded first"
        outcomes.append(trace.outcome(Method.UNREACHABLE, Failure.ABANDONED, detail))
    return outcomes, {tr.path: tr for tr in traces.values()}


def designated_port(address: str, settings: ProbeSettings, ddr: DdrResult) -> Designation | None:
    """The designation the port path should use instead of `settings.tls_port`: usable (as
    RFC 9462 allows), at the probed address itself (a designation is the designating
    resolver's own: section 4.1), verified ones first, then by SVCB priority; None when the
    best one is on the port already probed."""
    here = [d for d in ddr.usable if d.address == address]
    if not here:
        return None
    best = min(here, key=lambda d: (not d.verified, d.priority))
    return best if best.port != settings.tls_port else None


def _designated(settings: ProbeSettings, d: Designation) -> ProbeSettings:
    """The port path on the designation's port; a verified designation's name (its
    certificate names it and the resolver's address) is the name asked for, as one the
    network handed out, unless a name is already given."""
    auth = settings.auth
    if d.verified and not auth.auth_name:
        auth = dataclasses.replace(auth, auth_name=d.adn, name_source=AuthSource.NETWORK)
    return dataclasses.replace(settings, tls_port=d.port, auth=auth)


async def probe(address: str, settings: ProbeSettings | None = None) -> ProbeResult:
    """Probe one resolver. Raises only UsageError (not an IP address); everything else is data."""
    settings = settings or ProbeSettings()
    try:
        address = str(ipaddress.ip_address(address))
    except ValueError as exc:
        raise UsageError(f"{address!r} is not an IP address") from exc
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    deadline = t0 + settings.timeout
    udp_task = asyncio.create_task(_udp_hint(address, settings, t0, deadline))
    ddr: DdrResult | None = None
    moved: Designation | None = None
    try:
        if settings.ddr:
            ddr = await discover(address, settings, deadline)
            moved = designated_port(address, settings, ddr)
            if moved is not None:
                LOG.info("%s: TLS port %d as designated (DDR)", address, moved.port)
                settings = _designated(settings, moved)
        outcomes, traces = await _race(address, settings, t0, deadline)
    except BaseException:
        udp_task.cancel()
        raise

    best = min(outcomes, key=lambda o: _RANK[o.method])
    udp: PathOutcome | None = None
    if not best.method.private:  # without TLS, the UDP answer may be all there is
        udp = await udp_task
        best = min([*outcomes, udp], key=lambda o: _RANK[o.method])
    decided = loop.time()

    resumption: bool | None = None
    winner = traces.get(best.path)
    if best.method.private and settings.check_resumption and winner is not None:
        resumption = await _resumes(
            address, settings, best, session=winner.session, deadline=deadline, probe_t0=t0
        )
    if udp is None:
        udp = await udp_task  # ran all along, bounded by udp_timeout
    outcomes.append(udp)

    return ProbeResult(
        address=address,
        profile=settings.auth.profile,
        method=best.method,
        acceptable=best.method.private,
        auth=best.tls.auth if best.tls and best.method.private else None,
        tls=best.tls if best.method.private else None,
        timings=best.timings,
        decided_ms=round((decided - t0) * 1000, 3),
        total_ms=round((loop.time() - t0) * 1000, 3),
        resumption=resumption,
        udp_to_hint=udp.to_in_response,
        paths=tuple(sorted(outcomes, key=lambda o: o.started_ms)),
        auth_source=best.tls.auth_source if best.tls and best.method.private else None,
        ddr=ddr,
        tls_port=moved.port if moved is not None and best.method is Method.TLS_PORT else None,
    )


async def probe_many(
    addresses: Iterable[str],
    settings: ProbeSettings | None = None,
    on_result: Callable[[ProbeResult], None] | None = None,
) -> list[ProbeResult]:
    """Probe resolvers concurrently (bounded); each result handed to `on_result` as soon as
    it is decided (the command prints it then); all of them in the order given at the end."""
    limit = asyncio.Semaphore(MAX_CONCURRENT_PROBES)

    async def one(address: str) -> ProbeResult:
        async with limit:
            result = await probe(address, settings)
        if on_result is not None:
            on_result(result)
        return result

    return list(await asyncio.gather(*(one(a) for a in addresses)))


def unacceptable(results: Iterable[ProbeResult]) -> list[ProbeResult]:
    return [r for r in results if not r.acceptable]
