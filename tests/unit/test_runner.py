"""The pipeline's runner on its own (issue 14): fakes for the analysis and for storage, and the
failures classified as the scheduler always did: no space left → ``spool_full``, another
OSError once the result is written → ``result_write_failed``, anything else →
``analysis_failed``; a rejection keeps its code, in the client's words."""

from __future__ import annotations

import errno
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from service.core.limits import Limits
from service.pipeline.analysis import AnalysisRejected
from service.pipeline.runner import Outcome, Runner, disk_full


@dataclass
class _Analysis:
    study_instance_uid: str = "1.2.3"
    series_instance_uid: str = "1.2.3.4"
    prediction: str = "MS"
    timings_ms: dict[str, float] = field(default_factory=lambda: {"inference": 12.0})

    def to_json(self) -> dict[str, Any]:
        return {"prediction": self.prediction, "warnings": ["from_analysis"]}


class _Results:
    """A ResultWriter that keeps everything in memory, failing where it is told to."""

    def __init__(self, root: Path, fail: str | None = None,
                 error: Exception | None = None) -> None:
        self.root, self.fail, self.error = root, fail, error
        self.published: dict[str, dict[str, Any]] = {}
        self.results: dict[Path, dict[str, Any]] = {}

    def _maybe(self, step: str) -> None:
        if self.fail == step:
            assert self.error is not None
            raise self.error

    def staging_folder(self, analysis_id: str) -> Path:
        self._maybe("staging")
        folder = self.root / f".staging-{analysis_id}"
        folder.mkdir(parents=True)
        return folder

    def write_outputs(self, analysis: Any, folder: Path) -> None:
        (folder / "sr.dcm").write_bytes(b"sr")
        self._maybe("write")

    def write_result(self, folder: Path, result: dict[str, Any]) -> None:
        self._maybe("result")
        self.results[folder] = result

    def publish(self, folder: Path, analysis_id: str) -> None:
        self._maybe("publish")
        self.published[analysis_id] = self.results[folder]


def _runner(tmp_path: Path, results: _Results, analyse: Any = None) -> Runner:
    def default(*args: Any, **kwargs: Any) -> _Analysis:
        return _Analysis()

    return Runner(analyse or default, object(), results, tmp_path,  # type: ignore[arg-type]
                  rules=None, accept_non_flair=False, limits=Limits(), explanation="none")


def _files(tmp_path: Path) -> list[Path]:
    return [tmp_path / "uploads" / "a" / "00000.dcm", tmp_path / "uploads" / "a" / "00001.dcm"]


def test_a_run_publishes_the_result_with_the_warnings_of_begin(tmp_path: Path) -> None:
    results = _Results(tmp_path)
    outcome = _runner(tmp_path, results).run("a", _files(tmp_path),
                                             lambda: ["conflicting_duplicate: 1"])
    assert outcome.status == "done" and outcome.label == "ok" and outcome.error is None
    assert outcome.result == results.published["a"]
    assert outcome.result == {"prediction": "MS", "analysis_id": "a", "status": "done",
                              "warnings": ["from_analysis", "conflicting_duplicate: 1"]}
    assert (outcome.study_instance_uid, outcome.series_instance_uid) == ("1.2.3", "1.2.3.4")
    assert outcome.prediction == "MS" and outcome.timings_ms == {"inference": 12.0}


@pytest.mark.parametrize(("fail", "error", "code"), [
    ("write", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "spool_full"),
    ("publish", OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), "spool_full"),
    ("write", OSError(errno.EIO, os.strerror(errno.EIO)), "result_write_failed"),
    ("publish", PermissionError(errno.EACCES, "denied"), "result_write_failed"),
    ("result", RuntimeError("a bug"), "analysis_failed"),
])
def test_a_result_that_cannot_be_written_is_classified_and_its_staging_goes(
        tmp_path: Path, fail: str, error: Exception, code: str) -> None:
    results = _Results(tmp_path, fail, error)
    outcome = _runner(tmp_path, results).run("a", _files(tmp_path))
    assert outcome.status == "failed" and outcome.label == "failed"
    assert outcome.error is error and outcome.problem is not None
    assert outcome.problem["code"] == code
    assert results.published == {}
    assert not list(tmp_path.glob(".staging-*"))  # removed before anything else


def test_an_oserror_before_writing_is_an_analysis_failure(tmp_path: Path) -> None:
    files = _files(tmp_path)

    def analyse(*args: Any, **kwargs: Any) -> _Analysis:
        raise FileNotFoundError(errno.ENOENT, "gone", str(files[1]))

    outcome = _runner(tmp_path, _Results(tmp_path), analyse).run("a", files)
    assert outcome.problem is not None and outcome.problem["code"] == "analysis_failed"
    assert str(tmp_path) not in outcome.problem["detail"]
    assert "part 2" in outcome.problem["detail"]  # the client's label, not the path


def test_a_full_database_while_starting_is_spool_full(tmp_path: Path) -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    assert disk_full(full) and not disk_full(sqlite3.OperationalError("locked"))
    ran: list[bool] = []

    def begin() -> list[str]:
        raise full

    def analyse(*args: Any, **kwargs: Any) -> _Analysis:
        ran.append(True)
        return _Analysis()

    outcome = _runner(tmp_path, _Results(tmp_path), analyse).run("a", _files(tmp_path), begin)
    assert ran == [] and outcome.problem is not None
    assert outcome.problem["code"] == "spool_full"


def test_a_rejection_keeps_its_code_in_the_clients_words(tmp_path: Path) -> None:
    files = _files(tmp_path)

    def analyse(*args: Any, **kwargs: Any) -> _Analysis:
        raise AnalysisRejected("not_flair", f"{files[0]} is a T1",
                               warnings=[f"{tmp_path / 'elsewhere'} skipped"])

    outcome = _runner(tmp_path, _Results(tmp_path), analyse).run("a", files, lambda: ["w"])
    assert outcome == Outcome("rejected", "rejected:not_flair", problem={
        "code": "not_flair", "detail": "part 1 is a T1",
        "warnings": ["<spool>/elsewhere skipped", "w"]})
