"""Model + Grad-CAM on one 24-slice volume: PyTorch eager vs onnxruntime, side by side.

    .venv/bin/python bench/model_speed.py [--configs paper demo] [--runs 7] [--threads 2]

For each architecture preset the same weights run three ways, median of ``--runs`` after one
warm-up run each:
  - torch eager, Grad-CAM by autograd (how Grad-CAM is usually computed in PyTorch);
  - torch eager, the exported graph (hand-written head backward, no autograd);
  - onnxruntime, the exported ONNX file, on the provider asked for (CPU by default).
The ratio printed is torch eager (autograd) / onnxruntime. Numbers go to docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from model_export.export import INPUT_NAMES, OPSET, OUTPUT_NAMES
from model_export.model import (
    AttentionClassifier,
    ExplainedClassifier,
    autograd_grad_cam,
)
from model_export.train import PRESETS


def median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench(preset: str, runs: int, threads: int, providers: list[str]) -> dict[str, object]:
    torch.manual_seed(0)
    model = AttentionClassifier(PRESETS[preset][0]).eval()
    explained = ExplainedClassifier(model).eval()
    volume = torch.rand(1, 24, 1, 256, 256)
    target = torch.tensor([-1])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        program = torch.onnx.export(
            explained, (volume, target), dynamo=True, opset_version=OPSET, external_data=False,
            input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, verbose=False,
        )
        program.save(str(path), external_data=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=providers)
    feeds = {"volume": volume.numpy(), "target_class": target.numpy()}

    def eager_autograd() -> object:
        return autograd_grad_cam(model, volume, target)

    def eager_graph() -> object:
        with torch.no_grad():
            return explained(volume, target)

    def onnxruntime_run() -> object:
        return session.run(None, feeds)

    # the three agree before they are timed
    _, cam = autograd_grad_cam(model, volume, target)
    ort_cam = session.run(["gradcam"], feeds)[0]
    correlation = float(np.corrcoef(cam.numpy().ravel(), ort_cam.ravel())[0, 1])
    result = {
        "preset": preset,
        "architecture": model.config.describe(),
        "provider": session.get_providers()[0],
        "threads": threads,
        "runs": runs,
        "gradcam_correlation": correlation,
        "torch_eager_autograd_ms": median_ms(eager_autograd, runs),
        "torch_eager_graph_ms": median_ms(eager_graph, runs),
        "onnxruntime_ms": median_ms(onnxruntime_run, runs),
    }
    result["ratio_torch_autograd_over_ort"] = (
        result["torch_eager_autograd_ms"] / result["onnxruntime_ms"]
    )
    result["ratio_torch_graph_over_ort"] = (
        result["torch_eager_graph_ms"] / result["onnxruntime_ms"]
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["paper", "demo"], choices=PRESETS)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for preset in args.configs:
        result = bench(preset, args.runs, args.threads, args.providers)
        print(json.dumps(result))
        print(f"{preset}: torch eager (autograd Grad-CAM) {result['torch_eager_autograd_ms']:.1f}"
              f" ms, torch eager (exported graph) {result['torch_eager_graph_ms']:.1f} ms, "
              f"onnxruntime {result['provider']} {result['onnxruntime_ms']:.1f} ms → "
              f"{result['ratio_torch_autograd_over_ort']:.2f}× faster", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
