"""DICOMweb STOW-RS: ``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{study}``."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from service.api.body import media_type_of, read_parts
from service.api.deps import Runtime, runtime, saturated_problem
from service.api.problems import PROBLEM_JSON, Problem
from service.scheduler import Saturated
from service.spool import safe_uid
from service.stow import store_parts

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])

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
        "413": {"description": "body too large", "content": {PROBLEM_JSON: {}}},
        "415": {"description": "not multipart/related application/dicom",
                "content": {PROBLEM_JSON: {}}},
        "503": {"description": "queue saturated; see Retry-After",
                "content": {PROBLEM_JSON: {}}},
    },
}


async def _stow(request: Request, rt: Runtime, study: str | None) -> Response:
    if study is not None:
        try:
            study = safe_uid(study)
        except ValueError as error:
            raise Problem(400, "invalid_uid", str(error)) from None
    media = media_type_of(request, ("multipart/related",))
    try:
        rt.scheduler.check_capacity()
    except Saturated as error:
        raise saturated_problem(error) from None
    parts = await read_parts(request, media, rt.settings.max_upload_bytes)
    if not parts:
        raise Problem(400, "no_instances", "the multipart body holds no parts")
    result = store_parts(parts, rt.spool, study)
    for key in result.series:
        rt.scheduler.note_arrival(key)
    # counts and reason codes; the UIDs stay out of the log (service.logs)
    log.info("stow", extra={"stored": len(result.stored), "refused": len(result.failed),
                            "refused_reasons": dict(Counter(why for *_, why in result.failed)),
                            "series": len(result.series)})
    # dicomweb-client ignores the body unless the type is exactly application/dicom+json.
    return JSONResponse(result.to_dicom_json(), status_code=result.status_code,
                        media_type=DICOM_JSON)


@router.post("/studies", openapi_extra=_STOW_DOC, response_class=Response,
             summary="Store instances (STOW-RS)")
async def store_instances(request: Request,
                          rt: Annotated[Runtime, Depends(runtime)]) -> Response:
    return await _stow(request, rt, None)


@router.post("/studies/{study}", openapi_extra=_STOW_DOC, response_class=Response,
             summary="Store instances of one study (STOW-RS)")
async def store_study_instances(study: str, request: Request,
                                rt: Annotated[Runtime, Depends(runtime)]) -> Response:
    return await _stow(request, rt, study)
