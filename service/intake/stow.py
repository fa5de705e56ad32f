"""DICOMweb STOW-RS (PS3.18 §10.5): store each part, answer with a DICOM JSON response.

Every part is parsed (headers only matter here; pixels are decoded later, once) and, if usable,
written to the spool before the response says "stored". A re-sent identical instance is
acknowledged as stored; different bytes under a known SOP Instance UID are refused (0x0111) and
the first copy is kept, never silently replaced; the refusal is remembered with the series
(:meth:`service.storage.spool.Spool.note_conflict`), and its analysis carries a warning.

Instances that break a size limit (:mod:`service.core.limits`) are refused one by one: a matrix or
decoded size beyond the limits with 0xC000 (it will not get better when sent again), one
instance too many for its series with 0xA700 (out of resources). So is an instance that would
open a series past the stability window's bounds (``admit``, :mod:`service.runtime.arrivals`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset

from service.core.codes import Code
from service.core.limits import TOO_MANY_INSTANCES, Limits, instance_refusal
from service.core.reading import Skipped, read_instance
from service.intake.multipart import MediaType
from service.runtime import metrics
from service.storage.spool import SeriesKey, Spool, StoreOutcome, safe_uid

# PS3.18 Table 10.5.3-1 / PS3.4 Annex GG failure reasons
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
STUDY_MISMATCH = 0xA900  # "data set does not match" — the study in the URL
CANNOT_UNDERSTAND = 0xC000
TOO_MANY_OPEN_SERIES = Code.TOO_MANY_OPEN_SERIES


@dataclass
class StowResult:
    stored: list[tuple[str, str]] = field(default_factory=list)  # (SOP class, SOP instance)
    failed: list[tuple[str, str, int, str]] = field(default_factory=list)  # + reason, why
    series: set[SeriesKey] = field(default_factory=set)
    # (series, SOP Instance UID) refused because different bytes are stored under the UID
    conflicts: list[tuple[SeriesKey, str]] = field(default_factory=list)
    # instances newly stored per series (re-sent identical ones are not counted)
    new: dict[SeriesKey, int] = field(default_factory=dict)

    @property
    def status_code(self) -> int:
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def to_dicom_json(self) -> dict[str, Any]:
        response = Dataset()
        if self.stored:
            response.ReferencedSOPSequence = [
                _reference(sop_class, sop_instance) for sop_class, sop_instance in self.stored]
        if self.failed:
            items = []
            for sop_class, sop_instance, reason, _ in self.failed:
                item = _reference(sop_class, sop_instance)
                item.FailureReason = reason
                items.append(item)
            response.FailedSOPSequence = items
        return response.to_json_dict()


def _reference(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    if sop_class:
        item.ReferencedSOPClassUID = sop_class
    if sop_instance:
        item.ReferencedSOPInstanceUID = sop_instance
    return item


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip() if value else ""


class InstancePart(Protocol):
    """A multipart part in memory (:class:`service.intake.multipart.Part`) or streamed to a file
    (:class:`service.api.body.SpooledPart`, which has a ``path`` to link from)."""

    @property
    def content_type(self) -> MediaType: ...

    def read(self) -> bytes: ...


def store_parts(parts: Sequence[InstancePart], spool: Spool, study_in_url: str | None,
                source: str = "stow", limits: Limits | None = None,
                admit: Callable[[SeriesKey], bool] | None = None) -> StowResult:
    """Store the usable parts; ``admit(key)`` is asked before an instance of ``key`` is
    stored and may refuse it (False: too many series open, 0xA700)."""
    result = StowResult()
    limits = limits or Limits()
    counts: dict[SeriesKey, int] = {}  # instances in each series folder, counted once

    def refuse(sop_class: str, sop_instance: str, reason: int, why: str) -> None:
        result.failed.append((sop_class, sop_instance, reason, why))
        metrics.INSTANCES_REFUSED.labels(reason=why).inc()

    for index, part in enumerate(parts):
        metrics.INSTANCES_RECEIVED.labels(source=source).inc()
        media = part.content_type.essence
        if media and media not in ("application/dicom", "application/octet-stream"):
            refuse("", "", CANNOT_UNDERSTAND, Code.UNSUPPORTED_PART_TYPE)
            continue
        data = part.read()
        parsed = read_instance(data, f"part {index + 1}")
        if isinstance(parsed, Skipped):
            refuse("", "", CANNOT_UNDERSTAND if parsed.code != Code.NO_PIXEL_DATA
                   else SOP_CLASS_NOT_SUPPORTED, str(parsed.code))
            continue
        ds = parsed.dataset
        sop_class, sop_instance = _text(ds, "SOPClassUID"), _text(ds, "SOPInstanceUID")
        try:
            key = SeriesKey(safe_uid(_text(ds, "StudyInstanceUID")),
                            safe_uid(_text(ds, "SeriesInstanceUID")))
            sop_instance = safe_uid(sop_instance)
        except ValueError:
            refuse(sop_class, "", CANNOT_UNDERSTAND, Code.INVALID_UID)
            continue
        if study_in_url is not None and key.study_instance_uid != study_in_url:
            refuse(sop_class, sop_instance, STUDY_MISMATCH, Code.STUDY_MISMATCH)
            continue
        too_large = instance_refusal(ds, limits)
        if too_large is not None:
            refuse(sop_class, sop_instance, CANNOT_UNDERSTAND, too_large[0])
            continue
        if key not in counts:
            counts[key] = len(spool.series_files(key))
        if (counts[key] >= limits.max_instances_per_series
                and not spool.instance_path(key, sop_instance).exists()):
            refuse(sop_class, sop_instance, OUT_OF_RESOURCES, TOO_MANY_INSTANCES)
            continue
        if admit is not None and not admit(key):
            refuse(sop_class, sop_instance, OUT_OF_RESOURCES, TOO_MANY_OPEN_SERIES)
            continue
        path: Path | None = getattr(part, "path", None)
        try:
            outcome = spool.store_instance(key, sop_instance, data, source=path)
        except OSError:
            refuse(sop_class, sop_instance, OUT_OF_RESOURCES, Code.SPOOL_WRITE_FAILED)
            continue
        if outcome is StoreOutcome.CONFLICT:
            refuse(sop_class, sop_instance, DUPLICATE_SOP_INSTANCE, Code.CONFLICTING_DUPLICATE)
            result.conflicts.append((key, sop_instance))
            # the refusal stands even if remembering it fails; only the warning is lost
            with contextlib.suppress(OSError):
                spool.note_conflict(key, sop_instance)
            continue
        if outcome is StoreOutcome.STORED:
            counts[key] += 1
            result.new[key] = result.new.get(key, 0) + 1
        result.stored.append((sop_class, sop_instance))
        # A re-sent instance also means the sender is still at it: the series' stability
        # window restarts (its content, and so its analysis, stays the same).
        result.series.add(key)
    return result
