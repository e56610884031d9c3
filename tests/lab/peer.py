"""The test peer: an asyncio DNS server that speaks both halves of DNS over TLS.

Plain DNS on one port (UDP and TCP, with the STARTTLS upgrade on TCP: answer the
STARTTLS/CH/TXT dummy with TO set, then TLS on the same socket), TLS on another
port, and a set of faults to misbehave on demand like a broken server or a
middlebox. It records every query it sees, and how it came, so tests can check
on the server side what crossed the wire in cleartext.

Run standalone (inside a namespace, for the demo and benchmarks):
    python -m tests.lab.peer --host 198.51.100.1 --dns-port 53 --tls-port 853 --cert C --key K
It prints one JSON line with the bound ports once it is ready. With --control FILE it
polls FILE for faults switched at run time (`write_control`), so that a test can start
healthy and then break (tests/lab/faultmatrix.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import struct
import sys
import time
import typing
import weakref
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from agent.dns.wire import TO_FLAG, FrameReader, frame, has_to
from tests.lab.netns import REPO, Netns
from tests.lab.proc import Process

LOG = logging.getLogger(__name__)

PEER_A = "198.51.100.7"
WHOAMI = "dnstls-test-peer"
IN_FLIGHT = 3  # CLOSE_IN_FLIGHT: queries a connection holds unanswered when it closes
CONTROL_POLL = 0.05  # seconds between looks at the control file


class Fault(StrEnum):
    NO_TO_ANSWER = "no-to-answer"  # never answer a TCP query that carries TO
    STRIP_TO = "strip-to"  # answer the dummy with TO clear, like a middlebox stripping it
    RESET = "reset"  # reset every TCP connection (both ports) as soon as it is accepted
    RESET_AFTER_TO = "reset-after-to"  # answer with TO, then reset the connection
    GARBAGE_AFTER_TO = "garbage-after-to"  # answer with TO, then speak no TLS
    SLOW = "slow"  # every answer waits `delay` seconds
    TRUNCATED = "truncated"  # answers cut short (frame promises more), then close
    MISMATCHED = "mismatched"  # answers carry another message ID
    BLACKHOLE_TLS = "blackhole-tls"  # TLS port swallows SYNs: no SYN-ACK ever
    STALL_TLS = "stall-tls"  # TLS port accepts TCP, reads, never answers (no ServerHello)
    SILENT_TCP = "silent-tcp"  # plain TCP: connections accepted, queries read, never answered
    # The chaos faults below may also be switched on and off while the peer runs
    # (`Peer.set_faults`, or the --control file); on TLS connections they strike after
    # `strike_after` answers given on that connection while the fault is on.
    RESET_MID_ANSWER = "reset-mid-answer"  # TLS: half of an answer frame, then RST
    CLOSE_IN_FLIGHT = "close-in-flight"  # TLS: read IN_FLIGHT more queries, close unanswered
    DROP_TLS = "drop-tls"  # no TLS at all: 853 refused, TLS connections and TO queries reset;
    #                        plain DNS (UDP, TCP without TO) keeps answering
    CLOSE_ON_QUERY = "close-on-query"  # TCP and TLS: read a query, close (FIN), answer nothing
    # Hostile answers (tests/lab/hostile.py), on TCP and TLS connections, switchable too:
    GARBAGE_FRAMES = "garbage-frames"  # each answer: a frame of random bytes, no DNS message
    ECHO = "echo"  # each answer: the query itself, sent back as it came
    HUGE_LENGTH = "huge-length"  # a frame header announcing 65535 bytes, 8 bytes, then silence


@dataclass(frozen=True)
class Seen:
    """One query as the peer received it."""

    via: str  # udp | tcp | tls-port | tls-upgrade
    qname: str
    qtype: str
    qclass: str
    to: bool
    padded: bool


@dataclass
class PeerConfig:
    host: str = "127.0.0.1"
    dns_port: int = 0  # 0: any free port
    tls_port: int | None = 0  # None: nothing listens (connections are refused)
    cert: Path | None = None
    key: Path | None = None
    upgrade: bool = True  # speak the upgrade side on TCP
    udp_to: bool = False  # advertise TO in UDP answers
    faults: frozenset[Fault] = frozenset()
    delay: float = 0.0  # for Fault.SLOW
    close_after: int | None = None  # close each TCP/TLS connection after that many queries,
    #                                 with the last ones unanswered ("closes mid-flight")
    keepalive: float | None = None  # edns-tcp-keepalive to offer when asked (seconds)
    drop_udp: int = 0  # drop the first N datagrams of each question (name, type), like a
    #                    lossy link: unseen, unanswered (counted in `udp_dropped`)
    strike_after: int = 0  # RESET_MID_ANSWER, CLOSE_IN_FLIGHT: answers per TLS connection first
    control: Path | None = None  # a JSON file polled for faults switched at run time
    # DDR (RFC 9462): the answer to `_dns.resolver.arpa` SVCB, one record per presentation
    # string ("1 dot.example.test. alpn=dot port=8853 ipv4hint=198.51.100.1"); none: NXDOMAIN.
    # Read at query time, so that a test can fill in ports bound after start().
    svcb: list[str] = field(default_factory=list)
    svcb_hosts: dict[str, list[str]] = field(default_factory=dict)  # A/AAAA of SVCB targets
    svcb_glue: bool = False  # also put those addresses in the SVCB answer's additional section


class Blackhole:
    """A listening TCP port whose accept queue is kept full: new SYNs are dropped.

    Looks like a firewall DROP to a client (no SYN-ACK, no RST), without root.
    """

    def __init__(self, host: str, port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self._fillers: list[socket.socket] = []
        for _ in range(2):  # backlog 0 admits one; the second waits in SYN-SENT forever
            filler = socket.socket(family, socket.SOCK_STREAM)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((host, self.port))
            self._fillers.append(filler)

    def close(self) -> None:
        for s in [*self._fillers, self.sock]:
            s.close()


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["dot"])
    return ctx


def _ddr(
    q: dns.rrset.RRset, config: PeerConfig
) -> tuple[list[dns.rrset.RRset], list[dns.rrset.RRset]] | None:
    """(answer, additional) for the DDR names of `config`; None when it has none for `q`."""
    name = q.name.to_text().lower()
    hosts = {h.lower().rstrip(".") + ".": addrs for h, addrs in config.svcb_hosts.items()}

    def addresses(host: str, rdtype: dns.rdatatype.RdataType) -> list[dns.rrset.RRset]:
        want = [a for a in hosts.get(host, []) if (":" in a) == (rdtype == dns.rdatatype.AAAA)]
        return [dns.rrset.from_text(host, 60, "IN", rdtype, *want)] if want else []

    if name == "_dns.resolver.arpa." and q.rdtype == dns.rdatatype.SVCB and config.svcb:
        rrset = dns.rrset.from_text(q.name, 300, "IN", "SVCB", *config.svcb)
        glue: list[dns.rrset.RRset] = []
        if config.svcb_glue:
            for target in sorted({rd.target.to_text().lower() for rd in rrset}):
                glue += addresses(target, dns.rdatatype.A) + addresses(target, dns.rdatatype.AAAA)
        return [rrset], glue
    if name in hosts and q.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return addresses(name, dns.rdatatype.RdataType(q.rdtype)), []
    return None


def answer(
    query: dns.message.Message, *, to: bool, config: PeerConfig | None = None
) -> dns.message.Message:
    """The peer's tiny zone. Names starting `delay-N.` are answered after N ms; with a
    `config`, its DDR records (`PeerConfig.svcb`) too."""
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    if query.edns >= 0:
        response.use_edns(0, TO_FLAG if to else 0, 1232)
    if not query.question:
        response.set_rcode(dns.rcode.FORMERR)
        return response
    q = query.question[0]
    name = q.name.to_text().lower()
    ddr = _ddr(q, config) if config is not None else None
    if ddr is not None:
        response.answer.extend(ddr[0])
        response.additional.extend(ddr[1])
    elif q.rdclass == dns.rdataclass.CH and q.rdtype == dns.rdatatype.TXT:
        if name == "starttls.":
            text = '"STARTTLS"' if to else '"NO_TLS"'
            response.answer.append(dns.rrset.from_text(q.name, 0, "CH", "TXT", text))
        else:
            response.set_rcode(dns.rcode.REFUSED)
    elif name == "." and q.rdtype == dns.rdatatype.NS:
        response.answer.append(dns.rrset.from_text(q.name, 60, "IN", "NS", "ns.test."))
    elif q.rdtype == dns.rdatatype.A:
        response.answer.append(dns.rrset.from_text(q.name, 60, "IN", "A", PEER_A))
    elif q.rdtype == dns.rdatatype.TXT and name.startswith("whoami."):
        response.answer.append(dns.rrset.from_text(q.name, 0, "IN", "TXT", f'"{WHOAMI}"'))
    elif (
        q.rdtype == dns.rdatatype.TXT
        and name.startswith("big-")
        and name[4:].split(".")[0].isdigit()
    ):
        size = int(name[4:].split(".")[0])  # about `size` bytes of TXT, in 200-byte strings
        strings = ['"' + "x" * 200 + '"'] * (size // 200) + ['"' + "y" * (size % 200) + '"']
        response.answer.append(dns.rrset.from_text(q.name, 0, "IN", "TXT", " ".join(strings)))
    else:
        response.set_rcode(dns.rcode.NXDOMAIN)
    return response


def _delay_of(query: dns.message.Message) -> float:
    if query.question:
        first = query.question[0].name.labels[0] if query.question[0].name.labels else b""
        if first.startswith(b"delay-") and first[6:].isdigit():
            return int(first[6:]) / 1000
    return 0.0


class Peer:
    """The peer's servers; start() binds them, stop() closes them and every connection."""

    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.seen: list[Seen] = []
        self.tls_ctx: ssl.SSLContext | None = None
        if config.cert and config.key:
            self.tls_ctx = server_context(config.cert, config.key)
        self.dns_port = 0
        self.tls_port: int | None = None
        self.connections = 0
        self.handshakes = 0
        self.resumed = 0  # TLS handshakes that resumed a session
        self.open_connections = 0
        self.udp_dropped = 0
        self._udp_arrivals: dict[tuple[str, int], int] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._udp: asyncio.DatagramTransport | None = None
        self._blackhole: Blackhole | None = None
        self._tls_server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._streams: dict[asyncio.StreamWriter, str] = {}  # open TCP/TLS connections: via
        self._silenced: weakref.WeakSet[asyncio.StreamWriter] = weakref.WeakSet()  # HUGE_LENGTH
        self.switched: list[tuple[float, frozenset[Fault]]] = []  # (monotonic, faults) at run time

    # -- lifecycle ----------------------------------------------------------
    async def start(self) -> Peer:
        cfg = self.config
        loop = asyncio.get_running_loop()
        tcp = await asyncio.start_server(self._on_plain, cfg.host, cfg.dns_port, reuse_address=True)
        self._servers.append(tcp)
        self.dns_port = tcp.sockets[0].getsockname()[1]
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UDP(self), local_addr=(cfg.host, self.dns_port)
        )
        self._udp = transport
        if cfg.tls_port is not None:
            if self.tls_ctx is None and Fault.BLACKHOLE_TLS not in cfg.faults:
                raise ValueError("a TLS port needs cert and key")
            self.tls_port = await self._bind_tls(cfg.tls_port)
        if cfg.control is not None:
            task = asyncio.create_task(self._watch_control(cfg.control), name="peer control")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return self

    async def _bind_tls(self, port: int) -> int:
        """(Re)bind the TLS port the way the faults want it; open connections stay open."""
        cfg = self.config
        self._unbind_tls()
        kind = _tls_kind(cfg.faults)
        if kind == "refused":  # nothing listens: a SYN gets a RST
            return port
        if kind == "blackhole":
            self._blackhole = Blackhole(cfg.host, port)
            return int(self._blackhole.port)
        raw = kind == "raw"  # accepted, no TLS spoken
        self._tls_server = await asyncio.start_server(
            self._on_tls,
            cfg.host,
            port,
            ssl=None if raw else self.tls_ctx,
            reuse_address=True,
            ssl_handshake_timeout=None if raw else 5,
        )
        return int(self._tls_server.sockets[0].getsockname()[1])

    def _unbind_tls(self) -> None:
        if self._tls_server is not None:
            self._tls_server.close()
            self._tls_server = None
        if self._blackhole is not None:
            self._blackhole.close()
            self._blackhole = None

    async def set_faults(
        self,
        faults: typing.Iterable[Fault],
        *,
        delay: float | None = None,
        strike_after: int | None = None,
    ) -> None:
        """Switch faults while running, so that a test can start healthy and then break.

        What the TLS port does follows at once (rebound on the same port); connections
        already open are reset when RESET or DROP_TLS comes on, and TLS-port ones go
        silent while BLACKHOLE_TLS or STALL_TLS is on, like packets dropped on the way."""
        cfg = self.config
        old, new = cfg.faults, frozenset(faults)
        cfg.delay = cfg.delay if delay is None else delay
        cfg.strike_after = cfg.strike_after if strike_after is None else strike_after
        cfg.faults = new
        self.switched.append((time.monotonic(), new))
        LOG.warning("faults now: %s", " ".join(sorted(new)) or "none")
        if self.tls_port is not None and _tls_kind(old) != _tls_kind(new):
            self.tls_port = await self._bind_tls(self.tls_port)
        if {Fault.RESET, Fault.DROP_TLS} & (new - old):
            for writer, via in list(self._streams.items()):
                if via != "tcp" or Fault.RESET in new:
                    _reset(writer)

    async def _watch_control(self, path: Path) -> None:
        """The control file, for a peer run as a process: {"faults": [names], "delay": s,
        "strike_after": n} (`write_control` writes it). No file: nothing switched."""
        seen: tuple[int, int, int] | None = None
        while True:
            try:
                seen, spec = _read_control(path, seen)
                if spec is not None:
                    await self.set_faults(
                        [Fault(f) for f in spec.get("faults", [])],
                        delay=spec.get("delay"),
                        strike_after=spec.get("strike_after"),
                    )
            except FileNotFoundError:
                pass
            except (OSError, ValueError, TypeError) as exc:
                LOG.warning("control file %s ignored: %s", path, exc)
            await asyncio.sleep(CONTROL_POLL)

    async def stop(self) -> None:
        self._unbind_tls()
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)
        if self._udp:
            self._udp.close()
        if self._blackhole:
            self._blackhole.close()

    async def __aenter__(self) -> Peer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- helpers ------------------------------------------------------------
    def _track(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _record(self, via: str, query: dns.message.Message) -> None:
        q = query.question[0] if query.question else None
        padded = query.edns >= 0 and any(o.otype == 12 for o in query.options)
        self.seen.append(
            Seen(
                via=via,
                qname=q.name.to_text() if q is not None else "",
                qtype=dns.rdatatype.to_text(q.rdtype) if q is not None else "",
                qclass=dns.rdataclass.to_text(q.rdclass) if q is not None else "",
                to=has_to(query),
                padded=padded,
            )
        )

    def _wire(self, response: dns.message.Message, *, udp: bool = False) -> bytes:
        if Fault.MISMATCHED in self.config.faults:
            response.id ^= 0x5A5A
        if not udp:
            return response.to_wire(max_size=65535)
        try:
            # within the client's payload size; 512 bytes without EDNS (RFC 1035 4.2.1)
            return response.to_wire(max_size=response.request_payload or 512)
        except dns.exception.TooBig:
            response.flags |= dns.flags.TC
            response.answer.clear()
            return response.to_wire()

    async def _pause(self, query: dns.message.Message) -> None:
        wait = _delay_of(query) + (self.config.delay if Fault.SLOW in self.config.faults else 0)
        if wait:
            await asyncio.sleep(wait)

    # -- UDP ----------------------------------------------------------------
    def on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except Exception:  # a test peer ignores junk, like a server would
            return
        if self.config.drop_udp and query.question:
            q = query.question[0]
            key = (q.name.to_text().lower(), q.rdtype)
            arrived = self._udp_arrivals[key] = self._udp_arrivals.get(key, 0) + 1
            if arrived <= self.config.drop_udp:
                self.udp_dropped += 1
                return
        self._record("udp", query)
        to = self.config.udp_to and has_to(query)
        wire = self._wire(answer(query, to=to, config=self.config), udp=True)
        if Fault.TRUNCATED in self.config.faults:
            wire = wire[: len(wire) // 2]
        task = asyncio.get_running_loop().create_task(self._udp_reply(query, wire, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _udp_reply(
        self, query: dns.message.Message, wire: bytes, addr: tuple[str, int]
    ) -> None:
        await self._pause(query)
        if self._udp is not None and not self._udp.is_closing():
            self._udp.sendto(wire, addr)

    # -- TCP and TLS --------------------------------------------------------
    async def _on_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._track()
        self.connections += 1
        if Fault.RESET in self.config.faults:
            _reset(writer)
            return
        if Fault.STALL_TLS in self.config.faults:  # like a transparent proxy that hangs
            try:
                with contextlib.suppress(OSError):
                    while await reader.read(65535):  # the ClientHello, and whatever follows
                        pass
            finally:
                writer.close()
            return
        self.handshakes += 1
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.session_reused:
            self.resumed += 1
        await self._serve(reader, writer, "tls-port", [])

    async def _on_plain(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._track()
        self.connections += 1
        if Fault.RESET in self.config.faults:
            _reset(writer)
            return
        cfg = self.config
        if Fault.SILENT_TCP in cfg.faults:
            with contextlib.suppress(OSError):
                while await reader.read(65535):
                    pass
            return
        frames = FrameReader()
        first: list[bytes] = []
        try:
            while not first:
                data = await reader.read(65535)
                if not data:
                    return
                first = frames.feed(data)
            query = dns.message.from_wire(first[0])
        except Exception:
            writer.close()
            return
        if not has_to(query):  # plain DNS over TCP from the first message on
            await self._serve(reader, writer, "tcp", first)
            return
        self._record("tcp", query)
        if Fault.DROP_TLS in cfg.faults:  # a middlebox that kills whatever asks for TLS
            _reset(writer)
            return
        if Fault.NO_TO_ANSWER in cfg.faults:
            with contextlib.suppress(Exception):
                while await reader.read(65535):
                    pass
            return
        upgrade = cfg.upgrade and self.tls_ctx is not None and Fault.STRIP_TO not in cfg.faults
        await self._pause(query)
        wire = self._wire(answer(query, to=upgrade, config=self.config))
        if not upgrade:
            writer.write(frame(wire))
            await self._serve(reader, writer, "tcp", first[1:])
            return
        typing.cast(
            asyncio.Transport, writer.transport
        ).pause_reading()  # the ClientHello must reach TLS, not this reader
        writer.write(frame(wire))
        if Fault.RESET_AFTER_TO in cfg.faults:
            await writer.drain()
            _reset(writer)
            return
        if Fault.GARBAGE_AFTER_TO in cfg.faults:  # a middlebox that passes no TLS
            typing.cast(asyncio.Transport, writer.transport).resume_reading()
            with contextlib.suppress(OSError):
                await reader.read(65535)  # the ClientHello
            writer.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        assert self.tls_ctx is not None
        try:
            await writer.start_tls(self.tls_ctx, ssl_handshake_timeout=5)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            LOG.debug("upgrade handshake failed: %s", exc)
            writer.close()
            return
        self.handshakes += 1
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.session_reused:
            self.resumed += 1
        await self._serve(reader, writer, "tls-upgrade", [])

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        via: str,
        backlog: list[bytes],
    ) -> None:
        """Answer framed queries, pipelined: each in its own task, written when ready."""
        frames = FrameReader()
        pending = list(backlog)
        answering: set[asyncio.Task[None]] = set()
        received = 0
        struck = held = 0  # queries taken while a chaos fault is on; of those, held unanswered
        unanswered = False  # CLOSE_ON_QUERY: a query was read; the connection closes
        self.open_connections += 1
        self._streams[writer] = via
        try:
            while True:
                for wire in pending:
                    try:
                        query = dns.message.from_wire(wire)
                    except Exception:
                        return
                    self._record(via, query)
                    received += 1
                    if Fault.CLOSE_ON_QUERY in self.config.faults:
                        unanswered = True  # (the rest of what was read is recorded too)
                        continue
                    if self.config.close_after is not None and received >= self.config.close_after:
                        # like a server with a per-connection query limit: answer what came
                        # before, close with this one (and any later ones) unanswered
                        await asyncio.gather(*answering, return_exceptions=True)
                        return
                    chaos = self._chaos(via)
                    if chaos is not None:
                        struck += 1
                    if chaos is not None and struck > self.config.strike_after:
                        await asyncio.gather(*answering, return_exceptions=True)
                        if chaos is Fault.RESET_MID_ANSWER:
                            await self._half_then_reset(writer, query)
                            return
                        held += 1
                        if held >= IN_FLIGHT:
                            return  # closed (FIN) below, with the held queries unanswered
                        continue
                    task = asyncio.create_task(self._answer_tcp(writer, query, via))
                    answering.add(task)
                    task.add_done_callback(answering.discard)
                if unanswered:
                    return  # closed (FIN) below; answers under way are cancelled
                data = await reader.read(65535)
                if not data:
                    break
                pending = frames.feed(data)
            await asyncio.gather(*answering, return_exceptions=True)
        except (OSError, ssl.SSLError):
            pass
        finally:
            self.open_connections -= 1
            self._streams.pop(writer, None)
            for task in answering:
                task.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    def _chaos(self, via: str) -> Fault | None:
        """The fault that strikes TLS connections now, if any."""
        if via == "tcp":
            return None
        faults = self.config.faults
        return next(
            (f for f in (Fault.RESET_MID_ANSWER, Fault.CLOSE_IN_FLIGHT) if f in faults), None
        )

    async def _half_then_reset(
        self, writer: asyncio.StreamWriter, query: dns.message.Message
    ) -> None:
        wire = frame(self._wire(answer(query, to=False)))
        writer.write(wire[: len(wire) // 2])
        await writer.drain()
        await asyncio.sleep(0.05)  # on the wire before the RST (SO_LINGER 0 drops what is not)
        _reset(writer)

    async def _answer_tcp(
        self, writer: asyncio.StreamWriter, query: dns.message.Message, via: str = "tcp"
    ) -> None:
        await self._pause(query)
        if via == "tls-port" and {Fault.BLACKHOLE_TLS, Fault.STALL_TLS} & self.config.faults:
            return  # switched on while this connection was open: its packets go nowhere now
        response = answer(query, to=False, config=self.config)
        asked = any(o.otype == dns.edns.OptionType.KEEPALIVE for o in query.options)
        if asked and self.config.keepalive is not None and response.edns >= 0:
            timeout = int(self.config.keepalive * 10).to_bytes(2, "big")
            response.use_edns(
                0, 0, 1232, options=[dns.edns.GenericOption(dns.edns.OptionType.KEEPALIVE, timeout)]
            )
        wire = self._wire(response)
        if writer.is_closing() or writer in self._silenced:
            return
        if Fault.GARBAGE_FRAMES in self.config.faults:
            wire = os.urandom(len(wire))
        elif Fault.ECHO in self.config.faults:
            wire = query.to_wire()
        elif Fault.HUGE_LENGTH in self.config.faults:
            self._silenced.add(writer)  # nothing more on this connection: the frame never ends
            writer.write(struct.pack("!H", 65535) + os.urandom(8))
            return
        if Fault.TRUNCATED in self.config.faults:
            writer.write(frame(wire)[: len(wire) // 2])
            await writer.drain()
            writer.close()
            return
        writer.write(frame(wire))


def _tls_kind(faults: frozenset[Fault]) -> str:
    """What listens on the TLS port under these faults."""
    if Fault.DROP_TLS in faults:
        return "refused"
    if Fault.BLACKHOLE_TLS in faults:
        return "blackhole"
    if {Fault.RESET, Fault.STALL_TLS} & faults:
        return "raw"  # accepted, no TLS spoken
    return "tls"


def _read_control(
    path: Path, seen: tuple[int, int, int] | None
) -> tuple[tuple[int, int, int], dict[str, typing.Any] | None]:
    """The control file's identity now, and its content when that changed since `seen`."""
    st = path.stat()
    now = (st.st_ino, st.st_mtime_ns, st.st_size)
    if now == seen:
        return now, None
    spec = json.loads(path.read_text())
    if not isinstance(spec, dict):
        raise TypeError("not a JSON object")
    return now, spec


def write_control(
    path: Path,
    faults: typing.Iterable[Fault],
    *,
    delay: float | None = None,
    strike_after: int | None = None,
) -> None:
    """Switch the faults of a peer run with --control PATH (atomically: it polls the file)."""
    spec: dict[str, object] = {"faults": sorted(str(f) for f in faults)}
    if delay is not None:
        spec["delay"] = delay
    if strike_after is not None:
        spec["strike_after"] = strike_after
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(spec))
    tmp.replace(path)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.peer.on_datagram(data, addr)


async def _main(args: argparse.Namespace) -> None:
    config = PeerConfig(
        host=args.host,
        dns_port=args.dns_port,
        tls_port=None if args.tls_port < 0 else args.tls_port,
        cert=args.cert,
        key=args.key,
        upgrade=not args.no_upgrade,
        udp_to=args.udp_to,
        faults=frozenset(Fault(f) for f in args.fault),
        delay=args.delay,
        close_after=args.close_after,
        keepalive=args.keepalive,
        drop_udp=args.drop_udp,
        strike_after=args.strike_after,
        control=args.control,
        svcb=args.svcb,
    )
    peer = await Peer(config).start()
    print(json.dumps({"dns_port": peer.dns_port, "tls_port": peer.tls_port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await peer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.lab.peer", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--dns-port", type=int, default=0)
    parser.add_argument("--tls-port", type=int, default=0, help="-1: no TLS listener")
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--no-upgrade", action="store_true")
    parser.add_argument("--udp-to", action="store_true")
    parser.add_argument("--fault", action="append", default=[], choices=[f.value for f in Fault])
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--close-after", type=int)
    parser.add_argument("--keepalive", type=float)
    parser.add_argument("--drop-udp", type=int, default=0, metavar="N")
    parser.add_argument("--strike-after", type=int, default=0, metavar="N",
                        help="answers per TLS connection before reset-mid-answer or "
                        "close-in-flight strike")  # fmt: skip
    parser.add_argument("--control", type=Path, metavar="FILE",
                        help='switch faults at run time: {"faults": [...], "delay": s, '
                        '"strike_after": n}, polled')  # fmt: skip
    parser.add_argument("--svcb", action="append", default=[], metavar="RECORD",
                        help='a `_dns.resolver.arpa` SVCB answer (DDR), e.g. "1 dot.lab.test. '
                        'alpn=dot port=8853 ipv4hint=198.51.100.1"; repeatable')  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()


def spawn(
    log: Path, *args: str, netns: Netns | None = None, timeout: float = 10
) -> tuple[Process, dict[str, int]]:
    """Run the peer as its own process (in `netns` if given); wait until it has bound."""
    argv = [sys.executable, "-m", "tests.lab.peer", *args]
    if netns is not None:
        proc = netns.start(argv, log)
    else:
        proc = Process(argv, log, env={**os.environ, "PYTHONPATH": str(REPO)})
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                ports: dict[str, int] = json.loads(line)
                return proc, ports
        if not proc.alive():
            break
        time.sleep(0.02)
    proc.stop()
    raise RuntimeError(f"test peer did not start; log:\n{proc.tail()}")
