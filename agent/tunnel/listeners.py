"""Where clients come in: UDP (batched reads on a socket we own) and TCP (pipelined frames).

TCP slots are bounded (max_tcp_clients, a quarter of them per source address). A TCP client
is active when it completed a query or waits for an answer, never for a byte alone: a
connection that trickles bytes is idle, closed after tcp_client_idle, and the first to go
when a new connection finds every slot taken (RFC 7766 6.2.3: the oldest idle one makes
room). A new connection is refused only when no slot in its way is idle (waiting for an
answer, or younger than FRESH and on its way to its first query).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import typing
from typing import TYPE_CHECKING, Any

from agent.dns.wire import FrameReader, frame

if TYPE_CHECKING:
    from agent.tunnel.forwarder import Tunnel

LOG = logging.getLogger(__name__)

BATCH = 64  # datagrams read per wake-up
RCVBUF = 4 * 1024 * 1024
SOURCE_SHARE = 4  # one source address holds at most 1/SOURCE_SHARE of the TCP slots
FRESH = 0.1  # s: a TCP client this new, or active this recently, is not dropped for another


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


class UdpListener:
    """One UDP socket; per-client (address, port) outstanding counts."""

    udp = True

    def __init__(self, tunnel: Tunnel, host: str, port: int) -> None:
        self.tunnel = tunnel
        self.loop = asyncio.get_running_loop()
        fam = _family(host)
        self.sock = socket.socket(fam, socket.SOCK_DGRAM)
        if fam == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for opt in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
            if opt is not None:
                with contextlib.suppress(OSError):
                    self.sock.setsockopt(socket.SOL_SOCKET, opt, RCVBUF)
                    break
        self.sock.bind((host, port))
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()[:2]
        self.outstanding: dict[Any, int] = {}
        self.limit = tunnel.cfg.max_pending_per_client
        self.loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        on_query = self.tunnel.on_query
        recvfrom = self.sock.recvfrom
        for _ in range(BATCH):
            try:
                data, addr = recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # e.g. an ICMP error queued on the socket
                continue
            on_query(data, self, addr)
        self.tunnel.flush()

    def admit(self, addr: Any) -> bool:
        n = self.outstanding.get(addr, 0)
        if n >= self.limit:
            return False
        self.outstanding[addr] = n + 1
        return True

    def done(self, addr: Any) -> None:
        n = self.outstanding.get(addr, 0) - 1
        if n > 0:
            self.outstanding[addr] = n
        else:
            self.outstanding.pop(addr, None)

    def deliver(self, wire: bytes, addr: Any) -> None:
        with contextlib.suppress(OSError):  # the client went away: nothing to do
            self.sock.sendto(wire, addr)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class TcpClient(asyncio.Protocol):
    """One client TCP connection: pipelined queries, answers in any order (RFC 7766)."""

    udp = False

    def __init__(self, tunnel: Tunnel, server: TcpListener) -> None:
        self.tunnel = tunnel
        self.server = server
        self.frames = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.outstanding = 0
        self.paused = False
        self.last_active = 0.0  # the last whole query in or answer out (not any byte)
        self.source = ""  # the client's address

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = typing.cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        self.last_active = self.tunnel.loop.time()
        peer = transport.get_extra_info("peername")
        self.source = str(peer[0]) if peer else ""
        if not self.server.make_room(self):
            self.tunnel.stats.tcp_refused += 1
            transport.abort()
            self.transport = None
            return
        self.tunnel.stats.tcp_clients += 1
        with contextlib.suppress(OSError):
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        wires = self.frames.feed(data)
        if not wires:
            return  # part of a query: not activity (a byte a second must not hold a slot)
        self.last_active = self.tunnel.loop.time()
        on_query = self.tunnel.on_query
        for wire in wires:
            on_query(wire, self, None)
        self.tunnel.flush()
        if self.outstanding >= self.tunnel.cfg.max_pending_per_client and self.transport:
            self.transport.pause_reading()  # back-pressure: this client waits, others don't
            self.paused = True

    def admit(self, addr: Any) -> bool:
        if self.transport is None:
            return False
        self.outstanding += 1
        return True

    def done(self, addr: Any) -> None:
        self.outstanding -= 1
        low = self.tunnel.cfg.max_pending_per_client // 2
        if self.paused and self.transport is not None and self.outstanding < low:
            self.paused = False
            self.transport.resume_reading()

    def deliver(self, wire: bytes, addr: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.last_active = self.tunnel.loop.time()
            self.transport.write(frame(wire))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.server.forget(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class TcpListener:
    def __init__(self, tunnel: Tunnel, host: str, port: int) -> None:
        self.tunnel = tunnel
        self.host = host
        self.port = port
        self.clients: set[TcpClient] = set()
        self.sources: dict[str, int] = {}  # clients per source address
        self.evicted = 0  # idle clients closed to make room for a new one
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: TcpClient(self.tunnel, self),
            self.host,
            self.port,
            reuse_address=True,
            backlog=128,
        )

    def make_room(self, new: TcpClient) -> bool:
        """Take `new` in if there is a slot for it: within its source's share, and within
        max_tcp_clients; else the oldest idle client (of that source, or anyone's) is closed
        to make room. False: every slot in the way waits for an answer."""
        limit = self.tunnel.cfg.max_tcp_clients
        if self.sources.get(new.source, 0) >= max(1, limit // SOURCE_SHARE):
            victim = self._oldest_idle(new.source, new.last_active)
        elif len(self.clients) >= limit:
            victim = self._oldest_idle(None, new.last_active)
        else:
            victim = new  # room enough
        if victim is None:
            return False
        if victim is not new:
            self.evicted += 1
            LOG.debug("TCP client %s idle %.1f s: closed to make room for %s", victim.source,
                      self.tunnel.loop.time() - victim.last_active, new.source)  # fmt: skip
            self.forget(victim)
            victim.close()
        self.clients.add(new)
        self.sources[new.source] = self.sources.get(new.source, 0) + 1
        return True

    def _oldest_idle(self, source: str | None, now: float) -> TcpClient | None:
        """The client idle longest (no answer awaited), of `source` if given. One that holds
        part of a query goes first (a client writes a query at once: a part kept waiting is
        a trickle); one without, connected or active less than FRESH ago, is not taken at
        all: a new client gets its chance to send its query (a burst of new connections
        must not drop each other before anything was read from them)."""
        idle = [
            c
            for c in self.clients
            if c.outstanding == 0
            and (source is None or c.source == source)
            and (c.frames.pending or now - c.last_active >= FRESH)
        ]
        return min(idle, key=lambda c: (not c.frames.pending, c.last_active), default=None)

    def forget(self, c: TcpClient) -> None:
        if c in self.clients:
            self.clients.remove(c)
            n = self.sources[c.source] - 1
            if n:
                self.sources[c.source] = n
            else:
                del self.sources[c.source]

    def tick(self, now: float) -> None:
        idle = self.tunnel.cfg.tcp_client_idle
        for c in list(self.clients):
            if c.outstanding == 0 and now - c.last_active > idle:
                c.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for c in list(self.clients):
            c.close()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1)
