"""The shared-element encoder gives exactly dcmwrite's bytes, instance by instance."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO

from service.core.config import BUNDLED_MODEL
from service.pipeline import sc
from service.pipeline.analysis import analyse
from service.pipeline.engine import Engine
from tests.conftest import PhantomFactory


@pytest.mark.parametrize("variant", ["axial", "oblique"])
def test_encode_series_equals_dcmwrite(phantom_series: PhantomFactory, variant: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[list[pydicom.Dataset], list[bytes]]] = []
    original = sc.encode_series

    def recording(datasets: list[pydicom.Dataset]) -> list[bytes]:
        encoded = original(datasets)
        seen.append((list(datasets), encoded))
        return encoded

    monkeypatch.setattr(sc, "encode_series", recording)
    folder = phantom_series(variant=variant, label="cSVD", seed=3)
    analysis = analyse(sorted(Path(folder).glob("*.dcm")),
                       Engine(BUNDLED_MODEL, ["CPUExecutionProvider"]))
    ((datasets, encoded),) = seen
    assert len(encoded) == len(datasets) > 1
    for ds, data in zip(datasets, encoded, strict=True):
        assert data == sc.encode_part10(ds)
    assert analysis.sc_instances == encoded
    # and they read back as distinct, ordered instances
    numbers = [int(pydicom.dcmread(DicomBytesIO(d)).InstanceNumber) for d in encoded]
    assert numbers == list(range(1, len(encoded) + 1))


def test_an_instance_that_differs_elsewhere_is_encoded_in_full(
        phantom_series: PhantomFactory) -> None:
    folder = phantom_series(label="MS", seed=4)
    first = pydicom.dcmread(sorted(Path(folder).glob("*.dcm"))[0])
    first.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    second = copy.deepcopy(first)
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    second.PatientComments = "only in the second instance"
    third = copy.deepcopy(first)
    third.SeriesDescription = "changed shared value"
    encoded = sc.encode_series([first, second, third])
    assert encoded == [sc.encode_part10(ds) for ds in (first, second, third)]
