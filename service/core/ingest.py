"""DICOM in, series out: read files / bytes / folders, group them, and decide what is one 3D volume.

Everything that can go wrong with real-world input ends in a typed outcome, never an exception
that escapes:

* a file that is not a usable DICOM image is **skipped** (:class:`Skipped`, with a code: not
  DICOM, empty, truncated, DICOMDIR, no pixel data, ...);
* a series that cannot be one 3D volume is **rejected** (:class:`SeriesRejected` carrying a
  :class:`Rejection`: 4D, mosaic, mixed orientation, missing slices, not MR, ...);
* where a sensible choice exists, the series goes through with a **warning** (:class:`Notice`).

The codes are stable strings (:class:`Code`); clients may switch on them. Geometry that needs the
slice positions sorted (spacing, gaps) is judged in :mod:`service.core.volume`, which also decodes
the
pixels. Reading here never decodes pixel data: each file is parsed once, its (possibly
compressed) pixel bytes stay as they are until :mod:`service.core.volume` decodes them exactly once.

Rules that are policy, not physics (documented in the README):

* **Duplicates.** The same SOP Instance UID twice is dropped (warning ``duplicate_instance``).
  Several *different* instances at one position are a 4D series (rejected, ``multi_volume_4d``)
  when they differ in echo, temporal position, b-value or trigger time, when *every* position
  holds the same number k > 1 of them (k volumes), or when any position holds more than two.
  Otherwise, a few positions acquired twice, the newest one (highest AcquisitionNumber, then
  InstanceNumber) is kept: warning ``duplicate_slices``.
* **Same position / orientation tolerances.** Positions closer than 0.01 mm are the same
  position; ImageOrientationPatient components may differ by up to 1e-3 (about 0.06°).
* **Memory.** Top-level private binary values over 16 KiB are dropped when a file is read
  (vendor protocol dumps; Siemens' CSA image header excepted): nothing in flaircad reads them
  and on small matrices they would outweigh the pixel data several times.
* **Hostile files.** Checked before and while parsing, because pydicom trusts its input: a
  Deflated Explicit VR file is inflated by pydicom in one ``zlib.decompress`` call, so its
  inflated size is measured first, in bounded steps (``inflated_too_large`` beyond
  :data:`MAX_INFLATED_BYTES`); sequence items cost pydicom about a kilobyte each whatever
  their size, so a file with more than :data:`MAX_SEQUENCE_ITEMS` item tags is refused
  (``too_many_items``); sequences are parsed recursively, so nesting deeper than
  :data:`MAX_SEQUENCE_DEPTH` is refused (``nesting_too_deep``) before anything else recurses
  into it.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
# Private binary values above this size are dropped at read time (see read_instance).
PRIVATE_BLOB_LIMIT = 16 * 1024
POSITION_DECIMALS = 2  # positions equal to 0.01 mm are one slice position
ORIENTATION_TOL = 1e-3  # max abs difference between direction cosines of one series
PIXEL_SPACING_RTOL = 1e-3
# Hostile-input bounds (module docstring). Real MR headers nest 4-5 levels deep (enhanced
# multi-frame functional groups) and carry about 20 items per frame.
MAX_INFLATED_BYTES = 256 * 1024**2
MAX_SEQUENCE_ITEMS = 200_000
MAX_SEQUENCE_DEPTH = 16
DEFLATED_EXPLICIT_VR = "1.2.840.10008.1.2.1.99"


class Code(StrEnum):
    """Stable reason codes. Skips are per file, rejections per series, warnings per series."""

    # files skipped while reading
    EMPTY_FILE = "empty_file"
    NOT_DICOM = "not_dicom"
    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    DICOMDIR = "dicomdir"
    NO_PIXEL_DATA = "no_pixel_data"
    MISSING_UID = "missing_uid"
    INFLATED_TOO_LARGE = "inflated_too_large"
    TOO_MANY_ITEMS = "too_many_items"
    NESTING_TOO_DEEP = "nesting_too_deep"
    # series rejected
    NOT_MR = "not_mr"
    MOSAIC = "mosaic"
    UNSUPPORTED_PIXELS = "unsupported_pixels"
    UNSUPPORTED_MULTIFRAME = "unsupported_multiframe"
    MISSING_GEOMETRY = "missing_geometry"
    MIXED_MATRIX = "mixed_matrix"
    MIXED_ORIENTATION = "mixed_orientation"
    MIXED_PIXEL_SPACING = "mixed_pixel_spacing"
    MIXED_IMAGE_TYPE = "mixed_image_type"
    MULTI_VOLUME_4D = "multi_volume_4d"
    SINGLE_SLICE = "single_slice"
    MISSING_SLICES = "missing_slices"
    IRREGULAR_SPACING = "irregular_spacing"
    NON_ORTHOGONAL_STACK = "non_orthogonal_stack"
    DECODE_FAILED = "decode_failed"
    CONVERSION_FAILED = "conversion_failed"
    # only where the caller requires FLAIR (the API), see service.core.flair
    NOT_FLAIR = "not_flair"
    # warnings (the series still converts)
    NO_PREAMBLE = "no_preamble"
    DUPLICATE_INSTANCE = "duplicate_instance"
    DUPLICATE_SLICES = "duplicate_slices"
    MONOCHROME1_INVERTED = "monochrome1_inverted"


# One line per code, for the README table and for clients; keep in step with the code.
CODE_DESCRIPTIONS: Mapping[Code, str] = {
    Code.EMPTY_FILE: "skip: zero-byte file",
    Code.NOT_DICOM: "skip: not DICOM (no 'DICM' prefix and no readable dataset: PNG, text, ...)",
    Code.TRUNCATED: "skip: the file ends early (pixel data shorter than Rows×Columns×frames)",
    Code.CORRUPT: "skip: has the DICOM prefix but cannot be parsed",
    Code.DICOMDIR: "skip: a DICOMDIR (media directory), not an image",
    Code.NO_PIXEL_DATA: "skip: no Pixel Data (SR, presentation state, header-only file)",
    Code.MISSING_UID: "skip: no Study/Series/SOP Instance UID",
    Code.INFLATED_TOO_LARGE: "skip: a deflated file that inflates beyond 256 MiB (deflate bomb)",
    Code.TOO_MANY_ITEMS: "skip: more than 200 000 sequence items (memory bomb)",
    Code.NESTING_TOO_DEEP: "skip: sequences nested more than 16 levels deep",
    Code.NOT_MR: "reject: Modality is not MR (e.g. CT)",
    Code.MOSAIC: "reject: Siemens/UIH mosaic (many slices tiled in one image)",
    Code.UNSUPPORTED_PIXELS: "reject: colour or multi-sample pixels",
    Code.UNSUPPORTED_MULTIFRAME: "reject: multi-frame object without per-frame geometry",
    Code.MISSING_GEOMETRY: "reject: ImagePositionPatient / ImageOrientationPatient / "
    "PixelSpacing missing or malformed",
    Code.MIXED_MATRIX: "reject: Rows/Columns differ between slices",
    Code.MIXED_ORIENTATION: "reject: slices with different orientations (e.g. a 3-plane localizer)",
    Code.MIXED_PIXEL_SPACING: "reject: PixelSpacing differs between slices",
    Code.MIXED_IMAGE_TYPE: "reject: ImageType differs (e.g. magnitude + phase / field map)",
    Code.MULTI_VOLUME_4D: "reject: several volumes per position (fMRI, DTI, multi-echo, repeats)",
    Code.SINGLE_SLICE: "reject: one slice is not a volume",
    Code.MISSING_SLICES: "reject: gaps in the slice stack (spacing a multiple of the smallest)",
    Code.IRREGULAR_SPACING: "reject: slice spacing varies by more than 1 % of the spacing",
    Code.NON_ORTHOGONAL_STACK: "reject: slices not stacked along their normal (gantry tilt/shear)",
    Code.DECODE_FAILED: "reject: pixel data not decodable (codec missing, corrupt or truncated "
    "compressed stream)",
    Code.CONVERSION_FAILED: "reject: unexpected error while converting (a bug: please report)",
    Code.NOT_FLAIR: "reject (API only): no FLAIR rule matched and the override is off",
    Code.NO_PREAMBLE: "warning: files without the 128-byte preamble/'DICM' were read anyway",
    Code.DUPLICATE_INSTANCE: "warning: the same SOP Instance UID was received more than once",
    Code.DUPLICATE_SLICES: "warning: some positions acquired twice; the newest instance was kept",
    Code.MONOCHROME1_INVERTED: "warning: MONOCHROME1 inverted so that high values are bright",
}


@dataclass(frozen=True)
class Notice:
    """A reason code and a human message: a skip, a rejection or a warning."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_json(self) -> dict[str, str]:
        return {"code": str(self.code), "message": self.message}


class Rejection(Notice):
    """Why a series cannot be one 3D volume."""


@dataclass(frozen=True)
class Skipped(Notice):
    """A file (or bytes part) that was not used, and why."""

    source: str = ""

    def __str__(self) -> str:
        return f"{self.source}: {self.code}: {self.message}"


class SeriesRejected(Exception):
    """Raised inside the ingest/volume pipeline; :func:`service.core.volume.convert` turns it into a
    :class:`Rejection` on the result, so callers see a value, not an exception."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.rejection = Rejection(str(code), message)

    @property
    def code(self) -> str:
        return self.rejection.code


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

Source = Path | str | bytes | bytearray | memoryview | BinaryIO

_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a ZIP archive",
    b"\x1f\x8b": "a gzip file",
    b"GIF8": "a GIF image",
}


@dataclass
class Instance:
    """One parsed DICOM object; pixel data still encoded (raw bytes, decoded later, once)."""

    dataset: Dataset
    source: str
    notices: tuple[Notice, ...] = ()

    @property
    def transfer_syntax(self) -> UID:
        return UID(self.dataset.file_meta.TransferSyntaxUID)


def _expected_native_bytes(ds: Dataset) -> int:
    frames = int(ds.get("NumberOfFrames") or 1)
    voxels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * frames
    return math.ceil(voxels * int(ds.BitsAllocated) / 8)


def _describe_magic(head: bytes) -> str:
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            return f"{what}, not DICOM"
    return "not a DICOM file (no 'DICM' prefix and no readable DICOM dataset)"


def read_instance(source: Source, name: str | None = None) -> Instance | Skipped:
    """Parse one file / bytes object into an :class:`Instance`, or say why it is skipped.

    The pixel data is read but not decoded. Files without the preamble and 'DICM' prefix are
    tried as a bare dataset (some exporters write those) and kept, with a warning, when they
    hold an image with UIDs; anything else is ``not_dicom``. Never raises for bad content."""
    label = name or (str(source) if isinstance(source, str | Path) else "<bytes>")
    try:
        if isinstance(source, str | Path):
            data = Path(source).read_bytes()
        elif isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
        else:
            data = source.read()
    except OSError as error:
        return Skipped(Code.CORRUPT, f"cannot read: {error}", label)
    if not data:
        return Skipped(Code.EMPTY_FILE, "zero-byte input", label)
    # One read of the bytes, one parse: pydicom keeps the (encoded) pixel bytes for later.
    head = data[:132]
    has_prefix = head[128:132] == b"DICM"
    bomb = _bomb(data, has_prefix)
    if bomb is not None:
        return Skipped(bomb.code, bomb.message, label)
    if not has_prefix and len(data) > _SNIFF_BYTES and not _looks_like_an_image(data):
        return Skipped(Code.NOT_DICOM, _describe_magic(head), label)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=not has_prefix)
            too_deep = _too_deep(ds)
        except RecursionError:  # nesting that pydicom had to parse eagerly (undefined lengths)
            too_deep = Notice(Code.NESTING_TOO_DEEP, "sequences nested too deeply to parse")
        except (EOFError, ValueError) as error:
            if not has_prefix:
                return Skipped(Code.NOT_DICOM, _describe_magic(head), label)
            return Skipped(Code.TRUNCATED, f"the file ends early: {error}", label)
        except Exception as error:  # pydicom raises many types on hostile input
            if not has_prefix:
                return Skipped(Code.NOT_DICOM, _describe_magic(head), label)
            return Skipped(Code.CORRUPT, f"{type(error).__name__}: {error}", label)
    del data
    if too_deep is not None:
        return Skipped(too_deep.code, too_deep.message, label)
    # pydicom keeps the source buffer for deferred reads; nothing is deferred here, and the
    # whole file's bytes would otherwise stay alive as long as the dataset.
    ds.buffer = None
    eof_warning = any("End of file" in str(w.message) for w in caught)
    try:  # reading a lazily parsed element may be the first time its bytes are looked at
        outcome = _admit(ds, label, has_prefix, eof_warning, head)
        if isinstance(outcome, Instance):
            _drop_private_blobs(outcome.dataset)
    except Exception as error:  # found by tests/test_fuzz.py: e.g. a mangled VR
        return Skipped(Code.CORRUPT, f"{type(error).__name__}: {error}", label)
    return outcome


_SNIFF_BYTES = 64 * 1024


def _looks_like_an_image(data: bytes) -> bool:
    """Without 'DICM', pydicom's forced read turns any bytes into elements, at about 0.25 s
    per MiB of zeros; the first 64 KiB must hold the SOP Class and Instance UIDs (group 0008
    comes first) before the whole is parsed. An error in the partial read (an element cut at
    64 KiB) says nothing: the whole is parsed then."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sniff = pydicom.dcmread(io.BytesIO(data[:_SNIFF_BYTES]), force=True,
                                    stop_before_pixels=True)
        except Exception:
            return True
    return 0x00080016 in sniff and 0x00080018 in sniff


def _meta_end(data: bytes) -> tuple[int, str]:
    """Where the file meta group (explicit VR little endian after 'DICM') ends, and its
    TransferSyntaxUID; read by hand so that nothing is inflated on the way."""
    position, syntax = 132, ""
    long_vrs = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UR", b"UT", b"UN"}
    while position + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, position)
        if group != 0x0002:
            break
        vr = data[position + 4 : position + 6]
        if vr in long_vrs:
            if position + 12 > len(data):
                break  # truncated: pydicom will say so
            (length,) = struct.unpack_from("<I", data, position + 8)
            start = position + 12
        else:
            (length,) = struct.unpack_from("<H", data, position + 6)
            start = position + 8
        if element == 0x0010:
            syntax = data[start : start + length].decode("latin-1").strip("\x00 ")
        position = start + length
    return position, syntax


def _bomb(data: bytes, has_prefix: bool) -> Notice | None:
    """A memory bomb, found before pydicom allocates for it (module docstring)."""
    if has_prefix:
        end, syntax = _meta_end(data)
        if syntax == DEFLATED_EXPLICIT_VR:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            inflated = 0
            pending = memoryview(data)[end:]
            try:  # in bounded steps: the output of one call is at most 16 MiB
                while pending and inflated <= MAX_INFLATED_BYTES:
                    chunk = inflater.decompress(pending, 16 * 1024**2)
                    inflated += len(chunk)
                    if len(chunk) == 0 and not inflater.unconsumed_tail:
                        break
                    pending = memoryview(inflater.unconsumed_tail)
            except zlib.error:
                return None  # corrupt: pydicom says so when it reads it
            if inflated > MAX_INFLATED_BYTES:
                return Notice(Code.INFLATED_TOO_LARGE, f"the deflated dataset inflates beyond "
                              f"{MAX_INFLATED_BYTES} bytes")
            # deflated items are only countable once inflated: inflate again, now bounded
            try:
                data = zlib.decompress(data[end:], -zlib.MAX_WBITS)
            except zlib.error:
                return None
    items = data.count(b"\xfe\xff\x00\xe0") + data.count(b"\xff\xfe\xe0\x00")
    if items > MAX_SEQUENCE_ITEMS:
        return Notice(Code.TOO_MANY_ITEMS, f"{items} sequence items (more than "
                      f"{MAX_SEQUENCE_ITEMS})")
    return None


def _too_deep(ds: Dataset) -> Notice | None:
    """Walk the sequences level by level (no recursion, each level parsed once, as later
    readers would parse it anyway) and refuse nesting beyond :data:`MAX_SEQUENCE_DEPTH`."""
    stack: list[tuple[Dataset, int]] = [(ds, 0)]
    while stack:
        current, depth = stack.pop()
        # keys(), not iteration: iterating would convert every raw element
        for tag in list(current.keys()):
            raw = current.get_item(tag)
            vr = getattr(raw, "VR", None)
            if vr in (None, "UN"):
                vr = _dictionary_vr(tag) or vr
            if vr != "SQ":
                continue
            try:
                value = current[tag].value
            except RecursionError:
                raise
            except Exception:  # malformed: left as it was, for whoever reads it to judge
                continue
            if not isinstance(value, Sequence) or isinstance(value, str | bytes):
                continue
            if depth + 1 > MAX_SEQUENCE_DEPTH and len(value):
                return Notice(Code.NESTING_TOO_DEEP, "sequences nested more than "
                              f"{MAX_SEQUENCE_DEPTH} levels deep")
            stack.extend((item, depth + 1) for item in value if isinstance(item, Dataset))
    return None


def _dictionary_vr(tag: Any) -> str | None:
    try:
        return str(pydicom.datadict.dictionary_VR(tag))
    except KeyError:
        return None


def _drop_private_blobs(ds: Dataset) -> None:
    """Large private binary values (a Siemens XA file carries a 145 KB protocol dump per slice)
    outweigh a small matrix's pixels several times over, and nothing here reads them; only
    Siemens' CSA image header is kept, for mosaic detection."""
    # keys(), not iteration: iterating a Dataset converts every raw element it yields
    for tag in [t for t in ds.keys() if t.is_private]:  # noqa: SIM118
        element = ds.get_item(tag)
        value = None if element is None else element.value
        if (isinstance(value, bytes) and len(value) > PRIVATE_BLOB_LIMIT
                and not (tag.group == 0x0029 and (tag.element & 0xFF) == 0x10)):
            del ds[tag]


def _admit(
    ds: Dataset, label: str, has_prefix: bool, eof_warning: bool, head: bytes
) -> Instance | Skipped:
    notices: list[Notice] = []
    if not has_prefix:
        # A forced read turns almost any bytes into "a dataset": demand the basics of an image.
        if not ("SOPClassUID" in ds and "SOPInstanceUID" in ds and "Rows" in ds):
            return Skipped(Code.NOT_DICOM, _describe_magic(head), label)
        notices.append(Notice(Code.NO_PREAMBLE, "file without preamble/'DICM' prefix"))
    meta = getattr(ds, "file_meta", None)
    sop_class = raw_text(ds, 0x00080016) or (
        str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    )
    if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        return Skipped(Code.DICOMDIR, "a DICOMDIR (media directory), not an image", label)
    pixel_keyword = next(
        (k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None
    )
    if pixel_keyword is None:
        if eof_warning:
            return Skipped(Code.TRUNCATED, "the file ends inside its pixel data", label)
        return Skipped(Code.NO_PIXEL_DATA, "no Pixel Data element (not an image)", label)
    if not all(k in ds for k in ("Rows", "Columns", "BitsAllocated")):
        return Skipped(Code.NO_PIXEL_DATA, "pixel data without Rows/Columns/BitsAllocated", label)
    for keyword, tag in (
        ("StudyInstanceUID", 0x0020000D),
        ("SeriesInstanceUID", 0x0020000E),
        ("SOPInstanceUID", 0x00080018),
    ):
        if not raw_text(ds, tag):
            return Skipped(Code.MISSING_UID, f"no {keyword}", label)
    _ensure_transfer_syntax(ds)
    if eof_warning:
        return Skipped(Code.TRUNCATED, "the file ends inside its pixel data", label)
    if pixel_keyword == "PixelData" and not UID(ds.file_meta.TransferSyntaxUID).is_encapsulated:
        try:
            expected = _expected_native_bytes(ds)
        except (TypeError, ValueError):
            return Skipped(Code.CORRUPT, "malformed Rows/Columns/NumberOfFrames", label)
        actual = len(ds.PixelData)
        if actual < expected:
            return Skipped(
                Code.TRUNCATED,
                f"pixel data holds {actual} bytes, Rows×Columns×frames needs {expected}",
                label,
            )
    return Instance(dataset=ds, source=label, notices=tuple(notices))


def raw_texts(ds: Dataset, tag: int) -> list[str]:
    """The values of a text element (CS, DS, IS, UI, LO, SH) without pydicom's value conversion:
    on a lazily parsed dataset that conversion dominates header reading, and text VRs are
    ASCII whatever the transfer syntax. Empty list when absent or empty."""
    element = ds.get_item(tag)
    if element is None:
        return []
    value = element.value
    if value is None:
        return []
    if isinstance(value, bytes):
        text = value.decode("latin-1").strip("\x00 ")
        return [part.strip("\x00 ") for part in text.split("\\")] if text else []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, Sequence):
        return [str(v).strip() for v in value]
    return [str(value).strip()]


def raw_text(ds: Dataset, tag: int) -> str:
    return "\\".join(raw_texts(ds, tag))


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Datasets read without file meta get the transfer syntax they were actually read with."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if "TransferSyntaxUID" not in meta:
        implicit, little = getattr(ds, "original_encoding", (True, True))
        if implicit:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def iter_folder(folder: Path) -> Iterator[Path]:
    """Every regular file under ``folder``, recursively, in a stable (sorted) order."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if path.is_file():
                yield path


# --------------------------------------------------------------------------------------------
# Grouping
# --------------------------------------------------------------------------------------------


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
        if items:
            return items[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and sequence in shared[0]:
        items = shared[0][sequence].value
        if items:
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
