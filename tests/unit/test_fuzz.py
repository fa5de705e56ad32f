"""Property-based fuzzing (hypothesis) of the two parsers that meet hostile bytes first: the
multipart readers and DICOM ingest, then the STOW-RS storage path and the analysis pipeline on
mutated series. Bounded example counts keep it to seconds; ``FLAIRCAD_FUZZ_EXAMPLES`` scales
them for a longer run."""

from __future__ import annotations

import contextlib
import io
import os
import string
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from service.core.limits import Limits
from service.core.reading import Instance, Skipped, read_instance
from service.intake.multipart import (
    MAX_PART_HEADER_BYTES,
    MultipartError,
    Part,
    StreamingMultipart,
    parse_multipart,
)
from service.intake.stow import store_parts
from service.pipeline.analysis import AnalysisRejected, analyse
from service.pipeline.engine import Engine
from service.storage.spool import Spool
from tests import _hostile
from tests.conftest import PhantomFactory

SCALE = int(os.environ.get("FLAIRCAD_FUZZ_EXAMPLES", "1"))
# no example database: nothing written into the tree, each run explores afresh
FAST = settings(max_examples=150 * SCALE, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BOUNDARY_CHARS = string.ascii_letters + string.digits + "'()+_,-./:=?"


def _frame(parts: list[tuple[dict[str, str], bytes]], boundary: str, newline: bytes,
           preamble: bytes) -> bytes:
    out = preamble
    for headers, body in parts:
        out += b"--" + boundary.encode() + newline
        for name, value in headers.items():
            if name == "content-length":  # when there, right (a wrong one is a documented
                value = str(len(body))    # difference between the readers)
            out += f"{name}: {value}".encode() + newline
        out += newline + body + newline
    return out + b"--" + boundary.encode() + b"--" + newline


def _stream(body: bytes, boundary: str, sizes: list[int]) -> list[tuple[dict[str, str], bytes]]:
    parts: list[tuple[dict[str, str], io.BytesIO]] = []

    def open_part(headers: dict[str, str]) -> io.BytesIO:
        parts.append((headers, io.BytesIO()))
        return parts[-1][1]

    reader = StreamingMultipart(boundary, open_part)
    position, index = 0, 0
    while position < len(body):
        size = sizes[index % len(sizes)]
        reader.feed(body[position:position + size])
        # never more than a header block or a delimiter's worth is held back
        assert len(reader._buffer) <= MAX_PART_HEADER_BYTES + 4 + size + len(boundary) + 8
        position, index = position + size, index + 1
    reader.finish()
    return [(headers, sink.getvalue()) for headers, sink in parts]


header_values = st.text(alphabet=string.ascii_letters + string.digits + "/;=-. ", max_size=40)
part_headers = st.fixed_dictionaries(
    {"content-type": header_values},
    optional={"content-length": st.just("0"),
              "x-extra": header_values})


@FAST
@given(boundary=st.text(alphabet=BOUNDARY_CHARS, min_size=1, max_size=70),
       parts=st.lists(st.tuples(part_headers, st.binary(max_size=400)), max_size=5),
       crlf=st.booleans(), preamble=st.sampled_from([b"", b"preamble\r\n", b"\r\n"]),
       sizes=st.lists(st.integers(1, 512), min_size=1, max_size=8))
def test_streaming_reader_equals_the_whole_body_reader(
        boundary: str, parts: list[tuple[dict[str, str], bytes]], crlf: bool, preamble: bytes,
        sizes: list[int]) -> None:
    newline = b"\r\n" if crlf else b"\n"
    delimiter = b"\n--" + boundary.encode()
    # the documented difference (module docstring of service.intake.multipart): bodies that contain
    # their own delimiter, or end in CR under LF-only framing
    assume(all(delimiter not in body and not (not crlf and body.endswith(b"\r"))
               for _, body in parts))
    assume(delimiter[1:] not in preamble)
    body = _frame(parts, boundary, newline, preamble)
    whole = [(part.headers, part.body) for part in parse_multipart(body, boundary)]
    # a correct Content-Length is the only one the whole-body reader trusts; both agree
    assert _stream(body, boundary, sizes) == whole
    assert [body for _, body in whole] == [body for _, body in parts]


@FAST
@given(data=st.binary(max_size=3000),
       boundary=st.text(alphabet=BOUNDARY_CHARS, min_size=1, max_size=10),
       sizes=st.lists(st.integers(1, 700), min_size=1, max_size=4))
def test_any_bytes_are_parts_or_a_multipart_error(data: bytes, boundary: str,
                                                  sizes: list[int]) -> None:
    with contextlib.suppress(MultipartError):
        _stream(data, boundary, sizes)
    with contextlib.suppress(MultipartError):
        parse_multipart(data, boundary)


@FAST
@given(data=st.data())
def test_multipart_with_boundary_noise_never_escapes(data: st.DataObject) -> None:
    """Bytes built from the boundary's pieces, CR, LF and dashes: the framing corner cases."""
    boundary = "xyz"
    pieces = st.sampled_from([b"--xyz", b"--xyz--", b"\r\n", b"\n", b"-", b"\r",
                              b"Content-Type: a\r\n", b":", b"x" * 50, b"\r\n\r\n"])
    body = b"".join(data.draw(st.lists(pieces, max_size=40)))
    sizes = data.draw(st.lists(st.integers(1, 64), min_size=1, max_size=4))
    with contextlib.suppress(MultipartError):
        _stream(body, boundary, sizes)


# -- DICOM ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def samples(phantom_series: PhantomFactory) -> list[bytes]:
    small = _hostile.header()
    small.PixelData = b"\0" * 32
    phantom = sorted(phantom_series(slices=8).glob("*.dcm"))[3].read_bytes()
    rle = sorted(phantom_series(slices=8, compress="rle").glob("*.dcm"))[3].read_bytes()
    return [_hostile.encode(small), phantom, rle]


mutation = st.tuples(st.sampled_from(["flip", "cut", "insert", "overwrite", "duplicate"]),
                     st.floats(0, 1), st.binary(min_size=1, max_size=16))


def _mutate(data: bytes, mutations: list[tuple[str, float, bytes]], header_bias: bool) -> bytes:
    buffer = bytearray(data)
    for kind, where, payload in mutations:
        # most interesting bytes are in the header: aim there half of the time
        span = min(len(buffer), 2048) if header_bias else len(buffer)
        at = int(where * max(span - 1, 0))
        if kind == "flip" and buffer:
            buffer[at] ^= payload[0] or 0xFF
        elif kind == "cut":
            del buffer[at:]
        elif kind == "insert":
            buffer[at:at] = payload
        elif kind == "overwrite":
            buffer[at:at + len(payload)] = payload
        else:
            buffer[at:at] = buffer[at:at + 64]
    return bytes(buffer)


@FAST
@given(which=st.integers(0, 2), mutations=st.lists(mutation, min_size=1, max_size=6),
       header_bias=st.booleans())
def test_read_instance_never_raises(samples: list[bytes], which: int,
                                    mutations: list[tuple[str, float, bytes]],
                                    header_bias: bool) -> None:
    data = _mutate(samples[which], mutations, header_bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = read_instance(data)
    assert isinstance(outcome, Instance | Skipped)


@settings(max_examples=60 * SCALE, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 2), mutations=st.lists(mutation, min_size=1, max_size=4),
       header_bias=st.booleans(), content_type=st.sampled_from(
           ["application/dicom", "", "application/octet-stream", "text/plain"]))
def test_stow_storage_never_raises(tmp_path: Path, samples: list[bytes], which: int,
                                   mutations: list[tuple[str, float, bytes]], header_bias: bool,
                                   content_type: str) -> None:
    spool = Spool(tmp_path / "spool")
    data = _mutate(samples[which], mutations, header_bias)
    part = Part({"content-type": content_type} if content_type else {}, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = store_parts([part, part], spool, None, limits=Limits(max_matrix=1024))
    assert len(result.stored) + len(result.failed) == 2
    assert result.status_code in (200, 202, 409)


@pytest.fixture(scope="module")
def engine() -> Engine:
    from service.core.config import BUNDLED_MODEL

    return Engine(BUNDLED_MODEL, ["CPUExecutionProvider"])


@settings(max_examples=12 * SCALE, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(victims=st.lists(st.integers(0, 7), min_size=1, max_size=3),
       mutations=st.lists(mutation, min_size=1, max_size=3), header_bias=st.booleans())
def test_analysis_of_a_mutated_series_is_a_result_or_a_rejection(
        phantom_series: PhantomFactory, engine: Engine, victims: list[int],
        mutations: list[tuple[str, float, bytes]], header_bias: bool) -> None:
    files = [p.read_bytes() for p in sorted(phantom_series(slices=8).glob("*.dcm"))]
    for index in set(victims):
        files[index] = _mutate(files[index], mutations, header_bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a result, or a rejection (422 with its code); anything else would be a 500
        with contextlib.suppress(AnalysisRejected):
            analyse(files, engine, limits=Limits())
