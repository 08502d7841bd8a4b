"""Schemas of CWP/1 control maps, and what each operation touches.

Theory of operation: every control payload is a msgpack map that is checked field by
field against a schema here before an event is built. Types are exact (``True`` is not an
integer, an integer is not a float), unknown fields are errors, and strings, lists and
numbers have bounds, so a gateway and a service can never read the same frame two ways.

A validator is a function ``(value, path) -> value`` that raises :class:`SchemaError`
naming the dotted path of the offending field. The connection turns a ``SchemaError`` into
a ``RemoteProtocolError`` (the peer sent it) or a ``LocalProtocolError`` (we tried to).

:data:`OPS` maps each :class:`Op` to its :class:`OpSpec`: argument schema, body kind,
response shape, result schema, and :func:`resources` says which buckets/tables it reads,
writes or administers (what scope checks and policy decide on).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from ._constants import Access
from ._events import ColumnType, Op

__all__ = [
    "OPS",
    "BodyKind",
    "OpSpec",
    "ResourceKind",
    "ResourceUse",
    "SchemaError",
    "resources",
]

MAX_INT = (1 << 63) - 1
MAX_NAME_LEN = 255
MAX_KEY_LEN = 1024
MAX_REASON_LEN = 1024
MAX_MESSAGE_LEN = 4096
MAX_COLUMNS = 256
MAX_WHERE = 64
MAX_LIST_ITEMS = 10_000
MAX_PING_DATA = 4096

Validator = Callable[[Any, str], Any]


class SchemaError(ValueError):
    """A control map does not match its schema. ``path`` names the field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


def _type_name(value: Any) -> str:
    return type(value).__name__


def v_str(*, max_len: int = MAX_NAME_LEN, min_len: int = 0,
          choices: frozenset[str] | None = None) -> Validator:
    def check(value: Any, path: str) -> str:
        if type(value) is not str:
            raise SchemaError(path, f"expected a string, got {_type_name(value)}")
        if not min_len <= len(value) <= max_len:
            raise SchemaError(path, f"length must be {min_len}..{max_len}")
        if choices is not None and value not in choices:
            raise SchemaError(path, f"must be one of {sorted(choices)}")
        return value

    return check


def v_int(*, min_value: int = 0, max_value: int = MAX_INT) -> Validator:
    def check(value: Any, path: str) -> int:
        if type(value) is not int:
            raise SchemaError(path, f"expected an integer, got {_type_name(value)}")
        if not min_value <= value <= max_value:
            raise SchemaError(path, f"must be in {min_value}..{max_value}")
        return value

    return check


def v_bool(value: Any, path: str) -> bool:
    if type(value) is not bool:
        raise SchemaError(path, f"expected a boolean, got {_type_name(value)}")
    return value


def v_float(value: Any, path: str) -> float:
    if type(value) is not float:
        raise SchemaError(path, f"expected a float, got {_type_name(value)}")
    return value


def v_bytes(*, max_len: int) -> Validator:
    def check(value: Any, path: str) -> bytes:
        if type(value) is not bytes:
            raise SchemaError(path, f"expected bytes, got {_type_name(value)}")
        if len(value) > max_len:
            raise SchemaError(path, f"longer than {max_len} bytes")
        return value

    return check


def v_list(item: Validator, *, max_items: int, min_items: int = 0) -> Validator:
    def check(value: Any, path: str) -> tuple[Any, ...]:
        if type(value) not in (tuple, list):
            raise SchemaError(path, f"expected an array, got {_type_name(value)}")
        if not min_items <= len(value) <= max_items:
            raise SchemaError(path, f"must have {min_items}..{max_items} items")
        return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(value))

    return check


def v_tuple(*items: Validator) -> Validator:
    def check(value: Any, path: str) -> tuple[Any, ...]:
        if type(value) not in (tuple, list):
            raise SchemaError(path, f"expected an array, got {_type_name(value)}")
        if len(value) != len(items):
            raise SchemaError(path, f"must have exactly {len(items)} items")
        return tuple(v(x, f"{path}[{i}]") for i, (v, x) in enumerate(zip(items, value, strict=True)))

    return check


def v_scalar(value: Any, path: str) -> Any:
    """A table cell or filter value: nil, bool, int (i64), float, text or bytes."""
    t = type(value)
    if value is None or t in (bool, float, str, bytes):
        return value
    if t is int:
        if not -(1 << 63) <= value <= MAX_INT:
            raise SchemaError(path, "integer out of the signed 64-bit range")
        return value
    raise SchemaError(path, f"expected a scalar, got {_type_name(value)}")


def v_dict_of(key: Validator, value: Validator, *, max_items: int) -> Validator:
    def check(obj: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(obj, Mapping):
            raise SchemaError(path, f"expected a map, got {_type_name(obj)}")
        if len(obj) > max_items:
            raise SchemaError(path, f"more than {max_items} entries")
        out = {}
        for k, v in obj.items():
            key(k, f"{path}.<key>")
            out[k] = value(v, f"{path}.{k}")
        return MappingProxyType(out)

    return check


@dataclass(frozen=True, slots=True)
class F:
    """One field of a map schema."""

    check: Validator
    required: bool = False


def v_map(fields: Mapping[str, F], *, first: tuple[str, ...] = ()) -> Callable[[Any, str], Mapping[str, Any]]:
    """A map with exactly these fields (required ones present, no others).

    ``first`` names fields checked before the unknown-field check (HELLO's ``version``,
    so that a newer client gets UNSUPPORTED_VERSION rather than a field error).
    """

    required = frozenset(name for name, f in fields.items() if f.required)
    known = frozenset(fields)

    def check(obj: Any, path: str) -> Mapping[str, Any]:
        # type() first: isinstance against the Mapping ABC is slow, and decoded maps are dicts
        if type(obj) is not dict and not isinstance(obj, Mapping):
            raise SchemaError(path or "<payload>", f"expected a map, got {_type_name(obj)}")
        prefix = f"{path}." if path else ""
        for name in first:
            if name in obj:
                fields[name].check(obj[name], prefix + name)
        unknown = obj.keys() - known
        if unknown:
            raise SchemaError(prefix + sorted(map(str, unknown))[0], "unknown field")
        missing = required - obj.keys()
        if missing:
            raise SchemaError(prefix + sorted(missing)[0], "required field missing")
        return MappingProxyType({k: fields[k].check(v, prefix + k) for k, v in obj.items()})

    return check


# --- reusable field validators ---------------------------------------------------------

NAME = v_str(min_len=1, max_len=MAX_NAME_LEN)
KEY = v_str(min_len=1, max_len=MAX_KEY_LEN)
TEXT = v_str(max_len=MAX_MESSAGE_LEN)
SHA256_HEX = v_str(min_len=64, max_len=64)
COUNT = v_int()
SIZE = v_int(min_value=1, max_value=1 << 40)
COLUMN_TYPE = v_str(choices=frozenset(t.value for t in ColumnType))
COLUMN_DEFS = v_list(v_tuple(NAME, COLUMN_TYPE), min_items=1, max_items=MAX_COLUMNS)
COLUMN_NAMES = v_list(NAME, min_items=1, max_items=MAX_COLUMNS)
NAME_LIST = v_list(NAME, max_items=MAX_LIST_ITEMS)
WHERE = v_dict_of(NAME, v_scalar, max_items=MAX_WHERE)
TIMESTAMP = v_float


class BodyKind(StrEnum):
    DATA = "data"
    ROWS = "rows"


class ResourceKind(StrEnum):
    BUCKET = "bucket"
    TABLE = "table"


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceUse:
    """One resource a request touches and the access class it needs there."""

    kind: ResourceKind
    name: str
    access: Access


ResourceFn = Callable[[Mapping[str, Any]], tuple[ResourceUse, ...]]


def _on(kind: ResourceKind, arg: str, access: Access) -> ResourceFn:
    def uses(args: Mapping[str, Any]) -> tuple[ResourceUse, ...]:
        return (ResourceUse(kind=kind, name=args[arg], access=access),)

    return uses


def _chunk_uses(args: Mapping[str, Any]) -> tuple[ResourceUse, ...]:
    uses = [ResourceUse(kind=ResourceKind.BUCKET, name=args["bucket"], access=Access.READ)]
    if args.get("into") is not None:
        uses.append(ResourceUse(kind=ResourceKind.BUCKET, name=args["into"], access=Access.WRITE))
    return tuple(uses)


@dataclass(frozen=True, slots=True, kw_only=True)
class OpSpec:
    """What an operation takes, returns and touches.

    Attributes:
        args: validator of the REQUEST ``args`` map.
        body: the kind of request body that follows CONTINUE, or None.
        response: the kind of streamed response body (after a RESPONSE head), or None
            when the answer is a single RESULT.
        result: validator of the RESULT ``fields`` map.
        uses: function from validated args to the resources used.
    """

    op: Op
    args: Callable[[Any, str], Mapping[str, Any]]
    result: Callable[[Any, str], Mapping[str, Any]]
    uses: ResourceFn
    body: BodyKind | None = None
    response: BodyKind | None = None


def _none(_args: Mapping[str, Any]) -> tuple[ResourceUse, ...]:
    return ()


_B, _T = ResourceKind.BUCKET, ResourceKind.TABLE
_R, _W, _A = Access.READ, Access.WRITE, Access.ADMIN

OPS: Mapping[Op, OpSpec] = MappingProxyType({
    Op.PING: OpSpec(
        op=Op.PING,
        args=v_map({"data": F(v_bytes(max_len=MAX_PING_DATA))}),
        result=v_map({"data": F(v_bytes(max_len=MAX_PING_DATA)), "time": F(TIMESTAMP, True)}),
        uses=_none,
    ),
    Op.LIST_BUCKETS: OpSpec(
        op=Op.LIST_BUCKETS,
        args=v_map({}),
        result=v_map({"buckets": F(NAME_LIST, True)}),
        uses=lambda _a: (ResourceUse(kind=_B, name="*", access=_R),),
    ),
    Op.CREATE_BUCKET: OpSpec(
        op=Op.CREATE_BUCKET,
        args=v_map({"bucket": F(NAME, True)}),
        result=v_map({"bucket": F(NAME, True)}),
        uses=_on(_B, "bucket", _A),
    ),
    Op.DELETE_BUCKET: OpSpec(
        op=Op.DELETE_BUCKET,
        args=v_map({"bucket": F(NAME, True), "force": F(v_bool)}),
        result=v_map({"bucket": F(NAME, True), "deleted_objects": F(COUNT, True)}),
        uses=_on(_B, "bucket", _A),
    ),
    Op.LIST: OpSpec(
        op=Op.LIST,
        args=v_map({"bucket": F(NAME, True), "prefix": F(v_str(max_len=MAX_KEY_LEN)),
                    "limit": F(COUNT)}),
        result=v_map({"count": F(COUNT, True), "truncated": F(v_bool, True)}),
        uses=_on(_B, "bucket", _R),
        response=BodyKind.ROWS,
    ),
    Op.STAT: OpSpec(
        op=Op.STAT,
        args=v_map({"bucket": F(NAME, True), "key": F(KEY, True)}),
        result=v_map({"bucket": F(NAME, True), "key": F(KEY, True), "size": F(COUNT, True),
                      "sha256": F(SHA256_HEX, True), "modified": F(TIMESTAMP, True)}),
        uses=_on(_B, "bucket", _R),
    ),
    Op.PUT: OpSpec(
        op=Op.PUT,
        args=v_map({"bucket": F(NAME, True), "key": F(KEY, True), "size": F(COUNT)}),
        result=v_map({"bucket": F(NAME, True), "key": F(KEY, True), "size": F(COUNT, True),
                      "sha256": F(SHA256_HEX, True)}),
        uses=_on(_B, "bucket", _W),
        body=BodyKind.DATA,
    ),
    Op.GET: OpSpec(
        op=Op.GET,
        args=v_map({"bucket": F(NAME, True), "key": F(KEY, True), "offset": F(COUNT),
                    "length": F(COUNT)}),
        result=v_map({"size": F(COUNT, True), "sha256": F(SHA256_HEX, True)}),
        uses=_on(_B, "bucket", _R),
        response=BodyKind.DATA,
    ),
    Op.DELETE: OpSpec(
        op=Op.DELETE,
        args=v_map({"bucket": F(NAME, True), "key": F(KEY, True)}),
        result=v_map({"bucket": F(NAME, True), "key": F(KEY, True)}),
        uses=_on(_B, "bucket", _W),
    ),
    Op.CHUNK: OpSpec(
        op=Op.CHUNK,
        args=v_map({
            "bucket": F(NAME, True), "key": F(KEY, True),
            "strategy": F(v_str(choices=frozenset({"fixed", "cdc"})), True),
            "size": F(SIZE), "min_size": F(SIZE), "avg_size": F(SIZE), "max_size": F(SIZE),
            "into": F(NAME), "with_data": F(v_bool),
        }),
        result=v_map({"chunks": F(COUNT, True), "bytes": F(COUNT, True),
                      "stored": F(COUNT, True)}),
        uses=_chunk_uses,
        response=BodyKind.ROWS,
    ),
    Op.CREATE_TABLE: OpSpec(
        op=Op.CREATE_TABLE,
        args=v_map({"table": F(NAME, True), "columns": F(COLUMN_DEFS, True)}),
        result=v_map({"table": F(NAME, True)}),
        uses=_on(_T, "table", _A),
    ),
    Op.INSERT: OpSpec(
        op=Op.INSERT,
        args=v_map({"table": F(NAME, True), "columns": F(COLUMN_NAMES, True)}),
        result=v_map({"table": F(NAME, True), "inserted": F(COUNT, True)}),
        uses=_on(_T, "table", _W),
        body=BodyKind.ROWS,
    ),
    Op.SCAN: OpSpec(
        op=Op.SCAN,
        args=v_map({"table": F(NAME, True), "columns": F(COLUMN_NAMES), "where": F(WHERE),
                    "limit": F(COUNT)}),
        result=v_map({"rows": F(COUNT, True), "truncated": F(v_bool, True)}),
        uses=_on(_T, "table", _R),
        response=BodyKind.ROWS,
    ),
    Op.DROP_TABLE: OpSpec(
        op=Op.DROP_TABLE,
        args=v_map({"table": F(NAME, True)}),
        result=v_map({"table": F(NAME, True)}),
        uses=_on(_T, "table", _A),
    ),
})


def resources(op: Op, args: Mapping[str, Any]) -> tuple[ResourceUse, ...]:
    """Which resources a validated request touches, with the access class it needs.

    Args:
        op: the operation.
        args: the request's arguments, already validated against ``OPS[op].args``.

    Returns:
        One :class:`ResourceUse` per bucket or table (``ping`` touches none;
        ``list_buckets`` reads the bucket ``*``).
    """
    return OPS[op].uses(args)


# --- connection-level maps ------------------------------------------------------------

LIMIT_FIELDS = {
    "max_frame_payload": F(v_int(min_value=1)),
    "max_control_size": F(v_int(min_value=1)),
    "max_pending": F(v_int(min_value=1)),
}

HELLO = v_map(
    {
        "version": F(v_int(), True),
        "client": F(v_str(max_len=MAX_NAME_LEN), True),
        "api_key": F(v_str(min_len=1, max_len=4096)),
        "limits": F(v_map(LIMIT_FIELDS)),
    },
    first=("version",),
)

WELCOME = v_map(
    {
        "version": F(v_int(), True),
        "server": F(v_str(max_len=MAX_NAME_LEN), True),
        "session_id": F(v_str(min_len=1, max_len=64), True),
        "limits": F(v_map({**{k: F(f.check, True) for k, f in LIMIT_FIELDS.items()},
                           "max_hold_seconds": F(v_int(), True)}), True),
        "scope": F(v_map({
            "buckets": F(v_list(NAME, max_items=MAX_LIST_ITEMS), True),
            "tables": F(v_list(NAME, max_items=MAX_LIST_ITEMS), True),
            "access": F(v_list(v_str(choices=frozenset(a.value for a in Access)),
                               max_items=3), True),
        }), True),
    }
)

REQUEST = v_map(
    {
        "op": F(v_str(max_len=64), True),
        "args": F(lambda v, p: v, True),  # checked against the op's schema afterwards
        "reason": F(v_str(max_len=MAX_REASON_LEN)),
    },
    first=("op",),
)

RESPONSE_DATA = v_map({"size": F(COUNT, True)})
RESPONSE_ROWS = v_map({"columns": F(COLUMN_DEFS, True)})

ERROR = v_map({"code": F(v_int(max_value=0xFFFF), True), "message": F(TEXT, True)})
GOAWAY = v_map({
    "last_request_id": F(v_int(max_value=0xFFFF_FFFF), True),
    "code": F(v_int(max_value=0xFFFF), True),
    "message": F(TEXT, True),
})
NOTICE = v_map({
    "kind": F(v_str(max_len=32), True),
    "message": F(TEXT, True),
    "approval_id": F(v_str(min_len=1, max_len=128)),
    "hold_seconds": F(v_int()),
    "expires_at": F(TIMESTAMP),
})
