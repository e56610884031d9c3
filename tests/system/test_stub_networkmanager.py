"""The NetworkManager backend against a real NetworkManager (tests/lab/nmlab.py).

NM got its lease from dnsmasq and writes the machine's /etc/resolv.conf. After `stub` the
tunnel is the only nameserver there and the network's search domain is kept; a renewal
that brings new servers does not put them back into resolv.conf, while NM's
DnsManager.Configuration (what the agent's watcher reads) still follows it; `restore`
makes NM write the network's servers of now again; an NM restart in between, and a crash
of the process that applied (restore from a fresh one), change none of that. The CLI runs
inside the machine, every step a fresh process, as the unit runs it.

Needs root and NetworkManager, dnsmasq, dbus-daemon (runs in CI).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import sysconf
from agent.sysconf import networkmanager as nmb
from tests.conftest import host_untouched
from tests.lab.agentproc import AgentProcess
from tests.lab.netns import SRV_IPS
from tests.lab.nmlab import DOMAIN, NMLab

pytestmark = pytest.mark.system

TUNNEL = "127.0.0.153"
OLD, NEW = SRV_IPS[0], "198.51.100.3"
PROGRAMS = ("ip", "NetworkManager", "nmcli", "dnsmasq", "dbus-daemon", "nsenter", "unshare")


def nameservers(text: str) -> list[str]:
    return [ln.split()[1] for ln in text.splitlines() if ln.startswith("nameserver ")]


def search(text: str) -> list[str]:
    return [d for ln in text.splitlines() if ln.startswith("search ") for d in ln.split()[1:]]


@pytest.fixture
def host() -> Iterator[None]:
    with host_untouched(PROGRAMS):
        yield


@pytest.fixture
def lab(tmp_path: Path, host: None) -> Iterator[NMLab]:
    with NMLab(tmp_path / "lab", dns=[OLD]) as lab:
        lab.add_srv_address(NEW)
        yield lab


def write_config(tmp_path: Path, lab: NMLab) -> Path:
    conf = tmp_path / "agent.toml"
    conf.write_text(
        textwrap.dedent(
            f"""\
            nm_bus = "{lab.bus_address}"
            state_dir = "{tmp_path / "state"}"
            stub_state_dir = "{tmp_path / "state"}"
            runtime_dir = "{tmp_path / "run"}"
            stub_backend = "auto"
            """
        )
    )
    return conf


def agent(lab: NMLab, conf: Path, *args: str) -> str:
    """`dnstls-agent -c CONF ARGS` in the machine (where /etc/resolv.conf is NM's)."""
    assert lab.machine is not None
    res = lab.machine.run([sys.executable, "-m", "agent", "-c", str(conf), *args], check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def dropin(lab: NMLab, where: str) -> Path:
    """A drop-in of ours, as seen from the host (the lab's DIR/run and DIR/etc-nm)."""
    base = {"run": lab.dir / "run/NetworkManager/conf.d", "etc": lab.dir / "etc-nm/conf.d"}
    return base[where] / nmb.DROPIN


def renew_with(lab: NMLab, servers: list[str]) -> None:
    lab.set_dns(servers)
    lab.renew()
    lab.wait_dns(servers[0])  # NM's DnsManager still follows the network


def without_explicit_dns(lab: NMLab) -> None:
    """NetworkManager.conf as distributions ship it: no dns= (the lab sets dns=default)."""
    conf = lab.dir / "etc-nm/NetworkManager.conf"
    conf.write_text(conf.read_text().replace("dns=default\n", ""))
    lab.nmcli("general", "reload", "conf")


def test_cli_stub_renewal_and_restore(lab: NMLab, tmp_path: Path) -> None:
    conf = write_config(tmp_path, lab)
    before = lab.resolv_conf()
    assert nameservers(before) == [OLD] and search(before) == [DOMAIN]

    said = agent(lab, conf, "stub")
    assert "NetworkManager on " in said and f"points at {TUNNEL}" in said
    resolv = lab.resolv_conf()
    assert nameservers(resolv) == [TUNNEL] and search(resolv) == [DOMAIN]
    # the lab's NetworkManager.conf says dns=default, which outranks /run: /etc it is
    assert dropin(lab, "run").exists() and dropin(lab, "etc").exists()
    journal = json.loads((tmp_path / "state/stub.json").read_text())
    assert journal["backend"] == "networkmanager"
    assert journal["entries"][0]["bus"] == lab.bus_address

    renew_with(lab, [NEW])
    assert nameservers(lab.resolv_conf()) == [TUNNEL]

    said = agent(lab, conf, "restore")
    assert "NetworkManager reloaded: mode default" in said
    resolv = lab.resolv_conf()
    assert nameservers(resolv) == [NEW] and search(resolv) == [DOMAIN]  # NM's, of now
    assert not dropin(lab, "run").exists() and not dropin(lab, "etc").exists()
    assert not (tmp_path / "state/stub.json").exists()
    assert agent(lab, conf, "restore").startswith("nothing to restore")


def test_dropin_in_run_when_nothing_outranks_it(lab: NMLab, tmp_path: Path) -> None:
    """As shipped (no dns= in NetworkManager.conf): /run only, gone with a reboot."""
    without_explicit_dns(lab)
    conf = write_config(tmp_path, lab)
    agent(lab, conf, "stub")
    assert dropin(lab, "run").exists() and not dropin(lab, "etc").exists()
    assert nameservers(lab.resolv_conf()) == [TUNNEL]
    renew_with(lab, [NEW])
    assert nameservers(lab.resolv_conf()) == [TUNNEL]
    agent(lab, conf, "restore")
    assert nameservers(lab.resolv_conf()) == [NEW]
    assert not dropin(lab, "run").exists()


def test_nm_restart_between_apply_and_restore(lab: NMLab, tmp_path: Path) -> None:
    """Applied from inside a running event loop (as the daemon does), restored from a fresh
    process after NetworkManager went away and came back."""
    assert lab.machine is not None
    root = Path(f"/proc/{lab.machine.pid}/root")  # the machine's files, from the host
    state = tmp_path / "state"

    async def as_the_daemon() -> str:
        backend = sysconf.choose("auto", root, lab.bus_address)
        assert backend.name == "networkmanager"
        return sysconf.apply(state, backend, [TUNNEL])

    asyncio.run(as_the_daemon())
    assert nameservers(lab.resolv_conf()) == [TUNNEL]

    lab.stop_nm()
    lab.start_nm()  # reads our drop-in again: it leaves resolv.conf alone
    resolv = lab.resolv_conf()
    assert nameservers(resolv) == [TUNNEL] and search(resolv) == [DOMAIN]
    assert [e["nameservers"] for e in lab.dns_configuration()] == [[OLD]]  # the watcher's view

    agent(lab, write_config(tmp_path, lab), "restore")
    assert nameservers(lab.resolv_conf()) == [OLD]


def test_restore_after_a_crash(lab: NMLab, tmp_path: Path) -> None:
    """The process that applied is SIGKILLed; a fresh `restore` undoes everything, also with
    NetworkManager not running at the time (it reads the change when it starts)."""
    assert lab.machine is not None
    conf = write_config(tmp_path, lab)
    crash = textwrap.dedent(
        f"""\
        import os, signal
        from pathlib import Path
        from agent import sysconf
        backend = sysconf.choose("networkmanager", nm_bus={lab.bus_address!r})
        print(sysconf.apply(Path({str(tmp_path / "state")!r}), backend, [{TUNNEL!r}]), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    res = lab.machine.run([sys.executable, "-c", crash], check=False)
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert "points at" in res.stdout
    assert nameservers(lab.resolv_conf()) == [TUNNEL]

    lab.stop_nm()
    said = agent(lab, conf, "restore")
    assert "not running" in said
    assert nameservers(lab.resolv_conf()) == [OLD]  # the file as NM had written it
    assert not dropin(lab, "run").exists() and not dropin(lab, "etc").exists()
    lab.start_nm()
    resolv = lab.resolv_conf()
    assert nameservers(resolv) == [OLD] and search(resolv) == [DOMAIN]
    assert not any(
        p.name.startswith(".") for p in (lab.dir / "etc-upper").iterdir()
    )  # no temp file left behind


def test_choose_prefers_resolv_conf_when_nm_does_not_write_it(tmp_path: Path, host: None) -> None:
    with NMLab(tmp_path / "lab", nm_dns="none") as lab:
        assert lab.machine is not None
        root = Path(f"/proc/{lab.machine.pid}/root")
        assert sysconf.choose("auto", root, lab.bus_address).name != "networkmanager"


def test_rc_manager_symlink(lab: NMLab, tmp_path: Path) -> None:
    """resolv.conf a symlink to NM's own file: replaced by ours, put back as the symlink,
    and NM's file behind it has the network's servers of now."""
    assert lab.machine is not None
    conf = lab.dir / "etc-nm/NetworkManager.conf"
    conf.write_text(conf.read_text().replace("rc-manager=file\n", "rc-manager=symlink\n"))
    lab.nmcli("general", "reload", "conf")
    lab.machine.run(["ln", "-sfn", "/run/NetworkManager/resolv.conf", "/etc/resolv.conf"])

    def inside() -> tuple[str, str]:
        assert lab.machine is not None
        link = lab.machine.run(["readlink", "/etc/resolv.conf"], check=False).stdout.strip()
        return link, lab.machine.run(["cat", "/etc/resolv.conf"]).stdout

    link, text = inside()
    assert link == "/run/NetworkManager/resolv.conf" and nameservers(text) == [OLD]
    agent_conf = write_config(tmp_path, lab)
    agent(lab, agent_conf, "stub")
    entry = json.loads((tmp_path / "state/stub.json").read_text())["entries"][0]
    assert entry["nm"]["rc_manager"] == "symlink"
    assert entry["resolv_conf"]["symlink"] == "/run/NetworkManager/resolv.conf"
    link, text = inside()
    assert link == "" and nameservers(text) == [TUNNEL] and search(text) == [DOMAIN]
    renew_with(lab, [NEW])
    assert nameservers(inside()[1]) == [TUNNEL]
    agent(lab, agent_conf, "restore")
    link, text = inside()
    assert link == "/run/NetworkManager/resolv.conf"
    assert nameservers(text) == [NEW] and search(text) == [DOMAIN]


def test_daemon_follows_the_networks_domains(lab: NMLab, tmp_path: Path) -> None:
    """The daemon (as root, as run by hand) points the stub and, when a new lease brings
    another domain, refreshes resolv.conf's search line (NM, silenced, would not); on stop
    NM writes the network of now."""
    assert lab.machine is not None
    agent_ = AgentProcess(
        lab.machine,
        tmp_path / "agent",
        f'listen = ["{TUNNEL}:53"]\nnm_bus = "{lab.bus_address}"\nlease_dirs = []\n'
        'stub_backend = "networkmanager"\n',
        manage_stub=True,
    )
    agent_.wait(  # status answers while the stub is being pointed (in a thread): both, then
        lambda s: s["search"] == [DOMAIN] and s["stub"]["refreshed"], 20, "pointing the stub"
    )
    resolv = lab.resolv_conf()
    assert nameservers(resolv) == [TUNNEL] and search(resolv) == [DOMAIN]

    lab.set_dns([NEW], domain="new.test")
    lab.renew()
    st = agent_.wait(lambda s: s["search"] == ["new.test"], 20, "following the new domain")
    end = time.monotonic() + 10
    while search(lab.resolv_conf()) != ["new.test"] and time.monotonic() < end:
        time.sleep(0.05)
    resolv = lab.resolv_conf()
    assert nameservers(resolv) == [TUNNEL] and search(resolv) == ["new.test"]  # lab.test gone
    assert (
        st["stub"]["error"] is None and "search domains new.test" in st["stub"]["asked"]["reason"]
    )
    request = json.loads((tmp_path / "agent/run/stub-request.json").read_text())
    assert request["search"] == ["new.test"]  # what root would read under the unit

    agent_.proc.popen.send_signal(signal.SIGTERM)
    assert agent_.proc.popen.wait(20) == 0
    resolv = lab.resolv_conf()
    assert nameservers(resolv) == [NEW] and search(resolv) == ["new.test"]  # NM's, of now
