"""Fuzzing for longer: the unit tier's targets (tests/unit/test_fuzz_*.py) at bench sizes.

Per parser, for --seconds: how many inputs ran (executions), how many failed with an
undocumented exception or a broken property (crashes, by signature), and how many took
longer than --hang seconds (hangs). A failure with a signature the corpus does not
track as xfail is new: shrunk by hypothesis, and written to tests/fuzz_corpus/<parser>/
(unless --no-write), where tests/unit/test_fuzz_corpus.py replays it and fails until it is
triaged: fixed, or marked with an `# xfail: why` line.

    python bench/fuzz.py [--seconds 5] [--parser NAME ...] [--hang 0.5] [--seed N] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, Phase, Verbosity, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402

from tests.fuzz_corpus import (  # noqa: E402
    Target,
    dump,
    gist,
    known_signatures,
    run_checked,
    signature,
    targets,
    write_case,
)

BATCH = 100  # examples per hypothesis run; a run is cut short once the time is up


class _New(Exception):
    """A failure not seen before: raised so that hypothesis shrinks it."""


@dataclass
class Tally:
    executions: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # signature -> executions
    smallest: dict[str, tuple[int, Any, BaseException]] = field(default_factory=dict)
    slowest: float = 0.0
    shrunk: set[str] = field(default_factory=set)

    @property
    def crashes(self) -> int:
        return sum(n for sig, n in self.failures.items() if sig != "hang")

    def keep(self, sig: str, value: Any, exc: BaseException) -> None:
        size = len(dump(value))
        if sig not in self.smallest or size < self.smallest[sig][0]:
            self.smallest[sig] = (size, value, exc)


def fuzz(target: Target, seconds: float, hang: float, seed: int) -> Tally:
    tally = Tally()
    stop = time.monotonic() + seconds
    batch = 0
    while time.monotonic() < stop:
        with contextlib.suppress(Exception):  # _New after shrinking, or hypothesis' Flaky
            _batch(target, tally, stop, hang, seed + batch)
        batch += 1
    return tally


def _batch(target: Target, tally: Tally, stop: float, hang: float, seed: int) -> None:
    """One hypothesis run of up to BATCH examples; a new failure ends it, shrunk."""
    known = known_signatures(target.name)
    shrinking: list[str] = []

    @settings(
        max_examples=BATCH,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        report_multiple_bugs=False,
    )
    @hypothesis_seed(seed)
    @given(target.strategy(True))
    def run(value: Any) -> None:
        if shrinking:  # only the smallest input is wanted, nothing is counted
            _, exc = run_checked(target, value, hang)
            if exc is not None and signature(exc) == shrinking[0]:
                tally.keep(shrinking[0], value, exc)
                raise _New(shrinking[0])
            return
        if time.monotonic() > stop:
            return
        tally.executions += 1
        elapsed, exc = run_checked(target, value, hang)
        tally.slowest = max(tally.slowest, elapsed)
        if exc is None:
            return
        sig = signature(exc)
        tally.failures[sig] += 1
        tally.keep(sig, value, exc)
        if sig not in known and sig != "hang" and sig not in tally.shrunk:
            tally.shrunk.add(sig)
            shrinking.append(sig)
            raise _New(sig)

    run()


def report(target: Target, tally: Tally, seconds: float, write: bool) -> list[str]:
    rate = tally.executions / seconds if seconds else 0.0
    hangs = tally.failures["hang"]
    lines = [
        f"{target.name:16} executions {tally.executions:8}  ({rate:6.0f}/s)  crashes "
        f"{tally.crashes:4}  hangs {hangs:3}  slowest {tally.slowest * 1000:7.1f} ms"
    ]
    known = known_signatures(target.name)
    for sig, n in sorted(tally.failures.items()):
        _, value, exc = tally.smallest[sig]
        if sig in known:
            lines.append(f"    {n:6} x {sig} (known: an xfail case in the corpus)")
            continue
        where = "not written (--no-write)"
        if write:
            kind = "hang" if sig == "hang" else "violation" if sig.startswith("viol") else "crash"
            headers = {"kind": kind, "signature": sig, "gist": gist(exc), "found": "bench/fuzz.py"}
            where = str(write_case(target.name, value, headers).relative_to(ROOT))
        lines.append(f"    {n:6} x NEW {sig} -> {where}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per parser (default 5)")
    ap.add_argument("--parser", action="append", help="a target (repeat; default: all)")
    ap.add_argument("--hang", type=float, default=0.5, help="seconds for one input (0.5)")
    ap.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    ap.add_argument("--no-write", action="store_true", help="leave the corpus alone")
    ap.add_argument("--list", action="store_true", help="name the parsers and stop")
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)  # the parsers say what they refuse; not here
    all_targets = targets()
    if args.list:
        print("\n".join(all_targets))
        return
    names = [n for arg in args.parser or list(all_targets) for n in arg.split(",")]
    unknown = [n for n in names if n not in all_targets]
    if unknown:
        ap.error(f"unknown parser {', '.join(unknown)}; --list names them")
    seed = random.randrange(1 << 32) if args.seed is None else args.seed
    print(f"fuzzing {len(names)} parsers, {args.seconds:g} s each, hang over {args.hang:g} s, "
          f"--seed {seed}", flush=True)  # fmt: skip
    for name in names:
        target = all_targets[name]
        start = time.monotonic()
        tally = fuzz(target, args.seconds, args.hang, seed)
        print("\n".join(report(target, tally, time.monotonic() - start, not args.no_write)))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
