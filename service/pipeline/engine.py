"""The one onnxruntime session, and the model contract read from its metadata.

Class names and preprocessing come from the model file, never from constants here. The provider
in use is read back from the session: onnxruntime-gpu lists CUDA as available on machines
without a usable GPU and silently falls back to CPU, so "asked for" is not "got".
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from service.core.contract import (
    OUTPUT_NAMES,
    Explanation,
    Input,
    ModelContractError,
    ModelInfo,
    check_signature,
)

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def _native_stderr_logged() -> Iterator[None]:
    """Catch what onnxruntime's C++ code writes to file descriptor 2 while a session is made
    (why a CUDA provider could not load, coloured, plain text) and log it instead: the service
    logs one JSON object per line on stderr, and this would break that."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", errors="replace")
    for line in _ANSI.sub("", text).splitlines():
        if line.strip():
            log.warning("onnxruntime: %s", line.strip())


def cuda_unloadable_reason() -> str | None:
    """None when onnxruntime's CUDA provider library loads here (its CUDA and cuDNN
    dependencies found, e.g. after ``preload_dlls``), else why not."""
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not library.is_file():
        return "this onnxruntime has no CUDA provider library"
    try:
        ctypes.CDLL(str(library))
    except OSError as error:
        return str(error)
    return None


@dataclass(frozen=True)
class EngineOutput:
    probabilities: npt.NDArray[np.float32]  # (B, K)
    logits: npt.NDArray[np.float32]
    slice_weights: npt.NDArray[np.float32]  # (B, S)
    spatial_attention: npt.NDArray[np.float32]  # (B, S, h, w)
    gradcam: npt.NDArray[np.float32]  # (B, S, h, w)
    hirescam: npt.NDArray[np.float32]  # (B, S, h, w)
    ood_score: npt.NDArray[np.float32]  # (B,)

    def explanation(self, name: str) -> npt.NDArray[np.float32]:
        """The map ``name`` (see :data:`service.core.contract.EXPLANATIONS`), (B, S, h, w)."""
        if name == Explanation.HIRESCAM:
            return self.hirescam
        if name == Explanation.GRADCAM:
            return self.gradcam
        if name == Explanation.ATTENTION:
            return self.spatial_attention * self.slice_weights[:, :, None, None]
        raise ValueError(f"unknown explanation map {name!r}")


class Engine:
    """Loads the model once; ``run`` is one onnxruntime call for the probabilities, the
    explanation maps and the out-of-distribution score."""

    def __init__(self, model_path: Path, providers: list[str] | tuple[str, ...]):
        if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
            # CUDA/cuDNN from pip wheels (e.g. torch's) become visible to onnxruntime. It prints
            # its probing to stdout, which may carry a result (flaircad analyze): keep it in logs.
            probing = io.StringIO()
            try:
                with contextlib.redirect_stdout(probing):
                    ort.preload_dlls()
            except Exception as error:
                log.info("no CUDA libraries preloaded: %s", error)
            if probing.getvalue().strip():
                log.info("CUDA library probing: %s", " | ".join(probing.getvalue().split("\n")))
        available = set(ort.get_available_providers())
        requested = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in requested:
            # onnxruntime-gpu lists CUDA as available wherever it is installed; asked for on a
            # host without the CUDA libraries it prints an error at every start and falls back
            why = cuda_unloadable_reason()
            if why is not None:
                requested = [p for p in requested if p != "CUDAExecutionProvider"] or [
                    "CPUExecutionProvider"]
                log.info("CUDA execution provider not used: %s", why)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only from the session's own logger
        with _native_stderr_logged():
            self.session = ort.InferenceSession(str(model_path), sess_options=options,
                                                providers=requested)
        self.requested_providers = tuple(requested)
        self.providers = tuple(self.session.get_providers())
        self.provider = self.providers[0]
        if requested[0] != self.provider:
            log.warning("asked for %s, onnxruntime runs on %s", requested[0], self.provider)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info = ModelInfo.from_metadata(meta, fallback_name=Path(model_path).stem)
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        check_signature(inputs, outputs)
        log.info("model %s %s on %s", self.info.name, self.info.version, self.provider)

    def run(self, volumes: npt.NDArray[np.float32],
            target_class: npt.NDArray[np.int64] | None = None) -> EngineOutput:
        """``volumes`` (B, S, H, W) or (B, S, 1, H, W) on the model grid, in [0, 1]."""
        if volumes.ndim == 4:
            volumes = volumes[:, :, None]
        if target_class is None:
            target_class = np.full(volumes.shape[0], -1, dtype=np.int64)
        feeds = {Input.VOLUME.value: np.ascontiguousarray(volumes, dtype=np.float32),
                 Input.TARGET_CLASS.value: np.asarray(target_class, dtype=np.int64)}
        return EngineOutput(*self.session.run(list(OUTPUT_NAMES), feeds))

    def warm_up(self) -> None:
        slices, height, width = self.info.preprocessing.model_grid
        self.run(np.zeros((1, slices, height, width), dtype=np.float32))


__all__ = ["Engine", "EngineOutput", "ModelContractError", "ModelInfo"]
