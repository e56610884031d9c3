"""The agent daemon (`dnstls-agent run`) as its own process in a lab namespace."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.lab.netns import Netns
from tests.lab.proc import Process


class AgentProcess:
    def __init__(
        self, ns: Netns, directory: Path, config: str, *, manage_stub: bool = False
    ) -> None:
        """`manage_stub` stays False unless `ns` has a /etc of its own (the NM lab's
        machine): the agent runs as root here and would point the host's stub otherwise."""
        self.ns = ns
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "agent.toml"
        self.config.write_text(
            f'state_dir = "{directory}/state"\nruntime_dir = "{directory}/run"\n'
            # root's journal: beside the state, unless the test puts it elsewhere
            + ("" if "stub_state_dir" in config else f'stub_state_dir = "{directory}/state"\n')
            + f"manage_stub = {'true' if manage_stub else 'false'}\n"
            + config
        )
        argv = [sys.executable, "-m", "agent", "-v", "-c", str(self.config), "run"]
        self.proc: Process = ns.start(argv, directory / "agent.log")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "agent", "-c", str(self.config), *args]
        return self.ns.run(argv, check=False)

    def status(self) -> dict[str, Any] | None:
        out = self.cli("status", "--json")
        return json.loads(out.stdout) if out.returncode == 0 else None

    def wait(
        self, ok: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        end = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < end:
            if not self.proc.alive():
                break
            last = self.status()
            if last is not None and ok(last):
                return last
            time.sleep(0.1)
        raise AssertionError(
            f"agent: not {what} after {timeout}s; status {last}; log:\n{self.proc.tail(40)}"
        )
