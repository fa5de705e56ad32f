"""The run of one analysis: analyse the files, write and publish the result, or say why not.

:class:`Runner` calls :func:`service.pipeline.analysis.analyse` (or a test's stand-in), has
the result written into a staging folder and published as a whole, and classifies what went
wrong into a code of :mod:`service.core.codes`: ``spool_full`` (no space left), then
``result_write_failed`` (another OSError once the result is being written), else
``analysis_failed``; a rejected input keeps the rejection's own code. Paths in the details are
the client's labels (:func:`client_text`), never this server's.

What it needs from storage comes in through :class:`ResultWriter` and the ``begin`` callback
(dependency inversion: the pipeline imports no storage). Recording the outcome, metrics and
logs are the caller's: :mod:`service.runtime.runs` binds the runner to the spool and store.
"""

from __future__ import annotations

import errno
import shutil
import sqlite3
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from service.core.codes import Code
from service.core.limits import Limits
from service.core.outputs import ALL_OUTPUTS, DicomOutput
from service.pipeline.engine import Engine

if TYPE_CHECKING:  # the analysis module is imported when the first job runs
    from service.core.flair import RuleSet
    from service.pipeline.analysis import Analysis


class Analyse(Protocol):
    """How one analysis is run: :func:`service.pipeline.analysis.analyse`, or a test's
    stand-in."""

    def __call__(self, sources: list[Path], engine: Engine, *, rules: RuleSet | None,
                 accept_non_flair: bool, limits: Limits, explanation: str,
                 outputs: Collection[DicomOutput]) -> Analysis: ...


class ResultWriter(Protocol):
    """Where a result goes: a staging folder, written, then published under its id."""

    def staging_folder(self, analysis_id: str) -> Path: ...

    def write_outputs(self, analysis: Analysis, folder: Path) -> None: ...

    def write_result(self, folder: Path, result: dict[str, Any]) -> None: ...

    def publish(self, folder: Path, analysis_id: str) -> None: ...


Ending = Literal["done", "rejected", "failed"]


@dataclass
class Outcome:
    """How one run ended; ``status`` is the store's status of that name."""

    status: Ending
    label: str  # for the metrics: "ok", "rejected:<code>", "failed"
    result: dict[str, Any] | None = None
    problem: dict[str, Any] | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    prediction: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: Exception | None = None  # what failed it (for the caller's log)


def disk_full(error: BaseException) -> bool:
    """No space left: on the spool's file system (ENOSPC, EDQUOT) or in SQLite."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(error, sqlite3.Error):
        return (getattr(error, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL
    return False


def client_label(path: Path) -> str:
    """How a client knows one of its inputs: an upload's part by its place in the request
    (files are stored as 00000.dcm, 00001.dcm, …), a received instance by its SOP UID."""
    stem = Path(path).stem
    return f"part {int(stem) + 1}" if stem.isdigit() else f"instance {stem}"


def client_text(text: str, files: list[Path], spool_root: Path) -> str:
    """``text`` with every server path of ``files`` replaced by its :func:`client_label`, and
    any other path under the spool cut to ``<spool>``."""
    for path in sorted(files, key=lambda p: len(str(p)), reverse=True):
        text = text.replace(str(path), client_label(path))
    return text.replace(str(Path(spool_root).resolve()), "<spool>").replace(
        str(spool_root), "<spool>")


def failure(error: Exception, files: list[Path], spool_root: Path,
            writing: bool) -> dict[str, Any]:
    """The problem of a failed analysis: why, in words the client can have."""
    detail = client_text(f"{type(error).__name__}: {error}", files, spool_root)
    if disk_full(error):
        return {"code": Code.SPOOL_FULL, "detail": f"no space left in the spool: {detail}"}
    if writing and isinstance(error, OSError):
        return {"code": Code.RESULT_WRITE_FAILED, "detail": detail}
    return {"code": Code.ANALYSIS_FAILED, "detail": detail}


class Runner:
    """Runs analyses with one engine and one set of settings; safe to call from threads."""

    def __init__(self, analyse: Analyse, engine: Engine, results: ResultWriter,
                 spool_root: Path, *, rules: RuleSet | None, accept_non_flair: bool,
                 limits: Limits, explanation: str,
                 outputs: Collection[DicomOutput] = ALL_OUTPUTS) -> None:
        self.analyse, self.engine, self.results = analyse, engine, results
        self.spool_root = spool_root
        self.rules, self.accept_non_flair = rules, accept_non_flair
        self.limits, self.explanation = limits, explanation
        self.outputs = frozenset(outputs)

    def run(self, analysis_id: str, files: list[Path],
            begin: Callable[[], Sequence[str]] = tuple) -> Outcome:
        """Analyse ``files`` and publish the result as ``analysis_id``. ``begin`` runs first
        (the caller counts the start durably there) and returns warnings for the result; a
        failure in it fails the analysis like any other. Never raises an Exception."""
        from service.pipeline.analysis import AnalysisRejected

        warnings: list[str] = []
        staging: Path | None = None
        writing = False
        try:
            warnings = list(begin())
            analysis = self.analyse(files, self.engine, rules=self.rules,
                                    accept_non_flair=self.accept_non_flair,
                                    limits=self.limits, explanation=self.explanation,
                                    outputs=self.outputs)
            writing = True
            # Written aside and renamed into place, then marked done: a crash at any point
            # leaves no half result visible, and the analysis runs again after the restart.
            staging = self.results.staging_folder(analysis_id)
            self.results.write_outputs(analysis, staging)
            result = analysis.to_json()
            result.update({"analysis_id": analysis_id, "status": "done"})
            # ids only: the API makes the URLs of the outputs (service.api.analyses.view)
            result["warnings"] = [*result.get("warnings", []), *warnings]
            self.results.write_result(staging, result)
            self.results.publish(staging, analysis_id)
            staging = None  # it is the result folder now
        except AnalysisRejected as rejected:
            # the client sees its own parts and instances, never a path on this server
            problem = {"code": rejected.code,
                       "detail": client_text(rejected.message, files, self.spool_root),
                       "warnings": [*(client_text(str(w), files, self.spool_root)
                                      for w in getattr(rejected, "warnings", ())),
                                    *warnings]}
            outcome = Outcome("rejected", f"rejected:{rejected.code}", problem=problem)
        except Exception as error:
            # first, whatever happens next: a result that was not published never will be
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            outcome = Outcome("failed", "failed", error=error,
                              problem=failure(error, files, self.spool_root, writing))
        else:
            outcome = Outcome("done", "ok", result=result,
                              study_instance_uid=analysis.study_instance_uid,
                              series_instance_uid=analysis.series_instance_uid,
                              prediction=analysis.prediction, timings_ms=analysis.timings_ms)
        return outcome
