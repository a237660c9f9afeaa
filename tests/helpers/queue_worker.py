"""A queue worker run as a real subprocess by tests/test_queue_processes.py.

usage: queue_worker.py QUEUE OWNER LOG --batch N --ttl S --work S
Leases blocks, appends "<id>\n" per block to LOG (fsynced: the block's "output"), then acks
them together. Exits when nothing is pending."""

import argparse
import os
import time

from tilesweep.queue import SqliteQueue

p = argparse.ArgumentParser()
p.add_argument("queue")
p.add_argument("owner")
p.add_argument("log")
p.add_argument("--batch", type=int, default=4)
p.add_argument("--ttl", type=float, default=60)
p.add_argument("--work", type=float, default=0.0)
a = p.parse_args()

with SqliteQueue(a.queue, max_attempts=10) as q, open(a.log, "a") as log:
    while leases := q.lease(a.batch, ttl=a.ttl, owner=a.owner):
        for lease in leases:
            time.sleep(a.work)
            log.write(f"{lease.block.id}\n")
        log.flush()
        os.fsync(log.fileno())
        q.ack([lease.block.id for lease in leases])
