"""Generate page: request form, queued job with progress, grid, caption and zip download."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from pathldm_app.web import reader_of, render, state_of

router = APIRouter()

DEFAULTS = {"tumor": "high", "til": "low", "summary": "", "scale": 1.75, "steps": 50,
            "seed": 0, "n": 4}


def _generator(request: Request) -> Any:
    gen = state_of(request).generator
    if gen is None:
        raise HTTPException(404, "generation is not configured (start the app with --ckpt)")
    return gen


def _own_job(request: Request, job_id: str) -> dict[str, Any]:
    reader = reader_of(request)
    job = state_of(request).db.job(job_id)
    if job is None or job["reader"] != reader:
        raise HTTPException(404, f"no generation job {job_id}")
    return job


@router.get("/generate", response_class=HTMLResponse)
def generate_page(request: Request) -> Response:
    """The request form (levels, summary or a slide's summary, guidance, steps, seed, n)."""
    reader_of(request)
    _generator(request)
    return render(request, "generate.html", form=DEFAULTS,
                  slides=state_of(request).slide_summaries)


@router.post("/generate")
async def submit(request: Request) -> Response:
    """Queue a request; a second one waits behind the first."""
    reader = reader_of(request)
    gen = _generator(request)
    form = dict(await request.form())
    try:
        job_id = gen.submit(reader, form)
    except ValueError as e:
        return render(request, "generate.html", status_code=400, error=str(e),
                      form={**DEFAULTS, **form}, slides=state_of(request).slide_summaries)
    return RedirectResponse(f"/generate/jobs/{job_id}", status_code=303)


@router.get("/generate/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str) -> Response:
    """Progress, then the grid and its caption."""
    job = _own_job(request, job_id)
    return render(request, "job.html", job=job)


@router.get("/api/jobs/{job_id}")
def job_status(request: Request, job_id: str) -> dict[str, Any]:
    """Status, progress and queue position of a job (polled by the job page)."""
    job = _own_job(request, job_id)
    gen = _generator(request)
    caption = None
    if job["status"] == "done":
        import json

        meta = json.loads((gen.job_dir(job_id) / "metadata.json").read_text(encoding="utf-8"))
        caption = meta["conditions"][0]
    return {"id": job_id, "status": job["status"], "done": job["done"], "total": job["total"],
            "error": job["error"], "queue_position": gen.queue_position(job_id),
            "fraction": gen.fraction(job),
            "caption": caption}


@router.get("/generate/jobs/{job_id}/grid.png")
def grid(request: Request, job_id: str) -> Response:
    """The job's grid image."""
    job = _own_job(request, job_id)
    path = _generator(request).job_dir(job_id) / "grid.png"
    if job["status"] != "done" or not path.is_file():
        raise HTTPException(404, "the grid is not ready")
    return FileResponse(path, media_type="image/png")


@router.get("/generate/jobs/{job_id}/images.zip")
def download(request: Request, job_id: str) -> Response:
    """The job's images, grid and metadata.json as a zip."""
    job = _own_job(request, job_id)
    if job["status"] != "done":
        raise HTTPException(409, "the job has not finished")
    data = _generator(request).zip_bytes(job_id)
    return Response(data, media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="pathldm-{job_id}.zip"'})
