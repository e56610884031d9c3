"""packaging/catalog/dnstls-agent.catalog, the journal's message catalog (`journalctl -x`):
one entry per MESSAGE_ID of agent/messageids.py and none else, well formed, read by
journalctl itself, and installed by both packages."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import engine, messageids
from agent.policy import Alert, Warning
from tests.conftest import require_program
from tests.lab.netns import REPO

PKG = REPO / "packaging"
CATALOG = PKG / "catalog" / "dnstls-agent.catalog"
INSTALLED = "usr/lib/systemd/catalog/dnstls-agent.catalog"
IDS = {
    **{a.value: i for a, i in messageids.ALERT_RAISED.items()},
    "cleared": messageids.ALERT_CLEARED,
}
HEADER = re.compile(r"^-- (\S+)(?: (\S+))?$")
FIELD = re.compile(r"^([A-Za-z][A-Za-z-]*): (.+)$")
VAR = re.compile(r"@([A-Za-z0-9_]+)@")
# The warnings about one resolver: only their entries carry RESOLVER (policy.Warning.address).
ABOUT_A_RESOLVER = {Alert.DOWNGRADE, Alert.KEY_CHANGED}


@dataclass(frozen=True)
class Entry:
    id: str
    language: str | None
    headers: dict[str, str]
    text: str


def parse(text: str) -> list[Entry]:
    """The catalog format (journalctl(1), systemd's catalog.c), strictly: `-- ID [LANG]`,
    `Key: value` lines up to the first empty line, then the text up to the next entry."""
    out: list[Entry] = []
    lines = text.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("-- ")]
    assert all(not ln.strip() or ln.startswith("#") for ln in lines[: starts[0]])
    for n, start in enumerate(starts):
        m = HEADER.match(lines[start])
        assert m, lines[start]
        body = lines[start + 1 : starts[n + 1] if n + 1 < len(starts) else len(lines)]
        blank = body.index("")
        headers: dict[str, str] = {}
        for line in body[:blank]:
            f = FIELD.match(line)
            assert f, f"{m.group(1)}: not a header line: {line!r}"
            assert f.group(1) not in headers, f"{m.group(1)}: {f.group(1)} twice"
            headers[f.group(1)] = f.group(2)
        out.append(Entry(m.group(1), m.group(2), headers, "\n".join(body[blank + 1 :]).strip()))
    return out


ENTRIES = parse(CATALOG.read_text(encoding="utf-8"))


def test_one_entry_per_message_id_and_none_else() -> None:
    ids = [e.id for e in ENTRIES]
    assert len(IDS) == len(Alert) + 1  # every alert has its id (messageids), plus the cleared
    assert sorted(ids) == sorted(IDS.values())  # each exactly once
    assert all(e.language is None for e in ENTRIES)  # English, the untranslated entry


def test_ids_are_128_bit_lowercase_hex() -> None:
    for entry in ENTRIES:
        assert re.fullmatch(r"[0-9a-f]{32}", entry.id), entry.id


@pytest.mark.parametrize("name", sorted(IDS))
def test_entry_is_complete(name: str) -> None:
    (entry,) = [e for e in ENTRIES if e.id == IDS[name]]
    assert entry.headers.get("Subject"), name
    assert entry.headers.get("Defined-By") == "dnstls-agent"
    assert entry.headers.get("Support", "").startswith("https://")
    assert entry.headers.get("Documentation") == "man:dnstls-agent(8)"
    assert "What to do" in entry.text or name == "cleared", name
    assert len(entry.text.split()) >= 20, name


def test_subjects_differ() -> None:
    subjects = [e.headers["Subject"] for e in ENTRIES]
    assert len(set(subjects)) == len(subjects)


@pytest.mark.parametrize("alert", list(Alert))
def test_only_fields_the_entry_carries_are_substituted(alert: Alert) -> None:
    """journalctl -x replaces @FIELD@ by the journal entry's field, and by the field's bare
    name when the entry lacks it: only fields engine._journal always sets are used."""
    address = "192.0.2.1" if alert in ABOUT_A_RESOLVER else None
    w = Warning(alert, "eth0", address, "text")
    for cleared, message_id in ((False, messageids.ALERT_RAISED[alert]), (True, IDS["cleared"])):
        carried = engine._journal(w, None, cleared=cleared)
        assert carried["message_id"] == message_id
        (entry,) = [e for e in ENTRIES if e.id == message_id]
        used = set(VAR.findall(entry.text + entry.headers["Subject"]))
        assert used <= set(carried["journal"]), (alert, cleared, used)


def test_journalctl_reads_every_entry(tmp_path: Path) -> None:
    """What journalctl --update-catalog builds from the file lists each id with its
    subject (journalctl is lenient: it would drop or mangle a bad entry silently)."""
    journalctl = require_program("journalctl")
    (tmp_path / INSTALLED).parent.mkdir(parents=True)
    shutil.copyfile(CATALOG, tmp_path / INSTALLED)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_CATALOG")}
    update = subprocess.run(
        [journalctl, f"--root={tmp_path}", "--update-catalog"],
        capture_output=True, text=True, check=False, env=env, timeout=30,
    )  # fmt: skip
    assert (update.returncode, update.stderr) == (0, "")
    assert list((tmp_path / "var/lib/systemd/catalog").iterdir())  # the database
    listed = subprocess.run(
        [journalctl, f"--root={tmp_path}", "--list-catalog"],
        capture_output=True, text=True, check=False, env=env, timeout=30,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    got = dict(ln.split(" ", 1) for ln in listed.stdout.splitlines())
    want = {e.id: f"dnstls-agent: {e.headers['Subject']}" for e in ENTRIES}
    assert got == want


def test_both_packages_install_it() -> None:
    install = (PKG / "debian" / "dnstls-agent.install").read_text().splitlines()
    assert f"packaging/catalog/dnstls-agent.catalog {Path(INSTALLED).parent}/" in install
    spec = (PKG / "rpm" / "dnstls-agent.spec").read_text()
    target = "%{_prefix}/lib/systemd/catalog/%{name}.catalog"
    source = "packaging/catalog/%{name}.catalog"
    assert f"install -D -p -m 0644 {source} \\\n    %{{buildroot}}{target}\n" in spec
    files = spec.split("\n%files\n", 1)[1].split("\n%changelog\n", 1)[0]
    assert target in files.splitlines()
    checks = (PKG / "test-install.d" / "checks").read_text()
    assert f"/{INSTALLED}" in checks
