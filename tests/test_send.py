"""Vectored sends of the data path (l4proxy._send) and the codec's DATA parts."""

from __future__ import annotations

import array
import hashlib
import socket

import pytest
import trio
import trio.testing

from l4proxy._send import send_all_parts

DEADLINE = 20


async def _socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    assert isinstance(listener, trio.SocketListener)
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listener.accept()
    await listener.aclose()
    return client, server


async def _read_all(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        buf += chunk
        await trio.lowlevel.checkpoint()  # a slow reader: the sender's buffer fills up
    return bytes(buf)


def _parts() -> list[bytes | bytearray | memoryview]:
    big = hashlib.shake_256(b"parts").digest(3 << 20)
    words = memoryview(array.array("I", range(100_000)))  # items of 4 bytes: sizes in bytes
    return [b"head", b"", bytearray(b"middle"), memoryview(big)[7:], words, big[:100_000], b"tail"]


async def test_socket_stream_gets_every_part_in_order_despite_partial_sends() -> None:
    client, server = await _socket_pair()
    # a small send buffer: sendmsg takes only part of the 3 MiB each time
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    parts = _parts()
    expected = b"".join(bytes(p) for p in parts)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all_parts, client, parts)
            got = await _read_all(server, len(expected))
    assert got == expected
    await client.aclose()
    await server.aclose()


async def test_nothing_to_send_is_still_a_checkpoint_and_a_closed_socket_is_typed() -> None:
    client, server = await _socket_pair()
    with trio.testing.assert_checkpoints():
        await send_all_parts(client, [b"", b""])
    await client.send_eof()
    with pytest.raises(trio.ClosedResourceError):
        await send_all_parts(client, [b"x"])
    await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await send_all_parts(client, [b"x", b"y"])
    await server.aclose()


async def test_a_peer_that_went_away_is_a_broken_stream() -> None:
    client, server = await _socket_pair()
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    await server.aclose()  # RST
    with pytest.raises(trio.BrokenResourceError):
        with trio.fail_after(DEADLINE):
            for _ in range(100):
                await send_all_parts(client, [b"x" * 65536, b"y"])
                await trio.sleep(0.01)
    await client.aclose()


async def test_other_streams_get_the_joined_bytes() -> None:
    a, b = trio.testing.memory_stream_pair()
    parts = _parts()
    expected = b"".join(bytes(p) for p in parts)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all_parts, a, parts)
            assert await _read_all(b, len(expected)) == expected
