"""The FastAPI application: state, reader sessions (cookie), login and the start page."""
from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.staticfiles import StaticFiles

from pathldm_app.generate import Generator
from pathldm_app.review import ReviewSet
from pathldm_app.storage import Database
from pathldm_app.study import ImageSource, StudyConfig

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
COOKIE = "pathldm_session"
MAX_NAME = 64


@dataclass
class AppState:
    """Everything the request handlers share."""

    db: Database
    settings: dict[str, Any]
    settings_id: int
    token: str | None = None
    generator: Generator | None = None
    slide_summaries: list[dict[str, str]] = field(default_factory=list)
    reviews: ReviewSet | None = None
    study: StudyConfig | None = None
    study_items: list[dict[str, Any]] = field(default_factory=list)
    images: ImageSource | None = None


class LoginRequired(Exception):
    """Raised by :func:`reader_of` when the request carries no valid session."""


def reader_of(request: Request) -> str:
    """The reader of the request's session cookie; raises :class:`LoginRequired`."""
    reader = state_of(request).db.session_reader(request.cookies.get(COOKIE))
    if reader is None:
        raise LoginRequired()
    return reader


def state_of(request: Request) -> AppState:
    """The app state."""
    return request.app.state.pathldm


def render(request: Request, template: str, status_code: int = 200,
           **context: Any) -> Response:
    """A template response with the common context (reader, settings)."""
    templates: Jinja2Templates = request.app.state.templates
    st = state_of(request)
    reader = st.db.session_reader(request.cookies.get(COOKIE))
    context.update(reader=reader, has_generate=st.generator is not None,
                   has_review=st.reviews is not None, has_study=bool(st.study_items))
    return templates.TemplateResponse(request, template, context, status_code=status_code)


def _safe_next(target: str | None) -> str:
    """Only local paths are followed after login."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


def _login_required(request: Request, exc: LoginRequired) -> Response:
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": "login required"}, status_code=401)
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(path)}", status_code=303)


def login_page(request: Request, next: str = "/") -> Response:
    """The reader-name (and token) form."""
    return render(request, "login.html", next=_safe_next(next),
                  need_token=state_of(request).token is not None)


def login(request: Request, name: str = Form(""), token: str = Form(""),
          next: str = Form("/")) -> Response:
    """Check the name (and token), start a session, set its cookie."""
    st = state_of(request)
    name = " ".join(name.split())
    error = None
    if not name or len(name) > MAX_NAME:
        error = f"enter your name (1 to {MAX_NAME} characters)"
    elif st.token is not None and not secrets.compare_digest(token.encode(), st.token.encode()):
        error = "wrong access token"
    if error:
        return render(request, "login.html", status_code=400, error=error, name=name,
                      next=_safe_next(next), need_token=st.token is not None)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(COOKIE, st.db.new_session(name), httponly=True, samesite="strict",
                        max_age=60 * 60 * 24 * 365)
    logger.info("reader %r logged in", name)
    return response


def logout(request: Request) -> Response:
    """Forget the session cookie in this browser."""
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response


def index(request: Request) -> Response:
    """Start page: links to the three tools."""
    reader_of(request)
    return render(request, "index.html", settings=state_of(request).settings)


def health(request: Request) -> dict[str, Any]:
    """Liveness probe (no login)."""
    st = state_of(request)
    return {"ok": True, "study_items": len(st.study_items),
            "review_items": len(st.reviews) if st.reviews else 0}


def create_app(state: AppState) -> FastAPI:
    """The ASGI app over a prepared :class:`AppState`."""
    from pathldm_app import pages_generate, pages_review, pages_study

    app = FastAPI(title="PathLDM", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pathldm = state
    app.state.templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.add_exception_handler(LoginRequired, _login_required)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.add_api_route("/", index, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/login", login_page, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/login", login, methods=["POST"])
    app.add_api_route("/logout", logout, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.include_router(pages_generate.router)
    app.include_router(pages_review.router)
    app.include_router(pages_study.router)

    @app.middleware("http")
    async def no_store(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    return app
