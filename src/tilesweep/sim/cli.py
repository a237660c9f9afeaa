"""``tilesweep sim``: serve simulated tiles, write ground truth, write static tile trees.

Bad input raises :class:`~tilesweep.errors.UsageError` before anything is written (the
top-level ``tilesweep`` command prints it as one line and exits with status 2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from ..errors import UsageError

# The world (numpy), areas (shapely), faults and tiles are imported by the commands that
# use them: every `tilesweep` command builds this group, and `tilesweep query` or
# `tilesweep --help` should not pay for the simulator's imports.

app = typer.Typer(
    help="The built-in imagery simulator: serve tiles with faults, ground truth, static tile trees.",
    no_args_is_help=True,
    add_completion=False,
)

MAX_RENDER_TILES = 200_000


def _check_zoom(zoom: int) -> int:
    from .world import MAX_SIM_ZOOM

    if not 0 <= zoom <= MAX_SIM_ZOOM:
        raise UsageError(f"zoom {zoom} is outside 0..{MAX_SIM_ZOOM} (the simulator's zooms)")
    return zoom


def _check_format(fmt: str) -> str:
    from .world import normalise_format

    try:
        return normalise_format(fmt)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_size(size: int) -> int:
    from .world import SIZES

    if size not in SIZES:
        raise UsageError(f"tile size {size} is not 256 or 512")
    return size


@app.command()
def serve(
    port: int = typer.Option(8080, "--port", "-p", help="TCP port (0: any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    seed: int = typer.Option(0, "--seed", help="World seed: same seed, same imagery and towers."),
    cache_mb: float = typer.Option(256.0, "--cache-mb", help="Memory for cached encoded tiles, MB."),
    workers: int = typer.Option(4, "--workers", help="Render threads."),
    quality: int = typer.Option(85, "--quality", help="JPEG/WebP quality, 1..100."),
    latency_ms: float = typer.Option(0.0, "--latency-ms", help="Fixed delay before each tile response, ms."),
    jitter_ms: float = typer.Option(0.0, "--jitter-ms", help="Extra uniform random delay 0..J ms."),
    http_500: float = typer.Option(0.0, "--http-500", help="Rate of 500 responses, 0..1."),
    http_503: float = typer.Option(0.0, "--http-503", help="Rate of 503 responses, 0..1."),
    http_429: float = typer.Option(0.0, "--http-429", help="Rate of 429 responses (with Retry-After), 0..1."),
    retry_after: float = typer.Option(1.0, "--retry-after", help="Retry-After seconds sent with 429."),
    reset: float = typer.Option(0.0, "--reset", help="Rate of connection resets, 0..1."),
    truncate: float = typer.Option(0.0, "--truncate", help="Rate of truncated bodies, 0..1."),
    wrong_type: float = typer.Option(0.0, "--wrong-type", help="Rate of 200 text/html bodies, 0..1."),
    slow_body: float = typer.Option(0.0, "--slow-body", help="Rate of slowly trickled bodies, 0..1."),
    wrong_size: float = typer.Option(0.0, "--wrong-size", help="Rate of images of half the pixel size asked for, 0..1."),
    slow_body_s: float = typer.Option(2.0, "--slow-body-s", help="Seconds a slow body takes."),
    coverage: Optional[str] = typer.Option(None, "--coverage", help="AREA with imagery; tiles outside answer 404."),
    rate_limit: Optional[float] = typer.Option(None, "--rate-limit", help="Requests/s per client IP; beyond: 429."),
    fault_seed: int = typer.Option(0, "--fault-seed", help="Seed of the fault draws: same seed, same faults."),
) -> None:
    """Serve simulated tiles over HTTP until Ctrl-C: /{z}/{x}/{y}.jpg, @2x, /tms/..., /q/{quadkey}.jpg."""
    from ..area import load_area
    from .faults import Faults
    from .server import serve as _serve
    from .world import World

    if not 0 <= port <= 65535:
        raise UsageError(f"port {port} is outside 0..65535")
    if not 1 <= quality <= 100:
        raise UsageError(f"quality {quality} is outside 1..100")
    if workers < 1:
        raise UsageError(f"workers {workers} must be >= 1")
    if cache_mb < 0:
        raise UsageError(f"cache size {cache_mb:g} MB must be >= 0")
    faults = Faults(
        http_500=http_500, http_503=http_503, http_429=http_429, reset=reset, truncate=truncate,
        wrong_type=wrong_type, slow_body=slow_body, wrong_size=wrong_size, retry_after=retry_after, slow_body_s=slow_body_s,
        latency_ms=latency_ms, jitter_ms=jitter_ms,
        coverage=load_area(coverage) if coverage else None, rate_limit=rate_limit, seed=fault_seed,
    )

    def ready(srv) -> None:  # type: ignore[no-untyped-def]
        typer.echo(f"serving world seed {seed} at {srv.template()} (also @2x, /tms/, /q/{{quadkey}}, /wms GetMap and /static/ bbox images); faults: {faults.describe()}")

    try:
        _serve(World(seed), faults, host=host, port=port, cache_mb=cache_mb, workers=workers, quality=quality, ready=ready)
    except OSError as exc:  # a port in use, an address that is not this machine's, a host name that does not resolve
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


@app.command()
def truth(
    area: str = typer.Argument(..., help="W,S,E,N bbox in degrees, or a GeoJSON / WKT file."),
    output: Path = typer.Option(..., "--output", "-o", help="towers.geojson or towers.parquet."),
    seed: int = typer.Option(0, "--seed", help="World seed."),
) -> None:
    """Write the exact tower positions (lon, lat, line_id, tower_id) inside AREA."""
    from .truth import truth_format, write_truth

    from ..area import load_area
    from ..errors import check_output_file
    from .world import World

    truth_format(output)
    check_output_file(output, "output")
    the_area = load_area(area)
    n = write_truth(World(seed).iter_towers(the_area), output)
    typer.echo(f"{n:,} towers written to {output}")


def _render_chunk(args: tuple[int, int, list[tuple[int, int, int]], str, str, int, int]) -> int:
    from ..tiles import Tile
    from .world import World

    seed, _, tiles, directory, fmt, size, quality = args
    world = World(seed)
    ext = "jpg" if fmt == "jpeg" else fmt
    root = Path(directory)
    for z, x, y in tiles:
        d = root / str(z) / str(x)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{y}.{ext}"
        tmp = d / f".{y}.{ext}.tmp"
        tmp.write_bytes(world.render(Tile(z, x, y), size, fmt, quality))
        os.replace(tmp, path)
    return len(tiles)


@app.command()
def render(
    area: str = typer.Argument(..., help="W,S,E,N bbox in degrees, or a GeoJSON / WKT file."),
    directory: Path = typer.Argument(..., help="Folder for the static tree DIR/z/x/y.EXT."),
    zoom: int = typer.Option(..., "--zoom", "-z", help="Zoom, 0..20."),
    fmt: str = typer.Option("jpg", "--format", "-f", help="jpg, png or webp."),
    size: int = typer.Option(256, "--size", help="Tile size in pixels, 256 or 512."),
    seed: int = typer.Option(0, "--seed", help="World seed."),
    quality: int = typer.Option(85, "--quality", help="JPEG/WebP quality, 1..100."),
    processes: int = typer.Option(0, "--processes", help="Render processes (0: one per CPU)."),
    force: bool = typer.Option(False, "--force", help=f"Allow more than {MAX_RENDER_TILES:,} tiles."),
) -> None:
    """Render every tile of AREA's bbox at --zoom into DIR/z/x/y.EXT (a tree nginx can serve)."""
    from concurrent.futures import ProcessPoolExecutor

    from ..area import load_area
    from ..tiles import tile_at

    _check_zoom(zoom)
    f = _check_format(fmt)
    _check_size(size)
    if not 1 <= quality <= 100:
        raise UsageError(f"quality {quality} is outside 1..100")
    if processes < 0:
        raise UsageError(f"processes {processes} must be >= 0")
    the_area = load_area(area)
    w, s, e, n = the_area.bbox
    a, b = tile_at(w, n, zoom), tile_at(e, s, zoom)
    count = (b.x - a.x + 1) * (b.y - a.y + 1)
    if count > MAX_RENDER_TILES and not force:
        raise UsageError(f"area {area!r} at zoom {zoom} is {count:,} tiles, more than {MAX_RENDER_TILES:,}; pass --force to render them")
    tiles = [(zoom, x, y) for y in range(a.y, b.y + 1) for x in range(a.x, b.x + 1)]
    nproc = processes or (os.cpu_count() or 1)
    chunk = max(1, min(256, len(tiles) // (nproc * 4) or 1))
    jobs = [(seed, i, tiles[i : i + chunk], str(directory), f, size, quality) for i in range(0, len(tiles), chunk)]
    directory.mkdir(parents=True, exist_ok=True)
    done = 0
    if nproc == 1 or len(jobs) == 1:
        for j in jobs:
            done += _render_chunk(j)
    else:
        with ProcessPoolExecutor(max_workers=nproc) as pool:
            for k in pool.map(_render_chunk, jobs):
                done += k
    ext = "jpg" if f == "jpeg" else f
    typer.echo(f"{done:,} tiles written to {directory}/{{z}}/{{x}}/{{y}}.{ext}")
