"""Reading a multipart request body: media type checks, limits enforced while it streams in.

The body is never held in memory: :func:`spool_parts` feeds it chunk by chunk to
:class:`service.multipart.StreamingMultipart`, which writes each part to a file in the spool's
``tmp/`` folder as it arrives (hashing it on the way). Refused as soon as it passes a limit:
the body size (``FLAIRCAD_MAX_UPLOAD_BYTES``, 413), one part's size
(``FLAIRCAD_MAX_INSTANCE_BYTES``, 413), the number of parts
(``FLAIRCAD_MAX_INSTANCES_PER_SERIES``, 413), and the spool volume's fill level (checked every
64 MiB, 503 ``spool_full``).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fastapi import Request

from service.api.deps import Runtime, saturated_problem
from service.api.problems import Problem
from service.multipart import (
    MediaType,
    MultipartError,
    PartHeaders,
    PartSink,
    PartTooLarge,
    StreamingMultipart,
    TooManyParts,
    boundary_of,
)
from service.scheduler import Saturated

_RECHECK_EVERY = 64 * 1024**2  # bytes between checks of the spool's fill level


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


def _too_large(limit: int, declared: str | None = None) -> Problem:
    size = f" ({declared} bytes)" if declared else ""
    return Problem(413, "payload_too_large",
                   f"the body{size} exceeds the limit of {limit} bytes (FLAIRCAD_MAX_UPLOAD_BYTES)")


@dataclass
class SpooledPart(PartHeaders):
    """One part of a request body, on disk."""

    headers: dict[str, str]
    path: Path
    size: int = 0
    sha256: str = ""
    _hash: hashlib._Hash = field(default_factory=hashlib.sha256, repr=False)
    _handle: BinaryIO | None = field(default=None, repr=False)

    def read(self) -> bytes:
        return self.path.read_bytes()

    def write(self, data: bytes) -> None:
        if self._handle is None:
            self._handle = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._handle.write(data)
        self._hash.update(data)
        self.size += len(data)

    def close(self) -> None:
        if self._handle is None:
            self.path.touch()
        else:
            self._handle.close()
            self._handle = None
        self.sha256 = self._hash.hexdigest()


@dataclass
class SpooledBody:
    """The parts of one request, in a folder of their own; :meth:`remove` deletes it."""

    folder: Path
    parts: list[SpooledPart]

    def remove(self) -> None:
        for part in self.parts:
            if part._handle is not None:
                part._handle.close()
        shutil.rmtree(self.folder, ignore_errors=True)


async def spool_parts(request: Request, media: MediaType, folder: Path, *, limit: int,
                      max_part_bytes: int, max_parts: int,
                      check_space: Callable[[], object] | None = None) -> SpooledBody:
    """Stream the body into part files under ``folder`` (see the module docstring). On any
    refusal the folder is removed and a :class:`Problem` raised (``check_space`` raises its
    own exception, which the caller turns into its answer)."""
    body = SpooledBody(folder, [])
    try:
        boundary = boundary_of(media)
    except MultipartError as error:
        body.remove()
        raise Problem(400, "malformed_multipart", str(error)) from None
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        body.remove()
        raise _too_large(limit, declared)

    def open_part(headers: dict[str, str]) -> PartSink:
        part = SpooledPart(headers, folder / f"{len(body.parts):05d}.part")
        body.parts.append(part)
        return part

    def close_part(sink: PartSink) -> None:
        assert isinstance(sink, SpooledPart)
        sink.close()

    reader = StreamingMultipart(boundary, open_part, close_part,
                                max_part_bytes=max_part_bytes, max_parts=max_parts)
    received, next_check = 0, _RECHECK_EVERY
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise _too_large(limit)
            if check_space is not None and received >= next_check:
                check_space()
                next_check += _RECHECK_EVERY
            reader.feed(chunk)
        reader.finish()
    except PartTooLarge as error:
        body.remove()
        raise Problem(413, "instance_too_large", f"{error} (FLAIRCAD_MAX_INSTANCE_BYTES)"
                      ) from None
    except TooManyParts as error:
        body.remove()
        raise Problem(413, "too_many_instances",
                      f"{error} (FLAIRCAD_MAX_INSTANCES_PER_SERIES)") from None
    except MultipartError as error:
        body.remove()
        raise Problem(400, "malformed_multipart", str(error)) from None
    except BaseException:
        body.remove()
        raise
    for part in body.parts:
        if not part.sha256:  # a part cut off by the end of the body was refused above
            part.close()
    return body


async def receive_parts(request: Request, rt: Runtime, media: MediaType) -> SpooledBody:
    """The request's parts in a fresh folder of the spool's ``tmp/``, within the settings'
    limits; the caller removes it (:meth:`SpooledBody.remove`) once the parts are stored."""
    settings = rt.settings
    try:
        return await spool_parts(
            request, media, rt.spool.request_folder(), limit=settings.max_upload_bytes,
            max_part_bytes=settings.max_instance_bytes,
            max_parts=settings.max_instances_per_series,
            check_space=rt.scheduler.check_spool_space)
    except Saturated as error:  # the spool filled up while the body streamed in
        raise saturated_problem(error) from None
