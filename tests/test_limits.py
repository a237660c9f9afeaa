"""AdaptiveLimit: AIMD concurrency, tested on a real event loop (no mocks)."""

import asyncio

import pytest

from tilesweep.limits import AdaptiveLimit


def test_cut_on_throttle_once_per_cooldown_and_grow_back_on_success():
    lim = AdaptiveLimit(100, floor=2, decrease=0.5, cooldown_s=1.0)
    lim.on_throttle(now=10.0)
    assert lim.limit == 50 and lim.cuts == 1
    lim.on_throttle(now=10.5)  # same burst: not cut again
    assert lim.limit == 50 and lim.cuts == 1 and lim.throttles == 2
    for t in (11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0):
        lim.on_throttle(now=t)
    assert lim.limit == 2  # never below the floor
    for _ in range(10_000):
        lim.on_success()
    assert lim.limit == 100  # back to the ceiling, never above it
    # one window of successes adds about one slot
    lim.on_throttle(now=100.0)
    before = lim.limit
    for _ in range(int(before)):
        lim.on_success()
    assert before + 0.9 < lim.limit < before + 1.1


def test_holders_never_exceed_the_limit_and_waiters_wake_when_it_grows():
    async def main():
        lim = AdaptiveLimit(8, cooldown_s=0.0)
        lim.on_throttle()  # 8 -> 5.6: five slots
        held = 0
        peak = 0

        async def one():
            nonlocal held, peak
            await lim.acquire()
            held += 1
            peak = max(peak, held)
            await asyncio.sleep(0.01)
            held -= 1
            lim.release()
            lim.on_success()

        await asyncio.gather(*(one() for _ in range(200)))
        assert peak <= 8 and lim.in_use == 0
        assert lim.limit == 8  # grew back to the ceiling while they ran

    asyncio.run(main())


def test_a_cancelled_waiter_gives_its_slot_back():
    async def main():
        lim = AdaptiveLimit(1)
        await lim.acquire()
        waiter = asyncio.ensure_future(lim.acquire())
        await asyncio.sleep(0)
        lim.release()  # granted to the waiter...
        waiter.cancel()  # ...which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert lim.in_use == 0
        await asyncio.wait_for(lim.acquire(), 1)  # the slot is free again

    asyncio.run(main())


def test_bad_settings():
    with pytest.raises(ValueError):
        AdaptiveLimit(4, floor=5)
    with pytest.raises(ValueError):
        AdaptiveLimit(4, decrease=1.0)
