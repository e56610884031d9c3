"""Privacy under faults: the fault matrix (tests/lab/faultmatrix.py), printed as a table.

The real agent (`dnstls-agent run`, one per profile column) against the chaos test peer in
network namespaces; per fault row and profile column a cell "cleartext/lost/told": the
client's query names seen in cleartext on the wire (tcpdump on the resolver's side), its
queries left without an answer (or answered SERVFAIL), and whether the agent told (status
warnings or tunnel mode, or its log). `!` marks a cell that breaks the privacy rule: no
cleartext, except under opportunistic with the fallback on after every private path
failed, and then told. As root:

    python bench/fault_matrix.py [--rows slow,tls-dropped] [--columns strict,encrypted]
                                 [--parallel 3] [--keep] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.lab.faultmatrix import COLUMNS, ROWS, Cell, Row, run_matrix  # noqa: E402


def _pick(text: str | None, known: list[str], what: str) -> list[str]:
    if not text:
        return known
    wanted = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return wanted


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", help="comma-separated fault rows (default: all)")
    ap.add_argument("--columns", help="comma-separated profile columns (default: all)")
    ap.add_argument("--parallel", type=int, default=3, help="worlds at a time (default 3)")
    ap.add_argument("--keep", action="store_true", help="keep the worlds' files and logs")
    ap.add_argument("--json", type=Path, help="also write every cell to this file")
    ap.add_argument("--list", action="store_true", help="list the rows and columns, and stop")
    args = ap.parse_args()
    if args.list:
        for r in ROWS:
            print(f"{r.key:22} {r.doc}")
        print("columns:", ", ".join(c.key for c in COLUMNS))
        return
    row_keys = _pick(args.rows, [r.key for r in ROWS], "rows")
    col_keys = _pick(args.columns, [c.key for c in COLUMNS], "columns")
    rows = [r for r in ROWS if r.key in row_keys]
    columns = [c for c in COLUMNS if c.key in col_keys]
    print(f"reproduce: python bench/fault_matrix.py --rows {','.join(row_keys)} "
          f"--columns {','.join(col_keys)} --parallel {args.parallel}   (as root)")  # fmt: skip
    directory = Path(tempfile.mkdtemp(prefix="fault-matrix-"))

    def progress(row: Row, cells: list[Cell], seconds: float) -> None:
        said = "  ".join(f"{c.column}={c.text()}" for c in cells)
        print(f"  {row.key}: {said} ({seconds:.1f} s)", flush=True)

    t0 = time.monotonic()
    try:
        matrix = run_matrix(directory, rows, columns, parallel=args.parallel, on_row=progress)
    finally:
        if args.keep:
            print(f"files and logs kept in {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    print()
    print("cell: names in cleartext / answers lost / user told;  ! breaks the privacy rule")
    print(matrix.table())
    failures = matrix.failures()
    for (row, column), why in failures.items():
        cell = matrix.cell(row, column)
        print(f"! {row} x {column}: {why}; told by: {', '.join(cell.told_by) or 'nothing'}")
    errors = {c.error for c in matrix.cells.values() if c.error}
    for error in sorted(errors):
        print(f"error: {error}")
    if args.json:
        cells = [dataclasses.asdict(c) for c in matrix.cells.values()]
        args.json.write_text(json.dumps({"seconds": matrix.seconds, "cells": cells}, indent=1))
    print(f"whole run {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    main()
