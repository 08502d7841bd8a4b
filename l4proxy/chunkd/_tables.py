"""Typed tables of the reference service, in SQLite (blocking; use ``trio.to_thread``).

Theory of operation: user tables live in ``tables.sqlite3`` (WAL mode). Their declared
column types are kept in ``_chunkd_columns`` so that values come back with the type they
went in with (SQLite itself would turn a bool into an int). Names are validated against
a strict pattern and always double-quoted; every value, filters included, is a bound
parameter: no user text is ever spliced into SQL. An ``insert`` body runs in one
transaction on its own connection: all its ROWS frames land, or none.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from l4proxy.wire import Column, ColumnType, ErrorCode

from ._errors import ServiceError
from ._names import check_column, check_table

__all__ = ["RowInserter", "TableStore"]

_SQL_TYPES = {
    ColumnType.TEXT: "TEXT", ColumnType.INT: "INTEGER", ColumnType.FLOAT: "REAL",
    ColumnType.BOOL: "INTEGER", ColumnType.BYTES: "BLOB",
}
_PY_TYPES: dict[ColumnType, type] = {
    ColumnType.TEXT: str, ColumnType.INT: int, ColumnType.FLOAT: float,
    ColumnType.BOOL: bool, ColumnType.BYTES: bytes,
}
_META = """
CREATE TABLE IF NOT EXISTS _chunkd_columns (
    tbl TEXT NOT NULL, pos INTEGER NOT NULL, name TEXT NOT NULL, type TEXT NOT NULL,
    PRIMARY KEY (tbl, pos)
);
"""
MAX_SCAN_BATCH = 512


def _q(name: str) -> str:
    """Quote an identifier that already passed check_table/check_column."""
    return '"' + name.replace('"', '""') + '"'


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10.0)
    db.execute("PRAGMA journal_mode=WAL")
    return db


class TableStore:
    """Create, drop, insert into and scan typed tables. Thread-safe; every call blocks."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "tables.sqlite3"
        self._lock = threading.Lock()
        self._db = _connect(self.path)
        self._db.executescript(_META)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def columns(self, table: str) -> tuple[Column, ...]:
        with self._lock:
            return self._columns(self._db, table)

    @staticmethod
    def _columns(db: sqlite3.Connection, table: str) -> tuple[Column, ...]:
        rows = db.execute("SELECT name, type FROM _chunkd_columns WHERE tbl = ? ORDER BY pos",
                          (table,)).fetchall()
        if not rows:
            raise ServiceError(ErrorCode.NOT_FOUND, f"table {table!r} does not exist")
        return tuple(Column(name=n, type=ColumnType(t)) for n, t in rows)

    def create_table(self, table: str, columns: Sequence[tuple[str, str]]) -> None:
        check_table(table)
        seen: set[str] = set()
        cols: list[Column] = []
        for name, ctype in columns:
            check_column(name)
            if name.lower() in seen:
                raise ServiceError(ErrorCode.INVALID_ARGUMENT, f"duplicate column {name!r}")
            seen.add(name.lower())
            cols.append(Column(name=name, type=ColumnType(ctype)))
        ddl = ", ".join(f"{_q(c.name)} {_SQL_TYPES[c.type]}" for c in cols)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                exists = self._db.execute(
                    "SELECT 1 FROM _chunkd_columns WHERE tbl = ? COLLATE NOCASE LIMIT 1",
                    (table,)).fetchone()
                if exists:
                    raise ServiceError(ErrorCode.ALREADY_EXISTS, f"table {table!r} already exists")
                self._db.execute(f"CREATE TABLE {_q(table)} ({ddl})")
                self._db.executemany("INSERT INTO _chunkd_columns VALUES (?, ?, ?, ?)",
                                     [(table, i, c.name, c.type.value) for i, c in enumerate(cols)])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def drop_table(self, table: str) -> None:
        check_table(table)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._columns(self._db, table)
                self._db.execute(f"DROP TABLE {_q(table)}")
                self._db.execute("DELETE FROM _chunkd_columns WHERE tbl = ?", (table,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def list_tables(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT DISTINCT tbl FROM _chunkd_columns ORDER BY tbl")]

    def begin_insert(self, table: str, names: Sequence[str]) -> RowInserter:
        check_table(table)
        cols = self.columns(table)
        by_name = {c.name: c for c in cols}
        chosen: list[Column] = []
        for name in names:
            col = by_name.get(name)
            if col is None:
                raise ServiceError(ErrorCode.INVALID_ARGUMENT,
                                   f"table {table!r} has no column {name[:80]!r}")
            if col in chosen:
                raise ServiceError(ErrorCode.INVALID_ARGUMENT, f"column {name!r} named twice")
            chosen.append(col)
        return RowInserter(self.path, table, tuple(chosen))

    def scan(self, table: str, names: Sequence[str] | None, where: Mapping[str, Any],
             limit: int | None) -> tuple[tuple[Column, ...], Iterator[list[tuple[Any, ...]]]]:
        """Validate a scan and return (columns, batches of rows).

        The iterator owns its own connection and closes it when exhausted or closed.
        """
        check_table(table)
        cols = self.columns(table)
        by_name = {c.name: c for c in cols}
        chosen = cols if not names else tuple(self._pick(by_name, table, n) for n in names)
        clauses: list[str] = []
        params: list[Any] = []
        for name, value in where.items():
            col = self._pick(by_name, table, name)
            if value is None:
                clauses.append(f"{_q(col.name)} IS NULL")
                continue
            _check_cell(col, value)
            clauses.append(f"{_q(col.name)} = ?")
            params.append(value)
        sql = f"SELECT {', '.join(_q(c.name) for c in chosen)} FROM {_q(table)}"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY rowid"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return chosen, self._batches(sql, params, chosen)

    @staticmethod
    def _pick(by_name: Mapping[str, Column], table: str, name: str) -> Column:
        col = by_name.get(name)
        if col is None:
            raise ServiceError(ErrorCode.INVALID_ARGUMENT,
                               f"table {table!r} has no column {name[:80]!r}")
        return col

    def _batches(self, sql: str, params: list[Any],
                 cols: tuple[Column, ...]) -> Iterator[list[tuple[Any, ...]]]:
        db = _connect(self.path)
        try:
            cur = db.execute(sql, params)
            bools = [i for i, c in enumerate(cols) if c.type is ColumnType.BOOL]
            while True:
                batch = cur.fetchmany(MAX_SCAN_BATCH)
                if not batch:
                    return
                if bools:
                    batch = [_fix_bools(r, bools) for r in batch]
                yield batch
        finally:
            db.close()


def _fix_bools(row: tuple[Any, ...], bools: list[int]) -> tuple[Any, ...]:
    out = list(row)
    for i in bools:
        if out[i] is not None:
            out[i] = bool(out[i])
    return tuple(out)


def _check_cell(col: Column, value: Any) -> None:
    if value is not None and type(value) is not _PY_TYPES[col.type]:
        raise ServiceError(ErrorCode.INVALID_ARGUMENT,
                           f"column {col.name!r} is {col.type}, got {type(value).__name__}")


class RowInserter:
    """One insert body: ``add`` each ROWS frame, then ``commit`` or ``abort``."""

    def __init__(self, path: Path, table: str, columns: tuple[Column, ...]) -> None:
        self.columns = columns
        self.count = 0
        self._db: sqlite3.Connection | None = _connect(path)
        placeholders = ", ".join("?" for _ in columns)
        self._sql = (f"INSERT INTO {_q(table)} ({', '.join(_q(c.name) for c in columns)}) "
                     f"VALUES ({placeholders})")
        self._db.execute("BEGIN")

    def add(self, rows: Sequence[Sequence[Any]]) -> None:
        assert self._db is not None
        for row in rows:
            for col, value in zip(self.columns, row, strict=True):
                _check_cell(col, value)
        self._db.executemany(self._sql, rows)
        self.count += len(rows)

    def commit(self) -> int:
        assert self._db is not None
        try:
            self._db.execute("COMMIT")
        finally:
            self._db.close()
            self._db = None
        return self.count

    def abort(self) -> None:
        if self._db is not None:
            try:
                self._db.execute("ROLLBACK")
            finally:
                self._db.close()
                self._db = None
