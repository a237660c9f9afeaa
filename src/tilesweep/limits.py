"""A concurrency limit that adapts to the server: AIMD, as TCP does.

:class:`AdaptiveLimit` is an asyncio semaphore whose size moves. It starts at its ceiling
(the ``--concurrency`` asked for). Every throttling answer (429, or 503: "slow down")
multiplies it by ``decrease`` (0.7), at most once per ``cooldown_s`` so that one burst of
429s counts once; every success adds ``1 / limit``, so a full window of successes adds
one slot. The fetch then settles just under the rate the server tolerates instead of
spending its time in Retry-After sleeps, and climbs back when the server allows more.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class AdaptiveLimit:
    """At most ``limit`` holders at once, ``floor <= limit <= ceiling``. One event loop."""

    def __init__(self, ceiling: int, floor: int = 1, decrease: float = 0.7, cooldown_s: float = 1.0) -> None:
        if not (1 <= floor <= ceiling):
            raise ValueError(f"need 1 <= floor ({floor}) <= ceiling ({ceiling})")
        if not 0 < decrease < 1:
            raise ValueError(f"decrease {decrease} must be in (0, 1)")
        self.ceiling, self.floor = ceiling, floor
        self.decrease, self.cooldown_s = decrease, cooldown_s
        self.limit = float(ceiling)
        self.in_use = 0
        self.throttles = 0  # throttling answers seen
        self.cuts = 0  # times the limit was cut
        self._last_cut = -1e18
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if not self._waiters and self.in_use < int(self.limit):
            self.in_use += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted, then cancelled before it could use the slot
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def release(self) -> None:
        self.in_use -= 1
        self._wake()

    def on_success(self) -> None:
        """One request went through: grow by 1/limit (one slot per window of successes)."""
        if self.limit < self.ceiling:
            self.limit = min(float(self.ceiling), self.limit + 1.0 / self.limit)
            self._wake()

    def on_throttle(self, now: float | None = None) -> None:
        """The server asked to slow down (429, 503): cut the limit, once per cooldown."""
        self.throttles += 1
        now = time.monotonic() if now is None else now
        if now - self._last_cut >= self.cooldown_s:
            self._last_cut = now
            self.limit = max(float(self.floor), self.limit * self.decrease)
            self.cuts += 1

    def _wake(self) -> None:
        while self._waiters and self.in_use < int(self.limit):
            fut = self._waiters.popleft()
            if not fut.done():
                self.in_use += 1
                fut.set_result(None)
