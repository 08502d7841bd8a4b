"""The gateway under load on real loopback sockets: a flood of idle handshakes, reload while
clients work, and many concurrent sessions.

The environment (a real CA, an in-process chunkd, the Gateway) is the one of
``tests/test_gateway.py``. Every wait is bounded with ``trio.fail_after``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import Counter

from l4proxy.config import LimitsConfig
from l4proxy.gateway import GatewayConfigError

from .test_gateway import Env, _close_after_everything, _env  # noqa: F401 (autouse fixture)

#: a TLS record header announcing a ClientHello that never comes
PARTIAL_CLIENT_HELLO = bytes.fromhex("160301020001")


def _count(counter: Counter, **labels: str) -> float:
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def _watch_sessions(env: Env, peak: list[int]) -> None:
    """Keeps the highest number of live sessions seen in ``peak[0]`` (runs until cancelled)."""
    while True:
        peak[0] = max(peak[0], len(env.gateway.sessions))
        await trio.sleep(0.002)


async def _wait_until(condition: Callable[[], bool]) -> None:
    """Polls ``condition``; the caller bounds the wait."""
    while not condition():
        await trio.sleep(0.01)


async def test_a_flood_of_idle_connections_does_not_delay_a_valid_client(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    # max_sessions=1: if idle handshakes held session capacity, the valid client could not
    # get in at all
    env = await _env(nursery, tmp_path, limits=LimitsConfig(handshake_timeout=2, max_sessions=1))
    ctx = env.context("alice")
    peak = [0]
    nursery.start_soon(_watch_sessions, env, peak)
    host, port = env.address
    start = trio.current_time()
    idle = []
    with trio.fail_after(5):
        for i in range(50):
            stream = await trio.open_tcp_stream(host, port)
            if i % 2:  # half of them start a handshake and stall in the middle of it
                await stream.send_all(PARTIAL_CLIENT_HELLO)
            idle.append(stream)
    await trio.sleep(0.2)  # the gateway has accepted them all by now
    assert len(env.gateway.sessions) == 0
    with trio.fail_after(1):
        async with env.connect(ctx=ctx) as c:
            assert "time" in await c.ping()
            assert len(env.gateway.sessions) == 1
    assert trio.current_time() - start < 2  # served while every idle handshake was pending

    closed_after: list[float] = []

    async def wait_closed(stream: trio.SocketStream) -> None:
        with trio.fail_at(start + 3.5):
            try:
                while await stream.receive_some(4096):
                    pass
            except trio.BrokenResourceError:
                pass
        closed_after.append(trio.current_time() - start)
        await stream.aclose()

    async with trio.open_nursery() as waiting:
        for stream in idle:
            waiting.start_soon(wait_closed, stream)
    assert len(closed_after) == 50
    assert min(closed_after) >= 1.5  # closed by the handshake deadline (2 s), not before
    assert peak[0] == 1  # only the valid client ever counted as a session
    assert _count(env.gateway.metrics.handshakes, listener="main", result="timeout") == 50
    assert _count(env.gateway.metrics.handshakes, listener="main", result="ok") == 1


async def test_reload_under_load_fails_no_request(nursery: trio.Nursery, tmp_path: Path) -> None:
    env = await _env(nursery, tmp_path)
    clients = 8
    contexts = [env.context(f"user{i}") for i in range(clients)]
    pings = [0] * clients
    goaways: list[Any] = []
    stop = trio.Event()

    async def client(i: int) -> None:
        async with env.connect(ctx=contexts[i]) as c:
            while not stop.is_set():
                assert "time" in await c.ping()
                pings[i] += 1
            goaways.append(c.goaway)

    broken_cert = tmp_path / "broken.crt"
    broken_cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n"
                           "-----END CERTIFICATE-----\n")
    listener = env.config.listeners[0]
    broken = {
        1: dataclasses.replace(env.config, listeners=(dataclasses.replace(
            listener, server_cert=tmp_path / "missing.crt"),)),
        3: dataclasses.replace(env.config, listeners=(dataclasses.replace(
            listener, server_cert=broken_cert),)),
    }
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            for i in range(clients):
                n.start_soon(client, i)
            await _wait_until(lambda: min(pings) >= 1)
            for round_ in range(5):
                before = list(pings)

                def progressed(before: list[int] = before) -> bool:
                    return all(p > q for p, q in zip(pings, before, strict=True))

                env.gateway.reload(dataclasses.replace(env.config))  # an equivalent config
                if round_ in broken:
                    state = env.gateway.state
                    with pytest.raises(GatewayConfigError):
                        env.gateway.reload(broken[round_])
                    assert env.gateway.state is state  # the old state stays in effect
                await _wait_until(progressed)  # every client made progress after this reload
            stop.set()
    assert goaways == [None] * clients  # nobody was told to go away
    assert env.gateway.reload_failures == 2
    # new sessions use the reloaded state
    async with env.connect(ctx=env.context("late")) as c:
        assert "time" in await c.ping()


async def test_many_concurrent_sessions(nursery: trio.Nursery, tmp_path: Path) -> None:
    env = await _env(nursery, tmp_path)
    clients = 40
    contexts = [env.context(f"user{i}") for i in range(clients)]
    bodies = [os.urandom(64 << 10) for _ in range(clients)]
    async with env.connect() as setup:
        await setup.create_bucket("load")
    arrived = 0
    everyone_in = trio.Event()
    release = trio.Event()
    results: dict[int, tuple[str, bytes]] = {}

    async def client(i: int) -> None:
        nonlocal arrived
        async with env.connect(ctx=contexts[i]) as c:
            put = await c.put("load", f"obj-{i}", bodies[i])
            got, _ = await c.get("load", f"obj-{i}")
            results[i] = (put["sha256"], got)
            arrived += 1
            if arrived == clients:
                everyone_in.set()
            await release.wait()  # hold the session open until all are in

    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            for i in range(clients):
                n.start_soon(client, i)
            await everyone_in.wait()
            assert len(env.gateway.sessions) == clients
            release.set()
        await _wait_until(lambda: not env.gateway.sessions)
    assert sorted(results) == list(range(clients))
    for i, (sha, got) in results.items():
        assert got == bodies[i] and sha == hashlib.sha256(bodies[i]).hexdigest()
    async with env.connect() as check:
        assert len((await check.list("load")).rows) == clients
