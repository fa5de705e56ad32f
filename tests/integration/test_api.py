"""The HTTP API through a real uvicorn server on loopback, with real STOW-RS clients."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
import uvicorn

from service.core.config import Settings
from service.intake.multipart import MediaType, parse_multipart
from service.runtime.app import create_app
from tests.conftest import PhantomFactory


@dataclass
class Server:
    url: str
    host: str
    port: int
    settings: Settings


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start(settings: Settings) -> tuple[uvicorn.Server, threading.Thread, Server]:
    port = _free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                            log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return server, thread, Server(url, "127.0.0.1", port, settings)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the server did not become ready")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # authentication has its own tests (tests/integration/test_security.py)
    settings = Settings(spool_dir=tmp_path_factory.mktemp("spool"), stability_window_s=0.5,
                        max_upload_bytes=64 * 1024**2, auth_disabled=True)
    uv, thread, handle = _start(settings)
    yield handle
    uv.should_exit = True
    thread.join(timeout=30)


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def _related(files: list[bytes], boundary: str, lengths: bool) -> bytes:
    out = b""
    for data in files:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n".encode()
        if lengths:
            out += f"Content-Length: {len(data)}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def _wait_for_study(server: Server, study: str, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = httpx.get(f"{server.url}/v1/analyses",
                         params={"study_instance_uid": study}).json()
        analyses = body["analyses"]
        if analyses and all(a["status"] in ("done", "rejected", "failed") for a in analyses):
            return analyses
        time.sleep(0.2)
    raise AssertionError(f"no finished analysis for the study within {timeout} s")


def _study_of(folder: Path) -> str:
    return str(pydicom.dcmread(_files(folder)[0], stop_before_pixels=True).StudyInstanceUID)


def test_dicomweb_client_store_instances_then_analysed(server: Server,
                                                       phantom_series: PhantomFactory) -> None:
    from dicomweb_client.api import DICOMwebClient

    folder = phantom_series(label="MS", seed=21)
    datasets = [pydicom.dcmread(path) for path in _files(folder)]
    client = DICOMwebClient(url=f"{server.url}/dicomweb")
    response = client.store_instances(datasets)
    stored = response.ReferencedSOPSequence
    assert len(stored) == len(datasets)
    assert {item.ReferencedSOPInstanceUID for item in stored} == {
        ds.SOPInstanceUID for ds in datasets}
    assert "FailedSOPSequence" not in response

    (analysis,) = _wait_for_study(server, datasets[0].StudyInstanceUID)
    assert analysis["status"] == "done", analysis
    assert set(analysis["probabilities"]) == {"MS", "cSVD"}
    assert analysis["prediction"] == max(analysis["probabilities"],
                                         key=analysis["probabilities"].get)
    assert len(analysis["slice_weights"]) == len(datasets)
    assert abs(sum(analysis["slice_weights"]) - 1) < 1e-4
    assert analysis["model"]["provider"].endswith("ExecutionProvider")
    assert analysis["series_instance_uid"] == datasets[0].SeriesInstanceUID
    # the map shown (FLAIRCAD_EXPLANATION, default HiResCAM), the distribution check, the
    # calibration temperature, from the bundled model's metadata
    assert analysis["explanation"]["map"] == "hirescam"
    assert set(analysis["distribution"]) == {"in_distribution", "score", "threshold", "method",
                                             "statement"}
    assert analysis["calibration"]["temperature"] > 0

    # A re-sent identical series is acknowledged, and not analysed a second time.
    again = client.store_instances(datasets[:3])
    assert len(again.ReferencedSOPSequence) == 3
    time.sleep(1.5)
    assert len(_wait_for_study(server, datasets[0].StudyInstanceUID)) == 1


def test_orthanc_framing_chunked_unquoted_73_character_boundary(
        server: Server, phantom_series: PhantomFactory) -> None:
    folder = phantom_series(label="cSVD", seed=22)
    boundary = (uuid.uuid4().hex + "-" + uuid.uuid4().hex + uuid.uuid4().hex)[:73]
    assert len(boundary) == 73
    body = _related([p.read_bytes() for p in _files(folder)], boundary, lengths=True)
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
    connection.putrequest("POST", f"/dicomweb/studies/{_study_of(folder)}")
    connection.putheader("Content-Type",
                         f"multipart/related; type=application/dicom; boundary={boundary}")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.putheader("Accept", "application/dicom+json")
    connection.endheaders()
    for start in range(0, len(body), 65536):
        chunk = body[start:start + 65536]
        connection.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    connection.send(b"0\r\n\r\n")
    response = connection.getresponse()
    payload = json.loads(response.read())
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/dicom+json"
    assert len(payload["00081199"]["Value"]) == len(_files(folder))
    (analysis,) = _wait_for_study(server, _study_of(folder))
    assert analysis["status"] == "done"


def test_stow_partial_and_total_refusals(server: Server,
                                         phantom_series: PhantomFactory) -> None:
    folder = phantom_series(label="MS", seed=23)
    first, second = (p.read_bytes() for p in _files(folder)[:2])
    study = _study_of(folder)
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary="b"'}
    mixed = httpx.post(f"{server.url}/dicomweb/studies", headers=headers,
                       content=_related([first, b"not dicom at all"], "b", lengths=False))
    assert mixed.status_code == 202
    assert mixed.headers["content-type"] == "application/dicom+json"
    failed = mixed.json()["00081198"]["Value"]
    assert failed[0]["00081197"]["Value"] == [0xC000]

    wrong_study = httpx.post(f"{server.url}/dicomweb/studies/1.2.3", headers=headers,
                             content=_related([second], "b", lengths=False))
    assert wrong_study.status_code == 409
    assert wrong_study.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]

    # Same SOP Instance UID, different bytes: refused, the stored copy is kept.
    ds = pydicom.dcmread(_files(folder)[0])
    ds.PatientComments = "changed"
    from io import BytesIO
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    conflict = httpx.post(f"{server.url}/dicomweb/studies/{study}", headers=headers,
                          content=_related([buffer.getvalue()], "b", lengths=False))
    assert conflict.status_code == 409
    assert conflict.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0x0111]


@pytest.mark.parametrize(("content_type", "body", "status", "code"), [
    ("application/json", b"{}", 415, "unsupported_media_type"),
    ('multipart/related; type="application/dicom+xml"; boundary=b', b"--b--", 415,
     "unsupported_media_type"),
    ("multipart/related; type=application/dicom", b"--b--", 400, "malformed_multipart"),
    ("multipart/related; type=application/dicom; boundary=zz", b"garbage", 400,
     "malformed_multipart"),
])
@pytest.mark.parametrize("path", ["/dicomweb/studies", "/v1/analyses"])
def test_bad_requests_get_problem_json(server: Server, path: str, content_type: str,
                                       body: bytes, status: int, code: str) -> None:
    response = httpx.post(server.url + path, headers={"Content-Type": content_type},
                          content=body)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == code and problem["status"] == status
    assert problem["type"].endswith(code)
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_too_large_body_is_413_while_streaming(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"--b\r\nContent-Type: application/dicom\r\n\r\n"
        for _ in range(70):
            yield b"\0" * 1024**2

    response = httpx.post(server.url + "/v1/analyses", content=chunks(), headers={
        "Content-Type": "multipart/related; type=application/dicom; boundary=b"})
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"


def test_sync_analysis_returns_result_and_dicom_outputs(
        server: Server, phantom_series: PhantomFactory) -> None:
    folder = phantom_series(label="MS", seed=24)
    files = _files(folder)
    response = httpx.post(
        server.url + "/v1/analyses", timeout=120,
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=XyZ'},
        content=_related([p.read_bytes() for p in files], "XyZ", lengths=False))
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["status"] == "done"
    assert set(result["timings_ms"]) >= {"decode", "volume", "preprocess", "inference",
                                         "render", "encode", "total"}
    outputs = result["outputs"]
    assert outputs["instances_url"] == f"/v1/analyses/{result['analysis_id']}/instances"
    assert "RESEARCH USE ONLY" in result["intended_use"]

    fetched = httpx.get(server.url + outputs["instances_url"], timeout=60)
    assert fetched.status_code == 200
    media = MediaType.parse(fetched.headers["content-type"])
    assert media.essence == "multipart/related" and media.params["type"] == "application/dicom"
    datasets = [pydicom.dcmread(pydicom.filebase.DicomBytesIO(part.body))
                for part in parse_multipart(fetched.content, media.params["boundary"])]
    sc = [ds for ds in datasets if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"]
    pm = [ds for ds in datasets if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"]
    sr = [ds for ds in datasets if ds.Modality == "SR"]
    assert len(sc) == len(files) and len(pm) == len(sr) == 1
    assert len(datasets) == len(files) + 2  # the SC series, the Parametric Map, the SR
    assert {ds.SeriesInstanceUID for ds in sc} == {
        outputs["secondary_capture_series_instance_uid"]}
    assert pm[0].SOPInstanceUID == outputs["parametric_map_sop_instance_uid"]
    assert sr[0].SOPInstanceUID == outputs["sr_sop_instance_uid"]
    assert {ds.StudyInstanceUID for ds in datasets} == {result["study_instance_uid"]}

    preview = httpx.get(server.url + outputs["preview_url"])
    assert preview.status_code == 200 and preview.content.startswith(b"\x89PNG")
    assert httpx.get(f"{server.url}/v1/analyses/{result['analysis_id']}").json() == result


def test_form_data_and_async_analysis(server: Server, phantom_series: PhantomFactory) -> None:
    folder = phantom_series(label="cSVD", seed=25)
    files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in _files(folder)]
    response = httpx.post(server.url + "/v1/analyses", files=files,
                          headers={"Prefer": "respond-async"}, timeout=60)
    assert response.status_code == 202
    location = response.headers["location"]
    assert location == f"/v1/analyses/{response.json()['analysis_id']}"
    assert response.json()["status"] in ("queued", "running")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = httpx.get(server.url + location).json()
        if status["status"] not in ("queued", "running"):
            break
        time.sleep(0.2)
    assert status["status"] == "done"
    assert status["series_instance_uid"] == str(
        pydicom.dcmread(_files(folder)[0], stop_before_pixels=True).SeriesInstanceUID)


def test_non_flair_series_is_422_with_its_reason(server: Server, phantom_series: PhantomFactory,
                                                 tmp_path: Path) -> None:
    folder = phantom_series(label="MS", seed=26)
    parts = []
    for path in _files(folder):
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = "t1_mprage_sag"
        ds.ProtocolName = "t1_mprage_sag"
        ds.SequenceName = "tfl3d1"
        ds.ScanningSequence = "GR"
        ds.InversionTime = 900
        out = tmp_path / path.name
        ds.save_as(out)
        parts.append(out.read_bytes())
    response = httpx.post(
        server.url + "/v1/analyses", timeout=60, content=_related(parts, "q", lengths=True),
        headers={"Content-Type": "multipart/related; type=application/dicom; boundary=q"})
    assert response.status_code == 422
    problem = response.json()
    assert problem["code"] == "not_flair"
    record = httpx.get(f"{server.url}/v1/analyses/{problem['analysis_id']}").json()
    assert record["status"] == "rejected" and record["problem"]["code"] == "not_flair"


def test_garbage_upload_is_rejected_not_a_server_error(server: Server) -> None:
    response = httpx.post(
        server.url + "/v1/analyses", timeout=60,
        content=_related([b"\x89PNG\r\n\x1a\n" + b"\0" * 100, b""], "g", lengths=False),
        headers={"Content-Type": "multipart/related; type=application/dicom; boundary=g"})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "no_series"


def test_unknown_analysis_and_model_description(server: Server) -> None:
    missing = httpx.get(server.url + "/v1/analyses/" + "0" * 32)
    assert missing.status_code == 404 and missing.json()["code"] == "analysis_not_found"
    traversal = httpx.get(server.url + "/v1/analyses/..%2F..%2Fetc/preview.png")
    assert traversal.status_code == 404
    model = httpx.get(server.url + "/v1/model").json()
    assert model["classes"] == ["MS", "cSVD"]
    assert model["provider"] in model["providers"]
    assert "research" in model["intended_use"].lower()
    assert model["explanation"]["map"] == server.settings.explanation == "hirescam"
    assert model["calibration"]["temperature"] > 0
    assert {"method", "threshold"} <= set(model["out_of_distribution"])
    scrape = httpx.get(server.url + "/metrics")
    assert scrape.status_code == 200
    assert "flaircad_model_info{" in scrape.text


def test_saturated_queue_answers_503_with_retry_after(
        tmp_path: Path, phantom_series: PhantomFactory) -> None:
    settings = Settings(spool_dir=tmp_path / "spool", max_queue=1, workers=1, retry_after_s=7,
                        auth_disabled=True)
    uv, thread, handle = _start(settings)
    try:
        # four different series: the same one again would be answered from its analysis
        bodies = [_related([p.read_bytes() for p in _files(phantom_series(label="MS",
                                                                          seed=27 + n))],
                           "s", lengths=True) for n in range(4)]
        headers = {"Content-Type": "multipart/related; type=application/dicom; boundary=s",
                   "Prefer": "respond-async"}
        statuses = [httpx.post(handle.url + "/v1/analyses", content=body, headers=headers,
                               timeout=60) for body in bodies]
        codes = [r.status_code for r in statuses]
        assert codes[:2] == [202, 202], codes
        refused = [r for r in statuses if r.status_code == 503]
        assert refused, codes
        assert refused[0].headers["retry-after"] == "7"
        assert refused[0].json()["code"] == "saturated"
        # Everything accepted is analysed.
        for accepted in (r for r in statuses if r.status_code == 202):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                state = httpx.get(handle.url + accepted.headers["location"]).json()["status"]
                if state == "done":
                    break
                time.sleep(0.2)
            assert state == "done"
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
