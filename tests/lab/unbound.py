"""A real unbound, serving a small local zone over DNS (53-style) and DNS over TLS."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.query

from tests.lab.proc import Process, need

ZONE = "lab.test."
WWW_A = "198.51.100.10"


@dataclass(frozen=True)
class UnboundConfig:
    host: str
    dns_port: int
    tls_port: int
    cert: Path
    key: Path
    extra: str = ""  # more `server:` lines


def render(cfg: UnboundConfig, directory: Path) -> str:
    """unbound.conf for a resolver that answers lab.test only and never recurses anywhere."""
    return f"""server:
    interface: {cfg.host}@{cfg.dns_port}
    interface: {cfg.host}@{cfg.tls_port}
    tls-port: {cfg.tls_port}
    tls-service-key: "{cfg.key}"
    tls-service-pem: "{cfg.cert}"
    access-control: 0.0.0.0/0 allow
    access-control: ::/0 allow
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{directory}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 1
    num-threads: 1
    module-config: "iterator"
    incoming-num-tcp: 100
    tcp-idle-timeout: 30000
    local-zone: "." refuse
    local-zone: "{ZONE}" static
    local-data: "dns.{ZONE} 300 IN A {cfg.host}"
    local-data: "www.{ZONE} 300 IN A {WWW_A}"
    local-data: "whoami.{ZONE} 0 IN TXT \\"unbound\\""
{cfg.extra}
remote-control:
    control-enable: no
"""


def answers(host: str, port: int) -> bool:
    query = dns.message.make_query(f"www.{ZONE}", "A")
    try:
        dns.query.udp(query, host, port=port, timeout=0.2)
    except (OSError, dns.exception.Timeout):
        return False
    return True


def tls_listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Unbound:
    """Start with `Unbound.start(...)`; stop() by PID."""

    def __init__(self, cfg: UnboundConfig, proc: Process) -> None:
        self.cfg = cfg
        self.proc = proc

    @classmethod
    def start(
        cls, cfg: UnboundConfig, directory: Path, *, netns: str | None = None, wait: bool = True
    ) -> Unbound:
        binary = need("unbound")
        directory.mkdir(parents=True, exist_ok=True)
        conf = directory / "unbound.conf"
        conf.write_text(render(cfg, directory))
        prefix = ["ip", "netns", "exec", netns] if netns else []
        proc = Process([*prefix, binary, "-d", "-c", str(conf)], directory / "unbound.log")
        if wait and netns is None:
            proc.wait_until(
                lambda: answers(cfg.host, cfg.dns_port) and tls_listening(cfg.host, cfg.tls_port),
                10,
                "unbound",
            )
        return cls(cfg, proc)

    def stop(self) -> None:
        self.proc.stop()
