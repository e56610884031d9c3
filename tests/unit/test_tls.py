"""agent/tls.py: pins, SAN checks and the authentication decision, on generated certificates."""

from __future__ import annotations

import base64
import ssl
import subprocess
from pathlib import Path

import pytest

from agent import tls
from agent.errors import UsageError
from agent.model import Auth, AuthSource, AuthSpec, Profile, parse_pin
from tests.conftest import Certs, require_program

STRICT = Profile.STRICT


def test_pin_matches_openssl(certs: Certs) -> None:
    openssl = require_program("openssl")
    pubkey = subprocess.run(
        [openssl, "x509", "-in", str(certs.good.cert), "-pubkey", "-noout"],
        check=True,
        capture_output=True,
    ).stdout
    der = subprocess.run(
        [openssl, "pkey", "-pubin", "-outform", "der"],
        input=pubkey,
        check=True,
        capture_output=True,
    ).stdout
    digest = subprocess.run(
        [openssl, "dgst", "-sha256", "-binary"], input=der, check=True, capture_output=True
    ).stdout
    assert tls.spki_pin(certs.good.der) == base64.b64encode(digest).decode()


def test_parse_pin_forms(certs: Certs) -> None:
    pin = certs.good.pin
    assert parse_pin(pin) == pin
    assert parse_pin(f'pin-sha256="{pin}"') == pin
    assert parse_pin(f"sha256/{pin}") == pin


@pytest.mark.parametrize("bad", ["", "not base64!", base64.b64encode(b"short").decode()])
def test_parse_pin_rejects(bad: str) -> None:
    with pytest.raises(UsageError, match="pin"):
        parse_pin(bad)


@pytest.mark.parametrize(
    ("pattern", "name", "ok"),
    [
        ("dns.test", "DNS.test.", True),
        ("*.example.test", "a.example.test", True),
        ("*.example.test", "a.b.example.test", False),
        ("*.example.test", "example.test", False),
        ("*.test", "a.test", False),  # no wildcard directly under a one-label suffix
        ("a*.example.test", "ab.example.test", False),
        ("other.test", "dns.test", False),
    ],
)
def test_name_matches(pattern: str, name: str, ok: bool) -> None:
    assert tls.name_matches(pattern, name) is ok


def test_sans_are_read(certs: Certs) -> None:
    assert {str(ip) for ip in tls.cert_ip_addresses(certs.good.der)} == {"127.0.0.1", "::1"}
    assert tls.cert_dns_names(certs.good.der) == ["dns.test"]
    assert tls.cert_ip_addresses(certs.no_ip.der) == []
    assert tls.ip_in_cert(certs.good.der, "0:0::1")


def test_authenticate_decisions(certs: Certs) -> None:
    der = certs.good.der
    auth = tls.authenticate
    assert (
        auth(
            der, "127.0.0.1", AuthSpec(STRICT, pins=frozenset({certs.good.pin})), chain_valid=False
        )[0]
        is Auth.PIN
    )
    auth_none, why = auth(
        der, "127.0.0.1", AuthSpec(STRICT, pins=frozenset({certs.expired.pin})), chain_valid=True
    )
    assert auth_none is Auth.NONE and "not in the configured pin set" in why
    assert auth(der, "127.0.0.1", AuthSpec(STRICT), chain_valid=True)[0] is Auth.IP_SAN
    assert auth(der, "127.0.0.1", AuthSpec(STRICT), chain_valid=False)[0] is Auth.NONE
    assert (
        auth(der, "192.0.2.1", AuthSpec(STRICT, auth_name="dns.test"), chain_valid=True)[0]
        is Auth.NAME
    )
    none, why = auth(der, "192.0.2.1", AuthSpec(STRICT, auth_name="x.test"), chain_valid=True)
    assert none is Auth.NONE and "does not name x.test, the configured name" in why
    net = AuthSpec(STRICT, auth_name="x.test", name_source=AuthSource.NETWORK)
    none, why = auth(der, "192.0.2.1", net, chain_valid=True)
    assert none is Auth.NONE and "192.0.2.1 or x.test" in why
    assert auth(certs.no_ip.der, "127.0.0.1", AuthSpec(STRICT), chain_valid=True)[0] is Auth.NONE


NETWORK = AuthSource.NETWORK


def test_strict_configured_name_is_not_replaced_by_the_ip_san(certs: Certs, tmp_path: Path) -> None:
    """A rogue DHCP server hands out an address it holds a CA-issued certificate for:
    with auth_name configured, that certificate does not authenticate."""
    ip_only = certs.ca.issue(tmp_path, "ip-only", ips=("127.0.0.1",))
    for spec in (
        AuthSpec(STRICT, auth_name="dns.test"),
        AuthSpec(STRICT, auth_name="dns.test", address_source=NETWORK),
    ):
        auth, why = tls.authenticate(ip_only.der, "127.0.0.1", spec, chain_valid=True)
        assert auth is Auth.NONE and "does not name dns.test" in why
        assert not tls.accepted(auth, spec)
    # the name and the address both in it: the name authenticates, as configured
    spec = AuthSpec(STRICT, auth_name="dns.test", address_source=NETWORK)
    auth, _ = tls.authenticate(certs.good.der, "127.0.0.1", spec, chain_valid=True)
    assert auth is Auth.NAME and tls.auth_source(auth, spec) is AuthSource.CONFIGURED
    # pins still decide, with or without a name
    pinned = AuthSpec(STRICT, frozenset({ip_only.pin}), auth_name="dns.test")
    auth, _ = tls.authenticate(ip_only.der, "127.0.0.1", pinned, chain_valid=False)
    assert auth is Auth.PIN and tls.auth_source(auth, pinned) is AuthSource.CONFIGURED


def test_strict_network_name_or_address_when_nothing_is_configured(
    certs: Certs, tmp_path: Path
) -> None:
    ip_only = certs.ca.issue(tmp_path, "ip-only", ips=("127.0.0.1",))
    spec = AuthSpec(STRICT, auth_name="dns.test", name_source=NETWORK, address_source=NETWORK)
    auth, _ = tls.authenticate(ip_only.der, "127.0.0.1", spec, chain_valid=True)
    assert auth is Auth.IP_SAN and tls.auth_source(auth, spec) is NETWORK
    auth, _ = tls.authenticate(certs.no_ip.der, "127.0.0.1", spec, chain_valid=True)
    assert auth is Auth.NAME and tls.auth_source(auth, spec) is NETWORK
    nothing = AuthSpec(STRICT, address_source=NETWORK)
    auth, _ = tls.authenticate(ip_only.der, "127.0.0.1", nothing, chain_valid=True)
    assert auth is Auth.IP_SAN and tls.auth_source(auth, nothing) is NETWORK
    assert tls.auth_source(Auth.IP_SAN, AuthSpec(STRICT)) is AuthSource.CONFIGURED
    assert tls.auth_source(Auth.NONE, spec) is None


def test_accepted_by_profile() -> None:
    assert tls.accepted(Auth.NONE, AuthSpec(Profile.OPPORTUNISTIC))
    assert not tls.accepted(Auth.NONE, AuthSpec(STRICT))
    assert tls.accepted(Auth.IP_SAN, AuthSpec(STRICT))


def test_client_context_floor() -> None:
    ctx = tls.client_context(verify=False)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE
    assert tls.client_context(verify=True).verify_mode == ssl.CERT_REQUIRED
