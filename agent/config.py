"""The agent's configuration: one declarative option table, TOML in, a frozen Config out.

`OPTIONS` is the single truth for parsing, defaults, validation and the man page
(a test checks man/dnstls-agent.toml.5 against it). Global options sit at the top
level of agent.toml; `[[interface]]` sections match interfaces by name glob, NM
connection id or UUID, or Wi-Fi SSID, and override per-interface options. Files in
the drop-in directory (agent.toml.d/*.toml) are read after the main file, in name
order: later values win, interface sections add up. Every problem is reported with
file, line and key.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.errors import AgentError, UsageError
from agent.model import UpstreamSpec, parse_pin

DEFAULT_FILE = Path("/etc/dnstls-agent/agent.toml")


class Scope(StrEnum):
    GLOBAL = "global"  # top level only
    LINK = "link"  # top level (the default) and in [[interface]] (an override)
    MATCH = "match"  # [[interface]] only: which interfaces the section applies to


class ConfigProfile(StrEnum):
    OFF = "off"  # leave this interface's DNS alone
    OPPORTUNISTIC = "opportunistic"
    ENCRYPTED = "encrypted"
    STRICT = "strict"


Check = Callable[[Any], str | None]

MAX_TEXT = 4096  # characters of one string (PATH_MAX); none of the options needs more
# Control characters make no sense in a path, an address, a name or a glob; in an SSID or a
# NetworkManager connection id (matched as the network spells them) only NUL is refused.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ANY_TEXT = frozenset({"match_ssid", "match_connection"})


def _one_of(*values: str) -> Check:
    return lambda v: None if v in values else f"must be one of {', '.join(values)}"


def _seconds(low: float, high: float) -> Check:
    return lambda v: None if low <= v <= high else f"must be between {low:g} and {high:g} seconds"


def _int_range(low: int, high: int) -> Check:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}"


def _each(check: Callable[[str], object]) -> Check:
    def run(values: list[str]) -> str | None:
        for v in values:
            try:
                check(v)
            except (UsageError, ValueError) as exc:
                return str(exc)
        return None

    return run


def _ip(text: str) -> None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(f"{text!r} is not an IP address") from None


def _listen(text: str) -> None:
    parse_listen(text)


def _absolute(v: str) -> str | None:
    """An absolute path, or empty (none)."""
    return None if v == "" or v.startswith("/") else "must be an absolute path"


def _directory(v: str) -> str | None:
    return None if v.startswith("/") else "must be an absolute path"


def _absolute_path(text: str) -> None:
    if not text.startswith("/"):
        raise UsageError(f"{text!r} is not an absolute path")


def _static_resolver(text: str) -> None:
    if not text.isascii():  # a port in other digits, a name not in its xn-- form
        raise UsageError(f"{text!r} must be ASCII (a name in its xn-- form)")
    UpstreamSpec.parse(text)


def _readable_file(v: str) -> str | None:
    if err := _absolute(v):
        return err
    if v and not os.access(v, os.R_OK):
        return f"cannot read {v}"
    return None


@dataclass(frozen=True)
class Option:
    key: str
    type: type
    default: Any
    scope: Scope
    doc: str
    check: Check | None = None
    example: str = ""


OPTIONS: tuple[Option, ...] = (
    # -- where things are, what the agent manages ------------------------------------------
    Option(
        "state_dir",
        str,
        "/var/lib/dnstls-agent",
        Scope.GLOBAL,
        "Directory of the state file (probe results, pins seen, preferred orders).",
        _directory,
        '"/var/lib/dnstls-agent"',
    ),
    Option(
        "stub_state_dir",
        str,
        "/var/lib/dnstls-agent-stub",
        Scope.GLOBAL,
        "Root's directory for the system stub's journal and lock (made mode 0700; refused "
        "if anyone but root can write it). Never the daemon's state_dir.",
        _directory,
        '"/var/lib/dnstls-agent-stub"',
    ),
    Option(
        "runtime_dir",
        str,
        "/run/dnstls-agent",
        Scope.GLOBAL,
        "Directory of the control socket.",
        _directory,
        '"/run/dnstls-agent"',
    ),
    Option(
        "listen",
        list,
        ["127.0.0.153:53"],
        Scope.GLOBAL,
        "Addresses the tunnel listens on (UDP and TCP), ADDR[:PORT].",
        _each(_listen),
        '["127.0.0.153:53"]',
    ),
    Option(
        "serve_network",
        bool,
        False,
        Scope.GLOBAL,
        "Allow listen addresses other than loopback: the tunnel then answers DNS for other "
        "machines (an open resolver if reachable). Refused without it.",
        None,
        "false",
    ),
    Option(
        "manage_stub",
        bool,
        True,
        Scope.GLOBAL,
        "Point the system's stub resolver at the tunnel (and restore it on stop).",
        None,
        "true",
    ),
    Option(
        "stub_backend",
        str,
        "auto",
        Scope.GLOBAL,
        "How the system stub is pointed at the tunnel: auto (detected), resolv.conf, "
        "resolvconf, resolved or networkmanager.",
        _one_of("auto", "resolv.conf", "resolvconf", "resolved", "networkmanager"),
        '"auto"',
    ),
    Option(
        "nm_bus",
        str,
        "",
        Scope.GLOBAL,
        "D-Bus address of the system bus (NetworkManager, systemd-resolved); empty: the system's.",
        None,
        '"unix:path=/run/dbus/system_bus_socket"',
    ),
    Option(
        "netlink",
        bool,
        True,
        Scope.GLOBAL,
        "Follow the kernel over netlink (links, addresses, routes, RA RDNSS).",
        None,
        "true",
    ),
    Option(
        "lease_dirs",
        list,
        ["/var/lib/dhcp", "/run/systemd/netif/leases"],
        Scope.GLOBAL,
        "Directories of DHCP lease files (dhclient, systemd-networkd) to follow, each an "
        "absolute path.",
        _each(_absolute_path),
        '["/var/lib/dhcp"]',
    ),
    Option(
        "debounce",
        float,
        0.1,
        Scope.GLOBAL,
        "Seconds to wait for more network events before acting on them.",
        _seconds(0, 10),
        "0.1",
    ),
    Option(
        "hold_empty",
        float,
        2.0,
        Scope.GLOBAL,
        "Seconds the resolvers in use are kept while no interface has any (a device "
        "re-activating, a slow DHCP), before DNS is no longer served.",
        _seconds(0, 60),
        "5",
    ),
    Option(
        "max_parallel_probes",
        int,
        8,
        Scope.GLOBAL,
        "How many resolvers are probed at the same time.",
        _int_range(1, 64),
        "8",
    ),
    Option(
        "idle_timeout",
        float,
        60.0,
        Scope.GLOBAL,
        "Seconds before the tunnel closes an idle upstream connection.",
        _seconds(1, 3600),
        "60",
    ),
    Option(
        "query_timeout",
        float,
        5.0,
        Scope.GLOBAL,
        "Seconds a query is waited for before the client gets SERVFAIL. A slow answer is "
        "waited for, never sent again in cleartext: a connection counts as dead only on "
        "evidence (closed, reset, a TLS error, or silent also to a liveness probe).",
        _seconds(1, 30),
        "5",
    ),
    Option(
        "log_level",
        str,
        "info",
        Scope.GLOBAL,
        "What the daemon logs: debug, info (its decisions: probe results, order changes), "
        "warning (what needs attention) or error. -v on the command line shows more, "
        "`dnstls-agent log-level` changes it until the next reload.",
        _one_of("debug", "info", "warning", "error"),
        '"debug"',
    ),
    # -- the tunnel's cache ----------------------------------------------------------------------
    Option(
        "cache",
        bool,
        True,
        Scope.GLOBAL,
        "Answer repeated questions from the tunnel's cache. It is emptied when the network "
        "changes, never serves an answer learnt in cleartext once the profile forbids "
        "cleartext, and keeps split-DNS routes apart.",
        None,
        "true",
    ),
    Option(
        "cache_size",
        int,
        10000,
        Scope.GLOBAL,
        "Answers the cache holds at most.",
        _int_range(1, 1_000_000),
        "10000",
    ),
    Option(
        "cache_max_bytes",
        int,
        8 * 1024 * 1024,
        Scope.GLOBAL,
        "Bytes the cache holds at most (the answers and a per-entry estimate of their cost).",
        _int_range(65536, 1 << 30),
        "8388608",
    ),
    Option(
        "cache_min_ttl",
        int,
        0,
        Scope.GLOBAL,
        "Seconds an answer is kept at least, whatever its TTL says.",
        _int_range(0, 3600),
        "0",
    ),
    Option(
        "cache_max_ttl",
        int,
        86400,
        Scope.GLOBAL,
        "Seconds an answer is kept at most.",
        _int_range(1, 7 * 86400),
        "86400",
    ),
    Option(
        "cache_max_negative_ttl",
        int,
        3600,
        Scope.GLOBAL,
        "Seconds a negative answer (NXDOMAIN, no data; RFC 2308) is kept at most.",
        _int_range(0, 86400),
        "3600",
    ),
    Option(
        "serve_stale",
        int,
        0,
        Scope.GLOBAL,
        "Seconds past its expiry an answer may still be given, with a TTL of 30, when no "
        "resolver answers (RFC 8767); 0: never.",
        _int_range(0, 7 * 86400),
        "0",
    ),
    Option(
        "prefetch",
        bool,
        True,
        Scope.GLOBAL,
        "Ask again for a popular name shortly before its answer expires.",
        None,
        "true",
    ),
    Option(
        "split_dns",
        bool,
        False,
        Scope.GLOBAL,
        "Send an interface's search domains to that interface's resolvers only.",
        None,
        "false",
    ),
    # -- per interface (top level: the default) -------------------------------------------------
    Option(
        "profile",
        str,
        "opportunistic",
        Scope.LINK,
        "off (leave alone), opportunistic (TLS when possible), encrypted (TLS required) "
        "or strict (authenticated TLS required; no DNS rather than cleartext).",
        _one_of(*[p.value for p in ConfigProfile]),
        '"strict"',
    ),
    Option(
        "order",
        str,
        "auto",
        Scope.LINK,
        "Which TLS path to try first: port-first, upgrade-first, or auto (what worked last).",
        _one_of("auto", "port-first", "upgrade-first"),
        '"port-first"',
    ),
    Option(
        "pins",
        list,
        [],
        Scope.LINK,
        "SPKI SHA-256 pins (base64, RFC 7858) that authenticate this interface's resolvers.",
        _each(parse_pin),
        '["pOXrpUt9kgPgbWxBFFcBTbRH2heo2wHwXp1fd4AEVXI="]',
    ),
    Option(
        "auth_name",
        str,
        "",
        Scope.LINK,
        "Name the resolvers' certificates must carry (also sent as SNI).",
        None,
        '"dns.example.net"',
    ),
    Option(
        "ca_file",
        str,
        "",
        Scope.LINK,
        "CA bundle for strict authentication; empty: the system's.",
        _readable_file,
        '"/etc/ssl/certs/ca-certificates.crt"',
    ),
    Option(
        "static_resolvers",
        list,
        [],
        Scope.LINK,
        "Resolvers to use besides the network's, [tls:|upgrade:]ADDR[@PORT][#NAME]. Set at the "
        "top level they alone suffice: while no interface is managed (no NetworkManager, no "
        "lease, only lo) they are the machine's resolvers, as the pseudo-interface static.",
        _each(_static_resolver),
        '["198.51.100.53#dns.example.net"]',
    ),
    Option(
        "ignore_resolvers",
        list,
        [],
        Scope.LINK,
        "Resolver addresses the network hands out that are never used.",
        _each(_ip),
        '["203.0.113.9"]',
    ),
    Option(
        "probe_timeout",
        float,
        5.0,
        Scope.LINK,
        "Overall deadline of one probe, seconds.",
        _seconds(0.2, 60),
        "5",
    ),
    Option(
        "connect_timeout",
        float,
        3.0,
        Scope.LINK,
        "Ceiling for one TCP connect, seconds.",
        _seconds(0.1, 60),
        "3",
    ),
    Option(
        "fallback_delay",
        float,
        0.25,
        Scope.LINK,
        "Start the other TLS path when the first has not finished its TLS handshake by then, "
        "seconds.",
        _seconds(0, 10),
        "0.25",
    ),
    Option(
        "negative_cache",
        float,
        3600.0,
        Scope.LINK,
        "Seconds a resolver that refused TLS is not asked again.",
        _seconds(0, 86400),
        "3600",
    ),
    Option(
        "reprobe_interval",
        float,
        1800.0,
        Scope.LINK,
        "Seconds between re-probes of resolvers in use.",
        _seconds(10, 86400),
        "1800",
    ),
    Option(
        "ddr",
        bool,
        True,
        Scope.LINK,
        "Ask each resolver the network names for its designated encrypted resolvers "
        "(_dns.resolver.arpa SVCB, RFC 9462) and use them first.",
        None,
        "true",
    ),
    Option(
        "cleartext_fallback",
        bool,
        True,
        Scope.LINK,
        "opportunistic only: use plain DNS when no private path works.",
        None,
        "true",
    ),
    # -- matching ------------------------------------------------------------------------------
    Option(
        "match_name",
        list,
        [],
        Scope.MATCH,
        "Interface name globs this section applies to.",
        None,
        '["wlp*", "wlan*"]',
    ),
    Option(
        "match_connection",
        list,
        [],
        Scope.MATCH,
        "NetworkManager connection ids or UUIDs.",
        None,
        '["Home Wi-Fi"]',
    ),
    Option("match_ssid", list, [], Scope.MATCH, "Wi-Fi SSIDs.", None, '["CoffeeShop"]'),
)

BY_KEY = {o.key: o for o in OPTIONS}
LINK_KEYS = frozenset(o.key for o in OPTIONS if o.scope is Scope.LINK)


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(AgentError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(map(str, problems)))


@dataclass(frozen=True)
class LinkSettings:
    """The per-interface options, resolved for one interface."""

    profile: ConfigProfile = ConfigProfile.OPPORTUNISTIC
    order: str = "auto"
    pins: frozenset[str] = frozenset()
    auth_name: str | None = None
    ca_file: str | None = None
    static_resolvers: tuple[UpstreamSpec, ...] = ()
    ignore_resolvers: frozenset[str] = frozenset()
    probe_timeout: float = 5.0
    connect_timeout: float = 3.0
    fallback_delay: float = 0.25
    negative_cache: float = 3600.0
    reprobe_interval: float = 1800.0
    ddr: bool = True
    cleartext_fallback: bool = True


@dataclass(frozen=True)
class InterfaceRule:
    source: str  # file:line of the section
    names: tuple[str, ...] = ()
    connections: tuple[str, ...] = ()
    ssids: tuple[str, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def matches(self, name: str, connection: Iterable[str] = (), ssid: str | None = None) -> bool:
        if self.names and not any(fnmatch.fnmatchcase(name, g) for g in self.names):
            return False
        if self.connections and not set(self.connections) & set(connection):
            return False
        return not (self.ssids and ssid not in self.ssids)


@dataclass(frozen=True)
class Config:
    files: tuple[str, ...] = ()
    state_dir: str = "/var/lib/dnstls-agent"
    runtime_dir: str = "/run/dnstls-agent"
    stub_state_dir: str = "/var/lib/dnstls-agent-stub"
    listen: tuple[tuple[str, int], ...] = (("127.0.0.153", 53),)
    serve_network: bool = False
    manage_stub: bool = True
    stub_backend: str = "auto"
    nm_bus: str = ""
    netlink: bool = True
    lease_dirs: tuple[str, ...] = ("/var/lib/dhcp", "/run/systemd/netif/leases")
    debounce: float = 0.1
    hold_empty: float = 2.0
    max_parallel_probes: int = 8
    idle_timeout: float = 60.0
    query_timeout: float = 5.0
    log_level: str = "info"
    split_dns: bool = False
    cache: bool = True
    cache_size: int = 10000
    cache_max_bytes: int = 8 * 1024 * 1024
    cache_min_ttl: int = 0
    cache_max_ttl: int = 86400
    cache_max_negative_ttl: int = 3600
    serve_stale: int = 0
    prefetch: bool = True
    defaults: LinkSettings = LinkSettings()
    interfaces: tuple[InterfaceRule, ...] = ()

    def for_link(
        self, name: str, connection: Iterable[str] = (), ssid: str | None = None
    ) -> LinkSettings:
        """The settings of one interface: the defaults, then every matching section in order."""
        conn = tuple(connection)
        values: dict[str, Any] = {}
        for rule in self.interfaces:
            if rule.matches(name, conn, ssid):
                values.update(rule.overrides)
        return _link_settings(values, self.defaults) if values else self.defaults

    def profiles(self) -> set[str]:
        """Every profile the configuration names, global or per interface."""
        named = {
            str(rule.overrides.get("profile", self.defaults.profile)) for rule in self.interfaces
        }
        return named | {str(self.defaults.profile)}


def parse_listen(text: str) -> tuple[str, int]:
    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise UsageError(f"{text!r}: {host!r} is not an IP address") from None
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
        raise UsageError(f"{text!r}: {port!r} is not a port")
    return host, int(port)


def _convert(key: str, value: Any) -> Any:
    """TOML value -> the typed value LinkSettings/Config hold."""
    if key in ("pins",):
        return frozenset(parse_pin(p) for p in value)
    if key == "ignore_resolvers":
        return frozenset(str(ipaddress.ip_address(v)) for v in value)
    if key == "static_resolvers":
        return tuple(UpstreamSpec.parse(v) for v in value)
    if key == "profile":
        return ConfigProfile(value)
    if key in ("auth_name", "ca_file"):
        return value or None
    if key == "listen":
        return tuple(parse_listen(v) for v in value)
    if key == "lease_dirs":
        return tuple(value)
    return value


def _link_settings(values: Mapping[str, Any], base: LinkSettings) -> LinkSettings:
    return dataclasses.replace(base, **{k: _convert(k, v) for k, v in values.items()})


# -- reading files --------------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


def _key_lines(text: str) -> tuple[dict[str, int], list[tuple[int, dict[str, int]]]]:
    """Line numbers of top-level keys, and of each [[interface]] section and its keys.

    tomllib gives no positions; this is enough for the flat files agent.toml is made of.
    """
    top: dict[str, int] = {}
    sections: list[tuple[int, dict[str, int]]] = []
    current: dict[str, int] | None = None
    # TOML's lines end at \n only (splitlines would also break at U+2028 in a string)
    for n, line in enumerate(text.split("\n"), 1):
        if h := _HEADER.match(line):
            current = {}
            if h.group(1) == "interface":
                sections.append((n, current))
            continue
        if k := _KEY.match(line):
            (top if current is None else current).setdefault(k.group(1), n)
    return top, sections


def _typed(opt: Option, value: Any) -> str | None:
    if opt.type is float and isinstance(value, int) and not isinstance(value, bool):
        return None
    if opt.type is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return "must be a list of strings"
        return None
    if not isinstance(value, opt.type) or (opt.type is not bool and isinstance(value, bool)):
        return f"must be {'a boolean' if opt.type is bool else 'a ' + opt.type.__name__}"
    return None


def _text(opt: Option, value: Any) -> str | None:
    """Every string, alone or in a list: bounded, and no control characters where they make
    no sense (an SSID may hold them, never a NUL)."""
    for v in value if isinstance(value, list) else [value]:
        if not isinstance(v, str):
            continue
        if len(v) > MAX_TEXT:
            return f"must be {MAX_TEXT} characters at most"
        if "\x00" in v:
            return "must not contain a NUL character"
        if opt.key not in _ANY_TEXT and (m := _CONTROL.search(v)):
            return f"must not contain a control character (U+{ord(m.group()):04X})"
    return None


def _check_option(opt: Option, value: Any) -> str | None:
    if err := _typed(opt, value) or _text(opt, value):
        return err
    try:
        return opt.check(value) if opt.check else None
    except (UsageError, ValueError, OSError) as exc:  # a check that did not foresee the value
        return str(exc)


def _read_one(path: Path, problems: list[Problem]) -> tuple[dict[str, Any], list[InterfaceRule]]:
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except OSError as exc:
        problems.append(Problem(name, None, "", f"cannot read: {exc.strerror or exc}"))
        return {}, []
    except UnicodeDecodeError:
        problems.append(Problem(name, None, "", "not UTF-8 text"))
        return {}, []
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        # "at end of document": the last line (TOML's lines end at \n only)
        at = int(m.group(1)) if m else len(text.rstrip("\n").split("\n"))
        problems.append(Problem(name, at, "", f"not valid TOML: {exc}"))
        return {}, []
    top_lines, sections = _key_lines(text)
    glob: dict[str, Any] = {}
    rules: list[InterfaceRule] = []
    for key, value in data.items():
        line = top_lines.get(key)
        if key == "interface":
            if not isinstance(value, list):
                problems.append(Problem(name, line, key, "must be [[interface]] sections"))
                continue
            for i, section in enumerate(value):
                sec_line, keys = sections[i] if i < len(sections) else (None, {})
                rule = _read_rule(name, sec_line, keys, section, problems)
                if rule is not None:
                    rules.append(rule)
            continue
        opt = BY_KEY.get(key)
        if opt is None or opt.scope is Scope.MATCH:
            problems.append(Problem(name, line, key, "unknown option" + _suggest(key)))
            continue
        if (err := _check_option(opt, value)) is not None:
            problems.append(Problem(name, line, key, err))
            continue
        glob[key] = value
    return glob, rules


def _read_rule(
    file: str, line: int | None, keys: dict[str, int], section: Any, problems: list[Problem]
) -> InterfaceRule | None:
    if not isinstance(section, dict):
        problems.append(Problem(file, line, "interface", "must be a table"))
        return None
    overrides: dict[str, Any] = {}
    match: dict[str, list[str]] = {}
    ok = True
    for key, value in section.items():
        kl = keys.get(key, line)
        opt = BY_KEY.get(key)
        if opt is None or opt.scope is Scope.GLOBAL:
            why = (
                "is a global option, not per interface" if opt else "unknown option" + _suggest(key)
            )
            problems.append(Problem(file, kl, f"interface.{key}", why))
            ok = False
            continue
        v = [value] if opt.scope is Scope.MATCH and isinstance(value, str) else value
        if (err := _check_option(opt, v)) is not None:
            problems.append(Problem(file, kl, f"interface.{key}", err))
            ok = False
            continue
        if opt.scope is Scope.MATCH:
            match[key] = v
        else:
            overrides[key] = v
    if not match:
        problems.append(
            Problem(file, line, "interface", "needs match_name, match_connection or match_ssid")
        )
        return None
    if not ok:
        return None
    return InterfaceRule(
        source=f"{file}:{line}",
        names=tuple(match.get("match_name", ())),
        connections=tuple(match.get("match_connection", ())),
        ssids=tuple(match.get("match_ssid", ())),
        overrides=overrides,
    )


def _suggest(key: str) -> str:
    import difflib  # noqa: PLC0415 - only on errors

    close = difflib.get_close_matches(key, BY_KEY, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load(path: Path | None = None, *, dropins: bool = True, missing_ok: bool = True) -> Config:
    """Read the main file and its drop-ins; raise ConfigError listing every problem."""
    path = path or DEFAULT_FILE
    problems: list[Problem] = []
    files: list[Path] = []
    if path.exists() or not missing_ok:
        files.append(path)
    dropin_dir = path.with_name(path.name + ".d")
    if dropins and dropin_dir.is_dir():
        files.extend(sorted(dropin_dir.glob("*.toml")))
    glob: dict[str, Any] = {}
    rules: list[InterfaceRule] = []
    for f in files:
        g, r = _read_one(f, problems)
        glob.update(g)
        rules.extend(r)
    if problems:
        raise ConfigError(problems)
    link_values = {k: v for k, v in glob.items() if k in LINK_KEYS}
    global_values = {k: _convert(k, v) for k, v in glob.items() if k not in LINK_KEYS}
    cfg = Config(
        files=tuple(map(str, files)),
        defaults=_link_settings(link_values, LinkSettings()),
        interfaces=tuple(rules),
        **global_values,
    )
    problems.extend(_combinations(cfg, str(files[-1]) if files else str(path)))
    if problems:
        raise ConfigError(problems)
    return cfg


def _combinations(cfg: Config, where: str) -> list[Problem]:
    """Options each fine alone that cannot work together."""
    problems: list[Problem] = []
    open_to = [h for h, _ in cfg.listen if not ipaddress.ip_address(h).is_loopback]
    if open_to and not cfg.serve_network:
        problems.append(Problem(where, None, "listen", (
            f"{', '.join(open_to)} is not a loopback address: the machine would answer DNS "
            "for others (an open resolver, if reachable); set serve_network = true if that "
            "is meant")))  # fmt: skip
    if cfg.manage_stub and cfg.listen and cfg.listen[0][1] != 53:
        host, port = cfg.listen[0]
        problems.append(Problem(where, None, "listen", (
            f"{host}:{port}: the system's stub resolver (resolv.conf) cannot name a port, so "
            "with manage_stub = true the first listen address must use port 53 (or set "
            "manage_stub = false and point clients at it yourself)")))  # fmt: skip
    return problems


def defaults_agree() -> list[str]:
    """Sanity for tests: the table's defaults are what Config/LinkSettings hold."""
    out = []
    for opt in OPTIONS:
        if opt.scope is Scope.MATCH:
            continue
        target: Any = LinkSettings() if opt.scope is Scope.LINK else Config()
        have = getattr(target, opt.key)
        want = _convert(opt.key, opt.default)
        if have != want:
            out.append(f"{opt.key}: table says {want!r}, dataclass says {have!r}")
    return out


def load_or_explain(path: Path | None) -> Config:
    """The configuration, or a UsageError listing every problem (the daemon refuses to start)."""
    try:
        return load(path)
    except ConfigError as exc:
        raise UsageError(f"refusing to start, the configuration has problems:\n{exc}") from None
