"""Hostile input never stops the agent: the hostile-upstream matrix (tests/lab/hostile.py),
printed as a table.

One `dnstls-agent tunnel --profile strict --query-timeout 2` on loopback against the test
peer, switched through one misbehaviour per row; per row a client sends 40 queries over 2 s.
Columns: answered, SERVFAIL, other rcodes, none/late (past the deadline), the tunnel's CPU
seconds over the row, and seconds from the fault going off to an answer. `!` marks a row
that breaks a rule (late/none, CPU >= 1 s, no recovery within 8 s). No root needed:

    python bench/hostile_upstreams.py [--rows echo,stall-tls] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.lab.hostile import ROWS, Result, run_matrix, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", help="comma-separated rows (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the world's files and logs")
    ap.add_argument("--list", action="store_true", help="list the rows, and stop")
    args = ap.parse_args()
    if args.list:
        for r in ROWS:
            print(f"{r.key:24} {r.doc}")
        return
    rows = list(ROWS)
    if args.rows:
        wanted = [w.strip() for w in args.rows.split(",") if w.strip()]
        unknown = sorted(set(wanted) - {r.key for r in ROWS})
        if unknown:
            raise SystemExit(f"unknown rows: {', '.join(unknown)}")
        rows = [r for r in ROWS if r.key in wanted]
    directory = Path(tempfile.mkdtemp(prefix="hostile-"))

    def progress(res: Result) -> None:
        print(f"  {res.row}: {res.seconds:.1f} s", flush=True)

    t0 = time.monotonic()
    try:
        results = run_matrix(directory, rows, on_row=progress)
    finally:
        if args.keep:
            print(f"files and logs kept in {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    print()
    print(table(results))
    for res in results:
        for why in res.failures():
            print(f"! {res.row}: {why}")
    print(f"whole run {time.monotonic() - t0:.1f} s")
    if any(res.failures() for res in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
