"""`dnstls-agent run`: wiring, signals, readiness, and a clean stop.

Starts the tunnel, the engine, the watchers and the control socket; tells systemd
when the first decision is made (READY=1), keeps it informed (STATUS=), pets the
watchdog; SIGHUP reloads the configuration (a broken one is refused, the old one
kept), SIGTERM/SIGINT stop everything in order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from agent import commands, logsetup, sdnotify, sysconf
from agent import config as configmod
from agent.config import Config
from agent.control import SOCKET_NAME, ControlServer, request_number, request_text
from agent.engine import Engine
from agent.errors import AgentError, UsageError
from agent.model import Failure, Profile, UpstreamSpec
from agent.notifications import DesktopNotifier
from agent.policy import Warning
from agent.state import Store
from agent.sysconf import request as stub_request
from agent.sysconf.watch import ResolvConfWatch
from agent.tunnel.cache import CacheSettings
from agent.tunnel.events import Mode
from agent.tunnel.forwarder import Tunnel
from agent.tunnel.settings import TunnelConfig
from agent.watchers.leases import LeaseWatcher
from agent.watchers.netlink import NetlinkWatcher
from agent.watchers.nm import NMWatcher

LOG = logging.getLogger(__name__)


def cache_settings(cfg: Config) -> CacheSettings | None:
    """The tunnel's cache as configured (None: off)."""
    if not cfg.cache:
        return None
    return CacheSettings(
        max_entries=cfg.cache_size,
        max_bytes=cfg.cache_max_bytes,
        min_ttl=cfg.cache_min_ttl,
        max_ttl=cfg.cache_max_ttl,
        max_negative_ttl=cfg.cache_max_negative_ttl,
        serve_stale=cfg.serve_stale,
        prefetch=cfg.prefetch,
    )


class Daemon:
    def __init__(self, cfg: Config, config_path: Path | None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.tasks: list[asyncio.Task[Any]] = []
        self.stopping = asyncio.Event()
        self.tunnel: Tunnel | None = None
        self.engine: Engine | None = None
        self.control: ControlServer | None = None
        self.failure: str | None = None  # why it stopped, when it was not asked to
        self.stub_applied = False
        self.notifier = DesktopNotifier()
        self._notes: set[asyncio.Task[bool]] = set()
        self.stub: dict[str, Any] = {"asked": None, "refreshed": None, "error": None}
        self._refreshing: asyncio.Task[None] | None = None
        self._refresh_again = False

    async def run(self) -> None:
        cfg = self.cfg
        logsetup.configure(cfg.log_level)
        self.tunnel = Tunnel(
            TunnelConfig(
                upstreams=(),
                profile=Profile.OPPORTUNISTIC,
                listen=cfg.listen,
                idle_timeout=cfg.idle_timeout,
                query_timeout=cfg.query_timeout,
                fallback_delay=cfg.defaults.fallback_delay,
                cache=cache_settings(cfg),
            ),
            events=self,
        )
        await self.tunnel.start()
        store = Store(Path(cfg.state_dir))
        engine = Engine(
            cfg,
            self.tunnel,
            store,
            own_addresses={h for h, _ in cfg.listen},
            on_warnings=self._on_warnings,
            on_search=self._on_search,
        )
        self.engine = engine
        self.control = ControlServer(Path(cfg.runtime_dir) / SOCKET_NAME, self.handle)
        try:
            await self.control.start()
            self._spawn(engine.run(), "engine")
            self._spawn(
                NMWatcher(engine.on_nm, bus_address=cfg.nm_bus or None).run(),
                "NetworkManager watcher",
            )
            if cfg.netlink:
                self._spawn(NetlinkWatcher(engine.on_netlink).run(), "netlink watcher")
            if cfg.lease_dirs:
                self._spawn(LeaseWatcher(cfg.lease_dirs, engine.on_leases).run(), "lease watcher")
            self._signals()
            await asyncio.wait_for(engine.ready.wait(), 30)
            await self._point_stub()
            sdnotify.notify("READY=1")
            LOG.info("ready: %s", engine.plan.reason if engine.plan else "")
            self._spawn(self._status_loop(), "status")
            if cfg.manage_stub:
                watch = ResolvConfWatch(Path("/etc/resolv.conf"), {h for h, _ in cfg.listen})
                self._spawn(watch.run(self._ask_refresh), "resolv.conf watch")
            await self.stopping.wait()
        finally:
            await self.stop()

    # -- what the tunnel reports (TunnelEvents): to the engine, which decides ------------------
    def upstream_failed(self, spec: UpstreamSpec, failure: Failure, detail: str) -> None:
        if self.engine is not None:
            self.engine.upstream_failed(spec, failure, detail)

    def upstream_recovered(self, spec: UpstreamSpec) -> None:
        if self.engine is not None:
            self.engine.upstream_recovered(spec)

    def mode_changed(self, mode: Mode, why: str) -> None:
        if self.engine is not None:
            self.engine.mode_changed(mode.value, why)

    def _on_warnings(self, raised: list[Warning], cleared: list[Warning]) -> None:
        """Where users look: besides the log and status, the desktop (best effort)."""
        for w in raised:
            task = asyncio.create_task(self.notifier.notify(w.alert.value, w.text))
            self._notes.add(task)
            task.add_done_callback(self._notes.discard)

    # -- the system stub: pointed at start, refreshed when the network or a file changes ------
    def _on_search(self, search: tuple[str, ...]) -> None:
        self._ask_refresh("search domains " + (" ".join(search) or "none"))

    def _ask_refresh(self, reason: str) -> None:
        """Tell root (the path unit's `stub --refresh`) through the request file; run as root,
        refresh here. Asked while a refresh runs: once more when it ends."""
        if not self.cfg.manage_stub:
            return
        search = self._search()
        try:
            stub_request.write(Path(self.cfg.runtime_dir), search, reason)
        except OSError as exc:
            LOG.warning("could not ask for a refresh of the system stub: %s", exc)
        self.stub["asked"] = {"reason": reason, "search": list(search), "at": time.time()}
        LOG.info("system stub refresh asked for: %s", reason)
        if not self.stub_applied:
            return  # not ours to do (the unit's path unit does it as root), or not pointed
        if self._refreshing is not None and not self._refreshing.done():
            self._refresh_again = True
            return
        self._refreshing = asyncio.create_task(self._refresh(), name="stub refresh")

    def _search(self) -> tuple[str, ...]:
        """The engine's search domains that root will accept (stub_request.domain)."""
        out: list[str] = []
        for d in (self.engine.search if self.engine else None) or ():
            try:
                out.append(stub_request.domain(d))
            except ValueError as exc:
                LOG.warning("search domain left out of the system stub: %s", exc)
        return tuple(dict.fromkeys(out))[: stub_request.MAX_DOMAINS]

    async def _refresh(self) -> None:
        while True:
            self._refresh_again = False
            try:
                said = await asyncio.to_thread(
                    sysconf.refresh,
                    Path(self.cfg.stub_state_dir),
                    [self.cfg.listen[0][0]],
                    self._search(),
                    nm_bus=self.cfg.nm_bus or None,
                )
            except (OSError, AgentError) as exc:
                self.stub["error"] = str(exc)
                LOG.error("could not refresh the system stub: %s", exc)
            else:
                self.stub.update(refreshed=time.time(), error=None)
                LOG.info("%s", said)
            if not self._refresh_again or self.stopping.is_set():
                return

    async def _point_stub(self) -> None:
        """As root (run by hand), the daemon points the stub itself and puts it back at
        stop. Under the systemd unit it runs unprivileged: ExecStartPost=+ and
        ExecStopPost=+ do it as root. In a thread, as every refresh: the backends wait on
        D-Bus and files (NetworkManager's reload took 0.6 s in the lab), and the loop
        serves queries and times probes meanwhile."""
        if not self.cfg.manage_stub or os.geteuid() != 0:
            return
        nm_bus = self.cfg.nm_bus or None
        backend = await asyncio.to_thread(sysconf.choose, self.cfg.stub_backend, nm_bus=nm_bus)
        # a backend that would leave a cleartext window under strict: refused, the daemon stops
        await asyncio.to_thread(sysconf.check_backend, backend, self.cfg.profiles(), nm_bus=nm_bus)
        try:
            said = await asyncio.to_thread(
                sysconf.apply,
                Path(self.cfg.stub_state_dir),
                backend,
                [self.cfg.listen[0][0]],
                self._search(),
            )
            LOG.info("%s", said)
            self.stub_applied = True
            self.stub["refreshed"] = time.time()
        except (OSError, AgentError) as exc:
            LOG.error("could not point the system stub at the tunnel: %s", exc)

    def _restore_stub(self) -> None:
        if not self.stub_applied:
            return
        try:
            LOG.info("%s", sysconf.restore(Path(self.cfg.stub_state_dir)))
        except (OSError, AgentError) as exc:
            LOG.error("could not restore the system stub: %s (run dnstls-agent restore)", exc)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._ended)
        self.tasks.append(task)

    def _ended(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or self.stopping.is_set():
            return
        exc = task.exception()
        self.failure = f"{task.get_name()} stopped unexpectedly: {exc!r}"
        LOG.error("%s; stopping", self.failure)
        self.stopping.set()

    def _signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self._log_status)

    def _log_status(self) -> None:
        """SIGUSR1: what it knows and does, asked for: information, not a warning."""
        if self.engine is not None:
            LOG.info("status: %s", json.dumps(self.engine.status()))

    def reload(self) -> None:
        """SIGHUP. Whatever goes wrong loading the file, the reload is refused (the old
        configuration kept) and systemd is told READY=1 again: never left "reloading"."""
        sdnotify.notify("RELOADING=1")
        try:
            cfg = configmod.load(self.config_path)
        except configmod.ConfigError as exc:
            LOG.error("configuration not reloaded, keeping the old one:\n%s", exc)
        except Exception as exc:  # the edge: what the loader did not foresee never stops it
            LOG.error("configuration not reloaded, keeping the old one: %s: %s",
                      type(exc).__name__, exc)  # fmt: skip
        else:
            if (cfg.listen, cfg.state_dir, cfg.runtime_dir) != (
                self.cfg.listen,
                self.cfg.state_dir,
                self.cfg.runtime_dir,
            ):
                LOG.warning("listen, state_dir and runtime_dir change only on restart")
            self.cfg = cfg
            logsetup.configure(cfg.log_level, announce=True)  # a run-time log-level ends here
            assert self.engine is not None
            self.engine.reload(cfg)
            LOG.info("configuration reloaded from %s", ", ".join(cfg.files) or "defaults")
        finally:
            sdnotify.notify("READY=1")

    async def _status_loop(self) -> None:
        interval = sdnotify.watchdog_interval()
        while True:
            engine, tunnel = self.engine, self.tunnel
            if engine and tunnel and engine.plan:
                sdnotify.notify(f"STATUS={engine.plan.reason}; tunnel {tunnel.mode}")
            if interval:
                sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(min(interval or 5.0, 5.0))

    def handle(self, request: dict[str, Any]) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        """One control request, its caller already allowed (ControlServer); a bad field is a
        UsageError, which the server answers as a bad request. `query` answers later (a
        coroutine, its request validated first)."""
        engine = self.engine
        assert engine is not None
        command = request.get("command")
        if command == "status":
            return {"ok": True, "status": {**engine.status(), "stub": self.stub}}
        if command == "notify":
            iface, action = request_text(request, "interface"), request_text(request, "action")
            engine.poke(f"dispatcher: {iface} {action}")
            return {"ok": True}
        if command == "portal-allow":
            minutes = request_number(request, "minutes", 5.0, high=60)
            return {"ok": True, "until": engine.allow_portal(minutes)}
        if command == "reprobe":
            engine.reprobe()
            return {"ok": True}
        if command == "flush-caches":
            assert self.tunnel is not None
            return {"ok": True, "flushed": self.tunnel.flush_cache("asked by flush-caches")}
        if command == "log-level":  # until the next reload or restart (then log_level's)
            old, new = logsetup.set_level(request_text(request, "level", max_len=16))
            return {"ok": True, "old": old, "new": new}
        assert self.tunnel is not None
        if command == "statistics":
            return {"ok": True, "statistics": commands.statistics(engine, self.tunnel)}
        if command == "statistics-reset":  # the counters as they ended, and since when they ran
            ended = commands.statistics(engine, self.tunnel)
            now = time.time()
            commands.reset_statistics(engine, self.tunnel, now)
            return {"ok": True, "statistics": ended, "since": now}
        if command == "query":
            return commands.query(engine, self.tunnel, *commands.query_question(request))
        raise UsageError(f"unknown command {command!r}")

    async def stop(self) -> None:
        self.stopping.set()
        sdnotify.notify("STOPPING=1")
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.control is not None:
            await self.control.close()
        self.notifier.close()
        if self._refreshing is not None:
            await asyncio.gather(self._refreshing, return_exceptions=True)
        self._restore_stub()  # before the tunnel goes: never a stub pointing at nothing
        if self.tunnel is not None:
            await self.tunnel.stop()
        LOG.info("stopped")


async def run(cfg: Config, config_path: Path | None) -> str | None:
    """Run until stopped; None when asked to stop, else why it stopped by itself."""
    daemon = Daemon(cfg, config_path)
    await daemon.run()
    return daemon.failure
