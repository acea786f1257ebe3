"""Left/right lung segmentation that keeps consolidated and ground-glass lung.

A classical pipeline, run on a coarse grid (about 2.5 mm) for speed and refined at full resolution:

1. body: per axial slice, everything not connected to the air at the image border;
2. aerated lung: air (< ``air_threshold_hu``) inside the body;
3. airways: trachea and main bronchi, region-grown from a seed in the trachea with a threshold that is
   raised until the region leaks into the lung, then removed;
4. the two lungs: the largest air components, split where they touch (erosion until two parts appear,
   then a watershed); right lung = the one on the patient's right (lower LPS x);
5. dense lung: each lung's envelope is a 3D closing with a ball of ``envelope_radius_mm``, which fills
   lesions that bite into the lung from the pleura (consolidation, ground glass) and enclosed vessels;
   the envelope is restricted to non-bone voxels and never crosses into the other lung or the airways;
6. dependent consolidation: each lung is extended through soft-tissue density to the rib cage on the
   lateral and posterior side (:func:`fill_to_rib_cage`);
7. airless lung: each lung grows through thick tissue denser than fat and lighter than blood and
   muscle, up to ``grow_max_mm`` from it (:func:`grow_dense_lung`), which reaches consolidated bases
   and paravertebral gutters that no aerated lung borders;
8. the diaphragm's dome, an island of soft tissue in the lowest lung slices, is taken out again
   (:func:`drop_diaphragm_domes`);
9. at full resolution, the pleural edge is put half-way in density between the lung beside it and
   the chest wall (:func:`settle_pleural_edge`), so dense lung against the wall keeps its last voxels.

Labels follow the lungmask convention: 0 background, 1 right lung, 2 left lung.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

log = logging.getLogger(__name__)

RIGHT, LEFT = 1, 2

#: In-plane 2D connectivity expressed as a 3D structure (no links between slices).
_SLICEWISE = np.zeros((3, 3, 3), dtype=bool)
_SLICEWISE[1] = ndi.generate_binary_structure(2, 1)


def coarse_factors(spacing_mm: tuple[float, float, float], target_mm: float = 2.5) -> tuple[int, int, int]:
    """Integer stride per axis (z, y, x) that brings voxels close to ``target_mm``."""
    return tuple(max(1, int(round(target_mm / s))) for s in spacing_mm)


def body_mask(hu: np.ndarray, threshold_hu: float = -500.0) -> np.ndarray:
    """Per axial slice, voxels not connected to the low-density region touching the slice border.

    The patient table, separated from the body by air, is dropped by keeping the largest 3D component.
    """
    low = hu < threshold_hu
    labels, _ = ndi.label(low, structure=_SLICEWISE)
    border = np.unique(np.concatenate([
        labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    outside = np.isin(labels, border[border > 0])
    body = ~outside
    comps, n = ndi.label(body)
    if n > 1:
        sizes = np.bincount(comps.ravel())
        sizes[0] = 0
        body = comps == int(np.argmax(sizes))
    return body


def _ball(radius_vox: np.ndarray) -> np.ndarray:
    r = np.maximum(np.asarray(radius_vox, dtype=float), 1e-6)
    extent = np.ceil(r).astype(int)
    grids = np.ogrid[tuple(slice(-e, e + 1) for e in extent)]
    return sum((g / ri) ** 2 for g, ri in zip(grids, r)) <= 1.0


def find_airways(hu: np.ndarray, air: np.ndarray, spacing_mm: tuple[float, float, float],
                 max_volume_ml: float = 250.0) -> np.ndarray:
    """Trachea and main bronchi: region growing from the trachea with a leak-controlled threshold.

    The seed is the air component nearest the body's centre in the most cranial slices that hold air.
    Returns an empty mask when no trachea is found (e.g. a scan starting below the carina).
    """
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    airways = np.zeros_like(air)
    z_with_air = np.flatnonzero(air.any(axis=(1, 2)))
    if z_with_air.size == 0:
        return airways
    pixel_area_cm2 = spacing_mm[1] * spacing_mm[2] / 100.0
    seed = None
    for z in z_with_air[::-1][: max(1, len(z_with_air) // 4)]:
        labels, n = ndi.label(air[z])
        if n == 0:
            continue
        centre_x = air.shape[2] / 2.0
        best = None
        for index, sl in enumerate(ndi.find_objects(labels), start=1):
            area = np.count_nonzero(labels[sl] == index) * pixel_area_cm2
            if not 0.5 <= area <= 8.0:
                continue
            cy, cx = ndi.center_of_mass(labels == index)
            offset_mm = abs(cx - centre_x) * spacing_mm[2]
            if offset_mm < 40 and (best is None or offset_mm < best[0]):
                best = (offset_mm, (int(z), int(round(cy)), int(round(cx))))
        if best is not None and air[best[1]]:
            seed = best[1]
            break
    if seed is None:
        return airways
    previous = None
    for threshold in range(-990, -800, 20):
        grown_labels, _ = ndi.label(hu < threshold)
        label = grown_labels[seed]
        if label == 0:
            continue
        grown = grown_labels == label
        volume = grown.sum() * voxel_ml
        if volume > max_volume_ml or (previous is not None and volume > 2.0 * previous.sum() * voxel_ml + 5):
            break
        previous = grown
    return previous if previous is not None else airways


def _largest_components(mask: np.ndarray, min_share: float = 0.05) -> list[np.ndarray]:
    labels, n = ndi.label(mask)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    keep = [order[0]] + [i for i in order[1:2] if sizes[i] >= min_share * sizes[order[0]]]
    return [labels == i + 1 for i in keep]


def split_lungs(lungs: np.ndarray, max_erosions: int = 12) -> tuple[np.ndarray, np.ndarray] | None:
    """Split one connected air region into two lungs by erosion then watershed, or None if it won't."""
    eroded = lungs.copy()
    structure = ndi.generate_binary_structure(3, 1)
    for _ in range(max_erosions):
        eroded = ndi.binary_erosion(eroded, structure)
        parts = _largest_components(eroded, min_share=0.1)
        if len(parts) == 2:
            markers = np.zeros(lungs.shape, dtype=np.int32)
            markers[parts[0]] = 1
            markers[parts[1]] = 2
            distance = ndi.distance_transform_cdt(lungs, metric="taxicab")
            regions = watershed(-distance, markers, mask=lungs)
            return regions == 1, regions == 2
        if not eroded.any():
            break
    return None


def _right_left(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order two lung masks as (right, left): the patient's right has the lower LPS x (array axis 2)."""
    xa = np.nonzero(a.any(axis=(0, 1)))[0].mean()
    xb = np.nonzero(b.any(axis=(0, 1)))[0].mean()
    return (a, b) if xa < xb else (b, a)


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Fill holes in each axial slice (vessels and lesions enclosed by aerated lung)."""
    return ndi.binary_fill_holes(mask, structure=_SLICEWISE)


def _closing(mask: np.ndarray, radius_vox: np.ndarray) -> np.ndarray:
    """Closing with an ellipsoid of ``radius_vox`` voxels per axis, computed with distance maps."""
    pad = np.ceil(radius_vox).astype(int) + 2
    padded = np.pad(mask, [(p, p) for p in pad])
    sampling = 1.0 / np.asarray(radius_vox)  # distances in units of the radius
    dilated = ndi.distance_transform_edt(~padded, sampling=sampling) <= 1.0
    closed = ndi.distance_transform_edt(dilated, sampling=sampling) > 1.0
    return closed[tuple(slice(p, -p) for p in pad)]


def _envelope(lung: np.ndarray, spacing_mm: tuple[float, float, float], radius_mm: float,
              work_mm: float = 2.5) -> np.ndarray:
    """The lung closed with a ball of ``radius_mm`` (fills pleural bites and enclosed dense tissue).

    Computed in the lung's bounding box on a grid of about ``work_mm`` (block-majority downsampling),
    then brought back and shrunk by half a block so that it never spills over convex lung borders.
    """
    box = ndi.find_objects(lung.astype(np.uint8))[0]
    sub = lung[box]
    factors = tuple(max(1, int(round(work_mm / s))) for s in spacing_mm)
    small = block_majority(sub, factors)
    radius_vox = radius_mm / (np.asarray(spacing_mm) * np.asarray(factors))
    closed_small = _closing(small, radius_vox)
    closed = upsample_blocks(closed_small, factors, sub.shape)
    if factors != (1, 1, 1):
        closed = ndi.binary_erosion(closed, _ball(np.array([max(1, f // 2) for f in factors], dtype=float)))
    out = lung.copy()
    out[box] |= closed
    return out


def segment_lungs(hu: np.ndarray, spacing_mm: tuple[float, float, float], *,
                  air_threshold_hu: float = -400.0, dense_max_hu: float = 200.0,
                  envelope_radius_mm: float = 30.0, coarse_mm: float = 2.5,
                  airless_band_hu: tuple[float, float] = (-60.0, 20.0), grow_max_mm: float = 40.0,
                  wall_hu: float = 40.0) -> np.ndarray:
    """Label the right (1) and left (2) lung, dense (consolidated) lung included.

    Args:
        hu: CT volume (z, y, x) in Hounsfield units, LPS orientation.
        spacing_mm: voxel size (z, y, x) in mm.
        air_threshold_hu: aerated lung is below this value.
        dense_max_hu: voxels added by the envelope must be below this (bone is not lung).
        envelope_radius_mm: radius of the closing ball that recovers dense lung along the pleura.
        coarse_mm: working resolution of the coarse steps.
        airless_band_hu: smoothed density of airless lung that the lungs grow through: above fat,
            below blood and muscle (see :func:`grow_dense_lung`).
        grow_max_mm: how far that growth may reach from the lung.
        wall_hu: density of the chest wall for the half-density pleural edge.

    Returns:
        uint8 label volume on the input grid.
    """
    factors = coarse_factors(spacing_mm, coarse_mm)
    coarse_spacing = tuple(s * f for s, f in zip(spacing_mm, factors))
    hu_c = hu[tuple(slice(f // 2, None, f) for f in factors)]  # samples at block centres
    body = body_mask(hu_c)
    air = (hu_c < air_threshold_hu) & body
    airways = find_airways(hu_c, air, coarse_spacing)
    airways = ndi.binary_dilation(airways, _ball(np.full(3, 1.0)))
    lung_air = air & ~airways
    parts = _largest_components(lung_air)
    labels_c = np.zeros(hu_c.shape, dtype=np.uint8)
    if not parts:
        log.warning("no lung found")
        return np.zeros(hu.shape, dtype=np.uint8)
    if len(parts) == 1:
        split = split_lungs(parts[0])
        if split is None:
            log.warning("lungs could not be separated; splitting at the body midline")
            xs = np.arange(hu_c.shape[2])[None, None, :]
            midline = np.nonzero(body.any(axis=(0, 1)))[0].mean()
            split = (parts[0] & (xs < midline), parts[0] & (xs >= midline))
        parts = list(split)
    right, left = _right_left(*parts)
    chest = body & ~airways  # where lung may extend: inside the body, outside trachea and main bronchi
    allowed = chest & (hu_c < dense_max_hu)
    envelopes = []
    for lung in (right, left):
        envelope = _fill_slices(_envelope(_fill_slices(lung), coarse_spacing, envelope_radius_mm)) & allowed
        envelopes.append(envelope)
    both = envelopes[0] & envelopes[1]
    labels_c[envelopes[0]] = RIGHT
    labels_c[envelopes[1]] = LEFT
    if both.any():  # where envelopes overlap, the nearer aerated lung wins
        d_right = ndi.distance_transform_cdt(~right, metric="chessboard")  # voxels: cheap, and only
        d_left = ndi.distance_transform_cdt(~left, metric="chessboard")    # compared with each other
        labels_c[both] = np.where(d_right[both] <= d_left[both], RIGHT, LEFT)
    labels_c = fill_to_rib_cage(labels_c, hu_c, chest, coarse_spacing)
    labels_c = grow_dense_lung(labels_c, hu_c, chest, coarse_spacing, band_hu=airless_band_hu,
                               max_distance_mm=grow_max_mm, wall_hu=wall_hu, dense_max_hu=dense_max_hu)
    labels_c = drop_diaphragm_domes(labels_c, hu_c > -200, body)
    dense_added = (labels_c > 0) & ~air
    labels = _refine(labels_c, dense_added, hu, factors, air_threshold_hu, dense_max_hu)
    return settle_pleural_edge(labels, hu, wall_hu=wall_hu, lead_hu=(air_threshold_hu, airless_band_hu[1]),
                               dense_max_hu=dense_max_hu)


def grow_dense_lung(labels: np.ndarray, hu: np.ndarray, allowed: np.ndarray, spacing_mm: tuple[float, float, float],
                    *, band_hu: tuple[float, float] = (-60.0, 20.0), smooth_mm: float = 1.5,
                    min_width_mm: float = 6.0, max_distance_mm: float = 40.0, wall_hu: float = 40.0,
                    dense_max_hu: float = 200.0) -> np.ndarray:
    """Grow each lung through airless lung: consolidated bases, paravertebral gutters, whole lobes.

    Airless lung is denser than fat (about -100 HU) and, unenhanced, lighter than blood, muscle, liver
    and spleen (40 to 60 HU). Candidates are ``allowed`` voxels whose density, smoothed in-plane with
    a Gaussian of ``smooth_mm``, lies in ``band_hu``, in regions at least ``min_width_mm`` wide (an
    in-plane opening: fat/soft-tissue interfaces also pass through the band, as thin shells, and
    would otherwise lead the growth into the mediastinum). Each lung takes the candidates connected
    to it within ``max_distance_mm`` (the nearer lung wins), then the holes of each axial slice
    (vessels and bronchi inside the lung, airways that the trachea's growth reached included) below
    ``dense_max_hu``.
    """
    lung = labels > 0
    if not lung.any():
        return labels
    sigma = [0.0] + [smooth_mm / s for s in spacing_mm[1:]]
    smoothed = ndi.gaussian_filter(hu.astype(np.float32), sigma)
    candidates = allowed & (smoothed >= band_hu[0]) & (smoothed < band_hu[1])  # airless lung counts too
    radius_vox = np.array([0.5 * min_width_mm / s for s in spacing_mm[1:]])
    candidates = ndi.binary_opening(candidates, _ball(radius_vox)[None])
    # smoothing pulls the density of airless lung down within ~2 sigma of aerated lung: bridge that
    # margin with the unsmoothed band, so airless lung stays connected to the lung beside it; and drop
    # voxels denser than half-way to the wall (smoothing also pulls the wall's first voxels into the band)
    margin_vox = np.array([2.0 * smooth_mm / s for s in spacing_mm[1:]])
    raw_band = allowed & (hu >= band_hu[0]) & (hu < band_hu[1])
    candidates |= ndi.binary_dilation(candidates, _ball(margin_vox)[None]) & raw_band
    candidates &= hu < 0.5 * (band_hu[1] + wall_hu)
    distance_mm = ndi.distance_transform_edt(~lung, sampling=spacing_mm)
    region = lung | (candidates & (distance_mm <= max_distance_mm))
    grown = watershed(distance_mm, labels.astype(np.int32), mask=region).astype(np.uint8)
    for side in (RIGHT, LEFT):
        holes = _fill_slices(grown == side) & (grown == 0) & (hu < dense_max_hu)
        grown[holes] = side
    return grown


def settle_pleural_edge(labels: np.ndarray, hu: np.ndarray, *, wall_hu: float = 40.0,
                        lead_hu: tuple[float, float] = (-400.0, 20.0), fat_hu: tuple[float, float] = (-150.0, -60.0),
                        dense_max_hu: float = 200.0, steps: int = 2) -> np.ndarray:
    """Move each lung's edge out, one in-plane voxel per step, where half-density says the lung goes on.

    A fixed air threshold puts the pleural edge half-way between aerated lung and the chest wall; where
    ground glass or consolidation meets the wall it drops the last voxels of dense lung. Here a voxel
    just outside a lung joins it when its density is below the midpoint between its dense in-plane lung
    neighbours (``lead_hu``: denser than the air threshold, lighter than blood) and the chest wall
    (``wall_hu``). Fat (``fat_hu``, mediastinal and extrapleural) and bone never join. Works on the
    lung's dense voxels only, so it costs little on large scans.
    """
    boxes = [b for b in ndi.find_objects(labels, max_label=LEFT) if b is not None]
    if not boxes:
        return labels
    box = tuple(slice(min(b[axis].start for b in boxes), max(b[axis].stop for b in boxes)) for axis in range(3))
    box = tuple(slice(b.start, b.stop) if axis == 0 else slice(max(0, b.start - steps), min(n, b.stop + steps))
                for axis, (b, n) in enumerate(zip(box, labels.shape)))
    sub = np.array(labels[box]).reshape(-1)  # a copy: the caller's labels stay as they are
    hu_sub = np.ascontiguousarray(hu[box]).reshape(-1)
    ny, nx = labels[box].shape[1:]
    lead = np.flatnonzero((sub > 0) & (hu_sub >= lead_hu[0]) & (hu_sub < lead_hu[1]))
    for _ in range(steps):
        if lead.size == 0:
            break
        y, x = (lead // nx) % ny, lead % nx
        neighbours, sources = [], []
        for offset, inside in ((1, x < nx - 1), (-1, x > 0), (nx, y < ny - 1), (-nx, y > 0)):
            neighbours.append(lead[inside] + offset)
            sources.append(lead[inside])
        neighbour, source = np.concatenate(neighbours), np.concatenate(sources)
        free = sub[neighbour] == 0
        neighbour, source = neighbour[free], source[free]
        joined = np.zeros(0, dtype=np.int64)
        for side in (RIGHT, LEFT):
            mine = sub[source] == side
            candidates, inverse = np.unique(neighbour[mine], return_inverse=True)
            if candidates.size == 0:
                continue
            lung_hu = (np.bincount(inverse, weights=hu_sub[source[mine]].astype(np.float64))
                       / np.bincount(inverse))
            value = hu_sub[candidates]
            join = ((value < 0.5 * (lung_hu + wall_hu)) & (value < dense_max_hu)
                    & ~((value >= fat_hu[0]) & (value < fat_hu[1])))
            join &= ~np.isin(candidates, joined)  # beside both lungs: the right lung (first) keeps it
            sub[candidates[join]] = side
            joined = np.concatenate([joined, candidates[join]])
        lead = joined[(hu_sub[joined] >= lead_hu[0]) & (hu_sub[joined] < lead_hu[1])]  # the next step's edge
    out = labels.copy()
    out[box] = sub.reshape(labels[box].shape)
    return out


def fill_to_rib_cage(labels: np.ndarray, hu: np.ndarray, body: np.ndarray, spacing_mm: tuple[float, float, float],
                     *, max_fill_mm: float = 45.0, wall_mm: float = 2.0, bone_hu: float = 200.0,
                     dense_min_hu: float = -300.0, cage_z_mm: float = 30.0, n_angles: int = 360) -> np.ndarray:
    """Extend each lung to the rib cage through dense tissue: dependent and pleural consolidation.

    Per axial slice and lung, rays leave the lung's centre towards the lateral and posterior chest wall
    (the dependent side of a supine patient). Where a ray leaves the lung and crosses only soft-tissue
    density (``dense_min_hu`` to ``bone_hu``) before the rib cage (bone, projected over ``cage_z_mm``
    so that intercostal slices see their ribs), the stretch is lung, less the chest-wall layer that
    the same slice shows where the lung is aerated up to the ribs (the 20th percentile of gaps).
    Stretches longer than ``max_fill_mm`` are left alone.
    """
    sz, sy, sx = spacing_mm
    bone = (hu >= bone_hu) & body
    size = max(1, int(round(cage_z_mm / sz))) | 1
    cage = ndi.maximum_filter1d(bone.view(np.uint8), size=size, axis=0).astype(bool)
    out = labels.copy()
    step_mm = 0.5 * min(sy, sx)
    theta = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)
    dy, dx = np.sin(theta), np.cos(theta)
    ny, nx = hu.shape[1:]
    rmax_mm = 0.75 * max(ny * sy, nx * sx)
    radii = np.arange(0, rmax_mm, step_mm)
    x_mid = np.nonzero(body.any(axis=(0, 1)))[0].mean()
    for side in (1, 2):
        for z in range(hu.shape[0]):
            m = labels[z] == side
            if m.sum() < 20:
                continue
            cy, cx = ndi.center_of_mass(m)
            medial = np.sign(x_mid - cx)  # +1: medial is +x
            keep_dir = ((dx * medial) <= 0.3) & (dy >= 0.0)  # lateral or posterior (dependent) only
            yy = np.rint(cy + radii[None, :] * dy[:, None] / sy).astype(int)
            xx = np.rint(cx + radii[None, :] * dx[:, None] / sx).astype(int)
            inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
            yy, xx = np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)
            lung_s = m[yy, xx] & inside
            hu_s = hu[z][yy, xx]
            cage_s = cage[z][yy, xx] & inside
            body_s = body[z][yy, xx] & inside
            n_r = len(radii)
            idx = np.arange(n_r)[None, :]
            last_air = np.where(lung_s.any(axis=1), n_r - 1 - np.argmax(lung_s[:, ::-1], axis=1), -1)
            beyond = idx > last_air[:, None]
            cage_hit = cage_s & beyond
            first_cage = np.where(cage_hit.any(axis=1), np.argmax(cage_hit, axis=1), -1)
            max_steps = int(max_fill_mm / step_mm)
            wall_steps = int(wall_mm / step_mm)
            ok = keep_dir & (last_air >= 0) & (first_cage > 0) & (first_cage - last_air <= max_steps)
            gaps = (first_cage - last_air)[ok]
            if gaps.size < 10:
                continue
            wall = int(np.percentile(gaps, 20)) + wall_steps  # chest-wall layer seen where lung is aerated
            seg = beyond & (idx < (first_cage - wall)[:, None])
            dense = (hu_s >= dense_min_hu) & (hu_s < bone_hu) & body_s
            # the whole segment must be dense soft tissue (no fat gap, no air, no outside)
            bad = seg & ~dense
            ok &= ~bad.any(axis=1)
            sel = seg & ok[:, None]
            if sel.any():
                fill = np.zeros((ny, nx), bool)
                fill[yy[sel], xx[sel]] = True
                fill = ndi.binary_closing(fill, iterations=2) & (labels[z] == 0) & ~(hu[z] >= bone_hu)
                out[z][fill & (out[z] == 0)] = side
    return out


def drop_diaphragm_domes(labels: np.ndarray, soft_tissue: np.ndarray, body: np.ndarray,
                         max_wall_contact: float = 0.1) -> np.ndarray:
    """Remove soft tissue added to the lungs that is the diaphragm's dome seen from above.

    Near the lung base the dome (liver, spleen) appears as an island of soft tissue inside the lung's
    cross-section, which hole filling and the envelope would call lung. Per axial slice, a soft-tissue
    region of the lungs is dropped when most of it lies directly above non-lung tissue and it hardly
    touches the chest wall (a pleural lesion at the base leans on the chest wall). Axis 0 must run
    from the feet to the head (LPS), as :mod:`ctquant.io` delivers volumes; ``soft_tissue`` marks
    voxels of the dome's density (above about -200 HU).
    """
    added = (labels > 0) & soft_tissue
    if not added.any():
        return labels
    comps, n = ndi.label(added, structure=_SLICEWISE)  # per-slice regions
    below_outside = np.zeros_like(added)
    below_outside[1:] = (labels[:-1] == 0) & body[:-1]
    area = np.bincount(comps.ravel(), minlength=n + 1)
    rests = np.bincount(comps[added & below_outside], minlength=n + 1)
    wall = added & ndi.binary_dilation(labels == 0, structure=_SLICEWISE)
    rim = added & ndi.binary_dilation(~added, structure=_SLICEWISE)
    wall_n = np.bincount(comps[wall], minlength=n + 1)
    rim_n = np.bincount(comps[rim], minlength=n + 1)
    dome = (rests > 0.5 * area) & (wall_n <= max_wall_contact * np.maximum(rim_n, 1))
    dome[0] = False
    if not dome.any():
        return labels
    out = labels.copy()
    out[dome[comps]] = 0
    return out


def block_mean(volume: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Downsample a volume by the mean of whole blocks of ``factors`` (float32).

    Trailing voxels that do not fill a whole block are dropped.
    """
    crop = tuple(n - n % f for n, f in zip(volume.shape, factors))
    blocks = volume[: crop[0], : crop[1], : crop[2]].reshape(
        crop[0] // factors[0], factors[0], crop[1] // factors[1], factors[1], crop[2] // factors[2], factors[2])
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def block_majority(mask: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Downsample a boolean volume by whole blocks of ``factors``: a block is set when most of it is."""
    return block_mean(mask, factors) >= 0.5


def upsample_blocks(coarse: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, ...],
                    pad_mode: str = "edge") -> np.ndarray:
    """Nearest-neighbour upsampling of a block-wise volume back to ``shape``.

    Voxels beyond the last whole block are padded with ``pad_mode`` (``edge`` or ``constant``: zero).
    """
    full = coarse
    for axis, f in enumerate(factors):
        if f > 1:
            full = np.repeat(full, f, axis=axis)
    full = full[: shape[0], : shape[1], : shape[2]]
    pad = [(0, n - m) for n, m in zip(shape, full.shape)]
    return np.pad(full, pad, mode=pad_mode) if any(p[1] for p in pad) else full


def _refine(labels_c: np.ndarray, dense_added_c: np.ndarray, hu: np.ndarray, factors: tuple[int, int, int],
            air_threshold_hu: float, dense_max_hu: float) -> np.ndarray:
    """Bring coarse labels to the full grid: aerated boundaries from the full-resolution HU.

    Air voxels within one coarse voxel of a lung join it; dense voxels stay lung where the coarse
    envelope added dense tissue (lesions, vessels) or one coarse voxel inside the lung, so chest wall
    caught in a boundary block is dropped. Neighbourhoods are taken on the coarse grid, so the full
    grid sees only element-wise work.
    """
    out = np.zeros(hu.shape, dtype=np.uint8)
    if not labels_c.any():
        return out
    if factors == (1, 1, 1):
        return labels_c.astype(np.uint8)
    box = ndi.find_objects((labels_c > 0).astype(np.uint8))[0]
    box_c = tuple(slice(max(0, b.start - 1), min(n, b.stop + 1)) for b, n in zip(box, labels_c.shape))
    box_full = tuple(slice(b.start * f, min(n, b.stop * f)) for b, f, n in zip(box_c, factors, hu.shape))
    labels_box = labels_c[box_c]
    lung_box = labels_box > 0
    near_c = labels_box.copy()  # each lung grown by one coarse voxel (the right lung first where both reach)
    for label in (LEFT, RIGHT):
        near_c[ndi.binary_dilation(labels_box == label) & ~lung_box] = label
    interior_c = ndi.binary_erosion(lung_box)
    hu_box = hu[box_full]
    shape = hu_box.shape
    labels = upsample_blocks(labels_box, factors, shape)
    near = upsample_blocks(near_c, factors, shape)
    keep_dense = upsample_blocks(dense_added_c[box_c] | interior_c, factors, shape)
    air = hu_box < air_threshold_hu
    dense = ~air & (hu_box < dense_max_hu)
    lung = labels > 0
    refined = np.where(air, near, labels * (lung & dense & keep_dense)).astype(np.uint8)
    out[box_full] = refined
    return out
