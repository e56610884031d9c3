"""agent/model.py: the text forms resolvers and upstreams come in."""

from __future__ import annotations

import pytest

from agent.errors import UsageError
from agent.model import Link, Method, NetResolver, Source, UpstreamSpec


@pytest.mark.parametrize(
    ("text", "address", "name", "port", "tls"),
    [
        ("198.51.100.1", "198.51.100.1", None, None, False),
        ("198.51.100.1#dns.example", "198.51.100.1", "dns.example", None, False),
        ("dns+tls://198.51.100.1:8853#dns.example", "198.51.100.1", "dns.example", 8853, True),
        ("dns+tls://[2001:db8::1]:853", "2001:db8::1", None, 853, True),
        ("2001:db8::53", "2001:db8::53", None, None, False),
        ("fe80::1%eth0", "fe80::1", None, None, False),
    ],
)
def test_networkmanager_nameserver_forms(
    text: str, address: str, name: str | None, port: int | None, tls: bool
) -> None:
    r = NetResolver.parse(text, Source.NM)
    assert (r.address, r.auth_name, r.port, r.tls) == (address, name, port, tls)


def test_bad_nameserver() -> None:
    with pytest.raises(ValueError):
        NetResolver.parse("dns.example")


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("198.51.100.1", UpstreamSpec("198.51.100.1", Method.TLS_PORT, 853)),
        (
            "198.51.100.1@8853#dns.example",
            UpstreamSpec("198.51.100.1", Method.TLS_PORT, 8853, "dns.example"),
        ),
        ("upgrade:198.51.100.1", UpstreamSpec("198.51.100.1", Method.TLS_UPGRADE, 53)),
        ("tcp:[2001:db8::1]@5353", UpstreamSpec("2001:db8::1", Method.TCP_PLAIN, 5353)),
        ("2001:db8::1", UpstreamSpec("2001:db8::1", Method.TLS_PORT, 853)),
    ],
)
def test_upstream_forms_round_trip(text: str, spec: UpstreamSpec) -> None:
    assert UpstreamSpec.parse(text) == spec
    assert UpstreamSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("bad", ["dns.example", "198.51.100.1@99999", "198.51.100.1#a..b", "tls:"])
def test_upstream_errors(bad: str) -> None:
    with pytest.raises(UsageError, match="upstream"):
        UpstreamSpec.parse(bad)


def test_network_identity() -> None:
    assert Link("eth0", connection_uuid="u").network_id == "nm:u"
    assert Link("eth0", gateway_mac="aa:bb").network_id == "gw:eth0:aa:bb"
    assert Link("eth0", dhcp_server="198.51.100.1").network_id == "dhcp:eth0:198.51.100.1"
    assert Link("eth0").network_id == "if:eth0"
