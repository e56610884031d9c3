"""The commands that talk to the running agent over its control socket, and their output.

status, reprobe, flush-caches, log-level, portal allow, notifications and notify: each asks the
agent (agent.control.ask) at common.socket_path(args) and prints its answer (with --json, the
answer as JSON: status its status, the others the agent's answer as it came).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from agent import control
from agent.cli import common, lazy, values
from agent.cli.common import EXIT_FAILURE, EXIT_OK, Parser

LOG = logging.getLogger(__name__)


def add(sub: common.Sub) -> None:
    socket = common.parent(common.add_socket)  # one parent, shared by the commands below
    socket_json = common.parent(common.add_socket, common.add_json)
    text = "show what the running agent knows and does"
    st = sub.add_parser("status", help=text, description=text, parents=[socket_json])
    st.set_defaults(func=cmd_status)
    text = "ask the running agent to probe every resolver again now"
    rp = sub.add_parser("reprobe", help=text, description=text, parents=[socket_json])
    rp.set_defaults(func=cmd_reprobe)
    text = "empty the tunnel's cache of answers"
    fc = sub.add_parser("flush-caches", help=text, description=text, parents=[socket_json])
    fc.set_defaults(func=cmd_flush_caches)
    text = "change the running daemon's log level until the next reload or restart"
    ll = sub.add_parser("log-level", help=text, description=text, parents=[socket_json])
    ll.add_argument("level", metavar="LEVEL", choices=["debug", "info", "warning", "error"])
    ll.set_defaults(func=cmd_log_level)
    pt = sub.add_parser(
        "portal",
        help="captive portals: allow the network's own DNS for the login (strict, encrypted)",
        description="Behind a captive portal (NetworkManager's connectivity: portal) the strict "
        "and encrypted profiles serve no DNS. `portal allow` lets the portal's own DNS through, "
        "in cleartext, for the login only: the exception is shown in status and ends by itself "
        "when connectivity turns full or after --minutes.",
    )
    psub = pt.add_subparsers(
        dest="portal_command", metavar="ACTION", required=True, parser_class=Parser
    )
    pa = psub.add_parser("allow", help="allow the portal's DNS for the login")
    pa.add_argument(
        "--minutes",
        type=values.minutes,
        default=5.0,
        metavar="N",
        help="at most N minutes (default %(default)s)",
    )
    common.add_socket(pa)  # after --minutes, as it always was
    common.add_json(pa)
    pa.set_defaults(func=cmd_portal_allow)
    nt = sub.add_parser(
        "notifications",
        help="show the running agent's warnings as desktop notifications (run in your session)",
        description="For the system service, which has no session bus: run this in the desktop "
        "session (e.g. autostarted). It asks the agent for its warnings every few seconds and "
        "shows each new one with org.freedesktop.Notifications. Ctrl-C stops it.",
        parents=[socket],
    )
    nt.add_argument(
        "--interval",
        type=values.positive,
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
        parents=[socket],
    )
    n.add_argument("interface", nargs="?", default="", metavar="IFACE")
    n.add_argument("action", nargs="?", default="", metavar="ACTION")
    n.set_defaults(func=cmd_notify)


def cmd_status(args: argparse.Namespace) -> int:
    path = common.socket_path(args)
    try:
        answer = control.ask(path, {"command": "status"})
    except control.AgentNotRunning as exc:  # as main() says it, and in JSON whether it runs
        return common.fail(args, str(exc), EXIT_FAILURE, running=False, socket=str(path))
    if args.json:
        print(json.dumps(answer["status"], indent=2))
    else:
        print(format_status(answer["status"]))
    return EXIT_OK


def cmd_reprobe(args: argparse.Namespace) -> int:
    answer = control.ask(common.socket_path(args), {"command": "reprobe"})
    if args.json:
        print(json.dumps(answer))
    return EXIT_OK


def cmd_log_level(args: argparse.Namespace) -> int:
    answer = control.ask(common.socket_path(args), {"command": "log-level", "level": args.level})
    if args.json:
        print(json.dumps(answer))
        return EXIT_OK
    print(f"log level {answer.get('old')} -> {answer.get('new')}")
    return EXIT_OK


def cmd_flush_caches(args: argparse.Namespace) -> int:
    answer = control.ask(common.socket_path(args), {"command": "flush-caches"})
    if args.json:
        print(json.dumps(answer))
        return EXIT_OK
    print(f"{answer.get('flushed', 0)} answer(s) dropped from the cache")
    return EXIT_OK


def cmd_portal_allow(args: argparse.Namespace) -> int:
    request = {"command": "portal-allow", "minutes": args.minutes}
    answer = control.ask(common.socket_path(args), request)
    if args.json:
        print(json.dumps(answer))
        return EXIT_OK
    until = time.strftime("%H:%M:%S", time.localtime(answer["until"]))
    print(f"captive portal: cleartext DNS allowed for the login until {until}, "
          "or until connectivity is full")  # fmt: skip
    return EXIT_OK


def cmd_notifications(args: argparse.Namespace) -> int:
    relay = _relay_warnings(common.socket_path(args), args.interval, once=args.once)
    return lazy.asyncio.run(relay)


async def _relay_warnings(path: Path, interval: float, *, once: bool) -> int:
    notifier = lazy.notifications.DesktopNotifier()
    shown: set[tuple[str, str]] = set()
    away: str | None = None  # why the agent could not be asked, said once until that changes
    try:
        while True:
            try:
                answer = await lazy.asyncio.to_thread(control.ask, path, {"command": "status"})
            except control.ControlError as exc:
                if str(exc) != away:  # the agent is away: said once, looked for again later
                    again = "" if once else f"; looking again every {interval:g} s"
                    print(f"dnstls-agent: cannot reach the agent: {exc}{again}", file=sys.stderr,
                          flush=True)  # fmt: skip
                away = str(exc)
                answer = {"status": {"warnings": []}}
            else:
                if away is not None:
                    print(f"dnstls-agent: the agent answers again on {path}", file=sys.stderr,
                          flush=True)  # fmt: skip
                away = None
            now = {(w["alert"], w["text"]) for w in answer["status"].get("warnings", [])}
            for alert, text in sorted(now - shown):
                if not await notifier.notify(alert, text):
                    print(f"{alert}: {text}", file=sys.stderr)
            shown = now
            if once:
                return EXIT_OK
            await lazy.asyncio.sleep(interval)
    finally:
        notifier.close()


def cmd_notify(args: argparse.Namespace) -> int:
    request = {"command": "notify", "interface": args.interface, "action": args.action}
    try:
        control.ask(common.socket_path(args), request, timeout=1.0)
    except control.RequestRefused:
        raise  # not the agent being away: this caller may not, and hears so (status 2)
    except control.ControlError as exc:
        LOG.info("%s", exc)  # the agent down (or busy) is not the dispatcher's problem
    return EXIT_OK


def format_status(st: dict[str, Any]) -> str:
    """The agent's status answer as text, for people (`status` without --json)."""
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
