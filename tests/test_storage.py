"""The storage seam's contract, one suite for every implementation: a local folder (with
renameat2, and with its link fallback) and S3 on a real SeaweedFS server on loopback.

Create-if-absent under racing threads and processes (exactly one winner, the others get
AlreadyPublished, the winner's bytes stay), what is published reads back whole from a
fresh handle, listing by prefix, range reads, delete, and a writer killed between write
and publish leaves nothing visible."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from helpers import seaweed
from tilesweep import storage as storage_mod
from tilesweep.storage import AlreadyPublished, LocalStorage, StorageError, open_storage


@pytest.fixture(params=["local", "local-link", "s3"])
def location(request, tmp_path, monkeypatch) -> tuple[str, dict[str, str]]:
    """``(url or folder, environment for child processes)`` of an empty storage root."""
    if request.param == "s3":
        sw = request.getfixturevalue("s3_server")
        env = sw.env()
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        return f"s3://{seaweed.BUCKET}/t-{uuid.uuid4().hex[:12]}", env
    env = {}
    if request.param == "local-link":  # a kernel or file system without renameat2
        monkeypatch.setattr(storage_mod, "_have_renameat2", False)
        env["TILESWEEP_TEST_NO_RENAMEAT2"] = "1"
    return str(tmp_path / "root"), env


def test_publish_is_create_if_absent_and_durable(location, tmp_path):
    url, _ = location
    st = open_storage(url)
    st.put("a/b/one.bin", b"first")
    with pytest.raises(AlreadyPublished) as e:
        st.put("a/b/one.bin", b"second")
    assert isinstance(e.value, FileExistsError) and "already exists" in str(e.value) and e.value.key == "a/b/one.bin"
    staged = st.staging_path("a/b/two.bin")
    staged.write_bytes(b"x" * 100_000)
    st.publish(staged, "a/b/two.bin")
    assert not staged.exists(), "publish consumes the staging file"
    staged = st.staging_path("a/b/two.bin")
    staged.write_bytes(b"y")
    with pytest.raises(AlreadyPublished):
        st.publish(staged, "a/b/two.bin")
    st.put("a/b/one.bin", b"replaced", replace=True)  # exports overwrite an earlier export
    fresh = open_storage(url)  # a new handle (another process would see the same)
    assert fresh.read("a/b/one.bin") == b"replaced"
    assert fresh.read("a/b/two.bin") == b"x" * 100_000 and fresh.size("a/b/two.bin") == 100_000
    assert fresh.exists("a/b/two.bin") and not fresh.exists("a/b/three.bin")
    with pytest.raises(FileNotFoundError):
        fresh.read("a/b/three.bin")


def test_racing_threads_exactly_one_wins(location):
    url, _ = location
    st = open_storage(url)
    n = 12
    gate = threading.Barrier(n)
    won: list[int] = []
    lost: list[int] = []

    def race(i: int) -> None:
        gate.wait()
        try:
            st.put("race/key", f"writer {i} ".encode() * 1000)
            won.append(i)
        except AlreadyPublished:
            lost.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == n - 1, (won, lost)
    assert st.read("race/key") == f"writer {won[0]} ".encode() * 1000
    assert [o.key for o in st.list("race/")] == ["race/key"]


RACER = """
import os, sys, time
from tilesweep import storage
if os.environ.get("TILESWEEP_TEST_NO_RENAMEAT2"):
    storage._have_renameat2 = False
url, i, at = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
st = storage.open_storage(url)
data = (f"process {i} " * 5000).encode()
time.sleep(max(0.0, at - time.time()))
try:
    st.put("race/proc", data)
    print("won")
except storage.AlreadyPublished as e:
    print("lost", type(e).__name__)
"""

VICTIM = """
import os, signal, sys
from tilesweep import storage
if os.environ.get("TILESWEEP_TEST_NO_RENAMEAT2"):
    storage._have_renameat2 = False
st = storage.open_storage(sys.argv[1], **({"staging": sys.argv[2]} if sys.argv[1].startswith("s3:") else {}))
staged = st.staging_path("crash/key")
with open(staged, "wb") as f:
    f.write(b"half of an object" * 1000)
    f.flush()
    os.fsync(f.fileno())
print(staged, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # between write and publish
"""


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH")) if p)
    return env


def test_racing_processes_exactly_one_wins(location):
    url, extra = location
    at = time.time() + 1.5  # every racer has imported and opened the storage by then
    procs = [
        subprocess.Popen([sys.executable, "-c", RACER, url, str(i), str(at)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=_child_env(extra))
        for i in range(4)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    results = [o[0].strip() for o in outs]
    assert sorted(results) == ["lost AlreadyPublished"] * 3 + ["won"], results
    winner = results.index("won")
    assert open_storage(url).read("race/proc") == (f"process {winner} " * 5000).encode()


def test_list_range_reads_and_delete(location):
    url, _ = location
    st = open_storage(url)
    payload = bytes(range(256)) * 40
    for key in ("a/1", "a/2", "ab/3", "b/x/4"):
        st.put(key, payload)
    st.staging_path("a/5").write_bytes(b"staged, never published")
    assert sorted(o.key for o in st.list("a/")) == ["a/1", "a/2"]
    assert sorted(o.key for o in st.list("a")) == ["a/1", "a/2", "ab/3"]
    assert sorted((o.key, o.size) for o in st.list()) == [(k, len(payload)) for k in ("a/1", "a/2", "ab/3", "b/x/4")]
    assert list(st.list("nothing/")) == []
    assert st.read_range("a/1", 0, 10) == payload[:10]
    assert st.read_range("a/1", 5000, 300) == payload[5000:5300]
    assert st.read_range("a/1", len(payload) - 4, 100) == payload[-4:]  # short at the end
    assert st.read_range("a/1", len(payload) + 10, 5) == b""
    with st.open_read("b/x/4") as f:
        f.seek(1000)
        assert f.read(24) == payload[1000:1024]
    with pytest.raises(FileNotFoundError):
        st.read_range("a/9", 0, 1)
    st.delete("a/1")
    st.delete("a/1")  # absent: nothing happens
    assert not st.exists("a/1") and sorted(o.key for o in st.list("a/")) == ["a/2"]


def test_a_writer_killed_between_write_and_publish_leaves_nothing_visible(location, tmp_path):
    url, extra = location
    staging = tmp_path / "victim-staging"
    r = subprocess.run([sys.executable, "-c", VICTIM, url, str(staging)], capture_output=True, text=True,
                       env=_child_env(extra), timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert Path(r.stdout.strip()).stat().st_size > 0, "the staging file was written"
    st = open_storage(url)
    assert list(st.list()) == [] and not st.exists("crash/key")
    st.put("crash/key", b"whole")  # the next writer publishes; a stale staging file is not in the way
    assert [(o.key, o.size) for o in st.list()] == [("crash/key", 5)]
    assert open_storage(url).read("crash/key") == b"whole"


def test_bad_keys_and_schemes_are_one_line_storage_errors(tmp_path):
    st = LocalStorage(tmp_path)
    for key in ("", "/abs", "a/../b", "a//b", "dir/", "x.partial"):
        with pytest.raises(StorageError, match="bad storage key"):
            st.put(key, b"1")
    with pytest.raises(StorageError, match="unsupported scheme 'ftp'") as e:
        open_storage("ftp://user:pw@host/x")
    assert "pw" not in str(e.value)


def test_s3_bad_bucket_credentials_endpoint_name_what_failed(s3_server, monkeypatch):
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist") as e:
        open_storage("s3://no-such-bucket/sweep")
    assert len(str(e.value).splitlines()) == 1
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageError, match="credentials refused") as e:
        open_storage(f"s3://{seaweed.BUCKET}/sweep")
    assert "wrong" not in str(e.value) and len(str(e.value).splitlines()) == 1
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(StorageError, match="cannot reach http://127.0.0.1:9"):
        open_storage(f"s3://{seaweed.BUCKET}/sweep")
    with pytest.raises(StorageError, match="must not hold credentials") as e:
        open_storage("s3://key:secret@bucket/x")
    assert "secret" not in str(e.value)


def test_a_shard_writer_that_loses_the_publish_race_keeps_the_first_shard(tmp_path):
    """Two writers of one block (on two machines, or a re-lease after a lost ack): the
    second publish finds the block's shard published and the first shard stands."""
    from tilesweep.store import Status, TileStore
    from tilesweep.tiles import Tile

    block = Tile(14, 100, 200)
    tiles = [Tile(18, (100 << 4) + i, 200 << 4) for i in range(4)]
    other = TileStore(tmp_path / "other", 18, 14)
    with other.writer(block) as w:
        for t in tiles:
            w.append(t, Status.OK, b"first:" + bytes([t.x & 255]))
        w.finish()
    store = TileStore(tmp_path / "mine", 18, 14)
    w = store.writer(block)
    for t in tiles[:2]:
        w.append(t, Status.OK, b"second")
    w.flush()
    store.shard_path(block).write_bytes(other.shard_path(block).read_bytes())  # published meanwhile
    summary = w.finish()
    assert summary.ok == 4, "the published shard's summary, not this writer's"
    assert w.published_by_other, "the tee hands the published shard, not its own fetch (runner._do_block)"
    assert store.get(tiles[0]) == b"first:" + bytes([tiles[0].x & 255])
    assert sorted(p.name for p in store.shard_path(block).parent.iterdir()) == ["200.shard"]


def test_export_to_s3_publishes_the_same_archive_and_bad_targets_exit_2(s3_server, tmp_path, monkeypatch):
    """`tilesweep export SWEEP s3://bucket/prefix/name.pmtiles`: the object, read back
    with ranged reads by the official PMTiles reader, holds every stored tile; an existing object is not replaced without --force; a missing bucket or refused
    credentials are one line, exit 2, and nothing is written."""
    from helpers.cli import tilesweep
    from pmtiles.reader import all_tiles

    from tilesweep.sim import World, run_in_thread
    from tilesweep.store import TileStore

    env = s3_server.env()
    sweep = tmp_path / "s"
    with run_in_thread(World(seed=3)) as sim:
        tilesweep("plan", "8.500,47.300,8.508,47.305", sweep, "--zoom", 18, "--block-zoom", 16)
        tilesweep("fetch", sweep, "--source", sim.template(), "--quiet")
    prefix = f"s3://{seaweed.BUCKET}/exports-{uuid.uuid4().hex[:8]}"
    r = tilesweep("export", sweep, f"{prefix}/sweep.pmtiles", "--staging", tmp_path / "stage", env=env)
    assert f"wrote {prefix}/sweep.pmtiles (pmtiles)" in r.stdout
    assert (tmp_path / "stage").is_dir() and not [p for p in (tmp_path / "stage").rglob("*") if p.is_file()]
    r = tilesweep("export", sweep, f"{prefix}/sweep.pmtiles", env=env, check=False)
    assert r.returncode == 2 and "exists; pass --force" in r.stderr and "Traceback" not in r.stderr
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    st = open_storage(prefix)
    got = dict(all_tiles(lambda offset, length: st.read_range("sweep.pmtiles", offset, length)))  # range reads
    store = TileStore(sweep / "tiles", 18, 16)
    want = {tuple(t): data for t, data in store.iter_tiles()}
    assert got == want and len(want) > 20
    assert [o.key for o in st.list()] == ["sweep.pmtiles"], "no staging object"
    cases = [
        ({}, "s3://no-such-bucket/x/sweep.pmtiles", "bucket 'no-such-bucket' does not exist"),
        ({"AWS_SECRET_ACCESS_KEY": "wrong"}, f"{prefix}/other.pmtiles", "credentials refused"),
    ]
    for over, url, needle in cases:
        r = tilesweep("export", sweep, url, env={**env, **over}, check=False)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert [o.key for o in st.list()] == ["sweep.pmtiles"]


def test_a_tile_store_on_s3_two_machines_race_on_a_block_one_shard_wins(s3_server, tmp_path, monkeypatch):
    """A TileStore at s3://bucket/prefix: unfinished shards stay in each machine's local
    staging folder (resumable), finished ones are published create-if-absent. Two
    machines writing one block: the first shard stands, the second writer gets its
    summary; a writer that stops before finishing publishes nothing; readers on a third
    machine see exactly the published shards, tile for tile (ranged GETs: block 1's shard
    is larger than the tail a reader fetches), and export them."""
    from pmtiles.reader import MmapSource, all_tiles

    from tilesweep.store import Status, TileStore, export_pmtiles
    from tilesweep.tiles import Tile, tile_id

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    url = f"s3://{seaweed.BUCKET}/store-{uuid.uuid4().hex[:8]}/tiles"
    a = TileStore(url, 18, 14, staging=tmp_path / "machine-a")
    b = TileStore(url, 18, 14, staging=tmp_path / "machine-b")
    b1, b2, b3 = Tile(14, 8580, 5737), Tile(14, 8581, 5737), Tile(14, 8580, 5738)

    def tiles_of(block, n=6):
        return [Tile(18, (block.x << 4) + i, (block.y << 4) + i) for i in range(n)]

    wa, wb = a.writer(b1), b.writer(b1)  # both machines leased the block
    for t in tiles_of(b1):
        wa.append(t, Status.OK, b"A" * (30_000 + t.x % 7))
        wb.append(t, Status.OK, b"B" * 50)
    assert wa.finish().ok == 6
    assert wb.finish() == wa.finish(), "the loser returns the published shard's summary"
    assert not list((tmp_path / "machine-b").rglob("*.partial")), "the loser's partial is gone"
    with a.writer(b2) as w:
        w.append(tiles_of(b2)[0], Status.OK, b"two")
        w.append(tiles_of(b2)[1], Status.EMPTY, None)
        w.finish()
    w = a.writer(b3)  # stops (or is killed) after a flush: durable locally, not published
    w.append(tiles_of(b3)[0], Status.OK, b"three")
    w.flush()
    w.abort()

    c = TileStore(url, 18, 14, staging=tmp_path / "machine-c")
    assert sorted(c.blocks()) == sorted([b1, b2]) and c.is_complete(b1) and not c.is_complete(b3)
    assert all(c.get(t) == b"A" * (30_000 + t.x % 7) for t in tiles_of(b1))
    assert c.get_record(tiles_of(b2)[1]) == (Status.EMPTY, None)
    assert c.verify().ok == 2 and c.stats()["tiles"] == 8
    assert a.partial_blocks() == [b3] and c.partial_blocks() == []
    with a.writer(b3) as again:  # the same machine resumes it
        assert again.done_ids == {tile_id(tiles_of(b3)[0])}
    gets: list[tuple[str, int]] = []
    real_range = type(c.storage).read_range

    def counted(self, key, start, length):
        gets.append((key, length))
        return real_range(self, key, start, length)

    monkeypatch.setattr(type(c.storage), "read_range", counted)
    c.close()
    export_pmtiles(c, tmp_path / "c.pmtiles")
    monkeypatch.setattr(type(c.storage), "read_range", real_range)
    assert len([g for g in gets if g[0].endswith(f"{b1.y}.shard") and "8580/" in g[0]]) <= 4, (
        "block 1's tiles come from one held GET, not one each", gets)
    with open(tmp_path / "c.pmtiles", "rb") as f:
        got = dict(all_tiles(MmapSource(f)))
    assert got == {tuple(t): data for t, data in c.iter_tiles()} and len(got) == 7


def test_s3_failures_are_storage_errors_whatever_digits_the_key_holds(s3_server, tmp_path, monkeypatch):
    """The endpoint stops answering after the store was opened: every request is one
    StorageError line, never AlreadyPublished or an empty read because the key (and so the
    URL in obstore's message) holds 409/412/416; a shard writer whose publish failed keeps
    its partial (resumable), and a file:// URL naming a host is refused."""
    from obstore.store import S3Store

    from tilesweep.store import Status, TileStore
    from tilesweep.tiles import Tile

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    store = TileStore(f"s3://{seaweed.BUCKET}/gone-{uuid.uuid4().hex[:8]}", 18, 14, staging=tmp_path / "staging")
    st = store.storage
    block = Tile(14, 412, 1033)  # key 14/412/1033.shard
    w = store.writer(block)
    w.append(Tile(18, 412 << 4, 1033 << 4), Status.OK, b"tile bytes")
    w.flush()
    dead = S3Store(seaweed.BUCKET, prefix=st.prefix, endpoint="http://127.0.0.1:9", client_options={"allow_http": True},
                   retry_config={"max_retries": 0, "retry_timeout": __import__("datetime").timedelta(seconds=1)})
    monkeypatch.setattr(st, "_store", dead)  # the endpoint went away
    with pytest.raises(StorageError, match="cannot reach"):
        w.finish()
    assert w.data_path.exists() and w.data_path.stat().st_size > 32, "the finished partial is kept"
    for call in (lambda: st.put("12/412/1033.shard", b"x"), lambda: st.put("12/409/1.shard", b"x"),
                 lambda: st.read_range("12/416/1.shard", 0, 10), lambda: st.size("a"), lambda: list(st.list("a/"))):
        with pytest.raises(StorageError, match="cannot reach") as e:
            call()
        assert len(str(e.value).splitlines()) == 1
    with pytest.raises(StorageError, match="names host 'tiles'"):
        open_storage("file://tiles/store")
    assert open_storage(f"file://localhost{tmp_path}").url == str(tmp_path)


def test_a_file_system_without_renameat2_or_hard_links_still_publishes(tmp_path, monkeypatch):
    """FUSE mounts (gcsfuse, rclone, s3fs), vboxsf and 9p answer renameat2 flags with
    EINVAL and link with EPERM: publishing falls back to check-then-rename, still
    create-if-absent for a second publisher, and a shard is finished and read back."""
    import errno as errno_mod

    from tilesweep.store import Status, TileStore
    from tilesweep.tiles import Tile

    def no_links(src, dst, *a, **k):
        raise PermissionError(errno_mod.EPERM, "Operation not permitted", str(dst))

    monkeypatch.setattr(storage_mod, "_have_renameat2", False)
    monkeypatch.setattr(os, "link", no_links)
    st = LocalStorage(tmp_path / "root")
    st.put("a/one", b"first")
    staged = st.staging_path("a/one")
    staged.write_bytes(b"second")
    with pytest.raises(AlreadyPublished):
        st.publish(staged, "a/one")
    assert st.read("a/one") == b"first" and staged.read_bytes() == b"second"
    store = TileStore(tmp_path / "store", 18, 14)
    tile = Tile(18, 100 << 4, 200 << 4)
    with store.writer(Tile(14, 100, 200)) as w:
        w.append(tile, Status.OK, b"tile")
        assert w.finish().ok == 1
    assert TileStore(tmp_path / "store", 18, 14).get(tile) == b"tile"


def test_s3_single_writer_publish_streams_a_multipart_upload_after_a_check(s3_server, tmp_path, monkeypatch):
    """An export is its name's one writer: it is published by a streamed multipart
    upload (no 5 GiB single-PUT limit, not read into memory), create-if-absent by a HEAD
    before it; shards keep the atomic conditional PUT."""
    import obstore

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    st = open_storage(f"s3://{seaweed.BUCKET}/mp-{uuid.uuid4().hex[:8]}", staging=tmp_path / "stage")
    monkeypatch.setattr(storage_mod, "MULTIPART_CHUNK", 5 * 1024**2)  # S3's smallest part
    staged = st.staging_path("big.pmtiles", unique=False)
    payload = os.urandom(1024) * (11 * 1024)  # 11 MiB: three parts
    staged.write_bytes(payload)
    st.publish(staged, "big.pmtiles", single_writer=True)
    assert not staged.exists() and st.read("big.pmtiles") == payload
    etag = obstore.head(st._store, "big.pmtiles")["e_tag"]
    assert etag and etag.strip('"').endswith("-3"), f"a multipart upload's ETag names its parts: {etag}"
    staged.write_bytes(b"again")
    with pytest.raises(AlreadyPublished):
        st.publish(staged, "big.pmtiles", single_writer=True)
    st.publish(staged, "big.pmtiles", replace=True)
    assert st.read("big.pmtiles") == b"again"


def test_quarantine_on_s3_moves_a_corrupt_shard_aside_but_never_a_good_one_published_since(s3_server, tmp_path, monkeypatch):
    """Machine A found block 1's shard corrupt; before its quarantine runs, machine B (its
    own quarantine done, the block fetched again) has published a good shard there: A's
    quarantine leaves it in place. A corrupt shard is still copied aside and deleted."""
    from tilesweep.store import Status, TileStore
    from tilesweep.tiles import Tile

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    url = f"s3://{seaweed.BUCKET}/store-{uuid.uuid4().hex[:8]}/tiles"
    a = TileStore(url, 18, 14, staging=tmp_path / "machine-a")
    block = Tile(14, 8580, 5737)
    with a.writer(block) as w:
        w.append(Tile(18, block.x << 4, block.y << 4), Status.OK, b"good")
        w.finish()
    key = a.shard_key(block)
    assert a.quarantine(block) is None  # a good shard (the one published since): left alone
    assert a.is_complete(block) and a.get(Tile(18, block.x << 4, block.y << 4)) == b"good"
    good = a.storage.read(key)
    a.storage.put(key, good[:-9] + bytes(9), replace=True)  # its footer overwritten: corrupt
    aside = a.quarantine(block)
    assert aside == f"{url}/{key}.corrupt" and not a.is_complete(block)
    assert a.storage.read(f"{key}.corrupt") == good[:-9] + bytes(9)
    _, version = a.storage.read_versioned(f"{key}.corrupt")
    a.storage.put(f"{key}.corrupt", b"other bytes", replace=True)  # changed after the read
    assert not a.storage.delete_if_version(f"{key}.corrupt", version) and a.storage.exists(f"{key}.corrupt")
