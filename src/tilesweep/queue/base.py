"""The queue's vocabulary: blocks, their states, leases, statistics and the protocol.

A block moves ``pending -> leased(owner, until) -> done``; a lease that expires or is
nacked sends it back to ``pending``. It goes to ``dead``, with its last error, after
``max_attempts`` *failed* attempts (nacks), or after ``max_lost`` (a generous cap) leases
that expired: an owner that was killed or crashed is not a failure of the block, but a
block that crashes its worker every time must still end. ``retry_dead`` puts dead blocks back. Processing is at-least-once: a
worker writes the block's outputs under a name derived from the block before it acks, so
doing a block twice yields the same outputs once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Iterable, Iterator, Mapping, NamedTuple, Protocol, TypedDict

from ..block import Block, BlockResult  # re-exported: the shared types live in tilesweep.block


class State(IntEnum):
    """A block's state in the queue (stored as this integer)."""

    PENDING = 0
    LEASED = 1
    DONE = 2
    DEAD = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class Lease(NamedTuple):
    """A leased block: held by ``owner`` until ``until`` (Unix seconds); ``attempt`` counts
    from 1."""

    block: Block
    owner: str
    until: float
    attempt: int


class DeadBlock(NamedTuple):
    block: Block
    attempts: int
    error: str | None


@dataclass(frozen=True)
class QueueStats:
    """Counts by state, in blocks and in tiles.

    ``attempts_total`` sums leases ever taken; ``done_last_window`` is ``(blocks, tiles,
    seconds)`` done in the last ``seconds`` (the window is shortened to the time since work
    began, so a young sweep reports its true rate); ``results`` sums the :class:`BlockResult`
    of done blocks; ``unbalanced`` counts done blocks whose recorded results do not add up
    to their planned tiles (it must be 0)."""

    blocks: dict[State, int]
    tiles: dict[State, int]
    attempts_total: int
    done_last_window: tuple[int, int, float]
    results: BlockResult = field(default_factory=BlockResult)
    unbalanced: int = 0


class OwnerStats(NamedTuple):
    """One lease owner (``host:pid:random``, see :func:`tilesweep.worker.new_owner`): the
    blocks it leases now, the blocks and tiles it acked in the last ``window`` seconds,
    and when it was last seen (its heartbeat, Unix seconds; None where the backend keeps
    none: SQLite)."""

    owner: str
    leased: int
    done_blocks: int
    done_tiles: int
    seen_at: float | None = None

    @property
    def host(self) -> str:
        return self.owner.partition(":")[0]


class BlockRecord(TypedDict):
    """One block's whole record in a queue (inspection, ``verify``, tests): the same keys
    on every backend. Times are Unix seconds; ``n_*`` and ``stored`` are None until acked
    with results; ``attempts`` counts leases taken, ``failures`` nacks, ``lost`` expired
    leases."""

    id: int
    z: int
    x: int
    y: int
    tiles: int
    mask: bytes | None
    priority: int
    state: State
    owner: str | None
    lease_until: float | None
    attempts: int
    last_error: str | None
    done_at: float | None
    n_ok: int | None
    n_empty: int | None
    n_failed: int | None
    n_bytes: int | None
    n_retries: int | None
    failures: int
    lost: int
    stored: int | None


RECORD_FIELDS: tuple[str, ...] = tuple(BlockRecord.__annotations__)


class Queue(Protocol):
    """A durable lease queue of blocks, opened from a URL by :func:`tilesweep.queue.open_queue`.

    Implementations: :mod:`tilesweep.queue.sqlite` (one file, embedded) and
    :mod:`tilesweep.queue.postgres` (a shared server); both pass the one contract suite
    (tests/test_queue_contract.py). ``url`` names the queue without any password."""

    url: str
    max_attempts: int
    max_lost: int

    def put(self, items: Iterable[tuple[Block, int]]) -> int:
        """Add ``(block, priority)`` pairs (lower priority is leased first); blocks already
        queued are left as they are. Returns how many were inserted."""

    def lease(self, n: int, ttl: float, owner: str) -> list[Lease]:
        """Lease up to ``n`` pending blocks for ``ttl`` seconds; empty when none is pending."""

    def ack(self, ids: Iterable[int], results: Mapping[int, BlockResult] | None = None) -> int:
        """Mark blocks done (idempotent); returns how many changed state."""

    def nack(self, block_id: int, error: str, owner: str | None = None) -> State:
        """Give a block back after a failure: pending again, or dead after max failed attempts.
        With ``owner``, only while ``owner`` holds the lease (so it is safe to repeat)."""

    def extend(self, ids: Iterable[int], ttl: float, owner: str) -> list[int]:
        """Push the leases ``owner`` still holds to ``ttl`` seconds from now; returns their ids."""

    def release(self, owner: str) -> int:
        """Give back every lease of ``owner`` unfinished, without counting an attempt."""

    def owners(self) -> dict[str, int]:
        """Owners of current leases and how many blocks each holds."""

    def owner_stats(self, window: float = 300.0) -> list[OwnerStats]:
        """Every owner that leases now or acked in the last ``window`` seconds, by owner
        (``status`` groups them by host: each machine's loops and rates)."""

    def expire(self, owner: str) -> int:
        """End ``owner``'s leases now (the owner is known to be dead)."""

    def count(self, state: State) -> int:
        """Blocks in ``state``."""

    def requeue_expired(self) -> int:
        """Return expired leases to pending (or dead); returns how many moved."""

    def requeue(self, ids: Iterable[int], error: str | None = None) -> int:
        """Put the given blocks back to pending whatever their state (e.g. a corrupt shard)."""

    def retry_dead(self) -> int:
        """Put dead blocks back to pending with their attempts reset."""

    def dead(self) -> Iterator[DeadBlock]:
        """Dead blocks with their attempts and last error."""

    def stats(self, window: float = 300.0) -> QueueStats:
        """Counts by state and recent throughput."""

    def get(self, block_id: int) -> BlockRecord | None:
        """One block's record, or None when it is not in the queue."""

    def blocks(self, state: State | None = None, kept: bool | None = None) -> Iterator[Block]:
        """Blocks (optionally of one state) in id order (streams). ``kept``: True, only
        blocks whose tiles are meant to be in a shard (stored, or not known); False, only
        blocks streamed without keeping their tiles; None, both."""

    def results(self) -> Iterator[tuple[int, BlockResult | None]]:
        """``(block id, results)`` of every done block in id order (streams); None for a
        block acked without results."""

    def records(self, lo: int | None = None, hi: int | None = None) -> Iterator[BlockRecord]:
        """Every block's record in id order (streams; for queries over the queue); with
        ``lo``/``hi``, only ids in ``[lo, hi)`` (a quadtree cell's blocks: the viewer)."""

    def close(self) -> None: ...

    def __enter__(self) -> "Queue": ...

    def __exit__(self, *exc: object) -> None: ...

    def blocks_by_id(self, ids: Iterable[int]) -> Iterator[Block]:
        """The queued blocks among ``ids`` (any state, id order); ids not queued are left out."""
