"""The durable block queue: a protocol and its embedded SQLite implementation."""

from .base import Block, BlockResult, DeadBlock, Lease, Queue, QueueStats, State
from .sqlite import SqliteQueue

__all__ = ["Block", "BlockResult", "DeadBlock", "Lease", "Queue", "QueueStats", "SqliteQueue", "State"]
