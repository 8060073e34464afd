"""router/serving/inbox.py: items are offered inline only while the task waits with nothing queued; a
declined item and every item after it reach the task in order; an inline error is the task's."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.router.serving.inbox import Inbox


def test_inline_only_while_the_task_waits_and_order_is_kept():
    async def run():
        inbox = Inbox()
        taken: list[int] = []
        inbox.inline = lambda item: item % 2 == 0 and not taken.append(item)  # takes even numbers

        inbox.put_nowait(0)  # nobody waits yet: queued, not offered
        assert await inbox.get() == 0 and taken == []

        getter = asyncio.ensure_future(inbox.get())
        await asyncio.sleep(0)  # the task waits now
        inbox.put_nowait(2)  # taken inline
        inbox.put_nowait(3)  # declined: queued, wakes the task
        inbox.put_nowait(4)  # something is queued before it: queued too, never overtakes 3
        assert taken == [2]
        assert await getter == 3
        assert await inbox.get() == 4
        assert inbox.qsize() == 0

    asyncio.run(run())


def test_an_inline_error_is_raised_by_the_next_get_before_later_items():
    async def run():
        inbox = Inbox()

        def take(item: int) -> bool:
            raise ValueError(f"cannot take {item}")

        inbox.inline = take
        getter = asyncio.ensure_future(inbox.get())
        await asyncio.sleep(0)
        inbox.put_nowait(1)  # the error is the task's
        inbox.put_nowait(2)  # inline is off after an error: queued
        with pytest.raises(ValueError, match="cannot take 1"):
            await getter
        assert await inbox.get() == 2

    asyncio.run(run())


def test_a_cancelled_get_leaves_no_waiter_behind():
    async def run():
        inbox = Inbox()
        taken: list[int] = []
        inbox.inline = lambda item: not taken.append(item)
        getter = asyncio.ensure_future(inbox.get())
        await asyncio.sleep(0)
        getter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await getter
        inbox.put_nowait(7)  # nobody waits: queued, not consumed by the inline path
        assert taken == [] and inbox.qsize() == 1

    asyncio.run(run())
