"""The one place that sequences side effects.

watcher snapshot -> link table (mark and sweep per source) -> policy -> probes ->
policy again -> tunnel (new order, atomically) -> state. Events are debounced; probes
run with bounded concurrency; the plan is re-made when a probe ends, a watcher
reports, the configuration is reloaded, or the plan's own wake-up time comes.

The loop is closed: what the running tunnel learns (an upstream failed on evidence,
recovered, the tunnel's mode changed) comes back here as `TunnelEvents`, goes through
the policy into what is known (a re-probe, the other TLS path first), and a change of
mode reaches the user as a warning like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

from agent import logsetup, messageids
from agent.config import Config
from agent.errors import UsageError
from agent.model import (
    Designation,
    Failure,
    Link,
    ProbeResult,
    ProbeSettings,
    Profile,
    Source,
    UpstreamSpec,
)
from agent.policy import (
    Plan,
    ProbeRequest,
    Warning,
    cache_networks,
    decide,
    is_static,
    learn,
    link_resolvers,
    search_domains,
    settings_for,
    tunnel_failed,
    with_statics,
)
from agent.probe import probe
from agent.state import State, Store
from agent.watchers.nm import NMSnapshot

LOG = logging.getLogger(__name__)

Prober = Callable[[str, ProbeSettings], Awaitable[ProbeResult]]


class TunnelControl(Protocol):
    """What the engine needs of the tunnel."""

    def set_upstreams(
        self,
        specs: Sequence[UpstreamSpec],
        *,
        profile: Profile | None = None,
        routes: Sequence[tuple[str, Sequence[UpstreamSpec]]] = (),
    ) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def flush_cache(self, why: str) -> int: ...


class LinkTable:
    """Facts per source. A snapshot replaces everything its source said before."""

    def __init__(self) -> None:
        self.by_source: dict[Source, dict[str, Link]] = {}

    def replace(self, source: Source, links: Mapping[str, Link]) -> bool:
        new = dict(links)
        if self.by_source.get(source) == new:
            return False
        self.by_source[source] = new
        return True

    def merged(self) -> list[Link]:
        """One Link per interface: NetworkManager's view first, else the lease's; the kernel
        says whether it is up and has the default route, and adds RA resolvers where
        NetworkManager does not manage the interface."""
        nm = self.by_source.get(Source.NM, {})
        lease = self.by_source.get(Source.LEASE, {})
        kernel = self.by_source.get(Source.NETLINK, {})
        names = set(nm) | set(lease) | {n for n, k in kernel.items() if k.resolvers}
        out = []
        for name in sorted(names):
            base = nm.get(name) or lease.get(name) or kernel[name]
            k = kernel.get(name)
            if k is not None:
                extra = (
                    () if name in nm else tuple(r for r in k.resolvers if r not in base.resolvers)
                )
                base = dataclasses.replace(
                    base,
                    up=base.up and k.up,
                    resolvers=base.resolvers + extra,
                    default_route=base.default_route or k.default_route,
                )
            out.append(base)
        return out


class Engine:
    def __init__(
        self,
        config: Config,
        tunnel: TunnelControl,
        store: Store,
        *,
        own_addresses: Collection[str] = (),
        prober: Prober = probe,
        clock: Callable[[], float] = time.time,
        on_warnings: Callable[[list[Warning], list[Warning]], None] | None = None,
        on_search: Callable[[tuple[str, ...]], None] | None = None,
    ) -> None:
        self.config = config
        self.tunnel = tunnel
        self.store = store
        self.state: State = store.load()
        self.own = set(own_addresses)
        self.prober = prober
        self.clock = clock
        self.on_warnings = on_warnings
        self.on_search = on_search
        self.search: tuple[str, ...] | None = None  # the network's search domains, last seen
        self.links = LinkTable()
        self.connectivity = "unknown"
        self.tunnel_mode: tuple[str, str] = ("private", "")  # as the tunnel reported it last
        self.portal_until = 0.0  # the end of a user-allowed captive-portal exception
        self.plan: Plan | None = None
        self.applied: tuple[Any, ...] | None = None
        self.held_until: float | None = None  # the order in use kept while no link has resolvers
        self._applied_network = False  # the order in use came from the network's links
        self.warnings: list[Warning] = []
        self.joined: dict[str, float] = {}  # network -> when it appeared (wall clock)
        self.probing: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.ready = asyncio.Event()  # set after the first decision
        self._dirty = asyncio.Event()
        self._limit = asyncio.Semaphore(config.max_parallel_probes)
        self._save_due = False
        self.decisions = 0  # counters for `statistics`, since the start or reset_counters()
        self.probes_run = 0
        self.cache_networks: frozenset[str] | None = None  # what the tunnel's cache was filled on

    def machine_links(self) -> list[Link]:
        """The watchers' links and, when none is managed, the machine-wide statics'
        pseudo-interface (policy.with_statics): what is planned, probed, learnt and shown."""
        return with_statics(self.links.merged(), self.config)

    # -- inputs (sync: watchers call these) ----------------------------------------------------
    def on_nm(self, snap: NMSnapshot) -> None:
        if not snap.running:
            LOG.warning("NetworkManager is not on the bus; keeping what it said last")
            return
        if snap.connectivity != self.connectivity:
            was, self.connectivity = self.connectivity, snap.connectivity
            LOG.info("connectivity %s -> %s", was, snap.connectivity)
            if was == "portal":  # logged in (or gone): back to TLS, learning it all again
                self.portal_until = 0.0
                self.reprobe()
            self.poke("connectivity changed")
        self._replace(Source.NM, snap.links)

    def on_netlink(self, links: Mapping[str, Link]) -> None:
        self._replace(Source.NETLINK, links)

    def on_leases(self, links: Mapping[str, Link]) -> None:
        self._replace(Source.LEASE, links)

    def _replace(self, source: Source, links: Mapping[str, Link]) -> None:
        if self.links.replace(source, links):
            self.poke(f"{source} changed")

    # -- what the running tunnel reports (TunnelEvents) ------------------------------------
    def upstream_failed(self, spec: UpstreamSpec, failure: Failure, detail: str) -> None:
        now = self.clock()
        changed = False
        for link in self.machine_links():
            if not any(r.address == spec.address for r in link.resolvers) and not any(
                u.address == spec.address for u in settings_for(self.config, link).static_resolvers
            ):
                continue
            key = (link.network_id, spec.address)
            k = tunnel_failed(self.state.knowledge.get(key), spec, failure, detail, now)
            if k is not None:
                self.state.remember(k)
                changed = True
        if changed:
            self._save_due = True
            self.poke(f"the tunnel's connection to {spec} failed ({failure})")

    def upstream_recovered(self, spec: UpstreamSpec) -> None:
        LOG.info("%s works again", spec)

    def mode_changed(self, mode: str, why: str) -> None:
        self.tunnel_mode = (str(mode), why)
        self.poke(f"tunnel mode {mode}")

    def poke(self, why: str) -> None:
        LOG.debug("re-planning: %s", why)
        self._dirty.set()

    def reprobe(self) -> None:
        """Forget freshness: every resolver in use is probed again now."""
        now = self.clock()
        for link in self.machine_links():
            self.joined[link.network_id] = now
        self.poke("re-probe asked for")

    def allow_portal(self, minutes: float) -> float:
        """The supervised exception: the portal's cleartext DNS for the login, for a while.

        It ends by itself when connectivity turns full or the time runs out."""
        if self.connectivity != "portal":
            raise UsageError(f"no captive portal now (connectivity: {self.connectivity})")
        self.portal_until = self.clock() + minutes * 60
        LOG.warning(
            "captive portal: cleartext DNS allowed for %.0f minute(s), by the user", minutes
        )
        self.poke("portal exception allowed")
        return self.portal_until

    def reload(self, config: Config) -> None:
        self.config = config
        self._limit = asyncio.Semaphore(config.max_parallel_probes)
        self.poke("configuration reloaded")

    # -- the loop ----------------------------------------------------------------------------
    async def run(self) -> None:
        self._dirty.set()
        try:
            while True:
                plan_wake = self.plan.wake_at if self.plan is not None else None
                wake = [t for t in (plan_wake, self.held_until) if t is not None]
                timeout = max(0.0, min(wake) - self.clock()) if wake else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._dirty.wait(), timeout)
                await asyncio.sleep(self.config.debounce)
                self._dirty.clear()
                self.step()
        finally:
            for task in self.probing.values():
                task.cancel()
            await asyncio.gather(*self.probing.values(), return_exceptions=True)
            self.save()

    def step(self) -> Plan:
        """Decide once and carry the decision out."""
        now = self.clock()
        links = self.machine_links()
        for link in links:
            if link.up and link.network_id not in self.joined:
                self.joined[link.network_id] = now
        present = {link.network_id for link in links if link.up}
        self.joined = {net: t for net, t in self.joined.items() if net in present}
        plan = decide(
            links,
            self.config,
            self.state.knowledge,
            now,
            own_addresses=self.own,
            probing=set(self.probing),
            joined=self.joined,
            connectivity=self.connectivity,
            portal_until=self.portal_until,
            tunnel_mode=self.tunnel_mode,
        )
        self.plan = plan
        self.decisions += 1
        self._follow_cache(links)
        self._apply(plan, links)
        if self.held_until is None:  # a held plan is carried out once the hold ends
            for req in plan.probes:
                self._start_probe(req)
            self._warn(list(plan.warnings))
        search = search_domains(links)
        if search != self.search:
            self.search = search
            LOG.info("search domains: %s", " ".join(search) or "none")
            if self.on_search is not None:
                self.on_search(search)
        if self._save_due:
            self.save()
        self.ready.set()
        return plan

    def _apply(self, plan: Plan, links: list[Link]) -> None:
        routes = tuple((r.domain, r.upstreams) for r in plan.routes)
        wanted = (plan.profile, plan.upstreams, routes)
        if wanted == self.applied:  # back to the order in use: no longer held
            self.held_until = None
            return
        if self._holding(plan, links):
            return
        LOG.info(
            "order (%s): %s",
            plan.profile or "nothing to manage",
            ", ".join(map(str, plan.upstreams)) or "none",
        )
        try:
            self.tunnel.set_upstreams(plan.upstreams, profile=plan.profile, routes=routes)
        except UsageError as exc:  # a limit the policy did not know of: never the engine's end
            LOG.error("the tunnel refused the order (%s); the one in use is kept", exc)
            return
        self.applied = wanted
        self._applied_network = not any(map(is_static, links))
        by_if = {link.ifname: link.network_id for link in links}
        for link_name, net in by_if.items():
            mine = [str(c.upstream) for c in plan.choices if c.ifname == link_name and c.upstream]
            if mine and self.state.orders.get(net) != mine:
                self.state.orders[net] = mine
                self._save_due = True

    def _follow_cache(self, links: list[Link]) -> None:
        nets = cache_networks(links)
        if not nets or nets == self.cache_networks:
            return  # none for a moment (re-activating): answers are not carried anywhere
        if self.cache_networks is not None:
            was = ", ".join(sorted(self.cache_networks)) or "none"
            self.tunnel.flush_cache(f"network changed: {was} -> {', '.join(sorted(nets))}")
        self.cache_networks = nets

    def _in_use(self, plan: Plan | None) -> Sequence[UpstreamSpec]:
        """The order the tunnel has: the plan's, or the one kept while held."""
        if self.held_until is not None and self.applied is not None:
            held: Sequence[UpstreamSpec] = self.applied[1]
            return held
        return plan.upstreams if plan else ()

    def _holding(self, plan: Plan, links: list[Link]) -> bool:
        """Keep the order in use a moment (the configuration's hold_empty) when the plan is
        empty (or made of the machine-wide statics only) because no interface has resolvers
        just now.

        NetworkManager re-activating a device empties its DNS configuration for 30-250 ms,
        longer on real DHCP; an empty order in between (the tunnel answers SERVFAIL at
        once) failed every query sent in that window (bench/lease_to_answer.py --loss).
        Only the order already in use is kept: nothing less private than before. Nor does
        the statics' pseudo-interface take over for such a moment (its probes, its
        warnings): a held plan is carried out only once the hold runs out."""
        statics = any(map(is_static, links))
        gone = (
            self.applied is not None
            and bool(self.applied[1])
            and not any(x.up and x.resolvers for x in links if not is_static(x))
            # the statics alone: held only when they would take over from the network's
            and (self._applied_network if statics else not plan.upstreams)
        )
        if not gone:
            self.held_until = None
            return False
        now = self.clock()
        if self.held_until is None:
            self.held_until = now + self.config.hold_empty
            LOG.info(
                "no interface has resolvers: the order in use is kept %.1f s (re-activating?)",
                self.config.hold_empty,
            )
        if now < self.held_until:
            return True
        self.held_until = None
        return False

    def _warn(self, warnings: list[Warning]) -> None:
        old = {(w.alert, w.ifname, w.address) for w in self.warnings}
        new = {(w.alert, w.ifname, w.address) for w in warnings}
        raised = [w for w in warnings if (w.alert, w.ifname, w.address) not in old]
        cleared = [w for w in self.warnings if (w.alert, w.ifname, w.address) not in new]
        profile = self.plan.profile if self.plan else None
        for w in raised:
            LOG.warning("%s: %s", w.alert, w.text, extra=_journal(w, profile, cleared=False))
        for w in cleared:
            LOG.info(
                "no longer %s: %s", w.alert, w.ifname, extra=_journal(w, profile, cleared=True)
            )
        self.warnings = warnings
        if (raised or cleared) and self.on_warnings is not None:
            self.on_warnings(raised, cleared)

    # -- probing ------------------------------------------------------------------------------
    def _start_probe(self, req: ProbeRequest) -> None:
        key = (req.network, req.address)
        if key in self.probing:
            return
        LOG.info("probing %s on %s: %s", req.address, req.ifname, req.reason)
        task = asyncio.create_task(self._probe(req), name=f"probe {req.address}")
        self.probing[key] = task
        task.add_done_callback(lambda _t: self.probing.pop(key, None))

    async def _probe(self, req: ProbeRequest) -> None:
        async with self._limit:
            result = await self.prober(req.address, req.settings)
        self.probes_run += 1
        link = next((x for x in self.machine_links() if x.network_id == req.network), None)
        s = settings_for(self.config, link) if link else self.config.defaults
        previous = self.state.knowledge.get((req.network, req.address))
        k = learn(
            previous, result, network=req.network, now=self.clock(), negative_cache=s.negative_cache
        )
        self.state.remember(k)
        self._save_due = True
        auth = f", {result.auth}" if result.auth else ""
        if result.auth_source is not None:
            auth += f" ({result.auth_source})"
        LOG.info("%s on %s: %s%s (%s)", req.address, req.ifname, result.method, auth,
                 "; ".join(f"{p}: {w}" for p, w in result.failures.items()) or "ok")  # fmt: skip
        self.poke(f"probe of {req.address} done")

    def counters(self) -> dict[str, int]:
        return {"probes": self.probes_run, "decisions": self.decisions}

    def reset_counters(self) -> None:
        self.probes_run = self.decisions = 0

    def save(self) -> None:
        self._save_due = False
        try:
            self.store.save(self.state)
        except OSError as exc:
            LOG.error("cannot save state to %s: %s", self.store.path, exc.strerror or exc)

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        plan = self.plan
        links = self.machine_links()
        out_links = []
        for link in links:
            s = settings_for(self.config, link)
            resolvers = []
            for r in link_resolvers(link, self.config, self.state.knowledge, self.own):
                k = self.state.knowledge.get((link.network_id, r.address))
                choice = next(
                    (
                        c
                        for c in (plan.choices if plan else ())
                        if c.ifname == link.ifname and c.address == r.address
                    ),
                    None,
                )
                resolvers.append({
                    "address": r.address,
                    "origin": r.origin.value,
                    "auth_name": r.auth_name,
                    "port": k.tls_port if k and k.tls_port else r.port,
                    "designated": [_designation(d) for d in (k.designated if k else ())],
                    "method": k.method.value if k else None,
                    "auth": k.auth.value if k and k.auth else None,
                    "auth_source": k.auth_source.value if k and k.auth_source else None,
                    "latency_ms": k.latency_ms if k else None,
                    "probed_at": k.probed_at if k else None,
                    "used": bool(choice and choice.upstream),
                    "reason": choice.reason if choice else "",
                    "probing": (link.network_id, r.address) in self.probing,
                })  # fmt: skip
            out_links.append({
                "interface": link.ifname,
                "up": link.up,
                "network": link.network_id,
                "profile": s.profile.value,
                "domains": list(link.domains),
                "vpn": link.vpn,
                "resolvers": resolvers,
            })  # fmt: skip
        return {
            "profile": plan.profile.value if plan and plan.profile else None,
            "reason": plan.reason if plan else "starting",
            "order": [str(u) for u in self._in_use(plan)],
            "routes": {r.domain: [str(u) for u in r.upstreams] for r in plan.routes}
            if plan
            else {},
            "connectivity": self.connectivity,
            "portal_until": self.portal_until or None,
            "search": list(self.search or ()),
            "held_until": self.held_until,
            "warnings": [
                {"alert": w.alert.value, "interface": w.ifname, "text": w.text}
                for w in self.warnings
            ],
            "interfaces": out_links,
            "tunnel": self.tunnel.status(),
        }


def _journal(w: Warning, profile: Profile | None, *, cleared: bool) -> dict[str, Any]:
    """A warning's journal fields (logsetup): its MESSAGE_ID, and where it applies."""
    return logsetup.fields(
        messageids.ALERT_CLEARED if cleared else messageids.ALERT_RAISED[w.alert],
        ALERT=w.alert.value,
        INTERFACE=w.ifname,
        RESOLVER=w.address,
        PROFILE=profile.value if profile else None,
    )


def _designation(d: Designation) -> str:
    how = "verified" if d.verified else "opportunistic"
    return f"{d.adn}@{d.address}:{d.port} ({how})"
