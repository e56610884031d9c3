"""The fault matrix: the real agent against a chaos peer, per fault and per profile.

One world per fault (a row): two namespaces joined by a veth (netns.Lab). The network
side runs the test peer on 198.51.100.1 and on 2001:db8::1 (TLS on 853, the upgrade on
53, plain DNS; one control file switches the faults of both) and tcpdump on its end of
the veth. The machine side runs one `dnstls-agent run` per column (opportunistic with and
without cleartext_fallback, encrypted, strict), each handed both peers by a dhclient lease
file (no NetworkManager, no stub to point), and a client that sends every agent's tunnel
one unique name each 50 ms. The fault comes on part-way (or is there from the start).

A cell says what a user would care about: the client's names seen in cleartext on the
wire, the client's queries that got no answer (or SERVFAIL), and whether the agent told
(status warnings or a tunnel mode other than private, polled during the row, or a warning
in its log). `verdict` holds a cell to the privacy rule: never cleartext, except under
opportunistic with the fallback on after every private path failed, and then told.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode

from agent.control import ControlError, ask
from tests.lab.agentproc import AgentProcess
from tests.lab.capture import Capture, leaked_with_prefix
from tests.lab.certs import CA, issue
from tests.lab.netns import SRV_IP6S, SRV_IPS, Lab
from tests.lab.peer import Fault, spawn, write_control
from tests.lab.proc import need

PEERS = (SRV_IPS[0], SRV_IP6S[0])
STUB = "127.0.0.153"
FIRST_PORT = 5301  # the tunnels listen on STUB:5301, :5302, ... (one per column)
INTERVAL = 0.05  # one query per agent every 50 ms
HEALTHY_S = 1.5  # queries before the fault comes on
FAULTED_S = 3.0  # queries after
QUERY_TIMEOUT = 5.0  # the agents' query_timeout (the default): then SERVFAIL
CLIENT_TIMEOUT = QUERY_TIMEOUT + 0.5  # the client's wait for an answer
READY_TIMEOUT = 12.0  # every agent has probed both peers
TOLD_MODES = frozenset({"cleartext", "down"})
# what tells in the log: the engine's alerts ("WARNING agent.engine: ALERT: text") and the
# tunnel's mode changes away from private
TOLD_LOG = re.compile(
    r"^(?:WARNING|ERROR) (?:agent\.engine: [a-z][a-z-]*: "
    r"|\S+: tunnel mode \S+ -> (?:cleartext|down))",
    re.M,
)


@dataclass(frozen=True)
class Column:
    key: str
    profile: str
    fallback: bool = True  # cleartext_fallback (opportunistic only)

    @property
    def may_fall_back(self) -> bool:
        return self.profile == "opportunistic" and self.fallback


COLUMNS = (
    Column("opp+fallback", "opportunistic", True),
    Column("opp-no-fallback", "opportunistic", False),
    Column("encrypted", "encrypted"),
    Column("strict", "strict"),
)


@dataclass(frozen=True)
class Row:
    key: str
    doc: str
    mid_run: frozenset[Fault] = frozenset()  # switched on after HEALTHY_S
    at_start: frozenset[Fault] = frozenset()  # the peers start with these
    delay: float = 0.0
    strike_after: int = 0
    bad_cert: bool = False  # the peers show a self-signed certificate for another address
    private_fails: bool = False  # every private path fails: opportunistic may go cleartext


ROWS = (
    Row("healthy", "no fault: the baseline"),
    Row("slow", "every answer 3 s late (> 2 s quiet before a liveness probe, < the deadline)",
        mid_run=frozenset({Fault.SLOW}), delay=3.0),
    Row("blackhole-853", "853 black-holed mid-run: open connections silent, SYNs dropped",
        mid_run=frozenset({Fault.BLACKHOLE_TLS})),
    Row("blackhole-853-at-start", "853 black-holed from the start (the probe sees it)",
        at_start=frozenset({Fault.BLACKHOLE_TLS})),
    Row("stall-853", "853 accepts and never handshakes, mid-run; open connections silent",
        mid_run=frozenset({Fault.STALL_TLS})),
    Row("stall-853-at-start", "853 accepts and never handshakes, from the start",
        at_start=frozenset({Fault.STALL_TLS})),
    Row("reset-mid-answer", "TLS: 5 answers per connection, then half a frame and RST",
        mid_run=frozenset({Fault.RESET_MID_ANSWER}), strike_after=5),
    Row("close-in-flight", "TLS: 5 answers per connection, then closed with 3 unanswered",
        mid_run=frozenset({Fault.CLOSE_IN_FLIGHT}), strike_after=5),
    Row("bad-cert", "a certificate that does not match (self-signed, another address)",
        bad_cert=True),
    Row("tls-dropped", "mid-run: TLS reset and refused everywhere, plain DNS answers",
        mid_run=frozenset({Fault.DROP_TLS}), private_fails=True),
)  # fmt: skip


@dataclass
class Cell:
    row: str
    column: str
    sent: int = 0
    lost: int = 0
    cleartext: list[str] = field(default_factory=list)  # the client's names seen in clear
    told_by: list[str] = field(default_factory=list)  # status:ALERT, mode:MODE, log
    captured: int = 0  # packets with a payload on the wire (the whole world's): 0 proves nothing
    error: str | None = None

    @property
    def told(self) -> bool:
        return bool(self.told_by)

    def text(self) -> str:
        if self.error is not None:
            return "error"
        return f"{len(self.cleartext)}/{self.lost}/{'yes' if self.told else 'no'}"


# Answers a fault may cost while a private path still works: a loaded machine (the matrix
# runs three worlds of four agents at once on two cores) can stretch a reconnect past a
# deadline now and then; more than this is a failover that does not work.
LOST_WHILE_PRIVATE = 2


def private_works(row: Row, column: Column) -> bool:
    """Does some private path still work in this cell (so no answer need be lost)?"""
    return not row.private_fails and not (row.bad_cert and column.profile == "strict")


def verdict(row: Row, column: Column, cell: Cell) -> str | None:
    """None when the cell keeps the rules, else why not: privacy (no cleartext but under
    opportunistic with the fallback after every private path failed, and then told),
    service (answers lost only where no private path works, and then told)."""
    if cell.error is not None:
        return f"the row did not run: {cell.error}"
    if cell.sent == 0 or cell.captured == 0:
        return "no query sent or nothing captured: the cell proves nothing"
    if row.key == "healthy" and cell.lost:
        return f"{cell.lost} of {cell.sent} answers lost without any fault"
    if private_works(row, column) and cell.lost > LOST_WHILE_PRIVATE:
        return f"{cell.lost} of {cell.sent} answers lost while a private path worked"
    if not private_works(row, column) and cell.lost and not cell.told:
        return f"{cell.lost} answers lost (no private path) and the user was not told"
    if not cell.cleartext:
        return None
    n = len(cell.cleartext)
    if not column.may_fall_back:
        return f"{n} names in cleartext under {column.key}"
    if not row.private_fails:
        return f"{n} names in cleartext while a private path still worked"
    if not cell.told:
        return f"{n} names in cleartext and the user was not told"
    return None


# -- one row -----------------------------------------------------------------------------------


def _safe(key: str) -> str:
    """A key as a file name that is also safe in a D-Bus address (the agent's nm_bus)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)


def _agent_config(column: Column, port: int, directory: Path, ca: Path) -> str:
    return f"""listen = ["{STUB}:{port}"]
lease_dirs = ["{directory}/leases"]
nm_bus = "unix:path={directory}/no-bus"
profile = "{column.profile}"
cleartext_fallback = {"true" if column.fallback else "false"}
ca_file = "{ca}"
probe_timeout = 3.0
query_timeout = {QUERY_TIMEOUT}
"""


def _status(agent: AgentProcess) -> dict[str, Any] | None:
    try:
        status: dict[str, Any] = ask(agent.dir / "run" / "control.sock", {"command": "status"}, 1)[
            "status"
        ]
    except ControlError:
        return None
    return status


def _probed(status: dict[str, Any] | None) -> bool:
    if status is None:
        return False
    resolvers = [r for i in status["interfaces"] for r in i["resolvers"]]
    return len(resolvers) >= len(PEERS) and all(r["method"] and not r["probing"] for r in resolvers)


def _told(status: dict[str, Any] | None) -> set[str]:
    if status is None:
        return set()
    out = {f"status:{w['alert']}" for w in status["warnings"]}
    mode = status["tunnel"]["mode"]
    return out | ({f"mode:{mode}"} if mode in TOLD_MODES else set())


def _veth(lab: Lab) -> str:
    assert lab.cli is not None
    out = lab.cli.run([need("ip"), "-o", "link", "show", "type", "veth"]).stdout
    return out.split(":")[1].strip().split("@")[0]


async def _ask(port: int, name: str) -> bool:
    """True when the tunnel answered with an address."""
    query = dns.message.make_query(name, "A")
    try:
        r = await dns.asyncquery.udp(query, STUB, port=port, timeout=CLIENT_TIMEOUT)
    except (dns.exception.DNSException, OSError):
        return False
    return r.rcode() == dns.rcode.NOERROR and bool(r.answer)


async def _drive(
    ports: Sequence[int],
    prefixes: Sequence[str],
    names: Sequence[list[str]],
    switch: Callable[[], None] | None,
    watch: Callable[[], None],
) -> list[list[bool]]:
    """The client (run inside the machine's namespace): each agent's stream of names, the
    fault switched on part-way, the agents' status polled meanwhile."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: list[list[asyncio.Task[bool]]] = [[] for _ in ports]
    watching = asyncio.create_task(_watch(watch))
    count = int((HEALTHY_S + FAULTED_S) / INTERVAL)
    for i in range(count):
        if switch is not None and i == int(HEALTHY_S / INTERVAL):
            await asyncio.to_thread(switch)
        for k, port in enumerate(ports):
            name = f"{prefixes[k]}-{i:03d}.lab.test"
            names[k].append(name)
            tasks[k].append(asyncio.create_task(_ask(port, name)))
        await asyncio.sleep(max(0.0, start + (i + 1) * INTERVAL - loop.time()))
    out = [list(await asyncio.gather(*ts)) for ts in tasks]
    watching.cancel()
    return out


async def _watch(watch: Callable[[], None]) -> None:
    while True:
        await asyncio.to_thread(watch)
        await asyncio.sleep(0.2)


def run_row(row: Row, columns: Sequence[Column], ca: CA, directory: Path) -> list[Cell]:
    """One world, one agent per column; a Cell each (with `error` set if the world broke)."""
    directory.mkdir(parents=True, exist_ok=True)
    cells = [Cell(row.key, c.key) for c in columns]
    try:
        _run_row(row, columns, ca, directory, cells)
    except Exception as exc:
        for cell in cells:
            cell.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return cells


def _run_row(
    row: Row, columns: Sequence[Column], ca: CA, directory: Path, cells: list[Cell]
) -> None:
    if row.bad_cert:
        cert = issue(directory, "peer-bad", ips=("203.0.113.9",))
    else:
        cert = ca.issue(directory, "peer", ips=PEERS)
    control = directory / "faults.json"
    with Lab() as lab:
        assert lab.srv is not None and lab.cli is not None
        for n, host in enumerate(PEERS):
            argv = ["--host", host, "--dns-port", "53", "--tls-port", "853",
                    "--cert", str(cert.cert), "--key", str(cert.key), "--control", str(control),
                    "--strike-after", str(row.strike_after), "--delay", str(row.delay)]  # fmt: skip
            for fault in sorted(row.at_start):
                argv += ["--fault", str(fault)]
            spawn(directory / f"peer{n}.log", *argv, netns=lab.srv)
        capture = Capture(lab.srv, lab.veth_srv, directory / "wire.pcap")
        leases = directory / "leases"
        leases.mkdir(exist_ok=True)
        ifname = _veth(lab)
        (leases / f"dhclient.{ifname}.leases").write_text(
            f'lease {{\n  interface "{ifname}";\n  option domain-name-servers '
            f"{', '.join(PEERS)};\n  option dhcp-server-identifier {PEERS[0]};\n}}\n"
        )
        agents = [
            AgentProcess(
                lab.cli,
                directory / _safe(c.key),
                _agent_config(c, FIRST_PORT + i, directory, ca.path),
            )
            for i, c in enumerate(columns)
        ]
        end = time.monotonic() + READY_TIMEOUT
        waiting = list(agents)
        while waiting and time.monotonic() < end:
            waiting = [a for a in waiting if a.proc.alive() and not _probed(_status(a))]
            time.sleep(0.1)
        if waiting:
            raise RuntimeError(
                f"{waiting[0].dir.name}: not probed after {READY_TIMEOUT}s; "
                f"log: {waiting[0].proc.tail(5)}"
            )
        log_from = [a.proc.log.stat().st_size for a in agents]
        told: list[set[str]] = [set() for _ in agents]

        def watch() -> None:
            for k, a in enumerate(agents):
                told[k] |= _told(_status(a))

        def switch() -> None:
            write_control(control, row.mid_run, delay=row.delay, strike_after=row.strike_after)

        prefixes = [f"fm{k}-{secrets.token_hex(3)}" for k in range(len(agents))]
        names: list[list[str]] = [[] for _ in agents]
        ports = [FIRST_PORT + k for k in range(len(agents))]
        answered = lab.cli.call(
            lambda: asyncio.run(
                _drive(ports, prefixes, names, switch if row.mid_run else None, watch)
            ),
            timeout=HEALTHY_S + FAULTED_S + CLIENT_TIMEOUT + 30,
        )
        watch()
        pkts = capture.stop()
        for k, (cell, a) in enumerate(zip(cells, agents, strict=True)):
            cell.captured = sum(1 for p in pkts if p.payload)
            cell.sent = len(names[k])
            cell.lost = answered[k].count(False)
            cell.cleartext = sorted(leaked_with_prefix(pkts, names[k], prefixes[k]))
            with a.proc.log.open("rb") as logf:
                logf.seek(log_from[k])
                log = logf.read().decode(errors="replace")
            if TOLD_LOG.search(log):
                told[k].add("log")
            cell.told_by = sorted(told[k])
            if not a.proc.alive():
                cell.error = f"the agent died; log: {a.proc.tail(3)}"


# -- the matrix --------------------------------------------------------------------------------


@dataclass
class Matrix:
    rows: Sequence[Row]
    columns: Sequence[Column]
    cells: dict[tuple[str, str], Cell]
    seconds: float
    row_seconds: dict[str, float]

    def cell(self, row: str, column: str) -> Cell:
        return self.cells[(row, column)]

    def failures(self) -> dict[tuple[str, str], str]:
        out = {}
        for r in self.rows:
            for c in self.columns:
                why = verdict(r, c, self.cells[(r.key, c.key)])
                if why is not None:
                    out[(r.key, c.key)] = why
        return out

    def table(self) -> str:
        """Rows x columns, each cell cleartext/lost/told; `!` marks a broken rule."""
        width = max(len(r.key) for r in self.rows) + 2
        cols = [max(len(c.key), 14) + 2 for c in self.columns]
        head = "fault".ljust(width) + "".join(
            c.key.ljust(w) for c, w in zip(self.columns, cols, strict=True)
        )
        lines = [head, "-" * len(head.rstrip())]
        bad = self.failures()
        for r in self.rows:
            line = r.key.ljust(width)
            for c, w in zip(self.columns, cols, strict=True):
                cell = self.cells[(r.key, c.key)]
                mark = " !" if (r.key, c.key) in bad else ""
                line += (cell.text() + mark).ljust(w)
            lines.append(line.rstrip() + f"   ({self.row_seconds[r.key]:.1f} s)")
        return "\n".join(lines)


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise PermissionError("the fault matrix needs root (network namespaces)")
    for program in ("ip", "tcpdump"):
        need(program)


def run_matrix(
    directory: Path,
    rows: Sequence[Row] = ROWS,
    columns: Sequence[Column] = COLUMNS,
    *,
    parallel: int = 3,
    on_row: Callable[[Row, list[Cell], float], None] | None = None,
) -> Matrix:
    """Every row in its own world, `parallel` worlds at a time."""
    check_prerequisites()
    ca = CA.create(directory / "ca")
    t0 = time.monotonic()
    cells: dict[tuple[str, str], Cell] = {}
    row_seconds: dict[str, float] = {}

    def one(row: Row) -> None:
        start = time.monotonic()
        out = run_row(row, columns, ca, directory / _safe(row.key))
        row_seconds[row.key] = time.monotonic() - start
        for cell in out:
            cells[(row.key, cell.column)] = cell
        if on_row is not None:
            on_row(row, out, row_seconds[row.key])

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        list(pool.map(one, rows))
    return Matrix(rows, columns, cells, time.monotonic() - t0, row_seconds)
