"""The sweep folder: one job's plan, queue and outputs.

A sweep folder holds::

    sweep.toml      the plan: area, zoom, block zoom, sampling, counts, fingerprint
    area.geojson    the area, as planned (after clipping to the Web-Mercator world)
    queue.sqlite    the durable block queue (see tilesweep.queue), unless the plan put it
                    elsewhere: sweep.toml's [queue] url (sqlite:queue.sqlite by default;
                    postgresql://user@host:port/db?schema=NAME for a shared server)
    tiles/          the tile store: one shard per block (see tilesweep.store)
    predictions/    Parquet parts of model scores and their ledger (see tilesweep.predict)

Planning is atomic: the queue and area are written under ``*.partial`` names and renamed
into place, and ``sweep.toml`` is written last, so a folder either holds a whole plan or
none. Planning the same plan again is a no-op; planning a different one into a folder that
holds a plan is refused.

A sweep may also live on object storage (``s3://bucket/prefix``; ``gs://``, ``az://``
through obstore's same API; ``file:///abs/path`` is a plain folder): ``sweep.toml``,
``area.geojson``, ``tiles/`` and the prediction parts are objects under the prefix,
published through :mod:`tilesweep.storage` (``sweep.toml`` create-if-absent at plan
time). Its queue must be a server's (PostgreSQL: a SQLite file cannot live in a bucket).
What only makes sense on one machine's disk lives in the sweep's *state folder*
(:func:`state_folder`, ``$TILESWEEP_STATE_DIR/{scheme}/[@{endpoint}/]{bucket}/{prefix}``): the workers
lock (it then guards this machine only), densify rounds, and a marked copy of
``sweep.toml`` (``[sweep] mirror_of``: opening the state folder opens the URL). The
prediction ledger is the queue's (PostgreSQL), shared by every machine.
:attr:`Sweep.path` is that folder; :attr:`Sweep.location` the URL.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import sqlite3
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Union
from urllib.parse import urlparse

import shapely
import tomli_w

from . import __version__
from .area import Area
from .errors import UsageError
from .plan import BlockChunk, PlanSpec, estimate_plan, pack_mask, plan_blocks
from .queue import DEFAULT_URL, Block, OwnerStats, Queue, StagedQueue, State, open_queue, parse_queue_url, redact, stage_queue
from .sources import Source
from .storage import AlreadyPublished, LocalStorage, Storage, endpoint_parts, is_url, open_storage
from .store import TileStore

SWEEP_FILE = "sweep.toml"
QUEUE_FILE = "queue.sqlite"
AREA_FILE = "area.geojson"
TILES_DIR = "tiles"
PREDICTIONS_DIR = "predictions"
FORMAT_VERSION = 1

SweepRef = Union[str, "os.PathLike[str]"]
"""Where a sweep is: a folder (path or ``file://`` URL) or an object-store URL."""


def as_location(ref: SweepRef) -> str | Path:
    """``ref`` as a sweep location: an object-store URL stays a string (``s3://b/p``, no
    trailing ``/``), anything else is a folder :class:`~pathlib.Path` (``file:///abs`` too)."""
    if isinstance(ref, str) and ref.startswith("file://"):
        u = urlparse(ref)
        if u.netloc not in ("", "localhost"):  # file://tiles/store would open /store
            raise UsageError(f"bad file URL {ref!r}: names host {u.netloc!r}; use file:///absolute/path or a plain folder path")
        return Path(u.path)
    if isinstance(ref, str) and is_url(ref):
        if not urlparse(ref).netloc:
            raise UsageError(f"bad sweep URL {ref!r}: names no bucket; expected scheme://bucket/prefix")
        return ref.rstrip("/")
    return Path(ref)


def state_folder(url: str) -> Path:
    """The local folder of what a sweep on object storage keeps on this machine's disk (the
    workers lock, the prediction ledger, densify rounds): ``$TILESWEEP_STATE_DIR`` (default
    ``$XDG_CACHE_HOME/tilesweep/sweeps``, ``~/.cache/tilesweep/sweeps``) / scheme /
    [``@endpoint`` when ``AWS_ENDPOINT_URL`` is set, :func:`~tilesweep.storage.endpoint_parts`] /
    bucket / prefix. Created on use."""
    base = os.environ.get("TILESWEEP_STATE_DIR")
    if not base:
        base = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "tilesweep", "sweeps"))
    u = urlparse(url)
    parts = [p for p in u.path.split("/") if p]
    if any(p in (".", "..") for p in parts) or not u.netloc:
        raise UsageError(f"bad sweep URL {url!r}: expected scheme://bucket/prefix")
    folder = Path(base, u.scheme, *endpoint_parts(u.scheme), u.netloc, *parts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"state folder {str(folder)!r} of sweep {url!r} cannot be created: {exc.strerror}") from None
    return folder


def local_folder(ref: SweepRef) -> Path:
    """The sweep's folder, or for a sweep on object storage its :func:`state_folder`."""
    loc = as_location(ref)
    return loc if isinstance(loc, Path) else state_folder(loc)


def tiles_location(ref: SweepRef) -> str | Path:
    """Where the sweep's tile store is: ``SWEEP/tiles`` (a folder or ``s3://.../tiles``)."""
    loc = as_location(ref)
    return loc / TILES_DIR if isinstance(loc, Path) else f"{loc}/{TILES_DIR}"


@dataclass(frozen=True)
class PlanSummary:
    """Counts of a plan: tiles and blocks planned, the area in km2."""

    tiles: int
    blocks: int
    area_km2: float
    zoom: int
    block_zoom: int
    block_zoom_min: int | None = None  # adaptive blocks: the coarsest block zoom
    block_tiles: int | None = None  # adaptive blocks: most tiles a block holds

    def describe_blocks(self) -> str:
        """``"blocks at zoom 14"``, or for adaptive blocks ``"blocks of <= 256 tiles (zoom
        9..14, 88.1 tiles each)"``."""
        if self.block_tiles is None:
            return f"blocks at zoom {self.block_zoom}"
        zooms = f"zoom {self.block_zoom}" if self.block_zoom_min == self.block_zoom else f"zoom {self.block_zoom_min}..{self.block_zoom}"
        return f"blocks of <= {self.block_tiles} tiles ({zooms}, {self.tiles / max(1, self.blocks):.1f} tiles each)"

    def estimate(self, tile_kb: float = 20.0, rate: float = 1000.0) -> tuple[float, float]:
        """(bytes, hours) to fetch the plan at ``tile_kb`` KB per tile and ``rate`` tiles/s."""
        return self.tiles * tile_kb * 1000.0, self.tiles / rate / 3600.0


@dataclass(frozen=True)
class SweepStatus:
    """Where a sweep stands, in blocks and in tiles.

    throughput: tiles/s over the last ``window_s`` seconds (0 when nothing finished);
    eta_s: seconds until the remaining tiles are done at that rate (None if unknown).
    results: what became of the tiles of done blocks: ok (fetched), empty (404/204),
    failed, bytes fetched, and fetch retries (requests repeated after transient faults).
    predictions: per model, what ``predictions/`` holds (:func:`tilesweep.predict.ledger.ledger_summary`).
    mismatch: a message when the numbers do not add up (queue vs plan, or a done block's
    results vs its planned tiles)."""

    tiles_total: int
    blocks_total: int
    blocks: dict[str, int]
    tiles: dict[str, int]
    attempts_total: int
    throughput: float
    window_s: float
    eta_s: float | None
    mismatch: str | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    results: dict[str, int] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    dead: list[dict[str, Any]] = field(default_factory=list)  # the first dead blocks: block, attempts, error
    # per machine (host): its lease owners (worker loops) leasing now or done in the window,
    # blocks leased now, blocks and tiles done in the window, tiles/s, last heartbeat
    machines: list[dict[str, Any]] = field(default_factory=list)
    densify: list[dict[str, Any]] = field(default_factory=list)  # densify rounds (tilesweep.densify.rounds)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tiles_total": self.tiles_total, "blocks_total": self.blocks_total}
        for state in ("pending", "leased", "done", "dead"):
            out[f"blocks_{state}"] = self.blocks[state]
            out[f"tiles_{state}"] = self.tiles[state]
        for k, v in self.results.items():
            out[{"bytes": "bytes_fetched", "retries": "fetch_retries"}.get(k, f"tiles_{k}")] = v
        out.update(
            attempts_total=self.attempts_total,
            tiles_per_s=self.throughput,
            window_s=self.window_s,
            eta_s=self.eta_s,
            mismatch=self.mismatch,
            plan=self.plan,
            predictions=self.predictions,
            dead_blocks=self.dead,
            machines=self.machines,
            densify=self.densify,
        )
        return out


def plan_fingerprint(area: Area, spec: PlanSpec) -> str:
    """A digest of what decides the planned tiles: the area's geometry and the spec."""
    h = hashlib.sha256()
    h.update(shapely.to_wkb(shapely.normalize(area.geometry), output_dimension=2))
    fields = asdict(spec)
    if fields.get("block_tiles") is None:  # fixed blocks: the digest of plans made before block_tiles
        fields.pop("block_tiles", None)
    h.update(json.dumps(fields, sort_keys=True).encode())
    return h.hexdigest()[:32]


class Sweep:
    """A sweep folder. Create one with :meth:`plan`, open one with :meth:`open`."""

    def __init__(self, path: Path, config: dict[str, Any], storage: Storage | None = None):
        self.path = path
        """The sweep's folder; for a sweep on object storage, its local :func:`state_folder`."""
        self.config = config
        self.storage: Storage = storage if storage is not None else LocalStorage(path)
        """Where the sweep's objects are (sweep.toml, area, tiles, prediction parts)."""
        self._queue: Queue | None = None

    @property
    def remote(self) -> bool:
        """True for a sweep on object storage."""
        return not isinstance(self.storage, LocalStorage)

    @property
    def location(self) -> str | Path:
        """Where the sweep is: its folder, or its URL (what workers are handed, what is printed)."""
        return self.storage.url if self.remote else self.path

    def write_config(self) -> None:
        """Publish :attr:`config` as ``sweep.toml``, atomically over the old one: whatever
        another machine recorded since this one read it is lost. Changes to a sweep that
        may be shared go through :meth:`update_config`."""
        data = tomli_w.dumps(self.config)
        if self.remote:
            self.storage.put(SWEEP_FILE, data.encode("utf-8"), replace=True)
            _mirror(self.path, self.config, self.storage.url)
        else:
            _write_atomic(self.path / SWEEP_FILE, data)

    def update_config(self, change: Callable[[dict[str, Any]], bool], attempts: int = 20) -> None:
        """Apply ``change`` to the recorded ``sweep.toml`` and publish it; :attr:`config`
        is then what was recorded. ``change`` edits the dict it is given in place and
        returns True when it changed something (False: nothing is written); it may raise
        (:class:`UsageError`: refused, nothing written).

        On object storage the update is conditional: ``sweep.toml`` is re-read with its
        ETag, ``change`` applied to what another machine may have recorded meanwhile, and
        published with ``If-Match``; when another machine published first, re-read,
        re-apply and retry (up to ``attempts`` times, a short random pause between)."""
        if not self.remote:
            cfg = copy.deepcopy(self.config)
            if change(cfg):
                _write_atomic(self.path / SWEEP_FILE, tomli_w.dumps(cfg))
            self.config = cfg
            return
        for attempt in range(attempts):
            data, version = self.storage.read_versioned(SWEEP_FILE)
            try:
                cfg = tomllib.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise UsageError(f"{self.storage.url}/{SWEEP_FILE} cannot be read: {exc}") from None
            if not change(cfg) or self.storage.put_if_version(SWEEP_FILE, tomli_w.dumps(cfg).encode("utf-8"), version):
                self.config = cfg
                _mirror(self.path, cfg, self.storage.url)
                return
            time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
        raise UsageError(f"sweep {self.storage.url!r}: {SWEEP_FILE} changed under {attempts} updates in a row; try again")

    # --- opening and planning ---------------------------------------------------------------

    @classmethod
    def open(cls, path: SweepRef) -> "Sweep":
        """Open an existing sweep (a folder or an object-store URL); :class:`UsageError` if
        it holds no plan, :class:`~tilesweep.storage.StorageError` when its bucket cannot
        be used."""
        loc = as_location(path)
        if not isinstance(loc, Path):
            return cls._open_url(loc)
        p = loc
        cfg_path = p / SWEEP_FILE
        if not cfg_path.is_file():
            raise UsageError(f"sweep folder {str(p)!r} holds no plan ({SWEEP_FILE} missing); run `tilesweep plan` first")
        try:
            config = tomllib.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"{str(cfg_path)!r} cannot be read: {exc}") from None
        remote = config.get("sweep", {}).get(MIRROR_KEY)
        if remote:  # the state folder of a sweep on object storage: that sweep
            return cls._open_url(str(remote))
        return cls(p, config)

    @classmethod
    def _open_url(cls, url: str) -> "Sweep":
        storage = open_storage(url)  # one listing: bucket, credentials, endpoint
        try:
            text = storage.read(SWEEP_FILE).decode("utf-8")
        except FileNotFoundError:
            raise UsageError(f"sweep {storage.url!r} holds no plan ({SWEEP_FILE} missing); run `tilesweep plan` first") from None
        try:
            config = tomllib.loads(text)
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"{storage.url}/{SWEEP_FILE} cannot be read: {exc}") from None
        state = state_folder(storage.url)
        _mirror(state, config, storage.url)
        return cls(state, config, storage)

    @classmethod
    def plan(
        cls,
        path: SweepRef,
        area: Area,
        spec: PlanSpec,
        on_chunk: Callable[[BlockChunk], None] | None = None,
        allow_huge: bool = False,
        queue: str | None = None,
    ) -> tuple["Sweep", bool]:
        """Plan ``area`` under ``spec`` into the folder ``path``.

        Returns ``(sweep, created)``: ``created`` is False when the folder already held
        this very plan (nothing is changed). Raises :class:`UsageError` when it holds a
        different plan, or is a non-empty folder that is not a sweep, or when the plan's
        estimate (:func:`tilesweep.plan.estimate_plan`) is absurdly large and not
        ``allow_huge``. ``on_chunk`` sees each chunk of blocks as it is queued (for
        progress). An interrupted or failed plan (Ctrl-C included) leaves nothing: the
        partial files are removed, and the folder too when this call created it.
        ``queue``: the queue's URL (:mod:`tilesweep.queue.url`); default the folder's own
        ``queue.sqlite``. The sweep records it without a password.

        ``path`` may be an object-store URL (module doc): ``queue`` must then name a
        server's queue (PostgreSQL), and ``sweep.toml`` is published create-if-absent, so
        of two plans racing on one URL one wins and the other is refused."""
        loc = as_location(path)
        fingerprint = plan_fingerprint(area, spec)
        if queue is not None:
            parse_queue_url(queue)  # a bad URL: one line, before anything is written
        if not isinstance(loc, Path):
            return cls._plan_url(loc, area, spec, fingerprint, on_chunk, allow_huge, queue)
        p = loc
        if (p / SWEEP_FILE).exists():
            existing = cls.open(p)
            if existing.config.get("plan", {}).get("fingerprint") == fingerprint:
                if queue is not None and not _same_queue(queue, existing.queue_url):
                    raise UsageError(
                        f"sweep folder {str(p)!r} already holds this plan on queue {existing.queue_url!r}, "
                        f"not {parse_queue_url(queue).text!r}; use another folder"
                    )
                return existing, False
            raise UsageError(
                f"sweep folder {str(p)!r} already holds a different plan "
                f"({existing.describe_plan()}); use another folder"
            )
        if p.exists() and not p.is_dir():
            raise UsageError(f"sweep folder {str(p)!r} exists and is not a folder")
        if p.is_dir():
            strays = [c.name for c in p.iterdir() if not c.name.endswith((".partial", ".partial-wal", ".partial-shm"))]
            if strays:
                raise UsageError(f"sweep folder {str(p)!r} is not empty and holds no plan (found {strays[0]!r})")
        _check_estimate(area, spec, allow_huge)
        created_dir = not p.exists()
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"sweep folder {str(p)!r} cannot be created: {exc.strerror}") from None
        if not os.access(p, os.W_OK | os.X_OK):  # EROFS even for root
            raise UsageError(f"sweep folder {str(p)!r} is not writable")
        staged: StagedQueue | None = None
        try:
            for stale in p.glob("*.partial*"):  # left by a plan that was killed
                stale.unlink()
            staged = stage_queue(queue or DEFAULT_URL, p)
            return cls._plan_into(p, area, spec, fingerprint, on_chunk, staged)
        except BaseException:  # Ctrl-C, a full disk, a bug: leave nothing half-written
            if staged is not None:
                staged.discard()  # published, but no sweep.toml yet: removed too
            for name in (AREA_FILE,):
                (p / name).unlink(missing_ok=True)  # renamed in, but no sweep.toml yet
            for stale in p.glob("*.partial*"):
                stale.unlink(missing_ok=True)
            if created_dir:
                try:
                    p.rmdir()
                except OSError:
                    pass
            raise

    @classmethod
    def _plan_url(
        cls, url: str, area: Area, spec: PlanSpec, fingerprint: str, on_chunk: Callable[[BlockChunk], None] | None,
        allow_huge: bool, queue: str | None,
    ) -> tuple["Sweep", bool]:
        if queue is None or parse_queue_url(queue).kind == "sqlite":
            raise UsageError(
                f"sweep {url!r} is on object storage, so its queue cannot be SQLite (a database file cannot live in a "
                "bucket): pass --queue postgresql://user@host:port/db"
            )
        storage = open_storage(url)  # StorageError (exit 2): bucket, credentials, endpoint
        url = storage.url
        if storage.exists(SWEEP_FILE):
            existing = cls._open_url(url)
            if existing.config.get("plan", {}).get("fingerprint") == fingerprint:
                if not _same_queue(queue, existing.queue_url):
                    raise UsageError(
                        f"sweep {url!r} already holds this plan on queue {existing.queue_url!r}, "
                        f"not {parse_queue_url(queue).text!r}; use another prefix"
                    )
                return existing, False
            raise UsageError(f"sweep {url!r} already holds a different plan ({existing.describe_plan()}); use another prefix")
        for o in storage.list(""):  # the first objects are enough (a killed plan's area is fine)
            if not _is_area_key(o.key) and o.key != SWEEP_FILE:  # (a racing plan's: settled by create-if-absent)
                raise UsageError(f"sweep {url!r} is not empty and holds no plan (found {o.key!r}); use another prefix")
        _check_estimate(area, spec, allow_huge)
        state = state_folder(url)
        from .densify import ROUNDS_FILE

        for stale in (ROUNDS_FILE, f"{ROUNDS_FILE}-wal", f"{ROUNDS_FILE}-shm", AREA_FILE, SWEEP_FILE):
            (state / stale).unlink(missing_ok=True)  # this machine's state of an earlier sweep at this URL
        staged: StagedQueue | None = None
        area_key = _area_key(fingerprint)
        made: dict[str, bool] = {}
        try:
            staged = stage_queue(queue, state)
            return cls._plan_into(state, area, spec, fingerprint, on_chunk, staged, storage, made)
        except BaseException as exc:  # Ctrl-C, a refused write, a bug: leave nothing half-written
            if staged is not None:
                staged.discard()

            def winner() -> dict[str, Any] | None:
                try:  # a plan that raced this one and published first: its area may be ours
                    return tomllib.loads(storage.read(SWEEP_FILE).decode("utf-8"))
                except Exception:  # none (FileNotFoundError), or the endpoint is gone
                    return None

            won = winner()
            same = won is not None and won.get("plan", {}).get("fingerprint") == fingerprint
            if not same and made.get("area"):  # only an area this call's PUT created: an identical plan
                try:  # racing this one may have found it published and be about to publish its sweep.toml
                    storage.delete(area_key)
                    won = winner()  # it did meanwhile: its area is put back (it checks too, _plan_into)
                    if won is not None and won.get("plan", {}).get("fingerprint") == fingerprint:
                        with contextlib.suppress(AlreadyPublished):
                            storage.put(area_key, json.dumps(area.to_geojson()).encode("utf-8"))
                except Exception:  # the endpoint is gone: a lone area is no plan
                    pass
            if isinstance(exc, AlreadyPublished):
                if same and _same_queue(queue, str((won or {}).get("queue", {}).get("url", DEFAULT_URL))):
                    return cls._open_url(url), False  # the same plan, planned twice at once: one stands
                raise UsageError(f"sweep {url!r}: another plan was published there while this one was planned; "
                                 "nothing of this one is kept") from None
            raise

    @classmethod
    def _plan_into(
        cls, p: Path, area: Area, spec: PlanSpec, fingerprint: str, on_chunk: Callable[[BlockChunk], None] | None,
        staged: StagedQueue, storage: Storage | None = None, made: dict[str, bool] | None = None,
    ) -> tuple["Sweep", bool]:
        """``made["area"]`` is set True when this call's PUT created the area object."""
        made = {} if made is None else made
        tiles = blocks = 0
        zooms = [spec.zoom + 1, -1]  # coarsest, finest block zoom planned
        started = time.time()
        for chunk in plan_blocks(area.geometry, spec):
            staged.queue.put(_queue_rows(chunk, spec))
            tiles += int(chunk.counts.sum())
            blocks += len(chunk)
            if chunk.z is not None and len(chunk):
                zooms = [min(zooms[0], int(chunk.z.min())), max(zooms[1], int(chunk.z.max()))]
            if on_chunk is not None:
                on_chunk(chunk)
        if blocks == 0:
            raise UsageError(f"area {area.source!r} has no tile at zoom {spec.zoom} after sampling; nothing planned")
        if storage is None:
            area_tmp = p / (AREA_FILE + ".partial")
            area_tmp.write_text(json.dumps(area.to_geojson()), encoding="utf-8")
            os.replace(area_tmp, p / AREA_FILE)
        else:  # named by the plan: plans racing on one URL never share an area object
            try:
                storage.put(_area_key(fingerprint), json.dumps(area.to_geojson()).encode("utf-8"))
                made["area"] = True
            except AlreadyPublished:  # this very plan's area, left by a killed plan or put by a racing one
                made["area"] = False
        staged.publish()
        plan: dict[str, Any] = {
            "area": AREA_FILE if storage is None else _area_key(fingerprint),
            "area_source": area.source,
            "area_km2": round(area.area_km2, 6),
            "bbox": list(area.bbox),
            "zoom": spec.zoom,
            # adaptive blocks: the finest block zoom (block_zoom_min: the coarsest)
            "block_zoom": spec.block_zoom if not spec.adaptive else zooms[1],
            "fraction": spec.fraction,
            "seed": spec.seed,
            "tiles": tiles,
            "blocks": blocks,
            "fingerprint": fingerprint,
            "planned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "planning_s": round(time.time() - started, 3),
        }
        if spec.max_tiles is not None:
            plan["max_tiles"] = spec.max_tiles
        if spec.adaptive:
            plan["block_tiles"] = spec.block_tiles
            plan["block_zoom_min"] = zooms[0]
        config = {"sweep": {"format": FORMAT_VERSION, "tilesweep": __version__}, "plan": plan, "queue": {"url": staged.url}}
        if storage is None:
            _write_atomic(p / SWEEP_FILE, tomli_w.dumps(config))
            return cls(p, config), True
        # create-if-absent: of two plans racing on one URL, one publishes (the other's
        # AlreadyPublished is settled by _plan_url)
        storage.put(SWEEP_FILE, tomli_w.dumps(config).encode("utf-8"))
        if not made["area"] and not storage.exists(_area_key(fingerprint)):
            # an identical plan that put it failed and deleted it before seeing this sweep.toml
            with contextlib.suppress(AlreadyPublished):
                storage.put(_area_key(fingerprint), json.dumps(area.to_geojson()).encode("utf-8"))
        _mirror(p, config, storage.url)
        return cls(p, config, storage), True

    # --- reading ------------------------------------------------------------------------

    @property
    def plan_config(self) -> dict[str, Any]:
        plan: dict[str, Any] = self.config["plan"]
        return plan

    @property
    def zoom(self) -> int:
        return int(self.plan_config["zoom"])

    @property
    def block_zoom(self) -> int:
        """The zoom of the blocks; with adaptive blocks the finest (see :attr:`block_zoom_min`)."""
        return int(self.plan_config["block_zoom"])

    @property
    def block_zoom_min(self) -> int:
        """The coarsest block zoom (= :attr:`block_zoom` for fixed blocks)."""
        return int(self.plan_config.get("block_zoom_min", self.plan_config["block_zoom"]))

    def summary(self) -> PlanSummary:
        pc = self.plan_config
        n = pc.get("block_tiles")
        return PlanSummary(
            int(pc["tiles"]), int(pc["blocks"]), float(pc["area_km2"]), self.zoom, self.block_zoom,
            self.block_zoom_min, None if n is None else int(n),
        )

    def describe_plan(self) -> str:
        pc = self.plan_config
        if "block_tiles" in pc:
            blocks = f"blocks of <= {pc['block_tiles']} tiles (zoom {self.block_zoom_min}..{pc['block_zoom']})"
        else:
            blocks = f"block zoom {pc['block_zoom']}"
        text = f"area {pc['area_source']}, zoom {pc['zoom']}, {blocks}, fraction {pc['fraction']:g}, seed {pc['seed']}"
        if "max_tiles" in pc:
            text += f", max tiles {pc['max_tiles']}"
        return text

    @property
    def queue_url(self) -> str:
        """The URL of the sweep's queue, as recorded (never with a password); sweeps
        planned before queues had URLs use the folder's ``queue.sqlite``."""
        return str(self.config.get("queue", {}).get("url", DEFAULT_URL))

    def open_queue(self, max_attempts: int = 5) -> Queue:
        """A new connection to the sweep's queue (the caller closes it): for a thread or
        process of its own. :class:`UsageError` when it is missing, corrupt or unreachable."""
        url = self.queue_url
        if parse_queue_url(url).kind == "sqlite":
            if self.remote:
                raise UsageError(f"sweep {self.storage.url!r} records a SQLite queue ({url!r}), which cannot live in a bucket")
            path = parse_queue_url(url).resolve(self.path)
            if not path.is_file():
                raise UsageError(f"sweep folder {str(self.path)!r} has no {QUEUE_FILE}" if url == DEFAULT_URL
                                 else f"sweep {str(self.path)!r}: its queue {str(path)!r} does not exist")
            if path.stat().st_size == 0:
                raise UsageError(f"{str(path)!r} is empty: the sweep's queue is lost; plan again into a new folder")
            try:
                q = open_queue(url, self.path, max_attempts=max_attempts)
                q.get(0)  # reads a page: a corrupt file fails here
            except sqlite3.DatabaseError as exc:
                raise UsageError(f"{str(path)!r} is not a readable queue ({exc}): corrupt? plan again into a new folder") from None
            return q
        return open_queue(url, self.path, max_attempts=max_attempts)

    @property
    def queue(self) -> Queue:
        """The sweep's queue (opened on first use, one connection per process)."""
        if self._queue is None:
            self._queue = self.open_queue()
        return self._queue

    @property
    def source(self) -> Source | None:
        """The source this sweep fetches from, once one was given (kept in sweep.toml with
        environment tokens unexpanded)."""
        cfg = self.config.get("source")
        return None if cfg is None else Source.from_config(cfg)

    def bind_source(self, source: Source | None) -> Source:
        """The source to fetch from: ``source`` (recorded on first use), or the recorded one.

        A different source than the recorded one is refused: it would mix imagery of two
        providers in one sweep. On object storage the first record is a conditional
        update (:meth:`update_config`): of two machines recording different sources at
        once, one records its own and the other is refused."""
        recorded = self.source
        if source is None:
            if recorded is None:
                raise UsageError(f"sweep {str(self.location)!r} has no source yet; pass --source TEMPLATE")
            return recorded
        if recorded is not None and recorded.to_config() == source.to_config():
            return recorded
        want = source.to_config()

        def record(cfg: dict[str, Any]) -> bool:
            rec = cfg.get("source")
            if rec is None:
                cfg["source"] = want
                return True
            old = Source.from_config(rec)
            if old.to_config() != want:
                raise UsageError(
                    f"sweep {str(self.location)!r} fetches from {old.redacted()!r}, not {source.redacted()!r}; "
                    "mixing sources in one sweep is refused: use a new sweep folder, or --replace-source "
                    "(docs/sources.md, Changing a sweep's source)"
                )
            return False

        self.update_config(record)
        return source

    def unbind_source(self) -> None:
        """Forget the recorded source (a run that recorded it found it gives no image);
        a different source another machine recorded meanwhile stays."""
        had = self.config.get("source")
        if had is None:
            return

        def forget(cfg: dict[str, Any]) -> bool:
            if cfg.get("source") != had:
                return False
            del cfg["source"]
            return True

        self.update_config(forget)

    def replace_source(self, source: Source, mix: bool = False) -> tuple[Source, int]:
        """Record ``source`` in place of the recorded one. Returns ``(source, requeued)``.

        Done blocks fetched from the old source with no tile image (all 404/empty: the old
        template was wrong) are queued again and their shards deleted, and unfinished
        shards are deleted, so that nothing of the old source's answers stays. Done blocks
        that hold tiles of the old source would mix two sources' imagery in one sweep:
        refused unless ``mix`` (they are then kept as they are)."""
        from .queue import State

        recorded = self.source
        if recorded is None or recorded.to_config() == source.to_config():
            return self.bind_source(source), 0
        queue = self.queue
        kept = queue.stats(window=1.0).results.ok
        if kept and not mix:
            raise UsageError(
                f"done blocks of sweep {str(self.location)!r} hold {kept:,} tiles from {recorded.redacted()!r}; replacing "
                "the source would mix imagery of two sources: pass --mix-sources to keep them, or use a new sweep folder"
            )
        store = self.store
        empty_done = []
        for b in queue.blocks(State.DONE):
            row = queue.get(b.id)
            if row is not None and not row["n_ok"]:
                empty_done.append(b)
        for b in empty_done:
            if store.storage is not None:
                store.storage.delete(store.shard_key(b.tile))
            else:
                store.shard_path(b.tile).unlink(missing_ok=True)
        requeued = queue.requeue([b.id for b in empty_done], f"source replaced: {recorded.redacted()} gave no image")
        if not mix:
            store.discard_partials()
        old, want = recorded.to_config(), source.to_config()

        def swap(cfg: dict[str, Any]) -> bool:
            raw = cfg.get("source")
            rec = None if raw is None else Source.from_config(raw).to_config()
            if rec != old and rec != want:  # another machine replaced it meanwhile
                now = "no source" if raw is None else repr(Source.from_config(raw).redacted())
                raise UsageError(f"sweep {str(self.location)!r}: its source was changed to {now} meanwhile; "
                                 "not replaced, run again")
            cfg["source"] = want
            return rec != want

        self.update_config(swap)
        return source, requeued

    @property
    def store(self) -> TileStore:
        """The sweep's tile store (``tiles/``, a folder or objects), one shard per block."""
        return TileStore(tiles_location(self.location), self.zoom, self.block_zoom, coarsest=self.block_zoom_min)

    @property
    def predictions_storage(self) -> Storage:
        """Where the sweep's prediction parts are published (``predictions/``)."""
        if self.remote:
            # staged in the state folder's predictions/, where a sink clears stale ones as on a local sweep
            return open_storage(f"{self.storage.url}/{PREDICTIONS_DIR}", staging=self.path / PREDICTIONS_DIR)
        return LocalStorage(self.path / PREDICTIONS_DIR)

    @property
    def area_path(self) -> Path:
        """A local file of the planned area (GeoJSON): ``SWEEP/area.geojson``, or for a
        sweep on object storage a copy in its state folder, read from the bucket."""
        if not self.remote:
            return self.path / AREA_FILE
        local = self.path / AREA_FILE
        LocalStorage(self.path).put(AREA_FILE, self.storage.read(str(self.plan_config.get("area", AREA_FILE))), replace=True)
        return local

    @property
    def predictions_path(self) -> Path:
        """The sweep's prediction folder (``predictions/``; see :mod:`tilesweep.predict`)."""
        return self.path / PREDICTIONS_DIR

    def status(self, window_s: float = 300.0) -> SweepStatus:
        """Where the sweep stands, reconciled against the plan."""
        try:
            stats = self.queue.stats(window=window_s)
        except sqlite3.DatabaseError as exc:  # a page corrupted after the file opened fine
            raise UsageError(f"{str(self.path / QUEUE_FILE)!r} is not a readable queue ({exc}): corrupt?") from None
        names = {State.PENDING: "pending", State.LEASED: "leased", State.DONE: "done", State.DEAD: "dead"}
        blocks = {names[s]: int(stats.blocks.get(s, 0)) for s in names}
        tiles = {names[s]: int(stats.tiles.get(s, 0)) for s in names}
        done_blocks, done_tiles, window = stats.done_last_window
        throughput = done_tiles / window if window > 0 else 0.0
        remaining = tiles["pending"] + tiles["leased"]
        eta = remaining / throughput if throughput > 0 else (0.0 if remaining == 0 else None)
        summary = self.summary()
        from .densify import rounds as densify_rounds

        rounds = densify_rounds(self.path)  # densify rounds add blocks to the plan
        planned_tiles = summary.tiles + sum(int(r["tiles"]) for r in rounds)
        planned_blocks = summary.blocks + sum(int(r["blocks"]) for r in rounds)
        mismatch = None
        if sum(tiles.values()) != planned_tiles or sum(blocks.values()) != planned_blocks:
            mismatch = (
                f"queue holds {sum(blocks.values())} blocks / {sum(tiles.values())} tiles "
                f"but the plan has {planned_blocks} blocks / {planned_tiles} tiles"
                + (" (with its densify rounds: a round cut short? `tilesweep densify` completes it)" if rounds else "")
            )
        elif stats.unbalanced:
            mismatch = f"{stats.unbalanced} done blocks have results that do not add up to their planned tiles"
        r = stats.results
        return SweepStatus(
            tiles_total=planned_tiles,
            blocks_total=planned_blocks,
            blocks=blocks,
            tiles=tiles,
            attempts_total=int(stats.attempts_total),
            throughput=throughput,
            window_s=window,
            eta_s=eta,
            mismatch=mismatch,
            plan={k: v for k, v in self.plan_config.items() if k not in ("area",)},
            results={"ok": r.ok, "empty": r.empty, "failed": r.failed, "bytes": r.bytes, "retries": r.retries},
            predictions=_ledger_summary(self.path),
            dead=self._dead_blocks() if blocks["dead"] else [],
            machines=machines(self.queue.owner_stats(window), window),
            densify=rounds,
        )

    def _dead_blocks(self, n: int = 10) -> list[dict[str, Any]]:
        """The first ``n`` dead blocks with their attempts and last error (why they died)."""
        out = []
        for d in self.queue.dead():
            out.append({"block": f"{d.block.z}/{d.block.x}/{d.block.y}", "attempts": d.attempts, "error": d.error})
            if len(out) >= n:
                break
        return out

    def query(self, sql: str, memory_limit: str | None = None, threads: int | None = None) -> Any:
        """Run DuckDB SQL over this sweep's ``predictions``, ``tiles``, ``blocks`` and
        ``plan`` (:mod:`tilesweep.sql`); returns a lazy ``duckdb.DuckDBPyRelation``
        (``.df()``, ``.pl()``, ``.arrow()``, ``.fetchall()``)."""
        from .sql import query

        return query(sql, self, memory_limit=memory_limit, threads=threads)

    def close(self) -> None:
        if self._queue is not None:
            self._queue.close()
            self._queue = None

    def __enter__(self) -> "Sweep":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def machines(owners: list[OwnerStats], window_s: float) -> list[dict[str, Any]]:
    """Owners grouped by host (an owner is ``host:pid:random``): per machine, its owners,
    blocks leased now, blocks and tiles done in the last ``window_s`` seconds, tiles/s over
    them, and its owners' last heartbeat (Unix seconds; None on SQLite), by host name."""
    out: dict[str, dict[str, Any]] = {}
    for o in owners:
        m = out.setdefault(o.host, {"host": o.host, "owners": [], "blocks_leased": 0, "blocks_done": 0, "tiles_done": 0,
                                    "tiles_per_s": 0.0, "last_seen": None})
        m["owners"].append(o.owner)
        m["blocks_leased"] += o.leased
        m["blocks_done"] += o.done_blocks
        m["tiles_done"] += o.done_tiles
        if o.seen_at is not None:
            m["last_seen"] = max(m["last_seen"] or 0.0, o.seen_at)
    for m in out.values():
        m["tiles_per_s"] = m["tiles_done"] / window_s if window_s > 0 else 0.0
    return [out[h] for h in sorted(out)]


def _queue_rows(chunk: BlockChunk, spec: PlanSpec):  # type: ignore[no-untyped-def]
    if chunk.packed is not None:  # adaptive blocks: a zoom and packed tiles each
        assert chunk.z is not None
        for z, x, y, n, packed, pr in zip(chunk.z.tolist(), chunk.x.tolist(), chunk.y.tolist(),
                                          chunk.counts.tolist(), chunk.packed, chunk.priority.tolist()):
            yield Block(z, x, y, n, packed), pr
        return
    bz = int(spec.block_zoom)  # type: ignore[arg-type]
    for i in range(len(chunk)):
        mask = None if chunk.masks is None else pack_mask(chunk.masks[i])
        if mask is not None and int(chunk.counts[i]) == 1 << (2 * spec.levels):
            mask = None
        block = Block(bz, int(chunk.x[i]), int(chunk.y[i]), int(chunk.counts[i]), mask)
        yield block, int(chunk.priority[i])


def _same_queue(url: str, recorded: str) -> bool:
    """Whether ``url`` names the ``recorded`` queue (a server URL without ``?schema=``
    matches the recorded one on the same server)."""
    a, b = parse_queue_url(url), parse_queue_url(recorded)
    if a.kind != b.kind:
        return False
    if a.kind == "sqlite":
        return a.path == b.path and a.relative == b.relative
    return redact(a.conninfo or "") == redact(b.conninfo or "") and a.schema in (None, b.schema)


MIRROR_KEY = "mirror_of"
"""``[sweep] mirror_of = URL`` marks a state folder's ``sweep.toml`` as a read-only copy."""


def _mirror(state: Path, config: dict[str, Any], url: str) -> None:
    """Copy ``config`` into the state folder's ``sweep.toml``, marked as the mirror of
    ``url``: what reads a sweep's folder (the prediction ledger finds the queue's URL in
    it) reads the bucket's sweep there, and :meth:`Sweep.open` of the state folder opens
    the URL, never a sweep of the state folder's own. Refreshed on every open."""
    mirror = {**config, "sweep": {**config.get("sweep", {}), MIRROR_KEY: url}}
    _write_atomic(state / SWEEP_FILE, tomli_w.dumps(mirror))


def _area_key(fingerprint: str) -> str:
    """The area's object in a sweep on object storage: named by the plan's fingerprint."""
    return f"area-{fingerprint}.geojson"


def _is_area_key(key: str) -> bool:
    return key.startswith("area-") and key.endswith(".geojson") and "/" not in key


def _check_estimate(area: Area, spec: PlanSpec, allow_huge: bool) -> None:
    why = estimate_plan(area.geometry, spec).too_big()
    if why is not None and not allow_huge:
        raise UsageError(
            f"plan of {area.source!r} at zoom {spec.zoom} is {why}: refused; pass --allow-huge "
            "(allow_huge=True) to plan it anyway, or --dry-run to see the estimate"
        )


def queue_url(path: SweepRef) -> str:
    """The queue URL recorded by the sweep at ``path`` (its folder's ``queue.sqlite`` when
    none is recorded)."""
    return Sweep.open(path).queue_url


def open_sweep_queue(path: SweepRef, max_attempts: int = 5) -> Queue:
    """A new connection to the queue of the sweep at ``path`` (the caller closes it)."""
    return Sweep.open(path).open_queue(max_attempts=max_attempts)


def _write_atomic(path: Path, text: str) -> None:
    """Publish ``text`` as ``path`` through the storage seam: staged under a ``.partial``
    name, fsynced, renamed over ``path``, folder fsynced."""
    from .storage import LocalStorage

    LocalStorage(path.parent).put(path.name, text.encode("utf-8"), replace=True)


def _ledger_summary(path: Path) -> list[dict[str, Any]]:
    from .predict.ledger import ledger_summary  # here: tilesweep.predict imports this module
    from .sql import models

    thresholds = {(m["name"], m["digest"]): m["threshold"] for m in models(path)}
    summary = ledger_summary(path)
    for m in summary:  # detections: the tiles the model labelled, at its threshold
        m["detections"] = m["positives"]
        m["threshold"] = thresholds.get((str(m["model"]), str(m["digest"])))
    return summary
