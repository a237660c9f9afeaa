"""The fetcher over real HTTP on loopback: the imagery simulator (faults, coverage, rate
limits) and, where a test needs to count concurrent requests or serve thousands of tiles
fast, a small aiohttp server of its own. No mocks of tilesweep code."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import time
from collections import Counter

import pytest
from aiohttp import web

from tilesweep import tiles as T
from tilesweep.errors import UsageError
from tilesweep.fetch import (
    FetchSettings,
    Fetcher,
    SourceError,
    fetch_tiles,
    image_format,
    parse_retry_after,
)
from tilesweep.sim import Faults, World, sim_server
from tilesweep.sources import parse_source

pytestmark = pytest.mark.timeout(120)

WORLD = World(0)
ORIGIN = T.Tile(18, 137316, 91872)
AREA = [T.Tile(18, ORIGIN.x + i, ORIGIN.y + j) for j in range(4) for i in range(4)]  # 16 tiles
FAST = FetchSettings(backoff_base_s=0.005, backoff_max_s=0.05)
JPEG = WORLD.render(ORIGIN)
expected = functools.cache(WORLD.render)  # what the simulator serves for a tile (256 px JPEG)


def run(coro):
    return asyncio.run(coro)


async def collect(fetcher: Fetcher, tiles) -> list:
    return [r async for r in fetcher.fetch_many(tiles)]


# --- a small server of our own -------------------------------------------------------------


class Counting:
    """An aiohttp app answering every path with ``status`` and ``body`` after ``delay_s``,
    counting requests and the most that were in its handler at once."""

    def __init__(self, status: int = 200, body: bytes = JPEG, delay_s: float = 0.0, ctype: str = "image/jpeg"):
        self.status, self.body, self.delay_s, self.ctype = status, body, delay_s, ctype
        self.requests = 0
        self.now = 0
        self.max = 0
        self.paths: list[str] = []
        self.headers: list[dict] = []
        self.then: tuple[int, int] | None = None  # (after n requests, answer this status)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.then and self.requests > self.then[0]:
            self.status = self.then[1]
        self.paths.append(request.path_qs)
        self.headers.append(dict(request.headers))
        self.now += 1
        self.max = max(self.max, self.now)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        finally:
            self.now -= 1
        if self.status == 200:
            return web.Response(body=self.body, content_type=self.ctype)
        return web.Response(status=self.status, text="nope\n")

    @contextlib.asynccontextmanager
    async def serve(self):
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()


# --- the simulator ------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["xyz", "tms", "quadkey"])
def test_area_fetched_byte_exact(scheme):
    async def main():
        async with sim_server(WORLD, port=0) as srv:
            src = parse_source(srv.template(scheme=scheme))
            async with Fetcher(src, FAST) as f:
                results = await collect(f, AREA)
            assert sorted(r.tile for r in results) == sorted(AREA)
            for r in results:
                assert r.status == "ok" and r.attempts == 1 and r.error is None and r.http_status == 200
                assert r.data == expected(r.tile)
            assert f.stats.ok == 16 and f.stats.requests == 16 and f.stats.retries == 0
            assert f.stats.bytes == sum(len(r.data) for r in results)
            assert srv.stats["ok"] == 16

    run(main())


REASONS = {
    "http_500": {"http 500"},
    "http_503": {"http 503"},
    "http_429": {"http 429"},
    "reset": {"reset", "disconnected"},
    "truncate": {"truncated"},
    "wrong_type": {"not an image"},
    "slow_body": {"timeout"},
}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_each_fault_alone_is_retried_until_ok(kind):
    # slow bodies trickle in 8 gaps of 1.5 s: a read timeout of 1 s (the shortest there
    # is: libcurl counts whole seconds) cuts them
    faults = Faults(**{kind: 0.3}, retry_after=1, slow_body_s=12.0, seed=3)
    read_timeout = 1 if kind == "slow_body" else 30
    settings = FetchSettings(retries=8, backoff_base_s=0.005, backoff_max_s=2.0, read_timeout_s=read_timeout)

    async def main():
        async with sim_server(WORLD, faults, port=0) as srv:
            async with Fetcher(parse_source(srv.template()), settings) as f:
                results = await collect(f, AREA)
            assert [r.status for r in results] == ["ok"] * 16
            assert all(r.data == expected(r.tile) for r in results)
            assert srv.stats[kind] > 0
            st = f.stats
            assert st.retries > 0 and st.retries == st.requests - 16
            assert set(st.by_reason) <= REASONS[kind] and sum(st.by_reason.values()) == st.retries
            assert sum(r.attempts for r in results) == st.requests

    run(main())


def test_all_faults_together_with_latency():
    faults = Faults(
        http_500=0.06, http_503=0.06, http_429=0.06, reset=0.06, truncate=0.06, wrong_type=0.06, slow_body=0.06,
        retry_after=1, slow_body_s=0.2, latency_ms=5, jitter_ms=20, seed=11,
    )
    tiles = [T.Tile(18, ORIGIN.x + i, ORIGIN.y + j) for j in range(6) for i in range(8)]  # 48 tiles

    async def main():
        async with sim_server(WORLD, faults, port=0) as srv:
            async with Fetcher(parse_source(srv.template()), FetchSettings(retries=12, backoff_base_s=0.005, backoff_max_s=1)) as f:
                results = await collect(f, tiles)
            assert Counter(r.status for r in results) == {"ok": 48}
            assert all(r.data == expected(r.tile) for r in results)
            assert f.stats.retries > 5
            assert {"http 500", "http 503", "http 429", "truncated", "not an image"} <= set(f.stats.by_reason)
            assert srv.stats["slow_body"] > 0  # slow but correct bodies are ok at the default read timeout

    run(main())


def test_404_outside_coverage_is_empty_and_not_retried():
    # coverage: the western half of the 4 x 4 area (a box strictly inside columns 0..1)
    w, s, _, n = T.bounds(T.Tile(18, ORIGIN.x, ORIGIN.y + 3))[0], T.bounds(T.Tile(18, ORIGIN.x, ORIGIN.y + 3))[1], 0, T.bounds(ORIGIN)[3]
    e = T.bounds(T.Tile(18, ORIGIN.x + 1, ORIGIN.y))[2]
    eps = 1e-7
    faults = Faults(coverage=(w + eps, s + eps, e - eps, n - eps))

    async def main():
        async with sim_server(WORLD, faults, port=0) as srv:
            async with Fetcher(parse_source(srv.template()), FAST) as f:
                results = await collect(f, AREA)
            by = {r.tile: r for r in results}
            for t in AREA:
                r = by[t]
                inside = t.x - ORIGIN.x < 2
                assert r.status == ("ok" if inside else "empty"), t
                assert r.attempts == 1
                if not inside:
                    assert r.data is None and r.http_status == 404 and r.error is None
            assert f.stats.empty == 8 and f.stats.ok == 8 and f.stats.retries == 0
            assert f.stats.by_reason == {"http 404": 8}
            assert srv.stats["not_found"] == 8 and srv.stats["requests"] == 16

    run(main())


def test_retry_after_is_honoured_and_capped():
    tile = AREA[0]

    async def main():
        # every answer is 429 with Retry-After: 1, so two retries wait at least 2 s
        async with sim_server(WORLD, Faults(http_429=1.0, retry_after=1), port=0) as srv:
            settings = FetchSettings(retries=2, backoff_base_s=0.001, backoff_max_s=5)
            async with Fetcher(parse_source(srv.template()), settings) as f:
                t0 = time.monotonic()
                r = await f.fetch(tile)
                elapsed = time.monotonic() - t0
            assert r.status == "failed" and r.attempts == 3 and r.http_status == 429
            assert "http 429" in r.error and str(tile) in r.error
            assert elapsed >= 1.9  # Retry-After, not the 1-4 ms computed backoff
            assert srv.stats["http_429"] == 3
        # Retry-After: 7 is capped at backoff_max_s
        async with sim_server(WORLD, Faults(http_429=1.0, retry_after=7), port=0) as srv:
            settings = FetchSettings(retries=1, backoff_base_s=0.001, backoff_max_s=0.1)
            async with Fetcher(parse_source(srv.template()), settings) as f:
                t0 = time.monotonic()
                r = await f.fetch(tile)
                assert time.monotonic() - t0 < 5
            assert r.status == "failed" and r.attempts == 2

    run(main())


def test_server_rate_limit_429_then_ok():
    tiles = AREA[:12]

    async def main():
        async with sim_server(WORLD, Faults(rate_limit=5, rate_burst=5), port=0) as srv:
            async with Fetcher(parse_source(srv.template()), FetchSettings(retries=10, backoff_max_s=3)) as f:
                results = await collect(f, tiles)
            assert Counter(r.status for r in results) == {"ok": 12}
            assert f.stats.by_reason["http 429"] == srv.stats["rate_limited"] > 0

    run(main())


def test_retries_exhausted_is_failed_with_reason():
    async def main():
        async with sim_server(WORLD, Faults(http_503=1.0), port=0) as srv:
            async with Fetcher(parse_source(srv.template()), FetchSettings(retries=2, backoff_base_s=0.001)) as f:
                results = await collect(f, AREA[:5])
            for r in results:
                assert r.status == "failed" and r.attempts == 3 and r.data is None and r.http_status == 503
                assert r.error == f"tile {r.tile}: http 503 (3 attempts)"
            assert f.stats.failed == 5 and f.stats.retries == 10 and f.stats.by_reason == {"http 503": 15}
            assert srv.stats["http_503"] == 15

    run(main())


def test_connection_refused_fails_after_retries():
    async def main():
        async with Counting().serve() as url:
            pass  # the port is closed again
        async with Fetcher(parse_source(url + "/{z}/{x}/{y}.jpg"), FetchSettings(retries=1, backoff_base_s=0.001)) as f:
            r = await f.fetch(ORIGIN)
        assert r.status == "failed" and r.attempts == 2 and "cannot connect" in r.error

    run(main())


# --- our own server -----------------------------------------------------------------------


def test_auth_failures_fail_fast_and_trip_the_breaker(monkeypatch):
    secret = "tok-9f8e7d6c5b4a"
    monkeypatch.setenv("TS_FETCH_TOKEN", secret)

    async def main():
        srv = Counting(status=403)
        async with srv.serve() as url:
            src = parse_source(url + "/{z}/{x}/{y}.jpg?access_token=${TS_FETCH_TOKEN}")
            # a few tiles: failed at once, one request each, no retries
            async with Fetcher(src, FetchSettings(concurrency=4)) as f:
                results = await collect(f, AREA[:10])
            assert [r.status for r in results] == ["failed"] * 10
            assert all(r.attempts == 1 and r.http_status == 403 and "403 Forbidden" in r.error for r in results)
            assert srv.requests == 10 and f.stats.retries == 0
            assert all(secret not in r.error for r in results)
            assert srv.paths[0].endswith(f"access_token={secret}")  # the token was sent
            # many tiles: the breaker stops the sweep
            tiles = (T.Tile(18, ORIGIN.x + i, ORIGIN.y) for i in range(10_000))
            async with Fetcher(src, FetchSettings(concurrency=8, auth_failures_to_stop=50)) as f:
                with pytest.raises(SourceError, match="403 Forbidden for every tile") as e:
                    await collect(f, tiles)
            assert secret not in str(e.value) and "${TS_FETCH_TOKEN}" in str(e.value)
            assert isinstance(e.value, UsageError)
            assert srv.requests <= 10 + 50 + 8
            # one tile at a time: fetch() itself raises at the n-th refusal in a row
            async with Fetcher(src, FetchSettings(auth_failures_to_stop=3)) as f:
                assert (await f.fetch(AREA[0])).status == "failed"
                assert (await f.fetch(AREA[1])).status == "failed"
                with pytest.raises(SourceError, match="the last 3"):
                    await f.fetch(AREA[2])

    run(main())


def test_breaker_trips_when_a_token_expires_mid_sweep():
    async def main():
        srv = Counting()
        srv.then = (30, 401)
        async with srv.serve() as url:
            tiles = (T.Tile(18, ORIGIN.x + i, ORIGIN.y) for i in range(10_000))
            got = Counter()
            async with Fetcher(parse_source(url + "/{z}/{x}/{y}.jpg"), FetchSettings(concurrency=4, auth_failures_to_stop=20)) as f:
                with pytest.raises(SourceError, match="401 Unauthorized for every tile"):
                    async for r in f.fetch_many(tiles):
                        got[r.status] += 1
            assert got["ok"] == 30 and 0 < got["failed"] < 20
            assert srv.requests < 30 + 20 + 4 + 1

    run(main())


def test_other_4xx_and_invalid_bodies():
    async def main():
        srv = Counting(status=400)
        async with srv.serve() as url:
            async with Fetcher(parse_source(url + "/{z}/{x}/{y}.jpg"), FAST) as f:
                r = await f.fetch(ORIGIN)
            assert r.status == "failed" and r.attempts == 1 and "http 400" in r.error
        srv = Counting(body=b"<html>maintenance</html>", ctype="image/jpeg")  # right type, wrong bytes
        async with srv.serve() as url:
            settings = FetchSettings(retries=2, backoff_base_s=0.001)
            async with Fetcher(parse_source(url + "/{z}/{x}/{y}.jpg"), settings) as f:
                r = await f.fetch(ORIGIN)
            assert r.status == "failed" and r.attempts == 3 and "not an image" in r.error
            async with Fetcher(parse_source(url + "/{z}/{x}/{y}.jpg"), FetchSettings(validate=False)) as f:
                r = await f.fetch(ORIGIN)
            assert r.status == "ok" and r.data == b"<html>maintenance</html>"
        srv = Counting(body=b"")
        async with srv.serve() as url:
            async with Fetcher(parse_source(url + "/{z}/{x}/{y}.jpg"), FAST) as f:
                r = await f.fetch(ORIGIN)
            assert r.status == "empty" and r.attempts == 1
        srv = Counting(status=204)
        async with srv.serve() as url:
            async with Fetcher(parse_source(url + "/{z}/{x}/{y}.jpg"), FAST) as f:
                r = await f.fetch(ORIGIN)
            assert r.status == "empty" and r.http_status == 204 and srv.requests == 1

    run(main())


def test_concurrency_bound_and_headers():
    async def main():
        srv = Counting(delay_s=0.02)
        async with srv.serve() as url:
            src = parse_source(url + "/{z}/{x}/{y}.jpg", ["X-Hello: there"])
            async with Fetcher(src, FetchSettings(concurrency=16)) as f:
                results = await collect(f, [T.Tile(18, ORIGIN.x + i, ORIGIN.y) for i in range(200)])
            assert len(results) == 200 and all(r.status == "ok" for r in results)
            assert srv.max <= 16 and f.stats.max_in_flight <= 16
            assert srv.max >= 8  # it did run concurrently
            assert srv.headers[0]["X-Hello"] == "there"
            assert srv.headers[0]["User-Agent"].startswith("tilesweep/")
            # per-host cap below the concurrency
            srv.max = 0
            async with Fetcher(src, FetchSettings(concurrency=64, per_host=4)) as f:
                await collect(f, [T.Tile(18, ORIGIN.x + i, ORIGIN.y) for i in range(40)])
            assert srv.max <= 4

    run(main())


def test_client_rate_limit_lower_bound():
    async def main():
        srv = Counting()
        async with srv.serve() as url:
            async with Fetcher(parse_source(url + "/{z}/{x}/{y}.jpg"), FetchSettings(rate=50)) as f:
                t0 = time.monotonic()
                results = await collect(f, [T.Tile(18, ORIGIN.x + i, ORIGIN.y) for i in range(100)])
                elapsed = time.monotonic() - t0
            assert len(results) == 100 and srv.requests == 100
            assert elapsed >= 1.5  # 100 requests at 50/s are spread over about 2 s

    run(main())


def test_fetch_many_pulls_lazily_and_cancels_on_break():
    pulled = 0

    def tiles():
        nonlocal pulled
        for i in range(1_000_000):
            pulled += 1
            yield T.Tile(18, ORIGIN.x + i % 1000, ORIGIN.y + i // 1000)

    async def main():
        srv = Counting(delay_s=0.01)
        async with srv.serve() as url:
            async with Fetcher(parse_source(url + "/{z}/{x}/{y}.jpg"), FetchSettings(concurrency=8)) as f:
                got = 0
                async with contextlib.aclosing(f.fetch_many(tiles())) as results:
                    async for r in results:
                        assert pulled <= 8 + got + 1
                        got += 1
                        if got == 20:
                            break
                assert f.stats.in_flight == 0
            assert pulled <= 8 + 20 + 1

    run(main())


def test_cancelled_requests_free_their_connections_and_close_drops_the_rest():
    """Cancelling a request mid-flight must leave the pool usable (its libcurl handle is
    recycled, never a later request's); closing with requests in flight cancels them."""

    async def main():
        slow, quick = Counting(delay_s=30), Counting()
        async with slow.serve() as slow_url, quick.serve() as quick_url:
            f = Fetcher(parse_source(slow_url + "/{z}/{x}/{y}.jpg"), FetchSettings(concurrency=4, retries=0))
            await f.open()
            tasks = [asyncio.ensure_future(f.fetch(t)) for t in AREA[:4]]
            while slow.now < 4:  # all four are waiting in the server
                await asyncio.sleep(0.01)
            for t in tasks[:2]:
                t.cancel()
            await asyncio.gather(*tasks[:2], return_exceptions=True)
            assert f.stats.in_flight == 2
            await f.close()  # the two still in flight are dropped
            results = await asyncio.gather(*tasks[2:], return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results), results
            assert f.stats.in_flight == 0
            # a new fetcher on the same loop is unaffected, and so is reuse after a cancel
            async with Fetcher(parse_source(quick_url + "/{z}/{x}/{y}.jpg"), FetchSettings(concurrency=2)) as g:
                first = asyncio.ensure_future(g.fetch(AREA[0]))
                await asyncio.sleep(0)
                first.cancel()
                results = await collect(g, AREA)
            assert sorted(r.tile for r in results) == sorted(AREA) and all(r.status == "ok" for r in results)

    run(main())


def test_async_iterable_input():
    async def agen():
        for t in AREA[:6]:
            yield t

    async def main():
        srv = Counting()
        async with srv.serve() as url:
            async with Fetcher(parse_source(url + "/{z}/{x}/{y}.jpg")) as f:
                results = await collect(f, agen())
            assert sorted(r.tile for r in results) == sorted(AREA[:6])

    run(main())


def test_scale_concurrency_2000():
    n = 5000
    tiles = [T.Tile(18, ORIGIN.x + i % 100, ORIGIN.y + i // 100) for i in range(n)]

    async def main():
        srv = Counting(delay_s=0.05)
        async with srv.serve() as url:
            async with Fetcher(parse_source(url + "/{z}/{x}/{y}.jpg"), FetchSettings(concurrency=2000)) as f:
                seen = set()
                async for r in f.fetch_many(iter(tiles)):
                    assert r.status == "ok" and r.data == JPEG, r.error
                    seen.add(r.tile)
            assert len(seen) == n and srv.requests == n
            assert srv.max <= 2000 and f.stats.max_in_flight <= 2000
            assert srv.max > 500  # thousands in flight really happened
            assert f.stats.snapshot()["ok"] == n

    run(main())


def test_fetch_tiles_sync_against_sim_in_thread():
    from tilesweep.sim import run_in_thread

    with run_in_thread(WORLD, Faults(http_500=0.2, seed=5)) as srv:
        src = parse_source(srv.template(ext="png"))
        results = list(fetch_tiles(src, iter(AREA[:6]), FAST))
        assert sorted(r.tile for r in results) == sorted(AREA[:6])
        assert all(r.status == "ok" and r.data == WORLD.render(r.tile, fmt="png") for r in results)
        # closing early leaves nothing running
        it = fetch_tiles(src, iter(AREA), FetchSettings(concurrency=2))
        first = next(it)
        it.close()
        assert first.status == "ok"


def test_env_checked_when_opening(monkeypatch):
    monkeypatch.setenv("TS_FETCH_KEY", "x")
    src = parse_source("http://127.0.0.1:9/{z}/{x}/{y}.png?key=${TS_FETCH_KEY}")
    monkeypatch.delenv("TS_FETCH_KEY")

    async def main():
        with pytest.raises(UsageError, match="TS_FETCH_KEY is not set"):
            async with Fetcher(src):
                pass

    run(main())


def test_settings_validation():
    for bad, match in [
        (dict(concurrency=0), "concurrency 0"),
        (dict(rate=0), "rate 0"),
        (dict(retries=-1), "retries -1"),
        (dict(read_timeout_s=0), "read_timeout_s=0"),
        (dict(backoff_base_s=float("nan")), "backoff_base_s=nan"),
    ]:
        with pytest.raises(UsageError, match=match):
            FetchSettings(**bad)


def test_helpers():
    assert image_format(JPEG) == "jpeg"
    assert image_format(WORLD.render(ORIGIN, fmt="png")) == "png"
    assert image_format(WORLD.render(ORIGIN, fmt="webp")) == "webp"
    assert image_format(b"GIF89a....") == "gif"
    assert image_format(b"<!DOCTYPE html>") is None and image_format(b"") is None
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= parse_retry_after(date, now=now) <= 31
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
