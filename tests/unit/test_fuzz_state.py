"""Fuzzing agent/state.py's Store.load: state files built like the ones save() writes (every
field near-valid or any JSON), then mutated, or any bytes, or nested deep.

Target `state`: load never raises (a bad file is set aside, the agent starts afresh), and
what it loads is what save() can write again and the next load gives back.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from agent.model import Auth, AuthSource, Method, Order
from agent.state import State, Store
from tests.fuzz_corpus import Target, expect, mutated, property_test, repeats, text_values

ANY = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), text_values()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(text_values(), inner, max_size=2)
    ),
    max_leaves=5,
)
NUMBER = st.one_of(st.floats(), st.integers(0, 2**40))


def _enum(values: list[str]) -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from([*values, None]), ANY)


FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "network": st.one_of(st.sampled_from(["nm:1234", "if:eth0"]), ANY),
    "address": st.one_of(st.sampled_from(["198.51.100.1", "2001:db8::53"]), ANY),
    "method": _enum([m.value for m in Method]),
    "auth": _enum([a.value for a in Auth]),
    "auth_source": _enum([a.value for a in AuthSource]),
    "path_first": _enum([o.value for o in Order]),
    "plain": _enum([m.value for m in Method]),
    "pin": st.one_of(st.none(), text_values(), ANY),
    "pins_seen": st.one_of(st.lists(text_values(), max_size=2), ANY),
    "failures": st.one_of(st.lists(text_values(), max_size=2), ANY),
    "latency_ms": st.one_of(st.none(), NUMBER, ANY),
    "probed_at": st.one_of(NUMBER, ANY),
    "tls_ok_at": st.one_of(NUMBER, ANY),
    "negative_until": NUMBER,
    "resumption": st.one_of(st.none(), st.booleans()),
    "pin_stable": st.one_of(st.integers(0, 100), ANY),
    "suspect_at": NUMBER,
    "suspect": text_values(),
    "added_later": ANY,
}


# network and address are there in most entries: the rest is then looked at
ENTRIES = st.lists(
    st.fixed_dictionaries(
        {"network": st.sampled_from(["nm:1234", "if:eth0"]), "address": FIELDS["address"]},
        optional={k: v for k, v in FIELDS.items() if k not in ("network", "address")},
    ),
    max_size=3,
)
ORDERS = st.dictionaries(text_values(), st.lists(text_values(), max_size=2), max_size=2)
DOCS = st.fixed_dictionaries(
    {
        "version": st.sampled_from([1, 1, 1, 2, "1", None]),
        "saved_at": NUMBER,
        "knowledge": st.one_of(ENTRIES, ANY),
        "orders": st.one_of(ORDERS, ANY),
    }
)
STATE_FILES = st.one_of(DOCS, st.lists(DOCS, max_size=1), ANY).map(lambda d: json.dumps(d).encode())


def state_inputs(big: bool) -> st.SearchStrategy[bytes]:
    return st.one_of(
        STATE_FILES,
        mutated(STATE_FILES),
        st.binary(max_size=40),
        repeats([b"[", b'{"version": 1, "knowledge": [', b'{"a":'], big),
    )


def check_state(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = Store(Path(d))
        store.path.write_bytes(data)
        state = store.load()  # never raises
        expect(isinstance(state, State), "state: load")
        for key, k in state.knowledge.items():
            expect(key == (k.network, k.address), "state: knowledge under another key")
            expect(isinstance(k.network, str) and isinstance(k.address, str), "state: key types")
        for net, order in state.orders.items():
            expect(isinstance(net, str) and all(isinstance(x, str) for x in order), "state: order")
        store.save(state)  # what was accepted can be kept
        again = store.load()
        expect(set(again.knowledge) == set(state.knowledge), "state: save then load differs")
        expect(again.orders == state.orders, "state: orders differ after save and load")


TARGETS = [Target("state", state_inputs, check_state, max_examples=250)]

test_state = property_test(TARGETS[0])
