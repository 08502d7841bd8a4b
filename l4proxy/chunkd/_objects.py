"""Object storage of the reference service (blocking; called through ``trio.to_thread``).

Theory of operation: a SQLite database (WAL mode) under the data directory maps
(bucket, key) to a blob file with a random name, its size, SHA-256 and modification time.
Keys never become paths, so no key can reach outside the data directory. A put streams
into ``tmp/<random>.part``, fsyncs it, renames it into ``blobs/`` and only then commits
the metadata row (replacing, then unlinking, any previous blob): readers see the old
object or the new one, never a torn one. Blobs left by a crash between rename and commit
are removed at start-up.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from l4proxy.wire import ErrorCode

from ._errors import ServiceError

__all__ = ["ObjectInfo", "ObjectStore", "PutHandle"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    bucket TEXT NOT NULL REFERENCES buckets(name),
    key TEXT NOT NULL,
    blob TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    modified REAL NOT NULL,
    PRIMARY KEY (bucket, key)
);
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectInfo:
    bucket: str
    key: str
    size: int
    sha256: str
    modified: float


def _not_found(what: str) -> ServiceError:
    return ServiceError(ErrorCode.NOT_FOUND, f"{what} does not exist")


class PutHandle:
    """An object being written. ``write`` pieces, then ``commit`` or ``abort``."""

    def __init__(self, store: ObjectStore, bucket: str, key: str, max_size: int) -> None:
        self._store = store
        self.bucket = bucket
        self.key = key
        self._max = max_size
        self._name = uuid.uuid4().hex
        self._tmp = store.tmp_dir / f"{self._name}.part"
        self._file: BinaryIO | None = open(self._tmp, "xb")  # noqa: SIM115 - closed in commit/abort
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        assert self._file is not None
        self.size += len(data)
        if self.size > self._max:
            raise ServiceError(ErrorCode.TOO_LARGE, f"object larger than {self._max} bytes")
        self._file.write(data)
        self._hash.update(data)

    def commit(self) -> ObjectInfo:
        """Make the object visible atomically. Returns its metadata."""
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        final = self._store.blob_path(self._name)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._tmp, final)
        _fsync_dir(final.parent)
        info = ObjectInfo(bucket=self.bucket, key=self.key, size=self.size,
                          sha256=self._hash.hexdigest(), modified=time.time())
        try:
            old = self._store._commit_object(info, self._name)
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        if old is not None:
            self._store.blob_path(old).unlink(missing_ok=True)
        return info

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ObjectStore:
    """Buckets and objects under ``data_dir``. Thread-safe; every call blocks."""

    def __init__(self, data_dir: Path, *, max_object_size: int = 1 << 40) -> None:
        self.data_dir = data_dir
        self.max_object_size = max_object_size
        self.tmp_dir = data_dir / "tmp"
        self.blob_dir = data_dir / "blobs"
        for d in (data_dir, self.tmp_dir, self.blob_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(data_dir / "objects.sqlite3", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._recover()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _recover(self) -> None:
        for part in self.tmp_dir.glob("*.part"):
            part.unlink(missing_ok=True)
        known = {row[0] for row in self._db.execute("SELECT blob FROM objects")}
        for blob in self.blob_dir.glob("*/*"):
            if blob.name not in known:
                blob.unlink(missing_ok=True)

    def blob_path(self, name: str) -> Path:
        return self.blob_dir / name[:2] / name

    # --- buckets ---------------------------------------------------------------------

    def create_bucket(self, bucket: str) -> None:
        with self._lock:
            try:
                self._db.execute("INSERT INTO buckets VALUES (?, ?)", (bucket, time.time()))
            except sqlite3.IntegrityError:
                raise ServiceError(ErrorCode.ALREADY_EXISTS,
                                   f"bucket {bucket!r} already exists") from None

    def delete_bucket(self, bucket: str, *, force: bool) -> int:
        with self._lock:
            self._require_bucket(bucket)
            blobs = [r[0] for r in self._db.execute(
                "SELECT blob FROM objects WHERE bucket = ?", (bucket,))]
            if blobs and not force:
                raise ServiceError(ErrorCode.CONFLICT, f"bucket {bucket!r} is not empty "
                                   f"({len(blobs)} objects); use force to delete them too")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM objects WHERE bucket = ?", (bucket,))
                self._db.execute("DELETE FROM buckets WHERE name = ?", (bucket,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        for name in blobs:
            self.blob_path(name).unlink(missing_ok=True)
        return len(blobs)

    def list_buckets(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT name FROM buckets ORDER BY name")]

    def _require_bucket(self, bucket: str) -> None:
        if self._db.execute("SELECT 1 FROM buckets WHERE name = ?", (bucket,)).fetchone() is None:
            raise _not_found(f"bucket {bucket!r}")

    def require_bucket(self, bucket: str) -> None:
        with self._lock:
            self._require_bucket(bucket)

    # --- objects ---------------------------------------------------------------------

    def list_objects(self, bucket: str, prefix: str, after: str | None,
                     limit: int) -> list[ObjectInfo]:
        """One page of objects whose key starts with ``prefix``, after key ``after``."""
        with self._lock:
            self._require_bucket(bucket)
            rows = self._db.execute(
                "SELECT key, size, sha256, modified FROM objects WHERE bucket = ? AND key >= ? "
                "AND substr(key, 1, ?) = ? AND key > ? ORDER BY key LIMIT ?",
                (bucket, prefix, len(prefix), prefix, after if after is not None else "", limit),
            ).fetchall()
        return [ObjectInfo(bucket=bucket, key=k, size=s, sha256=h, modified=m)
                for k, s, h, m in rows]

    def stat(self, bucket: str, key: str) -> ObjectInfo:
        with self._lock:
            return self._stat(bucket, key)[0]

    def _stat(self, bucket: str, key: str) -> tuple[ObjectInfo, str]:
        self._require_bucket(bucket)
        row = self._db.execute(
            "SELECT size, sha256, modified, blob FROM objects WHERE bucket = ? AND key = ?",
            (bucket, key)).fetchone()
        if row is None:
            raise _not_found(f"object {key!r} in bucket {bucket!r}")
        size, sha, modified, blob = row
        return ObjectInfo(bucket=bucket, key=key, size=size, sha256=sha, modified=modified), blob

    def exists(self, bucket: str, key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM objects WHERE bucket = ? AND key = ?",
                                    (bucket, key)).fetchone() is not None

    def open_object(self, bucket: str, key: str) -> tuple[ObjectInfo, BinaryIO]:
        """Open an object for reading. The open file stays valid if it is replaced."""
        with self._lock:
            info, blob = self._stat(bucket, key)
            return info, open(self.blob_path(blob), "rb")

    def begin_put(self, bucket: str, key: str) -> PutHandle:
        self.require_bucket(bucket)
        return PutHandle(self, bucket, key, self.max_object_size)

    def _commit_object(self, info: ObjectInfo, blob: str) -> str | None:
        with self._lock:
            self._require_bucket(info.bucket)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                old = self._db.execute("SELECT blob FROM objects WHERE bucket = ? AND key = ?",
                                       (info.bucket, info.key)).fetchone()
                self._db.execute(
                    "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?)",
                    (info.bucket, info.key, blob, info.size, info.sha256, info.modified))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return old[0] if old else None

    def put_bytes(self, bucket: str, key: str, data: bytes) -> ObjectInfo:
        handle = self.begin_put(bucket, key)
        try:
            handle.write(data)
            return handle.commit()
        except BaseException:
            handle.abort()
            raise

    def delete(self, bucket: str, key: str) -> None:
        with self._lock:
            _info, blob = self._stat(bucket, key)
            self._db.execute("DELETE FROM objects WHERE bucket = ? AND key = ?", (bucket, key))
        self.blob_path(blob).unlink(missing_ok=True)

    def iter_objects(self, bucket: str) -> Iterator[ObjectInfo]:
        after: str | None = None
        while True:
            page = self.list_objects(bucket, "", after, 1000)
            yield from page
            if len(page) < 1000:
                return
            after = page[-1].key
