"""The live page at ``/``: a code cell anyone can run, served by the broker itself.

A newcomer opening the broker in a browser sees what it is for: a short
explanation, a code cell with a Run button, the session's spawn progress
and the visitor's limits. The page is plain HTML, CSS and a small vanilla
script in :file:`static/` (no CDN, works offline) and uses only the public
API: ``POST /api/v1/sessions``, the events stream, and the execute API with
``Accept: text/event-stream``. It keeps ``{id, token}`` in localStorage, so
a reload comes back to the same session (as thebe does).

``BROKER_PAGE`` turns it off (``/`` is then the usual JSON 404) or names a
directory to serve instead (its ``index.html`` at ``/``, every file under
``/page/``). The limits the page shows come from ``/page/limits.json``,
which this module answers from the settings, so a replacement page can use
it too.

The page's own Content-Security-Policy allows scripts, styles and requests
from the broker's origin only, and images from ``data:`` URLs (rich
outputs): kernel output shown as HTML can never run script in this origin,
where the visitor's token is kept.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from broker import appkeys
from broker.settings import Settings

#: The page that ships with the broker.
STATIC = Path(__file__).parent / "static"
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")
_PAGE_DIR = web.AppKey("page_dir", Path)


def page_dir(settings: Settings) -> Path | None:
    """The directory served as the page, or None when BROKER_PAGE is off."""
    if settings.page == "off":
        return None
    return STATIC if settings.page == "on" else Path(settings.page)


async def index(request: web.Request) -> web.FileResponse:
    """``/``: the page's index.html, with the page's own CSP (not the API's sandbox)."""
    return web.FileResponse(request.app[_PAGE_DIR] / "index.html",
                            headers={"Content-Security-Policy": PAGE_CSP,
                                     "Cache-Control": "no-cache"})


async def limits(request: web.Request) -> web.Response:
    """What a visitor may do: the limits the page states, straight from the settings."""
    settings = request.app[appkeys.SETTINGS]
    return web.json_response({
        "max_sessions_per_visitor": settings.max_sessions_per_owner,
        "max_creations_per_visitor": settings.max_creations_per_owner,
        "creation_window": settings.creation_window,
        "session_max_age": settings.session_max_age,
        "session_idle_timeout": settings.session_idle_timeout,
        "execute_timeout_default": settings.execute_timeout_default,
        "execute_timeout_max": settings.execute_timeout_max,
        "max_upload_size": settings.max_upload_size,
    }, headers={"Cache-Control": "no-cache"})


def add_page(app: web.Application, settings: Settings) -> None:
    """Register the page's routes, unless BROKER_PAGE is off."""
    directory = page_dir(settings)
    if directory is None:
        return
    app[_PAGE_DIR] = directory
    app.router.add_get("/", index, name="page")
    # Before the static route: it would otherwise answer this path from the directory.
    app.router.add_get("/page/limits.json", limits, name="page_limits")
    app.router.add_static("/page/", directory, name="page_files")
