"""The gateway's state store: the token replay cache and rate limits today; the session
index, approvals and locks with later issues.

:class:`StateStore` is the one small interface all shared state goes through (blocking,
thread-safe, time passed in); :class:`SqliteStateStore` implements it in one SQLite file
under ``state_dir``; :class:`AsyncStateStore` runs it off the trio event loop.
"""

from ._async import AsyncStateStore
from ._base import (
    TOKEN_RETRY_WINDOW,
    ClaimKind,
    RateDecision,
    SchemaTooNew,
    StateStore,
    StoreCorrupt,
    StoreError,
    TokenClaim,
)
from ._sqlite import MIGRATIONS, SCHEMA_VERSION, STATE_FILE_NAME, SqliteStateStore

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "STATE_FILE_NAME",
    "TOKEN_RETRY_WINDOW",
    "AsyncStateStore",
    "ClaimKind",
    "RateDecision",
    "SchemaTooNew",
    "SqliteStateStore",
    "StateStore",
    "StoreCorrupt",
    "StoreError",
    "TokenClaim",
]
