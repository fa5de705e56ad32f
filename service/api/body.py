"""Reading a multipart request body: media type checks, size limit while streaming."""

from __future__ import annotations

from fastapi import Request

from service.api.problems import Problem
from service.multipart import MediaType, MultipartError, Part, boundary_of, parse_multipart


def media_type_of(request: Request, allowed: tuple[str, ...]) -> MediaType:
    media = MediaType.parse(request.headers.get("content-type"))
    if media.essence not in allowed:
        raise Problem(415, "unsupported_media_type",
                      f"Content-Type {media.essence or '(none)'} is not supported; send "
                      + " or ".join(allowed))
    if media.essence == "multipart/related":
        part_type = media.params.get("type", "application/dicom").lower()
        if part_type != "application/dicom":
            raise Problem(415, "unsupported_media_type",
                          f'multipart/related type="{part_type}" is not supported; send '
                          'type="application/dicom"')
    return media


async def read_limited(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it passes ``limit`` — also for chunked
    bodies, which announce no length."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(413, "payload_too_large",
                      f"the body ({declared} bytes) exceeds the limit of {limit} bytes")
    buffer = bytearray()
    async for chunk in request.stream():
        buffer += chunk
        if len(buffer) > limit:
            raise Problem(413, "payload_too_large",
                          f"the body exceeds the limit of {limit} bytes")
    return bytes(buffer)


async def read_parts(request: Request, media: MediaType, limit: int) -> list[Part]:
    try:
        boundary = boundary_of(media)
    except MultipartError as error:
        raise Problem(400, "malformed_multipart", str(error)) from None
    body = await read_limited(request, limit)
    try:
        return parse_multipart(body, boundary)
    except MultipartError as error:
        raise Problem(400, "malformed_multipart", str(error)) from None
