"""The hex test vectors in PROTOCOL.md section 13 match the reference codec both ways.

Run ``python -m tests.test_protocol_vectors`` to print the section's vectors afresh.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from l4proxy.wire import (
    NEED_DATA,
    Access,
    Cancel,
    Column,
    ColumnType,
    Connection,
    Continue,
    Data,
    Error,
    ErrorCode,
    Event,
    FrameType,
    GoAway,
    Hello,
    Limits,
    Notice,
    NoticeKind,
    Op,
    Request,
    RequestedLimits,
    Response,
    Result,
    Role,
    Rows,
    Scope,
    Secret,
    Welcome,
)

PROTOCOL = Path(__file__).resolve().parent.parent / "PROTOCOL.md"

#: (name, sender, event, description) in conversation order
CONVERSATION: list[tuple[str, Role, Event, str]] = [
    ("HELLO", Role.CLIENT,
     Hello(client="chunk", api_key=Secret("k3y"), limits=RequestedLimits(max_pending=16)),
     'HELLO: client "chunk", api_key "k3y", asks for max_pending 16'),
    ("WELCOME", Role.SERVER,
     Welcome(server="chunkd", session_id="s1",
             limits=Limits(max_frame_payload=1 << 20, max_control_size=65536, max_pending=16,
                           max_hold_seconds=900),
             scope=Scope(buckets=("b*",), tables=("t",), access=(Access.READ, Access.WRITE))),
     'WELCOME: session "s1", negotiated limits, scope buckets ["b*"], tables ["t"], read+write'),
    ("REQUEST", Role.CLIENT,
     Request(request_id=1, op=Op.PUT, args={"bucket": "b", "key": "k", "size": 5}, reason="demo"),
     'REQUEST 1: put bucket "b" key "k" size 5, reason "demo" (flag BODY)'),
    ("NOTICE", Role.SERVER,
     Notice(request_id=1, kind=NoticeKind.HELD, message="held for approval", approval_id="a1",
            hold_seconds=300),
     'NOTICE 1: held, approval_id "a1", hold_seconds 300'),
    ("CONTINUE", Role.SERVER, Continue(request_id=1), "CONTINUE 1"),
    ("DATA", Role.CLIENT, Data(request_id=1, data=b"hello", end_stream=True),
     'DATA 1: "hello" (flag END_STREAM)'),
    ("RESULT", Role.SERVER,
     Result(request_id=1, fields={"bucket": "b", "key": "k", "size": 5,
                                  "sha256": hashlib.sha256(b"hello").hexdigest()}),
     "RESULT 1: the put's result"),
    ("REQUEST-scan", Role.CLIENT,
     Request(request_id=2, op=Op.SCAN, args={"table": "t", "limit": 2}),
     'REQUEST 2: scan table "t" limit 2'),
    ("RESPONSE", Role.SERVER,
     Response(request_id=2, columns=(Column(name="n", type=ColumnType.INT),
                                     Column(name="s", type=ColumnType.TEXT))),
     "RESPONSE 2: columns n int, s text"),
    ("ROWS", Role.SERVER, Rows(request_id=2, rows=((1, "a"), (2, None)), end_stream=True),
     'ROWS 2: [1, "a"], [2, nil] (flag END_STREAM)'),
    ("RESULT-scan", Role.SERVER, Result(request_id=2, fields={"rows": 2, "truncated": False}),
     "RESULT 2: rows 2, truncated false"),
    ("REQUEST-get", Role.CLIENT, Request(request_id=3, op=Op.GET, args={"bucket": "b", "key": "k"}),
     'REQUEST 3: get bucket "b" key "k"'),
    ("CANCEL", Role.CLIENT, Cancel(request_id=3), "CANCEL 3"),
    ("ERROR", Role.SERVER, Error(request_id=3, code=ErrorCode.CANCELLED, message="cancelled"),
     'ERROR 3: code 15 CANCELLED, "cancelled"'),
    ("GOAWAY", Role.SERVER,
     GoAway(last_request_id=3, code=ErrorCode.SHUTTING_DOWN, message="draining"),
     'GOAWAY: last_request_id 3, code 111 SHUTTING_DOWN, "draining"'),
]


def generate() -> list[tuple[str, str, Event, bytes]]:
    """Run the conversation through a client and a server codec; return each frame."""
    ends = {Role.CLIENT: Connection(Role.CLIENT), Role.SERVER: Connection(Role.SERVER)}
    out = []
    for name, sender, event, description in CONVERSATION:
        data = ends[sender].send(event)
        receiver = ends[sender.peer]
        receiver.receive_data(data)
        received = receiver.next_event()
        assert receiver.next_event() is NEED_DATA
        out.append((name, description, received, data))
    return out


def _hex(data: bytes) -> str:
    header, payload = data[:12].hex(), data[12:].hex()
    spaced = " ".join([header[0:2], header[2:4], header[4:8], header[8:16], header[16:24]])
    lines = [spaced] + [payload[i : i + 64] for i in range(0, len(payload), 64)]
    return "\n".join(line for line in lines if line)


def render() -> str:
    parts = []
    for name, description, _event, data in generate():
        parts.append(f"<!-- vector {name} -->\n{description}:\n\n```hex\n{_hex(data)}\n```\n")
    return "\n".join(parts)


_VECTOR = re.compile(r"<!-- vector (\S+) -->\n.*?```hex\n(.*?)```", re.S)


def _documented() -> dict[str, bytes]:
    return {m.group(1): bytes.fromhex("".join(m.group(2).split()))
            for m in _VECTOR.finditer(PROTOCOL.read_text())}


def test_every_frame_type_has_a_vector() -> None:
    generated = generate()
    types = {FrameType(data[0]) for _n, _d, _e, data in generated}
    assert types == set(FrameType)
    assert set(_documented()) == {name for name, *_ in CONVERSATION}


def test_documented_vectors_decode_to_the_events_and_encode_back() -> None:
    documented = _documented()
    ends = {Role.CLIENT: Connection(Role.CLIENT), Role.SERVER: Connection(Role.SERVER)}
    for name, sender, event, _description in CONVERSATION:
        frame = documented[name]
        receiver = ends[sender.peer]
        receiver.receive_data(frame)
        decoded = receiver.next_event()
        assert decoded == _normalised(event), name
        assert ends[sender].send(decoded) == frame, name  # type: ignore[arg-type]


def _normalised(event: Event) -> Event:
    """What the codec hands out for ``event`` (mappings and tuples as decoded)."""
    ends = {Role.CLIENT: Connection(Role.CLIENT), Role.SERVER: Connection(Role.SERVER)}
    for _name, sender, ev, _d in CONVERSATION:
        data = ends[sender].send(ev)
        ends[sender.peer].receive_data(data)
        decoded = ends[sender.peer].next_event()
        if ev is event:
            return decoded  # type: ignore[return-value]
    raise AssertionError("event not in the conversation")


if __name__ == "__main__":
    print(render())
