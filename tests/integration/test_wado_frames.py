"""WADO-RS frames (issue 13, item 3): a frame named twice is sent once, the distinct frames of a
request are capped (``wado_max_frames``), and the multipart response is streamed from the file,
one frame in memory at a time, with the bytes it always had.

Before: ``…/frames/1,1,1,…`` (an 8 KiB URL, 3971 frames) built a 745 MiB response in memory."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from service.core.config import Settings
from tests._pacs import Flaircad, analyse_upload, auth_headers, flaircad_settings, free_port
from tests.conftest import PhantomFactory

SLICES = 12
MAX_FRAMES = 4  # this module's wado_max_frames
FRAMES = 16  # the multi-frame instance put among the results
ROWS = COLUMNS = 512  # RGB: 768 KiB a frame
FRAME_BYTES = ROWS * COLUMNS * 3
PART_TYPE = "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, phantom_series: PhantomFactory
           ) -> Iterator[dict[str, Any]]:
    """A finished analysis, and a 16-frame RGB instance added to its result folder (flaircad
    writes single-frame SC instances; WADO-RS serves any result instance)."""
    settings = flaircad_settings(tmp_path_factory.mktemp("wado-frames-spool"),
                                 wado_max_frames=MAX_FRAMES)
    server = Flaircad(settings, free_port()).start()
    analysis = analyse_upload(server, phantom_series(label="MS", seed=91, slices=SLICES))
    results = Path(settings.spool_dir) / "results" / analysis["analysis_id"]
    first = sorted((results / "sc").glob("*.dcm"))[0]
    single = dcmread(first)

    multi = dcmread(first)
    multi.SeriesInstanceUID, multi.SOPInstanceUID = generate_uid(), generate_uid()
    multi.file_meta.MediaStorageSOPInstanceUID = multi.SOPInstanceUID
    multi.SeriesNumber, multi.InstanceNumber = 9999, 1
    multi.Rows, multi.Columns, multi.NumberOfFrames = ROWS, COLUMNS, FRAMES
    rng = np.random.default_rng(13)
    frames = [rng.integers(0, 256, FRAME_BYTES, dtype=np.uint8).tobytes()
              for _ in range(FRAMES)]
    multi.PixelData = b"".join(frames)
    multi.save_as(results / "sc" / "ZZ-multiframe.dcm", enforce_file_format=True)
    os.utime(results / "sr.dcm")  # the result folder's header cache is keyed on its mtime

    study, sc_series = (analysis["study_instance_uid"],
                        analysis["outputs"]["secondary_capture_series_instance_uid"])
    yield {
        "server": server,
        "single": f"/dicomweb/studies/{study}/series/{sc_series}/instances/"
                  f"{single.SOPInstanceUID}/frames/",
        "single_pixels": bytes(single.PixelData),
        "multi": f"/dicomweb/studies/{study}/series/{multi.SeriesInstanceUID}/instances/"
                 f"{multi.SOPInstanceUID}/frames/",
        "frames": frames,
    }
    server.stop()


def _boundary(response: httpx.Response) -> str:
    content_type = response.headers["content-type"]
    assert content_type.startswith('multipart/related; type="application/octet-stream"; '
                                   "transfer-syntax=1.2.840.10008.1.2.1; boundary=")
    return content_type.rsplit("boundary=", 1)[1]


def _expected(boundary: str, frames: list[bytes]) -> bytes:
    """The response as flaircad has always written it (service.api.wado._multipart)."""
    return b"".join(f"--{boundary}\r\nContent-Type: {PART_TYPE}\r\nContent-Length: "
                    f"{len(frame)}\r\n\r\n".encode() + frame + b"\r\n" for frame in frames
                    ) + f"--{boundary}--\r\n".encode()


def _get(served: dict[str, Any], path: str) -> httpx.Response:
    return httpx.get(served["server"].url + path, headers=auth_headers(), timeout=120)


def _peak(served: dict[str, Any], path: str) -> tuple[int, int]:
    """(bytes received, tracemalloc peak) of one request to the in-process server, the body
    read as it arrives and dropped."""
    received = 0
    tracemalloc.start()
    try:
        with httpx.stream("GET", served["server"].url + path, headers=auth_headers(),
                          timeout=300) as response:
            assert response.status_code == 200, response.read()
            for chunk in response.iter_bytes():
                received += len(chunk)
        return received, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_frame_named_twice_is_sent_once_in_first_order(served: dict[str, Any]) -> None:
    response = _get(served, served["single"] + "1,1,1")
    assert response.status_code == 200, response.text
    assert response.content == _expected(_boundary(response), [served["single_pixels"]])

    frames = served["frames"]
    response = _get(served, served["multi"] + "3,1,3,2,1,3")
    assert response.status_code == 200, response.text
    assert response.content == _expected(_boundary(response), [frames[2], frames[0], frames[1]])


def test_2000_repeats_of_one_frame_are_one_part_in_bounded_memory(served: dict[str, Any]
                                                                  ) -> None:
    repeated = served["single"] + ",".join(["1"] * 2000)
    response = _get(served, repeated)
    assert response.status_code == 200, response.text
    assert response.content == _expected(_boundary(response), [served["single_pixels"]])

    one_size, one_peak = _peak(served, served["single"] + "1")
    many_size, many_peak = _peak(served, repeated)
    assert many_size == one_size  # was 2000 times as large (393 MB)
    assert many_peak < one_peak + 2**20, (one_peak, many_peak)  # was 2000 frames more


def test_more_distinct_frames_than_the_cap_is_a_400_problem(served: dict[str, Any]) -> None:
    response = _get(served, served["multi"] + "1,2,3,4,5")
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == "too_many_frames"
    assert "FLAIRCAD_WADO_MAX_FRAMES" in body["detail"]

    # repeats do not count: four distinct frames named twice each are within the cap
    response = _get(served, served["multi"] + "1,2,3,4,4,3,2,1")
    assert response.status_code == 200, response.text
    assert response.content == _expected(_boundary(response), served["frames"][:MAX_FRAMES])

    # invalid frame numbers answer as before
    for frames, status, code in [("0", 404, "frame_not_found"),
                                 (str(FRAMES + 1), 404, "frame_not_found"),
                                 ("1,0,1", 404, "frame_not_found"),
                                 ("a", 400, "invalid_frames"), ("1.5", 400, "invalid_frames"),
                                 ("1,,2", 400, "invalid_frames")]:
        response = _get(served, served["multi"] + frames)
        assert response.status_code == status, (frames, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == code, frames


def test_all_frames_are_streamed_one_at_a_time_with_unchanged_bytes(served: dict[str, Any]
                                                                    ) -> None:
    frames = served["frames"]
    wanted = [2, 16, 1, 9]  # within the cap, in the order asked
    response = _get(served, served["multi"] + ",".join(map(str, wanted)))
    assert response.status_code == 200, response.text
    assert response.content == _expected(_boundary(response), [frames[n - 1] for n in wanted])
    assert response.headers["content-length"] == str(len(response.content))
    assert "transfer-encoding" not in response.headers

    # the 12 MiB Pixel Data stays in the file: memory holds about one 768 KiB frame
    size, peak = _peak(served, served["multi"] + ",".join(map(str, wanted)))
    assert size == len(response.content)
    assert peak < 4 * FRAME_BYTES, peak  # was the whole Pixel Data and the whole response


def test_the_default_cap_takes_the_largest_accepted_series() -> None:
    fields = Settings.model_fields
    assert fields["wado_max_frames"].default >= fields["max_instances_per_series"].default
