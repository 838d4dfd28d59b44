"""Per-request context as plain ASGI middleware (cheaper than BaseHTTPMiddleware on the
hot path): arrival time, request id, optional bearer-token auth, the access log line and
the requests counter.

The arrival time is taken before the body is read, so deadlines count upload and decode
time too; the request id is the client's ``X-Request-Id`` when it is sane, else a new
one, and is returned on every response.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid

from service.config import Settings
from service.metrics import Metrics

log = logging.getLogger("anytime.access")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class RequestContext:
    def __init__(self, app, settings: Settings, metrics: Metrics, endpoints: set[str]) -> None:
        self.app, self.settings, self.metrics, self.endpoints = app, settings, metrics, endpoints
        token = settings.auth_token.get_secret_value() if settings.auth_token else None
        self.expected = f"Bearer {token}".encode() if token else None
        self.exempt = set(settings.auth_exempt)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        if not _SANE_ID.match(rid):
            rid = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["t0"], state["request_id"] = t0, rid
        path = scope["path"]
        result = {"status": 500, "model": ""}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                result["status"] = message["status"]
                for k, v in message.get("headers", []):
                    if k.lower() == b"x-anytime-model":
                        result["model"] = v.decode("latin-1")
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            if self.expected is not None and path not in self.exempt and \
                    not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                await self._unauthorized(send_with_id, b"authorization" in headers)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            status = result["status"]
            endpoint = path if path in self.endpoints else "other"
            self.metrics.requests.labels(endpoint, result["model"], str(status)).inc()
            log.info("%s %s %d", scope["method"], path, status, extra={
                "request_id": rid, "method": scope["method"], "path": path, "status": status,
                "model": result["model"] or None, "duration_ms": round(1000 * (time.monotonic() - t0), 2),
                "client": (scope.get("client") or ("", 0))[0]})

    @staticmethod
    async def _unauthorized(send, had_header: bool) -> None:
        message = "wrong bearer token" if had_header else "this server needs 'Authorization: Bearer <token>'"
        body = json.dumps({"error": {"status": 401, "message": message}}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="anytime"')]})
        await send({"type": "http.response.body", "body": body})
