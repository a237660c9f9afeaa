"""Decoding in other processes, the pixels handed back through shared memory.

One process's decode threads share one GIL: between two libjpeg-turbo calls each thread
needs it, and past 4-8 threads they only queue for it (about 7,000 tiles/s of 256 px on a
16-core machine). :class:`DecodePool` decodes in ``processes`` processes instead, each with
its own GIL, and hands the fitted ``uint8[n, size, size, 3]`` pixels back to the model's
process through a :class:`ShmRing`, a ring of fixed-size slots in one POSIX shared-memory
segment, so no pixel array is ever pickled: a decode process gets a block's compressed
bytes (about 10 kB a tile) and a slot number through a pipe, writes the pixels and the
slot's metadata (how many inputs, which tile each came from) into the slot, and answers
with a few small arrays (which tiles did not decode, its busy seconds). The model's process
reads views of the slot and gives the slot back (:meth:`DecodePool.release`) only once the
model is done with it.

Crash safety:

- Slots are handed out by the parent alone (no lock shared between processes that a dying
  process could leave held). A decode process that dies, by a signal or an error, holds
  nothing: the parent sees it go (its pipe closes), decodes its unanswered jobs again (in
  another decode process, or itself when none is left), into the same slots, and the run
  goes on with the same results; :attr:`DecodePool.deaths` names it.
- The segment is unlinked by :meth:`DecodePool.close` (the pipeline calls it on every
  exit path: the end, an error, SIGINT/SIGTERM), and by an ``atexit`` hook as a last
  resort. If the parent is killed (SIGKILL), its decode processes see their pipe close
  and exit, and Python's resource tracker, a process of its own that outlives the
  parent, unlinks the segment once they are gone.

Names start with :data:`SHM_PREFIX` (``/dev/shm/tilesweep-...`` on Linux), so a leak is
easy to spot.
"""

from __future__ import annotations

import atexit
import weakref
import multiprocessing as mp
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from multiprocessing.connection import Connection, wait
from typing import Any, Literal

import numpy as np

from ..errors import UsageError

SHM_PREFIX = "tilesweep-"
"""Every segment this module creates is named ``tilesweep-{pid}-{random}``."""

_ALIGN = 64
_HEADER_INTS = 2  # n_inputs, job sequence number; then owner[capacity]


@dataclass(frozen=True)
class RingSpec:
    """What another process needs to attach a ring: the segment's name, the slot count,
    the model inputs a slot holds and their side in px."""

    name: str
    slots: int
    capacity: int
    size: int

    @property
    def header_bytes(self) -> int:
        raw = 4 * (_HEADER_INTS + self.capacity)
        return -(-raw // _ALIGN) * _ALIGN

    @property
    def pixel_bytes(self) -> int:
        return self.capacity * self.size * self.size * 3

    @property
    def slot_bytes(self) -> int:
        return self.header_bytes + -(-self.pixel_bytes // _ALIGN) * _ALIGN

    @property
    def total_bytes(self) -> int:
        return self.slots * self.slot_bytes


def shm_free_bytes() -> int | None:
    """Bytes free in ``/dev/shm`` (None where there is no such folder)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class ShmRing:
    """``slots`` slots of ``capacity`` model inputs (``uint8[size, size, 3]`` each) in one
    shared-memory segment. Each slot: a header ``int32[2 + capacity]`` (inputs written,
    job number, then the tile index of each input) and the pixels.

    :meth:`create` makes the segment (the owner unlinks it: :meth:`unlink`); :meth:`attach`
    maps an existing one by its :class:`RingSpec` (from another process)."""

    def __init__(self, spec: RingSpec, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self.spec = spec
        self._shm: shared_memory.SharedMemory | None = shm
        self.owner = owner
        buf = shm.buf
        if buf is None:  # closed already
            raise ValueError(f"shared memory {shm.name!r} is closed")
        self._headers = []
        self._pixels = []
        for i in range(spec.slots):
            base = i * spec.slot_bytes
            self._headers.append(np.frombuffer(buf, np.int32, _HEADER_INTS + spec.capacity, base))
            self._pixels.append(
                np.frombuffer(buf, np.uint8, spec.pixel_bytes, base + spec.header_bytes).reshape(
                    spec.capacity, spec.size, spec.size, 3
                )
            )
        self._unlinked = False

    @classmethod
    def create(cls, slots: int, capacity: int, size: int) -> "ShmRing":
        """A new ring. Refuses (:class:`UsageError`, one line) a ring that would not fit
        in ``/dev/shm``'s free space: a segment larger than its tmpfs is created without
        error and kills the process with SIGBUS when written."""
        if slots < 1 or capacity < 1 or size < 1:
            raise ValueError(f"a ring needs slots, capacity and size >= 1 (got {slots}, {capacity}, {size})")
        spec = RingSpec(f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}", slots, capacity, size)
        free = shm_free_bytes()
        if free is not None and spec.total_bytes > free * 0.9:
            raise UsageError(
                f"decode processes need {spec.total_bytes / 2**20:,.0f} MiB of shared memory "
                f"({slots} slots of {capacity} x {size}x{size} px) and /dev/shm has {free / 2**20:,.0f} MiB free: "
                "use --decode threads, or a smaller --batch / fewer decode processes"
            )
        shm = shared_memory.SharedMemory(spec.name, create=True, size=spec.total_bytes)
        ring = cls(spec, shm, owner=True)
        _live.add(ring)
        _mapped.add(ring)
        return ring

    @classmethod
    def attach(cls, spec: RingSpec) -> "ShmRing":
        ring = cls(spec, shared_memory.SharedMemory(spec.name), owner=False)
        _mapped.add(ring)
        return ring

    def pixels(self, slot: int) -> np.ndarray:
        """The slot's pixel array, ``uint8[capacity, size, size, 3]`` (a view)."""
        return self._pixels[slot]

    def header(self, slot: int) -> np.ndarray:
        """The slot's header, ``int32[2 + capacity]`` (a view): inputs written, job number,
        then the tile index of each input."""
        return self._headers[slot]

    def inputs(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """``(pixels, owner)`` of what the slot holds: views of its first ``n`` inputs."""
        h = self._headers[slot]
        n = int(h[0])
        return self._pixels[slot][:n], h[_HEADER_INTS : _HEADER_INTS + n]

    def close(self) -> None:
        """Unmap the segment (views of it must be gone); the owner also unlinks it."""
        if self.owner:
            self.unlink()
        shm, self._shm = self._shm, None
        if shm is None:
            return
        self._headers, self._pixels = [], []
        try:
            shm.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with the process
            # ... and SharedMemory.__del__ must not try again at exit (an "Exception ignored"
            # traceback on the terminal of a stopped run): the mmap object stays alive
            # through the views that hold it, and dies with them or with the process.
            if getattr(shm, "_mmap", None) is not None:
                shm._mmap = None  # type: ignore[attr-defined]

    def unlink(self) -> None:
        """Remove the segment's name (idempotent); mapped views stay valid until closed."""
        if self._unlinked or not self.owner:
            return
        self._unlinked = True
        _live.discard(self)
        try:
            if self._shm is not None:
                self._shm.unlink()
            else:
                shared_memory.SharedMemory(self.spec.name).unlink()
        except FileNotFoundError:
            pass


_live: set[ShmRing] = set()
_mapped: weakref.WeakSet[ShmRing] = weakref.WeakSet()  # every ring still mapped (closed at exit)


@atexit.register
def _unlink_all() -> None:  # the last resort: an exit that skipped the pipeline's own close
    for ring in list(_live):
        ring.unlink()
    for ring in list(_mapped):  # quietly: a stop may leave views alive (close's BufferError)
        ring.close()


# --- decoding one job into a slot (in a decode process, or in the parent as a fallback) ---

Fit = Literal["resize", "chip"]


def decode_into(ring: ShmRing, slot: int, seq: int, datas: list[bytes], size: int, how: Fit) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Decode ``datas`` and fit each tile to ``size`` px (:func:`tilesweep.decode.fit`)
    into ``slot``: its header gets the count and each input's tile index. Returns
    ``(bad, extra, extra_owner)``: ``bool[len(datas)]`` for the tiles that did not decode,
    and the inputs that did not fit in the slot (chipped tiles can give more inputs than
    tiles), which then travel by pipe (``None`` when everything fit, the usual case)."""
    from ..decode import decode, fit

    px = ring.pixels(slot)
    hdr = ring.header(slot)
    cap = ring.spec.capacity
    bad = np.zeros(len(datas), bool)
    n = 0
    extra: list[np.ndarray] = []
    extra_owner: list[np.ndarray] = []
    for i, data in enumerate(datas):
        try:
            p = fit(decode(data), size, how)
        except ValueError:  # DecodeError, or an image that does not fit
            bad[i] = True
            continue
        k = len(p)
        if n + k <= cap:
            px[n : n + k] = p
            hdr[_HEADER_INTS + n : _HEADER_INTS + n + k] = i
            n += k
        else:
            extra.append(np.ascontiguousarray(p))
            extra_owner.append(np.full(k, i, np.int32))
    hdr[0] = n
    hdr[1] = seq
    if not extra:
        return bad, None, None
    return bad, np.concatenate(extra), np.concatenate(extra_owner)


def _decode_main(spec: RingSpec, size: int, how: Fit, tasks: Connection, results: Connection) -> None:
    """A decode process: jobs ``(seq, slot, datas)`` in, ``(seq, bad, extra, extra_owner,
    busy_s)`` out, until ``None`` or the parent's end of the pipe closes."""
    import signal

    # A stop is the parent's business: it closes our pipe when it is done with us. (Both
    # signals were blocked from before our start, so a Ctrl-C to the terminal's process group
    # while we imported printed no traceback of ours.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    ring = ShmRing.attach(spec)
    crash_after = int(os.environ.get("TILESWEEP_TEST_DECODE_CRASH", "0") or 0)  # a test hook: die as a bug would
    done = 0
    try:
        while True:
            try:
                job = tasks.recv()
            except (EOFError, OSError):
                return
            if job is None:
                return
            seq, slot, datas = job
            if crash_after and done >= crash_after:
                os._exit(3)
            t0 = time.perf_counter()
            bad, extra, extra_owner = decode_into(ring, slot, seq, datas, size, how)
            busy = time.perf_counter() - t0
            try:
                results.send((seq, bad, extra, extra_owner, busy))
            except (BrokenPipeError, OSError):
                return
            done += 1
    finally:
        ring.close()


@dataclass
class Decoded:
    """One job's result: ``key`` as submitted, its ``slot``, the inputs (``pixels``, a view
    of the slot, then ``extra`` if any) with the tile index of each (``owner``), which
    tiles did not decode (``bad``) and the decode seconds it took."""

    key: Any
    slot: int
    pixels: np.ndarray
    owner: np.ndarray
    bad: np.ndarray
    extra: np.ndarray | None
    extra_owner: np.ndarray | None
    busy_s: float


@dataclass
class _Proc:
    index: int
    process: Any
    tasks: Connection
    results: Connection
    jobs: dict[int, tuple[Any, int, list[bytes]]] = field(default_factory=dict)  # seq -> (key, slot, datas)
    alive: bool = True


class DecodePool:
    """``processes`` decode processes over one :class:`ShmRing` (module doc).

    :meth:`submit` (one thread) sends a job to the least busy live process once a slot is
    free (it waits for one: the ring is the backpressure), :meth:`get` (another thread)
    returns results as they come, :meth:`release` gives a slot back, :meth:`close` ends
    the processes and unlinks the segment. ``capacity``: model inputs a slot holds (a job
    has at most that many tiles); ``slots``: default ``2 * processes + extra_slots``, the
    extra ones being those the stages after decoding may hold."""

    def __init__(self, processes: int, size: int, how: Fit = "resize", *, capacity: int = 256,
                 slots: int | None = None, extra_slots: int = 8, per_process: int = 2) -> None:
        if processes < 1:
            raise ValueError(f"decode processes {processes} must be >= 1")
        self.size, self.how, self.capacity = size, how, capacity
        self.per_process = per_process
        self.ring = ShmRing.create(slots or processes * per_process + extra_slots, capacity, size)
        self._cond = threading.Condition()
        self._free: deque[int] = deque(range(self.ring.spec.slots))
        self._done: deque[Decoded] = deque()
        self._seq = 0
        self._closed = False
        self._error: BaseException | None = None
        self.deaths: list[str] = []
        self.busy_s = 0.0
        self.procs: list[_Proc] = []
        ctx = mp.get_context("spawn")
        import signal

        # the children inherit a mask with the stop signals blocked until they ignore them;
        # here they are held, then delivered, as soon as the processes are started
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for i in range(processes):
                t_recv, t_send = ctx.Pipe(duplex=False)
                r_recv, r_send = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_decode_main, args=(self.ring.spec, size, how, t_recv, r_send),
                                name=f"tilesweep-decode-{i}", daemon=True)
                p.start()
                t_recv.close()
                r_send.close()
                self.procs.append(_Proc(i, p, t_send, r_recv))
            # A stop held meanwhile is delivered here (it may raise KeyboardInterrupt): inside
            # the try, so that the processes started are ended, not left to hang the exit.
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            self._reader = threading.Thread(target=self._read_results, name="tilesweep-decode-results", daemon=True)
            self._reader.start()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            self.close()
            raise

    @property
    def processes(self) -> int:
        return len(self.procs)

    def submit(self, key: Any, datas: list[bytes], timeout: float | None = None) -> bool:
        """Decode ``datas`` (at most ``capacity`` tiles) as job ``key``: waits for a free
        slot and a process with room. Returns False if ``timeout`` passed first (nothing
        sent). When every decode process is dead the job is decoded here, in this thread."""
        if len(datas) > self.capacity:
            raise ValueError(f"a job of {len(datas)} tiles is more than a slot's {self.capacity}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("the decode pool is closed")
                live = [p for p in self.procs if p.alive]
                target = min(live, key=lambda p: len(p.jobs)) if live else None
                if self._free and (target is None or len(target.jobs) < self.per_process):
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.1 if left is None else min(left, 0.1))
            slot = self._free.popleft()
            self._seq += 1
            seq = self._seq
            if target is not None:
                target.jobs[seq] = (key, slot, datas)
        if target is None:
            self._decode_here(seq, key, slot, datas)
        else:
            self._send(target, seq, key, slot, datas)
        return True

    def _send(self, proc: _Proc, seq: int, key: Any, slot: int, datas: list[bytes]) -> None:
        try:
            proc.tasks.send((seq, slot, datas))
        except (BrokenPipeError, OSError):  # it died: the reader thread re-does its jobs
            self._dead(proc)

    def _decode_here(self, seq: int, key: Any, slot: int, datas: list[bytes]) -> None:
        t0 = time.perf_counter()
        bad, extra, extra_owner = decode_into(self.ring, slot, seq, datas, self.size, self.how)
        self._finished(key, slot, bad, extra, extra_owner, time.perf_counter() - t0)

    def _finished(self, key: Any, slot: int, bad: np.ndarray, extra: Any, extra_owner: Any, busy: float) -> None:
        pixels, owner = self.ring.inputs(slot)
        with self._cond:
            self.busy_s += busy
            self._done.append(Decoded(key, slot, pixels, owner, bad, extra, extra_owner, busy))
            self._cond.notify_all()

    def _dead(self, proc: _Proc) -> None:
        """``proc`` is gone: name it, and decode its unanswered jobs again elsewhere."""
        with self._cond:
            if not proc.alive:
                return
            proc.alive = False
            jobs, proc.jobs = proc.jobs, {}
        p = proc.process
        p.join(1.0)
        code = p.exitcode
        how = "still running" if code is None else (f"killed by signal {-code}" if code < 0 else f"exit status {code}")
        if not self._closed:
            self.deaths.append(f"decode process {proc.index} (pid {p.pid}) died ({how}); its {len(jobs)} jobs were decoded again")
        for seq, (key, slot, datas) in sorted(jobs.items()):
            with self._cond:
                live = [q for q in self.procs if q.alive]
                target = min(live, key=lambda q: len(q.jobs)) if live else None
                if target is not None:
                    target.jobs[seq] = (key, slot, datas)
            if self._closed:
                return
            if target is None:
                self._decode_here(seq, key, slot, datas)
            else:
                self._send(target, seq, key, slot, datas)

    def _read_results(self) -> None:
        try:
            self._read_loop()
        except BaseException as exc:  # a bug here must not leave get() waiting forever
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _read_loop(self) -> None:
        while not self._closed:
            with self._cond:
                live = [p for p in self.procs if p.alive]
            if not live:
                time.sleep(0.05)
                continue
            by_conn: dict[Any, _Proc] = {p.results: p for p in live}
            by_conn.update({p.process.sentinel: p for p in live})
            try:
                ready = wait(list(by_conn), timeout=0.1)
            except OSError:
                continue
            for obj in ready:
                proc = by_conn[obj]
                if obj is proc.results:
                    try:
                        seq, bad, extra, extra_owner, busy = proc.results.recv()
                    except (EOFError, OSError):
                        self._dead(proc)
                        continue
                    with self._cond:
                        job = proc.jobs.pop(seq, None)
                        self._cond.notify_all()
                    if job is not None:
                        self._finished(job[0], job[1], bad, extra, extra_owner, busy)
                elif proc.alive and not proc.results.poll():  # exited with nothing more to say
                    self._dead(proc)

    def get(self, timeout: float | None = None) -> Decoded | None:
        """The next finished job, or None after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._done:
                if self._error is not None:
                    raise RuntimeError(f"the decode pool's reader failed: {self._error!r}") from self._error
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            return self._done.popleft()

    def release(self, slot: int) -> None:
        """The model is done with ``slot``'s pixels: it may be written again."""
        with self._cond:
            self._free.append(slot)
            self._cond.notify_all()

    @property
    def free_slots(self) -> int:
        with self._cond:
            return len(self._free)

    def close(self) -> None:
        """End the decode processes (ask, then kill after a second) and unlink the
        segment. Idempotent; safe on every exit path."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        for p in self.procs:
            try:
                p.tasks.send(None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 1.0
        for p in self.procs:
            p.process.join(max(0.0, deadline - time.monotonic()))
            if p.process.is_alive():
                p.process.kill()
                p.process.join(1.0)
            for c in (p.tasks, p.results):
                c.close()
        reader = getattr(self, "_reader", None)
        if reader is not None and reader is not threading.current_thread():
            reader.join(1.0)
        with self._cond:
            self._done.clear()
        self.ring.close()

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["SHM_PREFIX", "DecodePool", "Decoded", "RingSpec", "ShmRing", "decode_into", "shm_free_bytes"]
