"""The state store for trio code: the same methods, awaited, run in a worker thread.

Theory of operation: :class:`StateStore` methods block (disk, fsync, file locks), so the
event loop must never call them directly. :class:`AsyncStateStore` runs each call with
``trio.to_thread.run_sync`` under its own ``trio.CapacityLimiter`` (one thread by
default: the SQLite store serializes its calls on a lock anyway, so more threads would
only wait on it while holding slots of trio's shared thread limiter). Calls are not
abandoned on cancellation: a cancelled caller waits for its database call to finish
(bounded by the store's busy timeout) and then sees ``Cancelled``, so a transaction
never outlives the task that started it and ``aclose`` never races a running call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from ._base import Lock, LockSet, LockSpec, RateDecision, SessionRecord, StateStore, TokenClaim

__all__ = ["AsyncStateStore"]

_T = TypeVar("_T")


class AsyncStateStore:
    """Async access to a :class:`StateStore`; see its methods for the contracts.

    Args:
        store: the blocking store; :meth:`aclose` closes it.
        limiter: the worker threads the calls may use; default: a limiter of one.
    """

    def __init__(self, store: StateStore, *, limiter: trio.CapacityLimiter | None = None) -> None:
        self._store = store
        self._limiter = trio.CapacityLimiter(1) if limiter is None else limiter
        #: bumped after every lock added or removed through this object: code sharing it
        #: (the gateway beside the control API) sees its own process's lock changes
        #: without a query; other processes' changes show in :meth:`locks_version`
        self.lock_changes = 0

    @property
    def store(self) -> StateStore:
        """The wrapped blocking store (for code that already runs in a thread)."""
        return self._store

    @property
    def schema_version(self) -> int:
        """See :attr:`StateStore.schema_version` (never blocks)."""
        return self._store.schema_version

    async def _run(self, call: Callable[[], _T]) -> _T:
        return await trio.to_thread.run_sync(call, limiter=self._limiter)

    async def claim_token(self, replay_key: str, *, binding: str, expires_at: float,
                          now: float) -> TokenClaim:
        """See :meth:`StateStore.claim_token`."""
        return await self._run(functools.partial(
            self._store.claim_token, replay_key, binding=binding, expires_at=expires_at, now=now))

    async def record_issued(self, replay_key: str, *, certificate_pem: str, now: float) -> None:
        """See :meth:`StateStore.record_issued`."""
        await self._run(functools.partial(
            self._store.record_issued, replay_key, certificate_pem=certificate_pem, now=now))

    async def rate_limit(self, key: str, *, limit: int, per_seconds: float,
                         now: float) -> RateDecision:
        """See :meth:`StateStore.rate_limit`."""
        return await self._run(functools.partial(
            self._store.rate_limit, key, limit=limit, per_seconds=per_seconds, now=now))

    async def index_session_start(self, record: SessionRecord) -> None:
        """See :meth:`StateStore.index_session_start`."""
        await self._run(functools.partial(self._store.index_session_start, record))

    async def index_session_end(self, session_id: str, **totals: Any) -> None:
        """See :meth:`StateStore.index_session_end`."""
        await self._run(functools.partial(self._store.index_session_end, session_id, **totals))

    async def open_sessions(self) -> list[SessionRecord]:
        """See :meth:`StateStore.open_sessions`."""
        return await self._run(self._store.open_sessions)

    async def get_session(self, session_id: str) -> SessionRecord | None:
        """See :meth:`StateStore.get_session`."""
        return await self._run(functools.partial(self._store.get_session, session_id))

    async def add_lock(self, lock: LockSpec, *, now: float) -> Lock:
        """See :meth:`StateStore.add_lock`."""
        try:
            return await self._run(functools.partial(self._store.add_lock, lock, now=now))
        finally:
            self.lock_changes += 1  # also when the outcome is unknown (e.g. cancelled)

    async def list_locks(self, *, now: float) -> list[Lock]:
        """See :meth:`StateStore.list_locks`."""
        return await self._run(functools.partial(self._store.list_locks, now=now))

    async def get_lock(self, lock_id: str) -> Lock | None:
        """See :meth:`StateStore.get_lock`."""
        return await self._run(functools.partial(self._store.get_lock, lock_id))

    async def remove_lock(self, lock_id: str) -> bool:
        """See :meth:`StateStore.remove_lock`."""
        try:
            return await self._run(functools.partial(self._store.remove_lock, lock_id))
        finally:
            self.lock_changes += 1

    async def active_locks(self, *, now: float) -> LockSet:
        """See :meth:`StateStore.active_locks`."""
        return await self._run(functools.partial(self._store.active_locks, now=now))

    async def locks_version(self) -> int:
        """See :meth:`StateStore.locks_version`."""
        return await self._run(self._store.locks_version)

    async def purge_expired(self, now: float) -> int:
        """See :meth:`StateStore.purge_expired`."""
        return await self._run(functools.partial(self._store.purge_expired, now))

    async def check_writable(self) -> None:
        """See :meth:`StateStore.check_writable`."""
        await self._run(self._store.check_writable)

    async def aclose(self) -> None:
        """Close the wrapped store (after any running call). Idempotent."""
        with trio.CancelScope(shield=True):
            await self._run(self._store.close)

    async def __aenter__(self) -> AsyncStateStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
