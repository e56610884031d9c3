"""How deep JSON text nests, found before parsing it: json.loads recurses as deep as the
brackets go, and a file or request of a few thousand `[` must be an error, not a
RecursionError. One linear scan, the one home of this check (state, request, control)."""

from __future__ import annotations

import re

_TOKEN = re.compile(rb'\\.|["\[\]{}]', re.DOTALL)  # an escape pair, a quote, a bracket


def too_deep(raw: bytes | str, limit: int) -> bool:
    """Whether lists and objects nest deeper than `limit` (brackets inside strings aside).
    Linear in the input, and it stops at the first level too many."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    depth, in_string = 0, False
    for m in _TOKEN.finditer(data):
        c = m.group()
        if c == b'"':
            in_string = not in_string
        elif in_string or len(c) == 2:
            continue
        elif c in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False
