"""The stability window (issue 13, items 8, 10, 12): a series is analysed once, whole, and only
after every request carrying part of it is over; a failing claim keeps it in the window; open
series are bounded, per sender too, and claimed round-robin over senders."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from service.core.config import Settings
from service.intake.dimse import OUT_OF_RESOURCES, SUCCESS, DimseListener
from service.intake.multipart import Part
from service.intake.stow import store_parts
from service.runtime.arrivals import ArrivalWindow, series_of_part
from service.runtime.scheduler import Scheduler
from service.storage.spool import SeriesKey, Spool
from service.storage.store import AnalysisStore
from tests._dicom import encode
from tests._live import KEY, Live, related, running, settings_for
from tests.conftest import PhantomFactory

BOUNDARY = "arrivals-boundary-5c1e"


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def _key(path: Path) -> SeriesKey:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return SeriesKey(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))


def _one_instance_series(template: Path) -> tuple[bytes, SeriesKey]:
    """An instance of a series of its own (fresh study, series and SOP Instance UIDs)."""
    ds = pydicom.dcmread(template)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return encode(ds), SeriesKey(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))


def _another_instance(template: Path, key: SeriesKey) -> bytes:
    ds = pydicom.dcmread(template)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = key.study_instance_uid, key.series_instance_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return encode(ds)


def _slowly(parts: list[bytes], pause_s: float) -> Iterator[bytes]:
    """A multipart body a part at a time, ``pause_s`` after each; each chunk ends just past its
    part's closing delimiter, so the server sees each part complete when its chunk arrives."""
    body, _ = related(parts, BOUNDARY)
    delimiter = f"\r\n--{BOUNDARY}".encode()
    start = 0
    for _ in parts:
        end = body.index(delimiter, body.index(b"\r\n\r\n", start) + 4)
        end += len(delimiter) + 2  # "\r\n" before the next part, or "--" at the end
        yield body[start:end]
        time.sleep(pause_s)
        start = end
    yield body[start:]


# -- item 10: a series still being received is not complete ---------------------------------
def test_a_series_is_not_analysed_while_a_request_for_it_still_streams(
        tmp_path: Path, phantom_series: PhantomFactory) -> None:
    """8 instances in one request, 16 more streamed over ~3 s in a second one, the window
    0.5 s: one analysis, of all 24 slices (before: one of 8 slices, then one of 24)."""
    files = _files(phantom_series(label="MS", seed=101))
    assert len(files) == 24
    key = _key(files[0])
    with running(settings_for(tmp_path / "spool", stability_window_s=0.5)) as live:
        body, headers = related([p.read_bytes() for p in files[:8]], BOUNDARY)
        assert live.post("/dicomweb/studies", content=body, headers=headers).status_code == 200
        held: list[bool] = []

        def streamed() -> Iterator[bytes]:
            for chunk in _slowly([p.read_bytes() for p in files[8:]], pause_s=0.2):
                held.append(live.runtime.scheduler.arrivals.held(key))
                yield chunk

        second = live.post("/dicomweb/studies", content=streamed(), headers=headers)
        assert second.status_code == 200, second.text
        assert any(held), "the series was never held while the request streamed"
        assert not live.runtime.scheduler.arrivals.held(key)  # released with the request
        live.wait_for_study(key.study_instance_uid)
        time.sleep(live.settings.stability_window_s + 1.5)  # a second analysis would show
        (analysis,) = live.wait_for_study(key.study_instance_uid)
        assert analysis["status"] == "done", analysis
        assert len(analysis["slice_weights"]) == 24


def test_a_large_part_holds_its_series_from_its_head_on(
        tmp_path: Path, phantom_series: PhantomFactory) -> None:
    """The first part of a request stalls for 3 windows after its first 80 KiB: its series
    (8 instances stored earlier) is held from the part's head on, not only once the part is
    complete, so only the whole series is analysed (before: one of 8 slices in the stall)."""
    files = _files(phantom_series(label="MS", seed=104))
    key = _key(files[0])
    assert files[8].stat().st_size > 100 * 1024  # the head arrives before the stall
    with running(settings_for(tmp_path / "spool", stability_window_s=0.5)) as live:
        body, headers = related([p.read_bytes() for p in files[:8]], BOUNDARY)
        assert live.post("/dicomweb/studies", content=body, headers=headers).status_code == 200
        rest, _ = related([p.read_bytes() for p in files[8:]], BOUNDARY)
        held_in_stall: list[bool] = []

        def stalling() -> Iterator[bytes]:
            yield rest[:80 * 1024]
            time.sleep(1.5)
            held_in_stall.append(live.runtime.scheduler.arrivals.held(key))
            yield rest[80 * 1024:]

        second = live.post("/dicomweb/studies", content=stalling(), headers=headers)
        assert second.status_code == 200, second.text
        assert held_in_stall == [True]
        time.sleep(live.settings.stability_window_s + 1.5)  # a second analysis would show
        (analysis,) = live.wait_for_study(key.study_instance_uid)
        assert analysis["status"] == "done", analysis
        assert len(analysis["slice_weights"]) == 24


def test_a_failed_request_releases_its_series(
        tmp_path: Path, phantom_series: PhantomFactory) -> None:
    """A body cut off after a complete part: 400, and the part's series is not held."""
    files = _files(phantom_series(label="MS", seed=102))
    key = _key(files[0])
    with running(settings_for(tmp_path / "spool", stability_window_s=0.5)) as live:
        body, headers = related([files[0].read_bytes(), files[1].read_bytes()], BOUNDARY)
        cut = body[:body.rfind(f"--{BOUNDARY}".encode()) - 7]  # inside the second part

        def truncated() -> Iterator[bytes]:
            yield cut[:len(cut) // 2]
            time.sleep(0.1)
            yield cut[len(cut) // 2:]

        refused = live.post("/dicomweb/studies", content=truncated(), headers=headers)
        assert refused.status_code == 400, refused.text
        assert not live.runtime.scheduler.arrivals.held(key)


def test_the_series_of_a_part_is_read_from_its_head(
        tmp_path: Path, phantom_series: PhantomFactory) -> None:
    files = _files(phantom_series(label="MS", seed=103))
    key = _key(files[0])
    assert series_of_part(files[0]) == key
    assert series_of_part(files[0], key.study_instance_uid) == key
    assert series_of_part(files[0], "1.2.3") is None  # not the study of the URL
    implicit = tmp_path / "implicit.dcm"
    ds = pydicom.dcmread(files[0])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(implicit, enforce_file_format=True, implicit_vr=True)
    assert series_of_part(implicit) == key
    cut_off = files[0].read_bytes()[:400]
    for junk in (b"", b"x" * 300, cut_off, b"\0" * 128 + b"DICM" + b"\xff" * 64):
        (tmp_path / "junk").write_bytes(junk)
        assert series_of_part(tmp_path / "junk") is None


# -- item 8: a claim that fails leaves the series in the window -----------------------------
class _Engine:
    provider = "CPUExecutionProvider"


def test_a_failed_claim_keeps_the_series_and_retries_with_backoff(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(spool_dir=tmp_path, stability_window_s=0.2)
    spool, store = Spool(tmp_path), AnalysisStore(tmp_path / "flaircad.sqlite")
    key = SeriesKey("1.2.826.0.1.77.1", "1.2.826.0.1.77.1.2")
    folder = spool.instance_path(key, "1.2.826.0.1.77.1.2.3").parent
    folder.mkdir(parents=True)
    (folder / "1.2.826.0.1.77.1.2.3.dcm").write_bytes(b"x")
    os.utime(folder, (time.time() - 60, time.time() - 60))
    claims: list[float] = []
    claim = store.claim_series

    def full_once(*args: Any, **kwargs: Any) -> Any:
        claims.append(time.monotonic())
        if len(claims) == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder))
        return claim(*args, **kwargs)

    store.claim_series = full_once  # type: ignore[method-assign]

    async def run() -> int:
        scheduler = Scheduler(settings, _Engine(), spool, store,  # type: ignore[arg-type]
                              analyse=lambda *a, **k: (_ for _ in ()).throw(RuntimeError()))
        await scheduler.start()
        deadline = time.monotonic() + 10
        while not store.recent():
            assert time.monotonic() < deadline, "the series was never claimed again"
            await asyncio.sleep(0.05)
        left = scheduler.arriving
        await asyncio.sleep(0.5)
        await scheduler.stop(grace_s=5)
        return left

    with caplog.at_level(logging.WARNING, logger="service.runtime.scheduler"):
        assert asyncio.run(run()) == 0  # claimed: out of the window
    assert len(claims) == 2, claims
    assert claims[1] - claims[0] >= 0.9  # backed off, did not spin
    assert len(store.recent()) == 1
    failures = [r for r in caplog.records if "stays in the stability window" in r.getMessage()]
    assert failures and failures[0].__dict__["errno"] == errno.ENOSPC
    for record in caplog.records:  # the folder path holds the UIDs: it stays out
        text = record.getMessage() + repr(record.__dict__)
        assert key.series_instance_uid not in text and key.study_instance_uid not in text
    store.close()


def test_the_claim_backoff_doubles_up_to_its_cap() -> None:
    window = ArrivalWindow(8, 8, backoff_s=1.0, backoff_max_s=5.0, clock=lambda: 100.0)
    key = SeriesKey("1.2.3", "1.2.3.4")
    window.note(key, at=0.0)
    assert [window.claim_failed(key) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert window.stable(1.0) == []  # backing off
    window.claimed(key)
    assert len(window) == 0


# -- item 12: open series bounded, per sender too; fair claim order ------------------------
KEY_B = "second-sender-key-0a9b8c7d"


def _post(live: Live, key: str, data: bytes) -> httpx.Response:
    body, headers = related([data], BOUNDARY)
    return httpx.post(live.url + "/dicomweb/studies", content=body, timeout=60,
                      headers={**headers, "Authorization": f"Bearer {key}"})


def test_open_series_are_bounded_per_sender_and_in_all(
        tmp_path: Path, phantom_series: PhantomFactory) -> None:
    template = _files(phantom_series(label="MS", seed=104))[0]
    settings = settings_for(tmp_path / "spool", stability_window_s=60,
                            api_keys=f"a:{KEY}\nb:{KEY_B}", max_open_series=3,
                            max_open_series_per_sender=2, retry_after_s=7)
    with running(settings) as live:
        (a1, k1), (a2, _), (a3, k3) = (_one_instance_series(template) for _ in range(3))
        assert _post(live, KEY, a1).status_code == 200
        assert _post(live, KEY, a2).status_code == 200
        refused = _post(live, KEY, a3)  # a third series of sender a
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "too_many_open_series"
        assert refused.headers["retry-after"] == "7"
        assert live.runtime.spool.series_files(k3) == []  # nothing of it was stored
        # more instances of an open series are always taken
        assert _post(live, KEY, _another_instance(template, k1)).status_code == 200
        assert len(live.runtime.spool.series_files(k1)) == 2
        (b1, _), (b2, _) = (_one_instance_series(template) for _ in range(2))
        assert _post(live, KEY_B, b1).status_code == 200  # another sender still has room
        full = _post(live, KEY_B, b2)  # 3 open in all
        assert full.status_code == 503 and full.json()["code"] == "too_many_open_series"
        assert live.runtime.scheduler.arriving == 3


def test_a_c_store_past_the_bound_gets_out_of_resources(
        tmp_path: Path, phantom_series: PhantomFactory) -> None:
    from pynetdicom import AE

    template = _files(phantom_series(label="MS", seed=105))[0]
    window = ArrivalWindow(max_open=8, max_open_per_sender=1)
    spool = Spool(tmp_path)
    listener = DimseListener(spool, ae_title="FLAIRCAD", host="127.0.0.1", port=0,
                             allowed_calling_aes=[], arrived=window.note,
                             check_capacity=lambda: None, admit=window.open)
    listener.start()
    try:
        host, port = listener.address

        def store(calling_ae: str, data: bytes) -> int:
            ae = AE(ae_title=calling_ae)
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4",
                                     ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
            assoc = ae.associate(host, port, ae_title="FLAIRCAD")
            assert assoc.is_established
            try:
                status = assoc.send_c_store(pydicom.dcmread(io.BytesIO(data)))
                return int(status.Status)
            finally:
                assoc.release()

        (first, key), (second, _), (third, _) = (_one_instance_series(template)
                                                for _ in range(3))
        assert store("SCANNER", first) == SUCCESS
        assert store("SCANNER", second) == OUT_OF_RESOURCES  # its one open series
        assert store("SCANNER", _another_instance(template, key)) == SUCCESS
        assert store("OTHER", third) == SUCCESS  # another calling AE
        assert len(window) == 2
    finally:
        listener.stop()


def test_store_parts_refuses_what_admit_refuses(
        tmp_path: Path, phantom_series: PhantomFactory) -> None:
    template = _files(phantom_series(label="MS", seed=106))[0]
    data, key = _one_instance_series(template)
    part = Part({"content-type": "application/dicom"}, data)
    result = store_parts([part], Spool(tmp_path), None, admit=lambda _: False)
    assert [(reason, why) for *_, reason, why in result.failed] == [
        (OUT_OF_RESOURCES, "too_many_open_series")]
    assert Spool(tmp_path).series_files(key) == []


def test_stable_series_are_offered_round_robin_over_senders() -> None:
    now = [1000.0]
    window = ArrivalWindow(64, 64, clock=lambda: now[0])
    flood = [SeriesKey("1.2.9", f"1.2.9.{n}") for n in range(1, 6)]
    for n, key in enumerate(flood):
        now[0] = 1000.0 + n
        assert window.open(key, "key:flood")
    now[0] = 1010.0
    normal = SeriesKey("1.2.8", "1.2.8.1")
    assert window.open(normal, "key:normal")  # sent after all of the flood
    now[0] = 1020.0
    order = window.stable(5.0)
    assert order[:2] == [flood[0], normal]  # not behind the whole flood
    window.claimed(order[0])  # one slot in the queue: the flood's oldest
    assert window.stable(5.0)[0] == normal  # the next one goes to the other sender
    # held series (a request in flight) are never offered
    window.hold(normal)
    assert normal not in window.stable(5.0)
    window.release(normal)
    assert normal not in window.stable(5.0)  # its window runs from the release
    now[0] = 1030.0
    assert window.stable(5.0)[0] == normal
