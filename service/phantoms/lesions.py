"""Where a phantom's lesions lie, by class, and :func:`make_anatomy` (numpy only).

The two classes differ where the clinical distinction lies, not in how much lesion there is:

* ``MS``: ovoid lesions whose long axis is perpendicular to the lateral ventricles (Dawson's
  fingers), juxtacortical, infratentorial and callosal lesions; placed independently, so
  asymmetric.
* ``cSVD``: symmetric periventricular caps and smooth bands, confluent deep white-matter
  patches graded like Fazekas 1–3 (placed in mirrored pairs), and lacunes in the deep grey
  matter.

Each class draws its lesion load from overlapping log-uniform ranges, so volume alone cannot
separate them and both classes include phantoms with very little lesion.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from service.phantoms.anatomy import (
    Anatomy,
    Band,
    F64Array,
    Lesion,
    _cerebrum_distance,
    _check_label,
    _head,
)
from service.phantoms.shift import Shift, _apply_shift

# Lesion loads (mL) are log-uniform over these ranges; they overlap almost completely.
_LOAD_RANGE_ML = {"MS": (0.3, 30.0), "cSVD": (0.4, 35.0)}


def make_anatomy(label: str, seed: int, shift: Shift | None = None) -> Anatomy:
    """Head, contrast and lesions of one phantom; deterministic in (label, seed).

    ``shift`` is applied after everything is drawn: the same seed gives the same head, and
    ``None`` or ``Shift()`` give exactly the training-distribution phantom."""
    label_id = _check_label(label)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    anatomy = _head(label, seed)
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
    unit: F64Array = grad / np.linalg.norm(grad)  # a typed name: Any to mypy otherwise
    return unit


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

