"""Summary review page: a report beside its summary; acceptable / needs correction."""
from __future__ import annotations

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from data_prep.summary_review import VERDICTS
from pathldm_app.review import ReviewSet
from pathldm_app.web import reader_of, render, state_of

router = APIRouter()
MAX_TEXT = 8000


def _reviews(request: Request) -> ReviewSet:
    reviews = state_of(request).reviews
    if reviews is None:
        raise HTTPException(404, "summary review is not configured (start the app with "
                                 "--reports and --summaries)")
    return reviews


def _done(request: Request, reader: str) -> list[bool]:
    pairs = state_of(request).db.reviewed_pairs(reader)
    return [(it.report_id, it.summary_index) in pairs for it in _reviews(request).items]


@router.get("/review", response_class=HTMLResponse)
def review_list(request: Request) -> Response:
    """The sample with this reviewer's progress; continues at the first unreviewed summary."""
    reader = reader_of(request)
    reviews = _reviews(request)
    done = _done(request, reader)
    return render(request, "review_list.html", items=list(zip(reviews.items, done)),
                  n_reports=reviews.n_reports, sampled=len(reviews.report_ids),
                  next_k=done.index(False) if False in done else None)


@router.get("/review/{k}", response_class=HTMLResponse)
def review_item(request: Request, k: int) -> Response:
    """One report, its key points and summary, and the verdict form."""
    reader = reader_of(request)
    reviews = _reviews(request)
    if not 0 <= k < len(reviews):
        raise HTTPException(404, f"no review item {k}")
    return render(request, "review_item.html", k=k, item=reviews.items[k], total=len(reviews),
                  done=_done(request, reader)[k])


@router.post("/review/{k}")
def review_submit(request: Request, k: int, verdict: str = Form(""),
                  corrected_text: str = Form(""), comment: str = Form("")) -> Response:
    """Commit a verdict, then go to the next unreviewed summary (or the list)."""
    reader = reader_of(request)
    reviews = _reviews(request)
    if not 0 <= k < len(reviews):
        raise HTTPException(404, f"no review item {k}")
    item = reviews.items[k]
    error = None
    if verdict not in VERDICTS:
        error = "choose 'acceptable' or 'needs correction'"
    elif len(corrected_text) > MAX_TEXT or len(comment) > MAX_TEXT:
        error = f"texts are limited to {MAX_TEXT} characters"
    if error:
        return render(request, "review_item.html", status_code=400, k=k, item=item,
                      total=len(reviews), done=False, error=error)
    st = state_of(request)
    st.db.store_review({"reviewer": reader, "report_id": item.report_id,
                        "summary_index": item.summary_index, "verdict": verdict,
                        "corrected_text": corrected_text.strip() or None,
                        "comment": comment.strip() or None, "settings_id": st.settings_id})
    done = _done(request, reader)
    later = [j for j in range(k + 1, len(done)) if not done[j]] + \
            [j for j in range(k) if not done[j]]
    return RedirectResponse(f"/review/{later[0]}" if later else "/review", status_code=303)
