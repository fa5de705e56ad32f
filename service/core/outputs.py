"""The DICOM outputs an analysis can produce, and how a setting names a subset of them.

Some PACS refuse some SOP classes (a Parametric Map, say), and some sites want only the SR:
``FLAIRCAD_OUTPUTS`` picks which objects are written, stored, sent and served. The preview
PNG and ``result.json`` are always written: they are the API's, not the PACS'.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class DicomOutput(StrEnum):
    SC = "sc"  # Secondary Capture series: the map burnt into RGB copies of the source slices
    PM = "pm"  # Parametric Map: the map as float 0-1 on the source geometry
    SR = "sr"  # Comprehensive 3D SR: TID 1500 measurement report, the primary result


ALL_OUTPUTS: frozenset[DicomOutput] = frozenset(DicomOutput)
DESCRIPTIONS: dict[DicomOutput, str] = {
    DicomOutput.SC: "Secondary Capture overlay series (for viewers that cannot overlay)",
    DicomOutput.PM: "Parametric Map of the explanation on the source geometry",
    DicomOutput.SR: "Comprehensive 3D SR (TID 1500), the classification",
}


def parse_outputs(value: str | Iterable[str]) -> frozenset[DicomOutput]:
    """``"sc,pm,sr"``, ``"SR"``, ``["pm", "sr"]`` or a JSON list as text: the named outputs.
    An empty choice or an unknown name is a ValueError (a typo must not switch outputs off)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json
            items = [str(item) for item in json.loads(text)]
        else:
            items = text.split(",")
    else:
        items = [str(item) for item in value]
    names = [item.strip().lower() for item in items if item.strip()]
    known = {output.value for output in DicomOutput}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown output(s) {', '.join(repr(n[:20]) for n in unknown)}; "
                         f"choose from {', '.join(sorted(known))}")
    if not names:
        raise ValueError("at least one of sc, pm, sr must be produced")
    return frozenset(DicomOutput(name) for name in names)
