"""The fuzzing corpus (tests/fuzz_corpus/<target>/*.txt): every input that once failed,
replayed through its target's check. A case whose fix is still owed is a strict xfail
(its `# xfail:` line): when the fix lands it passes, and this test fails until the line
goes. A hang is replayed in a child process, killed at the bound."""

from __future__ import annotations

import pytest

from tests.fuzz_corpus import HANG_SECONDS, Case, bounded, cases, in_child, load, targets

HANG_REPLAY = 1.0  # seconds; the hangs kept take many times that


def _param(case: Case) -> object:
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=f"{case.target}/{case.path.stem}", marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in cases()])
def test_replay(case: Case) -> None:
    target = targets()[case.target]
    value = case.value
    if case.headers.get("kind") == "hang":
        report = in_child(lambda: target.check(value), HANG_REPLAY)
        if report is not None:
            pytest.fail(f"{case.path.name}: {report}", pytrace=False)
        return
    with bounded(HANG_SECONDS * 5):
        target.check(value)


def test_every_case_names_a_target_and_a_signature() -> None:
    for case in cases():
        assert case.target in targets(), case.path
        assert case.headers.get("signature") and case.headers.get("kind"), case.path
        load(case.text)
