"""Shared fixtures: certificates, the in-process test peer, and prerequisite checks.

Prerequisites (programs, root) that are missing skip a test on a developer's
machine but fail it under CI=true: CI must never pass by skipping.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Coroutine, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.lab.certs import CA, CertFiles, issue
from tests.lab.netns import SRV_IP6S, SRV_IPS
from tests.lab.proc import Missing, need

T = TypeVar("T")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(reason: str) -> None:
    """Skip locally, fail loudly in CI."""
    if IN_CI:
        pytest.fail(f"prerequisite missing under CI: {reason}")
    pytest.skip(reason)


def require_program(program: str) -> str:
    try:
        return need(program)
    except Missing as exc:
        missing(str(exc))
        raise  # not reached


def require_root() -> None:
    if os.geteuid() != 0:
        missing("needs root (network namespaces)")


@contextlib.contextmanager
def host_untouched(programs: Iterable[str]) -> Iterator[None]:
    """Root and the programs, for a lab with a machine of its own; the host's own
    resolv.conf is the same afterwards."""
    require_root()
    for program in programs:
        require_program(program)
    before = hashlib.sha256(Path("/etc/resolv.conf").read_bytes()).hexdigest()
    yield
    assert hashlib.sha256(Path("/etc/resolv.conf").read_bytes()).hexdigest() == before


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """Run a coroutine on a fresh loop, bounded so that no test can hang."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@dataclass(frozen=True)
class Certs:
    ca: CA
    good: CertFiles  # by `ca`, for 127.0.0.1, ::1 and dns.test
    other_ca: CA
    wrong_ca: CertFiles  # right names, issued by `other_ca`
    expired: CertFiles  # by `ca`, expired yesterday
    self_signed: CertFiles
    no_ip: CertFiles  # by `ca`, names only
    good_lab: CertFiles  # by `ca`, for the namespace lab's server addresses


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d: Path = tmp_path_factory.mktemp("certs")
    ca = CA.create(d / "ca")
    other = CA.create(d / "other", name="some other CA")
    ips = ("127.0.0.1", "::1")
    return Certs(
        ca=ca,
        good=ca.issue(d, "good", ips=ips, names=("dns.test",)),
        other_ca=other,
        wrong_ca=other.issue(d, "wrong-ca", ips=ips, names=("dns.test",)),
        expired=ca.issue(d, "expired", ips=ips, names=("dns.test",), expired=True),
        self_signed=issue(d, "self-signed", ips=ips, names=("dns.test",)),
        no_ip=ca.issue(d, "no-ip", names=("dns.test",)),
        good_lab=ca.issue(d, "good-lab", ips=(*SRV_IPS, *SRV_IP6S), names=("dns.test",)),
    )
