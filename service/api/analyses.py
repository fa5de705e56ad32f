"""``/v1/analyses``: one series in, MS/cSVD probabilities and explanation-map DICOM out.

The routes translate HTTP into calls: the upload's identity, its claim (the same instances
again are the same analysis) and its durable files are :mod:`service.intake.uploads`; the
response bodies are :class:`service.intake.multipart.MultipartWriter`'s. The URLs of a
result's outputs (``instances_url``, ``preview_url``) are made here, in :func:`view`: the store
keeps ids.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse

from service.api.body import SpooledPart, media_type_of, receive_parts
from service.api.deps import Runtime, RuntimeDep, ensure_capacity, saturated_problem
from service.api.problems import PROBLEM_JSON, Problem
from service.api.schemas import Analysis, AnalysisList, Delivery
from service.api.security import READ_SCOPE, STORE_SCOPE
from service.api.trail import audit
from service.intake.multipart import MediaType, MultipartWriter
from service.intake.uploads import fingerprint
from service.runtime import metrics
from service.runtime.scheduler import Saturated
from service.storage.results import ResultFolder
from service.storage.store import FINISHED, Record, Status

router = APIRouter(prefix="/v1/analyses", tags=["analyses"])

_ID = re.compile(r"[0-9a-f]{32}")
_DICOM_PART_TYPES = ("", "application/dicom", "application/octet-stream")

_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "the instances of ONE series, as application/dicom parts",
        "content": {
            'multipart/related; type="application/dicom"': {
                "schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {
                "type": "object",
                "properties": {"files": {"type": "array",
                                         "items": {"type": "string", "format": "binary"}}}}},
        },
    },
    "responses": {
        "202": {"description": "accepted (Prefer: respond-async); poll the Location",
                "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Analysis"}}}},
        "400": {"description": "malformed body", "content": {PROBLEM_JSON: {}}},
        "413": {"description": "body, one instance or the number of instances too large",
                "content": {PROBLEM_JSON: {}}},
        "415": {"description": "unsupported media type", "content": {PROBLEM_JSON: {}}},
        "422": {"description": "not one usable FLAIR MR series, or one beyond the size limits "
                "(code says why)", "content": {PROBLEM_JSON: {}}},
        "503": {"description": "queue saturated, draining or spool volume full; see "
                "Retry-After", "content": {PROBLEM_JSON: {}}},
    },
}


def result_urls(analysis_id: str) -> dict[str, str]:
    """Where clients fetch a finished analysis's outputs (paths of this router)."""
    return {"instances_url": f"/v1/analyses/{analysis_id}/instances",
            "preview_url": f"/v1/analyses/{analysis_id}/preview.png"}


def view(record: Record) -> Analysis:
    """What clients see of a stored analysis: its result, with the URLs of its outputs."""
    body: dict[str, Any] = dict(record.result or {})
    if isinstance(body.get("outputs"), dict):
        body["outputs"] = {**body["outputs"], **result_urls(record.id)}
    body.update({"analysis_id": record.id, "status": str(record.status),
                 "study_instance_uid": body.get("study_instance_uid")
                 or record.study_instance_uid,
                 "series_instance_uid": body.get("series_instance_uid")
                 or record.series_instance_uid})
    if record.problem is not None:
        body["problem"] = record.problem
    return Analysis.model_validate(body)


def _record_or_404(rt: Runtime, analysis_id: str) -> Record:
    record = rt.store.get(analysis_id) if _ID.fullmatch(analysis_id) else None
    if record is None:
        raise Problem(404, "analysis_not_found", f"no analysis {analysis_id[:40]!r}")
    return record


# failures of the server's volume, not of the request: the client may send it again later
_RETRYABLE_FAILURES = frozenset({"spool_full", "result_write_failed"})


def _finished_response(record: Record, retry_after_s: int) -> Response:
    analysis = view(record)
    if record.status is Status.DONE:
        return JSONResponse(analysis.model_dump(mode="json"))
    problem = record.problem or {}
    if record.status is Status.REJECTED:
        raise Problem(422, str(problem.get("code", "rejected")),
                      str(problem.get("detail", "the series cannot be analysed")),
                      analysis_id=record.id, warnings=problem.get("warnings", []))
    if problem.get("code") in _RETRYABLE_FAILURES:
        raise Problem(503, str(problem["code"]), str(problem.get("detail", "")),
                      analysis_id=record.id, headers={"Retry-After": str(retry_after_s)})
    raise Problem(500, "analysis_failed", "the analysis failed; it has been logged",
                  analysis_id=record.id)


# "/v1/analyses/" is the same resource: answered, not redirected (a 307 with an empty body
# printed nothing in the tour's `curl -s`)
# store: the synchronous answer is the upload's own result; polling a Location needs read
@router.post("/", include_in_schema=False, response_model=Analysis,
             dependencies=[STORE_SCOPE])
@router.post("", openapi_extra=_UPLOAD_DOC, response_model=Analysis,
             dependencies=[STORE_SCOPE],
             summary="Analyse one series (synchronous, or async with Prefer: respond-async)")
async def create_analysis(
    request: Request,
    rt: RuntimeDep,
    prefer: Annotated[str | None, Header()] = None,
    cache_control: Annotated[str | None, Header(
        description="no-cache: analyse again even if these instances were analysed "
        "before (otherwise the earlier analysis is returned, with Content-Location)")] = None,
) -> Response:
    media = media_type_of(request, ("multipart/related", "multipart/form-data"))
    ensure_capacity(rt)
    body = await receive_parts(request, rt, media)
    try:
        uploads = rt.uploads
        dicom_parts = _dicom_parts(body.parts, media)
        metrics.INSTANCES_RECEIVED.labels(source="upload").inc(len(dicom_parts))
        # the same instances again are the same analysis (service.intake.uploads);
        # "Cache-Control: no-cache" asks for a new run
        model = rt.engine.info
        record, created = uploads.claim(
            fingerprint(model.name, model.version, rt.settings.explanation,
                        (p.sha256 for p in dicom_parts), rt.settings.outputs),
            again=_no_cache(cache_control))
        audit(request, rt, "upload", analysis_id=record.id, instances=len(dicom_parts),
              reused=not created)
        if not created:
            return await _existing_response(rt, record, prefer)
        files = await run_in_threadpool(uploads.keep, record, dicom_parts)
    finally:
        body.remove()
    try:
        done = rt.scheduler.submit_upload(files, record)
    except Saturated as error:  # filled up while this body was read
        uploads.refuse(record)
        raise saturated_problem(error) from None

    if prefer and "respond-async" in prefer.lower():
        return JSONResponse(view(record).model_dump(mode="json"), status_code=202,
                            headers={"Location": f"/v1/analyses/{record.id}",
                                     "Preference-Applied": "respond-async"})
    finished = await done
    return _finished_response(finished, rt.settings.retry_after_s)


def _dicom_parts(parts: list[SpooledPart], media: MediaType) -> list[SpooledPart]:
    """The parts that are instances: named files, DICOM-typed parts, and untyped parts of a
    multipart/related body; 400 when there is none, 415 for a related part of another type."""
    dicom_parts = [part for part in parts
                   if part.filename is not None or part.content_type.essence in
                   _DICOM_PART_TYPES[1:] or (media.essence == "multipart/related"
                                             and part.content_type.essence == "")]
    if not dicom_parts:
        raise Problem(400, "no_instances", "the body holds no DICOM parts")
    unsupported = {p.content_type.essence for p in dicom_parts} - set(_DICOM_PART_TYPES)
    if media.essence == "multipart/related" and unsupported:
        raise Problem(415, "unsupported_media_type",
                      f"parts of type {sorted(unsupported)} are not application/dicom")
    return dicom_parts


def _no_cache(cache_control: str | None) -> bool:
    return cache_control is not None and "no-cache" in cache_control.lower()


async def _existing_response(rt: Runtime, record: Record, prefer: str | None) -> Response:
    """An upload whose content was analysed (or is being analysed) already: its analysis,
    with ``Content-Location`` naming it; a sync caller waits for it as for a new one."""
    location = {"Content-Location": f"/v1/analyses/{record.id}"}
    if prefer and "respond-async" in prefer.lower():
        return JSONResponse(view(record).model_dump(mode="json"), status_code=202,
                            headers={"Location": f"/v1/analyses/{record.id}",
                                     "Preference-Applied": "respond-async", **location})
    while record.status not in FINISHED:
        await asyncio.sleep(0.2)
        record = rt.store.get(record.id) or record
    response = _finished_response(record, rt.settings.retry_after_s)
    response.headers.update(location)
    return response


def _audit_read(request: Request, rt: Runtime, what: str, record: Record | None = None,
                study_instance_uid: str | None = None) -> None:
    audit(request, rt, "read", what=what, analysis_id=record.id if record else None,
          study_instance_uid=study_instance_uid
          or (record.study_instance_uid if record else None),
          series_instance_uid=record.series_instance_uid if record else None)


@router.get("/", include_in_schema=False, response_model=AnalysisList,
            dependencies=[READ_SCOPE])
@router.get("", response_model=AnalysisList, summary="Analyses of a study (or the latest)",
            dependencies=[READ_SCOPE])
def list_analyses(
    request: Request,
    rt: RuntimeDep,
    study_instance_uid: Annotated[str | None, Query(max_length=64)] = None,
) -> AnalysisList:
    _audit_read(request, rt, "list", study_instance_uid=study_instance_uid)
    records = (rt.store.by_study(study_instance_uid) if study_instance_uid
               else rt.store.recent())
    return AnalysisList(analyses=[view(record) for record in records])


@router.get("/{analysis_id}", response_model=Analysis, summary="Result or status",
            dependencies=[READ_SCOPE],
            responses={404: {"description": "unknown analysis", "content": {PROBLEM_JSON: {}}}})
def get_analysis(analysis_id: str, request: Request,
                 rt: RuntimeDep) -> Analysis:
    record = _record_or_404(rt, analysis_id)
    _audit_read(request, rt, "analysis", record)
    analysis = view(record)
    deliveries = rt.pacs.deliveries(analysis.analysis_id) if rt.pacs is not None else []
    if deliveries:  # results sent to the PACS (FLAIRCAD_DESTINATIONS)
        analysis.deliveries = [Delivery.model_validate(d) for d in deliveries]
    return analysis


def _outputs(rt: Runtime, record: Record) -> ResultFolder:
    if record.status is not Status.DONE:
        raise Problem(404, "no_outputs", f"analysis {record.id} is {record.status}, "
                      "it has no outputs")
    return rt.spool.result(record.id)


@router.get("/{analysis_id}/instances", response_class=Response, dependencies=[READ_SCOPE],
            summary="The Secondary Capture and SR instances",
            responses={200: {"content": {'multipart/related; type="application/dicom"': {}}}})
def get_instances(analysis_id: str, request: Request,
                  rt: RuntimeDep) -> Response:
    record = _record_or_404(rt, analysis_id)
    folder = _outputs(rt, record)
    _audit_read(request, rt, "instances", record)
    return instances_response(folder.dicom_files())


def instances_response(files: list[Path]) -> Response:
    """The result's instances as one ``multipart/related; type="application/dicom"`` body."""
    writer = MultipartWriter("application/dicom")
    return Response(writer.body(({"Content-Type": "application/dicom"}, path.read_bytes())
                                for path in files), media_type=writer.content_type)


@router.get("/{analysis_id}/preview.png", response_class=FileResponse,
            dependencies=[READ_SCOPE],
            summary="Montage of the most attended slices with their overlays",
            responses={200: {"content": {"image/png": {}}}})
def get_preview(analysis_id: str, request: Request,
                rt: RuntimeDep) -> FileResponse:
    record = _record_or_404(rt, analysis_id)
    path = _outputs(rt, record).preview
    _audit_read(request, rt, "preview", record)
    if not path.is_file():
        raise Problem(404, "no_outputs", "this analysis has no preview")
    return FileResponse(path, media_type="image/png")
