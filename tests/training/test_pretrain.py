"""Lesion-site maps of the phantoms, and backbone pretraining feeding transfer learning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model_export.model import AttentionClassifier, load_pretrained_backbone
from model_export.pretrain import pretrain
from model_export.train import PRESETS
from service.core.preprocess import PreprocessingConfig
from service.phantoms import LESION_SITES, generate_phantom

MS_ONLY = {"periventricular", "juxtacortical", "infratentorial", "callosal"}
CSVD_ONLY = {"periventricular-band", "lacune", "pontine"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_site_map_covers_exactly_the_lesion_mask(seed: int) -> None:
    for label, foreign in (("MS", CSVD_ONLY), ("cSVD", MS_ONLY)):
        phantom = generate_phantom(label, seed)
        assert phantom.lesion_sites is not None
        np.testing.assert_array_equal(phantom.lesion_sites > 0, phantom.lesion_mask)
        present = {LESION_SITES[k] for k in np.unique(phantom.lesion_sites) if k}
        assert present and not present & foreign


def test_pretraining_writes_weights_the_classifier_loads(tmp_path: Path) -> None:
    config = PRESETS["tiny"][0]
    model, history = pretrain(config, PreprocessingConfig(target_shape=(64, 64, 8)),
                              n_phantoms=4, epochs=1, seed=0, workers=1)
    assert history[0]["loss"] > 0 and "held_out" in history[-1]
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": model.backbone.state_dict(),
                "spatial_attention": model.attention.state_dict()}, path)

    classifier = AttentionClassifier(config)
    report = load_pretrained_backbone(classifier, path)
    assert report.missing == [] and report.mismatched == []
    assert "spatial.conv1.weight" in report.loaded
    torch.testing.assert_close(classifier.backbone.layer1[0].conv1.weight,
                               model.backbone.layer1[0].conv1.weight)
    assert classifier.spatial is not None
    torch.testing.assert_close(classifier.spatial.conv2.weight, model.attention.conv2.weight)
