"""The durable block queue: a protocol, opened from a URL (:func:`open_queue`), with an
embedded SQLite implementation and a shared PostgreSQL one."""

from .base import Block, BlockRecord, BlockResult, DeadBlock, Lease, OwnerStats, Queue, QueueStats, State
from .sqlite import SqliteQueue
from .url import DEFAULT_URL, StagedQueue, open_queue, parse_queue_url, redact, stage_queue

__all__ = [
    "Block", "BlockRecord", "BlockResult", "DEFAULT_URL", "DeadBlock", "Lease", "OwnerStats", "Queue", "QueueStats", "SqliteQueue",
    "StagedQueue", "State", "open_queue", "parse_queue_url", "redact", "stage_queue",
]
