"""The DICOM writer: a phantom as an MR Image Storage series, and its truth as a Segmentation.

:func:`write_dicom_series` writes one file per slice, byte-for-byte reproducible (UIDs derive
from label, seed and what differs from the defaults; dates and times are fixed), optionally in a
lossless transfer syntax (:data:`COMPRESSIONS`). :func:`write_lesion_seg` stores a series'
:class:`~service.phantoms.geometry.SeriesTruth` lesion mask as a binary DICOM SEG; highdicom is
imported there alone, so the rest of the generator needs numpy and pydicom only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)
from pydicom.valuerep import DA, TM

from service.phantoms.anatomy import Anatomy
from service.phantoms.geometry import (
    VARIANTS,
    SeriesTruth,
    _axial_phantom,
    _ds,
    _noise_rng,
    _plan,
    _series_uid,
    _truth,
    _uid,
)
from service.phantoms.rendering import _render
from service.phantoms.shift import Shift

COMPRESSIONS: dict[str, UID] = {
    "jpegls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
    "rle": RLELossless,
    "jpeg-lossless": JPEGLosslessSV1,
}

_PROTOCOLS: dict[str, dict[str, Any]] = {
    "axial": {
        "SeriesDescription": "AX T2 FLAIR",
        "ProtocolName": "AX T2 FLAIR",
        "SequenceName": "*tir2d1_16",
        "MRAcquisitionType": "2D",
        "RepetitionTime": "9000",
        "EchoTime": "100",
        "InversionTime": "2500",
        "FlipAngle": "150",
        "EchoTrainLength": 16,
        "SeriesNumber": 3,
        "SeriesTime": "101500",
    },
    "sagittal": {
        "SeriesDescription": "SAG 3D FLAIR",
        "ProtocolName": "SAG 3D FLAIR",
        "SequenceName": "*spcir3d1_282",
        "MRAcquisitionType": "3D",
        "RepetitionTime": "5000",
        "EchoTime": "390",
        "InversionTime": "1800",
        "FlipAngle": "120",
        "EchoTrainLength": 282,
        "SeriesNumber": 5,
        "SeriesTime": "103000",
    },
}
# the oblique series is the axial protocol with a tilted slab
_PROTOCOLS["oblique"] = {
    **_PROTOCOLS["axial"],
    "SeriesDescription": "AX T2 FLAIR OBL",
    "ProtocolName": "AX T2 FLAIR OBL",
    "SeriesNumber": 4,
    "SeriesTime": "102200",
}
_STUDY_DATE, _STUDY_TIME = "20240115", "100000"


def _jpeg_lossless_unavailable() -> str | None:
    from pydicom.pixels.encoders.base import get_encoder

    try:
        encoder = get_encoder(JPEGLosslessSV1)
    except NotImplementedError:
        return ("pydicom cannot encode JPEG Lossless SV1 (1.2.840.10008.1.2.4.70): it has no "
                "encoder for that transfer syntax; use 'jpegls', 'jpeg2000' or 'rle'")
    if not encoder.is_available:
        return (f"no JPEG Lossless SV1 encoder plugin is installed "
                f"({encoder.missing_dependencies}); use 'jpegls', 'jpeg2000' or 'rle'")
    return None


@overload
def write_dicom_series(
    label: str, seed: int, out_dir: Path, *, variant: str = ..., slices: int | None = ...,
    compress: str | None = ..., shift: Shift | None = ..., matrix: int | None = ...,
    pixel_mm: float | None = ..., slice_thickness_mm: float | None = ...,
    truth: Literal[False] = ...,
) -> list[Path]: ...


@overload
def write_dicom_series(
    label: str, seed: int, out_dir: Path, *, variant: str = ..., slices: int | None = ...,
    compress: str | None = ..., shift: Shift | None = ..., matrix: int | None = ...,
    pixel_mm: float | None = ..., slice_thickness_mm: float | None = ...,
    truth: Literal[True],
) -> tuple[list[Path], SeriesTruth]: ...


def write_dicom_series(
    label: str,
    seed: int,
    out_dir: Path,
    *,
    variant: str = "axial",
    slices: int | None = None,
    compress: str | None = None,
    shift: Shift | None = None,
    matrix: int | None = None,
    pixel_mm: float | None = None,
    slice_thickness_mm: float | None = None,
    truth: bool = False,
) -> list[Path] | tuple[list[Path], SeriesTruth]:
    """Write the phantom as a classic single-frame MR Image Storage series, one file per slice
    (``IM0001.dcm`` …), byte-for-byte reproducible.

    All variants of one (label, seed) share the study and the frame of reference: they are
    the same head in the same scanner coordinates, which lets multi-series code be tested.
    ``compress`` picks a lossless transfer syntax (see ``COMPRESSIONS``); SOP Instance UIDs do
    not change with it, since a lossless transfer syntax does not make a new image.

    ``shift`` moves the phantom off the training distribution (the protocol header stays
    FLAIR's, even for a T1 contrast); ``matrix``, ``pixel_mm`` and ``slice_thickness_mm``
    change the axial grid (axial only; the axial series is always exactly what
    :func:`generate_phantom` renders for the same arguments). Series and instance UIDs change
    with a non-default shift or grid. With ``truth`` it returns ``(paths, SeriesTruth)``: the
    masks from the same rendering pass."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if compress is not None and compress not in COMPRESSIONS:
        raise ValueError(f"compress must be None or one of {tuple(COMPRESSIONS)}, got {compress!r}")
    if compress == "jpeg-lossless" and (why := _jpeg_lossless_unavailable()) is not None:
        raise ValueError(why)
    plan = _plan(label, seed, variant, slices, shift, matrix, pixel_mm, slice_thickness_mm)
    anatomy, geometry = plan.anatomy, plan.geometry
    n_slices = len(geometry.positions)
    if variant == "axial":
        phantom = _axial_phantom(anatomy, geometry)
        volume, mask, brain = phantom.volume, phantom.lesion_mask, phantom.brain_mask
    else:
        volume, mask, _, brain = _render(anatomy, geometry.points(),
                                         _noise_rng(label, seed, variant), brain=truth)

    peak = float(volume.max())
    slope_text = _ds(max(peak, 1.0) / 60000.0) if peak > 0 else "1"
    slope = float(slope_text)
    stored = np.clip(np.rint(volume / slope), 0, 65535).astype(np.uint16)
    high = float(np.percentile(volume, 99.5))
    window_center, window_width = _ds(round(high * 0.5, 1)), _ds(round(max(high, 1.0), 1))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    protocol = _PROTOCOLS[variant]
    study_uid = _uid(label, seed, "study")
    frame_uid = _uid(label, seed, "frame-of-reference")
    series_uid = _series_uid(label, seed, plan)
    iop = [_ds(float(v)) for v in (*geometry.row_dir, *geometry.col_dir)]
    normal = geometry.normal
    paths = []
    for k in range(n_slices):
        ds = _base_dataset(label, seed, anatomy, protocol)
        sop_uid = _uid(label, seed, *plan.uid_parts, "instance", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.InstanceNumber = k + 1
        position = geometry.positions[k]
        ds.ImagePositionPatient = [_ds(float(v)) for v in position]
        ds.ImageOrientationPatient = iop
        ds.SliceLocation = _ds(float(position @ normal))
        ds.PixelSpacing = [_ds(geometry.pixel), _ds(geometry.pixel)]
        ds.SliceThickness = _ds(geometry.thickness)
        ds.SpacingBetweenSlices = _ds(geometry.spacing)
        ds.Rows, ds.Columns = geometry.rows, geometry.cols
        ds.AcquisitionMatrix = [0, geometry.cols, geometry.rows, 0]
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope_text, "0", "US"
        ds.WindowCenter, ds.WindowWidth = window_center, window_width
        pixels = np.ascontiguousarray(stored[k])
        ds.PixelData = pixels.tobytes()
        if compress is not None:
            ds.compress(COMPRESSIONS[compress], pixels, generate_instance_uid=False)
        path = out_dir / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    if not truth:
        return paths
    assert brain is not None
    return paths, _truth(label, seed, plan, mask, brain)


def _base_dataset(label: str, seed: int, anatomy: Anatomy, protocol: dict[str, Any]) -> Dataset:
    """Header elements shared by every instance of a series."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = _STUDY_DATE
    ds.StudyTime = _STUDY_TIME
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = protocol["SeriesTime"]
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.Manufacturer = "flaircad phantom"
    ds.ManufacturerModelName = "analytic FLAIR phantom"
    ds.InstitutionName = "synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MRI BRAIN"
    ds.SeriesDescription = protocol["SeriesDescription"]
    ds.PatientName = f"PHANTOM^{label}^{seed:04d}"
    ds.PatientID = f"PHANTOM-{label}-{seed:04d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = anatomy.sex
    ds.BodyPartExamined = "BRAIN"
    ds.ScanningSequence = ["SE", "IR"]
    ds.SequenceVariant = ["SK", "SP", "MP"]
    ds.ScanOptions = ["IR"]
    ds.MRAcquisitionType = protocol["MRAcquisitionType"]
    ds.SequenceName = protocol["SequenceName"]
    ds.RepetitionTime = protocol["RepetitionTime"]
    ds.EchoTime = protocol["EchoTime"]
    ds.InversionTime = protocol["InversionTime"]
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "123.2"
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = "3"
    ds.EchoTrainLength = protocol["EchoTrainLength"]
    ds.PixelBandwidth = "250"
    ds.ProtocolName = protocol["ProtocolName"]
    ds.InPlanePhaseEncodingDirection = "ROW"
    ds.FlipAngle = protocol["FlipAngle"]
    ds.PatientPosition = "HFS"
    ds.StudyID = "1"
    ds.SeriesNumber = protocol["SeriesNumber"]
    ds.AcquisitionNumber = 1
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds



# --------------------------------------------------------------------------------------------
# Ground truth as DICOM Segmentation
# --------------------------------------------------------------------------------------------


_SEG_SERIES_DESCRIPTION = "flaircad phantom lesion truth - RESEARCH ONLY"
_SEG_TIME = "110000"


def write_lesion_seg(series_files: list[Path], truth: SeriesTruth, out_path: Path) -> Path:
    """Write ``truth.lesion_mask`` as a binary DICOM Segmentation (highdicom) of the phantom
    series in ``series_files``, byte-for-byte reproducible.

    One segment, a Lesion (SCT 52988006) of category Morphologically Altered Structure
    (SCT 49755003), is the generator's exact ground truth: no algorithm segmented the image.
    Frames reference the phantom's own instances (matched by InstanceNumber: truth index k is
    instance k + 1); frames without lesion are omitted, unless no frame has any. Same
    patient, study and frame of reference as the series; the UIDs derive from the series'.
    Write it outside the series' folder (it is a series of its own)."""
    import highdicom as hd
    from pydicom import dcmread
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    sources = sorted((dcmread(Path(p), stop_before_pixels=True) for p in series_files),
                     key=lambda ds: int(ds.get("InstanceNumber") or 0))
    n, rows, cols = truth.shape
    if [int(ds.get("InstanceNumber") or 0) for ds in sources] != list(range(1, n + 1)):
        raise ValueError(f"series_files must be the {n} instances of the truth's series "
                         f"(instance numbers 1..{n}), got {len(sources)} files")
    for ds in sources:
        if ds.get("SeriesInstanceUID") != truth.series_instance_uid:
            raise ValueError(f"{ds.get('SOPInstanceUID')} is not in the series the truth "
                             f"describes ({truth.series_instance_uid})")
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise ValueError(f"instance {ds.InstanceNumber} is {ds.Rows}x{ds.Columns}, the "
                             f"truth {rows}x{cols}")

    label, seed = truth.label, truth.seed
    parts = ("lesion-seg", truth.series_instance_uid)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Lesion",
        segmented_property_category=Code("49755003", "SCT", "Morphologically Altered Structure"),
        segmented_property_type=Code("52988006", "SCT", "Lesion"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="flaircad phantom generator (exact ground truth)",
            family=codes.cid7162.ManualProcessing,  # hand-written rules, no segmentation
            version="1",
        ),
        tracking_id="phantom lesion truth",
        tracking_uid=_uid(label, seed, *parts, "tracking"),
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=np.ascontiguousarray(truth.lesion_mask, dtype=bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=_uid(label, seed, *parts, "series"),
        series_number=int(sources[0].get("SeriesNumber") or 0) + 100,
        sop_instance_uid=_uid(label, seed, *parts, "instance"),
        instance_number=1,
        manufacturer="flaircad phantom",
        manufacturer_model_name="analytic FLAIR phantom",
        software_versions="flaircad phantoms",
        device_serial_number="0",
        content_description="exact lesion ground truth of the synthetic phantom",
        content_label="LESION_TRUTH",
        # all frames when there is no lesion at all (highdicom would warn and do so anyway)
        omit_empty_frames=bool(truth.lesion_mask.any()),
        series_description=_SEG_SERIES_DESCRIPTION,
        series_date=_STUDY_DATE,
        series_time=_SEG_TIME,
        content_date=_STUDY_DATE,
        content_time=_SEG_TIME,
    )
    # highdicom stamps the wall clock and a random dimension organisation UID: fix them
    seg.InstanceCreationDate, seg.InstanceCreationTime = DA(_STUDY_DATE), TM(_SEG_TIME)
    dimension_uid = _uid(label, seed, *parts, "dimension-organization")
    for element in seg.iterall():
        if element.keyword == "DimensionOrganizationUID":
            element.value = dimension_uid
        elif element.keyword == "ContributionDateTime":
            element.value = _STUDY_DATE + _SEG_TIME
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out_path, enforce_file_format=True)
    return out_path
