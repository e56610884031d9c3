"""Desktop notifications over a real session bus (dbus-daemon). The notification daemon is
python-dbusmock's template: a real one (GNOME's, dunst) needs a display, which this machine
has not - the only mock here, and it records what a desktop would have shown."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.notifications import DesktopNotifier
from tests.conftest import missing, require_program, run
from tests.lab.control import serving
from tests.lab.netns import REPO
from tests.lab.proc import Process

pytestmark = pytest.mark.integration
NAME = "org.freedesktop.Notifications"


def has_owner(address: str) -> bool:
    out = subprocess.run(
        ["dbus-send", f"--bus={address}", "--print-reply", "--dest=org.freedesktop.DBus",
         "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner", f"string:{NAME}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return "boolean true" in out.stdout


@pytest.fixture
def session(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    daemon = require_program("dbus-daemon")
    require_program("dbus-send")
    if importlib.util.find_spec("dbusmock") is None:
        missing("python3-dbusmock is not installed (scripts/dev setup installs it)")
    address = f"unix:path={tmp_path}/bus"
    bus = Process([daemon, "--session", "--nofork", f"--address={address}"], tmp_path / "bus.log")
    log = tmp_path / "notifications.log"
    env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": address}
    argv = [
        sys.executable,
        "-m",
        "dbusmock",
        "--session",
        "-t",
        "notification_daemon",
        "-l",
        str(log),
    ]
    mock: Process | None = None
    try:
        bus.wait_until((tmp_path / "bus").exists, 5, "session bus")
        mock = Process(argv, tmp_path / "mock.log", env=env)
        mock.wait_until(functools.partial(has_owner, address), 10, "notification daemon")
        yield address, log
    finally:
        if mock is not None:
            mock.stop()
        bus.stop()


def test_notifier_shows_and_never_fails(session: tuple[str, Path], tmp_path: Path) -> None:
    address, log = session

    async def go() -> tuple[bool, bool]:
        shown = DesktopNotifier(address)
        ok = await shown.notify("no-private-dns", "no private resolver on wlan0")
        shown.close()
        nobody = await DesktopNotifier(f"unix:path={tmp_path}/nothing").notify("downgrade", "x")
        return ok, nobody

    ok, nobody = run(go())
    assert ok and not nobody
    text = log.read_text()
    assert "Notify" in text and "No private DNS" in text and "no private resolver on wlan0" in text


def test_relay_command_shows_the_agents_new_warnings(
    session: tuple[str, Path], tmp_path: Path
) -> None:
    address, log = session
    text = "captive portal on wlan0: no DNS"

    def handler(request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "status": {"warnings": [{"alert": "portal-blocked", "text": text}]}}

    with serving(tmp_path / "control.sock", handler):
        env = {**os.environ, "PYTHONPATH": str(REPO), "DBUS_SESSION_BUS_ADDRESS": address}
        sock = str(tmp_path / "control.sock")
        argv = [sys.executable, "-m", "agent", "notifications", "--once", "--socket", sock]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=20, check=False)
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + 5
        while text not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "Captive portal: DNS blocked" in log.read_text() and text in log.read_text()
