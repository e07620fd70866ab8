"""Access to a session's upstream Jupyter server.

``http.py`` is the keep-alive HTTP/1.1 client, ``websocket.py`` the WebSocket
upgrade, and ``session.py`` the object per session that callers go through:
it knows the session's base URL and token and never builds a URL outside the
session's server. A leaf package: it imports only leaf modules (``models``,
``errors``, the path rule).
"""
