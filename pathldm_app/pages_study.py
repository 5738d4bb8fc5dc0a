"""Reader study page: one blinded trial at a time; statistics once a reader has finished.

The page of a trial carries only the item's opaque id and its image URL; which items are real
stays in the database until the reader's answers are stored.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from pathldm_app.stats import LABELS
from pathldm_app.study import reader_order, study_report
from pathldm_app.web import AppState, reader_of, render, state_of

router = APIRouter()
CONFIDENCE = (1, 2, 3, 4, 5)


def _study(request: Request) -> AppState:
    st = state_of(request)
    if not st.study_items:
        raise HTTPException(404, "the reader study is not configured (start the app with "
                                 "--store and --generated)")
    return st


def next_item(st: AppState, reader: str) -> tuple[dict[str, Any] | None, int]:
    """The reader's next unanswered item (None when finished) and how many are answered."""
    answered = st.db.answered_items(reader)
    for p in reader_order(len(st.study_items), st.study.seed, reader):
        item = st.study_items[p]
        if item["item"] not in answered:
            return item, len(answered)
    return None, len(answered)


@router.get("/study", response_class=HTMLResponse)
def study_page(request: Request) -> Response:
    """The next trial, or the results once every item is answered."""
    reader = reader_of(request)
    st = _study(request)
    item, answered = next_item(st, reader)
    total = len(st.study_items)
    if item is None:
        stats = study_report(st.db)
        return render(request, "study_done.html", total=total, stats=stats,
                      mine=stats["readers"].get(reader))
    return render(request, "study.html", item_id=item["item"], number=answered + 1, total=total,
                  confidence=CONFIDENCE)


@router.post("/study/answer")
def answer(request: Request, item: str = Form(""), answer: str = Form(""),
           confidence: int = Form(0)) -> Response:
    """Commit one answer (the first answer of a reader to an item counts)."""
    reader = reader_of(request)
    st = _study(request)
    if st.db.study_item(item) is None:
        raise HTTPException(404, "unknown study item")
    if answer not in LABELS or confidence not in CONFIDENCE:
        raise HTTPException(400, f"answer must be one of {LABELS} and confidence one of "
                                 f"{CONFIDENCE}")
    st.db.store_answer(reader, item, answer, confidence, st.settings_id)
    return RedirectResponse("/study", status_code=303)


@router.get("/study/image/{item}")
def image(request: Request, item: str) -> Response:
    """The item's pixels as PNG; the URL and response say nothing about the source."""
    reader_of(request)
    st = _study(request)
    row = st.db.study_item(item)
    if row is None:
        raise HTTPException(404, "unknown study item")
    return Response(st.images.png(row), media_type="image/png")


@router.get("/study/stats.json")
def export(request: Request) -> Response:
    """The statistics as JSON, for readers who have finished the study."""
    reader = reader_of(request)
    st = _study(request)
    item, _ = next_item(st, reader)
    if item is not None:
        raise HTTPException(403, "the statistics open once you have answered every item")
    return JSONResponse(study_report(st.db), headers={
        "Content-Disposition": 'attachment; filename="reader_study_stats.json"'})
