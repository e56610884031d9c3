"""Hostile input never stops the agent: the hostile-upstream matrix (tests/lab/hostile.py)
run once, one test per row.

One `dnstls-agent tunnel --profile strict --query-timeout 2` against the test peer switched
through garbage frames, wrong IDs, echoed queries, huge length prefixes, closes, close_notify
and resets with queries in flight, and a TLS port that never handshakes. Per row: every
client query gets an answer or SERVFAIL within the deadline, the tunnel's CPU time stays
bounded, and it answers again soon after the fault goes off. `python
bench/hostile_upstreams.py` prints the same matrix as a table.
"""

from __future__ import annotations

import time

import pytest

from tests.lab.hostile import ROWS, Result, Row, run_matrix, table

pytestmark = pytest.mark.system

# Rows that fail on today's code because of known tunnel bugs: none. A row put here gets
# strict=True: an xfail that passes fails the run, so none is forgotten.
KNOWN: dict[str, str] = {}


def _rows() -> list[object]:
    return [
        pytest.param(
            row,
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN[row.key])]
            if row.key in KNOWN
            else [],
            id=row.key,
        )
        for row in ROWS
    ]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Result], float]:
    t0 = time.monotonic()
    results = run_matrix(tmp_path_factory.mktemp("hostile"))
    seconds = time.monotonic() - t0
    print("\n" + table(results) + f"\n({seconds:.1f} s)")
    return {r.row: r for r in results}, seconds


@pytest.mark.parametrize("row", _rows())
def test_hostile_upstream(matrix: tuple[dict[str, Result], float], row: Row) -> None:
    result = matrix[0][row.key]
    assert not result.failures(), f"{row.key} ({row.doc}): {result.failures()}; {result}"


def test_matrix_is_bounded(matrix: tuple[dict[str, Result], float]) -> None:
    assert matrix[1] < 90, f"the hostile matrix took {matrix[1]:.0f} s"
