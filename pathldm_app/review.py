"""The summary-review sample: reports beside their summaries (and key points)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.summary_review import review_sample, summaries_by_pair


@dataclass(frozen=True)
class ReviewItem:
    """One summary to review."""

    report_id: str
    summary_index: int
    report: str
    summary: str
    key_points: str


class ReviewSet:
    """The seeded random sample of reports (with summaries) and their summaries, in order."""

    def __init__(self, reports: Path, summaries: Path, fraction: float = 0.05, seed: int = 0,
                 id_column: str = "patient_filename", text_column: str = "text") -> None:
        from data_prep.summarize_reports import load_reports

        texts = {r.report_id: r.text for r in load_reports(Path(reports), id_column,
                                                             text_column)}
        records = summaries_by_pair(summaries)
        with_summary = {rid for rid, _ in records if rid in texts}
        if not with_summary:
            raise ValueError(f"no report of {reports} has a summary in {summaries}")
        self.report_ids = review_sample(with_summary, fraction, seed)
        self.n_reports = len(with_summary)
        self.items = [ReviewItem(rid, idx, texts[rid], rec["text"],
                                 _key_points(rec.get("key_points")))
                      for (rid, idx), rec in sorted(records.items())
                      if rid in set(self.report_ids)]

    def __len__(self) -> int:
        return len(self.items)


def _key_points(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return str(value or "")
