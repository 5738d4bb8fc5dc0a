"""Pathologist review of report summaries: the review sample, the reviews table, the export.

The paper had pathologists validate a random 5% of the GPT summaries. The review app
(``pathldm-app``) shows a seeded random sample of reports (:func:`review_sample`) beside their
summaries and stores one row per verdict in the ``summary_reviews`` table of its SQLite
database (defined here, :data:`REVIEWS_DDL`). ``export`` turns the reviews into a new
summaries version: the same JSONL schema (docs/data_format.md §2), one ``ok`` record per
``(report_id, summary_index)``, every record with ``"version"`` and, where reviewed, a
``"review"`` object; a summary marked *needs correction* with a corrected text gets that text
(``clip_tokens`` and ``fits`` recounted) and keeps the old one in ``review.original_text``.
When several reviews of one summary exist, the latest wins.

Example::

    python -m data_prep.summary_review export --db review.sqlite \\
        --summaries summaries.jsonl --out summaries_v2.jsonl
"""
from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.common import JsonlLog, add_logging_arg, setup_logging, write_text_atomic

logger = logging.getLogger(__name__)

VERDICTS = ("acceptable", "needs_correction")
REVIEWS_DDL = """
CREATE TABLE IF NOT EXISTS summary_reviews (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    reviewer TEXT NOT NULL,
    report_id TEXT NOT NULL,
    summary_index INTEGER NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('acceptable', 'needs_correction')),
    corrected_text TEXT,
    comment TEXT,
    created TEXT NOT NULL,
    settings_id INTEGER
)"""
REVIEW_COLUMNS = ("reviewer", "report_id", "summary_index", "verdict", "corrected_text",
                  "comment", "created", "settings_id")


def summaries_by_pair(path: str | Path) -> dict[tuple[str, int], dict[str, Any]]:
    """The ``ok`` record of every ``(report_id, summary_index)`` (the first, as build_dataset)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"summaries file not found: {path}")
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for r in JsonlLog(path).records():
        if r.get("status") == "ok" and r.get("text") and r.get("summary_index") is not None:
            out.setdefault((str(r["report_id"]), int(r["summary_index"])), r)
    return out


def review_sample(report_ids: Iterable[str], fraction: float = 0.05, seed: int = 0) -> list[str]:
    """A seeded random ``fraction`` of the (distinct, sorted) report ids, at least one."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"review fraction must be in (0, 1], got {fraction}")
    ids = sorted(set(report_ids))
    if not ids:
        return []
    k = max(1, int(round(fraction * len(ids))))
    pick = np.random.default_rng(seed).choice(len(ids), size=k, replace=False)
    return [ids[i] for i in sorted(pick)]


def create_reviews_table(conn: sqlite3.Connection) -> None:
    """Create the ``summary_reviews`` table if it does not exist."""
    conn.execute(REVIEWS_DDL)


def insert_review(conn: sqlite3.Connection, review: dict[str, Any]) -> None:
    """Insert one review row (keys of :data:`REVIEW_COLUMNS`); the caller commits."""
    if review.get("verdict") not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {review.get('verdict')!r}")
    cols = ", ".join(REVIEW_COLUMNS)
    marks = ", ".join("?" for _ in REVIEW_COLUMNS)
    conn.execute(f"INSERT INTO summary_reviews ({cols}) VALUES ({marks})",
                 [review.get(c) for c in REVIEW_COLUMNS])


def read_reviews(db: str | Path) -> list[dict[str, Any]]:
    """Every review of a review database, oldest first."""
    db = Path(db)
    if not db.is_file():
        raise FileNotFoundError(f"review database not found: {db}")
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(f"SELECT {', '.join(REVIEW_COLUMNS)} FROM summary_reviews "
                            "ORDER BY id").fetchall()
    except sqlite3.OperationalError as e:
        raise ValueError(f"{db}: not a review database ({e})") from e
    finally:
        conn.close()
    return [dict(r) for r in rows]


def _review_info(review: dict[str, Any]) -> dict[str, Any]:
    return {"verdict": review["verdict"], "reviewer": review["reviewer"],
            "comment": review.get("comment") or "", "reviewed_at": review["created"]}


def apply_reviews(records: dict[tuple[str, int], dict[str, Any]],
                  reviews: Sequence[dict[str, Any]], count_tokens: Any = None,
                  max_tokens: int = 154) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """New-version records (sorted by pair) and counts; the latest review of a pair wins."""
    latest = {(str(r["report_id"]), int(r["summary_index"])): r for r in reviews}
    unknown = sorted(set(latest) - set(records))
    if unknown:
        logger.warning("%d reviewed summaries are not in the summaries file (first: %s)",
                       len(unknown), unknown[0])
    version = 1 + max((int(r.get("version", 1)) for r in records.values()), default=1)
    counts = {"records": 0, "reviewed": 0, "corrected": 0, "needs_correction_without_text": 0}
    out = []
    for pair in sorted(records):
        rec = {**records[pair], "version": version}
        review = latest.get(pair)
        if review is not None:
            info = _review_info(review)
            counts["reviewed"] += 1
            text = (review.get("corrected_text") or "").strip()
            if review["verdict"] == "needs_correction" and text:
                info["original_text"] = rec["text"]
                rec["text"] = text
                if count_tokens is not None:
                    rec["clip_tokens"] = int(count_tokens(text))
                    rec["fits"] = rec["clip_tokens"] <= max_tokens
                counts["corrected"] += 1
            elif review["verdict"] == "needs_correction":
                counts["needs_correction_without_text"] += 1
            rec["review"] = info
        out.append(rec)
    counts["records"] = len(out)
    return out, counts


def export(db: Path, summaries: Path, out: Path, recount: bool = True) -> dict[str, int]:
    """Write the reviewed summaries of ``summaries`` as a new version to ``out``."""
    if out.resolve() == summaries.resolve():
        raise ValueError(f"--out {out} would overwrite the summaries it is made from")
    count_tokens = None
    if recount:
        from data_prep.summary_backends import TokenBudget

        count_tokens = TokenBudget().count
    records, counts = apply_reviews(summaries_by_pair(summaries), read_reviews(db), count_tokens)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_text_atomic(out, text)
    if counts["needs_correction_without_text"]:
        logger.warning("%d summaries were marked 'needs correction' without a corrected text; "
                       "their text is unchanged", counts["needs_correction_without_text"])
    return counts


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(prog="python -m data_prep.summary_review", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write the reviewed summaries as a new version")
    e.add_argument("--db", type=Path, required=True, help="the review app's SQLite database")
    e.add_argument("--summaries", type=Path, required=True, help="the reviewed summaries JSONL")
    e.add_argument("--out", type=Path, required=True, help="new summaries JSONL")
    e.add_argument("--no-recount", action="store_true",
                   help="do not recount CLIP tokens of corrected summaries")
    add_logging_arg(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        counts = export(args.db, args.summaries, args.out, recount=not args.no_recount)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    print(f"{counts['records']} summaries ({counts['reviewed']} reviewed, {counts['corrected']} "
          f"corrected) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
