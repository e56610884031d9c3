"""When pointing the stub, or putting it back, would open a cleartext window.

Two decisions, pure, each with its reason; the facts come from a thin edge below:
- `plain_file`: the resolv.conf backend where another program writes /etc/resolv.conf
  (NetworkManager, resolvconf, systemd-resolved): each DHCP renewal it writes puts the
  network's server there, and glibc asks it in cleartext until the agent points the file
  back. Refused under strict or encrypted (the backend of that program closes the
  window), allowed with a warning under opportunistic.
- `at_stop`: the unit's ExecStopPost. A restart (`systemctl restart`, or systemd's own
  after a crash or a watchdog kill, Restart=always) keeps the stub pointed at the tunnel
  under strict or encrypted: no DNS for those seconds rather than cleartext. A final stop
  (or one systemd will not follow with a start) puts the stub back.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from agent.errors import UsageError

LOG = logging.getLogger(__name__)

PRIVATE_PROFILES = frozenset({"strict", "encrypted"})  # never cleartext
WRITERS = {  # backend name -> the program that writes /etc/resolv.conf in its world
    "networkmanager": "NetworkManager",
    "resolvconf": "resolvconf",
    "resolved": "systemd-resolved",
}
UNIT = "dnstls-agent.service"
# A job of these types on the unit while ExecStopPost runs: systemd starts it again. A
# restart job runs as "restart" through the stop, and becomes "start" after it.
START_JOBS = frozenset({"start", "restart", "try-restart", "reload-or-start", "reload-or-restart"})
NO_RESTART_STATUS = "2"  # the unit's RestartPreventExitStatus=: a configuration refused
NO_RESTART_RESULTS = frozenset({"start-limit-hit"})
SYSTEMCTL_TIMEOUT = 5.0


def private(profiles: Collection[str]) -> bool:
    """Does any of these profiles (global, per interface) forbid cleartext DNS?"""
    return any(str(p) in PRIVATE_PROFILES for p in profiles)


# -- pointing the stub ------------------------------------------------------------------
class StubRefused(UsageError):
    """The configured backend would let the network's resolvers be asked in cleartext."""


class Fit(Enum):
    OK = "ok"
    LEAKY = "leaky"  # allowed; renewals may leak (opportunistic)
    REFUSED = "refused"


@dataclass(frozen=True)
class BackendFit:
    fit: Fit
    reason: str


def plain_file(writer: str | None, profiles: Collection[str]) -> BackendFit:
    """May the resolv.conf backend point the stub? `writer`: the backend whose program
    writes /etc/resolv.conf here (None: nothing else does)."""
    if writer is None:
        return BackendFit(Fit.OK, "nothing else writes /etc/resolv.conf")
    who = WRITERS.get(writer, writer)
    use = f'use stub_backend = "{writer}" (or "auto")'
    if private(profiles):
        strictest = "strict" if "strict" in {str(p) for p in profiles} else "encrypted"
        return BackendFit(
            Fit.REFUSED,
            f'{who} manages /etc/resolv.conf: {use}. With stub_backend = "resolv.conf" '
            f"each DHCP renewal it writes puts the network's resolvers there, asked in "
            f"cleartext until the agent points the file back, which the {strictest} "
            "profile does not allow",
        )
    return BackendFit(
        Fit.LEAKY,
        f"{who} manages /etc/resolv.conf: each DHCP renewal it writes puts the network's "
        f"resolvers there, asked in cleartext until the agent points the file back; {use}",
    )


# -- putting it back at a stop ----------------------------------------------------------
@dataclass(frozen=True)
class StopFacts:
    """What ExecStopPost knows: systemd's $SERVICE_RESULT, $EXIT_CODE, $EXIT_STATUS (None:
    not run by systemd) and the type of the unit's job (None: none, or it could not be
    asked)."""

    result: str | None = None
    exit_code: str | None = None
    exit_status: str | None = None
    job: str | None = None


@dataclass(frozen=True)
class AtStop:
    keep: bool
    reason: str


def at_stop(profiles: Collection[str], facts: StopFacts) -> AtStop:
    """Keep the stub pointed at the tunnel through this stop, or put it back?"""
    if not private(profiles):
        reason = "no strict or encrypted profile: the network's resolvers may answer meanwhile"
        return AtStop(False, reason)
    if facts.result is None:
        return AtStop(False, "not run by systemd's ExecStopPost ($SERVICE_RESULT unset)")
    if facts.job in START_JOBS:
        return AtStop(True, f"a {facts.job} job is queued for the unit")
    if facts.job is not None:
        return AtStop(False, f"stopped by a {facts.job} job")
    if facts.result in NO_RESTART_RESULTS:
        return AtStop(False, f"systemd will not start it again ({facts.result})")
    if facts.exit_code == "exited" and facts.exit_status == NO_RESTART_STATUS:
        return AtStop(False, "the daemon refused its configuration (status 2): not restarted")
    if facts.result == "success":
        return AtStop(False, "a clean stop, no start queued")
    return AtStop(
        True,
        f"ended by {facts.result} ({facts.exit_code or '?'}/{facts.exit_status or '?'}): "
        "systemd starts it again (Restart=always)",
    )


# -- the edge: gathering the facts ------------------------------------------------------
Run = Callable[[Sequence[str]], str]


def _systemctl(args: Sequence[str]) -> str:
    program = shutil.which("systemctl", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if program is None:
        raise OSError("systemctl is not installed")
    res = subprocess.run(
        [program, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SYSTEMCTL_TIMEOUT,
        check=False,
    )
    if res.returncode != 0:
        raise OSError(f"systemctl {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res.stdout


def unit_job(unit: str = UNIT, run: Run | None = None) -> str | None:
    """The type of the unit's job (`systemctl list-jobs`: id unit type state), or None."""
    try:
        out = (run or _systemctl)(["list-jobs", "--plain", "--no-legend", "--no-pager", unit])
    except (OSError, subprocess.SubprocessError) as exc:
        LOG.warning("cannot tell whether %s is restarting: %s", unit, exc)
        return None
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 3 and words[1] == unit:
            return words[2]
    return None


def stop_facts(env: Mapping[str, str], unit: str = UNIT, run: Run | None = None) -> StopFacts:
    """ExecStopPost's environment, and the unit's job (asked only when run by systemd)."""
    result = env.get("SERVICE_RESULT") or None
    return StopFacts(
        result=result,
        exit_code=env.get("EXIT_CODE") or None,
        exit_status=env.get("EXIT_STATUS") or None,
        job=unit_job(unit, run) if result is not None else None,
    )
