"""The gateway's state store: the token replay cache, rate limits and locks today; the
session index and approvals with later issues.

:class:`StateStore` is the one small interface all shared state goes through (blocking,
thread-safe, time passed in); :class:`SqliteStateStore` implements it in one SQLite file
under ``state_dir``; :class:`AsyncStateStore` runs it off the trio event loop.
"""

from ._async import AsyncStateStore
from ._base import (
    MAX_LOCK_REASON,
    MAX_LOCK_VALUE,
    TOKEN_RETRY_WINDOW,
    ClaimKind,
    Lock,
    LockKind,
    LockSet,
    LockSpec,
    RateDecision,
    SchemaTooNew,
    SessionRecord,
    StateStore,
    StoreCorrupt,
    StoreError,
    TokenClaim,
    is_lock_id,
    normalize_lock_value,
)
from ._sqlite import MIGRATIONS, SCHEMA_VERSION, STATE_FILE_NAME, SqliteStateStore

__all__ = [
    "MAX_LOCK_REASON",
    "MAX_LOCK_VALUE",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "STATE_FILE_NAME",
    "TOKEN_RETRY_WINDOW",
    "AsyncStateStore",
    "ClaimKind",
    "Lock",
    "LockKind",
    "LockSet",
    "LockSpec",
    "RateDecision",
    "SchemaTooNew",
    "SessionRecord",
    "SqliteStateStore",
    "StateStore",
    "StoreCorrupt",
    "StoreError",
    "TokenClaim",
    "is_lock_id",
    "normalize_lock_value",
]
