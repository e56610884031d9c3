"""The `dnstls-agent` command: subcommands, argument parsing, output and exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from agent import __version__, config, control
from agent.control import SOCKET_NAME
from agent.errors import AgentError, UsageError
from agent.model import (
    AuthSpec,
    Order,
    ProbeResult,
    ProbeSettings,
    Profile,
    UpstreamSpec,
    parse_pin,
)
from agent.tunnel.cache import CacheSettings
from agent.tunnel.settings import DEFAULT_LISTEN, TunnelConfig

LOG = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_NOT_PRIVATE = 1  # probe: some resolver has no private path the profile accepts
EXIT_BAD_REQUEST = 1  # stub --refresh: the daemon's request is not usable
EXIT_USAGE = 2
EXIT_FAILURE = 3  # anything else that stopped the command


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0 and <= 3600 seconds")
    return value


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 60:  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0 and <= 60 minutes")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number")
    return int(text)


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _pin(text: str) -> str:
    try:
        return parse_pin(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _readable_file(text: str) -> str:
    if not os.access(text, os.R_OK) or not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"cannot read file {text!r}")
    return text


class _Parser(argparse.ArgumentParser):
    """Argument errors as one clear line (and exit status 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dnstls-agent",
        description="Private DNS for machines that get their resolvers from DHCP.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"configuration file (default {config.DEFAULT_FILE}, and FILE.d/*.toml)",
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )

    _add_probe(sub)
    _add_tunnel(sub)
    _add_daemon(sub)
    _add_config(sub)
    return parser


Sub = Any  # argparse's subparsers action has no public type


def _add_probe(sub: Sub) -> None:
    p = sub.add_parser(
        "probe",
        help="probe resolvers for DNS over TLS (port 853, then the STARTTLS upgrade)",
        description="Probe each resolver for DNS over TLS: TLS on port 853 and the EDNS0 TO "
        "upgrade on TCP/53, raced happy-eyeballs style. Exit status 0 when every resolver "
        "has a private path the profile accepts, 1 otherwise.",
    )
    p.add_argument(
        "addresses", nargs="+", type=_ip, metavar="IP", help="resolver address (v4 or v6)"
    )
    p.add_argument(
        "--profile", choices=[x.value for x in Profile], default=Profile.OPPORTUNISTIC.value
    )
    p.add_argument(
        "--pin",
        action="append",
        type=_pin,
        default=[],
        metavar="SHA256B64",
        help="accepted SPKI SHA-256 pin (base64, RFC 7858); repeatable",
    )
    p.add_argument(
        "--auth-name", metavar="NAME", help="name the certificate must carry (sent as SNI)"
    )
    p.add_argument(
        "--ca-file", type=_readable_file, metavar="FILE", help="CA bundle (default: the system's)"
    )
    p.add_argument("--order", choices=[x.value for x in Order], default=Order.PORT_FIRST.value)
    p.add_argument(
        "--timeout",
        type=_positive,
        default=ProbeSettings.timeout,
        metavar="S",
        help="overall deadline per resolver (default %(default)s)",
    )
    p.add_argument(
        "--connect-timeout",
        type=_positive,
        default=ProbeSettings.connect_timeout,
        metavar="S",
        help="ceiling for one TCP connect (default %(default)s)",
    )
    p.add_argument(
        "--fallback-delay",
        type=_positive,
        default=ProbeSettings.fallback_delay,
        metavar="S",
        help="start the other path if the first has not finished its TLS handshake by then "
        "(default %(default)s)",
    )
    p.add_argument(
        "--probe-name",
        default=ProbeSettings.probe_name,
        metavar="NAME",
        help="name queried inside TLS (default %(default)r)",
    )
    p.add_argument(
        "--probe-type",
        default=ProbeSettings.probe_type,
        metavar="TYPE",
        help="type queried inside TLS (default %(default)s)",
    )
    p.add_argument("--tls-port", type=_port, default=ProbeSettings.tls_port, metavar="PORT")
    p.add_argument("--dns-port", type=_port, default=ProbeSettings.dns_port, metavar="PORT")
    p.add_argument("--no-resumption", action="store_true", help="skip the session-resumption check")
    p.add_argument(
        "--no-ddr",
        action="store_true",
        help="do not ask for designated resolvers (_dns.resolver.arpa SVCB, RFC 9462)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_probe)


def _add_tunnel(sub: Sub) -> None:
    t = sub.add_parser(
        "tunnel",
        help="run the local TLS tunnel alone, in the foreground",
        description="Forward DNS from loopback to the given upstreams, in their order, over "
        "long-lived pipelined TLS. UPSTREAM is [tls:|upgrade:|tcp:]ADDR[@PORT][#NAME]: TLS on "
        "853 (default), the STARTTLS upgrade on 53, or plain TCP (opportunistic only); NAME is "
        "the name to authenticate (and SNI). Ctrl-C stops it; SIGUSR1 logs its statistics.",
    )
    t.add_argument(
        "--upstream",
        action="append",
        required=True,
        type=_upstream,
        metavar="UPSTREAM",
        help="an upstream, in order of preference; repeatable",
    )
    t.add_argument(
        "--listen",
        action="append",
        type=_listen,
        metavar="ADDR[:PORT]",
        help="where to listen, UDP and TCP (default 127.0.0.153:53); repeatable",
    )
    t.add_argument(
        "--profile", choices=[x.value for x in Profile], default=Profile.OPPORTUNISTIC.value
    )
    t.add_argument(
        "--no-cleartext-fallback",
        action="store_true",
        help="opportunistic: never fall back to plain DNS over TCP to the same resolvers",
    )
    t.add_argument(
        "--pin",
        action="append",
        type=_pin,
        default=[],
        metavar="SHA256B64",
        help="SPKI pin accepted for every upstream (strict); repeatable",
    )
    t.add_argument(
        "--ca-file", type=_readable_file, metavar="FILE", help="CA bundle (default: the system's)"
    )
    t.add_argument(
        "--idle-timeout",
        type=_positive,
        default=TunnelConfig.idle_timeout,
        metavar="S",
        help="close an idle upstream connection after S seconds (default %(default)s)",
    )
    t.add_argument(
        "--connect-timeout", type=_positive, default=TunnelConfig.connect_timeout, metavar="S"
    )
    t.add_argument(
        "--query-timeout",
        type=_positive,
        default=TunnelConfig.query_timeout,
        metavar="S",
        help="answer SERVFAIL when no answer came within S seconds (default %(default)s)",
    )
    t.add_argument("--no-fastopen", action="store_true", help="no TCP Fast Open to upstreams")
    t.add_argument("--no-padding", action="store_true", help="do not pad queries (RFC 8467)")
    t.add_argument("--no-cache", action="store_true", help="answer nothing from a cache")
    t.add_argument(
        "--cache-size",
        type=int,
        default=CacheSettings.max_entries,
        metavar="N",
        help="answers the cache holds at most (default %(default)s)",
    )
    t.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="event loop (default asyncio: measured as fast as uvloop here, with a better p99)",
    )
    t.set_defaults(func=cmd_tunnel)


def _add_daemon(sub: Sub) -> None:
    r = sub.add_parser(
        "run",
        help="run the agent: follow the network, probe, keep the tunnel's order (foreground)",
        description="The daemon. Follows NetworkManager (D-Bus), the kernel (netlink) and DHCP "
        "lease files, probes the resolvers they name, and hands the tunnel the preferred "
        "order. READY=1 to systemd after the first decision; SIGHUP reloads the "
        "configuration; SIGTERM stops.",
    )
    r.set_defaults(func=cmd_run)
    rs = sub.add_parser(
        "restore",
        help="bring the system's stub resolver back to what it was before the agent",
        description="Undoes every change the agent made to the system's DNS configuration, "
        "as recorded in its state directory; safe to run at any time, also after a crash. "
        "The systemd unit runs it after every stop with --unless-restarting.",
    )
    rs.add_argument(
        "--unless-restarting",
        action="store_true",
        help="as the unit's ExecStopPost: under a strict or encrypted profile, leave the stub "
        "pointed at the tunnel when systemd starts the daemon again (a restart job, a crash "
        "or watchdog kill under Restart=always): no DNS meanwhile rather than cleartext",
    )
    rs.set_defaults(func=cmd_restore)
    st = sub.add_parser(
        "stub",
        help="point the system's stub resolver at the tunnel (the unit runs this as root)",
        description="Points the system's stub resolver at the tunnel's first listen address, "
        "with the backend of the configuration's stub_backend (auto: detected). The change is "
        "journalled first; `dnstls-agent restore` undoes it. The search domains are the "
        "network's, as the running daemon last asked (its runtime directory's "
        "stub-request.json). `--refresh` applies that request again, only when the stub is "
        "pointed (the path unit dnstls-agent-stub.path runs it as root). `--dhclient` is "
        "dhclient-script's make_resolv_conf while the stub is pointed (its enter hook runs it): "
        "the lease's file becomes what restore puts back and resolv.conf keeps pointing at the "
        "tunnel. `--show` only says which backend would be used and what is journalled. "
        'stub_backend = "resolv.conf" where NetworkManager, resolvconf or systemd-resolved '
        "writes /etc/resolv.conf is refused (exit status 2) under a strict or encrypted "
        "profile, and warned about under opportunistic.",
    )
    how = st.add_mutually_exclusive_group()
    how.add_argument("--show", action="store_true", help="change nothing; say what would be done")
    how.add_argument(
        "--refresh",
        action="store_true",
        help="apply the daemon's request again (search domains; a resolv.conf rewritten by "
        "someone else); nothing when the stub is not pointed",
    )
    how.add_argument(
        "--dhclient",
        action="store_true",
        help="the lease in dhclient-script's environment (new_domain_name_servers, ...): "
        "kept for restore, never written as the system's nameservers while the stub is pointed",
    )
    st.set_defaults(func=cmd_stub)
    for name, text in (
        ("status", "show what the running agent knows and does"),
        ("reprobe", "ask the running agent to probe every resolver again now"),
        ("flush-caches", "empty the tunnel's cache of answers"),
    ):
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument(
            "--socket", type=Path, metavar="PATH", help="control socket (default from config)"
        )
        if name == "status":
            sp.add_argument("--json", action="store_true", help="print JSON")
        sp.set_defaults(
            func={"status": cmd_status, "reprobe": cmd_reprobe}.get(name, cmd_flush_caches)
        )
    pt = sub.add_parser(
        "portal",
        help="captive portals: allow the network's own DNS for the login (strict, encrypted)",
        description="Behind a captive portal (NetworkManager's connectivity: portal) the strict "
        "and encrypted profiles serve no DNS. `portal allow` lets the portal's own DNS through, "
        "in cleartext, for the login only: the exception is shown in status and ends by itself "
        "when connectivity turns full or after --minutes.",
    )
    psub = pt.add_subparsers(
        dest="portal_command", metavar="ACTION", required=True, parser_class=_Parser
    )
    pa = psub.add_parser("allow", help="allow the portal's DNS for the login")
    pa.add_argument(
        "--minutes",
        type=_minutes,
        default=5.0,
        metavar="N",
        help="at most N minutes (default %(default)s)",
    )
    pa.add_argument(
        "--socket", type=Path, metavar="PATH", help="control socket (default from config)"
    )
    pa.set_defaults(func=cmd_portal_allow)
    nt = sub.add_parser(
        "notifications",
        help="show the running agent's warnings as desktop notifications (run in your session)",
        description="For the system service, which has no session bus: run this in the desktop "
        "session (e.g. autostarted). It asks the agent for its warnings every few seconds and "
        "shows each new one with org.freedesktop.Notifications. Ctrl-C stops it.",
    )
    nt.add_argument(
        "--socket", type=Path, metavar="PATH", help="control socket (default from config)"
    )
    nt.add_argument(
        "--interval",
        type=_positive,
        default=3.0,
        metavar="S",
        help="seconds between looks (default %(default)s)",
    )
    nt.add_argument("--once", action="store_true", help="look once, show what is new, exit")
    nt.set_defaults(func=cmd_notifications)
    n = sub.add_parser(
        "notify",
        help="tell the running agent that an interface changed (the dispatcher hook's call)",
        description="Pokes the running agent, which then re-reads the network's state. Never "
        "fails and never waits long: exit status 0 even when the agent is not running.",
    )
    n.add_argument("interface", nargs="?", default="", metavar="IFACE")
    n.add_argument("action", nargs="?", default="", metavar="ACTION")
    n.add_argument(
        "--socket", type=Path, metavar="PATH", help="control socket (default from config)"
    )
    n.set_defaults(func=cmd_notify)


def _add_config(sub: Sub) -> None:
    c = sub.add_parser("config", help="work with the configuration file")
    csub = c.add_subparsers(
        dest="config_command", metavar="ACTION", required=True, parser_class=_Parser
    )
    check = csub.add_parser(
        "check",
        help="check a configuration file and its drop-ins; report every problem",
        description="Exit status 0 when FILE (default /etc/dnstls-agent/agent.toml) and the "
        "files in FILE.d/ are valid, 2 otherwise, with one line per problem: file:line: key: "
        "what is wrong.",
    )
    check.add_argument("file", nargs="?", type=Path, default=None, metavar="FILE")
    check.set_defaults(func=cmd_config_check)


def _socket(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    try:
        runtime = config.load(args.config).runtime_dir
    except config.ConfigError:
        runtime = config.Config().runtime_dir
    return Path(runtime) / SOCKET_NAME


# The daemon's, the stub's, the prober's and the tunnel's modules (and asyncio) are
# imported by the commands that use them: the netlink watcher's pyroute2 alone costs 24 MiB
# of memory, and D-Bus another 5, which `tunnel` (a forwarder on its own, like stubby) and
# the small commands do not need; and the small commands start in half the time (asyncio,
# ssl and cryptography are most of it), which the hooks' callers wait for: dhclient runs
# `stub --dhclient` before it goes on.
def cmd_run(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 (see above)

    from agent import daemon  # noqa: PLC0415 (see above)

    cfg = config.load_or_explain(args.config)
    failure = asyncio.run(daemon.run(cfg, args.config))
    if failure:
        print(f"dnstls-agent: {failure}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_stub(args: argparse.Namespace) -> int:
    from agent import sysconf  # noqa: PLC0415 (see cmd_run)
    from agent.sysconf import request  # noqa: PLC0415

    cfg = config.load_or_explain(args.config)
    address = cfg.listen[0][0]
    state, runtime = Path(cfg.stub_state_dir), Path(cfg.runtime_dir)
    if args.dhclient:  # before manage_stub: without a journal, dhclient's own job is done
        print(sysconf.dhclient_lease(state, os.environ, [address], _asked_search(runtime)))
        return EXIT_OK
    backend = sysconf.choose(cfg.stub_backend, nm_bus=cfg.nm_bus or None)
    if args.show:
        journal = sysconf.journal_of(state)
        print(f"backend: {backend.name} ({backend.describe()}); tunnel: {address}")
        print(f"journal: {json.dumps(journal) if journal else 'empty (nothing changed)'}")
        return EXIT_OK
    if not cfg.manage_stub:
        print("manage_stub = false: the system stub is left alone")
        return EXIT_OK
    if args.refresh:
        try:
            asked = request.read(runtime)
        except request.RequestError as exc:  # the daemon's request is hostile ground
            print(f"dnstls-agent: the daemon's request is not usable, nothing changed: {exc}",
                  file=sys.stderr)  # fmt: skip
            return EXIT_BAD_REQUEST
        search = asked.search if asked is not None else None
        print(sysconf.refresh(state, [address], search, nm_bus=cfg.nm_bus or None))
        return EXIT_OK
    # refused (StubRefused, a UsageError: status 2) before anything changes
    sysconf.check_backend(backend, cfg.profiles(), nm_bus=cfg.nm_bus or None)
    print(sysconf.apply(state, backend, [address], _asked_search(runtime)))
    return EXIT_OK


def _asked_search(runtime: Path) -> list[str] | None:
    """The search domains the daemon last asked for; None (as the backend finds them) when
    it asked nothing, or something unusable."""
    from agent.sysconf import request  # noqa: PLC0415 (see cmd_run)

    try:
        asked = request.read(runtime)
    except request.RequestError as exc:
        LOG.warning("%s: the network's search domains as the backend finds them", exc)
        return None
    return list(asked.search) if asked is not None else None


def cmd_restore(args: argparse.Namespace) -> int:
    from agent import sysconf  # noqa: PLC0415 (see cmd_run)
    from agent.sysconf import privacy  # noqa: PLC0415

    try:
        cfg = config.load(args.config)
    except config.ConfigError:
        cfg = config.Config()  # a broken file must not stop a restore
    if args.unless_restarting:
        at_stop = privacy.at_stop(cfg.profiles(), privacy.stop_facts(os.environ))
        if at_stop.keep:
            print(f"the system stub is left pointed at the tunnel: {at_stop.reason}")
            return EXIT_OK
        print(f"restoring the system stub: {at_stop.reason}")
    print(sysconf.restore(Path(cfg.stub_state_dir)))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    answer = control.ask(_socket(args), {"command": "status"})
    if args.json:
        print(json.dumps(answer["status"], indent=2))
    else:
        print(format_status(answer["status"]))
    return EXIT_OK


def cmd_portal_allow(args: argparse.Namespace) -> int:
    answer = control.ask(_socket(args), {"command": "portal-allow", "minutes": args.minutes})
    until = time.strftime("%H:%M:%S", time.localtime(answer["until"]))
    print(f"captive portal: cleartext DNS allowed for the login until {until}, "
          "or until connectivity is full")  # fmt: skip
    return EXIT_OK


def cmd_notifications(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 (see cmd_run)

    return asyncio.run(_relay_warnings(_socket(args), args.interval, once=args.once))


async def _relay_warnings(path: Path, interval: float, *, once: bool) -> int:
    import asyncio  # noqa: PLC0415 (see cmd_run)

    from agent.notifications import DesktopNotifier  # noqa: PLC0415 (see cmd_run)

    notifier = DesktopNotifier()
    shown: set[tuple[str, str]] = set()
    try:
        while True:
            try:
                answer = await asyncio.to_thread(control.ask, path, {"command": "status"})
            except control.ControlError as exc:
                LOG.info("%s", exc)  # the agent is away: look again later
                answer = {"status": {"warnings": []}}
            now = {(w["alert"], w["text"]) for w in answer["status"].get("warnings", [])}
            for alert, text in sorted(now - shown):
                if not await notifier.notify(alert, text):
                    print(f"{alert}: {text}", file=sys.stderr)
            shown = now
            if once:
                return EXIT_OK
            await asyncio.sleep(interval)
    finally:
        notifier.close()


def cmd_reprobe(args: argparse.Namespace) -> int:
    control.ask(_socket(args), {"command": "reprobe"})
    return EXIT_OK


def cmd_flush_caches(args: argparse.Namespace) -> int:
    answer = control.ask(_socket(args), {"command": "flush-caches"})
    print(f"{answer.get('flushed', 0)} answer(s) dropped from the cache")
    return EXIT_OK


def cmd_notify(args: argparse.Namespace) -> int:
    request = {"command": "notify", "interface": args.interface, "action": args.action}
    try:
        control.ask(_socket(args), request, timeout=1.0)
    except control.RequestRefused:
        raise  # not the agent being away: this caller may not, and hears so (status 2)
    except control.ControlError as exc:
        LOG.info("%s", exc)  # the agent down (or busy) is not the dispatcher's problem
    return EXIT_OK


def format_status(st: dict[str, Any]) -> str:
    tunnel = st.get("tunnel", {})
    lines = [
        f"profile: {st.get('profile') or 'none'} ({st.get('reason')})",
        f"tunnel: {tunnel.get('mode')} on {', '.join(tunnel.get('listen', []))}; "
        f"connectivity: {st.get('connectivity')}",
        "order: " + (", ".join(st.get("order", [])) or "none"),
    ]
    if st.get("held_until"):
        until = time.strftime("%H:%M:%S", time.localtime(st["held_until"]))
        lines.append(f"no interface has resolvers now: the order above is kept until {until}")
    if st.get("portal_until"):
        until = time.strftime("%H:%M:%S", time.localtime(st["portal_until"]))
        lines.append(f"captive portal exception (cleartext DNS for the login) until {until}")
    for domain, ups in st.get("routes", {}).items():
        lines.append(f"  {domain} -> {', '.join(ups)}")
    if st.get("search") is not None:
        lines.append("search domains: " + (" ".join(st["search"]) or "none"))
    stub = st.get("stub") or {}
    if stub.get("error"):
        lines.append(f"WARNING system stub: the last refresh failed: {stub['error']}")
    for link in st.get("interfaces", []):
        state = "up" if link["up"] else "down"
        lines.append(f"{link['interface']} ({state}, {link['profile']}, {link['network']})")
        for r in link["resolvers"]:
            lat = f"{r['latency_ms']:.1f}ms" if r.get("latency_ms") is not None else "-"
            how = " ".join(x for x in (r.get("method"), r.get("auth")) if x) or "unknown"
            if r.get("auth_source") and r.get("auth") not in (None, "none"):
                how += f" ({r['auth_source']})"
            use = "used" if r["used"] else "not used"
            probing = " (probing)" if r.get("probing") else ""
            origin = r.get("origin") or "-"
            lines.append(
                f"  {r['address']:<39} {origin:<10} {how:<20} {lat:>8}  {use}: {r['reason']}"
                f"{probing}"
            )
            for d in r.get("designated") or ():
                lines.append(f"    designates (DDR) {d}")
    for w in st.get("warnings", []):
        lines.append(f"WARNING {w['alert']}: {w['text']}")
    cache = tunnel.get("cache")
    if cache:
        asked = cache["hits"] + cache["misses"]
        ratio = f" ({100 * cache['hits'] / asked:.0f}%)" if asked else ""
        lines.append(
            f"cache: {cache['entries']} answers, {cache['bytes'] // 1024} KiB; "
            f"{cache['hits']} hits{ratio}, {cache['misses']} misses"
            + (f", {cache['stale_served']} stale" if cache.get("stale_served") else "")
            + (f", {cache['prefetches']} prefetched" if cache.get("prefetches") else "")
        )
    elif "cache" in tunnel:
        lines.append("cache: off")
    for up in tunnel.get("upstreams", []):
        p50 = up.get("p50_ms")
        lines.append(
            f"  upstream {up['upstream']}: {up['state']}, {up['queries']} queries, "
            f"{up['failures']} failures, {up['resumptions']} resumed"
            + (f", p50 {p50:.2f}ms" if p50 is not None else "")
            + (f", {up['retransmits']} resent" if up.get("retransmits") else "")
            + (
                f", {up['tc_retries']} truncated asked again over TCP"
                if up.get("tc_retries")
                else ""
            )
        )
    return "\n".join(lines)


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        cfg = config.load(args.file or args.config or config.DEFAULT_FILE, missing_ok=False)
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    rules = len(cfg.interfaces)
    print(f"{', '.join(cfg.files)}: valid ({rules} interface section{'s' * (rules != 1)})")
    return EXIT_OK


def _upstream(text: str) -> UpstreamSpec:
    try:
        return UpstreamSpec.parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listen(text: str) -> tuple[str, int]:
    try:
        return config.parse_listen(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}ms"


def _yn(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "no")


def format_table(results: Sequence[ProbeResult]) -> str:
    header = (
        "RESOLVER",
        "METHOD",
        "AUTH",
        "CONNECT",
        "HANDSHAKE",
        "ANSWER",
        "DECIDED",
        "TLS",
        "RESUMES",
        "UDP-TO",
        "PIN",
    )
    rows = [header]
    for r in results:
        rows.append(
            (
                r.address,
                r.method.value,
                r.auth.value if r.auth else "-",
                _ms(r.timings.connect_ms),
                _ms(r.timings.handshake_ms),
                _ms(r.timings.answer_ms),
                _ms(r.decided_ms),
                r.tls.version if r.tls else "-",
                _yn(r.resumption),
                _yn(r.udp_to_hint),
                r.tls.pin if r.tls else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    for r in results:
        lines.extend(f"  {r.address} DDR: {line}" for line in _ddr_lines(r))
        for path, why in r.failures.items():
            lines.append(f"  {r.address} {path}: {why}")
        if not r.acceptable:
            lines.append(f"  {r.address}: no private path acceptable under the {r.profile} profile")
    return "\n".join(lines)


def _ddr_lines(r: ProbeResult) -> list[str]:
    """What the resolver designated for itself (DDR, RFC 9462), and whether it may be used."""
    if r.ddr is None:
        return ["not asked"]
    if not r.ddr.designations:
        return [f"none ({r.ddr.failure})" if r.ddr.failure else "none"]
    lines = []
    for d in r.ddr.designations:
        host = f"[{d.address}]" if ":" in d.address else d.address
        used = ", the port path's" if r.tls_port == d.port and d.address == r.address else ""
        verdict = d.reason if d.usable else f"not used: {d.reason}"
        lines.append(f"dot {d.adn}@{host}:{d.port}{used}, {verdict}")
    return lines


def cmd_probe(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 (see cmd_run)

    from agent.probe import probe_many  # noqa: PLC0415 (see cmd_run)

    if args.profile == Profile.STRICT and not (args.pin or args.ca_file or args.auth_name):
        LOG.info("strict profile without --pin/--ca-file/--auth-name: using the system CA bundle")
    settings = ProbeSettings(
        auth=AuthSpec(
            profile=Profile(args.profile),
            pins=frozenset(args.pin),
            auth_name=args.auth_name,
            ca_file=args.ca_file,
        ),
        order=Order(args.order),
        timeout=args.timeout,
        connect_timeout=args.connect_timeout,
        fallback_delay=args.fallback_delay,
        probe_name=args.probe_name,
        probe_type=args.probe_type,
        tls_port=args.tls_port,
        dns_port=args.dns_port,
        check_resumption=not args.no_resumption,
        ddr=not args.no_ddr,
    )
    results = asyncio.run(probe_many(args.addresses, settings))
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        print(format_table(results))
    return EXIT_OK if all(r.acceptable for r in results) else EXIT_NOT_PRIVATE


def cmd_tunnel(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 (see cmd_run)

    from agent.policy import tunnel_order  # noqa: PLC0415 (see cmd_run)

    pins = frozenset(args.pin)
    profile = Profile(args.profile)
    given = [dataclasses.replace(u, pins=pins) for u in args.upstream]
    specs = tunnel_order(given, profile, cleartext_fallback=not args.no_cleartext_fallback)
    cfg = TunnelConfig(
        upstreams=specs,
        profile=profile,
        ca_file=args.ca_file,
        listen=tuple(args.listen or DEFAULT_LISTEN),
        idle_timeout=args.idle_timeout,
        connect_timeout=args.connect_timeout,
        query_timeout=args.query_timeout,
        fastopen=not args.no_fastopen,
        pad=not args.no_padding,
        cache=None if args.no_cache else CacheSettings(max_entries=max(1, args.cache_size)),
    )
    loop_factory = None
    if args.loop == "uvloop":
        try:
            import uvloop  # noqa: PLC0415 - optional

            loop_factory = uvloop.new_event_loop
        except ImportError:
            raise UsageError("--loop uvloop: uvloop is not installed (python3-uvloop)") from None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_run_tunnel(cfg))
    return EXIT_OK


async def _run_tunnel(cfg: TunnelConfig) -> None:
    import asyncio  # noqa: PLC0415 (see cmd_run)

    from agent.tunnel.forwarder import Tunnel  # noqa: PLC0415 (see cmd_run)

    tunnel = Tunnel(cfg)
    await tunnel.start()
    print(
        f"dnstls-agent tunnel: listening on {', '.join(f'{h}:{p}' for h, p in tunnel.addresses)}",
        file=sys.stderr,
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(
        signal.SIGUSR1, lambda: LOG.warning("statistics: %s", json.dumps(tunnel.status()))
    )
    try:
        await stop.wait()
    finally:
        LOG.info("statistics: %s", json.dumps(tunnel.status()))
        await tunnel.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"dnstls-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AgentError as exc:
        print(f"dnstls-agent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
