"""Telling the user where users look: desktop notifications over D-Bus, best effort.

org.freedesktop.Notifications on a session bus. The daemon uses the session bus of
its environment when it has one (run by hand in a desktop session); the system
service has none, so `dnstls-agent notifications`, run in the user's session, relays
the running agent's warnings. No session bus, no notification daemon: no error, the
log and `status` still say it all.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from agent.dbus import Message, MessageBus, MessageType, Variant

LOG = logging.getLogger(__name__)

SERVICE = "org.freedesktop.Notifications"
PATH = "/org/freedesktop/Notifications"
APP = "dnstls-agent"
URGENT = {"no-private-dns", "downgrade", "portal-blocked", "key-changed"}
TITLES = {
    "no-private-dns": "No private DNS",
    "downgrade": "DNS encryption downgraded",
    "key-changed": "DNS server key changed",
    "cleartext": "DNS in cleartext",
    "portal": "Captive portal",
    "portal-blocked": "Captive portal: DNS blocked",
}


class DesktopNotifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address or os.environ.get("DBUS_SESSION_BUS_ADDRESS") or None
        self.bus: Any = None

    async def notify(self, alert: str, text: str) -> bool:
        """Show one notification; False (and a debug log line) when nobody can show it."""
        if not self.address:
            return False
        try:
            if self.bus is None or not self.bus.connected:
                self.bus = await MessageBus(bus_address=self.address).connect()
            urgency = Variant("y", 2 if alert in URGENT else 1)
            title = TITLES.get(alert, "DNS")
            body = [APP, 0, "network-wireless-encrypted", title, text, [], {"urgency": urgency}, -1]
            msg = Message(
                destination=SERVICE,
                path=PATH,
                interface=SERVICE,
                member="Notify",
                signature="susssasa{sv}i",
                body=body,
            )
            reply = await self.bus.call(msg)
        except (OSError, EOFError, ValueError) as exc:
            LOG.debug("no desktop notification (%s): %s", exc, text)
            self.bus = None
            return False
        if reply is None or reply.message_type == MessageType.ERROR:
            LOG.debug("no desktop notification (%s): %s", reply.body if reply else "no reply", text)
            return False
        return True

    def close(self) -> None:
        if self.bus is not None:
            self.bus.disconnect()
            self.bus = None
