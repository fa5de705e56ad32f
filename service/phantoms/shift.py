"""Distribution shifts: a phantom moved off the training distribution (numpy only).

A :class:`Shift` makes a phantom noisier, its fat brighter, its contrast T1-weighted, removes
its lesions or replaces them by a tumour-like mass, for the out-of-distribution cohorts. It is
applied after everything else is drawn (:func:`_apply_shift`), so the same seed keeps its head,
and the default ``Shift()`` is the training distribution exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from service.phantoms.anatomy import Anatomy, Contrast, Lesion, _check_label, _rotation

SHIFT_CONTRASTS: tuple[str, ...] = ("flair", "t1")
SHIFT_LESIONS: tuple[str, ...] = ("default", "none", "mass")


@dataclass(frozen=True)
class Shift:
    """A departure from the training distribution; every default is that distribution exactly.

    ``contrast="t1"`` gives T1-weighted tissue intensities (white matter brighter than grey,
    CSF dark, lesions hypointense, fat bright) while the files keep their FLAIR protocol
    header: a non-FLAIR series that slipped through the selection. ``lesions="none"`` removes
    every lesion; ``lesions="mass"`` replaces them all by one large space-occupying mass with
    a surrounding oedema, in one cerebral hemisphere's white matter."""

    noise_scale: float = 1.0  # multiplies Anatomy.noise_sigma
    fat_scale: float = 1.0  # multiplies Contrast.fat
    contrast: str = "flair"  # one of SHIFT_CONTRASTS
    lesions: str = "default"  # one of SHIFT_LESIONS

    def __post_init__(self) -> None:
        # floats, so that Shift(noise_scale=2) and Shift(noise_scale=2.0) are one shift (and
        # give one set of UIDs)
        for name in ("noise_scale", "fat_scale"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0.0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
            object.__setattr__(self, name, value)
        if self.contrast not in SHIFT_CONTRASTS:
            raise ValueError(f"contrast must be one of {SHIFT_CONTRASTS}, got {self.contrast!r}")
        if self.lesions not in SHIFT_LESIONS:
            raise ValueError(f"lesions must be one of {SHIFT_LESIONS}, got {self.lesions!r}")

    @property
    def is_default(self) -> bool:
        return self == _NO_SHIFT


_NO_SHIFT = Shift()

# T1-weighted intensity of each tissue at the middle of its FLAIR range; a phantom's own FLAIR
# draw scales it, so T1 phantoms vary from seed to seed as FLAIR ones do
_T1_OF_FLAIR: dict[str, tuple[float, float]] = {  # field: (FLAIR range middle, T1 value)
    "gm": (560.0, 420.0),
    "wm": (430.0, 610.0),
    "deep_gm": (487.5, 470.0),
    "brainstem": (465.0, 560.0),
    "csf": (42.5, 60.0),
    "lesion": (820.0, 300.0),  # hypointense to white matter, a little below cortex
    "fat": (760.0, 820.0),
    "muscle": (260.0, 300.0),
    "skull": (30.0, 30.0),
    "diploe": (220.0, 470.0),  # fatty marrow
}
_MASS_CORE = 0.8  # the mass's core relative to its oedema (both hyperintense on FLAIR)


def _t1_contrast(c: Contrast) -> Contrast:
    return replace(c, **{name: getattr(c, name) / mid * t1
                         for name, (mid, t1) in _T1_OF_FLAIR.items()})


def _mass(anatomy: Anatomy) -> Lesion:
    """One large mass (20–35 mm radius with its oedema) centred in one hemisphere's white
    matter, above the ventricles. Its own random stream: the default draws are untouched."""
    rng = np.random.default_rng([anatomy.seed, 7, _check_label(anatomy.label)])
    _, sy, su, _ = anatomy.scale
    side = float(rng.choice([-1.0, 1.0]))
    radius = float(rng.uniform(20.0, 35.0))
    centre = np.array([side * float(rng.uniform(0.42, 0.5)) * anatomy.radii[0],
                       float(rng.uniform(-20.0, 15.0)) * sy, float(rng.uniform(15.0, 28.0)) * su])
    # stays in its hemisphere (clear of the fissure) and under the vertex
    total = np.array([
        min(radius * float(rng.uniform(0.85, 1.0)), abs(float(centre[0])) - 3.0),
        radius * float(rng.uniform(1.0, 1.2)),
        min(radius * float(rng.uniform(0.85, 1.0)), anatomy.radii[2] - float(centre[2]) - 4.0),
    ])
    oedema = float(total.min()) * float(rng.uniform(0.25, 0.4))
    axes = _rotation(0.0, 0.0, float(rng.uniform(-0.3, 0.3)))
    return Lesion("mass", "deep", centre, axes, total - oedema,
                  float(rng.uniform(0.85, 1.0)), rim_mm=oedema)


def _apply_shift(anatomy: Anatomy, shift: Shift | None) -> Anatomy:
    if shift is None or shift.is_default:
        return anatomy
    contrast = anatomy.contrast
    if shift.contrast == "t1":
        contrast = _t1_contrast(contrast)
    if shift.fat_scale != 1.0:
        contrast = replace(contrast, fat=contrast.fat * shift.fat_scale)
    changes: dict[str, Any] = {"contrast": contrast,
                               "noise_sigma": anatomy.noise_sigma * shift.noise_scale}
    if shift.lesions == "none":
        changes.update(lesions=(), bands=(), load_target_ml=0.0, fazekas=0)
    elif shift.lesions == "mass":
        mass = _mass(anatomy)
        changes.update(lesions=(mass,), bands=(), load_target_ml=mass.nominal_mm3 / 1000.0,
                       fazekas=0)
    return replace(anatomy, **changes)

