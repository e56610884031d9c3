"""Debian's resolvconf or openresolv, the real programs, in a private mount namespace.

Neither is installed on the host, and must not be: their maintainer scripts take over
/etc/resolv.conf. `fetch()` downloads a package with `apt-get download` and unpacks it
with `dpkg -x`; a lab then runs it where only the lab sees it. A holder process
(`unshare --mount --net --propagation=private sleep inf`) pins namespaces in which:

    /etc             an overlay: the host's /etc the read-only lower layer, every write in
                     DIR/etc-upper (resolv.conf there: Debian: a symlink to
                     ../run/resolvconf/resolv.conf, as the package sets it up; openresolv:
                     a file, at first empty; openresolv's resolvconf.conf)
    /etc/resolvconf  (Debian) a bind mount of the package's own, which hides hooks the
                     host may have there (unbound's calls unbound-control)
    /usr             a read-only overlay with the package's sbin/ and lib/resolvconf on top:
                     /sbin/resolvconf and /lib/resolvconf are where the scripts expect them
    /run             a tmpfs: the programs' state (/run/resolvconf), and no way to the
                     host's services (no systemd socket, no pid files)
    network          a namespace of its own, with nothing in it

openresolv gets a resolvconf.conf of only `resolv_conf=/etc/resolv.conf` and
`libc_restart=:`: Debian's default one also names dnsmasq's, pdnsd's and unbound's
files, whose subscribers would restart those services. Debian's resolvconf gets its
updates enabled (`--enable-updates`, as its unit does at boot).

Teardown: what was started in the lab (by PID), then the holder: the mount namespace,
every mount in it and the network namespace go with the last process in them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

from tests.lab.netns import REPO
from tests.lab.proc import Process, need

Kind = Literal["debian", "openresolv"]
PACKAGES: dict[Kind, str] = {"debian": "resolvconf", "openresolv": "openresolv"}
PROGRAM = "/sbin/resolvconf"
OPENRESOLV_CONF = """# the lab's: libc only (no service is restarted)
resolv_conf=/etc/resolv.conf
libc_restart=:
"""


class LabError(RuntimeError):
    """The lab could not be set up."""


def fetch(package: str, into: Path) -> Path:
    """The package's files, unpacked under `into/package` (apt-get download, dpkg -x)."""
    dest = into / package
    if dest.is_dir():
        return dest
    into.mkdir(parents=True, exist_ok=True)
    debs = Path(tempfile.mkdtemp(prefix="debs-", dir=into))
    argv = [need("apt-get"), "download", "-q", "-o", "APT::Sandbox::User=root", package]
    got = subprocess.run(argv, cwd=debs, capture_output=True, text=True, timeout=120, check=False)
    if got.returncode != 0:  # stale package lists (an old version gone from the mirror)
        subprocess.run(
            [need("apt-get"), "update", "-qq"], capture_output=True, timeout=300, check=False
        )
        got = subprocess.run(
            argv, cwd=debs, capture_output=True, text=True, timeout=120, check=False
        )
    found = sorted(debs.glob(f"{package}_*.deb"))
    if got.returncode != 0 or not found:
        raise LabError(f"apt-get download {package}: {got.stderr.strip() or got.stdout.strip()}")
    subprocess.run([need("dpkg"), "-x", str(found[-1]), str(dest)], check=True, timeout=60)
    return dest


class ResolvconfLab:
    """`with ResolvconfLab(tmp_path, "debian", package_root) as lab: ...`

    run() / sh() / start() run in the lab; add() and delete() are an interface's
    `resolvconf -a` / `-d`; resolv_conf() is the lab's /etc/resolv.conf; write() puts a
    file in the lab's /etc; agent() runs `python -m agent -c DIR/agent.toml ...` there
    (state in DIR/state, stub_backend auto: detection is part of what is tested).
    """

    def __init__(self, directory: Path, kind: Kind, package_root: Path) -> None:
        self.kind = kind
        self.package_root = package_root
        self.parent = directory
        self.dir = Path()
        self.holder: Process | None = None
        self.processes: list[Process] = []
        self.startup_seconds = 0.0

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def config(self) -> Path:
        return self.dir / "agent.toml"

    # -- start-up ----------------------------------------------------------------------------
    def __enter__(self) -> ResolvconfLab:
        t0 = time.monotonic()
        try:
            self._layout()
            self._namespaces()
            self._mounts()
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _layout(self) -> None:
        self.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"rclab-{self.kind}-", dir=self.parent))
        if any(c in str(self.dir) for c in ",:"):
            raise LabError(f"{self.dir}: overlayfs options cannot take ',' or ':'")
        for sub in ("usr/sbin", "usr/lib", "etc-upper", "etc-work", "logs", "state"):
            (self.dir / sub).mkdir(parents=True)
        pkg = self.package_root
        shutil.copy2(pkg / "sbin/resolvconf", self.dir / "usr/sbin/resolvconf")
        shutil.copytree(pkg / "lib/resolvconf", self.dir / "usr/lib/resolvconf", symlinks=True)
        upper = self.dir / "etc-upper"
        if self.kind == "debian":
            shutil.copytree(pkg / "etc/resolvconf", self.dir / "etc-resolvconf", symlinks=True)
            (upper / "resolv.conf").symlink_to("../run/resolvconf/resolv.conf")
        else:
            (upper / "resolvconf.conf").write_text(OPENRESOLV_CONF)
            (upper / "resolv.conf").write_text("")
        self.config.write_text(
            f'state_dir = "{self.state_dir}"\n'
            f'stub_state_dir = "{self.state_dir}"\n'
            f'runtime_dir = "{self.dir / "runtime"}"\n'
            'stub_backend = "auto"\n'
        )

    def _namespaces(self) -> None:
        argv = [need("unshare"), "--mount", "--net", "--propagation=private", need("sleep"), "inf"]
        holder = Process(argv, self.dir / "logs/holder.log")
        self.holder = holder

        def comm() -> str:
            try:
                return Path(f"/proc/{holder.pid}/comm").read_text().strip()
            except OSError:
                return ""

        holder.wait_until(lambda: comm() == "sleep", 10, "holder (unshare)")
        if os.stat(f"/proc/{holder.pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino:
            raise LabError("the holder is in the host's mount namespace")

    def _mounts(self) -> None:
        mount = need("mount")
        upper, work = self.dir / "etc-upper", self.dir / "etc-work"
        etc = self.run(
            [mount, "-t", "overlay", "rclab-etc", "-o",
             f"lowerdir=/etc,upperdir={upper},workdir={work}", "/etc"],
            check=False,
        )  # fmt: skip
        if etc.returncode != 0:
            # the lab directory cannot be an upper layer (e.g. it is on overlayfs itself):
            # keep the upper layer on a tmpfs that only the lab sees
            tmpfs = self.dir / "etc-tmpfs"
            tmpfs.mkdir()
            self.run([mount, "-t", "tmpfs", "rclab-etc-tmpfs", str(tmpfs)])
            self.run([need("cp"), "-a", f"{upper}/.", f"{tmpfs}/upper"])
            self.run([need("mkdir"), f"{tmpfs}/work"])
            self.run(
                [mount, "-t", "overlay", "rclab-etc", "-o",
                 f"lowerdir=/etc,upperdir={tmpfs}/upper,workdir={tmpfs}/work", "/etc"],
            )  # fmt: skip
        self.run(
            [mount, "-t", "overlay", "rclab-usr", "-o", f"lowerdir={self.dir}/usr:/usr", "/usr"]
        )
        self.run([mount, "-t", "tmpfs", "-o", "mode=0755", "rclab-run", "/run"])
        if self.kind == "debian":
            self.run([need("mkdir"), "-p", "/etc/resolvconf", "/run/resolvconf/interface"])
            self.run([mount, "--bind", str(self.dir / "etc-resolvconf"), "/etc/resolvconf"])
            self.run([PROGRAM, "--enable-updates"])
        version = self.run([PROGRAM, "--version"]).stdout
        expect = "Debian resolvconf" if self.kind == "debian" else "openresolv"
        if not version.startswith(expect):
            raise LabError(f"{PROGRAM} in the lab says {version!r}, not {expect}")

    # -- in the lab --------------------------------------------------------------------------
    def argv(self, argv: Sequence[str]) -> list[str]:
        assert self.holder is not None
        return [need("nsenter"), f"--target={self.holder.pid}", "--mount", "--net",
                f"--wd={REPO}", "--", *argv]  # fmt: skip

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO)}

    def run(
        self, argv: Sequence[str], *, stdin: str | None = None, check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        res = subprocess.run(
            self.argv(argv),
            input=stdin,
            stdin=subprocess.DEVNULL if stdin is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.env(),
        )
        if check and res.returncode != 0:
            raise LabError(f"in the lab: {list(argv)}: exit {res.returncode}: {res.stderr.strip()}")
        return res

    def start(self, argv: Sequence[str], name: str) -> Process:
        proc = Process(self.argv(argv), self.dir / "logs" / f"{name}.log", env=self.env())
        self.processes.append(proc)
        return proc

    def add(self, record: str, text: str) -> None:
        self.run([PROGRAM, "-a", record], stdin=text)

    def delete(self, record: str) -> None:
        self.run([PROGRAM, *(["-f"] if self.kind == "openresolv" else []), "-d", record])

    def records(self) -> list[str]:
        return self.run([PROGRAM, "-i"], check=False).stdout.split()

    def resolv_conf(self) -> str:
        return self.run([need("cat"), "/etc/resolv.conf"]).stdout

    def write(self, path: str, text: str, *, append: bool = False) -> None:
        self.run([need("mkdir"), "-p", os.path.dirname(path)])
        self.run([need("tee"), *(["-a"] if append else []), path], stdin=text)

    def agent(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run([sys.executable, "-m", "agent", "-c", str(self.config), *args],
                        check=check)  # fmt: skip

    # -- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        if self.holder is not None:
            self.holder.stop()
            self.holder = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
