"""agent/watchers/leases.py: parsing real-format lease files; half-written files are no facts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

import pytest

from agent.inotify import Waker
from agent.model import Link
from agent.watchers import leases
from tests.conftest import run

DATA = Path(__file__).parent / "data"


def test_dhclient_last_block_wins_v4_and_v6() -> None:
    got = leases.parse_dhclient((DATA / "dhclient.eth0.leases").read_text())
    assert set(got) == {"eth0", "wlan0", "eth1"}  # eth2's block is half-written: ignored
    eth0 = got["eth0"]
    assert eth0.resolvers == ("203.0.113.53",)
    assert eth0.domains == ("lab.example", "corp.example")
    assert eth0.server == "198.51.100.1" and eth0.router == "198.51.100.1"
    assert got["eth1"].resolvers == ("2001:db8::53", "2001:db8::54")
    assert got["eth1"].domains == ("v6.example",)


def test_networkd_lease() -> None:
    lease = leases.parse_networkd((DATA / "networkd-lease").read_text(), "eth0")
    assert lease is not None
    assert lease.resolvers == ("198.51.100.1", "198.51.100.2")  # junk dropped
    assert lease.domains == ("lab.example",) and lease.server == "198.51.100.1"
    assert leases.parse_networkd("T1=300\n", "eth0") is None  # half-written


def test_garbage_is_no_facts() -> None:
    assert leases.parse_dhclient("\x00\xff lease { garbage") == {}
    assert leases.parse_dhclient("") == {}


def test_watcher_polls_directories(tmp_path: Path) -> None:
    seen: list[dict[str, Link]] = []
    w = leases.LeaseWatcher([str(tmp_path), str(tmp_path / "missing")], seen.append)
    assert w.poll() and seen[-1] == {}
    assert not w.poll()  # nothing changed
    lease = tmp_path / "dhclient.eth0.leases"
    lease.write_text((DATA / "dhclient.eth0.leases").read_text())
    os.utime(lease, (1, 1))
    assert w.poll()
    links = seen[-1]
    assert set(links) == {"eth0", "wlan0", "eth1"}
    eth0 = links["eth0"]
    assert [r.address for r in eth0.resolvers] == ["203.0.113.53"]
    assert eth0.network_id == "dhcp:eth0:198.51.100.1"


def test_a_new_lease_wakes_the_watcher_at_once(tmp_path: Path) -> None:
    """With a poll interval of a minute, only inotify can see the lease dhclient writes."""
    run(_wakes_at_once(tmp_path), timeout=10)


async def _wakes_at_once(tmp_path: Path) -> None:
    later = tmp_path / "later"  # not there at first: watched once it is
    seen: list[dict[str, Link]] = []
    got = asyncio.Event()

    def on_snapshot(links: dict[str, Link]) -> None:
        seen.append(links)
        got.set()

    w = leases.LeaseWatcher([str(tmp_path), str(later)], on_snapshot, interval=60)
    task = asyncio.create_task(w.run())
    try:
        await asyncio.wait_for(got.wait(), 2)  # the first look
        got.clear()
        t0 = time.monotonic()
        (tmp_path / "dhclient.eth0.leases").write_text((DATA / "dhclient.eth0.leases").read_text())
        await asyncio.wait_for(got.wait(), 2)
        assert time.monotonic() - t0 < 1
        assert "eth0" in seen[-1]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_waker_watches_a_directory_once_it_exists(tmp_path: Path) -> None:
    async def check() -> None:
        later = tmp_path / "later"
        waker = Waker("test", [later])
        try:
            assert waker.notify is not None and not waker.watching(later)
            later.mkdir()
            waker.add([later])
            assert waker.watching(later)
            (later / "x").write_text("x")
            await asyncio.wait_for(waker.woken.wait(), 2)
        finally:
            waker.close()

    run(check(), timeout=10)


def test_dhclient_search_list_is_the_one_dhclient_script_writes() -> None:
    """domain-search with the domain name in front when it is not in it; one name once."""

    def domains(options: str) -> tuple[str, ...]:
        text = f'lease {{\n  interface "eth0";\n{options}}}\n'
        return leases.parse_dhclient(text)["eth0"].domains

    assert domains('  option domain-name "lab.test";\n  option domain-search "corp.test.";\n') == (
        "lab.test",
        "corp.test",
    )
    both = '  option domain-name "corp.test";\n  option domain-search "Corp.Test.", "x.test";\n'
    assert domains(both) == ("Corp.Test", "x.test")
    assert domains('  option domain-name "lab.test";\n') == ("lab.test",)
    assert domains('  option dhcp6.domain-search "v6.test.";\n') == ("v6.test",)
    assert domains("") == ()


# -- hostile input: bounded time, bounded size, off the event loop -----------------------------


def test_unclosed_lease_lines_parse_in_linear_time() -> None:
    """125 KiB of `lease {` lines that never close took seconds (a regex that rescans to
    the end from every one); one pass takes milliseconds. A correctness bound, not a bench."""
    text = "lease {\n" * (125 * 1024 // len("lease {\n"))
    t0 = time.perf_counter()
    assert leases.parse_dhclient(text) == {}
    assert time.perf_counter() - t0 < 0.5


def test_a_long_search_list_parses_in_linear_time() -> None:
    names = ", ".join(f'"d{i}.test."' for i in range(12000))  # ~150 KiB, every name new
    text = f'lease {{\n  interface "eth0";\n  option domain-search {names};\n}}\n'
    t0 = time.perf_counter()
    got = leases.parse_dhclient(text)["eth0"].domains
    assert time.perf_counter() - t0 < 0.5
    assert len(got) == 12000 and got[:2] == ("d0.test", "d1.test")


def test_a_torn_block_does_not_swallow_the_next_one() -> None:
    """A block cut short (a torn write) followed by a complete one: the complete one counts."""
    good = (DATA / "dhclient.eth0.leases").read_text()
    torn = 'lease {\n  interface "eth9";\n  option domain-name-servers 192.0.2.9;\n'
    assert leases.parse_dhclient(torn + good) == leases.parse_dhclient(good)
    assert leases.parse_dhclient("lease {\n" * 100 + good) == leases.parse_dhclient(good)


def test_normal_lease_files_parse_as_before() -> None:
    """The one-pass parser gives what the block regex gave on a well-formed file, whole."""
    got = leases.parse_dhclient((DATA / "dhclient.eth0.leases").read_text())
    assert got == {
        "eth0": leases.Lease(
            "eth0", ("203.0.113.53",), ("lab.example", "corp.example"),
            "198.51.100.1", "198.51.100.1",
        ),
        "wlan0": leases.Lease("wlan0", ("203.0.113.1",), (), "203.0.113.1", None),
        "eth1": leases.Lease(
            "eth1", ("2001:db8::53", "2001:db8::54"), ("v6.example",),
            "0:1:0:1:aa:bb:cc:dd:ee:ff:0:1", None,
        ),
    }  # fmt: skip


def test_an_oversized_lease_file_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = (DATA / "dhclient.eth0.leases").read_text()
    (tmp_path / "dhclient.eth0.leases").write_text(good)
    big = tmp_path / "dhclient.eth7.leases"
    big.write_text(good.replace("eth", "big") + "#" * leases.MAX_LEASE_FILE)
    with caplog.at_level(logging.WARNING, logger=leases.LOG.name):
        links = leases.read_dirs([tmp_path])
    assert set(links) == {"eth0", "wlan0", "eth1"}  # the big one's leases are not read
    assert any(str(big) in r.getMessage() for r in caplog.records)


def test_parsing_runs_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow parse (here made slow on purpose) does not hold up the event loop, which
    also carries every DNS query of the tunnel."""
    (tmp_path / "dhclient.eth0.leases").write_text((DATA / "dhclient.eth0.leases").read_text())
    parse = leases.parse_dhclient

    def slow(text: str) -> dict[str, leases.Lease]:
        time.sleep(0.5)
        return parse(text)

    monkeypatch.setattr(leases, "parse_dhclient", slow)

    async def go() -> None:
        got = asyncio.Event()
        seen: list[dict[str, Link]] = []

        def on_snapshot(links: dict[str, Link]) -> None:
            seen.append(links)
            got.set()

        w = leases.LeaseWatcher([str(tmp_path)], on_snapshot, interval=60)
        task = asyncio.create_task(w.run())
        lag = 0.0
        try:
            while not got.is_set():
                t0 = time.monotonic()
                await asyncio.sleep(0.01)
                lag = max(lag, time.monotonic() - t0)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert set(seen[-1]) == {"eth0", "wlan0", "eth1"}
        assert lag < 0.25  # the loop kept turning while the file was parsed

    run(go(), timeout=10)
