"""The one place for the command's expensive imports: each is loaded at its first use.

The daemon's, the stub's, the prober's and the tunnel's modules (and asyncio) are imported
only by the commands that use them: the netlink watcher's pyroute2 alone costs 24 MiB of
memory, and D-Bus another 5, which `tunnel` (a forwarder on its own, like stubby) and the
small commands do not need; and the small commands start in half the time (asyncio, ssl
and cryptography are most of it), which the hooks' callers wait for: dhclient runs
`stub --dhclient` before it goes on.

Use them as `lazy.asyncio.run(...)`, `lazy.sysconf.apply(...)`: the module is imported when
its first attribute is looked up. A command module imports at its top only what is cheap
(agent.config, agent.control, agent.model, agent.errors, the tunnel's settings). To add a
module here: import it under TYPE_CHECKING (what mypy sees), make it a `_Lazy` of the same
name below (what runs), and list it in __all__.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "asyncio",
    "daemon",
    "forwarder",
    "notifications",
    "policy",
    "privacy",
    "probe",
    "request",
    "sysconf",
    "uvloop",
]


class _Lazy:
    """A module, imported at its first attribute lookup (ImportError raised there)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


if TYPE_CHECKING:
    import asyncio

    import uvloop  # optional: python3-uvloop

    from agent import daemon, notifications, policy, probe, sysconf
    from agent.sysconf import privacy, request
    from agent.tunnel import forwarder
else:
    asyncio = _Lazy("asyncio")
    uvloop = _Lazy("uvloop")
    daemon = _Lazy("agent.daemon")
    notifications = _Lazy("agent.notifications")
    policy = _Lazy("agent.policy")
    probe = _Lazy("agent.probe")
    sysconf = _Lazy("agent.sysconf")
    privacy = _Lazy("agent.sysconf.privacy")
    request = _Lazy("agent.sysconf.request")
    forwarder = _Lazy("agent.tunnel.forwarder")
