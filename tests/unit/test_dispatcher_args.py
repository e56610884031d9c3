"""dispatcher.d/90-dnstls-agent: the interface name is data, never an option of the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_program
from tests.lab.control import serving
from tests.unit.test_dispatcher import HOOK, run_hook


def test_hook_passes_double_dash_before_the_interface() -> None:
    assert 'notify -- "$1" "$2"' in HOOK.read_text()


@pytest.mark.parametrize("iface", ["-x", "--socket=/tmp/elsewhere", "-h", "--", ""])
def test_an_interface_that_looks_like_an_option_is_passed_as_a_name(
    tmp_path: Path, iface: str
) -> None:
    require_program("timeout")
    got: list[dict[str, Any]] = []

    def handler(request: dict[str, Any]) -> dict[str, Any]:
        got.append(request)
        return {"ok": True}

    with serving(tmp_path / "control.sock", handler):
        proc, _ = run_hook(tmp_path, iface, "up")
    assert proc.returncode == 0, proc.stderr
    assert got == [{"command": "notify", "interface": iface, "action": "up"}]
