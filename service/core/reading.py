"""Hostile-input reading: one file or bytes object in, an :class:`Instance` or a :class:`Skipped`.

Nothing that can go wrong with real-world input escapes as an exception: a file that is not a
usable DICOM image is **skipped** (:class:`Skipped`, with a :class:`~service.core.codes.Code`:
not DICOM, empty, truncated, DICOMDIR, no pixel data, ...). Each file is parsed once and its
(possibly compressed) pixel bytes stay as they are until :mod:`service.core.volume` decodes
them exactly once. Grouping into series is :mod:`service.core.series`.

Admission guards (documented in the README):

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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

from service.core.codes import Code

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
# Private binary values above this size are dropped at read time (see read_instance).
PRIVATE_BLOB_LIMIT = 16 * 1024
# Hostile-input bounds (module docstring). Real MR headers nest 4-5 levels deep (enhanced
# multi-frame functional groups) and carry about 20 items per frame.
MAX_INFLATED_BYTES = 256 * 1024**2
MAX_SEQUENCE_ITEMS = 200_000
MAX_SEQUENCE_DEPTH = 16
DEFLATED_EXPLICIT_VR = "1.2.840.10008.1.2.1.99"

@dataclass(frozen=True)
class Notice:
    """A reason code and a human message: a skip, a rejection or a warning."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_json(self) -> dict[str, str]:
        return {"code": str(self.code), "message": self.message}


@dataclass(frozen=True)
class Skipped(Notice):
    """A file (or bytes part) that was not used, and why."""

    source: str = ""

    def __str__(self) -> str:
        return f"{self.source}: {self.code}: {self.message}"


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
    except Exception as error:  # found by tests/unit/test_fuzz.py: e.g. a mangled VR
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
