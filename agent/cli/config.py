"""`config check`: validate a configuration file and its drop-ins, one line per problem."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent import config
from agent.cli import common
from agent.cli.common import EXIT_OK, EXIT_USAGE, Parser


def add(sub: common.Sub) -> None:
    c = sub.add_parser("config", help="work with the configuration file")
    csub = c.add_subparsers(
        dest="config_command", metavar="ACTION", required=True, parser_class=Parser
    )
    check = csub.add_parser(
        "check",
        help="check a configuration file and its drop-ins; report every problem",
        description="Exit status 0 when FILE (default /etc/dnstls-agent/agent.toml) and the "
        "files in FILE.d/ are valid, 2 otherwise, with one line per problem: file:line: key: "
        "what is wrong.",
    )
    check.add_argument("file", nargs="?", type=Path, default=None, metavar="FILE")
    common.add_json(check, help="print JSON: the files, or every problem")
    check.set_defaults(func=cmd_config_check)


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        cfg = config.load(args.file or args.config or config.DEFAULT_FILE, missing_ok=False)
    except config.ConfigError as exc:
        if args.json:
            problems = [str(p) for p in exc.problems]
            n = len(problems)
            error = f"the configuration has {n} problem{'s' * (n != 1)}"
            return common.fail(args, error, EXIT_USAGE, problems=problems)
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    rules = len(cfg.interfaces)
    if args.json:
        print(json.dumps({"ok": True, "files": list(cfg.files), "interfaces": rules}))
        return EXIT_OK
    print(f"{', '.join(cfg.files)}: valid ({rules} interface section{'s' * (rules != 1)})")
    return EXIT_OK
