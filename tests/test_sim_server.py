"""The simulated tile server over real HTTP on loopback, with a real aiohttp client."""

from __future__ import annotations

import asyncio
import io
import time
import urllib.request

import aiohttp
import pytest
from PIL import Image

from tilesweep import tiles as T
from tilesweep.errors import UsageError
from tilesweep.sim import Faults, World, run_in_thread, sim_server

pytestmark = pytest.mark.timeout(60)

WORLD = World(0)
TILE = T.Tile(16, 34316, 22968)


def run(coro):
    return asyncio.run(coro)


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, str, dict, bytes]:
    async with session.get(url) as r:
        body = await r.read()
        return r.status, r.headers.get("Content-Type", ""), dict(r.headers), body


def url_of(srv, tile: T.Tile = TILE, ext: str = "jpg") -> str:
    return f"{srv.url}/{tile.z}/{tile.x}/{tile.y}.{ext}"


def test_routes_encodings_and_stats():
    async def main():
        async with sim_server(WORLD) as srv, aiohttp.ClientSession() as s:
            st, ct, _, jpg = await fetch(s, url_of(srv))
            assert st == 200 and ct == "image/jpeg" and jpg[:3] == b"\xff\xd8\xff"
            assert jpg == WORLD.render(TILE)
            st, ct, _, png = await fetch(s, url_of(srv, ext="png"))
            assert ct == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"
            st, ct, _, webp = await fetch(s, url_of(srv, ext="webp"))
            assert ct == "image/webp" and webp[:4] == b"RIFF" and webp[8:12] == b"WEBP"
            st, _, _, big = await fetch(s, f"{srv.url}/{TILE.z}/{TILE.x}/{TILE.y}@2x.jpg")
            assert Image.open(io.BytesIO(big)).size == (512, 512)
            # every kind of template gives the same tile
            for tpl in (srv.template(), srv.template(scheme="tms"), srv.template(scheme="quadkey")):
                url = tpl.format(z=TILE.z, x=TILE.x, y=TILE.y, quadkey=T.quadkey(TILE), **{"-y": T.tms_y(TILE)})
                assert (await fetch(s, url))[3] == jpg, url
            assert (await fetch(s, f"{srv.url}/{TILE.z}/{TILE.x}/{TILE.y}.gif"))[0] == 400
            assert (await fetch(s, f"{srv.url}/3/8/0.jpg"))[0] == 404  # outside the grid
            assert (await fetch(s, f"{srv.url}/21/0/0.jpg"))[0] == 404  # deeper than the simulator
            assert (await fetch(s, f"{srv.url}/health"))[0] == 200
            async with s.get(f"{srv.url}/stats") as r:
                stats = await r.json()
            assert stats["ok"] == 7 and stats["bad_request"] == 1 and stats["not_found"] == 2
            assert stats["renders"] == 4 and stats["cache_hits"] == 3

    run(main())


@pytest.mark.parametrize("status", [500, 503])
def test_http_errors(status):
    async def main():
        async with sim_server(WORLD, Faults(**{f"http_{status}": 1.0})) as srv, aiohttp.ClientSession() as s:
            assert (await fetch(s, url_of(srv)))[0] == status
            assert srv.stats[f"http_{status}"] == 1

    run(main())


def test_429_with_retry_after():
    async def main():
        async with sim_server(WORLD, Faults(http_429=1.0, retry_after=7)) as srv, aiohttp.ClientSession() as s:
            st, _, headers, _ = await fetch(s, url_of(srv))
            assert st == 429 and headers["Retry-After"] == "7"

    run(main())


def test_connection_reset():
    async def main():
        async with sim_server(WORLD, Faults(reset=1.0)) as srv, aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientConnectionError):
                await fetch(s, url_of(srv))
            assert srv.stats["reset"] >= 1

    run(main())


def test_truncated_body():
    async def main():
        async with sim_server(WORLD, Faults(truncate=1.0)) as srv, aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientPayloadError):
                await fetch(s, url_of(srv))
            assert srv.stats["truncate"] == 1

    run(main())


def test_wrong_content_type():
    async def main():
        async with sim_server(WORLD, Faults(wrong_type=1.0)) as srv, aiohttp.ClientSession() as s:
            st, ct, _, body = await fetch(s, url_of(srv))
            assert st == 200 and ct.startswith("text/html") and body.lstrip().startswith(b"<!DOCTYPE html>")

    run(main())


def test_slow_body_and_latency_take_longer():
    async def main():
        async with aiohttp.ClientSession() as s:
            async with sim_server(WORLD) as srv:
                await fetch(s, url_of(srv))  # warm the render
                t0 = time.perf_counter()
                await fetch(s, url_of(srv))
                fast = time.perf_counter() - t0
            async with sim_server(WORLD, Faults(slow_body=1.0, slow_body_s=0.6)) as srv:
                t0 = time.perf_counter()
                st, _, _, body = await fetch(s, url_of(srv))
                slow = time.perf_counter() - t0
                assert st == 200 and body == WORLD.render(TILE)
            async with sim_server(WORLD, Faults(latency_ms=300, jitter_ms=50)) as srv:
                t0 = time.perf_counter()
                await fetch(s, url_of(srv))
                delayed = time.perf_counter() - t0
        # lower bounds only: a busy machine may make any request slower, never faster
        assert slow >= 0.55 and delayed >= 0.3 and fast < slow

    run(main())


def test_404_outside_coverage():
    lon, lat = T.center(TILE)
    cov = (lon - 0.01, lat - 0.01, lon + 0.01, lat + 0.01)

    async def main():
        async with sim_server(WORLD, Faults(coverage=cov)) as srv, aiohttp.ClientSession() as s:
            assert (await fetch(s, url_of(srv)))[0] == 200
            far = T.tile_at(lon + 1.0, lat, 16)
            assert (await fetch(s, url_of(srv, far)))[0] == 404

    run(main())


def test_rate_limit_is_per_client():
    async def main():
        # 0.5 tokens/s: five requests one after another see at least two 429s unless each
        # takes over 0.7 s (at 2/s a busy machine's 0.17 s a request refills the bucket)
        async with sim_server(WORLD, Faults(rate_limit=0.5, rate_burst=2)) as srv:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.1", 0))) as a, aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
            ) as b:
                got = [await fetch(a, url_of(srv)) for _ in range(5)]
                codes = [g[0] for g in got]
                assert codes[:2] == [200, 200] and codes.count(429) >= 2
                assert all(int(g[2]["Retry-After"]) >= 1 for g in got if g[0] == 429)
                assert (await fetch(b, url_of(srv)))[0] == 200  # another client is not limited
                assert srv.stats["rate_limited"] >= 2

    run(main())


def _outcomes(faults: Faults, n_tiles: int = 12, attempts: int = 3) -> list[str]:
    async def main():
        out = []
        async with sim_server(WORLD, faults) as srv, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            for i in range(n_tiles):
                t = T.Tile(16, TILE.x + i, TILE.y)
                for _ in range(attempts):
                    try:
                        st, ct, _, _ = await fetch(s, url_of(srv, t))
                        out.append(f"{st} {ct.split(';')[0]}")
                    except aiohttp.ClientPayloadError:
                        out.append("payload")
                    except aiohttp.ClientConnectionError:
                        out.append("conn")
        return out

    return run(main())


def test_same_fault_seed_same_faults_and_retries_can_succeed():
    f = dict(http_500=0.15, http_503=0.15, http_429=0.1, truncate=0.1, wrong_type=0.1, retry_after=0)
    a = _outcomes(Faults(**f, seed=3))
    b = _outcomes(Faults(**f, seed=3))
    c = _outcomes(Faults(**f, seed=4))
    assert a == b and a != c
    assert len(set(a)) >= 4  # a real mix of outcomes
    # per tile, attempts differ: the fate depends on the attempt number
    per_tile = [a[i : i + 3] for i in range(0, len(a), 3)]
    assert any(len(set(p)) > 1 for p in per_tile)
    assert any(p[0] != "200 image/jpeg" and "200 image/jpeg" in p[1:] for p in per_tile)


def test_bad_fault_settings_raise_usage_error():
    with pytest.raises(UsageError):
        Faults(http_500=1.5)
    with pytest.raises(UsageError):
        Faults(http_500=0.6, http_503=0.6)
    with pytest.raises(UsageError):
        Faults(latency_ms=-1)
    with pytest.raises(UsageError):
        Faults(rate_limit=0)


def test_run_in_thread_for_sync_code():
    with run_in_thread(WORLD, Faults()) as srv:
        with urllib.request.urlopen(srv.url + "/health", timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(url_of(srv), timeout=10) as r:
            assert r.headers["Content-Type"] == "image/jpeg" and r.read() == WORLD.render(TILE)
