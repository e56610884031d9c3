"""One TCP connection to a DNS server, optionally wrapped in TLS, under one absolute deadline.

Every operation takes the deadline (event-loop time) rather than a timeout, so a
sequence of steps can never take longer than the deadline it was given. OS and
TLS errors come out as the typed errors of `agent.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import ssl
from collections.abc import Iterator

import dns.message

from agent.dns.wire import FrameReader, frame, parse_response, starttls_query
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
    Unreachable,
)
from agent.tls import TLSEngine

LOG = logging.getLogger(__name__)

TCP_FASTOPEN_CONNECT = getattr(socket, "TCP_FASTOPEN_CONNECT", 30)
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)
RECV_SIZE = 262144
_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.ENETDOWN}


TCPI_OPT_SYN_DATA = 32  # linux/tcp.h: the SYN carried data the server accepted


def syn_data_acked(sock: socket.socket) -> bool:
    """Did this connection's SYN carry data that the server took (TCP Fast Open)?"""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return False
    return bool(info[5] & TCPI_OPT_SYN_DATA)  # tcpi_options


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


@contextlib.contextmanager
def os_errors(what: str) -> Iterator[None]:
    """Translate socket errors into the agent's transport errors."""
    try:
        yield
    except TransportError:
        raise
    except TimeoutError as exc:
        raise Timeout(f"{what}: timed out") from exc
    except ConnectionRefusedError as exc:
        raise Refused(f"{what}: connection refused") from exc
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as exc:
        raise Reset(f"{what}: connection reset by peer") from exc
    except OSError as exc:
        if exc.errno in _UNREACHABLE:
            raise Unreachable(f"{what}: {exc.strerror}") from exc
        if exc.errno == errno.ETIMEDOUT:
            raise Timeout(f"{what}: {exc.strerror}") from exc
        raise TransportError(f"{what}: {exc}") from exc


class Connection:
    """A non-blocking TCP socket we own, plus an optional TLS layer over it."""

    def __init__(self, sock: socket.socket, address: str, port: int) -> None:
        self.sock = sock
        self.address = address
        self.port = port
        self.tls: TLSEngine | None = None
        self._frames = FrameReader()
        self._ready: list[bytes] = []
        self._eof = False
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def open(
        cls, address: str, port: int, deadline: float, *, fastopen: bool = False
    ) -> Connection:
        sock = socket.socket(family_of(address), socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if fastopen:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
        loop = asyncio.get_running_loop()
        try:
            with os_errors(f"connect {address} port {port}"):
                async with asyncio.timeout_at(deadline):
                    await loop.sock_connect(sock, (address, port))
        except BaseException:
            sock.close()
            raise
        return cls(sock, address, port)

    def __repr__(self) -> str:
        return f"<Connection {self.address}:{self.port}{' tls' if self.tls else ''}>"

    async def _send_raw(self, data: bytes, deadline: float) -> None:
        with os_errors(f"send to {self.address}:{self.port}"):
            async with asyncio.timeout_at(deadline):
                await self._loop.sock_sendall(self.sock, data)

    async def _recv_raw(self, deadline: float) -> bytes:
        # Quick ACKs: a server that writes its session tickets and the first answer as
        # separate segments (unbound does) otherwise waits for our delayed ACK: +40 ms.
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
        with os_errors(f"receive from {self.address}:{self.port}"):
            async with asyncio.timeout_at(deadline):
                return await self._loop.sock_recv(self.sock, RECV_SIZE)

    async def _flush_tls(self, deadline: float) -> None:
        assert self.tls is not None
        out = self.tls.data_to_send()
        if out:
            await self._send_raw(out, deadline)

    async def start_tls(
        self,
        ctx: ssl.SSLContext,
        deadline: float,
        *,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> TLSEngine:
        """Handshake on this connection (which may have carried cleartext before)."""
        if self._ready or self._frames.pending:
            # The server must not speak before our ClientHello; bytes here were injected.
            raise TLSHandshakeFailed("unexpected cleartext data before the TLS handshake")
        tls = TLSEngine(ctx, server_hostname=server_hostname, session=session)
        self.tls = tls
        try:
            while not tls.handshake():
                await self._flush_tls(deadline)
                data = await self._recv_raw(deadline)
                if not data:
                    raise TLSHandshakeFailed("peer closed the connection during the handshake")
                tls.feed(data)
            await self._flush_tls(deadline)
        except ssl.SSLCertVerificationError as exc:
            raise CertificateRejected(
                f"certificate verification failed: {exc.verify_message}"
            ) from exc
        except ssl.SSLError as exc:
            raise TLSHandshakeFailed(f"TLS handshake failed: {_ssl_reason(exc)}") from exc
        except Reset as exc:  # e.g. a middlebox that kills TLS with an RST
            raise Reset("connection reset during the TLS handshake") from exc
        except Closed as exc:
            raise TLSHandshakeFailed(f"TLS handshake failed: {exc.detail}") from exc
        return tls

    async def send_message(self, wire: bytes, deadline: float) -> None:
        """Send one framed DNS message, through TLS when TLS is up."""
        data = frame(wire)
        if self.tls is None:
            await self._send_raw(data, deadline)
            return
        try:
            self.tls.encrypt(data)
        except ssl.SSLError as exc:
            raise TLSHandshakeFailed(f"TLS write failed: {_ssl_reason(exc)}") from exc
        await self._flush_tls(deadline)

    async def recv_message(self, deadline: float) -> bytes:
        """Receive one whole DNS message (length prefix stripped)."""
        while not self._ready:
            if self._eof:
                raise Closed(f"{self.address}:{self.port} closed the connection")
            data = await self._recv_raw(deadline)
            closed = not data
            if self.tls is not None:
                try:
                    self.tls.feed(data)
                    data = self.tls.decrypt()
                    await self._flush_tls(deadline)  # e.g. key updates
                except ssl.SSLError as exc:
                    raise TLSHandshakeFailed(f"TLS read failed: {_ssl_reason(exc)}") from exc
                closed = closed or self.tls.peer_closed
            self._ready.extend(self._frames.feed(data))
            self._eof = closed
            if closed and not self._ready:
                raise Closed(f"{self.address}:{self.port} closed the connection")
        return self._ready.pop(0)

    def close(self) -> None:
        """Close, with a best-effort TLS close_notify when TLS is up."""
        if self.tls is not None:
            self.tls.close_notify()
            out = self.tls.data_to_send()
            if out:
                with contextlib.suppress(OSError):
                    self.sock.send(out)
        self.sock.close()


async def starttls(conn: Connection, deadline: float) -> dns.message.Message:
    """Send the STARTTLS/CH/TXT dummy with TO set and return the checked answer.

    The caller must not send anything else before this returns (PROTOCOL.md 1);
    `wire.has_to(answer)` says whether to start TLS on `conn` now.
    """
    query = starttls_query()
    await conn.send_message(query.to_wire(), deadline)
    return parse_response(await conn.recv_message(deadline), query)


def _ssl_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason code as words: WRONG_VERSION_NUMBER -> wrong version number."""
    return exc.reason.lower().replace("_", " ") if exc.reason else str(exc)


async def udp_exchange(
    address: str, port: int, query: dns.message.Message, until: float, resend_at: float
) -> dns.message.Message:
    """One question over UDP, sent once more at `resend_at` (event-loop time) if nothing
    came by then; junk and strangers' answers are ignored (maybe spoofed or stale), and the
    last of them is what is raised when nothing better came before `until` (else Timeout)."""
    loop = asyncio.get_running_loop()
    data = query.to_wire()
    last: TransportError = Timeout(f"no answer from {address} port {port} over UDP")
    resend = [resend_at]
    with socket.socket(family_of(address), socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        with os_errors(f"UDP to {address} port {port}"):
            await loop.sock_connect(sock, (address, port))
            sock.send(data)
            while True:
                try:
                    async with asyncio.timeout_at(min([until, *resend])):
                        answer = await loop.sock_recv(sock, 65535)
                except TimeoutError:
                    if resend and loop.time() < until:
                        resend.clear()
                        sock.send(data)
                        continue
                    raise last from None
                try:
                    return parse_response(answer, query)
                except (MalformedMessage, MismatchedMessage) as exc:
                    last = exc
