"""Idle memory of the daemon (`dnstls-agent run`) beside stubby and unbound.

All three run in one throw-away network namespace (loopback only), started and stopped by
this script, by PID:

    ours      python -m agent run: manage_stub = false, state, runtime and stub state in a
              temporary directory, listen 127.0.0.153:5353, no NetworkManager (a bus that
              does not exist), no lease files; the netlink watcher runs (the default)
    stubby    127.0.0.154:5353, TLS only, authentication required, upstream 127.0.0.1:853
    unbound   127.0.0.155:5353, a TLS forwarder (forward-tls-upstream) to 127.0.0.1:853,
              one thread, default caches

Nothing listens on 127.0.0.1:853 and nothing asks a question: each program is idle. Once
each listens, the script waits --idle seconds and reads VmRSS (/proc/PID/status), and
prints the three side by side in MiB with our ratio to each. Bounded (--timeout for the
start of each), root (network namespaces).

    python bench/daemon_memory.py [--python /tmp/venv-pypi/bin/python] [--idle 3]

--python runs the agent with another interpreter (e.g. a venv with PyPI's pyroute2),
with this tree's `agent` package.
"""

from __future__ import annotations

import argparse
import socket
import struct
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.lab.netns import Netns, new_tag  # noqa: E402
from tests.lab.proc import Process, need  # noqa: E402

PORT = 5353
OURS, STUBBY, UNBOUND = "127.0.0.153", "127.0.0.154", "127.0.0.155"
UPSTREAM, AUTH_NAME = "127.0.0.1", "dns.test"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def agent_conf(d: Path) -> str:
    return f"""manage_stub = false
state_dir = "{d}/state"
runtime_dir = "{d}/run"
stub_state_dir = "{d}/stub"
listen = ["{OURS}:{PORT}"]
nm_bus = "unix:path=/nonexistent"
lease_dirs = []
"""


def stubby_conf(d: Path) -> str:
    return f"""resolution_type: GETDNS_RESOLUTION_STUB
dns_transport_list:
  - GETDNS_TRANSPORT_TLS
tls_authentication: GETDNS_AUTHENTICATION_REQUIRED
idle_timeout: 10000
appdata_dir: "{d}/stubby-appdata"
tls_ca_file: "{CA_BUNDLE}"
listen_addresses:
  - {STUBBY}@{PORT}
upstream_recursive_servers:
  - address_data: {UPSTREAM}
    tls_port: 853
    tls_auth_name: "{AUTH_NAME}"
"""


def unbound_conf(d: Path) -> str:
    return f"""server:
    verbosity: 1
    use-syslog: no
    logfile: ""
    username: ""
    chroot: ""
    directory: "{d}"
    pidfile: ""
    do-daemonize: no
    interface: {UNBOUND}@{PORT}
    do-ip6: no
    num-threads: 1
    module-config: "iterator"
    do-not-query-localhost: no
    tls-cert-bundle: "{CA_BUNDLE}"
forward-zone:
    name: "."
    forward-tls-upstream: yes
    forward-addr: {UPSTREAM}@853#{AUTH_NAME}
remote-control:
    control-enable: no
"""


def listening(pid: int, ip: str, port: int) -> bool:
    """Whether the process's namespace has a UDP socket bound to ip:port."""
    want = f"{struct.unpack('<I', socket.inet_aton(ip))[0]:08X}:{port:04X}"
    try:
        rows = Path(f"/proc/{pid}/net/udp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(row.split()[1] == want for row in rows)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def version(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    return (out.stdout or out.stderr).strip().splitlines()[0] if out.returncode == 0 else "?"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--python", default=sys.executable, help="interpreter for the agent")
    ap.add_argument("--idle", type=float, default=3.0, help="seconds idle before reading")
    ap.add_argument("--timeout", type=float, default=20.0, help="bound on each start")
    args = ap.parse_args()
    pyroute2 = version(
        [args.python, "-c", "import importlib.metadata as m; print(m.version('pyroute2'))"]
    )
    with tempfile.TemporaryDirectory(prefix="dta-mem-") as tmp:
        d = Path(tmp)
        (d / "stubby-appdata").mkdir()
        (d / "agent.toml").write_text(agent_conf(d))
        (d / "stubby.yml").write_text(stubby_conf(d))
        (d / "unbound.conf").write_text(unbound_conf(d))
        ns = Netns(f"dta-mem-{new_tag()}")
        try:
            started: dict[str, tuple[Process, str]] = {
                "dnstls-agent run": (
                    ns.start(
                        [args.python, "-m", "agent", "-c", str(d / "agent.toml"), "run"],
                        d / "agent.log",
                    ),
                    OURS,
                ),
                "stubby": (
                    ns.start([need("stubby"), "-C", str(d / "stubby.yml")], d / "stubby.log"),
                    STUBBY,
                ),
                "unbound": (
                    ns.start([need("unbound"), "-d", "-c", str(d / "unbound.conf")], d / "ub.log"),
                    UNBOUND,
                ),
            }
            for name, (proc, ip) in started.items():
                proc.wait_until(partial(listening, proc.pid, ip, PORT), args.timeout, name)
            time.sleep(args.idle)
            rss: dict[str, float] = {}
            for name, (proc, _ip) in started.items():
                if not proc.alive():
                    raise RuntimeError(f"{name} stopped while idle; log:\n{proc.tail()}")
                rss[name] = rss_mib(proc.pid)
        finally:
            ns.delete()
    ours = rss["dnstls-agent run"]
    notes = {
        "dnstls-agent run": f"pyroute2 {pyroute2}, {version([args.python, '--version'])}",
        "stubby": version([need("stubby"), "-V"]),
        "unbound": "unbound " + version([need("unbound"), "-V"]).removeprefix("Version "),
    }
    print(f"VmRSS after {args.idle:g} s idle, in a throw-away network namespace (MiB)")
    for name, mib in rss.items():
        print(f"  {name:18} {mib:6.1f}   {notes[name]}")
    print(
        f"  ours / stubby {ours / rss['stubby']:.1f}x, ours / unbound {ours / rss['unbound']:.1f}x"
    )


if __name__ == "__main__":
    main()
