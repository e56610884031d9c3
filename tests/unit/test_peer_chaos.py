"""The test peer's chaos faults, switched while it runs (what the fault matrix relies on)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import dns.asyncquery
import dns.message
import pytest

from agent.dns.wire import frame
from tests.conftest import Certs, run
from tests.lab.peer import Fault, Peer, PeerConfig, write_control

HOST = "127.0.0.1"


def _client_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _connect(p: Peer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert p.tls_port is not None
    return await asyncio.open_connection(HOST, p.tls_port, ssl=_client_ctx())


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> str:
    writer.write(frame(dns.message.make_query(name, "A").to_wire()))
    await writer.drain()
    size = int.from_bytes(await reader.readexactly(2), "big")
    return dns.message.from_wire(await reader.readexactly(size)).question[0].name.to_text()


async def _received(reader: asyncio.StreamReader) -> tuple[bytes, BaseException | None]:
    """Everything until EOF or an error, and that error."""
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65535), 2):
            data += chunk
    except (OSError, TimeoutError) as exc:
        return data, exc
    return data, None


def _frames(data: bytes) -> int:
    n = 0
    while len(data) >= 2 and len(data) >= 2 + int.from_bytes(data[:2], "big"):
        data = data[2 + int.from_bytes(data[:2], "big") :]
        n += 1
    return n


def test_control_file_drops_tls_and_brings_it_back(certs: Certs, tmp_path: Path) -> None:
    control = tmp_path / "faults.json"

    async def go() -> None:
        cfg = PeerConfig(cert=certs.good.cert, key=certs.good.key, control=control)
        async with Peer(cfg) as p:
            reader, writer = await _connect(p)
            assert await _ask(reader, writer, "before.test") == "before.test."
            write_control(control, [Fault.DROP_TLS])
            _data, error = await _received(reader)  # the open TLS connection is reset
            assert isinstance(error, ConnectionResetError)
            with pytest.raises(ConnectionRefusedError):
                await _connect(p)
            query = dns.message.make_query("plain.test", "A")
            r = await dns.asyncquery.udp(query, HOST, port=p.dns_port, timeout=2)
            assert r.answer  # plain DNS keeps answering
            write_control(control, [])
            await asyncio.sleep(0.2)
            reader, writer = await _connect(p)  # the same port, TLS again
            assert await _ask(reader, writer, "after.test") == "after.test."
            writer.close()

    run(go())


@pytest.mark.parametrize("fault", [Fault.RESET_MID_ANSWER, Fault.CLOSE_IN_FLIGHT])
def test_strikes_after_some_answers(certs: Certs, fault: Fault) -> None:
    async def go() -> None:
        async with Peer(PeerConfig(cert=certs.good.cert, key=certs.good.key)) as p:
            reader, writer = await _connect(p)
            assert await _ask(reader, writer, "early.test") == "early.test."  # not counted
            await p.set_faults([fault], strike_after=2)
            for i in range(6):
                writer.write(frame(dns.message.make_query(f"q{i}.test", "A").to_wire()))
            await writer.drain()
            data, error = await _received(reader)
            assert _frames(data) == 2
            if fault is Fault.RESET_MID_ANSWER:
                assert isinstance(error, ConnectionResetError)
                assert len(data) > sum(2 + int.from_bytes(data[:2], "big") for _ in range(2))
            else:
                assert error is None  # a clean close, the other queries unanswered
            writer.close()

    run(go())


def test_blackhole_mid_run_silences_open_connections(certs: Certs) -> None:
    async def go() -> None:
        async with Peer(PeerConfig(cert=certs.good.cert, key=certs.good.key)) as p:
            reader, writer = await _connect(p)
            assert await _ask(reader, writer, "before.test") == "before.test."
            await p.set_faults([Fault.BLACKHOLE_TLS])
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(_ask(reader, writer, "dark.test"), 0.5)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(_connect(p), 0.5)
            writer.close()

    run(go())
