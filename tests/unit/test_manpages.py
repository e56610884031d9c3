"""man/: the pages against what they document, so that they cannot drift.

dnstls-agent.toml(5) against agent/config.py's OPTIONS (section by scope, type, default,
example), dnstls-agent(8) against agent/cli/'s parser (every subcommand, option,
choice and default; exit statuses), dnstls-agent-dispatcher(8) against the hook's
actions; and `mandoc -T lint` on every page.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest

from agent import __version__, cli, config
from agent.config import OPTIONS, Scope
from tests.conftest import require_program
from tests.lab.netns import REPO
from tests.unit.docs import Entry, Page, plain, read_page, toml_value, type_name

MAN = REPO / "man"
PAGES = sorted(MAN.glob("*.[1-8]"))
AGENT8 = MAN / "dnstls-agent.8"
TOML5 = MAN / "dnstls-agent.toml.5"
HOOK8 = MAN / "dnstls-agent-dispatcher.8"
HOOK = REPO / "dispatcher.d" / "90-dnstls-agent"

SECTION_OF = {
    Scope.GLOBAL: "GLOBAL OPTIONS",
    Scope.LINK: "PER-INTERFACE OPTIONS",
    Scope.MATCH: "MATCH OPTIONS",
}
# Documented before the code has it: the service's ExecStopPost= runs it (being added
# to agent/cli/). Once the parser has it, it is checked like every other command.
AHEAD_OF_CODE = {"restore"}


def test_the_pages_are_the_ones_packaged() -> None:
    assert [p.name for p in PAGES] == [
        "dnstls-agent-dispatcher.8",
        "dnstls-agent.8",
        "dnstls-agent.toml.5",
    ]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_title_names_the_page_and_the_version(path: Path) -> None:
    name, section = path.name.rsplit(".", 1)
    title = read_page(path).title
    assert [plain(t) for t in title[:2]] == [name.upper(), section]
    assert plain(title[3]) == f"dnstls-agent {__version__}", "update .TH when the version moves"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_mandoc_lint_is_clean(path: Path) -> None:
    mandoc = require_program("mandoc")
    proc = subprocess.run(
        [mandoc, "-T", "lint", str(path)], capture_output=True, text=True, check=False
    )
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


# -- dnstls-agent.toml(5) --------------------------------------------------------------------------


def option_entries(page: Page) -> dict[str, Entry]:
    return {e.tag: e for section in SECTION_OF.values() for e in page.entries_in(section)}


def field(entry: Entry, name: str) -> str:
    """The bold value of a "Name: \\fBvalue\\fR" line of an option entry, as text."""
    for line in entry.body:
        if m := re.match(rf"{name}: \\fB(.*?)\\fR", line) or re.match(rf"{name}: (.*)$", line):
            return plain(m.group(1))
    raise AssertionError(f"{entry.tag}: no {name}: line")


def test_every_option_is_documented_and_nothing_else() -> None:
    documented = set(option_entries(read_page(TOML5)))
    table = {o.key for o in OPTIONS}
    assert not table - documented, f"missing from {TOML5.name}: {sorted(table - documented)}"
    assert not documented - table, f"not options (any more): {sorted(documented - table)}"


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: o.key)
def test_option_entry_matches_the_table(opt: config.Option, tmp_path: Path) -> None:
    entry = option_entries(read_page(TOML5))[opt.key]
    assert entry.section == SECTION_OF[opt.scope]
    assert field(entry, "Type") == f"{type_name(opt)}."
    assert field(entry, "Default") == toml_value(opt.default)
    example = field(entry, "Example")
    assert example == f"{opt.key} = {opt.example}"
    # and the example is valid where the section says the option goes
    f = tmp_path / "example.toml"
    match = "" if opt.scope is Scope.MATCH else 'match_name = "eth*"\n'
    f.write_text(
        example + "\n" if opt.scope is Scope.GLOBAL else f"[[interface]]\n{match}{example}\n"
    )
    config.load(f, dropins=False)


# -- dnstls-agent(8) -------------------------------------------------------------------------------


def leaf_commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """ "probe", "config check", ...: every command line that runs something."""
    out: dict[str, argparse.ArgumentParser] = {}

    def walk(p: argparse.ArgumentParser, prefix: str) -> None:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs and prefix:
            out[prefix] = p
        for action in subs:
            for name, child in action.choices.items():
                walk(child, f"{prefix} {name}".strip())

    walk(parser, "")
    return out


COMMANDS = leaf_commands(cli.build_parser())


def documented(action: argparse.Action) -> bool:
    return not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)


def rendered_default(value: object) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def check_arguments(parser: argparse.ArgumentParser, entries: list[Entry], where: str) -> None:
    """Each option (by its long name) or positional (by metavar) has an entry, which names
    every choice and the default."""
    by_tag = {e.tag.split(" ")[0].split(",")[0]: e for e in entries}
    by_tag.update({e.tag.split(", ")[-1].split(" ")[0]: e for e in entries})  # "-c, --config F"
    for action in filter(documented, parser._actions):
        names = [s for s in action.option_strings if s.startswith("--")]
        key = names[0] if names else str(action.metavar)
        assert key in by_tag, f"{where}: {key} is not documented"
        text = by_tag[key].text
        for choice in action.choices or ():
            assert re.search(rf"\b{re.escape(str(choice))}\b", text), f"{where}: {key} {choice}"
        if action.default and action.default is not argparse.SUPPRESS:
            want = f"default {rendered_default(action.default)}"
            assert want in text, f"{where}: {key}: {want!r} not in {text!r}"


def test_every_command_has_its_subsection() -> None:
    page = read_page(AGENT8)
    subsections = {ss for (sh, ss) in page.subsections if sh == "COMMANDS"}
    assert not set(COMMANDS) - subsections, f"undocumented: {set(COMMANDS) - subsections}"
    stale = subsections - set(COMMANDS) - AHEAD_OF_CODE
    assert not stale, f"documented but not commands: {stale}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_arguments_are_documented(command: str) -> None:
    parser = COMMANDS[command]
    entries = read_page(AGENT8).entries_in("COMMANDS", command)
    check_arguments(parser, entries, command)
    options = {s for a in parser._actions for s in a.option_strings}
    for e in entries:  # and nothing is documented that the command does not take
        flag = e.tag.split(" ")[0]
        assert not flag.startswith("-") or flag in options, f"{command}: {flag} is not an option"


def test_global_options_are_documented() -> None:
    parser = cli.build_parser()
    entries = read_page(AGENT8).entries_in("OPTIONS")
    check_arguments(parser, entries, "global")
    synopsis = " ".join(read_page(AGENT8).sections["SYNOPSIS"])
    for command in COMMANDS:
        assert f"dnstls\\-agent {command}" in synopsis, f"{command} is not in the SYNOPSIS"


def test_exit_statuses() -> None:
    tags = {e.tag for e in read_page(AGENT8).entries_in("EXIT STATUS")}
    codes = {cli.EXIT_OK, cli.EXIT_NOT_PRIVATE, cli.EXIT_USAGE, cli.EXIT_FAILURE, 130}
    assert tags == {str(c) for c in codes}


# -- dnstls-agent-dispatcher(8) --------------------------------------------------------------------


def test_dispatcher_actions_are_the_hooks() -> None:
    m = re.search(r'^\s*case "\$2" in\s*\n\s*([\w|-]+)\)', HOOK.read_text(), re.MULTILINE)
    assert m, "the hook's first case branch lists the actions it passes on"
    documented_actions = {e.tag for e in read_page(HOOK8).entries_in("ACTIONS")}
    assert documented_actions == set(m.group(1).split("|"))
