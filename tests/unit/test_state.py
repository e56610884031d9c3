"""agent/state.py: round trip, atomic writes, corrupt files set aside and never fatal."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from agent.model import Auth, Knowledge, Method, Order
from agent.state import FILENAME, State, Store

K = Knowledge(
    "nm:uuid-1", "198.51.100.1", Method.TLS_UPGRADE, Auth.PIN, "PIN=", ("OLD=", "PIN="), 12.5,
    1000.0, 1000.0, 0.0, Order.UPGRADE_FIRST, True, ("port: refused",),
)  # fmt: skip


def test_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    state = State()
    state.remember(K)
    state.orders["nm:uuid-1"] = ["tls-upgrade:198.51.100.1@53"]
    store.save(state)
    again = store.load()
    assert again.knowledge == {K.key: K}
    assert again.orders == state.orders
    assert [p.name for p in (tmp_path / "state").iterdir()] == [FILENAME]  # no temp left


def test_missing_file_is_empty_state(tmp_path: Path) -> None:
    assert Store(tmp_path).load() == State()


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"version": 99}',
        b'{"version": 1, "knowledge": [{"method": "x"}]}',
        b"\xff\xfe",
        b"[]",
    ],
)
def test_corrupt_file_is_set_aside(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / FILENAME).write_bytes(content)
    with caplog.at_level(logging.ERROR):
        state = Store(tmp_path).load()
    assert state == State()
    aside = list(tmp_path.glob(f"{FILENAME}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content  # nothing lost
    assert "starting afresh" in caplog.text
    Store(tmp_path).save(state)  # and a good one replaces it
    assert json.loads((tmp_path / FILENAME).read_text())["version"] == 1


def test_newer_fields_are_ignored(tmp_path: Path) -> None:
    store = Store(tmp_path)
    state = State()
    state.remember(K)
    store.save(state)
    data = json.loads(store.path.read_text())
    data["knowledge"][0]["from_the_future"] = 1
    store.path.write_text(json.dumps(data))
    assert store.load().knowledge[K.key] == K
