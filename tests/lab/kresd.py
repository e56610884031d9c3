"""A real knot-resolver (kresd), serving DNS and DNS over TLS, answering only locally."""

from __future__ import annotations

from pathlib import Path

from tests.lab.proc import Process, need
from tests.lab.unbound import WWW_A, ZONE, answers, tls_listening


def render(host: str, dns_port: int, tls_port: int, cert: Path, key: Path) -> str:
    """kresd.conf: www.lab.test answered by policy, every other name NXDOMAIN.

    Nothing is ever passed to the iterator, and outgoing queries are bound to
    loopback besides: this resolver cannot send a packet beyond the machine.
    """
    www = f"www.{ZONE}"
    return f"""
net.listen('{host}', {dns_port}, {{ kind = 'dns' }})
net.listen('{host}', {tls_port}, {{ kind = 'tls' }})
net.tls('{cert}', '{key}')
net.outgoing_v4('127.0.0.1')
net.outgoing_v6('::1')
modules.unload('ta_update')
modules.unload('priming')
modules.unload('detect_time_skew')
trust_anchors.remove('.')
policy.add(policy.domains(
    policy.ANSWER({{ [kres.type.A] = {{ rdata = kres.str2ip('{WWW_A}'), ttl = 300 }} }}, true),
    {{ todname('{www}') }}))
policy.add(policy.all(policy.DENY))
"""


class Kresd:
    def __init__(self, proc: Process, host: str, dns_port: int, tls_port: int) -> None:
        self.proc = proc
        self.host = host
        self.dns_port = dns_port
        self.tls_port = tls_port

    @classmethod
    def start(
        cls, host: str, dns_port: int, tls_port: int, *, cert: Path, key: Path, directory: Path
    ) -> Kresd:
        binary = need("kresd")
        directory.mkdir(parents=True, exist_ok=True)
        conf = directory / "kresd.conf"
        conf.write_text(render(host, dns_port, tls_port, cert, key))
        proc = Process(
            [binary, "-n", "-q", "-c", str(conf), str(directory)], directory / "kresd.log"
        )
        proc.wait_until(
            lambda: answers(host, dns_port) and tls_listening(host, tls_port), 15, "kresd"
        )
        return cls(proc, host, dns_port, tls_port)

    def stop(self) -> None:
        self.proc.stop()
