"""A small HTTP/1.1 server on trio and h11, for the control API, the ops endpoint and the
dev identity provider.

Theory of operation: h11 parses (we never hand-parse HTTP); this module owns the sockets.
Each connection runs requests one after another (keep-alive), each bounded: the whole
request (TLS handshake included on the first) must arrive within ``request_timeout``
and its body may not exceed ``max_body`` (413 without reading the rest). Handlers get an
:class:`HttpRequest` with the verified peer certificate, if the client presented one, so
authorisation can look at the certificate itself. A handler that raises gets a 500 with a
generic body; the exception is logged, never sent.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from cryptography import x509

__all__ = ["HttpRequest", "HttpResponse", "json_error", "json_response", "serve_http"]

log = logging.getLogger("l4proxy.http")

_REASONS = {200: b"OK", 201: b"Created", 204: b"No Content", 400: b"Bad Request",
            401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
            405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Payload Too Large",
            415: b"Unsupported Media Type", 429: b"Too Many Requests",
            500: b"Internal Server Error", 503: b"Service Unavailable"}


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpRequest:
    method: str
    path: str
    query: Mapping[str, Sequence[str]]
    headers: Mapping[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    peer: tuple[str, int]
    #: the client's certificate, if it presented one (chain-verified by TLS against the
    #: configured CA bundle; further checks are the handler's job)
    peer_certificate: x509.Certificate | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def json_response(status: int, obj: Any, *, headers: Sequence[tuple[str, str]] = ()) -> HttpResponse:
    return HttpResponse(status=status, body=json.dumps(obj, sort_keys=True).encode() + b"\n",
                        headers=tuple(headers))


def json_error(status: int, code: str, message: str, *,
               headers: Sequence[tuple[str, str]] = ()) -> HttpResponse:
    """The error body every endpoint uses: ``{"error": {"code", "message"}}``."""
    return json_response(status, {"error": {"code": code, "message": message}}, headers=headers)


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


class _TooLarge(Exception):
    pass


#: a too-large body up to this size is read and discarded before the 413, so the client
#: (which sends its whole body before reading) sees the answer instead of a reset
MAX_DISCARD = 1 << 20


async def _discard_body(stream: trio.abc.Stream, conn: h11.Connection) -> None:
    seen = 0
    while conn.their_state is h11.SEND_BODY and seen <= MAX_DISCARD:
        event = await _next(stream, conn, 16 << 10)
        if isinstance(event, h11.Data):
            seen += len(event.data)
        else:
            return


async def _send(stream: trio.abc.Stream, conn: h11.Connection, response: HttpResponse,
                *, close: bool) -> None:
    headers = [("content-type", response.content_type),
               ("content-length", str(len(response.body))),
               *response.headers]
    if not any(name.lower() == "cache-control" for name, _ in response.headers):
        headers.append(("cache-control", "no-store"))
    if close:
        headers.append(("connection", "close"))
    data = conn.send(h11.Response(status_code=response.status, headers=headers,
                                  reason=_REASONS.get(response.status, b"")))
    data += conn.send(h11.Data(data=response.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def _next(stream: trio.abc.Stream, conn: h11.Connection, read_size: int) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(read_size)))
            continue
        return event


def _peer_certificate(stream: trio.abc.Stream) -> x509.Certificate | None:
    if not isinstance(stream, trio.SSLStream):
        return None
    der = stream.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


async def _serve_connection(stream: trio.abc.Stream, handler: Handler, *, max_body: int,
                            request_timeout: float, peer: tuple[str, int]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 << 10)
    cert_loaded = False
    peer_cert: x509.Certificate | None = None
    while True:
        response: HttpResponse | None = None
        request: HttpRequest | None = None
        try:
            with trio.fail_after(request_timeout):
                event = await _next(stream, conn, 16 << 10)
                if not isinstance(event, h11.Request):
                    return
                if not cert_loaded:
                    peer_cert = _peer_certificate(stream)
                    cert_loaded = True
                headers: dict[str, str] = {}
                for name, value in event.headers:
                    key = name.decode("latin-1").lower()
                    text = value.decode("latin-1")
                    headers[key] = f"{headers[key]}, {text}" if key in headers else text
                length = headers.get("content-length")
                if length is not None and (not length.isdigit() or int(length) > max_body):
                    raise _TooLarge
                body = bytearray()
                while True:
                    part = await _next(stream, conn, 16 << 10)
                    if isinstance(part, h11.Data):
                        body += part.data
                        if len(body) > max_body:
                            raise _TooLarge
                    elif isinstance(part, h11.EndOfMessage):
                        break
                    else:
                        return
                url = urlsplit(event.target.decode("latin-1"))
                request = HttpRequest(method=event.method.decode("latin-1"), path=url.path,
                                      query=parse_qs(url.query), headers=headers,
                                      body=bytes(body), peer=peer, peer_certificate=peer_cert)
        except _TooLarge:
            response = json_error(413, "too_large", f"request body larger than {max_body} bytes")
            with trio.move_on_after(request_timeout):
                try:
                    await _discard_body(stream, conn)
                except h11.RemoteProtocolError:
                    pass
        except trio.TooSlowError:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and conn.their_state is not h11.IDLE:
                response = json_error(408, "timeout", "request not received in time")
            else:
                return
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                response = json_error(exc.error_status_hint, "bad_request", "malformed HTTP request")
            else:
                return
        if response is not None:
            await _send(stream, conn, response, close=True)
            return
        assert request is not None
        try:
            response = await handler(request)
        except Exception:
            log.exception("handler failed for %s %s", request.method, request.path)
            response = json_error(500, "internal", "internal error")
        keep = conn.their_state is h11.DONE
        await _send(stream, conn, response, close=not keep)
        if not keep:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


async def serve_http(handler: Handler, host: str, port: int, *,
                     ssl_context: ssl.SSLContext | None = None, max_body: int = 64 << 10,
                     request_timeout: float = 10.0,
                     task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``handler`` on ``host:port`` (TLS when ``ssl_context`` is given) until cancelled.

    Reports the bound ``(host, port)`` through ``task_status``.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    sock = listeners[0].socket
    bound = cast(tuple[str, int], sock.getsockname()[:2])

    async def on_connection(stream: trio.SocketStream) -> None:
        try:
            peer = cast(tuple[str, int], stream.socket.getpeername()[:2])
        except OSError:
            return
        wrapped: trio.abc.Stream = stream
        if ssl_context is not None:
            wrapped = trio.SSLStream(stream, ssl_context, server_side=True)
        try:
            await _serve_connection(wrapped, handler, max_body=max_body,
                                    request_timeout=request_timeout, peer=peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
            log.debug("http connection from %s ended: %s", peer[0], type(exc).__name__)
        finally:
            await trio.aclose_forcefully(wrapped)

    task_status.started(bound)
    await trio.serve_listeners(on_connection, listeners)
