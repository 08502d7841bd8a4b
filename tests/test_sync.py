"""``l4proxy._sync.SendLock``: mutual exclusion that costs no scheduler pass when free."""

from __future__ import annotations

import pytest
import trio

from l4proxy._sync import SendLock


async def test_a_free_lock_is_taken_without_yielding_to_the_scheduler() -> None:
    lock = SendLock()
    order: list[str] = []

    async def other() -> None:
        order.append("other")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)  # runnable: any scheduler pass would run it first
        async with lock:
            assert lock.locked()
            order.append("locked")
    assert order == ["locked", "other"]
    assert not lock.locked()


async def test_a_cancelled_task_does_not_take_the_lock() -> None:
    lock = SendLock()
    with trio.CancelScope() as scope:
        scope.cancel()
        async with lock:
            pytest.fail("a cancelled task took the lock")
    assert scope.cancelled_caught and not lock.locked()


async def test_holders_never_overlap_and_every_waiter_gets_its_turn() -> None:
    lock = SendLock()
    inside: list[int] = []
    order: list[int] = []

    async def worker(n: int) -> None:
        for _ in range(3):
            async with lock:
                inside.append(n)
                assert len(inside) == 1  # nobody else holds it
                await trio.sleep(0.001)  # yield while holding it
                order.append(n)
                inside.remove(n)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for n in range(5):
                nursery.start_soon(worker, n)
    assert sorted(order) == sorted(list(range(5)) * 3)


async def test_a_cancelled_waiter_leaves_the_lock_usable() -> None:
    lock = SendLock()
    async with lock:
        with trio.move_on_after(0.05) as scope:
            async with lock:  # parked, then cancelled
                pytest.fail("took a held lock")
        assert scope.cancelled_caught
    with trio.fail_after(1):
        async with lock:
            assert lock.locked()


async def test_the_lock_is_released_when_the_body_raises() -> None:
    lock = SendLock()
    with pytest.raises(ValueError):
        async with lock:
            raise ValueError("boom")
    assert not lock.locked()
