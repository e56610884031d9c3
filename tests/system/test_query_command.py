"""`dnstls-agent query` through the real daemon: statics under strict against two real
unbounds (one authenticated by its #NAME, one by its address in the certificate), as in
test_static_only.py. The answer, the upstream that gave it and how it was authenticated;
the second time, the tunnel's cache; --json; NXDOMAIN and NODATA exit 1; a bad type 2."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Certs
from tests.lab.statics import BY_IP, BY_NAME, World, statics_world
from tests.lab.unbound import WWW_A, ZONE

pytestmark = pytest.mark.system

DOMAIN = ZONE.rstrip(".")
# how the agent authenticates each: by the configured #NAME, by its address (IP SAN)
AUTH = {
    f"tls-port:{BY_NAME}@853#dns.test": "name",
    f"tls-port:{BY_IP}@853": "ip-san",
}


@pytest.fixture
def world(certs: Certs, tmp_path: Path) -> Iterator[World]:
    with statics_world(certs, tmp_path, "q") as w:
        yield w


def both_in_order(w: World) -> dict[str, Any]:
    """The status once both statics are in the tunnel's order (probed, authenticated)."""
    end = time.monotonic() + 15
    while True:
        status = w.status()
        if status and sorted(status["order"]) == sorted(AUTH):
            return status
        assert time.monotonic() < end, f"status {status}; log:\n{w.agent.tail(40)}"
        time.sleep(0.1)


def test_query_shows_the_answer_who_gave_it_and_how(world: World) -> None:
    w = world
    assert w.told("READY=1", 15), w.agent.tail(40)
    both_in_order(w)

    first = w.cli("query", f"www.{DOMAIN}")
    assert first.returncode == 0, (first, w.agent.tail(20))
    lines = first.stdout.splitlines()
    assert lines[0] == f"www.{DOMAIN}: {WWW_A}", first.stdout
    assert lines[1].startswith("-- answered by "), first.stdout
    upstream = lines[1].removeprefix("-- answered by ").split(" ")[0]
    assert upstream in AUTH, first.stdout  # one of the order's, named as status names it
    assert f"(tls-port, authenticated by {AUTH[upstream]}, configured)" in lines[1]
    assert lines[2].strip().startswith("in ") and " ms" in lines[2], first.stdout
    assert "resolver of static (configured)" in lines[2], first.stdout

    again = w.cli("query", f"www.{DOMAIN}")
    assert again.returncode == 0, again
    assert again.stdout.splitlines()[0] == f"www.{DOMAIN}: {WWW_A}"
    assert again.stdout.splitlines()[1].startswith("-- from the tunnel's cache in "), again

    js = w.cli("query", "--json", f"www.{DOMAIN}", "a")
    assert js.returncode == 0, js
    answer = json.loads(js.stdout)
    assert answer["rcode"] == "NOERROR" and answer["type"] == "A"
    (record,) = answer["answer"]  # "NAME TTL IN A ADDRESS", the TTL as the cache has it
    assert record.startswith(f"www.{ZONE} ") and record.endswith(f" IN A {WWW_A}"), answer
    assert (answer["from_cache"], answer["upstream"]) == (True, None), answer
    assert isinstance(answer["ms"], float)

    txt = w.cli("query", "--json", f"whoami.{DOMAIN}", "TXT")
    assert txt.returncode == 0, txt
    got = json.loads(txt.stdout)
    assert got["upstream"] in AUTH and got["auth"] == AUTH[got["upstream"]], got
    assert got["auth_source"] == "configured" and got["method"] == "tls-port", got
    ((owner, ttl, rclass, rtype, data),) = [r.split(None, 4) for r in got["answer"]]
    assert (owner, ttl, rclass, rtype) == (f"whoami.{ZONE}", "0", "IN", "TXT"), got
    assert "unbound" in data, got  # unbound's own TTL 0: never from the cache

    nx = w.cli("query", f"nope.{DOMAIN}")
    assert nx.returncode == 1, nx
    assert nx.stdout.splitlines()[0] == f"nope.{DOMAIN}: NXDOMAIN (no such name)", nx.stdout
    nodata = w.cli("query", f"www.{DOMAIN}", "MX")
    assert nodata.returncode == 1, nodata
    assert nodata.stdout.startswith(f"www.{DOMAIN}: NODATA"), nodata.stdout

    bad = w.cli("query", f"www.{DOMAIN}", "NOTATYPE")
    assert bad.returncode == 2 and "NOTATYPE" in bad.stderr, bad
    assert w.cli("query", "a..b").returncode == 2

    # each question that reached the tunnel counted once as a client's (nothing else asks
    # it here); the refused ones never reached it
    clients = both_in_order(w)["tunnel"]["clients"]
    assert (clients["queries"], clients["answered"]) == (6, 6), clients
