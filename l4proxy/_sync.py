"""Synchronisation primitives for the data path.

:class:`SendLock` is a mutex for the code that writes one stream: it keeps the order in
which bytes were produced (by a codec or an ``SSLObject``) the order in which they are
sent. ``trio.Lock`` yields to the scheduler on every acquire even when it is free; on the
data path that is one more scheduler pass per relayed frame, for a lock that is almost
never contended. This one costs nothing when free and parks the task when it is not. It
does not yield to the scheduler (callers send right after taking it, and the send does),
but it is a cancel point: a cancelled task never takes it, so nothing is encoded, and
shown to a recorder, that will not be sent.
"""

from __future__ import annotations

import trio

__all__ = ["SendLock"]


class SendLock:
    """``async with lock:`` -- mutual exclusion without a checkpoint when uncontended.
    Waiters are woken in turn; a task that arrives while the lock is free may take it
    before a woken waiter runs (no FIFO promise)."""

    __slots__ = ("_held", "_waiters")

    def __init__(self) -> None:
        self._held = False
        self._waiters = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        return self._held

    async def __aenter__(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()  # no scheduler pass unless cancelled
        while self._held:
            await self._waiters.park()
        self._held = True

    async def __aexit__(self, *exc_info: object) -> None:
        self._held = False
        self._waiters.unpark()
