"""A real PACS round trip: Orthanc (Debian's orthanc + orthanc-dicomweb) and dcmtk.

One flaircad server (in a thread) with its DIMSE listener, and two throw-away Orthancs:

* ``orthanc_push`` — no routing: test 1 pushes a series with the DICOMweb plugin, test 4
  sends one with C-STORE (``/modalities/flaircad/store``);
* ``orthanc_pacs`` — autoroutes every new MR series to flaircad (Lua ``OnStableSeries``) and
  is flaircad's result destination, twice (STOW-RS with basic auth and C-STORE): tests 2 and 3,
  the full loop, and the rule that keeps the results from being routed back.

Test 5 runs ``flaircad dimse`` on its own and sends a JPEG-LS folder with dcmtk's
``storescu +sd``. Phantoms are small (12 slices) and windows short, to stay quick.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from service.core.destinations import Destination
from service.storage.store import AnalysisStore
from tests._pacs import (
    ORTHANC_PASSWORD,
    ORTHANC_USER,
    Flaircad,
    Orthanc,
    auth_headers,
    dcmtk,
    flaircad_settings,
    free_port,
    orthanc_binary,
    wait_until,
)
from tests.conftest import PhantomFactory

SLICES = 12


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def _study(folder: Path) -> str:
    return str(pydicom.dcmread(_files(folder)[0], stop_before_pixels=True).StudyInstanceUID)


def _series(folder: Path) -> str:
    return str(pydicom.dcmread(_files(folder)[0], stop_before_pixels=True).SeriesInstanceUID)


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    orthanc_binary()  # skip (or fail under strict mode) before starting anything
    return {name: free_port() for name in ("flaircad_http", "flaircad_dimse", "pacs_http",
                                           "pacs_dicom")}


@pytest.fixture(scope="module")
def flaircad(ports: dict[str, int], tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Flaircad]:
    pacs = f"127.0.0.1:{ports['pacs_http']}"
    destinations = [
        Destination(name="orthanc-stow", kind="stow", url=f"http://{pacs}/dicom-web",
                    username=ORTHANC_USER, password=ORTHANC_PASSWORD, timeout_s=30),
        Destination(name="orthanc-cstore", kind="cstore", ae_title="ORTHANC",
                    host="127.0.0.1", port=ports["pacs_dicom"], timeout_s=30),
    ]
    settings = flaircad_settings(
        tmp_path_factory.mktemp("pacs-spool"), destinations=destinations,
        dimse_port=ports["flaircad_dimse"], dimse_allowed_calling_aes=["ORTHANC", "STORESCU"])
    server = Flaircad(settings, ports["flaircad_http"]).start()
    yield server
    server.stop()


def _orthanc(folder: Path, flaircad: Flaircad, autoroute: bool,
             ports: dict[str, int] | None = None) -> Orthanc:
    extra: dict[str, Any] = {}
    if ports is not None:
        extra = {"http_port": ports["pacs_http"], "dicom_port": ports["pacs_dicom"]}
    return Orthanc(folder, flaircad.url, flaircad.settings.dimse_port or 0, autoroute=autoroute,
                   flaircad_headers=auth_headers(), **extra).start()


@pytest.fixture(scope="module")
def orthanc_push(flaircad: Flaircad, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Orthanc]:
    orthanc = _orthanc(tmp_path_factory.mktemp("orthanc-push"), flaircad, autoroute=False)
    yield orthanc
    orthanc.stop()


@pytest.fixture(scope="module")
def orthanc_pacs(flaircad: Flaircad, ports: dict[str, int],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    orthanc = _orthanc(tmp_path_factory.mktemp("orthanc-pacs"), flaircad, autoroute=True,
                       ports=ports)
    yield orthanc
    orthanc.stop()


def _done(analyses: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(analyses) == 1, analyses
    (analysis,) = analyses
    assert analysis["status"] == "done", analysis
    assert set(analysis["probabilities"]) == {"MS", "cSVD"}
    return analysis


# -- test 1 -------------------------------------------------------------------------------------
def test_1_orthanc_dicomweb_push_is_accepted_and_analysed(
        orthanc_push: Orthanc, flaircad: Flaircad, phantom_series: PhantomFactory) -> None:
    folder = phantom_series(label="MS", seed=71, slices=SLICES)
    series_id = orthanc_push.upload(_files(folder))
    response = orthanc_push.post("/dicom-web/servers/flaircad/stow",
                                 json={"Resources": [series_id], "Synchronous": False})
    assert response.status_code == 200, response.text
    job = orthanc_push.wait_job(response.json()["ID"])
    assert job["State"] == "Success", (job, orthanc_push.log()[-3000:])
    analysis = _done(flaircad.wait_for_study(_study(folder)))
    assert analysis["series_instance_uid"] == _series(folder)
    assert len(analysis["slice_weights"]) == SLICES


# -- tests 2 and 3 ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def autorouted(orthanc_pacs: Orthanc, flaircad: Flaircad, phantom_series: PhantomFactory
               ) -> tuple[Path, dict[str, Any]]:
    """A series stored into the autorouting Orthanc, and flaircad's analysis of it."""
    folder = phantom_series(label="cSVD", seed=72, slices=SLICES)
    orthanc_pacs.upload(_files(folder))  # nothing else: Orthanc's Lua script routes it
    analysis = _done(flaircad.wait_for_study(_study(folder)))
    return folder, analysis


def test_2_orthanc_autoroutes_new_series(autorouted: tuple[Path, dict[str, Any]],
                                         orthanc_pacs: Orthanc) -> None:
    folder, analysis = autorouted
    assert analysis["series_instance_uid"] == _series(folder)
    assert "flaircad autoroute: sending series" in orthanc_pacs.log()


def test_3_results_back_in_orthanc_without_loop(
        autorouted: tuple[Path, dict[str, Any]], orthanc_pacs: Orthanc,
        flaircad: Flaircad) -> None:
    folder, analysis = autorouted
    study = _study(folder)
    outputs = analysis["outputs"]
    sc_series, pm_series, sr_series = (outputs["secondary_capture_series_instance_uid"],
                                       outputs["parametric_map_series_instance_uid"],
                                       outputs["sr_series_instance_uid"])

    # flaircad sends SC + PM + SR to both destinations and says so
    def delivered() -> list[dict[str, Any]] | None:
        deliveries = flaircad.analysis(analysis["analysis_id"]).get("deliveries") or []
        states = {d["destination"]: d["state"] for d in deliveries}
        return deliveries if states == {"orthanc-stow": "sent",
                                        "orthanc-cstore": "sent"} else None

    deliveries = wait_until(delivered, 60, "both deliveries sent")
    assert all(d["instances"] == SLICES + 2 and d["last_error"] is None for d in deliveries)

    # Orthanc's study now holds the source, the SC series, the Parametric Map and the SR
    series = orthanc_pacs.study_series(study)
    assert set(series) == {_series(folder), sc_series, pm_series, sr_series}
    assert len(series[sc_series]["Instances"]) == SLICES
    assert len(series[pm_series]["Instances"]) == len(series[sr_series]["Instances"]) == 1
    assert series[sc_series]["MainDicomTags"].get("Manufacturer") == "flaircad"
    assert series[pm_series]["MainDicomTags"].get("Manufacturer") == "flaircad"

    # No loop: the results became stable in Orthanc (StableAge 1 s), its script skipped them,
    # and flaircad never received them: one analysis, one series in its spool for the study.
    wait_until(lambda: orthanc_pacs.log().count("flaircad autoroute: skipping series") >= 3,
               30, "Orthanc's script to see the result series become stable")
    time.sleep(flaircad.settings.stability_window_s + 1.5)
    assert len(flaircad.analyses(study)) == 1
    incoming = flaircad.settings.spool_dir / "incoming" / study
    assert sorted(p.name for p in incoming.iterdir()) == [_series(folder)]


# -- test 4 -------------------------------------------------------------------------------------
def test_4_orthanc_c_store_to_the_dimse_listener(
        orthanc_push: Orthanc, flaircad: Flaircad, phantom_series: PhantomFactory) -> None:
    echo = orthanc_push.post("/modalities/flaircad/echo", json={})
    assert echo.status_code == 200, echo.text
    folder = phantom_series(label="MS", seed=74, slices=SLICES)
    series_id = orthanc_push.upload(_files(folder))
    response = orthanc_push.post("/modalities/flaircad/store",
                                 json={"Resources": [series_id], "Synchronous": True})
    assert response.status_code == 200, (response.text, orthanc_push.log()[-3000:])
    body = response.json()
    assert body.get("FailedInstancesCount", 0) == 0, body
    assert body.get("InstancesCount") == SLICES, body
    analysis = _done(flaircad.wait_for_study(_study(folder)))
    assert analysis["series_instance_uid"] == _series(folder)


def test_4b_listener_refuses_unknown_calling_ae_and_wrong_called_ae(
        flaircad: Flaircad, phantom_series: PhantomFactory) -> None:
    port = str(flaircad.settings.dimse_port)
    echoscu = dcmtk("echoscu")
    ok = subprocess.run([echoscu, "-aet", "STORESCU", "-aec", "FLAIRCAD", "127.0.0.1", port],
                        capture_output=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    for calling, called in (("INTRUDER", "FLAIRCAD"), ("STORESCU", "SOMEONE")):
        refused = subprocess.run([echoscu, "-aet", calling, "-aec", called, "127.0.0.1", port],
                                 capture_output=True, timeout=60)
        assert refused.returncode != 0
        assert b"reject" in (refused.stderr + refused.stdout).lower()


# -- test 5 -------------------------------------------------------------------------------------
@pytest.fixture
def dimse_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    port = free_port()
    spool = tmp_path / "spool"
    env = {key: value for key, value in __import__("os").environ.items()
           if not key.startswith("FLAIRCAD_")}
    env.update({"FLAIRCAD_SPOOL_DIR": str(spool), "FLAIRCAD_STABILITY_WINDOW_S": "1"})
    flaircad = Path(sys.executable).with_name("flaircad")
    log = tmp_path / "dimse.log"
    echoscu = dcmtk("echoscu")  # may skip: before the process starts, so none is left behind
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(flaircad), "dimse", "--port", str(port), "--allow-calling-ae", "STORESCU"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)

    def answers() -> bool:
        assert process.poll() is None, log.read_text()
        return subprocess.run([echoscu, "-aet", "STORESCU", "-aec", "FLAIRCAD", "127.0.0.1",
                               str(port)], capture_output=True, timeout=30).returncode == 0

    try:
        wait_until(answers, 120, "flaircad dimse to answer C-ECHO", period=0.5)
        yield process, port, spool
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def test_5_storescu_sends_a_folder_to_flaircad_dimse(
        dimse_process: tuple[subprocess.Popen[bytes], int, Path],
        phantom_series: PhantomFactory) -> None:
    process, port, spool = dimse_process
    storescu = dcmtk("storescu")
    folder = phantom_series(label="cSVD", seed=75, slices=SLICES, compress="jpegls")
    # +sd: the whole folder; -xt: propose JPEG-LS lossless (storescu proposes uncompressed
    # transfer syntaxes only, by default)
    sent = subprocess.run([storescu, "+sd", "-xt", "-aet", "STORESCU", "-aec", "FLAIRCAD",
                           "127.0.0.1", str(port), str(folder)], capture_output=True,
                          timeout=120)
    assert sent.returncode == 0, sent.stderr.decode(errors="replace")
    stored = list((spool / "incoming" / _study(folder) / _series(folder)).glob("*.dcm"))
    assert len(stored) == SLICES
    assert all(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID
               == "1.2.840.10008.1.2.4.80" for p in stored)  # kept as sent: JPEG-LS

    store = AnalysisStore(spool / "flaircad.sqlite")
    try:
        def finished() -> list[Any] | None:
            records = store.by_study(_study(folder))
            return records if records and records[0].status in ("done", "rejected",
                                                                "failed") else None

        (record,) = wait_until(finished, 90, "the analysis by flaircad dimse")
        assert record.status == "done", record.problem
        assert record.series_instance_uid == _series(folder)
        assert record.result is not None and len(record.result["slice_weights"]) == SLICES
    finally:
        store.close()
    assert process.poll() is None
