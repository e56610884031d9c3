"""`tunnel`: the local TLS tunnel alone, in the foreground, to upstreams given on the line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys

from agent import logsetup
from agent.cli import common, lazy, values
from agent.cli.common import EXIT_OK
from agent.errors import UsageError
from agent.model import Profile
from agent.tunnel.cache import CacheSettings
from agent.tunnel.settings import DEFAULT_LISTEN, TunnelConfig

LOG = logging.getLogger(__name__)


def add(sub: common.Sub) -> None:
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
        type=values.upstream,
        metavar="UPSTREAM",
        help="an upstream, in order of preference; repeatable",
    )
    t.add_argument(
        "--listen",
        action="append",
        type=values.listen,
        metavar="ADDR[:PORT]",
        help="where to listen, UDP and TCP (default 127.0.0.153:53); repeatable",
    )
    common.add_profile(t)
    t.add_argument(
        "--no-cleartext-fallback",
        action="store_true",
        help="opportunistic: never fall back to plain DNS over TCP to the same resolvers",
    )
    common.add_pins(t, help="SPKI pin accepted for every upstream (strict); repeatable")
    common.add_ca_file(t)
    t.add_argument(
        "--idle-timeout",
        type=values.positive,
        default=TunnelConfig.idle_timeout,
        metavar="S",
        help="close an idle upstream connection after S seconds (default %(default)s)",
    )
    t.add_argument(
        "--connect-timeout", type=values.positive, default=TunnelConfig.connect_timeout, metavar="S"
    )
    t.add_argument(
        "--query-timeout",
        type=values.positive,
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


def cmd_tunnel(args: argparse.Namespace) -> int:
    logsetup.configure("info")  # in the foreground: where it listens, mode changes, statistics
    pins = frozenset(args.pin)
    profile = Profile(args.profile)
    given = [dataclasses.replace(u, pins=pins) for u in args.upstream]
    specs = lazy.policy.tunnel_order(
        given, profile, cleartext_fallback=not args.no_cleartext_fallback
    )
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
            loop_factory = lazy.uvloop.new_event_loop  # optional
        except ImportError:
            raise UsageError("--loop uvloop: uvloop is not installed (python3-uvloop)") from None
    with lazy.asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_run_tunnel(cfg))
    return EXIT_OK


async def _run_tunnel(cfg: TunnelConfig) -> None:
    tunnel = lazy.forwarder.Tunnel(cfg)
    await tunnel.start()
    print(
        f"dnstls-agent tunnel: listening on {', '.join(f'{h}:{p}' for h, p in tunnel.addresses)}",
        file=sys.stderr,
        flush=True,
    )
    stop = lazy.asyncio.Event()
    loop = lazy.asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(
        signal.SIGUSR1, lambda: LOG.info("statistics: %s", json.dumps(tunnel.status()))
    )
    try:
        await stop.wait()
    finally:
        LOG.info("statistics: %s", json.dumps(tunnel.status()))
        await tunnel.stop()
