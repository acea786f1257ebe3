"""Lesion segmentation: ground-glass opacity (1) and consolidation (2) inside the lungs.

Two methods share one output convention (uint8 labels on the CT grid, zero outside the lungs):

- ``hu``: Hounsfield-unit bands (the Lung CT Analyzer idea), with vessels told from consolidation
  by density, thickness and surroundings (:func:`segment_lesions_hu`); the model-free reference;
- ``model``: the shipped MONAI network (:mod:`ctquant.segment.lesion_model`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .grid import block_majority, block_mean, upsample_blocks

GGO, CONSOLIDATION = 1, 2
#: Keywords of :func:`segment_lesions_hu` that ``configs/quantify.yaml`` sets under ``vessel_removal``.
VESSEL_SETTINGS = ("min_consolidation_thickness_mm", "vessel_min_hu", "vessel_sigma_mm", "context_sigma_mm",
                   "min_ggo_share", "min_component_ml", "smooth_sigma_mm", "min_ggo_thickness_mm", "ggo_above_normal_sd")


def opening_mm(mask: np.ndarray, spacing_mm: tuple[float, float, float], diameter_mm: float,
               work_mm: float = 1.5) -> np.ndarray:
    """Morphological opening with a ball of ``diameter_mm``: keeps the parts at least that thick.

    Fine grids are opened on a grid of about ``work_mm`` (block majority), and the result, grown by
    one block, is intersected with the full-resolution mask; distance maps do the ball operations.
    """
    if diameter_mm <= 0 or not mask.any():
        return mask.copy()
    radius = diameter_mm / 2.0
    box = ndi.find_objects(mask.astype(np.uint8))[0]
    pad = [int(np.ceil(radius / s)) + 2 for s in spacing_mm]
    box = tuple(slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(box, pad, mask.shape))
    sub = mask[box]
    factors = tuple(max(1, int(work_mm // s)) for s in spacing_mm)
    if factors != (1, 1, 1):
        small = block_majority(sub, factors)
        spacing = tuple(s * f for s, f in zip(spacing_mm, factors))
    else:
        small, spacing = sub, spacing_mm
    core = ndi.distance_transform_edt(small, sampling=spacing) >= radius
    opened = (ndi.distance_transform_edt(~core, sampling=spacing) < radius) if core.any() else np.zeros_like(small)
    if factors != (1, 1, 1):
        opened = upsample_blocks(ndi.binary_dilation(opened), factors, sub.shape, pad_mode="constant")
    out = np.zeros_like(mask)
    out[box] = opened & sub
    return out


def local_mean(values: np.ndarray, weights: np.ndarray, spacing_mm: tuple[float, float, float], sigma_mm: float,
               work_mm: float = 1.5) -> np.ndarray:
    """Gaussian-weighted mean of ``values`` over the voxels set in ``weights`` (normalised convolution).

    Computed on block means of about ``work_mm`` and brought back by blocks; 0 where no weighted
    voxel is near.
    """
    factors = tuple(max(1, int(work_mm // s)) for s in spacing_mm)
    weight = weights.astype(np.float32)
    weighted = np.where(weights, values, 0).astype(np.float32)
    if factors != (1, 1, 1):
        weight, weighted = block_mean(weight, factors), block_mean(weighted, factors)
    sigma = [sigma_mm / (s * f) for s, f in zip(spacing_mm, factors)]
    numerator = ndi.gaussian_filter(weighted, sigma)
    denominator = ndi.gaussian_filter(weight, sigma)
    mean = np.where(denominator > 1e-3, numerator / np.maximum(denominator, 1e-3), 0.0).astype(np.float32)
    return upsample_blocks(mean, factors, values.shape) if factors != (1, 1, 1) else mean


def segment_lesions_hu(hu: np.ndarray, lung_labels: np.ndarray, spacing_mm: tuple[float, float, float], *,
                       ggo_band_hu: tuple[float, float] = (-700.0, -300.0),
                       consolidation_band_hu: tuple[float, float] = (-300.0, 100.0),
                       min_consolidation_thickness_mm: float = 8.0,
                       vessel_min_hu: float = 20.0, vessel_sigma_mm: float = 2.0,
                       context_sigma_mm: float = 3.0, min_ggo_share: float = 0.5,
                       min_component_ml: float = 0.05, smooth_sigma_mm: float = 0.0,
                       min_ggo_thickness_mm: float = 0.0, ggo_above_normal_sd: float = 0.0) -> np.ndarray:
    """GGO and consolidation from HU bands inside the lungs, vessels told apart from consolidation.

    Voxels in the consolidation band are dense: consolidation, but also vessels, bronchial walls and
    hilar structures. A dense voxel is consolidation when

    - the dense tissue around it (Gaussian-weighted mean over dense voxels, ``vessel_sigma_mm``) is
      lighter than ``vessel_min_hu``: unenhanced blood is about 40 HU, enhanced blood far above the
      band, while consolidation holds some air; and
    - either the dense region is at least ``min_consolidation_thickness_mm`` thick (a thin tube is a
      vessel), or ground glass makes up at least ``min_ggo_share`` of the non-dense lung around it
      (``context_sigma_mm``): consolidation in viral pneumonia sits in ground glass, vessels run
      through aerated lung.

    Dense voxels are found on HU smoothed in-plane with a Gaussian of ``smooth_sigma_mm`` (sharp-kernel
    noise of ±50 HU would push consolidation out of its band). Against false ground glass in normal
    lungs, ground glass must be at least
    ``min_ggo_thickness_mm`` thick (an opening: the partial-volume shells around vessels, fissures and
    the pleura are one or two voxels thick), and denser than this scan's normal lung by
    ``ggo_above_normal_sd`` of its spread (:func:`normal_lung_hu`; ground glass is increased density
    relative to normal lung, and a shallow breath or a basal scan puts normal lung near -750 HU, where
    the fixed band would call a quarter of it ground glass). Components smaller than ``min_component_ml`` are
    dropped. Known limits: vessels crossing ground
    glass count as consolidation where they are lighter than ``vessel_min_hu``; consolidation denser
    than ``vessel_min_hu`` (unenhanced, fluid-filled) is missed.
    """
    labels = np.zeros(hu.shape, dtype=np.uint8)
    if not lung_labels.any():
        return labels
    box = ndi.find_objects((lung_labels > 0).astype(np.uint8))[0]
    hu, lung = hu[box], lung_labels[box] > 0
    hu_dense = hu
    if smooth_sigma_mm > 0:
        hu_dense = ndi.gaussian_filter(hu.astype(np.float32), [0.0] + [smooth_sigma_mm / s for s in spacing_mm[1:]])
    ggo_min_hu = ggo_band_hu[0]
    if ggo_above_normal_sd > 0:
        mode_hu, sd_hu = normal_lung_hu(hu[lung])
        ggo_min_hu = max(ggo_min_hu, mode_hu + ggo_above_normal_sd * sd_hu)
    ggo = lung & (hu >= ggo_min_hu) & (hu < ggo_band_hu[1])
    if min_ggo_thickness_mm > 0:
        ggo = opening_mm(ggo, spacing_mm, min_ggo_thickness_mm)
    dense = lung & (hu_dense >= consolidation_band_hu[0]) & (hu_dense < consolidation_band_hu[1])
    ggo &= ~dense
    if dense.any():
        light = dense & (local_mean(hu_dense, dense, spacing_mm, vessel_sigma_mm) < vessel_min_hu)
        aerated = lung & ~dense
        ggo_share = local_mean(ggo, aerated, spacing_mm, context_sigma_mm)
        consolidation = opening_mm(light, spacing_mm, min_consolidation_thickness_mm) | (
            light & (ggo_share >= min_ggo_share))
    else:
        consolidation = dense
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    inner = labels[box]
    inner[remove_small(ggo, min_component_ml / voxel_ml)] = GGO
    inner[remove_small(consolidation, min_component_ml / voxel_ml)] = CONSOLIDATION
    return labels


def segment_lesions_hu_config(hu: np.ndarray, lung_labels: np.ndarray, spacing_mm: tuple[float, float, float],
                              config: dict) -> np.ndarray:
    """:func:`segment_lesions_hu` with the ``hu_bands`` and ``vessel_removal`` of a quantify config
    (``configs/quantify.yaml``): the one place that maps those settings onto the function."""
    bands, vessels = config["hu_bands"], config.get("vessel_removal", {})
    return segment_lesions_hu(hu, lung_labels, spacing_mm, ggo_band_hu=tuple(bands["ggo"]),
                              consolidation_band_hu=tuple(bands["consolidation"]),
                              **{key: float(vessels[key]) for key in VESSEL_SETTINGS if key in vessels})


def normal_lung_hu(lung_hu: np.ndarray, aerated_max_hu: float = -600.0) -> tuple[float, float]:
    """Typical density and spread (HU) of this scan's normal lung: the median of the lung voxels below
    ``aerated_max_hu`` and a robust SD from their lower quartile (the side that ground glass and
    vessels do not reach)."""
    aerated = lung_hu[lung_hu < aerated_max_hu]
    if aerated.size < 1000:
        return -850.0, 0.0
    median, lower_quartile = np.percentile(aerated, [50, 25])
    return float(median), float((median - lower_quartile) / 0.6745)


def remove_small(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    """Drop 3D connected components with fewer than ``min_voxels`` voxels."""
    if min_voxels <= 1 or not mask.any():
        return mask
    comps, _ = ndi.label(mask)
    keep = np.bincount(comps.ravel()) >= min_voxels
    keep[0] = False
    return keep[comps]
