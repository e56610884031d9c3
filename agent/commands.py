"""What the control commands that read or ask do, given the engine and the tunnel: `query`
(one question through the tunnel, and where its answer came from) and `statistics` (the
counters, and their reset). agent/daemon.py's `handle` checks who may and dispatches here;
every request field is validated completely before anything is done (UsageError).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from agent.control import request_text
from agent.engine import Engine
from agent.errors import AgentError, UsageError
from agent.model import UpstreamSpec
from agent.policy import link_resolvers
from agent.tunnel.forwarder import Tunnel

LOG = logging.getLogger(__name__)

MAX_NAME_TEXT = 4 * 255  # characters of a name as typed: 255 octets, escaped as \DDD at most


def query_question(request: dict[str, Any]) -> tuple[dns.name.Name, dns.rdatatype.RdataType]:
    """The question of a `query` request, checked whole (else UsageError): a name of at most
    255 octets and labels of 63, absolute, with no control character (typed or escaped); a
    type by its mnemonic or TYPEnnn (default A), no meta type but ANY."""
    text = request_text(request, "name", max_len=MAX_NAME_TEXT)
    kind = request_text(request, "type", max_len=16) or "A"
    if not text:
        raise UsageError('name is empty (the root is ".")')
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise UsageError(f"name {text!r} has a control character")
    try:
        name = dns.name.from_text(text)
    except (dns.exception.DNSException, ValueError) as exc:  # ValueError: IDNA's UnicodeError
        raise UsageError(f"name {text!r}: {exc}") from None
    if any(b < 0x20 or b == 0x7F for label in name.labels for b in label):
        raise UsageError(f"name {text!r} has a control character")
    try:
        rdtype = dns.rdatatype.from_text(kind)
    except (dns.exception.DNSException, ValueError):
        raise UsageError(f"type {kind!r} is not a record type (A, AAAA, MX, TYPE65 ...)") from None
    if rdtype == 0 or (dns.rdatatype.is_metatype(rdtype) and rdtype != dns.rdatatype.ANY):
        raise UsageError(f"type {kind!r} is not a type to ask for")
    return name, rdtype


async def query(
    engine: Engine, tunnel: Tunnel, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
) -> dict[str, Any]:
    """One question through the tunnel, the way a client's goes (`dnstls-agent query`),
    and where its answer came from."""
    message = dns.message.make_query(name, rdtype, use_edns=0, want_dnssec=False)  # RD set
    got = await tunnel.resolve(message.to_wire())
    try:
        reply = dns.message.from_wire(got.wire)
    except dns.exception.DNSException as exc:
        raise AgentError(f"the answer for {name} could not be read: {exc}") from None
    return {
        "ok": True,
        "name": name.to_text(),
        "type": dns.rdatatype.to_text(rdtype),
        "rcode": dns.rcode.to_text(reply.rcode()),
        "answer": [line for rrset in reply.answer for line in rrset.to_text().splitlines()],
        "upstream": str(got.upstream) if got.upstream else None,
        "method": got.upstream.method.value if got.upstream else None,
        **known(engine, got.upstream),
        "from_cache": got.from_cache,
        "ms": round(got.seconds * 1000, 3),
    }


def known(engine: Engine, spec: UpstreamSpec | None) -> dict[str, Any]:
    """What the engine learnt of the resolver behind `spec`, on the link the plan chose it
    for: how it authenticated, where that identity came from, who designated it."""
    found: dict[str, Any] = dict.fromkeys(("auth", "auth_source", "origin", "interface"))
    if spec is None or engine.plan is None:
        return found
    links = {link.ifname: link for link in engine.machine_links()}
    for c in engine.plan.choices:
        link = links.get(c.ifname)
        if c.upstream != spec or link is None:
            continue
        k = engine.state.knowledge.get((link.network_id, c.address))
        resolvers = link_resolvers(link, engine.config, engine.state.knowledge, engine.own)
        r = next((r for r in resolvers if r.address == c.address), None)
        found.update(
            auth=k.auth.value if k and k.auth else None,
            auth_source=k.auth_source.value if k and k.auth_source else None,
            origin=r.origin.value if r else None,
            interface=c.ifname,
        )
        break
    return found


def statistics(engine: Engine, tunnel: Tunnel) -> dict[str, Any]:
    """The counters of the tunnel (its clients, cache, upstreams) and of the engine."""
    status = tunnel.status()
    return {
        "since": tunnel.stats.since,
        "now": time.time(),
        "clients": status["clients"],
        "cache": status["cache"],
        "upstreams": status["upstreams"],
        "engine": engine.counters(),
    }


def reset_statistics(engine: Engine, tunnel: Tunnel, now: float) -> None:
    """Every counter to zero, counting from `now`; the cache keeps its answers."""
    tunnel.reset_stats(now)
    engine.reset_counters()
    LOG.info("statistics reset")
