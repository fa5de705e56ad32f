"""DICOMweb STOW-RS: ``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{study}``."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from service.api.body import SpooledPart, media_type_of, receive_parts
from service.api.deps import Runtime, RuntimeDep, ensure_capacity
from service.api.problems import PROBLEM_JSON, Problem
from service.api.security import STORE_SCOPE, client_of, principal_of
from service.api.trail import audit
from service.core.codes import Code
from service.core.limits import Limits
from service.intake.multipart import MediaType
from service.intake.stow import StowResult, store_parts
from service.runtime.arrivals import Hold, series_of_part
from service.storage.spool import safe_uid

log = logging.getLogger(__name__)

# STOW-RS sends data: the store scope (the results are served by service.api.wado, read)
router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"], dependencies=[STORE_SCOPE])

DICOM_JSON = "application/dicom+json"

_STOW_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {'multipart/related; type="application/dicom"': {
            "schema": {"type": "string", "format": "binary"}}},
    },
    "responses": {
        "200": {"description": "every instance stored",
                "content": {DICOM_JSON: {"schema": {"type": "object"}}}},
        "202": {"description": "some instances refused (FailedSOPSequence)",
                "content": {DICOM_JSON: {"schema": {"type": "object"}}}},
        "409": {"description": "no instance stored",
                "content": {DICOM_JSON: {"schema": {"type": "object"}}}},
        "400": {"description": "malformed multipart body", "content": {PROBLEM_JSON: {}}},
        "413": {"description": "body, one instance or the number of instances too large",
                "content": {PROBLEM_JSON: {}}},
        "415": {"description": "not multipart/related application/dicom",
                "content": {PROBLEM_JSON: {}}},
        "503": {"description": "queue saturated, draining, spool volume full or too many "
                "series being received; see Retry-After", "content": {PROBLEM_JSON: {}}},
    },
}


async def _stow(request: Request, rt: Runtime, study: str | None) -> Response:
    if study is not None:
        try:
            study = safe_uid(study)
        except ValueError as error:
            raise Problem(400, Code.INVALID_UID, str(error)) from None
    media = media_type_of(request, ("multipart/related",))
    ensure_capacity(rt)
    sender = sender_of(request)
    # The series of each part stay open (never complete) until this request is over, however
    # slowly the rest of it streams in; released whatever the outcome, or they never would be.
    hold = rt.scheduler.hold_series(sender)
    try:
        result = await _receive_and_store(request, rt, media, study, sender, hold)
    finally:
        hold.release()
    _audit(request, rt, study, result)
    # counts and reason codes; the UIDs stay out of the log (service.runtime.logs)
    log.info("stow", extra={"stored": len(result.stored), "refused": len(result.failed),
                            "refused_reasons": dict(Counter(why for *_, why in result.failed)),
                            "series": len(result.series)})
    # dicomweb-client ignores the body unless the type is exactly application/dicom+json.
    # built off the loop: pydicom takes ~0.2 s for 5,000 refused parts
    return JSONResponse(await run_in_threadpool(result.to_dicom_json),
                        status_code=result.status_code,
                        media_type=DICOM_JSON)


async def _receive_and_store(request: Request, rt: Runtime, media: MediaType,
                             study: str | None, sender: str, hold: Hold) -> StowResult:
    def part_head(part: SpooledPart) -> None:
        key = series_of_part(part.path, study)  # None: judged when stored
        if key is not None:
            hold.add(key)  # TooManyOpenSeries: 503 before more of the body is read

    body = await receive_parts(request, rt, media, on_part_head=part_head)
    try:
        if not body.parts:
            raise Problem(400, Code.NO_INSTANCES, "the multipart body holds no parts")
        # parsing and fsync-ing instances blocks: off the event loop
        result = await run_in_threadpool(
            store_parts, body.parts, rt.spool, study, "stow", Limits.of(rt.settings),
            lambda key: rt.scheduler.open_series(key, sender))
    finally:
        await body.discard()  # off the loop: thousands of part files
    for key in result.series:
        rt.scheduler.note_arrival(key)
    return result


def sender_of(request: Request) -> str:
    """Who sends, for the stability window's per-sender bound: the authenticated caller, or
    the client address when authentication is off."""
    principal = principal_of(request)
    if principal.method == "none":
        return f"client:{client_of(request.scope)}"
    return principal.id


def _audit(request: Request, rt: Runtime, study: str | None, result: StowResult) -> None:
    audit(request, rt, "stow", study_in_url=study,
          series=[{"study_instance_uid": key.study_instance_uid,
                   "series_instance_uid": key.series_instance_uid,
                   "new_instances": result.new.get(key, 0)}
                  for key in sorted(result.series, key=lambda k: (k.study_instance_uid,
                                                                   k.series_instance_uid))],
          stored=len(result.stored),
          refused=dict(Counter(why for *_, why in result.failed)) or None,
          conflicts=[{"series_instance_uid": key.series_instance_uid,
                      "sop_instance_uid": sop} for key, sop in result.conflicts] or None)


@router.post("/studies", openapi_extra=_STOW_DOC, response_class=Response,
             summary="Store instances (STOW-RS)")
async def store_instances(request: Request,
                          rt: RuntimeDep) -> Response:
    return await _stow(request, rt, None)


@router.post("/studies/{study}", openapi_extra=_STOW_DOC, response_class=Response,
             summary="Store instances of one study (STOW-RS)")
async def store_study_instances(study: str, request: Request,
                                rt: RuntimeDep) -> Response:
    return await _stow(request, rt, study)
