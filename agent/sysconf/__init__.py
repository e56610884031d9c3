"""Pointing the system's stub resolver at the tunnel, and back.

Every change to the system is recorded first in a journal (JOURNAL in the state
directory) so that `restore` - at stop, from the unit's ExecStopPost, or after a
crash - can undo it. The backends (resolv.conf, resolvconf, systemd-resolved,
NetworkManager) write that journal; until one has applied something, there is
nothing to restore.
"""

from __future__ import annotations

import logging
from pathlib import Path

LOG = logging.getLogger(__name__)

JOURNAL = "stub.json"


def restore(state_dir: Path) -> str:
    """Undo what the journal records; a human sentence saying what was done."""
    journal = state_dir / JOURNAL
    if not journal.exists():
        return "nothing to restore: the system stub was not changed"
    raise NotImplementedError(f"{journal}: no backend can read this journal yet")
