"""The app's SQLite database (WAL): sessions, settings, study plan, answers, reviews, jobs.

Every write is its own transaction, committed before the request returns, with
``synchronous=FULL``: an answer the browser saw stored survives a kill -9 of the server.
"""
from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from data_prep.summary_review import create_reviews_table, insert_review

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS settings (
        id INTEGER PRIMARY KEY AUTOINCREMENT, json TEXT NOT NULL UNIQUE, created TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS sessions (
        token TEXT PRIMARY KEY, reader TEXT NOT NULL, created TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS study_items (
        item TEXT PRIMARY KEY, position INTEGER NOT NULL UNIQUE,
        source TEXT NOT NULL CHECK (source IN ('real', 'synthetic')),
        ref TEXT NOT NULL, stratum TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS study_answers (
        id INTEGER PRIMARY KEY AUTOINCREMENT, reader TEXT NOT NULL, item TEXT NOT NULL
            REFERENCES study_items(item),
        answer TEXT NOT NULL CHECK (answer IN ('real', 'synthetic')),
        confidence INTEGER NOT NULL, created TEXT NOT NULL, settings_id INTEGER NOT NULL
            REFERENCES settings(id),
        UNIQUE (reader, item))""",
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY, reader TEXT NOT NULL, params TEXT NOT NULL, status TEXT NOT NULL,
        done INTEGER NOT NULL DEFAULT 0, total INTEGER NOT NULL, error TEXT,
        created TEXT NOT NULL, settings_id INTEGER NOT NULL)""",
)


def now() -> str:
    """UTC timestamp with milliseconds (ISO 8601)."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class Database:
    """Thin access layer; one short-lived connection per operation (thread-safe)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as conn:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise RuntimeError(f"{self.path}: cannot switch SQLite to WAL mode ({mode})")
            for ddl in SCHEMA:
                conn.execute(ddl)
            create_reviews_table(conn)

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection whose block is one committed transaction."""
        conn = sqlite3.connect(self.path, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    # settings and meta -------------------------------------------------------------------
    def settings_id(self, settings: dict[str, Any]) -> int:
        """Row id of a settings snapshot (inserted once per distinct JSON)."""
        text = json.dumps(settings, sort_keys=True)
        with self.connect() as conn:
            conn.execute("INSERT OR IGNORE INTO settings (json, created) VALUES (?, ?)",
                         (text, now()))
            return int(conn.execute("SELECT id FROM settings WHERE json = ?",
                                    (text,)).fetchone()[0])

    def get_meta(self, key: str) -> str | None:
        """A value of the meta table."""
        with self.connect() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    # sessions ------------------------------------------------------------------------------
    def new_session(self, reader: str) -> str:
        """A new session token for ``reader``."""
        token = secrets.token_urlsafe(24)
        with self.connect() as conn:
            conn.execute("INSERT INTO sessions (token, reader, created) VALUES (?, ?, ?)",
                         (token, reader, now()))
        return token

    def session_reader(self, token: str | None) -> str | None:
        """The reader of a session token, None if unknown."""
        if not token:
            return None
        with self.connect() as conn:
            row = conn.execute("SELECT reader FROM sessions WHERE token = ?", (token,)).fetchone()
        return None if row is None else row[0]

    # reader study -----------------------------------------------------------------------------
    def init_study(self, key: str, items: Sequence[dict[str, Any]]) -> None:
        """Store the study plan once; a database holding another plan is refused."""
        with self.connect() as conn:
            old = conn.execute("SELECT value FROM meta WHERE key = 'study'").fetchone()
            if old is not None:
                if old[0] != key:
                    raise ValueError(f"{self.path} holds a reader study with other settings "
                                     f"({old[0]}); use another --db to start a new study")
                return
            conn.execute("INSERT INTO meta (key, value) VALUES ('study', ?)", (key,))
            conn.executemany(
                "INSERT INTO study_items (item, position, source, ref, stratum) "
                "VALUES (:item, :position, :source, :ref, :stratum)", items)

    def study_items(self) -> list[dict[str, Any]]:
        """The study plan in position order."""
        with self.connect() as conn:
            rows = conn.execute("SELECT * FROM study_items ORDER BY position").fetchall()
        return [dict(r) for r in rows]

    def study_item(self, item: str) -> dict[str, Any] | None:
        """One study item by its opaque id."""
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM study_items WHERE item = ?", (item,)).fetchone()
        return None if row is None else dict(row)

    def answered_items(self, reader: str) -> set[str]:
        """Items ``reader`` has answered."""
        with self.connect() as conn:
            rows = conn.execute("SELECT item FROM study_answers WHERE reader = ?",
                                (reader,)).fetchall()
        return {r[0] for r in rows}

    def store_answer(self, reader: str, item: str, answer: str, confidence: int,
                     settings_id: int) -> bool:
        """Commit an answer; False if ``reader`` had answered ``item`` already (first wins)."""
        with self.connect() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO study_answers (reader, item, answer, confidence, created, "
                "settings_id) VALUES (?, ?, ?, ?, ?, ?)",
                (reader, item, answer, int(confidence), now(), settings_id))
            return cur.rowcount == 1

    def answers(self) -> list[dict[str, Any]]:
        """Every answer joined with its item's truth and stratum, oldest first."""
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT a.reader, a.item, a.answer, a.confidence, a.created, a.settings_id, "
                "i.source AS truth, i.stratum FROM study_answers a "
                "JOIN study_items i ON i.item = a.item ORDER BY a.id").fetchall()
        return [dict(r) for r in rows]

    def answer_settings(self) -> list[dict[str, Any]]:
        """The distinct app settings the stored answers were given under."""
        with self.connect() as conn:
            rows = conn.execute("SELECT json FROM settings WHERE id IN (SELECT settings_id FROM "
                                "study_answers) ORDER BY id").fetchall()
        return [json.loads(r[0]) for r in rows]

    # summary reviews ------------------------------------------------------------------------
    def store_review(self, review: dict[str, Any]) -> None:
        """Commit one summary review."""
        with self.connect() as conn:
            insert_review(conn, {**review, "created": now()})

    def reviewed_pairs(self, reviewer: str) -> set[tuple[str, int]]:
        """``(report_id, summary_index)`` pairs ``reviewer`` has reviewed."""
        with self.connect() as conn:
            rows = conn.execute("SELECT report_id, summary_index FROM summary_reviews "
                                "WHERE reviewer = ?", (reviewer,)).fetchall()
        return {(r[0], int(r[1])) for r in rows}

    # generation jobs -------------------------------------------------------------------------
    def add_job(self, job_id: str, reader: str, params: dict[str, Any], total: int,
                settings_id: int) -> None:
        """Record a queued generation job."""
        with self.connect() as conn:
            conn.execute("INSERT INTO jobs (id, reader, params, status, total, created, "
                         "settings_id) VALUES (?, ?, ?, 'queued', ?, ?, ?)",
                         (job_id, reader, json.dumps(params), total, now(), settings_id))

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Set ``status``, ``done`` and/or ``error`` of a job."""
        allowed = {"status", "done", "error"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"job fields must be among {sorted(allowed)}, got {sorted(fields)}")
        assignments = ", ".join(f"{k} = ?" for k in fields)
        with self.connect() as conn:
            conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id))

    def job(self, job_id: str) -> dict[str, Any] | None:
        """A job row with its params decoded."""
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        job = dict(row)
        job["params"] = json.loads(job["params"])
        return job

    def unfinished_jobs(self) -> list[dict[str, Any]]:
        """Queued or running jobs (to requeue after a restart), oldest first."""
        with self.connect() as conn:
            rows = conn.execute("SELECT id FROM jobs WHERE status IN ('queued', 'running') "
                                "ORDER BY created").fetchall()
        return [self.job(r[0]) for r in rows]
