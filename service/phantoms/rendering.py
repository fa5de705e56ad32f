"""Rendering: a phantom's FLAIR intensity and lesion mask at any LPS points (numpy only).

:func:`render` evaluates the analytic phantom point by point, so every acquisition grid samples
the same head: tissues as partial-volume painted distance fields (no staircase aliasing on any
grid), the scanner gain, and with a random generator a smooth multiplicative bias field and
Rician noise. Points are processed in culling blocks (:class:`_Grid`, :class:`_Blocks`) so each
structure and lesion is evaluated only where it can be; :func:`_render` also returns the
lesion-site map and the intracranial brain mask from the same pass.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from service.phantoms.anatomy import (
    _F,
    LESION_SITES,
    Anatomy,
    BoolArray,
    F64Array,
    FloatArray,
    _cerebrum_distance,
    _ellipsoid,
)
from service.phantoms.shift import _MASS_CORE

_BLOCK = 32  # points per culling block of render()
_CHUNK = 4096  # blocks rendered together (their temporaries stay in cache)


def _soft(d: Any, width: float = 1.0) -> Any:
    """1 well inside (d << 0), 0 well outside, linear across ``width`` mm: a partial-volume
    edge, so point sampling on any grid has no staircase aliasing."""
    ramp = 0.5 - d * (1.0 / width)
    return np.clip(ramp, 0.0, 1.0, out=ramp)


def _smooth_min(a: Any, b: Any, k: float) -> Any:
    """A union of two distance fields that fills the crease between them (radius ~k mm)."""
    h = np.clip(0.5 + (0.5 / k) * (b - a), 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _paint(img: Any, value: Any, alpha: Any) -> Any:
    return img + (value - img) * alpha


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

