"""One live connection to an upstream: the tunnel's hot path.

Queries are framed with a connection-unique ID, collected, and written as one
TLS record batch and one send() per event-loop wake-up; answers are read in
large chunks, decrypted, split into frames and matched by ID, in any order
(RFC 7766). The socket is ours (`add_reader`), TLS is an `SSLObject` over
memory BIOs, as `agent/dns/transport.py` handed it over after the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import struct
import time
from collections.abc import Callable

from agent.dns.transport import TCP_QUICKACK
from agent.dns.wire import FrameReader
from agent.errors import Closed, Refused, Reset, TLSHandshakeFailed, TransportError
from agent.tls import TLSEngine
from agent.tunnel.pending import Pending
from agent.tunnel.retransmit import Schedule

LOG = logging.getLogger(__name__)

RECV_SIZE = 262144
MAX_INFLIGHT = 60000  # of the 65536 IDs; the tunnel's global limit is far below
_LEN_ID = struct.Struct("!HH")
_ID = struct.Struct("!H")

AnswerHandler = Callable[["UpstreamConn", Pending | None, bytes], None]
LostHandler = Callable[["UpstreamConn", TransportError], None]


class UpstreamConn:
    def __init__(
        self,
        sock: socket.socket,
        tls: TLSEngine | None,
        *,
        label: str,
        on_answer: AnswerHandler,
        on_lost: LostHandler,
        datagram: bool = False,
        pad: bool = False,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.tls = tls
        self.datagram = datagram  # plain DNS over UDP: one message per datagram, no framing
        self.pad = pad  # inside TLS only: queries go padded
        self.sends: Schedule[Pending] | None = Schedule() if datagram else None  # retransmits
        self.label = label
        self.inflight: dict[int, Pending] = {}
        self._on_answer = on_answer
        self._on_lost = on_lost
        self._next_id = random.randrange(65536)
        self._out: list[bytes] = []
        self._wbuf = bytearray()
        self._frames = FrameReader()
        now = self.loop.time()
        self.last_rx = now
        self.last_tx = now
        self.busy_since = now  # last progress while queries were outstanding
        self.closed = False
        self.progress = 0  # client queries answered on this connection
        self._quickacks = 8
        self.loop.add_reader(sock.fileno(), self._on_readable)

    def __repr__(self) -> str:
        return f"<UpstreamConn {self.label} inflight={len(self.inflight)}>"

    # -- queries out ---------------------------------------------------------
    def submit(self, p: Pending, now: float) -> bool:
        """Queue `p` under a fresh ID; written at the next flush(). False when full."""
        if self.closed or len(self.inflight) >= MAX_INFLIGHT:
            return False
        uid = self._next_id
        while uid in self.inflight:
            uid = (uid + 1) & 0xFFFF
        self._next_id = (uid + 1) & 0xFFFF
        if not self.inflight:
            self.busy_since = now
        self.inflight[uid] = p
        p.uid = uid
        p.conn = self
        p.sent = time.monotonic()  # loop.time() is too coarse on uvloop for latencies
        if self.pad:
            q = p.padded or p.pad()
            p.strip = p.added_opt
        else:
            q = p.query
            p.strip = False
        if self.sends is not None:
            self._out.append(_ID.pack(uid) + q[2:])
            p.retransmits = 0
            self.sends.sent(p, 0, p.sent)
        else:
            self._out.append(_LEN_ID.pack(len(q), uid) + q[2:])
        return True

    def retransmit(self, now: float, rto: float) -> int:
        """Datagrams only: send again, under the same ID, the queries whose answer is overdue
        (`now`: time.monotonic()); written at once. Returns how many."""
        sends = self.sends
        if sends is None or self.closed:
            return 0
        if not self.inflight:
            sends.clear()  # only answered ones are left
            return 0
        inflight = self.inflight
        n = 0
        for p, level in sends.due(now, rto):
            if p.conn is not self or p.retransmits != level or inflight.get(p.uid) is not p:
                continue  # answered, timed out or moved on since
            p.retransmits = level + 1
            self._out.append(_ID.pack(p.uid) + p.query[2:])
            sends.sent(p, level + 1, now)
            n += 1
        if n:
            self._send_datagrams()
        return n

    def send_raw(self, frame: bytes) -> None:
        """Queue a framed message of the tunnel's own (not tracked in flight)."""
        self._out.append(frame)

    def flush(self) -> None:
        """Write everything queued as one TLS write and one send()."""
        if not self._out or self.closed:
            return
        if self.datagram:
            self._send_datagrams()
            return
        data = b"".join(self._out)
        self._out.clear()
        if self.tls is not None:
            try:
                self.tls.encrypt(data)
            except ssl.SSLError as exc:
                self.lose(TLSHandshakeFailed(f"TLS write failed: {exc}"))
                return
            data = self.tls.data_to_send()
        self._send(data)

    def _send(self, data: bytes) -> None:
        if self._wbuf:
            self._wbuf += data
            return
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.lose(Reset(f"{self.label}: send failed: {exc.strerror or exc}"))
            return
        self.last_tx = self.loop.time()
        if n < len(data):
            self._wbuf += data[n:]
            self.loop.add_writer(self.sock.fileno(), self._on_writable)

    def _send_datagrams(self) -> None:
        out, self._out = self._out, []
        for message in out:
            try:
                self.sock.send(message)
            except BlockingIOError:
                continue  # the socket buffer is full: like a lost datagram, the deadline rules
            except OSError as exc:
                self.lose(Reset(f"{self.label}: send failed: {exc.strerror or exc}"))
                return
        self.last_tx = self.loop.time()

    def _on_datagrams(self) -> None:
        inflight = self.inflight
        for _ in range(64):
            try:
                data = self.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                self.lose(Refused(f"{self.label}: port unreachable"))
                return
            except OSError as exc:
                self.lose(Reset(f"{self.label}: {exc.strerror or exc}"))
                return
            if len(data) < 12:
                continue
            now = self.loop.time()
            self.last_rx = self.busy_since = now
            p = inflight.get((data[0] << 8) | data[1])
            if p is None:
                continue  # late, or not ours (spoofed): ignored
            del inflight[(data[0] << 8) | data[1]]
            self._on_answer(self, p, data)

    def _on_writable(self) -> None:
        try:
            n = self.sock.send(self._wbuf)
        except BlockingIOError:
            return
        except OSError as exc:
            self.lose(Reset(f"{self.label}: send failed: {exc.strerror or exc}"))
            return
        del self._wbuf[:n]
        if not self._wbuf:
            self.loop.remove_writer(self.sock.fileno())

    # -- answers in ------------------------------------------------------------
    def _on_readable(self) -> None:
        if self.datagram:
            self._on_datagrams()
            return
        if self.inflight or self._quickacks:
            # ACK at once while answers are expected. Servers that write without
            # TCP_NODELAY (unbound 1.17: session tickets, then answers) otherwise hold
            # the next answer until our delayed ACK: +40 ms, or a whole RTT.
            if self._quickacks:
                self._quickacks -= 1
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.lose(Reset(f"{self.label}: {exc.strerror or exc}"))
            return
        eof = not data
        tls = self.tls
        if tls is not None:
            try:
                tls.feed(data)
                data = tls.decrypt()
                out = tls.data_to_send()  # e.g. key update answers
                if out:
                    self._send(out)
            except ssl.SSLError as exc:
                self.lose(TLSHandshakeFailed(f"{self.label}: TLS read failed: {exc}"))
                return
            eof = eof or tls.peer_closed
        if data:
            now = self.loop.time()
            self.last_rx = now
            self.busy_since = now
            inflight = self.inflight
            on_answer = self._on_answer
            for frame in self._frames.feed(data):
                if len(frame) < 12:
                    continue
                on_answer(self, inflight.pop((frame[0] << 8) | frame[1], None), frame)
        if eof and not self.closed:
            self.lose(Closed(f"{self.label} closed the connection"))

    # -- ending ------------------------------------------------------------------
    def forget(self, p: Pending) -> None:
        """`p` is answered or gone elsewhere: a late answer to it is dropped."""
        if self.inflight.get(p.uid) is p:
            del self.inflight[p.uid]
        p.conn = None

    def take_inflight(self) -> list[Pending]:
        pending = list(self.inflight.values())
        self.inflight.clear()
        for p in pending:
            p.conn = None
        return pending

    def lose(self, exc: TransportError) -> None:
        if self.closed:
            return
        self._shutdown(notify=False)
        self._on_lost(self, exc)

    def close(self) -> None:
        """Close on our side, with a TLS close_notify."""
        if not self.closed:
            self._shutdown(notify=True)

    def _shutdown(self, *, notify: bool) -> None:
        self.closed = True
        fd = self.sock.fileno()
        if fd >= 0:
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)
        if notify and self.tls is not None and not self._wbuf:
            self.tls.close_notify()
            out = self.tls.data_to_send()
            if out:
                with contextlib.suppress(OSError):
                    self.sock.send(out)
        self.sock.close()
