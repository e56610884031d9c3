"""The hostile-upstream matrix: one tunnel against a test peer that misbehaves, per behaviour.

One world on loopback: the test peer as its own process (TLS on a free port, its faults
switched through a control file) and one `dnstls-agent tunnel --profile strict` in front of
it (query_timeout QUERY_TIMEOUT). Per row the fault comes on, a client sends QUERIES unique
names over STREAM_S seconds (UDP, dnspython), the fault goes off, and a probe query runs
until the tunnel answers again. Rows run in sequence against the same tunnel and peer.

A row says what "hostile input never stops the agent" means: every client query got an
answer or SERVFAIL within the tunnel's deadline (plus SLACK); the tunnel's CPU time over the
row stayed under CPU_LIMIT (no busy loop on junk); and it answered again within
RECOVER_LIMIT of the fault going off.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.message
import dns.query
import dns.rcode

from tests.lab.certs import CA
from tests.lab.peer import Fault, spawn, write_control
from tests.lab.proc import Process
from tests.lab.tunnel import TunnelProcess

HOST = "127.0.0.1"
PEER_NAME = "peer.hostile.test"
QUERY_TIMEOUT = 2.0  # the tunnel's --query-timeout: then SERVFAIL
SLACK = 0.75  # a loaded machine's allowance past the deadline
QUERIES = 40
STREAM_S = 2.0
SETTLE_S = 0.3  # after writing the control file (polled every 50 ms) before the stream
CPU_LIMIT = 1.0  # tunnel CPU seconds per row
RECOVER_LIMIT = 8.0  # seconds from the fault off to an answer: a connection left silent
#  (huge-length, stall-tls) is dropped after 4 s quiet and a liveness probe, so ~4-5 s
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Row:
    key: str
    doc: str
    faults: frozenset[Fault] = frozenset()
    strike_after: int = 0


ROWS = (
    Row("healthy", "no fault: the baseline"),
    Row("garbage-frames", "each answer a frame of random bytes",
        frozenset({Fault.GARBAGE_FRAMES})),
    Row("wrong-ids", "answers under IDs never asked (ID ^ 0x5A5A)",
        frozenset({Fault.MISMATCHED})),
    Row("echo", "the query sent back as the answer", frozenset({Fault.ECHO})),
    Row("huge-length", "a frame header announcing 65535 bytes, 8 bytes, then silence",
        frozenset({Fault.HUGE_LENGTH})),
    Row("close-on-query", "TLS: read a query, close, answer nothing",
        frozenset({Fault.CLOSE_ON_QUERY})),
    Row("close-notify-in-flight", "TLS: hold 3 queries, then close_notify (asyncio's TLS "
        "close) with all 3 owed", frozenset({Fault.CLOSE_IN_FLIGHT})),
    Row("reset-mid-answer", "TLS: half an answer frame, then RST",
        frozenset({Fault.RESET_MID_ANSWER})),
    Row("stall-tls", "853 accepts TCP, never handshakes; open connections go silent",
        frozenset({Fault.STALL_TLS})),
)  # fmt: skip


@dataclass
class Result:
    row: str
    sent: int = 0
    answered: int = 0  # NOERROR with an answer
    servfail: int = 0
    other: int = 0  # any other rcode, in time
    late: int = 0  # no answer, or one after the deadline
    cpu: float = 0.0  # tunnel CPU seconds over the row
    recovered: float | None = None  # seconds from the fault off to an answer; None: never
    seconds: float = 0.0
    error: str | None = None

    def failures(self) -> list[str]:
        if self.error is not None:
            return [f"the row did not run: {self.error}"]
        out = []
        if self.sent == 0:
            out.append("no query sent")
        if self.late:
            out.append(f"{self.late} of {self.sent} queries late or unanswered")
        if self.row == "healthy" and self.answered != self.sent:
            out.append(f"only {self.answered} of {self.sent} answered without a fault")
        if self.row != "healthy" and self.answered == self.sent:
            out.append("every query answered: the fault never struck, the row proves nothing")
        if self.cpu >= CPU_LIMIT:
            out.append(f"tunnel CPU {self.cpu:.2f} s >= {CPU_LIMIT} s")
        if self.recovered is None or self.recovered > RECOVER_LIMIT:
            out.append(f"not answering {RECOVER_LIMIT} s after the fault went off")
        return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


async def _ask(port: int, name: str, deadline: float) -> str:
    """answered | servfail | other | late, for one query with `deadline` seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        r = await dns.asyncquery.udp(
            dns.message.make_query(name, "A"), HOST, port=port, timeout=deadline
        )
    except (dns.exception.DNSException, OSError):
        return "late"
    if loop.time() - start > deadline:
        return "late"
    if r.rcode() == dns.rcode.NOERROR and r.answer:
        return "answered"
    return "servfail" if r.rcode() == dns.rcode.SERVFAIL else "other"


async def _stream(port: int, prefix: str) -> list[str]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i in range(QUERIES):
        name = f"{prefix}-{i:02d}.lab.test"
        tasks.append(asyncio.create_task(_ask(port, name, QUERY_TIMEOUT + SLACK)))
        await asyncio.sleep(max(0.0, start + (i + 1) * STREAM_S / QUERIES - loop.time()))
    return list(await asyncio.gather(*tasks))


def _recover(port: int) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < RECOVER_LIMIT + 2:
        q = dns.message.make_query(f"rc-{secrets.token_hex(4)}.lab.test", "A")
        try:
            r = dns.query.udp(q, HOST, port=port, timeout=1.0)
            if r.rcode() == dns.rcode.NOERROR and r.answer:
                return time.monotonic() - start
        except (dns.exception.DNSException, OSError):
            pass
        time.sleep(0.1)
    return None


class World:
    """The peer (its own process, faults through a control file) and the tunnel."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.control = directory / "faults.json"
        ca = CA.create(directory / "ca")
        cert = ca.issue(directory, "peer", ips=(HOST,), names=(PEER_NAME,))
        self.peer: Process | None = None
        self.tunnel: TunnelProcess | None = None
        try:
            self.peer, ports = spawn(
                directory / "peer.log", "--host", HOST, "--cert", str(cert.cert),
                "--key", str(cert.key), "--control", str(self.control),
            )  # fmt: skip
            self.tunnel = TunnelProcess.start(  # port 0: the tunnel's own pick, never taken
                ["--upstream", f"tls:{HOST}@{ports['tls_port']}#{PEER_NAME}", "--profile",
                 "strict", "--ca-file", str(ca.path), "--query-timeout", str(QUERY_TIMEOUT)],
                directory / "tunnel.log", host=HOST, port=0,
            )  # fmt: skip
            self.port = self.tunnel.port
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for p in (self.tunnel, self.peer):
            if p is not None:
                p.stop()

    def run_row(self, row: Row) -> Result:
        assert self.tunnel is not None
        res = Result(row.key)
        t0 = time.monotonic()
        try:
            pid = self.tunnel.proc.pid
            cpu0 = cpu_seconds(pid)
            write_control(self.control, row.faults, strike_after=row.strike_after)
            time.sleep(SETTLE_S)
            outcomes = asyncio.run(_stream(self.tunnel.port, f"h-{secrets.token_hex(3)}"))
            res.cpu = cpu_seconds(pid) - cpu0
            write_control(self.control, ())
            res.recovered = _recover(self.tunnel.port)
            res.sent = len(outcomes)
            res.answered = outcomes.count("answered")
            res.servfail = outcomes.count("servfail")
            res.other = outcomes.count("other")
            res.late = outcomes.count("late")
            if not self.tunnel.proc.alive():
                res.error = f"the tunnel died; log: {self.tunnel.proc.tail(5)}"
        except Exception as exc:
            res.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        res.seconds = time.monotonic() - t0
        return res


def run_matrix(
    directory: Path,
    rows: Sequence[Row] = ROWS,
    on_row: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Every row in sequence against one tunnel and peer."""
    world = World(directory)
    out = []
    try:
        for row in rows:
            res = world.run_row(row)
            out.append(res)
            if on_row is not None:
                on_row(res)
    finally:
        world.close()
    return out


def table(results: Sequence[Result]) -> str:
    width = max(len(r.row) for r in results) + 2
    head = (f"{'row':{width}}{'answered':>9}{'servfail':>9}{'other':>6}{'none/late':>10}"
            f"{'CPU s':>7}{'recovered (s)':>15}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in results:
        rec = "never" if r.recovered is None else f"{r.recovered:.2f}"
        mark = "  !" if r.failures() else ""
        lines.append(
            f"{r.row:{width}}{r.answered:>9}{r.servfail:>9}{r.other:>6}{r.late:>10}"
            f"{r.cpu:>7.2f}{rec:>15}{mark}"
        )
    return "\n".join(lines)
