"""What every command module shares: exit statuses, the parser class, shared arguments.

A shared argument is defined once, as an `add_*` function that adds it to a parser where
it is called. `parent(add_socket, add_json)` turns such functions into an argparse parent
for `sub.add_parser(..., parents=[...])`; argparse puts a parent's arguments before the
command's own (in the usage line and in --help), so where a shared argument comes after
the command's own, call its `add_*` function at that point instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from agent import config
from agent.cli import values
from agent.control import SOCKET_NAME
from agent.model import Profile

EXIT_OK = 0
EXIT_NOT_PRIVATE = 1  # probe: some resolver has no private path the profile accepts
EXIT_BAD_REQUEST = 1  # stub --refresh: the daemon's request is not usable
EXIT_USAGE = 2
EXIT_FAILURE = 3  # anything else that stopped the command

Sub = Any  # argparse's subparsers action has no public type
Adder = Callable[[argparse.ArgumentParser], object]


class Parser(argparse.ArgumentParser):
    """Argument errors as one clear line (and exit status 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see --help)\n")


def parent(*adders: Adder) -> argparse.ArgumentParser:
    """The adders' arguments as a parent parser, for `parents=[...]` (they come first)."""
    p = argparse.ArgumentParser(add_help=False)
    for add in adders:
        add(p)
    return p


def add_socket(p: argparse.ArgumentParser) -> None:
    """--socket: the running agent's control socket (see socket_path)."""
    p.add_argument(
        "--socket", type=Path, metavar="PATH", help="control socket (default from config)"
    )


def add_json(p: argparse.ArgumentParser, help: str = "print JSON") -> None:
    """--json: the output as JSON on stdout, errors too (see fail)."""
    p.add_argument("--json", action="store_true", help=help)


def fail(args: argparse.Namespace, error: str, status: int, **extra: object) -> int:
    """An error as the command reports it: one line on stderr, or with --json a JSON object
    on stdout ({"ok": false, "error": ..., "exit": status} and `extra`); returns `status`."""
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": error, **extra, "exit": status}))
    else:
        print(f"dnstls-agent: {error}", file=sys.stderr)
    return status


def add_profile(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile", choices=[x.value for x in Profile], default=Profile.OPPORTUNISTIC.value
    )


def add_pins(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument(
        "--pin",
        action="append",
        type=values.pin,
        default=[],
        metavar="SHA256B64",
        help=help,
    )


def add_ca_file(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ca-file",
        type=values.readable_file,
        metavar="FILE",
        help="CA bundle (default: the system's)",
    )


def socket_path(args: argparse.Namespace) -> Path:
    """--socket, or the control socket in the configuration's runtime directory."""
    if args.socket:
        return Path(args.socket)
    try:
        runtime = config.load(args.config).runtime_dir
    except config.ConfigError:
        runtime = config.Config().runtime_dir
    return Path(runtime) / SOCKET_NAME
