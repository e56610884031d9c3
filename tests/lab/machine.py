"""A lab's machine: a network namespace of the lab's plus mount and UTS namespaces that a
holder process pins, entered with nsenter. Shared by tests.lab.nmlab (NetworkManager's
machine) and tests.lab.dhcplab (an ifupdown machine with dhclient).

    holder = Holder.start(lab.cli, logs / "holder.log")   # unshare --mount --uts ... sleep
    holder.overlay_etc(lab_dir, "nmlab")                     # /etc: the host's, writes aside
    holder.run("mount", "--bind", ..., ...)                  # set up from outside
    machine = holder.machine                                 # a Netns: start(), run(), call()
    ...
    holder.sweep(); holder.stop()                            # stragglers by PID, then the pin

The mount namespace and every mount in it go with the last process in it, so nothing the
lab mounted outlives it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.lab.netns import REPO, Netns
from tests.lab.proc import Process, need

# What a process of the lab must not inherit from the one running the tests (a systemd
# unit's, a desktop session's): the lab's programs find their own bus and are no services.
SCRUB = (
    "DBUS_SYSTEM_BUS_ADDRESS",
    "DBUS_SESSION_BUS_ADDRESS",
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "INVOCATION_ID",
    "JOURNAL_STREAM",
)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra or {})
    return env


def pid_alive(pid: int) -> bool:
    """Running and not a zombie (whoever is its parent may reap it late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_foreign(pid: int, marker: bytes, timeout: float = 5.0) -> None:
    """Stop a process the lab caused but did not spawn itself (bus-activated, left by a
    hook), by PID; the command line must still contain `marker`, in case the PID was
    reused."""
    try:
        if marker not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return
        os.kill(pid, signal.SIGTERM)
    except (OSError, ProcessLookupError):
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end and pid_alive(pid):
        time.sleep(0.02)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def pids_in_mount_ns(inode: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{name}/ns/mnt").st_ino == inode:
                    out.append(int(name))
    return out


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class Machine(Netns):
    """The machine: the lab's network namespace plus the holder's mount and UTS
    namespaces, entered with nsenter (its /etc, /run and hostname are the lab's).

    A Netns, so that everything taking one (e.g. tests.lab.peer.spawn) takes this too;
    `call()` enters the network namespace only (a thread cannot enter a mount namespace).
    """

    def __init__(self, name: str, pid: int) -> None:  # not Netns's: the namespaces exist
        self.name = name
        self.pid = pid
        self.processes: list[Process] = []

    def argv(self, argv: Sequence[str]) -> list[str]:
        return [
            need("nsenter"),
            f"--target={self.pid}",
            "--net",
            "--mount",
            "--uts",
            f"--wd={REPO}",
            "--",
            *argv,
        ]

    def run(
        self, argv: Sequence[str], *, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            cwd=REPO,
            env=clean_env(),
        )

    def start(self, argv: Sequence[str], log: Path) -> Process:
        proc = Process(self.argv(argv), log, env=clean_env())
        self.processes.append(proc)
        return proc

    def delete(self) -> None:
        """Stop what was started here; the namespaces themselves belong to the lab."""
        for proc in reversed(self.processes):
            proc.stop()


class Holder:
    """`unshare --mount --uts --propagation=private sleep inf` in `ns`: it pins the
    machine's mount and UTS namespaces; `run()` sets them up from outside."""

    def __init__(self, proc: Process, ns: Netns) -> None:
        self.proc = proc
        self.mount_ns = os.stat(f"/proc/{proc.pid}/ns/mnt").st_ino
        if self.mount_ns == os.stat("/proc/self/ns/mnt").st_ino:
            raise RuntimeError("the holder is in the host's mount namespace")
        self.machine = Machine(ns.name, proc.pid)

    @classmethod
    def start(cls, ns: Netns, log: Path) -> Holder:
        argv = [need("unshare"), "--mount", "--uts", "--propagation=private", need("sleep"), "inf"]
        proc = Process(ns.argv(argv), log, env=clean_env())
        try:
            proc.wait_until(lambda: comm(proc.pid) == "sleep", 10, "holder (unshare)")
            return cls(proc, ns)
        except BaseException:
            proc.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command in the machine's mount and UTS namespaces (not its network's)."""
        res = subprocess.run(
            [need("nsenter"), f"--target={self.pid}", "--mount", "--uts", "--", *argv],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if check and res.returncode != 0:
            raise RuntimeError(f"in the machine's mount namespace: {argv}: {res.stderr.strip()}")
        return res

    def overlay_etc(self, directory: Path, name: str) -> str | None:
        """/etc an overlay: the host's the read-only lower layer, writes in DIR/etc-upper
        (what is there already shows through: prepare it first). When DIR cannot be an
        upper layer (it is on overlayfs itself), the upper layer goes on a tmpfs that only
        the machine sees, DIR/etc-upper copied in: then why, else None."""
        mount = need("mount")
        upper, work = directory / "etc-upper", directory / "etc-work"
        work.mkdir(exist_ok=True)
        overlay = self.run(
            mount, "-t", "overlay", f"{name}-etc", "-o",
            f"lowerdir=/etc,upperdir={upper},workdir={work}", "/etc", check=False,
        )  # fmt: skip
        if overlay.returncode == 0:
            return None
        tmpfs = directory / "etc-tmpfs"
        tmpfs.mkdir()
        self.run(mount, "-t", "tmpfs", f"{name}-etc-tmpfs", str(tmpfs))
        self.run(need("mkdir"), f"{tmpfs}/upper", f"{tmpfs}/work")
        self.run(need("cp"), "-a", f"{upper}/.", f"{tmpfs}/upper/")
        self.run(
            mount, "-t", "overlay", f"{name}-etc", "-o",
            f"lowerdir=/etc,upperdir={tmpfs}/upper,workdir={tmpfs}/work", "/etc",
        )  # fmt: skip
        return overlay.stderr

    def file(self, path: str) -> Path:
        """`path` in the machine, as seen from outside (through /proc/PID/root)."""
        return Path(f"/proc/{self.pid}/root{path}")

    def sweep(self) -> None:
        """Stop every process left in the machine's mount namespace but the holder."""
        if not self.proc.alive():
            return
        for pid in pids_in_mount_ns(self.mount_ns):
            if pid != self.pid:
                stop_foreign(pid, b"")

    def stop(self) -> None:
        self.proc.stop()
