"""`run`: the daemon in the foreground (the systemd unit's ExecStart)."""

from __future__ import annotations

import argparse
import sys

from agent import config
from agent.cli import common, lazy
from agent.cli.common import EXIT_FAILURE, EXIT_OK


def add(sub: common.Sub) -> None:
    r = sub.add_parser(
        "run",
        help="run the agent: follow the network, probe, keep the tunnel's order (foreground)",
        description="The daemon. Follows NetworkManager (D-Bus), the kernel (netlink) and DHCP "
        "lease files, probes the resolvers they name, and hands the tunnel the preferred "
        "order. READY=1 to systemd after the first decision; SIGHUP reloads the "
        "configuration; SIGTERM stops.",
    )
    r.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = config.load_or_explain(args.config)
    failure = lazy.asyncio.run(lazy.daemon.run(cfg, args.config))
    if failure:
        print(f"dnstls-agent: {failure}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
