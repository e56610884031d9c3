"""Processes the lab starts: started with a known argv, stopped by PID, never by name."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType


class Missing(RuntimeError):
    """A program the lab needs is not installed."""


def need(program: str) -> str:
    path = shutil.which(program) or next(
        (p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{program}", os.X_OK)), None
    )
    if path is None:
        raise Missing(f"{program} is not installed (scripts/dev setup installs it)")
    return path


class Process:
    """A child process with its log file; `stop()` is idempotent."""

    def __init__(
        self, argv: Sequence[str], log: Path, *, env: dict[str, str] | None = None
    ) -> None:
        self.argv = list(argv)
        self.log = log
        self._logf = log.open("ab")
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._logf,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except BaseException:
            self._logf.close()
            raise

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ready():
                return
            if not self.alive():
                self.stop()  # reaped already; closes its log
                raise RuntimeError(
                    f"{what}: process exited ({self.popen.returncode}); log:\n{self.tail()}"
                )
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{what}: not ready after {timeout}s; log:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        self._logf.close()


class Teardown:
    """The steps of a teardown: each is tried whatever the ones before did; `done()` then
    raises the first error (`step(fn)` for a step)."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []

    def __call__(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:
            self.errors.append(exc)

    def done(self) -> None:
        if self.errors:
            raise self.errors[0]


class ClosedOnExit:
    """A lab as a context manager: `close()` at exit; when the test failed, a failing
    teardown is printed, not raised (it would hide the test's own failure)."""

    def close(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        if t is None:
            self.close()
            return
        try:
            self.close()
        except Exception as exc:
            print(f"{self.describe()}: teardown failed: {exc!r}", file=sys.stderr)
