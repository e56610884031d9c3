"""A real NetworkManager in a throw-away network namespace, on a private D-Bus system bus.

Why: the agent follows NetworkManager over D-Bus (DnsManager.Configuration, devices,
DHCP4Config) and is poked by NM's dispatcher. Only a real NM, getting a real DHCP lease,
shows what those look like and when they change; this lab builds one per test, isolated
from the host (no mount, hostname, resolv.conf, bus or interface of the host is touched):

    srv netns  nml-srv-TAG: veth nmsTAG 198.51.100.1/24 and .2/24 (more on request);
               dnsmasq, DHCP only (port=0), no-ping, short lease, the DNS option read from
               a dhcp-optsfile (`set_dns` rewrites it and sends SIGHUP)
    cli netns  nml-cli-TAG: veth nmcTAG, managed by NM (keyfile connection with the fixed
               UUID CONNECTION_UUID, ipv4 auto, ipv6 disabled unless asked for)
      + "the machine": a private mount and UTS namespace, pinned by a holder process
        (`sleep infinity`), in which /etc is an overlay (the host's /etc the read-only lower
        layer; writes, i.e. NM's resolv.conf, land in DIR/etc-upper), /run,
        /etc/NetworkManager and /var/lib/NetworkManager are bind mounts of DIR/run,
        DIR/etc-nm and DIR/var-lib-nm, /sys is read-only (NM then runs without udev, which
        is not running here) and the hostname is "nmlab". dbus-daemon (the private system
        bus), NetworkManager and the bus-activated nm-dispatcher run there.

Reaching it:
    lab.bus_address  "unix:path=...": a socket with a path (unlike an abstract one) is not
                     bound to a network namespace, so processes on the host and in lab.cli
                     use the private bus alike (the agent: nm_bus = lab.bus_address; if
                     DIR's socket path is too long for sun_path, a short symlink in /tmp)
    lab.srv/lab.cli  tests.lab.netns.Netns handles (`ip netns exec`): unbound, the test
                     peer, the agent pointed at lab.bus_address
    lab.machine      lab.cli's network namespace plus NM's mount and UTS namespaces (via
                     nsenter): /etc/resolv.conf is the one NM writes, the default system bus
                     (/run/dbus/system_bus_socket) is the private one, /run is DIR/run

Teardown, also when `__enter__` fails half-way: what the caller started in the lab, NM,
nm-dispatcher, dbus-daemon, any straggler in the machine's mount namespace (NM's exit
itself makes the bus activate another nm-dispatcher), the holder (the mount namespace, and
every mount in it, goes with the last process in it), dnsmasq, then the namespaces (and
with them the veth pair). Processes are stopped by PID, never by name. nm-dispatcher is
daemonized by the bus activation, so PID 1 reaps it: it may show as a zombie for a moment.

Facts this is built on: NM without udev needs a read-only /sys; NM (rc-manager=file)
replaces /etc/resolv.conf by rename(), which fails on a bind-mounted file (hence the
overlay); dnsmasq pings an address before offering it unless no-ping (about 3 s);
`nmcli device reapply` does not re-run DHCP, `nmcli device up` does; a renewal that changes
the DNS servers fires PropertiesChanged on DnsManager (Configuration) but no dispatcher event.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from agent.dbus import Message, MessageBus, MessageType, Variant, blocking
from tests.lab.machine import Holder, Machine, clean_env, stop_foreign
from tests.lab.netns import SRV_IPS, Netns, new_tag, run_ip
from tests.lab.proc import ClosedOnExit, Process, Teardown, need

CONNECTION_UUID = "6e6d6c61-622d-4468-a370-2d6c61623031"
CONNECTION_ID = "nmlab-dhcp"
HOSTNAME = "nmlab"
DOMAIN = "lab.test"
DHCP_RANGE = ("198.51.100.50", "198.51.100.150")
SRV_IP6 = "2001:db8::1"

NM = "org.freedesktop.NetworkManager"
NM_PATH = "/org/freedesktop/NetworkManager"
DNS_PATH = f"{NM_PATH}/DnsManager"
DNS_IFACE = f"{NM}.DnsManager"
DEVICE_IFACE = f"{NM}.Device"
DHCP4_IFACE = f"{NM}.DHCP4Config"
PROPS = "org.freedesktop.DBus.Properties"
DBUS = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
DEVICE_ACTIVATED = 100  # NMDeviceState
SOCKET_INSIDE = "/run/dbus/system_bus_socket"
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the NUL
DISPATCHERS = ("/usr/lib/NetworkManager/nm-dispatcher", "/usr/libexec/nm-dispatcher")
# Never handed to the lab's daemons: they must find the private bus (not the caller's),
# and must not talk to the host's systemd or journal.


# -- D-Bus helpers (agent.dbus, low level: no introspection needed) ----------------------------
def unwrap(value: Any) -> Any:
    """Variants, dicts and lists of them as plain Python values."""
    if isinstance(value, Variant):
        return unwrap(value.value)
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [unwrap(v) for v in value]
    return value


async def connect(address: str) -> Any:
    """A MessageBus (agent.dbus) connected to `address` (e.g. lab.bus_address)."""
    return await MessageBus(bus_address=address).connect()


async def call(
    bus: Any,
    path: str,
    iface: str,
    member: str,
    signature: str = "",
    body: Sequence[Any] = (),
    dest: str = NM,
) -> list[Any]:
    reply = await bus.call(
        Message(
            destination=dest,
            path=path,
            interface=iface,
            member=member,
            signature=signature,
            body=list(body),
        )
    )
    if reply.message_type == MessageType.ERROR:
        raise DBusError(f"{iface}.{member} on {path}: {reply.error_name}: {reply.body}")
    return list(reply.body)


async def get_property(bus: Any, path: str, iface: str, prop: str) -> Any:
    return unwrap((await call(bus, path, PROPS, "Get", "ss", (iface, prop)))[0])


async def add_match(bus: Any, rule: str) -> None:
    await call(bus, DBUS_PATH, DBUS, "AddMatch", "s", (rule,), dest=DBUS)


async def name_has_owner(bus: Any, name: str) -> bool:
    return bool((await call(bus, DBUS_PATH, DBUS, "NameHasOwner", "s", (name,), dest=DBUS))[0])


async def dns_configuration(bus: Any) -> list[dict[str, Any]]:
    """DnsManager.Configuration: one dict per (interface, nameservers) entry, e.g.
    {"nameservers": ["198.51.100.1"], "domains": ["lab.test"], "interface": "nmc1230",
     "priority": 100, "vpn": False}."""
    config: list[dict[str, Any]] = await get_property(bus, DNS_PATH, DNS_IFACE, "Configuration")
    return config


def nameservers(config: Sequence[Mapping[str, Any]], ifname: str | None = None) -> list[str]:
    """The nameservers of a DnsManager.Configuration, all or those of one interface."""
    out: list[str] = []
    for entry in config:
        if ifname is None or entry.get("interface") == ifname:
            out.extend(entry.get("nameservers", []))
    return out


class DBusError(RuntimeError):
    """A D-Bus call answered with an error."""


class NMLab(ClosedOnExit):
    """Use as a context manager: `with NMLab(tmp_path, dns=["198.51.100.1"]) as lab: ...`.

    dns         the DNS servers dnsmasq hands out at first (IPv6 ones only with ipv6=True)
    nm_dns      NM's [main] dns=: "default" (NM writes the lab's /etc/resolv.conf), "none"
                (NM leaves it alone; DnsManager.Configuration works the same) or
                "systemd-resolved" (NM sends each link's DNS settings to resolved over the
                bus and leaves resolv.conf alone; tests.lab.resolvedlab runs a resolved);
                "auto": no dns=, rc-manager= or systemd-resolved= at all, as in a stock
                NetworkManager.conf (NM picks systemd-resolved itself when resolv.conf is
                resolved's symlink: give `resolv_conf_link`)
    resolv_conf_link  the machine's /etc/resolv.conf starts as a symlink to this (default:
                an empty file), before NM starts
    dispatcher  script(s) to install in NM's dispatcher.d (copied; run by the bus-activated
                nm-dispatcher, as root, inside the machine); `dispatcher_env` is exported
                to them (nm-dispatcher gives scripts an environment of its own making)
    srv_ips     addresses of the server side (/24 in 198.51.100.0/24, the first one is the
                router and DHCP server); `add_srv_address` adds more later
    ipv6        also IPv6: 2001:db8::1/64 on the server, router advertisements and stateless
                DHCPv6 from dnsmasq (IPv6 DNS servers in `dns` go there), ipv6.method=auto
    lease       dnsmasq's lease time (its minimum, 2m, makes NM renew after 60 s)
    connectivity_uri  NM checks connectivity there (expects "OK"; anything else: portal)
    timeout     for the whole start-up

    Once entered (NM has the lease and, if any, the DNS servers in DnsManager.Configuration):
    bus_address, srv / cli / machine (see the module docstring), ifname (the client veth,
    NM's device; device_path its D-Bus object), connection_uuid, dir (DIR, with logs/),
    timings and startup_seconds; set_dns(), renew(), nmcli(), resolv_conf(),
    dns_configuration(), dhcp4_options(), wait_dns(), add_srv_address(), pids().
    Processes started through srv/cli/machine are stopped first at teardown (the
    tests.lab.unbound helper does not register its process: append it to lab.srv.processes).
    """

    def __init__(
        self,
        directory: Path,
        *,
        dns: Sequence[str] = (SRV_IPS[0],),
        nm_dns: Literal["default", "none", "systemd-resolved", "auto"] = "default",
        resolv_conf_link: str | None = None,
        dispatcher: Path | Sequence[Path] | None = None,
        dispatcher_env: Mapping[str, str] | None = None,
        srv_ips: Sequence[str] = SRV_IPS,
        ipv6: bool = False,
        lease: str = "2m",
        connectivity_uri: str | None = None,
        log_level: str = "DEBUG",
        timeout: float = 30.0,
    ) -> None:
        self.tag = new_tag()
        self.parent = directory
        self.initial_dns = list(dns)
        self.domain = DOMAIN  # the domain name dnsmasq hands out (set_dns changes it)
        self.nm_dns = nm_dns
        self.resolv_conf_link = resolv_conf_link
        if isinstance(dispatcher, Path):
            dispatcher = [dispatcher]
        self.dispatcher_scripts = list(dispatcher or [])
        self.dispatcher_env = dict(dispatcher_env or {})
        self.srv_ips = list(srv_ips)
        self.ipv6 = ipv6
        self.lease = lease
        self.connectivity_uri = connectivity_uri  # NM's connectivity check ("OK" expected)
        self.log_level = log_level
        self.timeout = timeout
        self.srv_name = f"nml-srv-{self.tag}"
        self.cli_name = f"nml-cli-{self.tag}"
        self.ifname = f"nmc{self.tag}"[:15]
        self.srv_ifname = f"nms{self.tag}"[:15]
        self.connection_uuid = CONNECTION_UUID
        self.srv: Netns | None = None
        self.cli: Netns | None = None
        self.machine: Machine | None = None
        self.device_path = ""
        self.timings: dict[str, float] = {}
        self.startup_seconds = 0.0
        self._dnsmasq: Process | None = None
        self._holder: Holder | None = None
        self._dbus: Process | None = None
        self._nm: Process | None = None
        self._short_dir: Path | None = None
        self.dir = Path()  # DIR: made by __enter__, under `directory`
        self._created = False
        self.bus_address = ""
        self.mount_ns = 0  # inode of the machine's mount namespace

    # -- layout ---------------------------------------------------------------------------
    @property
    def bus_socket(self) -> Path:
        """The private bus socket as seen from outside (inside: /run/dbus/system_bus_socket)."""
        return self.dir / "run/dbus/system_bus_socket"

    @property
    def resolv_conf_path(self) -> Path:
        """Where the machine's /etc/resolv.conf lives on the host (the overlay's upper layer;
        not there if the lab fell back to a tmpfs for it: `resolv_conf()` reads it anyway)."""
        return self.dir / "etc-upper/resolv.conf"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def nm_pid(self) -> int | None:
        return self._nm.pid if self._nm else None

    def bus_env(self) -> dict[str, str]:
        """Environment for a process outside the machine to find the private bus."""
        return {"DBUS_SYSTEM_BUS_ADDRESS": self.bus_address}

    # -- start-up --------------------------------------------------------------------------
    def __enter__(self) -> NMLab:
        t0 = time.monotonic()

        def mark(what: str) -> None:
            self.timings[what] = time.monotonic() - t0

        try:
            self._write_configs()
            mark("configs")
            self._namespaces()
            mark("netns+veth")
            self._start_dnsmasq()
            mark("dnsmasq")
            self._start_machine()
            mark("machine (mount+uts ns)")
            self._start_bus()
            mark("private bus")
            self._start_nm()
            blocking(lambda: self._wait_ready(mark), self.timeout + 5)
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.monotonic() - t0
        report = ", ".join(f"{k} +{v:.2f}s" for k, v in self.timings.items())
        (self.dir / "timings.txt").write_text(report + "\n")
        print(f"nmlab {self.tag}: up in {self.startup_seconds:.2f}s ({report})", file=sys.stderr)
        return self

    def _write_configs(self) -> None:
        self.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="nmlab-", dir=self.parent))
        self._created = True
        if any(c in str(self.dir) for c in ",:"):
            raise ValueError(f"{self.dir}: overlayfs options cannot take ',' or ':'")
        for sub in (
            "srv",
            "logs",
            "dbus/services",
            "run/dbus",
            "run/NetworkManager",
            "var-lib-nm",
            "etc-upper",
            "etc-work",
            "etc-nm/system-connections",
            "etc-nm/conf.d",
            "etc-nm/dispatcher.d/pre-up.d",
            "etc-nm/dispatcher.d/pre-down.d",
            "etc-nm/dispatcher.d/no-wait.d",
            "dispatcher-scripts",
        ):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        # the machine's resolv.conf starts empty (a regular file, whatever the host has),
        # or as the symlink asked for
        if self.resolv_conf_link is not None:
            self.resolv_conf_path.symlink_to(self.resolv_conf_link)
        else:
            self.resolv_conf_path.write_text("")
        if not Path("/etc/NetworkManager").is_dir():
            (self.dir / "etc-upper/NetworkManager").mkdir()
        if not Path("/var/lib/NetworkManager").is_dir():
            raise RuntimeError("/var/lib/NetworkManager is missing: is network-manager installed?")

        bus = str(self.bus_socket)
        if len(bus) > SUN_PATH_MAX:  # too long for sun_path: reach it through a short symlink
            self._short_dir = Path(tempfile.mkdtemp(prefix="nmlab-"))
            (self._short_dir / "bus").symlink_to(self.bus_socket)
            bus = str(self._short_dir / "bus")
        self.bus_address = f"unix:path={bus}"

        self._write_dnsmasq_config()
        self._write_bus_config()
        self._write_nm_config()

    def _write_dnsmasq_config(self) -> None:
        srv = self.dir / "srv"
        v6 = ""
        if self.ipv6:
            v6 = (
                f"enable-ra\n"
                f"dhcp-range=::,constructor:{self.srv_ifname},ra-stateless,64,{self.lease}\n"
            )
        (srv / "dnsmasq.conf").write_text(
            f"""port=0
interface={self.srv_ifname}
bind-interfaces
except-interface=lo
no-resolv
no-hosts
dhcp-authoritative
# dnsmasq pings an address before offering it; that costs ~3 s on the first lease
no-ping
dhcp-range={DHCP_RANGE[0]},{DHCP_RANGE[1]},255.255.255.0,{self.lease}
{v6}dhcp-option=option:router,{self.srv_ips[0]}
dhcp-optsfile={srv / "dhcp-opts"}
dhcp-leasefile={srv / "dnsmasq.leases"}
log-dhcp
log-facility=-
pid-file={srv / "dnsmasq.pid"}
user=root
group=root
"""
        )
        self._write_dhcp_opts(self.initial_dns)

    def _write_dhcp_opts(self, servers: Sequence[str]) -> None:
        v4 = [s for s in servers if ":" not in s]
        v6 = [s for s in servers if ":" in s]
        if v6 and not self.ipv6:
            raise ValueError(f"IPv6 DNS servers {v6} need NMLab(ipv6=True)")
        lines = [f"option:domain-name,{self.domain}"]
        if v4:
            lines.append("option:dns-server," + ",".join(v4))
        if v6:
            lines.append("option6:dns-server," + ",".join(f"[{s}]" for s in v6))
        opts = self.dir / "srv/dhcp-opts"
        tmp = opts.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(opts)

    def _write_bus_config(self) -> None:
        d = self.dir / "dbus"
        (d / "system.conf").write_text(
            f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <!-- as seen inside the machine's mount namespace, where /run is the lab's run/ -->
  <listen>unix:path={SOCKET_INSIDE}</listen>
  <auth>EXTERNAL</auth>
  <!-- no <user>, no <servicehelper>: activation forks directly, as root -->
  <servicedir>{d / "services"}</servicedir>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
    <allow eavesdrop="true"/>
  </policy>
  <limit name="reply_timeout">60000</limit>
</busconfig>
"""
        )
        dispatcher = next((p for p in DISPATCHERS if os.access(p, os.X_OK)), None)
        if dispatcher is None:
            raise RuntimeError(f"nm-dispatcher not found in {DISPATCHERS}")
        wrapper = d / "nm-dispatcher-wrapper"
        wrapper.write_text(
            f"""#!/bin/sh
# bus-activated by the lab's dbus-daemon; the lab stops every PID listed here
echo $$ >> {self.dir / "dispatcher.pids"}
exec {dispatcher} --debug >> {self.logs / "nm-dispatcher.log"} 2>&1
"""
        )
        wrapper.chmod(0o755)
        (d / "services/org.freedesktop.nm_dispatcher.service").write_text(
            f"[D-BUS Service]\nName=org.freedesktop.nm_dispatcher\nExec={wrapper}\nUser=root\n"
        )

    def _write_nm_config(self) -> None:
        etc = self.dir / "etc-nm"
        rc_manager = "file" if self.nm_dns == "default" else "unmanaged"
        to_resolved = "true" if self.nm_dns == "systemd-resolved" else "false"
        dns = (
            ""
            if self.nm_dns == "auto"
            else f"dns={self.nm_dns}\nrc-manager={rc_manager}\nsystemd-resolved={to_resolved}\n"
        )
        (etc / "NetworkManager.conf").write_text(
            f"""[main]
plugins=keyfile
{dns}dhcp=internal
no-auto-default=*
auth-polkit=false
# never touch the hostname (the machine has a UTS namespace of its own anyway)
hostname-mode=none

[logging]
level={self.log_level}
domains=ALL

[keyfile]
unmanaged-devices=*,except:interface-name:{self.ifname}

[device-nmlab]
match-device=interface-name:{self.ifname}
managed=1

[connectivity]
{self._connectivity()}
"""
        )
        keyfile = etc / f"system-connections/{CONNECTION_ID}.nmconnection"
        ipv6 = "method=auto\nmay-fail=true\n" if self.ipv6 else "method=disabled\n"
        keyfile.write_text(
            f"""[connection]
id={CONNECTION_ID}
uuid={self.connection_uuid}
type=ethernet
interface-name={self.ifname}
autoconnect=true

[ethernet]

[ipv4]
method=auto
dhcp-hostname={HOSTNAME}

[ipv6]
{ipv6}"""
        )
        keyfile.chmod(0o600)
        env = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.dispatcher_env.items())
        for script in self.dispatcher_scripts:
            copy = self.dir / "dispatcher-scripts" / script.name
            shutil.copyfile(script, copy)
            copy.chmod(0o755)
            hook = etc / "dispatcher.d" / script.name
            if env:
                hook.write_text(f'#!/bin/sh\n{env}exec {copy} "$@"\n')
            else:
                shutil.copyfile(script, hook)
            hook.chmod(0o755)  # nm-dispatcher runs root-owned, not group/other-writable files

    def _connectivity(self) -> str:
        if not self.connectivity_uri:
            return "enabled=false"
        return f"enabled=true\nuri={self.connectivity_uri}\nresponse=OK\ninterval=300"

    def check_connectivity(self) -> str:
        """Make NM check connectivity now; what it found (none, portal, limited, full)."""
        return self.nmcli("networking", "connectivity", "check").stdout.strip()

    def _namespaces(self) -> None:
        self.srv = Netns(self.srv_name)
        self.cli = Netns(self.cli_name)
        if self.ipv6:
            # no DAD (before the veth exists, so it inherits "default"): a tentative
            # link-local address delays router solicitations and advertisements by seconds
            for ns in (self.srv, self.cli):
                ns.sysctl("net.ipv6.conf.default.accept_dad", 0)
        run_ip(
            "link",
            "add",
            self.srv_ifname,
            "netns",
            self.srv.name,
            "type",
            "veth",
            "peer",
            "name",
            self.ifname,
            "netns",
            self.cli.name,
        )
        for ip in self.srv_ips:
            run_ip("-n", self.srv.name, "addr", "add", f"{ip}/24", "dev", self.srv_ifname)
        if self.ipv6:
            self.add_srv_address(SRV_IP6)
        run_ip("-n", self.srv.name, "link", "set", self.srv_ifname, "up")
        # the client side stays down: bringing it up is NM's job

    def add_srv_address(self, ip: str, prefix: int | None = None) -> None:
        """One more address on the server side (e.g. for another DNS server to hand out)."""
        assert self.srv is not None
        plen = prefix if prefix is not None else (64 if ":" in ip else 24)
        extra = ["nodad"] if ":" in ip else []
        run_ip("-n", self.srv.name, "addr", "add", f"{ip}/{plen}", "dev", self.srv_ifname, *extra)
        if ip not in self.srv_ips:
            self.srv_ips.append(ip)

    def _start_dnsmasq(self) -> None:
        assert self.srv is not None
        conf = self.dir / "srv/dnsmasq.conf"
        dnsmasq = Process(
            self.srv.argv([need("dnsmasq"), "--keep-in-foreground", f"--conf-file={conf}"]),
            self.logs / "dnsmasq.log",
            env=clean_env(),
        )
        self._dnsmasq = dnsmasq
        dnsmasq.wait_until(lambda: "DHCP, IP range" in self._dnsmasq_log(), 10, "dnsmasq")

    def _dnsmasq_log(self) -> str:
        try:
            return (self.logs / "dnsmasq.log").read_text(errors="replace")
        except OSError:
            return ""

    def _start_machine(self) -> None:
        """The holder: a process in lab.cli with its own mount and UTS namespaces, set up
        from outside with nsenter; everything of NM's runs next to it."""
        assert self.cli is not None
        holder = Holder.start(self.cli, self.logs / "holder.log")
        self._holder = holder
        self.machine = holder.machine
        self.mount_ns = holder.mount_ns
        why = holder.overlay_etc(self.dir, "nmlab")
        if why is not None:
            (self.dir / "etc-upper-is-on-tmpfs").write_text(why)
        for source, target in (
            (self.dir / "run", "/run"),
            (self.dir / "etc-nm", "/etc/NetworkManager"),
            (self.dir / "var-lib-nm", "/var/lib/NetworkManager"),
        ):
            holder.run(need("mount"), "--bind", str(source), target)
        # read-only /sys: NM then works without udev (with a writable /sys it waits for
        # udevd, which is not running here, and every link stays unmanaged)
        holder.run(need("mount"), "-o", "remount,bind,ro", "/sys")
        holder.run(need("hostname"), HOSTNAME)

    def _start_bus(self) -> None:
        assert self.machine is not None
        self._dbus = Process(
            self.machine.argv(
                [
                    need("dbus-daemon"),
                    f"--config-file={self.dir}/dbus/system.conf",
                    "--nofork",
                    "--nopidfile",
                    "--nosyslog",
                ]
            ),
            self.logs / "dbus.log",
            env=clean_env(),
        )
        path = self.bus_address.removeprefix("unix:path=")
        self._dbus.wait_until(lambda: _connectable(path), 10, "dbus-daemon")

    def _start_nm(self) -> None:
        assert self.machine is not None
        self._nm = Process(
            self.machine.argv([need("NetworkManager"), "--no-daemon", "--debug"]),
            self.logs / "NetworkManager.log",
            env=clean_env(),
        )

    async def _wait_ready(self, mark: Callable[[str], None]) -> None:
        """NM on the bus, our device activated, and (if any) the DNS servers in
        DnsManager.Configuration."""
        assert self._nm is not None
        end = time.monotonic() + self.timeout
        nm = self._nm

        async def until(what: str, ready: Callable[[], Awaitable[bool]]) -> None:
            while True:
                if await ready():
                    mark(what)
                    return
                if not nm.alive():
                    raise RuntimeError(
                        f"NetworkManager exited ({nm.popen.returncode}); log:\n{nm.tail()}"
                    )
                if time.monotonic() > end:
                    raise TimeoutError(
                        f"nmlab: no {what} after {self.timeout}s; NM log:\n{nm.tail(40)}\n"
                        f"dnsmasq log:\n{self._dnsmasq.tail(10) if self._dnsmasq else ''}"
                    )
                await asyncio.sleep(0.02)

        bus = await connect(self.bus_address)
        try:
            await until("NM on the bus", lambda: name_has_owner(bus, NM))

            async def device() -> bool:
                try:
                    (path,) = await call(
                        bus, NM_PATH, NM, "GetDeviceByIpIface", "s", (self.ifname,)
                    )
                except DBusError:
                    return False
                self.device_path = path
                return True

            await until(f"device {self.ifname}", device)

            async def activated() -> bool:
                state = await get_property(bus, self.device_path, DEVICE_IFACE, "State")
                return bool(state == DEVICE_ACTIVATED)

            await until("device activated (DHCP lease)", activated)
            want = set(self.initial_dns)

            async def dns_known() -> bool:
                got = nameservers(await dns_configuration(bus), self.ifname)
                return want <= set(got)

            await until("DNS servers in DnsManager.Configuration", dns_known)
        finally:
            bus.disconnect()

    # -- using it --------------------------------------------------------------------------
    def stop_nm(self) -> None:
        """NetworkManager goes away (as when it is restarted); the lease and link stay."""
        assert self._nm is not None
        self._nm.stop()

    def start_nm(self) -> None:
        """NetworkManager comes (back) on the bus; returns once it has activated the device
        and published the DNS servers dnsmasq hands out now."""
        self._start_nm()
        blocking(lambda: self._wait_ready(lambda _what: None), self.timeout)

    def set_dns(
        self, servers: Sequence[str], timeout: float = 5.0, *, domain: str | None = None
    ) -> None:
        """Make dnsmasq hand out `servers` (and `domain`, when given) from now on (rewrite
        its optsfile, SIGHUP, and wait until it has re-read it). NM sees them at its next
        DHCP exchange: `renew()`."""
        assert self._dnsmasq is not None
        self.domain = domain or self.domain
        marker = f"read {self.dir}/srv/dhcp-opts"
        before = self._dnsmasq_log().count(marker)
        self._write_dhcp_opts(servers)
        self.initial_dns = list(servers)  # what a (re)started NM must come up with
        self._dnsmasq.popen.send_signal(signal.SIGHUP)
        self._dnsmasq.wait_until(
            lambda: self._dnsmasq_log().count(marker) > before, timeout, "dnsmasq reload"
        )

    def nmcli(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """nmcli against the private bus (from outside: it only talks D-Bus)."""
        return subprocess.run(
            [need("nmcli"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            env={**clean_env(), **self.bus_env()},
        )

    def renew(self, timeout: float = 60) -> None:
        """Make NM run DHCP again now: `nmcli device up` re-activates the connection (the
        device goes through deactivating/disconnected, so DNS configuration changes twice);
        `nmcli device reapply` would not ask the DHCP server again. Returns once activated."""
        self.nmcli("device", "up", self.ifname, timeout=timeout)

    def resolv_conf(self) -> str:
        """The machine's /etc/resolv.conf (what NM wrote with nm_dns="default")."""
        if self._holder is not None and self._holder.proc.alive():
            return self._holder.file("/etc/resolv.conf").read_text()
        return self.resolv_conf_path.read_text()

    def dns_configuration(self, timeout: float = 10) -> list[dict[str, Any]]:
        """A snapshot of DnsManager.Configuration."""

        async def get() -> list[dict[str, Any]]:
            bus = await connect(self.bus_address)
            try:
                return await dns_configuration(bus)
            finally:
                bus.disconnect()

        return blocking(get, timeout)

    def dhcp4_options(self, timeout: float = 10) -> dict[str, str]:
        """The DHCP4Config Options of the lab's device (e.g. "domain_name_servers":
        "198.51.100.1", "ip_address", "expiry"); {} without a lease."""

        async def get() -> dict[str, str]:
            bus = await connect(self.bus_address)
            try:
                path = await get_property(bus, self.device_path, DEVICE_IFACE, "Dhcp4Config")
                if path == "/":
                    return {}
                opts: dict[str, str] = await get_property(bus, path, DHCP4_IFACE, "Options")
                return opts
            finally:
                bus.disconnect()

        return blocking(get, timeout)

    def wait_dns(
        self, ip: str, timeout: float = 30.0, *, present: bool = True
    ) -> list[dict[str, Any]]:
        """Wait until DnsManager.Configuration lists `ip` for the lab's interface (or, with
        present=False, no longer does); return that configuration. Follows the
        PropertiesChanged signals, with a slow poll as a safety net."""

        async def wait() -> list[dict[str, Any]]:
            bus = await connect(self.bus_address)
            changed = asyncio.Event()

            def on_message(msg: Any) -> None:
                if msg.message_type == MessageType.SIGNAL and msg.path == DNS_PATH:
                    changed.set()

            bus.add_message_handler(on_message)
            try:
                await add_match(bus, _dns_match())
                while True:
                    changed.clear()
                    config = await dns_configuration(bus)
                    if (ip in nameservers(config, self.ifname)) == present:
                        return config
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), 0.5)
            finally:
                bus.disconnect()

        try:
            return blocking(wait, timeout)
        except TimeoutError:
            raise TimeoutError(
                f"{ip} {'not in' if present else 'still in'} DnsManager.Configuration "
                f"after {timeout}s: {self.dns_configuration()}"
            ) from None

    def pids(self) -> list[int]:
        """Every process the lab started or had activated (for leak checks)."""
        procs = [self._nm, self._dbus, self._dnsmasq]
        out = [p.pid for p in procs if p is not None]
        out += [self._holder.pid] if self._holder is not None else []
        return out + self._dispatcher_pids()

    def _dispatcher_pids(self) -> list[int]:
        if not self._created:
            return []
        try:
            text = (self.dir / "dispatcher.pids").read_text()
        except OSError:
            return []
        return [int(line) for line in text.split() if line.isdigit()]

    # -- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        """Tear everything down, whatever state it is in; idempotent. Raises the first
        error only after trying every step."""
        step = Teardown()
        # what the caller started in the lab, while NM and the bus are still there
        for ns in (self.machine, self.cli, self.srv):
            if ns is not None:
                for proc in reversed(ns.processes):
                    step(proc.stop)
        # NM first, so it does not react to anything else going away; then the
        # dispatcher (activated by the bus, which still reaps it), the bus, the holder
        # (with it the mount namespace and all mounts), dnsmasq
        if self._nm is not None:
            step(self._nm.stop)
        for pid in self._dispatcher_pids():
            step(functools.partial(stop_foreign, pid, b"nm-dispatcher"))
        if self._dbus is not None:
            step(self._dbus.stop)
        # NM's last words (a connectivity-change at exit) may have had the bus activate
        # another nm-dispatcher meanwhile: stop whatever else is still in the machine
        # (found by its mount namespace, which the holder keeps alive until now)
        if self._holder is not None:
            step(self._holder.sweep)
        for daemon in (self._holder, self._dnsmasq):
            if daemon is not None:
                step(daemon.stop)
        # the namespaces: the veth pair goes with them
        for ns in (self.cli, self.srv):
            if ns is not None:
                step(ns.delete)
        self.cli = self.srv = self.machine = None
        if self._short_dir is not None:
            step(functools.partial(shutil.rmtree, self._short_dir, ignore_errors=True))
            self._short_dir = None
        step.done()

    def describe(self) -> str:
        return f"nmlab {self.tag}"


def _dns_match() -> str:
    return (
        f"type='signal',sender='{NM}',path='{DNS_PATH}',"
        f"interface='{PROPS}',member='PropertiesChanged'"
    )


def _connectable(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True
