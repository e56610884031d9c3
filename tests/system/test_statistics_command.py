"""`dnstls-agent statistics` against the real daemon (the world of test_static_only.py: two
unbound on lo in a namespace, the statics alone, strict): the queries asked show in the
counters, --reset zeroes them (the cache keeps its answers) and says since when they ran,
--json parses."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Certs
from tests.lab.statics import BY_NAME, World, statics_world
from tests.lab.unbound import WWW_A

pytestmark = pytest.mark.system


@pytest.fixture
def world(certs: Certs, tmp_path: Path) -> Iterator[World]:
    with statics_world(certs, tmp_path, "sc") as w:
        yield w


def ask(w: World, tcp: bool = False) -> list[str]:
    return w.ask(tcp=tcp)


def test_statistics_count_reset_and_say_since_when(world: World) -> None:
    w = world
    assert w.told("READY=1", 15), w.agent.tail(40)
    end = time.monotonic() + 15
    while len([o for o in w.json("status")["order"] if "tls-port" in o]) < 2:
        assert time.monotonic() < end, w.agent.tail(40)
        time.sleep(0.1)
    started = w.json("statistics")["since"]

    for tcp in (False, True, False, False):  # one miss, then the cache
        assert ask(w, tcp=tcp) == [WWW_A]
    st = w.json("statistics")
    assert st["since"] == started and st["now"] >= started
    assert st["clients"]["queries"] == st["clients"]["answered"] == 4, st["clients"]
    assert st["clients"]["tcp_clients"] == 1 and st["clients"]["servfail"] == 0
    assert (st["cache"]["hits"], st["cache"]["misses"]) == (3, 1), st["cache"]
    assert st["cache"]["entries"] >= 1
    assert sum(u["queries"] for u in st["upstreams"]) >= 1
    answered = [u for u in st["upstreams"] if u["answers"]]
    assert answered and all(u["p50_ms"] is not None for u in answered), st["upstreams"]
    assert st["engine"]["probes"] >= 2 and st["engine"]["decisions"] >= 1, st["engine"]

    # the table, for people
    out = w.cli("statistics")
    assert out.returncode == 0, out
    lines = out.stdout.splitlines()
    assert lines[0].startswith("counting since ")
    assert lines[1].split()[:3] == ["CLIENTS", "queries", "answered"]
    assert lines[2].split()[:2] == ["4", "4"]
    assert any(line.startswith(f"tls-port:{BY_NAME}@853#dns.test ") for line in lines), lines

    # --reset: the counters as they ended, then zeroed, and since when they ran
    out = w.cli("statistics", "--reset")
    assert out.returncode == 0, out
    assert out.stdout.splitlines()[2].split()[:2] == ["4", "4"]
    ran_since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    assert re.search(
        rf"counters zeroed at [\d-]+ [\d:]+; they had counted since {ran_since} \(\S+\)",
        out.stdout,
    ), out.stdout
    st = w.json("statistics")
    assert st["since"] > started
    assert st["clients"]["queries"] == st["clients"]["answered"] == 0, st["clients"]
    assert st["cache"]["hits"] == st["cache"]["misses"] == 0 and st["cache"]["entries"] >= 1
    assert all(u["queries"] == 0 and u["p50_ms"] is None for u in st["upstreams"])
    # zeroed; a decision of the engine's own (a kernel event) may come in between, a probe not
    assert st["engine"]["probes"] == 0 and st["engine"]["decisions"] <= 1, st["engine"]

    # counting goes on from zero; the answer is still cached
    assert ask(w) == [WWW_A]
    after = w.json("statistics")
    assert after["clients"]["queries"] == 1 and after["cache"]["hits"] == 1, after
    assert after["since"] == st["since"]

    # --reset --json: the agent's answer
    answer = w.json("statistics", "--reset")
    assert answer["ok"] is True and answer["since"] > st["since"]
    assert answer["statistics"]["clients"]["queries"] == 1

    w.agent.popen.terminate()
    assert w.agent.popen.wait(10) == 0, w.agent.tail(40)
