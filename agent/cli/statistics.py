"""`statistics`: the running daemon's counters, as compact tables or JSON; --reset zeroes them.

The tunnel's clients, its cache, each upstream (with latency percentiles) and the engine
(probes run, decisions made), counted since the daemon started or the last --reset.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

from agent import control
from agent.cli import common
from agent.cli.common import EXIT_OK

CLIENTS = (  # (heading, key): the tunnel's clients
    ("queries", "queries"),
    ("answered", "answered"),
    ("servfail", "servfail"),
    ("truncated", "truncated"),
    ("malformed", "malformed"),
    ("dropped", "dropped_limit"),
    ("cleartext", "cleartext"),
    ("tcp-clients", "tcp_clients"),
)
CACHE = (  # after hits, misses, the hit ratio, entries and bytes
    ("evictions", "evictions"),
    ("stale", "stale_served"),
    ("prefetches", "prefetches"),
    ("flushes", "flushes"),
)
UPSTREAM = (
    ("queries", "queries"),
    ("answers", "answers"),
    ("failures", "failures"),
    ("reconnects", "reconnects"),
    ("timeouts", "timeouts"),
)


def add(sub: common.Sub) -> None:
    text = "show the running agent's counters: clients, cache, upstreams, probes"
    s = sub.add_parser(
        "statistics",
        help=text,
        description="Show the running agent's counters: the tunnel's clients, its cache, "
        "each upstream (with latency percentiles) and the engine's probes and decisions, "
        "since the daemon started or the last --reset.",
    )
    common.add_json(s)
    s.add_argument(
        "--reset",
        action="store_true",
        help="zero the counters (root, the daemon's user or the group "
        f"{control.ADMIN_GROUP}); shows them as they were",
    )
    common.add_socket(s)
    s.set_defaults(func=cmd_statistics)


def cmd_statistics(args: argparse.Namespace) -> int:
    path = common.socket_path(args)
    if not args.reset:
        answer = control.ask(path, {"command": "statistics"})
        stats = answer["statistics"]
        print(json.dumps(stats, indent=2) if args.json else format_statistics(stats))
        return EXIT_OK
    answer = control.ask(path, {"command": "statistics-reset"})
    if args.json:
        print(json.dumps(answer, indent=2))
        return EXIT_OK
    stats = answer["statistics"]
    print(format_statistics(stats))
    ran = _duration(answer["since"] - stats["since"])
    print(f"\ncounters zeroed at {_clock(answer['since'])}; "
          f"they had counted since {_clock(stats['since'])} ({ran})")  # fmt: skip
    return EXIT_OK


# -- text ------------------------------------------------------------------------------------


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}ms"


def _kib(n: int) -> str:
    return f"{n / 1024:.0f}KiB" if n >= 1024 else f"{n}B"


LABEL = len("UPSTREAMS")  # the first column of every table: the groups' labels align


def _table(rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """Columns as wide as their widest cell: the first `left` left-aligned (text), the
    others right-aligned (numbers)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    widths[0] = max(widths[0], LABEL)
    return [
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def _group(label: str, heads: Sequence[str], values: Sequence[str]) -> list[str]:
    """One group of counters: a row of headings and a row of values, under one label."""
    return _table([[label, *heads], ["", *values]])


def format_statistics(st: dict[str, Any]) -> str:
    """The daemon's statistics answer as text, for people (`statistics` without --json)."""
    since = st.get("since")
    lines = []
    if since is not None:
        ago = f" ({_duration(st.get('now', time.time()) - since)})"
        lines.append(f"counting since {_clock(since)}{ago}")
    clients = st.get("clients") or {}
    lines += _group(
        "CLIENTS", [h for h, _ in CLIENTS], [str(clients.get(k, 0)) for _, k in CLIENTS]
    )
    cache = st.get("cache")
    if cache:
        hits, misses = cache.get("hits", 0), cache.get("misses", 0)
        ratio = f"{100 * hits / (hits + misses):.0f}%" if hits + misses else "-"
        heads = ["hits", "misses", "hit-ratio", "entries", "bytes", *(h for h, _ in CACHE)]
        values = [str(hits), str(misses), ratio, str(cache.get("entries", 0))]
        values += [_kib(cache.get("bytes", 0)), *(str(cache.get(k, 0)) for _, k in CACHE)]
        lines += _group("CACHE", heads, values)
    else:
        lines.append("CACHE".ljust(LABEL) + "  off")
    engine = st.get("engine") or {}
    lines += _group(
        "ENGINE", ["probes", "decisions"], [str(engine.get(k, 0)) for k in ("probes", "decisions")]
    )
    ups = st.get("upstreams") or []
    if not ups:
        lines.append("UPSTREAMS  none")
        return "\n".join(lines)
    rows = [["UPSTREAM", "STATE", *(h for h, _ in UPSTREAM), "p50", "p90", "p99"]]
    for up in ups:
        rows.append([
            str(up.get("upstream")),
            str(up.get("state", "-")),
            *(str(up.get(k, 0)) for _, k in UPSTREAM),
            *(_ms(up.get(p)) for p in ("p50_ms", "p90_ms", "p99_ms")),
        ])  # fmt: skip
    lines += _table(rows, left=2)
    return "\n".join(lines)
