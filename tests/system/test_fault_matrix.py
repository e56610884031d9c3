"""Privacy holds under faults: the fault matrix (tests/lab/faultmatrix.py) run once, one test per
cell (fault row x profile column).

The rules: no query name in cleartext on the wire under strict, encrypted and opportunistic
without cleartext_fallback, in any row; under opportunistic with the fallback, cleartext only
in a row where every private path failed (tls-dropped), and then the user is told. While a
private path works, a fault costs (almost) no answer; where none does, the user is told.
The healthy row loses no answer at all (the harness works). `python bench/fault_matrix.py` prints
the same matrix as a table.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import require_program, require_root
from tests.lab.faultmatrix import COLUMNS, ROWS, Column, Matrix, Row, run_matrix, verdict

pytestmark = pytest.mark.system

# Cells that break the rules on today's code, because of known bugs: none. A cell put here
# gets strict=True: an xfail that passes fails the run, so none is forgotten.
KNOWN: dict[tuple[str, str], str] = {}


def _cells() -> list[object]:
    out: list[object] = []
    for row in ROWS:
        for column in COLUMNS:
            why = KNOWN.get((row.key, column.key))
            marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
            out.append(pytest.param(row, column, marks=marks, id=f"{row.key}-{column.key}"))
    return out


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Matrix:
    require_root()
    for program in ("ip", "tcpdump"):
        require_program(program)
    directory: Path = tmp_path_factory.mktemp("fault-matrix")
    m = run_matrix(directory)
    print("\n" + m.table())
    return m


@pytest.mark.parametrize(("row", "column"), _cells())
def test_privacy_under_fault(matrix: Matrix, row: Row, column: Column) -> None:
    cell = matrix.cell(row.key, column.key)
    why = verdict(row, column, cell)
    assert why is None, f"{row.key} x {column.key} ({row.doc}): {why}; cell {cell}"


def test_matrix_is_bounded(matrix: Matrix) -> None:
    """Each row aims at under 15 s (the table shows each); the whole must stay well under 4
    minutes even on a loaded machine."""
    assert matrix.seconds < 240, f"the matrix took {matrix.seconds:.0f} s: {matrix.row_seconds}"
