"""The one door to D-Bus: the library's names for the rest of the agent, method calls with
checked replies (`call`), and short synchronous conversations on the system bus for the stub
backends (`talk`).

Why a seam: dbus-next, which the distro package depends on (Debian 12's python3-dbus-next),
has had no release since 2021; dbus-fast is its maintained fork with the same API (and is
Debian 12's python3-dbus-fast). Only this module imports either, so the agent and its test
lab run on both, and which one is decided here, not all over the tree.

How the choice is made, once, at import: DNSTLS_AGENT_DBUS=dbus-next or =dbus-fast says
which; unset, dbus-next when it is installed, else dbus-fast when that is. The library
actually used is `IMPLEMENTATION`. mypy checks the tree against dbus-next's types.

The backends are called from the CLI (no event loop) and from the daemon (inside its
loop), so a conversation runs to its end either directly or in a worker thread with a
loop of its own, bounded in time. Errors come out as the caller's error type.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from agent.errors import AgentError

ENV = "DNSTLS_AGENT_DBUS"
IMPLEMENTATIONS = ("dbus-next", "dbus-fast")  # as pip and the env variable spell them


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def choose(
    environ: Mapping[str, str] = os.environ, installed: Callable[[str], bool] = _installed
) -> str:
    """The D-Bus library to use: the one `environ` names, else dbus-next unless only
    dbus-fast is installed."""
    wanted = environ.get(ENV, "").strip().lower()
    if wanted:
        if wanted not in IMPLEMENTATIONS:
            known = " or ".join(IMPLEMENTATIONS)
            raise ImportError(f"{ENV}={wanted!r}: not a D-Bus library the agent knows ({known})")
        return wanted
    if not installed("dbus_next") and installed("dbus_fast"):
        return "dbus-fast"
    return "dbus-next"


IMPLEMENTATION = choose()

if TYPE_CHECKING or IMPLEMENTATION == "dbus-next":
    from dbus_next.aio.message_bus import MessageBus
    from dbus_next.constants import BusType, MessageType, RequestNameReply
    from dbus_next.errors import AuthError, InvalidAddressError, InvalidMessageError
    from dbus_next.message import Message
    from dbus_next.signature import Variant
else:
    from dbus_fast.aio.message_bus import MessageBus
    from dbus_fast.constants import BusType, MessageType, RequestNameReply
    from dbus_fast.errors import AuthError, InvalidAddressError, InvalidMessageError
    from dbus_fast.message import Message
    from dbus_fast.signature import Variant

__all__ = [
    "IMPLEMENTATION",
    "TRANSPORT_ERRORS",
    "AuthError",
    "BusType",
    "InvalidAddressError",
    "InvalidMessageError",
    "Message",
    "MessageBus",
    "MessageType",
    "RequestNameReply",
    "Variant",
    "blocking",
    "call",
    "talk",
]

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
