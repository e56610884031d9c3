"""Our tunnel as its own process (the real `dnstls-agent tunnel` command), for tests and benches."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query

from tests.lab.netns import REPO, Netns
from tests.lab.proc import Process


def answers(host: str, port: int, name: str = "www.lab.test") -> bool:
    try:
        dns.query.udp(dns.message.make_query(name, "A"), host, port=port, timeout=0.3)
    except (OSError, dns.exception.Timeout):
        return False
    return True


class TunnelProcess:
    def __init__(self, proc: Process, host: str, port: int) -> None:
        self.proc = proc
        self.host = host
        self.port = port

    @classmethod
    def start(
        cls,
        args: Sequence[str],
        log: Path,
        *,
        host: str,
        port: int,
        netns: Netns | None = None,
        wait: bool = True,
    ) -> TunnelProcess:
        argv = [sys.executable, "-m", "agent", "-v", "tunnel", "--listen", f"{host}:{port}", *args]
        if netns is not None:
            proc = netns.start(argv, log)
        else:
            proc = Process(argv, log, env={**os.environ, "PYTHONPATH": str(REPO)})
        if wait:
            proc.wait_until(lambda: "listening on" in log.read_text(), 10, "tunnel")
            if port == 0:  # the tunnel chose (the same for UDP and TCP): its log says which
                m = re.search(r"listening on \[\('[^']+', (\d+)\)", log.read_text())
                assert m, log.read_text()
                port = int(m.group(1))
        return cls(proc, host, port)

    def statistics(self, timeout: float = 10.0) -> dict[str, Any]:
        """Ask for statistics (SIGUSR1) and read the JSON line the tunnel logs."""
        before = self.proc.log.read_text().count("statistics: ")
        self.proc.popen.send_signal(signal.SIGUSR1)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            lines = [ln for ln in self.proc.log.read_text().splitlines() if "statistics: " in ln]
            if len(lines) > before:
                data: dict[str, Any] = json.loads(lines[-1].split("statistics: ", 1)[1])
                return data
            time.sleep(0.02)
        raise AssertionError(f"no statistics from the tunnel; log:\n{self.proc.tail()}")

    def stop(self) -> None:
        self.proc.stop()
