"""The D-Bus seam (agent/dbus.py): the library is chosen there and imported nowhere else.

The choice itself is a pure function; that the import follows it is checked in a fresh
interpreter per library (the test session has already imported one), skipped when that
library is not installed: the default world has dbus-next only.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import dbus
from tests.conftest import missing

ROOT = Path(__file__).resolve().parents[2]
LIBRARIES = {"dbus-next": "dbus_next", "dbus-fast": "dbus_fast"}
NAMES = (
    "MessageBus",
    "BusType",
    "MessageType",
    "Message",
    "Variant",
    "RequestNameReply",
    "AuthError",
    "InvalidAddressError",
    "InvalidMessageError",
)


@pytest.mark.parametrize(
    ("env", "installed", "expected"),
    [
        ({}, ("dbus_next", "dbus_fast"), "dbus-next"),
        ({}, ("dbus_next",), "dbus-next"),
        ({}, ("dbus_fast",), "dbus-fast"),
        ({}, (), "dbus-next"),  # the dependency; its import then says it is missing
        ({dbus.ENV: "dbus-fast"}, ("dbus_next", "dbus_fast"), "dbus-fast"),
        ({dbus.ENV: "dbus-next"}, ("dbus_fast",), "dbus-next"),
        ({dbus.ENV: " DBUS-FAST "}, ("dbus_next",), "dbus-fast"),
        ({dbus.ENV: ""}, ("dbus_next", "dbus_fast"), "dbus-next"),
    ],
)
def test_choice(env: dict[str, str], installed: tuple[str, ...], expected: str) -> None:
    assert dbus.choose(env, lambda module: module in installed) == expected


def test_unknown_library_is_refused_by_name() -> None:
    refused = r"DNSTLS_AGENT_DBUS='dbus-python'.*dbus-next or dbus-fast"
    with pytest.raises(ImportError, match=refused):
        dbus.choose({dbus.ENV: "dbus-python"}, lambda module: True)


@pytest.mark.parametrize("library", sorted(LIBRARIES))
def test_import_follows_the_choice(library: str) -> None:
    module = LIBRARIES[library]
    if importlib.util.find_spec(module) is None:
        missing(f"{library} is not installed (python3-{library}); nothing to choose")
    probe = (
        "import json, agent.dbus as d;"
        f"print(json.dumps([d.IMPLEMENTATION] + [getattr(d, n).__module__ for n in {NAMES!r}]))"
    )
    env = {**os.environ, dbus.ENV: library}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    chosen, *modules = json.loads(out)
    assert chosen == library
    assert all(m.split(".")[0] == module for m in modules), dict(zip(NAMES, modules, strict=True))


def _imported(node: ast.AST) -> list[str]:
    """The modules one node imports, by statement or by importlib."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        return [node.module] if node.module and not node.level else []
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


def _dbus_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(ROOT)
    return [f"{where}: {name}" for node in ast.walk(tree) for name in _imported(node)
            if name.split(".")[0] in LIBRARIES.values()]  # fmt: skip


def test_only_the_seam_imports_a_dbus_library() -> None:
    seam = ROOT / "agent" / "dbus.py"
    sources = [
        p
        for p in ROOT.rglob("*.py")
        if not any(
            part.startswith(".") or part in ("build", "dist") for part in p.relative_to(ROOT).parts
        )
    ]
    assert seam in sources
    offenders = [hit for p in sources if p != seam for hit in _dbus_imports(p)]
    assert not offenders, "import D-Bus names from agent.dbus instead:\n" + "\n".join(offenders)
    assert _dbus_imports(seam)  # the walk does see imports where there are some
