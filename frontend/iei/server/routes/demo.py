"""`GET /`: the demo page, one static HTML file (inline JS and CSS, no build step).

The page is open even when IEI_API_KEY is set: it holds no data, and its calls to /info and
/embed carry the key that the user types into it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)


@cache
def page() -> str:
    return (resources.files("iei.server") / "static" / "index.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse)
async def demo() -> HTMLResponse:
    return HTMLResponse(page())
