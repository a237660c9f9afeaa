"""Fault injection for the simulated tile server: what can go wrong, and how often.

Every fault is decided by a pure function of ``(fault seed, z, x, y, attempt)``, where the
server counts the attempts at each tile: the n-th request for a tile gets the same fate in
every run with the same seed, and a retried request can succeed, like a flaky real server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from ..errors import UsageError
from . import noise as N

FAULT_KINDS = ("http_500", "http_503", "http_429", "reset", "truncate", "wrong_type", "slow_body", "wrong_size")
"""Fault kinds drawn per request, in the order their rates are stacked on [0, 1)."""


@dataclass(frozen=True)
class Faults:
    """Rates (probabilities in [0, 1], summing to at most 1) of each fault kind per request,
    plus latency, coverage and a per-client rate limit.

    - ``http_500``, ``http_503``: a plain-text error response.
    - ``http_429``: "Too Many Requests" with ``Retry-After: retry_after`` (seconds).
    - ``reset``: the connection is aborted (TCP RST) before any response byte.
    - ``truncate``: ``Content-Length`` announces the whole tile, half of it is sent, then
      the connection is closed.
    - ``wrong_type``: status 200 with a ``text/html`` body (a captive or error page).
    - ``slow_body``: the right bytes, trickled over ``slow_body_s`` seconds.
    - ``wrong_size``: status 200 with a good image of half the pixel size asked for.
    - ``latency_ms`` + uniform ``[0, jitter_ms]``: delay before every tile response.
    - ``coverage``: an :class:`~tilesweep.area.Area`, shapely geometry or ``(w, s, e, n)``;
      tiles that do not touch it answer 404.
    - ``rate_limit``: requests per second per client IP (token bucket, burst
      ``rate_burst`` or one second's worth); beyond it, 429 with Retry-After.
    """

    http_500: float = 0.0
    http_503: float = 0.0
    http_429: float = 0.0
    reset: float = 0.0
    truncate: float = 0.0
    wrong_type: float = 0.0
    slow_body: float = 0.0
    wrong_size: float = 0.0
    retry_after: float = 1.0
    slow_body_s: float = 2.0
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    coverage: Any = None
    rate_limit: float | None = None
    rate_burst: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        total = 0.0
        for kind in FAULT_KINDS:
            rate = getattr(self, kind)
            if not (isinstance(rate, (int, float)) and 0.0 <= rate <= 1.0):
                raise UsageError(f"fault rate {kind}={rate!r} is outside [0, 1]")
            total += rate
        if total > 1.0 + 1e-9:
            raise UsageError(f"fault rates add up to {total:g}, more than 1")
        for name in ("retry_after", "slow_body_s", "latency_ms", "jitter_ms"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise UsageError(f"{name}={v!r} must be a finite number >= 0")
        if self.rate_limit is not None and not (self.rate_limit > 0 and math.isfinite(self.rate_limit)):
            raise UsageError(f"rate limit {self.rate_limit!r} must be > 0 requests/s")
        if self.rate_burst is not None and self.rate_burst < 1:
            raise UsageError(f"rate burst {self.rate_burst!r} must be >= 1")
        if self.coverage is not None:
            from .truth import as_geometry

            object.__setattr__(self, "coverage", as_geometry(self.coverage))

    @property
    def any_fault(self) -> bool:
        return any(getattr(self, k) > 0 for k in FAULT_KINDS)

    def draw(self, z: int, x: int, y: int, attempt: int, n: int = 0) -> str | None:
        """The fault kind of the ``attempt``-th request (0-based) for tile z/x/y, or None;
        ``n`` > 0: for the n x n super-tile whose north-west tile is z/x/y (its own draws)."""
        u = self._u(z, x, y, attempt, 1 + 16 * n)
        acc = 0.0
        for kind in FAULT_KINDS:
            acc += getattr(self, kind)
            if u < acc:
                return kind
        return None

    def latency_s(self, z: int, x: int, y: int, attempt: int, n: int = 0) -> float:
        """Delay before answering that request (``n``: as in :meth:`draw`), seconds."""
        if self.latency_ms <= 0 and self.jitter_ms <= 0:
            return 0.0
        return (self.latency_ms + self.jitter_ms * self._u(z, x, y, attempt, 2 + 16 * n)) / 1000.0

    def _u(self, z: int, x: int, y: int, attempt: int, tag: int) -> float:
        h = N.key(self.seed, tag, z, x, y, attempt)
        return (h >> 11) * (1.0 / (1 << 53))

    def describe(self) -> str:
        parts = [f"{k}={getattr(self, k):g}" for k in FAULT_KINDS if getattr(self, k) > 0]
        if self.latency_ms or self.jitter_ms:
            parts.append(f"latency={self.latency_ms:g}+U(0,{self.jitter_ms:g}) ms")
        if self.rate_limit:
            parts.append(f"rate_limit={self.rate_limit:g}/s per client")
        if self.coverage is not None:
            parts.append("coverage=" + ",".join(f"{v:.4f}" for v in self.coverage.bounds))
        return ", ".join(parts) or "no faults"


NO_FAULTS = Faults()

__all__ = ["Faults", "FAULT_KINDS", "NO_FAULTS", "fields"]
