"""Frame header and payload encoding for CWP/1.

Theory of operation: a frame is a 12-byte big-endian header (type, flags, reserved,
request id, payload length) and a payload. Control payloads are msgpack maps decoded
strictly (no duplicate or non-string keys, no extension types, valid UTF-8, no trailing
bytes, bounded nesting); ROWS payloads are msgpack arrays of row arrays. Encoding is
canonical: map keys are written in sorted order, so the same event always encodes to the
same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from ._constants import HEADER, FrameFlag, FrameType

__all__ = ["DecodeError", "encode_frame", "encode_header", "pack_control", "pack_rows", "unpack_control",
           "unpack_rows"]

MAX_NESTING = 8


class DecodeError(ValueError):
    """A payload is not strictly valid msgpack of the expected shape."""


def encode_header(ftype: FrameType, flags: FrameFlag, request_id: int, length: int) -> bytes:
    return HEADER.pack(ftype, flags, 0, request_id, length)


def encode_frame(ftype: FrameType, flags: FrameFlag, request_id: int, payload: bytes) -> bytes:
    return HEADER.pack(ftype, flags, 0, request_id, len(payload)) + payload


_SCALARS = (type(None), bool, int, float, str, bytes)


def _canonical(obj: Any) -> Any:
    t = type(obj)
    if t in _SCALARS:  # most values; isinstance against the Mapping ABC is slow
        return obj
    if t is dict or isinstance(obj, Mapping):
        return {k: _canonical(obj[k]) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    return obj


def pack_control(obj: Mapping[str, Any]) -> bytes:
    """Encode a control map canonically (sorted keys, minimal integers, float64)."""
    return msgpack.packb(_canonical(obj), use_bin_type=True, use_single_float=False)  # type: ignore[no-any-return]


def pack_rows(rows: Sequence[Sequence[Any]]) -> bytes:
    return msgpack.packb(rows, use_bin_type=True, use_single_float=False)  # type: ignore[no-any-return]


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if type(key) is not str:
            raise DecodeError(f"map key of type {type(key).__name__}, only strings allowed")
        if key in out:
            raise DecodeError(f"duplicate map key {key!r}")
        out[key] = value
    return out


def _no_maps(_pairs: list[tuple[Any, Any]]) -> Any:
    raise DecodeError("maps are not allowed in ROWS")


def _no_ext(code: int, _data: bytes) -> Any:
    raise DecodeError(f"msgpack extension type {code} is not allowed")


_PLAIN = (type(None), bool, int, float, str, bytes)


def _check_plain(obj: Any, depth: int) -> None:
    if depth > MAX_NESTING:
        raise DecodeError(f"nested deeper than {MAX_NESTING} levels")
    t = type(obj)
    if t in _PLAIN:
        return
    if t is dict:
        for v in obj.values():
            _check_plain(v, depth + 1)
    elif t is tuple:
        for v in obj:
            _check_plain(v, depth + 1)
    else:  # msgpack Timestamp or ExtType
        raise DecodeError(f"value of type {t.__name__} is not allowed")


def _unpack(payload: bytes | memoryview, **kw: Any) -> Any:
    try:
        return msgpack.unpackb(
            payload, raw=False, use_list=False, strict_map_key=False, ext_hook=_no_ext,
            timestamp=0, **kw,
        )
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise DecodeError(f"invalid msgpack: {type(exc).__name__}") from exc


def unpack_control(payload: bytes | memoryview) -> dict[str, Any]:
    """Decode a control payload strictly into a dict.

    Raises:
        DecodeError: not one msgpack map with string keys and plain values.
    """
    obj = _unpack(payload, object_pairs_hook=_pairs)
    if type(obj) is not dict:
        raise DecodeError(f"control payload must be a map, got {type(obj).__name__}")
    _check_plain(obj, 0)
    return obj


def unpack_rows(payload: bytes | memoryview) -> tuple[tuple[Any, ...], ...]:
    """Decode a ROWS payload: an array of arrays of scalars.

    Raises:
        DecodeError: any other shape, or invalid msgpack.
    """
    obj = _unpack(payload, object_pairs_hook=_no_maps)
    if type(obj) is not tuple:
        raise DecodeError("ROWS payload must be an array of rows")
    for row in obj:
        if type(row) is not tuple:
            raise DecodeError("each row must be an array")
    return obj
