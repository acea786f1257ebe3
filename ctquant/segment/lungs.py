"""Left/right lung segmentation, bounded by anatomy: tight on aerated lungs, dense lung kept at the ribs.

A classical pipeline, run on a coarse grid (about 2.5 mm) for speed and refined at full resolution:

1. body: per axial slice, everything not connected to the air outside the patient; lung cut by the
   field of view stays inside (:func:`body_mask`);
2. aerated lung: air (< ``air_threshold_hu``) inside the body;
3. airways: trachea and main bronchi, tracked slice by slice from the top of the trachea and removed
   (:func:`find_airways`);
4. the two lungs: the two largest air components, split where they touch (erosion until two parts
   appear, then a watershed); right lung = the one on the patient's right (lower LPS x); vessels and
   lesions they enclose are filled per axial slice;
5. dense lung against the chest wall: each lung is extended through soft tissue to the inner surface of
   the rib cage on the lateral and dependent side (posterior for a supine patient, anterior for a prone
   one), less the chest-wall layer measured where the lung is aerated; a stretch of under 4 mm beyond
   that layer is the wall's own variation and stays out (:func:`fill_to_rib_cage`);
6. the diaphragm's dome, an island of soft tissue in the lowest lung slices, is taken out
   (:func:`drop_diaphragm_domes`);
7. at full resolution, the pleural edge is put half-way in density between the lung beside it and
   the chest wall (:func:`settle_pleural_edge`), so dense lung against the wall keeps its last voxels.

Why no growth by density: on real CT, unenhanced consolidation, muscle, heart, liver and spleen share
one density band, so every step that recovered dense lung by density (a 30 mm envelope closing, growth
through "airless lung" density) leaked 15-67 % of the lung volume into the chest wall, mediastinum,
neck and abdomen (``../shared/data/real-ct/README.md``). Dense lung is now added only between the lung
and the rib cage. Known limit: dense lung with no aerated lung in its axial slice (an airless base, a
whole airless lobe) and dense lung against the mediastinum are missed; README "Accuracy" gives the
measured share on real scans with pneumonia painted in (:mod:`ctquant.synthetic.hybrid`).

Labels follow the lungmask convention: 0 background, 1 right lung, 2 left lung.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from .grid import block_mean_edge, bounding_box, coarse_factors, upsample_blocks

log = logging.getLogger(__name__)

RIGHT, LEFT = 1, 2
#: The modules (relative to the package) whose code makes the lung masks: the lung accuracy recorded in
#: ``configs/lung_accuracy.json`` holds for the code whose hash (:func:`ctquant.config.code_sha256`) it names
#: (and the lung network, ``models/lung_model.pt``, whose hash it names too).
CODE_FILES = ("segment/lungs.py", "segment/grid.py", "segment/lung_model.py")

#: The dependent (lower) side of the lungs, by ``PatientPosition`` (DICOM 0018,5100): where gravity puts
#: dependent consolidation and where :func:`fill_to_rib_cage` looks for it. Supine (HFS, FFS) and
#: positions not given (NIfTI, missing tag) are taken as posterior; decubitus positions are not handled.
PRONE_POSITIONS = ("HFP", "FFP")
DEPENDENT_SIDES = ("posterior", "anterior")
#: How far rays may turn medially on the dependent side (x share of a unit step): behind, into the
#: paravertebral gutters; in front (a prone patient), not at all: rays that did took pericardium and heart
#: (real scans, anterior rays up to 0.5 medially: leak 1.2 -> 3.5 % on A0001, 1.7 -> 3.8 % on the pancreas).
MAX_MEDIAL = {"posterior": 0.5, "anterior": 0.0}

#: In-plane 2D connectivity expressed as a 3D structure (no links between slices).
_SLICEWISE = np.zeros((3, 3, 3), dtype=bool)
_SLICEWISE[1] = ndi.generate_binary_structure(2, 1)


def _grown(box: tuple[slice, slice, slice], shape: tuple[int, ...], margin: int,
           in_plane: bool = False) -> tuple[slice, slice, slice]:
    """``box`` grown by ``margin`` voxels on each side (in-plane only with ``in_plane``), within ``shape``."""
    return tuple(b if in_plane and axis == 0 else slice(max(0, b.start - margin), min(n, b.stop + margin))
                 for axis, (b, n) in enumerate(zip(box, shape)))


def _dense_runs(line: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of False (dense) pixels on a 1D low-density line."""
    edges = np.flatnonzero(np.diff(np.concatenate(([1], line.astype(np.int8), [1]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _sealed_edges(low: np.ndarray, min_wall_px: tuple[int, int] = (1, 1)) -> np.ndarray:
    """Low pixels on a slice's four edge lines that lie between two walls of dense pixels on that line.

    Where the body is cut by the field of view, lung touching the image edge is low density on the
    edge line between the chest wall's two cuts; sealing it keeps that lung inside the body. A wall is
    a dense run at least ``min_wall_px`` (along y, along x) long: the chest wall, cut by the edge, is
    thick, while the patient table, a blanket or a cable crossing the edge is a thin line, and sealing
    between thin lines would close the outside air under or over the patient into the body.
    """
    seal = np.zeros_like(low)
    for edge, wall_px in (((0, slice(None)), min_wall_px[1]), ((-1, slice(None)), min_wall_px[1]),
                          ((slice(None), 0), min_wall_px[0]), ((slice(None), -1), min_wall_px[0])):
        line = low[edge]
        walls = [run for run in _dense_runs(line) if run[1] - run[0] >= wall_px]
        if len(walls) >= 2:
            between = np.zeros(line.shape, dtype=bool)
            between[walls[0][0]:walls[-1][1]] = True
            seal[edge] = line & between
    return seal


def body_mask(hu: np.ndarray, threshold_hu: float = -500.0, spacing_mm: tuple[float, float, float] | None = None,
              min_wall_mm: float = 8.0) -> np.ndarray:
    """Per axial slice, voxels not connected to the low-density region outside the patient.

    Outside is the low-density region touching the image border, less what lies on the border
    between two stretches of body (lung cut by the field of view stays inside); with ``spacing_mm``
    (z, y, x), a stretch of body on the border must be at least ``min_wall_mm`` long (without it, one
    pixel). The patient table, separated from the body by air, is dropped by keeping the largest 3D
    component.
    """
    low = hu < threshold_hu
    min_wall_px = (1, 1) if spacing_mm is None else tuple(
        max(1, int(np.ceil(min_wall_mm / float(s)))) for s in spacing_mm[1:])
    border = np.zeros(low.shape[1:], dtype=bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    labels, _ = ndi.label(low, structure=_SLICEWISE)  # the regions of each axial slice
    on_border = np.zeros_like(low)
    for z in range(low.shape[0]):
        on_border[z] = border & low[z] & ~_sealed_edges(low[z], min_wall_px)
    seeds = np.unique(labels[on_border])
    body = ~np.isin(labels, seeds[seeds > 0])
    comps, n = ndi.label(body)
    if n > 1:
        sizes = np.bincount(comps[body], minlength=n + 1)  # sizes[0] = 0: background never wins
        body = comps == int(np.argmax(sizes))
    return body


def _ball(radius_vox: np.ndarray) -> np.ndarray:
    r = np.maximum(np.asarray(radius_vox, dtype=float), 1e-6)
    extent = np.ceil(r).astype(int)
    grids = np.ogrid[tuple(slice(-e, e + 1) for e in extent)]
    return sum((g / ri) ** 2 for g, ri in zip(grids, r)) <= 1.0


def _trachea_seed(air: np.ndarray, body: np.ndarray, spacing_mm: tuple[float, float, float],
                  area_cm2: tuple[float, float], max_offset_mm: float) -> tuple[int, np.ndarray] | None:
    """The top of the trachea: the longest run of slices, from the upper half of the air down, of
    overlapping round air regions of ``area_cm2`` within ``max_offset_mm`` of the body's midline.

    A run must cover 15 mm, or start on the scan's top slice (a trachea cut by the field of view).
    Returns (slice index, region) or None.
    """
    pixel_cm2 = spacing_mm[1] * spacing_mm[2] / 100.0
    z_air = np.flatnonzero(air.any(axis=(1, 2)))
    min_run = max(2, int(np.ceil(15.0 / spacing_mm[0])))
    candidates: dict[int, tuple[np.ndarray, list[int]]] = {}
    for z in z_air[::-1][: max(min_run + 1, len(z_air) // 2)]:
        labels, n = ndi.label(air[z])
        xs = np.flatnonzero(body[z].any(axis=0))
        if n == 0 or xs.size == 0:
            continue
        midline = 0.5 * (xs[0] + xs[-1])
        counts = np.bincount(labels.ravel())[1:]
        area = counts * pixel_cm2
        x_sums = np.bincount(labels.ravel(), weights=np.tile(np.arange(labels.shape[1], dtype=float), labels.shape[0]))
        centre_x = x_sums[1:] / counts  # exact sums of whole numbers: ndi.center_of_mass's x, to the bit
        ok = [i + 1 for i in range(n) if area_cm2[0] <= area[i] <= area_cm2[1]
              and abs(centre_x[i] - midline) * spacing_mm[2] < max_offset_mm]
        candidates[int(z)] = (labels, ok)
    best = None
    for z0 in sorted(candidates, reverse=True):
        for index in candidates[z0][1]:
            region, run, z = candidates[z0][0] == index, 1, z0 - 1
            while z in candidates:
                labels, ok = candidates[z]
                hit = [j for j in np.unique(labels[region]) if j in ok]
                if not hit:
                    break
                region, run, z = np.isin(labels, hit), run + 1, z - 1
            if (run >= min_run or (z0 == air.shape[0] - 1 and run >= 2)) and (best is None or run > best[0]):
                best = (run, z0, candidates[z0][0] == index)
        if best is not None:
            return best[1], best[2]
    return None


def find_airways(air: np.ndarray, body: np.ndarray, spacing_mm: tuple[float, float, float],
                 max_area_cm2: float = 6.0, max_volume_ml: float = 250.0) -> np.ndarray:
    """Trachea and main bronchi, tracked slice by slice from the top of the trachea.

    From the seed (:func:`_trachea_seed`) the trachea is followed up to the top of the scan; going
    down, every air region smaller than ``max_area_cm2`` that overlaps the slice above's airway joins
    it, and a larger one (lung) ends that branch. Returns an empty mask when no trachea is found
    (e.g. a scan starting below the carina).
    """
    airways = np.zeros_like(air)
    seed = _trachea_seed(air, body, spacing_mm, (0.8, max_area_cm2), 30.0)
    if seed is None:
        return airways
    z0, region = seed
    airways[z0] = region
    pixel_cm2 = spacing_mm[1] * spacing_mm[2] / 100.0
    max_voxels = max_volume_ml / (float(np.prod(spacing_mm)) / 1000.0)
    n_voxels = int(region.sum())
    for direction in (1, -1):
        previous = region if direction == 1 else ndi.binary_dilation(region)
        z = z0 + direction
        while 0 <= z < air.shape[0]:
            labels, n = ndi.label(air[z])
            area = np.bincount(labels.ravel(), minlength=n + 1) * pixel_cm2
            hit = [j for j in np.unique(labels[previous]) if j > 0 and area[j] <= max_area_cm2]
            if not hit:
                break
            airways[z] = np.isin(labels, hit)
            n_voxels += int(airways[z].sum())
            previous = airways[z] if direction == 1 else ndi.binary_dilation(airways[z])
            if n_voxels > max_voxels:
                break
            z += direction
    return airways


def _largest_components(mask: np.ndarray, min_share: float = 0.05) -> list[np.ndarray]:
    labels, n = ndi.label(mask)
    if n == 0:
        return []
    sizes = np.bincount(labels[mask], minlength=n + 1)[1:]
    order = np.argsort(sizes)[::-1]
    keep = [order[0]] + [i for i in order[1:2] if sizes[i] >= min_share * sizes[order[0]]]
    return [labels == i + 1 for i in keep]


def pick_lungs(candidates: np.ndarray, core: np.ndarray, hu: np.ndarray, midline_x: float, min_voxels: int,
               min_share: float = 0.05, bilateral_share: float = 0.1, gas_below_hu: float = -950.0
               ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The air regions that are the lungs, as (right, left), or (both, None) for one region holding both.

    Only 3D components of ``candidates`` with at least ``min_voxels`` and a ``core`` voxel compete. The
    largest is both lungs (to be split) when at least ``bilateral_share`` of it lies on each side of the
    body's midline (array x ``midline_x``; the patient's right has the lower x): the lungs touch at the
    anterior junction on most scans (measured here: 0.50-0.57 of such a region on the right; a lung on
    its own: 0.001). Otherwise it is one lung, and the other is the largest remaining region, of at least
    ``min_share`` of its size, on the other side of the midline and not gas (median ``hu`` below
    ``gas_below_hu``: lung parenchyma holds tissue and blood, -850 HU or so; the most emphysematous lungs
    here, -918), or none (a lung with no aerated lung left, or removed): gas in the stomach or bowel below
    the lungs is never a lung, and one lung is not split in two. (None, None) when no region qualifies.
    """
    labels, n = ndi.label(candidates)
    if n == 0:
        return None, None
    sizes = np.bincount(labels[candidates], minlength=n + 1)[1:]
    sizes[np.setdiff1d(np.arange(1, n + 1), labels[core & candidates]) - 1] = 0
    sizes[sizes < min_voxels] = 0
    order = [int(i) for i in np.argsort(sizes)[::-1] if sizes[i] > 0]
    if not order:
        return None, None
    xs = np.arange(labels.shape[2])

    def on_right(region: np.ndarray) -> bool:  # its centroid on the patient's right of the midline
        per_x = np.count_nonzero(region, axis=(0, 1))
        return float(per_x @ xs) / per_x.sum() < midline_x

    first = labels == order[0] + 1
    share_right_of_midline = np.count_nonzero(first[:, :, : int(round(midline_x))]) / sizes[order[0]]
    if min(share_right_of_midline, 1.0 - share_right_of_midline) >= bilateral_share:
        return first, None
    first_on_right = on_right(first)
    other = np.zeros_like(first)
    for i in order[1:]:
        if sizes[i] < min_share * sizes[order[0]]:
            break
        region = labels == i + 1
        if on_right(region) != first_on_right and np.median(hu[region]) >= gas_below_hu:
            other = region
            break
    return (first, other) if first_on_right else (other, first)


def thick_core(mask: np.ndarray, spacing_mm: tuple[float, float, float], half_width_mm: float) -> np.ndarray:
    """Voxels of ``mask`` whose in-plane square of half-width ``half_width_mm`` lies wholly in ``mask``.

    A lung is thick somewhere; the air cells of a patient table the body lies on, or a gap between
    skin folds, are thin sheets and have no core.
    """
    out = mask.astype(np.uint8)
    for axis in (1, 2):
        radius = int(round(half_width_mm / float(spacing_mm[axis])))
        if radius > 0:
            out = ndi.minimum_filter1d(out, 2 * radius + 1, axis=axis, mode="constant", cval=0)
    return out.astype(bool)


def split_lungs(lungs: np.ndarray, max_erosions: int = 12) -> tuple[np.ndarray, np.ndarray] | None:
    """Split one connected air region into two lungs by erosion then watershed, or None if it won't.

    Works in the region's bounding box grown by one voxel of background: erosion, labelling (in the same
    raster order), distance to the background and watershed see the same region there.
    """
    box = bounding_box(lungs)
    if box is None:
        return None
    box = _grown(box, lungs.shape, 1)
    region = lungs[box]
    eroded = region.copy()
    structure = ndi.generate_binary_structure(3, 1)
    for _ in range(max_erosions):
        eroded = ndi.binary_erosion(eroded, structure)
        parts = _largest_components(eroded, min_share=0.1)
        if len(parts) == 2:
            markers = np.zeros(region.shape, dtype=np.int32)
            markers[parts[0]] = 1
            markers[parts[1]] = 2
            distance = ndi.distance_transform_cdt(region, metric="taxicab")
            regions = watershed(-distance, markers, mask=region)
            split = np.zeros((2,) + lungs.shape, dtype=bool)
            split[(slice(None),) + box] = regions == 1, regions == 2
            return split[0], split[1]
        if not eroded.any():
            break
    return None


def _right_left(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order two lung masks as (right, left): the patient's right has the lower LPS x (array axis 2)."""
    xa = np.nonzero(a.any(axis=(0, 1)))[0].mean()
    xb = np.nonzero(b.any(axis=(0, 1)))[0].mean()
    return (a, b) if xa < xb else (b, a)


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Fill holes in each axial slice (vessels and lesions enclosed by aerated lung).

    Works in the mask's bounding box: outside it every slice is background that reaches the image border.
    """
    out = np.zeros(mask.shape, dtype=bool)
    box = bounding_box(mask)
    if box is not None:
        out[box] = ndi.binary_fill_holes(mask[box], structure=_SLICEWISE)
    return out


def dependent_side(patient_position: str | None) -> str:
    """``anterior`` for a prone ``PatientPosition`` (:data:`PRONE_POSITIONS`), else ``posterior``."""
    return "anterior" if str(patient_position or "").strip().upper() in PRONE_POSITIONS else "posterior"


def segment_lungs(hu: np.ndarray, spacing_mm: tuple[float, float, float], *,
                  air_threshold_hu: float = -400.0, dense_max_hu: float = 200.0,
                  coarse_mm: float = 2.5, wall_hu: float = 40.0, max_fill_mm: float = 80.0,
                  min_lung_ml: float = 100.0, min_lung_half_width_mm: float = 10.0,
                  dependent: str = "posterior") -> np.ndarray:
    """Label the right (1) and left (2) lung, dense (consolidated) lung included.

    Args:
        hu: CT volume (z, y, x) in Hounsfield units, LPS orientation.
        spacing_mm: voxel size (z, y, x) in mm.
        air_threshold_hu: aerated lung is below this value.
        dense_max_hu: dense lung is below this (bone is not lung).
        coarse_mm: working resolution of the coarse steps.
        wall_hu: density of the chest wall for the half-density pleural edge.
        max_fill_mm: longest stretch of dense tissue between aerated lung and rib cage taken as lung.
        min_lung_ml: an air region smaller than this is not a lung (bowel gas of an abdominal scan).
        min_lung_half_width_mm: an air region with no in-plane square of this half-width inside it (its
            vessels filled in) is not a lung (the air cells of a patient table the body touches;
            :func:`thick_core`).
        dependent: ``posterior`` (supine patient) or ``anterior`` (prone): the side where dense lung is
            recovered up to the rib cage (:func:`dependent_side` reads it from ``PatientPosition``).

    Returns:
        uint8 label volume on the input grid.
    """
    factors = coarse_factors(spacing_mm, coarse_mm)
    coarse_spacing = tuple(s * f for s, f in zip(spacing_mm, factors))
    hu_c = hu[tuple(slice(f // 2, None, f) for f in factors)]  # samples at block centres
    body = body_mask(hu_c, spacing_mm=coarse_spacing)
    air = (hu_c < air_threshold_hu) & body
    airways = find_airways(air, body, coarse_spacing)
    airway_box = bounding_box(airways)
    if airway_box is not None:  # the airways grown by one voxel, within their box grown by one
        airway_box = _grown(airway_box, airways.shape, 1)
        airways[airway_box] = ndi.binary_dilation(airways[airway_box], _ball(np.full(3, 1.0)))
    voxel_ml = float(np.prod(coarse_spacing)) / 1000.0
    candidates = air & ~airways
    core = thick_core(_fill_slices(candidates), coarse_spacing, min_lung_half_width_mm)  # vessels do not thin a lung
    midline = float(np.nonzero(body.any(axis=(0, 1)))[0].mean())
    right, left = pick_lungs(candidates, core, hu_c, midline, int(np.ceil(min_lung_ml / voxel_ml)))
    if right is None:
        log.warning("no lung found")
        return np.zeros(hu.shape, dtype=np.uint8)
    if left is None:  # one region holding both lungs
        split = split_lungs(right)
        if split is None:
            log.warning("lungs could not be separated; splitting at the body midline")
            xs = np.arange(hu_c.shape[2])[None, None, :]
            split = (right & (xs < midline), right & (xs >= midline))
        right, left = _right_left(*split)
    for lung, side in ((right, "right"), (left, "left")):
        if not lung.any():
            log.warning("no aerated %s lung found", side)
    chest = body & ~airways  # where lung may extend: inside the body, outside trachea and main bronchi
    labels_c = np.zeros(hu_c.shape, dtype=np.uint8)
    labels_c[_fill_slices(right) & chest] = RIGHT
    labels_c[_fill_slices(left) & chest & (labels_c == 0)] = LEFT
    bone_c = _block_mean_near(hu, labels_c > 0, factors, max_fill_mm / min(coarse_spacing[1:]) + 2)
    labels_c = fill_to_rib_cage(labels_c, hu_c, chest, coarse_spacing, bone_hu_volume=bone_c,
                                max_fill_mm=max_fill_mm, dense_min_hu=air_threshold_hu, bone_hu=dense_max_hu,
                                dependent=dependent)
    labels_c = drop_diaphragm_domes(labels_c, hu_c > -200, body)
    dense_added = (labels_c > 0) & ~air
    labels = _refine(labels_c, dense_added, hu, factors, air_threshold_hu, dense_max_hu)
    return settle_pleural_edge(labels, hu, wall_hu=wall_hu, lead_hu=(air_threshold_hu, 20.0),
                               dense_max_hu=dense_max_hu, in_place=True)


def _block_mean_near(hu: np.ndarray, near: np.ndarray, factors: tuple[int, int, int],
                     margin_blocks: float) -> np.ndarray:
    """Block means of ``hu`` on the coarse grid of ``near``, computed within ``margin_blocks`` of its
    in-plane bounding box (elsewhere -1000 HU): the bone the rib-cage step looks for lies there."""
    out = np.full(near.shape, -1000.0, dtype=np.float32)
    ys = np.flatnonzero(near.any(axis=(0, 2)))
    xs = np.flatnonzero(near.any(axis=(0, 1)))
    if ys.size == 0:
        return out
    m = int(np.ceil(margin_blocks))
    y0, y1 = max(0, ys[0] - m), min(near.shape[1], ys[-1] + m + 1)
    x0, x1 = max(0, xs[0] - m), min(near.shape[2], xs[-1] + m + 1)
    fz, fy, fx = factors
    sub = hu[: near.shape[0] * fz, y0 * fy: y1 * fy, x0 * fx: x1 * fx]
    out[:, y0:y1, x0:x1] = block_mean_edge(sub, factors)  # a trailing partial block padded with its edge voxels
    return out


def settle_pleural_edge(labels: np.ndarray, hu: np.ndarray, *, wall_hu: float = 40.0,
                        lead_hu: tuple[float, float] = (-400.0, 20.0), fat_hu: tuple[float, float] = (-150.0, -60.0),
                        dense_max_hu: float = 200.0, steps: int = 2, in_place: bool = False) -> np.ndarray:
    """Move each lung's edge out, one in-plane voxel per step, where half-density says the lung goes on.

    A fixed air threshold puts the pleural edge half-way between aerated lung and the chest wall; where
    ground glass or consolidation meets the wall it drops the last voxels of dense lung. Here a voxel
    just outside a lung joins it when its density is below the midpoint between its dense in-plane lung
    neighbours (``lead_hu``: denser than the air threshold, lighter than blood) and the chest wall
    (``wall_hu``). Fat (``fat_hu``, mediastinal and extrapleural) and bone never join. Works on the
    lung's dense voxels only, so it costs little on large scans. Returns a copy of ``labels``, or with
    ``in_place`` ``labels`` itself (C-contiguous) changed.
    """
    if in_place and not labels.flags.c_contiguous:
        raise ValueError("settle_pleural_edge: in_place needs C-contiguous labels")
    out = labels if in_place else np.array(labels, order="C")
    nz, ny, nx = out.shape
    sub = out.reshape(-1)  # a view: flat indices of the whole volume

    def hu_at(flat: np.ndarray) -> np.ndarray:
        return hu[np.unravel_index(flat, hu.shape)]

    with_lung = np.flatnonzero(sub.reshape(nz, -1).max(axis=1))
    lead = [np.flatnonzero((out[z] > 0) & (hu[z] >= lead_hu[0]) & (hu[z] < lead_hu[1])) + z * ny * nx
            for z in with_lung]  # slice by slice: no full-size temporaries
    lead = np.concatenate(lead) if lead else np.zeros(0, dtype=np.int64)
    for _ in range(steps):
        if lead.size == 0:
            break
        y, x = (lead // nx) % ny, lead % nx
        neighbours, sources = [], []
        for offset, inside in ((1, x < nx - 1), (-1, x > 0), (nx, y < ny - 1), (-nx, y > 0)):
            neighbour = lead[inside] + offset
            free = sub[neighbour] == 0  # most dense lung voxels have lung all around
            neighbours.append(neighbour[free])
            sources.append(lead[inside][free])
        neighbour, source = np.concatenate(neighbours), np.concatenate(sources)
        joined = np.zeros(0, dtype=np.int64)
        for side in (RIGHT, LEFT):
            mine = sub[source] == side
            candidates, inverse = np.unique(neighbour[mine], return_inverse=True)
            if candidates.size == 0:
                continue
            lung_hu = (np.bincount(inverse, weights=hu_at(source[mine]).astype(np.float64))
                       / np.bincount(inverse))
            value = hu_at(candidates)
            join = ((value < 0.5 * (lung_hu + wall_hu)) & (value < dense_max_hu)
                    & ~((value >= fat_hu[0]) & (value < fat_hu[1])))
            join &= ~np.isin(candidates, joined)  # beside both lungs: the right lung (first) keeps it
            sub[candidates[join]] = side
            joined = np.concatenate([joined, candidates[join]])
        lead = joined[(hu_at(joined) >= lead_hu[0]) & (hu_at(joined) < lead_hu[1])]  # the next step's edge
    return out


def fill_to_rib_cage(labels: np.ndarray, hu: np.ndarray, body: np.ndarray, spacing_mm: tuple[float, float, float],
                     *, bone_hu_volume: np.ndarray | None = None, max_fill_mm: float = 80.0, wall_extra_mm: float = 1.5,
                     bone_hu: float = 200.0, dense_min_hu: float = -400.0, cage_z_mm: float = 30.0,
                     n_angles: int = 360, wall_percentile: float = 20.0, median_deg: float = 25.0,
                     dependent: str = "posterior", max_medial: float | None = None, min_fill_mm: float = 4.0) -> np.ndarray:
    """Extend each lung to the rib cage through dense tissue: dependent and pleura-based consolidation.

    Per axial slice and lung, rays leave the lung's centre towards the lateral and ``dependent`` chest wall
    (``posterior`` for a supine patient, ``anterior`` for a prone one; up to ``max_medial`` of a unit step
    medially, default :data:`MAX_MEDIAL` of that side). Along each,
    the rib cage is the first bone beyond the lung (bone: ``bone_hu_volume``, a block-mean image where
    sharp-kernel noise does not pass for bone, projected over ``cage_z_mm`` so that intercostal
    slices see their ribs), capped by the running median over ``median_deg`` of neighbouring rays
    (a ray through an intercostal gap must not reach the scapula). Where the stretch between lung and
    rib cage is all soft tissue (``dense_min_hu`` to ``bone_hu``, no fat gap) and at most
    ``max_fill_mm`` long, it is lung, less the chest-wall layer: the ``wall_percentile`` of the gaps
    over the whole lung (most rays of a lung meet an aerated pleura) plus ``wall_extra_mm``. A stretch
    that leaves less than ``min_fill_mm`` beyond that layer is the chest wall's own variation in thickness,
    not dense lung, and is not filled (on the real scans without pneumonia these thin fills were most of
    the lung volume outside the reference; README "Accuracy").
    """
    from scipy.ndimage import median_filter

    if dependent not in DEPENDENT_SIDES:
        raise ValueError(f"dependent must be one of {DEPENDENT_SIDES}, not {dependent!r}")
    max_medial = MAX_MEDIAL[dependent] if max_medial is None else max_medial
    downwards = 1.0 if dependent == "posterior" else -1.0  # +y is posterior (LPS)
    sz, sy, sx = spacing_mm
    bone = ((hu if bone_hu_volume is None else bone_hu_volume) >= bone_hu) & body
    size = max(1, int(round(cage_z_mm / sz))) | 1
    cage = ndi.maximum_filter1d(bone.view(np.uint8), size=size, axis=0).astype(bool)
    soft = (hu >= dense_min_hu) & (hu < bone_hu) & body  # soft tissue: what a filled stretch is made of
    out = labels.copy()
    step_mm = 0.5 * min(sy, sx)
    theta = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)
    dy, dx = np.sin(theta), np.cos(theta)
    ny, nx = hu.shape[1:]
    radii = np.arange(0, 0.6 * max(ny * sy, nx * sx), step_mm)
    n_r = len(radii)
    index = np.arange(n_r)[None, :]
    ray_y, ray_x = radii[None, :] * dy[:, None] / sy, radii[None, :] * dx[:, None] / sx  # ray points from the centre
    x_mid = np.nonzero(body.any(axis=(0, 1)))[0].mean()
    median_size = int(median_deg * n_angles / 360) | 1
    for side in (RIGHT, LEFT):
        rays = {}
        for z in range(hu.shape[0]):
            lung = labels[z] == side
            if lung.sum() < 20:
                continue
            cy, cx = ndi.center_of_mass(lung)
            medial = np.sign(x_mid - cx)  # +1: medial is +x
            towards_wall = ((dx * medial) <= max_medial) & (dy * downwards >= 0.0)
            yy = np.rint(cy + ray_y).astype(int)
            xx = np.rint(cx + ray_x).astype(int)
            inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
            flat = np.clip(yy, 0, ny - 1) * nx + np.clip(xx, 0, nx - 1)  # one flat index for the look-ups
            on_lung = lung.ravel()[flat] & inside
            last_lung = np.where(on_lung.any(axis=1), n_r - 1 - np.argmax(on_lung[:, ::-1], axis=1), -1)
            beyond = index > last_lung[:, None]
            hit = cage[z].ravel()[flat] & inside & beyond
            first_bone = np.where(hit.any(axis=1), np.argmax(hit, axis=1), n_r).astype(float)
            limit = np.minimum(first_bone, median_filter(first_bone, size=median_size, mode="wrap"))
            not_soft = beyond & ~(soft[z].ravel()[flat] & inside)
            first_not_soft = np.where(not_soft.any(axis=1), np.argmax(not_soft, axis=1), np.inf)  # beyond the lung
            rays[z] = (cy, cx, last_lung, limit, towards_wall, first_not_soft)  # per ray only: little memory
        gaps = [(r[3] - r[2])[(r[2] >= 0) & (r[3] < n_r) & r[4]] for r in rays.values()]
        gaps = np.concatenate(gaps) if gaps else np.zeros(0)
        if gaps.size < 50:
            continue
        wall = np.percentile(gaps, wall_percentile) + wall_extra_mm / step_mm
        fill = np.zeros(labels.shape, dtype=bool)
        for z, (cy, cx, last_lung, limit, towards_wall, first_not_soft) in rays.items():
            end = limit - wall  # the stretch: the samples after the lung's last, before the chest-wall layer
            ok = towards_wall & (last_lung >= 0) & (limit < n_r) & ((limit - last_lung) * step_mm <= max_fill_mm)
            ok &= ~(first_not_soft < end)  # the whole stretch is soft tissue: no fat, air or bone
            ok &= (end - last_lung) * step_mm >= min_fill_mm
            if not ok.any():
                continue
            stretch = (index > last_lung[ok, None]) & (index < end[ok, None])  # all soft tissue, so in the image
            yy = np.rint(cy + ray_y[ok]).astype(int)
            xx = np.rint(cx + ray_x[ok]).astype(int)
            fill[z, yy[stretch], xx[stretch]] = True
        # Closed per axial slice (no links between slices), all slices in one call, in the box of the fill grown
        # in-plane by the closing's reach (2): outside it the closing is empty, inside it sees all it would.
        box = bounding_box(fill)
        if box is None:
            continue
        box = _grown(box, fill.shape, 2, in_plane=True)
        fill = (ndi.binary_closing(fill[box], structure=_SLICEWISE, iterations=2) & (labels[box] == 0)
                & (hu[box] < bone_hu) & body[box])
        out_box = out[box]  # a view
        out_box[fill & (out_box == 0)] = side
    return out


def drop_diaphragm_domes(labels: np.ndarray, soft_tissue: np.ndarray, body: np.ndarray,
                         max_wall_contact: float = 0.1) -> np.ndarray:
    """Remove soft tissue added to the lungs that is the diaphragm's dome seen from above.

    Near the lung base the dome (liver, spleen) appears as an island of soft tissue inside the lung's
    cross-section, which hole filling and the envelope would call lung. Per axial slice, a soft-tissue
    region of the lungs is dropped when most of it lies directly above non-lung tissue and it hardly
    touches the chest wall (a pleural lesion at the base leans on the chest wall). Axis 0 must run
    from the feet to the head (LPS), as :mod:`ctquant.io.scans` delivers volumes; ``soft_tissue`` marks
    voxels of the dome's density (above about -200 HU).
    """
    added = (labels > 0) & soft_tissue
    box = bounding_box(added)
    if box is None:
        return labels
    # Everything below is counted over voxels of ``added``; their in-plane neighbours and the slice below lie in
    # its box grown by one voxel.
    box = _grown(box, labels.shape, 1)
    labels_box, added, body = labels[box], added[box], body[box]
    comps, n = ndi.label(added, structure=_SLICEWISE)  # per-slice regions
    below_outside = np.zeros_like(added)
    below_outside[1:] = (labels_box[:-1] == 0) & body[:-1]
    area = np.bincount(comps[added], minlength=n + 1)  # area[0] unused
    rests = np.bincount(comps[added & below_outside], minlength=n + 1)
    wall = added & ndi.binary_dilation(labels_box == 0, structure=_SLICEWISE)
    rim = added & ndi.binary_dilation(~added, structure=_SLICEWISE)
    wall_n = np.bincount(comps[wall], minlength=n + 1)
    rim_n = np.bincount(comps[rim], minlength=n + 1)
    dome = (rests > 0.5 * area) & (wall_n <= max_wall_contact * np.maximum(rim_n, 1))
    dome[0] = False
    if not dome.any():
        return labels
    out = labels.copy()
    out_box = out[box]  # a view
    out_box[dome[comps]] = 0
    return out


def _refine(labels_c: np.ndarray, dense_added_c: np.ndarray, hu: np.ndarray, factors: tuple[int, int, int],
            air_threshold_hu: float, dense_max_hu: float, slab_blocks: int = 4) -> np.ndarray:
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
    box = bounding_box(labels_c)
    box_c = _grown(box, labels_c.shape, 1)
    # a box reaching the coarse grid's end takes the trailing voxels that fill no whole block (edge-padded
    # by upsample_blocks): a lung cut by the image edge then reaches the edge and is flagged
    box_full = tuple(slice(b.start * f, n if b.stop == nc else min(n, b.stop * f))
                     for b, f, n, nc in zip(box_c, factors, hu.shape, labels_c.shape))
    labels_box = labels_c[box_c]
    lung_box = labels_box > 0
    near_c = labels_box.copy()  # each lung grown by one coarse voxel (the right lung first where both reach)
    for label in (LEFT, RIGHT):
        near_c[ndi.binary_dilation(labels_box == label) & ~lung_box] = label
    interior_c = ndi.binary_erosion(lung_box)
    dense_c = np.where(dense_added_c[box_c] | interior_c, labels_box, 0).astype(np.uint8)  # label of a dense voxel
    hu_box, refined = hu[box_full], out[box_full]  # views: the result is written in place
    for z0 in range(0, labels_box.shape[0], slab_blocks):  # a few coarse slices at a time: small temporaries
        zs = slice(z0 * factors[0], (z0 + slab_blocks) * factors[0])
        blocks = slice(z0, z0 + slab_blocks)
        hu_slab, refined_slab = hu_box[zs], refined[zs]
        np.multiply(upsample_blocks(dense_c[blocks], factors, hu_slab.shape), hu_slab < dense_max_hu, out=refined_slab)
        np.copyto(refined_slab, upsample_blocks(near_c[blocks], factors, hu_slab.shape),
                  where=hu_slab < air_threshold_hu)
    return out
