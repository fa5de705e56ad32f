"""Memory and recursion bombs are refused by ``read_instance`` before pydicom pays for them."""

from __future__ import annotations

import resource
import time

import pytest

from service.core.codes import Code
from service.core.reading import MAX_INFLATED_BYTES, Instance, Skipped, read_instance
from tests import _hostile
from tests.conftest import PhantomFactory


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_deflate_bomb_is_refused_without_inflating_it() -> None:
    bomb = _hostile.deflate_bomb(300)
    assert len(bomb) < 1024**2 and MAX_INFLATED_BYTES < 300 * 1024**2
    before = _peak_rss_mib()
    started = time.perf_counter()
    outcome = read_instance(bomb)
    assert isinstance(outcome, Skipped) and outcome.code == Code.INFLATED_TOO_LARGE
    assert time.perf_counter() - started < 10
    # inflated in 16 MiB steps and thrown away: the peak does not grow by the bomb's size
    assert _peak_rss_mib() - before < 200


def test_small_deflated_file_still_reads() -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = _hostile.header()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.PixelData = b"\0" * 32
    outcome = read_instance(_hostile.encode(ds))
    assert isinstance(outcome, Instance), outcome


@pytest.mark.parametrize("undefined_length", [False, True])
@pytest.mark.parametrize("depth", [40, 5000])
def test_deep_nesting_is_refused(depth: int, undefined_length: bool) -> None:
    outcome = read_instance(_hostile.deeply_nested(depth, undefined_length))
    assert isinstance(outcome, Skipped) and outcome.code == Code.NESTING_TOO_DEEP, outcome


def test_moderate_nesting_is_fine() -> None:
    data = (_hostile.encode(_hostile.header()) + _hostile.nested_sequences(6, True)
            + _hostile.pixel_element(32))
    assert isinstance(read_instance(data), Instance)


def test_millions_of_items_are_refused() -> None:
    outcome = read_instance(_hostile.many_items(300_000))
    assert isinstance(outcome, Skipped) and outcome.code == Code.TOO_MANY_ITEMS


def test_phantom_series_pass_the_guards(phantom_series: PhantomFactory) -> None:
    for compress in (None, "rle"):
        for path in sorted(phantom_series(compress=compress).glob("*.dcm"))[:3]:
            assert isinstance(read_instance(path), Instance)
