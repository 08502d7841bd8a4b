"""The admin commands' client side: ``l4proxy lock``, ``l4proxy locks``, ``l4proxy unlock``.

Theory of operation: an admin is whoever the control plane says is one: the commands
use the profile ``l4proxy login`` wrote (``profile.toml`` for ``control_url``, and
``client.crt``, ``client.key``, ``ca.crt``) to call the control API over mTLS, and the
server decides from the groups in the certificate. Nothing is decided here beyond
argument shape: ``until`` is sent as given (the server resolves a duration by its own
clock), and the server's refusal message is shown as it is. Every call has a timeout.
Failures are :class:`AdminError` with the exit code the command should use: 1 local
problem (no profile, unreadable or expired certificate, bad arguments), 2 refused or
failed by the server (its message included), 7 cannot connect (including TLS failures).
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlsplit

from cryptography import x509

__all__ = ["AdminError", "format_locks", "list_locks", "lock", "unlock"]

#: the largest answer read from the control API
MAX_RESPONSE: Final = 4 << 20

#: seconds to wait for the control API (connect, and each read)
DEFAULT_TIMEOUT: Final = 30.0

_LOCKS: Final = "/v1/admin/locks"


class AdminError(Exception):
    """An admin command failed.

    Attributes:
        exit_code: 1 local problem, 2 refused by the server, 7 cannot connect.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True, kw_only=True)
class _Profile:
    control_url: str
    cert: Path
    key: Path
    ca: Path


def _load_profile(profile_dir: Path, *, now: dt.datetime) -> _Profile:
    base = Path(profile_dir)
    try:
        doc = tomllib.loads((base / "profile.toml").read_text("utf-8"))
    except OSError as exc:
        raise AdminError(f"no profile in {base} ({exc.strerror or exc}): run `l4proxy login` "
                         "first") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise AdminError(f"{base / 'profile.toml'} is not valid TOML") from None
    url = doc.get("control_url")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme != "https" or not parts.hostname:
        raise AdminError(f"{base / 'profile.toml'} has no https:// control_url: run "
                         "`l4proxy login` again")
    profile = _Profile(control_url=f"https://{parts.netloc}", cert=base / "client.crt",
                       key=base / "client.key", ca=base / "ca.crt")
    for path in (profile.cert, profile.key, profile.ca):
        if not path.is_file():
            raise AdminError(f"{path} is missing: run `l4proxy login` again")
    try:
        cert = x509.load_pem_x509_certificate(profile.cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise AdminError(f"cannot read the certificate {profile.cert}: {exc}") from None
    if cert.not_valid_after_utc <= now:
        raise AdminError(f"the certificate in {base} expired at "
                         f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}: run `l4proxy login` again")
    return profile


def _context(profile: _Profile) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=str(profile.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(profile.cert, profile.key)
    except (OSError, ssl.SSLError) as exc:
        raise AdminError(f"cannot use the certificate files in {profile.cert.parent}: {exc}") from None
    return ctx


def _server_message(exc: urllib.error.HTTPError) -> str:
    try:
        message = json.loads(exc.read(MAX_RESPONSE))["error"]["message"]
        if isinstance(message, str):
            return message
    except Exception:
        pass
    return exc.reason if isinstance(exc.reason, str) else ""


def _call(profile_dir: Path, method: str, path: str, body: Mapping[str, Any] | None = None, *,
          timeout: float) -> Any:
    """One request to the control API; the decoded JSON answer."""
    profile = _load_profile(profile_dir, now=dt.datetime.now(dt.UTC))
    ctx = _context(profile)
    data = None if body is None else json.dumps(body).encode()
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(profile.control_url + path, data=data, method=method,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=timeout) as resp:
            raw = resp.read(MAX_RESPONSE + 1)
    except urllib.error.HTTPError as exc:
        with exc:
            message = _server_message(exc)
        raise AdminError(f"refused: HTTP {exc.code}: {message}", 2) from None
    except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise AdminError(f"cannot reach {profile.control_url}: {reason}", 7) from None
    if len(raw) > MAX_RESPONSE:
        raise AdminError("the control API's answer is too large", 2)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise AdminError("the control API's answer is not JSON", 2) from None


def _lock_object(answer: Any) -> dict[str, Any]:
    if not isinstance(answer, dict) or not isinstance(answer.get("id"), str):
        raise AdminError("malformed answer from the control API (expected a lock)", 2)
    return answer


def lock(profile_dir: Path, *, identity: str | None = None, group: str | None = None,
         serial: str | None = None, until: str | None = None, reason: str | None = None,
         timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Lock an identity, a group or a certificate serial (exactly one).

    Args:
        profile_dir: an ``l4proxy login`` directory of an admin.
        identity: ``PROVIDER/SUBJECT``.
        group: a group name.
        serial: a certificate serial in hex.
        until: an RFC 3339 time or a duration (``2h``) from now; None: until unlocked.
        reason: why (at most 500 characters; recorded in the audit log).
        timeout: seconds to wait for the control API.

    Returns:
        The lock as the server stored it: ``id kind value until reason created_by
        created_at``.

    Raises:
        AdminError: with the exit code to use.
    """
    targets = {name: value for name, value in
               (("identity", identity), ("group", group), ("serial", serial)) if value is not None}
    if len(targets) != 1:
        raise AdminError("give exactly one of --identity, --group, --serial")
    body: dict[str, Any] = dict(targets)
    if until is not None:
        body["until"] = until
    if reason is not None:
        body["reason"] = reason
    return _lock_object(_call(profile_dir, "POST", _LOCKS, body, timeout=timeout))


def list_locks(profile_dir: Path, *, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
    """The active locks, oldest first (each as :func:`lock` returns it).

    Raises:
        AdminError: with the exit code to use.
    """
    answer = _call(profile_dir, "GET", _LOCKS, timeout=timeout)
    locks = answer.get("locks") if isinstance(answer, dict) else None
    if not isinstance(locks, list):
        raise AdminError("malformed answer from the control API (expected a list of locks)", 2)
    return [_lock_object(item) for item in locks]


def unlock(profile_dir: Path, lock_id: str, *, reason: str | None = None,
           timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Remove a lock.

    Args:
        profile_dir: an ``l4proxy login`` directory of an admin.
        lock_id: the lock's id (from :func:`lock` or :func:`list_locks`).
        reason: why (recorded in the audit log).
        timeout: seconds to wait for the control API.

    Returns:
        The removed lock.

    Raises:
        AdminError: with the exit code to use (2 with "no such lock" for an unknown id).
    """
    if not lock_id:
        raise AdminError("a lock id is required")
    body = None if reason is None else {"reason": reason}
    return _lock_object(_call(profile_dir, "DELETE", f"{_LOCKS}/{quote(lock_id, safe='')}", body,
                              timeout=timeout))


def _cell(value: Any) -> str:
    text = "-" if value is None or value == "" else str(value)
    return "".join(c if c.isprintable() else "?" for c in text)


def format_locks(locks: Iterable[Mapping[str, Any]]) -> str:
    """The locks as a table for people (no trailing newline).

    Columns: ID, KIND, VALUE, UNTIL (``-``: until unlocked), BY, SINCE, REASON. Control
    characters in any field are shown as ``?``.
    """
    header = ("ID", "KIND", "VALUE", "UNTIL", "BY", "SINCE", "REASON")
    rows = [tuple(_cell(item.get(name)) for name in
                  ("id", "kind", "value", "until", "created_by", "created_at", "reason"))
            for item in locks]
    if not rows:
        return "no active locks"
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]
    lines = ["  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)),
                        row[-1]]).rstrip()
             for row in (header, *rows)]
    return "\n".join(lines)
