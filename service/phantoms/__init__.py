"""Synthetic T2-FLAIR brain phantoms, MS or cSVD, with exact lesion ground truth.

The project has no patient data, so training, the export checks and every DICOM test start
here. A phantom is defined analytically in patient millimetres (DICOM's LPS) instead of on a
voxel grid: the same phantom can then be sampled on any acquisition (2D axial, 3D sagittal,
oblique) and every sampling agrees with the others, with the DICOM geometry written for it, and
with its lesion mask.

The two classes differ where the clinical distinction lies, not in how much lesion there is:

* ``MS``: ovoid lesions whose long axis is perpendicular to the lateral ventricles (Dawson's
  fingers), juxtacortical, infratentorial and callosal lesions; placed independently, so
  asymmetric.
* ``cSVD``: symmetric periventricular caps and smooth bands, confluent deep white-matter
  patches graded like Fazekas 1–3 (placed in mirrored pairs), and lacunes in the deep grey
  matter.

Each class draws its lesion load from overlapping log-uniform ranges, so volume alone cannot
separate them and both classes include phantoms with very little lesion.

A :class:`Shift` moves a phantom off the training distribution (noisier, brighter fat, a
T1-weighted contrast, no lesions, a tumour-like mass) for the out-of-distribution cohorts; the
default ``Shift()`` is the training distribution exactly. Every written series has its truth on
its own grid (:class:`SeriesTruth`: lesion and brain masks per file), and
:func:`write_lesion_seg` stores the lesion mask as a DICOM Segmentation of that series.

numpy and pydicom only: training imports this in data-loader workers, and the service tests use
it without torch (highdicom is imported by :func:`write_lesion_seg` alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

__all__ = [
    "CLASS_NAMES",
    "COMPRESSIONS",
    "VARIANTS",
    "Anatomy",
    "Band",
    "Contrast",
    "Lesion",
    "PhantomVolume",
    "SeriesTruth",
    "Shift",
    "Ventricles",
    "generate_phantom",
    "lesion_slices",
    "make_anatomy",
    "render",
    "series_truth",
    "write_dicom_series",
    "write_lesion_seg",
]

CLASS_NAMES: tuple[str, str] = ("MS", "cSVD")  # index = label id used by training

VARIANTS: tuple[str, ...] = ("axial", "sagittal", "oblique")
COMPRESSIONS: dict[str, UID] = {
    "jpegls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
    "rle": RLELossless,
    "jpeg-lossless": JPEGLosslessSV1,
}

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
F64Array = npt.NDArray[np.float64]

_F = np.float32
# Lesion loads (mL) are log-uniform over these ranges; they overlap almost completely.
_LOAD_RANGE_ML = {"MS": (0.3, 30.0), "cSVD": (0.4, 35.0)}
# The reference brain the deep structures below are laid out on (mm, head frame: x towards the
# patient's left, y posterior, z superior; origin at the centre of the cerebrum).
_REF_RADII = (66.0, 85.0, 62.0, 34.0)  # cerebrum: x, y, z above the origin, z below it
_BLOCK = 32  # points per culling block of render()
_CHUNK = 4096  # blocks rendered together (their temporaries stay in cache)


# --------------------------------------------------------------------------------------------
# Anatomy: every random choice of one phantom
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ventricles:
    """Lateral ventricles as bent, tapering ellipsoids (one per side) plus the third ventricle.

    A point is described in a per-side frame: ``s`` along the ventricle (anterior negative),
    ``u`` lateral from the bent centre line, ``w`` above it. The same frame gives the
    perpendicular direction Dawson's fingers follow and the bands cSVD wraps around it."""

    x0: float  # centre line's distance from the midline at s = 0
    y0: float
    z0: float
    half_length: float
    width: float
    height: float
    curv_front: float  # the centre line drops by curv * s**2 (mm) towards each horn
    curv_back: float
    divergence: float  # the centre line moves laterally by divergence * s
    atrium: float  # relative widening towards the occipital horn
    third_halfwidth: float

    def centre_line(self, side: float, s: Any) -> tuple[Any, Any]:
        """(x, z) of the centre line at ``s`` on one side (side +1 = left)."""
        curv = np.where(np.asarray(s) < 0, _F(self.curv_front), _F(self.curv_back))
        return side * (self.x0 + self.divergence * s), self.z0 - curv * s * s

    def frame(self, side: float, x: Any, y: Any, z: Any) -> tuple[Any, Any, Any]:
        """Approximate signed distance to the ventricle wall (mm, negative inside), the relative
        position along it (-1 frontal tip, +1 occipital tip) and the lateral offset relative to
        the local half-width (positive lateral)."""
        s = y - self.y0
        t = s / self.half_length
        xc, zc = self.centre_line(side, s)
        width = self.width * (1.0 + self.atrium * np.clip(t, -1.0, 1.0))
        pu = side * (x - xc) / width + 1e-4
        pw = (z - zc) / self.height
        rho = np.sqrt(pu * pu + t * t + pw * pw)
        gu, gt, gw = pu / width, t / self.half_length, pw / self.height
        grad = np.sqrt(gu * gu + gt * gt + gw * gw)
        return (rho - 1.0) * rho / grad, t, pu


@dataclass(frozen=True)
class Contrast:
    """Tissue intensities before gain, bias and noise (FLAIR: CSF dark, lesions brightest)."""

    gm: float
    wm: float
    deep_gm: float
    brainstem: float
    csf: float
    lesion: float
    fat: float
    muscle: float
    skull: float
    diploe: float
    gain: float


# Radiological descriptors of lesion voxels (index = value in PhantomVolume.lesion_sites).
# They describe where and what a lesion is, as a reader would annotate it, not the diagnosis.
LESION_SITES: tuple[str, ...] = (
    "none", "periventricular-band", "periventricular", "juxtacortical", "infratentorial",
    "callosal", "deep", "pontine", "lacune",
)


@dataclass(frozen=True, eq=False)
class Lesion:
    """One hyperintense ovoid, or a lacune: a CSF-filled cavity whose gliotic rim is bright, or
    (a distribution shift only) a mass: a core in an oedema rim, filling all they cover."""

    kind: str  # "ovoid" | "lacune" | "mass" (Shift(lesions="mass") only; rim_mm = oedema)
    site: str  # periventricular, juxtacortical, infratentorial, callosal, deep, pontine, lacune
    centre: F64Array  # head frame, mm
    axes: F64Array  # 3x3, columns are the principal directions in the head frame
    radii: F64Array  # mm along those directions (the cavity's, for a lacune)
    strength: float  # fraction of the full lesion contrast
    rim_mm: float = 0.0

    @property
    def nominal_mm3(self) -> float:
        a, b, c = (float(r) + self.rim_mm for r in self.radii)
        return 4.0 / 3.0 * math.pi * a * b * c


@dataclass(frozen=True)
class Band:
    """A smooth periventricular rim around one lateral ventricle, thickest at the horns (caps)."""

    side: int  # +1 left, -1 right
    body_mm: float
    front_mm: float  # extra thickness at the frontal horn: the frontal cap
    back_mm: float  # extra thickness at the occipital horn / atrium
    ripple: float  # irregularity of the thickness (Fazekas 3 is irregular)
    phase: float
    strength: float

    def thickness(self, t: Any, pu: Any, z: Any) -> Any:
        front = np.exp(-(((t + 1.0) / 0.3) ** 2))
        back = np.exp(-(((t - 1.0) / 0.3) ** 2))
        ripple = 1.0 + self.ripple * np.sin(6.0 * t + 0.25 * z + self.phase)
        medial = np.clip((pu + 0.35) / 0.3, 0.0, 1.0)  # no band on the septal wall
        return (self.body_mm + self.front_mm * front + self.back_mm * back) * ripple * medial


@dataclass(frozen=True, eq=False)
class Anatomy:
    """All random choices of one phantom; ``render`` is a pure function of it."""

    label: str
    seed: int
    centre_lps: F64Array  # head-frame origin in LPS mm
    rotation: F64Array  # 3x3, columns: head-frame axes in LPS (local -> LPS)
    radii: tuple[float, float, float, float]  # cerebrum x, y, z-up, z-down
    surface_waves: F64Array  # (n, 5): kx, ky, kz, phase, amplitude mm
    csf_mm: float
    skull_mm: float
    scalp_mm: float
    cortex_mm: float
    sulci: F64Array  # (n, 4): kx, ky, kz, phase of the gyral pattern
    sulcal_depth_mm: float
    sulcal_halfwidth_mm: float
    fissure_halfwidth_mm: float
    ventricles: Ventricles
    contrast: Contrast
    bias: F64Array  # (9,) coefficients of a quadratic log-bias in head coordinates / 100 mm
    noise_sigma: float
    sex: str
    load_target_ml: float = 0.0
    fazekas: int = 0  # cSVD grade; 0 for MS
    lesions: tuple[Lesion, ...] = ()
    bands: tuple[Band, ...] = ()

    @property
    def scale(self) -> tuple[float, float, float, float]:
        return (
            self.radii[0] / _REF_RADII[0],
            self.radii[1] / _REF_RADII[1],
            self.radii[2] / _REF_RADII[2],
            self.radii[3] / _REF_RADII[3],
        )

    def place(self, x: float, y: float, z: float) -> F64Array:
        """A reference-brain position scaled to this brain (head frame)."""
        sx, sy, su, sd = self.scale
        return np.array([x * sx, y * sy, z * (su if z > 0 else sd)])

    def size(self, rx: float, ry: float, rz: float) -> F64Array:
        sx, sy, su, sd = self.scale
        return np.array([rx * sx, ry * sy, rz * 0.5 * (su + sd)])

    def structure(self, name: str, side: int = 1) -> tuple[F64Array, F64Array]:
        """(centre, radii) in the head frame of a named ellipsoidal structure."""
        (x, y, z), (rx, ry, rz) = _STRUCTURES[name]
        if name == "caudate":
            xc, _ = self.ventricles.centre_line(1.0, y - self.ventricles.y0)
            x = float(xc) / self.scale[0] + self.ventricles.width / self.scale[0] + 3.0
        return self.place(side * x, y, z), self.size(rx, ry, rz)

    def to_lps(self, local: npt.ArrayLike) -> F64Array:
        return np.asarray(local, dtype=np.float64) @ self.rotation.T + self.centre_lps

    def to_local(self, lps: npt.ArrayLike) -> F64Array:
        return (np.asarray(lps, dtype=np.float64) - self.centre_lps) @ self.rotation

    def brain_centre_lps(self) -> F64Array:
        """Middle of the brain's superior-inferior extent: where an axial slab is centred."""
        cb_c, cb_r = self.structure("cerebellum")
        bottom = cb_c[2] - cb_r[2]
        return self.to_lps([0.0, 0.0, 0.5 * (self.radii[2] + bottom)])


# (centre, radii) on the reference brain; paired structures are given for the left side.
_STRUCTURES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "temporal": ((44.0, -6.0, -20.0), (21.0, 38.0, 20.0)),
    "cerebellum": ((22.0, 52.0, -42.0), (30.0, 28.0, 20.0)),
    "vermis": ((0.0, 50.0, -38.0), (12.0, 22.0, 17.0)),
    "brainstem": ((0.0, 12.0, -30.0), (13.0, 13.0, 30.0)),
    "fourth": ((0.0, 27.0, -36.0), (5.0, 3.0, 7.0)),
    "thalamus": ((11.0, 10.0, 3.0), (8.0, 14.0, 9.0)),
    "lentiform": ((24.0, -4.0, 1.0), (6.5, 16.0, 10.0)),
    "caudate": ((0.0, -22.0, 12.0), (5.0, 10.0, 8.0)),  # x follows the frontal horn
    "temporal_horn": ((31.0, 6.0, -16.0), (2.5, 13.0, 3.0)),
    "third": ((0.0, 6.0, -2.0), (2.5, 13.0, 9.0)),
    "neck": ((0.0, 5.0, -92.0), (62.0, 80.0, 55.0)),
}


def _check_label(label: str) -> int:
    if label not in CLASS_NAMES:
        raise ValueError(f"label must be one of {CLASS_NAMES}, got {label!r}")
    return CLASS_NAMES.index(label)


def _rotation(ax: float, ay: float, az: float) -> F64Array:
    """Rotation by ax, ay, az radians about x, then y, then z."""
    cx, sx, cy, sy, cz, sz = (math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay),
                              math.cos(az), math.sin(az))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _waves(rng: np.random.Generator, n: int, wavelength: tuple[float, float]) -> F64Array:
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = 2.0 * math.pi / rng.uniform(*wavelength, size=(n, 1))
    return np.hstack([dirs * k, rng.uniform(0.0, 2.0 * math.pi, size=(n, 1))])


def _geometry(label: str, seed: int) -> Anatomy:
    """The lesion-free anatomy; it depends on the seed only, so both classes of one seed share
    a head (a controlled pair) and anatomy alone can never predict the class."""
    rng = np.random.default_rng([seed, 1])
    radii = (
        float(rng.uniform(61.0, 70.0)),
        float(rng.uniform(79.0, 90.0)),
        float(rng.uniform(57.0, 66.0)),
        float(rng.uniform(31.0, 37.0)),
    )
    sx, sy, su, _ = (r / ref for r, ref in zip(radii, _REF_RADII, strict=True))
    size = float(rng.uniform(0.7, 1.4))  # ventricular size (atrophy), independent of class
    width, height = 7.0 * size * sx, 9.0 * size * su
    half_length = float(rng.uniform(37.0, 43.0)) * sy
    divergence = float(rng.uniform(0.08, 0.16))
    # keep a septum between the frontal horns
    x0 = 0.9 * width + 0.55 * divergence * half_length + 2.0 + float(rng.uniform(0.0, 2.0))
    ventricles = Ventricles(
        x0=x0,
        y0=float(rng.uniform(0.0, 4.0)) * sy,
        z0=float(rng.uniform(12.0, 16.0)) * su,
        half_length=half_length,
        width=width,
        height=height,
        curv_front=float(rng.uniform(0.002, 0.005)),
        curv_back=float(rng.uniform(0.005, 0.009)),
        divergence=divergence,
        atrium=float(rng.uniform(0.1, 0.35)),
        third_halfwidth=float(np.clip(2.2 * size, 1.2, 4.0)),
    )
    surface = _waves(rng, 4, (60.0, 140.0))
    surface = np.hstack([surface, rng.uniform(0.8, 2.5, size=(4, 1))])
    gain = float(rng.uniform(0.85, 1.25))
    contrast = Contrast(
        gm=float(rng.uniform(540.0, 580.0)),
        wm=float(rng.uniform(415.0, 445.0)),
        deep_gm=float(rng.uniform(475.0, 500.0)),
        brainstem=float(rng.uniform(450.0, 480.0)),
        csf=float(rng.uniform(30.0, 55.0)),
        lesion=float(rng.uniform(760.0, 880.0)),
        fat=float(rng.uniform(700.0, 820.0)),
        muscle=float(rng.uniform(230.0, 290.0)),
        skull=float(rng.uniform(20.0, 40.0)),
        diploe=float(rng.uniform(180.0, 260.0)),
        gain=gain,
    )
    angles = np.radians(rng.uniform([-4.0, -3.0, -5.0], [4.0, 3.0, 5.0]))
    return Anatomy(
        label=label,
        seed=seed,
        centre_lps=np.round(rng.uniform([-4.0, -8.0, -6.0], [4.0, 4.0, 6.0]), 3),
        rotation=_rotation(*angles),
        radii=radii,
        surface_waves=surface,
        csf_mm=float(rng.uniform(1.2, 3.0)) * (0.8 + 0.3 * size),
        skull_mm=float(rng.uniform(5.0, 7.5)),
        scalp_mm=float(rng.uniform(4.0, 6.5)),
        cortex_mm=float(rng.uniform(2.5, 3.3)),
        sulci=_waves(rng, 6, (20.0, 28.0)),
        sulcal_depth_mm=float(rng.uniform(11.0, 16.0)),
        sulcal_halfwidth_mm=float(rng.uniform(0.35, 0.8)) * (0.7 + 0.4 * size),
        fissure_halfwidth_mm=float(rng.uniform(0.6, 1.2)),
        ventricles=ventricles,
        contrast=contrast,
        bias=rng.normal(0.0, [0.12, 0.12, 0.12, 0.08, 0.08, 0.08, 0.05, 0.05, 0.05]),
        noise_sigma=float(rng.uniform(9.0, 20.0)),
        sex=str(rng.choice(["F", "M"])),
    )


def make_anatomy(label: str, seed: int, shift: Shift | None = None) -> Anatomy:
    """Head, contrast and lesions of one phantom; deterministic in (label, seed).

    ``shift`` is applied after everything is drawn: the same seed gives the same head, and
    ``None`` or ``Shift()`` give exactly the training-distribution phantom."""
    label_id = _check_label(label)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    anatomy = _geometry(label, seed)
    rng = np.random.default_rng([seed, 2, label_id])
    low, high = _LOAD_RANGE_ML[label]
    target_ml = float(math.exp(rng.uniform(math.log(low), math.log(high))))
    if label == "MS":
        lesions = _ms_lesions(anatomy, rng, target_ml)
        anatomy = replace(anatomy, load_target_ml=target_ml, lesions=tuple(lesions))
    else:
        grade, lesions, bands = _csvd_lesions(anatomy, rng, target_ml)
        anatomy = replace(
            anatomy, load_target_ml=target_ml, fazekas=grade, lesions=tuple(lesions), bands=bands
        )
    return _apply_shift(anatomy, shift)


# --------------------------------------------------------------------------------------------
# Distribution shifts
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Lesion placement
# --------------------------------------------------------------------------------------------


def _basis(first: F64Array, rng: np.random.Generator) -> F64Array:
    """An orthonormal basis whose first column is ``first`` and the rest random about it."""
    a = first / np.linalg.norm(first)
    helper = rng.normal(size=3)
    b = helper - a * (helper @ a)
    b /= np.linalg.norm(b)
    return np.stack([a, b, np.cross(a, b)], axis=1)


def _random_axes(rng: np.random.Generator) -> F64Array:
    return _basis(rng.normal(size=3), rng)


def _cerebrum_distance_at(anatomy: Anatomy, p: F64Array) -> float:
    x, y, z = (np.array([v], dtype=np.float32) for v in p)
    return float(_cerebrum_distance(anatomy, x, y, z)[0])


def _numeric_normal(f: Any, p: F64Array) -> F64Array:
    """Unit gradient of a scalar field by central differences (outward for a distance)."""
    h = 0.25
    grad = np.array([(f(p + h * e) - f(p - h * e)) / (2 * h) for e in np.eye(3)])
    return grad / np.linalg.norm(grad)


def _ventricle_point(anatomy: Anatomy, side: int, t: float, angle: float) -> F64Array:
    """A point on the wall of one lateral ventricle; angle 0 is lateral, pi/2 is the roof."""
    v = anatomy.ventricles
    s = t * v.half_length
    xc, zc = v.centre_line(side, s)
    width = v.width * (1.0 + v.atrium * t)
    r = math.sqrt(max(1.0 - t * t, 0.0))
    return np.array(
        [float(xc) + side * r * math.cos(angle) * width, v.y0 + s,
         float(zc) + r * math.sin(angle) * v.height]
    )


def _ventricle_normal(anatomy: Anatomy, side: int, p: F64Array) -> F64Array:
    v = anatomy.ventricles
    return _numeric_normal(lambda q: float(v.frame(side, q[0], q[1], q[2])[0]), p)


def _ovoid(site: str, centre: F64Array, axes: F64Array, radii: Any,
           rng: np.random.Generator) -> Lesion:
    return Lesion("ovoid", site, np.asarray(centre, dtype=np.float64), axes,
                  np.asarray(radii, dtype=np.float64), float(rng.uniform(0.8, 1.0)))


def _ms_periventricular(anatomy: Anatomy, rng: np.random.Generator, scale: float) -> Lesion:
    """Dawson's finger: an ovoid on the ventricle wall, long axis along the wall's normal
    (the course of the medullary vein it surrounds)."""
    side = int(rng.choice([-1, 1]))
    p = _ventricle_point(anatomy, side, float(rng.uniform(-0.8, 0.8)),
                         float(rng.uniform(0.0, 1.95)))
    normal = _ventricle_normal(anatomy, side, p)
    long = float(rng.uniform(3.5, 7.5)) * scale
    short = float(rng.uniform(1.4, 3.0)) * math.sqrt(scale)
    centre = p + normal * (0.8 * long + float(rng.uniform(0.0, 1.5)))
    radii = (long, short, short * float(rng.uniform(0.7, 1.0)))
    return _ovoid("periventricular", centre, _basis(normal, rng), radii, rng)


def _ms_juxtacortical(anatomy: Anatomy, rng: np.random.Generator, scale: float) -> Lesion:
    """An ovoid in the white matter touching the cortex (U-fibres), flat along the surface."""
    rx, ry, rzu, rzd = anatomy.radii
    while True:
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        if u[2] > -0.15 and abs(u[0]) > 0.2:
            break
    rz = rzu if u[2] > 0 else rzd
    p = u / math.sqrt((u[0] / rx) ** 2 + (u[1] / ry) ** 2 + (u[2] / rz) ** 2)
    for _ in range(3):  # project onto the perturbed surface
        n = _numeric_normal(lambda q: _cerebrum_distance_at(anatomy, q), p)
        p = p - n * _cerebrum_distance_at(anatomy, p)
    normal = _numeric_normal(lambda q: _cerebrum_distance_at(anatomy, q), p)
    thin = float(rng.uniform(1.3, 2.4)) * math.sqrt(scale)
    centre = p - normal * (anatomy.cortex_mm + 0.7 * thin)
    axes = _basis(normal, rng)
    radii = (thin, float(rng.uniform(2.5, 5.0)) * math.sqrt(scale), float(rng.uniform(1.8, 3.5)))
    return _ovoid("juxtacortical", centre, axes, radii, rng)


def _ms_infratentorial(anatomy: Anatomy, rng: np.random.Generator, scale: float) -> Lesion:
    """Pons, middle cerebellar peduncle or cerebellar white matter."""
    r = float(rng.uniform(1.5, 4.0)) * math.sqrt(scale)
    radii = (r * float(rng.uniform(1.0, 1.6)), r, r * float(rng.uniform(0.7, 1.0)))
    if rng.random() < 0.5:
        c, rad = anatomy.structure("brainstem")
        offset = rng.uniform([-0.45, -0.4, -0.5], [0.45, 0.4, 0.05]) * rad
        centre = c + offset
    else:
        side = int(rng.choice([-1, 1]))
        bs, _ = anatomy.structure("brainstem")
        cb, _ = anatomy.structure("cerebellum", side)
        w = float(rng.uniform(0.2, 0.7))
        centre = bs * (1 - w) + cb * w + rng.uniform(-3.0, 3.0, size=3)
    return _ovoid("infratentorial", centre, _random_axes(rng), radii, rng)


def _ms_callosal(anatomy: Anatomy, rng: np.random.Generator, scale: float) -> Lesion:
    """In the corpus callosum just above the ventricles, elongated perpendicular to it."""
    v = anatomy.ventricles
    s = float(rng.uniform(-0.75, 0.75)) * v.half_length
    _, zc = v.centre_line(1.0, s)
    centre = np.array([float(rng.uniform(-8.0, 8.0)), v.y0 + s,
                       float(zc) + v.height + float(rng.uniform(1.0, 3.0))])
    up = np.array([rng.normal(0, 0.25), rng.normal(0, 0.2), 1.0])
    radii = (float(rng.uniform(2.5, 5.0)) * scale, float(rng.uniform(1.3, 2.8)),
             float(rng.uniform(1.3, 2.8)))
    return _ovoid("callosal", centre, _basis(up, rng), radii, rng)


def _deep_white_matter_point(anatomy: Anatomy, rng: np.random.Generator, side: int,
                             near_ventricle: float = 1.0) -> F64Array:
    """Centrum semiovale / corona radiata: away from cortex, ventricles and deep grey."""
    v = anatomy.ventricles
    min_depth = anatomy.sulcal_depth_mm + anatomy.cortex_mm + 4.0
    for _ in range(200):
        s = float(rng.uniform(-1.05, 0.95)) * v.half_length
        xc, zc = v.centre_line(side, s)
        lateral = float(rng.uniform(4.0, 26.0 * near_ventricle))
        p = np.array([float(xc) + side * (v.width + lateral), v.y0 + s,
                      float(zc) + float(rng.uniform(-2.0, 30.0))])
        if _cerebrum_distance_at(anatomy, p) > -min_depth:
            continue
        if float(v.frame(side, p[0], p[1], p[2])[0]) < 2.0:
            continue
        if p[2] < float(zc) - 2.0 and abs(p[0]) < 32.0 * anatomy.scale[0]:
            continue  # deep grey territory
        return p
    return np.array([side * (v.x0 + v.width + 8.0), v.y0, v.z0 + 10.0])


def _ms_deep(anatomy: Anatomy, rng: np.random.Generator, scale: float) -> Lesion:
    p = _deep_white_matter_point(anatomy, rng, int(rng.choice([-1, 1])))
    r = float(rng.uniform(1.5, 4.0)) * scale
    radii = (r * float(rng.uniform(1.0, 1.8)), r, r * float(rng.uniform(0.6, 1.0)))
    return _ovoid("deep", p, _random_axes(rng), radii, rng)


_MS_SITES = {
    "periventricular": (_ms_periventricular, 0.36),
    "juxtacortical": (_ms_juxtacortical, 0.2),
    "infratentorial": (_ms_infratentorial, 0.14),
    "callosal": (_ms_callosal, 0.12),
    "deep": (_ms_deep, 0.18),
}


def _ms_lesions(anatomy: Anatomy, rng: np.random.Generator, target_ml: float) -> list[Lesion]:
    """Lesions in MS's typical places until the nominal load reaches the target; always at
    least a Dawson's finger and one lesion in a second typical area (dissemination in space)."""
    scale = float(np.clip((target_ml / 2.0) ** 0.2, 0.75, 1.7))
    names = list(_MS_SITES)
    probs = np.array([_MS_SITES[n][1] for n in names])
    second = str(rng.choice(["juxtacortical", "infratentorial", "callosal"]))
    lesions = [_ms_periventricular(anatomy, rng, scale), _MS_SITES[second][0](anatomy, rng, scale)]
    total = sum(les.nominal_mm3 for les in lesions) * 0.8
    while total < target_ml * 1000.0 and len(lesions) < 90:
        site = names[int(rng.choice(len(names), p=probs / probs.sum()))]
        lesion = _MS_SITES[site][0](anatomy, rng, scale)
        lesions.append(lesion)
        total += lesion.nominal_mm3 * 0.8
    return lesions


def _mirror(lesion: Lesion, rng: np.random.Generator) -> Lesion:
    """The contralateral partner of a lesion: mirrored across the midline, slightly jittered."""
    flip = np.diag([-1.0, 1.0, 1.0])
    centre = flip @ lesion.centre + rng.normal(0.0, 1.0, size=3)
    radii = lesion.radii * rng.uniform(0.85, 1.15, size=3)
    return replace(lesion, centre=centre, axes=flip @ lesion.axes, radii=radii,
                   strength=float(np.clip(lesion.strength + rng.normal(0, 0.04), 0.75, 1.0)))


def _band_volume_mm3(anatomy: Anatomy, band: Band) -> float:
    """Volume of a band outside the ventricle, counted on a 1.5 mm grid."""
    v = anatomy.ventricles
    margin = band.body_mm + max(band.front_mm, band.back_mm) + 3.0
    step = 1.5
    xs = np.arange(0.0, v.x0 + v.divergence * v.half_length + 2 * v.width + margin, step)
    ys = np.arange(v.y0 - v.half_length - margin, v.y0 + v.half_length + margin, step)
    zs = np.arange(v.z0 - 25.0 - margin, v.z0 + v.height + margin, step)
    x, y, z = (a.astype(np.float32) for a in np.meshgrid(band.side * xs, ys, zs, indexing="ij"))
    d, t, pu = v.frame(band.side, x, y, z)
    inside = (d > 0) & (d < band.thickness(t, pu, z))
    return float(inside.sum()) * step**3


def _csvd_deep(anatomy: Anatomy, rng: np.random.Generator, grade: int) -> list[Lesion]:
    """One deep white-matter hyperintensity: a punctate focus (grade 1) or a cluster of
    overlapping ellipsoids that reads as a confluent patch (grades 2–3)."""
    side = int(rng.choice([-1, 1]))
    near = {1: 1.0, 2: 0.8, 3: 0.55}[grade]
    centre = _deep_white_matter_point(anatomy, rng, side, near)
    count, size = {1: (1, (1.2, 2.8)), 2: (int(rng.integers(2, 5)), (2.0, 4.5)),
                   3: (int(rng.integers(3, 8)), (3.0, 7.0))}[grade]
    spread = 0.0 if count == 1 else size[1] * 1.2
    out = []
    for _ in range(count):
        r = float(rng.uniform(*size))
        radii = (r * float(rng.uniform(1.0, 1.6)), r, r * float(rng.uniform(0.7, 1.0)))
        c = centre + rng.normal(0.0, spread, size=3) * np.array([1.0, 1.3, 0.8])
        out.append(_ovoid("deep", c, _random_axes(rng), radii, rng))
    return out


def _lacune(anatomy: Anatomy, rng: np.random.Generator) -> Lesion:
    """A 3–15 mm cavity in the basal ganglia, thalamus or internal capsule."""
    name = str(rng.choice(["lentiform", "lentiform", "thalamus", "caudate"]))
    side = int(rng.choice([-1, 1]))
    c, r = anatomy.structure(name, side)
    centre = c + rng.uniform(-0.5, 0.5, size=3) * r
    diameter = float(rng.uniform(3.0, 15.0)) if rng.random() < 0.25 else float(
        rng.uniform(3.0, 8.0))
    radius = diameter / 2.0
    radii = np.array([radius, radius * float(rng.uniform(0.7, 1.0)),
                      radius * float(rng.uniform(1.0, 1.4))])
    axes = _basis(np.array([rng.normal(0, 0.3), rng.normal(0, 0.3), 1.0]), rng)[:, [1, 2, 0]]
    rim = float(rng.uniform(0.8, 1.4))
    return Lesion("lacune", "lacune", centre, axes, radii - rim * 0.5,
                  float(rng.uniform(0.8, 1.0)), rim_mm=rim)


def _csvd_lesions(
    anatomy: Anatomy, rng: np.random.Generator, target_ml: float
) -> tuple[int, list[Lesion], tuple[Band, ...]]:
    """Fazekas-graded periventricular bands and caps, mirrored deep patches and lacunes."""
    grade = 1 if target_ml < 3.0 else 2 if target_ml < 12.0 else 3
    fill = float(np.clip(target_ml / {1: 3.0, 2: 12.0, 3: 35.0}[grade], 0.1, 1.0))
    body = {1: rng.uniform(0.0, 0.9) * fill, 2: rng.uniform(1.0, 2.8), 3: rng.uniform(2.5, 5.0)}
    front = {1: rng.uniform(1.5, 3.5) * math.sqrt(fill), 2: rng.uniform(3.0, 5.5),
             3: rng.uniform(4.5, 8.0)}
    common = {
        "body_mm": float(body[grade]),
        "front_mm": float(front[grade]),
        "back_mm": float(front[grade] * rng.uniform(0.3, 0.9)),
        "ripple": float({1: 0.1, 2: 0.2, 3: 0.4}[grade] * rng.uniform(0.5, 1.0)),
        "phase": float(rng.uniform(0.0, 2.0 * math.pi)),
        "strength": float(rng.uniform(0.8, 1.0)),
    }
    bands = []
    for side in (1, -1):
        jitter = {k: v * float(rng.uniform(0.9, 1.1)) if k.endswith("mm") else v
                  for k, v in common.items()}
        bands.append(Band(side=side, **jitter))
    total = sum(_band_volume_mm3(anatomy, b) for b in bands)
    budget = 0.6 * target_ml * 1000.0  # the periventricular share of the load
    if total > budget:  # thinner rims: the load, not the ventricles' size, sets the amount
        f = max(budget / total, 0.25)
        bands = [replace(b, body_mm=b.body_mm * f, front_mm=b.front_mm * f,
                         back_mm=b.back_mm * f) for b in bands]
        total = sum(_band_volume_mm3(anatomy, b) for b in bands)

    lesions: list[Lesion] = []
    lacune_count = int(rng.choice(4, p={1: [0.55, 0.3, 0.15, 0.0], 2: [0.3, 0.35, 0.25, 0.1],
                                        3: [0.15, 0.35, 0.3, 0.2]}[grade]))
    for _ in range(lacune_count):
        lesions.append(_lacune(anatomy, rng))
        total += lesions[-1].nominal_mm3
    if grade >= 2 and rng.random() < 0.3:  # central pontine hyperintensity, symmetric
        c, r = anatomy.structure("brainstem")
        radii = np.array([0.4, 0.3, 0.25]) * r * rng.uniform(0.8, 1.2)
        lesions.append(_ovoid("pontine", c + np.array([0.0, -0.1 * r[1], -0.15 * r[2]]),
                              np.eye(3), radii, rng))
        total += lesions[-1].nominal_mm3 * 0.8
    while total < target_ml * 1000.0 and len(lesions) < 120:
        patch = _csvd_deep(anatomy, rng, grade)
        partners = [_mirror(les, rng) for les in patch] if rng.random() < 0.9 else []
        lesions.extend(patch + partners)
        # overlapping ellipsoids of a patch count roughly half
        total += sum(les.nominal_mm3 for les in patch + partners) * (0.8 if grade == 1 else 0.5)
    return grade, lesions, tuple(bands)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _soft(d: Any, width: float = 1.0) -> Any:
    """1 well inside (d << 0), 0 well outside, linear across ``width`` mm: a partial-volume
    edge, so point sampling on any grid has no staircase aliasing."""
    ramp = 0.5 - d * (1.0 / width)
    return np.clip(ramp, 0.0, 1.0, out=ramp)


def _ellipsoid(x: Any, y: Any, z: Any, c: Any, r: Any) -> Any:
    """Approximate signed distance (mm) to an axis-aligned ellipsoid; exact for spheres."""
    # Python floats keep float32 arrays float32 (numpy scalars would promote to float64)
    (cx, cy, cz), (ix, iy, iz) = (float(v) for v in c), (1.0 / float(v) for v in r)
    px = (x - cx) * ix + 1e-4
    py = (y - cy) * iy
    pz = (z - cz) * iz
    rho = np.sqrt(px * px + py * py + pz * pz)
    gx, gy, gz = px * ix, py * iy, pz * iz
    return (rho - 1.0) * rho / np.sqrt(gx * gx + gy * gy + gz * gz)


def _smooth_min(a: Any, b: Any, k: float) -> Any:
    """A union of two distance fields that fills the crease between them (radius ~k mm)."""
    h = np.clip(0.5 + (0.5 / k) * (b - a), 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _paint(img: Any, value: Any, alpha: Any) -> Any:
    return img + (value - img) * alpha


def _cerebrum_distance(a: Anatomy, x: Any, y: Any, z: Any, grid: _Blocks | None = None) -> Any:
    rx, ry, rzu, rzd = a.radii
    rz = np.where(z > 0, _F(rzu), _F(rzd))
    wide = rx * (1.0 + 0.07 * y * (1.0 / ry))  # the occipital half is wider (egg shape)
    px = x / wide + 1e-4
    py = y * (1.0 / ry)
    pz = z / rz
    rho = np.sqrt(px * px + py * py + pz * pz)
    gx, gy, gz = px / wide, py * (1.0 / ry), pz / rz
    d = (rho - 1.0) * rho / np.sqrt(gx * gx + gy * gy + gz * gz)
    for kx, ky, kz, phase, amp in a.surface_waves.tolist():
        d = d + amp * np.sin(kx * x + ky * y + kz * z + phase)
    for side in (1, -1):
        c, r = a.structure("temporal", side)
        if grid is None:
            d = np.minimum(d, _ellipsoid(x, y, z, c, r))
        else:  # only near the lobe (its coverings reach < 30 mm out)
            idx = grid.select(c, r + 30.0)
            d[idx] = np.minimum(d[idx], _ellipsoid(x[idx], y[idx], z[idx], c, r))
    return d


def _block_reduce(op: Any, v: Any) -> Any:
    """Per-row reduction by halving (much faster than ``op.reduce`` along a short axis)."""
    while v.shape[1] > 1:
        half = v.shape[1] // 2
        v = op(v[:, :half], v[:, half:])
    return v[:, 0]


class _Blocks:
    """A run of culling blocks: points in the head frame, each block with its bounding box,
    so a structure or lesion is evaluated only on the blocks that can contain it."""

    def __init__(self, x: Any, y: Any, z: Any, lo: Any, hi: Any) -> None:
        self.x, self.y, self.z, self.lo, self.hi = x, y, z, lo, hi

    def select(self, c: F64Array, half: F64Array) -> npt.NDArray[np.intp]:
        """Blocks whose bounding box meets the box ``c ± half``."""
        lo, hi = c - half, c + half
        hit = (self.lo[:, 0] <= hi[0]) & (self.hi[:, 0] >= lo[0])
        hit &= (self.lo[:, 1] <= hi[1]) & (self.hi[:, 1] >= lo[1])
        hit &= (self.lo[:, 2] <= hi[2]) & (self.hi[:, 2] >= lo[2])
        return np.flatnonzero(hit)


class _Grid:
    """All sample points in the head frame, split into blocks; ``active`` lists the blocks
    that can touch the head (the rest is air)."""

    def __init__(self, anatomy: Anatomy, flat_lps: F64Array) -> None:
        n = flat_lps.shape[0]
        nb = -(-n // _BLOCK)
        pad = nb * _BLOCK - n
        if pad:
            flat_lps = np.concatenate([flat_lps, np.repeat(flat_lps[-1:], pad, axis=0)])
        self.n, self.nb = n, nb
        offset = flat_lps.astype(np.float32) - anatomy.centre_lps.astype(np.float32)
        rot = anatomy.rotation.tolist()
        px, py, pz = offset[:, 0], offset[:, 1], offset[:, 2]
        x, y, z = (
            (px * rot[0][j] + py * rot[1][j] + pz * rot[2][j]).reshape(nb, _BLOCK)
            for j in range(3)
        )
        lo = np.stack([_block_reduce(np.minimum, v) for v in (x, y, z)], axis=1)
        hi = np.stack([_block_reduce(np.maximum, v) for v in (x, y, z)], axis=1)
        # the head: cerebrum plus coverings, the cerebellum, and the neck below
        rx, ry, rzu, _ = anatomy.radii
        reach = anatomy.csf_mm + anatomy.skull_mm + anatomy.scalp_mm + 8.0
        neck_c, neck_r = anatomy.structure("neck")
        active = self._touches_ellipsoid(
            lo, hi, np.zeros(3), np.array([rx * 1.07, ry, rzu]) + reach
        ) | self._touches_ellipsoid(lo, hi, neck_c, neck_r + 4.0)
        for side in (1, -1):
            cb_c, cb_r = anatomy.structure("cerebellum", side)
            active |= self._touches_ellipsoid(lo, hi, cb_c, cb_r + reach)
        self.x, self.y, self.z, self.lo, self.hi = x, y, z, lo, hi
        self.active = np.flatnonzero(active)

    @staticmethod
    def _touches_ellipsoid(lo: Any, hi: Any, c: F64Array, r: F64Array) -> Any:
        nearest = np.clip(c, lo, hi)
        return (((nearest - c) / r) ** 2).sum(axis=1) <= 1.0

    def chunks(self, size: int) -> Any:
        """Active blocks in runs of ``size``: small enough that the long chains of array
        operations in rendering stay in cache."""
        for start in range(0, self.active.size, size):
            idx = self.active[start:start + size]
            yield idx, _Blocks(self.x[idx], self.y[idx], self.z[idx], self.lo[idx], self.hi[idx])


def _sulcal_distance(a: Anatomy, x: Any, y: Any, z: Any) -> Any:
    """Distance to the nearest sulcus midline: |g| / |grad g| of a sum of plane waves, whose
    zero set is a labyrinth that reads as a gyral pattern."""
    g = np.zeros_like(x)
    gx, gy, gz = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    for kx, ky, kz, phase in a.sulci.tolist():
        arg = kx * x + ky * y + kz * z + phase
        g += np.sin(arg)
        c = np.cos(arg)
        gx += kx * c
        gy += ky * c
        gz += kz * c
    return np.abs(g) / (np.sqrt(gx * gx + gy * gy + gz * gz) + 1e-3)


def _paint_cerebrum(a: Anatomy, grid: _Blocks, img: Any, d_c: Any) -> Any:
    """Cortex, white matter, sulci, the interhemispheric and Sylvian fissures."""
    c = a.contrast
    x, y, z = grid.x, grid.y, grid.z
    depth = a.sulcal_depth_mm
    cortex = a.cortex_mm
    # interhemispheric fissure above the corpus callosum (down to the base beyond its ends)
    v = a.ventricles
    s = y - v.y0
    _, zc = v.centre_line(1.0, s)
    # the callosum's rounded genu and splenium: the floor drops steeply beyond them
    beyond = np.maximum(np.abs(s) * (1.0 / v.half_length) - 0.8, 0.0)
    floor = zc + (v.height + 5.0) - 80.0 * beyond * beyond
    # the fissure meanders a little, as the falx does not cut a flat plane through the brain
    phase = float(a.sulci[0, 3])
    midline = 2.0 * np.sin(0.05 * y + phase) + 1.2 * np.sin(0.08 * z - phase)
    # distance to the medial surface, which turns laterally under the fissure's floor
    medial = a.fissure_halfwidth_mm - np.abs(x - midline) - np.maximum(floor - z, 0.0)
    # the medial surface is a brain surface too: it gets cortex and sulci like the convexity
    d_s = np.maximum(d_c, medial)
    gm = _soft(-(d_s + cortex), 1.0)
    csf = _soft(-medial, 0.8)
    # sulci only in a shell under the surface
    flat_d = d_s.ravel()
    shell = np.flatnonzero((flat_d > -(depth + cortex + 3.0)) & (flat_d < 1.5))
    xs, ys, zs, ds = (arr.ravel()[shell] for arr in (x, y, z, d_s))
    dist = _sulcal_distance(a, xs, ys, zs)
    gm.ravel()[shell] = np.maximum(
        gm.ravel()[shell], _soft(dist - a.sulcal_halfwidth_mm - cortex, 1.0) *
        _soft(-(ds + depth + cortex), 3.0)
    )
    csf.ravel()[shell] = np.maximum(
        csf.ravel()[shell], _soft(dist - a.sulcal_halfwidth_mm, 0.8) * _soft(-(ds + depth), 3.0)
    )
    # Sylvian fissure: an oblique cleft from the lateral surface to the insula, and the
    # insular cistern, a sheet along the insula's dome-shaped surface
    ax = np.abs(x)
    sx, sy, su, sd = a.scale
    ey, ez = (y + 7.0 * sy) * (1.0 / (22.0 * sy)), (z - 1.0) * (1.0 / (14.0 * su))
    oval = ey * ey + ez * ez  # < 1 over the insula
    insula = 35.0 * sx - 5.0 * oval
    inner = _soft(oval - 1.0, 0.25)
    sheet = np.abs(ax - insula)
    # rises posteriorly and runs posteromedially in an axial slice
    cleft = np.abs(z + 2.0 * sd - 0.7 * (y + 8.0 * sy + 0.8 * (ax - insula))) * _F(0.75)
    lateral = _soft(insula - ax, 1.0) * _soft(-30.0 * sy - y, 3.0) * _soft(y - 14.0 * sy, 3.0)
    csf = np.maximum(csf, np.maximum(_soft(cleft - 1.0, 0.8) * lateral,
                                     _soft(sheet - 0.9, 0.8) * inner))
    gm = np.maximum(gm, np.maximum(_soft(cleft - 1.0 - cortex, 1.0) * lateral,
                                   _soft(sheet - 0.9 - cortex, 1.0) * inner))
    tissue = _paint(_paint(np.full_like(d_c, c.wm), c.gm, gm), c.csf, csf)
    return _paint(img, tissue, _soft(d_c))


def _paint_sub(img: Any, idx: Any, value: Any, alpha: Any) -> None:
    img[idx] = _paint(img[idx], value, alpha)


def _paint_anatomy(a: Anatomy, grid: _Blocks) -> tuple[Any, Any]:
    """The lesion-free FLAIR image on the active blocks and the distance to the brain."""
    c = a.contrast
    x, y, z = grid.x, grid.y, grid.z
    far = _F(1e3)
    d_c = _cerebrum_distance(a, x, y, z, grid)
    # infratentorial compartments, evaluated near themselves only
    d_cb = np.full_like(d_c, far)
    parts = [a.structure("cerebellum", 1), a.structure("cerebellum", -1), a.structure("vermis")]
    cb_lo = np.min([p[0] - p[1] for p in parts], axis=0) - 25.0
    cb_hi = np.max([p[0] + p[1] for p in parts], axis=0) + 25.0
    cb_idx = grid.select(0.5 * (cb_lo + cb_hi), 0.5 * (cb_hi - cb_lo))
    xb, yb, zb = x[cb_idx], y[cb_idx], z[cb_idx]
    d_cb[cb_idx] = np.minimum.reduce([_ellipsoid(xb, yb, zb, pc, pr) for pc, pr in parts])
    bs_c, bs_r = a.structure("brainstem")
    bs_idx = grid.select(bs_c, bs_r + 25.0)
    d_bs = np.full_like(d_c, far)
    d_bs[bs_idx] = _ellipsoid(x[bs_idx], y[bs_idx], z[bs_idx], bs_c, bs_r)
    d_brain = np.minimum(np.minimum(d_c, d_cb), d_bs)
    # the skull wraps all compartments together; the gaps between them are cisterns (CSF)
    d_env = _smooth_min(_smooth_min(d_c, d_cb, 10.0), d_bs, 8.0)
    neck_c, neck_r = a.structure("neck")
    neck_idx = grid.select(neck_c, neck_r + 5.0)
    d_neck = np.full_like(d_c, far)
    d_neck[neck_idx] = _ellipsoid(x[neck_idx], y[neck_idx], z[neck_idx], neck_c, neck_r)
    coverings = a.csf_mm + a.skull_mm
    d_head = np.minimum(d_env - (coverings + a.scalp_mm), d_neck)

    img = c.fat * _soft(d_head)
    img = _paint(img, c.muscle, _soft(d_head + a.scalp_mm))
    middle = np.abs(d_env - (a.csf_mm + 0.5 * a.skull_mm))
    skull = c.skull + (c.diploe - c.skull) * _soft(middle - 0.2 * a.skull_mm, 1.0)
    img = _paint(img, skull, _soft(d_env - coverings))
    img = _paint(img, c.csf, _soft(d_env - a.csf_mm))
    img = _paint_cerebrum(a, grid, img, d_c)

    # cerebellum: a CSF cleft (tentorium, cisterns) around it, folia, a white-matter core
    xb, yb, zb, db = x[cb_idx], y[cb_idx], z[cb_idx], d_cb[cb_idx]
    sub = _paint(img[cb_idx], c.csf, _soft(db - 1.5))
    core = np.minimum.reduce(
        [_ellipsoid(xb, yb, zb, pc + np.array([0.0, -0.15 * pr[1], 0.1 * pr[2]]), pr * 0.42)
         for pc, pr in parts[:2]]
    )
    tissue = _paint(np.full_like(db, c.gm * 0.96), c.wm, _soft(core, 2.0))
    wobble = 1.2 * np.sin(0.31 * xb + 0.17 * zb) + 0.8 * np.sin(0.23 * yb - 0.29 * zb)
    folia = np.clip((np.cos((db + wobble) * (2.0 * math.pi / 2.6)) - 0.6) / 0.4, 0.0, 1.0)
    tissue = _paint(tissue, c.csf * 2.0, 0.45 * folia * _soft(-(db + 10.0), 3.0))
    img[cb_idx] = _paint(sub, tissue, _soft(db))

    # brainstem with its cisterns below the midbrain, and the fourth ventricle
    zs, ds = z[bs_idx], d_bs[bs_idx]
    cistern = _soft(ds - 2.5) * _soft(zs - float(bs_c[2] + 0.5 * bs_r[2]), 3.0)
    sub = _paint(img[bs_idx], c.csf, cistern)
    img[bs_idx] = _paint(sub, c.brainstem, _soft(ds))

    for name, sides, value in (
        ("fourth", (1,), c.csf),
        ("thalamus", (1, -1), c.deep_gm),
        ("lentiform", (1, -1), c.deep_gm),
        ("caudate", (1, -1), c.deep_gm),
        ("temporal_horn", (1, -1), c.csf),
        ("third", (1,), c.csf),
    ):
        for side in sides:
            sc, sr = a.structure(name, side)
            if name == "third":
                sr = np.array([a.ventricles.third_halfwidth, sr[1], sr[2]])
            idx = grid.select(sc, sr + 1.0)
            _paint_sub(img, idx, value, _soft(_ellipsoid(x[idx], y[idx], z[idx], sc, sr)))
    return img, d_brain


def _ventricle_box(a: Anatomy, side: int, margin: float) -> tuple[F64Array, F64Array]:
    v = a.ventricles
    far_x = v.x0 + v.divergence * v.half_length + v.width * (1 + v.atrium) + margin
    near_x = max(v.x0 - v.divergence * v.half_length - v.width - margin, -margin)
    lo = np.array([near_x, v.y0 - v.half_length - margin,
                   v.z0 - v.curv_back * v.half_length**2 - v.height - margin])
    hi = np.array([far_x, v.y0 + v.half_length + margin, v.z0 + v.height + margin])
    if side < 0:
        lo[0], hi[0] = -hi[0], -lo[0]
    return 0.5 * (lo + hi), 0.5 * (hi - lo)


def _paint_ventricles_and_lesions(
    a: Anatomy, grid: _Blocks, img: Any, d_brain: Any
) -> tuple[Any, Any]:
    """Lateral ventricles, then lesions (only in parenchyma), then lacune cavities; returns the
    lesion mask and the lesion-site index (LESION_SITES) on the active blocks."""
    c = a.contrast
    x, y, z = grid.x, grid.y, grid.z
    lesion = np.zeros_like(img)
    mask = np.zeros(img.shape, dtype=bool)
    sites = np.zeros(img.shape, dtype=np.int8)
    cavity = np.zeros_like(img)
    core: Any = None  # a mass's opacity and its value (Shift(lesions="mass") only)
    core_value: Any = None
    touched: list[Any] = []
    bands = {b.side: b for b in a.bands}
    v = a.ventricles
    for side in (1, -1):
        band = bands.get(side)
        margin = 2.0 if band is None else band.body_mm + max(band.front_mm, band.back_mm) + 4.0
        idx = grid.select(*_ventricle_box(a, side, margin))
        xs, ys, zs = x[idx], y[idx], z[idx]
        d, t, pu = v.frame(side, xs, ys, zs)
        _paint_sub(img, idx, c.csf * 0.9, _soft(d))
        if band is not None:
            thick = band.thickness(t, pu, zs)
            lesion[idx] = np.maximum(lesion[idx], band.strength * _soft(d - thick))
            inside = (d > 0) & (d < thick)
            mask[idx] |= inside
            sites[idx] = np.where(inside, LESION_SITES.index("periventricular-band"), sites[idx])
            touched.append(idx)
    for les in a.lesions:
        reach = les.radii + les.rim_mm + 1.0
        half = np.sqrt(((les.axes * reach) ** 2).sum(axis=1))
        idx = grid.select(les.centre, half)
        if idx.size == 0:
            continue
        # coordinates along the lesion's principal axes
        cx, cy, cz = les.centre.tolist()
        dx, dy, dz = x[idx] - cx, y[idx] - cy, z[idx] - cz
        ax = les.axes.tolist()
        u = dx * ax[0][0] + dy * ax[1][0] + dz * ax[2][0]
        w = dx * ax[0][1] + dy * ax[1][1] + dz * ax[2][1]
        h = dx * ax[0][2] + dy * ax[1][2] + dz * ax[2][2]
        d = _ellipsoid(u, w, h, (0.0, 0.0, 0.0), les.radii)
        if les.kind == "mass":
            # space-occupying: the mottled core and the oedema around it fill all the brain
            # they cover (the sulci and ventricles there are effaced), painted once the
            # lesions are in; the oedema's outer edge is diffuse
            if core is None:
                core, core_value = np.zeros_like(img), np.zeros_like(img)
            mottle = np.sin(0.35 * u + 0.5) * np.sin(0.3 * w - 0.7) * np.sin(0.4 * h + 1.1)
            oedema = c.lesion * les.strength
            value = oedema + (oedema * (_MASS_CORE + 0.08 * mottle) - oedema) * _soft(d)
            alpha = _soft(d - les.rim_mm, 3.0)
            core_value[idx] = np.where(alpha > core[idx], value, core_value[idx])
            core[idx] = np.maximum(core[idx], alpha)
            sites[idx] = np.where(alpha > 0.5, LESION_SITES.index(les.site), sites[idx])
            touched.append(idx)
            continue
        lesion[idx] = np.maximum(lesion[idx], les.strength * _soft(d - les.rim_mm))
        inside = d < les.rim_mm
        mask[idx] |= inside
        sites[idx] = np.where(inside, LESION_SITES.index(les.site), sites[idx])
        if les.kind == "lacune":
            cavity[idx] = np.maximum(cavity[idx], _soft(d, 0.8))
        touched.append(idx)
    if not touched:
        return mask, sites
    idx = np.unique(np.concatenate(touched))
    # lesions replace parenchyma only: not the ventricles, sulci or anything outside the brain
    # (parenchyma: at least part way from CSF to the darker of grey and white matter)
    tissue = min(c.wm, c.gm)
    low, high = c.csf + 0.35 * (tissue - c.csf), c.csf + 0.75 * (tissue - c.csf)
    sub = img[idx]
    parenchyma = np.clip((sub - low) / (high - low), 0.0, 1.0) * _soft(d_brain[idx])
    sub = _paint(sub, c.lesion, lesion[idx] * parenchyma)
    cav = cavity[idx] * _soft(d_brain[idx])
    img[idx] = _paint(sub, c.csf * 1.3, cav)
    mask[idx] = (mask[idx] & (parenchyma > 0.5)) | (cav > 0.5)
    if core is not None:
        filled = core[idx] * _soft(d_brain[idx])
        img[idx] = _paint(img[idx], core_value[idx], filled)
        mask[idx] |= filled > 0.5
    sites[~mask] = 0
    return mask, sites


def _bias(a: Anatomy, x: Any, y: Any, z: Any) -> Any:
    u, v, w = x * 0.01, y * 0.01, z * 0.01
    b = a.bias.tolist()
    log_bias = (b[0] * u + b[1] * v + b[2] * w + b[3] * u * u + b[4] * v * v + b[5] * w * w
                + b[6] * u * v + b[7] * u * w + b[8] * v * w)
    return np.exp(log_bias)


def render(
    anatomy: Anatomy, points_lps: npt.ArrayLike, rng: np.random.Generator | None
) -> tuple[FloatArray, BoolArray]:
    """FLAIR intensity and lesion mask at arbitrary LPS points (shape (..., 3)); see
    :func:`render_with_sites`, which also returns each lesion voxel's site."""
    image, mask, _ = render_with_sites(anatomy, points_lps, rng)
    return image, mask


def render_with_sites(
    anatomy: Anatomy, points_lps: npt.ArrayLike, rng: np.random.Generator | None
) -> tuple[FloatArray, BoolArray, npt.NDArray[np.int8]]:
    """FLAIR intensity and lesion mask at arbitrary LPS points (shape (..., 3)).

    Without ``rng`` the image is the noiseless, bias-free signal (still with the scanner gain);
    with it, a smooth multiplicative bias field and Rician noise (the magnitude of complex
    Gaussian noise) are applied, drawn from ``rng`` in a fixed order."""
    image, mask, sites, _ = _render(anatomy, points_lps, rng, brain=False)
    return image, mask, sites


def _inside_brain(a: Anatomy, grid: _Blocks, d_brain: Any) -> Any:
    """Where the brain's partial-volume opacity exceeds one half (``_soft(d_brain) > 0.5``),
    and the fourth ventricle, which lies between the brainstem and the cerebellum."""
    inside = d_brain < 0.0
    centre, radii = a.structure("fourth")
    idx = grid.select(centre, radii + 1.0)
    inside[idx] |= _ellipsoid(grid.x[idx], grid.y[idx], grid.z[idx], centre, radii) < 0.0
    return inside


def _render(
    anatomy: Anatomy, points_lps: npt.ArrayLike, rng: np.random.Generator | None, *, brain: bool
) -> tuple[FloatArray, BoolArray, npt.NDArray[np.int8], BoolArray | None]:
    """:func:`render_with_sites`, and with ``brain`` the intracranial brain mask from the same
    pass: inside the brain's surface (cerebrum, cerebellum, brainstem, with the ventricles
    and the sulci they enclose; see :func:`_inside_brain`)."""
    pts = np.asarray(points_lps, dtype=np.float64)
    if pts.ndim < 1 or pts.shape[-1] != 3:
        raise ValueError(f"points must have shape (..., 3), got {pts.shape}")
    out_shape = pts.shape[:-1]
    flat = pts.reshape(-1, 3)
    if flat.shape[0] == 0:
        return (np.zeros(out_shape, np.float32), np.zeros(out_shape, bool),
                np.zeros(out_shape, np.int8), np.zeros(out_shape, bool) if brain else None)
    grid = _Grid(anatomy, flat)
    image = np.zeros((grid.nb, _BLOCK), dtype=np.float32)
    mask = np.zeros((grid.nb, _BLOCK), dtype=bool)
    sites = np.zeros((grid.nb, _BLOCK), dtype=np.int8)
    inside = np.zeros((grid.nb, _BLOCK), dtype=bool) if brain else None
    for idx, blocks in grid.chunks(_CHUNK):
        img, d_brain = _paint_anatomy(anatomy, blocks)
        if inside is not None:
            inside[idx] = _inside_brain(anatomy, blocks, d_brain)
        mask[idx], sites[idx] = _paint_ventricles_and_lesions(anatomy, blocks, img, d_brain)
        image[idx] = img
    image *= _F(anatomy.contrast.gain)
    if rng is not None:
        image *= _bias(anatomy, grid.x, grid.y, grid.z).astype(np.float32)
        noise = rng.standard_normal((2, *image.shape), dtype=np.float32)
        noise *= _F(anatomy.noise_sigma)
        image += noise[0]
        image = np.sqrt(image * image + noise[1] * noise[1])
    n = grid.n
    return (image.reshape(-1)[:n].reshape(out_shape).astype(np.float32, copy=False),
            mask.reshape(-1)[:n].reshape(out_shape),
            sites.reshape(-1)[:n].reshape(out_shape),
            None if inside is None else inside.reshape(-1)[:n].reshape(out_shape))


# --------------------------------------------------------------------------------------------
# Acquisition grids
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhantomVolume:
    """A phantom sampled on an axial grid, in the canonical SPL order of service.core.preprocess."""

    volume: FloatArray  # (S, H, W): inferior->superior, anterior->posterior, right->left
    lesion_mask: BoolArray  # True in hyperintense lesions and in lacunes including their rim
    label: str
    affine: F64Array  # 4x4: (axis0, axis1, axis2) voxel index -> LPS mm
    seed: int
    # LESION_SITES index of every lesion voxel (0 elsewhere): the descriptor map a reader's
    # annotation would give, used only to pretrain the backbone (model_export.pretrain)
    lesion_sites: npt.NDArray[np.int8] | None = None
    # intracranial brain (cerebrum, cerebellum, brainstem, with the ventricles and sulcal CSF
    # inside the brain's surface; not the coverings, the scalp, the neck or air)
    brain_mask: BoolArray | None = None


@dataclass(frozen=True)
class _Geometry:
    """One series' grid in DICOM terms; ``points`` is exactly what its headers say."""

    positions: F64Array  # (S, 3) ImagePositionPatient per slice
    row_dir: F64Array  # first IOP triplet: direction of increasing column index
    col_dir: F64Array  # second IOP triplet: direction of increasing row index
    pixel: float  # both PixelSpacing values
    rows: int
    cols: int
    thickness: float
    spacing: float

    def points(self) -> F64Array:
        c = np.arange(self.cols, dtype=np.float64)[:, None] * (self.pixel * self.row_dir)
        r = np.arange(self.rows, dtype=np.float64)[:, None] * (self.pixel * self.col_dir)
        return self.positions[:, None, None, :] + r[None, :, None, :] + c[None, None, :, :]

    @property
    def normal(self) -> F64Array:
        return np.cross(self.row_dir, self.col_dir)


def _ds(value: float) -> str:
    """A DS string (at most 16 characters) with no more precision than it can carry."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    if len(text) > 16:
        text = f"{value:.8g}"
    return text


def _exact(values: Any) -> F64Array:
    """Round geometry to what its DS strings hold, so files and renderings agree exactly."""
    return np.array([float(_ds(float(v))) for v in np.ravel(values)]).reshape(np.shape(values))


def _slab(centre: F64Array, row_dir: F64Array, col_dir: F64Array, slices: int, rows: int,
          cols: int, pixel: float, spacing: float, thickness: float) -> _Geometry:
    row_dir, col_dir = _exact(row_dir), _exact(col_dir)
    normal = np.cross(row_dir, col_dir)
    offsets = (np.arange(slices) - (slices - 1) / 2.0) * spacing
    corner = centre - (cols - 1) / 2.0 * pixel * row_dir - (rows - 1) / 2.0 * pixel * col_dir
    positions = _exact(corner[None, :] + offsets[:, None] * normal[None, :])
    return _Geometry(positions, row_dir, col_dir, pixel, rows, cols, thickness, spacing)


def _axial_geometry(anatomy: Anatomy, slices: int, matrix: int, thickness: float,
                    pixel: float) -> _Geometry:
    """Field of view centred on the scanner isocentre in-plane, slab centred on the brain.
    Pixel size and thickness are taken as their DS strings write them (0.9375 mm is exact;
    230/288 mm becomes 0.798611), so the headers describe the rendered grid exactly."""
    if slices < 1 or matrix < 1 or thickness <= 0 or pixel <= 0:
        raise ValueError("slices, matrix, slice thickness and pixel size must be positive")
    pixel, thickness = float(_ds(float(pixel))), float(_ds(float(thickness)))
    if pixel <= 0 or thickness <= 0:
        raise ValueError("pixel size and slice thickness must be at least 1e-6 mm")
    centre = np.array([0.0, 0.0, round(float(anatomy.brain_centre_lps()[2]), 1)])
    return _slab(centre, np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), slices, matrix,
                 matrix, pixel, thickness, thickness)


def _noise_rng(label: str, seed: int, variant: str) -> np.random.Generator:
    return np.random.default_rng([seed, 3, _check_label(label), VARIANTS.index(variant)])


_AXIAL_GRID: dict[str, float] = {"matrix": 256, "pixel_mm": 0.9375, "slice_thickness_mm": 5.0}


def generate_phantom(
    label: str,
    seed: int,
    *,
    slices: int = 24,
    matrix: int = 256,
    slice_thickness_mm: float = 5.0,
    pixel_mm: float = 0.9375,
    shift: Shift | None = None,
) -> PhantomVolume:
    """An axial acquisition of the phantom (contiguous slices, slab centred on the brain), as
    the canonical SPL array training and the service both use; ``shift`` moves it off the
    training distribution (see :class:`Shift`)."""
    if slices < 1 or matrix < 1 or slice_thickness_mm <= 0 or pixel_mm <= 0:
        raise ValueError("slices, matrix, slice thickness and pixel size must be positive")
    anatomy = make_anatomy(label, seed, shift)
    geometry = _axial_geometry(anatomy, slices, matrix, slice_thickness_mm, pixel_mm)
    return _axial_phantom(anatomy, geometry)


def _axial_phantom(anatomy: Anatomy, geometry: _Geometry) -> PhantomVolume:
    label, seed = anatomy.label, anatomy.seed
    volume, mask, sites, brain = _render(anatomy, geometry.points(),
                                         _noise_rng(label, seed, "axial"), brain=True)
    affine = np.eye(4)
    affine[:3, 0] = geometry.normal * geometry.spacing
    affine[:3, 1] = geometry.col_dir * geometry.pixel
    affine[:3, 2] = geometry.row_dir * geometry.pixel
    affine[:3, 3] = geometry.positions[0]
    return PhantomVolume(volume=volume, lesion_mask=mask, label=label, affine=affine, seed=seed,
                         lesion_sites=sites, brain_mask=brain)


def lesion_slices(p: PhantomVolume) -> npt.NDArray[np.bool_]:
    """Which axial slices show any lesion: slice-level ground truth."""
    return np.asarray(p.lesion_mask.any(axis=(1, 2)))


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------

_PROTOCOLS: dict[str, dict[str, Any]] = {
    "axial": {
        "SeriesDescription": "AX T2 FLAIR",
        "ProtocolName": "AX T2 FLAIR",
        "SequenceName": "*tir2d1_16",
        "MRAcquisitionType": "2D",
        "RepetitionTime": "9000",
        "EchoTime": "100",
        "InversionTime": "2500",
        "FlipAngle": "150",
        "EchoTrainLength": 16,
        "SeriesNumber": 3,
        "SeriesTime": "101500",
    },
    "sagittal": {
        "SeriesDescription": "SAG 3D FLAIR",
        "ProtocolName": "SAG 3D FLAIR",
        "SequenceName": "*spcir3d1_282",
        "MRAcquisitionType": "3D",
        "RepetitionTime": "5000",
        "EchoTime": "390",
        "InversionTime": "1800",
        "FlipAngle": "120",
        "EchoTrainLength": 282,
        "SeriesNumber": 5,
        "SeriesTime": "103000",
    },
}
# the oblique series is the axial protocol with a tilted slab
_PROTOCOLS["oblique"] = {
    **_PROTOCOLS["axial"],
    "SeriesDescription": "AX T2 FLAIR OBL",
    "ProtocolName": "AX T2 FLAIR OBL",
    "SeriesNumber": 4,
    "SeriesTime": "102200",
}
_DEFAULT_SLICES = {"axial": 24, "oblique": 24, "sagittal": 152}
_STUDY_DATE, _STUDY_TIME = "20240115", "100000"
_UID_ROOT = "flaircad-phantom"


def _series_geometry(anatomy: Anatomy, label: str, seed: int, variant: str, slices: int,
                     matrix: int = 256, pixel_mm: float = 0.9375,
                     slice_thickness_mm: float = 5.0) -> _Geometry:
    """The grid of one variant (``matrix``, ``pixel_mm`` and ``slice_thickness_mm``: the axial
    variant's only)."""
    if variant == "axial":
        return _axial_geometry(anatomy, slices, matrix, slice_thickness_mm, pixel_mm)
    brain = np.round(anatomy.brain_centre_lps(), 1)
    if variant == "sagittal":
        # columns run anterior->posterior, rows superior->inferior; slices step right->left
        centre = np.array([round(float(anatomy.centre_lps[0]), 1), 0.0, brain[2] - 10.0])
        geometry = _slab(centre, np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0]),
                         slices, 200, 200, 1.2, 1.2, 1.2)
        order = np.argsort(geometry.positions[:, 0], kind="stable")
        return replace(geometry, positions=geometry.positions[order])
    rng = np.random.default_rng([seed, 4, _check_label(label)])
    tilt = math.radians(float(rng.uniform(10.0, 20.0)) * float(rng.choice([-1.0, 1.0])))
    yaw = math.radians(float(rng.uniform(2.0, 5.0)) * float(rng.choice([-1.0, 1.0])))
    turn = _rotation(tilt, 0.0, yaw)
    return _slab(brain, turn[:, 0], turn[:, 1], slices, 256, 256, 0.9375, 5.0, 5.0)


def _uid(label: str, seed: int, *parts: object) -> UID:
    return generate_uid(entropy_srcs=[_UID_ROOT, label, str(seed), *(str(p) for p in parts)])


@dataclass(frozen=True, eq=False)
class _Plan:
    """What one series is: its anatomy (shift applied), grid and what names its UIDs."""

    anatomy: Anatomy
    variant: str
    geometry: _Geometry
    shift: Shift
    uid_parts: tuple[object, ...]  # variant, slices, then what differs from the defaults


def _plan(label: str, seed: int, variant: str, slices: int | None, shift: Shift | None,
          matrix: int | None, pixel_mm: float | None,
          slice_thickness_mm: float | None) -> _Plan:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    n_slices = _DEFAULT_SLICES[variant] if slices is None else int(slices)
    if n_slices < 1:
        raise ValueError("slices must be positive")
    if shift is not None and not isinstance(shift, Shift):
        raise TypeError(f"shift must be a Shift or None, got {type(shift).__name__}")
    given = {"matrix": matrix, "pixel_mm": pixel_mm, "slice_thickness_mm": slice_thickness_mm}
    if variant != "axial" and any(v is not None for v in given.values()):
        raise ValueError("matrix, pixel_mm and slice_thickness_mm apply to the axial variant "
                         f"only, not to {variant!r}")
    if matrix is not None and int(matrix) != matrix:
        raise ValueError(f"matrix must be a whole number, got {matrix!r}")
    grid = {k: _AXIAL_GRID[k] if v is None else float(v) for k, v in given.items()}
    anatomy = make_anatomy(label, seed, shift)
    geometry = _series_geometry(anatomy, label, seed, variant, n_slices, int(grid["matrix"]),
                                float(grid["pixel_mm"]), float(grid["slice_thickness_mm"]))
    shift = _NO_SHIFT if shift is None else shift
    # only what is not the default enters the UIDs, so default series keep theirs
    extra: list[str] = []
    if not shift.is_default:
        extra.append(f"shift {shift!r}")
    if variant == "axial" and (geometry.rows, geometry.pixel, geometry.thickness) != (
            _AXIAL_GRID["matrix"], _AXIAL_GRID["pixel_mm"], _AXIAL_GRID["slice_thickness_mm"]):
        extra.append(f"grid {geometry.rows} {geometry.pixel!r} {geometry.thickness!r}")
    return _Plan(anatomy, variant, geometry, shift, (variant, n_slices, *extra))


@dataclass(frozen=True, eq=False)
class SeriesTruth:
    """Ground truth on the grid of one written series.

    ``lesion_mask[k]`` and ``brain_mask[k]`` belong to file ``IM{k+1:04d}.dcm`` (instance
    number k + 1) and have its pixel array's (rows, columns); the geometry is that of the
    headers (``ImagePositionPatient`` per file, ``ImageOrientationPatient``, ``PixelSpacing``)."""

    label: str
    seed: int
    variant: str
    shift: Shift
    lesion_mask: BoolArray  # (n_files, rows, cols)
    brain_mask: BoolArray  # (n_files, rows, cols), see PhantomVolume.brain_mask
    positions_lps: F64Array  # (n_files, 3): ImagePositionPatient of each file
    row_dir: F64Array  # first IOP triplet: direction of increasing column index
    col_dir: F64Array  # second IOP triplet: direction of increasing row index
    pixel_spacing_mm: tuple[float, float]  # PixelSpacing: (between rows, between columns)
    slice_thickness_mm: float
    spacing_between_slices_mm: float
    series_instance_uid: str

    @property
    def shape(self) -> tuple[int, int, int]:
        n, rows, cols = self.lesion_mask.shape
        return int(n), int(rows), int(cols)

    def points(self) -> F64Array:
        """LPS position (mm) of every voxel, shape (n_files, rows, cols, 3)."""
        return _Geometry(self.positions_lps, self.row_dir, self.col_dir,
                         self.pixel_spacing_mm[0], *self.shape[1:], self.slice_thickness_mm,
                         self.spacing_between_slices_mm).points()


def _series_uid(label: str, seed: int, plan: _Plan) -> UID:
    return _uid(label, seed, *plan.uid_parts, "series")


def _truth(label: str, seed: int, plan: _Plan, lesion_mask: BoolArray,
           brain_mask: BoolArray) -> SeriesTruth:
    g = plan.geometry
    return SeriesTruth(
        label=label, seed=seed, variant=plan.variant, shift=plan.shift,
        lesion_mask=lesion_mask, brain_mask=brain_mask, positions_lps=g.positions.copy(),
        row_dir=g.row_dir.copy(), col_dir=g.col_dir.copy(),
        pixel_spacing_mm=(g.pixel, g.pixel), slice_thickness_mm=g.thickness,
        spacing_between_slices_mm=g.spacing, series_instance_uid=_series_uid(label, seed, plan),
    )


def series_truth(
    label: str,
    seed: int,
    *,
    variant: str = "axial",
    slices: int | None = None,
    shift: Shift | None = None,
    matrix: int | None = None,
    pixel_mm: float | None = None,
    slice_thickness_mm: float | None = None,
) -> SeriesTruth:
    """The lesion and brain masks of the series :func:`write_dicom_series` writes for the same
    arguments, voxel for voxel, without writing it. The masks do not depend on noise, so this
    renders the noiseless phantom once (about half the cost of writing the series); callers
    that write the series anyway get the same truth from ``write_dicom_series(truth=True)``."""
    plan = _plan(label, seed, variant, slices, shift, matrix, pixel_mm, slice_thickness_mm)
    _, mask, _, brain = _render(plan.anatomy, plan.geometry.points(), None, brain=True)
    assert brain is not None
    return _truth(label, seed, plan, mask, brain)


def _jpeg_lossless_unavailable() -> str | None:
    from pydicom.pixels import get_encoder

    try:
        encoder = get_encoder(JPEGLosslessSV1)
    except NotImplementedError:
        return ("pydicom cannot encode JPEG Lossless SV1 (1.2.840.10008.1.2.4.70): it has no "
                "encoder for that transfer syntax; use 'jpegls', 'jpeg2000' or 'rle'")
    if not encoder.is_available:
        return (f"no JPEG Lossless SV1 encoder plugin is installed "
                f"({encoder.missing_dependencies}); use 'jpegls', 'jpeg2000' or 'rle'")
    return None


@overload
def write_dicom_series(
    label: str, seed: int, out_dir: Path, *, variant: str = ..., slices: int | None = ...,
    compress: str | None = ..., shift: Shift | None = ..., matrix: int | None = ...,
    pixel_mm: float | None = ..., slice_thickness_mm: float | None = ...,
    truth: Literal[False] = ...,
) -> list[Path]: ...


@overload
def write_dicom_series(
    label: str, seed: int, out_dir: Path, *, variant: str = ..., slices: int | None = ...,
    compress: str | None = ..., shift: Shift | None = ..., matrix: int | None = ...,
    pixel_mm: float | None = ..., slice_thickness_mm: float | None = ...,
    truth: Literal[True],
) -> tuple[list[Path], SeriesTruth]: ...


def write_dicom_series(
    label: str,
    seed: int,
    out_dir: Path,
    *,
    variant: str = "axial",
    slices: int | None = None,
    compress: str | None = None,
    shift: Shift | None = None,
    matrix: int | None = None,
    pixel_mm: float | None = None,
    slice_thickness_mm: float | None = None,
    truth: bool = False,
) -> list[Path] | tuple[list[Path], SeriesTruth]:
    """Write the phantom as a classic single-frame MR Image Storage series, one file per slice
    (``IM0001.dcm`` …), byte-for-byte reproducible.

    All variants of one (label, seed) share the study and the frame of reference: they are
    the same head in the same scanner coordinates, which lets multi-series code be tested.
    ``compress`` picks a lossless transfer syntax (see ``COMPRESSIONS``); SOP Instance UIDs do
    not change with it, since a lossless transfer syntax does not make a new image.

    ``shift`` moves the phantom off the training distribution (the protocol header stays
    FLAIR's, even for a T1 contrast); ``matrix``, ``pixel_mm`` and ``slice_thickness_mm``
    change the axial grid (axial only; the axial series is always exactly what
    :func:`generate_phantom` renders for the same arguments). Series and instance UIDs change
    with a non-default shift or grid. With ``truth`` it returns ``(paths, SeriesTruth)``: the
    masks from the same rendering pass."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if compress is not None and compress not in COMPRESSIONS:
        raise ValueError(f"compress must be None or one of {tuple(COMPRESSIONS)}, got {compress!r}")
    if compress == "jpeg-lossless" and (why := _jpeg_lossless_unavailable()) is not None:
        raise ValueError(why)
    plan = _plan(label, seed, variant, slices, shift, matrix, pixel_mm, slice_thickness_mm)
    anatomy, geometry = plan.anatomy, plan.geometry
    n_slices = len(geometry.positions)
    if variant == "axial":
        phantom = _axial_phantom(anatomy, geometry)
        volume, mask, brain = phantom.volume, phantom.lesion_mask, phantom.brain_mask
    else:
        volume, mask, _, brain = _render(anatomy, geometry.points(),
                                         _noise_rng(label, seed, variant), brain=truth)

    peak = float(volume.max())
    slope_text = _ds(max(peak, 1.0) / 60000.0) if peak > 0 else "1"
    slope = float(slope_text)
    stored = np.clip(np.rint(volume / slope), 0, 65535).astype(np.uint16)
    high = float(np.percentile(volume, 99.5))
    window_center, window_width = _ds(round(high * 0.5, 1)), _ds(round(max(high, 1.0), 1))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    protocol = _PROTOCOLS[variant]
    study_uid = _uid(label, seed, "study")
    frame_uid = _uid(label, seed, "frame-of-reference")
    series_uid = _series_uid(label, seed, plan)
    iop = [_ds(float(v)) for v in (*geometry.row_dir, *geometry.col_dir)]
    normal = geometry.normal
    paths = []
    for k in range(n_slices):
        ds = _base_dataset(label, seed, anatomy, protocol)
        sop_uid = _uid(label, seed, *plan.uid_parts, "instance", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.InstanceNumber = k + 1
        position = geometry.positions[k]
        ds.ImagePositionPatient = [_ds(float(v)) for v in position]
        ds.ImageOrientationPatient = iop
        ds.SliceLocation = _ds(float(position @ normal))
        ds.PixelSpacing = [_ds(geometry.pixel), _ds(geometry.pixel)]
        ds.SliceThickness = _ds(geometry.thickness)
        ds.SpacingBetweenSlices = _ds(geometry.spacing)
        ds.Rows, ds.Columns = geometry.rows, geometry.cols
        ds.AcquisitionMatrix = [0, geometry.cols, geometry.rows, 0]
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope_text, "0", "US"
        ds.WindowCenter, ds.WindowWidth = window_center, window_width
        pixels = np.ascontiguousarray(stored[k])
        ds.PixelData = pixels.tobytes()
        if compress is not None:
            ds.compress(COMPRESSIONS[compress], pixels, generate_instance_uid=False)
        path = out_dir / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    if not truth:
        return paths
    assert brain is not None
    return paths, _truth(label, seed, plan, mask, brain)


def _base_dataset(label: str, seed: int, anatomy: Anatomy, protocol: dict[str, Any]) -> Dataset:
    """Header elements shared by every instance of a series."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = _STUDY_DATE
    ds.StudyTime = _STUDY_TIME
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = protocol["SeriesTime"]
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.Manufacturer = "flaircad phantom"
    ds.ManufacturerModelName = "analytic FLAIR phantom"
    ds.InstitutionName = "synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MRI BRAIN"
    ds.SeriesDescription = protocol["SeriesDescription"]
    ds.PatientName = f"PHANTOM^{label}^{seed:04d}"
    ds.PatientID = f"PHANTOM-{label}-{seed:04d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = anatomy.sex
    ds.BodyPartExamined = "BRAIN"
    ds.ScanningSequence = ["SE", "IR"]
    ds.SequenceVariant = ["SK", "SP", "MP"]
    ds.ScanOptions = ["IR"]
    ds.MRAcquisitionType = protocol["MRAcquisitionType"]
    ds.SequenceName = protocol["SequenceName"]
    ds.RepetitionTime = protocol["RepetitionTime"]
    ds.EchoTime = protocol["EchoTime"]
    ds.InversionTime = protocol["InversionTime"]
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "123.2"
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = "3"
    ds.EchoTrainLength = protocol["EchoTrainLength"]
    ds.PixelBandwidth = "250"
    ds.ProtocolName = protocol["ProtocolName"]
    ds.InPlanePhaseEncodingDirection = "ROW"
    ds.FlipAngle = protocol["FlipAngle"]
    ds.PatientPosition = "HFS"
    ds.StudyID = "1"
    ds.SeriesNumber = protocol["SeriesNumber"]
    ds.AcquisitionNumber = 1
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


# --------------------------------------------------------------------------------------------
# Ground truth as DICOM Segmentation
# --------------------------------------------------------------------------------------------

_SEG_SERIES_DESCRIPTION = "flaircad phantom lesion truth - RESEARCH ONLY"
_SEG_TIME = "110000"


def write_lesion_seg(series_files: list[Path], truth: SeriesTruth, out_path: Path) -> Path:
    """Write ``truth.lesion_mask`` as a binary DICOM Segmentation (highdicom) of the phantom
    series in ``series_files``, byte-for-byte reproducible.

    One segment, a Lesion (SCT 52988006) of category Morphologically Altered Structure
    (SCT 49755003), is the generator's exact ground truth: no algorithm segmented the image.
    Frames reference the phantom's own instances (matched by InstanceNumber: truth index k is
    instance k + 1); frames without lesion are omitted, unless no frame has any. Same
    patient, study and frame of reference as the series; the UIDs derive from the series'.
    Write it outside the series' folder (it is a series of its own)."""
    import highdicom as hd
    from pydicom import dcmread
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    sources = sorted((dcmread(Path(p), stop_before_pixels=True) for p in series_files),
                     key=lambda ds: int(ds.get("InstanceNumber") or 0))
    n, rows, cols = truth.shape
    if [int(ds.get("InstanceNumber") or 0) for ds in sources] != list(range(1, n + 1)):
        raise ValueError(f"series_files must be the {n} instances of the truth's series "
                         f"(instance numbers 1..{n}), got {len(sources)} files")
    for ds in sources:
        if ds.get("SeriesInstanceUID") != truth.series_instance_uid:
            raise ValueError(f"{ds.get('SOPInstanceUID')} is not in the series the truth "
                             f"describes ({truth.series_instance_uid})")
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise ValueError(f"instance {ds.InstanceNumber} is {ds.Rows}x{ds.Columns}, the "
                             f"truth {rows}x{cols}")

    label, seed = truth.label, truth.seed
    parts = ("lesion-seg", truth.series_instance_uid)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Lesion",
        segmented_property_category=Code("49755003", "SCT", "Morphologically Altered Structure"),
        segmented_property_type=Code("52988006", "SCT", "Lesion"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="flaircad phantom generator (exact ground truth)",
            family=codes.cid7162.ManualProcessing,  # hand-written rules, no segmentation
            version="1",
        ),
        tracking_id="phantom lesion truth",
        tracking_uid=_uid(label, seed, *parts, "tracking"),
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=np.ascontiguousarray(truth.lesion_mask, dtype=bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=_uid(label, seed, *parts, "series"),
        series_number=int(sources[0].get("SeriesNumber") or 0) + 100,
        sop_instance_uid=_uid(label, seed, *parts, "instance"),
        instance_number=1,
        manufacturer="flaircad phantom",
        manufacturer_model_name="analytic FLAIR phantom",
        software_versions="flaircad phantoms",
        device_serial_number="0",
        content_description="exact lesion ground truth of the synthetic phantom",
        content_label="LESION_TRUTH",
        # all frames when there is no lesion at all (highdicom would warn and do so anyway)
        omit_empty_frames=bool(truth.lesion_mask.any()),
        series_description=_SEG_SERIES_DESCRIPTION,
        series_date=_STUDY_DATE,
        series_time=_SEG_TIME,
        content_date=_STUDY_DATE,
        content_time=_SEG_TIME,
    )
    # highdicom stamps the wall clock and a random dimension organisation UID: fix them
    seg.InstanceCreationDate, seg.InstanceCreationTime = _STUDY_DATE, _SEG_TIME
    dimension_uid = _uid(label, seed, *parts, "dimension-organization")
    for element in seg.iterall():
        if element.keyword == "DimensionOrganizationUID":
            element.value = dimension_uid
        elif element.keyword == "ContributionDateTime":
            element.value = _STUDY_DATE + _SEG_TIME
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out_path, enforce_file_format=True)
    return out_path
