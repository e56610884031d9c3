"""A stand-in for the running agent's control socket, served from a thread, for tests of the
programs that talk to it (the dispatcher hook, the notifications relay)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from agent.control import ControlServer, Handler


@contextlib.contextmanager
def serving(path: Path, handler: Handler) -> Iterator[None]:
    """The real ControlServer on `path`, answering with `handler`, until the block ends."""
    ready, stop = threading.Event(), threading.Event()

    def serve() -> None:
        async def main() -> None:
            server = ControlServer(path, handler)
            await server.start()
            ready.set()
            await asyncio.to_thread(stop.wait)
            await server.close()

        asyncio.run(main())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    if not ready.wait(5):
        raise RuntimeError(f"the control server did not start on {path}")
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
