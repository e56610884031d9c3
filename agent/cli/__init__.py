"""The `dnstls-agent` command: subcommands, argument parsing, output and exit codes.

One module per group of commands, each with one job:

    common.py   exit statuses, the parser class, the shared arguments (--socket, --json,
                --profile, --pin, --ca-file) and the control socket's path
    values.py   the arguments' value types (an IP address, a port, a pin, seconds, ...)
    lazy.py     the one place for expensive imports (asyncio, the daemon, sysconf, ...)
    probe.py    probe
    tunnel.py   tunnel
    daemon.py   run
    stub.py     restore, stub
    control.py  status, reprobe, flush-caches, log-level, portal, notifications, notify: the
                commands that talk to the running agent, and format_status
    statistics.py  statistics: the running agent's counters, and format_statistics
    query.py    query: one question through the running tunnel, and who answered it
    config.py   config check

Adding a command:

1. Put it in the module of its group. A new group is a new module here, added to GROUPS
   below (whose order is the order of `--help`).
2. A group module has `add(sub)`, which registers its commands, and one
   `cmd_<name>(args) -> int` per command. In `add`:
   `p = sub.add_parser("name", help=..., description=..., parents=[...])`, the command's
   own arguments with `p.add_argument(...)`, then `p.set_defaults(func=cmd_name)`.
3. Shared arguments come from common, defined once:
   `parents=[common.parent(common.add_socket, common.add_json)]` puts them before the
   command's own (argparse's parents always come first); where one must come after,
   call `common.add_json(p)` at that point. A value type goes in values.py.
   A command with actions (`portal allow`, `config check`) gets
   `p.add_subparsers(dest="name_command", metavar="ACTION", required=True,
   parser_class=common.Parser)`.
4. `cmd_name` returns an exit status from common (EXIT_OK, ...) or raises UsageError
   (status 2) or another AgentError (status 3), which main() prints as one line (with
   --json, as {"ok": false, "error": ..., "exit": N} on stdout: common.fail, which a
   command also calls for an error it reports itself). It prints its own output (text, or
   JSON with --json): the rest of the agent never prints. A command that prints takes
   --json.
5. Import at a module's top only what is cheap (agent.config, agent.control, agent.model,
   agent.errors); everything else through lazy (`lazy.asyncio.run(...)`), so that the
   small commands start fast and small.
6. Document it in man/dnstls-agent.8 (a subsection under COMMANDS with every option and
   its default, and a SYNOPSIS line): tests/unit/test_manpages.py walks build_parser().

Names here are the command's interface for the entry points and the tests: keep them.
The core modules are imported under other names (agent_config): importing a submodule
binds its name in this package, so `config` here is always agent.cli.config.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from agent import __version__, logsetup
from agent import config as agent_config
from agent.cli import config, control, daemon, probe, query, statistics, stub, tunnel
from agent.cli.common import (
    EXIT_BAD_REQUEST,
    EXIT_FAILURE,
    EXIT_NOT_PRIVATE,
    EXIT_OK,
    EXIT_USAGE,
    Parser,
    fail,
)
from agent.cli.control import format_status
from agent.cli.probe import format_table
from agent.errors import AgentError, UsageError

__all__ = [
    "EXIT_BAD_REQUEST",
    "EXIT_FAILURE",
    "EXIT_NOT_PRIVATE",
    "EXIT_OK",
    "EXIT_USAGE",
    "GROUPS",
    "build_parser",
    "format_status",
    "format_table",
    "main",
]

# each adds its commands, in order
GROUPS = (probe, tunnel, daemon, stub, control, statistics, query, config)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
        help=f"configuration file (default {agent_config.DEFAULT_FILE}, and FILE.d/*.toml)",
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=Parser
    )
    for group in GROUPS:
        group.add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logsetup.setup(args.verbose)  # the journal under systemd, else plain lines on stderr
    try:
        return int(args.func(args))
    except UsageError as exc:  # one line on stderr; with --json, JSON on stdout (common.fail)
        return fail(args, str(exc), EXIT_USAGE)
    except AgentError as exc:
        return fail(args, str(exc), EXIT_FAILURE)
    except KeyboardInterrupt:
        return 130
