"""Queue URLs: which backend holds a sweep's blocks, and where.

- ``sqlite:///abs/path/queue.sqlite``: one SQLite file (embedded, one machine);
- ``sqlite:queue.sqlite``: the same, relative to the sweep folder (``base``), so that a
  sweep folder can be moved; this is what a sweep planned without ``--queue`` records;
- ``postgresql://user@host:port/db?schema=NAME`` (or ``postgres://``): a shared
  PostgreSQL server (:mod:`tilesweep.queue.postgres`, the ``postgres`` extra). ``schema``
  is tilesweep's own parameter (the sweep's tables live in that schema, so one database
  holds many sweeps); every other parameter goes to libpq. The password never belongs in
  the URL: libpq takes it from ``PGPASSWORD``, ``~/.pgpass`` or its other environment
  variables. A URL given with one (``user:pw@host``, or any parameter whose name holds
  "password") is accepted and connects with it, but only its redacted form is ever
  recorded or printed. ``NAME``: ``[a-z_][a-z0-9_]{0,47}``, not starting with ``pg_``.

Bad URLs raise :class:`tilesweep.errors.UsageError` naming the URL (redacted).
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from ..errors import UsageError
from .base import Queue
from .sqlite import MAX_LOST

DEFAULT_URL = "sqlite:queue.sqlite"  # the sweep folder's own queue
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,47}")  # fullmatch: no trailing newline slips through


@dataclass(frozen=True)
class QueueURL:
    """A parsed queue URL. ``kind``: "sqlite" or "postgresql". SQLite: ``path`` (absolute,
    or relative to the sweep folder when ``relative``). PostgreSQL: ``conninfo`` (the URL
    libpq sees, without tilesweep's ``schema`` parameter) and ``schema``."""

    kind: str
    text: str  # the URL as recorded: never with a password
    path: Path | None = None
    relative: bool = False
    conninfo: str | None = field(default=None, repr=False)  # may hold the password: never printed
    schema: str | None = None

    def resolve(self, base: str | os.PathLike[str] | None) -> Path:
        """The SQLite file, a relative path taken against ``base`` (the sweep folder)."""
        assert self.path is not None
        if not self.relative:
            return self.path
        if base is None:
            raise UsageError(f"queue URL {self.text!r} is relative to a sweep folder, and none was given")
        return Path(base) / self.path


def redact(url: str) -> str:
    """``url`` without its password (``user:secret@host`` -> ``user@host``), nor any
    parameter whose name holds "password" (``password=``, ``sslpassword=``); other text
    is kept as it is."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r":[^:@/]*@", "@", url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}@{hostport}"
    query = parts.query
    if "password" in query.lower():
        query = urlencode([(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if "password" not in k.lower()])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def parse_queue_url(url: str) -> QueueURL:
    """Parse and check a queue URL (see the module's docstring); :class:`UsageError` for a
    bad one, naming it without its password."""
    shown = redact(str(url))
    if not isinstance(url, str) or not url.strip():
        raise UsageError(f"queue URL {shown!r} is empty: use sqlite:///path/queue.sqlite or postgresql://user@host:port/db")
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in ("sqlite", "postgresql", "postgres"):
        raise UsageError(
            f"queue URL {shown!r} is not one of sqlite:///path/queue.sqlite, sqlite:queue.sqlite (in the sweep folder) "
            "or postgresql://user@host:port/db"
        )
    if scheme == "sqlite":
        if rest.startswith("//"):
            if not rest.startswith("///") or len(rest) <= 3:
                raise UsageError(f"queue URL {shown!r}: a SQLite URL is sqlite:///absolute/path (three slashes) or sqlite:relative/path")
            return QueueURL("sqlite", url, path=Path("/" + unquote(rest[3:]).lstrip("/")))
        if not rest or rest.startswith("/"):
            raise UsageError(f"queue URL {shown!r}: a SQLite URL is sqlite:///absolute/path (three slashes) or sqlite:relative/path")
        return QueueURL("sqlite", url, path=Path(unquote(rest)), relative=True)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"queue URL {shown!r} is not a valid PostgreSQL URL: {exc}") from None
    if not parts.hostname:
        raise UsageError(f"queue URL {shown!r} names no host: use postgresql://user@host:port/db")
    if port == 0:
        raise UsageError(f"queue URL {shown!r}: port 0 is not a port")
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise UsageError(f"queue URL {shown!r} names no database: use postgresql://user@host:port/db")
    params = parse_qsl(parts.query, keep_blank_values=True)
    schema = None
    others = []
    for k, v in params:
        if k == "schema":
            schema = v
        else:
            others.append((k, v))
    if schema is not None and not _SCHEMA_RE.fullmatch(schema):
        raise UsageError(
            f"queue URL {shown!r}: schema {schema!r} must be lower-case letters, digits and _ (at most 48, not starting with a digit)"
        )
    if schema is not None and schema.startswith("pg_"):
        raise UsageError(f"queue URL {shown!r}: schema {schema!r} starts with pg_, which PostgreSQL keeps for itself")
    conninfo = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(others), ""))
    text = redact(url)
    return QueueURL("postgresql", text, conninfo=conninfo, schema=schema)


def with_schema(url: str, schema: str) -> str:
    """``url`` with tilesweep's ``schema`` parameter set to ``schema``."""
    parts = urlsplit(url)
    params = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "schema"]
    params.append(("schema", schema))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(params, quote_via=quote), parts.fragment))


def new_schema_name() -> str:
    """A fresh schema name for a sweep planned on a server without ``?schema=``."""
    return "tilesweep_" + secrets.token_hex(6)


def open_queue(
    url: str,
    base: str | os.PathLike[str] | None = None,
    *,
    max_attempts: int = 5,
    max_lost: int = MAX_LOST,
    **options: Any,
) -> Queue:
    """Open the existing queue at ``url`` (relative SQLite URLs are taken against
    ``base``, the sweep folder). ``max_attempts``: failed attempts a block may have before
    it is dead; ``max_lost``: leases it may lose (see :mod:`tilesweep.queue.base`).
    :class:`UsageError` names the queue when it is missing, unreadable or unreachable."""
    u = parse_queue_url(url)
    if u.kind == "sqlite":
        from .sqlite import SqliteQueue

        path = u.resolve(base)
        if not path.is_file():
            raise UsageError(f"queue {u.text!r}: {str(path)!r} does not exist")
        return SqliteQueue(path, max_attempts=max_attempts, max_lost=max_lost, **options)
    from .postgres import PostgresQueue

    if u.schema is None:
        raise UsageError(f"queue URL {u.text!r} names no schema (?schema=NAME): which sweep's blocks?")
    return PostgresQueue(u, max_attempts=max_attempts, max_lost=max_lost, **options)


class StagedQueue:
    """A new queue being filled by the planner: invisible at its URL until
    :meth:`publish`; :meth:`discard` removes it (before or after publishing), so a plan
    that fails leaves nothing. ``url``: where it is published (what the sweep records)."""

    def __init__(self, url: str, queue: Queue, publish: Any, discard: Any) -> None:
        self.url = url
        self.queue = queue
        self._publish = publish
        self._discard = discard

    def publish(self) -> None:
        self.queue.close()
        self._publish()

    def discard(self) -> None:
        try:
            self.queue.close()
        except Exception:  # noqa: BLE001 - already closed or broken: removing is what matters
            pass
        self._discard()


def stage_queue(url: str, base: str | os.PathLike[str]) -> StagedQueue:
    """Create an empty queue for a new plan at ``url`` (staged: see :class:`StagedQueue`).
    A PostgreSQL URL without ``?schema=`` gets a fresh schema, named in the returned
    ``url``. :class:`UsageError` when the URL is bad, the server cannot be reached or the
    queue already exists there."""
    u = parse_queue_url(url)
    if u.kind == "sqlite":
        from .sqlite import SqliteQueue

        final = u.resolve(base)
        partial = final.with_name(final.name + ".partial")
        if final.exists() and u.relative is False:
            raise UsageError(f"queue {u.text!r}: {str(final)!r} exists already (another sweep's queue?)")
        if not final.parent.is_dir():
            raise UsageError(f"queue {u.text!r}: folder {str(final.parent)!r} does not exist")
        for stale in final.parent.glob(final.name + ".partial*"):
            stale.unlink()

        def publish() -> None:
            os.replace(partial, final)

        def discard() -> None:
            for f in (final, *final.parent.glob(final.name + ".partial*")):
                f.unlink(missing_ok=True)

        try:
            q = SqliteQueue(partial)
        except Exception as exc:
            raise UsageError(f"queue {u.text!r} cannot be created: {exc}") from None
        return StagedQueue(u.text, q, publish, discard)
    from .postgres import stage

    if u.schema is None:
        given = u.text
        u = parse_queue_url(with_schema(url, new_schema_name()))  # the URL as given: with its password, if any
        try:
            return stage(u)
        except UsageError as exc:  # name the URL as the user gave it, not with our schema
            raise UsageError(str(exc).replace(repr(u.text), repr(given))) from None
    return stage(u)
