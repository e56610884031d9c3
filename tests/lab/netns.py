"""Throw-away network namespaces joined by a veth pair, in the documentation ranges only.

    srv: 198.51.100.1/24 and .2/24, 2001:db8::1/64 and ::2/64  (the "network" side)
    cli: 198.51.100.100/24, 2001:db8::100/64                     (the "machine" side)

Everything is torn down on exit, also when a test fails: processes first (by PID),
then the namespaces.

Also, for code that must *be* in a namespace rather than run a program there (opening
a TUN device, a socket): `enter(name)` moves the calling thread (libc setns; Python
3.11 has no os.setns) and `call_in(name, fn)` runs `fn` in a fresh thread that enters
first and ends afterwards, so no thread ever has to find its way back.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from tests.lab.proc import Process, need

SRV_IPS = ("198.51.100.1", "198.51.100.2")
SRV_IP6S = ("2001:db8::1", "2001:db8::2")
CLI_IP = "198.51.100.100"
CLI_IP6 = "2001:db8::100"
_counter = itertools.count()
REPO = Path(__file__).resolve().parents[2]
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def new_tag() -> str:
    """A short tag, unique per process and call, for namespace and interface names."""
    return f"{os.getpid() % 100000}{next(_counter)}"


def enter(name: str) -> None:
    """Move the calling thread (only it) into the named network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in(name: str, fn: Callable[[], T], timeout: float | None = None) -> T:
    """`fn()` in a new thread inside namespace `name`; its result, or its exception."""
    out: list[T] = []
    err: list[BaseException] = []

    def body() -> None:
        try:
            enter(name)
            out.append(fn())
        except BaseException as exc:
            err.append(exc)

    thread = threading.Thread(target=body, name=f"in {name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{name}: still running after {timeout}s")
    if err:
        raise err[0]
    return out[0]


def run_ip(*args: str) -> None:
    """`ip ARGS`; a RuntimeError with ip's own words when it fails."""
    out = subprocess.run([need("ip"), *args], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip() or out.returncode}")


class Netns:
    def __init__(self, name: str) -> None:
        """Made whole or not at all: a step that fails after `ip netns add` deletes the
        namespace again before the error goes up (no caller holds it to clean up)."""
        self.name = name
        self.processes: list[Process] = []
        run_ip("netns", "add", name)
        try:
            run_ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run `fn` inside this namespace (in a thread of this process), see `call_in`."""
        return call_in(self.name, fn, timeout)

    def sysctl(self, key: str, value: str | int) -> None:
        """Set a per-namespace sysctl (net.*), e.g. sysctl("net.ipv4.tcp_fastopen", 3)."""
        self.run([need("sysctl"), "-q", "-w", f"{key}={value}"])

    def argv(self, argv: Sequence[str]) -> list[str]:
        return [need("ip"), "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str], *, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(argv), capture_output=True, text=True, timeout=timeout, check=check, cwd=REPO
        )

    def start(self, argv: Sequence[str], log: Path) -> Process:
        proc = Process(self.argv(argv), log, env={**os.environ, "PYTHONPATH": str(REPO)})
        self.processes.append(proc)
        return proc

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def nft(self, ruleset: str) -> None:
        subprocess.run(
            self.argv([need("nft"), "-f", "-"]),
            input=ruleset,
            text=True,
            check=True,
            capture_output=True,
        )

    def delete(self) -> None:
        """Processes first (by PID), then the namespace, also when stopping one failed."""
        try:
            for proc in reversed(self.processes):
                proc.stop()
        finally:
            subprocess.run(
                [need("ip"), "netns", "del", self.name], capture_output=True, check=False
            )


class Lab:
    """Two namespaces and a veth pair; use as a context manager."""

    def __init__(self) -> None:
        tag = new_tag()
        self.tag = tag
        self.srv: Netns | None = None
        self.cli: Netns | None = None

    def __enter__(self) -> Lab:
        try:
            self.srv = Netns(f"dta-srv-{self.tag}")
            self.cli = Netns(f"dta-cli-{self.tag}")
            v_srv, v_cli = f"dtas{self.tag}"[:15], f"dtac{self.tag}"[:15]
            run_ip(
                "link",
                "add",
                v_srv,
                "netns",
                self.srv.name,
                "type",
                "veth",
                "peer",
                "name",
                v_cli,
                "netns",
                self.cli.name,
            )
            for ip in SRV_IPS:
                run_ip("-n", self.srv.name, "addr", "add", f"{ip}/24", "dev", v_srv)
            for ip6 in SRV_IP6S:
                run_ip("-n", self.srv.name, "addr", "add", f"{ip6}/64", "dev", v_srv, "nodad")
            run_ip("-n", self.cli.name, "addr", "add", f"{CLI_IP}/24", "dev", v_cli)
            run_ip("-n", self.cli.name, "addr", "add", f"{CLI_IP6}/64", "dev", v_cli, "nodad")
            run_ip("-n", self.srv.name, "link", "set", v_srv, "up")
            run_ip("-n", self.cli.name, "link", "set", v_cli, "up")
            self.veth_srv = v_srv
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for ns in (self.cli, self.srv):
            if ns is not None:
                ns.delete()

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
