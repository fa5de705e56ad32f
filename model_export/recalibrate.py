"""Fit a trained network's temperature and out-of-distribution distance again, without
retraining it: a format-1 checkpoint gets what format 2 carries, and a format-2 checkpoint gets
them refitted with the current code (after a change to the embedding the distance reads).

    python -m model_export.recalibrate OLD.pt --phantoms 480 --out NEW.pt

Format 2 adds the temperature (fitted on the validation split) and the embedding distance for
the out-of-distribution check (fitted on the training split, threshold from validation). Both
need the checkpoint's own split, so the cohort is regenerated exactly as format-1 training made
it: run seed ``seed`` gave phantoms ``seed * 100_000 + i`` (below seeds.CLASSIFIER, which later
runs use), and the split is the same stratified per-patient split. The network is unchanged:
a format-1 network centred its input on 0.5 (``input_offset``), so it keeps the padding frame
that format-2 training removes; the metadata says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_export import seeds
from model_export.data import Sample, _phantom_sample, make_splits, phantom_cohort
from model_export.model import AttentionClassifier, ModelConfig
from model_export.train import calibrate
from service.core.contract import CHECKPOINT_FORMAT, CheckpointKey, PreprocessingConfig
from service.phantoms import CLASS_NAMES

FORMAT_1_INPUT_OFFSET = 0.5


def format_1_cohort(n: int, preprocessing: PreprocessingConfig, seed: int,
                    workers: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    jobs = [(seed * 100_000 + i, CLASS_NAMES[i % 2], int(rng.integers(20, 31)), preprocessing)
            for i in range(n)]
    with ProcessPoolExecutor(max_workers=max(workers, 1)) as pool:
        return list(pool.map(_phantom_sample, jobs, chunksize=4))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_export.recalibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--phantoms", type=int, default=480)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    raw = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    old_format = raw.get(CheckpointKey.FORMAT)
    if old_format not in ("flaircad-checkpoint/1", CHECKPOINT_FORMAT):
        raise SystemExit(f"{args.checkpoint} is not a flaircad checkpoint")
    config = ModelConfig(**raw[CheckpointKey.MODEL_CONFIG])
    if old_format == "flaircad-checkpoint/1":
        config = ModelConfig(**{**raw[CheckpointKey.MODEL_CONFIG],
                                "input_offset": FORMAT_1_INPUT_OFFSET})
    model = AttentionClassifier(config)
    model.load_state_dict(raw[CheckpointKey.STATE_DICT])
    model.eval()
    # format 1 had no background field: air was 0 after min–max there too
    preprocessing = PreprocessingConfig.from_json(raw[CheckpointKey.PREPROCESSING])
    if old_format == CHECKPOINT_FORMAT:  # the cohort train.py drew: seeds.CLASSIFIER
        samples = phantom_cohort(args.phantoms, preprocessing, seed=args.seed,
                                 workers=args.threads)
    else:
        samples = format_1_cohort(args.phantoms, preprocessing, args.seed, args.threads)
    split = make_splits([s.label for s in samples], [s.patient_id for s in samples], 1,
                        args.seed)[0]
    temperature, distance, calibration, ood = calibrate(model, samples, split.train,
                                                        split.valid)
    summary = dict(raw[CheckpointKey.TRAINING_SUMMARY])
    if old_format == CHECKPOINT_FORMAT:
        torch.save({**raw, CheckpointKey.TEMPERATURE.value: temperature,
                    CheckpointKey.DISTANCE_STATE.value: distance.state_dict(),
                    CheckpointKey.CALIBRATION.value: calibration,
                    CheckpointKey.OUT_OF_DISTRIBUTION.value: ood}, args.out)
        _print_fitted(args.out, calibration, ood)
        return 0
    summary["seeds"] = {
        "classifier": [args.seed * 100_000, args.seed * 100_000 + args.phantoms],
        "pretrain": [seeds.PRETRAIN.start, seeds.PRETRAIN.stop],
        "export_check": [seeds.EXPORT_CHECK.start, seeds.EXPORT_CHECK.stop],
    }
    summary["recalibrated"] = ("format-1 network (input centred on 0.5: air is -2 against "
                               "zero padding); temperature and distance fitted afterwards")
    torch.save({**raw, CheckpointKey.FORMAT.value: CHECKPOINT_FORMAT,
                CheckpointKey.MODEL_CONFIG.value: config.to_dict(),
                CheckpointKey.PREPROCESSING.value: preprocessing.to_json(),
                CheckpointKey.TEMPERATURE.value: temperature,
                CheckpointKey.DISTANCE_STATE.value: distance.state_dict(),
                CheckpointKey.CALIBRATION.value: calibration,
                CheckpointKey.OUT_OF_DISTRIBUTION.value: ood,
                CheckpointKey.TRAINING_SUMMARY.value: summary}, args.out)
    _print_fitted(args.out, calibration, ood)
    return 0


def _print_fitted(out: Path, calibration: dict[str, Any], ood: dict[str, Any]) -> None:
    """What was fitted, on stderr, under the checkpoint's own keys."""
    print(json.dumps({"out": str(out), CheckpointKey.CALIBRATION.value: calibration,
                      CheckpointKey.OUT_OF_DISTRIBUTION.value: ood}, indent=2),
          file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
