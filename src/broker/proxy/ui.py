"""A session's own Jupyter UI through the broker (BROKER_JUPYTER_UI).

MyST's "Launch Jupyter Server Window" opens ``{baseUrl}?token={token}`` in a
new tab: for a broker session ``/s/{id}/?token=<broker token>``. This module
holds what the UI needs beyond the REST proxy:

* **The visitor's credential.** A page navigation carrying ``?token=`` is
  answered with a cookie holding that broker token (HttpOnly, ``Path=/s/{id}/``,
  ``SameSite=Lax`` so that it is sent on the redirect of a tab another site
  opened, but on no cross-site subrequest or POST) and a redirect to the same
  URL without the token (the session's root goes to ``lab``). Later requests
  authenticate with the cookie; JupyterLab's own API calls and WebSockets
  carry the token from its page config as well. The broker keeps sending the
  upstream token upstream itself, as for every proxied request.
* **No upstream token in the browser.** jupyter_server writes its token and
  its own base path into each page (``<script id="jupyter-config-data">``,
  ``src``/``href`` attributes). :func:`rewrite_page` replaces the token by the
  visitor's broker token and the upstream base by ``/s/{id}/``; a page that
  still holds the upstream token afterwards is withheld (the REST proxy's
  second line of defence applies to every buffered body).
* **Readable refusals.** A refused page navigation (no token, ended session)
  gets a short HTML page with the broker's message instead of JSON.

Cross-site requests cannot use the cookie: it is ``SameSite=Lax`` and the
origin middleware refuses any foreign ``Origin`` outright. The upstream
checks no XSRF cookie because the broker authenticates to it with its token.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

from aiohttp import web
from yarl import URL

from broker import appkeys
from broker.errors import BrokerError, NotFound
from broker.policy.auth import request_token
from broker.policy.identity import forwarded_proto_host

#: The cookie holding the visitor's broker token, one per session path.
COOKIE = "session_broker_token"
#: The UI's pages: a browser tab lands on them and they run JupyterLab.
PAGES = re.compile(r"(?:lab|tree)(?:/.*)?")
#: The kernelspecs API, whose resource URLs (kernel logos) include the server's base.
KERNELSPECS = re.compile(r"api/kernelspecs(?:/[^/]+)?")
#: For UI pages: no embedding by other sites, and scripts only from the broker's
#: files, so a script element in an HTML output (which JupyterLab runs for outputs
#: it trusts) does not run in the broker's origin. 'unsafe-eval': JupyterLab's
#: settings validation (ajv) compiles its schemas with it. jupyter_server's inline
#: script that strips ?token= from the address is blocked too: the broker's
#: redirect has already done that.
UI_CSP = ("frame-ancestors 'self'; base-uri 'self'; object-src 'none'; form-action 'self'; "
          "script-src 'self' 'unsafe-eval'")
NO_CREDENTIAL = ("This link to a session's Jupyter UI carries no session token, and this "
                 "browser holds none for it: open the UI from the page that started the "
                 "session (its launch button adds the token).")
_CONFIG = re.compile(r'(<script id="jupyter-config-data" type="application/json">)(.*?)'
                     r"(</script>)", re.DOTALL)


#: Why a session's UI is not served while BROKER_JUPYTER_UI is off.
NOT_OFFERED = ("This broker runs code for web pages through the Jupyter API; it does not "
               "offer the Jupyter user interface (JupyterLab, the notebook tree) of a session.")


def not_offered(request: web.Request) -> web.Response:
    """A session's UI page while BROKER_JUPYTER_UI is off: a short page saying it is not
    offered here (not a bare JSON 404).

    MyST's "Launch Jupyter Server Window" opens the session's base_url itself
    (``?token=``): that browser tab gets a sentence it can show; an API client
    that does not ask for HTML gets the usual JSON error. Nothing about the
    session (whether it exists) is revealed either way.
    """
    if "text/html" not in request.headers.get("Accept", ""):
        raise NotFound(NOT_OFFERED, reason="not_proxied")
    body = (f"<!doctype html><html lang=\"en\"><meta charset=\"utf-8\">"
            f"<title>Jupyter UI not offered</title><h1>Jupyter UI not offered here</h1>"
            f"<p>{html.escape(NOT_OFFERED)}</p><p>Go back to the page you came from: its "
            f"code cells run on this session.</p></html>")
    return web.Response(status=404, text=body, content_type="text/html")


def ui_token(request: web.Request) -> str | None:
    """The broker token of a UI request: header or query first, then the session cookie."""
    return request_token(request) or request.cookies.get(COOKIE) or None


def is_navigation(request: web.Request) -> bool:
    """Whether a browser tab asked for a page (it can show HTML, not a JSON error)."""
    return (request.method == "GET" and "Upgrade" not in request.headers
            and "text/html" in request.headers.get("Accept", ""))


def login(request: web.Request, session_id: str, token: str, remainder: str) -> web.Response:
    """Trade ``?token=`` for the session's cookie and redirect to the URL without it.

    The session's root (what MyST opens) goes to JupyterLab.
    """
    query = [(k, v) for k, v in request.query.items() if k != "token"]
    target = URL.build(path=f"/s/{session_id}/{remainder or 'lab'}", query=query)
    response = web.Response(status=302, headers={"Location": str(target),
                                                 "Cache-Control": "no-store"})
    scheme, _ = forwarded_proto_host(request, request.app[appkeys.TRUSTED])
    response.set_cookie(COOKIE, token, path=f"/s/{session_id}/", httponly=True,
                        samesite="Lax", secure=scheme == "https")
    return response


def refusal_page(error: BrokerError) -> web.Response:
    """A refused navigation as a short page that says what to do."""
    message = NO_CREDENTIAL if error.status == 401 else error.message
    body = (f"<!doctype html><html lang=\"en\"><meta charset=\"utf-8\">"
            f"<title>Jupyter UI unavailable</title><h1>This Jupyter UI cannot be opened</h1>"
            f"<p id=\"reason\">{html.escape(message)}</p></html>")
    return web.Response(status=error.status, text=body, content_type="text/html",
                        headers={**error.headers, "Cache-Control": "no-store"})


def _rebase(value: str, upstream: URL, prefix: str) -> str:
    """An upstream URL (absolute, or a path under its base) moved under ``prefix``."""
    base_path = upstream.raw_path
    origin = str(upstream.origin())
    if value.startswith(origin + base_path):
        return prefix + value[len(origin + base_path):]
    if value.startswith(base_path) and not value.startswith("//"):
        return prefix + value[len(base_path):]
    return value


def _rewrite_config(config: Any, upstream: URL, prefix: str, token: str) -> Any:
    """The page config with the broker's token and URLs (``baseUrl``, ``full*Url``)."""
    if not isinstance(config, dict):
        return config
    for key, value in config.items():
        if key == "token":
            config[key] = token
        elif key == "wsUrl" and value:
            config[key] = ""  # derived from baseUrl by the client, in the broker's origin
        elif (key == "baseUrl" or key.startswith("full")) and isinstance(value, str):
            # Only these include the server's base path; appUrl, settingsUrl and the
            # like are relative to baseUrl (JupyterLab joins them), and stay as they are.
            config[key] = _rebase(value, upstream, prefix)
    return config


def rewrite_page(text: str, upstream_url: str, upstream_token: str, prefix: str,
                 token: str) -> str:
    """An upstream Jupyter page as the browser may see it through the broker.

    ``prefix`` is ``/s/{id}/``; ``token`` the visitor's broker token. Every
    other occurrence of the upstream token (e.g. a ``data-jupyter-api-token``
    attribute) becomes the broker token too.
    """
    upstream = URL(upstream_url)

    def config(match: re.Match[str]) -> str:
        try:
            data = json.loads(match.group(2))
        except ValueError:
            return match.group(0)  # not ours to judge; the token check still applies
        data = _rewrite_config(data, upstream, prefix, token)
        # "</" inside a script element would end it early.
        return match.group(1) + json.dumps(data).replace("</", "<\\/") + match.group(3)

    text = _CONFIG.sub(config, text)
    base = re.escape(upstream.raw_path)
    text = re.sub(rf"""(\s(?:src|href|action)=["']){base}(?!/)""",
                  lambda m: m.group(1) + prefix, text)
    origin = str(upstream.origin())
    text = text.replace(origin + upstream.raw_path, prefix)
    return text.replace(upstream_token, token)


def rewrite_kernelspecs(body: bytes, upstream_url: str, prefix: str) -> bytes:
    """The kernelspecs API's ``resources`` (logo URLs) moved under ``prefix``.

    The upstream names them by its own base path, which is not the broker's:
    JupyterLab's launcher would load logos from outside the session's path.
    """
    try:
        data = json.loads(body)
    except ValueError:
        return body
    upstream = URL(upstream_url)
    specs = data.get("kernelspecs", {}).values() if "kernelspecs" in data else [data]
    for spec in specs:
        resources = spec.get("resources") if isinstance(spec, dict) else None
        if isinstance(resources, dict):
            for name, value in resources.items():
                if isinstance(value, str):
                    resources[name] = _rebase(value, upstream, prefix)
    return json.dumps(data).encode()
