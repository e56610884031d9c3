"""A stand-in for systemd's unit manager on a lab's private bus, for one service.

Why: PID 1 here is not systemd, and the resolved backend restarts systemd-resolved the way
it does on a real machine: org.freedesktop.systemd1.Manager.ReloadOrTryRestartUnit over
D-Bus. This process owns org.freedesktop.systemd1 on the lab's bus, runs the service (the
real systemd-resolved) as its child, and restarts it as systemd would for that call and its
siblings (RestartUnit, TryRestartUnit, ReloadOrRestartUnit: resolved 252 cannot reload) and
when the child dies on its own (the unit's Restart=always); its SystemState is "running".
Everything else is real.

    python -m tests.lab.servicemanager --unit systemd-resolved.service --state FILE \
        --child-log LOG -- ARGV...

As systemd is there before its units, it owns the name first, then starts the child, then
prints "ready" (its own output holds only its own lines: the child's go to LOG, so a
verbose child cannot bury them). FILE gets one JSON line per start of the child
({"start": N, "pid": P, "why": ...}), for tests to count restarts. SIGTERM, at any time,
stops the child (SIGTERM, then SIGKILL after 5 s) and then this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.dbus import BusType, Message, MessageBus, MessageType, RequestNameReply, Variant

SYSTEMD1 = "org.freedesktop.systemd1"
PATH = "/org/freedesktop/systemd1"
MANAGER = f"{SYSTEMD1}.Manager"
PROPS = "org.freedesktop.DBus.Properties"
RESTARTS = {"RestartUnit", "TryRestartUnit", "ReloadOrRestartUnit", "ReloadOrTryRestartUnit"}


class Supervisor:
    def __init__(self, unit: str, argv: Sequence[str], state: Path, child_log: Path) -> None:
        self.unit = unit
        self.argv = list(argv)
        self.state = state
        self.child_log = child_log
        self.child: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.jobs = 0
        self.stopping = False
        self.lock = asyncio.Lock()
        self.watcher: asyncio.Task[None] | None = None

    async def start(self, why: str) -> None:
        with self.child_log.open("ab") as log:
            self.child = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        with self.state.open("a") as f:
            f.write(json.dumps({"start": self.starts, "pid": self.child.pid, "why": why}) + "\n")
        print(f"{self.unit}: started (pid {self.child.pid}, {why})", flush=True)
        self.watcher = asyncio.create_task(self._watch(self.child))

    async def _watch(self, child: asyncio.subprocess.Process) -> None:
        code = await child.wait()
        async with self.lock:
            if self.stopping or child is not self.child:
                return
            print(f"{self.unit}: exited ({code}): Restart=always", flush=True)
            await self.start(f"exited with {code}")

    async def stop_child(self) -> None:
        child = self.child
        if child is None or child.returncode is not None:
            return
        child.terminate()
        try:
            await asyncio.wait_for(child.wait(), 5)
        except TimeoutError:
            child.kill()
            await child.wait()

    async def restart(self, why: str) -> None:
        async with self.lock:
            if self.stopping:
                return
            old, self.child = self.child, None
            if old is not None and old.returncode is None:
                old.terminate()
                try:
                    await asyncio.wait_for(old.wait(), 5)
                except TimeoutError:
                    old.kill()
                    await old.wait()
            await self.start(why)

    def on_message(self, msg: Message) -> Message | None:
        if msg.message_type != MessageType.METHOD_CALL or msg.path != PATH:
            return None
        if msg.interface == PROPS and msg.member == "Get" and msg.body == [MANAGER, "SystemState"]:
            return Message.new_method_return(msg, "v", [Variant("s", "running")])
        if msg.interface != MANAGER or msg.member not in RESTARTS:
            return Message.new_error(
                msg,
                "org.freedesktop.DBus.Error.UnknownMethod",
                f"not in this stand-in: {msg.member}",
            )
        name = msg.body[0] if msg.body else ""
        if name != self.unit:
            return Message.new_error(
                msg, "org.freedesktop.systemd1.NoSuchUnit", f"Unit {name} not loaded."
            )
        self.jobs += 1
        asyncio.get_running_loop().create_task(self.restart(f"D-Bus {msg.member}"))
        return Message.new_method_return(msg, "o", [f"{PATH}/job/{self.jobs}"])


async def main(args: argparse.Namespace) -> None:
    sup = Supervisor(args.unit, args.argv, args.state, args.child_log)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bus: Any = await MessageBus(bus_type=BusType.SYSTEM).connect()
    print(f"on the bus as {bus.unique_name}", flush=True)
    bus.add_message_handler(sup.on_message)
    async with sup.lock:  # a restart asked for before the first start waits for it
        reply = await bus.request_name(SYSTEMD1)
        if reply != RequestNameReply.PRIMARY_OWNER:
            raise SystemExit(f"could not own {SYSTEMD1}: {reply}")
        print(f"{SYSTEMD1} owned", flush=True)
        await sup.start("first start")
    print("ready", flush=True)
    await stop.wait()
    async with sup.lock:
        sup.stopping = True
    await sup.stop_child()
    if sup.watcher is not None:
        sup.watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sup.watcher
    bus.disconnect()


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.lab.servicemanager", description=__doc__)
    parser.add_argument("--unit", required=True)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--child-log", type=Path, required=True)
    parser.add_argument("argv", nargs="+")
    args = parser.parse_args()
    asyncio.run(main(args))
    sys.exit(0)


if __name__ == "__main__":
    cli()
