"""agent/state.py: round trip, atomic writes, corrupt files set aside and never fatal."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from agent.model import Auth, Designation, Knowledge, Method, Order
from agent.state import FIELDS, FILENAME, MAX_BYTES, MAX_ENTRIES, State, Store, _encode

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


def _entry(**kw: object) -> dict[str, object]:
    e = _encode(K)
    e.update(kw)
    return e


def _file(*entries: object, **kw: object) -> bytes:
    return json.dumps({"version": 1, "knowledge": list(entries), **kw}).encode()


@pytest.mark.parametrize(
    "content",
    [
        _file(_entry(probed_at="x")),  # a string where a number goes: the sort at save died
        b"[" * 100_000 + b"]" * 100_000,  # deeper than json.loads can go (RecursionError)
        b'{"version": 1, "knowledge": ' + b"[" * 50 + b"]" * 50 + b"}",  # deep, but parses
        _file(_entry(probed_at=None)),  # null where a number goes
        _file(_entry(latency_ms=1e999)),  # not finite (json.loads makes it inf)
        b'{"version": 1, "knowledge": [{"network": "n", "address": "a", "probed_at": NaN}]}',
        _file(_entry(failures=["x" * 100_000])),  # a huge string
        _file(_entry(network="n" * 100_000)),
        _file(_entry(pins_seen={"a": 1})),  # a dict where a list goes
        _file(_entry(failures="port: refused")),  # a string where a list goes
        _file(_entry(pin_stable=True)),  # a boolean where a number goes
        _file(_entry(pin_stable=1.5)),
        _file(_entry(resumption="yes")),
        _file(_entry(auth="superb")),  # an enum value nobody knows
        _file(_entry(path_first=3)),
        _file(_entry(suspect=None)),
        _file(["not", "a", "dict"]),  # a list where a dict goes
        _file(_entry(), orders=["a list where a dict goes"]),
        _file(_entry(), orders={"net": "not a list"}),
        _file(_entry(), orders={"net": [1, 2]}),
        b'{"version": 1, "knowledge": {"a": 1}}',  # a dict where a list goes
        _file(_entry(designated=[{"address": "not an address"}])),
        _file(_entry(designated=[{"address": "198.51.100.9", "port": 0}])),
        _file(_entry(designated=[{"address": "198.51.100.9", "verified": "yes"}])),
        _file(_entry(designated=[{"port": 853}])),
        _file(_entry(designated=[{"address": "198.51.100.9"}] * 17)),
        _file(_entry(tls_port=70000)),
    ],
    ids=lambda c: c[:40].decode(errors="replace"),
)
def test_any_content_that_does_not_load_is_set_aside(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / FILENAME).write_bytes(content)
    with caplog.at_level(logging.ERROR):
        state = Store(tmp_path).load()
    assert state == State()
    (aside,) = tmp_path.glob(f"{FILENAME}.corrupt-*")
    assert aside.read_bytes() == content
    assert "starting afresh" in caplog.text
    state.remember(K)
    Store(tmp_path).save(state)  # a later save works, and loads
    assert Store(tmp_path).load().knowledge == {K.key: K}


def test_a_file_over_the_size_limit_is_set_aside_unread(tmp_path: Path) -> None:
    with (tmp_path / FILENAME).open("wb") as f:
        f.truncate(MAX_BYTES + 1)  # sparse: nothing to write, nothing read
    assert Store(tmp_path).load() == State()
    assert len(list(tmp_path.glob(f"{FILENAME}.corrupt-*"))) == 1


def test_what_save_writes_always_loads(tmp_path: Path) -> None:
    """The bounds on load never set aside a file the agent wrote itself."""
    state = State()
    for i in range(MAX_ENTRIES + 10):
        long = dataclasses.replace(
            K, network=f"n{i}", failures=("port: " + "x" * 20_000,), suspect="y" * 20_000,
            probed_at=float(i),
        )  # fmt: skip
        state.remember(long)
    store = Store(tmp_path)
    store.save(state)
    assert store.path.stat().st_size <= MAX_BYTES
    again = store.load()
    assert again.knowledge and not list(tmp_path.glob(f"{FILENAME}.corrupt-*"))
    newest = max(again.knowledge.values(), key=lambda k: k.probed_at)
    assert newest.network == f"n{MAX_ENTRIES + 9}"  # the oldest go first


def test_older_files_without_newer_fields_still_load(tmp_path: Path) -> None:
    entry = {"network": "n", "address": "198.51.100.1", "method": "tls-port", "auth": "none"}
    (tmp_path / FILENAME).write_text(json.dumps({"version": 1, "knowledge": [entry]}))
    (k,) = Store(tmp_path).load().knowledge.values()
    assert (k.method, k.auth, k.auth_source, k.probed_at) == (Method.TLS_PORT, Auth.NONE, None, 0)


def test_every_field_is_checked_on_load() -> None:
    assert set(FIELDS) == {f.name for f in dataclasses.fields(Knowledge)}


def test_what_ddr_found_is_kept_with_the_rest(tmp_path: Path) -> None:
    d = Designation("198.51.100.53", 8853, "dns.example.test", 2, True, True, "verified")
    k = dataclasses.replace(K, designated=(d,), tls_port=8853)
    state = State()
    state.remember(k)
    Store(tmp_path).save(state)
    assert Store(tmp_path).load().knowledge == {k.key: k}
