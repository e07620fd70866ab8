"""Which session an agent request acts on: the one credentials check of the agent surfaces.

Shared by the execute and files APIs (``agent/execute.py``, ``agent/files.py``), so neither
imports the other.
"""

from __future__ import annotations

from aiohttp import web

from broker import appkeys
from broker.models import Session
from broker.policy.auth import request_token


async def agent_session(request: web.Request) -> Session:
    """The ready session an agent request acts on, or the refusal.

    The one place the agent surfaces (execute, files) check credentials: the
    session's own token, for API key holders too. A key (:mod:`broker.policy.apikeys`)
    only names the owner a session is created for; the token that creation
    returns is what opens the session afterwards, as for everyone else.
    """
    manager = request.app[appkeys.MANAGER]
    return await manager.ready_session(request.match_info["sid"], request_token(request))
