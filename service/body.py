"""Reading request bodies under limits: a raw image body or a multipart form.

The body is read chunk by chunk and refused with 413 as soon as it passes the limit
(a declared Content-Length over the limit is refused before reading anything).  A
multipart form is parsed from the buffered body, so the same byte limit holds for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from service.errors import ApiError

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
ACCEPTED_BODIES = "a raw image body (image/png, image/jpeg, image/webp or application/octet-stream) " \
                  "or multipart/form-data with the image in a file field named 'image'"

# OpenAPI for routes that take an image as the raw body or as a multipart file (FastAPI
# cannot infer it: the body is read by hand, under the byte limit).
IMAGE_REQUEST_BODY = {"requestBody": {"required": True, "description": ACCEPTED_BODIES, "content": {
    **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES},
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary"}}}}}}}


@dataclass
class Upload:
    data: bytes
    fields: dict[str, str]  # other (text) fields of a multipart form


async def read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise ApiError(413, f"body of {declared} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"body exceeds the limit of {limit} bytes")
    return bytes(body)


def media_type(request: Request) -> str:
    return (request.headers.get("content-type") or "").split(";")[0].strip().lower()


async def read_image(request: Request, limit: int, file_field: str = "image") -> Upload:
    """The image bytes of a raw or multipart request, with 415 for anything else."""
    ctype = media_type(request)
    if ctype in IMAGE_TYPES or ctype in ("application/octet-stream", ""):
        return Upload(await read_limited(request, limit), {})
    if ctype != "multipart/form-data":
        raise ApiError(415, f"content-type {ctype!r} is not accepted", ACCEPTED_BODIES)
    body = await read_limited(request, limit)

    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=4, max_fields=32,
                                     max_part_size=limit).parse()
    except MultiPartException as exc:
        raise ApiError(400, f"malformed multipart body: {exc.message}", ACCEPTED_BODIES) from None
    files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    chosen = next((v for k, v in files if k == file_field), files[0][1] if files else None)
    if chosen is None:
        raise ApiError(422, f"the multipart form has no file field (fields: {sorted(fields) or 'none'})",
                       ACCEPTED_BODIES)
    try:
        data = await chosen.read()
    finally:
        await form.close()
    return Upload(data, fields)
