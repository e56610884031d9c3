"""`./scripts/dev run`'s demo (scripts/demo.py), run as a user would: it tells the key facts
(the order, the stub pointed, a lookup answered, nothing in cleartext, a clean teardown), in
under a minute, and leaves no namespace or process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import host_untouched
from tests.lab.demo_machine import PROGRAMS, netns_list
from tests.lab.netns import REPO

pytestmark = pytest.mark.system

TIMEOUT = 120


def holders_of(directory: Path) -> dict[int, str]:
    """Processes with a file open under `directory` (every process of the lab has its log
    there), and which."""
    out: dict[int, str] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(directory)):
                out[int(pid)] = target
                break
    return out


def run_demo(tmp: Path) -> subprocess.CompletedProcess[str]:
    """scripts/demo.py with its temporary directory under `tmp`; SIGTERM (its teardown runs)
    then SIGKILL when it overruns."""
    env = {**os.environ, "TMPDIR": str(tmp)}
    argv = [sys.executable, str(REPO / "scripts/demo.py")]
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"the demo took over {TIMEOUT} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_demo_shows_the_product_and_leaves_nothing(tmp_path: Path) -> None:
    with host_untouched(PROGRAMS):
        before = set(netns_list())
        res = run_demo(tmp_path)
        after = set(netns_list())
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    # the first order: both TLS resolvers (port 853 and the upgrade), the cleartext one not
    order = re.search(r"^\[[ \d.]+ s\] order: (.*) \(strict", out, re.M)
    assert order is not None, out
    assert set(order.group(1).split(", ")) == {
        "tls-port:198.51.100.1@853",
        "tls-upgrade:198.51.100.2@53",
    }, out
    assert re.search(r"probe 198\.51\.100\.3: tcp-plain: not used", out), out
    assert "/etc/resolv.conf now says nameserver 127.0.0.153" in out, out
    www = re.search(r"getent ahosts www\.lab\.test .* -> ([\d. ]+) in \d+ ms, carried by", out)
    assert www is not None and set(www.group(1).split()) & {"198.51.100.10", "198.51.100.7"}, out
    # the lease changed: the new order, answered by unbound's own record
    assert re.search(r"\] order: tls-port:198\.51\.100\.1@853 \(followed", out), out
    assert re.search(r"getent ahosts dns\.lab\.test .* -> 198\.51\.100\.1 in", out), out
    hits = re.search(r"tunnel\.cache hits (\d+) -> (\d+)", out)
    assert hits is not None and int(hits.group(2)) > int(hits.group(1)), out
    wire = re.search(
        r"(\d+) packets, (\d+) of them TLS; (\d+) names asked, (\d+) in cleartext", out
    )
    assert wire is not None, out
    assert int(wire.group(2)) > 0 and int(wire.group(3)) >= 2 and wire.group(4) == "0", out
    assert "NOT AS EXPECTED" not in out and "every step as expected" in out, out
    done = re.search(r"^done in ([\d.]+) s", out, re.M)
    assert done is not None and float(done.group(1)) < 60, out
    # teardown: said clean, and it is: the lab's namespaces gone, no process of it left
    assert re.search(r"teardown: \d+ processes stopped by PID, .* deleted, nothing left", out)
    names = set(re.findall(r"\bnml-(?:cli|srv)-\d+\b", out))
    assert len(names) == 2, out
    assert not names & after and not names & before, (names, after)  # others' come and go
    assert holders_of(tmp_path) == {}
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())  # its directory removed


def test_demo_without_root_says_why_and_starts_nothing() -> None:
    with host_untouched(("setpriv",)):  # root, to become nobody
        argv = [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            str(REPO / "scripts/demo.py"),
        ]
        res = subprocess.run(argv, cwd="/", capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2, res
    assert "needs root" in res.stderr and "namespaces" in res.stderr, res.stderr
    assert res.stdout == ""  # not even "starting the lab"
