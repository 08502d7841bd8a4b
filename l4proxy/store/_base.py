"""The state store interface: every piece of state the gateway shares goes through it.

Theory of operation: the gateway keeps a little state that must outlive a request and,
later, be shared by several gateway hosts: the ID-token replay cache, rate-limit
counters, and (with later issues) the session index, pending approvals and locks. All of
it goes through :class:`StateStore`, a deliberately small, synchronous interface, so the
SQLite implementation used today can be replaced by a PostgreSQL one without touching
its callers. Rules every implementation follows:

- every method is atomic and thread-safe, and may block (trio code goes through
  :class:`~l4proxy.store.AsyncStateStore`, which runs the calls in a worker thread);
- time is always an argument (``now``, Unix seconds): there is no hidden clock, so the
  identity code's injected clock drives expiry and tests never sleep;
- results are frozen values (:class:`TokenClaim`, :class:`RateDecision`); failures are
  :class:`StoreError` or one of its subclasses, and bad arguments are ``ValueError``.

The single-use rule for ID tokens (issue 3, section 4) lives here, in
:meth:`StateStore.claim_token`: the first claim of a replay key wins; a retry of the same
token with the same CSR public key within :data:`TOKEN_RETRY_WINDOW` seconds of the
issuance gets the same certificate back (so a lost response does not strand a CI job);
everything else is a replay and is refused.

Locks (issue 4, section 6) live here too. An admin locks an identity, a group or a
certificate serial, until a time or until removed (:meth:`StateStore.add_lock`,
:meth:`StateStore.remove_lock`). The data path does not query the store per connection:
it holds a :class:`LockSet` (:meth:`StateStore.active_locks`), a frozen snapshot that
answers :meth:`LockSet.match` from memory, and polls :meth:`StateStore.locks_version`, a
counter bumped by every add and remove, reloading the set only when the counter moved.
A lock reaching its ``until`` does not bump the counter: pass ``now`` to
:meth:`LockSet.match` (or reload at :attr:`LockSet.next_expiry`) so it stops matching.
"""

from __future__ import annotations

import abc
import enum
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "MAX_LOCK_REASON",
    "MAX_LOCK_VALUE",
    "TOKEN_RETRY_WINDOW",
    "ClaimKind",
    "Lock",
    "LockKind",
    "LockSet",
    "LockSpec",
    "RateDecision",
    "SchemaTooNew",
    "SessionRecord",
    "StateStore",
    "StoreCorrupt",
    "StoreError",
    "TokenClaim",
    "is_lock_id",
    "normalize_lock_value",
]

#: seconds after a certificate was issued during which the same token with the same CSR
#: public key gets that certificate again instead of being refused as a replay
TOKEN_RETRY_WINDOW: Final = 60.0

#: the longest lock reason, in characters
MAX_LOCK_REASON: Final = 500

#: the longest locked identity or group name (and ``created_by``), in characters
MAX_LOCK_VALUE: Final = 1024

#: a certificate serial is at most 20 octets (RFC 5280, section 4.1.2.2)
_MAX_SERIAL: Final = 1 << 160

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

#: provider names, as ``l4proxy.identity.PROVIDER_NAME`` (repeated so that the store
#: does not import the identity package; a test checks they agree)
_PROVIDER_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")

#: hex digits (optionally ``0x``), or colon-separated octets as ``openssl`` prints them
_SERIAL_HEX = re.compile(r"(?:0[xX])?[0-9a-fA-F]+|[0-9a-fA-F]{1,2}(?::[0-9a-fA-F]{1,2})+")
_MAX_SERIAL_TEXT: Final = 80
_LOCK_ID = re.compile(r"[0-9a-f]{32}")


# --- errors --------------------------------------------------------------------------------


class StoreError(Exception):
    """The state store failed (cannot open, read or write it, or it was misused).

    Messages name the database file and the failing operation, never token material.
    """


class SchemaTooNew(StoreError):
    """The database was written by a newer l4proxy: its schema version is higher than
    this code knows. The store refuses to open it (and leaves it unchanged) rather than
    guess at a schema it does not understand.

    Attributes:
        found: the database's schema version.
        supported: the newest schema version this code knows.
    """

    def __init__(self, message: str, *, found: int, supported: int) -> None:
        super().__init__(message)
        self.found = found
        self.supported = supported


class StoreCorrupt(StoreError):
    """The file is not a database, is damaged, or is not an l4proxy state store."""


# --- results -------------------------------------------------------------------------------


class ClaimKind(enum.StrEnum):
    """The outcome of :meth:`StateStore.claim_token`."""

    #: first use of the token: go ahead and issue, then :meth:`StateStore.record_issued`
    FIRST = "first"
    #: a retry within the window with the same CSR key: answer with the stored certificate
    RETRY = "retry"
    #: a replay (or a retry too late, with another key, or before issuance): refuse
    REUSED = "reused"


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenClaim:
    """What claiming a token's replay key decided.

    Attributes:
        kind: see :class:`ClaimKind`.
        certificate_pem: the certificate issued for the first claim; set exactly when
            ``kind`` is :attr:`ClaimKind.RETRY`.
    """

    kind: ClaimKind
    certificate_pem: str | None = None

    def __post_init__(self) -> None:
        if (self.kind is ClaimKind.RETRY) != (self.certificate_pem is not None):
            raise ValueError("certificate_pem is set exactly for ClaimKind.RETRY")


@dataclass(frozen=True, slots=True, kw_only=True)
class RateDecision:
    """What :meth:`StateStore.rate_limit` decided.

    Attributes:
        allowed: whether the event may proceed (it was counted if so).
        retry_after: 0 when allowed; otherwise seconds (> 0) until a slot frees, for a
            ``Retry-After`` header (round it up).
    """

    allowed: bool
    retry_after: float = 0.0

    def __post_init__(self) -> None:
        if self.allowed and self.retry_after != 0.0:
            raise ValueError("an allowed decision has retry_after 0")
        if not self.allowed and not self.retry_after > 0.0:
            raise ValueError("a refused decision has retry_after > 0")


class LockKind(enum.StrEnum):
    """What a lock applies to."""

    #: one identity, ``<provider>/<subject>``
    IDENTITY = "identity"
    #: every identity whose certificate (or token) carries the group
    GROUP = "group"
    #: one certificate, by serial (lower-case hex, no leading zeros)
    SERIAL = "serial"


def normalize_lock_value(kind: LockKind | str, value: str) -> str:
    """The canonical form of a lock's value, as stored and matched.

    - identity: ``<provider>/<subject>`` (provider as in the configuration, subject
      non-empty), unchanged;
    - group: a non-empty name, unchanged;
    - serial: hex, optionally with ``0x`` or ``:`` separators as tools print it, of a
      positive number of at most 20 octets; returned lower-case without leading zeros
      (``"00:0A:FF"`` -> ``"aff"``), the form the audit log and enrollment answers use.

    Raises:
        ValueError: an unknown kind or a malformed value (the message says which).
    """
    kind = LockKind(kind)
    if not isinstance(value, str) or not value:
        raise ValueError(f"a {kind} lock needs a non-empty value")
    if kind is LockKind.SERIAL:
        text = value.strip()
        if len(text) > _MAX_SERIAL_TEXT or not _SERIAL_HEX.fullmatch(text):
            raise ValueError(f"serial must be hexadecimal, got {value[:80]!r}")
        number = int(text.removeprefix("0x").removeprefix("0X").replace(":", ""), 16)
        if not 0 < number < _MAX_SERIAL:
            raise ValueError("serial must be a positive number of at most 20 octets")
        return f"{number:x}"
    _check_text(f"{kind} name", value, MAX_LOCK_VALUE)
    if kind is LockKind.IDENTITY:
        provider, _, subject = value.partition("/")
        if not _PROVIDER_NAME.fullmatch(provider) or not subject:
            raise ValueError(f"identity must be PROVIDER/SUBJECT, got {value[:80]!r}")
    return value


def _check_text(name: str, value: str, limit: int, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    if not value and not empty:
        raise ValueError(f"{name} must not be empty")
    if len(value) > limit:
        raise ValueError(f"{name} is longer than {limit} characters")
    if not value.isprintable():
        raise ValueError(f"{name} must not contain control characters")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class LockSpec:
    """A lock to add (:meth:`StateStore.add_lock`); checked and normalised on creation.

    Attributes:
        kind: identity, group or serial.
        value: what is locked; normalised by :func:`normalize_lock_value`.
        until: when the lock ends (Unix seconds), or None: until removed.
        reason: why, for the audit log and ``l4proxy locks`` (at most
            :data:`MAX_LOCK_REASON` characters, no control characters; may be empty).
        created_by: who (the admin's identity name).

    Raises:
        ValueError: any field is malformed.
    """

    kind: LockKind
    value: str
    until: float | None = None
    reason: str = ""
    created_by: str

    def __post_init__(self) -> None:
        kind = LockKind(self.kind)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "value", normalize_lock_value(kind, self.value))
        if self.until is not None:
            object.__setattr__(self, "until", check_time("until", self.until))
        _check_text("reason", self.reason, MAX_LOCK_REASON, empty=True)
        _check_text("created_by", self.created_by, MAX_LOCK_VALUE)


@dataclass(frozen=True, slots=True, kw_only=True)
class Lock:
    """A stored lock.

    Attributes:
        id: 32 lower-case hex digits (a random UUID), the handle for removal.
        kind, value, until, reason, created_by: as in :class:`LockSpec`.
        created_at: when it was added (Unix seconds).
    """

    id: str
    kind: LockKind
    value: str
    until: float | None
    reason: str
    created_by: str
    created_at: float

    def is_active(self, now: float) -> bool:
        """Whether the lock applies at ``now`` (no ``until``, or ``until > now``)."""
        return self.until is None or self.until > now


def _lasts_longer(a: Lock, b: Lock) -> bool:
    """Whether ``a`` ends after ``b`` (no end is the latest)."""
    if a.until is None or b.until is None:
        return a.until is None and b.until is not None
    return a.until > b.until


@dataclass(frozen=True, slots=True, kw_only=True)
class LockSet:
    """A snapshot of the active locks, matched in memory (one dict lookup per name).

    Attributes:
        locks: the locks, as :meth:`StateStore.list_locks` orders them.
        version: the :meth:`StateStore.locks_version` the snapshot was read at; reload
            when the store's counter differs.
    """

    locks: tuple[Lock, ...] = ()
    version: int = 0
    _index: dict[tuple[LockKind, str], Lock] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[tuple[LockKind, str], Lock] = {}
        for lock in self.locks:
            key = (lock.kind, lock.value)
            known = index.get(key)
            # of several locks on one value, keep the one that lasts longest: if it no
            # longer applies, none of them does
            if known is None or _lasts_longer(lock, known):
                index[key] = lock
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        return len(self.locks)

    def __iter__(self) -> Iterator[Lock]:
        return iter(self.locks)

    @property
    def next_expiry(self) -> float | None:
        """The earliest ``until`` in the set (when a lock in it stops applying), or None."""
        return min((lock.until for lock in self.locks if lock.until is not None), default=None)

    def match(self, identity_name: str, groups: Iterable[str], serial: int, *,
              now: float | None = None) -> Lock | None:
        """The lock that applies to a connection or an enrollment, or None.

        Checked in order: the identity, each group, the certificate's serial.

        Args:
            identity_name: ``<provider>/<subject>``.
            groups: the identity's groups (from the certificate or the token).
            serial: the certificate's serial number; 0 when there is no certificate yet
                (enrollment): serial locks are always positive, so 0 never matches.
            now: if given, locks whose ``until`` has passed do not match (a cached set
                stays correct after a lock expires, which does not bump the version).

        Returns:
            A lock that applies, or None.
        """
        candidates: list[tuple[LockKind, str]] = [(LockKind.IDENTITY, identity_name)]
        candidates += [(LockKind.GROUP, group) for group in groups]
        if not isinstance(serial, bool) and isinstance(serial, int) and serial > 0:
            candidates.append((LockKind.SERIAL, f"{serial:x}"))
        for key in candidates:
            lock = self._index.get(key)
            if lock is not None and (now is None or lock.is_active(now)):
                return lock
        return None


# --- the interface -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionRecord:
    """One session in the session index (what auditors filter on; no secrets)."""

    session_id: str
    identity: str
    email: str | None = None
    groups: tuple[str, ...] = ()
    target: str
    client_address: str
    started_at: float
    #: the recording file (None when the session is not recorded)
    file: str | None = None
    ended_at: float | None = None
    end_reason: str | None = None
    bytes_to_gateway: int = 0
    bytes_to_client: int = 0
    requests: int = 0
    denials: int = 0
    approvals: int = 0
    masked: int = 0
    #: the recording trailer's chain head and signature: truncating a closed recording
    #: later is detectable against these
    trailer_head: bytes | None = None
    trailer_sig: bytes | None = None


class StateStore(abc.ABC):
    """Shared gateway state. Every method is atomic, thread-safe and may block.

    Use as a context manager, or call :meth:`close`. After ``close`` every method raises
    :class:`StoreError`.
    """

    @property
    @abc.abstractmethod
    def schema_version(self) -> int:
        """The schema version of the open store (never blocks)."""

    @abc.abstractmethod
    def claim_token(self, replay_key: str, *, binding: str, expires_at: float,
                    now: float) -> TokenClaim:
        """Claim a single-use ID token, atomically.

        - unknown key, or its record expired (``now > expires_at`` of the record): the
          key is recorded and the claim is :attr:`ClaimKind.FIRST`;
        - known key, same ``binding``, a certificate recorded with :meth:`record_issued`
          and ``now <= issued_at + TOKEN_RETRY_WINDOW``: :attr:`ClaimKind.RETRY` with
          that certificate;
        - anything else: :attr:`ClaimKind.REUSED`, and nothing changes.

        Of any number of concurrent claims of one fresh key (threads, processes), exactly
        one is FIRST. The record survives restarts until it expires.

        Args:
            replay_key: the token's replay key (``jti:…`` or ``sha256:…``), never the token.
            binding: lower-case SHA-256 hex of the CSR's public key.
            expires_at: the last moment (Unix seconds) the verifier could still accept the
                token, i.e. its ``exp`` *plus the verifier's leeway*; the record is kept at
                least until then.
            now: the current time (Unix seconds).

        Returns:
            The decision.

        Raises:
            ValueError: an empty key, a malformed binding, a non-finite time, or
                ``expires_at < now`` (the claim could not be remembered).
            StoreError: the store failed or is closed.
        """

    @abc.abstractmethod
    def record_issued(self, replay_key: str, *, certificate_pem: str, now: float) -> None:
        """Attach the certificate minted for a FIRST claim, for the retry rule.

        Args:
            replay_key: a key that :meth:`claim_token` answered FIRST.
            certificate_pem: the certificate sent to the client.
            now: the issuance time; retries are honoured until ``now + TOKEN_RETRY_WINDOW``.

        Raises:
            ValueError: an empty key or certificate, or a non-finite time.
            StoreError: the key has no live claim, a certificate is already recorded for
                it, or the store failed or is closed.
        """

    @abc.abstractmethod
    def rate_limit(self, key: str, *, limit: int, per_seconds: float, now: float) -> RateDecision:
        """Count one event for ``key`` if fewer than ``limit`` happened in the window.

        Args:
            key: what is limited, e.g. ``identity:corp/alice`` or ``addr:127.0.0.1``.
            limit: events allowed per window (>= 1).
            per_seconds: the window's length (> 0).
            now: the current time (Unix seconds).

        Returns:
            Allowed (and counted), or refused (not counted) with ``retry_after`` > 0.

        Raises:
            ValueError: an empty key, ``limit < 1``, ``per_seconds <= 0``, a non-finite time.
            StoreError: the store failed or is closed.
        """

    @abc.abstractmethod
    def index_session_start(self, record: SessionRecord) -> None:
        """Add a session to the index (``ended_at`` None: open).

        Raises:
            StoreError: the store failed or the session id exists.
        """

    @abc.abstractmethod
    def index_session_end(self, session_id: str, *, ended_at: float, end_reason: str,
                          bytes_to_gateway: int, bytes_to_client: int, requests: int = 0,
                          denials: int = 0, approvals: int = 0, masked: int = 0,
                          trailer_head: bytes | None = None,
                          trailer_sig: bytes | None = None) -> None:
        """Close a session's index row with its totals and recording trailer."""

    @abc.abstractmethod
    def open_sessions(self) -> list[SessionRecord]:
        """Sessions the index still shows open (after a crash: to seal)."""

    @abc.abstractmethod
    def get_session(self, session_id: str) -> SessionRecord | None:
        """One session of the index."""

    @abc.abstractmethod
    def add_lock(self, lock: LockSpec, *, now: float) -> Lock:
        """Store a lock and bump :meth:`locks_version`, atomically.

        Args:
            lock: what to lock (already checked and normalised).
            now: the current time (Unix seconds), recorded as ``created_at``.

        Returns:
            The stored lock, with a fresh random id.

        Raises:
            ValueError: not a :class:`LockSpec`, a non-finite time, or ``until <= now``.
            StoreError: the store failed or is closed.
        """

    @abc.abstractmethod
    def list_locks(self, *, now: float) -> list[Lock]:
        """The locks active at ``now`` (no ``until``, or ``until > now``), oldest first.

        Raises:
            ValueError: a non-finite time.
            StoreError: the store failed or is closed.
        """

    @abc.abstractmethod
    def get_lock(self, lock_id: str) -> Lock | None:
        """The lock with this id, active or expired (until purged), or None.

        Raises:
            StoreError: the store failed or is closed.
        """

    @abc.abstractmethod
    def remove_lock(self, lock_id: str) -> bool:
        """Remove a lock; bump :meth:`locks_version` if one was removed.

        Returns:
            Whether a lock with this id existed (an unknown or malformed id is False).

        Raises:
            StoreError: the store failed or is closed.
        """

    @abc.abstractmethod
    def active_locks(self, *, now: float) -> LockSet:
        """The locks active at ``now`` and the version they belong to, read together.

        Raises:
            ValueError: a non-finite time.
            StoreError: the store failed or is closed.
        """

    @abc.abstractmethod
    def locks_version(self) -> int:
        """A counter bumped by every :meth:`add_lock` and successful :meth:`remove_lock`
        (never by a lock expiring); cheap enough to poll every second. It only grows, and
        survives restarts.

        Raises:
            StoreError: the store failed or is closed.
        """

    @abc.abstractmethod
    def purge_expired(self, now: float) -> int:
        """Remove token records past their ``expires_at``, locks past their ``until``, and
        rate-limit state that no longer affects any decision.

        Returns:
            The number of records removed.

        Raises:
            ValueError: a non-finite time.
            StoreError: the store failed or is closed.
        """

    @abc.abstractmethod
    def check_writable(self) -> None:
        """Prove the store can commit a write now (for ``/readyz``).

        Raises:
            StoreError: it cannot (closed, read-only, disk full, file removed, locked …).
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store. Idempotent."""

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- argument checks shared by the implementations -----------------------------------------


def check_time(name: str, value: float) -> float:
    """``value`` as a float, or ``ValueError`` if it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of Unix seconds, got {value!r}")
    return float(value)


def check_key(name: str, value: str) -> str:
    """``value``, or ``ValueError`` if it is not a non-empty string."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


def check_binding(binding: str) -> str:
    """``binding``, or ``ValueError`` if it is not lower-case SHA-256 hex."""
    if not isinstance(binding, str) or not _SHA256_HEX.fullmatch(binding):
        raise ValueError("binding must be the lower-case SHA-256 hex of the CSR's public key")
    return binding


def is_lock_id(value: object) -> bool:
    """Whether ``value`` has the form of a lock id (32 lower-case hex digits)."""
    return isinstance(value, str) and _LOCK_ID.fullmatch(value) is not None


def check_rate(limit: int, per_seconds: float) -> tuple[int, float]:
    """``(limit, per_seconds)``, or ``ValueError`` unless ``limit >= 1`` and the window > 0."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
    per = check_time("per_seconds", per_seconds)
    if per <= 0:
        raise ValueError(f"per_seconds must be > 0, got {per_seconds!r}")
    return limit, per
