"""The daemon's request to refresh the stub (agent/sysconf/request.py) and the resolv.conf
watch (agent/sysconf/watch.py): what root accepts from the unprivileged daemon."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from agent.model import Link
from agent.policy import search_domains
from agent.sysconf import request
from agent.sysconf.watch import BACKOFF_MAX, ResolvConfWatch, foreign


def test_round_trip(tmp_path: Path) -> None:
    assert request.read(tmp_path) is None
    request.write(tmp_path, ("lab.example", "corp.example"), "search domains changed")
    got = request.read(tmp_path)
    assert got == request.Request(("lab.example", "corp.example"), "search domains changed")
    assert (tmp_path / request.NAME).stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    ("search", "why"),
    [
        (["lab.example\nnameserver 203.0.113.9"], "not a domain name"),  # resolv.conf injection
        (["a b.example"], "not a domain name"),
        (["-bad.example"], "not a domain name"),
        (["x" * 64 + ".example"], "not a domain name"),
        (["a." * 127 + "b"], "over 253"),
        ([""], "not a domain name"),
        ([f"d{i}.example" for i in range(request.MAX_DOMAINS + 1)], "at most"),
        ("lab.example", "a list of domain names"),
        ([1], "a list of domain names"),
    ],
)
def test_root_refuses_what_it_cannot_use(tmp_path: Path, search: object, why: str) -> None:
    (tmp_path / request.NAME).write_text(json.dumps({"version": 1, "search": search}))
    with pytest.raises(request.RequestError, match=why):
        request.read(tmp_path)


@pytest.mark.parametrize(
    ("raw", "why"),
    [(b"{broken", "not JSON"), (b'{"version": 9}', "understands"), (b" " * 20000, "over")],
)
def test_broken_files(tmp_path: Path, raw: bytes, why: str) -> None:
    (tmp_path / request.NAME).write_bytes(raw)
    with pytest.raises(request.RequestError, match=why):
        request.read(tmp_path)


def test_domains_are_normalised() -> None:
    assert request.domain("Lab.Example.") == "lab.example"
    assert request.domain("_srv.xn--bcher-kva.example") == "_srv.xn--bcher-kva.example"


def test_search_domains_follow_the_preferred_links() -> None:
    links = [
        Link("wlan0", domains=("home.example", "shared.example"), priority=100),
        Link("tun0", domains=("corp.example", "~routed.example"), priority=50, vpn=True),
        Link("eth1", up=False, domains=("down.example",)),
        Link("eth0", domains=("Shared.Example.",), priority=100, default_route=True),
    ]
    assert search_domains(links) == ("corp.example", "shared.example", "home.example")
    assert search_domains([]) == ()


def test_foreign_nameservers() -> None:
    ours = {"127.0.0.153"}
    assert foreign("nameserver 127.0.0.153\nsearch a.example\n", ours) == []
    assert foreign("nameserver 127.0.0.53\n", ours) == []
    assert foreign("# x\nnameserver 203.0.113.1\nnameserver 127.0.0.153\n", ours) == ["203.0.113.1"]


def test_the_watch_asks_once_per_foreign_rewrite(tmp_path: Path) -> None:
    asyncio.run(_watch(tmp_path))


async def _watch(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 127.0.0.153\n")
    asked: list[str] = []
    task = asyncio.create_task(ResolvConfWatch(path, {"127.0.0.153"}, 0.01).run(asked.append))
    try:
        await asyncio.sleep(0.05)
        assert asked == []  # unchanged
        path.write_text("nameserver 127.0.0.153\nsearch b.example\n")  # ours, changed
        await asyncio.sleep(0.05)
        assert asked == []
        path.write_text("nameserver 203.0.113.1\n")  # a DHCP client's renewal
        for _ in range(100):
            if asked:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert len(asked) == 1 and "203.0.113.1" in asked[0]  # once, not every second
    finally:
        task.cancel()


def test_the_watch_backs_off_when_something_fights_over_the_file(tmp_path: Path) -> None:
    asyncio.run(_fight(tmp_path))


async def _fight(tmp_path: Path) -> None:
    """Every refresh is undone at once: 3 asks, then one per back-off period (a fake clock)."""
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 127.0.0.153\n")
    now = [0.0]
    asked: list[str] = []
    watch = ResolvConfWatch(path, {"127.0.0.153"}, 0.001, clock=lambda: now[0])
    task = asyncio.create_task(watch.run(asked.append))
    try:
        for i in range(12):
            path.write_text(f"nameserver 203.0.113.1\n# {i}\n")
            await asyncio.sleep(0.02)
        assert len(asked) == 4  # 3 in a row, a 4th that starts the quiet time
        now[0] += BACKOFF_MAX
        await asyncio.sleep(0.02)
        assert len(asked) == 5  # the file still foreign: asked once more after the quiet time
        path.write_text("nameserver 127.0.0.153\n")  # fixed: the count starts again
        await asyncio.sleep(0.02)
        path.write_text("nameserver 203.0.113.2\n")
        await asyncio.sleep(0.02)
        assert len(asked) == 6 and "203.0.113.2" in asked[-1]
    finally:
        task.cancel()


def test_inotify_wakes_the_watch_at_once(tmp_path: Path) -> None:
    """With a poll interval of a minute, only inotify can notice a rename over the file
    (what dhclient-script does) within the second this test waits."""
    asyncio.run(_inotify(tmp_path))


async def _inotify(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 127.0.0.153\n")
    asked: list[str] = []
    task = asyncio.create_task(ResolvConfWatch(path, {"127.0.0.153"}, 60).run(asked.append))
    try:
        await asyncio.sleep(0.05)
        new = tmp_path / "resolv.conf.dhclient-new"
        new.write_text("nameserver 198.51.100.9\n")
        new.replace(path)
        for _ in range(100):
            if asked:
                break
            await asyncio.sleep(0.01)
        assert len(asked) == 1 and "198.51.100.9" in asked[0]
    finally:
        task.cancel()
