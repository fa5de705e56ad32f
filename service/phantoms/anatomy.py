"""The head of a phantom: its shapes and their random draw (numpy only).

A phantom is defined analytically in patient millimetres (DICOM's LPS), in a head frame (x
towards the patient's left, y posterior, z superior; origin at the centre of the cerebrum) that
:attr:`Anatomy.rotation` and :attr:`Anatomy.centre_lps` place in the scanner. This module holds
the data every other part reads: :class:`Anatomy` (all random choices of one phantom), its
:class:`Ventricles`, :class:`Contrast`, :class:`Lesion` and :class:`Band`, the deep structures
laid out on a reference brain, and the distance fields of the cerebrum that both lesion
placement (:mod:`.lesions`) and rendering (:mod:`.rendering`) evaluate. The lesion-free head is
drawn from the seed alone (:func:`_head`); :func:`.lesions.make_anatomy` adds the lesions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # only for a type hint: rendering builds on this module
    from service.phantoms.rendering import _Blocks

CLASS_NAMES: tuple[str, str] = ("MS", "cSVD")  # index = label id used by training

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
F64Array = npt.NDArray[np.float64]

_F = np.float32
# The reference brain the deep structures below are laid out on (mm, head frame: x towards the
# patient's left, y posterior, z superior; origin at the centre of the cerebrum).
_REF_RADII = (66.0, 85.0, 62.0, 34.0)  # cerebrum: x, y, z above the origin, z below it


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
    turn: F64Array = rz @ ry @ rx  # a typed name: matmul of literals is Any to mypy
    return turn


def _waves(rng: np.random.Generator, n: int, wavelength: tuple[float, float]) -> F64Array:
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = 2.0 * math.pi / rng.uniform(*wavelength, size=(n, 1))
    return np.hstack([dirs * k, rng.uniform(0.0, 2.0 * math.pi, size=(n, 1))])


def _head(label: str, seed: int) -> Anatomy:
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


# --------------------------------------------------------------------------------------------
# Distance fields of the head (mm, negative inside)
# --------------------------------------------------------------------------------------------


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
