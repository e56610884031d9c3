"""`restore` and `stub`: point the system's stub resolver at the tunnel, and back."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from agent import config
from agent.cli import common, lazy
from agent.cli.common import EXIT_BAD_REQUEST, EXIT_OK

LOG = logging.getLogger(__name__)


def add(sub: common.Sub) -> None:
    rs = sub.add_parser(
        "restore",
        help="bring the system's stub resolver back to what it was before the agent",
        description="Undoes every change the agent made to the system's DNS configuration, "
        "as recorded in its state directory; safe to run at any time, also after a crash. "
        "The systemd unit runs it after every stop with --unless-restarting.",
    )
    rs.add_argument(
        "--unless-restarting",
        action="store_true",
        help="as the unit's ExecStopPost: under a strict or encrypted profile, leave the stub "
        "pointed at the tunnel when systemd starts the daemon again (a restart job, a crash "
        "or watchdog kill under Restart=always): no DNS meanwhile rather than cleartext",
    )
    common.add_json(rs, help="print JSON")
    rs.set_defaults(func=cmd_restore)
    st = sub.add_parser(
        "stub",
        help="point the system's stub resolver at the tunnel (the unit runs this as root)",
        description="Points the system's stub resolver at the tunnel's first listen address, "
        "with the backend of the configuration's stub_backend (auto: detected). The change is "
        "journalled first; `dnstls-agent restore` undoes it. The search domains are the "
        "network's, as the running daemon last asked (its runtime directory's "
        "stub-request.json). `--refresh` applies that request again, only when the stub is "
        "pointed (the path unit dnstls-agent-stub.path runs it as root). `--dhclient` is "
        "dhclient-script's make_resolv_conf while the stub is pointed (its enter hook runs it): "
        "the lease's file becomes what restore puts back and resolv.conf keeps pointing at the "
        "tunnel. `--show` only says which backend would be used and what is journalled. "
        'stub_backend = "resolv.conf" where NetworkManager, resolvconf or systemd-resolved '
        "writes /etc/resolv.conf is refused (exit status 2) under a strict or encrypted "
        "profile, and warned about under opportunistic.",
    )
    how = st.add_mutually_exclusive_group()
    how.add_argument("--show", action="store_true", help="change nothing; say what would be done")
    how.add_argument(
        "--refresh",
        action="store_true",
        help="apply the daemon's request again (search domains; a resolv.conf rewritten by "
        "someone else); nothing when the stub is not pointed",
    )
    how.add_argument(
        "--dhclient",
        action="store_true",
        help="the lease in dhclient-script's environment (new_domain_name_servers, ...): "
        "kept for restore, never written as the system's nameservers while the stub is pointed",
    )
    common.add_json(st, help="print JSON")
    st.set_defaults(func=cmd_stub)


def cmd_stub(args: argparse.Namespace) -> int:
    cfg = config.load_or_explain(args.config)
    address = cfg.listen[0][0]
    state, runtime = Path(cfg.stub_state_dir), Path(cfg.runtime_dir)
    if args.dhclient:  # before manage_stub: without a journal, dhclient's own job is done
        said = lazy.sysconf.dhclient_lease(state, os.environ, [address], _asked_search(runtime))
        return _said(args, said)
    backend = lazy.sysconf.choose(cfg.stub_backend, nm_bus=cfg.nm_bus or None)
    if args.show:
        journal = lazy.sysconf.journal_of(state)
        if args.json:
            print(json.dumps({"ok": True, "backend": backend.name, "describe": backend.describe(),
                              "tunnel": address, "journal": journal or None}))  # fmt: skip
            return EXIT_OK
        print(f"backend: {backend.name} ({backend.describe()}); tunnel: {address}")
        print(f"journal: {json.dumps(journal) if journal else 'empty (nothing changed)'}")
        return EXIT_OK
    if not cfg.manage_stub:
        return _said(args, "manage_stub = false: the system stub is left alone")
    if args.refresh:
        try:
            asked = lazy.request.read(runtime)
        except lazy.request.RequestError as exc:  # the daemon's request is hostile ground
            error = f"the daemon's request is not usable, nothing changed: {exc}"
            return common.fail(args, error, EXIT_BAD_REQUEST)
        search = asked.search if asked is not None else None
        said = lazy.sysconf.refresh(state, [address], search, nm_bus=cfg.nm_bus or None)
        return _said(args, said)
    # refused (StubRefused, a UsageError: status 2) before anything changes
    lazy.sysconf.check_backend(backend, cfg.profiles(), nm_bus=cfg.nm_bus or None)
    return _said(args, lazy.sysconf.apply(state, backend, [address], _asked_search(runtime)))


def _said(args: argparse.Namespace, message: str, **extra: str) -> int:
    """What was done, as a line, or with --json as {"ok": true, "message": ...} (and extra)."""
    print(json.dumps({"ok": True, "message": message, **extra}) if args.json else message)
    return EXIT_OK


def _asked_search(runtime: Path) -> list[str] | None:
    """The search domains the daemon last asked for; None (as the backend finds them) when
    it asked nothing, or something unusable."""
    try:
        asked = lazy.request.read(runtime)
    except lazy.request.RequestError as exc:
        LOG.warning("%s: the network's search domains as the backend finds them", exc)
        return None
    return list(asked.search) if asked is not None else None


def cmd_restore(args: argparse.Namespace) -> int:
    try:
        cfg = config.load(args.config)
    except config.ConfigError:
        cfg = config.Config()  # a broken file must not stop a restore
    why: dict[str, str] = {}
    if args.unless_restarting:
        at_stop = lazy.privacy.at_stop(cfg.profiles(), lazy.privacy.stop_facts(os.environ))
        if at_stop.keep:
            said = f"the system stub is left pointed at the tunnel: {at_stop.reason}"
            return _said(args, said, reason=at_stop.reason)
        why["reason"] = at_stop.reason
        if not args.json:
            print(f"restoring the system stub: {at_stop.reason}")
    return _said(args, lazy.sysconf.restore(Path(cfg.stub_state_dir)), **why)
