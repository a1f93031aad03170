# Copyright (c) radfm3d contributors. Apache-2.0.
"""Join large CSV tables by a key column without holding them in memory: stream each into an on-disk SQLite index.

Public datasets ship several CSVs per split (reports, labels, metadata) keyed by a file name, tens of thousands of
rows each; joining them with dictionaries holds every row in memory. :class:`TableIndex` streams each CSV once into
a SQLite file (stdlib ``sqlite3``; one ``key -> row JSON`` table per CSV), so memory stays independent of the row
count and a resumed import reuses the index when the CSV has not changed (same size and mtime).
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from radfm3d.errors import RadFM3DInputError

__all__ = ["TableIndex", "stream_csv"]


def stream_csv(path: str | os.PathLike, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict[str, str]]]:
    """``(row number, row)`` of a CSV (row 1 is the header), streamed; clear errors for missing columns and
    undecodable text (naming the row)."""
    path = Path(path)
    try:
        fh = open(path, newline="", encoding="utf-8-sig")
    except OSError as err:
        raise RadFM3DInputError(path, f"cannot open ({err.strerror})") from None
    with fh:
        reader = csv.DictReader(fh)
        try:
            columns = reader.fieldnames or []
            missing = [c for c in required if c not in columns]
            if missing:
                raise RadFM3DInputError(path, f"column(s) {missing} missing; the file has {columns}")
            for row_number, row in enumerate(reader, start=2):
                yield row_number, row
        except (UnicodeDecodeError, csv.Error) as err:
            raise RadFM3DInputError(path, f"not readable as UTF-8 CSV near row {reader.line_num} ({err})") from None


class TableIndex:
    """CSV tables indexed by one key column in a SQLite file; ``get(table, key)`` -> the row dict or None."""

    def __init__(self, db_path: str | os.PathLike) -> None:
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path))
        self._db.execute("CREATE TABLE IF NOT EXISTS sources (name TEXT PRIMARY KEY, signature TEXT)")
        self.duplicates: dict[str, list[tuple[int, str]]] = {}

    def load(self, name: str, csv_path: str | os.PathLike, key_column: str, *, grouped: bool = False) -> None:
        """Index ``csv_path`` under ``name`` by ``key_column`` (skipped when already indexed from the same file).

        Rows without a key are left out. ``grouped=False``: one row per key, a repeated key keeps its first row (the
        repeats are in ``duplicates``), read with :meth:`get`; ``grouped=True``: every row is kept (several sentences
        per volume), read with :meth:`groups`.
        """
        csv_path = Path(csv_path)
        st = csv_path.stat()
        signature = f"{csv_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{key_column}|{'grouped' if grouped else ''}"
        done = self._db.execute("SELECT signature FROM sources WHERE name = ?", (name,)).fetchone()
        if done and done[0] == signature:
            return
        table = self._table(name)
        self._db.execute(f"DROP TABLE IF EXISTS {table}")
        unique = "key TEXT, row_number INTEGER PRIMARY KEY" if grouped else "key TEXT PRIMARY KEY, row_number INTEGER"
        self._db.execute(f"CREATE TABLE {table} ({unique}, row TEXT)")
        repeats: list[tuple[int, str]] = []
        batch: list[tuple[str, int, str]] = []
        for row_number, row in stream_csv(csv_path, (key_column,)):
            key = (row.get(key_column) or "").strip()
            if key:
                batch.append((key, row_number, json.dumps(row)))
            if len(batch) >= 2000:
                repeats += self._insert(table, batch)
                batch = []
        repeats += self._insert(table, batch)
        if grouped:
            self._db.execute(f"CREATE INDEX IF NOT EXISTS {table}_key ON {table} (key)")
        self.duplicates[name] = repeats
        self._db.execute("INSERT OR REPLACE INTO sources VALUES (?, ?)", (name, signature))
        self._db.commit()

    def groups(self, name: str) -> Iterator[tuple[str, list[tuple[int, dict[str, Any]]]]]:
        """``(key, [(row number, row), ...])`` of a table loaded with ``grouped=True``, keys in order of first appearance."""
        table = self._table(name)
        keys = self._db.execute(f"SELECT key FROM {table} GROUP BY key ORDER BY MIN(row_number)").fetchall()
        for (key,) in keys:
            rows = self._db.execute(f"SELECT row_number, row FROM {table} WHERE key = ? ORDER BY row_number",
                                    (key,)).fetchall()
            yield key, [(n, json.loads(r)) for n, r in rows]

    def count_groups(self, name: str) -> int:
        return int(self._db.execute(f"SELECT COUNT(DISTINCT key) FROM {self._table(name)}").fetchone()[0])

    def _insert(self, table: str, rows: list[tuple[str, int, str]]) -> list[tuple[int, str]]:
        repeats = []
        for key, row_number, row in rows:
            try:
                self._db.execute(f"INSERT INTO {table} VALUES (?, ?, ?)", (key, row_number, row))
            except sqlite3.IntegrityError:
                repeats.append((row_number, key))
        return repeats

    def get(self, name: str, key: str) -> dict[str, Any] | None:
        found = self._db.execute(f"SELECT row FROM {self._table(name)} WHERE key = ?", (key,)).fetchone()
        return None if found is None else json.loads(found[0])

    def has_table(self, name: str) -> bool:
        return self._db.execute("SELECT 1 FROM sources WHERE name = ?", (name,)).fetchone() is not None

    @staticmethod
    def _table(name: str) -> str:
        return "t_" + "".join(c if c.isalnum() else "_" for c in name)

    def close(self) -> None:
        self._db.close()
