"""Timing a lease change in the NM lab: `nmcli device up` -> NetworkManager's DnsManager
signal naming the new resolver -> the first answer that comes from it; and, if asked, what
happened meanwhile to questions sent at a steady rate (the cost of a fast switch).

For the benchmarks (bench/nm_switch.py, bench/lease_to_answer.py). Run `time_lease` from a
thread inside the client's network namespace (`lab.cli.call`), where the agent listens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dns.asyncquery
import dns.exception
import dns.message

from tests.lab.nmlab import (
    DEVICE_IFACE,
    DNS_IFACE,
    DNS_PATH,
    NMLab,
    add_match,
    connect,
    nameservers,
    unwrap,
)

# One question under load -> the kind of its outcome ("new", "SERVFAIL", "timeout", ...);
# failures are outcomes, not exceptions (an exception ends the measurement).
Ask = Callable[[], Awaitable[str]]


@dataclass(frozen=True)
class Outcome:
    """One question of a steady load."""

    sent: float  # seconds from the renew
    kind: str  # what `Ask` said
    took: float  # seconds from sending to that outcome


@dataclass(frozen=True)
class LeaseTimes:
    """Seconds from the moment the new lease was asked for (`nmcli device up`)."""

    nm: float  # -> DnsManager.Configuration names the new resolver (PropertiesChanged)
    answer: float  # -> the first answer from the new resolver
    load: Mapping[str, tuple[Outcome, ...]] = field(default_factory=dict)  # see time_lease
    # every DnsManager.Configuration that NM signalled while this ran: (seconds from the
    # renew, its nameservers); () while the device is down
    dns: tuple[tuple[float, tuple[str, ...]], ...] = ()
    # every state the lab's device went through (Device.StateChanged): (seconds from the
    # renew, NMDeviceState; 100 is activated)
    device: tuple[tuple[float, int], ...] = ()

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


async def steady(ask: Ask, interval: float, t0: float, end: asyncio.Future[float]) -> list[Outcome]:
    """Ask every `interval` from `t0` on (time.monotonic), not waiting for the previous
    question, until the time `end` resolves to; then wait for every outcome. A steady rate:
    when the loop lags, the missed questions are skipped rather than sent in a burst."""

    async def one() -> Outcome:
        sent = time.monotonic()
        kind = await ask()
        return Outcome(sent - t0, kind, time.monotonic() - sent)

    asking: list[asyncio.Task[Outcome]] = []
    at = t0
    try:
        while not (end.done() and at > end.result()):
            now = time.monotonic()
            if at > now:
                await asyncio.sleep(at - now)
            elif now - at > interval:
                at = now
            asking.append(asyncio.create_task(one()))
            at += interval
        return list(await asyncio.gather(*asking))
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
    load: Mapping[str, Ask] | None = None,
    tail: float = 2.0,
) -> LeaseTimes:
    """Have dnsmasq hand out `target` alone, re-activate the connection (a fresh DHCP
    exchange) and time it: NM's signal naming `target`, and `answered()` (asked from the
    renew on, see `first_yes`) first saying yes, each `within` seconds of the renew. Returns
    once NM has activated again.

    `load`: each of these is also asked every `interval` (see `steady`), from the renew until
    `tail` seconds after that first yes; their outcomes come back in LeaseTimes.load, under
    the same names, once every question has one."""
    bus = await connect(lab.bus_address)
    loop = asyncio.get_running_loop()
    seen: asyncio.Future[float] = loop.create_future()
    end: asyncio.Future[float] = loop.create_future()
    loads: dict[str, asyncio.Task[list[Outcome]]] = {}
    changes: list[tuple[float, tuple[str, ...]]] = []
    states: list[tuple[float, int]] = []

    def on_message(msg: Any) -> None:
        if msg.path == lab.device_path and msg.member == "StateChanged":
            states.append((time.monotonic(), int(msg.body[0])))
        if msg.path == DNS_PATH and msg.member == "PropertiesChanged" and msg.body[0] == DNS_IFACE:
            changed = unwrap(msg.body[1])
            if "Configuration" not in changed:
                return
            servers = nameservers(changed["Configuration"])
            changes.append((time.monotonic(), tuple(servers)))
            if target in servers and not seen.done():
                seen.set_result(time.monotonic())

    try:
        bus.add_message_handler(on_message)
        await add_match(bus, f"type='signal',path='{DNS_PATH}',member='PropertiesChanged'")
        await add_match(
            bus, f"type='signal',path='{lab.device_path}',interface='{DEVICE_IFACE}',"
            "member='StateChanged'"
        )  # fmt: skip
        lab.set_dns([target])
        t0 = time.monotonic()
        renew = loop.run_in_executor(None, lab.renew, within)
        for name, ask in (load or {}).items():
            loads[name] = asyncio.create_task(steady(ask, interval, t0, end))
        t_answer = await first_yes(answered, interval, t0 + within)
        end.set_result(t_answer + tail)
        t_nm = await asyncio.wait_for(seen, max(0.0, t0 + within - time.monotonic()))
        await renew
        outcomes = {name: tuple(await task) for name, task in loads.items()}
    finally:
        for task in loads.values():
            task.cancel()
        await asyncio.gather(*loads.values(), return_exceptions=True)
        bus.disconnect()
    dns = tuple((t - t0, servers) for t, servers in changes)
    device = tuple((t - t0, state) for t, state in states)
    return LeaseTimes(t_nm - t0, t_answer - t0, outcomes, dns, device)
