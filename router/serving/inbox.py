"""The queue one attempt's items arrive in (outputs, failures, the deadline), with inline delivery.

    inbox = Inbox()
    inbox.inline = take                # optional: take(item) -> bool, True when it consumed item
    inbox.put_nowait(item)             # the worker connection, the prefill side, the deadline
    item = await inbox.get()           # the request's task

Why inline: a token that goes through a queue wakes the request's task, which resumes the chain of
async generators from dispatch to the HTTP handler and writes one SSE event: per token, a task
switch and a handful of generator resumptions cost more than the token's own work (detokenize,
encode, write). Offered inline, an ordinary output is consumed right where it arrives, in the
connection's delivery turn, by plain function calls down the same layers (dispatch, the text
generator, the handler's writer), each of which says whether it can take it now.

Rules:
- an item is offered inline only while the task waits in `get()` with nothing queued before it:
  then every layer above is suspended at that `get()`, so nothing it does can interleave with the
  inline path, and items stay in order (once one is queued, the ones after it queue too, until
  the task has taken them all);
- `take` declines (returns False) with no side effect, and the item is queued for the task;
- an exception raised by `take` is the request's: it is raised by the task's next `get()`
  (nothing is lost silently, and the connection that delivered the item is not disturbed).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class Inbox:
    def __init__(self) -> None:
        self.inline: Callable[[Any], bool] | None = None
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future | None = None  # set while the task waits in get()
        self._error: BaseException | None = None

    def put_nowait(self, item: Any) -> None:
        if self._waiter is not None and self.inline is not None and not self._items:
            try:
                if self.inline(item):
                    return
            except Exception as exc:  # raised in the request's task instead
                logger.debug("inline delivery failed", exc_info=True)
                self.inline = None
                self._error = exc
                self._wake()
                return
        self._items.append(item)
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while True:
            if self._error is not None:  # before what was queued after the failed item
                error, self._error = self._error, None
                raise error
            if self._items:
                return self._items.popleft()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def qsize(self) -> int:
        return len(self._items)
