"""``chunk``: the command-line client of CWP/1, for the chunking service or the gateway.

Usage::

    chunk [--server HOST:PORT] [--api-key-file F] [--ca-file F] [--cert F --key F]
          [--server-name NAME] [--tls] [--reason TEXT] [--json] [-v] SUBCOMMAND ...

Subcommands: ping, list-buckets, create-bucket, delete-bucket, list, stat, put, get,
delete, chunk, create-table, insert, scan, drop-table (``chunk SUBCOMMAND --help``).
Global options may also follow the subcommand.

Settings
--------
Every connection flag falls back to an environment variable, then to a default:

    --profile       CHUNK_PROFILE       an `l4proxy login` directory: the defaults below
                                        come from its profile.toml and certificate files
    --server        CHUNK_SERVER        HOST:PORT ([v6]:PORT), default 127.0.0.1:7070
    --api-key-file  CHUNK_API_KEY_FILE  file holding the API key (mode 0600)
    --ca-file       CHUNK_CA_FILE       CA bundle to verify the server (turns on TLS)
    --cert          CHUNK_CERT          client certificate for mTLS (turns on TLS)
    --key           CHUNK_KEY           private key of --cert
    --server-name   CHUNK_SERVER_NAME   TLS server name (SNI and verification)
    --reason        CHUNK_REASON        reason sent with each request (for approvers)

The API key is only ever read from a file, never from a flag value, so it does not land
in shell history or ``ps``; a key file readable by group or others is refused. Without
a key file no key is sent (a gateway authenticates the client by its certificate).

Output
------
Human output by default: aligned tables for ``list``, ``scan`` and ``chunk``, plain lines
otherwise, sizes in KiB/MiB, times in UTC. ``put`` and ``get`` show a progress bar on
stderr when stderr is a terminal (never with ``--json``). NOTICEs from an intermediary go
to stderr as ``chunk: notice: <message> (approval <id>, held up to <n> s)``; ``-v`` prints
``chunk: session <id>`` to stderr once connected.

``--json`` output, for scripts. Single results are one JSON object on one line::

    ping           {"server": "chunkd", "session": "<id>", "time": <server unix time>,
                    "rtt_ms": <float>}
    list-buckets   {"buckets": ["<bucket>", ...]}
    create-bucket  {"bucket": "<bucket>"}
    delete-bucket  {"bucket": "<bucket>", "deleted_objects": <int>}
    stat           {"bucket": "<bucket>", "key": "<key>", "size": <int>, "sha256": "<hex>",
                    "modified": <unix time>}
    put            {"bucket": "<bucket>", "key": "<key>", "size": <int>, "sha256": "<hex>"}
    get -o FILE    {"bucket": "<bucket>", "key": "<key>", "size": <int>, "sha256": "<hex>",
                    "file": "<FILE>"}   (without -o, stdout carries only the object's bytes)
    delete         {"bucket": "<bucket>", "key": "<key>"}
    create-table   {"table": "<table>"}
    insert         {"table": "<table>", "inserted": <int>}
    drop-table     {"table": "<table>"}

Row results are JSON lines: one object per row, keyed by column name, then one final
``{"result": {...}}`` line. The result line is always the last line::

    list    {"key": "<key>", "size": <int>, "sha256": "<hex>", "modified": <unix time>}
            {"result": {"count": <int>, "truncated": <bool>}}
    chunk   {"index": <int>, "offset": <int>, "length": <int>, "sha256": "<hex>"}
            {"result": {"chunks": <int>, "bytes": <int>, "stored": <int>}}
    scan    {"<column>": <value>, ...}
            {"result": {"rows": <int>, "truncated": <bool>}}

``truncated`` is true when ``--limit`` cut the listing short. Table NULL is ``null``;
bytes values are ``{"$base64": "<standard base64>"}`` everywhere: in ``scan`` output, in
``insert`` input and in ``--where`` values. Errors never go to stdout.

Exit codes
----------
    0  success
    1  usage error: bad arguments or sizes, unreadable or unsafe local files
    2  the server answered with an error (not found, invalid argument, auth failure, ...)
    3  denied by policy
    4  approval denied
    5  approval expired or cancelled, or interrupted with Ctrl-C
    6  protocol error (the peer broke CWP/1, or the downloaded data does not match)
    7  connection or TLS error (nothing listening, bad certificate, server unavailable)
    8  certificate expired or identity locked

Theory of operation: arguments are parsed and checked before connecting (key file,
TLS files, sizes, insert rows, where filters), so a usage error never touches the
network. Then ``trio.run`` connects with :class:`ChunkClient`, runs one subcommand and
maps the client's typed errors to exit codes through their ``exit_code``. A task watches
SIGINT: on Ctrl-C it sends CANCEL for every request in flight and stops reading local
input; the command then ends with the server's answer (normally CANCELLED) or, at the
latest, after :data:`CANCEL_GRACE` seconds; a second Ctrl-C stops waiting at once.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import signal
import ssl
import stat
import sys
import tempfile
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from functools import partial
from pathlib import Path
from typing import IO, Any, NoReturn, cast

import trio
from tqdm import tqdm

from l4proxy.sizes import format_size, parse_size
from l4proxy.wire import (
    Column,
    ColumnType,
    Data,
    ErrorCode,
    Notice,
    Op,
    ProtocolError,
    Rows,
    Secret,
)

from ._client import Call, ChunkClient
from ._errors import ClientError, ProtocolViolation

__all__ = [
    "CANCEL_GRACE",
    "DEFAULT_SERVER",
    "EOF_SETTLE",
    "ExitCode",
    "Settings",
    "UsageError",
    "build_parser",
    "clean",
    "format_notice",
    "main",
    "make_ssl_context",
    "parse_rows",
    "parse_server",
    "parse_where",
    "read_api_key",
    "render_table",
    "settings_from_args",
    "to_json",
]

DEFAULT_SERVER = "127.0.0.1:7070"
DEFAULT_PORT = 7070
#: seconds to wait for the server's answer to a CANCEL after Ctrl-C
CANCEL_GRACE = 5.0
#: seconds to wait at the end of a piped ``put`` body for a Ctrl-C that ended the pipe
EOF_SETTLE = 0.05
#: largest API key file read (the HELLO ``api_key`` field holds at most 4096 characters)
MAX_KEY_FILE = 4096
_I64 = 1 << 63


class ExitCode(IntEnum):
    """What ``chunk`` exits with (the client errors' ``exit_code``, plus 0 and 1)."""

    OK = 0
    USAGE = 1
    SERVER_ERROR = 2
    DENIED_BY_POLICY = 3
    APPROVAL_DENIED = 4
    CANCELLED = 5
    PROTOCOL_ERROR = 6
    CONNECTION_ERROR = 7
    IDENTITY_REFUSED = 8


_EPILOG = """\
environment: CHUNK_SERVER, CHUNK_API_KEY_FILE, CHUNK_CA_FILE, CHUNK_CERT, CHUNK_KEY,
  CHUNK_SERVER_NAME, CHUNK_REASON stand in for the flags of the same name (flags win).

exit codes:
  0  success
  1  usage error: bad arguments or sizes, unreadable or unsafe local files
  2  the server answered with an error (not found, auth failure, ...)
  3  denied by policy
  4  approval denied
  5  approval expired or cancelled, or interrupted with Ctrl-C
  6  protocol error
  7  connection or TLS error
  8  certificate expired or identity locked
"""


class UsageError(Exception):
    """Bad arguments or local files: reported before connecting, exit code 1."""


class _LocalFailure(Exception):
    """A local operation failed mid-command (writing the output, checking a download)."""

    def __init__(self, message: str, exit_code: int = ExitCode.USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


# --- small pure helpers ------------------------------------------------------------------


def clean(text: str) -> str:
    """Make untrusted text (server messages, table cells) safe for a terminal line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _utc(timestamp: float) -> str:
    try:
        return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return repr(timestamp)


def _size_text(n: int) -> str:
    return format_size(n) if n < 1024 else f"{format_size(n)} ({n} bytes)"


def parse_server(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``[v6]:PORT`` or a bare ``HOST`` (port 7070).

    Raises:
        ValueError: not an address.
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"expected HOST:PORT, got {text!r}")
        port_text = rest[1:] if rest else str(DEFAULT_PORT)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" not in text:
        host, port_text = text, str(DEFAULT_PORT)
    else:
        raise ValueError(f"expected HOST:PORT ([v6]:PORT for IPv6), got {text!r}")
    if (not host or any(c.isspace() for c in host) or not port_text.isdigit()
            or not 0 < int(port_text) < 65536):
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port_text)


def format_notice(notice: Notice) -> str:
    """The stderr line for a NOTICE."""
    details = []
    if notice.approval_id:
        details.append(f"approval {clean(notice.approval_id)}")
    if notice.hold_seconds is not None:
        details.append(f"held up to {notice.hold_seconds} s")
    if notice.expires_at is not None:
        details.append(f"expires {_utc(notice.expires_at)}")
    line = f"chunk: notice: {clean(notice.message)}"
    return f"{line} ({', '.join(details)})" if details else line


def _scalar(value: Any, where: str) -> Any:
    """A JSON value as a table cell: null, bool, int (i64), float, text or {"$base64": ...}."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if not -_I64 <= value < _I64:
            raise UsageError(f"{where}: integer out of the signed 64-bit range")
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, dict) and set(value) == {"$base64"} and isinstance(value["$base64"], str):
        try:
            return base64.b64decode(value["$base64"], validate=True)
        except ValueError:
            raise UsageError(f"{where}: invalid base64") from None
    raise UsageError(f'{where}: expected null, a boolean, number or string, or {{"$base64": "..."}}')


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def parse_rows(lines: Iterable[bytes], source: str) -> tuple[list[str], list[list[Any]]]:
    """Parse JSON lines for ``insert``: the first object's keys are the columns.

    Every other line must have exactly the same keys; blank lines are skipped.

    Raises:
        UsageError: naming ``source:line`` and what is wrong.
    """
    columns: list[str] | None = None
    rows: list[list[Any]] = []
    for lineno, raw in enumerate(lines, 1):
        where = f"{source}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{where}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_constant=_reject_constant)
        except ValueError as exc:
            raise UsageError(f"{where}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{where}: expected a JSON object per line")
        if columns is None:
            if not obj:
                raise UsageError(f"{where}: the first object has no keys (they name the columns)")
            columns = list(obj)
        elif obj.keys() != set(columns):
            missing = sorted(set(columns) - obj.keys())
            extra = sorted(obj.keys() - set(columns))
            problem = f"missing {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
            raise UsageError(f"{where}: {problem} (every line needs the keys of the first line)")
        rows.append([_scalar(obj[c], f"{where}: {c}") for c in columns])
    if columns is None:
        raise UsageError(f"{source}: no rows to insert")
    return columns, rows


def parse_where(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``COLUMN=VALUE`` filters.

    VALUE is read as JSON when it is a JSON scalar (``3``, ``2.5``, ``true``, ``null``,
    ``"007"``) or ``{"$base64": "..."}``; anything else is taken as a plain string.
    """
    where: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--where expects COLUMN=VALUE, got {item!r}")
        if name in where:
            raise UsageError(f"--where names column {name!r} twice")
        try:
            value = json.loads(raw, parse_constant=_reject_constant)
        except ValueError:
            where[name] = raw
            continue
        if isinstance(value, (list, dict)) and not (isinstance(value, dict) and "$base64" in value):
            where[name] = raw
        else:
            where[name] = _scalar(value, f"--where {name}")
    return where


def to_json(value: Any) -> Any:
    """Make a result value JSON-ready: bytes become {"$base64": ...}."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$base64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def _cell(value: Any) -> str:
    """A table cell for human output."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return "0x" + value.hex() if len(value) <= 16 else f"<{len(value)} bytes>"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return clean(value)
    return str(value)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                 right: Collection[int] = ()) -> list[str]:
    """Align cells in columns separated by two spaces; ``right`` columns are right-aligned."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return [line(headers), *(line(r) for r in rows)]


# --- output ---------------------------------------------------------------------------------


def _say(message: str) -> None:
    """An error or status line on stderr (prefixed ``chunk:``)."""
    tqdm.write(f"chunk: {message}", file=sys.stderr)


def _emit(obj: Mapping[str, Any]) -> None:
    print(json.dumps(to_json(obj)), flush=True)


def _lines(*lines: str) -> None:
    for line in lines:
        print(line)
    sys.stdout.flush()


def _progress(ctx: _Ctx, total: int | None, desc: str) -> tqdm | None:
    if ctx.settings.json or not _isatty(sys.stderr):
        return None
    return tqdm(total=total, desc=clean(desc)[:40], unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, leave=False, dynamic_ncols=True)


def _isatty(stream: IO[Any]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# --- settings ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Validated global settings of one run (flags, then environment, then defaults)."""

    host: str
    port: int
    api_key: Secret | None = field(repr=False)
    ssl_context: ssl.SSLContext | None
    server_name: str | None
    reason: str | None
    json: bool
    verbose: bool


def _flag_or_env(value: str | None, env: str) -> str | None:
    if value:
        return value
    return os.environ.get(env) or None


def read_api_key(path: str) -> Secret:
    """Read an API key file; refuse it if group or others may access it.

    Raises:
        UsageError: missing, unsafe, empty or oversized file. The message never holds
            the file's contents.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"API key file {path} is not a regular file")
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_mode & 0o077:
                raise UsageError(
                    f"API key file {path} is accessible by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")
            raw = f.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise UsageError(f"cannot read API key file {path}: {exc.strerror or type(exc).__name__}") from None
    if len(raw) > MAX_KEY_FILE:
        raise UsageError(f"API key file {path} is larger than {MAX_KEY_FILE} bytes")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UsageError(f"API key file {path} is not UTF-8 text") from None
    if not text or "\n" in text:
        raise UsageError(f"API key file {path} must hold exactly one key on one line")
    return Secret(text)


def make_ssl_context(*, ca_file: str | None, cert: str | None, key: str | None,
                     tls: bool) -> ssl.SSLContext | None:
    """The client TLS context, or None for plain TCP (no CA file, certificate or --tls).

    Raises:
        UsageError: unreadable or invalid CA, certificate or key file.
    """
    if key and not cert:
        raise UsageError("--key (CHUNK_KEY) needs --cert (CHUNK_CERT)")
    if not (ca_file or cert or tls):
        return None
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load CA file {ca_file}: {_ssl_reason(exc)}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # the client's TlsStream sends without reading: a renegotiation would break it
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    if cert:
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load client certificate {cert}"
                             f"{f' / key {key}' if key else ''}: {_ssl_reason(exc)}") from None
    return ctx


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or type(exc).__name__)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def read_profile(directory: str | None) -> dict[str, str]:
    """Connection defaults from an ``l4proxy login`` profile directory.

    Returns ``server`` (the profile's gateway), ``server_name``, ``ca_file``, ``cert`` and
    ``key`` where present; flags and environment variables still win over them.

    Raises:
        UsageError: the directory or its profile.toml is missing or malformed.
    """
    if not directory:
        return {}
    import tomllib

    base = Path(directory)
    try:
        doc = tomllib.loads((base / "profile.toml").read_text("utf-8"))
    except OSError as exc:
        raise UsageError(f"--profile: cannot read {base / 'profile.toml'}: "
                         f"{exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise UsageError(f"--profile: {base / 'profile.toml'} is not valid TOML") from None
    out: dict[str, str] = {}
    for name, key in (("gateway", "server"), ("server_name", "server_name")):
        value = doc.get(name)
        if isinstance(value, str) and value:
            out[key] = value
    for name, key in (("ca.crt", "ca_file"), ("client.crt", "cert"), ("client.key", "key")):
        if (base / name).is_file():
            out[key] = str(base / name)
    return out


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Resolve flags and environment into :class:`Settings`.

    Raises:
        UsageError: a bad address, key file or TLS file.
    """
    profile = read_profile(_flag_or_env(getattr(args, "profile", None), "CHUNK_PROFILE"))
    server = (_flag_or_env(args.server, "CHUNK_SERVER") or profile.get("server")
              or DEFAULT_SERVER)
    try:
        host, port = parse_server(server)
    except ValueError as exc:
        source = "--server" if args.server else "CHUNK_SERVER"
        raise UsageError(f"{source}: {exc}") from None
    key_file = _flag_or_env(args.api_key_file, "CHUNK_API_KEY_FILE")
    api_key = read_api_key(key_file) if key_file else None
    ssl_context = make_ssl_context(
        ca_file=_flag_or_env(args.ca_file, "CHUNK_CA_FILE") or profile.get("ca_file"),
        cert=_flag_or_env(args.tls_cert, "CHUNK_CERT") or profile.get("cert"),
        key=_flag_or_env(args.tls_key, "CHUNK_KEY") or profile.get("key"),
        tls=bool(args.tls))
    return Settings(host=host, port=port, api_key=api_key, ssl_context=ssl_context,
                    server_name=(_flag_or_env(args.server_name, "CHUNK_SERVER_NAME")
                                 or profile.get("server_name")),
                    reason=_flag_or_env(args.reason, "CHUNK_REASON"),
                    json=bool(args.json), verbose=bool(args.verbose))


# --- Ctrl-C ----------------------------------------------------------------------------------


class _TrackedClient(ChunkClient):
    """A :class:`ChunkClient` that remembers its calls, so Ctrl-C can cancel them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[Call] = []

    async def start(self, op: Op, args: Mapping[str, Any] | None = None, *,
                    reason: str | None = None) -> Call:
        call = await super().start(op, args, reason=reason)
        self.calls.append(call)
        return call


class _Interrupt:
    """What Ctrl-C does to the running command.

    ``scope`` wraps connecting and the command. The first Ctrl-C sends CANCEL for the
    calls in flight, stops local reads (stdin), and gives the server :data:`CANCEL_GRACE`
    seconds to answer before ``scope`` is cancelled; with nothing in flight, or on a
    second Ctrl-C, ``scope`` is cancelled at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self.scope = trio.CancelScope()
        self.client: _TrackedClient | None = None
        self._reads: set[trio.CancelScope] = set()

    async def request(self) -> None:
        if self.requested:
            self.scope.cancel()
            return
        self.requested = True
        pending = [c for c in (self.client.calls if self.client else []) if not c.finished]
        if not pending:
            self.scope.cancel()
            return
        self.scope.deadline = min(self.scope.deadline, trio.current_time() + CANCEL_GRACE)
        for call in pending:
            with contextlib.suppress(ClientError, ProtocolError):
                await call.cancel()
        for scope in list(self._reads):
            scope.cancel()

    async def read(self, fn: Callable[[int], bytes], size: int) -> bytes | None:
        """``fn(size)`` in a thread that Ctrl-C abandons; None once interrupted."""
        if self.requested:
            return None
        with trio.CancelScope() as scope:
            self._reads.add(scope)
            try:
                return await trio.to_thread.run_sync(fn, size, abandon_on_cancel=True)
            finally:
                self._reads.discard(scope)
        return None


async def _watch_sigint(interrupt: _Interrupt, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        task_status.started()
        async for _ in signals:
            await interrupt.request()


# --- running ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Ctx:
    client: _TrackedClient
    settings: Settings
    interrupt: _Interrupt


@dataclass(slots=True)
class _Command:
    """A checked subcommand: ``run`` talks to the server; ``close`` frees local resources."""

    run: Callable[[_Ctx], Awaitable[None]]
    close: Callable[[], None] = lambda: None


def _leaf(exc: BaseException) -> BaseException:
    """The one interesting exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)] or list(exc.exceptions)
        exc = inner[0]
    return exc


def _report(exc: BaseException, interrupt: _Interrupt) -> int:
    exc = _leaf(exc)
    if isinstance(exc, ClientError):
        if interrupt.requested and exc.code in (ErrorCode.CANCELLED, ErrorCode.APPROVAL_CANCELLED):
            _say("cancelled")
            return ExitCode.CANCELLED
        _say(clean(exc.message))
        return exc.exit_code
    if isinstance(exc, _LocalFailure):
        _say(exc.message)
        return exc.exit_code
    if isinstance(exc, BrokenPipeError):
        _quiet_stdout()
        _say("output closed before the end")
        return ExitCode.USAGE
    if isinstance(exc, ProtocolError):
        _say(f"protocol error: {clean(exc.message)}")
        return ExitCode.PROTOCOL_ERROR
    if isinstance(exc, OSError):
        _say(f"local I/O error: {exc.strerror or type(exc).__name__}")
        return ExitCode.USAGE
    if isinstance(exc, Exception):
        _say(f"internal error: {type(exc).__name__}: {clean(str(exc))[:200]}")
        return ExitCode.SERVER_ERROR
    raise exc


def _quiet_stdout() -> None:
    """After EPIPE on stdout, point it at /dev/null so the final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _on_notice(notice: Notice) -> None:
    tqdm.write(format_notice(notice), file=sys.stderr)


async def _run(settings: Settings, command: _Command) -> int:
    interrupt = _Interrupt()
    async with trio.open_nursery() as nursery:
        if threading.current_thread() is threading.main_thread():
            await nursery.start(_watch_sigint, interrupt)
        try:
            return await _session(settings, command, interrupt)
        finally:
            nursery.cancel_scope.cancel()


async def _session(settings: Settings, command: _Command, interrupt: _Interrupt) -> int:
    try:
        with interrupt.scope:
            async with _TrackedClient.connect(settings.host, settings.port, api_key=settings.api_key,
                                              ssl_context=settings.ssl_context,
                                              server_name=settings.server_name,
                                              on_notice=_on_notice) as client:
                assert isinstance(client, _TrackedClient)
                interrupt.client = client
                if settings.verbose:
                    _say(f"session {client.session_id} (server {clean(client.welcome.server)})")
                try:
                    await command.run(_Ctx(client=client, settings=settings, interrupt=interrupt))
                except Exception as exc:
                    return _report(exc, interrupt)
                return ExitCode.OK
    except Exception as exc:
        return _report(exc, interrupt)
    _say("cancelled")
    return ExitCode.CANCELLED


def main(argv: list[str] | None = None) -> int:
    """Run ``chunk`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error (exit code 1, see _Parser.error)
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    command: _Command | None = None
    try:
        settings = settings_from_args(args)
        command = args.prepare(args)
    except UsageError as exc:
        _say(str(exc))
        return ExitCode.USAGE
    except KeyboardInterrupt:
        _say("cancelled")
        return ExitCode.CANCELLED
    assert command is not None
    try:
        return trio.run(_run, settings, command)
    except KeyboardInterrupt:
        _say("cancelled")
        return ExitCode.CANCELLED
    finally:
        command.close()


# --- subcommands -----------------------------------------------------------------------------


async def _simple(ctx: _Ctx, op: Op, args: Mapping[str, Any]) -> Mapping[str, Any]:
    return await ctx.client.simple(op, args, reason=ctx.settings.reason)


def _prep_ping(_args: argparse.Namespace) -> _Command:
    async def run(ctx: _Ctx) -> None:
        start = trio.current_time()
        result = await _simple(ctx, Op.PING, {})
        rtt_ms = (trio.current_time() - start) * 1000
        server = ctx.client.welcome.server
        if ctx.settings.json:
            _emit({"server": server, "session": ctx.client.session_id, "time": result["time"],
                   "rtt_ms": round(rtt_ms, 3)})
        else:
            _lines(f"pong from {clean(server)} in {rtt_ms:.1f} ms")

    return _Command(run)


def _prep_list_buckets(_args: argparse.Namespace) -> _Command:
    async def run(ctx: _Ctx) -> None:
        result = await _simple(ctx, Op.LIST_BUCKETS, {})
        if ctx.settings.json:
            _emit({"buckets": list(result["buckets"])})
        else:
            _lines(*(clean(b) for b in result["buckets"]))

    return _Command(run)


def _prep_create_bucket(args: argparse.Namespace) -> _Command:
    async def run(ctx: _Ctx) -> None:
        result = await _simple(ctx, Op.CREATE_BUCKET, {"bucket": args.bucket})
        if ctx.settings.json:
            _emit(result)
        else:
            _lines(f"created bucket {clean(result['bucket'])}")

    return _Command(run)


def _prep_delete_bucket(args: argparse.Namespace) -> _Command:
    request: dict[str, Any] = {"bucket": args.bucket}
    if args.force:
        request["force"] = True

    async def run(ctx: _Ctx) -> None:
        result = await _simple(ctx, Op.DELETE_BUCKET, request)
        if ctx.settings.json:
            _emit(result)
        else:
            n = result["deleted_objects"]
            _lines(f"deleted bucket {clean(result['bucket'])} ({n} object{'s' * (n != 1)})")

    return _Command(run)


def _prep_stat(args: argparse.Namespace) -> _Command:
    async def run(ctx: _Ctx) -> None:
        r = await _simple(ctx, Op.STAT, {"bucket": args.bucket, "key": args.object_key})
        if ctx.settings.json:
            _emit(r)
        else:
            _lines(f"bucket:    {clean(r['bucket'])}", f"key:       {clean(r['key'])}",
                   f"size:      {_size_text(r['size'])}", f"sha256:    {r['sha256']}",
                   f"modified:  {_utc(r['modified'])}")

    return _Command(run)


def _prep_delete(args: argparse.Namespace) -> _Command:
    async def run(ctx: _Ctx) -> None:
        r = await _simple(ctx, Op.DELETE, {"bucket": args.bucket, "key": args.object_key})
        if ctx.settings.json:
            _emit(r)
        else:
            _lines(f"deleted {clean(r['bucket'])}/{clean(r['key'])}")

    return _Command(run)


def _prep_create_table(args: argparse.Namespace) -> _Command:
    columns: list[tuple[str, str]] = args.columns

    async def run(ctx: _Ctx) -> None:
        r = await _simple(ctx, Op.CREATE_TABLE, {"table": args.table,
                                                  "columns": [list(c) for c in columns]})
        if ctx.settings.json:
            _emit(r)
        else:
            _lines(f"created table {clean(r['table'])}")

    return _Command(run)


def _prep_drop_table(args: argparse.Namespace) -> _Command:
    async def run(ctx: _Ctx) -> None:
        r = await _simple(ctx, Op.DROP_TABLE, {"table": args.table})
        if ctx.settings.json:
            _emit(r)
        else:
            _lines(f"dropped table {clean(r['table'])}")

    return _Command(run)


class _Source:
    """The body of ``put``: reads a file descriptor in pieces; ends early on Ctrl-C.

    When a pipe ends, it waits :data:`EOF_SETTLE` seconds before reporting the end: in
    ``producer | chunk put ...`` a Ctrl-C kills the producer too, and its EOF may arrive
    before the SIGINT is handled here; the pause lets the CANCEL go out first, so a
    truncated upload is not committed as complete.
    """

    def __init__(self, ctx: _Ctx, read: Callable[[int], bytes], piece: int, *, pipe: bool) -> None:
        self._ctx = ctx
        self._read = read
        self._piece = piece
        self._pipe = pipe

    def __aiter__(self) -> _Source:
        return self

    async def __anext__(self) -> bytes:
        data = await self._ctx.interrupt.read(self._read, self._piece)
        if data is not None and not data and self._pipe:
            await trio.sleep(EOF_SETTLE)
        if not data:  # EOF, or interrupted (the CANCEL is out, or goes out now)
            raise StopAsyncIteration
        return data


def _stdin() -> IO[bytes]:
    if sys.stdin is None:
        raise UsageError("stdin is closed")
    return sys.stdin.buffer


def _prep_put(args: argparse.Namespace) -> _Command:
    fd: int | None = None  # a descriptor we opened ourselves (closed by close())
    if args.file == "-":
        label = args.object_key
        try:
            source_fd = sys.stdin.fileno()
        except (AttributeError, ValueError, OSError):  # a replaced stdin without a descriptor
            source_fd = -1
    else:
        label = os.path.basename(args.file)
        try:
            fd = source_fd = os.open(args.file, os.O_RDONLY)
        except OSError as exc:
            raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    size: int | None = None
    read: Callable[[int], bytes] = _stdin().read if source_fd < 0 else partial(os.read, source_fd)
    if source_fd >= 0:
        st = os.fstat(source_fd)
        if stat.S_ISDIR(st.st_mode):
            if fd is not None:
                os.close(fd)
            raise UsageError(f"cannot read {args.file}: is a directory")
        size = st.st_size if stat.S_ISREG(st.st_mode) else None

    def close() -> None:
        if fd is not None:
            os.close(fd)

    async def run(ctx: _Ctx) -> None:
        bar = _progress(ctx, size, label)
        try:
            source = _Source(ctx, read, ctx.client.limits.max_frame_payload, pipe=size is None)
            r = await ctx.client.put(args.bucket, args.object_key, source, size=size,
                                     reason=ctx.settings.reason,
                                     progress=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        if ctx.settings.json:
            _emit(r)
        else:
            _lines(f"put {clean(r['bucket'])}/{clean(r['key'])}: {_size_text(r['size'])}, "
                   f"sha256 {r['sha256']}")

    return _Command(run, close)


def _prep_get(args: argparse.Namespace) -> _Command:
    target: Path | None = None if args.output in (None, "-") else Path(args.output)
    if target is not None:
        if target.is_dir():
            raise UsageError(f"-o {target}: is a directory")
        if not target.parent.is_dir():
            raise UsageError(f"-o {target}: directory {target.parent} does not exist")
    request: dict[str, Any] = {"bucket": args.bucket, "key": args.object_key}
    if args.offset is not None:
        request["offset"] = args.offset
    if args.length is not None:
        request["length"] = args.length

    async def run(ctx: _Ctx) -> None:
        if target is None:
            sys.stdout.flush()
            await _download(ctx, request, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                r = await _download(ctx, request, f)
            os.replace(tmp_name, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        if ctx.settings.json:
            _emit({"bucket": args.bucket, "key": args.object_key, "size": r["size"],
                   "sha256": r["sha256"], "file": str(target)})
        else:
            _lines(f"saved {clean(args.bucket)}/{clean(args.object_key)} to {target}: "
                   f"{_size_text(r['size'])}, sha256 {r['sha256']}")

    return _Command(run)


def _frames(call: Call) -> AsyncGenerator[Data | Rows, None]:
    # body() is an async generator (annotated as an iterator); close it if we stop early
    return cast(AsyncGenerator[Data | Rows, None], call.body())


async def _download(ctx: _Ctx, request: Mapping[str, Any], sink: IO[bytes]) -> Mapping[str, Any]:
    """Stream a GET into ``sink``, checking the size and sha256 the server reports."""
    call = await ctx.client.start(Op.GET, request, reason=ctx.settings.reason)
    bar: tqdm | None = None
    try:
        head = await call.response()
        bar = _progress(ctx, head.size, str(request["key"]))
        digest = hashlib.sha256()
        received = 0
        async with contextlib.aclosing(_frames(call)) as frames:
            async for frame in frames:
                if not isinstance(frame, Data):
                    raise ProtocolViolation(f"expected DATA, got {type(frame).__name__}")
                if ctx.interrupt.requested:
                    continue  # the CANCEL is out; wait for the answer without writing
                digest.update(frame.data)
                received += len(frame.data)
                await trio.to_thread.run_sync(sink.write, frame.data)
                if bar is not None:
                    bar.update(len(frame.data))
        result = await call.result()
    finally:
        if bar is not None:
            bar.close()
        await call.abandon()
    if received != result["size"] or digest.hexdigest() != result["sha256"]:
        raise _LocalFailure(f"downloaded {received} bytes that do not match the server's size "
                            f"({result['size']}) and sha256", ExitCode.PROTOCOL_ERROR)
    return result


_ROWS_DISPLAY: dict[Op, dict[str, Callable[[Any], str]]] = {
    Op.LIST: {"size": format_size, "modified": _utc},
    Op.CHUNK: {"length": format_size},
}
_ROWS_ORDER: dict[Op, tuple[str, ...]] = {Op.LIST: ("key", "size", "modified", "sha256")}


async def _rows(ctx: _Ctx, op: Op, request: Mapping[str, Any]) -> tuple[tuple[Column, ...],
                                                                       list[Sequence[Any]],
                                                                       Mapping[str, Any]]:
    """Run a row-streaming request. With --json each row is printed as it arrives (and
    not kept); otherwise rows are collected for the table."""
    call = await ctx.client.start(op, request, reason=ctx.settings.reason)
    kept: list[Sequence[Any]] = []
    try:
        head = await call.response()
        columns = head.columns or ()
        names = [c.name for c in columns]
        async with contextlib.aclosing(_frames(call)) as frames:
            async for frame in frames:
                if not isinstance(frame, Rows):
                    raise ProtocolViolation(f"expected ROWS, got {type(frame).__name__}")
                if ctx.settings.json:
                    for row in frame.rows:
                        print(json.dumps(to_json(dict(zip(names, row, strict=True)))))
                    sys.stdout.flush()
                else:
                    kept.extend(frame.rows)
        result = await call.result()
    except ValueError:  # zip(strict=True): a row of the wrong width
        raise ProtocolViolation("the server sent a row that does not match its columns") from None
    finally:
        await call.abandon()
    return columns, kept, result


def _print_rows(op: Op, columns: Sequence[Column], rows: Sequence[Sequence[Any]]) -> None:
    display = _ROWS_DISPLAY.get(op, {})
    names = [c.name for c in columns]
    wanted = _ROWS_ORDER.get(op)
    order = ([names.index(n) for n in wanted] if wanted and set(wanted) == set(names)
             else list(range(len(columns))))
    cells = []
    for row in rows:
        if len(row) != len(columns):
            raise ProtocolViolation("the server sent a row that does not match its columns")
        out = []
        for i in order:
            fmt = display.get(names[i])
            value = row[i]
            out.append(fmt(value) if fmt is not None and value is not None else _cell(value))
        cells.append(out)
    right = {pos for pos, i in enumerate(order) if columns[i].type in (ColumnType.INT, ColumnType.FLOAT)}
    _lines(*render_table([clean(names[i]).upper() for i in order], cells, right))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _prep_list(args: argparse.Namespace) -> _Command:
    request: dict[str, Any] = {"bucket": args.bucket}
    if args.prefix:
        request["prefix"] = args.prefix
    if args.limit is not None:
        request["limit"] = args.limit

    async def run(ctx: _Ctx) -> None:
        columns, rows, result = await _rows(ctx, Op.LIST, request)
        if ctx.settings.json:
            _emit({"result": result})
            return
        _print_rows(Op.LIST, columns, rows)
        more = " (more exist; raise --limit)" if result["truncated"] else ""
        _lines(f"{_plural(result['count'], 'object')}{more}")

    return _Command(run)


def _prep_chunk(args: argparse.Namespace) -> _Command:
    from l4proxy.chunking import ChunkSpecError, chunk_spec

    try:  # the same check the service makes, so a bad combination is a usage error
        chunk_spec(args.strategy, size=args.size, min_size=args.min_size, avg_size=args.avg_size,
                   max_size=args.max_size)
    except ChunkSpecError as exc:
        flag = "--" + exc.param.replace("_", "-")
        raise UsageError(f"{flag}{str(exc).removeprefix(exc.param)}") from None
    request: dict[str, Any] = {"bucket": args.bucket, "key": args.object_key, "strategy": args.strategy}
    for name in ("size", "min_size", "avg_size", "max_size", "into"):
        if getattr(args, name) is not None:
            request[name] = getattr(args, name)

    async def run(ctx: _Ctx) -> None:
        columns, rows, result = await _rows(ctx, Op.CHUNK, request)
        if ctx.settings.json:
            _emit({"result": result})
            return
        _print_rows(Op.CHUNK, columns, rows)
        summary = f"{_plural(result['chunks'], 'chunk')}, {format_size(result['bytes'])}"
        if args.into is not None:
            summary += f", {result['stored']} new stored in {clean(args.into)}"
        _lines(summary)

    return _Command(run)


def _prep_scan(args: argparse.Namespace) -> _Command:
    request: dict[str, Any] = {"table": args.table}
    if args.columns:
        names = [c.strip() for c in args.columns.split(",") if c.strip()]
        if not names:
            raise UsageError("--columns expects a comma-separated list of column names")
        request["columns"] = names
    where = parse_where(args.where or [])
    if where:
        request["where"] = where
    if args.limit is not None:
        request["limit"] = args.limit

    async def run(ctx: _Ctx) -> None:
        columns, rows, result = await _rows(ctx, Op.SCAN, request)
        if ctx.settings.json:
            _emit({"result": result})
            return
        _print_rows(Op.SCAN, columns, rows)
        more = " (more match; raise --limit)" if result["truncated"] else ""
        _lines(f"{_plural(result['rows'], 'row')}{more}")

    return _Command(run)


def _prep_insert(args: argparse.Namespace) -> _Command:
    source = "<stdin>" if args.rows == "-" else args.rows
    try:
        if args.rows == "-":
            columns, rows = parse_rows(_stdin(), source)
        else:
            with open(args.rows, "rb") as f:
                columns, rows = parse_rows(f, source)
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror or type(exc).__name__}") from None

    async def run(ctx: _Ctx) -> None:
        r = await ctx.client.insert(args.table, columns, rows, reason=ctx.settings.reason)
        if ctx.settings.json:
            _emit(r)
        else:
            _lines(f"inserted {_plural(r['inserted'], 'row')} into {clean(r['table'])}")

    return _Command(run)


# --- the parser -------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors exit with 1 (not 2, which means a server error)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"chunk: {message}\n")


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_size_arg(text: str) -> int:
    value = _size_arg(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def _count_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
    return value


def _column_arg(text: str) -> tuple[str, str]:
    name, sep, ctype = text.rpartition(":")
    types = [t.value for t in ColumnType]
    if not sep or not name or ctype.lower() not in types:
        raise argparse.ArgumentTypeError(f"expected NAME:TYPE with TYPE one of {', '.join(types)}, "
                                         f"got {text!r}")
    return name, ctype.lower()


def _add_global_options(p: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    # In a subcommand the defaults are SUPPRESS, so a flag given before the subcommand is
    # not overwritten by the subcommand's default.
    def d(value: Any) -> Any:
        return argparse.SUPPRESS if in_subcommand else value

    g = p.add_argument_group("global options")
    g.add_argument("--profile", metavar="DIR", default=d(None),
                   help="connection defaults from an `l4proxy login` profile directory: gateway, "
                        "server name, ca.crt, client.crt, client.key (env CHUNK_PROFILE)")
    g.add_argument("--server", metavar="HOST:PORT", default=d(None),
                   help=f"service or gateway address (env CHUNK_SERVER; default {DEFAULT_SERVER})")
    g.add_argument("--api-key-file", metavar="FILE", default=d(None),
                   help="read the API key from FILE, which must be mode 0600 (env CHUNK_API_KEY_FILE)")
    g.add_argument("--ca-file", metavar="FILE", default=d(None),
                   help="verify the server with this CA bundle; turns on TLS (env CHUNK_CA_FILE)")
    g.add_argument("--cert", dest="tls_cert", metavar="FILE", default=d(None),
                   help="client certificate for mTLS; turns on TLS (env CHUNK_CERT)")
    g.add_argument("--key", dest="tls_key", metavar="FILE", default=d(None),
                   help="private key of --cert (env CHUNK_KEY)")
    g.add_argument("--server-name", metavar="NAME", default=d(None),
                   help="TLS server name for SNI and verification (env CHUNK_SERVER_NAME)")
    g.add_argument("--tls", action="store_true", default=d(False),
                   help="use TLS with the system trust store (implied by --ca-file / --cert)")
    g.add_argument("--reason", metavar="TEXT", default=d(None),
                   help="why you make this request, shown to approvers (env CHUNK_REASON)")
    g.add_argument("--json", action="store_true", default=d(False),
                   help="machine-readable output (JSON; JSON lines for list/scan/chunk)")
    g.add_argument("-v", "--verbose", action="store_true", default=d(False),
                   help="print the session id to stderr")


def build_parser() -> argparse.ArgumentParser:
    """The ``chunk`` argument parser; each subcommand sets ``prepare``."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="chunk", description="Client of the chunking service (CWP/1), directly or "
                "through the l4proxy gateway.", epilog=_EPILOG, formatter_class=fmt)
    _add_global_options(p, in_subcommand=False)
    sub = p.add_subparsers(title="subcommands", dest="command", metavar="SUBCOMMAND", required=True)

    def add(name: str, prepare: Callable[[argparse.Namespace], _Command],
            help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text, epilog=_EPILOG,
                            formatter_class=fmt)
        sp.set_defaults(prepare=prepare)
        return sp

    def finish(sp: argparse.ArgumentParser) -> None:
        _add_global_options(sp, in_subcommand=True)

    finish(add("ping", _prep_ping, "check that the server answers"))
    finish(add("list-buckets", _prep_list_buckets, "list the buckets you can read"))
    sp = add("create-bucket", _prep_create_bucket, "create a bucket")
    sp.add_argument("bucket", metavar="BUCKET")
    finish(sp)
    sp = add("delete-bucket", _prep_delete_bucket, "delete a bucket")
    sp.add_argument("bucket", metavar="BUCKET")
    sp.add_argument("--force", action="store_true", help="also delete the objects in it")
    finish(sp)
    sp = add("list", _prep_list, "list the objects of a bucket")
    sp.add_argument("bucket", metavar="BUCKET")
    sp.add_argument("--prefix", metavar="P", help="only keys starting with P")
    sp.add_argument("--limit", metavar="N", type=_count_arg, help="at most N objects")
    finish(sp)
    sp = add("stat", _prep_stat, "show an object's size, sha256 and time")
    sp.add_argument("bucket", metavar="BUCKET")
    sp.add_argument("object_key", metavar="KEY")
    finish(sp)
    sp = add("put", _prep_put, "upload FILE (or stdin: -) as an object")
    sp.add_argument("bucket", metavar="BUCKET")
    sp.add_argument("object_key", metavar="KEY")
    sp.add_argument("file", metavar="FILE|-")
    finish(sp)
    sp = add("get", _prep_get, "download an object to stdout or FILE")
    sp.add_argument("bucket", metavar="BUCKET")
    sp.add_argument("object_key", metavar="KEY")
    sp.add_argument("-o", "--output", metavar="FILE", help="write to FILE (replaced when complete)")
    sp.add_argument("--offset", metavar="N", type=_size_arg, help="start at byte N (65536, 64KiB)")
    sp.add_argument("--length", metavar="N", type=_size_arg, help="at most N bytes")
    finish(sp)
    sp = add("delete", _prep_delete, "delete an object")
    sp.add_argument("bucket", metavar="BUCKET")
    sp.add_argument("object_key", metavar="KEY")
    finish(sp)
    sp = add("chunk", _prep_chunk, "split an object into chunks (fixed size or content-defined)")
    sp.add_argument("bucket", metavar="BUCKET")
    sp.add_argument("object_key", metavar="KEY")
    sp.add_argument("--strategy", choices=["fixed", "cdc"], default="cdc", help="default cdc")
    sp.add_argument("--size", metavar="S", type=_positive_size_arg, help="fixed: chunk size (default 1MiB)")
    sp.add_argument("--min-size", metavar="S", type=_positive_size_arg, help="cdc: smallest chunk")
    sp.add_argument("--avg-size", metavar="S", type=_positive_size_arg,
                    help="cdc: average chunk, a power of two (default 64KiB)")
    sp.add_argument("--max-size", metavar="S", type=_positive_size_arg, help="cdc: largest chunk")
    sp.add_argument("--into", metavar="BUCKET", help="store each chunk in BUCKET, keyed by its sha256")
    finish(sp)
    sp = add("create-table", _prep_create_table, "create a typed table")
    sp.add_argument("table", metavar="TABLE")
    sp.add_argument("columns", metavar="COL:TYPE", nargs="+", type=_column_arg,
                    help="TYPE is one of text, int, float, bool, bytes")
    finish(sp)
    sp = add("insert", _prep_insert, "insert rows from JSON lines (the first object's keys are the columns)")
    sp.add_argument("table", metavar="TABLE")
    sp.add_argument("rows", metavar="ROWS.jsonl|-")
    finish(sp)
    sp = add("scan", _prep_scan, "read rows of a table")
    sp.add_argument("table", metavar="TABLE")
    sp.add_argument("--columns", metavar="a,b", help="only these columns, in this order")
    sp.add_argument("--where", metavar="COL=VALUE", action="append",
                    help='equality filter, repeatable; VALUE is JSON if it parses (3, true, null, '
                         '"007"), else a string')
    sp.add_argument("--limit", metavar="N", type=_count_arg, help="at most N rows")
    finish(sp)
    sp = add("drop-table", _prep_drop_table, "drop a table")
    sp.add_argument("table", metavar="TABLE")
    finish(sp)
    return p


if __name__ == "__main__":
    sys.exit(main())
