"""Work in processes: start N children, read their typed messages, report deaths.

Everything that sends work to processes (``fetch --workers N``, ``run --keep-tiles``,
``run --workers N``) goes through :class:`ProcessPool` on the parent's side and
:func:`child_main` on the child's. The contract:

- children are ``spawn``-ed and get their parent's pid as an argument (an orphan that read
  ``getppid()`` after its imports would see 1 and never learn it is orphaned);
- the parent asks them to stop through one :class:`StopFlag` (never SIGTERM), and a stop
  signal to the parent during start-up stops the children started so far;
- **nothing shared between children takes a lock**: a child killed by ``kill -9`` while it
  held a lock shared with the others (a ``multiprocessing.Queue``'s write lock, an
  ``Event``'s condition) would hang every other process at its next write or look, and a
  child killed half-way through a message on a shared pipe would leave the reader waiting
  for the rest forever. So each child writes only to pipes of its own (:class:`Outbox`),
  whose other end the parent alone holds (:class:`Inbox`): a child that dies closes its
  pipe, and a half message reads as the end of that child, never as a hang; the stop
  request is one byte of shared memory;
- a child talks to its parent in the messages below, small frozen dataclasses, on its
  progress pipe; the parent tells a clean end (:class:`Finished`) from a refusal
  (:class:`Refused`, a one-line ``UsageError``: every child stops), a full disk
  (:class:`DiskFull`) and a crash (:class:`Crashed`, then exit status 1);
- a child that dies (a signal, a crash) is recorded in :class:`WorkerDeaths`, whose
  :meth:`~WorkerDeaths.error` is the one line the command ends with.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import queue as queue_mod
import select
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn, Union

from . import signals
from .errors import UsageError, WorkerDied

# --- messages, child -> parent ---------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """The child's counters so far (sent at most every half second)."""

    index: int
    counters: Any


@dataclass(frozen=True)
class Finished:
    """The child's last word after a clean end: its final counters."""

    index: int
    counters: Any


@dataclass(frozen=True)
class Refused:
    """The child stopped on a :class:`~tilesweep.errors.UsageError` (e.g. a source that
    refuses every request): ``line`` is what the command prints; every child stops."""

    index: int
    line: str


@dataclass(frozen=True)
class DiskFull:
    """The child stopped on ENOSPC at ``path`` after releasing its leases."""

    index: int
    path: str


@dataclass(frozen=True)
class Crashed:
    """The child hit an unexpected error, ``line`` (its type and first line); it exits 1."""

    index: int
    line: str


Message = Union[Progress, Finished, Refused, DiskFull, Crashed]


def crash_line(exc: BaseException) -> str:
    """A worker's unexpected error as one line: its type and its message's first line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# --- the channels between parent and children ------------------------------------------


class StopFlag:
    """The parent's request that its children stop: one byte of shared memory, read and
    written without a lock (an ``mp.Event`` takes a lock to read itself, which a child
    killed at that moment would take with it). Safe to set from a signal handler."""

    def __init__(self, ctx: Any) -> None:
        self._flag = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._flag.value = 1

    def is_set(self) -> bool:
        return bool(self._flag.value)


class Outbox:
    """A child's end of a pipe only it writes to (see the module doc). :meth:`put` sends a
    message whole (blocking while the pipe is full: that is the backpressure) and returns
    False once the parent is gone; :meth:`offer` sends only if the pipe has room now."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = threading.Lock()  # the child's threads share the pipe, never its processes

    def __getstate__(self) -> dict[str, Any]:
        return {"conn": self._conn}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._conn = state["conn"]
        self._lock = threading.Lock()

    def put(self, msg: Any) -> bool:
        with self._lock:
            try:
                self._conn.send(msg)
                return True
            except OSError:  # BrokenPipeError: nobody reads now (the parent is gone)
                return False

    def offer(self, msg: Any) -> bool:
        """Send ``msg`` if the pipe can take it now without waiting, for periodic snapshots
        (the next one says the same and more)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            _, room, _ = select.select([], [self._conn.fileno()], [], 0)
            if not room:
                return False
            self._conn.send(msg)
            return True
        except OSError:
            return False
        finally:
            self._lock.release()

    def cancel_join_thread(self) -> None:
        """Nothing to let go of (a pipe has no feeder thread); here for :func:`let_go`."""

    def close(self) -> None:
        """Close this end (the parent's copy, once the child has its own)."""
        self._conn.close()


class Inbox:
    """The parent's ends of its children's pipes, read as one stream of messages. A pipe
    whose child has exited is read to its end, then dropped; a message cut off by the
    child's death ends that pipe (:meth:`closed`), it never blocks the reader."""

    def __init__(self) -> None:
        self._conns: dict[int, Any] = {}
        self._closed: set[int] = set()

    def add(self, index: int, conn: Any) -> None:
        self._conns[index] = conn

    def drop(self, index: int) -> None:
        """Forget child ``index`` (one that was never started)."""
        conn = self._conns.pop(index, None)
        if conn is not None:
            conn.close()

    def closed(self, index: int) -> bool:
        """Whether child ``index``'s pipe has ended (it exited or died)."""
        return index in self._closed

    def get(self, timeout: float = 0.0) -> Any:
        """The next message from any child, waiting up to ``timeout`` seconds; raises
        :class:`queue.Empty` when none came."""
        deadline = time.monotonic() + timeout
        while True:
            if not self._conns:
                time.sleep(max(0.0, deadline - time.monotonic()))
                raise queue_mod.Empty
            by_conn = {id(c): i for i, c in self._conns.items()}
            ready = mp_connection.wait(list(self._conns.values()), max(0.0, deadline - time.monotonic()))
            for waited in ready:
                index = by_conn[id(waited)]
                conn = self._conns[index]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):  # the child's end closed, perhaps mid-message
                    self._closed.add(index)
                    self._conns.pop(index).close()
                    continue
                self._conns[index] = self._conns.pop(index)  # read the others first next time
                return msg
            if not ready and time.monotonic() >= deadline:
                raise queue_mod.Empty

    def get_nowait(self) -> Any:
        return self.get(0.0)


def child_pipes(ctx: Any, children: int) -> tuple[Inbox, list[Outbox]]:
    """One pipe per child: the parent's :class:`Inbox` over all of them and each child's
    :class:`Outbox`. Close the outboxes in the parent once the children have started
    (:meth:`Outbox.close`), or a dead child's pipe would never end."""
    inbox, outs = Inbox(), []
    for i in range(children):
        r, w = ctx.Pipe(duplex=False)
        inbox.add(i, r)
        outs.append(Outbox(w))
    return inbox, outs


# --- the child's side --------------------------------------------------------------------


def progress_reporter(progress: Any, index: int, every_s: float = 0.5) -> Callable[[Any], None]:
    """An ``on_progress`` for a child: offers :class:`Progress` on the parent's ``progress``
    pipe at most every ``every_s`` seconds (skipped while the pipe is full: the parent is
    busy, and the next report carries the same counters)."""
    last = [0.0]

    def report(c: Any) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s and progress.offer(Progress(index, c)):
            last[0] = now

    return report


def report_crash(progress: Any, index: int, exc: BaseException, orphaned: bool) -> NoReturn:
    """End a child on an unexpected error: one line to the parent (no traceback on the
    terminal; its leases were released on the way out), exit status 1."""
    if not orphaned:
        progress.put(Crashed(index, crash_line(exc)))
    raise SystemExit(1)


def orphaned(parent_pid: int) -> bool:
    """Whether this child's parent (``parent_pid``, passed in at spawn) is gone."""
    return os.getppid() != parent_pid


def let_go(queues: Iterable[Any]) -> None:
    """An orphan's exit: nobody reads these queues now, and what sits in their buffers
    must not hold up the exit (a queue's feeder thread would wait on the full pipe)."""
    for q in queues:
        q.cancel_join_thread()


# --- the parent's side -------------------------------------------------------------------


class WorkerDeaths:
    """The worker processes of a run that died (killed by a signal, or an unexpected
    error): their leases are ended at once (``free``) so that the others take the blocks
    up, and :meth:`error` is the one line the command ends with (exit 1)."""

    def __init__(self, sweep_path: Path | str) -> None:
        self.sweep_path = sweep_path  # a folder, or a sweep's object-store URL
        self.died: dict[int, tuple[int | None, int | None]] = {}  # index: (pid, exit code)
        self.causes: dict[int, str] = {}  # index: the error it reported
        self.freed = True

    def __bool__(self) -> bool:
        return bool(self.died)

    def cause(self, index: int, line: str) -> None:
        self.causes[index] = line

    def dead(self, index: int, proc: Any, free: bool = True) -> None:
        self.died[index] = (proc.pid, proc.exitcode)
        if free:
            self.free()

    def free(self) -> None:
        """End the leases of this host's dead workers (theirs among them) now."""
        from .runner import expire_dead_local_owners
        from .sweep import open_sweep_queue

        try:
            with open_sweep_queue(self.sweep_path) as q:
                expire_dead_local_owners(q)
        except Exception:  # noqa: BLE001 - then they expire after their ttl
            self.freed = False

    def _how(self, index: int) -> str:
        code = self.died[index][1]
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exit status {code}"
        cause = self.causes.get(index)
        return f"{how}: {cause}" if cause else how

    def error(self) -> WorkerDied:
        dead = sorted(self.died)
        what = ", ".join(f"worker {i} (pid {self.died[i][0]}) died ({self._how(i)})" for i in dead)
        they = "it" if len(dead) == 1 else "they"
        back = "went back to the queue" if self.freed else f"go back to the queue as {they} expire"
        return WorkerDied(f"{what}; the blocks {they} held {back}; run the same command to finish the sweep")


class ProcessPool:
    """``workers`` children running ``target(*args(i), progress, i, stop, parent_pid)``
    (see the module doc). ``args(i)`` gives child ``i``'s own arguments; ``sweep_path``
    names the sweep whose leases a dead child's are.

    :meth:`start` starts them (stopping early on a stop); :meth:`read` handles the
    messages that came (counters into :attr:`latest`, crashes into :attr:`deaths`, a
    refusal or a full disk raised as :class:`UsageError`); :meth:`drain_until_exit` waits
    for every child while reading (a child cannot exit while its last messages sit in a
    full pipe)."""

    def __init__(self, target: Callable[..., None], args: Callable[[int], tuple], workers: int, sweep_path: Path | str) -> None:  # type: ignore[type-arg]
        ctx = mp.get_context("spawn")
        self.ctx = ctx
        self.progress, self._outboxes = child_pipes(ctx, workers)
        self.stop_event = StopFlag(ctx)
        self.latest: dict[int, Any] = {}
        self.finished: set[int] = set()
        self.deaths = WorkerDeaths(sweep_path)
        self.procs = [ctx.Process(target=target, args=(*args(i), self._outboxes[i], i, self.stop_event, os.getpid()), daemon=False)
                      for i in range(workers)]

    def start(self) -> None:
        """Start the children; none after a stop (a signal during start-up)."""
        try:
            for p in self.procs:
                if self.stop_event.is_set():
                    break
                p.start()
        finally:
            for i, p in enumerate(self.procs):
                if p.pid is None:
                    self.progress.drop(i)
            for out in self._outboxes:  # the children hold their own ends now
                out.close()
        self.procs = [p for p in self.procs if p.pid is not None]

    def stop(self) -> None:
        """Ask every child to stop (safe from a signal handler)."""
        self.stop_event.set()

    def stopping(self) -> bool:
        return bool(self.stop_event.is_set())

    def total(self, make: Callable[[], Any]) -> Any:
        """The children's latest counters summed into ``make()`` (which has ``add``)."""
        t = make()
        for c in list(self.latest.values()):
            t.add(c)
        return t

    def handle(self, msg: Message, refusals: bool = True) -> None:
        """Take one message in. ``refusals``: raise on :class:`Refused` and
        :class:`DiskFull` (else they are only noted)."""
        if isinstance(msg, (Progress, Finished)):
            self.latest[msg.index] = msg.counters
            if isinstance(msg, Finished):
                self.finished.add(msg.index)
        elif isinstance(msg, Crashed):  # it exits 1 next
            self.deaths.cause(msg.index, msg.line)
        elif isinstance(msg, Refused):
            if refusals:
                raise UsageError(msg.line)
        elif isinstance(msg, DiskFull):
            if refusals:
                from .diskspace import disk_full

                raise disk_full(msg.path)

    def next(self, timeout: float) -> Message | None:
        """The next message, or None after ``timeout`` seconds."""
        try:
            return self.progress.get(timeout)  # type: ignore[no-any-return]
        except queue_mod.Empty:
            return None

    def read(self, refusals: bool = True) -> None:
        """Handle every message waiting now."""
        while True:
            try:
                msg = self.progress.get_nowait()
            except queue_mod.Empty:
                return
            self.handle(msg, refusals)

    def drain_until_exit(self, also: Iterable[Any] = ()) -> None:
        """Read the progress queue (and drop what comes on the ``also`` queues) until every
        child has exited, then join them. A second Ctrl-C kills the children."""
        others = list(also)
        while any(p.is_alive() for p in self.procs):
            try:
                if others:
                    for q in others:
                        while True:
                            try:
                                q.get_nowait()
                            except queue_mod.Empty:
                                break
                    self.read(refusals=False)
                    time.sleep(0.05)
                else:
                    msg = self.next(0.2)
                    if msg is not None:
                        self.handle(msg, refusals=False)
            except KeyboardInterrupt:
                for p in self.procs:
                    p.kill()
        for p in self.procs:
            p.join()

    def dead_now(self, done: set[int]) -> list[int]:
        """Children not in ``done`` that have exited with a non-zero status."""
        return [i for i, p in enumerate(self.procs) if i not in done and p.exitcode not in (None, 0)]

    def note_deaths(self, stopping: bool, free: bool) -> None:
        """After the children are joined: record those that died (unless the run was
        stopped, when a child's non-zero exit is the stop's)."""
        for i, p in enumerate(self.procs):
            if p.exitcode != 0 and i not in self.deaths.died and not stopping:
                self.deaths.dead(i, p, free=free)


def child_main(
    body: Callable[[Callable[[Any], None], Any, int], Any],
    progress: Any,
    index: int,
    stop_event: Any,
    parent_pid: int,
    queues: Iterable[Any] = (),
    sweep_path: Path | None = None,
    disk_full_stops: bool = True,
    on_orphan_check: Callable[[], bool] | None = None,
) -> None:
    """A child's life: note stop signals (never raise on them), run ``body(on_progress,
    stop_event, parent_pid)`` and send its outcome as one typed message: its counters
    (:class:`Finished`), a :class:`Refused` line, a :class:`DiskFull` path (when
    ``disk_full_stops``) or a :class:`Crashed` line and exit status 1. An orphan sends
    nothing and lets go of ``queues`` (the progress queue among them) so that it can exit."""
    from .diskspace import is_disk_full

    signals.install_worker_handlers()
    all_queues = [progress, *queues]
    is_orphan = on_orphan_check or (lambda: orphaned(parent_pid))
    try:
        counters = body(progress_reporter(progress, index), stop_event, parent_pid)
    except UsageError as exc:  # e.g. SourceError: the parent prints it as one line
        if is_orphan():
            let_go(all_queues)
            return
        progress.put(Refused(index, str(exc)))
        return
    except OSError as exc:
        gone = is_orphan()
        if gone:
            let_go(all_queues)
        if not disk_full_stops or not is_disk_full(exc):
            report_crash(progress, index, exc, gone)
        if not gone:
            progress.put(DiskFull(index, os.fspath(exc.filename or sweep_path or ".")))  # the parent raises it
        return
    except Exception as exc:  # a bug, a bad file: the parent names it when the others end
        gone = is_orphan()
        if gone:
            let_go(all_queues)
        report_crash(progress, index, exc, gone)
    if is_orphan():
        let_go(all_queues)
        return
    progress.put(Finished(index, counters))


__all__ = [
    "Crashed", "DiskFull", "Finished", "Inbox", "Message", "Outbox", "ProcessPool", "Progress", "Refused",
    "StopFlag", "WorkerDeaths", "child_main", "child_pipes", "crash_line", "progress_reporter", "report_crash",
]
