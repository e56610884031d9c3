"""systemd-resolved on its own (no bus, no NetworkManager), as a DNS stub, in a network
namespace of the caller's and a private mount namespace of its own.

resolved is not installed on the host and must not be (its package takes over
/etc/resolv.conf): `tests.lab.resolvedlab.fetch_resolved` unpacks Debian's package. Here
`unshare --mount --propagation=private` gives the binary a mount namespace in which:

    /run              a tmpfs, with /run/systemd/resolve made for resolved's user; no bus
                      socket there: resolved then waits for one (sd-bus "watch bind",
                      inotify on /run) and serves DNS meanwhile; no /run/systemd/netif, so no
                      link is "managed" and only the global servers of resolved.conf count
    /etc/passwd,      bind mounts of copies of the host's with the user systemd-resolve added
    /etc/group        (started as root, resolved drops to that user and will not start
                      without it); nothing is added to the host's files
    /etc/systemd      a bind mount of a directory that holds only the given resolved.conf
                      (the host has no /etc/systemd/resolved.conf to bind a file onto)
    /etc/resolv.conf  a bind mount of a file naming the stub, 127.0.0.53

and its environment has SSL_CERT_FILE = the CA bundle to trust for DNS over TLS: resolved
(OpenSSL build) loads the trust store with SSL_CTX_set_default_verify_paths, which reads
that variable; without it the handshake fails with "certificate verify failed". The bundle
is copied to /run/dnstls-lab-ca.pem first: resolved reads it only after it dropped to its
user, which cannot read a file under a 0700 temporary directory.

Facts this rests on (systemd 252, Debian 12): resolved sends to a global server only while
some link is "relevant" (up, with carrier, not loopback, with a global address), else every
lookup ends at once with "network-down": the namespace needs such a link (a veth pair with
both ends inside it will do; dummy links may be unavailable). It does not cache answers from
a server in 127.0.0.0/8 unless CacheFromLocalhost=yes. Its cache holds at most 4096 entries
(CACHE_MAX in resolved-dns-cache.c).

Everything runs as one process (ip netns exec, unshare, sh and taskset all exec), so
`Process.pid` is resolved's own and `Process.stop()` ends it by PID; the mount namespace,
and every mount in it, goes with it.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from tests.lab.machine import clean_env
from tests.lab.netns import Netns
from tests.lab.proc import Process, need
from tests.lab.resolvedlab import BINARY, USER_ID

STUB = "127.0.0.53"
CA_IN_RUN = "/run/dnstls-lab-ca.pem"


def resolved_conf(servers: Sequence[str], extra: str = "") -> str:
    """resolved.conf: these global servers only (ADDR#NAME), DNS over TLS required, no
    DNSSEC, no fallback servers, no LLMNR or mDNS, the cache on, the stub listener on."""
    return (
        "[Resolve]\n"
        f"DNS={' '.join(servers)}\n"
        "FallbackDNS=\n"
        "DNSOverTLS=yes\n"
        "DNSSEC=no\n"
        "Cache=yes\n"
        "LLMNR=no\n"
        "MulticastDNS=no\n"
        "DNSStubListener=yes\n" + extra
    )


def _user_files(directory: Path) -> tuple[Path, Path]:
    passwd, group = directory / "passwd", directory / "group"
    users = Path("/etc/passwd").read_text()
    groups = Path("/etc/group").read_text()
    if not any(ln.startswith("systemd-resolve:") for ln in users.splitlines()):
        users += f"systemd-resolve:x:{USER_ID}:{USER_ID}::/:/usr/sbin/nologin\n"
    if not any(ln.startswith("systemd-resolve:") for ln in groups.splitlines()):
        groups += f"systemd-resolve:x:{USER_ID}:\n"
    passwd.write_text(users)
    group.write_text(groups)
    return passwd, group


def start_resolved(
    ns: Netns,
    package_root: Path,
    directory: Path,
    conf: str,
    ca_file: Path,
    *,
    prefix: Sequence[str] = (),
    debug: bool = False,
) -> Process:
    """resolved in `ns` with resolved.conf `conf`, trusting `ca_file`; files in `directory`
    (new), its log in DIR/resolved.log. `prefix` goes before the whole command (e.g.
    taskset). Not waited for: the caller asks the stub until it answers."""
    directory.mkdir(parents=True)
    passwd, group = _user_files(directory)
    etc_systemd = directory / "etc-systemd"
    etc_systemd.mkdir()
    (etc_systemd / "resolved.conf").write_text(conf)
    resolv = directory / "resolv.conf"
    resolv.write_text(f"nameserver {STUB}\n")
    q = shlex.quote
    mount = need("mount")
    script = "\n".join(
        [
            "set -e",
            f"{mount} -t tmpfs dta-resolved-run /run",
            "mkdir -p /run/systemd/resolve",
            f"chown {USER_ID}:{USER_ID} /run/systemd/resolve",
            f"cp {q(str(ca_file))} {CA_IN_RUN}",
            f"chmod 0644 {CA_IN_RUN}",
            f"{mount} --bind {q(str(passwd))} /etc/passwd",
            f"{mount} --bind {q(str(group))} /etc/group",
            f"{mount} --bind {q(str(etc_systemd))} /etc/systemd",
            f"{mount} --bind {q(str(resolv))} /etc/resolv.conf",
            f"exec {q(str(package_root / BINARY))}",
        ]
    )
    (directory / "start.sh").write_text(script + "\n")
    env = clean_env(
        {
            "SSL_CERT_FILE": CA_IN_RUN,
            "SYSTEMD_LOG_TARGET": "console",
            "SYSTEMD_LOG_LEVEL": "debug" if debug else "info",
        }
    )
    unshare = [need("unshare"), "--mount", "--propagation=private"]
    argv = ns.argv([*prefix, *unshare, need("sh"), str(directory / "start.sh")])
    return Process(argv, directory / "resolved.log", env=env)


__all__ = ["STUB", "resolved_conf", "start_resolved"]
