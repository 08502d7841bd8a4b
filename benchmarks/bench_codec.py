"""Throughput of the CWP/1 sans-IO codec (``l4proxy.wire.Connection``), in memory.

Run ``python -m benchmarks.bench_codec [--quick]``. A client and a server ``Connection``
complete HELLO/WELCOME, then each round measures:

* ``data_encode``: the client encodes 1 MiB DATA frames of a ``put`` body (MB/s of payload);
* ``data_decode``: the server decodes those frames, fed in 256 KiB reads (MB/s of payload);
* ``control_frames``: ``ping`` REQUEST + RESULT round trips, each frame encoded by one
  side and decoded by the other (frames/s; a round trip is two frames).

Prints one JSON object: ``{"benchmark": "codec", "results": [{"metric", "unit", "rounds",
"min", "median", "max"}]}``. MB is 10**6 bytes. Bounded: < 30 s, ``--quick`` < 5 s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from typing import Any

from l4proxy.wire import (
    NEED_DATA,
    Connection,
    Continue,
    Data,
    Event,
    Hello,
    NeedData,
    Op,
    Request,
    Result,
    Role,
    Welcome,
    negotiate_limits,
)

FRAME_PAYLOAD = 1 << 20
READ_SIZE = 256 << 10
MB = 1_000_000


class Pair:
    """A client and a server Connection wired back to back, past the handshake."""

    def __init__(self) -> None:
        self.client = Connection(Role.CLIENT)
        self.server = Connection(Role.SERVER)
        self.next_id = 1
        hello = self.deliver(self.client, self.server, Hello(client="bench"))
        assert isinstance(hello, Hello)
        limits = negotiate_limits(hello.limits, self.server.limits)
        welcome = self.deliver(self.server, self.client,
                               Welcome(server="bench", session_id="bench", limits=limits))
        assert isinstance(welcome, Welcome)

    @staticmethod
    def deliver(sender: Connection, receiver: Connection, event: Event) -> Event:
        """Encode ``event`` on one side and decode it on the other (one frame)."""
        receiver.receive_data(sender.send(event))
        got = receiver.next_event()
        assert not isinstance(got, NeedData), "frame not decoded"
        return got

    def request_id(self) -> int:
        rid = self.next_id
        self.next_id += 1
        return rid


def data_round(pair: Pair, frames: int) -> tuple[float, float]:
    """One ``put`` of ``frames`` DATA frames. Returns (encode MB/s, decode MB/s)."""
    rid = pair.request_id()
    pair.deliver(pair.client, pair.server,
                 Request(request_id=rid, op=Op.PUT, args={"bucket": "bench", "key": "object"}))
    pair.deliver(pair.server, pair.client, Continue(request_id=rid))
    payload = bytes(range(256)) * (FRAME_PAYLOAD // 256)

    start = time.perf_counter()
    wire = [pair.client.send(Data(request_id=rid, data=payload, end_stream=i == frames - 1))
            for i in range(frames)]
    encode_s = time.perf_counter() - start

    stream = memoryview(b"".join(wire))
    received = 0
    server = pair.server
    start = time.perf_counter()
    for offset in range(0, len(stream), READ_SIZE):
        server.receive_data(stream[offset : offset + READ_SIZE])
        while (event := server.next_event()) is not NEED_DATA:
            assert isinstance(event, Data)
            received += len(event.data)
    decode_s = time.perf_counter() - start
    assert received == frames * FRAME_PAYLOAD

    pair.deliver(pair.server, pair.client, Result(request_id=rid, fields={
        "bucket": "bench", "key": "object", "size": received,
        "sha256": hashlib.sha256(b"").hexdigest()}))
    total = frames * FRAME_PAYLOAD / MB
    return total / encode_s, total / decode_s


def ping_round(pair: Pair, round_trips: int) -> float:
    """``round_trips`` ping REQUEST + RESULT exchanges. Returns frames/s."""
    client, server = pair.client, pair.server
    start = time.perf_counter()
    for _ in range(round_trips):
        rid = pair.request_id()
        server.receive_data(client.send(Request(request_id=rid, op=Op.PING, args={"data": b"x"})))
        request = server.next_event()
        assert isinstance(request, Request)
        client.receive_data(server.send(Result(request_id=rid,
                                               fields={"data": b"x", "time": 0.0})))
        assert isinstance(client.next_event(), Result)
    return 2 * round_trips / (time.perf_counter() - start)


def summary(metric: str, unit: str, values: list[float]) -> dict[str, Any]:
    return {"metric": metric, "unit": unit, "rounds": len(values), "min": round(min(values), 1),
            "median": round(statistics.median(values), 1), "max": round(max(values), 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller rounds (< 5 s)")
    args = parser.parse_args(argv)
    rounds, frames, pings = (3, 8, 2_000) if args.quick else (7, 32, 10_000)

    pair = Pair()
    data_round(pair, 2)  # warm up
    ping_round(pair, 100)
    encode: list[float] = []
    decode: list[float] = []
    control: list[float] = []
    for _ in range(rounds):
        enc, dec = data_round(pair, frames)
        encode.append(enc)
        decode.append(dec)
        control.append(ping_round(pair, pings))
    print(json.dumps({"benchmark": "codec", "results": [
        summary("data_encode", "MB/s", encode),
        summary("data_decode", "MB/s", decode),
        summary("control_frames", "frames/s", control),
    ]}))


if __name__ == "__main__":
    main()
