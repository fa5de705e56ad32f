"""MIME multipart bodies as PACS and viewers send them (RFC 2046, RFC 2387, RFC 7578), and
the one writer of the ``multipart/related`` bodies flaircad sends (:class:`MultipartWriter`:
results to clients, WADO-RS instances and frames, STOW-RS deliveries to a PACS).

Written for what real senders do, not only for what the RFCs allow:

* Orthanc's DICOMweb plugin sends ``multipart/related; type=application/dicom; boundary=…``
  with the parameters unquoted and a 73-character boundary (RFC 2046 caps boundaries at 70;
  we accept up to 200), chunked, with a ``Content-Length`` on every part;
* dicomweb-client quotes its parameters and sends parts without ``Content-Length``;
* browsers and ``curl -F`` send ``multipart/form-data`` with ``Content-Disposition`` filenames.

A part's ``Content-Length``, when present, is trusted only if the delimiter follows it;
otherwise the delimiter alone ends the part (so binary bodies may contain anything).

Two readers share those rules. :func:`parse_multipart` takes a whole body in memory (small
bodies, tests). :class:`StreamingMultipart` is what the API uses: it is fed the body chunk by
chunk as it arrives and hands each part's bytes to a sink (a file in the spool) as soon as they
are known not to be a delimiter, so memory stays at a chunk plus one header block whatever the
body's size. It ends a part at its delimiter and never needs ``Content-Length``; the one
difference, which no real sender hits, is a part whose own bytes contain CRLF + ``--`` + the
boundary: the streaming reader cuts it there (choose boundaries that do not occur in the data,
as RFC 2046 asks).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

MAX_BOUNDARY = 200
MAX_PART_HEADER_BYTES = 16 * 1024
# Real senders put one to four header lines on a part (Content-Type, Content-Length,
# Content-Disposition, Content-Transfer-Encoding); 64 is far past any of them, and bounds the
# work per part when a body holds thousands of parts (issue 13: 1,400 lines a part).
MAX_PART_HEADER_LINES = 64
# Only these part headers are read (content_type, filename, parse_multipart's trust in a
# declared length); the others are dropped as they are parsed, so that a request of thousands
# of parts keeps a few short strings per part, not every line it was sent.
KEPT_PART_HEADERS = frozenset({"content-type", "content-disposition", "content-length"})
# A kept value longer than this is no real sender's: a filename is at most 255 bytes, 765
# percent-encoded. Refused, so that a part keeps at most 3 KiB of headers.
MAX_KEPT_HEADER_BYTES = 1024


class MultipartError(ValueError):
    """The body or its Content-Type is not a multipart message we can read."""


class PartTooLarge(MultipartError):
    """One part is larger than the reader's ``max_part_bytes`` (HTTP 413)."""


class TooManyParts(MultipartError):
    """The body holds more parts than the reader's ``max_parts`` (HTTP 413)."""


@dataclass(frozen=True)
class MediaType:
    """A parsed Content-Type: ``type/subtype`` lower-cased, parameters by lower-cased name."""

    essence: str
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: str | None) -> MediaType:
        if not value:
            return cls("")
        essence, _, rest = value.partition(";")
        return cls(essence.strip().lower(), _parse_params(rest))

    @property
    def is_multipart(self) -> bool:
        return self.essence.startswith("multipart/")


def _parse_params(text: str) -> dict[str, str]:
    """``; a=b; c="d;e"`` → {a: b, c: d;e}; quoted strings may hold ``;`` and ``\\"``."""
    params: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t;":
            i += 1
        start = i
        while i < n and text[i] not in "=;":
            i += 1
        name = text[start:i].strip().lower()
        if i >= n or text[i] == ";":
            continue  # a bare token without a value: ignore it
        i += 1  # '='
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == '"':
            i += 1
            chars: list[str] = []
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(text[i])
                i += 1
            i += 1  # closing quote
            value = "".join(chars)
        else:
            start = i
            while i < n and text[i] != ";":
                i += 1
            value = text[start:i].strip()
        if name:
            params[name] = value
    return params


class PartHeaders:
    """What a part's headers say; shared by parts in memory and parts spooled to disk."""

    headers: dict[str, str]  # lower-cased names

    @property
    def content_type(self) -> MediaType:
        return MediaType.parse(self.headers.get("content-type"))

    @property
    def filename(self) -> str | None:
        return filename_of(self.headers)


@dataclass(frozen=True)
class Part(PartHeaders):
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def read(self) -> bytes:
        return self.body


def filename_of(headers: dict[str, str]) -> str | None:
    disposition = headers.get("content-disposition")
    if not disposition:
        return None
    return _parse_params(disposition.partition(";")[2]).get("filename")


def boundary_of(media_type: MediaType) -> str:
    boundary = media_type.params.get("boundary", "")
    if not boundary:
        raise MultipartError("multipart Content-Type without a boundary parameter")
    if len(boundary) > MAX_BOUNDARY:
        raise MultipartError(f"multipart boundary longer than {MAX_BOUNDARY} characters")
    return boundary


def _parse_headers(block: bytes) -> dict[str, str]:
    """The :data:`KEPT_PART_HEADERS` of one part's header block (lines ending in CRLF);
    :class:`MultipartError` past :data:`MAX_PART_HEADER_LINES` lines or
    :data:`MAX_KEPT_HEADER_BYTES` in a kept value."""
    lines = block.split(b"\r\n")
    if len(lines) > MAX_PART_HEADER_LINES:
        raise MultipartError(f"a part has more than {MAX_PART_HEADER_LINES} header lines")
    headers: dict[str, str] = {}
    name = ""
    for raw in lines:
        line = raw.decode("latin-1")
        if not line:
            continue
        if line[0] in " \t" and name:  # obsolete line folding
            if name in headers:
                headers[name] = _bounded(name, headers[name] + " " + line.strip())
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise MultipartError(f"malformed part header line {line[:60]!r}")
        name = name.strip().lower()
        if name in KEPT_PART_HEADERS:
            headers[name] = _bounded(name, value.strip())
    return headers


def _bounded(name: str, value: str) -> str:
    if len(value) > MAX_KEPT_HEADER_BYTES:
        raise MultipartError(f"a part's {name} header is longer than {MAX_KEPT_HEADER_BYTES} "
                             "bytes")
    return value


def parse_multipart(body: bytes, boundary: str) -> list[Part]:
    """Split ``body`` into parts. Tolerates a missing preamble CRLF, LF-only header endings
    and a missing closing delimiter at the very end (truncated senders); raises
    :class:`MultipartError` for anything that is not a multipart body."""
    delimiter = b"--" + boundary.encode("latin-1")
    start = body.find(delimiter)
    if start < 0:
        raise MultipartError("the body does not contain the boundary from Content-Type")
    parts: list[Part] = []
    position = start + len(delimiter)
    body_view = memoryview(body)
    while True:
        if body[position : position + 2] == b"--":
            break  # closing delimiter
        line_end = body.find(b"\n", position)
        if line_end < 0:
            break  # delimiter at the very end without a part: nothing more
        header_start = line_end + 1
        header_end = body.find(b"\r\n\r\n", header_start)
        separator = 4
        lf_end = body.find(b"\n\n", header_start)
        if lf_end >= 0 and (header_end < 0 or lf_end < header_end):
            header_end, separator = lf_end, 2
        if header_end < 0 or header_end - header_start > MAX_PART_HEADER_BYTES:
            raise MultipartError("a part's headers do not end (no blank line)")
        headers = _parse_headers(body[header_start:header_end].replace(b"\r\n", b"\n")
                                 .replace(b"\n", b"\r\n"))
        content_start = header_end + separator
        content_end = -1
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit():
            candidate = content_start + int(declared)
            if body.startswith(b"\r\n" + delimiter, candidate) or body.startswith(
                delimiter, candidate
            ):
                content_end = candidate
        if content_end < 0:
            found = body.find(b"\r\n" + delimiter, content_start)
            if found < 0:
                found = body.find(b"\n" + delimiter, content_start)
                if found < 0:
                    raise MultipartError("a part is not followed by a boundary delimiter")
                content_end, next_delimiter = found, found + 1
            else:
                content_end, next_delimiter = found, found + 2
        else:
            next_delimiter = content_end + (2 if body.startswith(b"\r\n", content_end) else 0)
        parts.append(Part(headers, bytes(body_view[content_start:content_end])))
        position = next_delimiter + len(delimiter)
    return parts


class PartSink(Protocol):
    def write(self, data: bytes, /) -> object: ...


class StreamingMultipart:
    """An incremental multipart reader (see the module docstring).

    ``open_part(headers)`` is called for each part once its headers are read and returns where
    its bytes go; ``close_part(sink)`` once the part has ended. :meth:`feed` takes the body's
    chunks in order, :meth:`finish` says the body is over. Both raise :class:`MultipartError`
    (or its subclasses :class:`PartTooLarge`, :class:`TooManyParts`) for bodies that are not a
    multipart message we can read.
    """

    _PREAMBLE, _AFTER_DELIMITER, _HEADERS, _BODY, _END = range(5)
    _MAX_PADDING = 1024  # transport padding allowed after a delimiter, before its line end

    def __init__(self, boundary: str, open_part: Callable[[dict[str, str]], PartSink],
                 close_part: Callable[[PartSink], None] | None = None, *,
                 max_part_bytes: int | None = None, max_parts: int | None = None) -> None:
        self._delimiter = b"--" + boundary.encode("latin-1")
        self._body_end = b"\n" + self._delimiter  # CRLF or bare LF before the delimiter
        self._open, self._close = open_part, close_part
        self._max_part_bytes, self._max_parts = max_part_bytes, max_parts
        self._state = self._PREAMBLE
        self._buffer = bytearray()
        self._sink: PartSink | None = None
        self._part_bytes = 0
        self.parts = 0

    def feed(self, chunk: bytes) -> None:
        if self._state == self._END or not chunk:
            return  # the epilogue is ignored
        self._buffer += chunk
        self._advance()

    def finish(self) -> None:
        self._advance()
        if self._state == self._PREAMBLE:
            raise MultipartError("the body does not contain the boundary from Content-Type")
        if self._state == self._HEADERS:
            raise MultipartError("a part's headers do not end (no blank line)")
        if self._state == self._BODY:
            raise MultipartError("a part is not followed by a boundary delimiter")
        self._buffer.clear()

    # -- internals ---------------------------------------------------------------------------
    def _advance(self) -> None:
        while True:
            before = (self._state, len(self._buffer))
            if self._state == self._PREAMBLE:
                self._preamble()
            elif self._state == self._AFTER_DELIMITER:
                self._after_delimiter()
            elif self._state == self._HEADERS:
                self._headers()
            elif self._state == self._BODY:
                self._body()
            else:
                self._buffer.clear()
                return
            if (self._state, len(self._buffer)) == before:
                return  # needs more input

    def _preamble(self) -> None:
        found = self._buffer.find(self._delimiter)
        if found < 0:  # keep what could be the start of the delimiter
            keep = len(self._delimiter) - 1
            if len(self._buffer) > keep:
                del self._buffer[: len(self._buffer) - keep]
            return
        del self._buffer[: found + len(self._delimiter)]
        self._state = self._AFTER_DELIMITER

    def _after_delimiter(self) -> None:
        if self._buffer[:2] == b"--":
            self._state = self._END
            return
        if len(self._buffer) < 2 and self._buffer != b"\n":
            return  # could still become the closing "--"
        line_end = self._buffer.find(b"\n")
        if line_end < 0:
            if len(self._buffer) > self._MAX_PADDING:
                raise MultipartError("no line end after a boundary delimiter")
            return
        del self._buffer[: line_end + 1]
        self._state = self._HEADERS

    def _headers(self) -> None:
        if self._buffer[:2] == b"\r\n" or self._buffer[:1] == b"\n":  # a part without headers
            end, separator = 0, 2 if self._buffer[:1] == b"\r" else 1
        else:
            end, separator = self._buffer.find(b"\r\n\r\n"), 4
            lf_end = self._buffer.find(b"\n\n")
            if lf_end >= 0 and (end < 0 or lf_end < end):
                end, separator = lf_end, 2
        if end < 0 or end > MAX_PART_HEADER_BYTES:
            if end > MAX_PART_HEADER_BYTES or len(self._buffer) > MAX_PART_HEADER_BYTES + 4:
                raise MultipartError("a part's headers do not end (no blank line)")
            # refused as soon as the lines pass the bound, not only when the block ends
            if self._buffer.count(b"\n") > MAX_PART_HEADER_LINES:
                raise MultipartError(
                    f"a part has more than {MAX_PART_HEADER_LINES} header lines")
            return
        block = bytes(self._buffer[:end]).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        headers = _parse_headers(block)
        del self._buffer[: end + separator]
        self.parts += 1
        if self._max_parts is not None and self.parts > self._max_parts:
            raise TooManyParts(f"more than {self._max_parts} parts in one body")
        self._sink = self._open(headers)
        self._part_bytes = 0
        self._state = self._BODY

    def _body(self) -> None:
        found = self._buffer.find(self._body_end)
        if found < 0:
            # hand on all but what could be the start of "\r\n--boundary"
            keep = len(self._body_end)
            if len(self._buffer) > keep:
                self._emit(len(self._buffer) - keep)
            return
        content_end = found - 1 if found > 0 and self._buffer[found - 1] == 0x0D else found
        self._emit(content_end)
        del self._buffer[: found - content_end + len(self._body_end)]
        if self._close is not None and self._sink is not None:
            self._close(self._sink)
        self._sink = None
        self._state = self._AFTER_DELIMITER

    def _emit(self, n: int) -> None:
        if n <= 0:
            return
        self._part_bytes += n
        if self._max_part_bytes is not None and self._part_bytes > self._max_part_bytes:
            raise PartTooLarge(f"a part exceeds the limit of {self._max_part_bytes} bytes")
        assert self._sink is not None
        self._sink.write(bytes(self._buffer[:n]))
        del self._buffer[:n]


# -- writing -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LazyPart:
    """A part to stream: its headers, its length (known before it is read, for the part's
    and the body's ``Content-Length``) and how to read its bytes when it is sent."""

    headers: Mapping[str, str]
    length: int
    read: Callable[[], bytes]


@dataclass(frozen=True)
class MultipartWriter:
    """The ``multipart/related`` bodies flaircad sends (RFC 2387), one framing for all of
    them: each part is ``--boundary CRLF``, its headers, ``Content-Length``, a blank line, its
    bytes and CRLF; the body ends with ``--boundary-- CRLF``. ``part_type`` (and
    ``transfer_syntax``, when given) go into :attr:`content_type`, the body's media type.
    The boundary is random unless given: a fixed one is for tests."""

    part_type: str
    transfer_syntax: str | None = None
    boundary: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def content_type(self) -> str:
        syntax = f"transfer-syntax={self.transfer_syntax}; " if self.transfer_syntax else ""
        return f'multipart/related; type="{self.part_type}"; {syntax}boundary={self.boundary}'

    def head(self, headers: Mapping[str, str], length: int) -> bytes:
        """What precedes a part's bytes."""
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        return f"--{self.boundary}\r\n{lines}Content-Length: {length}\r\n\r\n".encode()

    @property
    def closing(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode()

    def body(self, parts: Iterable[tuple[Mapping[str, str], bytes]]) -> bytes:
        """The whole body of parts already in memory."""
        chunks: list[bytes] = []
        for headers, data in parts:
            chunks += [self.head(headers, len(data)), data, b"\r\n"]
        chunks.append(self.closing)
        return b"".join(chunks)

    def length(self, parts: Sequence[LazyPart]) -> int:
        """The byte length of :meth:`stream` of these parts, before any is read."""
        return sum(len(self.head(p.headers, p.length)) + p.length + 2 for p in parts) \
            + len(self.closing)

    def stream(self, parts: Iterable[LazyPart]) -> Iterator[bytes]:
        """The same bytes as :meth:`body`, each part read only when it is sent: memory holds
        one part whatever the number of parts. A part's ``read`` must return ``length`` bytes
        (the heads announced them)."""
        for part in parts:
            yield self.head(part.headers, part.length)
            yield part.read()
            yield b"\r\n"
        yield self.closing
