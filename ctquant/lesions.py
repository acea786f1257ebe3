"""Lesion segmentation: ground-glass opacity (1) and consolidation (2) inside the lungs.

Two methods share one output convention (uint8 labels on the CT grid, zero outside the lungs):

- ``hu``: Hounsfield-unit bands (the Lung CT Analyzer idea), with vessels removed by thickness;
  the model-free reference;
- ``model``: the shipped MONAI network (:mod:`ctquant.lesion_model`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

GGO, CONSOLIDATION = 1, 2


def opening_mm(mask: np.ndarray, spacing_mm: tuple[float, float, float], diameter_mm: float) -> np.ndarray:
    """Morphological opening with a ball of ``diameter_mm``: keeps parts at least that thick."""
    if diameter_mm <= 0 or not mask.any():
        return mask.copy()
    radius = diameter_mm / 2.0
    box = ndi.find_objects(mask.astype(np.uint8))[0]
    pad = [int(np.ceil(radius / s)) + 1 for s in spacing_mm]
    box = tuple(slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(box, pad, mask.shape))
    sub = mask[box]
    core = ndi.distance_transform_edt(sub, sampling=spacing_mm) >= radius
    opened = ndi.distance_transform_edt(~core, sampling=spacing_mm) < radius if core.any() else np.zeros_like(sub)
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
    lung = lung_labels > 0
    labels = np.zeros(hu.shape, dtype=np.uint8)
    if not lung.any():
        return labels
    ggo = lung & (hu >= ggo_band_hu[0]) & (hu < ggo_band_hu[1])
    dense = lung & (hu >= consolidation_band_hu[0]) & (hu < consolidation_band_hu[1])
    consolidation = opening_mm(dense, spacing_mm, min_consolidation_thickness_mm)
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    labels[remove_small(ggo, min_component_ml / voxel_ml)] = GGO
    labels[remove_small(consolidation, min_component_ml / voxel_ml)] = CONSOLIDATION
    return labels


def remove_small(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    """Drop 3D connected components with fewer than ``min_voxels`` voxels."""
    if min_voxels <= 1 or not mask.any():
        return mask
    comps, n = ndi.label(mask)
    sizes = np.bincount(comps.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[comps]
