"""The quick-start demo: real resolvers on loopback, probed by the real command.

Until the daemon exists this is what `./scripts/dev run` runs. It needs no network:
    127.0.53.1  unbound, DNS over TLS on 853 (certificate carries its IP)
    127.0.53.2  the test peer: port 853 black-holed (no SYN-ACK), STARTTLS upgrade on 53
    127.0.53.3  the test peer as a cleartext-only resolver
Ports are 53/853 as root, else 8053/8853. Everything started is stopped at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.lab.certs import CA  # noqa: E402
from tests.lab.peer import spawn  # noqa: E402
from tests.lab.proc import Process  # noqa: E402
from tests.lab.unbound import Unbound, UnboundConfig  # noqa: E402

UNBOUND, UPGRADE_ONLY, CLEARTEXT = "127.0.53.1", "127.0.53.2", "127.0.53.3"


def main() -> int:
    dns_port, tls_port = (53, 853) if os.geteuid() == 0 else (8053, 8853)
    started: list[Process] = []
    with tempfile.TemporaryDirectory(prefix="dnstls-demo-") as tmp:
        d = Path(tmp)
        ca = CA.create(d, name="dnstls-agent demo CA")
        cert = ca.issue(d, "resolvers", ips=(UNBOUND, UPGRADE_ONLY, CLEARTEXT))
        try:
            ub = Unbound.start(
                UnboundConfig(UNBOUND, dns_port, tls_port, cert.cert, cert.key), d / "unbound"
            )
            started.append(ub.proc)
            common = ["--dns-port", str(dns_port), "--tls-port", str(tls_port)]
            proc, _ = spawn(
                d / "peer-upgrade.log",
                "--host",
                UPGRADE_ONLY,
                *common,
                "--cert",
                str(cert.cert),
                "--key",
                str(cert.key),
                "--fault",
                "blackhole-tls",
            )
            started.append(proc)
            proc, _ = spawn(
                d / "peer-cleartext.log",
                "--host",
                CLEARTEXT,
                *common,
                "--tls-port",
                "-1",
                "--no-upgrade",
            )
            started.append(proc)
            print(__doc__, flush=True)
            ports = [] if dns_port == 53 else common
            for extra in (
                ["--profile", "strict", "--ca-file", str(ca.path)],
                ["--profile", "opportunistic"],
            ):
                argv = ["dnstls-agent", "probe", UNBOUND, UPGRADE_ONLY, CLEARTEXT, *extra, *ports]
                print("$", " ".join(argv), flush=True)
                run = subprocess.run(
                    [sys.executable, "-m", "agent", *argv[1:]], cwd=ROOT, check=False
                )
                print(f"(exit status {run.returncode}: 0 when every resolver has a private path)\n")
        finally:
            for p in reversed(started):
                p.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
