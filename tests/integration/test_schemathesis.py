"""schemathesis against the committed ``openapi.yaml``: requests generated from the documented
operations (valid and invalid ones) never get a 5xx. Bounded: a few examples per operation
(``FLAIRCAD_FUZZ_EXAMPLES`` scales them)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from tests import _hostile
from tests._live import KEY, Live, running, settings_for
from tests.conftest import REPO

EXAMPLES = 8 * int(os.environ.get("FLAIRCAD_FUZZ_EXAMPLES", "1"))
BOUNDARY = "schemathesis-7b1d"


def _small_instance() -> bytes:
    ds = _hostile.header()
    ds.PixelData = b"\0" * 32
    return _hostile.encode(ds)


_part = st.one_of(st.binary(max_size=600), st.just(_small_instance()),
                  st.just(_small_instance()).map(lambda d: d[: len(d) // 2]))
# multipart/related bodies framed with BOUNDARY (sent with it: see test_no_server_errors)
_related = st.lists(st.tuples(st.sampled_from(["application/dicom", "", "text/plain"]), _part),
                    max_size=4).map(lambda parts: b"".join(
                        f"--{BOUNDARY}\r\n".encode()
                        + (f"Content-Type: {kind}\r\n".encode() if kind else b"")
                        + b"\r\n" + body + b"\r\n" for kind, body in parts)
                        + f"--{BOUNDARY}--\r\n".encode())
schemathesis.openapi.media_type("multipart/related", _related,
                                aliases=['multipart/related; type="application/dicom"'])
schema = schemathesis.openapi.from_path(REPO / "openapi.yaml")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with running(settings_for(tmp_path_factory.mktemp("schemathesis"),
                              max_upload_bytes=8 * 1024**2)) as server:
        yield server


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case, live: Live) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    if (case.media_type or "").startswith("multipart/related"):
        headers["Content-Type"] = (f'multipart/related; type="application/dicom"; '
                                   f"boundary={BOUNDARY}")
    response = case.call(base_url=live.url, headers=headers, timeout=60)
    case.validate_response(response, checks=[not_a_server_error])
