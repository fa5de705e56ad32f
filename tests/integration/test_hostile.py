"""The hostile corpus: malformed and malicious requests, each with its documented answer
(docs/SECURITY.md lists them), against one server that must stay healthy and keep serving good
requests afterwards, without a single 5xx."""

from __future__ import annotations

import http.client
import io
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, generate_uid

from service.runtime.audit import AuditLog
from service.storage.store import Status
from tests import _hostile
from tests._live import KEY, Live, related, running, settings_for
from tests.conftest import REPO, PhantomFactory

PROBLEM = "application/problem+json"
DICOM_JSON = "application/dicom+json"
LIMITS = {"max_upload_bytes": 16 * 1024**2, "max_instance_bytes": 2 * 1024**2,
          "max_instances_per_series": 40, "max_series_bytes": 32 * 1024**2,
          "max_matrix": 1024}


@dataclass
class Kit:
    """Builds request bodies from phantom series; every series gets fresh UIDs, so that no
    case meets what an earlier one stored."""

    phantom_series: PhantomFactory

    def series(self, seed: int = 91, label: str = "MS", slices: int | None = None,
               **changes: Any) -> list[bytes]:
        return [_encode(ds) for ds in self.datasets(seed, label, slices, **changes)]

    def datasets(self, seed: int = 91, label: str = "MS", slices: int | None = None,
                 **changes: Any) -> list[pydicom.Dataset]:
        study, series = generate_uid(), generate_uid()
        out = []
        for path in sorted(self.phantom_series(label=label, seed=seed,
                                               slices=slices).glob("*.dcm")):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid values are the point of some cases
                for keyword, value in changes.items():
                    setattr(ds, keyword, value)
            out.append(ds)
        return out

    def one(self, **changes: Any) -> bytes:
        return self.series(**changes)[0]


def _encode(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values we want
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _without(data: bytes, keyword: str) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    delattr(ds, keyword)
    return _encode(ds)


def _rle_header(rows: int, columns: int, frames: int) -> bytes:
    """An RLE-compressed image whose header declares a huge matrix: a few bytes on the wire."""
    ds = _hostile.header(rows=rows, columns=columns)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.NumberOfFrames = frames
    ds.PixelData = encapsulate([b"\x00" * 64] * frames)
    ds["PixelData"].VR = "OB"
    return _hostile.encode(ds)


def _not_flair(kit: Kit) -> list[bytes]:
    return kit.series(seed=92, SeriesDescription="t1_mprage_sag", ProtocolName="t1_mprage_sag",
                      SequenceName="tfl3d1", ScanningSequence="GR", InversionTime=900)


def _four_d(kit: Kit) -> list[bytes]:
    first = kit.datasets(seed=93, slices=12)
    second = []
    for ds in kit.datasets(seed=93, slices=12):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = first[0].StudyInstanceUID, \
            first[0].SeriesInstanceUID
        ds.EchoTime = float(ds.get("EchoTime", 100) or 100) + 50
        second.append(ds)
    return [_encode(ds) for ds in first + second]


def _mixed_studies(kit: Kit) -> list[bytes]:
    datasets = kit.datasets(seed=94)
    for ds in datasets[::2]:
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    return [_encode(ds) for ds in datasets]


def _chunks(total: int) -> Iterator[bytes]:
    """Parts of 1 MiB (each under the instance limit), sent chunked until ``total``."""
    for _ in range(total // 1024**2):
        yield b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"\0" * 1024**2 + b"\r\n"
    yield b"--b--\r\n"


@dataclass
class Case:
    name: str
    path: str
    body: Callable[[Kit], Any] | None  # bytes, (bytes, headers), or an iterator of chunks
    status: int
    code: str  # problem code, or STOW-RS "0xNNNN/reason" (FailureReason / refusal reason)
    content_type: str | None = 'multipart/related; type="application/dicom"; boundary=b'
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    auth: str | None = f"Bearer {KEY}"
    raw_length: int | None = None  # send only headers announcing this Content-Length
    setup: Callable[[Kit], list[bytes]] | None = None  # STOW-RS'd before the case


def _stow_parts(parts: Callable[[Kit], list[bytes]]) -> Callable[[Kit], Any]:
    return lambda kit: related(parts(kit), boundary="b")


STOW = "/dicomweb/studies"
UPLOAD = "/v1/analyses"
_SERIES_40: dict[int, list[bytes]] = {}


def _forty(kit: Kit) -> list[bytes]:
    if not _SERIES_40:
        study, series = generate_uid(), generate_uid()
        parts = []
        for _ in range(41):
            ds = _hostile.header(study, series)
            ds.PixelData = b"\0" * 32
            parts.append(_hostile.encode(ds))
        _SERIES_40[0] = parts
    return _SERIES_40[0]


CORPUS = [
    # -- framing and media types -----------------------------------------------------------
    Case("no_content_type", STOW, lambda k: b"x", 415, "unsupported_media_type",
         content_type=None),
    Case("json_instead_of_multipart", STOW, lambda k: b"{}", 415, "unsupported_media_type",
         content_type="application/json"),
    Case("dicom_xml_parts", STOW, lambda k: b"--b--", 415, "unsupported_media_type",
         content_type='multipart/related; type="application/dicom+xml"; boundary=b'),
    Case("multipart_mixed", STOW, lambda k: b"--b--", 415, "unsupported_media_type",
         content_type="multipart/mixed; boundary=b"),
    Case("form_data_to_stow", STOW, lambda k: b"--b--", 415, "unsupported_media_type",
         content_type="multipart/form-data; boundary=b"),
    Case("no_boundary_parameter", STOW, lambda k: b"--b--", 400, "malformed_multipart",
         content_type="multipart/related; type=application/dicom"),
    Case("boundary_too_long", STOW, lambda k: b"--" + b"x" * 201, 400, "malformed_multipart",
         content_type="multipart/related; type=application/dicom; boundary=" + "x" * 201),
    Case("boundary_not_in_body", STOW, lambda k: b"garbage" * 100, 400, "malformed_multipart"),
    Case("empty_body", STOW, lambda k: b"", 400, "malformed_multipart"),
    Case("only_the_closing_delimiter", STOW, lambda k: b"--b--\r\n", 400, "no_instances"),
    Case("part_headers_never_end", STOW,
         lambda k: b"--b\r\nContent-Type: application/dicom\r\n" + b"x" * 100, 400,
         "malformed_multipart"),
    Case("part_header_without_colon", STOW,
         lambda k: b"--b\r\nthis is no header\r\n\r\nDICM\r\n--b--", 400,
         "malformed_multipart"),
    Case("part_headers_of_20_kib", STOW,
         lambda k: b"--b\r\nX-Padding: " + b"p" * 20_000 + b"\r\n\r\nx\r\n--b--", 400,
         "malformed_multipart"),
    Case("part_with_1400_header_lines", STOW,
         lambda k: (b"--b\r\n" + b"".join(b"X%d: v\r\n" % n for n in range(1400))
                    + b"\r\nx\r\n--b--"), 400, "malformed_multipart"),
    Case("truncated_body", STOW, lambda k: related([k.one()], boundary="b")[0][:-40], 400,
         "malformed_multipart"),
    Case("lf_only_framing_with_garbage", STOW, lambda k: b"--b\n\n\x00\x01\n--b--\n", 409,
         "0xC000/not_dicom"),
    # -- sizes ---------------------------------------------------------------------------
    Case("declared_length_over_limit", STOW, None, 413, "payload_too_large",
         raw_length=10**12),
    Case("chunked_body_over_limit", STOW, lambda k: _chunks(20 * 1024**2), 413,
         "payload_too_large"),
    Case("instance_over_limit", STOW,
         lambda k: (b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"\0" * 3 * 1024**2
                    + b"\r\n--b--"), 413, "instance_too_large"),
    Case("too_many_parts", STOW, _stow_parts(lambda k: [b"x"] * 41), 413,
         "too_many_instances"),
    Case("too_many_instances_in_a_series", STOW, _stow_parts(lambda k: _forty(k)[40:]), 409,
         "0xA700/too_many_instances", setup=lambda k: _forty(k)[:40]),
    Case("absurd_matrix_native", STOW,
         _stow_parts(lambda k: [k.one(Rows=60000, Columns=60000)]), 409, "0xC000/truncated"),
    Case("absurd_matrix_compressed", STOW,
         _stow_parts(lambda k: [_rle_header(60000, 60000, 1)]), 409, "0xC000/matrix_too_large"),
    Case("deflate_bomb", STOW, _stow_parts(lambda k: [_hostile.deflate_bomb(300)]), 409,
         "0xC000/inflated_too_large"),
    Case("nesting_5000_levels", STOW, _stow_parts(lambda k: [_hostile.deeply_nested(5000)]),
         409, "0xC000/nesting_too_deep"),
    Case("nesting_40_levels_defined_length", STOW,
         _stow_parts(lambda k: [_hostile.deeply_nested(40, undefined_length=False)]), 409,
         "0xC000/nesting_too_deep"),
    Case("210000_sequence_items", STOW, _stow_parts(lambda k: [_hostile.many_items(210_000)]),
         409, "0xC000/too_many_items"),
    # -- DICOM content (STOW-RS answers per instance) ----------------------------------------
    Case("png_instead_of_dicom", STOW,
         _stow_parts(lambda k: [b"\x89PNG\r\n\x1a\n" + b"\0" * 200]), 409, "0xC000/not_dicom"),
    Case("empty_part", STOW, _stow_parts(lambda k: [b""]), 409, "0xC000/empty_file"),
    Case("truncated_pixel_data", STOW, _stow_parts(lambda k: [k.one()[:-5000]]), 409,
         "0xC000/truncated"),
    Case("corrupt_header", STOW,
         _stow_parts(lambda k: [b"\0" * 128 + b"DICM" + b"\xff" * 400]), 409, "0xC000/truncated"),
    Case("missing_sop_instance_uid", STOW,
         _stow_parts(lambda k: [_without(k.one(), "SOPInstanceUID")]), 409, "0xC000/missing_uid"),
    Case("uid_with_letters", STOW,
         _stow_parts(lambda k: [k.one(SeriesInstanceUID="1.2.840.abc")]), 409,
         "0xC000/invalid_uid"),
    Case("uid_longer_than_64", STOW,
         _stow_parts(lambda k: [k.one(SOPInstanceUID="1." + "2" * 70)]), 409, "0xC000/invalid_uid"),
    Case("structured_report_not_an_image", STOW,
         _stow_parts(lambda k: [_without(k.one(), "PixelData")]), 409, "0x0122/no_pixel_data"),
    Case("part_of_type_text_plain", STOW,
         lambda k: (b"--b\r\nContent-Type: text/plain\r\n\r\n" + k.one() + b"\r\n--b--"), 409,
         "0xC000/unsupported_part_type"),
    Case("study_in_url_not_the_instances_study", STOW + "/1.2.3.4",
         _stow_parts(lambda k: [k.one()]), 409, "0xA900/study_mismatch"),
    Case("same_uid_different_bytes", STOW,
         _stow_parts(lambda k: (lambda one: [one, one[:-2] + b"\x07\x07"])(k.one())), 202,
         "0x0111/conflicting_duplicate"),
    # -- URLs, methods, queries ------------------------------------------------------------
    Case("study_uid_not_a_uid", STOW + "/not-a-uid", _stow_parts(lambda k: [k.one()]), 400,
         "invalid_uid"),
    Case("study_uid_too_long", STOW + "/1." + "2" * 70, _stow_parts(lambda k: [k.one()]), 400,
         "invalid_uid"),
    Case("analysis_id_path_traversal", "/v1/analyses/..%2F..%2Fetc%2Fpasswd", None, 404,
         "not_found", method="GET", content_type=None),
    Case("analysis_id_not_hex", "/v1/analyses/" + "z" * 32, None, 404, "analysis_not_found",
         method="GET", content_type=None),
    Case("unknown_analysis", "/v1/analyses/" + "0" * 32 + "/instances", None, 404,
         "analysis_not_found", method="GET", content_type=None),
    Case("study_query_too_long", "/v1/analyses?study_instance_uid=" + "1" * 100, None, 400,
         "invalid_request", method="GET", content_type=None),
    Case("put_on_analyses", UPLOAD, lambda k: b"{}", 405, "method_not_allowed", method="PUT",
         content_type="application/json"),
    Case("unknown_route", "/v2/studies", None, 404, "not_found", method="GET",
         content_type=None),
    # -- credentials -----------------------------------------------------------------------
    Case("no_bearer_token", STOW, _stow_parts(lambda k: [k.one()]), 401, "unauthorized",
         auth=None),
    Case("wrong_bearer_token", STOW, _stow_parts(lambda k: [k.one()]), 401, "unauthorized",
         auth="Bearer wrong-key-0000000000000"),
    Case("basic_instead_of_bearer", UPLOAD, lambda k: b"x", 401, "unauthorized",
         auth="Basic dGVzdDp0ZXN0"),
    # -- /v1/analyses: bodies ----------------------------------------------------------------
    Case("upload_as_json", UPLOAD, lambda k: b"{}", 415, "unsupported_media_type",
         content_type="application/json"),
    Case("upload_form_without_files", UPLOAD,
         lambda k: b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--b--', 400,
         "no_instances", content_type="multipart/form-data; boundary=b"),
    Case("upload_text_file_in_related", UPLOAD,
         lambda k: (b'--b\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; '
                    b'filename="a.txt"\r\n\r\nhello\r\n--b--'), 415, "unsupported_media_type"),
    # -- /v1/analyses: series that cannot be analysed ------------------------------------------
    Case("upload_garbage_only", UPLOAD,
         _stow_parts(lambda k: [b"\x89PNG\r\n\x1a\n" + b"\0" * 99, b"%PDF-1.4"]), 422,
         "no_series"),
    Case("upload_two_series", UPLOAD,
         _stow_parts(lambda k: k.series(seed=91)[:3] + k.series(seed=91)[3:6]), 422,
         "multiple_series"),
    Case("upload_one_series_over_two_studies", UPLOAD, _stow_parts(_mixed_studies), 422,
         "multiple_series"),
    Case("upload_not_flair", UPLOAD, _stow_parts(_not_flair), 422, "not_flair"),
    Case("upload_4d", UPLOAD, _stow_parts(_four_d), 422, "multi_volume_4d"),
    Case("upload_single_slice", UPLOAD, _stow_parts(lambda k: k.series(seed=95)[:1]), 422,
         "single_slice"),
    Case("upload_ct", UPLOAD, _stow_parts(lambda k: k.series(seed=96, Modality="CT")), 422,
         "not_mr"),
    Case("upload_missing_slices", UPLOAD,
         _stow_parts(lambda k: (lambda s: s[:10] + s[11:])(k.series(seed=97))), 422,
         "missing_slices"),
    Case("upload_matrix_over_limit", UPLOAD,
         _stow_parts(lambda k: [_rle_header(4096, 4096, 1)]), 422, "matrix_too_large"),
    Case("upload_decoded_series_over_limit", UPLOAD,
         _stow_parts(lambda k: [_rle_header(1024, 1024, 20)]), 422, "series_too_large"),
]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with running(settings_for(tmp_path_factory.mktemp("hostile"), **LIMITS)) as server:
        yield server


@pytest.fixture(scope="module")
def kit(phantom_series: PhantomFactory) -> Kit:
    return Kit(phantom_series)


def _send(live: Live, case: Case, kit: Kit) -> tuple[int, dict[str, str], bytes]:
    headers = dict(case.headers)
    if case.content_type:
        headers["Content-Type"] = case.content_type
    if case.auth:
        headers["Authorization"] = case.auth
    if case.raw_length is not None:
        connection = http.client.HTTPConnection(live.url.removeprefix("http://"), timeout=30)
        connection.putrequest(case.method, case.path)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(case.raw_length))
        connection.endheaders()
        response = connection.getresponse()
        result = (response.status, {k.lower(): v for k, v in response.getheaders()},
                  response.read())
        connection.close()
        return result
    content = case.body(kit) if case.body else None
    if isinstance(content, tuple):
        content, extra = content
        headers = {**extra, **headers} if "Content-Type" in headers else {**headers, **extra}
        if case.content_type:
            headers["Content-Type"] = case.content_type
    response = httpx.request(case.method, live.url + case.path, content=content,
                             headers=headers, timeout=120)
    return response.status_code, dict(response.headers), response.content


def test_the_corpus_is_large_and_documented() -> None:
    names = [case.name for case in CORPUS]
    assert len(names) >= 40 and len(set(names)) == len(names)
    documented = (REPO / "docs" / "SECURITY.md").read_text()
    missing = [name for name in names if f"| `{name}` |" not in documented]
    assert missing == [], "docs/SECURITY.md lacks these corpus cases"


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_hostile_request_gets_its_documented_answer(live: Live, kit: Kit, case: Case) -> None:
    if case.setup is not None:
        body, headers = related(case.setup(kit), boundary="s")
        assert live.post(STOW, content=body, headers=headers).status_code == 200
    status, headers, content = _send(live, case, kit)
    assert status == case.status, (status, content[:300])
    if case.code.startswith("0x"):
        failure, reason = case.code.split("/")
        assert headers["content-type"] == DICOM_JSON
        failed = json.loads(content)["00081198"]["Value"]
        assert int(failure, 16) in {item["00081197"]["Value"][0] for item in failed}
        # the reason behind the FailureReason: in the audit trail (and the metrics)
        stow = [r for r in AuditLog(live.settings.spool_dir / "audit.jsonl").read()
                if r["event"] == "stow"][-1]
        assert reason in stow["refused"], stow
    else:
        assert headers["content-type"] == PROBLEM, headers
        problem = json.loads(content)
        assert problem["code"] == case.code and problem["status"] == case.status, problem
    assert httpx.get(live.url + "/healthz", timeout=10).status_code == 200


def test_after_the_corpus_the_server_is_healthy_and_serves_good_requests(
        live: Live, kit: Kit) -> None:
    assert httpx.get(live.url + "/readyz", timeout=10).status_code == 200
    series = kit.series(seed=98)
    body, headers = related(series)
    stored = live.post(STOW, content=body, headers=headers)
    assert stored.status_code == 200
    study = str(pydicom.dcmread(io.BytesIO(series[0]), stop_before_pixels=True)
                .StudyInstanceUID)
    (analysis,) = live.wait_for_study(study)
    assert analysis["status"] == "done"
    body, headers = related(kit.series(seed=99, label="cSVD"))
    uploaded = live.post(UPLOAD, content=body, headers=headers)
    assert uploaded.status_code == 200 and uploaded.json()["status"] == "done"
    # every answer above was checked to be the documented one (no 5xx); behind them, no
    # analysis failed either (a failure is a bug: rejections are the expected outcome)
    records = live.runtime.store.recent(1000)
    assert records and not [r for r in records if r.status is Status.FAILED]
    # and nothing of the refused requests is left behind in the spool's tmp/
    tmp: Path = live.runtime.spool.tmp
    assert list(tmp.iterdir()) == []
