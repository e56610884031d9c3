"""Helpers for the documentation tests: values written as in TOML, and a small man(7) reader.

The reader knows the few macros the pages use; it is enough to find a page's sections,
subsections and `.TP` entries and to read them as the words a reader sees.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import Option, Scope

TYPE_NAMES = {
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    list: "list of strings",
}


def toml_value(value: Any) -> str:
    """A default as the docs write it: TOML, integral numbers without ".0"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    raise TypeError(f"no TOML rendering for {value!r}")


def type_name(opt: Option) -> str:
    if opt.scope is Scope.MATCH:
        return "string or list of strings"  # a single string is taken as a list of one
    return TYPE_NAMES[opt.type]


# -- man(7) ---------------------------------------------------------------------------------------

_ESCAPE = re.compile(r"\\(f[BIRP]|\(..|[-e&c])")
_NAMED = {"(dq": '"', "(aq": "'", "(lq": '"', "(rq": '"', "(em": "--"}
_FONT_MACROS = {"B", "I", "BR", "RB", "BI", "IB", "IR", "RI"}
_BREAKS = (".TP", ".SH", ".SS", ".PP", ".P", ".LP", ".IP")


def plain(roff: str) -> str:
    """Roff text as shown: escapes resolved, font changes dropped."""

    def one(m: re.Match[str]) -> str:
        e = m.group(1)
        if e == "-":
            return "-"
        if e == "e":
            return "\\"
        if e.startswith("("):
            return _NAMED.get(e, "?")
        return ""  # \fX, \&, \c

    return _ESCAPE.sub(one, roff)


def macro_args(rest: str) -> list[str]:
    return [
        q.replace('""', '"') if q or not w else w
        for q, w in re.findall(r'"((?:[^"]|"")*)"|(\S+)', rest)
    ]


def text_of(line: str) -> str:
    """One input line as the words it shows ("" for layout macros)."""
    if not line.startswith("."):
        return plain(line)
    name, _, rest = line[1:].partition(" ")
    if name not in _FONT_MACROS:
        return ""
    joiner = " " if len(name) == 1 else ""  # .B joins with spaces, .BR alternates fonts
    return plain(joiner.join(macro_args(rest)))


@dataclass
class Entry:
    """A `.TP` paragraph: its tag and the input lines of its body."""

    section: str
    subsection: str
    tag: str
    body: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(t for t in map(text_of, self.body) if t)


@dataclass
class Page:
    path: Path
    title: list[str]  # the .TH arguments
    sections: dict[str, list[str]]  # .SH name -> its input lines
    subsections: dict[tuple[str, str], list[str]]  # (.SH, .SS) -> its input lines
    entries: list[Entry]

    def entries_in(self, section: str, subsection: str | None = None) -> list[Entry]:
        return [
            e
            for e in self.entries
            if e.section == section and (subsection is None or e.subsection == subsection)
        ]


def read_page(path: Path) -> Page:
    lines = [
        ln for ln in path.read_text(encoding="utf-8").splitlines() if not ln.startswith('.\\"')
    ]
    title: list[str] = []
    sections: dict[str, list[str]] = {}
    subsections: dict[tuple[str, str], list[str]] = {}
    entries: list[Entry] = []
    sh = ss = ""
    current: Entry | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.startswith(".TH "):
            title = macro_args(line[4:])
            continue
        if line.startswith(".SH "):
            sh, ss, current = plain(" ".join(macro_args(line[4:]))), "", None
            sections[sh] = []
            continue
        if line.startswith(".SS "):
            ss, current = plain(" ".join(macro_args(line[4:]))), None
            subsections[(sh, ss)] = []
            continue
        sections.setdefault(sh, []).append(line)
        if ss:
            subsections[(sh, ss)].append(line)
        if line == ".TP" and i < len(lines):
            tag = lines[i]
            i += 1
            sections.setdefault(sh, []).append(tag)
            if ss:
                subsections[(sh, ss)].append(tag)
            current = Entry(sh, ss, text_of(tag))
            entries.append(current)
            continue
        if line.split(" ")[0] in _BREAKS:
            current = None
        elif current is not None:
            current.body.append(line)
    return Page(path, title, sections, subsections, entries)
