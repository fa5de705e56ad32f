"""MIME multipart bodies as PACS and viewers send them (RFC 2046, RFC 2387, RFC 7578).

Written for what real senders do, not only for what the RFCs allow:

* Orthanc's DICOMweb plugin sends ``multipart/related; type=application/dicom; boundary=…``
  with the parameters unquoted and a 73-character boundary (RFC 2046 caps boundaries at 70;
  we accept up to 200), chunked, with a ``Content-Length`` on every part;
* dicomweb-client quotes its parameters and sends parts without ``Content-Length``;
* browsers and ``curl -F`` send ``multipart/form-data`` with ``Content-Disposition`` filenames.

A part's ``Content-Length``, when present, is trusted only if the delimiter follows it;
otherwise the delimiter alone ends the part (so binary bodies may contain anything).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_BOUNDARY = 200
MAX_PART_HEADER_BYTES = 16 * 1024


class MultipartError(ValueError):
    """The body or its Content-Type is not a multipart message we can read."""


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


@dataclass(frozen=True)
class Part:
    headers: dict[str, str]  # lower-cased names
    body: bytes

    @property
    def content_type(self) -> MediaType:
        return MediaType.parse(self.headers.get("content-type"))

    @property
    def filename(self) -> str | None:
        disposition = self.headers.get("content-disposition")
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
    headers: dict[str, str] = {}
    name = ""
    for raw in block.split(b"\r\n"):
        line = raw.decode("latin-1")
        if not line:
            continue
        if line[0] in " \t" and name:  # obsolete line folding
            headers[name] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise MultipartError(f"malformed part header line {line[:60]!r}")
        name = name.strip().lower()
        headers[name] = value.strip()
    return headers


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
