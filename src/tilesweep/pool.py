"""Work in processes: start N children, read their typed messages, report deaths.

Everything that sends work to processes (``fetch --workers N``, ``run --keep-tiles``,
``run --workers N``) goes through :class:`ProcessPool` on the parent's side and
:func:`child_main` on the child's. The contract:

- children are ``spawn``-ed and get their parent's pid as an argument (an orphan that read
  ``getppid()`` after its imports would see 1 and never learn it is orphaned);
- the parent asks them to stop through one ``Event`` (never SIGTERM: a child killed while it
  writes a queue takes the queue's write lock with it), and a stop signal to the parent
  during start-up stops the children started so far;
- a child talks to its parent in the messages below, small frozen dataclasses, on one
  progress queue; the parent tells a clean end (:class:`Finished`) from a refusal
  (:class:`Refused`, a one-line ``UsageError``: every child stops), a full disk
  (:class:`DiskFull`) and a crash (:class:`Crashed`, then exit status 1);
- a child that dies (a signal, a crash) is recorded in :class:`WorkerDeaths`, whose
  :meth:`~WorkerDeaths.error` is the one line the command ends with.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
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


# --- the child's side --------------------------------------------------------------------


def progress_reporter(progress: Any, index: int, every_s: float = 0.5) -> Callable[[Any], None]:
    """An ``on_progress`` for a child: puts :class:`Progress` on the parent's ``progress``
    queue at most every ``every_s`` seconds."""
    last = [0.0]

    def report(c: Any) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            progress.put(Progress(index, c))

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
        self.progress: Any = ctx.Queue()
        self.stop_event: Any = ctx.Event()
        self.latest: dict[int, Any] = {}
        self.finished: set[int] = set()
        self.deaths = WorkerDeaths(sweep_path)
        self.procs = [ctx.Process(target=target, args=(*args(i), self.progress, i, self.stop_event, os.getpid()), daemon=False)
                      for i in range(workers)]

    def start(self) -> None:
        """Start the children; none after a stop (a signal during start-up)."""
        for p in self.procs:
            if self.stop_event.is_set():
                break
            p.start()
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
            return self.progress.get(timeout=timeout)  # type: ignore[no-any-return]
        except Exception:  # noqa: BLE001 - queue.Empty (or a pipe that broke: the deaths tell)
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
    "Crashed", "DiskFull", "Finished", "Message", "ProcessPool", "Progress", "Refused", "WorkerDeaths",
    "child_main", "crash_line", "progress_reporter", "report_crash",
]
