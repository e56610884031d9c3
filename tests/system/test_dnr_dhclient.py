"""DNR end to end through the real ISC dhclient: dnsmasq designates an encrypted resolver in
DHCPv4 option 162 (RFC 9463) on a lab network, dhclient (with a dhclient.conf the package's
postinst wrote its block into, in the test's own directory: never the host's) asks for it and
writes it to its lease file, and the agent's lease parser makes it the link's first resolver.

    srv  netns dta-srv-TAG: dnsmasq, DHCP only (port=0), on 198.51.100.1/24, option 162 =
         two instances: priority 2, dns.example.test at DOT_ADDRESS, ALPN dot; priority 1,
         doh.example.test at DOH_ADDRESS, ALPN h2 only (a DoH resolver the agent leaves out)
    cli  netns dta-cli-TAG: `dhclient -d -4 -1` with -cf/-lf/-pf/-sf all in the test's
         directory; its script only writes its environment to a file (nothing is configured)

The controls: without the block dhclient does not ask and dnsmasq (`dhcp-option`, sent when
asked) does not send, so the lease has no DNR; a server that sends 162 unasked
(`dhcp-option-force`) reaches the lease as `unknown-162`, which is read too.

Needs root, isc-dhcp-client, dnsmasq (runs in CI).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.dns import dnr
from agent.model import NetResolver, Origin, Source
from agent.watchers import leases
from tests.conftest import host_untouched
from tests.lab.dhcplab import DHCLIENT, DHCLIENT_CONF
from tests.lab.netns import REPO, SRV_IPS, Lab
from tests.lab.proc import Process, need

pytestmark = pytest.mark.system

PROGRAMS = ("ip", "dnsmasq", "sh", "awk", DHCLIENT)
POSTINST = REPO / "packaging/debian/dnstls-agent.postinst"
ADN = "dns.example.test"
DOT_ADDRESS = "198.51.100.53"
DOH_ADDRESS = "198.51.100.54"
INSTANCES = (
    dnr.DnrInstance(2, ADN, (DOT_ADDRESS,), ("dot",)),
    dnr.DnrInstance(1, "doh.example.test", (DOH_ADDRESS,), ("h2",), None, "/dns-query{?dns}"),
)
PAYLOAD = dnr.encode_v4(INSTANCES)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with host_untouched(PROGRAMS), Lab() as lab:
        yield lab


def dhclient_conf(directory: Path, *, block: bool) -> Path:
    """Debian's dhclient.conf requests; with `block`, after the postinst ran on it."""
    conf = directory / "dhclient.conf"
    conf.write_text(DHCLIENT_CONF)
    if block:
        text = POSTINST.read_text().replace(
            "dnstls_conf=/etc/dhcp/dhclient.conf", f"dnstls_conf={conf}"
        )
        assert f"dnstls_conf={conf}" in text
        (directory / "postinst").write_text(text)
        subprocess.run([need("sh"), str(directory / "postinst"), "configure", ""], check=True)
        assert "also request dnr;" in conf.read_text()
    return conf


def start_dnsmasq(lab: Lab, directory: Path, *, force: bool) -> Process:
    assert lab.srv is not None
    option = "dhcp-option-force" if force else "dhcp-option"
    conf = directory / "dnsmasq.conf"
    conf.write_text(
        f"""port=0
interface={lab.veth_srv}
bind-interfaces
except-interface=lo
no-resolv
no-hosts
dhcp-authoritative
no-ping
dhcp-range=198.51.100.150,198.51.100.199,255.255.255.0,2m
dhcp-option=option:router,{SRV_IPS[0]}
dhcp-option=option:dns-server,{SRV_IPS[0]}
{option}=162,{PAYLOAD.hex(":")}
dhcp-leasefile={directory / "dnsmasq.leases"}
log-dhcp
log-facility=-
user=root
group=root
"""
    )
    log = directory / "dnsmasq.log"
    proc = lab.srv.start([need("dnsmasq"), "--keep-in-foreground", f"--conf-file={conf}"], log)
    proc.wait_until(lambda: "DHCP, IP range" in log.read_text(errors="replace"), 10, "dnsmasq")
    return proc


def run_dhclient(lab: Lab, directory: Path, conf: Path) -> tuple[str, dict[str, str]]:
    """dhclient until its first lease: the lease file's text and the script's environment
    for BOUND (the `new_*` variables a dhclient hook sees)."""
    assert lab.cli is not None
    script = directory / "dhclient-script"
    script.write_text(f'#!/bin/sh\nenv > "{directory}/env.$reason"\nexit 0\n')
    script.chmod(0o755)
    lease_file = directory / "dhclient.leases"
    ifname = f"dtac{lab.tag}"[:15]
    argv = [DHCLIENT, "-d", "-v", "-4", "-1", "-cf", str(conf), "-lf", str(lease_file),
            "-pf", str(directory / "dhclient.pid"), "-sf", str(script), ifname]  # fmt: skip
    log = directory / "dhclient.log"
    proc = lab.cli.start(argv, log)
    try:
        proc.wait_until(lambda: "bound to" in log.read_text(errors="replace"), 20, "dhclient")
        env_file = directory / "env.BOUND"
        end = time.monotonic() + 5
        while not env_file.exists() and time.monotonic() < end:
            time.sleep(0.02)
    finally:
        proc.stop()  # SIGTERM: dhclient leaves without releasing or running its script
    env = dict(
        line.partition("=")[::2] for line in env_file.read_text().splitlines() if "=" in line
    )
    return lease_file.read_text(), env


def dhclient_hex(data: bytes) -> str:
    """dhclient's form of an unprintable `string` option: hex octets, no leading zeros."""
    return ":".join(f"{b:x}" for b in data)


def test_dhclient_asks_for_dnr_and_the_lease_gives_the_dot_resolver(
    lab: Lab, tmp_path: Path
) -> None:
    conf = dhclient_conf(tmp_path, block=True)
    dnsmasq = start_dnsmasq(lab, tmp_path, force=False)
    text, env = run_dhclient(lab, tmp_path, conf)
    asked = [ln for ln in dnsmasq.log.read_text().splitlines() if "requested options" in ln]
    assert any("162" in ln for ln in asked), asked  # dhclient asked, in its request list
    line = f"  option dnr {dhclient_hex(PAYLOAD)};"
    assert line in text.splitlines(), text  # what dhclient writes, exactly
    assert env["new_dnr"] == dhclient_hex(PAYLOAD) and env["requested_dnr"] == "1"

    ifname = f"dtac{lab.tag}"[:15]
    lease = leases.parse_dhclient(text)[ifname]
    assert lease.dnr == INSTANCES
    link = leases.to_link(lease)
    assert link.resolvers == (
        NetResolver(DOT_ADDRESS, ADN, 853, True, Source.LEASE, Origin.DNR, 2),
        NetResolver(SRV_IPS[0], source=Source.LEASE, origin=Origin.DHCP),
    )  # the DoH-only instance (priority 1) is not a resolver the agent can use


def test_without_the_block_no_dnr(lab: Lab, tmp_path: Path) -> None:
    conf = dhclient_conf(tmp_path, block=False)
    start_dnsmasq(lab, tmp_path, force=False)
    text, env = run_dhclient(lab, tmp_path, conf)
    assert "option domain-name-servers" in text  # a lease, but not asked, not sent
    assert "dnr" not in text and "162" not in text
    assert not any("dnr" in k or "162" in k for k in env)
    ifname = f"dtac{lab.tag}"[:15]
    resolvers = leases.to_link(leases.parse_dhclient(text)[ifname]).resolvers
    assert resolvers == (NetResolver(SRV_IPS[0], source=Source.LEASE, origin=Origin.DHCP),)


def test_an_unasked_162_is_read_under_dhclients_own_name(lab: Lab, tmp_path: Path) -> None:
    conf = dhclient_conf(tmp_path, block=False)
    start_dnsmasq(lab, tmp_path, force=True)
    text, env = run_dhclient(lab, tmp_path, conf)
    assert f"  option unknown-162 {dhclient_hex(PAYLOAD)};" in text.splitlines(), text
    assert env["new_unknown_162"] == dhclient_hex(PAYLOAD)
    ifname = f"dtac{lab.tag}"[:15]
    resolvers = leases.to_link(leases.parse_dhclient(text)[ifname]).resolvers
    assert resolvers[0] == NetResolver(DOT_ADDRESS, ADN, 853, True, Source.LEASE, Origin.DNR, 2)
