"""Fuzzing agent/config.py's load: TOML files built from the option table (every known key,
near-valid or any value, [[interface]] sections, a drop-in), then mutated as text.

Target `config`: a Config or a ConfigError, nothing else; every problem names a line of
its file; what loads can be asked for its settings.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from agent import config
from agent.config import ConfigError, Scope
from tests.fuzz_corpus import Target, expect, mutated_text, property_test, text_values


def toml_string(text: str) -> str:
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(type(value))


ANY = st.recursive(
    st.one_of(st.booleans(), st.integers(), st.floats(), text_values()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(text_values(), inner, max_size=2)
    ),
    max_leaves=5,
)
PATHS = ["", "/var/lib/x", "relative", "/dev/null", "/a\x00b", "/etc/ssl/certs/ca-certificates.crt"]
LISTEN = ["127.0.0.153:53", "[::1]:53", "127.0.0.1:5353", "0.0.0.0", "1.2.3.4:\u00b2", "::1",
          "[fe80::1%eth0]:53", "127.0.0.1:65536", "[::1", ":53"]  # fmt: skip
PINS = ["pOXrpUt9kgPgbWxBFFcBTbRH2heo2wHwXp1fd4AEVXI=", 'pin-sha256="AAAA"', "sha256/é", "=="]
STATICS = ["tls:198.51.100.53@853#dns.example.net", "upgrade:[2001:db8::1]@53", "tcp:1.2.3.4",
           "1.2.3.4@\u00b2", "1.2.3.4#" + "a" * 70, "tls://1.2.3.4", "[::1]@0"]  # fmt: skip


def near_valid(opt: config.Option) -> st.SearchStrategy[Any]:
    if opt.key == "listen":
        return st.lists(st.one_of(st.sampled_from(LISTEN), text_values()), max_size=3)
    if opt.key == "pins":
        return st.lists(st.one_of(st.sampled_from(PINS), text_values()), max_size=2)
    if opt.key == "static_resolvers":
        return st.lists(st.one_of(st.sampled_from(STATICS), text_values()), max_size=2)
    if opt.key == "ignore_resolvers":
        return st.lists(st.one_of(st.ip_addresses().map(str), text_values()), max_size=2)
    if opt.type is list:
        return st.lists(text_values(), max_size=3)
    if opt.type is str:
        return st.one_of(st.sampled_from([str(opt.default), *PATHS]), text_values())
    if opt.type is float:
        return st.one_of(st.floats(), st.integers(-5, 100_000))
    if opt.type is int:
        return st.one_of(st.integers(-5, 100), st.integers())
    return st.booleans()


def option_values(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    values = {k: st.one_of(near_valid(config.BY_KEY[k]), ANY) for k in keys}
    return st.fixed_dictionaries({}, optional=values)


TOP = [o.key for o in config.OPTIONS if o.scope is not Scope.MATCH] + ["interface"]
SECTION = [o.key for o in config.OPTIONS if o.scope is not Scope.GLOBAL] + ["listen"]


TOP_VALUES = option_values([k for k in TOP if k != "interface"])
SECTIONS = st.lists(option_values(SECTION), max_size=2)


@st.composite
def documents(draw: st.DrawFn) -> str:
    top = draw(TOP_VALUES)
    if draw(st.integers(0, 9)) == 0:
        top[draw(st.sampled_from(["lisen", "interface", "interface.x"]))] = draw(ANY)
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for section in draw(SECTIONS):
        lines.append(draw(st.sampled_from(["[[interface]]", "[interface]", "[[ interface ]]"])))
        lines += [f"{k} = {toml_value(v)}" for k, v in section.items()]
    if draw(st.integers(0, 5)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), "# " + draw(text_values()))
    return "\n".join(lines) + "\n"


DOCUMENTS = documents()
CONFIG_CASES = st.tuples(
    st.one_of(DOCUMENTS, mutated_text(DOCUMENTS)), st.one_of(st.none(), DOCUMENTS)
)


def config_cases(big: bool) -> st.SearchStrategy[tuple[str, str | None]]:
    """(agent.toml, a drop-in or None)"""
    return CONFIG_CASES


def check_config(case: tuple[str, str | None]) -> None:
    main, dropin = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "agent.toml"
        path.write_text(main, encoding="utf-8")
        if dropin is not None:
            (Path(d) / "agent.toml.d").mkdir()
            (Path(d) / "agent.toml.d" / "10-more.toml").write_text(dropin, encoding="utf-8")
        try:
            cfg = config.load(path)
        except ConfigError as exc:
            expect(exc.problems and str(exc), "config: an error without problems")
            for p in exc.problems:
                text = Path(p.file).read_text(encoding="utf-8")
                lines = max(1, text.count("\n") + (not text.endswith("\n")))
                where = f"{p.key}: line {p.line} of {lines}"
                expect(
                    p.line is None or 1 <= p.line <= lines, "config: a line outside the file", where
                )
            return
    cfg.for_link("eth0", ("Home Wi-Fi",), "CoffeeShop")
    cfg.profiles()
    expect(all(0 <= port < 65536 for _, port in cfg.listen), "config: listen port", cfg.listen)


TARGETS = [Target("config", config_cases, check_config, max_examples=200)]

test_config = property_test(TARGETS[0])
