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
"""

from __future__ import annotations

import abc
import enum
import math
import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "TOKEN_RETRY_WINDOW",
    "ClaimKind",
    "RateDecision",
    "SchemaTooNew",
    "StateStore",
    "StoreCorrupt",
    "StoreError",
    "TokenClaim",
]

#: seconds after a certificate was issued during which the same token with the same CSR
#: public key gets that certificate again instead of being refused as a replay
TOKEN_RETRY_WINDOW: Final = 60.0

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


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


# --- the interface -------------------------------------------------------------------------


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
    def purge_expired(self, now: float) -> int:
        """Remove token records past their ``expires_at`` and rate-limit state that no
        longer affects any decision.

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


def check_rate(limit: int, per_seconds: float) -> tuple[int, float]:
    """``(limit, per_seconds)``, or ``ValueError`` unless ``limit >= 1`` and the window > 0."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
    per = check_time("per_seconds", per_seconds)
    if per <= 0:
        raise ValueError(f"per_seconds must be > 0, got {per_seconds!r}")
    return limit, per
