"""Backend: NetworkManager writes /etc/resolv.conf; while the agent runs, it must not.

How: a NetworkManager configuration drop-in saying `[main] dns=none`, put in place and
loaded (D-Bus `Reload`) before the agent writes /etc/resolv.conf itself (with the
resolv.conf backend's code: atomic, the original journalled); on revert the file is put
back, the drop-in removed and NM reloaded, which then writes resolv.conf again at once
with the network's servers of *now*.

Why not NM's global DNS (the `GlobalDnsConfiguration` property, or `[global-dns]` in a
drop-in), tried first with the real NM 1.42 of Debian 12 (tests/lab/nmlab.py):
- it blinds the agent: with a global configuration NM no longer updates
  DnsManager.Configuration from the devices ("DNS configuration did not change" for every
  DHCP renewal), so the entry the watcher reads keeps the old servers after a renewal
  that changed them, and after an NM restart the devices' entries are missing altogether;
- it replaces the network's search domains and options (resolv.conf had no `search
  lab.test` any more): they would have to be copied into the global setting, frozen;
- set over D-Bus it is stored in /var/lib/NetworkManager/NetworkManager-intern.conf and
  survives a reboot; a drop-in `[global-dns]` makes NM refuse the D-Bus setting and vice
  versa shadows it: two owners of one setting.
With `dns=none` NM keeps doing everything else: DnsManager.Configuration follows every
renewal and NM restart (the watcher sees the network as before) and only the writing of
resolv.conf stops.

What happens to:
- the network's search domains and options: the options kept from the resolv.conf NM
  wrote (render in resolvconf_file); the search domains are the network's as the daemon
  sees them in NM's DnsManager.Configuration, and follow it while the agent runs (the
  daemon asks for a refresh, request.py; NM, silenced, would not write them);
- rc-manager modes: `dns=none` makes every mode "unmanaged". file: our file replaces NM's;
  symlink (to /run/NetworkManager/resolv.conf) and resolvconf/netconfig (resolv.conf is
  resolvconf's symlink, NM stops feeding it): the symlink is replaced by our file and put
  back as a symlink on revert, then NM (or resolvconf, fed by NM again) takes over;
  dnsmasq mode: NM's dnsmasq stops and starts again on revert. NM in systemd-resolved mode
  is not detected (the resolved backend fits: applications using 127.0.0.53 keep
  working), nor is rc-manager unmanaged or dns=none (NM writes nothing: resolv.conf's
  backend), nor rc-manager symlink with resolv.conf a symlink to someone else's file;
- a crash or restart of NM: the drop-in is a file, NM reads it again when it starts and
  leaves resolv.conf alone; restore works with NM running or not (not running: the files
  are put back and NM reads its configuration when it starts);
- a reboot: the drop-in goes to /run/NetworkManager/conf.d (a tmpfs), so a machine that
  loses power while the agent runs boots with NM writing resolv.conf again, even if the
  agent never starts. /run's drop-ins are read *before* NetworkManager.conf, so an
  explicit `dns=` there (or in /etc/NetworkManager/conf.d) outranks ours: then, and only
  then, the drop-in also goes to /etc/NetworkManager/conf.d (read last; it survives a
  reboot until `restore`, which the unit runs after every stop, and the journal in the
  state directory survives too). Apply checks DnsManager.Mode says "none" before writing
  resolv.conf, and fails, saying why, if nothing silences NM.
Crash safety: record() journals resolv.conf (content, symlink or absence), whether each
drop-in file existed (one of ours counts as absent), and the bus: restore talks to the NM
that apply changed, whatever configuration it runs with. Revert removes a drop-in only if
it is ours (its header). Placing, checking and putting back a drop-in is NMDropin's job,
which the resolved backend shares (its drop-in stops NM feeding systemd-resolved).

The D-Bus library (agent/dbus.py) is asynchronous and sysconf is not: each conversation runs
to its end with asyncio.run, in a worker thread with a loop of its own when the caller already
runs one (the daemon, run as root, points the stub from inside its loop).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent import dbus
from agent.dbus import Variant
from agent.errors import AgentError
from agent.fsutil import write_atomic
from agent.sysconf.resolvconf_file import ResolvConfFile

LOG = logging.getLogger(__name__)

T = TypeVar("T")

NM = "org.freedesktop.NetworkManager"
NM_PATH = "/org/freedesktop/NetworkManager"
DNS_PATH = f"{NM_PATH}/DnsManager"
DNS_IFACE = f"{NM}.DnsManager"
PROPS = "org.freedesktop.DBus.Properties"
DBUS = "org.freedesktop.DBus"
RELOAD_CONF = 0x1  # NMManagerReloadFlags: re-read the configuration files
RELOAD_DNS_RC = 0x2  # ... and write resolv.conf again (and update the DNS plugins)
# ... and set up DNS anew from the configuration: without it a change of systemd-resolved=
# alone (no dns= change) is not applied until NM restarts (seen with NM 1.42)
RELOAD_DNS_FULL = 0x4
TIMEOUT = 10.0  # one whole D-Bus conversation
# Reload takes effect before it answers (NM 1.42: Mode is "none" at once); a grace period
# in case another version applies it later
SETTLE = 0.5
DROPIN = "99-dnstls-agent.conf"  # read last of its directory
# Where the drop-in may go, in order of preference: /run (gone at reboot) first.
DROPIN_DIRS = {"run": "run/NetworkManager/conf.d", "etc": "etc/NetworkManager/conf.d"}
HEADER = "# Written by dnstls-agent: NetworkManager leaves /etc/resolv.conf to it while it runs.\n"


class NMStubError(AgentError):
    """NetworkManager cannot be reached, or would not leave resolv.conf alone."""


# -- the pure part ------------------------------------------------------------------------
def render_dropin() -> str:
    """The drop-in: NM stops writing resolv.conf (and feeding resolvconf or its dnsmasq)."""
    return (
        HEADER + "# Removed by `dnstls-agent restore` (the unit's ExecStopPost): do not edit.\n"
        "[main]\ndns=none\n"
    )


def is_ours(text: str) -> bool:
    return text.startswith(HEADER)


def nm_writes_resolv_conf(mode: str, rc_manager: str, resolv_link: str | None) -> bool:
    """Is NM, per DnsManager's Mode and RcManager, what writes /etc/resolv.conf?
    `resolv_link` is /etc/resolv.conf's symlink target, None for a file (or none)."""
    if mode in ("none", "systemd-resolved") or rc_manager == "unmanaged":
        return False
    if rc_manager == "symlink" and resolv_link is not None:
        # NM leaves a symlink alone unless it points at NM's own file
        return resolv_link.rstrip("/").endswith("NetworkManager/resolv.conf")
    return True  # file (follows symlinks), resolvconf, netconfig


# -- talking to NetworkManager ------------------------------------------------------------
@dataclass(frozen=True)
class DnsState:
    mode: str  # DnsManager.Mode: default, dnsmasq, systemd-resolved, none, ...
    rc_manager: str  # DnsManager.RcManager: file, symlink, resolvconf, netconfig, unmanaged


class NMControl(Protocol):
    """The little of NM this backend needs (a fake one in the unit tests)."""

    def state(self) -> DnsState | None:
        """DnsManager's Mode and RcManager; None when NM is not on the bus."""

    def reload(self, flags: int) -> None:
        """NetworkManager.Reload(flags)."""


class DBusNM:
    """NMControl over D-Bus (agent.dbus); one short connection per question."""

    def __init__(self, bus_address: str | None = None) -> None:
        self.bus_address = bus_address or None

    @property
    def where(self) -> str:
        return self.bus_address or "the system bus"

    def state(self) -> DnsState | None:
        async def ask(bus: Any) -> DnsState | None:
            (has,) = await _call(bus, "/org/freedesktop/DBus", DBUS, "NameHasOwner", "s", [NM])
            if not has:
                return None
            mode = await _get(bus, DNS_PATH, DNS_IFACE, "Mode")
            rc_manager = await _get(bus, DNS_PATH, DNS_IFACE, "RcManager")
            return DnsState(str(mode), str(rc_manager))

        return self._talk(ask)

    def reload(self, flags: int) -> None:
        async def ask(bus: Any) -> None:
            await _call(bus, NM_PATH, NM, "Reload", "u", [flags], dest=NM)

        self._talk(ask)

    def dns_interfaces(self) -> set[str]:
        """The interfaces DnsManager.Configuration has servers for (what NM would send to
        systemd-resolved); empty when NM is not on the bus."""

        async def ask(bus: Any) -> set[str]:
            (has,) = await _call(bus, "/org/freedesktop/DBus", DBUS, "NameHasOwner", "s", [NM])
            if not has:
                return set()
            out: set[str] = set()
            for entry in await _get(bus, DNS_PATH, DNS_IFACE, "Configuration"):
                values = {k: v.value if isinstance(v, Variant) else v for k, v in entry.items()}
                if values.get("nameservers") and values.get("interface"):
                    out.add(str(values["interface"]))
            return out

        return self._talk(ask)

    def _talk(self, work: Callable[[Any], Awaitable[T]]) -> T:
        return dbus.talk(
            self.bus_address, work, error=NMStubError, where=f"NetworkManager on {self.where}"
        )


async def _call(
    bus: Any,
    path: str,
    iface: str,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
    dest: str = DBUS,
) -> list[Any]:
    return await dbus.call(bus, path, iface, member, signature, body, dest=dest, error=NMStubError)


async def _get(bus: Any, path: str, iface: str, prop: str) -> Any:
    (value,) = await _call(bus, path, PROPS, "Get", "ss", [iface, prop], dest=NM)
    return value.value if isinstance(value, Variant) else value


# -- a configuration drop-in of ours (also the resolved backend's) -------------------------
def settled(nm: NMControl, mode: str = "none") -> DnsState | None:
    """DnsManager's state once its Mode is `mode`, or as it is after SETTLE seconds."""
    end = time.monotonic() + SETTLE
    while True:
        state = nm.state()
        if state is None or state.mode == mode or time.monotonic() > end:
            return state
        time.sleep(0.05)


class NMDropin:
    """One NetworkManager configuration drop-in of ours, `text` (its first line is the
    header that makes it ours): put in /run (gone at reboot), and also in /etc only when a
    setting read after /run outranks it; loaded with Reload and checked after each step; put
    back as record() found it (someone else's file of that name comes back as it was; one
    that appeared since is left alone)."""

    def __init__(
        self, root: Path, text: str, name: str = DROPIN, reload_flags: int = RELOAD_CONF
    ) -> None:
        self.text = text
        self.header = text.splitlines(keepends=True)[0]
        self.paths = {where: root / d / name for where, d in DROPIN_DIRS.items()}
        self.reload_flags = reload_flags  # how place() loads the drop-in (and unloads it)

    def is_ours(self, text: str) -> bool:
        return text.startswith(self.header)

    def in_place(self) -> bool:
        for path in self.paths.values():
            with contextlib.suppress(OSError):
                if self.is_ours(path.read_text()):
                    return True
        return False

    def record(self) -> dict[str, dict[str, Any]]:
        """Each file as it is (one of ours, left by a run that did not restore, is recorded as
        absent: never something to put back)."""
        out: dict[str, dict[str, Any]] = {}
        for where, path in self.paths.items():
            try:
                content = path.read_text()
            except FileNotFoundError:
                content = None
            if content is None or self.is_ours(content):
                out[where] = {"file": str(path), "absent": True}
            else:
                out[where] = {"file": str(path), "content": content}
        return out

    def place(
        self,
        nm: NMControl,
        recorded: dict[str, dict[str, Any]],
        check: Callable[[NMControl], str | None],
    ) -> list[str]:
        """The drop-in in /run, NM reloaded, `check`ed (it says what is still wrong, None:
        nothing); then also in /etc. The files used; NMStubError, with everything put back
        as `recorded`, when neither satisfies `check` (or anything fails half-way)."""
        used: list[str] = []
        wrong: str | None = None
        try:
            for where, path in self.paths.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, self.text.encode(), mode=0o644)
                used.append(str(path))
                nm.reload(self.reload_flags)
                wrong = check(nm)
                if wrong is None:
                    return used
                LOG.warning(
                    "NetworkManager %s with %s in place: a setting read after it outranks it%s",
                    wrong,
                    path,
                    "; trying /etc (kept across reboots until restore)" if where == "run" else "",
                )
            raise NMStubError(
                f"NetworkManager {wrong} with {', '.join(used)} in place "
                "(is it set in a file read after them?); nothing changed"
            )
        except Exception:
            self.put_back(recorded)
            with contextlib.suppress(NMStubError):
                nm.reload(self.reload_flags)  # NM re-reads its configuration without ours
            raise

    def put_back(self, recorded: dict[str, dict[str, Any]]) -> list[str]:
        """Each file as `recorded` found it (not recorded: absent): ours removed, anyone
        else's kept; what was done, for the caller's sentence."""
        said = []
        for where, path in self.paths.items():
            before = recorded.get(where) or {"absent": True}
            try:
                now: str | None = path.read_text()
            except FileNotFoundError:
                now = None
            if before.get("absent"):
                if now is not None and self.is_ours(now):
                    path.unlink()
                    said.append(f"{path} removed")
                elif now is not None:
                    said.append(f"{path} is not ours: left as it is")
            elif now != before["content"]:
                write_atomic(path, before["content"].encode(), mode=0o644)
                said.append(f"{path} put back as it was")
        return said


# -- the backend --------------------------------------------------------------------------
class NetworkManagerBackend:
    name = "networkmanager"

    def __init__(
        self,
        root: Path = Path("/"),
        bus_address: str | None = None,
        connect: Callable[[str | None], NMControl] | None = None,
    ) -> None:
        self.root = root
        self.bus_address = bus_address or None
        self.connect: Callable[[str | None], NMControl] = connect or DBusNM
        self.file = ResolvConfFile(root)
        self.dropin = NMDropin(root, render_dropin())

    def detect(self) -> bool:
        """NM is on the bus and writes /etc/resolv.conf (or is silenced by our drop-in)."""
        try:
            state = self.connect(self.bus_address).state()
        except NMStubError as exc:
            LOG.debug("no NetworkManager to point: %s", exc)
            return False
        if state is None:
            return False
        if self.dropin.in_place():
            return True  # dns=none is our doing: a run before this one did not restore
        path = self.file.path
        link = os.readlink(path) if path.is_symlink() else None
        return nm_writes_resolv_conf(state.mode, state.rc_manager, link)

    def describe(self) -> str:
        return f"NetworkManager on {self.bus_address or 'the system bus'}, {self.file.describe()}"

    def record(self) -> dict[str, Any]:
        """resolv.conf as it is, whether each drop-in file exists, and which NM this is."""
        entry: dict[str, Any] = {
            "bus": self.bus_address or "",
            "resolv_conf": self.file.record(),
            "dropins": self.dropin.record(),
        }
        with contextlib.suppress(NMStubError):
            state = self.connect(self.bus_address).state()
            if state is not None:
                entry["nm"] = {"mode": state.mode, "rc_manager": state.rc_manager}
        return entry

    def apply(
        self,
        nameservers: Sequence[str],
        previous: dict[str, Any],
        search: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Silence NM (drop-in, reload, check), then write resolv.conf; the journal entry.

        `search`: the network's domains as the agent sees them now; they replace those NM
        wrote in the original (the network of then). Again with NM still silenced (a
        refresh): only the file is written."""
        nm = self.connect(self.bus_address)
        state = nm.state()
        if state is None:
            raise NMStubError(
                f"NetworkManager is not on {self.bus_address or 'the system bus'}: "
                "nothing to keep from rewriting resolv.conf (stub_backend = networkmanager)"
            )
        if previous.get("used") and state.mode == "none" and self.dropin.in_place():
            used = previous["used"]
        else:
            used = self.dropin.place(nm, previous.get("dropins", {}), _silenced)
        try:
            written = self.file.apply(
                nameservers, previous["resolv_conf"], search, keep_search=search is None
            )
        except OSError:
            self.dropin.put_back(previous.get("dropins", {}))  # not silenced for a file not ours
            nm.reload(RELOAD_CONF)
            raise
        return {**previous, "bus": self.bus_address or "", "resolv_conf": written, "used": used}

    def revert(self, entry: dict[str, Any]) -> str:
        """resolv.conf back (if still ours), our drop-ins gone, NM reloaded: it writes again."""
        said = [self.file.revert(entry["resolv_conf"])]
        said += self.dropin.put_back(entry.get("dropins", {}))
        nm = self.connect(entry.get("bus") or self.bus_address)
        try:
            state = nm.state()
            if state is not None:
                nm.reload(RELOAD_CONF | RELOAD_DNS_RC)
                state = nm.state()
        except NMStubError as exc:
            said.append(f"NetworkManager not reached ({exc}): it reads the change when it starts")
        else:
            if state is None:
                said.append("NetworkManager is not running: it reads the change when it starts")
            else:
                said.append(
                    f"NetworkManager reloaded: mode {state.mode}, rc-manager {state.rc_manager}"
                )
        return "; ".join(said)


def _silenced(nm: NMControl) -> str | None:
    """What is still wrong once the drop-in is loaded: nothing when DnsManager says "none"."""
    state = settled(nm, "none")
    if state is None:
        return "left the bus"
    return None if state.mode == "none" else f"kept managing DNS (mode {state.mode})"
