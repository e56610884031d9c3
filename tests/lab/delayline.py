"""A fixed-delay layer-3 link between two network namespaces, made in userspace.

This kernel has no netem qdisc, so the delay is made here: one TUN device (IFF_TUN |
IFF_NO_PI: bare IP packets) in each namespace, both held by one process, which writes
every packet read from one into the other `rtt / 2` later, in order. So a round trip
across the link takes `rtt`, plus well under a millisecond of our own.

    client namespace ("cli")                  resolver namespace ("srv")
    dl0 203.0.113.2/24, 2001:db8:1::2/64      dl0 198.51.100.1/24, .2/24, 2001:db8::1/64, ::2/64
      routes 198.51.100.0/24, 2001:db8::/64     routes 203.0.113.0/24, 2001:db8:1::/64
          |                                              |
          +-- TUN fd --[ reader -> FIFO -> writer sleeps until due ]-- TUN fd --+
                    (a reader and a writer thread per direction)

How: each TUN device is opened by a thread that first entered its namespace
(`netns.call_in`), so the device is born there; addresses and routes are set with
`ip -n`. Packets are stamped when read and written when due (clock_nanosleep to
half a millisecond before, then a yielding loop, since a sleep alone often wakes a
millisecond late on a VM); the two directions never wait for each other. No loss,
no rate limit, no reordering, MTU 1500. A TUN device lives as long as its file
descriptor, so when the process ends, however it ends, the link and its routes go.

Use it
    from Python, with fresh namespaces (the forwarder runs as a child process, away
    from the caller's GIL; it stops by itself after `lifetime` seconds or when its
    parent dies, and the namespaces are deleted on exit):

        with DelayLab(rtt=0.020) as lab:
            lab.srv.start([...], log); lab.cli.run([...]); lab.check(20)

    between namespaces that exist, in this process: `with DelayLine(a, b, 0.020): ...`

    on its own (makes its namespaces, prints their names, deletes them at the end):
        python -m tests.lab.delayline [--rtt-ms 20] [--lifetime 60] [--check 20]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import os
import queue
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType

from tests.lab.netns import REPO, SRV_IP6S, SRV_IPS, Netns, call_in, new_tag
from tests.lab.proc import Process, need

CLI_IP = "203.0.113.2"
CLI_IP6 = "2001:db8:1::2"
IFNAME = "dl0"
MTU = 1500

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
READY = "delayline: ready"
SPIN = 0.0005  # the last half millisecond before a packet is due is waited out in a loop


@dataclasses.dataclass(frozen=True)
class Side:
    """One end of the link: its namespace, its addresses (with prefix), what it routes over."""

    netns: str
    addrs: tuple[str, ...]
    routes: tuple[str, ...]


def client_side(netns: str) -> Side:
    return Side(netns, (f"{CLI_IP}/24", f"{CLI_IP6}/64"), ("198.51.100.0/24", "2001:db8::/64"))


def server_side(netns: str) -> Side:
    addrs = (*(f"{ip}/24" for ip in SRV_IPS), *(f"{ip}/64" for ip in SRV_IP6S))
    return Side(netns, addrs, ("203.0.113.0/24", "2001:db8:1::/64"))


def open_tun(ifname: str) -> int:
    """A new TUN device in the calling thread's namespace; it lives as long as the fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), IFF_TUN | IFF_NO_PI))
        os.set_blocking(fd, False)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _ip(netns: str, *args: str) -> None:
    subprocess.run([need("ip"), "-n", netns, *args], check=True, capture_output=True, text=True)


def configure(side: Side, ifname: str) -> None:
    _ip(side.netns, "link", "set", ifname, "mtu", str(MTU), "up")
    for addr in side.addrs:
        _ip(side.netns, "addr", "add", addr, "dev", ifname, *(["nodad"] if ":" in addr else []))
    for prefix in side.routes:
        _ip(side.netns, "route", "add", prefix, "dev", ifname)


class _Direction:
    """src -> dst, each packet written `delay` seconds after it was read, in order."""

    def __init__(self, name: str, src: int, dst: int, delay: float, stop_fd: int) -> None:
        self.name = name
        self.src = src
        self.dst = dst
        self.delay = delay
        self.stop_fd = stop_fd
        self.packets = 0
        self.late_max = 0.0  # worst lateness of a write, seconds
        self.errors = 0
        self._q: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._read, name=f"{name} read", daemon=True),
            threading.Thread(target=self._write, name=f"{name} write", daemon=True),
        ]

    def _read(self) -> None:
        poller = select.poll()
        poller.register(self.src, select.POLLIN)
        poller.register(self.stop_fd, select.POLLIN)
        try:
            while True:
                events = poller.poll()
                if any(fd == self.stop_fd for fd, _ in events):
                    return
                while True:  # everything queued now, each stamped when read
                    try:
                        pkt = os.read(self.src, 65536)
                    except BlockingIOError:
                        break
                    self._q.put((time.monotonic() + self.delay, pkt))
        except OSError:
            self.errors += 1
        finally:
            self._q.put(None)

    def _write(self) -> None:
        while (item := self._q.get()) is not None:
            due, pkt = item
            wait = due - time.monotonic() - SPIN
            if wait > 0:
                time.sleep(wait)
            while time.monotonic() < due:
                time.sleep(0)  # the last stretch: yields the GIL, wakes in microseconds
            self.late_max = max(self.late_max, time.monotonic() - due)
            try:
                os.write(self.dst, pkt)
                self.packets += 1
            except OSError:
                self.errors += 1


class DelayLine:
    """The link between two existing namespaces, run by threads of this process."""

    def __init__(self, a: Side | str, b: Side | str, rtt: float, *, ifname: str = IFNAME) -> None:
        self.a = client_side(a) if isinstance(a, str) else a
        self.b = server_side(b) if isinstance(b, str) else b
        self.rtt = rtt
        self.ifname = ifname
        self._fds: list[int] = []
        self._dirs: list[_Direction] = []
        self._stop_r, self._stop_w = -1, -1

    def start(self) -> DelayLine:
        try:
            for side in (self.a, self.b):
                self._fds.append(call_in(side.netns, lambda: open_tun(self.ifname), 10))
                configure(side, self.ifname)
            fa, fb = self._fds
            self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
            half = self.rtt / 2
            self._dirs = [
                _Direction(f"{self.a.netns}>{self.b.netns}", fa, fb, half, self._stop_r),
                _Direction(f"{self.b.netns}>{self.a.netns}", fb, fa, half, self._stop_r),
            ]
            for d in self._dirs:
                for t in d.threads:
                    t.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop forwarding and close the TUN devices (which removes them). Idempotent."""
        if self._stop_w >= 0:
            os.write(self._stop_w, b"x")
        for d in self._dirs:
            for t in d.threads:
                t.join(5)
        for fd in (*self._fds, self._stop_r, self._stop_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fds, self._stop_r, self._stop_w = [], -1, -1

    def summary(self) -> str:
        return ", ".join(
            f"{d.name}: {d.packets} packets, {d.errors} errors, "
            f"at most {d.late_max * 1000:.2f} ms late"
            for d in self._dirs
        )

    def __enter__(self) -> DelayLine:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def echo_rtts(
    cli: str, srv: str, count: int, *, srv_ip: str = SRV_IPS[0], gap: float = 0.01
) -> list[float]:
    """Round-trip times (seconds) of `count` UDP echoes from namespace `cli` to `srv_ip`."""
    family = socket.AF_INET6 if ":" in srv_ip else socket.AF_INET

    def bound() -> socket.socket:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind((srv_ip, 0))
        return s

    server = call_in(srv, bound, 5)  # sockets stay in the namespace they were made in
    client = call_in(cli, lambda: socket.socket(family, socket.SOCK_DGRAM), 5)
    port = server.getsockname()[1]
    server.settimeout(0.2)
    done = threading.Event()

    def echo() -> None:
        while not done.is_set():
            try:
                data, peer = server.recvfrom(2048)
            except TimeoutError:
                continue
            server.sendto(data, peer)

    thread = threading.Thread(target=echo, name="udp echo", daemon=True)
    thread.start()
    client.settimeout(2.0)
    rtts: list[float] = []
    try:
        for i in range(count):
            payload = i.to_bytes(4, "big")
            t0 = time.perf_counter()
            client.sendto(payload, (srv_ip, port))
            while client.recv(2048) != payload:
                pass
            rtts.append(time.perf_counter() - t0)
            time.sleep(gap)
    finally:
        done.set()
        thread.join(1)
        client.close()
        server.close()
    return rtts


def describe(rtts: Sequence[float]) -> str:
    ms = [r * 1000 for r in rtts]
    return (
        f"{len(ms)} echoes: mean {statistics.fmean(ms):.2f} ms, min {min(ms):.2f}, "
        f"median {statistics.median(ms):.2f}, max {max(ms):.2f}"
    )


class DelayLab:
    """Two fresh namespaces (`cli`, `srv`) joined by a delay line; a context manager.

    The forwarder is a child process (`python -m tests.lab.delayline --attach ...`).
    On exit: the processes started in the namespaces, then the forwarder (by PID),
    then the namespaces.
    """

    def __init__(self, rtt: float = 0.020, *, lifetime: float = 600.0) -> None:
        self.rtt = rtt
        self.lifetime = lifetime
        self.tag = new_tag()
        self.cli_ip, self.cli_ip6 = CLI_IP, CLI_IP6
        self.srv_ips, self.srv_ip6s = SRV_IPS, SRV_IP6S
        self._cli: Netns | None = None
        self._srv: Netns | None = None
        self.proc: Process | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def cli(self) -> Netns:
        assert self._cli is not None, "use DelayLab as a context manager"
        return self._cli

    @property
    def srv(self) -> Netns:
        assert self._srv is not None, "use DelayLab as a context manager"
        return self._srv

    def __enter__(self) -> DelayLab:
        try:
            self._cli = Netns(f"dtd-cli-{self.tag}")
            self._srv = Netns(f"dtd-srv-{self.tag}")
            self._tmp = tempfile.TemporaryDirectory(prefix="delayline-")
            argv = [sys.executable, "-m", "tests.lab.delayline", "--attach", self.cli.name]
            argv += [self.srv.name, "--rtt-ms", str(self.rtt * 1000)]
            argv += ["--lifetime", str(self.lifetime), "--parent", str(os.getpid())]
            log = Path(self._tmp.name) / "delayline.log"
            self.proc = Process(argv, log, env={**os.environ, "PYTHONPATH": str(REPO)})
            self.proc.wait_until(lambda: READY in log.read_text(), 10, "delay line")
        except BaseException:
            self.close()
            raise
        return self

    def check(self, count: int = 20, srv_ip: str = SRV_IPS[0]) -> list[float]:
        """UDP echo round trips across the link, in seconds."""
        return echo_rtts(self.cli.name, self.srv.name, count, srv_ip=srv_ip)

    def close(self) -> None:
        for ns in (self._cli, self._srv):
            for proc in reversed(ns.processes if ns else []):
                proc.stop()
        if self.proc is not None:
            self.proc.stop()
        for ns in (self._cli, self._srv):
            if ns is not None:
                ns.delete()
        if self._tmp is not None:
            self._tmp.cleanup()
        self._cli = self._srv = self.proc = self._tmp = None

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.lab.delayline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="round-trip delay (20)")
    parser.add_argument(
        "--lifetime", type=float, default=60.0, help="stop after this many seconds (60)"
    )
    parser.add_argument(
        "--check", type=int, metavar="N", help="measure N UDP echoes (IPv4, IPv6), then stop"
    )
    parser.add_argument(
        "--attach",
        nargs=2,
        metavar=("CLI", "SRV"),
        help="link these existing namespaces (not deleted at the end) instead of new ones",
    )
    parser.add_argument("--parent", type=int, help="stop when this process is no longer our parent")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, TUN devices)")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    owned: list[Netns] = []
    try:
        if args.attach:
            cli, srv = args.attach
        else:
            tag = new_tag()
            for side in ("cli", "srv"):  # one at a time: the first is owned if the second fails
                owned.append(Netns(f"dtd-{side}-{tag}"))
            cli, srv = owned[0].name, owned[1].name
        end = time.monotonic() + args.lifetime
        with DelayLine(cli, srv, args.rtt_ms / 1000) as line:
            print(
                f"{READY}: {cli} ({CLI_IP}, {CLI_IP6}) <-> {srv} ({', '.join(SRV_IPS)}, "
                f"{', '.join(SRV_IP6S)}), RTT {args.rtt_ms:g} ms, for at most {args.lifetime:g} s",
                flush=True,
            )
            if args.check:
                for ip in (SRV_IPS[0], SRV_IP6S[0]):
                    print(f"UDP echo {CLI_IP if ':' not in ip else CLI_IP6} -> {ip}: ", end="")
                    print(describe(echo_rtts(cli, srv, args.check, srv_ip=ip)), flush=True)
            else:
                while not stop.wait(0.2):
                    if time.monotonic() > end:
                        print("delayline: lifetime over", flush=True)
                        break
                    if args.parent is not None and os.getppid() != args.parent:
                        print("delayline: parent gone", flush=True)
                        break
        print(f"delayline: stopped; {line.summary()}", flush=True)
    finally:
        for ns in owned:
            ns.delete()
    return 0


if __name__ == "__main__":
    sys.exit(main())
