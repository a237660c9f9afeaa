"""A queue worker run as a real subprocess by tests/test_queue_processes.py and
tests/test_queue_contract.py.

usage: queue_worker.py QUEUE OWNER LOG --batch N --ttl S --work S
QUEUE is a queue URL (sqlite:///..., postgresql://...) or a SQLite file's path.
Leases blocks, appends "<id>\n" per block to LOG (fsynced: the block's "output"), then acks
them together. Exits when nothing is pending."""

import argparse
import os
import time
from pathlib import Path

from tilesweep.queue import open_queue

p = argparse.ArgumentParser()
p.add_argument("queue")
p.add_argument("owner")
p.add_argument("log")
p.add_argument("--batch", type=int, default=4)
p.add_argument("--ttl", type=float, default=60)
p.add_argument("--work", type=float, default=0.0)
a = p.parse_args()
url = a.queue if ":" in a.queue.split("/")[0] else "sqlite:///" + str(Path(a.queue).resolve()).lstrip("/")

with open_queue(url, max_attempts=10) as q, open(a.log, "a") as log:
    while leases := q.lease(a.batch, ttl=a.ttl, owner=a.owner):
        for lease in leases:
            time.sleep(a.work)
            log.write(f"{lease.block.id}\n")
        log.flush()
        os.fsync(log.fileno())
        q.ack([lease.block.id for lease in leases])
