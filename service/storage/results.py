"""The result folder: where one analysis' outputs lie, and how they are written.

Layout of a result folder (``results/<analysis id>/`` in the spool, or ``flaircad analyze``'s
OUT_DIR)::

    sc/IM0001.dcm, sc/IM0002.dcm, …   the Secondary Capture series, InstanceNumber order
    pm.dcm                             the Parametric Map (the explanation on the source grid)
    sr.dcm                             the Comprehensive 3D SR
    preview.png                        the preview montage
    result.json                        what the analysis found (the API's record of it)

:class:`ResultFolder` is the one place that knows these names; the scheduler, the forwarder,
the API and the spool ask it. :class:`ResultFolders` is the spool's ``results/`` folder:
a result is written into a staging folder (``results/.staging-<id>-<random>``) and published
by one rename (:meth:`ResultFolders.publish`), so a reader sees all of it or none.

:func:`write_outputs` takes anything shaped like an analysis (:class:`AnalysisOutputs`): this
layer imports no pipeline code. Which DICOM outputs exist is the analysis' choice
(``FLAIRCAD_OUTPUTS``): a folder holds any subset of SC, PM and SR, and every reader here takes
what is there.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

SC_FOLDER = "sc"
SR_FILE = "sr.dcm"
PM_FILE = "pm.dcm"
PREVIEW_FILE = "preview.png"
RESULT_FILE = "result.json"
STAGING_PREFIX = ".staging-"


class AnalysisOutputs(Protocol):
    """What is written of an analysis (:class:`service.pipeline.analysis.Analysis` is one)."""

    @property
    def sc_instances(self) -> list[bytes]: ...  # Part 10 files, InstanceNumber order; [] if off

    @property
    def pm_instance(self) -> bytes | None: ...  # None: not produced (FLAIRCAD_OUTPUTS)

    @property
    def sr_instance(self) -> bytes | None: ...

    @property
    def preview_png(self) -> bytes: ...

    def to_json(self) -> dict[str, Any]: ...


def fsync_file(path: Path) -> None:
    """fsync a file, or a folder (which makes its renames durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclass(frozen=True)
class ResultFolder:
    """One analysis' result folder (it need not exist)."""

    path: Path

    @property
    def sc_folder(self) -> Path:
        return self.path / SC_FOLDER

    def sc_path(self, number: int) -> Path:
        """The ``number``-th Secondary Capture (from 1)."""
        return self.sc_folder / f"IM{number:04d}.dcm"

    @property
    def sr(self) -> Path:
        return self.path / SR_FILE

    @property
    def pm(self) -> Path:
        return self.path / PM_FILE

    @property
    def preview(self) -> Path:
        return self.path / PREVIEW_FILE

    @property
    def result_json(self) -> Path:
        return self.path / RESULT_FILE

    def exists(self) -> bool:
        return self.path.is_dir()

    def sc_files(self) -> list[Path]:
        return sorted(self.sc_folder.glob("*.dcm"))

    def dicom_files(self) -> list[Path]:
        """The DICOM outputs that exist: the SC series, the Parametric Map, then the SR (what is
        sent and served; the SR last, as it references the others)."""
        return [*self.sc_files(), *(p for p in [self.pm, self.sr] if p.is_file())]

    def write(self, outputs: AnalysisOutputs) -> dict[str, Any]:
        """Write the DICOM outputs there are (SC series, Parametric Map, SR), the preview and
        ``result.json`` (``to_json()``) into the folder (created if needed); returns what was
        written where (None for an output not produced)."""
        self.path.mkdir(parents=True, exist_ok=True)
        sc_paths = []
        if outputs.sc_instances:
            self.sc_folder.mkdir(exist_ok=True)
        for number, data in enumerate(outputs.sc_instances, start=1):
            path = self.sc_path(number)
            path.write_bytes(data)
            sc_paths.append(path)
        written: dict[str, Any] = {"sc": sc_paths, "pm": None, "sr": None}
        optional: list[tuple[str, Path, bytes | None]] = [
            ("pm", self.pm, outputs.pm_instance), ("sr", self.sr, outputs.sr_instance)]
        for name, path, content in optional:
            if content is not None:
                path.write_bytes(content)
                written[name] = path
        self.preview.write_bytes(outputs.preview_png)
        self.write_result(outputs.to_json())
        return {"result": self.result_json, "preview": self.preview, **written}

    def write_result(self, result: dict[str, Any]) -> None:
        """(Re)write ``result.json``."""
        self.result_json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def write_outputs(outputs: AnalysisOutputs, out_dir: Path | str) -> dict[str, Any]:
    """Write ``result.json``, ``preview.png``, ``sr.dcm``, ``pm.dcm``, ``sc/IM0001.dcm`` … into
    ``out_dir`` (created if needed); returns what was written where."""
    return ResultFolder(Path(out_dir)).write(outputs)


class ResultFolders:
    """The spool's ``results/`` folder: published results by analysis id, and staging."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def of(self, analysis_id: str) -> ResultFolder:
        return ResultFolder(self.root / analysis_id)

    def staging(self, analysis_id: str) -> ResultFolder:
        """An empty folder to write a result into before :meth:`publish`."""
        folder = self.root / f"{STAGING_PREFIX}{analysis_id}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        return ResultFolder(folder)

    def publish(self, staging: Path, analysis_id: str) -> ResultFolder:
        """Make a staged result durable and visible at once: fsync every file and folder in
        it, then rename it to ``results/<analysis id>`` (replacing the remains of an earlier
        attempt, which no reader could see: its analysis was never marked done)."""
        for folder, _, files in os.walk(staging):
            for name in files:
                fsync_file(Path(folder) / name)
            fsync_file(Path(folder))
        target = self.of(analysis_id)
        if target.path.exists():
            shutil.rmtree(target.path)
        os.replace(staging, target.path)
        fsync_file(self.root)
        return target

    def remove(self, analysis_id: str) -> None:
        shutil.rmtree(self.of(analysis_id).path, ignore_errors=True)

    def staging_folders(self, analysis_id: str | None = None) -> list[Path]:
        """Staging folders (a crashed writer's, or one being written), of one analysis or
        of all."""
        pattern = f"{analysis_id}-*" if analysis_id is not None else "*"
        return list(self.root.glob(STAGING_PREFIX + pattern))

    def remove_staging(self, analysis_id: str) -> None:
        """Remove what writers of this analysis' result left (a dead owner's, say)."""
        for folder in self.staging_folders(analysis_id):
            shutil.rmtree(folder, ignore_errors=True)
