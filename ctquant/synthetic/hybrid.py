"""Pneumonia painted into real CT: test cases whose lungs are real and whose lesions are known.

A real scan with a reference lung mask gets consolidation and ground-glass opacity (GGO) painted into
its lungs at the densities of real pneumonia, so the lung step is tested on dense lung against real
chest wall, mediastinum, diaphragm and abdomen, and the lesion step on real noise and vessels:

- consolidation at unenhanced soft-tissue density (``consolidation_hu``, +20 … +50 HU: as dense as
  the muscle beside it), pleura-based in the dependent bases (posterior; anterior with
  ``dependent="anterior"``, as in a prone patient), as a patch touching the
  mediastinum and, at ``severity="severe"``, as a whole airless lower lobe (below a plane tilted like
  the oblique fissure, which meets the diaphragm a third of the way back);
- GGO (``ggo_hu``, −650 … −350 HU) in a rim around each consolidation and in separate peripheral
  patches; vessels inside GGO keep their density (the painted value is a floor, not a replacement).

Edges are blended over about a voxel (partial volume) and the scan's own noise level is added to the
painted values. The lung truth stays the reference; the lesion truth is what was painted (1 GGO,
2 consolidation; GGO voxels where a vessel kept its density are not GGO). Deterministic by ``seed``.

Arrays are (z, y, x) in LPS as :mod:`ctquant.io.scans` delivers them: z index 0 is the most inferior slice,
y grows towards the patient's back (dependent side of a supine patient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

SEVERITIES = ("moderate", "severe")
GGO, CONSOLIDATION = 1, 2


@dataclass
class HybridCase:
    """A real scan with painted pneumonia: HU volume, lung truth, lesion truth and their volumes (mL)."""

    hu: np.ndarray
    lung_labels: np.ndarray
    lesion_labels: np.ndarray
    spacing_mm: tuple[float, float, float]
    volumes_ml: dict[str, Any]


def noise_sd_hu(hu: np.ndarray, body_soft_tissue: np.ndarray, spacing_mm: tuple[float, float, float]) -> float:
    """Image noise (HU): robust SD of the high-pass residual in soft tissue (-50 … +100 HU)."""
    sigma = [0.0] + [1.5 / s for s in spacing_mm[1:]]
    residual = hu.astype(np.float32) - ndi.gaussian_filter(hu.astype(np.float32), sigma)
    values = residual[body_soft_tissue]
    if values.size < 100:
        return 15.0
    mad = np.median(np.abs(values - np.median(values)))
    return float(np.clip(1.4826 * mad, 5.0, 60.0))


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator, sigma_vox: np.ndarray) -> np.ndarray:
    """A smooth random field of unit SD (irregular lesion borders)."""
    field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return field / max(float(field.std()), 1e-6)


def _blob(shape: tuple[int, ...], centre_vox: np.ndarray, radius_mm: float,
          spacing_mm: tuple[float, float, float], wobble: np.ndarray) -> np.ndarray:
    """An irregular ball of ``radius_mm`` around ``centre_vox`` (wobble: smooth field, unit SD)."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    d2 = sum(((g - c) * s / radius_mm) ** 2 for g, c, s in zip(grids, centre_vox, spacing_mm))
    return d2 <= (1.0 + 0.25 * wobble) ** 2


def _inplane_depth_mm(mask: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Distance (mm) of each voxel of ``mask`` to the mask's border within its own axial slice."""
    depth = np.zeros(mask.shape, dtype=np.float32)
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        depth[z] = ndi.distance_transform_edt(np.pad(mask[z], 1), sampling=spacing_mm[1:])[1:-1, 1:-1]
    return depth


def _lung_frame(lung: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relative height (0 base … 1 apex) and relative depth (0 front … 1 back) of each voxel in a lung."""
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    ys = np.flatnonzero(lung.any(axis=(0, 2)))
    z_rel = (np.arange(lung.shape[0]) - zs[0]) / max(1, zs[-1] - zs[0])
    y_rel = (np.arange(lung.shape[1]) - ys[0]) / max(1, ys[-1] - ys[0])
    return z_rel[:, None, None], y_rel[None, :, None]


def paint_pneumonia(hu: np.ndarray, lung_labels: np.ndarray, spacing_mm: tuple[float, float, float], *,
                    severity: str = "moderate", seed: int = 0,
                    consolidation_hu: tuple[float, float] = (20.0, 50.0),
                    ggo_hu: tuple[float, float] = (-650.0, -350.0), paint_ggo: bool = True,
                    dependent: str = "posterior") -> HybridCase:
    """Paint consolidation and GGO into the lungs of a real scan (see the module docstring).

    Args:
        hu: the real scan (z, y, x) in HU.
        lung_labels: its reference lungs (1 right, 2 left); painting stays inside them.
        severity: ``moderate`` (dependent pleura-based consolidation in both bases, a mediastinal
            patch, GGO) or ``severe`` (also a whole airless lower lobe on each side, more GGO).
        seed: the random stream (lesion shapes, densities, noise).
        paint_ggo: paint ground glass (a rim around each consolidation and separate patches); False paints the
            consolidation alone, with the same shapes.
        dependent: where the pleura-based consolidation lies: ``posterior`` (a supine patient) or
            ``anterior`` (a prone one); the whole airless lower lobe stays where the lobe is.
    """
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, not {severity!r}")
    if dependent not in ("posterior", "anterior"):
        raise ValueError(f"dependent must be posterior or anterior, not {dependent!r}")
    rng = np.random.default_rng(seed)
    spacing = np.asarray(spacing_mm, dtype=float)
    shape = hu.shape
    wobble = _smooth_field(shape, rng, 8.0 / spacing)
    body_soft = (hu > -50) & (hu < 100)
    noise_sd = noise_sd_hu(hu, body_soft, spacing_mm)
    consolidation = np.zeros(shape, dtype=bool)
    ggo = np.zeros(shape, dtype=bool)
    for side in (1, 2):
        lung = lung_labels == side
        if not lung.any():
            continue
        z_rel, y_rel = _lung_frame(lung)
        depth_mm = _inplane_depth_mm(lung, spacing_mm)
        # pleura-based dependent consolidation: the back (front) of the lower lung, ~12 (25) mm deep in-plane
        reach_mm = 12.0 if severity == "moderate" else 25.0
        y_dep = y_rel if dependent == "posterior" else 1.0 - y_rel  # 0 up … 1 down
        base = lung & (z_rel < 0.45 + 0.05 * wobble) & (y_dep > 0.55 - 0.1 * wobble) & (depth_mm < reach_mm * (1.0 + 0.4 * wobble))
        consolidation |= base
        if severity == "severe":  # the whole lower lobe, below a plane tilted like the oblique fissure
            consolidation |= lung & (z_rel < 0.6 * (y_rel - 0.3) / 0.7 + 0.04 * wobble)
        # a patch against the mediastinum at mid height
        medial = _medial_point(lung, depth_mm, z_rel, rng)
        if medial is not None:
            consolidation |= lung & _blob(shape, medial, 18.0, spacing_mm, wobble)
        # GGO: separate peripheral patches (anterior and lateral, where lungs are aerated)
        n_patches = 2 if severity == "moderate" else 4
        candidates = np.argwhere(lung & (depth_mm > 8.0) & (depth_mm < 25.0) & (z_rel > 0.35))
        if len(candidates):
            for index in rng.choice(len(candidates), size=min(n_patches, len(candidates)), replace=False):
                ggo |= lung & _blob(shape, candidates[index], float(rng.uniform(15.0, 30.0)), spacing_mm, wobble)
    lung_any = lung_labels > 0
    rim = lung_any & (ndi.distance_transform_edt(~consolidation, sampling=spacing_mm) <= 8.0)
    ggo = (ggo | rim) & ~consolidation & lung_any
    if not paint_ggo:
        ggo[:] = False
    painted = _blend(hu, lung_any, consolidation, ggo, rng, consolidation_hu, ggo_hu, noise_sd)
    lesion = np.zeros(shape, dtype=np.uint8)
    cons_w, ggo_w, cons_value, ggo_value = painted["weights"]
    lesion[(ggo_w >= 0.5) & lung_any & (hu < ggo_value)] = GGO  # a vessel that kept its density is no GGO
    lesion[(cons_w >= 0.5) & lung_any] = CONSOLIDATION
    voxel_ml = float(np.prod(spacing)) / 1000.0
    volumes: dict[str, Any] = {"severity": severity, "seed": seed, "noise_sd_hu": round(noise_sd, 1),
                               "consolidation_hu": round(cons_value, 1), "ggo_hu": round(ggo_value, 1)}
    for name, side in (("right", 1), ("left", 2), ("both", None)):
        in_lung = lung_labels == side if side else lung_any
        volumes[name] = {"lung_ml": round(float(in_lung.sum()) * voxel_ml, 2),
                         "ggo_ml": round(float((in_lung & (lesion == GGO)).sum()) * voxel_ml, 2),
                         "consolidation_ml": round(float((in_lung & (lesion == CONSOLIDATION)).sum()) * voxel_ml, 2)}
    return HybridCase(painted["hu"], lung_labels.astype(np.uint8), lesion, tuple(float(s) for s in spacing_mm), volumes)


def _medial_point(lung: np.ndarray, depth_mm: np.ndarray, z_rel: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray | None:
    """A point just inside the lung's medial (mediastinal) surface at mid height."""
    xs = np.flatnonzero(lung.any(axis=(0, 1)))
    body_mid = lung.shape[2] / 2.0
    medial_is_high_x = xs.mean() < body_mid  # the right lung (low x) has its mediastinum towards high x
    near_surface = lung & (depth_mm > 3.0) & (depth_mm < 8.0) & (np.abs(z_rel - 0.55) < 0.15)
    points = np.argwhere(near_surface)
    if len(points) == 0:
        return None
    x = points[:, 2]
    medial = points[x >= np.percentile(x, 90)] if medial_is_high_x else points[x <= np.percentile(x, 10)]
    return medial[rng.integers(len(medial))].astype(float)


def _blend(hu: np.ndarray, lung: np.ndarray, consolidation: np.ndarray, ggo: np.ndarray, rng: np.random.Generator,
           consolidation_hu: tuple[float, float], ggo_hu: tuple[float, float], noise_sd: float) -> dict[str, Any]:
    """Mix painted densities into the lungs with soft edges and the scan's noise level (nothing outside)."""
    cons_value = float(rng.uniform(*consolidation_hu))
    ggo_value = float(rng.uniform(*ggo_hu))
    cons_w = ndi.gaussian_filter(consolidation.astype(np.float32), (0.3, 0.7, 0.7)) * lung
    ggo_w = ndi.gaussian_filter(ggo.astype(np.float32), (0.3, 0.7, 0.7)) * lung
    noise = ndi.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), (0.0, 0.6, 0.6))
    noise *= noise_sd / max(float(noise.std()), 1e-6)
    original = hu.astype(np.float32)
    ggo_level = np.maximum(original, ggo_value + noise)  # vessels in GGO keep their density
    out = original + ggo_w * (ggo_level - original)
    out = out + cons_w * (cons_value + noise - out)
    return {"hu": np.rint(out).astype(hu.dtype if np.issubdtype(hu.dtype, np.integer) else np.float32),
            "weights": (cons_w, ggo_w, cons_value, ggo_value)}
