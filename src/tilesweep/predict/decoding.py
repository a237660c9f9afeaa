"""Where the pipeline decodes: threads of the model's process, decode processes, or the GPU.

``--decode`` (:attr:`PredictSettings.decode <tilesweep.predict.PredictSettings>`):

- ``threads``: decode threads in the model's process (``--threads``; simplejpeg releases
  the GIL, but between two calls each thread needs it: past 4-8 threads they queue);
- ``processes``: decode processes (``--decode-processes``, default half the cores, 2..8)
  handing pixels back through shared memory (:mod:`.shmring`), each with its own GIL;
- ``gpu``: a block's JPEGs in one nvJPEG call on the model's GPU (:mod:`.gpudecode`); the
  pixels stay on the device;
- ``auto`` (default): ``gpu`` when the model is a PyTorch model on CUDA and torchvision
  decodes there, else ``processes`` on more than 4 cores, else ``threads`` (a 2-core
  machine runs as before).

Every mode gives the model the same ``uint8[n, size, size, 3]`` inputs per block (gpu: to
nvJPEG's rounding), so the scores are the same; tests/test_decode_modes.py compares them.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Literal

import numpy as np

from ..errors import UsageError

DecodeMode = Literal["auto", "threads", "processes", "gpu"]
DECODE_MODES: tuple[str, ...] = ("auto", "threads", "processes", "gpu")


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_processes(n_cores: int | None = None) -> int:
    """Decode processes when not given: half the cores, at least 2, at most 8."""
    return max(2, min(8, (n_cores or cores()) // 2))


SLOT_INPUTS = 256
"""Model inputs one shared-memory slot holds: a block of the default 256 tiles."""


def ring_slots(processes: int, batch: int, queue_blocks: int) -> int:
    """Slots of the ring for ``processes`` decode processes (see :class:`ProcessDecode`)."""
    return processes * 2 + queue_blocks + -(-batch // max(1, SLOT_INPUTS // 4)) + 3


def ring_bytes(processes: int, size: int, batch: int, queue_blocks: int) -> int:
    """Shared memory the ring of :func:`ring_slots` takes for ``size`` px inputs."""
    from .shmring import RingSpec

    return RingSpec("", ring_slots(processes, batch, queue_blocks), SLOT_INPUTS, size).total_bytes


def choose_decode(mode: str, model: Any, n_cores: int | None = None, ring: int | None = None) -> tuple[str, str]:
    """``(mode, why)``: the decode mode to use for ``model`` (see the module doc); ``why``
    says in a few words why ``auto`` chose it. ``ring``: the bytes of shared memory
    ``processes`` would take; ``auto`` does not choose it when ``/dev/shm`` lacks them. A
    mode that cannot run here (``gpu`` without torchvision's GPU decode) is a one-line
    :class:`UsageError`."""
    if mode not in DECODE_MODES:
        raise UsageError(f"decode {mode!r} is not auto, threads, processes or gpu")
    n = n_cores or cores()
    if mode == "gpu":
        from .gpudecode import gpu_decode_available

        ok, why = gpu_decode_available()
        if not ok:
            raise UsageError(f"--decode gpu: {why}; use --decode threads or processes")
        return "gpu", "asked for"
    if mode != "auto":
        return mode, "asked for"
    if getattr(model, "device", "cpu") == "cuda" and getattr(model, "accepts_device_pixels", False):
        from .gpudecode import gpu_decode_available

        ok, why = gpu_decode_available()
        if ok:
            return "gpu", "the model runs on CUDA and torchvision decodes JPEG there"
    if n > 4:
        from .shmring import shm_free_bytes

        free = shm_free_bytes()
        if ring is not None and free is not None and ring > free * 0.9:
            return "threads", f"{n} cores, but /dev/shm has {free / 2**20:,.0f} MiB free, not the {ring / 2**20:,.0f} MiB decode processes need"
        return "processes", f"{n} cores"
    return "threads", f"{n} cores"


def concat(chunks: list[Any]) -> Any:
    """Join batch chunks: numpy arrays, or torch tensors (the GPU path)."""
    if len(chunks) == 1:
        return chunks[0]
    if isinstance(chunks[0], np.ndarray):
        return np.concatenate(chunks)
    import torch

    return torch.cat(chunks)


class ProcessDecode:
    """The pipeline's decode stage in decode processes: :meth:`dispatch` (one thread) hands
    each block's tiles to the :class:`~.shmring.DecodePool`, in jobs of at most a slot's
    inputs; :meth:`gather` (another thread) puts each block, whole, on to the model with
    ``inputs`` a view of its slot, ``owner`` and ``bad``; :meth:`release` (from
    ``finish``) gives its slot back once the model is done with it.

    A block whose tiles span several slots, or a small one (under a quarter of a slot),
    is copied out of its slots at once and holds none: the slots the model may wait on
    while it fills a batch are then bounded, and the ring never runs dry while the model
    waits for more inputs (``extra_slots`` counts them)."""

    def __init__(self, processes: int, size: int, how: Any, *, batch: int, queue_blocks: int,
                 stop: threading.Event, stopped: type[BaseException], width: int, meter: Any,
                 capacity: int = SLOT_INPUTS) -> None:
        from .shmring import DecodePool

        self.capacity = capacity
        self.small = max(1, capacity // 4)
        slots = ring_slots(processes, batch, queue_blocks) if capacity == SLOT_INPUTS else None
        extra = queue_blocks + -(-batch // self.small) + 3
        self.pool = DecodePool(processes, size, how, capacity=capacity, slots=slots, extra_slots=extra)
        self.stop, self.stopped = stop, stopped
        self.width, self.meter = width, meter
        self.size = size
        self.per_tile = 1  # inputs per tile, learned (chips)
        self._lock = threading.Lock()
        self._outstanding = 0
        self._sent_all = threading.Event()
        self._direct: list[Any] = []  # blocks with no tile to decode
        self._parts: dict[int, list[Any]] = {}

    def dispatch(self, get: Callable[[], Any], end: Any) -> None:
        """Until ``end`` comes from ``get``: send each block's tiles to the pool."""
        try:
            while True:
                work = get()
                if work is end:
                    return
                step = max(1, self.capacity // self.per_tile)
                pieces = [work.data[i : i + step] for i in range(0, len(work.data), step)]
                with self._lock:
                    self._outstanding += 1
                    if not pieces:
                        self._direct.append(work)
                        continue
                    self._parts[id(work)] = [None] * len(pieces)
                for i, piece in enumerate(pieces):
                    while not self.pool.submit((work, i, len(pieces)), piece, timeout=0.1):
                        if self.stop.is_set():
                            raise self.stopped
        finally:
            self._sent_all.set()

    def gather(self, put: Callable[[Any], None]) -> None:
        """Put decoded blocks on to the model until every block sent has come back."""
        while True:
            if self.stop.is_set():
                raise self.stopped
            with self._lock:
                direct, self._direct = self._direct, []
            for work in direct:
                self._finish(work, [])
                put(work)
            d = self.pool.get(timeout=0.1)
            if d is None:
                with self._lock:
                    if self._sent_all.is_set() and self._outstanding == 0 and not self._direct:
                        return
                continue
            work, i, n = d.key
            if n > 1:  # a part of a block over several slots: copied out and its slot freed now,
                # so a block of any size passes through a ring of any size
                d.pixels, d.owner = np.array(d.pixels), np.array(d.owner)
                self.pool.release(d.slot)
                d.slot = -1
            with self._lock:
                parts = self._parts[id(work)]
                parts[i] = d
                whole = all(p is not None for p in parts)
                if whole:
                    del self._parts[id(work)]
            if whole:
                self._finish(work, parts)
                put(work)

    def _finish(self, work: Any, parts: list[Any]) -> None:
        with self._lock:
            self._outstanding -= 1
        busy = sum(p.busy_s for p in parts)
        bad = np.concatenate([p.bad for p in parts]) if parts else np.zeros(0, bool)
        n_in = sum(len(p.pixels) + (0 if p.extra is None else len(p.extra)) for p in parts)
        if parts and any(p.extra is not None for p in parts) and len(bad):  # chips: fewer tiles a job from now on
            self.per_tile = max(self.per_tile, -(-n_in // max(1, int((~bad).sum()))))
        if len(parts) == 1 and parts[0].extra is None and len(parts[0].pixels) >= self.small:
            p = parts[0]
            work.inputs, work.owner, work.slots = p.pixels, p.owner.astype(np.int64), [p.slot]
        else:  # several slots, chips over a slot, or a small block: copy out, release now
            inputs, owners = [], []
            offset = 0  # piece j holds the block's tiles offset .. offset + len(p.bad)
            for p in parts:
                inputs.append(np.array(p.pixels) if p.slot >= 0 else p.pixels)
                owners.append(p.owner.astype(np.int64) + offset)
                if p.extra is not None:
                    inputs.append(p.extra)
                    owners.append(p.extra_owner.astype(np.int64) + offset)
                offset += len(p.bad)
                if p.slot >= 0:
                    self.pool.release(p.slot)
            work.inputs = np.concatenate(inputs) if inputs else np.zeros((0, self.size, self.size, 3), np.uint8)
            work.owner = np.concatenate(owners) if owners else np.zeros(0, np.int64)
            work.slots = []
        work.bad = bad
        work.raw = np.empty((len(work.inputs), self.width), np.float32)
        work.data = []
        self.meter.add(len(bad), busy)

    def release(self, work: Any) -> None:
        """The model is done with ``work``'s inputs: its slot goes back to the ring."""
        slots = getattr(work, "slots", None)
        if slots:
            work.inputs = None  # the view goes before the slot is written again
            for slot in slots:
                self.pool.release(slot)
            work.slots = []

    @property
    def deaths(self) -> list[str]:
        return self.pool.deaths

    def close(self) -> None:
        self.pool.close()


def gpu_decode_work(decoder: Any, work: Any, width: int) -> None:
    """Decode ``work``'s tiles on the GPU (:class:`~.gpudecode.GpuDecoder`) into
    ``work.inputs`` (a device tensor), ``owner`` and ``bad``."""
    work.inputs, work.owner, work.bad = decoder.decode_block(work.data)
    work.raw = np.empty((len(work.inputs), width), np.float32)
    work.data = []


__all__ = ["DECODE_MODES", "SLOT_INPUTS", "DecodeMode", "ProcessDecode", "choose_decode", "concat", "cores", "default_processes", "gpu_decode_work", "ring_bytes", "ring_slots"]
