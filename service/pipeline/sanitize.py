"""Attributes copied from scanner headers into flaircad's DICOM outputs, minus their defects.

Real headers break the standard in ordinary ways: padded or overlong strings, lower-case or
free-text code strings (``PatientSex = "male"``), dates such as ``2024.01.15`` or ``00000000``,
names without component separators, control characters, values in a character set the file
does not declare. pydicom writes most of that back unchanged (with a warning), and the object
fails validation. So nothing is copied verbatim: :func:`reference_header` builds a fresh
dataset with the patient, study and equipment attributes the outputs need, each one cleaned
for its value representation, and the outputs copy from that.

* Text (LO, SH, ST, LT): control characters removed, backslashes (the value delimiter)
  replaced, surrounding spaces stripped, cut to the VR's length *in bytes* of the UTF-8
  encoding (so a non-ASCII value never exceeds it).
* Person names (PN): at most three component groups of five components, 64 bytes each; a bare
  family name gets its trailing caret (highdicom otherwise warns that it looks malformed).
* Code strings (CS) with enumerated values: mapped to the standard value when the intent is
  clear (``male`` → ``M``), else left empty (the attributes copied are Type 2 or 3).
* Dates and times (DA, TM): the ACR-NEMA forms with separators are converted; anything that is
  not a real calendar date / time of day is left empty.
* UIDs: a study or instance UID cannot be repaired without breaking the link to the source. It
  is copied when it can be written (digits and dots, at most 64 characters); one that breaks
  the finer rules (a leading zero in a component, an empty component) is still copied and
  reported, since a new UID would move the outputs out of the source study.

Every output is written in UTF-8 (``ISO_IR 192``): pydicom has already decoded the source
values with the source's own character set, and UTF-8 can carry any of them.

The warnings name attributes, never their values: results and logs must not carry patient
identifiers.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset

OUTPUT_CHARSET = "ISO_IR 192"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_STRICT_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_WRITABLE_UID = re.compile(r"[0-9.]{1,64}")
_CS_CHARACTERS = re.compile(r"[^A-Z0-9 _]")
_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}
_YES_NO = {"YES": "YES", "Y": "YES", "NO": "NO", "N": "NO"}
# Unpaired body parts dciodvfy recognises (with another value it asks for Laterality)
_UNPAIRED_HEAD = {"BRAIN", "HEAD"}
# Type 3 / 1C attributes of the Patient and General Study modules that the header may carry
OPTIONAL_PATIENT_STUDY = ("IssuerOfPatientID", "PatientIdentityRemoved",
                          "DeidentificationMethod", "StudyDescription")


def _flatten(value: Any) -> str:
    """One string from whatever pydicom returned (a MultiValue for a value with backslashes)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1", "replace")
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "/".join(_flatten(v) for v in value)
    return str(value)


def _as_written(value: Any) -> str:
    """The value as the source holds it (several values joined by backslashes)."""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return _flatten(value)


def cut_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut so that its UTF-8 encoding fits ``max_bytes`` (never inside a character)."""
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", "ignore")


def clean_text(value: Any, max_bytes: int, *, multiline: bool = False) -> str:
    """A single LO/SH (or, ``multiline``, ST/LT) value: no control characters or delimiters."""
    text = _flatten(value)
    if multiline:
        text = text.replace("\r\n", "\n")
        text = "".join(c for c in text if c in "\n\t" or not _CONTROL.match(c))
    else:
        text = _CONTROL.sub(" ", text).replace("\\", "/")
    return cut_utf8(text.strip(), max_bytes).strip()


def clean_ascii(value: Any, max_chars: int) -> str:
    """Text for places that only take ASCII (burned-in Hershey fonts, code values)."""
    text = clean_text(value, 4 * max_chars)
    return text.encode("ascii", "replace").decode("ascii")[:max_chars].strip()


def clean_person_name(value: Any) -> str:
    text = _CONTROL.sub(" ", _flatten(value)).replace("\\", " ")
    groups = []
    for group in text.split("=")[:3]:
        components = [c.strip() for c in group.split("^")[:5]]
        while components and not components[-1]:
            components.pop()
        groups.append(cut_utf8("^".join(components), 64).rstrip("^ "))
    while groups and not groups[-1]:
        groups.pop()
    name = "=".join(groups)
    if name and "^" not in name:
        name += "^"  # a lone family name, said explicitly
    return name


def clean_code_string(value: Any, allowed: dict[str, str] | None = None) -> str:
    """A CS value: upper case, only the characters CS allows, at most 16; ``allowed`` maps
    accepted spellings to the standard value (anything else becomes empty)."""
    text = _flatten(value).strip().upper()
    if allowed is not None:
        return allowed.get(text, "")
    return _CS_CHARACTERS.sub("_", text)[:16].strip()


def clean_date(value: Any) -> str:
    text = _flatten(value).strip()
    if re.fullmatch(r"\d{4}[.\-/]\d{2}[.\-/]\d{2}", text):
        text = re.sub(r"\D", "", text)
    if not re.fullmatch(r"\d{8}", text):
        return ""
    try:
        day = datetime.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        return ""
    return text if day.year >= 1800 else ""


def clean_time(value: Any) -> str:
    text = _flatten(value).strip()
    if re.fullmatch(r"\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?", text):
        text = text.replace(":", "")
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?", text)
    if match is None:
        return ""
    hours, minutes, seconds, fraction = match.groups()
    if fraction is not None and seconds is None:
        return ""
    if int(hours) > 23 or int(minutes or 0) > 59 or int(seconds or 0) > 60:
        return ""
    return text


def clean_uid(value: Any) -> str | None:
    """The UID if it can be written as one (digits and dots, 1–64 characters), else None."""
    text = _flatten(value).strip("\x00 ")
    return text if _WRITABLE_UID.fullmatch(text) else None


def is_conformant_uid(value: str) -> bool:
    return bool(_STRICT_UID.fullmatch(value)) and len(value) <= 64


def _get(ds: Dataset, keyword: str) -> Any:
    """A value as pydicom decodes it, or None when absent or undecodable (bad character set,
    malformed value)."""
    try:
        return ds.get(keyword)
    except Exception:
        return None


@dataclass
class Header:
    """The cleaned attributes, and which of them had to change."""

    dataset: Dataset
    changed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def reference_header(ds: Dataset) -> Header:
    """Patient, study and acquisition-equipment attributes of a source image, cleaned; plus
    its SOP Class (for highdicom's acquisition-equipment item). Raises ValueError only when the
    StudyInstanceUID cannot be written at all."""
    out = Dataset()
    out.SpecificCharacterSet = OUTPUT_CHARSET
    header = Header(out)

    def put(keyword: str, cleaned: str, *, type2: bool = True) -> None:
        raw = _get(ds, keyword)
        original = _as_written(raw).strip()
        if cleaned != original and original:
            header.changed.append(keyword)
        if cleaned or type2:
            setattr(out, keyword, cleaned)

    # Patient module
    put("PatientName", clean_person_name(_get(ds, "PatientName")))
    put("PatientID", clean_text(_get(ds, "PatientID"), 64))
    put("IssuerOfPatientID", clean_text(_get(ds, "IssuerOfPatientID"), 64), type2=False)
    put("PatientBirthDate", clean_date(_get(ds, "PatientBirthDate")))
    put("PatientSex", clean_code_string(_get(ds, "PatientSex"), _SEX))
    removed = clean_code_string(_get(ds, "PatientIdentityRemoved"), _YES_NO)
    put("PatientIdentityRemoved", removed, type2=False)
    if removed == "YES":
        method = clean_text(_get(ds, "DeidentificationMethod"), 64)
        # Type 1C when identity is removed: say so rather than drop the flag
        out.DeidentificationMethod = method or "unspecified (declared by the source images)"
    # General Study module
    study_uid = clean_uid(_get(ds, "StudyInstanceUID"))
    if study_uid is None:
        raise ValueError("the source StudyInstanceUID cannot be written as a UID")
    if not is_conformant_uid(study_uid):
        header.warnings.append("source StudyInstanceUID is not a conformant UID (copied as is, "
                               "so the outputs stay in the source study)")
    out.StudyInstanceUID = study_uid
    put("StudyDate", clean_date(_get(ds, "StudyDate")))
    put("StudyTime", clean_time(_get(ds, "StudyTime")))
    put("ReferringPhysicianName", clean_person_name(_get(ds, "ReferringPhysicianName")))
    put("StudyID", clean_text(_get(ds, "StudyID"), 16))
    put("AccessionNumber", clean_text(_get(ds, "AccessionNumber"), 16))
    put("StudyDescription", clean_text(_get(ds, "StudyDescription"), 64), type2=False)
    # General Series: what the outputs show. flaircad reads brain FLAIR; an unknown or
    # non-standard value becomes BRAIN, since anything else needs a Laterality
    part = clean_code_string(_get(ds, "BodyPartExamined"))
    put("BodyPartExamined", part if part in _UNPAIRED_HEAD else "BRAIN")
    # Equipment that acquired the source (credited as contributing equipment)
    put("Manufacturer", clean_text(_get(ds, "Manufacturer"), 64), type2=False)
    put("ManufacturerModelName", clean_text(_get(ds, "ManufacturerModelName"), 64),
        type2=False)
    sop_class = clean_uid(_get(ds, "SOPClassUID"))
    if sop_class is not None:
        out.SOPClassUID = sop_class
    if header.changed:
        header.warnings.append(
            "source attributes made valid before copying: " + ", ".join(sorted(header.changed))
        )
    return header
