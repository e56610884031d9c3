"""`probe`: DNS over TLS probes of given resolvers, printed as a table or JSON.

The table is printed as it fills: its header first, then each resolver's row (and the lines
that explain it) as soon as that resolver is decided, in fixed-width columns; what was not
private, and the exit status, at the end. JSON is one document, at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence

from agent.cli import common, lazy, values
from agent.cli.common import EXIT_NOT_PRIVATE, EXIT_OK
from agent.model import AuthSpec, Order, ProbeResult, ProbeSettings, Profile

LOG = logging.getLogger(__name__)


def add(sub: common.Sub) -> None:
    p = sub.add_parser(
        "probe",
        help="probe resolvers for DNS over TLS (port 853, then the STARTTLS upgrade)",
        description="Probe each resolver for DNS over TLS: TLS on port 853 and the EDNS0 TO "
        "upgrade on TCP/53, raced happy-eyeballs style. Exit status 0 when every resolver "
        "has a private path the profile accepts, 1 otherwise.",
    )
    p.add_argument(
        "addresses", nargs="+", type=values.ip, metavar="IP", help="resolver address (v4 or v6)"
    )
    common.add_profile(p)
    common.add_pins(p, help="accepted SPKI SHA-256 pin (base64, RFC 7858); repeatable")
    p.add_argument(
        "--auth-name", metavar="NAME", help="name the certificate must carry (sent as SNI)"
    )
    common.add_ca_file(p)
    p.add_argument("--order", choices=[x.value for x in Order], default=Order.PORT_FIRST.value)
    p.add_argument(
        "--timeout",
        type=values.positive,
        default=ProbeSettings.timeout,
        metavar="S",
        help="overall deadline per resolver (default %(default)s)",
    )
    p.add_argument(
        "--connect-timeout",
        type=values.positive,
        default=ProbeSettings.connect_timeout,
        metavar="S",
        help="ceiling for one TCP connect (default %(default)s)",
    )
    p.add_argument(
        "--fallback-delay",
        type=values.positive,
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
    p.add_argument("--tls-port", type=values.port, default=ProbeSettings.tls_port, metavar="PORT")
    p.add_argument("--dns-port", type=values.port, default=ProbeSettings.dns_port, metavar="PORT")
    p.add_argument("--no-resumption", action="store_true", help="skip the session-resumption check")
    p.add_argument(
        "--no-ddr",
        action="store_true",
        help="do not ask for designated resolvers (_dns.resolver.arpa SVCB, RFC 9462)",
    )
    common.add_json(p, help="print JSON instead of a table")
    p.set_defaults(func=cmd_probe)


def cmd_probe(args: argparse.Namespace) -> int:
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
    if args.json:
        results = lazy.asyncio.run(lazy.probe.probe_many(args.addresses, settings))
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        width = _resolver_width(args.addresses)
        print(format_header(width), flush=True)

        def show(r: ProbeResult) -> None:
            print("\n".join(format_rows(r, width)), flush=True)

        results = lazy.asyncio.run(lazy.probe.probe_many(args.addresses, settings, show))
        summary = format_summary(results)
        if summary:
            print("\n".join(summary))
    return EXIT_OK if all(r.acceptable for r in results) else EXIT_NOT_PRIVATE


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}ms"


def _yn(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "no")


# The columns after RESOLVER, each as wide as its widest value ("unreachable", "ip-san",
# "99999.9ms", "TLSv1.3"): fixed, so that rows printed as they come stay aligned. PIN,
# the last, is not padded.
COLUMNS = (
    ("METHOD", 11),
    ("AUTH", 6),
    ("CONNECT", 9),
    ("HANDSHAKE", 9),
    ("ANSWER", 9),
    ("DECIDED", 9),
    ("TLS", 7),
    ("RESUMES", 7),
    ("UDP-TO", 6),
    ("PIN", 0),
)


def _resolver_width(addresses: Sequence[str]) -> int:
    return max([len("RESOLVER"), *map(len, addresses)])


def _line(cells: Sequence[str], width: int) -> str:
    widths = [width, *(w for _, w in COLUMNS)]
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def format_header(width: int) -> str:
    """The table's header; `width`: the RESOLVER column's (the longest address)."""
    return _line(["RESOLVER", *(name for name, _ in COLUMNS)], width)


def format_rows(r: ProbeResult, width: int) -> list[str]:
    """One resolver's row, then what it designated (DDR) and why each failed path failed."""
    cells = [
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
    ]
    lines = [_line(cells, width)]
    lines.extend(f"  {r.address} DDR: {line}" for line in _ddr_lines(r))
    lines.extend(f"  {r.address} {path}: {why}" for path, why in r.failures.items())
    return lines


def format_summary(results: Sequence[ProbeResult]) -> list[str]:
    """The resolvers without a private path, in the order given (the exit status's why)."""
    return [
        f"  {r.address}: no private path acceptable under the {r.profile} profile"
        for r in results
        if not r.acceptable
    ]


def format_table(results: Sequence[ProbeResult]) -> str:
    """The whole table at once, as `probe` prints it row by row."""
    width = _resolver_width([r.address for r in results])
    lines = [format_header(width)]
    for r in results:
        lines.extend(format_rows(r, width))
    return "\n".join([*lines, *format_summary(results)])


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
