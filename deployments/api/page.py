"""The page for people at ``/``: one static HTML file (its script and style inline, nothing from
elsewhere) that submits jobs and watches them through the jobs API like any other client."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

PAGE = Path(__file__).with_name("static") / "index.html"
router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
async def index() -> HTMLResponse:
    # Read per request: a few kB, and an edited page shows without a restart.
    return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})
