"""Timing a lease change in the NM lab: `nmcli device up` -> NetworkManager's DnsManager
signal naming the new resolver -> the first answer that comes from it.

For the benchmarks (bench/nm_switch.py, bench/lease_to_answer.py). Run `time_lease` from a
thread inside the client's network namespace (`lab.cli.call`), where the agent listens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import dns.asyncquery
import dns.exception
import dns.message

from tests.lab.nmlab import DNS_IFACE, DNS_PATH, NMLab, add_match, connect, nameservers, unwrap


@dataclass(frozen=True)
class LeaseTimes:
    """Seconds from the moment the new lease was asked for (`nmcli device up`)."""

    nm: float  # -> DnsManager.Configuration names the new resolver (PropertiesChanged)
    answer: float  # -> the first answer from the new resolver

    @property
    def nm_to_answer(self) -> float:
        return self.answer - self.nm


async def address(server: str, name: str, within: float = 0.5) -> str | None:
    """The first address in `server`'s answer for `name` (A), or None: no answer `within`
    seconds, an error code or an empty answer (what a stub between two orders may say)."""
    try:
        r = await dns.asyncquery.udp(dns.message.make_query(name, "A"), server, timeout=within)
    except (OSError, dns.exception.DNSException):
        return None
    return str(r.answer[0][0].address) if r.answer else None


async def first_yes(
    answered: Callable[[], Awaitable[bool]], interval: float, deadline: float
) -> float:
    """When (time.monotonic) `answered()` first said yes. It is asked every `interval`
    without waiting for the previous one to finish, so a question the stub holds for a
    while (between two orders) does not blind the next ones."""
    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    asking: set[asyncio.Task[None]] = set()

    async def ask() -> None:
        try:
            yes = await answered()
        except Exception as exc:
            if not done.done():
                done.set_exception(exc)
            return
        if yes and not done.done():
            done.set_result(time.monotonic())

    try:
        while not done.done():
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from the new resolver in time")
            task = asyncio.create_task(ask())
            asking.add(task)
            task.add_done_callback(asking.discard)
            await asyncio.wait([done], timeout=interval)
        return done.result()
    finally:
        for task in asking:
            task.cancel()
        await asyncio.gather(*asking, return_exceptions=True)


async def time_lease(
    lab: NMLab,
    target: str,
    answered: Callable[[], Awaitable[bool]],
    *,
    interval: float = 0.005,
    within: float = 30.0,
) -> LeaseTimes:
    """Have dnsmasq hand out `target` alone, re-activate the connection (a fresh DHCP
    exchange) and time it: NM's signal naming `target`, and `answered()` (asked from the
    renew on, see `first_yes`) first saying yes, each `within` seconds of the renew. Returns
    once NM has activated again."""
    bus = await connect(lab.bus_address)
    loop = asyncio.get_running_loop()
    seen: asyncio.Future[float] = loop.create_future()

    def on_message(msg: Any) -> None:
        if msg.path == DNS_PATH and msg.member == "PropertiesChanged" and msg.body[0] == DNS_IFACE:
            config = unwrap(msg.body[1]).get("Configuration", [])
            if target in nameservers(config) and not seen.done():
                seen.set_result(time.monotonic())

    try:
        bus.add_message_handler(on_message)
        await add_match(bus, f"type='signal',path='{DNS_PATH}',member='PropertiesChanged'")
        lab.set_dns([target])
        t0 = time.monotonic()
        renew = loop.run_in_executor(None, lab.renew, within)
        t_answer = await first_yes(answered, interval, t0 + within)
        t_nm = await asyncio.wait_for(seen, max(0.0, t0 + within - time.monotonic()))
        await renew
    finally:
        bus.disconnect()
    return LeaseTimes(t_nm - t0, t_answer - t0)
