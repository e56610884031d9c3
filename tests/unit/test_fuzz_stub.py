"""Fuzzing what root's stub side reads from others: the daemon's stub request
(agent/sysconf/request.py, read) and dhclient's lease environment (agent/sysconf/dhclient.py,
render), near-valid and mutated.

Targets: `request` (a Request or a RequestError; every search domain one that resolv.conf
can carry), `dhclient-render` (None or resolv.conf lines: no control character or line
break inside a line, only the lines dhclient-script writes).
"""

from __future__ import annotations

import json
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from agent.sysconf import dhclient, request
from agent.sysconf.request import RequestError
from tests.fuzz_corpus import Target, expect, mutated, property_test, repeats, text_values

DOMAINS = ["lab.example", "LAB.Example.", "a", "-bad.example", "x" * 64 + ".example",
           "a." * 127 + "b", "", "lab.example\nnameserver 203.0.113.9", "é.example",
           "xn--bcher-kva.example", "_dmarc.example", "\u212a.example", "a..b"]  # fmt: skip
ANY = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), text_values()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(text_values(), inner, max_size=2)
    ),
    max_leaves=5,
)


DOMAIN = st.one_of(st.sampled_from(DOMAINS), text_values())
REQUESTS = st.fixed_dictionaries(
    {
        "version": st.sampled_from([1, 1, 1, 2, "1", None, True]),
        "search": st.one_of(st.lists(DOMAIN, max_size=34), ANY),
        "reason": st.one_of(text_values(), st.text(min_size=190, max_size=210), ANY),
        "at": st.floats(),
    }
)


@st.composite
def request_files(draw: st.DrawFn) -> bytes:
    doc: Any = draw(st.one_of(REQUESTS, ANY))
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    return text.encode(draw(st.sampled_from(["utf-8", "utf-8", "utf-16", "utf-32"])))


REQUEST_FILES = request_files()


def request_inputs(big: bool) -> st.SearchStrategy[bytes]:
    return st.one_of(
        REQUEST_FILES,
        mutated(REQUEST_FILES),
        st.binary(max_size=40),
        repeats([b"[", b"{", b'"\\"', b'{"search": [', b"]"], big),
    )


def check_request(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / request.NAME).write_bytes(data)
        try:
            req = request.read(Path(d))
        except RequestError:
            return
    expect(req is not None, "request: None for a file that is there")
    assert req is not None
    expect(len(req.search) <= request.MAX_DOMAINS, "request: too many domains", len(req.search))
    expect(len(set(req.search)) == len(req.search), "request: a domain twice")
    for name in req.search:
        expect(
            request.domain(name) == name
            and name.isascii()
            and name.isprintable()
            and " " not in name,
            "request: a domain resolv.conf cannot carry",
            repr(name),
        )
    expect(isinstance(req.reason, str) and len(req.reason) <= 200, "request: reason")


# -- dhclient's environment ------------------------------------------------------------------------

ENV_KEYS = ["new_domain_name", "new_domain_search", "new_domain_name_servers",
            "new_dhcp6_domain_search", "new_dhcp6_name_servers", "interface", "reason"]  # fmt: skip
SERVERS = ["198.51.100.1", "198.51.100.1 198.51.100.2", "fe80::1 2001:db8::53", "fe80::1%eth0",
           "::ffff:1.2.3.4", "999.1.1.1", "1.2.3.4%x"]  # fmt: skip
OLD = "# old\nnameserver 203.0.113.9\nsearch old.example\noptions edns0\n"


SERVER_WORDS = st.lists(
    st.one_of(st.sampled_from(SERVERS), text_values(), text_values().map("fe80::1%".__add__)),
    max_size=20,
)
IFNAME = st.one_of(st.sampled_from(["eth0", "wlp2s0"]), text_values())
DOMAIN_WORDS = st.lists(DOMAIN, max_size=40)
SEPARATORS = st.sampled_from([" ", "  ", "\t"])


@st.composite
def env_values(draw: st.DrawFn, key: str) -> str:
    if "server" in key:
        words = draw(SERVER_WORDS)
    elif key == "interface":
        words = [draw(IFNAME)]
    else:
        words = draw(DOMAIN_WORDS)
    return draw(SEPARATORS).join(words)


ENVS = st.one_of(
    st.fixed_dictionaries({}, optional={k: env_values(k) for k in ENV_KEYS}),
    st.fixed_dictionaries(  # DHCPv6 alone: the interface goes into the file
        {"new_dhcp6_name_servers": env_values("new_dhcp6_name_servers")},
        optional={k: env_values(k) for k in ("interface", "new_dhcp6_domain_search")},
    ),
)
RENDER_CASES = st.tuples(ENVS, st.sampled_from(["", OLD, "nameserver 203.0.113.9\n"]))


def render_cases(big: bool) -> st.SearchStrategy[tuple[dict[str, str], str]]:
    return RENDER_CASES


def _bad_char(c: str) -> bool:
    return unicodedata.category(c) in ("Cc", "Zl", "Zp")


def check_render(case: tuple[dict[str, str], str]) -> None:
    env, old = case
    out = dhclient.render(env, old)
    if out is None:
        return
    expect(out.endswith("\n") or out == "", "render: the last line has no newline")
    for line in out.split("\n")[:-1]:
        expect(not any(map(_bad_char, line)), "render: a control character in a line", repr(line))
        keyword = line.split(" ", 1)[0]
        expect(
            keyword in ("domain", "search", "nameserver"), "render: a line of another kind", line
        )
        if keyword == "search":
            words = line.split()[1:]
            expect(len(words) <= request.MAX_DOMAINS + 1, "render: search words", len(words))
            expect(all(request.domain(w) for w in words), "render: a search word", line)


TARGETS = [
    Target("request", request_inputs, check_request, max_examples=300),
    Target("dhclient-render", render_cases, check_render, max_examples=300),
]

test_request = property_test(TARGETS[0])
test_dhclient_render = property_test(TARGETS[1])
