"""Backend: Debian's resolvconf or openresolv: the tunnel as one more interface record.

The agent adds the record `lo.dnstls-agent` (`resolvconf -a`) and removes it on revert
(`resolvconf -d`); the programs then write /etc/resolv.conf from all their records.
Ours must be the *only* nameserver there: glibc falls back to the next one listed, and
a network's resolver after ours would get the queries in cleartext whenever the tunnel
answers SERVFAIL (strict mode with no usable resolver: a leak). What does that, found
with the real programs (tests/system/test_stub_resolvconf.py):

- Debian's resolvconf lists records in /etc/resolvconf/interface-order, where `lo.*`
  comes before the network's interfaces (only lo.inet6, lo.inet and lo.dnsmasq/pdnsd
  come earlier), and stops the nameserver list after the first loopback address
  (TRUNCATE_NAMESERVER_LIST_AFTER_LOOPBACK_ADDRESS, default yes);
- openresolv puts loopback nameservers (127.*, ::1) first whatever the record order and,
  once there is one, leaves out every other (resolv_conf_local_only, default yes).

Both keep every record's search domains, also when another interface rewrites its
record later. openresolv's exclusive flag (`-x`) would also make ours the only
nameserver, but it drops the other interfaces' search domains too: not used.

After the change the generated file is checked. If it lists anything but our
nameservers (an administrator turned those defaults off, a local resolver's record
sorts before ours, updates are disabled, /etc/resolv.conf is not the generated file),
the record is taken back and apply fails, saying why. Revert removes the record even
if it was there before we started: that can only be a leftover of a run whose journal
was lost, and a record pointing at a tunnel that is not running must not stay.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from agent.errors import AgentError

LOG = logging.getLogger(__name__)

RECORD = "lo.dnstls-agent"  # lo.*: before the network's interfaces in both orders
TIMEOUT = 30.0  # Debian's resolvconf waits up to 10 s for its lock
# The programs read IF_METRIC, IF_PRIVATE, IF_EXCLUSIVE, RESTARTCMD... from the
# environment: they get only this one.
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
RUN_DIRS = ("/run/resolvconf/", "/var/run/resolvconf/")

Implementation = Literal["debian", "openresolv"]


class ResolvconfError(AgentError):
    """resolvconf failed, or would not make the tunnel the only nameserver."""


# -- the pure part ------------------------------------------------------------------------
def render_record(nameservers: Sequence[str]) -> str:
    """Our interface record: the tunnel's addresses (the search domains are the other
    records', which resolvconf merges)."""
    if not nameservers:
        raise ValueError("a resolvconf record needs at least one nameserver")
    return "".join(f"nameserver {ns}\n" for ns in nameservers)


def nameservers_of(text: str) -> list[str]:
    """The nameservers a resolv.conf lists, in order."""
    out: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            out.append(words[1])
    return out


def implementation_of(version: str) -> Implementation | None:
    """Which resolvconf answered `resolvconf --version` (systemd's compat is neither)."""
    first = version.strip().splitlines()[0] if version.strip() else ""
    if first.startswith("Debian resolvconf"):
        return "debian"
    if first.startswith("openresolv"):
        return "openresolv"
    return None


def links_into_run_resolvconf(target: str) -> bool:
    """Does an /etc/resolv.conf symlink with this target point at Debian resolvconf's file?"""
    full = os.path.normpath(os.path.join("/etc", target))
    return full.startswith(RUN_DIRS)


def problem(
    listed: Sequence[str],
    ours: Sequence[str],
    records: Sequence[str],
    implementation: Implementation | None,
    resolv_conf: str = "/etc/resolv.conf",
) -> str | None:
    """Why the generated resolv.conf is not safe (None when it lists exactly ours)."""
    if list(listed) == list(ours):
        return None
    said = f"{resolv_conf} lists {', '.join(listed) or 'no nameserver'}, not only {', '.join(ours)}"
    if records and records[0] != RECORD:
        said += f" (the record {records[0]} comes before {RECORD})"
    elif listed and listed[0] == ours[0]:
        said += " (the network's resolvers would be used in cleartext when the tunnel fails)"
    if implementation == "debian":
        hint = (
            "Debian's resolvconf needs TRUNCATE_NAMESERVER_LIST_AFTER_LOOPBACK_ADDRESS=yes "
            "(/etc/default/resolvconf, the default), updates enabled (resolvconf "
            "--enable-updates) and /etc/resolv.conf a symlink to /run/resolvconf/resolv.conf"
        )
    elif implementation == "openresolv":
        hint = (
            "openresolv needs resolv_conf_local_only=YES (the default) and resolv_conf="
            "/etc/resolv.conf in /etc/resolvconf.conf, and no interface added as exclusive (-x)"
        )
    else:
        hint = "this resolvconf is neither Debian's nor openresolv"
    return f'{said}; {hint}; or set stub_backend = "resolv.conf"'


# -- the backend -------------------------------------------------------------------------------
def find_program() -> str | None:
    """resolvconf where the system keeps it (also when the agent's own PATH lacks sbin)."""
    return shutil.which("resolvconf", path=f"{os.environ.get('PATH', '')}:{ENV['PATH']}")


class ResolvconfBackend:
    name = "resolvconf"

    def __init__(self, root: Path = Path("/"), program: str | None = None) -> None:
        """`program`: the resolvconf to run (default: found on the system's PATH). It
        writes the real /etc/resolv.conf; `root` only prefixes what this code reads."""
        self.path = root / "etc" / "resolv.conf"
        self._program = program
        self._implementation: Implementation | None = None

    @property
    def program(self) -> str | None:
        if self._program is None:
            self._program = find_program()
        if self._program is None or not os.access(self._program, os.X_OK):
            return None
        return self._program

    def implementation(self) -> Implementation | None:
        if self._implementation is None and self.program is not None:
            try:
                res = self._run(["--version"])
            except ResolvconfError as exc:
                LOG.debug("%s --version: %s", self.program, exc)
                return None
            self._implementation = implementation_of(res.stdout)
        return self._implementation

    def detect(self) -> bool:
        if self.program is None:
            return False
        if self.path.is_symlink() and links_into_run_resolvconf(os.readlink(self.path)):
            return True  # Debian's resolvconf (or one set up like it)
        return self.implementation() == "openresolv"

    def describe(self) -> str:
        what = self.implementation() or "unknown"
        return f"{self.program or 'resolvconf (not installed)'} ({what}), record {RECORD}"

    def record(self) -> dict[str, Any]:
        """Whether a record of ours is already there (then a leftover: see revert)."""
        return {
            "record": RECORD,
            "program": self._need_program(),
            "implementation": self.implementation(),
            "existed": RECORD in self.records(),
        }

    def apply(
        self,
        nameservers: Sequence[str],
        previous: dict[str, Any],
        search: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Add our record (the journal already holds `previous`), then check the result.

        `search` is not used: every interface's record keeps the search domains its DHCP
        client gave, also while ours is there."""
        impl = self.implementation()
        if impl is None:
            raise ResolvconfError(
                f"{self._need_program()}: neither Debian's resolvconf nor openresolv"
            )
        self._run(["-a", RECORD], stdin=render_record(nameservers))
        records = self.records()
        try:
            listed = nameservers_of(self.path.read_text())
        except OSError as exc:
            listed = []
            LOG.warning("%s cannot be read after resolvconf -a: %s", self.path, exc)
        why = problem(listed, nameservers, records, impl, str(self.path))
        if why is not None:
            self._delete()
            raise ResolvconfError(f"resolvconf record {RECORD} taken back: {why}")
        if records[:1] != [RECORD]:  # only a loopback record of someone else's could do it
            LOG.warning("resolvconf orders %s before %s", " ".join(records), RECORD)
        return {**previous, "added": True, "nameservers": list(nameservers)}

    def revert(self, entry: dict[str, Any]) -> str:
        if self.program is None:
            return f"resolvconf is no longer installed: record {RECORD} left with it"
        there = RECORD in self.records()
        self._delete()
        try:
            now = ", ".join(nameservers_of(self.path.read_text())) or "no nameserver"
        except OSError:
            now = "nothing (it cannot be read)"
        if not there:
            return f"no resolvconf record {RECORD} was there; {self.path} lists {now}"
        said = f"resolvconf record {RECORD} removed; {self.path} lists {now}"
        if entry.get("existed"):
            said += " (it was there before the agent started: a leftover, removed too)"
        return said

    # -- running the program ----------------------------------------------------------------
    def records(self) -> list[str]:
        """The records in the order the program uses them."""
        # openresolv's -i exits 1 when there is none
        return self._run(["-i"], ok=(0, 1)).stdout.split()

    def _delete(self) -> None:
        flags = ["-f", "-d"] if self.implementation() == "openresolv" else ["-d"]
        self._run([*flags, RECORD])

    def _need_program(self) -> str:
        if self.program is None:
            raise ResolvconfError("resolvconf is not installed")
        return self.program

    def _run(
        self, args: Sequence[str], stdin: str | None = None, ok: Sequence[int] = (0,)
    ) -> subprocess.CompletedProcess[str]:
        argv = [self._need_program(), *args]
        try:
            res = subprocess.run(
                argv,
                input=stdin,
                stdin=subprocess.DEVNULL if stdin is None else None,
                capture_output=True,
                text=True,
                env=ENV,
                timeout=TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ResolvconfError(f"{' '.join(argv)}: {exc}") from exc
        if res.returncode not in ok:
            err = res.stderr.strip() or res.stdout.strip()
            raise ResolvconfError(f"{' '.join(argv)}: exit status {res.returncode}: {err}")
        if res.stderr.strip():
            LOG.debug("%s: %s", " ".join(argv), res.stderr.strip())
        return res
