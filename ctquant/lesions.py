"""Lesion segmentation: ground-glass opacity (1) and consolidation (2) inside the lungs.

Two methods share one output convention (uint8 labels on the CT grid, zero outside the lungs):

- ``hu``: Hounsfield-unit bands (the Lung CT Analyzer idea), with vessels removed by thickness;
  the model-free reference;
- ``model``: the shipped MONAI network (:mod:`ctquant.lesion_model`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .lungs import block_majority, upsample_blocks

GGO, CONSOLIDATION = 1, 2


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


def segment_lesions_hu(hu: np.ndarray, lung_labels: np.ndarray, spacing_mm: tuple[float, float, float], *,
                       ggo_band_hu: tuple[float, float] = (-700.0, -300.0),
                       consolidation_band_hu: tuple[float, float] = (-300.0, 100.0),
                       min_consolidation_thickness_mm: float = 8.0,
                       min_component_ml: float = 0.05) -> np.ndarray:
    """GGO and consolidation from HU bands inside the lungs, vessels removed by thickness.

    Dense voxels (consolidation band) are kept as consolidation only where the dense region is at
    least ``min_consolidation_thickness_mm`` thick (thinner tubes are vessels). Components smaller
    than ``min_component_ml`` are dropped. Known limits: vessels thicker than the threshold (near the
    hilum) count as consolidation, and thin consolidation is missed.
    """
    labels = np.zeros(hu.shape, dtype=np.uint8)
    if not lung_labels.any():
        return labels
    box = ndi.find_objects((lung_labels > 0).astype(np.uint8))[0]
    hu, lung = hu[box], lung_labels[box] > 0
    ggo = lung & (hu >= ggo_band_hu[0]) & (hu < ggo_band_hu[1])
    dense = lung & (hu >= consolidation_band_hu[0]) & (hu < consolidation_band_hu[1])
    consolidation = opening_mm(dense, spacing_mm, min_consolidation_thickness_mm)
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    inner = labels[box]
    inner[remove_small(ggo, min_component_ml / voxel_ml)] = GGO
    inner[remove_small(consolidation, min_component_ml / voxel_ml)] = CONSOLIDATION
    return labels


def remove_small(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    """Drop 3D connected components with fewer than ``min_voxels`` voxels."""
    if min_voxels <= 1 or not mask.any():
        return mask
    comps, _ = ndi.label(mask)
    keep = np.bincount(comps.ravel()) >= min_voxels
    keep[0] = False
    return keep[comps]
