"""Lesion segmentation: ground-glass opacity (1) and consolidation (2) inside the lungs.

Two methods share one output convention (uint8 labels on the CT grid, zero outside the lungs):

- ``hu``: Hounsfield-unit bands (the Lung CT Analyzer idea), with vessels told from consolidation
  by density, thickness and surroundings (:func:`segment_lesions_hu`); the model-free reference;
- ``model``: the shipped MONAI network (:mod:`ctquant.segment.lesion_model`).
"""

from __future__ import annotations

import cc3d
import numpy as np
from scipy import ndimage as ndi

from .grid import block_majority, block_mean, bounding_box, upsample_blocks

GGO, CONSOLIDATION = 1, 2
#: Keywords of :func:`segment_lesions_hu` that ``configs/quantify.yaml`` sets under ``vessel_removal``.
VESSEL_SETTINGS = ("min_consolidation_thickness_mm", "vessel_min_hu", "vessel_sigma_mm", "context_sigma_mm",
                   "min_ggo_share", "min_component_ml", "smooth_sigma_mm", "min_ggo_thickness_mm", "ggo_above_normal_sd",
                   "normal_band_mm", "pleural_rim_voxels")
#: The 4 in-plane neighbours of a (z, y, x) voxel.
_IN_PLANE_CROSS = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_CROSS[1, 1, :] = _IN_PLANE_CROSS[1, :, 1] = True
#: cc3d connectivity of scipy's connectivity 1..ndim, per mask dimension.
_CC3D_CONNECTIVITY = {2: (4, 8), 3: (6, 18, 26)}


def ball_mm(spacing_mm: tuple[float, ...], radius_mm: float) -> np.ndarray:
    """Boolean structuring element: the voxel offsets (on a grid of ``spacing_mm``) closer than ``radius_mm``."""
    half = [int(np.ceil(radius_mm / s)) for s in spacing_mm]
    axes = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing_mm)], indexing="ij")
    return sum(a ** 2 for a in axes) < radius_mm ** 2


def opening_mm(mask: np.ndarray, spacing_mm: tuple[float, float, float], diameter_mm: float,
               work_mm: float = 1.5) -> np.ndarray:
    """Morphological opening with a ball of ``diameter_mm``: keeps the parts at least that thick.

    Fine grids are opened on a grid of about ``work_mm`` (block majority), and the result, grown by
    one block, is intersected with the full-resolution mask. The ball is the voxel offsets closer than
    ``diameter_mm / 2`` (:func:`ball_mm`): an erosion and a dilation with it are exactly the distance-map
    definition (core: distance to the background ≥ radius; opened: distance to the core < radius). Where
    that ball is a single voxel but the voxels are finer than ``diameter_mm`` along some axes (pixels of
    1.5 … 3 mm for a 3 mm opening), a structure is that thick when it is two voxels thick there: the
    opening is then by a box two voxels wide along those axes (one-voxel sheets go, two-voxel ones stay).
    Voxels of ``diameter_mm`` or more along every axis are left as they are.
    """
    if diameter_mm <= 0 or not mask.any():
        return mask.copy()
    radius = diameter_mm / 2.0
    box = bounding_box(mask)
    pad = [int(np.ceil(radius / s)) + 2 for s in spacing_mm]
    box = tuple(slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(box, pad, mask.shape))
    sub = mask[box]
    factors = tuple(max(1, int(work_mm // s)) for s in spacing_mm)
    if factors != (1, 1, 1):
        small = block_majority(sub, factors)
        spacing = tuple(s * f for s, f in zip(spacing_mm, factors))
    else:
        small, spacing = sub, spacing_mm
    ball = ball_mm(spacing, radius)
    if ball.sum() == 1:  # voxels of diameter/2 … diameter: "that thick" is two of them (a one-voxel ball opens nothing)
        two = tuple(2 if s < diameter_mm else 1 for s in spacing)
        if max(two) > 1:
            ball = np.ones(two, dtype=bool)
    core = ndi.binary_erosion(small, ball, border_value=1)  # outside the array is not background
    opened = ndi.binary_dilation(core, ball) if core.any() else np.zeros_like(small)
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
                       min_ggo_thickness_mm: float = 0.0, ggo_above_normal_sd: float = 0.0,
                       normal_band_mm: float = 0.0, pleural_rim_voxels: float = 0.0) -> np.ndarray:
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
    the fixed band would call a quarter of it ground glass). With ``normal_band_mm`` > 0 that normal
    level is local (:func:`normal_lung_level_hu`: per lung, in coronal bands ``normal_band_mm`` thick
    along y), because normal lung is denser towards the back of a supine patient (gravity).
    Ground glass in the outermost ``pleural_rim_voxels`` in-plane voxel layers of the lung mask counts only
    where the lung just inside them is ground glass too (:func:`drop_rim_ggo`: those voxels are part chest
    wall, and at coarse voxels the thickness rule cannot tell them apart).
    Components smaller than ``min_component_ml`` are dropped. Known limits: vessels crossing ground
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
    ggo_min_hu: float | np.ndarray = ggo_band_hu[0]
    if ggo_above_normal_sd > 0:
        mode_hu, sd_hu = normal_lung_hu(hu[lung])
        ggo_min_hu = max(ggo_min_hu, mode_hu + ggo_above_normal_sd * sd_hu)
        if normal_band_mm > 0:
            level_hu = normal_lung_level_hu(hu, lung_labels[box], spacing_mm, normal_band_mm,
                                            normal_max_hu=min(ggo_min_hu, -600.0), scan_level_hu=mode_hu)
            ggo_min_hu = np.maximum(ggo_band_hu[0], level_hu + ggo_above_normal_sd * sd_hu)
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
    if pleural_rim_voxels > 0:
        ggo = drop_rim_ggo(ggo, lung, int(round(pleural_rim_voxels)))
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    inner = labels[box]
    inner[remove_small(ggo, min_component_ml / voxel_ml)] = GGO
    inner[remove_small(consolidation, min_component_ml / voxel_ml)] = CONSOLIDATION
    return labels


def drop_rim_ggo(ggo: np.ndarray, lung: np.ndarray, rim_voxels: int = 1) -> np.ndarray:
    """``ggo`` without the ground glass of the lung's partial-volume rim.

    A lung mask's outermost voxels in the axial plane (``rim_voxels`` layers, 4-connected in-plane) mix
    lung with the chest wall, mediastinum or diaphragm, so normal lung there reads -400 … -700 HU, the
    ground-glass band. At fine in-plane voxels the ground-glass thickness rule removes that rim; at 4 mm it
    cannot (its ball is one voxel), and the rim alone was 8 % of a normal (emphysematous) lung. Ground
    glass in the rim is kept where it reaches ground glass inside it (within ``rim_voxels``): real
    subpleural ground glass is thicker than the rim. In-plane only: across 3-5 mm slices the rim would be
    the ground glass over consolidation that the lung step left out. ``lung`` is the mask of both lungs
    (z, y, x); beyond its array is taken as not lung.
    """
    if rim_voxels <= 0 or not ggo.any():
        return ggo
    interior = ndi.binary_erosion(lung, _IN_PLANE_CROSS, iterations=rim_voxels, border_value=0)
    reached = ndi.binary_dilation(ggo & interior, _IN_PLANE_CROSS, iterations=rim_voxels)
    return ggo & (interior | reached)


def segment_lesions_hu_config(hu: np.ndarray, lung_labels: np.ndarray, spacing_mm: tuple[float, float, float],
                              config: dict) -> np.ndarray:
    """:func:`segment_lesions_hu` with the ``hu_bands`` and ``vessel_removal`` of a quantify config
    (``configs/quantify.yaml``), then :func:`remove_lesions_on_tissue_below` with its ``max_lesion_share_on_tissue_below``
    (absent: keep all): the one place that maps those settings onto the functions."""
    bands, vessels = config["hu_bands"], config.get("vessel_removal", {})
    labels = segment_lesions_hu(hu, lung_labels, spacing_mm, ggo_band_hu=tuple(bands["ggo"]),
                                consolidation_band_hu=tuple(bands["consolidation"]),
                                **{key: float(vessels[key]) for key in VESSEL_SETTINGS if key in vessels})
    return remove_lesions_on_tissue_below(labels, hu, max_share_on_tissue_below(config))


def max_share_on_tissue_below(config: dict) -> float:
    """A quantify config's ``max_lesion_share_on_tissue_below`` (1, keep all, when absent), for both methods
    (:func:`remove_lesions_on_tissue_below`)."""
    return float(config.get("max_lesion_share_on_tissue_below", 1.0))


def normal_lung_hu(lung_hu: np.ndarray, aerated_max_hu: float = -600.0) -> tuple[float, float]:
    """Typical density and spread (HU) of this scan's normal lung: the median of the lung voxels below
    ``aerated_max_hu`` and a robust SD from their lower quartile (the side that ground glass and
    vessels do not reach)."""
    aerated = lung_hu[lung_hu < aerated_max_hu]
    if aerated.size < 1000:
        return -850.0, 0.0
    median, lower_quartile = np.percentile(aerated, [50, 25])
    return float(median), float((median - lower_quartile) / 0.6745)


def normal_lung_level_hu(hu: np.ndarray, lung_labels: np.ndarray, spacing_mm: tuple[float, float, float],
                         band_mm: float, normal_max_hu: float, scan_level_hu: float, hist_step_hu: float = 4.0,
                         min_voxels: int = 50) -> np.ndarray:
    """Normal-lung density (HU) that follows the front-to-back (gravity-dependent) gradient.

    Each lung (label value) is cut into coronal bands ``band_mm`` thick along y (anterior → posterior
    of a supine patient). A band's level is estimated only from its voxels below ``normal_max_hu``
    (those the scan-wide rule already calls normal: what it calls ground glass cannot raise its own
    floor), as their lower quartile plus the median quartile-to-median gap of all bands: ground glass
    adds density from above, so the estimate holds while it makes up under three quarters of a band's
    normal-looking voxels. Bands are pooled over the whole z-range (a lesion fills part of a band's
    slices; a z-dependent level lost painted basal ground glass on the hybrids), smoothed over
    neighbours (Gaussian of one band, weighted by voxel count; bands under ``min_voxels`` borrow from
    their neighbours) and interpolated linearly to every y.

    Returns a (z, y, x) float32 array, ``scan_level_hu`` outside the lungs.
    """
    lung = lung_labels > 0
    level = np.full(hu.shape, scan_level_hu, dtype=np.float32)
    edges = np.arange(-1024.0, normal_max_hu + hist_step_hu, hist_step_hu)
    n_hist = len(edges) - 1
    bands = []
    for value in np.unique(lung_labels[lung]):
        mine = lung_labels == value
        rows = np.flatnonzero(mine.any(axis=(0, 2)))
        y_lo, y_hi = int(rows[0]), int(rows[-1]) + 1
        _, yy, _ = np.nonzero(mine[:, y_lo:y_hi])
        values = hu[:, y_lo:y_hi][mine[:, y_lo:y_hi]]
        band = (yy * spacing_mm[1] // band_mm).astype(np.int64)
        n_band = int(band.max()) + 1
        normal = values < normal_max_hu
        bins = np.clip(((values[normal] - edges[0]) // hist_step_hu).astype(np.int64), 0, n_hist - 1)
        hist = np.bincount(band[normal] * n_hist + bins, minlength=n_band * n_hist).reshape(n_band, n_hist)
        count = hist.sum(axis=1).astype(np.float64)
        cum = np.cumsum(hist, axis=1)
        median, quartile = (edges[np.argmax(cum >= np.maximum(q * count, 1)[:, None], axis=1)] + hist_step_hu / 2.0
                            for q in (0.5, 0.25))  # per band, to the histogram step
        bands.append((value, y_lo, y_hi, count, count >= min_voxels, median, quartile))
    usable_gap = [(m - q)[u] for *_, c, u, m, q in bands]
    if not any(g.size for g in usable_gap):
        return level
    gap = float(np.median(np.concatenate(usable_gap)))
    for value, y_lo, y_hi, count, usable, median, quartile in bands:
        if not usable.any():
            continue
        weight = np.where(usable, count, 0.0)
        smoothed_w = ndi.gaussian_filter1d(weight, 1.0, mode="constant", truncate=6.0)
        smoothed = ndi.gaussian_filter1d(weight * np.where(usable, quartile + gap, 0.0), 1.0, mode="constant",
                                         truncate=6.0)
        profile = np.where(smoothed_w > 1e-6, smoothed / np.maximum(smoothed_w, 1e-6), scan_level_hu)
        centres_mm = (np.arange(len(profile)) + 0.5) * band_mm
        rows_hu = np.interp(np.arange(y_hi - y_lo) * spacing_mm[1], centres_mm, profile).astype(np.float32)
        sub = level[:, y_lo:y_hi]
        mine = lung_labels[:, y_lo:y_hi] == value
        sub[mine] = np.broadcast_to(rows_hu[None, :, None], sub.shape)[mine]
    return level


def remove_small(mask: np.ndarray, min_voxels: float, connectivity: int = 1) -> np.ndarray:
    """Drop connected components with fewer than ``min_voxels`` voxels from a 2D or 3D mask.

    ``connectivity`` as in :func:`scipy.ndimage.generate_binary_structure` (1: faces only; ``mask.ndim``:
    faces, edges and corners). Components are labelled by ``cc3d.connected_components`` (the same
    components as :func:`scipy.ndimage.label`, about four times faster at 26-connectivity) within the
    mask's bounding box and counted over its voxels only, so a small lesion in a large volume costs little.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim not in _CC3D_CONNECTIVITY or not 1 <= connectivity <= mask.ndim:
        raise ValueError(f"remove_small takes a 2D or 3D mask and connectivity 1..ndim, got {mask.shape}, "
                         f"{connectivity}")
    if min_voxels <= 1 or not mask.any():
        return mask
    box = bounding_box(mask)
    inner = np.ascontiguousarray(mask[box])
    comps = cc3d.connected_components(inner, connectivity=_CC3D_CONNECTIVITY[mask.ndim][connectivity - 1])
    of_mask = comps[inner]
    keep = np.bincount(of_mask) >= min_voxels
    out = np.zeros(mask.shape, dtype=bool)
    out[box][inner] = keep[of_mask]
    return out


def remove_lesions_on_tissue_below(labels: np.ndarray, hu: np.ndarray, max_share: float,
                                   tissue_min_hu: float = -200.0) -> np.ndarray:
    """``labels`` without the lesion components that lie on tissue below them: partial-volume sheets.

    An axial slice just above the top of a diaphragm dome (liver, spleen) cuts it obliquely, so the lung
    there holds a disc or ring of hazy density above the tissue below, which both methods call GGO or
    consolidation; the top of the heart, the aortic arch or a mass do the same. A 26-connected lesion
    component (GGO and consolidation together) is dropped when more than ``max_share`` of its voxels lie
    directly above tissue that is not lesion (``hu`` ≥ ``tissue_min_hu`` in the slice below, not in
    ``labels``: outside the lungs, or inside them where per-slice hole filling made the dome's top lung): a
    sheet one or two slices thick. A lesion that is thick in z rests on the diaphragm with its lowest slice
    only, and consolidation under ground glass is lesion. Axis 0 runs from the feet to the head (LPS), as
    :mod:`ctquant.io.scans` delivers volumes. ``max_share`` ≥ 1 keeps every component.
    """
    lesion = labels > 0
    if max_share >= 1.0 or not lesion[1:].any():
        return labels
    box = bounding_box(lesion)
    below = (slice(max(0, box[0].start - 1), box[0].stop - 1),) + box[1:]  # the slice under each one of the box
    inner = np.ascontiguousarray(lesion[box])
    on_tissue = ~lesion[below] & (np.asarray(hu)[below] >= tissue_min_hu)
    if box[0].start == 0:  # the lowest slice has nothing below it in the image
        on_tissue = np.concatenate([np.zeros((1,) + on_tissue.shape[1:], dtype=bool), on_tissue])
    comps = cc3d.connected_components(inner, connectivity=26)
    of_lesion = comps[inner]
    share = np.bincount(of_lesion[on_tissue[inner]], minlength=of_lesion.max() + 1) / np.maximum(
        np.bincount(of_lesion), 1)
    drop = share > max_share
    if not drop[1:].any():
        return labels
    out = labels.copy()
    out_box = out[box]  # a view
    out_box[inner & drop[comps]] = 0
    return out
