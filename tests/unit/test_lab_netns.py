"""tests/lab/netns.py: a namespace is made whole or not at all (no root: `ip` is simulated).

One failed run once left 47 namespaces behind: `ip netns add` had worked, bringing lo up
had not, and nobody held the half-made Netns to delete it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Any

import pytest

from tests.lab import netns
from tests.lab.proc import Process


class FakeIp:
    """`ip` as the lab calls it: run_ip (checked) and subprocess.run (delete's, unchecked)."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        self.calls: list[tuple[str, ...]] = []

    def run_ip(self, *args: str) -> None:
        self.calls.append(args)
        if self.fail_on is not None and self.fail_on in args:
            raise RuntimeError(f"ip {' '.join(args)}: RTNETLINK answers: Operation not permitted")

    def run(self, argv: Sequence[str], **_kw: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(tuple(argv[1:]))
        return subprocess.CompletedProcess(list(argv), 0, "", "")


@pytest.fixture
def ip(monkeypatch: pytest.MonkeyPatch) -> FakeIp:
    fake = FakeIp()
    monkeypatch.setattr(netns, "run_ip", fake.run_ip)
    monkeypatch.setattr(netns, "need", lambda program: program)
    monkeypatch.setattr(subprocess, "run", fake.run)  # the module netns.delete calls
    return fake


def test_a_half_made_namespace_is_deleted(ip: FakeIp) -> None:
    ip.fail_on = "lo"
    with pytest.raises(RuntimeError, match="Operation not permitted"):
        netns.Netns("dta-half")
    assert ip.calls == [
        ("netns", "add", "dta-half"),
        ("-n", "dta-half", "link", "set", "lo", "up"),
        ("netns", "del", "dta-half"),
    ]


def test_nothing_is_deleted_that_was_not_made(ip: FakeIp) -> None:
    ip.fail_on = "add"  # e.g. the name exists already: it is someone else's
    with pytest.raises(RuntimeError):
        netns.Netns("dta-taken")
    assert ip.calls == [("netns", "add", "dta-taken")]


def test_a_whole_namespace_is_kept_until_deleted(ip: FakeIp) -> None:
    ns = netns.Netns("dta-whole")
    assert len(ip.calls) == 2
    ns.delete()
    assert ip.calls == [
        ("netns", "add", "dta-whole"),
        ("-n", "dta-whole", "link", "set", "lo", "up"),
        ("netns", "del", "dta-whole"),
    ]


class Stuck:
    def stop(self) -> None:
        raise subprocess.TimeoutExpired(["stuck"], 5)


def test_the_namespace_goes_even_when_a_process_will_not_stop(ip: FakeIp) -> None:
    ns = netns.Netns("dta-stuck")
    stuck: Any = Stuck()
    processes: list[Process] = [stuck]
    ns.processes = processes
    with pytest.raises(subprocess.TimeoutExpired):
        ns.delete()
    assert ip.calls[-1] == ("netns", "del", "dta-stuck")
