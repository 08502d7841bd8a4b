"""The state store in one SQLite file (blocking; trio code uses ``AsyncStateStore``).

Theory of operation
-------------------
*File.* ``<state_dir>/state.sqlite3``; the directory is created 0700 and the file 0600
before SQLite opens it (SQLite gives its ``-wal`` and ``-shm`` files the database file's
mode). A looser existing file is tightened to 0600.

*Journal.* WAL mode, so readers never wait for the writer and a commit is one append.
``synchronous=FULL``: the WAL is fsynced at every commit. With ``NORMAL`` a commit
survives a crash of the process but the last few may be rolled back by a power loss or
an OS crash, and a rolled-back FIRST claim would let the same ID token be exchanged for
a second certificate after the host comes back. The replay cache is a security control,
so it pays one fsync per claim; enrollment is rate-limited, so that cost is small.
The session index is the exception (``_write(..., durable=False)``): its rows are written
with ``synchronous=NORMAL`` for that one transaction, because every data-path session
waits for its start row and an fsync there would cap session setup at the disk's flush
rate. A process crash loses nothing; a power loss may lose the last index rows, never a
recording (recordings are fsynced by the recorder), and the next durable commit fsyncs
the WAL with them.

*Schema.* ``PRAGMA user_version`` is the schema version and ``PRAGMA application_id``
marks the file as ours. :data:`MIGRATIONS` is an ordered, append-only list: migration N
brings version N-1 to N, and runs with its version bump in one ``BEGIN IMMEDIATE``
transaction, so a failed migration leaves the previous version intact and two processes
opening a fresh file migrate it once. A file with a newer version raises
:class:`SchemaTooNew` before anything is written to it; a file that is not an SQLite
database, or is another program's database, raises :class:`StoreCorrupt`.

*Threads.* One connection, guarded by one lock, shared by all threads
(``check_same_thread=False``). Every operation is a few indexed statements, so holding
the lock costs microseconds plus the commit's fsync, and the commits are serialized by
SQLite anyway. A connection per thread would buy no write concurrency, would make our
own threads contend for SQLite's file lock (``SQLITE_BUSY``), and would leave
connections behind in worker threads that trio retires. Other processes on the same file
(an admin command, a second store in the tests) are handled by SQLite's locking and the
busy timeout.

*Atomicity.* Every method is one ``BEGIN IMMEDIATE`` transaction: the write lock is
taken before the first read, so a read-decide-write (a token claim, a rate-limit check)
can never interleave with another connection's, and the primary key on the replay key
backs that up: two FIRST claims of one key cannot both commit.

*Locks* are rows of ``locks``; ``lock_version`` holds one counter that every add and
remove bumps in the same transaction, so a gateway polling it (one indexed read, no
write lock: WAL readers never wait) sees every change, and :meth:`active_locks` reads
the rows and the counter in one read transaction, so the set and its version always
belong together. Expired locks stay until :meth:`purge_expired` removes them; queries
filter on ``until``.

*Rate limits* are a sliding log: one row per counted event. An event is allowed when
fewer than ``limit`` events for the key happened in ``(now - per_seconds, now]``; the
refusal's ``retry_after`` is exact (when the oldest event that matters leaves the
window). Refused events are not counted, so hammering does not extend a refusal, and a
key holds at most ``limit`` live rows. Unlike a fixed window, it never allows a burst of
twice the limit across a window boundary.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import stat
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from ._base import (
    TOKEN_RETRY_WINDOW,
    ClaimKind,
    Lock,
    LockKind,
    LockSet,
    LockSpec,
    RateDecision,
    SchemaTooNew,
    SessionRecord,
    StateStore,
    StoreCorrupt,
    StoreError,
    TokenClaim,
    check_binding,
    check_key,
    check_rate,
    check_time,
    is_lock_id,
)

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "STATE_FILE_NAME", "SqliteStateStore"]

#: the database's name inside ``state_dir``
STATE_FILE_NAME: Final = "state.sqlite3"

#: ``PRAGMA application_id`` of an l4proxy state store ("L4PS")
APPLICATION_ID: Final = 0x4C345053

#: seconds to wait for another process's lock on the file before failing
DEFAULT_BUSY_TIMEOUT: Final = 5.0

#: the smallest ``retry_after`` reported (guards float rounding at the window's edge)
_MIN_RETRY_AFTER: Final = 0.001

_SQLITE_CORRUPT: Final = 11
_SQLITE_NOTADB: Final = 26

# The forward migrations. Append only; never edit one that has been released.
# Migration N (1-based) brings schema version N-1 to N.
MIGRATIONS: tuple[str, ...] = (
    # 1: the ID-token replay cache, the rate-limit log, the writability probe.
    f"""
    PRAGMA application_id = {APPLICATION_ID};

    CREATE TABLE token_claims (
        replay_key      TEXT PRIMARY KEY NOT NULL,
        binding         TEXT NOT NULL,      -- SHA-256 hex of the CSR's public key
        claimed_at      REAL NOT NULL,
        expires_at      REAL NOT NULL,      -- kept until then (the token's exp + leeway)
        issued_at       REAL,               -- set with certificate_pem by record_issued
        certificate_pem TEXT,
        CHECK ((issued_at IS NULL) = (certificate_pem IS NULL))
    ) WITHOUT ROWID;
    CREATE INDEX token_claims_expires_at ON token_claims (expires_at);

    CREATE TABLE rate_events (
        key        TEXT NOT NULL,           -- e.g. identity:corp/alice, addr:127.0.0.1
        at         REAL NOT NULL,
        expires_at REAL NOT NULL            -- at + the window: purged after that
    );
    CREATE INDEX rate_events_key_at ON rate_events (key, at);
    CREATE INDEX rate_events_expires_at ON rate_events (expires_at);

    CREATE TABLE write_probe (
        id     INTEGER PRIMARY KEY CHECK (id = 1),
        writes INTEGER NOT NULL
    );
    """,
    # 2: locks on identities, groups and certificate serials, and their change counter.
    """
    CREATE TABLE locks (
        id         TEXT PRIMARY KEY NOT NULL,   -- 32 hex digits (uuid4)
        kind       TEXT NOT NULL CHECK (kind IN ('identity', 'group', 'serial')),
        value      TEXT NOT NULL,               -- normalised (serials: lower-case hex)
        until      REAL,                        -- NULL: until removed
        reason     TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at REAL NOT NULL
    );                                          -- rowid: insertion order, for ties
    CREATE INDEX locks_until ON locks (until);

    CREATE TABLE lock_version (
        id      INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL
    );
    INSERT INTO lock_version (id, version) VALUES (1, 0);
    """,
    # 3: the session index (auditors filter on it; `replay --index` reads it).
    """
    CREATE TABLE sessions (
        session_id       TEXT PRIMARY KEY NOT NULL,
        identity         TEXT NOT NULL,
        email            TEXT,
        groups_json      TEXT NOT NULL,
        target           TEXT NOT NULL,
        client_address   TEXT NOT NULL,
        started_at       REAL NOT NULL,
        file             TEXT,
        ended_at         REAL,                -- NULL: open (or the gateway crashed)
        end_reason       TEXT,
        bytes_to_gateway INTEGER NOT NULL DEFAULT 0,
        bytes_to_client  INTEGER NOT NULL DEFAULT 0,
        requests         INTEGER NOT NULL DEFAULT 0,
        denials          INTEGER NOT NULL DEFAULT 0,
        approvals        INTEGER NOT NULL DEFAULT 0,
        masked           INTEGER NOT NULL DEFAULT 0,
        trailer_head     BLOB,
        trailer_sig      BLOB
    );
    CREATE INDEX sessions_open ON sessions (ended_at);
    CREATE INDEX sessions_identity ON sessions (identity, started_at);
    """,
)
# Tables later issues add, each as a new migration appended above:
#   - approvals (pending requests, decisions, single-use grants with their expiry).

_SESSION_COLUMNS: Final = ("session_id, identity, email, groups_json, target, client_address, "
                           "started_at, file, ended_at, end_reason, bytes_to_gateway, "
                           "bytes_to_client, requests, denials, approvals, masked, trailer_head, "
                           "trailer_sig")

_LOCK_COLUMNS: Final = "id, kind, value, until, reason, created_by, created_at"

#: the newest schema version this code knows
SCHEMA_VERSION: Final = len(MIGRATIONS)


class SqliteStateStore(StateStore):
    """The state store in an SQLite file (WAL mode). Thread-safe; every call blocks.

    Args:
        path: the database file; created 0600 (its directory 0700) if missing.
        busy_timeout: seconds to wait for another process's lock before failing.

    Raises:
        SchemaTooNew: the file's schema is newer than :data:`SCHEMA_VERSION`.
        StoreCorrupt: the file is not an SQLite database or not an l4proxy state store.
        StoreError: it cannot be created, opened or migrated.
    """

    def __init__(self, path: Path, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        #: synchronous may still be NORMAL after a session-index write (see ``_write``)
        self._relaxed = False
        self._identity = _create_private_file(self.path)
        try:
            db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None,
                                 check_same_thread=False)
        except sqlite3.Error as exc:
            raise _map_error(exc, self.path, "open") from exc
        try:
            self._version = _open_schema(db, self.path)
        except BaseException:
            db.close()
            raise
        self._db: sqlite3.Connection | None = db

    @classmethod
    def open(cls, state_dir: Path, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> SqliteStateStore:
        """The store in ``state_dir/state.sqlite3``, creating ``state_dir`` 0700 if missing.

        Raises:
            The same as the constructor.
        """
        state_dir = Path(state_dir)
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the state directory {state_dir}: {exc}") from exc
        return cls(state_dir / STATE_FILE_NAME, busy_timeout=busy_timeout)

    def __repr__(self) -> str:
        return f"SqliteStateStore({str(self.path)!r})"

    @property
    def schema_version(self) -> int:
        return self._version

    # --- transactions --------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self, what: str, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """Run the ``with`` body in one ``BEGIN IMMEDIATE`` transaction under the lock.
        ``durable=False``: commit without an fsync (see the module docstring)."""
        with self._lock:
            db = self._db
            if db is None:
                raise StoreError(f"{what}: the state store {self.path} is closed")
            try:
                if durable and self._relaxed:
                    # a relaxed write could not restore FULL: do it now, or do not write
                    db.execute("PRAGMA synchronous = FULL")
                    self._relaxed = False
                if not durable:
                    self._relaxed = True
                    db.execute("PRAGMA synchronous = NORMAL")
                try:
                    with _transaction(db):
                        yield db
                finally:
                    if not durable:
                        with contextlib.suppress(sqlite3.Error):  # retried before the next durable write
                            db.execute("PRAGMA synchronous = FULL")
                            self._relaxed = False
            except sqlite3.Error as exc:
                raise _map_error(exc, self.path, what) from exc

    @contextlib.contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        """Run the ``with`` body in one read transaction (one snapshot; no write lock)."""
        with self._lock:
            db = self._db
            if db is None:
                raise StoreError(f"{what}: the state store {self.path} is closed")
            try:
                with _transaction(db, write=False):
                    yield db
            except sqlite3.Error as exc:
                raise _map_error(exc, self.path, what) from exc

    # --- tokens --------------------------------------------------------------------------

    def claim_token(self, replay_key: str, *, binding: str, expires_at: float,
                    now: float) -> TokenClaim:
        check_key("replay_key", replay_key)
        check_binding(binding)
        expires_at = check_time("expires_at", expires_at)
        now = check_time("now", now)
        if expires_at < now:
            raise ValueError("expires_at is in the past: the claim could not be remembered")
        with self._write("claim a token") as db:
            row = db.execute(
                "SELECT binding, expires_at, issued_at, certificate_pem FROM token_claims "
                "WHERE replay_key = ?", (replay_key,)).fetchone()
            if row is None or row[1] < now:
                db.execute(
                    "INSERT OR REPLACE INTO token_claims "
                    "(replay_key, binding, claimed_at, expires_at, issued_at, certificate_pem) "
                    "VALUES (?, ?, ?, ?, NULL, NULL)", (replay_key, binding, now, expires_at))
                return TokenClaim(kind=ClaimKind.FIRST)
            known_binding, _, issued_at, certificate_pem = row
            if (known_binding == binding and certificate_pem is not None
                    and issued_at is not None and now <= issued_at + TOKEN_RETRY_WINDOW):
                return TokenClaim(kind=ClaimKind.RETRY, certificate_pem=certificate_pem)
            return TokenClaim(kind=ClaimKind.REUSED)

    def record_issued(self, replay_key: str, *, certificate_pem: str, now: float) -> None:
        check_key("replay_key", replay_key)
        check_key("certificate_pem", certificate_pem)
        now = check_time("now", now)
        with self._write("record an issued certificate") as db:
            row = db.execute("SELECT certificate_pem IS NOT NULL FROM token_claims "
                             "WHERE replay_key = ?", (replay_key,)).fetchone()
            if row is None:
                raise StoreError("record an issued certificate: the replay key has no claim")
            if row[0]:
                raise StoreError("record an issued certificate: a certificate is already "
                                 "recorded for the replay key")
            db.execute("UPDATE token_claims SET issued_at = ?, certificate_pem = ? "
                       "WHERE replay_key = ?", (now, certificate_pem, replay_key))

    # --- rate limits ---------------------------------------------------------------------

    def rate_limit(self, key: str, *, limit: int, per_seconds: float, now: float) -> RateDecision:
        check_key("key", key)
        limit, per_seconds = check_rate(limit, per_seconds)
        now = check_time("now", now)
        with self._write("rate limit") as db:
            window_start = now - per_seconds
            db.execute("DELETE FROM rate_events WHERE key = ? AND at <= ?", (key, window_start))
            (count,) = db.execute("SELECT count(*) FROM rate_events WHERE key = ?", (key,)).fetchone()
            if count >= limit:
                # a slot frees when the event that puts us at the limit leaves the window
                (at,) = db.execute("SELECT at FROM rate_events WHERE key = ? ORDER BY at "
                                   "LIMIT 1 OFFSET ?", (key, count - limit)).fetchone()
                return RateDecision(allowed=False,
                                    retry_after=max(at + per_seconds - now, _MIN_RETRY_AFTER))
            db.execute("INSERT INTO rate_events (key, at, expires_at) VALUES (?, ?, ?)",
                       (key, now, now + per_seconds))
            return RateDecision(allowed=True)

    # --- the session index ------------------------------------------------------------------

    def index_session_start(self, record: SessionRecord) -> None:
        with self._write("index a session", durable=False) as db:
            db.execute(f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES "
                       "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       _session_row(record))

    def index_session_end(self, session_id: str, *, ended_at: float, end_reason: str,
                          bytes_to_gateway: int, bytes_to_client: int, requests: int = 0,
                          denials: int = 0, approvals: int = 0, masked: int = 0,
                          trailer_head: bytes | None = None,
                          trailer_sig: bytes | None = None) -> None:
        ended_at = check_time("ended_at", ended_at)
        with self._write("close a session in the index", durable=False) as db:
            updated = db.execute(
                "UPDATE sessions SET ended_at = ?, end_reason = ?, bytes_to_gateway = ?, "
                "bytes_to_client = ?, requests = ?, denials = ?, approvals = ?, masked = ?, "
                "trailer_head = ?, trailer_sig = ? WHERE session_id = ?",
                (ended_at, end_reason, bytes_to_gateway, bytes_to_client, requests, denials,
                 approvals, masked, trailer_head, trailer_sig, session_id)).rowcount
        if not updated:
            raise StoreError(f"no session {session_id!r} in the index")

    def open_sessions(self) -> list[SessionRecord]:
        with self._read("list open sessions") as db:
            rows = db.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE ended_at IS NULL "
                              "ORDER BY started_at").fetchall()
        return [_session_from_row(r) for r in rows]

    def get_session(self, session_id: str) -> SessionRecord | None:
        with self._read("read a session") as db:
            row = db.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = ?",
                             (session_id,)).fetchone()
        return None if row is None else _session_from_row(row)

    # --- locks ---------------------------------------------------------------------------

    def add_lock(self, lock: LockSpec, *, now: float) -> Lock:
        if not isinstance(lock, LockSpec):
            raise ValueError("add_lock takes a LockSpec")
        now = check_time("now", now)
        if lock.until is not None and lock.until <= now:
            raise ValueError("until is not in the future: the lock would never apply")
        stored = Lock(id=uuid.uuid4().hex, kind=lock.kind, value=lock.value, until=lock.until,
                      reason=lock.reason, created_by=lock.created_by, created_at=now)
        with self._write("add a lock") as db:
            db.execute(f"INSERT INTO locks ({_LOCK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (stored.id, str(stored.kind), stored.value, stored.until, stored.reason,
                        stored.created_by, stored.created_at))
            _bump_lock_version(db)
        return stored

    def list_locks(self, *, now: float) -> list[Lock]:
        now = check_time("now", now)
        with self._read("list locks") as db:
            return _active_locks(db, now)

    def get_lock(self, lock_id: str) -> Lock | None:
        if not is_lock_id(lock_id):
            return None
        with self._read("read a lock") as db:
            row = db.execute(f"SELECT {_LOCK_COLUMNS} FROM locks WHERE id = ?", (lock_id,)).fetchone()
        return None if row is None else _lock_from_row(row)

    def remove_lock(self, lock_id: str) -> bool:
        if not is_lock_id(lock_id):
            return False
        with self._write("remove a lock") as db:
            removed = db.execute("DELETE FROM locks WHERE id = ?", (lock_id,)).rowcount > 0
            if removed:
                _bump_lock_version(db)
        return removed

    def active_locks(self, *, now: float) -> LockSet:
        now = check_time("now", now)
        with self._read("read the active locks") as db:
            version = _lock_version(db)
            locks = _active_locks(db, now)
        return LockSet(locks=tuple(locks), version=version)

    def locks_version(self) -> int:
        with self._read("read the locks version") as db:
            return _lock_version(db)

    # --- housekeeping --------------------------------------------------------------------

    def purge_expired(self, now: float) -> int:
        now = check_time("now", now)
        with self._write("purge expired records") as db:
            tokens = db.execute("DELETE FROM token_claims WHERE expires_at < ?", (now,)).rowcount
            events = db.execute("DELETE FROM rate_events WHERE expires_at <= ?", (now,)).rowcount
            # an expired lock matches nothing: removing it changes no decision, so the
            # version (which tells gateways to reload) stays as it is
            locks = db.execute("DELETE FROM locks WHERE until IS NOT NULL AND until <= ?",
                               (now,)).rowcount
        return tokens + events + locks

    def check_writable(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise StoreError(f"the state database {self.path} is gone: {exc}") from exc
        if (st.st_dev, st.st_ino) != self._identity:
            raise StoreError(f"the state database {self.path} was replaced or removed")
        with self._write("check writability") as db:
            db.execute("INSERT INTO write_probe (id, writes) VALUES (1, 1) "
                       "ON CONFLICT (id) DO UPDATE SET writes = writes + 1")

    def close(self) -> None:
        with self._lock:
            db, self._db = self._db, None
            if db is not None:
                db.close()


# --- lock rows -----------------------------------------------------------------------------


def _session_row(r: SessionRecord) -> tuple[Any, ...]:
    return (r.session_id, r.identity, r.email, json.dumps(list(r.groups)), r.target,
            r.client_address, r.started_at, r.file, r.ended_at, r.end_reason, r.bytes_to_gateway,
            r.bytes_to_client, r.requests, r.denials, r.approvals, r.masked, r.trailer_head,
            r.trailer_sig)


def _session_from_row(row: tuple[Any, ...]) -> SessionRecord:
    (sid, identity, email, groups, target, addr, started, file, ended, reason, b_in, b_out,
     requests, denials, approvals, masked, head, sig) = row
    return SessionRecord(session_id=sid, identity=identity, email=email,
                         groups=tuple(json.loads(groups)), target=target, client_address=addr,
                         started_at=started, file=file, ended_at=ended, end_reason=reason,
                         bytes_to_gateway=b_in, bytes_to_client=b_out, requests=requests,
                         denials=denials, approvals=approvals, masked=masked, trailer_head=head,
                         trailer_sig=sig)


def _lock_from_row(row: tuple[Any, ...]) -> Lock:
    lock_id, kind, value, until, reason, created_by, created_at = row
    return Lock(id=lock_id, kind=LockKind(kind), value=value,
                until=None if until is None else float(until), reason=reason,
                created_by=created_by, created_at=float(created_at))


def _active_locks(db: sqlite3.Connection, now: float) -> list[Lock]:
    rows = db.execute(f"SELECT {_LOCK_COLUMNS} FROM locks WHERE until IS NULL OR until > ? "
                      "ORDER BY created_at, rowid", (now,)).fetchall()
    return [_lock_from_row(row) for row in rows]


def _lock_version(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT version FROM lock_version WHERE id = 1").fetchone()
    if row is None:
        raise sqlite3.DatabaseError("the lock_version row is missing")
    return int(row[0])


def _bump_lock_version(db: sqlite3.Connection) -> None:
    db.execute("UPDATE lock_version SET version = version + 1 WHERE id = 1")


# --- opening and migrating -----------------------------------------------------------------


def _create_private_file(path: Path) -> tuple[int, int]:
    """Create ``path`` 0600 (its directory 0700) if missing; tighten it if looser.

    Returns the file's ``(st_dev, st_ino)``.
    """
    try:
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"the state database {path} is not a regular file")
            if st.st_mode & 0o077:
                os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o700)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StoreError(f"cannot create the state database {path}: {exc}") from exc
    return st.st_dev, st.st_ino


def _open_schema(db: sqlite3.Connection, path: Path) -> int:
    """Check the file is ours and not too new, switch to WAL, migrate. Returns the version."""
    try:
        # read-only checks first: a file we refuse is left exactly as it was
        version = _pragma_int(db, "user_version")
        application_id = _pragma_int(db, "application_id")
        if version > SCHEMA_VERSION:
            raise _too_new(path, version)
        if version == 0:
            (tables,) = db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            if tables or application_id not in (0, APPLICATION_ID):
                raise StoreCorrupt(f"{path} is an SQLite database but not an l4proxy state store "
                                   "(it has tables but no schema version)")
        elif application_id != APPLICATION_ID:
            raise StoreCorrupt(f"{path} is an SQLite database but not an l4proxy state store "
                               f"(application id {application_id:#x})")
        (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise StoreError(f"cannot put {path} in WAL mode (journal mode is {mode!r}); "
                             "is it on a network file system?")
        db.execute("PRAGMA synchronous = FULL")
        return _migrate(db, MIGRATIONS, path=path)
    except sqlite3.Error as exc:
        raise _map_error(exc, path, "open") from exc


def _migrate(db: sqlite3.Connection, migrations: Sequence[str], *, path: Path) -> int:
    """Apply ``migrations[v:]`` to a database at version ``v``, each with its version bump
    in one ``BEGIN IMMEDIATE`` transaction. Returns the final version.

    The version is re-read inside each transaction, so two processes migrating one file
    at once apply each migration once.

    Raises:
        SchemaTooNew: the version is (or became) higher than ``len(migrations)``.
        sqlite3.Error: a migration failed; the versions before it stay applied.
    """
    target = len(migrations)
    while True:
        with _transaction(db):
            version = _pragma_int(db, "user_version")
            if version > target:
                raise _too_new(path, version, supported=target)
            if version == target:
                return version
            for statement in _statements(migrations[version]):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {version + 1:d}")


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection, *, write: bool = True) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` (``BEGIN DEFERRED`` for a read) … ``COMMIT``, or ``ROLLBACK``
    if the body raises."""
    db.execute("BEGIN IMMEDIATE" if write else "BEGIN DEFERRED")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        # also after a failed COMMIT, which can leave the transaction open
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # the first error says more
                db.execute("ROLLBACK")
        raise


def _statements(script: str) -> list[str]:
    """Split an SQL script into statements (``sqlite3.execute`` runs one at a time).

    ``sqlite3.complete_statement`` decides where a statement ends, so semicolons inside
    literals, comments or trigger bodies do not split it.
    """
    statements: list[str] = []
    pending = ""
    for piece in re.split(r"(?<=;)", script):
        pending += piece
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement in a migration: {pending.strip()[:60]!r}")
    return statements


def _pragma_int(db: sqlite3.Connection, name: str) -> int:
    (value,) = db.execute(f"PRAGMA {name}").fetchone()
    return int(value)


def _too_new(path: Path, found: int, *, supported: int = SCHEMA_VERSION) -> SchemaTooNew:
    return SchemaTooNew(f"{path} has schema version {found}, but this l4proxy knows versions up "
                        f"to {supported}: refusing to open it (upgrade l4proxy)",
                        found=found, supported=supported)


def _map_error(exc: sqlite3.Error, path: Path, what: str) -> StoreError:
    """Our typed error for an sqlite3 one (the caller raises it ``from exc``)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return StoreCorrupt(f"{what}: {path} is not a database or is damaged ({exc})")
    return StoreError(f"{what}: state database {path}: {exc}")
