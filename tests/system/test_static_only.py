"""`dnstls-agent run` where users install it by hand: a server, a container, a VM with static
configuration. No NetworkManager on the bus, no lease, no interface but lo: the global
static_resolvers alone are probed, ordered and served, under strict, authenticated as
configured (one by its #NAME, one by its address in the certificate)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Certs
from tests.lab.statics import BY_IP, BY_NAME, World, statics_world
from tests.lab.unbound import WWW_A

pytestmark = pytest.mark.system


@pytest.fixture(params=[False, True], ids=["netlink-off", "netlink-on"])
def world(request: pytest.FixtureRequest, certs: Certs, tmp_path: Path) -> Iterator[World]:
    with statics_world(certs, tmp_path, "st", netlink=request.param) as w:
        yield w


def ask(w: World, tcp: bool = False) -> list[str]:
    return w.ask(tcp=tcp)


def test_static_resolvers_alone_are_probed_ordered_and_served(world: World) -> None:
    w = world
    assert w.told("READY=1", 15), w.agent.tail(40)
    end = time.monotonic() + 15
    status = w.status()
    while not (status and len([o for o in status["order"] if "tls-port" in o]) == 2):
        assert time.monotonic() < end, f"status {status}; log:\n{w.agent.tail(40)}"
        time.sleep(0.1)
        status = w.status()
    assert status["profile"] == "strict", status
    assert sorted(status["order"]) == [
        f"tls-port:{BY_NAME}@853#dns.test",
        f"tls-port:{BY_IP}@853",
    ]
    (iface,) = status["interfaces"]
    assert (iface["interface"], iface["network"], iface["profile"]) == (
        "static", "if:static", "strict"
    )  # fmt: skip
    seen = {r["address"]: (r["method"], r["auth"], r["used"]) for r in iface["resolvers"]}
    assert seen == {BY_NAME: ("tls-port", "name", True), BY_IP: ("tls-port", "ip-san", True)}
    assert not status["warnings"], status["warnings"]
    assert status["tunnel"]["mode"] == "private"
    assert ask(w) == [WWW_A]
    assert ask(w, tcp=True) == [WWW_A]

    # the tunnel's cache: asked again, answered without the upstreams (counted in status),
    # until flush-caches empties it
    def upstream_queries() -> int:
        st = w.status()
        assert st is not None
        return sum(u["queries"] for u in st["tunnel"]["upstreams"])

    before = upstream_queries()
    for tcp in (False, True, False):
        assert ask(w, tcp=tcp) == [WWW_A]
    st = w.status()
    assert st is not None
    assert st["tunnel"]["cache"]["hits"] >= 3, st["tunnel"]["cache"]
    assert upstream_queries() == before
    out = w.cli("flush-caches")
    assert out.returncode == 0 and out.stdout.split()[0].isdigit(), out
    assert int(out.stdout.split()[0]) >= 1, out.stdout
    assert ask(w) == [WWW_A]
    assert upstream_queries() > before
    # a clean stop; what was learnt is kept for the statics' own network
    w.agent.popen.terminate()
    assert w.agent.popen.wait(10) == 0, w.agent.tail(40)
    state = json.loads((w.dir / "state" / "state.json").read_text())
    learnt = {(k["network"], k["address"]) for k in state["knowledge"]}
    assert learnt == {("if:static", BY_NAME), ("if:static", BY_IP)}
