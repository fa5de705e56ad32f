"""Series grouping: read every source (:mod:`service.core.reading`) and group the instances by
(StudyInstanceUID, SeriesInstanceUID); then the frames of a series, from the headers only.

Whether a series is one 3D volume (and why not: a :class:`Rejection`) is decided in one place,
:mod:`service.core.volume`; this module only says what a series holds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from service.core.codes import Code
from service.core.reading import (
    Instance,
    Notice,
    Skipped,
    Source,
    iter_folder,
    raw_text,
    raw_texts,
    read_instance,
)


class Rejection(Notice):
    """Why a series cannot be one 3D volume."""


class SeriesRejected(Exception):
    """Raised inside the ingest/volume pipeline; :func:`service.core.volume.convert` turns it into a
    :class:`Rejection` on the result, so callers see a value, not an exception."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.rejection = Rejection(str(code), message)

    @property
    def code(self) -> str:
        return self.rejection.code


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _uid_key(ds: Dataset) -> tuple[str, str]:
    return raw_text(ds, 0x0020000D), raw_text(ds, 0x0020000E)


@dataclass
class Series:
    """The instances of one (StudyInstanceUID, SeriesInstanceUID)."""

    study_instance_uid: str
    series_instance_uid: str
    instances: list[Instance] = field(default_factory=list)

    @property
    def first(self) -> Dataset:
        return self.instances[0].dataset

    @property
    def series_description(self) -> str:
        return _text(self.first, "SeriesDescription")

    @property
    def modality(self) -> str:
        return _text(self.first, "Modality")

    @property
    def transfer_syntaxes(self) -> list[str]:
        return sorted({str(i.transfer_syntax) for i in self.instances})

    @property
    def n_instances(self) -> int:
        return len(self.instances)


@dataclass
class IngestResult:
    series: list[Series]
    skipped: list[Skipped]


def group_series(instances: Iterable[Instance]) -> list[Series]:
    """Group by (StudyInstanceUID, SeriesInstanceUID); series ordered by study, SeriesNumber."""
    groups: dict[tuple[str, str], Series] = {}
    for instance in instances:
        key = _uid_key(instance.dataset)
        if key not in groups:
            groups[key] = Series(study_instance_uid=key[0], series_instance_uid=key[1])
        groups[key].instances.append(instance)

    def order(series: Series) -> tuple[str, int, str]:
        number = series.first.get("SeriesNumber")
        try:
            n = int(number) if number not in (None, "") else 1 << 30
        except (TypeError, ValueError):
            n = 1 << 30
        return series.study_instance_uid, n, series.series_instance_uid

    return sorted(groups.values(), key=order)


def ingest(sources: Iterable[Source | tuple[Source, str]]) -> IngestResult:
    """Read every source (path, bytes or binary file; optionally paired with a display name)
    and group what is usable into series."""
    instances: list[Instance] = []
    skipped: list[Skipped] = []
    for item in sources:
        source, name = item if isinstance(item, tuple) else (item, None)
        outcome = read_instance(source, name)
        if isinstance(outcome, Skipped):
            skipped.append(outcome)
        else:
            instances.append(outcome)
    return IngestResult(series=group_series(instances), skipped=skipped)


def ingest_folder(folder: Path | str) -> IngestResult:
    """Every file under ``folder`` (recursively); non-DICOM files are skipped with a reason."""
    return ingest(iter_folder(Path(folder)))


# --------------------------------------------------------------------------------------------
# Frames and the checks that do not need sorted positions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One 2D image of a series: a classic instance or one frame of a multi-frame instance."""

    instance: int  # index into Series.instances
    frame_number: int | None  # 1-based, multi-frame only
    sop_instance_uid: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    rows: int
    columns: int
    image_type: tuple[str, ...]
    slope: float
    intercept: float
    acquisition_number: int | None
    instance_number: int | None
    echo: str | None
    temporal: str | None
    b_value: str | None
    trigger: str | None


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in (value if isinstance(value, Sequence) else [value]))
    except (TypeError, ValueError):
        return None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        return None
    return values


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _str_or_none(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return "\\".join(str(v) for v in value)
    return str(value)


def functional_group(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """The item of functional group ``sequence`` for frame ``index`` (per-frame first, then
    shared), or None."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and index < len(per_frame) and sequence in per_frame[index]:
        items = per_frame[index][sequence].value
        if items and isinstance(items[0], Dataset):  # a pydicom Sequence holds Datasets only
            return items[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and sequence in shared[0]:
        items = shared[0][sequence].value
        if items and isinstance(items[0], Dataset):
            return items[0]
    return None


def _get(item: Dataset | None, keyword: str) -> Any:
    return None if item is None else item.get(keyword)


def _raw_floats(ds: Dataset, tag: int, n: int) -> tuple[float, ...] | None:
    return _floats(raw_texts(ds, tag), n)


def _raw_float(ds: Dataset, tag: int, default: float) -> float:
    values = _floats(raw_texts(ds, tag)[:1], 1)
    return default if values is None else values[0]


def _raw_first(ds: Dataset, tag: int) -> str | None:
    values = raw_texts(ds, tag)
    return "\\".join(values) if values else None


def _classic_frame(index: int, ds: Dataset) -> Frame:
    return Frame(
        instance=index,
        frame_number=None,
        sop_instance_uid=raw_text(ds, 0x00080018),
        position=_raw_floats(ds, 0x00200032, 3),  # type: ignore[arg-type]
        orientation=_raw_floats(ds, 0x00200037, 6),
        pixel_spacing=_raw_floats(ds, 0x00280030, 2),  # type: ignore[arg-type]
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        image_type=tuple(v.upper() for v in raw_texts(ds, 0x00080008)),
        slope=_raw_float(ds, 0x00281053, 1.0),
        intercept=_raw_float(ds, 0x00281052, 0.0),
        acquisition_number=_int_or_none(_raw_first(ds, 0x00200012)),
        instance_number=_int_or_none(_raw_first(ds, 0x00200013)),
        echo=_raw_first(ds, 0x00180086) or _raw_first(ds, 0x00180081),  # EchoNumbers, EchoTime
        temporal=_raw_first(ds, 0x00200100),  # TemporalPositionIdentifier
        b_value=_str_or_none(ds.get("DiffusionBValue")) if 0x00189087 in ds else None,
        trigger=_raw_first(ds, 0x00181060),  # TriggerTime
    )


def _enhanced_frames(index: int, ds: Dataset) -> list[Frame]:
    frames = []
    n_frames = int(ds.get("NumberOfFrames") or 1)
    top_type = tuple(str(v).upper() for v in (ds.get("ImageType") or ()))
    for i in range(n_frames):
        position = functional_group(ds, i, "PlanePositionSequence")
        orientation = functional_group(ds, i, "PlaneOrientationSequence")
        measures = functional_group(ds, i, "PixelMeasuresSequence")
        rescale = functional_group(ds, i, "PixelValueTransformationSequence")
        frame_type = functional_group(ds, i, "MRImageFrameTypeSequence")
        content = functional_group(ds, i, "FrameContentSequence")
        echo = functional_group(ds, i, "MREchoSequence")
        diffusion = functional_group(ds, i, "MRDiffusionSequence")
        cardiac = functional_group(ds, i, "CardiacSynchronizationSequence")
        kind = _get(frame_type, "FrameType")
        frames.append(
            Frame(
                instance=index,
                frame_number=i + 1,
                sop_instance_uid=str(ds.SOPInstanceUID),
                position=_floats(_get(position, "ImagePositionPatient"), 3),  # type: ignore[arg-type]
                orientation=_floats(_get(orientation, "ImageOrientationPatient"), 6),
                pixel_spacing=_floats(_get(measures, "PixelSpacing"), 2),  # type: ignore[arg-type]
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                image_type=tuple(str(v).upper() for v in kind) if kind else top_type,
                slope=float(_get(rescale, "RescaleSlope") or ds.get("RescaleSlope") or 1.0),
                intercept=float(
                    _get(rescale, "RescaleIntercept") or ds.get("RescaleIntercept") or 0.0
                ),
                acquisition_number=_int_or_none(_get(content, "FrameAcquisitionNumber")),
                instance_number=_int_or_none(ds.get("InstanceNumber")),
                echo=_str_or_none(_get(echo, "EffectiveEchoTime")),
                temporal=_str_or_none(_get(content, "TemporalPositionIndex")),
                b_value=_str_or_none(_get(diffusion, "DiffusionBValue")),
                trigger=_str_or_none(_get(cardiac, "NominalCardiacTriggerDelayTime")),
            )
        )
    return frames


def _is_enhanced(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def is_mosaic(ds: Dataset) -> bool:
    """Siemens (and UIH) mosaics: ImageType says MOSAIC; old Siemens files may only say it in
    the CSA image header (NumberOfImagesInMosaic)."""
    if "MOSAIC" in (v.upper() for v in raw_texts(ds, 0x00080008)):
        return True
    csa = ds.get((0x0029, 0x1010)) if 0x00291010 in ds else None
    if csa is not None and "SIEMENS" in raw_text(ds, 0x00080070).upper():
        raw = csa.value if isinstance(csa.value, bytes) else b""
        marker = raw.find(b"NumberOfImagesInMosaic")
        if marker >= 0:
            # CSA2 tag: 64-byte name, vm, vr, syngodt, nitems, xx (4 bytes each), then items of
            # four int32 (the second is the value length) and the value. A count > 1 = mosaic.
            nitems = int.from_bytes(raw[marker + 76 : marker + 80], "little")
            if nitems > 0:
                item_length = int.from_bytes(raw[marker + 88 : marker + 92], "little")
                value = raw[marker + 100 : marker + 100 + item_length].strip(b"\x00 ")
                return bool(value) and value not in (b"0", b"1")
    return False


def series_frames(series: Series) -> list[Frame]:
    """All frames of a series, classic and enhanced alike (headers only)."""
    frames: list[Frame] = []
    for index, instance in enumerate(series.instances):
        ds = instance.dataset
        if _is_enhanced(ds):
            frames.extend(_enhanced_frames(index, ds))
        elif int(ds.get("NumberOfFrames") or 1) > 1:
            raise SeriesRejected(
                Code.UNSUPPORTED_MULTIFRAME,
                f"{instance.source}: {ds.NumberOfFrames} frames but no per-frame functional "
                "groups, so no position per frame",
            )
        else:
            frames.append(_classic_frame(index, ds))
    return frames
