"""Hostile DICOM, built byte by byte where pydicom would refuse to write it: deflate bombs,
sequences nested thousands of levels deep, millions of items, absurd matrices."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
_ITEM = b"\xfe\xff\x00\xe0"
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_CONTENT_SEQUENCE = b"\x40\x00\x30\xa7SQ\x00\x00"  # (0040,A730), explicit VR little endian


def header(study: str | None = None, series: str | None = None, rows: int = 4,
           columns: int = 4) -> Dataset:
    """A minimal MR image header (no pixel data yet), explicit VR little endian."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE, sop
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.Modality = "MR"
    ds.SeriesDescription = "AX FLAIR"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def pixel_element(n_bytes: int) -> bytes:
    return b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", n_bytes) + b"\0" * n_bytes


def nested_sequences(depth: int, undefined_length: bool) -> bytes:
    """(0040,A730) ContentSequence nested ``depth`` levels, each with one item."""
    inner = b""
    for _ in range(depth):
        if undefined_length:
            item = _ITEM + b"\xff\xff\xff\xff" + inner + _ITEM_END
            inner = _CONTENT_SEQUENCE + b"\xff\xff\xff\xff" + item + _SEQUENCE_END
        else:
            item = _ITEM + struct.pack("<I", len(inner)) + inner
            inner = _CONTENT_SEQUENCE + struct.pack("<I", len(item)) + item
    return inner


def deeply_nested(depth: int = 5000, undefined_length: bool = True) -> bytes:
    """A valid-looking MR image whose header nests sequences ``depth`` levels deep."""
    return encode(header()) + nested_sequences(depth, undefined_length) + pixel_element(32)


def many_items(count: int = 300_000) -> bytes:
    """One sequence of ``count`` empty items: a few MB that pydicom would turn into GBs."""
    items = (_ITEM + b"\x00\x00\x00\x00") * count
    return (encode(header()) + _CONTENT_SEQUENCE + struct.pack("<I", len(items)) + items
            + pixel_element(32))


_BOMBS: dict[int, bytes] = {}


def deflate_bomb(inflated_mib: int = 300) -> bytes:
    """Deflated Explicit VR Little Endian whose dataset inflates to ``inflated_mib`` MiB
    (a private OB of zeros); about 1 KiB per inflated MiB on the wire."""
    if inflated_mib not in _BOMBS:
        ds = header()
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        small = encode(ds)
        # (0002,0000) FileMetaInformationGroupLength, UL, right after 'DICM'
        meta_end = 144 + struct.unpack_from("<I", small, 140)[0]
        dataset = zlib.decompress(small[meta_end:], -zlib.MAX_WBITS)
        n = inflated_mib * 1024**2
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        chunks = [packer.compress(dataset + b"\x09\x00\x10\x10OB\x00\x00" + struct.pack("<I", n))]
        zeros = b"\0" * 1024**2
        chunks += [packer.compress(zeros) for _ in range(inflated_mib)]
        chunks.append(packer.flush())
        _BOMBS[inflated_mib] = small[:meta_end] + b"".join(chunks)
    return _BOMBS[inflated_mib]


def with_changes(path: Path, **changes: object) -> bytes:
    """The file at ``path`` with some attributes changed (``None`` deletes one)."""
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return encode(ds)
