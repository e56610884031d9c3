"""Pure decisions: which resolvers the tunnel uses, in what order, under which profile, and why.

No I/O, no clock (time is a parameter), no asyncio: everything here is a function
of the link table, the configuration and what was learnt, so it is tested
table-driven with a fake clock. Every choice carries a reason a human can read.

This is the one place that decides what may travel in cleartext, to whom and over
which transport: an order reaches the tunnel with its cleartext entries, if any,
spelled out (last, after every private one), and the tunnel adds nothing.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from agent.config import Config, ConfigProfile, LinkSettings
from agent.model import (
    Auth,
    AuthSource,
    AuthSpec,
    Failure,
    Knowledge,
    Link,
    Method,
    NetResolver,
    Order,
    Origin,
    Path,
    ProbeResult,
    ProbeSettings,
    Profile,
    Source,
    UpstreamSpec,
)
from agent.tunnel.settings import MAX_UPSTREAMS  # light: the tunnel's limit, not the tunnel

MAX_PINS_SEEN = 8
KEY_STABLE_PROBES = 3  # a changed key is warned about until seen in this many probes in a row
SUSPECT_REPROBE_MIN = 30.0  # a resolver the tunnel saw fail is re-probed at most this often
# What a network hands out is bounded before it costs anything: a plan never holds more than
# the tunnel takes (MAX_UPSTREAMS, the best ones), starts at most so many probes per network at
# a time (the rest when they end), and takes so many search domains per interface.
MAX_PROBES_PER_NETWORK = 16
MAX_LINK_DOMAINS = 32  # as many as the system stub takes (sysconf.request.MAX_DOMAINS)
OVER_THE_LIMIT = f"over the limit of {MAX_UPSTREAMS}: not used"
_STRICTNESS = {Profile.OPPORTUNISTIC: 0, Profile.ENCRYPTED: 1, Profile.STRICT: 2}


class Alert(StrEnum):
    NO_PRIVATE_DNS = "no-private-dns"  # strict/encrypted link without a usable resolver
    DOWNGRADE = "downgrade"  # did TLS on this network before, does not now
    KEY_CHANGED = "key-changed"  # shows another key than before on this network
    CLEARTEXT = "cleartext"  # opportunistic: this link's DNS goes out in cleartext
    PORTAL = "portal"  # a captive portal: its own (cleartext, often spoofed) DNS in use
    PORTAL_BLOCKED = "portal-blocked"  # strict/encrypted behind a portal: no DNS until allowed
    TUNNEL_CLEARTEXT = "tunnel-cleartext"  # at run time: every private path failed, cleartext now
    TUNNEL_DOWN = "tunnel-down"  # at run time: nothing answers, no DNS
    TOO_MANY = "too-many"  # more resolvers (or search domains) than are used: the rest left out


TUNNEL = "tunnel"  # the `ifname` of warnings about the whole machine's tunnel


@dataclass(frozen=True)
class Warning:
    alert: Alert
    ifname: str
    address: str | None
    text: str


@dataclass(frozen=True)
class ProbeRequest:
    network: str
    ifname: str
    address: str
    settings: ProbeSettings
    reason: str


@dataclass(frozen=True)
class Choice:
    """The decision about one resolver of one link."""

    ifname: str
    address: str
    upstream: UpstreamSpec | None  # None: not used
    reason: str


@dataclass(frozen=True)
class Route:
    """Split DNS: names under `domain` go to these upstreams."""

    domain: str
    upstreams: tuple[UpstreamSpec, ...]


@dataclass(frozen=True)
class Plan:
    profile: Profile | None  # None: the agent manages nothing (no link, or all off)
    upstreams: tuple[UpstreamSpec, ...]
    routes: tuple[Route, ...]
    choices: tuple[Choice, ...]
    probes: tuple[ProbeRequest, ...]
    warnings: tuple[Warning, ...]
    wake_at: float | None  # when to look again (re-probe, negative cache expiry)
    reason: str


def to_profile(p: ConfigProfile) -> Profile | None:
    return None if p is ConfigProfile.OFF else Profile(p.value)


def settings_for(config: Config, link: Link) -> LinkSettings:
    if is_static(link):
        return config.defaults
    return config.for_link(link.ifname, link.connection, link.ssid)


# -- the machine-wide statics --------------------------------------------------------------------

STATIC = "static"  # the `ifname` of the pseudo-interface of the global static_resolvers


def is_static(link: Link) -> bool:
    """The pseudo-interface of `with_statics`: the watchers' links never carry resolvers
    of the configuration's own, so this cannot be taken for an interface called "static"."""
    return (
        link.ifname == STATIC
        and bool(link.resolvers)
        and all(r.source is Source.STATIC for r in link.resolvers)
    )


def _managed(link: Link, s: LinkSettings) -> bool:
    return (
        link.up and to_profile(s.profile) is not None and bool(link.resolvers or s.static_resolvers)
    )


def _static_resolver(u: UpstreamSpec) -> NetResolver:
    return NetResolver(u.address, u.auth_name, u.port, True, Source.STATIC, Origin.CONFIGURED)


def with_statics(links: Iterable[Link], config: Config) -> list[Link]:
    """The links a plan is made of: the network's and, when none of them is managed, the
    global `static_resolvers` as one machine-wide pseudo-interface ("static", the global
    settings, its own network "if:static" for what is learnt).

    A server, a container or a VM configured by hand has no NetworkManager, no lease and
    maybe no interface but lo: the statics alone are its resolvers. While some interface
    is managed they go with it instead, as its settings say (a section may replace them).
    Idempotent: the pseudo-interface, once there, is managed itself."""
    out = list(links)
    statics = config.defaults.static_resolvers
    if not statics or to_profile(config.defaults.profile) is None:
        return out
    if any(_managed(link, settings_for(config, link)) for link in out):
        return out
    return [*out, Link(STATIC, resolvers=tuple(_static_resolver(u) for u in statics))]


def cache_networks(links: Iterable[Link]) -> frozenset[str]:
    """The networks the tunnel's answers come from: the up links with resolvers. When this
    changes (to something, not to nothing for a moment), the cache is emptied: no answer is
    carried from one network to the next."""
    return frozenset(link.network_id for link in links if link.up and link.resolvers)


# -- learning ------------------------------------------------------------------------------------


def learn(
    previous: Knowledge | None,
    result: ProbeResult,
    *,
    network: str,
    now: float,
    negative_cache: float,
) -> Knowledge:
    """Fold one probe result into what is known about the resolver on this network."""
    prev = previous or Knowledge(network=network, address=result.address)
    private = result.method.private
    pin = (
        result.tls.pin
        if result.tls
        else next((p.tls.pin for p in result.paths if p.tls is not None), None)
    )
    seen = prev.pins_seen
    if pin and (not seen or seen[-1] != pin):
        seen = (*seen, pin)[-MAX_PINS_SEEN:]
    answered_dns = result.method in (Method.TCP_PLAIN, Method.UDP_PLAIN)
    stable = prev.pin_stable + 1 if pin and pin == prev.pin else (1 if pin else prev.pin_stable)
    path_first = prev.path_first
    if result.method is Method.TLS_PORT:
        path_first = Order.PORT_FIRST
    elif result.method is Method.TLS_UPGRADE:
        path_first = Order.UPGRADE_FIRST
    return replace(
        prev,
        method=result.method,
        auth=result.auth,
        pin=pin or prev.pin,
        pins_seen=seen,
        latency_ms=result.timings.answer_ms if private else None,
        probed_at=now,
        tls_ok_at=now if private else prev.tls_ok_at,
        # The draft: a server that answers DNS but refused TLS (or failed the handshake)
        # is not asked again for a while. One that answered nothing may be just offline.
        negative_until=now + negative_cache if answered_dns else 0.0,
        path_first=path_first,
        resumption=result.resumption,
        failures=tuple(f"{k}: {v}" for k, v in result.failures.items()),
        plain=plain_seen(result),
        pin_stable=stable,
        suspect_at=0.0,
        suspect="",
        auth_source=result.auth_source,
        designated=result.ddr.usable if result.ddr is not None else (),
        tls_port=result.tls_port,
    )


def plain_seen(result: ProbeResult) -> Method | None:
    """The cleartext transport the resolver answered on in this probe, if any: TCP/53 (the
    STARTTLS exchange, or a plain answer there), else UDP/53 (the TO hint)."""
    tcp = result.method is Method.TCP_PLAIN or any(
        p.path is Path.UPGRADE and p.to_in_response is not None for p in result.paths
    )
    if tcp:
        return Method.TCP_PLAIN
    if result.method is Method.UDP_PLAIN or any(
        p.path is Path.UDP and p.method is Method.UDP_PLAIN for p in result.paths
    ):
        return Method.UDP_PLAIN
    return None


def tunnel_failed(
    k: Knowledge | None, spec: UpstreamSpec, failure: Failure, detail: str, now: float
) -> Knowledge | None:
    """The running tunnel's connection to a private upstream failed on evidence: what was
    learnt in the probe is suspect, and the resolver is probed again (at most every
    SUSPECT_REPROBE_MIN s): the probe finds what works now (the other TLS path, or
    nothing), and the order follows. A cleartext upstream's failure teaches nothing here."""
    if k is None or not spec.private or spec.method is not k.method:
        return None
    return replace(k, suspect_at=now, suspect=f"{spec.method} {failure}: {detail}")


def tunnel_order(
    specs: Iterable[UpstreamSpec],
    profile: Profile,
    *,
    cleartext_fallback: bool = True,
    cleartext_port: int = 53,
) -> tuple[UpstreamSpec, ...]:
    """The order for a tunnel given its upstreams by hand (the `tunnel` command): as given,
    and, under opportunistic with the fallback on, the same resolvers in plain DNS over TCP
    last, each used only once every private path failed."""
    order = list(dict.fromkeys(specs))
    if profile.allows_cleartext and cleartext_fallback:
        for s in [s for s in order if s.private]:
            fallback = UpstreamSpec(s.address, Method.TCP_PLAIN, cleartext_port)
            if fallback not in order:
                order.append(fallback)
    return tuple(order)


# -- deciding ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    link_rank: tuple[int, int, int, str]
    designated: int  # 0: designated as an encrypted resolver (DNR, DDR): before the others
    tier: int  # 0 authenticated TLS, 1 TLS, 2 not probed yet (TLS tried), 3 cleartext
    latency: float
    index: int
    upstream: UpstreamSpec
    ifname: str
    profile: Profile


def _link_rank(link: Link) -> tuple[int, int, int, str]:
    return (link.priority, 0 if link.default_route else 1, 0 if link.vpn else 1, link.ifname)


def search_domains(links: Iterable[Link]) -> tuple[str, ...]:
    """The search list the system stub should carry: the up links' domains, in the order
    their resolvers are preferred, each once (routing-only `~domain`s are not searched)."""
    out: dict[str, None] = {}
    for link in sorted((x for x in links if x.up), key=_link_rank):
        for d in link.domains[:MAX_LINK_DOMAINS]:
            name = d.strip().rstrip(".").lower()
            if name and not name.startswith("~"):
                out.setdefault(name)
    return tuple(out)


def _resolvers(
    link: Link,
    s: LinkSettings,
    own: Collection[str],
    knowledge: Mapping[tuple[str, str], Knowledge] | None = None,
) -> list[NetResolver]:
    """The link's resolvers as they are used: the encrypted resolvers the network designated
    (DNR) first, as the watchers put them; before each resolver, those it designated for
    itself at other addresses and this agent may use (DDR: verified, `learn`); then the
    others; then the configured statics. Each address once (the first, most designated,
    form wins), none ignored or of the agent's own."""
    out: list[NetResolver] = []
    seen: set[str] = set()
    statics = [_static_resolver(u) for u in s.static_resolvers]
    for r in [*link.resolvers, *statics]:
        for x in [*_ddr_resolvers(link, r, knowledge), r]:
            if x.address in seen or x.address in s.ignore_resolvers or x.address in own:
                continue
            seen.add(x.address)
            out.append(x)
    return out


def _ddr_resolvers(
    link: Link, r: NetResolver, knowledge: Mapping[tuple[str, str], Knowledge] | None
) -> list[NetResolver]:
    """What `r` designated for itself at other addresses (DDR), as usable as the RFC allows:
    only verified ones get there (`Designation.usable`), and their name authenticates them
    as a name the network handed out does. One at its own address is `r` on another TLS
    port: the probe of `r` finds it there (`Knowledge.tls_port`)."""
    k = knowledge.get((link.network_id, r.address)) if knowledge and not r.designated else None
    if k is None:
        return []
    return [
        NetResolver(d.address, d.adn or None, d.port, True, r.source, Origin.DDR, d.priority)
        for d in sorted(k.designated, key=lambda d: d.priority)
        if d.usable and d.verified and d.address != r.address
    ]


def link_resolvers(
    link: Link,
    config: Config,
    knowledge: Mapping[tuple[str, str], Knowledge],
    own: Collection[str] = (),
) -> list[NetResolver]:
    """The resolvers of one link as the plan uses them (for `status`)."""
    return _resolvers(link, settings_for(config, link), own, knowledge)


def auth_name(s: LinkSettings, r: NetResolver) -> tuple[str | None, AuthSource]:
    """The name to authenticate the resolver by, and where it came from: configuration
    first (a static resolver's own #NAME, then the link's auth_name). A name the network
    handed out (NetworkManager's ADDR#name) is used only when none is configured, and
    then authenticates no more than the address the network handed out does."""
    for u in s.static_resolvers:
        if u.address == r.address and u.auth_name:
            return u.auth_name, AuthSource.CONFIGURED
    if s.auth_name:
        return s.auth_name, AuthSource.CONFIGURED
    if r.auth_name and r.source is not Source.STATIC:
        return r.auth_name, AuthSource.NETWORK
    return None, AuthSource.CONFIGURED


def auth_spec(profile: Profile, s: LinkSettings, r: NetResolver) -> AuthSpec:
    name, source = auth_name(s, r)
    statics = {u.address for u in s.static_resolvers}
    configured = r.source is Source.STATIC or r.address in statics
    where = AuthSource.CONFIGURED if configured else AuthSource.NETWORK
    return AuthSpec(profile, s.pins, name, s.ca_file, source, where)


def probe_settings(
    profile: Profile, s: LinkSettings, r: NetResolver, k: Knowledge | None
) -> ProbeSettings:
    if s.order == "auto" and k is not None and k.suspect_at and k.method.private:
        # the path in use just failed at run time: the other one first
        order = Order.UPGRADE_FIRST if k.method is Method.TLS_PORT else Order.PORT_FIRST
    elif s.order == "auto":
        order = k.path_first if k and k.path_first else Order.PORT_FIRST
    else:
        order = Order(s.order)
    port_kw = {"tls_port": r.port} if r.port else {}
    return ProbeSettings(
        auth=auth_spec(profile, s, r),
        order=order,
        timeout=s.probe_timeout,
        connect_timeout=s.connect_timeout,
        fallback_delay=s.fallback_delay,
        # DDR's question (_dns.resolver.arpa SVCB, in cleartext) names nothing of the user's:
        # asked of every resolver the network named, not of a designated or configured one
        ddr=s.ddr and not r.designated and r.source is not Source.STATIC,
        **port_kw,  # type: ignore[arg-type]
    )


def _upstream(
    r: NetResolver, s: LinkSettings, method: Method, k: Knowledge | None = None
) -> UpstreamSpec:
    """A private entry may race the resolver's other TLS path when its own is slow to finish
    the handshake (happy eyeballs, as in the probe): same resolver, same authentication,
    nothing in cleartext but the STARTTLS dummy. TLS goes to the port the probe found it on
    (a DDR designation's at the resolver's own address), else the network's, else 853."""
    tls_port = (k.tls_port if k is not None else None) or r.port or 853
    port = tls_port if method is Method.TLS_PORT else 53
    alt: tuple[Method, int] | None = None
    if method is Method.TLS_PORT:
        alt = (Method.TLS_UPGRADE, 53)
    elif method is Method.TLS_UPGRADE:
        alt = (Method.TLS_PORT, tls_port)
    name, source = auth_name(s, r)
    return UpstreamSpec(
        r.address, method, port, name, s.pins, s.ca_file, alt=alt, name_source=source
    )


def decide(
    links: Iterable[Link],
    config: Config,
    knowledge: Mapping[tuple[str, str], Knowledge],
    now: float,
    *,
    own_addresses: Collection[str] = (),
    probing: Collection[tuple[str, str]] = (),
    joined: Mapping[str, float] | None = None,
    connectivity: str = "unknown",
    portal_until: float = 0.0,
    tunnel_mode: tuple[str, str] = ("private", ""),
) -> Plan:
    """The whole machine's plan.

    `links`: as the watchers see them; when none is managed, the global static_resolvers
    are planned as a machine-wide pseudo-interface (`with_statics`). `probing`: (network,
    address) pairs being probed right now. `joined`: when each network was (re)joined;
    what was learnt before that is used at once and revalidated.
    `connectivity`: NetworkManager's word ("portal": a captive portal); `portal_until`:
    the end of a supervised exception that lets strict use the portal's DNS to log in.
    `tunnel_mode`: what the running tunnel reported last (private, cleartext or down) and
    why: a change at run time is told to the user like any other.
    """
    active: list[tuple[Link, LinkSettings, Profile]] = []
    for link in with_statics(links, config):
        s = settings_for(config, link)
        profile = to_profile(s.profile)
        if profile is not None and _managed(link, s):
            active.append((link, s, profile))
    if not active:
        return Plan(None, (), (), (), (), (), None, "no interface with resolvers to manage")
    # One tunnel serves every query of the machine: the strictest link sets its profile.
    machine = max((p for _, _, p in active), key=_STRICTNESS.__getitem__)
    if connectivity == "portal":
        return _portal(active, machine, now, portal_until, own_addresses)
    d = _Decider(machine, now, probing, knowledge, joined or {})
    for link, s, link_profile in active:
        d.link(link, s, link_profile, own_addresses)
    d.candidates.sort(
        key=lambda c: (c.tier >= 3, c.link_rank, c.designated, c.tier, c.latency, c.index)
    )
    upstreams = d.limit(list(dict.fromkeys(c.upstream for c in d.candidates)))
    d.tunnel(tunnel_mode, upstreams)
    return Plan(
        profile=machine,
        upstreams=tuple(upstreams),
        routes=_routes(active, d.candidates, split=config.split_dns),
        choices=tuple(d.choices),
        probes=tuple(d.probes),
        warnings=tuple(d.warnings),
        wake_at=min(d.wake) if d.wake else None,
        reason=f"{machine.value}: {len(upstreams)} upstream(s) from {len(active)} interface(s)",
    )


class _Decider:
    """Accumulates the plan, one link at a time."""

    def __init__(
        self,
        machine: Profile,
        now: float,
        probing: Collection[tuple[str, str]],
        knowledge: Mapping[tuple[str, str], Knowledge],
        joined: Mapping[str, float],
    ) -> None:
        self.machine = machine
        self.knowledge = knowledge
        self.joined = joined
        self.now = now
        self.probing = probing
        self.probes_on = Counter(net for net, _ in probing)  # per network, running or asked
        self.candidates: list[_Candidate] = []
        self.choices: list[Choice] = []
        self.probes: list[ProbeRequest] = []
        self.warnings: list[Warning] = []
        self.wake: list[float] = []

    def warn(self, alert: Alert, link: Link, address: str | None, text: str) -> None:
        self.warnings.append(Warning(alert, link.ifname, address, text))

    def use(self, link: Link, profile: Profile, i: int, up: UpstreamSpec, tier: int,
            latency: float, reason: str, *, designated: bool = False) -> None:  # fmt: skip
        rank = _link_rank(link)
        first = 0 if designated else 1
        self.candidates.append(_Candidate(rank, first, tier, latency, i, up, link.ifname, profile))
        self.choices.append(Choice(link.ifname, up.address, up, reason))

    def skip(self, link: Link, address: str, reason: str) -> None:
        self.choices.append(Choice(link.ifname, address, None, reason))

    def maybe_probe(self, link: Link, s: LinkSettings, r: NetResolver, k: Knowledge | None) -> None:
        net, now = link.network_id, self.now
        if (net, r.address) in self.probing:
            return
        why = None
        if k is None:
            why = "not probed on this network yet"
        elif k.negative_until > now:
            self.wake.append(k.negative_until)
        elif k.suspect_at > k.probed_at and now - k.probed_at >= SUSPECT_REPROBE_MIN:
            why = f"the tunnel's connection failed ({k.suspect}): probing again"
        elif k.suspect_at > k.probed_at:
            self.wake.append(k.probed_at + SUSPECT_REPROBE_MIN)
        elif now - k.probed_at >= s.reprobe_interval:
            why = f"re-probe: last probed {now - k.probed_at:.0f} s ago"
        elif k.probed_at < self.joined.get(net, 0.0):
            why = "network rejoined: revalidating what was learnt here"
        else:
            self.wake.append(k.probed_at + s.reprobe_interval)
        if why and self.probes_on[net] < MAX_PROBES_PER_NETWORK:  # else later: an end re-plans
            self.probes_on[net] += 1
            ps = probe_settings(self.machine, s, r, k)
            self.probes.append(ProbeRequest(net, link.ifname, r.address, ps, why))

    def key_changed(self, link: Link, r: NetResolver, k: Knowledge | None) -> None:
        if (
            k is not None
            and len(k.pins_seen) > 1
            and k.pin == k.pins_seen[-1]
            and k.pin_stable < KEY_STABLE_PROBES
        ):
            text = f"{r.address} on {link.ifname} shows another key than before on this network"
            self.warn(Alert.KEY_CHANGED, link, r.address, text)

    def link(self, link: Link, s: LinkSettings, profile: Profile, own: Collection[str]) -> None:
        machine = self.machine
        plain_ok = machine is Profile.OPPORTUNISTIC and s.cleartext_fallback
        usable = unknown = 0
        if len(link.domains) > MAX_LINK_DOMAINS:
            text = (f"{link.ifname} has {len(link.domains)} search domains: only the first "
                    f"{MAX_LINK_DOMAINS} are used")  # fmt: skip
            self.warn(Alert.TOO_MANY, link, None, text)
        for i, r in enumerate(_resolvers(link, s, own, self.knowledge)):
            k = self.knowledge_of(link, r)
            origin = f" ({r.origin})" if r.designated else ""
            self.maybe_probe(link, s, r, k)
            self.key_changed(link, r, k)
            if k is None:
                unknown += 1
                up = _upstream(r, s, Method.TLS_PORT)
                why = f"not probed yet: TLS on {up.port} first{origin}"
                self.use(link, profile, i, up, 2, math.inf, why, designated=r.designated)
                continue
            if k.method.private:
                authenticated = k.auth is not None and k.auth is not Auth.NONE
                if machine is Profile.STRICT and not authenticated:
                    self.skip(link, r.address, "TLS, but the certificate did not authenticate")
                    continue
                how = f"authenticated by {k.auth}" if authenticated else "not authenticated"
                lat = k.latency_ms if k.latency_ms is not None else math.inf
                up = _upstream(r, s, k.method, k)
                why = f"{k.method}, {how}{origin}"
                self.use(link, profile, i, up, 0 if authenticated else 1, lat, why,
                         designated=r.designated)  # fmt: skip
                usable += 1
                if plain_ok and k.plain is not None:
                    why = (f"{k.plain} fallback: only once every private path failed "
                           "(opportunistic)")  # fmt: skip
                    self.use(link, profile, i, _upstream(r, s, k.plain), 3, math.inf, why)
                continue
            if k.tls_ok_at > 0:
                why = "; ".join(k.failures) or str(k.method)
                text = f"{r.address} on {link.ifname} did TLS here before and does not now ({why})"
                self.warn(Alert.DOWNGRADE, link, r.address, text)
            if plain_ok and k.method in (Method.TCP_PLAIN, Method.UDP_PLAIN):
                up = _upstream(r, s, k.method)
                why = "no TLS: cleartext, after every private path (opportunistic)"
                self.use(link, profile, i, up, 3, math.inf, why)
                continue
            reason = "unreachable" if k.method is Method.UNREACHABLE else f"no TLS ({k.method})"
            if k.negative_until > self.now:
                reason += f"; not asked again for {k.negative_until - self.now:.0f} s"
            self.skip(link, r.address, f"{reason}; the {machine} profile does not use it")
        if not (usable or unknown):
            self.none_private(link)

    def none_private(self, link: Link) -> None:
        machine = self.machine
        if machine is not Profile.OPPORTUNISTIC:
            text = f"no private resolver on {link.ifname}: no DNS rather than cleartext ({machine})"
            self.warn(Alert.NO_PRIVATE_DNS, link, None, text)
        elif any(c.ifname == link.ifname and c.tier == 3 for c in self.candidates):
            text = f"{link.ifname}: no resolver does TLS; DNS goes out in cleartext (opportunistic)"
            self.warn(Alert.CLEARTEXT, link, None, text)

    def limit(self, upstreams: list[UpstreamSpec]) -> list[UpstreamSpec]:
        """The order holds what the tunnel takes: the best MAX_UPSTREAMS, in their order. The
        rest is not used, and said so: a network handing out more is broken or hostile."""
        if len(upstreams) <= MAX_UPSTREAMS:
            return upstreams
        left = set(upstreams[MAX_UPSTREAMS:])
        self.candidates = [c for c in self.candidates if c.upstream not in left]
        self.choices = [
            Choice(c.ifname, c.address, None, OVER_THE_LIMIT) if c.upstream in left else c
            for c in self.choices
        ]
        text = (f"{len(upstreams)} upstreams to choose from: the best {MAX_UPSTREAMS} are used, "
                f"{len(left)} left out")  # fmt: skip
        self.warnings.append(Warning(Alert.TOO_MANY, TUNNEL, None, text))
        return upstreams[:MAX_UPSTREAMS]

    def knowledge_of(self, link: Link, r: NetResolver) -> Knowledge | None:
        return self.knowledge.get((link.network_id, r.address))

    def tunnel(self, mode: tuple[str, str], upstreams: list[UpstreamSpec]) -> None:
        """What the running tunnel reported: cleartext or no DNS at all is told to the user
        (the order's own warnings say what was planned; these, what happened)."""
        state, why = mode
        because = f" ({why})" if why else ""
        if state == "cleartext":
            text = f"every private path failed: DNS goes out in cleartext now{because}"
            self.warnings.append(Warning(Alert.TUNNEL_CLEARTEXT, TUNNEL, None, text))
        elif state == "down" and upstreams:
            text = f"no resolver answers: no DNS now ({self.machine}){because}"
            self.warnings.append(Warning(Alert.TUNNEL_DOWN, TUNNEL, None, text))


def _portal(
    active: list[tuple[Link, LinkSettings, Profile]],
    machine: Profile,
    now: float,
    until: float,
    own: Collection[str],
) -> Plan:
    """Behind a captive portal the login page needs the network's own DNS, as it is.

    Opportunistic uses it (plain UDP, like any client would) until connectivity is full
    again. Strict and encrypted keep refusing, and say so, unless the user allowed a
    supervised exception (`dnstls-agent portal allow`) that has not run out yet.
    """
    allowed = machine is Profile.OPPORTUNISTIC or until > now
    ups: list[UpstreamSpec] = []
    choices: list[Choice] = []
    warnings: list[Warning] = []
    for link, s, _p in active:
        names = [r.address for r in _resolvers(link, s, own) if r.source is not Source.STATIC]
        for a in names:
            up = UpstreamSpec(a, Method.UDP_PLAIN, 53)
            if allowed and up not in ups and len(ups) >= MAX_UPSTREAMS:
                choices.append(Choice(link.ifname, a, None, OVER_THE_LIMIT))
                continue
            if allowed and up not in ups:
                ups.append(up)
            if allowed:
                why = "captive portal: the network's own DNS, in cleartext, to log in"
                choices.append(Choice(link.ifname, a, up, why))
            else:
                why = f"captive portal: not used ({machine} never sends cleartext)"
                choices.append(Choice(link.ifname, a, None, why))
        if machine is Profile.OPPORTUNISTIC:
            text = f"captive portal on {link.ifname}: its own DNS is used until you are logged in"
            warnings.append(Warning(Alert.PORTAL, link.ifname, None, text))
        elif allowed:
            left = (until - now) / 60
            text = (f"captive portal on {link.ifname}: cleartext DNS allowed for the login, "
                    f"{left:.0f} more minute(s) at most ({machine} suspended)")  # fmt: skip
            warnings.append(Warning(Alert.PORTAL, link.ifname, None, text))
        else:
            text = (f"captive portal on {link.ifname}: no DNS ({machine}); to log in, "
                    "run: dnstls-agent portal allow [--minutes N]")  # fmt: skip
            warnings.append(Warning(Alert.PORTAL_BLOCKED, link.ifname, None, text))
    if left := sum(c.reason == OVER_THE_LIMIT for c in choices):
        text = f"captive portal: {MAX_UPSTREAMS} of its resolvers used, {left} left out"
        warnings.append(Warning(Alert.TOO_MANY, TUNNEL, None, text))
    profile = Profile.OPPORTUNISTIC if allowed else machine
    if allowed:
        reason = f"captive portal: {len(ups)} cleartext resolver(s) for the login"
    else:
        reason = f"captive portal: {machine}, no DNS until the user allows the login"
    wake = until if machine is not Profile.OPPORTUNISTIC and until > now else None
    return Plan(profile, tuple(ups), (), tuple(choices), (), tuple(warnings), wake, reason)


def _routes(
    active: list[tuple[Link, LinkSettings, Profile]], candidates: list[_Candidate], *, split: bool
) -> tuple[Route, ...]:
    """VPN links' domains go to their own resolvers always; other links' only with split_dns."""
    routes: list[Route] = []
    for link, _s, _p in active:
        if not (link.vpn or split) or not link.domains:
            continue
        ups = tuple(c.upstream for c in candidates if c.ifname == link.ifname)
        if not ups:
            continue
        for dom in link.domains[:MAX_LINK_DOMAINS]:
            domain = dom.strip(".").lower()
            if domain and domain not in {r.domain for r in routes}:
                routes.append(Route(domain, ups))
    return tuple(routes)
