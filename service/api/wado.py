"""WADO-RS (PS3.18 §10.4) and a QIDO-RS series search for the results, so that a DICOMweb
viewer (OHIF with flaircad as a data source, say) loads the overlay SC series and the SR
straight from flaircad.

Only results are served: the SC series and SR of finished analyses of the study, as stored in
the spool (``results/<analysis id>/``), never the received source images. Instances are sent
in their stored transfer syntax (Explicit VR Little Endian); a request for another one gets
406. Routes:

* ``GET /dicomweb/studies/{study}/series`` — the result series of the study (DICOM JSON);
* ``GET …/series/{series}``, ``…/instances/{sop}`` — ``multipart/related;
  type="application/dicom"``;
* ``GET …/series/{series}/metadata``, ``…/instances/{sop}/metadata`` — DICOM JSON, Pixel Data
  as a BulkDataURI to the frames;
* ``GET …/instances/{sop}/frames/{frames}`` — ``multipart/related;
  type="application/octet-stream"``, the native pixels of each frame. A frame asked for more
  than once is sent once, where it is first named (``1,1,1`` is ``1``; ``3,1,3`` is ``3,1``);
  more than ``wado_max_frames`` distinct frames is 400 ``too_many_frames``. The parts are
  streamed straight from the file, one frame in memory at a time.

The bodies are :class:`service.intake.multipart.MultipartWriter`'s (the frames its
:meth:`~service.intake.multipart.MultipartWriter.stream`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydicom import dcmread
from pydicom.dataelem import RawDataElement

from service.api.deps import Runtime, RuntimeDep, runtime
from service.api.problems import PROBLEM_JSON, Problem
from service.api.security import READ_SCOPE
from service.api.trail import audit
from service.core.codes import Code
from service.intake.multipart import LazyPart, MediaType, MultipartWriter
from service.storage.results import ResultFolder
from service.storage.spool import safe_uid
from service.storage.store import Status

# results, and UIDs of examinations: the read scope
router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"], dependencies=[READ_SCOPE])

DICOM_JSON = "application/dicom+json"
_NATIVE = {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2"}
_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
                "Modality", "SeriesDescription", "SeriesNumber", "InstanceNumber"]


@dataclass(frozen=True)
class _Instance:
    path: Path
    analysis_id: str
    study: str
    series: str
    sop_instance: str
    sop_class: str
    transfer_syntax: str
    modality: str
    series_description: str
    series_number: int | None
    instance_number: int | None


@functools.lru_cache(maxsize=256)
def _folder_instances(folder: str, analysis_id: str, mtime_ns: int) -> tuple[_Instance, ...]:
    """Headers of one result folder (cached: results do not change once written)."""
    found = []
    for path in ResultFolder(Path(folder)).dicom_files():
        header = dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        number = header.get("SeriesNumber")
        instance_number = header.get("InstanceNumber")
        found.append(_Instance(
            path, analysis_id, str(header.StudyInstanceUID), str(header.SeriesInstanceUID),
            str(header.SOPInstanceUID), str(header.SOPClassUID),
            str(header.file_meta.TransferSyntaxUID), str(header.get("Modality", "")),
            str(header.get("SeriesDescription", "")),
            int(number) if number not in (None, "") else None,
            int(instance_number) if instance_number not in (None, "") else None))
    return tuple(found)


def _audit_read(request: Request, rt: Runtime, what: str, instances: list[_Instance]
                ) -> None:
    """Who read which result (the audit trail, as for ``/v1/analyses/{id}/instances``)."""
    first = instances[0]
    audit(request, rt, "read", what=what, analysis_id=first.analysis_id,
          study_instance_uid=first.study, series_instance_uid=first.series,
          sop_instance_uids=[i.sop_instance for i in instances] if len(instances) == 1
          else None, instances=len(instances))


def _study_instances(rt: Runtime, study: str) -> list[_Instance]:
    instances: list[_Instance] = []
    for record in rt.store.by_study(study):
        if record.status is not Status.DONE:
            continue
        folder = rt.spool.result(record.id)
        try:
            mtime_ns = folder.sr.stat().st_mtime_ns
        except OSError:  # results removed (retention) or never written
            continue
        instances += [i for i in _folder_instances(str(folder.path), record.id, mtime_ns)
                      if i.study == study]
    return instances


def _uid(value: str, what: str) -> str:
    try:
        return safe_uid(value)
    except ValueError:
        raise Problem(400, Code.INVALID_UID, f"{what} is not a valid DICOM UID") from None


def _series(rt: Runtime, study: str, series: str) -> list[_Instance]:
    study, series = _uid(study, "the study"), _uid(series, "the series")
    found = [i for i in _study_instances(rt, study) if i.series == series]
    if not found:
        raise Problem(404, Code.SERIES_NOT_FOUND, "no flaircad result series with this UID in "
                      "this study")
    return sorted(found, key=lambda i: (i.instance_number or 0, i.sop_instance))


def _instance(rt: Runtime, study: str, series: str, sop: str) -> _Instance:
    sop = _uid(sop, "the SOP instance")
    for instance in _series(rt, study, series):
        if instance.sop_instance == sop:
            return instance
    raise Problem(404, Code.INSTANCE_NOT_FOUND, "no such instance in this result series")


def _accepted_ranges(request: Request) -> list[MediaType]:
    header = request.headers.get("accept", "")
    return [MediaType.parse(item) for item in header.split(",") if item.strip()]


def _negotiate(request: Request, part_type: str, transfer_syntaxes: Iterable[str]) -> None:
    """406 unless the Accept header takes ``multipart/related; type=part_type`` in these
    transfer syntaxes (we do not transcode)."""
    ranges = _accepted_ranges(request)
    if not ranges:
        return
    have = set(transfer_syntaxes)
    for media in ranges:
        if media.essence in ("*/*", "multipart/*"):
            return
        if media.essence != "multipart/related":
            continue
        wanted_type = media.params.get("type", part_type).lower()
        if wanted_type not in (part_type, "*/*", part_type.split("/")[0] + "/*"):
            continue
        syntax = media.params.get("transfer-syntax", "*")
        if syntax == "*" or have <= {syntax} or (
                part_type == "application/octet-stream" and syntax == "1.2.840.10008.1.2.1"):
            return
    raise Problem(406, Code.NOT_ACCEPTABLE, 'results are served as multipart/related; type='
                  f'"{part_type}" in their stored transfer syntax ({", ".join(sorted(have))})',
                  title="Not acceptable")


def _dicom_parts(request: Request, instances: list[_Instance]) -> Response:
    syntaxes = {i.transfer_syntax for i in instances}
    _negotiate(request, "application/dicom", syntaxes)
    writer = MultipartWriter("application/dicom")
    body = writer.body(
        ({"Content-Type": f"application/dicom; transfer-syntax={i.transfer_syntax}"},
         i.path.read_bytes()) for i in instances)
    return Response(body, media_type=writer.content_type)


def _base(request: Request) -> str:
    """The DICOMweb root for the URLs in responses: FLAIRCAD_PUBLIC_BASE_URL when set, else a
    path-absolute reference (PS3.5 allows relative URIs in UR; OHIF resolves one starting
    with / against its wadoRoot). Never the request's Host or X-Forwarded-* headers: a client
    sets those, and a cache or viewer would follow links to the host it named."""
    public: str | None = runtime(request).settings.public_base_url
    # root_path is uvicorn's own setting (--root-path), not a request header
    prefix = public if public else str(request.scope.get("root_path", "")).rstrip("/")
    return prefix + "/dicomweb"


def _metadata(request: Request, instance: _Instance) -> dict[str, Any]:
    dataset = dcmread(instance.path)
    has_pixels = "PixelData" in dataset
    if has_pixels:
        del dataset.PixelData
    body: dict[str, Any] = dataset.to_json_dict(bulk_data_threshold=2**31)
    if has_pixels:
        body["7FE00010"] = {"vr": "OW" if int(dataset.get("BitsAllocated", 8)) > 8 else "OB",
                            "BulkDataURI": f"{_base(request)}/studies/{instance.study}/series/"
                            f"{instance.series}/instances/{instance.sop_instance}/frames/1"}
    # the transfer syntax the bytes are in (file meta is not part of the data set)
    body["00083002"] = {"vr": "UI", "Value": [instance.transfer_syntax]}
    return body


def _dicom_json(content: Any) -> JSONResponse:
    return JSONResponse(content, media_type=DICOM_JSON)


_RESPONSES = dict[int | str, dict[str, Any]]  # FastAPI's type of a route's ``responses``
_MULTIPART_DICOM: _RESPONSES = {
    200: {"content": {'multipart/related; type="application/dicom"': {}}},
    404: {"description": "no such result", "content": {PROBLEM_JSON: {}}},
    406: {"description": "unsupported Accept", "content": {PROBLEM_JSON: {}}}}
_JSON: _RESPONSES = {
    200: {"content": {DICOM_JSON: {"schema": {"type": "array", "items": {"type": "object"}}}}},
    404: {"description": "no such result", "content": {PROBLEM_JSON: {}}}}


@router.get("/studies/{study}/series", response_class=Response, responses=_JSON,
            summary="Search the result series of a study (QIDO-RS)")
def search_series(study: str, request: Request,
                  rt: RuntimeDep) -> Response:
    study = _uid(study, "the study")
    by_series: dict[str, list[_Instance]] = {}
    for instance in _study_instances(rt, study):
        by_series.setdefault(instance.series, []).append(instance)
    found = []
    for series, instances in by_series.items():
        first = instances[0]
        item: dict[str, Any] = {
            "0020000D": {"vr": "UI", "Value": [study]},
            "0020000E": {"vr": "UI", "Value": [series]},
            "00080060": {"vr": "CS", "Value": [first.modality]},
            "00201209": {"vr": "IS", "Value": [len(instances)]},
            "00081190": {"vr": "UR", "Value": [f"{_base(request)}/studies/{study}/series/"
                                               f"{series}"]},
        }
        if first.series_description:
            item["0008103E"] = {"vr": "LO", "Value": [first.series_description]}
        if first.series_number is not None:
            item["00200011"] = {"vr": "IS", "Value": [first.series_number]}
        found.append(item)
    return _dicom_json(found)


@router.get("/studies/{study}/series/{series}", response_class=Response,
            responses=_MULTIPART_DICOM, summary="Retrieve a result series (WADO-RS)")
def retrieve_series(study: str, series: str, request: Request,
                    rt: RuntimeDep) -> Response:
    instances = _series(rt, study, series)
    response = _dicom_parts(request, instances)
    _audit_read(request, rt, "wado_series", instances)
    return response


@router.get("/studies/{study}/series/{series}/metadata", response_class=Response,
            responses=_JSON, summary="Metadata of a result series (WADO-RS)")
def retrieve_series_metadata(study: str, series: str, request: Request,
                             rt: RuntimeDep) -> Response:
    instances = _series(rt, study, series)
    response = _dicom_json([_metadata(request, i) for i in instances])
    _audit_read(request, rt, "wado_series_metadata", instances)
    return response


@router.get("/studies/{study}/series/{series}/instances/{sop}", response_class=Response,
            responses=_MULTIPART_DICOM, summary="Retrieve a result instance (WADO-RS)")
def retrieve_instance(study: str, series: str, sop: str, request: Request,
                      rt: RuntimeDep) -> Response:
    instance = _instance(rt, study, series, sop)
    response = _dicom_parts(request, [instance])
    _audit_read(request, rt, "wado_instance", [instance])
    return response


@router.get("/studies/{study}/series/{series}/instances/{sop}/metadata",
            response_class=Response, responses=_JSON,
            summary="Metadata of a result instance (WADO-RS)")
def retrieve_instance_metadata(study: str, series: str, sop: str, request: Request,
                               rt: RuntimeDep) -> Response:
    instance = _instance(rt, study, series, sop)
    response = _dicom_json([_metadata(request, instance)])
    _audit_read(request, rt, "wado_instance_metadata", [instance])
    return response


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}",
            response_class=Response,
            responses={200: {"content": {'multipart/related; type="application/octet-stream"':
                                         {}}},
                       404: {"description": "no such frame", "content": {PROBLEM_JSON: {}}},
                       406: {"description": "unsupported Accept",
                             "content": {PROBLEM_JSON: {}}}},
            summary="Pixel data of frames of a result instance (WADO-RS)")
def retrieve_frames(study: str, series: str, sop: str, frames: str, request: Request,
                    rt: RuntimeDep) -> Response:
    instance = _instance(rt, study, series, sop)
    try:
        # a frame named twice is sent once, where it is first named (PS3.18 asks for a list;
        # a repeat adds nothing and turned an 8 KiB URL into a 745 MiB response)
        numbers = list(dict.fromkeys(int(n) for n in frames.split(",")))
    except ValueError:
        raise Problem(400, Code.INVALID_FRAMES, "frames: comma-separated numbers from 1") from None
    limit = rt.settings.wado_max_frames
    if len(numbers) > limit:
        raise Problem(400, Code.TOO_MANY_FRAMES, f"{len(numbers)} distinct frames exceed {limit} "
                      "per request (FLAIRCAD_WADO_MAX_FRAMES)")
    _negotiate(request, "application/octet-stream", {instance.transfer_syntax})
    handle = instance.path.open("rb")  # held open: the stream outlives a retention sweep
    try:
        # Pixel Data stays on disk (deferred): only its offset and length are read here
        dataset = dcmread(handle, defer_size=_DEFER_BYTES)
        if "PixelData" not in dataset or instance.transfer_syntax not in _NATIVE:
            raise Problem(404, Code.NO_FRAMES, "this instance has no native pixel data")
        count = int(dataset.get("NumberOfFrames", 1) or 1)
        size = (int(dataset.Rows) * int(dataset.Columns) * int(dataset.SamplesPerPixel)
                * int(dataset.BitsAllocated) // 8)
        if not numbers or any(n < 1 or n > count for n in numbers):
            raise Problem(404, Code.FRAME_NOT_FOUND, f"this instance has {count} frame(s)")
        read = _pixel_reader(dataset, handle)
    except BaseException:
        handle.close()
        raise
    response = _frames_response(read, numbers, size)
    _audit_read(request, rt, "wado_frames", [instance])
    return response


# elements longer than this stay in the file when an instance is opened for its frames
_DEFER_BYTES = 4096
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_FRAME_PART = {"Content-Type": f"application/octet-stream; transfer-syntax={_EXPLICIT_LE}"}


class _PixelReader:
    """Reads byte ranges of the Pixel Data value: from the open file where pydicom deferred
    it, from memory where it was small enough to be read."""

    def __init__(self, handle: Any, length: int, offset: int | None = None,
                 data: bytes | None = None) -> None:
        self.handle, self.length, self.offset, self.data = handle, length, offset, data

    def __call__(self, start: int, length: int) -> bytes:
        if self.data is not None:
            return self.data[start:start + length]
        assert self.offset is not None
        self.handle.seek(self.offset + start)
        return bytes(self.handle.read(length))

    def close(self) -> None:
        self.handle.close()


def _pixel_reader(dataset: Any, handle: Any) -> _PixelReader:
    raw = dataset.get_item("PixelData", keep_deferred=True)
    if isinstance(raw, RawDataElement) and raw.value is None and raw.value_tell is not None:
        return _PixelReader(handle, int(raw.length), offset=int(raw.value_tell))
    data = bytes(dataset.PixelData)
    return _PixelReader(handle, len(data), data=data)


def _frames_response(read: _PixelReader, numbers: list[int], size: int) -> Response:
    """The frames as ``multipart/related``, streamed: each part is read from the file as it is
    sent, so memory holds one frame whatever the request (the same bytes as the writer's
    whole body of the same parts)."""
    writer = MultipartWriter("application/octet-stream", transfer_syntax=_EXPLICIT_LE)
    # frame n is bytes [(n-1) x size, n x size) of the value, cut short where the value ends
    spans = [((n - 1) * size, max(0, min(n * size, read.length) - (n - 1) * size))
             for n in numbers]
    parts = [LazyPart(_FRAME_PART, length, functools.partial(read, start, length))
             for start, length in spans]

    def body() -> Iterator[bytes]:
        try:
            yield from writer.stream(parts)
        finally:
            read.close()

    return StreamingResponse(body(), headers={"Content-Length": str(writer.length(parts))},
                             media_type=writer.content_type)
