"""The multipart reader against the framings real senders use."""

from __future__ import annotations

import pytest

from service.intake.multipart import MediaType, MultipartError, boundary_of, parse_multipart

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
