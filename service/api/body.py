"""Reading a multipart request body: media type checks, limits enforced while it streams in.

The body is never held in memory: :func:`spool_parts` feeds it chunk by chunk to
:class:`service.intake.multipart.StreamingMultipart`, which writes each part to a file in the
spool's
``tmp/`` folder as it arrives (hashing it on the way). Refused as soon as it passes a limit:
the body size (``FLAIRCAD_MAX_UPLOAD_BYTES``, 413), one part's size
(``FLAIRCAD_MAX_INSTANCE_BYTES``, 413), the number of parts
(``FLAIRCAD_MAX_INSTANCES_PER_SERIES``, 413), a part's header block (64 lines, 16 KiB: 400
``malformed_multipart``; only the headers that are read are kept), and the spool volume's
fill level (checked every 64 MiB, 503 ``spool_full``; a write that finds the volume or a quota
full between two checks is 503 ``spool_full`` too). The parser, and the files it writes, run
in a worker thread, a batch of chunks at a time: the event loop only receives the chunks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import shutil
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fastapi import Request

from service.api.deps import Runtime, saturated_problem
from service.api.problems import Problem
from service.core.codes import Code
from service.intake.multipart import (
    MediaType,
    MultipartError,
    PartHeaders,
    PartSink,
    PartTooLarge,
    StreamingMultipart,
    TooManyParts,
    boundary_of,
)
from service.runtime.arrivals import HEAD_BYTES
from service.runtime.scheduler import Saturated, SpoolFull

_RECHECK_EVERY = 64 * 1024**2  # bytes between checks of the spool's fill level
# Bytes handed to the parser thread at once: big enough that the hop to the thread (~50 us)
# is noise, small enough to hold per request.
_FEED_BATCH = 256 * 1024
# ... or the time since the last batch: a body that trickles in is still parsed as it comes,
# so a part's head (its series held open) is known while the rest of it is on its way
_FEED_AFTER_S = 0.05
# Parsers of 4 requests run at once, the others wait their turn: the work is Python under one
# GIL and writes to one spool volume, more threads would not make it faster.
_PARSER_THREADS = concurrent.futures.ThreadPoolExecutor(max_workers=4,
                                                        thread_name_prefix="multipart")
# A write that finds no space (or quota) left: the spool is full, not the service broken.
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def media_type_of(request: Request, allowed: tuple[str, ...]) -> MediaType:
    media = MediaType.parse(request.headers.get("content-type"))
    if media.essence not in allowed:
        raise Problem(415, Code.UNSUPPORTED_MEDIA_TYPE,
                      f"Content-Type {media.essence or '(none)'} is not supported; send "
                      + " or ".join(allowed))
    if media.essence == "multipart/related":
        part_type = media.params.get("type", "application/dicom").lower()
        if part_type != "application/dicom":
            raise Problem(415, Code.UNSUPPORTED_MEDIA_TYPE,
                          f'multipart/related type="{part_type}" is not supported; send '
                          'type="application/dicom"')
    return media


def _too_large(limit: int, declared: str | None = None) -> Problem:
    size = f" ({declared} bytes)" if declared else ""
    return Problem(413, Code.PAYLOAD_TOO_LARGE,
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
    # called once, as soon as the part's first HEAD_BYTES are on disk (or it ended shorter)
    on_head: Callable[[SpooledPart], object] | None = field(default=None, repr=False)
    _told: bool = field(default=False, repr=False)

    def read(self) -> bytes:
        return self.path.read_bytes()

    def write(self, data: bytes) -> None:
        if self._handle is None:
            self._handle = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._handle.write(data)
        self._hash.update(data)
        self.size += len(data)
        if not self._told and self.size >= HEAD_BYTES:
            # a large part that streams for longer than the window holds its series from
            # its head on, not only once it is complete
            self._handle.flush()
            self._tell()

    def _tell(self) -> None:
        self._told = True
        if self.on_head is not None:
            self.on_head(self)

    def close(self) -> None:
        if self._handle is None:
            self.path.touch()
        else:
            self._handle.close()
            self._handle = None
        self.sha256 = self._hash.hexdigest()
        if not self._told:
            self._tell()


@dataclass
class SpooledBody:
    """The parts of one request, in a folder of their own; :meth:`remove` deletes it."""

    folder: Path
    parts: list[SpooledPart]

    def remove(self) -> None:
        for part in self.parts:
            if part._handle is not None:
                # a write that found the disk full leaves data that close() cannot flush
                with contextlib.suppress(OSError):
                    part._handle.close()
                part._handle = None
        shutil.rmtree(self.folder, ignore_errors=True)

    async def discard(self) -> None:
        """:meth:`remove` in a worker thread: unlinking 5,000 part files takes 0.1-0.3 s, too
        long for the event loop. Shielded: it completes even if the request is cancelled."""
        await asyncio.shield(asyncio.wrap_future(_PARSER_THREADS.submit(self.remove)))


async def spool_parts(request: Request, media: MediaType, folder: Path, *, limit: int,
                      max_part_bytes: int, max_parts: int,
                      check_space: Callable[[], object] | None = None,
                      on_part_head: Callable[[SpooledPart], object] | None = None
                      ) -> SpooledBody:
    """Stream the body into part files under ``folder`` (see the module docstring). On any
    refusal the folder is removed and a :class:`Problem` raised (``check_space`` raises its
    own exception, which the caller turns into its answer; so does ``on_part_head``, called
    once for each part as soon as its first :data:`HEAD_BYTES` are on disk, or when it ends
    shorter: STOW-RS holds its series open with it). The parts are parsed, written and closed
    in a worker thread (:class:`_ParserThread`): ``on_part_head`` is called there, so it must
    be thread-safe, and may block (it reads the part's head)."""
    body = SpooledBody(folder, [])
    try:
        boundary = boundary_of(media)
    except MultipartError as error:
        body.remove()
        raise Problem(400, Code.MALFORMED_MULTIPART, str(error)) from None
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        body.remove()
        raise _too_large(limit, declared)

    def open_part(headers: dict[str, str]) -> PartSink:
        part = SpooledPart(headers, folder / f"{len(body.parts):05d}.part", on_head=tell)
        body.parts.append(part)
        return part

    # Closed by the loop when spool_parts gives up: a batch the thread is still parsing (the
    # request cancelled) must not call on_part_head after the caller has cleaned up.
    telling = on_part_head is not None
    gate = threading.Lock()

    def tell(part: SpooledPart) -> None:  # in the parser's thread (_ParserThread)
        with gate:
            if on_part_head is not None and telling:
                on_part_head(part)

    def close_part(sink: PartSink) -> None:
        assert isinstance(sink, SpooledPart)
        sink.close()

    def stop_telling() -> None:
        nonlocal telling
        with gate:  # waits for a call in progress (one part's head read)
            telling = False

    parser = _ParserThread(StreamingMultipart(boundary, open_part, close_part,
                                              max_part_bytes=max_part_bytes,
                                              max_parts=max_parts))
    received, next_check = 0, _RECHECK_EVERY
    try:
        async with contextlib.aclosing(_chunks_of(request, parser)) as chunks:
            async for chunk in chunks:  # aclosing: a refusal cancels the pending read at once
                received += len(chunk)
                if received > limit:
                    raise _too_large(limit)
                if check_space is not None and received >= next_check:
                    check_space()
                    next_check += _RECHECK_EVERY
                if parser.add(chunk):
                    await parser.feed()
        await parser.feed(finish=True)
    except PartTooLarge as error:
        parser.after(body.remove)
        raise Problem(413, Code.INSTANCE_TOO_LARGE, f"{error} (FLAIRCAD_MAX_INSTANCE_BYTES)"
                      ) from None
    except TooManyParts as error:
        parser.after(body.remove)
        raise Problem(413, Code.TOO_MANY_INSTANCES,
                      f"{error} (FLAIRCAD_MAX_INSTANCES_PER_SERIES)") from None
    except MultipartError as error:
        parser.after(body.remove)
        raise Problem(400, Code.MALFORMED_MULTIPART, str(error)) from None
    except BaseException:  # the client went away (cancelled), the disk is full, ...
        stop_telling()
        parser.after(body.remove)
        raise
    for part in body.parts:
        if not part.sha256:  # a part cut off by the end of the body was refused above
            part.close()
    return body


async def _chunks_of(request: Request, parser: _ParserThread) -> AsyncGenerator[bytes]:
    """The body's chunks; when the body pauses with chunks kept for the parser's next batch,
    they are parsed after :data:`_FEED_AFTER_S` without waiting for more (a part's head must
    not sit unparsed in memory while its sender stalls)."""
    chunks = request.stream().__aiter__()
    waiting: asyncio.Future[bytes] | None = None
    try:
        while True:
            if not parser.kept:
                try:
                    yield await chunks.__anext__()
                except StopAsyncIteration:
                    return
                continue
            waiting = asyncio.ensure_future(chunks.__anext__())
            while not (await asyncio.wait({waiting}, timeout=_FEED_AFTER_S))[0]:
                if parser.kept:
                    await parser.feed()  # the body paused: parse what came
            arrived, waiting = waiting, None
            try:
                yield arrived.result()
            except StopAsyncIteration:
                return
    finally:
        if waiting is not None:
            waiting.cancel()


class _ParserThread:
    """Feeds a :class:`StreamingMultipart` in a worker thread, a batch of chunks at a time.

    Its per-part work (headers parsed; a file created, written, closed, hashed) ran on the
    event loop: 4 concurrent STOW-RS requests of 5,000 one-byte parts stalled ``/healthz`` for
    up to 14 s (bench/multipart_load.py; creating a file alone takes ~0.3 ms). Only the
    chunks' arrival and the limits on them stay on the loop."""

    def __init__(self, reader: StreamingMultipart) -> None:
        self._reader = reader
        self._chunks: list[bytes] = []
        self._size = 0
        self._fed_at = time.monotonic()
        self._running: concurrent.futures.Future[None] | None = None

    @property
    def kept(self) -> bool:
        return bool(self._chunks)

    def add(self, chunk: bytes) -> bool:
        """Keep ``chunk`` for the next batch; True when the batch is big enough to feed."""
        self._chunks.append(chunk)
        self._size += len(chunk)
        return (self._size >= _FEED_BATCH
                or time.monotonic() - self._fed_at >= _FEED_AFTER_S)

    async def feed(self, *, finish: bool = False) -> None:
        """Parse the kept chunks (and with ``finish``, end the body) in the thread."""
        chunks, self._chunks, self._size = self._chunks, [], 0
        self._fed_at = time.monotonic()
        self._running = _PARSER_THREADS.submit(self._parse, chunks, finish)
        await asyncio.wrap_future(self._running)

    def _parse(self, chunks: list[bytes], finish: bool) -> None:
        for chunk in chunks:  # one by one: joined, they would be copied once more
            self._reader.feed(chunk)
        if finish:
            self._reader.finish()

    def after(self, cleanup: Callable[[], object]) -> None:
        """``cleanup`` now, or, if a batch is still being parsed (the request was cancelled
        while it was), once the thread is done with it: it must not write into a folder that
        is being removed."""
        running = self._running
        if running is None or running.done():
            cleanup()
        else:
            running.add_done_callback(lambda _: cleanup())


async def receive_parts(request: Request, rt: Runtime, media: MediaType,
                        on_part_head: Callable[[SpooledPart], object] | None = None
                        ) -> SpooledBody:
    """The request's parts in a fresh folder of the spool's ``tmp/``, within the settings'
    limits; the caller removes it (:meth:`SpooledBody.remove`) once the parts are stored."""
    settings = rt.settings
    try:
        return await spool_parts(
            request, media, rt.spool.request_folder(), limit=settings.max_upload_bytes,
            max_part_bytes=settings.max_instance_bytes,
            max_parts=settings.max_instances_per_series,
            check_space=rt.scheduler.check_spool_space, on_part_head=on_part_head)
    except Saturated as error:  # the spool filled up while the body streamed in, or too
        # many series are open (``on_part_head``)
        raise saturated_problem(error) from None
    except OSError as error:
        if error.errno not in _DISK_FULL:
            raise
        # the volume (or a quota) ran out under a part, between two fill checks: a full
        # spool, 503 + Retry-After, not a 500 (spool_parts removed the request's folder)
        full = SpoolFull(settings.retry_after_s, 1.0, settings.spool_max_fill)
        raise saturated_problem(full) from None
