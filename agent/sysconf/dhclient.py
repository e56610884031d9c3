"""What ISC dhclient-script would write into /etc/resolv.conf for a lease, as a pure function.

Debian's dhclient-script (isc-dhcp-client) rewrites /etc/resolv.conf at every lease event
(BOUND, RENEW, REBIND, REBOOT and their DHCPv6 kin), in place, with the network's
nameservers. While the agent has pointed the file at its tunnel, that would send every
query in cleartext until the agent pointed it back. The project's enter hook
(dispatcher.d/dhclient-enter-hooks.d/dnstls-agent) replaces dhclient-script's
`make_resolv_conf` by `dnstls-agent stub --dhclient`, which renders here what it would
have written (from the script's environment: dhclient passes a lease as `new_*`
variables) and makes that the file `restore` puts back.

`render` follows make_resolv_conf of isc-dhcp-client 4.4.3 (Debian 12) line by line,
including its quirks: a domain name is put in front of the search list when it is not
in it; without nameservers in the lease, the old file's are kept; DHCPv6 link-local
servers get `%interface`. Differences: a value with a control character is ignored, and
so is a search word that is not a domain name or a server that is not an IP address, and
search words past the 32nd (dhclient checks names itself; this, run as root, does not
count on it).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Mapping

from agent.sysconf.request import MAX_DOMAINS, domain

LOG = logging.getLogger(__name__)

# C0, DEL, C1 and Unicode's line and paragraph separators: none belongs in resolv.conf
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_IFNAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")  # what the kernel takes as an interface name
_NAMESERVER = re.compile(r"^\w*[Nn][Aa][Mm][Ee][Ss][Ee][Rr][Vv][Ee][Rr]")  # the script's sed


def _old_nameservers(old: str) -> list[str]:
    return [line for line in old.splitlines() if _NAMESERVER.match(line)]


def _value(env: Mapping[str, str], name: str) -> str:
    """A lease value; one with a control character (a newline would add a line of the
    network's choosing, e.g. `options`, to the file) counts as not given."""
    value = env.get(name, "")
    if _CONTROL.search(value):
        LOG.warning("dhclient's %s has control characters: ignored (%r)", name, value[:80])
        return ""
    return value


def _words(name: str, value: str, ok: Callable[[str], object], limit: int) -> str:
    """The words of a lease value that `ok` accepts (no ValueError), at most `limit`."""
    kept: list[str] = []
    for word in value.split():
        try:
            ok(word)
        except ValueError:
            LOG.warning("dhclient's %s: %r left out (not a valid name or address)", name, word[:80])
            continue
        kept.append(word)
    if len(kept) > limit:
        LOG.warning("dhclient's %s: %d words, the first %d kept", name, len(kept), limit)
    return " ".join(kept[:limit])


def _search(env: Mapping[str, str], name: str) -> str:
    return _words(name, _value(env, name), domain, MAX_DOMAINS)


def _address(word: str) -> None:
    """ValueError unless `word` is an IP address (an IPv6 one may carry %SCOPE)."""
    address, sep, scope = word.partition("%")
    ipaddress.ip_address(address)
    if sep and not _IFNAME.fullmatch(scope):
        raise ValueError(f"{word!r}: not a scope")


def _servers(env: Mapping[str, str], name: str) -> str:
    return _words(name, _value(env, name), _address, 16)


def render(env: Mapping[str, str], old: str = "") -> str | None:
    """resolv.conf as dhclient-script's make_resolv_conf writes it for the lease in `env`;
    `old`: the file it would have read (for the nameservers a lease without any keeps).
    None: the lease says nothing about DNS (the script leaves the file alone)."""
    domain_name = _search(env, "new_domain_name")
    search = _search(env, "new_domain_search")
    servers = _servers(env, "new_domain_name_servers")
    lines: list[str] = []
    if search or domain_name or servers:
        if domain_name:
            lines.append(f"domain {domain_name.split(' ')[0]}")
        if search:
            if domain_name and not any(
                d in (domain_name, f"{domain_name}.") for d in search.split()
            ):
                search = f"{domain_name} {search}"
            lines.append(f"search {search}")
        elif domain_name:
            lines.append(f"search {domain_name}")
        if servers:
            lines += [f"nameserver {ns}" for ns in servers.split()]
        else:
            lines += _old_nameservers(old)
        return "".join(f"{line}\n" for line in lines)
    search6 = _search(env, "new_dhcp6_domain_search")
    servers6 = _servers(env, "new_dhcp6_name_servers")
    if not (search6 or servers6):
        return None
    if search6:
        lines.append(f"search {search6}")
    if servers6:
        interface = _value(env, "interface")
        if not _IFNAME.fullmatch(interface):
            interface = ""  # no scope rather than one of the environment's choosing
        for ns in servers6.split():
            scope = f"%{interface}" if ns.lower().startswith("fe80::") and interface else ""
            lines.append(f"nameserver {ns}{scope}")
    else:
        lines += _old_nameservers(old)
    return "".join(f"{line}\n" for line in lines)
