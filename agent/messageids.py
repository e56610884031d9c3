"""The journal's MESSAGE_IDs of the agent's alerts: fixed, so they can be filtered on.

`journalctl MESSAGE_ID=3e7871e1ec4744c2a7e652f367228095` shows every time DNS went without a
private resolver, on any machine and any version. Like systemd's catalog ids, each is a random
128-bit number written as 32 lowercase hex digits, made once (`python3 -c 'import uuid;
print(uuid.uuid4().hex)'`) and never changed or reused: a new kind of alert gets a new id.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from agent.policy import Alert

# An alert raised: one id per kind (policy.Alert).
ALERT_RAISED: Mapping[Alert, str] = MappingProxyType(
    {
        Alert.NO_PRIVATE_DNS: "3e7871e1ec4744c2a7e652f367228095",
        Alert.DOWNGRADE: "047cdebbe4d34b539e2fc3dd87ae6ef5",
        Alert.KEY_CHANGED: "2388b851f2484a8283d644d2efb88ab3",
        Alert.CLEARTEXT: "11fd840f4d4549358381e6600dbfe19d",
        Alert.PORTAL: "6bbb191b678e47938b34cb80f6fe7d67",
        Alert.PORTAL_BLOCKED: "2d18b1628bec48128b8f2ffedffdaff2",
        Alert.TUNNEL_CLEARTEXT: "369649dd6f0c42419f43363eaf92bed7",
        Alert.TUNNEL_DOWN: "ed998ab9c1ab41848da11d53b1ec90ff",
        Alert.TOO_MANY: "b828706d983d4abe9f08443b8e404779",
    }
)

# An alert cleared (any kind; its ALERT= field says which).
ALERT_CLEARED = "41f84e5dc4294f88807b28612006f5cb"
