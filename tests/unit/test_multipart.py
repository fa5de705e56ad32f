"""The multipart reader against the framings real senders use, and the one writer of the
bodies flaircad sends."""

from __future__ import annotations

import asyncio
import functools
import io
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from fastapi.responses import StreamingResponse

from service.intake.multipart import (
    LazyPart,
    MediaType,
    MultipartError,
    MultipartWriter,
    StreamingMultipart,
    boundary_of,
    parse_multipart,
)

ORTHANC_BOUNDARY = "a" * 36 + "-" + "0123456789abcdef0123456789abcdef0123"  # 73 characters


def frame(parts: list[bytes], boundary: str, *, lengths: bool, lf_only: bool = False) -> bytes:
    newline = b"\n" if lf_only else b"\r\n"
    out = b""
    for body in parts:
        out += b"--" + boundary.encode() + newline + b"Content-Type: application/dicom" + newline
        if lengths:
            out += f"Content-Length: {len(body)}".encode() + newline
        out += newline + body + newline
    return out + b"--" + boundary.encode() + b"--" + newline


def test_orthanc_unquoted_long_boundary_with_part_lengths() -> None:
    assert len(ORTHANC_BOUNDARY) == 73
    media = MediaType.parse(
        f"multipart/related; type=application/dicom; boundary={ORTHANC_BOUNDARY}")
    assert media.essence == "multipart/related"
    assert media.params["type"] == "application/dicom"
    # A body that itself contains CRLF + a boundary-like string is cut by Content-Length.
    tricky = b"DICM\r\n--" + ORTHANC_BOUNDARY.encode()[:10] + b"\x00\xff" * 50
    body = frame([tricky, b"second"], boundary_of(media), lengths=True)
    parts = parse_multipart(body, boundary_of(media))
    assert [p.body for p in parts] == [tricky, b"second"]
    assert parts[0].headers["content-length"] == str(len(tricky))


def test_quoted_parameters_and_parts_without_length() -> None:
    media = MediaType.parse('Multipart/Related; type="application/dicom"; boundary="ab;c=d"')
    assert boundary_of(media) == "ab;c=d"
    parts = parse_multipart(frame([b"x" * 1000, b""], "ab;c=d", lengths=False), "ab;c=d")
    assert [len(p.body) for p in parts] == [1000, 0]
    assert parts[0].content_type.essence == "application/dicom"


def test_lf_only_framing_and_preamble() -> None:
    body = b"this is a preamble\r\n" + frame([b"abc"], "B", lengths=False, lf_only=True)
    assert [p.body for p in parse_multipart(body, "B")] == [b"abc"]


def test_wrong_content_length_falls_back_to_the_delimiter() -> None:
    body = frame([b"0123456789"], "B", lengths=False).replace(
        b"Content-Type: application/dicom\r\n",
        b"Content-Type: application/dicom\r\nContent-Length: 3\r\n")
    assert [p.body for p in parse_multipart(body, "B")] == [b"0123456789"]


def test_form_data_filename() -> None:
    body = (b'--X\r\nContent-Disposition: form-data; name="files"; filename="IM 1.dcm"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\nDATA\r\n--X--\r\n")
    (part,) = parse_multipart(body, "X")
    assert part.filename == "IM 1.dcm" and part.body == b"DATA"


@pytest.mark.parametrize("body", [b"", b"no boundary here", b"--B\r\nContent-Type: x",
                                  b"--B\r\nContent-Type: a\r\n\r\nnever closed"])
def test_malformed_bodies_raise_multipart_error(body: bytes) -> None:
    with pytest.raises(MultipartError):
        parse_multipart(body, "B")


def test_boundary_rules() -> None:
    with pytest.raises(MultipartError):
        boundary_of(MediaType.parse("multipart/related; type=application/dicom"))
    with pytest.raises(MultipartError):
        boundary_of(MediaType.parse("multipart/related; boundary=" + "x" * 201))


# -- the one writer (issue 14): analyses, WADO-RS and STOW-RS deliveries -----------------------
FIXED = uuid.UUID("0123456789abcdef0123456789abcdef")
# Tricky contents: a delimiter-like line, CR/LF runs, an empty part, bytes beyond ASCII
CONTENTS = [b"DICM\r\n--" + FIXED.hex.encode()[:12] + b"\x00\xff" * 40, b"", b"\r\n\r\n--",
            bytes(range(256)) * 3]
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def old_related(files: list[Path], boundary: str) -> bytes:
    """api/analyses.get_instances and forward.send_stow before issue 14, byte for byte."""
    chunks: list[bytes] = []
    for path in files:
        data = path.read_bytes()
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n"
                   f"Content-Length: {len(data)}\r\n\r\n".encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks)


def old_wado(parts: list[tuple[bytes, dict[str, str]]], boundary: str) -> bytes:
    """api/wado._multipart (and, for the same parts, _frames_response) before issue 14."""
    chunks: list[bytes] = []
    for body, headers in parts:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        chunks += [f"--{boundary}\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode(),
                   body, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks)


def read_back(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """What the streaming reader makes of a body, fed 7 bytes at a time."""
    sinks: list[tuple[dict[str, str], io.BytesIO]] = []

    def open_part(headers: dict[str, str]) -> io.BytesIO:
        sinks.append((headers, io.BytesIO()))
        return sinks[-1][1]

    reader = StreamingMultipart(boundary_of(MediaType.parse(content_type)), open_part)
    for start in range(0, len(body), 7):
        reader.feed(body[start:start + 7])
    reader.finish()
    return [(headers, sink.getvalue()) for headers, sink in sinks]


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    monkeypatch.setattr(uuid, "uuid4", lambda: FIXED)
    files = []
    for index, data in enumerate(CONTENTS):
        files.append(tmp_path / f"{index}.dcm")
        files[-1].write_bytes(data)
    return files


def analyses_body(files: list[Path]) -> tuple[bytes, str]:
    from service.api.analyses import instances_response

    response = instances_response(files)
    return bytes(response.body), response.headers["content-type"]


def forward_body(files: list[Path], monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, str]:
    import httpx

    from service.core.destinations import Destination
    from service.runtime.forward import send_stow

    sent: dict[str, Any] = {}

    def post(url: str, *, content: bytes, headers: dict[str, str], **_: Any) -> httpx.Response:
        sent.update(content=content, content_type=headers["Content-Type"])
        return httpx.Response(200, json={}, request=httpx.Request("POST", url))

    monkeypatch.setattr(httpx, "post", post)
    destination = Destination(name="pacs", kind="stow", url="http://pacs/dicom-web")
    assert send_stow(destination, files) == len(files)
    return sent["content"], sent["content_type"]


def wado_instances_body(files: list[Path]) -> tuple[bytes, str]:
    from starlette.requests import Request

    from service.api import wado

    instances = [wado._Instance(path, "a" * 32, "1.2", "1.2.3", f"1.2.3.{i}", "1.2.840",
                                EXPLICIT_LE, "OT", "", None, i)
                 for i, path in enumerate(files)]
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": []})
    response = wado._dicom_parts(request, instances)
    return bytes(response.body), response.headers["content-type"]


def wado_frames_body(pixels: bytes, numbers: list[int], size: int) -> tuple[bytes, str, int]:
    from service.api import wado

    reader = wado._PixelReader(io.BytesIO(), len(pixels), data=pixels)
    response = wado._frames_response(reader, numbers, size)

    async def collect() -> bytes:
        assert isinstance(response, StreamingResponse)
        return b"".join([bytes(chunk) if not isinstance(chunk, str) else chunk.encode()
                         async for chunk in response.body_iterator])

    return (asyncio.run(collect()), response.headers["content-type"],
            int(response.headers["content-length"]))


def test_the_three_writers_are_todays_bytes_for_a_fixed_boundary(
        results: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    body, content_type = analyses_body(results)
    assert body == old_related(results, FIXED.hex)
    assert content_type == f'multipart/related; type="application/dicom"; boundary={FIXED.hex}'

    body, content_type = forward_body(results, monkeypatch)
    assert body == old_related(results, f"flaircad-{FIXED.hex}")
    assert content_type == ('multipart/related; type="application/dicom"; '
                            f"boundary=flaircad-{FIXED.hex}")

    body, content_type = wado_instances_body(results)
    type_ = f"application/dicom; transfer-syntax={EXPLICIT_LE}"
    assert body == old_wado([(p.read_bytes(), {"Content-Type": type_}) for p in results],
                            FIXED.hex)
    assert content_type == f'multipart/related; type="application/dicom"; boundary={FIXED.hex}'

    pixels = bytes(range(256)) * 4 + b"\r\n--" + FIXED.hex.encode()  # 3 full frames, 1 short
    body, content_type, length = wado_frames_body(pixels, [4, 1, 3], 350)
    frame_type = {"Content-Type": f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"}
    assert body == old_wado([(pixels[1050:], frame_type), (pixels[:350], frame_type),
                             (pixels[700:1050], frame_type)], FIXED.hex)
    assert length == len(body)
    assert content_type == ('multipart/related; type="application/octet-stream"; '
                            f"transfer-syntax={EXPLICIT_LE}; boundary={FIXED.hex}")


def test_the_three_writers_read_back_as_their_parts(
        results: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    analyses = read_back(*analyses_body(results))
    forward = read_back(*forward_body(results, monkeypatch))
    wado_parts = read_back(*wado_instances_body(results))
    assert analyses == forward
    assert [data for _, data in analyses] == [data for _, data in wado_parts] == CONTENTS
    assert [h["content-length"] for h, _ in wado_parts] == [str(len(c)) for c in CONTENTS]
    assert {h["content-type"] for h, _ in analyses} == {"application/dicom"}
    assert {h["content-type"] for h, _ in wado_parts} == {
        f"application/dicom; transfer-syntax={EXPLICIT_LE}"}
    pixels = bytes(range(200)) * 3
    body, content_type, _ = wado_frames_body(pixels, [2, 1], 250)
    assert [data for _, data in read_back(body, content_type)] == [pixels[250:500],
                                                                   pixels[:250]]


def test_one_writer_frames_every_body(results: list[Path],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of the three goes through MultipartWriter: the framing exists once."""
    heads: list[str] = []
    original = MultipartWriter.head

    def head(self: MultipartWriter, headers: Mapping[str, str], length: int) -> bytes:
        heads.append(self.part_type)
        return original(self, headers, length)

    monkeypatch.setattr(MultipartWriter, "head", head)
    analyses_body(results)
    forward_body(results, monkeypatch)
    assert heads == ["application/dicom"] * 2 * len(results)
    wado_instances_body(results)
    wado_frames_body(b"x" * 10, [1, 2], 5)
    assert heads[2 * len(results):] == ["application/dicom"] * len(results) + [
        "application/octet-stream"] * 4  # the frames' heads: counted once, then sent


def test_writer_body_and_stream_are_the_same_bytes() -> None:
    writer = MultipartWriter("application/dicom", boundary="B")
    parts = [({"Content-Type": "application/dicom"}, data) for data in CONTENTS]
    lazy = [LazyPart(headers, len(data), functools.partial(bytes, data))
            for headers, data in parts]
    whole = writer.body(parts)
    assert b"".join(writer.stream(lazy)) == whole and writer.length(lazy) == len(whole)
    assert [p.body for p in parse_multipart(whole, "B")] == CONTENTS
    assert MultipartWriter("x/y").boundary != MultipartWriter("x/y").boundary
