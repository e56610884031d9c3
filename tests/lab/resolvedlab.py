"""The real systemd-resolved as the machine's stub, fed by a real NetworkManager, in an NMLab.

systemd-resolved is not installed on the host and must not be: its maintainer scripts make
/etc/resolv.conf its own. `fetch_resolved()` downloads Debian's package (`apt-get download`,
the version of the host's libsystemd-shared, which the binary links against) and unpacks it
with `dpkg -x`; nothing of it is installed. The lab then runs it inside NMLab's machine (the
network namespace of the client veth, a private mount namespace whose /etc is an overlay and
whose /run is the lab's, and the private system bus):

    /etc/passwd, /etc/group  + the user systemd-resolve (resolved, started as root, drops to
                             it), written in the overlay's upper layer
    /etc/resolv.conf         a symlink to ../run/systemd/resolve/stub-resolv.conf, as on a
                             machine with resolved (NM is told rc-manager=unmanaged)
    /etc/systemd/resolved.conf  only if a test gives one (an administrator's settings)
    resolved                 run by tests.lab.servicemanager, which also owns
                             org.freedesktop.systemd1 on the bus and restarts resolved when
                             asked for it as systemd would (no systemd is PID 1 here)
    NetworkManager           dns=systemd-resolved: each link's servers and domains reach
                             resolved with SetLink* calls, as on a desktop. Its
                             NetworkManager.conf says so explicitly (which outranks a drop-in
                             in /run/NetworkManager/conf.d); with nm_dns="auto" it says
                             nothing about DNS, as a stock one, and NM picks resolved because
                             /etc/resolv.conf is resolved's symlink from the start

Servers on the network side are the test peer served from a thread of this process inside
the server namespace (`PeerInNetns`): what reaches it is counted on the server side.

Teardown: NMLab's (what was started in the machine, by PID, then NM, the bus, the holder).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

from agent.sysconf.resolved import NM_DROPIN, RESOLVE1, UNIT, DBusResolved, Snapshot
from tests.lab.netns import SRV_IPS, enter
from tests.lab.nmlab import NMLab
from tests.lab.peer import Peer, PeerConfig, Seen
from tests.lab.proc import Process, need
from tests.lab.resolvconflab import LabError, fetch

PACKAGE = "systemd-resolved"
BINARY = "lib/systemd/systemd-resolved"
RESOLVECTL = "usr/bin/resolvectl"
USER_ID = 64953  # the lab's systemd-resolve user (only in the lab's /etc)
STUB_RESOLV_CONF = "../run/systemd/resolve/stub-resolv.conf"
LINK_DNS = SRV_IPS[0]  # what dnsmasq hands out: the link's own server


def fetch_resolved(into: Path) -> Path:
    """Debian's systemd-resolved, unpacked under `into` (never installed); checked to run
    (it links against the host's libsystemd-shared, of the same systemd version)."""
    root = fetch(PACKAGE, into)
    res = subprocess.run(
        [str(root / BINARY), "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    if res.returncode != 0 or not res.stdout.startswith("systemd "):
        raise LabError(f"{root / BINARY} --version: {res.stderr.strip() or res.stdout.strip()}")
    return root


class PeerInNetns:
    """The test peer, served by a thread of this process inside network namespace `netns`:
    `seen()` is every query it received (counted on the server side)."""

    def __init__(self, netns: str, config: PeerConfig) -> None:
        self.netns = netns
        self.config = config
        self.peer = Peer(config)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._body, name=f"peer in {netns}", daemon=True)

    def _body(self) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self.peer.start()
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await self.peer.stop()

        try:
            enter(self.netns)
            asyncio.run(serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def __enter__(self) -> PeerInNetns:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            self.close()  # a peer that started late is stopped, not left serving
            raise LabError(f"test peer in {self.netns} did not start: {self._error!r}")
        return self

    def seen(self) -> list[Seen]:
        return list(self.peer.seen)

    def names(self) -> list[str]:
        return [s.qname for s in self.seen()]

    def clear(self) -> None:
        self.peer.seen.clear()

    def close(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class ResolvedLab:
    """`with ResolvedLab(tmp_path, package_root) as lab: ...`

    lab.nm is the NMLab (lab.nm.srv, .cli, .machine, .bus_address, .ifname, renew(), ...);
    resolvectl() runs the package's resolvectl in the machine; snapshot() is what resolved
    holds (agent.sysconf.resolved.Snapshot, read in the machine's network namespace);
    restart_resolved() asks the stand-in systemd to restart it and waits for it to be back;
    starts() counts resolved's starts; agent() runs `python -m agent -c CONFIG ...` in the
    machine (state in DIR/state, stub_backend auto: detection is part of what is tested).
    """

    def __init__(
        self,
        directory: Path,
        package_root: Path,
        *,
        dns: Sequence[str] = (LINK_DNS,),
        resolved_conf: str | None = None,
        nm_dns: Literal["systemd-resolved", "auto"] = "systemd-resolved",
        timeout: float = 30.0,
    ) -> None:
        self.package_root = package_root
        self.resolved_conf = resolved_conf
        self.timeout = timeout
        self.nm = NMLab(
            directory,
            dns=dns,
            nm_dns=nm_dns,
            resolv_conf_link=STUB_RESOLV_CONF if nm_dns == "auto" else None,
            timeout=timeout,
        )
        self.manager: Process | None = None
        self.startup_seconds = 0.0

    @property
    def dir(self) -> Path:
        return self.nm.dir

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def config(self) -> Path:
        return self.dir / "agent.toml"

    @property
    def starts_file(self) -> Path:
        return self.dir / "resolved-starts.jsonl"

    @property
    def dropin(self) -> Path:
        """Our drop-in as seen from outside (the machine's /run is DIR/run)."""
        return self.dir / "run/systemd/resolved.conf.d/zz-dnstls-agent.conf"

    def nm_dropins(self) -> dict[str, Path]:
        """Our NetworkManager drop-ins that exist, by where ("run", "etc"), seen from outside
        (the machine's /etc/NetworkManager is DIR/etc-nm)."""
        places = {
            "run": self.dir / "run/NetworkManager/conf.d" / NM_DROPIN,
            "etc": self.dir / "etc-nm/conf.d" / NM_DROPIN,
        }
        return {where: path for where, path in places.items() if path.exists()}

    def resolv_conf_link(self) -> str:
        """The machine's /etc/resolv.conf as a symlink target ("" if it is not a symlink)."""
        return self.run([need("readlink"), "/etc/resolv.conf"], check=False).stdout.strip()

    # -- start-up ----------------------------------------------------------------------------
    def __enter__(self) -> ResolvedLab:
        t0 = time.monotonic()
        self.nm.__enter__()
        try:
            self._machine_files()
            self._start_resolved()
            self._wait(lambda s: bool(s.links().get(self._ifindex())), "NM's link in resolved")
        except BaseException:
            self.nm.close()
            raise
        self.config.write_text(
            f'state_dir = "{self.state_dir}"\n'
            f'stub_state_dir = "{self.state_dir}"\n'
            f'runtime_dir = "{self.dir / "runtime"}"\n'
            'stub_backend = "auto"\n'
        )
        self.startup_seconds = time.monotonic() - t0
        print(f"resolvedlab: up in {self.startup_seconds:.2f}s", file=sys.stderr)
        return self

    def _machine_files(self) -> None:
        uid = USER_ID
        conf = ""
        if self.resolved_conf is not None:
            (self.dir / "resolved.conf").write_text(self.resolved_conf)
            conf = f"mkdir -p /etc/systemd && cp {self.dir / 'resolved.conf'} /etc/systemd/\n"
        self.sh(
            "set -e\n"
            "mkdir -p /run/systemd\n"
            "grep -q '^systemd-resolve:' /etc/passwd || "
            f"echo 'systemd-resolve:x:{uid}:{uid}::/:/usr/sbin/nologin' >> /etc/passwd\n"
            "grep -q '^systemd-resolve:' /etc/group || "
            f"echo 'systemd-resolve:x:{uid}:' >> /etc/group\n"
            f"ln -sfn {STUB_RESOLV_CONF} /etc/resolv.conf\n" + conf
        )

    def _start_resolved(self) -> None:
        assert self.nm.machine is not None
        resolved = [
            need("env"),
            "SYSTEMD_LOG_LEVEL=debug",
            "SYSTEMD_LOG_TARGET=console",
            str(self.package_root / BINARY),
        ]
        log = self.nm.logs / "servicemanager.log"
        self.manager = self.nm.machine.start(
            [sys.executable, "-m", "tests.lab.servicemanager", "--unit", UNIT,
             "--state", str(self.starts_file), "--child-log", str(self.resolved_log), *resolved],
            log,
        )  # fmt: skip
        try:
            self.manager.wait_until(
                lambda: "ready" in log.read_text(errors="replace").splitlines(), 15,
                "servicemanager",
            )  # fmt: skip
        except RuntimeError as exc:
            raise LabError(f"{exc}\n{self._resolved_tail()}") from None
        self._wait(lambda s: True, "resolved on the bus")

    @property
    def resolved_log(self) -> Path:
        return self.nm.logs / "resolved.log"

    def _resolved_tail(self, lines: int = 30) -> str:
        try:
            text = self.resolved_log.read_text(errors="replace")
        except OSError:
            return "(no resolved log)"
        return "resolved's log:\n" + "\n".join(text.splitlines()[-lines:])

    # -- using it ------------------------------------------------------------------------------
    def _ifindex(self) -> int:
        assert self.nm.cli is not None
        return int(
            self.nm.cli.run([need("cat"), f"/sys/class/net/{self.nm.ifname}/ifindex"]).stdout
        )

    def control(self) -> DBusResolved:
        return DBusResolved(self.nm.bus_address)

    def snapshot(self) -> Snapshot:
        """What resolved holds now (interface names as the machine sees them)."""
        assert self.nm.cli is not None
        return self.nm.cli.call(lambda: self.control().snapshot(), 15)

    def _wait(
        self, done: Callable[[Snapshot], bool], what: str, timeout: float | None = None
    ) -> Snapshot:
        end = time.monotonic() + (timeout or self.timeout)
        last: BaseException | None = None
        while time.monotonic() < end:
            try:
                snap = self.snapshot()
                if done(snap):
                    return snap
            except Exception as exc:  # resolved may be away for a moment
                last = exc
            if self.manager is not None and not self.manager.alive():
                raise LabError(
                    f"servicemanager exited; log:\n{self.manager.tail()}\n{self._resolved_tail()}"
                )
            time.sleep(0.05)
        log = self.manager.tail(10) if self.manager else ""
        raise TimeoutError(
            f"resolvedlab: no {what} (last error {last!r}); servicemanager's log:\n{log}\n"
            f"{self._resolved_tail(40)}"
        )

    def starts(self) -> int:
        try:
            return len(self.starts_file.read_text().splitlines())
        except OSError:
            return 0

    def restart_resolved(self) -> None:
        """As `systemctl restart systemd-resolved`: returns once the new one is on the bus."""
        before = self.starts()
        self.control().restart()
        end = time.monotonic() + self.timeout
        while self.starts() == before and time.monotonic() < end:
            time.sleep(0.02)
        self._wait(lambda s: True, "resolved back on the bus")

    def on_bus(self) -> bool:
        return self.control().on_bus()

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        assert self.nm.machine is not None
        res = self.nm.machine.run(argv, check=False, timeout=timeout)
        if check and res.returncode != 0:
            raise LabError(
                f"in the machine: {list(argv)}: exit {res.returncode}: "
                f"{res.stderr.strip()} {res.stdout.strip()}"
            )
        return res

    def sh(self, script: str) -> subprocess.CompletedProcess[str]:
        return self.run([need("sh"), "-c", script])

    def resolvectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run([str(self.package_root / RESOLVECTL), *args], check=check)

    def query(self, name: str) -> str:
        """`resolvectl query NAME` (resolved's own API, no cache); its output."""
        return self.resolvectl("query", "--cache=no", name).stdout

    def agent(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run([sys.executable, "-m", "agent", "-c", str(self.config), *args],
                        check=check)  # fmt: skip

    def journal(self) -> dict[str, object] | None:
        try:
            data: dict[str, object] = json.loads((self.state_dir / "stub.json").read_text())
        except FileNotFoundError:
            return None
        return data

    # -- teardown ------------------------------------------------------------------------------
    def close(self) -> None:
        self.nm.close()  # stops the servicemanager (and resolved with it) first

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.nm.__exit__(t, v, tb)


__all__ = [
    "LINK_DNS",
    "RESOLVE1",
    "STUB_RESOLV_CONF",
    "LabError",
    "PeerInNetns",
    "ResolvedLab",
    "fetch_resolved",
]
