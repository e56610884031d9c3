"""Where clients come in: UDP (batched reads on a socket we own) and TCP (pipelined frames)."""

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
        self.last_active = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = typing.cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        self.last_active = self.tunnel.loop.time()
        if len(self.server.clients) >= self.tunnel.cfg.max_tcp_clients:
            self.tunnel.stats.tcp_refused += 1
            transport.abort()
            self.transport = None
            return
        self.server.clients.add(self)
        self.tunnel.stats.tcp_clients += 1
        with contextlib.suppress(OSError):
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.last_active = self.tunnel.loop.time()
        on_query = self.tunnel.on_query
        for wire in self.frames.feed(data):
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
        self.server.clients.discard(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class TcpListener:
    def __init__(self, tunnel: Tunnel, host: str, port: int) -> None:
        self.tunnel = tunnel
        self.host = host
        self.port = port
        self.clients: set[TcpClient] = set()
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
