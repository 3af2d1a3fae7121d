"""Auth, body limit and request counting: plain ASGI, ahead of FastAPI.

With an API key every path needs it (the API, /metrics, /openapi.json, /docs, unknown paths alike) except the
open ones: /health always, and /metrics and the docs when the server makes them public."""

from __future__ import annotations

import secrets

from fastapi import HTTPException

from nanoseek.server.errors import error_response
from nanoseek.server.prometheus import ServerMetrics


class Guard:
    """Answers 401 before reading a body when the API key is missing or wrong, 413 when a body is larger
    than the limit (by its Content-Length, or as it arrives), and counts responses for /metrics."""

    def __init__(
        self, app, api_key: str | None, max_body: int, metrics: ServerMetrics, paths: set[str], open_paths: set[str]
    ):
        self.app, self.max_body, self.metrics, self.paths, self.open_paths = app, max_body, metrics, paths, open_paths
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.paths else "other"
        status = {}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                self.metrics.http[(path, message["status"])] += 1
            await send(message)

        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in self.open_paths:
            auth = headers.get(b"authorization", b"")
            scheme, _, key = auth.partition(b" ")
            if not auth:
                return await error_response(
                    401,
                    "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                    code="missing_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )(scope, receive, counted_send)
            if scheme.lower() != b"bearer" or not secrets.compare_digest(key.strip(), self.api_key):
                return await error_response(
                    401, "Incorrect API key provided.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                )(scope, receive, counted_send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._too_large(scope, receive, counted_send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise HTTPException(413, self._too_large_message())
            return message

        await self.app(scope, limited_receive, counted_send)

    def _too_large_message(self) -> str:
        return f"The request body is larger than this server accepts ({self.max_body} bytes)."

    async def _too_large(self, scope, receive, send):
        await error_response(413, self._too_large_message(), code="request_too_large", headers={"Connection": "close"})(
            scope, receive, send
        )
