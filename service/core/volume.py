"""One series → one 3D volume: sorted slices, physical intensities, affine, slice provenance.

Sorting, spacing regularity and the affine come from highdicom
(:func:`highdicom.spatial.get_volume_positions`, :meth:`highdicom.Volume.from_attributes`), the
same code behind ``highdicom.get_volume_from_series``; this module adds what that function does
not give: a typed reason when a series is not a volume (gap, irregular spacing, shear), per-frame
rescale for enhanced multi-frame images, and which source SOP instance (and frame) each slice
came from, so overlays can be written back against the source images.

Pixels are decoded exactly once per frame, straight into the output array:

* stored values → ``value * RescaleSlope + RescaleIntercept`` (per frame; float32 result);
* pydicom masks bits above BitsStored and sign-extends signed data (12-bit MR is common);
* MONOCHROME1 is inverted over the stored range, ``lo + hi - value``, so that high values are
  bright as in MONOCHROME2 (warning ``monochrome1_inverted``); the model expects bright lesions;
* a JPEG-family frame without its end marker is a decode failure: libjpeg would silently
  return garbage for a truncated stream.

The array is ``(slices, rows, columns)``: axis 0 runs along the slice normal (right-handed with
the image rows/columns), axis 1 down the image rows, axis 2 along the columns, exactly as
highdicom's :class:`~highdicom.Volume`. ``affine_lps`` maps those indices to DICOM patient
millimetres (LPS); that pair is what :func:`service.core.preprocess.preprocess` takes.

This is the one place that decides whether a series is one 3D volume: :func:`check_series`
(everything that needs no sorted positions) and the sort (spacing, gaps, shear) raise
:class:`~service.core.series.SeriesRejected` with a :class:`~service.core.codes.Code`;
:func:`convert` turns that into a :class:`~service.core.series.Rejection` on the result. Rules
that are policy, not physics (documented in the README):

* **Duplicates.** The same SOP Instance UID twice is dropped (warning ``duplicate_instance``).
  Several *different* instances at one position are a 4D series (rejected, ``multi_volume_4d``)
  when they differ in echo, temporal position, b-value or trigger time, when *every* position
  holds the same number k > 1 of them (k volumes), or when any position holds more than two.
  Otherwise, a few positions acquired twice, the newest one (highest AcquisitionNumber, then
  InstanceNumber) is kept: warning ``duplicate_slices``.
* **Same position / orientation tolerances.** Positions closer than 0.01 mm are the same
  position; ImageOrientationPatient components may differ by up to 1e-3 (about 0.06°).
* **Spacing.** Slice spacings may vary by 1 % of the spacing (highdicom's default relative
  tolerance); slices must be stacked along the normal within 1e-3 of the dot product (≈ 2.6°).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import highdicom
import numpy as np
import numpy.typing as npt
from highdicom.spatial import get_volume_positions
from pydicom.encaps import generate_frames
from pydicom.pixels.utils import iter_pixels, pixel_array
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from service.core.codes import Code
from service.core.flair import selection_attributes
from service.core.reading import Notice, Skipped
from service.core.series import (
    Frame,
    IngestResult,
    Rejection,
    Series,
    SeriesRejected,
    ingest,
    ingest_folder,
    is_mosaic,
    series_frames,
)

POSITION_DECIMALS = 2  # positions equal to 0.01 mm are one slice position
ORIENTATION_TOL = 1e-3  # max abs difference between direction cosines of one series
PIXEL_SPACING_RTOL = 1e-3
SPACING_RTOL = 0.01
PERPENDICULAR_TOL = 1e-3
# LPS → RAS (and back): flip x and y
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Per LPS axis: the letter an index increase points towards, for + and − directions.
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class SliceSource:
    """Where slice k of the volume came from."""

    sop_instance_uid: str
    frame_number: int | None  # 1-based, multi-frame instances only
    instance_number: int | None
    source: str  # file path or the name given to a bytes part


@dataclass(frozen=True)
class SeriesInfo:
    """Header facts about a series (kept without the pixel data)."""

    study_instance_uid: str
    series_instance_uid: str
    series_description: str
    modality: str
    n_instances: int
    transfer_syntaxes: tuple[str, ...]
    attributes: Mapping[str, Any]  # see service.core.flair.selection_attributes

    @classmethod
    def of(cls, series: Series) -> SeriesInfo:
        return cls(
            study_instance_uid=series.study_instance_uid,
            series_instance_uid=series.series_instance_uid,
            series_description=series.series_description,
            modality=series.modality,
            n_instances=series.n_instances,
            transfer_syntaxes=tuple(series.transfer_syntaxes),
            attributes=selection_attributes(series.first),
        )


@dataclass(frozen=True)
class SeriesVolume:
    """A 3D volume in physical intensities with its geometry and per-slice provenance."""

    array: FloatArray  # (slices, rows, columns), float32
    affine_lps: npt.NDArray[np.float64]  # 4x4: (k, r, c, 1) → LPS mm
    spacing_mm: tuple[float, float, float]  # along axes 0, 1, 2
    slices: tuple[SliceSource, ...]  # len == array.shape[0]
    info: SeriesInfo
    warnings: tuple[Notice, ...] = ()
    frame_of_reference_uid: str | None = None

    @property
    def affine_ras(self) -> npt.NDArray[np.float64]:
        return LPS_TO_RAS @ self.affine_lps

    @property
    def orientation(self) -> str:
        """Per array axis, the patient direction its index increases towards (as
        :data:`service.core.preprocess.CANONICAL_ORIENTATION`, e.g. ``"SPL"`` for axial)."""
        return orientation_code(self.affine_lps)

    def to_highdicom(self) -> highdicom.Volume:
        return highdicom.Volume(
            array=self.array,
            affine=self.affine_lps,
            coordinate_system="PATIENT",
            frame_of_reference_uid=self.frame_of_reference_uid,
        )


def orientation_code(affine_lps: npt.ArrayLike) -> str:
    """Three letters (L/R, P/A, S/I), one per array axis: the nearest patient direction."""
    directions = np.asarray(affine_lps, dtype=np.float64)[:3, :3]
    letters = []
    for axis in range(3):
        column = directions[:, axis]
        lps_axis = int(np.argmax(np.abs(column)))
        letters.append(_AXIS_LETTERS[lps_axis][0 if column[lps_axis] > 0 else 1])
    return "".join(letters)


# --------------------------------------------------------------------------------------------
# Is this one volume: the checks that do not need sorted positions, then the sort (spacing, gaps)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesPlan:
    """The frames that make the volume (one per position, unsorted) and the warnings so far."""

    frames: list[Frame]
    warnings: list[Notice]


def _join(values: Iterable[str]) -> str:
    return "\\".join(values)


def _distinct(values: Iterable[Any]) -> list[Any]:
    return sorted({v for v in values if v is not None}, key=str)


def _position_key(position: tuple[float, float, float]) -> tuple[float, ...]:
    return tuple(round(v, POSITION_DECIMALS) + 0.0 for v in position)


def check_series(series: Series) -> SeriesPlan:
    """Every check that does not need sorted slice positions; raises :class:`SeriesRejected`."""
    modality = series.modality
    if modality != "MR":
        raise SeriesRejected(
            Code.NOT_MR, f"Modality is {modality or 'missing'!s}, flaircad reads MR only"
        )
    for instance in series.instances:
        ds = instance.dataset
        if 0x00280002 in ds and int(ds.SamplesPerPixel or 1) != 1:
            raise SeriesRejected(
                Code.UNSUPPORTED_PIXELS,
                f"{instance.source}: {ds.SamplesPerPixel} samples per pixel "
                f"({ds.get('PhotometricInterpretation')}); MR volumes are greyscale",
            )
        if is_mosaic(ds):
            image_type = "\\".join(ds.get("ImageType") or [])
            raise SeriesRejected(
                Code.MOSAIC,
                f"{instance.source}: Siemens/UIH mosaic (ImageType {image_type}): many slices "
                f"tiled in one {ds.Rows}x{ds.Columns} image, one file per volume; mosaic EPI is "
                "not converted",
            )
    warnings_: list[Notice] = []
    no_preamble = sum(1 for i in series.instances if i.notices)
    if no_preamble:
        warnings_.append(Notice(
            Code.NO_PREAMBLE, f"{no_preamble} file(s) without preamble/'DICM' were read"
        ))

    frames = series_frames(series)
    # The same instance received twice (re-sent, or the same file copied) is one instance.
    unique: dict[tuple[str, int | None], Frame] = {}
    for frame in frames:
        unique.setdefault((frame.sop_instance_uid, frame.frame_number), frame)
    if len(unique) < len(frames):
        warnings_.append(Notice(
            Code.DUPLICATE_INSTANCE,
            f"{len(frames) - len(unique)} image(s) received more than once were ignored",
        ))
        frames = list(unique.values())

    missing = [
        name
        for name, attr in (
            ("ImagePositionPatient", "position"),
            ("ImageOrientationPatient", "orientation"),
            ("PixelSpacing", "pixel_spacing"),
        )
        if any(getattr(f, attr) is None for f in frames)
    ]
    if missing:
        raise SeriesRejected(
            Code.MISSING_GEOMETRY,
            f"{' and '.join(missing)} missing or malformed in some images: slice positions "
            "cannot be known",
        )
    matrices = Counter((f.rows, f.columns) for f in frames)
    if len(matrices) > 1:
        described = ", ".join(f"{r}x{c} ({n})" for (r, c), n in sorted(matrices.items()))
        raise SeriesRejected(Code.MIXED_MATRIX, f"images of different sizes: {described}")
    reference = frames[0].orientation
    assert reference is not None
    if any(
        max(abs(a - b) for a, b in zip(f.orientation or (), reference, strict=True))
        > ORIENTATION_TOL
        for f in frames
    ):
        kinds = len({tuple(round(v, 2) for v in f.orientation or ()) for f in frames})
        raise SeriesRejected(
            Code.MIXED_ORIENTATION,
            f"{kinds} different image orientations in one series (e.g. a multi-plane "
            "localizer); a volume needs one",
        )
    spacing0 = frames[0].pixel_spacing
    assert spacing0 is not None
    if any(
        not math.isclose(a, b, rel_tol=PIXEL_SPACING_RTOL)
        for f in frames
        for a, b in zip(f.pixel_spacing or (), spacing0, strict=True)
    ):
        raise SeriesRejected(Code.MIXED_PIXEL_SPACING, "PixelSpacing differs between images")
    image_types = Counter(f.image_type for f in frames)
    if len(image_types) > 1:
        described = "; ".join(
            f"{_join(t) or '(none)'} ({n})" for t, n in sorted(image_types.items())
        )
        raise SeriesRejected(
            Code.MIXED_IMAGE_TYPE,
            f"images of different types in one series (e.g. magnitude and phase or a field "
            f"map): {described}",
        )

    frames, duplicate_notice = _one_frame_per_position(frames)
    if duplicate_notice is not None:
        warnings_.append(duplicate_notice)
    if len(frames) < 2:
        raise SeriesRejected(Code.SINGLE_SLICE, "one slice is not a 3D volume")
    return SeriesPlan(frames=frames, warnings=warnings_)


def _one_frame_per_position(frames: list[Frame]) -> tuple[list[Frame], Notice | None]:
    by_position: dict[tuple[float, ...], list[Frame]] = defaultdict(list)
    for frame in frames:
        assert frame.position is not None
        by_position[_position_key(frame.position)].append(frame)
    counts = Counter(len(group) for group in by_position.values())
    if max(counts) == 1:
        return frames, None

    repeated = [group for group in by_position.values() if len(group) > 1]
    for attribute, what in (
        ("echo", "multi-echo: echoes"),
        ("temporal", "time series: temporal positions"),
        ("b_value", "diffusion: b-values"),
        ("trigger", "cardiac phases: trigger times"),
    ):
        values = _distinct(getattr(f, attribute) for group in repeated for f in group)
        if any(len(_distinct(getattr(f, attribute) for f in group)) > 1 for group in repeated):
            shown = ", ".join(str(v) for v in values[:8]) + (" ..." if len(values) > 8 else "")
            raise SeriesRejected(
                Code.MULTI_VOLUME_4D,
                f"{len(frames)} images at {len(by_position)} positions, {what} {shown}; "
                "a 4D series is not one 3D volume",
            )
    per_position = max(counts)
    if len(counts) == 1 or per_position > 2:
        raise SeriesRejected(
            Code.MULTI_VOLUME_4D,
            f"{len(frames)} images at {len(by_position)} positions "
            f"({'exactly' if len(counts) == 1 else 'up to'} {per_position} per position): "
            "several volumes (repetitions/time points) in one series",
        )

    def newest(frame: Frame) -> tuple[int, int]:
        return (frame.acquisition_number or -1, frame.instance_number or -1)

    kept = [max(group, key=newest) for group in by_position.values()]
    notice = Notice(
        Code.DUPLICATE_SLICES,
        f"{len(repeated)} position(s) held 2 images; kept the newest (AcquisitionNumber, then "
        "InstanceNumber) of each",
    )
    return kept, notice


def _sort_frames(frames: list[Frame]) -> tuple[float, list[int]]:
    """highdicom's sort; when it says 'not a volume', find out why (gap, spacing, shear)."""
    positions = np.array([f.position for f in frames], dtype=np.float64)
    orientation = frames[0].orientation
    assert orientation is not None  # check_series rejected frames without one
    # highdicom's hints ask for sequences; it takes an array as well (np.asarray inside)
    position_rows = cast("Sequence[Sequence[float]]", positions)
    spacing, indices = get_volume_positions(
        position_rows, orientation, rtol=SPACING_RTOL, perpendicular_tol=PERPENDICULAR_TOL
    )
    if spacing is not None and indices is not None:
        return float(spacing), [int(i) for i in indices]

    normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    distances = positions @ normal
    order = np.argsort(distances)
    offsets = positions[order] - positions[order[0]]
    lengths = np.linalg.norm(offsets[1:], axis=1)
    along = np.abs(offsets[1:] @ normal) / np.where(lengths > 0, lengths, 1.0)
    if np.any(np.abs(along - 1.0) > PERPENDICULAR_TOL):
        angle = float(np.degrees(np.arccos(np.clip(along.min(), -1.0, 1.0))))
        raise SeriesRejected(
            Code.NON_ORTHOGONAL_STACK,
            f"slices are not stacked along their normal (up to {angle:.1f}° off: gantry tilt "
            "or sheared acquisition)",
        )
    steps = np.diff(distances[order])
    gap_spacing, _ = get_volume_positions(
        position_rows,
        orientation,
        rtol=SPACING_RTOL,
        perpendicular_tol=PERPENDICULAR_TOL,
        allow_missing_positions=True,
    )
    if gap_spacing is not None:
        expected = round(float((distances.max() - distances.min()) / gap_spacing)) + 1
        raise SeriesRejected(
            Code.MISSING_SLICES,
            f"{expected - len(frames)} slice(s) missing: {len(frames)} slices over "
            f"{expected} positions {gap_spacing:.3g} mm apart (largest gap "
            f"{steps.max():.3g} mm)",
        )
    raise SeriesRejected(
        Code.IRREGULAR_SPACING,
        f"slice spacing varies from {steps.min():.4g} to {steps.max():.4g} mm (tolerance "
        f"{SPACING_RTOL:.0%} of the spacing)",
    )


def _monochrome1_range(ds: Any) -> tuple[int, int]:
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


_NATIVE_LITTLE_ENDIAN = {
    str(ImplicitVRLittleEndian),
    str(ExplicitVRLittleEndian),
    str(DeflatedExplicitVRLittleEndian),  # inflated by pydicom when the file is read
}


def native_frame(ds: Any, rows: int, columns: int) -> npt.NDArray[Any] | None:
    """A view on uncompressed little-endian single-frame pixel data, masked to BitsStored as
    pydicom does (None when another path is needed). pydicom's general decoder costs about
    as much per frame as parsing the header, so the common case skips it; tests check the
    two agree, 12-bit and signed data included."""
    if str(ds.file_meta.TransferSyntaxUID) not in _NATIVE_LITTLE_ENDIAN or "PixelData" not in ds:
        return None
    bits_allocated = int(ds.BitsAllocated)
    if bits_allocated not in (8, 16, 32):
        return None
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_allocated // 8}")
    pixels = np.frombuffer(ds.PixelData, dtype=dtype, count=rows * columns)
    bits_stored = int(ds.get("BitsStored") or bits_allocated)
    if bits_stored < bits_allocated:
        if signed:
            shift = bits_allocated - bits_stored
            pixels = (pixels << shift) >> shift  # arithmetic shift: sign extension
        else:
            pixels = pixels & dtype.type((1 << bits_stored) - 1)
    return pixels.reshape(rows, columns)


# JPEG, JPEG-LS, JPEG 2000 and HTJ2K streams all end with the 0xFFD9 marker (EOI / EOC).
_JPEG_FAMILY = {f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70, 80, 81, 90, 91, 201, 202, 203)}


def _check_complete_frames(ds: Any, frame_numbers: list[int]) -> None:
    """libjpeg decodes a truncated JPEG-LS / lossless stream without an error, into garbage;
    a missing end-of-image marker is how such a truncation shows, so it is a decode failure."""
    if str(ds.file_meta.TransferSyntaxUID) not in _JPEG_FAMILY:
        return
    wanted = set(frame_numbers)
    n_frames = int(ds.get("NumberOfFrames") or 1)
    for number, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=n_frames), 1):
        if number in wanted and not frame.rstrip(b"\x00").endswith(b"\xff\xd9"):
            raise ValueError(f"frame {number}: compressed stream has no end-of-image marker "
                             "(truncated?)")


def _decode_into(
    series: Series, frames: list[Frame], indices: list[int], out: FloatArray
) -> bool:
    """Decode each needed frame once, rescale it, write it at its slice; True if MONOCHROME1."""
    by_instance: dict[int, list[tuple[Frame, int]]] = defaultdict(list)
    for frame, index in zip(frames, indices, strict=True):
        by_instance[frame.instance].append((frame, index))
    inverted = False
    for instance_index, members in by_instance.items():
        instance = series.instances[instance_index]
        ds = instance.dataset
        invert = str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
        inverted |= invert
        try:
            _check_complete_frames(ds, [m[0].frame_number or 1 for m in members])
            if members[0][0].frame_number is None:
                fast = native_frame(ds, out.shape[1], out.shape[2])
                decoded: Iterable[Any] = [fast if fast is not None else pixel_array(ds)]
            else:
                members.sort(key=lambda m: m[0].frame_number or 0)
                decoded = iter_pixels(ds, indices=[(m[0].frame_number or 1) - 1 for m in members])
            for (frame, index), pixels in zip(members, decoded, strict=True):
                if pixels.shape != out.shape[1:]:
                    raise ValueError(f"decoded shape {pixels.shape}, expected {out.shape[1:]}")
                values = pixels * frame.slope + frame.intercept if (
                    frame.slope != 1.0 or frame.intercept != 0.0
                ) else pixels
                if invert:
                    low, high = _monochrome1_range(ds)
                    values = (low + high) * frame.slope + 2 * frame.intercept - values
                out[index] = values
        except SeriesRejected:
            raise
        except Exception as error:  # codec missing, corrupt stream, wrong length, ...
            raise SeriesRejected(
                Code.DECODE_FAILED,
                f"{instance.source} ({instance.transfer_syntax.name}): "
                f"{type(error).__name__}: {error}",
            ) from error
    return inverted


def build_volume(series: Series) -> SeriesVolume:
    """The volume of one series; raises :class:`SeriesRejected` with a typed reason."""
    plan = check_series(series)
    frames = plan.frames
    spacing, indices = _sort_frames(frames)
    first = frames[0]
    out = np.empty((len(frames), first.rows, first.columns), dtype=np.float32)
    warnings = list(plan.warnings)
    if _decode_into(series, frames, indices, out):
        warnings.append(Notice(
            Code.MONOCHROME1_INVERTED, "MONOCHROME1 pixels inverted so that high values are bright"
        ))

    by_slice = sorted(zip(indices, frames, strict=True), key=lambda pair: pair[0])
    origin = by_slice[0][1]
    assert origin.position is not None and origin.orientation is not None
    assert origin.pixel_spacing is not None
    frame_of_reference = series.instances[origin.instance].dataset.get("FrameOfReferenceUID")
    geometry = highdicom.Volume.from_attributes(
        array=out,
        image_position=origin.position,
        image_orientation=origin.orientation,
        pixel_spacing=origin.pixel_spacing,
        spacing_between_slices=spacing,
        coordinate_system="PATIENT",
        frame_of_reference_uid=str(frame_of_reference) if frame_of_reference else None,
    )
    affine = np.asarray(geometry.affine, dtype=np.float64)
    # Self-check: every slice's own ImagePositionPatient is where the affine puts it.
    predicted = (affine @ np.array([[k, 0.0, 0.0, 1.0] for k, _ in by_slice]).T)[:3].T
    actual = np.array([f.position for _, f in by_slice])
    if np.abs(predicted - actual).max() > SPACING_RTOL * spacing + 1e-3:
        raise SeriesRejected(
            Code.IRREGULAR_SPACING,
            f"slice positions deviate up to {np.abs(predicted - actual).max():.3g} mm from a "
            "regular grid",
        )
    slices = tuple(
        SliceSource(
            sop_instance_uid=f.sop_instance_uid,
            frame_number=f.frame_number,
            instance_number=f.instance_number,
            source=series.instances[f.instance].source,
        )
        for _, f in by_slice
    )
    return SeriesVolume(
        array=out,
        affine_lps=affine,
        spacing_mm=(float(spacing), origin.pixel_spacing[0], origin.pixel_spacing[1]),
        slices=slices,
        info=SeriesInfo.of(series),
        warnings=tuple(warnings),
        frame_of_reference_uid=str(frame_of_reference) if frame_of_reference else None,
    )


@dataclass(frozen=True)
class SeriesOutcome:
    """A series that converted (``volume``) or did not (``rejection``); never both."""

    info: SeriesInfo
    volume: SeriesVolume | None = None
    rejection: Rejection | None = None
    warnings: tuple[Notice, ...] = field(default=())


def convert(series: Series) -> SeriesOutcome:
    """:func:`build_volume` with every failure turned into a :class:`Rejection`."""
    try:
        info = SeriesInfo.of(series)
    except Exception as error:  # a header too broken even to describe
        info = SeriesInfo(series.study_instance_uid, series.series_instance_uid, "", "",
                          series.n_instances, tuple(series.transfer_syntaxes), {})
        return SeriesOutcome(info, rejection=Rejection(
            str(Code.CONVERSION_FAILED), f"{type(error).__name__}: {error}"))
    try:
        volume = build_volume(series)
    except SeriesRejected as rejected:
        return SeriesOutcome(info, rejection=rejected.rejection)
    except Exception as error:  # never let hostile input crash the caller
        return SeriesOutcome(info, rejection=Rejection(
            str(Code.CONVERSION_FAILED), f"{type(error).__name__}: {error}"))
    return SeriesOutcome(info, volume=volume, warnings=volume.warnings)


def convert_all(result: IngestResult) -> tuple[list[SeriesOutcome], list[Skipped]]:
    return [convert(series) for series in result.series], result.skipped


def load_folder(folder: Path | str) -> tuple[list[SeriesOutcome], list[Skipped]]:
    """Every series under ``folder``, converted or rejected, and the files skipped."""
    return convert_all(ingest_folder(folder))


def load_sources(sources: Iterable[Any]) -> tuple[list[SeriesOutcome], list[Skipped]]:
    """As :func:`load_folder`, from paths, bytes (e.g. STOW-RS parts) or binary files."""
    return convert_all(ingest(sources))


def load_series_volume(folder: Path | str) -> SeriesVolume:
    """The one volume in ``folder``; ValueError (with the reason codes) otherwise."""
    outcomes, skipped = load_folder(folder)
    volumes = [o.volume for o in outcomes if o.volume is not None]
    if len(outcomes) == 1 and volumes:
        return volumes[0]
    reasons = [f"{o.info.series_instance_uid}: {o.rejection}" for o in outcomes if o.rejection]
    reasons += [str(s) for s in skipped[:5]]
    raise ValueError(
        f"{folder}: expected one convertible series, found {len(outcomes)} series "
        f"({len(volumes)} convertible)" + ("; " + "; ".join(reasons) if reasons else "")
    )


def nifti_layout(volume: SeriesVolume) -> tuple[FloatArray, npt.NDArray[np.float64]]:
    """The array as NIfTI stores it — (columns, rows, slices), i fastest along the image row —
    and the RAS affine of that order (what nibabel's ``image.affine`` will be)."""
    data = np.transpose(volume.array, (2, 1, 0))
    affine = volume.affine_ras[:, [2, 1, 0, 3]]
    return data, affine


def to_nifti(volume: SeriesVolume) -> Any:
    """A nibabel Nifti1Image (float32 values; integer-valued volumes that fit are stored as
    int16/uint16, losslessly)."""
    import nibabel

    data, affine = nifti_layout(volume)
    rounded = np.rint(data)
    if np.array_equal(rounded, data) and data.size:
        low, high = float(data.min()), float(data.max())
        for dtype in (np.int16, np.uint16):
            info = np.iinfo(dtype)
            if info.min <= low and high <= info.max:
                data = data.astype(dtype)
                break
    image = nibabel.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)  # scanner coordinates
    image.set_sform(affine, code=1)
    return image
