"""Which stage bounds a prediction run, and by how much.

Each stage's meter (:class:`~tilesweep.predict.pipeline.StageMeter`) counts tiles and busy
seconds over its threads or processes (decode processes report the seconds they spent
decoding each job). A stage's *capacity* is the rate it would run at if it never waited:
``tiles / (busy seconds / workers)``; for the fetch, which is "busy" whenever it is not
blocked handing tiles on, ``tiles / (wall * busy share)``. The stage of least capacity
bounds the run; the ratio of the next-least to it says how much faster the run would go
if that stage alone were sped up. The model stage also counts the seconds it waited for
input (a batch not yet full and nothing decoded to fill it): its share of the wall time
is what a GPU model idles for want of tiles.
"""

from __future__ import annotations

from typing import Any


def capacity(meter: Any, wall_s: float) -> float | None:
    """Tiles/s the stage would reach if it never waited (None when it saw no tile)."""
    if not meter.tiles or wall_s <= 0:
        return None
    busy = meter.busy(wall_s)
    if busy <= 0:
        return None
    return meter.tiles / (wall_s * busy)


def bound(report: Any) -> tuple[str, float, str | None, float | None] | None:
    """``(stage, its capacity, next stage, its capacity)`` for the stage of least capacity,
    or None before any tile."""
    caps = [(c, name) for name, m in report.stages.items() if (c := capacity(m, report.wall_s)) is not None]
    if not caps:
        return None
    caps.sort()
    (c0, s0), rest = caps[0], caps[1:]
    return (s0, c0, rest[0][1], rest[0][0]) if rest else (s0, c0, None, None)


def model_wait(report: Any) -> float:
    """Share of the wall time the model stage spent waiting for input, 0..1."""
    m = report.stages.get("model")
    wait = getattr(m, "wait_s", 0.0) if m is not None else 0.0
    return min(1.0, wait / report.wall_s) if report.wall_s > 0 else 0.0


def bound_line(report: Any) -> str:
    """One line for the closing report: ``decode bounds the run at 6,600 tiles/s (89% busy
    over 6 processes); next model at 26,700 tiles/s (4.0x); model waits for input 70%``;
    when the stage of least capacity is busy less than half the time, no stage bounds the run
    (the tiles come slower than any stage takes them: the source, or fetch processes)."""
    b = bound(report)
    if b is None:
        return ""
    s0, c0, s1, c1 = b
    m = report.stages[s0]
    workers = getattr(m, "threads", 1)
    unit = "processes" if getattr(m, "processes", False) else "threads"
    over = f" over {workers} {unit}" if workers > 1 else ""
    busy = m.busy(report.wall_s)
    if busy < 0.5:  # every stage waits: the tiles come slower than any stage could take them
        line = f"no stage bounds the run, each waits for tiles (the least capacity: {s0} at {c0:,.0f} tiles/s, {busy:.0%} busy{over})"
    else:
        line = f"{s0} bounds the run at {c0:,.0f} tiles/s ({busy:.0%} busy{over})"
        if s1 is not None and c1 is not None:
            line += f"; next {s1} at {c1:,.0f} tiles/s ({c1 / c0:.1f}x)"
    return line + f"; model waits for input {model_wait(report):.0%}"


__all__ = ["bound", "bound_line", "capacity", "model_wait"]
