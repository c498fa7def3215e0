"""The ingress's HTTP plumbing: a request id for every request, the body read under its size limit, what is left of
it drained before an early answer, and the one shape of every error answer (ErrorResponse plus the request id)."""

from __future__ import annotations

import re
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dreamdiff.config import ServeLimitsSection
from dreamdiff.serve.api import RequestError

REQUEST_ID_HEADER = "X-Request-ID"
#: A client-sent request id is used when it is this plain and short; otherwise the server makes its own.
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: what an error answer drains on a route that does not set its own limit (request.state.discard_bytes)
DEFAULT_DISCARD_BYTES: int = ServeLimitsSection.model_fields["discard_bytes"].default


class RequestIdMiddleware:
    """Gives every request an id (the client's X-Request-ID when sane, else a new one) in `scope["state"]`, and
    answers it in the X-Request-ID header. Ray Serve's proxy forwards the client's id, or its own, in the same
    header and adds it to the answer itself: the header is added here only when the id differs from that one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = MutableHeaders(scope=scope).get(REQUEST_ID_HEADER)
        request_id = incoming if incoming and _SANE_ID.fullmatch(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["request_id_echoed"] = request_id, request_id == incoming

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start" and request_id != incoming:
                headers = MutableHeaders(scope=message)
                if REQUEST_ID_HEADER not in headers:
                    headers.append(REQUEST_ID_HEADER, request_id)
            await send(message)

        await self.app(scope, receive, send_with_id)


def request_id(request: Request) -> str:
    """The id RequestIdMiddleware gave the request (a new one outside it)."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.state.request_id = uuid.uuid4().hex
    return rid


async def discard_body(request: Request) -> None:
    """Read and drop what is left of the body, up to limits.discard_bytes, before an early answer: a server that
    answers and closes with body bytes unread resets the connection, and clients that send the whole body before
    reading (urllib, many proxies) then see the reset instead of the answer."""
    if getattr(request.state, "body_done", False):
        return
    request.state.body_done = True
    budget = getattr(request.state, "discard_bytes", DEFAULT_DISCARD_BYTES)
    dropped = 0
    while dropped <= budget:
        message = await request.receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def error_response(
    request: Request, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Response:
    """An error answer in the one shape (ErrorResponse), after the unread body is discarded."""
    rid = request_id(request)
    await discard_body(request)
    headers = dict(headers or {})
    if not getattr(request.state, "request_id_echoed", False):  # else the proxy answers the header itself
        headers[REQUEST_ID_HEADER] = rid
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({**body, "request_id": rid}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes (declared or streamed); the
    error handler then discards the rest (bounded) so that the client reads the 413 (`discard_body`)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"Content-Length must be a number of bytes, got {declared!r}", "Content-Length")
        if int(declared) > limit:
            raise RequestError(413, f"the body is {declared} bytes; this server takes at most {limit}", "body")
    chunks, size = [], 0
    while True:
        message = await request.receive()
        if message["type"] != "http.request":
            request.state.body_done = True  # the client went away
            raise RequestError(400, "the client disconnected before sending the whole body", "body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if not message.get("more_body", False):
            request.state.body_done = True
            if size > limit:
                raise RequestError(413, f"the body exceeds {limit} bytes", "body")
            return b"".join([*chunks, chunk])
        if size > limit:
            raise RequestError(413, f"the body exceeds {limit} bytes", "body")
        chunks.append(chunk)
