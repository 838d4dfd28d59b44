"""Per-request context as plain ASGI middleware (cheaper than BaseHTTPMiddleware on the
hot path): arrival time, request id, optional bearer-token auth, the access log line and
the requests counter.

The arrival time is taken before the body is read, so deadlines count upload and decode
time too, and it is moved back by the event loop's recent lag (the time the request's
bytes may have waited in the socket for a busy loop: ``service.load.LoopLag``).  A
request's deadline is judged when the last byte of its response is sent.  The request id
is the client's ``X-Request-Id`` when it is sane, else a new one, and is returned on
every response.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable

from service.config import Settings
from service.errors import ApiError
from service.metrics import Metrics

log = logging.getLogger("anytime.access")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# OIP inference paths name the model: one endpoint label for all of them (the model label says which)
OIP_INFER, OIP_INFER_PATH = "/v2/models/{name}/infer", re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")


class RequestContext:
    def __init__(self, app, settings: Settings, metrics: Metrics, endpoints: set[str],
                 draining: Callable[[], bool] = lambda: False, arrival_lag: Callable[[], float] = lambda: 0.0,
                 quick_shed: Callable[[dict, float], ApiError | None] = lambda scope, t0: None,
                 model_of: Callable[[dict], str | None] = lambda scope: None) -> None:
        self.app, self.settings, self.metrics, self.endpoints = app, settings, metrics, endpoints
        self.draining = draining  # true once SIGTERM came: every response then closes its connection
        self.arrival_lag = arrival_lag  # how long a request may have waited in its socket for the event loop
        # Sheds, before routing and before the body is read, a request that cannot make its
        # deadline even at its model's cheapest rung: under overload most requests are shed,
        # so shedding must cost a fraction of serving (no validation, no body, no framework).
        self.quick_shed = quick_shed
        # The model a request is for when the route never got to say (a 401, a 422 before
        # routing): the model its path or query names, if served, so that errors keep the
        # model label and a dashboard filtered by model still shows them.
        self.model_of = model_of
        token = settings.auth_token.get_secret_value() if settings.auth_token else None
        self.expected = f"Bearer {token}".encode() if token else None
        self.exempt = set(settings.auth_exempt)
        # "/docs-assets/": all under it; "/" alone is the playground page, not every path
        self.exempt_prefixes = tuple(p for p in self.exempt if p.endswith("/") and p != "/")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic() - self.arrival_lag()
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
                if self.draining():  # so that clients reconnect, through the load balancer, elsewhere
                    message["headers"].append((b"connection", b"close"))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                await send(message)
                self._count_deadline(state, result)  # the last byte has left the server
                if "on_sent" in state and state.get("result_at"):
                    state["on_sent"](time.monotonic() - state["result_at"])
                return
            await send(message)

        try:
            if self.expected is not None and path not in self.exempt and not path.startswith(self.exempt_prefixes) \
                    and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                await self._unauthorized(send_with_id, b"authorization" in headers)
            elif (shed := self.quick_shed(scope, t0)) is not None:
                await self._error(send_with_id, shed.status, {"error": {"status": shed.status, "message": shed.message}},
                                  shed.headers)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            status = result["status"]
            result["model"] = result["model"] or state.get("model") or self.model_of(scope) or ""
            endpoint = path if path in self.endpoints else OIP_INFER if OIP_INFER_PATH.match(path) else "other"
            self.metrics.requests.labels(endpoint, result["model"], str(status)).inc()
            log.info("%s %s %d", scope["method"], path, status, extra={
                "request_id": rid, "method": scope["method"], "path": path, "status": status,
                "model": result["model"] or None, "duration_ms": round(1000 * (time.monotonic() - t0), 2),
                "client": (scope.get("client") or ("", 0))[0]})

    def _count_deadline(self, state: dict, result: dict) -> None:
        """Deadline met or missed, and 429/503 before or after the deadline, counted when
        the response's last byte is sent: what the client sees, not when the work ended."""
        model, deadline_at, status = state.get("model"), state.get("deadline_at"), result["status"]
        if not model:
            return
        late = deadline_at is not None and time.monotonic() > deadline_at
        if status in (429, 503):
            when = "no_deadline" if deadline_at is None else "after_deadline" if late else "before_deadline"
            self.metrics.shed_responses.labels(model, str(status), when).inc()
        elif deadline_at is not None and status in (200, 504):
            (self.metrics.deadline_missed if late or status == 504 else self.metrics.deadline_met).labels(model).inc()

    @classmethod
    async def _unauthorized(cls, send, had_header: bool) -> None:
        message = "wrong bearer token" if had_header else "this server needs 'Authorization: Bearer <token>'"
        await cls._error(send, 401, {"error": {"status": 401, "message": message}},
                         {"www-authenticate": 'Bearer realm="anytime"'})

    @staticmethod
    async def _error(send, status: int, content: dict, headers: dict[str, str]) -> None:
        body = json.dumps(content).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())]})
        await send({"type": "http.response.body", "body": body})
