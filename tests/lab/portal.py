"""A captive portal's connectivity check: an HTTP server whose answer is "OK" once logged in.

NetworkManager fetches the check URI and expects "OK"; the portal's login page instead
means connectivity "portal". `login()` / `logout()` flip it (a file the server reads).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.lab.netns import Netns
from tests.lab.proc import Process

SERVER = """
import http.server, sys
state = sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = open(state, "rb").read()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""


class Portal:
    def __init__(self, ns: Netns, host: str, port: int, directory: Path) -> None:
        self.state = directory / "portal-state"
        self.logout()
        script = directory / "portal.py"
        script.write_text(SERVER)
        self.uri = f"http://{host}:{port}/check"
        self.proc: Process = ns.start(
            [sys.executable, str(script), host, str(port), str(self.state)],
            directory / "portal.log",
        )

    def login(self) -> None:
        self.state.write_bytes(b"OK")

    def logout(self) -> None:
        self.state.write_bytes(b"<html>Hotel Wi-Fi: please log in</html>")
