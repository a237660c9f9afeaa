"""The storage seam: where a sweep publishes what it makes (finished shards, prediction
parts, exports), on a local folder or an object store.

The interface is the one an object store offers, not POSIX: immutable objects under
``/``-separated keys, **create-if-absent** publication, whole and ranged reads, listing by
prefix, deletion. No mmap, flock or rename in it. A writer always follows one rule:

1. write the object's bytes to a **staging file** (:meth:`Storage.staging_path`: a local
   temp name that readers and listings never see, of this writer's own unless it is the
   key's only writer);
2. make it durable (fsync, done by :meth:`Storage.publish` for local storage; an object
   store's PUT is durable once it returns);
3. **publish** it atomically under its key with create-if-absent semantics: of two
   writers racing on one key exactly one wins, the other gets :class:`AlreadyPublished`
   and the winner's bytes stay. ``replace=True`` (exports, which overwrite an earlier
   export of the same name) publishes atomically over an existing object instead.

Only then does the caller report the output durable (and the block get acked).

Local crash argument (:class:`LocalStorage`). The staging file is ``{key}.partial`` (or
``{key}.{pid}-{random}.partial``) next to the final name, in the same folder and so on the
same file system. ``publish``

- ``fsync``s the staging file: its bytes are on disk before any name points at them;
- renames it to the key with ``renameat2(RENAME_NOREPLACE)``: atomic, and it fails with
  ``EEXIST`` when the key exists (create-if-absent). Where the kernel or file system
  lacks it (``EINVAL``/``ENOSYS``), ``link(staging, key)`` (atomic, ``EEXIST`` too) and
  then ``unlink(staging)``; where hard links are missing too (``EPERM``/``ENOSYS``/
  ``EOPNOTSUPP``: FUSE mounts, vboxsf, 9p), a check that the key is absent, then
  ``rename``: create-if-absent only because every local writer holds a lock while it
  publishes (a shard's flocked partial, a prediction sink's ``.lock``);
- ``fsync``s the folder: the new name survives a power cut.

A reader opens the key or nothing: there is no instant at which the key names a partly
written file. A crash before the rename leaves only ``{key}.partial``, which listings
skip and its writer's next open deletes or resumes (shards resume theirs, docs/store.md);
nothing is visible. A crash after it leaves the key whole. With the ``link`` fallback a
crash between ``link`` and ``unlink`` leaves the staging name as a second link to the
published file: every writer here therefore unlinks a stale staging file before it
creates a new one (never truncates one in place), and a shard writer that finds its key
published deletes the staging file.

Object-store crash argument (:class:`ObjectStorage`). Staging files live on local disk
(a temp folder); publication is one PUT with ``If-None-Match: *`` (``mode="create"``).
S3 makes an object visible whole or not at all, and answers a second creator 412
Precondition Failed (or 409 ConditionalRequestConflict while a racing PUT is in flight,
which is retried and then answers 412). A crash before the PUT returns leaves at most a
local staging file; no object is visible.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import re
import secrets
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, cast
from urllib.parse import urlparse

from .durable import fsync_dir, fsync_file
from .errors import UsageError

STAGING_SUFFIX = ".partial"
"""Suffix of a staging file; keys never end with it, and listings skip such names."""


class AlreadyPublished(FileExistsError):
    """A create-if-absent publication lost: another writer published ``key`` first (its
    object stays as it was). ``url`` names the object."""

    def __init__(self, url: str, key: str) -> None:
        super().__init__(errno.EEXIST, f"{url} already exists (published by another writer)")
        self.url = url
        self.key = key


class StorageError(UsageError):
    """A storage location that cannot be used: a bucket that does not exist, credentials
    the server refuses, an endpoint that does not answer, a URL of an unknown kind. The
    message is one line naming what failed; the CLI exits 2 (it is a :class:`UsageError`)."""


@dataclass(frozen=True)
class Version:
    """Which bytes an object held when read: its size (bytes), ETag and version id (either
    may be None where the store gives none)."""

    size: int
    e_tag: str | None
    version: str | None


@dataclass(frozen=True)
class ObjectInfo:
    """One published object: its key (relative to the storage's root) and size in bytes."""

    key: str
    size: int


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or key.endswith("/") or key.endswith(STAGING_SUFFIX):
        raise StorageError(f"bad storage key {key!r}: relative, '/'-separated, not ending in '/' or {STAGING_SUFFIX!r}")
    if any(p in ("", ".", "..") for p in key.split("/")):
        raise StorageError(f"bad storage key {key!r}: empty, '.' or '..' part")
    return key


class Storage(ABC):
    """Immutable objects under ``/``-separated keys below one root (module doc).

    Every method is safe to call from several threads; a :class:`Storage` may be used by
    many processes and machines at once (create-if-absent settles races)."""

    url: str
    """Where the root is (a folder path or ``s3://bucket/prefix``), without credentials."""

    @abstractmethod
    def staging_path(self, key: str, *, unique: bool = True) -> Path:
        """A local file name to write ``key``'s bytes to before :meth:`publish`, never seen
        by readers or :meth:`list`; its folder exists. ``unique``: a name of this writer's
        own (``{name}.{pid}-{random}.partial``), so racing writers of one key never share
        one; else ``{name}.partial``, for a caller that is the key's only writer (an export
        under its name), a stale file there removed first."""

    @abstractmethod
    def publish(self, staged: Path, key: str, *, replace: bool = False, single_writer: bool = False) -> None:
        """Make the local file ``staged`` durable and publish it atomically as ``key``;
        ``staged`` is gone afterwards. Create-if-absent: :class:`AlreadyPublished` when
        ``key`` exists (``staged`` is left for the caller to delete), unless ``replace``.

        ``single_writer``: the caller is the key's only writer (an export under its name),
        so create-if-absent may be a check before the upload instead of one atomic
        request. An object store then streams a multipart upload of any size (a
        conditional PUT is one request of at most :data:`SINGLE_PUT_MAX` bytes, held in
        memory); two writers racing on the key within one upload could both publish, the
        last one's bytes standing. A local folder publishes atomically either way."""

    def put(self, key: str, data: bytes, *, replace: bool = False) -> None:
        """Publish ``data`` as ``key`` (through a staging file), create-if-absent as
        :meth:`publish`."""
        staged = self.staging_path(key)
        try:
            with open(staged, "xb") as f:
                f.write(data)
            self.publish(staged, key, replace=replace)
        finally:
            staged.unlink(missing_ok=True)

    @abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes of a published object; ``FileNotFoundError`` when absent."""

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    @abstractmethod
    def read(self, key: str) -> bytes:
        """The whole object; ``FileNotFoundError`` when absent."""

    @abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes from byte ``start`` (fewer at the object's end);
        ``FileNotFoundError`` when absent."""

    @abstractmethod
    def open_read(self, key: str) -> IO[bytes]:
        """A seekable binary reader (range reads on an object store), for pyarrow /
        Parquet readers; close it."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Published objects whose key starts with ``prefix`` (any order; staging files are
        never listed)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object (nothing happens when it is absent)."""

    def local_path(self, key: str) -> Path | None:
        """The object's file when the storage is a local folder (for memory-mapped
        reads), else None."""
        return None

    def read_versioned(self, key: str) -> tuple[bytes, Version]:
        """The whole object and its :class:`Version` (for :meth:`put_if_version` and
        :meth:`delete_if_version`); ``FileNotFoundError`` when absent. Object stores only."""
        raise NotImplementedError(f"{self.url}: conditional updates need an object store")

    def version(self, key: str) -> Version:
        """The object's current :class:`Version`; ``FileNotFoundError`` when absent."""
        raise NotImplementedError(f"{self.url}: conditional updates need an object store")

    def put_if_version(self, key: str, data: bytes, version: Version) -> bool:
        """Publish ``data`` over ``key`` only if the object is still at ``version`` (one
        PUT with ``If-Match``): True when it was written, False when another writer
        changed (or deleted) it since ``version`` was read (nothing is written: re-read,
        re-apply, retry). At most :data:`SINGLE_PUT_MAX` bytes, held in memory."""
        raise NotImplementedError(f"{self.url}: conditional updates need an object store")

    def delete_if_version(self, key: str, version: Version) -> bool:
        """Delete ``key`` only if it is still at ``version``: True when it was deleted (or
        is already gone), False when another writer published other bytes there. Not one
        atomic request (obstore has no conditional DELETE): a HEAD, compared, then the
        DELETE; a publication in between (milliseconds) is not seen."""
        raise NotImplementedError(f"{self.url}: conditional updates need an object store")


def _staging(p: Path, unique: bool) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    if unique:
        return p.with_name(f"{p.name}.{os.getpid()}-{secrets.token_hex(6)}{STAGING_SUFFIX}")
    staged = p.with_name(p.name + STAGING_SUFFIX)
    staged.unlink(missing_ok=True)  # never truncate in place: it may be a link to the key
    return staged


# --- local folder -------------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_libc: Any = None
_have_renameat2 = True


def rename_noreplace(src: Path, dst: Path) -> None:
    """Atomically rename ``src`` to ``dst`` unless ``dst`` exists (``FileExistsError``):
    ``renameat2(RENAME_NOREPLACE)``, or ``link`` + ``unlink`` where that is missing, or
    (a file system with neither) a check for ``dst`` then ``rename``, atomic only against
    writers that hold a lock while they publish."""
    global _libc, _have_renameat2
    if _have_renameat2:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            if not hasattr(_libc, "renameat2"):
                _have_renameat2 = False
        if _have_renameat2:
            if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
                raise OSError(err, os.strerror(err), str(dst))
    try:
        os.link(src, dst)  # EEXIST when dst exists
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise
        # No hard links either (FUSE mounts such as gcsfuse, rclone, s3fs; vboxsf; 9p):
        # check, then rename. Not atomic against a second unlocked writer of the same key;
        # every local writer here holds a lock while it publishes (a shard's partial is
        # flocked, a prediction sink holds its .lock), so only racing exports of one name
        # could both publish, the last one's bytes standing.
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


_NO_LINKS = {errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
"""``link`` errors of file systems without hard links."""


class LocalStorage(Storage):
    """Objects as files under a folder: ``root/{key}``; staging files ``root/{key}.partial``
    (module doc: the crash argument). Folders are created as keys need them."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def staging_path(self, key: str, *, unique: bool = True) -> Path:
        return _staging(self._path(key), unique)

    def publish(self, staged: Path, key: str, *, replace: bool = False, single_writer: bool = False) -> None:
        final = self._path(key)
        fsync_file(staged)
        if replace:
            os.replace(staged, final)
        else:
            try:
                rename_noreplace(staged, final)
            except FileExistsError:
                raise AlreadyPublished(str(final), key) from None
        fsync_dir(final.parent)

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def read_range(self, key: str, start: int, length: int) -> bytes:
        with open(self._path(key), "rb") as f:
            return os.pread(f.fileno(), length, start)

    def open_read(self, key: str) -> IO[bytes]:
        return open(self._path(key), "rb")

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        head, _, _ = prefix.rpartition("/")
        base = self.root / head if head else self.root
        yield from self._walk(base, f"{head}/" if head else "", prefix)

    def _walk(self, folder: Path, rel: str, prefix: str) -> Iterator[ObjectInfo]:
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        for e in entries:
            key = rel + e.name
            if e.is_dir(follow_symlinks=False):
                if key.startswith(prefix) or prefix.startswith(key + "/"):
                    yield from self._walk(Path(e.path), key + "/", prefix)
            elif key.startswith(prefix) and not e.name.endswith(STAGING_SUFFIX):
                try:
                    yield ObjectInfo(key, e.stat().st_size)
                except FileNotFoundError:
                    pass

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def __repr__(self) -> str:
        return f"LocalStorage({self.url!r})"


# --- object store (obstore) -----------------------------------------------------------------

SINGLE_PUT_MAX = 5 * 1024**3
"""Bytes one S3 PUT takes (AWS's limit). A create-if-absent publication (a shard) is one
conditional PUT, which obstore sends whole from memory."""

MULTIPART_CHUNK = 16 * 1024**2
"""Part size of the streamed multipart uploads of :meth:`ObjectStorage.publish` with
``replace`` or ``single_writer`` (S3 allows 10,000 parts: objects up to 160 GiB)."""

ENV_HINT = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL / AWS_REGION"

_STORES = {"s3": "S3Store", "gs": "GCSStore", "az": "AzureStore"}
"""URL schemes of object stores and their obstore classes. Only ``s3`` is tested (on a
real SeaweedFS); ``gs`` and ``az`` go through the same obstore calls (create-if-absent
PUTs, ranged GETs, listings), credentials from obstore's ``GOOGLE_*`` / ``AZURE_*``
environment variables."""
_ENV_HINTS = {"s3": ENV_HINT, "gs": "GOOGLE_SERVICE_ACCOUNT / GOOGLE_APPLICATION_CREDENTIALS",
              "az": "AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY"}


class ObjectStorage(Storage):
    """Objects in an S3-compatible bucket (``s3://bucket/prefix``; ``gs://`` and ``az://``
    through obstore's same calls, untested) through obstore (the
    ``s3`` extra). Credentials, endpoint and region come from the environment only
    (``AWS_*`` variables, as the AWS tools read them; ``AWS_ALLOW_HTTP=true`` for a plain
    http endpoint); the URL never holds them. Opening checks the bucket with one listing
    request: a bucket that does not exist, refused credentials or an endpoint that does
    not answer raise :class:`StorageError` naming it. Staging files go to ``staging``
    (default: ``$TMPDIR/tilesweep-staging/[@{endpoint}/]{bucket}/{prefix}``, :func:`endpoint_parts`)."""

    def __init__(self, url: str, *, staging: str | os.PathLike[str] | None = None, max_retries: int = 3, **config: Any) -> None:
        try:
            import obstore  # noqa: F401
            import obstore.store as stores
        except ImportError:  # pragma: no cover - depends on the install
            raise StorageError(f"{url}: object storage needs obstore (pip install 'tilesweep[s3]')") from None
        from datetime import timedelta

        u = urlparse(url)
        if u.scheme not in _STORES or not u.netloc:
            raise StorageError(f"bad storage URL {url!r}: expected s3://bucket/prefix (or gs://, az://)")
        self.scheme = u.scheme
        self.env_hint = _ENV_HINTS[u.scheme]
        if u.username or u.password or u.query:
            raise StorageError(f"storage URL {_strip(url)!r} must not hold credentials or options; set {self.env_hint}")
        self.bucket = u.netloc
        self.prefix = u.path.strip("/")
        self.url = f"{u.scheme}://{self.bucket}/{self.prefix}" if self.prefix else f"{u.scheme}://{self.bucket}"
        if staging is None:  # local disk, per bucket and prefix; staging names are per writer
            staging = Path(tempfile.gettempdir(), "tilesweep-staging", *endpoint_parts(self.scheme), self.bucket,
                           *self.prefix.split("/"))
        self.staging = Path(staging)
        """Local folder of staging files (and of unfinished shards: their resume state)."""
        retry = {"max_retries": max_retries, "retry_timeout": timedelta(seconds=30)}
        client: dict[str, Any] = {"connect_timeout": "5s"}
        if u.scheme == "s3" and os.environ.get("AWS_ALLOW_HTTP", "").lower() in ("1", "true", "yes"):
            client["allow_http"] = True  # client options given here replace the environment's
        kwargs: dict[str, Any] = {"retry_config": retry, "client_options": client}
        if self.prefix:
            kwargs["prefix"] = self.prefix
        kwargs.update(config)
        try:
            self._store = getattr(stores, _STORES[u.scheme])(self.bucket, **kwargs)
        except Exception as e:
            raise StorageError(f"{self.url}: cannot configure the {self.scheme}:// client: {_first_line(e)}") from None
        self.check()

    def check(self) -> None:
        """One listing request: :class:`StorageError` naming the bucket when it does not
        exist, the credentials are refused, or the endpoint does not answer."""
        import obstore

        try:
            obstore.list_with_delimiter(self._store, None)
        except Exception as e:
            raise self._error(e) from None

    def _error(self, e: Exception) -> StorageError:
        from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

        text = str(e)
        endpoint = (os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or "the default AWS endpoint"
                    if self.scheme == "s3" else f"the {self.scheme}:// service")
        if "NoSuchBucket" in text:
            return StorageError(f"{self.url}: bucket {self.bucket!r} does not exist at {endpoint}")
        if isinstance(e, (PermissionDeniedError, UnauthenticatedError)) or any(
            w in text for w in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "403 Forbidden")
        ):
            return StorageError(f"{self.url}: credentials refused by {endpoint} (set {self.env_hint})")
        if "error sending request" in text or "Connect" in text or "dns error" in text:
            return StorageError(f"{self.url}: cannot reach {endpoint}")
        return StorageError(f"{self.url}: {_first_line(e)}")

    def _key(self, key: str) -> str:
        return _check_key(key)

    def staging_path(self, key: str, *, unique: bool = True) -> Path:
        return _staging(self.staging / _check_key(key), unique)

    def publish(self, staged: Path, key: str, *, replace: bool = False, single_writer: bool = False) -> None:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        k = self._key(key)
        if replace or single_writer:  # a streamed multipart upload, any size
            if not replace and self.exists(key):
                raise AlreadyPublished(f"{self.url}/{k}", key)
            with self._errors():
                obstore.put(self._store, k, Path(staged), mode="overwrite", chunk_size=MULTIPART_CHUNK)
            Path(staged).unlink(missing_ok=True)
            return
        size = Path(staged).stat().st_size
        if size > SINGLE_PUT_MAX:
            raise StorageError(f"{self.url}/{k}: {size:,} bytes is more than one create-if-absent PUT takes "
                               f"({SINGLE_PUT_MAX:,}); use smaller blocks (a higher --block-zoom)")
        for attempt in range(8):
            try:
                obstore.put(self._store, k, Path(staged), mode="create")
                break
            except Exception as e:
                code = _s3_status(e)
                if code == 409 and attempt < 7:  # ConditionalRequestConflict: a racing conditional PUT in flight
                    time.sleep(0.05 * 2**attempt)  # ask again: 412 follows if it won
                    continue
                if isinstance(e, (AlreadyExistsError, PreconditionError)) or code == 412:
                    raise AlreadyPublished(f"{self.url}/{k}", key) from None
                raise self._error(e) from None
        Path(staged).unlink(missing_ok=True)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """obstore's errors as :class:`StorageError` (one line naming what failed), except
        not-found, which stays ``FileNotFoundError``."""
        try:
            yield
        except (FileNotFoundError, StorageError):
            raise
        except Exception as e:
            from obstore.exceptions import NotFoundError

            if isinstance(e, NotFoundError):
                raise FileNotFoundError(errno.ENOENT, f"{self.url}: {_first_line(e)}") from None
            raise self._error(e) from None

    def size(self, key: str) -> int:
        import obstore

        with self._errors():
            return int(obstore.head(self._store, self._key(key))["size"])

    def read(self, key: str) -> bytes:
        import obstore

        with self._errors():
            return bytes(obstore.get(self._store, self._key(key)).bytes())

    def read_range(self, key: str, start: int, length: int) -> bytes:
        import obstore

        if length <= 0:
            return b""
        try:  # one request: S3 cuts a range short at the end and answers 416 past it
            return bytes(obstore.get_range(self._store, self._key(key), start=start, end=start + length))
        except FileNotFoundError:
            raise
        except Exception as e:
            if _s3_status(e) == 416:  # the range starts past the object's end
                self.size(key)  # FileNotFoundError when absent
                return b""
            raise self._error(e) from None

    def open_read(self, key: str) -> IO[bytes]:
        import obstore

        with self._errors():
            # A RawIOBase with every method of a binary file that readers call (typeshed's
            # IO[bytes] is a class, not a protocol, so the type checker is told).
            return cast(IO[bytes], _ObjectReader(obstore.open_reader(self._store, self._key(key))))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        import obstore

        head = prefix.rpartition("/")[0]  # obstore lists whole path segments: filter the rest
        try:
            with self._errors():
                for batch in obstore.list(self._store, head or None):
                    for m in batch:
                        if m["path"].startswith(prefix):
                            yield ObjectInfo(m["path"], int(m["size"]))
        except FileNotFoundError:
            return

    def delete(self, key: str) -> None:
        import obstore

        try:
            with self._errors():
                obstore.delete(self._store, self._key(key))
        except FileNotFoundError:
            pass

    def read_versioned(self, key: str) -> tuple[bytes, Version]:
        import obstore

        with self._errors():
            r = obstore.get(self._store, self._key(key))
            data = bytes(r.bytes())
            m = r.meta
        return data, Version(int(m["size"]), m.get("e_tag"), m.get("version"))

    def version(self, key: str) -> Version:
        import obstore

        with self._errors():
            m = obstore.head(self._store, self._key(key))
        return Version(int(m["size"]), m.get("e_tag"), m.get("version"))

    def put_if_version(self, key: str, data: bytes, version: Version) -> bool:
        import obstore
        from obstore.exceptions import NotFoundError, PreconditionError

        k = self._key(key)
        if version.e_tag is None and version.version is None:
            raise StorageError(f"{self.url}/{k}: the store gives no ETag or version; a conditional update is impossible")
        mode: Any = {k: v for k, v in (("e_tag", version.e_tag), ("version", version.version)) if v is not None}
        try:
            obstore.put(self._store, k, data, mode=mode)
        except Exception as e:
            code = _s3_status(e)
            # 412: changed since read; 409: a racing conditional PUT in flight; 404: deleted
            if isinstance(e, (PreconditionError, NotFoundError)) or code in (404, 409, 412):
                return False
            raise self._error(e) from None
        return True

    def delete_if_version(self, key: str, version: Version) -> bool:
        try:
            now = self.version(key)
        except FileNotFoundError:
            return True
        if (now.size, now.e_tag, now.version) != (version.size, version.e_tag, version.version):
            return False
        self.delete(key)
        return True

    def __repr__(self) -> str:
        return f"ObjectStorage({self.url!r})"


class _ObjectReader(io.RawIOBase):
    """obstore's ``ReadableFile`` (range requests behind ``seek``/``read``) as a standard
    binary file object: a context manager, ``readinto``, what pyarrow's readers expect."""

    def __init__(self, f: Any) -> None:
        super().__init__()
        self._f = f

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return int(self._f.seek(offset, whence))

    def tell(self) -> int:
        return int(self._f.tell())

    def read(self, size: int | None = -1) -> bytes:
        return bytes(self._f.read() if size is None or size < 0 else self._f.read(size))

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


_STATUS = re.compile(r"status code: (\d{3})\b")
_S3_CODES = {"ConditionalRequestConflict": 409, "PreconditionFailed": 412, "InvalidRange": 416}


def _s3_status(e: BaseException) -> int | None:
    """The HTTP status a failed S3 request got, from obstore's message ("... returned
    non-2xx status code: 416 Range Not Satisfiable") or the S3 error code in the answer
    (``<Code>InvalidRange</Code>``); None for a failure without an answer (a refused
    connection, a timeout). Never a bare number elsewhere in the text: the text holds the
    request's URL, and keys such as ``12/412/1033.shard`` hold digits."""
    text = str(e)
    m = _STATUS.search(text)
    if m:
        return int(m.group(1))
    for name, code in _S3_CODES.items():
        if f"<Code>{name}</Code>" in text:
            return code
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _strip(url: str) -> str:
    u = urlparse(url)
    return f"{u.scheme}://{u.hostname or ''}{u.path}"


def endpoint_parts(scheme: str) -> list[str]:
    """The folder name (a list of none or one) that keys local state of a bucket by the
    endpoint it is on: for ``s3`` with ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT``) set,
    ``@{host}_{port}{_path}`` (characters other than letters, digits, ``.``, ``-`` and
    ``_`` as ``_``), so that one bucket name on two endpoints never shares a state or
    staging folder; none for the default AWS endpoint (and other schemes)."""
    endpoint = (os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT")) if scheme == "s3" else None
    if not endpoint:
        return []
    u = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    return ["@" + (re.sub(r"[^A-Za-z0-9._-]", "_", f"{u.netloc}{u.path}".rstrip("/")) or "_")]


def is_url(location: str | os.PathLike[str]) -> bool:
    """True when ``location`` is an object-store URL (``s3://...``), not a folder."""
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def split_url(location: str) -> tuple[str, str]:
    """``(parent, name)`` of an object URL ``s3://bucket/prefix/name``: the storage to open
    and the key in it. :class:`StorageError` when there is no name after the bucket."""
    parent, _, name = location.rstrip("/").rpartition("/")
    if "://" not in parent or parent.endswith("://") or not name:
        raise StorageError(f"object URL {_strip(location)!r} needs a name after the bucket (s3://bucket/prefix/name)")
    return parent, name


def open_storage(location: str | os.PathLike[str], **options: Any) -> Storage:
    """The storage at ``location``: a folder path or ``file://`` URL (:class:`LocalStorage`)
    or ``s3://bucket/prefix`` (:class:`ObjectStorage`; ``options`` go to it).
    :class:`StorageError` for any other scheme."""
    if isinstance(location, str) and location.startswith("file://"):
        u = urlparse(location)
        if u.netloc not in ("", "localhost"):  # file://tiles/store would open /store
            raise StorageError(f"bad file URL {location!r}: names host {u.netloc!r}; use file:///absolute/path or a plain folder path")
        return LocalStorage(u.path)
    if not is_url(location):
        return LocalStorage(location)
    scheme = str(location).split("://", 1)[0]
    if scheme in _STORES:
        return ObjectStorage(str(location), **options)
    raise StorageError(f"storage URL {_strip(str(location))!r}: unsupported scheme {scheme!r} (a folder, file://, s3://, gs:// or az://)")


def arrow_filesystem(storage: Storage, sizes: dict[str, int] | None = None) -> Any:
    """A read-only ``pyarrow.fs.PyFileSystem`` over ``storage`` (paths are its keys), so
    that pyarrow datasets (and DuckDB scanning them) read objects with ranged reads
    through this seam: no DuckDB extension, no second client with its own credentials.
    ``sizes``: object sizes already known (from a listing), saving a HEAD per file."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    known = dict(sizes or {})

    class _Handler(pafs.FileSystemHandler):
        def get_type_name(self) -> str:
            return "tilesweep-storage"

        def normalize_path(self, path: str) -> str:
            return path.strip("/")

        def equals(self, other: Any) -> bool:
            return other is self

        def get_file_info(self, paths: str | list[str]) -> list[Any]:
            out = []
            for p in [paths] if isinstance(paths, str) else paths:
                key = p.strip("/")
                try:
                    size = known[key] if key in known else storage.size(key)
                    out.append(pafs.FileInfo(key, pafs.FileType.File, size=size))
                except FileNotFoundError:
                    out.append(pafs.FileInfo(key, pafs.FileType.NotFound))
            return out

        def get_file_info_selector(self, selector: Any) -> list[Any]:
            base = selector.base_dir.strip("/")
            return [pafs.FileInfo(o.key, pafs.FileType.File, size=o.size)
                    for o in storage.list(f"{base}/" if base else "")]

        def open_input_file(self, path: str) -> Any:
            return pa.PythonFile(cast(io.IOBase, storage.open_read(path.strip("/"))), mode="r")

        def open_input_stream(self, path: str) -> Any:
            return self.open_input_file(path)

        def _read_only(self, *args: Any, **kwargs: Any) -> Any:
            raise OSError(f"{storage.url}: read-only here")

        create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _read_only
        delete_file = move = copy_file = open_output_stream = open_append_stream = _read_only

    return pafs.PyFileSystem(_Handler())
