"""D-Bus as the agent uses it: method calls with checked replies (`call`), and short
synchronous conversations on the system bus for the stub backends (`talk`).

The backends are called from the CLI (no event loop) and from the daemon (inside its
loop), so a conversation runs to its end either directly or in a worker thread with a
loop of its own, bounded in time. Errors come out as the caller's error type.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType, MessageType
from dbus_next.errors import AuthError, InvalidAddressError, InvalidMessageError
from dbus_next.message import Message

from agent.errors import AgentError

T = TypeVar("T")
TIMEOUT = 10.0  # one whole conversation
TRANSPORT_ERRORS = (
    OSError,
    EOFError,
    TimeoutError,
    AuthError,
    InvalidAddressError,
    InvalidMessageError,
)


def blocking(make: Callable[[], Awaitable[T]], timeout: float = TIMEOUT) -> T:
    """Run a coroutine to its end from synchronous code: directly from the CLI, in a worker
    thread with a loop of its own when called inside a running loop (asyncio.run cannot
    nest). The caller's loop then waits: at most `timeout`, once at start and at stop."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await make()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(bounded())
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sysconf-dbus") as pool:
        return pool.submit(lambda: asyncio.run(bounded())).result()


def talk(
    address: str | None,
    work: Callable[[Any], Awaitable[T]],
    *,
    error: type[AgentError],
    where: str,
    timeout: float = TIMEOUT,
) -> T:
    """One connection to the bus (`address`, else the system bus), `work(bus)`, goodbye."""

    async def conversation() -> T:
        bus: Any  # dbus-next 0.2.3 is partly annotated
        bus = MessageBus(bus_address=address) if address else MessageBus(bus_type=BusType.SYSTEM)
        await bus.connect()
        try:
            return await work(bus)
        finally:
            bus.disconnect()

    try:
        return blocking(conversation, timeout)
    except TRANSPORT_ERRORS as exc:
        raise error(f"{where}: {exc!r}") from exc


async def call(
    bus: Any,
    path: str,
    iface: str,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
    *,
    dest: str,
    error: type[AgentError],
) -> list[Any]:
    """A method call; a D-Bus error or no reply raises `error`, naming the call."""
    msg = Message(destination=dest, path=path, interface=iface, member=member,
                  signature=signature, body=body or [])  # fmt: skip
    reply = await bus.call(msg)
    if reply is None:
        raise error(f"{iface}.{member} on {path}: no reply")
    if reply.message_type == MessageType.ERROR:
        detail = reply.body[0] if reply.body else ""
        raise error(f"{dest} {iface}.{member}: {reply.error_name}: {detail}")
    return list(reply.body)
