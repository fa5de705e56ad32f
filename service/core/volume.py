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

Tolerances: slice spacings may vary by 1 % of the spacing (highdicom's default relative
tolerance); slices must be stacked along the normal within 1e-3 of the dot product (≈ 2.6°).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom
import numpy as np
import numpy.typing as npt
from highdicom.spatial import get_volume_positions
from pydicom.encaps import generate_frames
from pydicom.pixels import iter_pixels, pixel_array
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from service.core.flair import selection_attributes
from service.core.ingest import (
    Code,
    Frame,
    IngestResult,
    Notice,
    Rejection,
    Series,
    SeriesRejected,
    Skipped,
    check_series,
    ingest,
    ingest_folder,
)

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


def _sort_frames(frames: list[Frame]) -> tuple[float, list[int]]:
    """highdicom's sort; when it says 'not a volume', find out why (gap, spacing, shear)."""
    positions = np.array([f.position for f in frames], dtype=np.float64)
    orientation = frames[0].orientation
    spacing, indices = get_volume_positions(
        positions, orientation, rtol=SPACING_RTOL, perpendicular_tol=PERPENDICULAR_TOL
    )
    if spacing is not None and indices is not None:
        return float(spacing), [int(i) for i in indices]

    normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))  # type: ignore[index]
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
        positions,
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
