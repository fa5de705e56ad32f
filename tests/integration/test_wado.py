"""WADO-RS (and the QIDO-RS series search) of the results, through dicomweb-client, as a
DICOMweb viewer would load them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.runtime import audit
from tests._pacs import Flaircad, analyse_upload, auth_headers, flaircad_settings, free_port
from tests.conftest import PhantomFactory

SLICES = 12
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory, phantom_series: PhantomFactory
         ) -> Iterator[tuple[Flaircad, dict[str, Any]]]:
    server = Flaircad(flaircad_settings(tmp_path_factory.mktemp("wado-spool")),
                      free_port()).start()
    yield server, analyse_upload(server, phantom_series(label="MS", seed=91, slices=SLICES))
    server.stop()


@pytest.fixture(scope="module")
def client(done: tuple[Flaircad, dict[str, Any]]) -> Any:
    from dicomweb_client.api import DICOMwebClient

    server, _ = done
    return DICOMwebClient(url=f"{server.url}/dicomweb", headers=auth_headers())


def _uids(analysis: dict[str, Any]) -> tuple[str, str, str, str]:
    outputs = analysis["outputs"]
    return (analysis["study_instance_uid"], outputs["secondary_capture_series_instance_uid"],
            outputs["sr_series_instance_uid"], outputs["sr_sop_instance_uid"])


def test_retrieve_series_instance_and_frames(done: tuple[Flaircad, dict[str, Any]],
                                            client: Any) -> None:
    _, analysis = done
    study, sc_series, sr_series, sr_sop = _uids(analysis)
    captures = client.retrieve_series(study, sc_series)
    assert len(captures) == SLICES
    assert [int(ds.InstanceNumber) for ds in captures] == list(range(1, SLICES + 1))
    assert {str(ds.SOPClassUID) for ds in captures} == {SC_STORAGE}
    assert {str(ds.StudyInstanceUID) for ds in captures} == {study}
    assert captures[0].pixel_array.shape[-1] == 3  # RGB overlays, decodable

    report = client.retrieve_instance(study, sr_series, sr_sop)
    assert str(report.SOPClassUID) == COMPREHENSIVE_SR
    assert str(report.SOPInstanceUID) == sr_sop

    first = captures[0]
    (frame,) = client.retrieve_instance_frames(study, sc_series, str(first.SOPInstanceUID),
                                               frame_numbers=[1])
    assert frame == bytes(first.PixelData)

    same = client.retrieve_instance(study, sc_series, str(first.SOPInstanceUID))
    assert same.SOPInstanceUID == first.SOPInstanceUID

    server, _ = done
    reads = [r for r in audit.trail(server.settings).read() if r["event"] == "read"
             and r.get("what", "").startswith("wado_")]
    assert {r["what"] for r in reads} >= {"wado_series", "wado_instance", "wado_frames"}
    assert all(r["analysis_id"] == analysis["analysis_id"] and r["study_instance_uid"] == study
               for r in reads)


def test_metadata_and_series_search(done: tuple[Flaircad, dict[str, Any]], client: Any
                                    ) -> None:
    _, analysis = done
    study, sc_series, sr_series, sr_sop = _uids(analysis)
    metadata = client.retrieve_series_metadata(study, sc_series)
    assert len(metadata) == SLICES
    for item in metadata:
        assert item["0020000E"]["Value"] == [sc_series]
        assert "InlineBinary" not in item["7FE00010"]
        assert item["7FE00010"]["BulkDataURI"].endswith("/frames/1")
    sr_metadata = client.retrieve_instance_metadata(study, sr_series, sr_sop)  # one dict
    assert sr_metadata["00080016"]["Value"] == [COMPREHENSIVE_SR]
    assert "7FE00010" not in sr_metadata

    series = {item["0020000E"]["Value"][0]: item
              for item in client.search_for_series(study_instance_uid=study)}
    pm_series = analysis["outputs"]["parametric_map_series_instance_uid"]
    assert set(series) == {sc_series, pm_series, sr_series}
    assert series[sc_series]["00201209"]["Value"] == [SLICES]
    assert series[pm_series]["00201209"]["Value"] == [1]
    assert series[sr_series]["00080060"]["Value"] == ["SR"]


def test_only_results_are_served_and_errors_are_problems(
        done: tuple[Flaircad, dict[str, Any]]) -> None:
    server, analysis = done
    study, sc_series, _, _ = _uids(analysis)
    base = f"/dicomweb/studies/{study}/series"
    cases = [
        (f"{base}/{analysis['series_instance_uid']}", {}, 404, "series_not_found"),  # source
        (f"{base}/1.2.3.4", {}, 404, "series_not_found"),
        (f"{base}/{sc_series}/instances/1.2.3", {}, 404, "instance_not_found"),
        (f"{base}/not-a-uid", {}, 400, "invalid_uid"),
        (f"{base}/{sc_series}", {"Accept": 'multipart/related; type="application/dicom"; '
                                 "transfer-syntax=1.2.840.10008.1.2.4.50"}, 406,
         "not_acceptable"),
        (f"{base}/{sc_series}", {"Accept": "application/json"}, 406, "not_acceptable"),
    ]
    for path, headers, status, code in cases:
        response = server.get(path, headers=headers)
        assert response.status_code == status, (path, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == code
    assert server.get("/dicomweb/studies/1.2.3/series").json() == []
    ok = server.get(f"{base}/{sc_series}", headers={"Accept": "*/*"})
    assert ok.status_code == 200
    assert ok.headers["content-type"].startswith('multipart/related; type="application/dicom"')


def test_wado_routes_need_authentication(done: tuple[Flaircad, dict[str, Any]]) -> None:
    headers = auth_headers()
    if not headers:
        pytest.skip("this service has no API keys to check")
    server, analysis = done
    study, sc_series, _, _ = _uids(analysis)
    for path in (f"/dicomweb/studies/{study}/series",
                 f"/dicomweb/studies/{study}/series/{sc_series}",
                 f"/dicomweb/studies/{study}/series/{sc_series}/metadata"):
        assert httpx.get(server.url + path, timeout=30).status_code == 401
        assert httpx.get(server.url + path, timeout=30, headers={
            "Authorization": "Bearer wrong-key"}).status_code == 401
        assert httpx.get(server.url + path, timeout=30, headers=headers).status_code == 200
