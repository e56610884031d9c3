"""dispatcher.d/90-dnstls-agent, run the way NetworkManager runs it: agent up, agent down."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import require_program
from tests.lab.control import serving
from tests.lab.netns import REPO

HOOK = REPO / "dispatcher.d" / "90-dnstls-agent"
NM_ENV = {  # what nm-dispatcher sets (a subset), and the small PATH it runs hooks with
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "CONNECTION_ID": "Wired connection 1",
    "CONNECTION_UUID": "5e3f0c1a-7d52-4c51-9a39-6e6d6c616231",
    "DEVICE_IFACE": "eth0",
    "IP4_NAMESERVERS": "198.51.100.1",
    "NM_DISPATCHER_ACTION": "up",
}


def run_hook(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    config = tmp / "agent.toml"
    config.write_text(f'runtime_dir = "{tmp}"\n')
    agent = f"{sys.executable} -m agent -c {config}"
    env = {**NM_ENV, "PYTHONPATH": str(REPO), "DNSTLS_AGENT": agent}
    hook = ["/bin/sh", str(HOOK), *args]
    t0 = time.monotonic()
    proc = subprocess.run(hook, env=env, capture_output=True, text=True, timeout=10, check=False)
    return proc, time.monotonic() - t0


def test_hook_pokes_a_running_agent(tmp_path: Path) -> None:
    require_program("timeout")
    got: list[dict[str, Any]] = []

    def handler(request: dict[str, Any]) -> dict[str, Any]:
        got.append(request)
        return {"ok": True}

    with serving(tmp_path / "control.sock", handler):
        proc, _ = run_hook(tmp_path, "eth0", "dhcp4-change")
        assert proc.returncode == 0, proc.stderr
        assert got == [{"command": "notify", "interface": "eth0", "action": "dhcp4-change"}]
        proc, _ = run_hook(tmp_path, "eth0", "pre-up")  # not an event the agent needs
        assert proc.returncode == 0 and len(got) == 1


def test_hook_never_fails_without_the_agent(tmp_path: Path) -> None:
    proc, took = run_hook(tmp_path, "eth0", "up")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    assert took < 3
    env = {**NM_ENV, "DNSTLS_AGENT": "/nonexistent/dnstls-agent"}
    hook = ["/bin/sh", str(HOOK), "eth0", "up"]
    gone = subprocess.run(hook, env=env, capture_output=True, timeout=10, check=False)
    assert gone.returncode == 0  # not even installed: still no failure for NM


def test_hook_is_executable_sh() -> None:
    assert os.access(HOOK, os.X_OK)
    assert HOOK.read_text().startswith("#!/bin/sh\n")
    require_program("sh")
    assert subprocess.run(["sh", "-n", str(HOOK)], check=False).returncode == 0
