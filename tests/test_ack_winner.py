"""Acks of a block two writers scored (a lease lost to a slow worker): the ledger keeps
the first record, so the queue must be acked with that record's counts, not with the
fetch of the writer that lost the race. Real sinks, a real streaming Worker over the
simulator, the real queue and `reconcile`."""

import time

import numpy as np
import pytest

from tilesweep.block import TileStatus
from tilesweep.fetch import FetchSettings
from tilesweep.predict import BlockRows, PredictionSink
from tilesweep.predict.sink import reconcile
from tilesweep.sim import World, run_in_thread
from tilesweep.sources import parse_source
from tilesweep.sweep import Sweep, open_sweep_queue
from tilesweep.tiles import Tile, bounds
from tilesweep.worker import Worker, WorkerSettings

ZOOM = 18
X0, Y0 = 137312, 91872  # on the 4-grid: one zoom-16 block of 16 tiles


def _bbox() -> str:
    w, _, _, n = bounds(Tile(ZOOM, X0, Y0))
    _, s, e, _ = bounds(Tile(ZOOM, X0 + 3, Y0 + 3))
    d = (e - w) / 64
    return f"{w + d:.7f},{s + d:.7f},{e - d:.7f},{n - d:.7f}"


class RacedConsumer:
    """Stands for the prediction pipeline, with real sinks: when the worker hands a block,
    another writer (sink ``first``) records it first with other counts (250 ok + 6 failed
    where this fetch saw 256 ok), then this writer's sink commits it, losing, and reports
    its commit to the worker as the pipeline does."""

    def __init__(self, sweep):
        self.first = PredictionSink(sweep, ZOOM, "m", "", ["score"], 0.5)
        self.second = PredictionSink(sweep, ZOOM, "m", "", ["score"], 0.5)
        self.worker = None
        self.winners = {}

    def done_result(self, block):
        return None

    def take(self, block, results):
        ok = [r for r in results if r.status is TileStatus.OK]
        x = np.array([r.tile.x for r in ok], np.int64)
        y = np.array([r.tile.y for r in ok], np.int64)
        s = np.full((len(ok), 1), 0.9, np.float32)
        self.first.add(BlockRows(block.id, block.tile.z, x[1:], y[1:], s[1:], len(results) - len(ok), 1, time.time()))
        self.first.commit()
        self.second.add(BlockRows(block.id, block.tile.z, x, y, s, len(results) - len(ok), 0, time.time()))
        durable = self.second.commit()
        self.winners.update(durable.winners)
        self.worker.committed(durable, durable.winners)
        return True

    def end(self):
        pass

    def close(self):
        self.first.close()
        self.second.close()


@pytest.mark.timeout(60)
def test_a_block_lost_to_another_writer_is_acked_with_the_ledgers_counts(tmp_path):
    sweep = tmp_path / "s"
    from tilesweep.area import load_area
    from tilesweep.plan import PlanSpec

    sw, _ = Sweep.plan(sweep, load_area(_bbox()), PlanSpec(zoom=ZOOM, block_zoom=ZOOM - 2))
    with run_in_thread(World(seed=5)) as srv:
        src = sw.bind_source(parse_source(srv.template()))
        sw.close()
        consumer = RacedConsumer(sweep)
        try:
            worker = Worker(sweep, ZOOM, ZOOM - 2, src, FetchSettings(), WorkerSettings(probe_blocks=0), consumer=consumer)
            consumer.worker = worker
            worker.run()
        finally:
            consumer.close()
    assert len(consumer.winners) == 1, "the second sink's commit names the block it lost, with the winner's counts"
    (bid, (rows, empty, failed)), = consumer.winners.items()
    assert failed == 1
    q = open_sweep_queue(sweep)
    try:
        acked = dict(q.results())[bid]
        assert (acked.ok, acked.empty, acked.failed) == (rows, empty, failed)
        rec = reconcile(sweep, q, "m", "")
    finally:
        q.close()
    assert rec.mismatched == 0 and rec.blocks == 1


def test_a_block_handed_twice_while_in_flight_is_queued_once(tmp_path):
    """The single-process path: a runner that re-leased a block after its own lease
    expired hands it again while the first copy is still in the pipeline; the copy is
    dropped (one part would otherwise hold its rows twice), and after its commit the block
    may be handed (and queued) again."""
    from tilesweep.block import Block
    from tilesweep.fetch import TileResult
    from tilesweep.predict.pipeline import PredictionConsumer

    sweep = tmp_path / "s"
    sweep.mkdir()
    queued = []
    with PredictionSink(sweep, ZOOM, "m", "", ["score"], 0.5) as sink:
        consumer = PredictionConsumer(sink, set(), queued.append, in_flight=set())
        block = Block(ZOOM - 2, X0 // 4, Y0 // 4, 16)
        results = [TileResult(Tile(ZOOM, X0, Y0), TileStatus.OK, b"x", 1, None, 200)]
        assert consumer.take(block, results) and consumer.take(block, results)
        assert len(queued) == 1
        consumer.in_flight.discard(block.id)  # as the pipeline does when the sink commits it
        assert consumer.take(block, results) and len(queued) == 2


class Recorder:
    """Stands for the prediction pipeline: keeps the bytes of what it is handed and
    reports each block durable at once."""

    def __init__(self):
        self.worker = None
        self.handed = {}

    def done_result(self, block):
        return None

    def take(self, block, results):
        self.handed.update({r.tile: r.data for r in results if r.status is TileStatus.OK})
        self.worker.committed([block.id])
        return True

    def end(self):
        pass


@pytest.mark.timeout(60)
def test_a_tee_that_loses_the_shard_race_hands_the_published_shard(tmp_path):
    """run --keep-tiles: another machine publishes the block's shard while this tee still
    fetches it; the tee's publish loses, and what it hands to the model is the published
    shard's bytes (the ones in the store), not its own fetch."""
    import threading

    from tilesweep.area import load_area
    from tilesweep.plan import PlanSpec
    from tilesweep.sim import Faults
    from tilesweep.store import Status, TileStore

    sweep = tmp_path / "s"
    sw, _ = Sweep.plan(sweep, load_area(_bbox()), PlanSpec(zoom=ZOOM, block_zoom=ZOOM - 2))
    block = Tile(ZOOM - 2, X0 // 4, Y0 // 4)
    tiles = [Tile(ZOOM, X0 + i, Y0 + j) for j in range(4) for i in range(4)]
    other = TileStore(tmp_path / "other", ZOOM, ZOOM - 2)
    with other.writer(block) as w:
        for t in tiles:
            w.append(t, Status.OK, b"other machine")
        w.finish()
    target = sweep / "tiles" / other.shard_path(block).relative_to(tmp_path / "other")
    with run_in_thread(World(seed=5), Faults(latency_ms=100)) as srv:
        src = sw.bind_source(parse_source(srv.template()))
        sw.close()

        def publish_meanwhile():  # once the tee fetches (its shard is open): 16 tiles, one at a time, 1.6 s
            while srv.stats["requests"] < 1:
                time.sleep(0.01)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(other.shard_path(block).read_bytes())

        racer = threading.Thread(target=publish_meanwhile)
        racer.start()
        consumer = Recorder()
        worker = Worker(sweep, ZOOM, ZOOM - 2, src, FetchSettings(concurrency=1), WorkerSettings(probe_blocks=0),
                        consumer=consumer, keep_tiles=True)
        consumer.worker = worker
        worker.run()
        racer.join()
    assert set(consumer.handed) == set(tiles)
    assert set(consumer.handed.values()) == {b"other machine"}, "the tee handed its own fetch, not the stored shard"
