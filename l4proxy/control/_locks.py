"""The lock endpoints of the control API (admin only).

Theory of operation: an admin locks an identity, a group or a certificate serial, for a
while or until removed, with a reason. ``POST /v1/admin/locks`` validates the body
completely before anything is stored (exactly one of identity/group/serial, ``until``
as RFC 3339 or a duration from now by the control plane's clock, a short printable
reason); the lock goes into the state store, which bumps its lock version, and gateways
polling that version reload their lock set and end the matching sessions. Every add and
remove writes an audit event naming the admin (``by``), the reason and the lock.
``GET /v1/admin/locks`` lists the active locks; ``DELETE /v1/admin/locks/<id>`` removes
one (an optional JSON body ``{"reason": ...}`` says why).

:func:`handle_locks` is called from ``ControlApi._authenticated`` after the caller
established that the identity is an admin; it answers None for paths that are not lock
routes, so the dispatcher can go on to its other routes.
"""

from __future__ import annotations

import json
import logging
import math
import re
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from l4proxy.audit import rfc3339
from l4proxy.durations import parse_duration
from l4proxy.http import HttpRequest, HttpResponse, json_error, json_response
from l4proxy.identity import Identity
from l4proxy.store import MAX_LOCK_REASON, Lock, LockKind, LockSpec, is_lock_id

if TYPE_CHECKING:
    from ._api import ControlApi

__all__ = ["LOCKS_PATH", "handle_locks", "lock_json", "parse_until"]

log = logging.getLogger("l4proxy.control")

#: the collection; a lock is ``LOCKS_PATH + "/" + id``
LOCKS_PATH: Final = "/v1/admin/locks"

_TARGETS: Final = tuple(str(kind) for kind in LockKind)
_BODY_FIELDS: Final = frozenset({*_TARGETS, "until", "reason"})
_DELETE_FIELDS: Final = frozenset({"reason"})
_EXPECTED: Final = ('expected {"identity" | "group" | "serial": value, "until": RFC 3339 time or '
                    'duration (optional), "reason": text (optional)}')

#: the latest ``until`` accepted (the end of year 9999, the last time RFC 3339 can write)
_MAX_UNTIL: Final = 253_402_300_799.0

_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})")


def parse_until(text: str, *, now: float) -> float:
    """When a lock ends, as Unix seconds.

    Args:
        text: an RFC 3339 time with a time zone (``2026-05-01T12:00:00Z``) or a duration
            from ``now`` (``90``, ``30m``, ``2h``, ``1d12h``).
        now: the current time (Unix seconds).

    Returns:
        A time after ``now``, no later than the end of year 9999.

    Raises:
        ValueError: neither form, or not in the future (the message says which).
    """
    text = text.strip()
    if _RFC3339.fullmatch(text):
        iso = text.upper().replace("Z", "+00:00")
        # fromisoformat takes at most 6 fraction digits
        iso = re.sub(r"(\.\d{6})\d+", r"\1", iso)
        try:
            until = datetime.fromisoformat(iso).timestamp()
        except (ValueError, OverflowError) as exc:
            raise ValueError(f"until is not a valid time: {text[:40]!r}") from exc
    else:
        try:
            seconds = parse_duration(text)
        except ValueError:
            raise ValueError(f"until must be an RFC 3339 time (2026-05-01T12:00:00Z) or a "
                             f"duration (30m, 2h, 7d), got {text[:40]!r}") from None
        until = now + seconds
    if not math.isfinite(until) or until > _MAX_UNTIL:
        raise ValueError("until is too far in the future (leave it out to lock until removed)")
    if until <= now:
        raise ValueError("until must be in the future")
    return until


def lock_json(lock: Lock) -> dict[str, Any]:
    """A lock as the API returns it (times in RFC 3339, ``until`` null for none)."""
    return {
        "id": lock.id,
        "kind": str(lock.kind),
        "value": lock.value,
        "until": None if lock.until is None else rfc3339(lock.until),
        "reason": lock.reason,
        "created_by": lock.created_by,
        "created_at": rfc3339(lock.created_at),
    }


def _bad(message: str) -> HttpResponse:
    return json_error(400, "bad_request", message)


def _json_body(req: HttpRequest, *, required: bool) -> tuple[dict[str, Any] | None, HttpResponse | None]:
    """The request's JSON object (None if there is no body and none is required)."""
    if not req.body.strip() and not required:
        return None, None
    ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        return None, json_error(415, "unsupported_media_type", "send application/json")
    try:
        body = json.loads(req.body)
    except (ValueError, UnicodeDecodeError):
        return None, _bad("body is not JSON")
    if not isinstance(body, dict):
        return None, _bad("body must be a JSON object")
    return body, None


def _spec(body: dict[str, Any], identity: Identity, now: float) -> LockSpec | str:
    """The lock the body asks for, or what is wrong with it."""
    unknown = sorted(set(body) - _BODY_FIELDS)
    if unknown:
        return f"unknown field {unknown[0]!r}; {_EXPECTED}"
    targets = [name for name in _TARGETS if name in body]
    if len(targets) != 1:
        return f"exactly one of identity, group, serial is required; {_EXPECTED}"
    (kind,) = targets
    value = body[kind]
    if not isinstance(value, str):
        return f"{kind} must be a string"
    until_text = body.get("until")
    reason = body.get("reason", "")
    if reason is None:
        reason = ""
    if not isinstance(reason, str):
        return "reason must be a string"
    if len(reason) > MAX_LOCK_REASON:
        return f"reason is longer than {MAX_LOCK_REASON} characters"
    until: float | None = None
    if until_text is not None:
        if not isinstance(until_text, str):
            return "until must be a string: an RFC 3339 time or a duration such as 2h"
        try:
            until = parse_until(until_text, now=now)
        except ValueError as exc:
            return str(exc)
    try:
        return LockSpec(kind=LockKind(kind), value=value, until=until, reason=reason,
                        created_by=identity.name)
    except ValueError as exc:
        return str(exc)


async def _add(api: ControlApi, req: HttpRequest, identity: Identity) -> HttpResponse:
    body, error = _json_body(req, required=True)
    if error is not None:
        return error
    assert body is not None
    now = api.clock()
    spec = _spec(body, identity, now)
    if isinstance(spec, str):
        return _bad(spec)
    lock = await api.store.add_lock(spec, now=now)
    api.audit.write("lock_added", {
        "by": identity.name, "reason": lock.reason, "lock_id": lock.id,
        "kind": str(lock.kind), "value": lock.value,
        "until": None if lock.until is None else rfc3339(lock.until),
        "client_address": req.peer[0],
    })
    log.info("lock %s added by %s: %s %s until %s", lock.id, identity.name, lock.kind, lock.value,
             "removed" if lock.until is None else rfc3339(lock.until))
    return json_response(201, lock_json(lock))


async def _list(api: ControlApi) -> HttpResponse:
    locks = await api.store.list_locks(now=api.clock())
    return json_response(200, {"locks": [lock_json(lock) for lock in locks]})


async def _remove(api: ControlApi, req: HttpRequest, identity: Identity, lock_id: str) -> HttpResponse:
    body, error = _json_body(req, required=False)
    if error is not None:
        return error
    reason = ""
    if body is not None:
        unknown = sorted(set(body) - _DELETE_FIELDS)
        if unknown:
            return _bad(f'unknown field {unknown[0]!r}; expected {{"reason": text (optional)}}')
        reason = body.get("reason", "")
        if reason is None:
            reason = ""
        if not isinstance(reason, str) or len(reason) > MAX_LOCK_REASON or not reason.isprintable():
            return _bad(f"reason must be printable text of at most {MAX_LOCK_REASON} characters")
    lock = await api.store.get_lock(lock_id)
    if lock is None or not await api.store.remove_lock(lock_id):
        return json_error(404, "not_found", "no such lock")
    api.audit.write("lock_removed", {
        "by": identity.name, "reason": reason, "lock_id": lock.id,
        "kind": str(lock.kind), "value": lock.value,
        "until": None if lock.until is None else rfc3339(lock.until),
        "lock_reason": lock.reason, "locked_by": lock.created_by,
        "client_address": req.peer[0],
    })
    log.info("lock %s removed by %s (%s %s)", lock.id, identity.name, lock.kind, lock.value)
    return json_response(200, lock_json(lock))


def _method_not_allowed(allow: str) -> HttpResponse:
    return json_error(405, "method_not_allowed", f"use {allow}", headers=(("allow", allow),))


async def handle_locks(api: ControlApi, req: HttpRequest, identity: Identity) -> HttpResponse | None:
    """Serve a lock route, or return None if ``req`` is not one.

    The caller has authenticated ``identity`` and checked that it is an admin.

    Routes:
        ``POST /v1/admin/locks``: 201 with the lock; 400 (bad body), 415 (not JSON).
        ``GET /v1/admin/locks``: 200 ``{"locks": [...]}``, the active locks, oldest first.
        ``DELETE /v1/admin/locks/<id>``: 200 with the removed lock; 404 if there is none.
        Other methods on these paths: 405 with ``Allow``.

    Raises:
        StoreError: the state store failed (the HTTP server answers 500).
    """
    if req.path == LOCKS_PATH:
        if req.method == "POST":
            return await _add(api, req, identity)
        if req.method == "GET":
            return await _list(api)
        return _method_not_allowed("GET, POST")
    prefix = LOCKS_PATH + "/"
    if not req.path.startswith(prefix):
        return None
    lock_id = req.path[len(prefix):]
    if req.method != "DELETE":
        return _method_not_allowed("DELETE")
    if not is_lock_id(lock_id):
        return json_error(404, "not_found", "no such lock")
    return await _remove(api, req, identity, lock_id)
