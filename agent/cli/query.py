"""`query`: one question through the running agent's tunnel, and who answered it, how.

Like `resolvectl query`: the records, then which upstream answered (its method and how
it was authenticated, as the agent learnt it), or that the tunnel's cache did, and how
long it took. The agent checks the name and the type; this module only asks and prints.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent import control
from agent.cli import common
from agent.cli.common import EXIT_OK

EXIT_NO_ANSWER = 1  # NXDOMAIN, NODATA, SERVFAIL or another error rcode: said which
# The agent answers at its query deadline at the latest (query_timeout: at most 30 s).
ASK_TIMEOUT = 35.0

NEGATIVE = {
    "NXDOMAIN": "no such name",
    "SERVFAIL": "no upstream could answer",
    "REFUSED": "refused",
    "FORMERR": "the question was refused as malformed",
}


def add(sub: common.Sub) -> None:
    q = sub.add_parser(
        "query",
        help="ask a name through the running agent's tunnel; show who answered and how",
        description="Ask one question the way the machine's clients do: through the running "
        "agent's tunnel, its cache, split-DNS routes and order. Shows the answer, the upstream "
        "that gave it (method, and how it was authenticated) or the tunnel's cache, and how "
        "long it took. Exit status 1 on NXDOMAIN, NODATA or SERVFAIL.",
        parents=[common.parent(common.add_socket, common.add_json)],
    )
    q.add_argument("name", metavar="NAME", help="the name to ask for (always absolute)")
    q.add_argument(
        "type",
        metavar="TYPE",
        nargs="?",
        default="A",
        help="record type: A, AAAA, MX, TXT, TYPE65 ... (default %(default)s)",
    )
    q.set_defaults(func=cmd_query)


def cmd_query(args: argparse.Namespace) -> int:
    request = {"command": "query", "name": args.name, "type": args.type}
    answer = control.ask(common.socket_path(args), request, timeout=ASK_TIMEOUT)
    answer.pop("ok", None)
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(format_answer(answer))
    return EXIT_OK if answered(answer) else EXIT_NO_ANSWER


def answered(answer: dict[str, Any]) -> bool:
    return answer.get("rcode") == "NOERROR" and bool(answer.get("answer"))


def format_answer(a: dict[str, Any]) -> str:
    """The agent's answer to `query` as text, for people."""
    name = str(a.get("name", "")).rstrip(".") or "."
    lines = _records(a.get("answer") or [])
    rcode = a.get("rcode")
    if rcode == "NOERROR" and not lines:
        lines = [f"{name}: NODATA (the name has no {a.get('type')} record)"]
    elif rcode != "NOERROR":
        why = NEGATIVE.get(str(rcode))
        lines = [f"{name}: {rcode}" + (f" ({why})" if why else "")]
    ms = float(a.get("ms") or 0)
    took = f"in {ms:.1f} ms" if ms >= 1 else f"in {ms:.2f} ms"  # a cache hit: a few µs
    if a.get("upstream"):
        lines.append(f"-- answered by {a['upstream']} ({_how(a)})")
        where = f"; resolver of {a['interface']}" if a.get("interface") else ""
        where += f" ({a['origin']})" if where and a.get("origin") else ""
        lines.append(f"   {took}{where}")
    elif a.get("from_cache"):
        lines.append(f"-- from the tunnel's cache {took}")
    else:
        lines.append(f"-- made by the tunnel: no upstream gave an answer {took}")
    return "\n".join(lines)


def _records(records: list[str]) -> list[str]:
    """`OWNER TTL CLASS TYPE DATA` lines: addresses as `owner: address` (a name's further
    addresses aligned under its first), anything else as `owner CLASS TYPE DATA`."""
    out: list[str] = []
    last = ""
    for text in records:
        owner, _ttl, rclass, rtype, data = (text.split(None, 4) + [""] * 5)[:5]
        owner = owner.rstrip(".") or "."
        if rtype in ("A", "AAAA"):
            head = f"{owner}:" if owner != last else " " * (len(owner) + 1)
            out.append(f"{head} {data}")
            last = owner
        else:
            out.append(f"{owner} {rclass} {rtype} {data}")
            last = ""
    return out


def _how(a: dict[str, Any]) -> str:
    method = a.get("method") or "unknown method"
    if method in ("tcp-plain", "udp-plain"):
        return f"{method}, cleartext"
    auth = a.get("auth")
    if auth is None:
        return f"{method}, authentication not known"
    if auth == "none":
        return f"{method}, not authenticated"
    source = f", {a['auth_source']}" if a.get("auth_source") else ""
    return f"{method}, authenticated by {auth}{source}"
