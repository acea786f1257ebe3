"""Synthetic chest CT phantom with exact ground truth, and DICOM/NIfTI writers for it.

The phantom is drawn in an anatomical frame in mm with the LPS axes (x to the patient's left,
y posterior, z superior), centred on the chest. Tissue classes are drawn first on the voxel grid and
the HU image is made from them, so ``lung_labels`` and ``lesion_labels`` are the exact truth of the
image: a perfect method recovers the volumes exactly. Lesion HU is kept inside the bands GGO
[-700, -300) and consolidation [-300, 100), and normal lung below -705 HU, so inside the true lungs
the GGO band gives the GGO volume exactly; lung vessels (~+40 HU, tubes thicker near the hilum) fall
in the consolidation band, as in real CT, and must be told apart by shape.

Conventions of the labels: the lung label holds parenchyma, lesions, intrapulmonary vessels
(radius < ``HILAR_RADIUS_MM``) and small airways; the trachea, main bronchi and hilar vessels are not
lung. On thick slices a thin tube is drawn where it crosses the middle half of the slice.

Arrays are (z, y, x) like :mod:`ctquant.io.scans`; the direction is the identity, so z index 0 is the
most inferior slice and x index 0 is on the patient's right.

Random streams (all from ``seed``): the anatomy (vessel and airway trees) and the lesion field are
the same at every time point; the image noise differs per time point.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

# ----------------------------------------------------------------------------------------------
# Tissue classes (internal) and their mean HU
# ----------------------------------------------------------------------------------------------
(AIR, TABLE_SHELL, TABLE_CORE, FAT, MUSCLE, SOFT, MED_FAT, BLOOD, LIVER, SPLEEN, GUT_GAS,
 BONE_MARROW, BONE_CORTEX, CARTILAGE, DISC, CSF, AIRWAY_LUMEN, AIRWAY_WALL, HILAR_VESSEL,
 LUNG, LUNG_VESSEL, LUNG_AIRWAY_LUMEN, LUNG_AIRWAY_WALL, GGO, CONSOLIDATION) = range(25)
N_CLASSES = 25
#: Classes that belong to the lung label (parenchyma, small vessels, small airways, lesions).
LUNG_CLASSES = (LUNG, LUNG_VESSEL, LUNG_AIRWAY_LUMEN, LUNG_AIRWAY_WALL, GGO, CONSOLIDATION)

_MEAN_HU = np.zeros(N_CLASSES, np.float32)
for _c, _hu in {
    AIR: -1000, TABLE_SHELL: 250, TABLE_CORE: -900, FAT: -100, MUSCLE: 45, SOFT: 35,
    MED_FAT: -90, BLOOD: 40, LIVER: 62, SPLEEN: 50, GUT_GAS: -1000, BONE_MARROW: 280,
    BONE_CORTEX: 950, CARTILAGE: 120, DISC: 80, CSF: 15, AIRWAY_LUMEN: -1000, AIRWAY_WALL: 20,
    HILAR_VESSEL: 40, LUNG: -850, LUNG_VESSEL: 40, LUNG_AIRWAY_LUMEN: -990, LUNG_AIRWAY_WALL: 20,
    GGO: -500, CONSOLIDATION: -25,
}.items():
    _MEAN_HU[_c] = _hu

#: HU bands (lower, upper) that voxels of each lung class are kept in after blur and noise.
GGO_BAND_HU = (-700, -300)
CONSOLIDATION_BAND_HU = (-300, 100)
_CLIP_HU = {
    LUNG: (-1024.0, -706.0), LUNG_AIRWAY_LUMEN: (-1024.0, -706.0),
    GGO: (-694.0, -306.0),
    CONSOLIDATION: (-294.0, 94.0), LUNG_VESSEL: (-294.0, 94.0), LUNG_AIRWAY_WALL: (-294.0, 94.0),
}
HU_MIN, HU_MAX = -1024, 3071

# ----------------------------------------------------------------------------------------------
# Anatomy (mm, anatomical frame: x left, y posterior, z superior; origin mid-chest)
# ----------------------------------------------------------------------------------------------
BODY_A_MM, BODY_B_MM, BODY_YC_MM = 164.0, 120.0, -5.0  # body ellipse semi-axes and centre y
FAT_DEPTH_MM, MUSCLE_DEPTH_MM, CAVITY_DEPTH_MM = 9.0, 16.0, 25.0  # depths under the skin
RIB_PITCH_MM, RIB_HEIGHT_MM, RIB_DROP_MM = 26.0, 11.0, 45.0
Z_ANATOMY_IN_PATIENT_MM = -200.0  # patient (table) z of the anatomical origin
Z_CARINA_MM = 45.0
Z_ARCH_MM = 58.0
Z_APEX_MM, Z_APEX_TAPER_MM = 118.0, 25.0
DOME_RIGHT_MM, DOME_LEFT_MM, DOME_DEPTH_MM, DOME_FLOOR_MM = -64.0, -78.0, 36.0, -128.0
DIAPHRAGM_MM = 5.0
HEART_C_MM, HEART_R_MM = (20.0, -12.0, -44.0), (64.0, 52.0, 56.0)  # ellipsoid centre, semi-axes
TRACHEA_XY_MM, TRACHEA_R_MM, AIRWAY_WALL_MM = (0.0, 14.0), 9.0, 2.0
CARINA_MM = (0.0, 14.0, Z_CARINA_MM)
BRONCHUS_END_MM = {1: (-34.0, 17.0, 31.0), 2: (40.0, 21.0, 26.0)}
BRONCHUS_R_MM = {1: 6.5, 2: 5.5}
HILUM_ARTERY_MM = {1: (-36.0, 1.0, 20.0), 2: (40.0, 7.0, 28.0)}
HILUM_VEIN_MM = {1: (-33.0, 12.0, -2.0), 2: (36.0, 18.0, 4.0)}
HILAR_RADIUS_MM = 4.0  # vessels at least this thick are hilar (outside the lung label)
COARSE_STEP_MM, COARSE_HALF_XY_MM, COARSE_HALF_Z_MM = 3.0, 186.0, 150.0  # lesion field grid

SAMPLE_SHAPE_ZYX = (54, 192, 192)
SAMPLE_SPACING_MM = (5.0, 1.8, 1.8)
TIMEPOINTS = ("baseline", "day14")
NOISE_SD_HU = 20.0  # after the blur; the noise is correlated over the blur's width
BLUR_MM = 0.6  # in-plane Gaussian sigma of the reconstruction blur


@dataclass
class Phantom:
    """A synthetic chest CT with its exact labels.

    Attributes:
        hu: int16 (z, y, x) Hounsfield units.
        lung_labels: uint8, 1 right lung, 2 left lung (trachea, main bronchi, hilar vessels excluded).
        lesion_labels: uint8, 1 ground-glass opacity, 2 consolidation (only inside the lungs).
        spacing_mm: voxel size (z, y, x).
        origin_mm: LPS (x, y, z) of the centre of voxel [0, 0, 0]; the direction is the identity.
        params: generator parameters (shape, spacing, timepoint, severity, seed).
    """

    hu: np.ndarray
    lung_labels: np.ndarray
    lesion_labels: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    params: dict[str, Any] = field(default_factory=dict)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    def truth(self) -> dict[str, Any]:
        """True volumes (mL) and % of lung per lung (right, left, both) and class."""
        return label_volumes(self.lung_labels, self.lesion_labels, self.spacing_mm)

    def to_scan(self):
        """This phantom as a :class:`ctquant.io.scans.Scan`."""
        from ..io.scans import Scan

        return Scan(hu=self.hu, spacing_mm=self.spacing_mm, origin_mm=self.origin_mm,
                    direction=self.direction, meta={"source": "ctquant.phantom", **self.params})


def label_volumes(lung_labels: np.ndarray, lesion_labels: np.ndarray,
                  spacing_mm: Sequence[float]) -> dict[str, Any]:
    """Voxel counts, volumes (mL) and % of lung of GGO/consolidation per lung and both lungs."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    out: dict[str, Any] = {"voxel_volume_ml": voxel_ml}
    counts = {}
    for name, side in (("right", 1), ("left", 2)):
        in_lung = lesion_labels[lung_labels == side]
        counts[name] = (int(in_lung.size), int(np.count_nonzero(in_lung == 1)),
                        int(np.count_nonzero(in_lung == 2)))
    counts["both"] = tuple(a + b for a, b in zip(counts["right"], counts["left"]))
    for name, (n_lung, n_ggo, n_cons) in counts.items():
        def pct(n: int, n_lung: int = n_lung) -> float:
            return 100.0 * n / n_lung if n_lung else 0.0

        out[name] = {
            "lung_voxels": n_lung, "ggo_voxels": n_ggo, "consolidation_voxels": n_cons,
            "lung_ml": n_lung * voxel_ml, "ggo_ml": n_ggo * voxel_ml,
            "consolidation_ml": n_cons * voxel_ml, "lesion_ml": (n_ggo + n_cons) * voxel_ml,
            "ggo_pct": pct(n_ggo), "consolidation_pct": pct(n_cons),
            "lesion_pct": pct(n_ggo + n_cons),
        }
    return out


# ----------------------------------------------------------------------------------------------
# Static in-plane geometry
# ----------------------------------------------------------------------------------------------
@dataclass
class _BodyMaps:
    """The body section at one height: mask, depth under the skin (mm), thoracic cavity."""

    body: np.ndarray
    depth: np.ndarray
    cavity: np.ndarray
    ring_idx: np.ndarray  # flat indices of the rib ring (17-26 mm deep), without the spine's gap
    ring_v: np.ndarray  # radial position across the ring, -1..1
    ring_shift_mm: np.ndarray  # rib z offset at each ring pixel (ribs run lower in front)
    ring_cartilage: np.ndarray  # anterior ends: costal cartilage
    ring_at_sternum: np.ndarray


@dataclass
class _Planes:
    """z-independent 2D maps (ny, nx) of one in-plane grid, and a cache of body sections."""

    x: np.ndarray  # (1, nx) mm
    y: np.ndarray  # (ny, 1) mm
    psi: np.ndarray  # angle around the body centre: 0 posterior, pi anterior
    dome: np.ndarray  # z of the diaphragm's lung surface
    right: np.ndarray  # patient's right of the left/right dividing line
    table_shell: np.ndarray
    table_core: np.ndarray
    spine_region: np.ndarray
    _cache: dict = field(default_factory=dict, repr=False)
    _discs: dict = field(default_factory=dict, repr=False)

    def cached(self, name: str, make) -> np.ndarray:
        """A static mask made once by ``make(self)``."""
        if name not in self._discs:
            self._discs[name] = make(self)
        return self._discs[name]

    def disc(self, cx: float, cy: float, r: float) -> np.ndarray:
        """The (cached) mask of a disc of radius r mm around (cx, cy)."""
        key = (cx, cy, r)
        if key not in self._discs:
            self._discs[key] = (self.x - cx) ** 2 + (self.y - cy) ** 2 <= r * r
        return self._discs[key]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.y.shape[0], self.x.shape[1])

    def body_at(self, z: float) -> _BodyMaps:
        """Body maps at height z: the chest narrows towards the thoracic inlet."""
        half_width = BODY_A_MM - 0.35 * float(np.clip(z - 40.0, 0.0, 100.0))
        key = round(half_width)  # 1 mm steps: few distinct sections to compute
        if key not in self._cache:
            x, y = self.x[0], self.y[:, 0]
            X, Y = self.x, self.y
            body = (X / key) ** 2 + ((Y - BODY_YC_MM) / BODY_B_MM) ** 2 <= 1.0
            depth = _body_depth_mm(x, y, float(key))
            cavity = (depth >= CAVITY_DEPTH_MM) & ~self.spine_region
            ring = ((depth >= MUSCLE_DEPTH_MM) & (depth < CAVITY_DEPTH_MM)
                    & ~((np.abs(X) < 32.0) & (self.psi < 0.8)))
            idx = np.flatnonzero(ring)
            half = 0.5 * (CAVITY_DEPTH_MM - MUSCLE_DEPTH_MM)
            v = (depth.ravel()[idx] - MUSCLE_DEPTH_MM - half) / half
            psi = self.psi.ravel()[idx]
            xs = np.broadcast_to(X, body.shape).ravel()[idx]
            self._cache[key] = _BodyMaps(
                body=body, depth=depth, cavity=cavity, ring_idx=idx, ring_v=v,
                ring_shift_mm=RIB_DROP_MM * 0.5 * (1.0 - np.cos(psi)) - 7.0,
                ring_cartilage=psi > 0.86 * np.pi, ring_at_sternum=np.abs(xs) < 16.0)
        return self._cache[key]


def _split_x_mm(y: np.ndarray) -> np.ndarray:
    """x of the line dividing right from left lung (the anterior junction line in front)."""
    return 2.0 + 0.08 * (y + 60.0)


def _body_depth_mm(x: np.ndarray, y: np.ndarray, half_width_mm: float) -> np.ndarray:
    """Depth under the skin (mm) of each (y, x) point, by a distance transform on a padded grid."""
    sx = float(x[1] - x[0]) if x.size > 1 else 1.0
    sy = float(y[1] - y[0]) if y.size > 1 else 1.0
    pad_x = int(np.ceil(max(0.0, half_width_mm + 5 - min(-x.min(), x.max())) / sx)) + 2
    pad_y = int(np.ceil(max(0.0, BODY_B_MM + 10 - min(-y.min(), y.max())) / sy)) + 2
    xe = np.concatenate([x[0] - sx * np.arange(pad_x, 0, -1), x, x[-1] + sx * np.arange(1, pad_x + 1)])
    ye = np.concatenate([y[0] - sy * np.arange(pad_y, 0, -1), y, y[-1] + sy * np.arange(1, pad_y + 1)])
    body = (xe[None, :] / half_width_mm) ** 2 + ((ye[:, None] - BODY_YC_MM) / BODY_B_MM) ** 2 <= 1.0
    depth = ndimage.distance_transform_edt(body, sampling=(sy, sx))
    return depth[pad_y:pad_y + y.size, pad_x:pad_x + x.size]


def _make_planes(x_mm: np.ndarray, y_mm: np.ndarray) -> _Planes:
    """The static maps for the in-plane grid given by its x and y coordinates (mm)."""
    X, Y = x_mm[None, :], y_mm[:, None]
    shape = (y_mm.size, x_mm.size)
    full = lambda a: np.ascontiguousarray(np.broadcast_to(a, shape))  # noqa: E731
    psi = np.arccos(np.clip((Y - BODY_YC_MM) / np.maximum(np.hypot(X, Y - BODY_YC_MM), 1e-6), -1, 1))
    spine_region = ((X / 34.0) ** 2 + ((Y - 60.0) / 26.0) ** 2 <= 1.0) | ((np.abs(X) < 34.0) & (Y > 60.0))

    def dome(zc: float, xc: float, yc: float) -> np.ndarray:
        """A diaphragm dome: posterior recess deeper than the anterior one."""
        by = np.where(Y > yc, 62.0, 92.0)
        return zc - DOME_DEPTH_MM * (((X - xc) / 80.0) ** 2 + ((Y - yc) / by) ** 2)

    s = 1.0 / (1.0 + np.exp(-X / 12.0))
    dome_z = np.maximum((1 - s) * dome(DOME_RIGHT_MM, -60.0, 0.0) + s * dome(DOME_LEFT_MM, 62.0, 5.0),
                        DOME_FLOOR_MM)
    # patient table: a cradle-shaped carbon shell with a foam core, 8 mm below the back
    top = BODY_YC_MM + BODY_B_MM + 8.0 - 0.0009 * X ** 2
    on_table = np.abs(X) < 175.0
    table_shell = on_table & (((Y >= top) & (Y < top + 2.5)) | ((Y >= top + 20.0) & (Y < top + 22.5)))
    table_core = on_table & (Y >= top + 2.5) & (Y < top + 20.0)
    return _Planes(x=X, y=Y, psi=full(psi), dome=full(dome_z), right=full(X < _split_x_mm(Y)),
                   table_shell=full(table_shell), table_core=full(table_core),
                   spine_region=full(spine_region))


def _apex_ok(z: float, pl: _Planes) -> np.ndarray | bool:
    """Lung apices: each lung narrows to a dome above Z_APEX_TAPER_MM."""
    if z <= Z_APEX_TAPER_MM:
        return True
    t = (z - Z_APEX_TAPER_MM) / (Z_APEX_MM - Z_APEX_TAPER_MM)
    if t >= 1.0:
        return False
    s = np.sqrt(1.0 - t * t) * (1.0 - 0.25 * t)  # a rounded cone rather than a half ellipsoid
    X, Y = pl.x, pl.y
    r_ok = ((X + 58.0) / (86.0 * s)) ** 2 + ((Y - 12.0) / (100.0 * s)) ** 2 <= 1.0
    l_ok = ((X - 60.0) / (84.0 * s)) ** 2 + ((Y - 14.0) / (100.0 * s)) ** 2 <= 1.0
    return np.where(pl.right, r_ok, l_ok)


def _mediastinum(z: float, pl: _Planes) -> np.ndarray:
    """Region between the lungs at height z (fat, heart, great vessels, airways)."""
    X, Y = pl.x, pl.y
    half = 25.0 if z < 85.0 else 25.0 + (z - 85.0) * 0.45
    med = ((X - 3.0) / half) ** 4 + ((Y - 9.0) / 40.0) ** 4 <= 1.0  # rounded central column
    # anterior junction: a thin strip where the lungs nearly touch (0.5-3.5 mm), wider in front
    # of the heart and at the thoracic inlet
    if z > 85.0:
        width = 30.0
    elif z >= 20.0:
        width = 0.5 + 3.0 * (0.5 + 0.5 * np.sin(2.0 * np.pi * z / 37.0))
    else:
        width = min(3.5 + (20.0 - z) * 0.9, 36.0)
    med |= (Y <= -30.0) & (np.abs(X - _split_x_mm(Y)) < width / 2.0)
    hz = (z - HEART_C_MM[2]) / (HEART_R_MM[2] + 3.0)  # heart ellipsoid (+3 mm pericardial fat)
    if abs(hz) < 1.0:
        k = np.sqrt(1.0 - hz * hz)
        med |= (((X - HEART_C_MM[0]) / ((HEART_R_MM[0] + 3.0) * k)) ** 2
                + ((Y - HEART_C_MM[1]) / ((HEART_R_MM[1] + 3.0) * k)) ** 2 <= 1.0)
    if z < Z_ARCH_MM:
        med |= pl.disc(26.0, 40.0, 14.0)
    return med


def _slice_classes(z: float, pl: _Planes) -> np.ndarray:
    """Tissue classes of the axial plane at anatomical height z (mm)."""
    X, Y = pl.x, pl.y
    bm = pl.body_at(z)
    cls = np.zeros(pl.shape, np.uint8)
    cls[pl.table_shell] = TABLE_SHELL
    cls[pl.table_core] = TABLE_CORE
    cls[bm.body] = FAT
    cls[bm.depth >= FAT_DEPTH_MM] = MUSCLE
    # scapulae: posterolateral plates in the muscle layer
    if -10.0 < z < 105.0:
        cls[(bm.depth >= 11.0) & (bm.depth < 15.0) & (pl.psi > 0.55) & (pl.psi < 1.45)
            & (np.abs(X) > 70.0)] = BONE_CORTEX
    _draw_ribs(cls, z, pl, bm)
    if -70.0 < z < 95.0:  # sternum
        st = (np.abs(X) < 16.0) & (Y < BODY_YC_MM) & (bm.depth >= 14.0) & (bm.depth < CAVITY_DEPTH_MM)
        cls[st] = BONE_MARROW
        cls[st & ((np.abs(X) > 13.5) | (bm.depth < 16.0) | (bm.depth > CAVITY_DEPTH_MM - 2.5))] = BONE_CORTEX
    thorax = bm.cavity & (z > pl.dome)
    cls[thorax] = MED_FAT
    cls[bm.cavity & (z <= pl.dome) & (z > pl.dome - DIAPHRAGM_MM)] = MUSCLE
    abdomen = bm.cavity & (z <= pl.dome - DIAPHRAGM_MM)
    cls[abdomen] = SOFT
    cls[abdomen & (X < 25.0)] = LIVER
    cls[abdomen & (X > 55.0) & (Y > 10.0)] = SPLEEN
    gz = (z - (DOME_LEFT_MM - 24.0)) / 14.0  # gas in the stomach fundus, just under the left dome
    if abs(gz) < 1.0:
        k = np.sqrt(1.0 - gz * gz)
        cls[abdomen & (((X - 52.0) / (30.0 * k)) ** 2 + ((Y + 15.0) / (24.0 * k)) ** 2 <= 1.0)] = GUT_GAS
    # lungs
    pleural = thorax & ~_mediastinum(z, pl)
    apex = np.broadcast_to(_apex_ok(z, pl), pleural.shape)
    cls[pleural & ~apex] = MUSCLE  # above/around the apices: soft tissue of the thoracic inlet
    cls[pleural & apex] = LUNG
    # heart and great vessels (drawn in the thorax only; abdominal aorta below)
    hz = (z - HEART_C_MM[2]) / HEART_R_MM[2]
    if abs(hz) < 1.0:
        k = np.sqrt(1.0 - hz * hz)
        cls[thorax & (((X - HEART_C_MM[0]) / (HEART_R_MM[0] * k)) ** 2
                      + ((Y - HEART_C_MM[1]) / (HEART_R_MM[1] * k)) ** 2 <= 1.0)] = BLOOD
    if 5.0 < z < Z_ARCH_MM:
        cls[pl.disc(8.0, -15.0, 15.0) & thorax] = BLOOD  # ascending aorta
    if 0.0 < z < 90.0:
        cls[pl.disc(-18.0, -10.0, 9.0) & thorax] = BLOOD  # superior vena cava
    if z < Z_ARCH_MM:
        cls[pl.disc(26.0, 40.0, 12.0) & (bm.depth >= CAVITY_DEPTH_MM)] = BLOOD  # descending aorta
    if z > -60.0:  # oesophagus with a little air
        cls[pl.disc(2.0, 33.0, 7.0) & thorax] = SOFT
        if -20.0 < z < 60.0:
            cls[pl.disc(2.0, 33.0, 2.0) & thorax] = GUT_GAS
    if z > Z_CARINA_MM:  # trachea
        tx, ty = TRACHEA_XY_MM
        cls[pl.disc(tx, ty, TRACHEA_R_MM + AIRWAY_WALL_MM) & (bm.depth >= CAVITY_DEPTH_MM)] = AIRWAY_WALL
        cls[pl.disc(tx, ty, TRACHEA_R_MM) & (bm.depth >= CAVITY_DEPTH_MM)] = AIRWAY_LUMEN
    _draw_spine(cls, z, pl, bm)
    return cls


def _draw_ribs(cls: np.ndarray, z: float, pl: _Planes, bm: _BodyMaps) -> None:
    """Ribs: oblique elliptic bars in the ring under the muscle layer, lower in front."""
    if not (-135.0 < z < 125.0):
        return
    phase = np.mod(z + bm.ring_shift_mm, RIB_PITCH_MM)
    u = (phase - RIB_HEIGHT_MM / 2.0) / (RIB_HEIGHT_MM / 2.0)
    r2 = u * u + bm.ring_v * bm.ring_v
    rib = r2 <= 1.0
    flat = cls.reshape(-1)
    bone = rib & ~bm.ring_cartilage
    flat[bm.ring_idx[bone]] = BONE_MARROW
    flat[bm.ring_idx[bone & (r2 > 0.45)]] = BONE_CORTEX
    flat[bm.ring_idx[rib & bm.ring_cartilage & ~bm.ring_at_sternum]] = CARTILAGE


def _draw_spine(cls: np.ndarray, z: float, pl: _Planes, bm: _BodyMaps) -> None:
    """Thoracic vertebra: body (or disc), canal, arch and spinous process, transverse processes."""
    phase = np.mod(z + 3.0, 28.0)
    if phase < 6.0:
        cls[pl.disc(0.0, 57.0, 17.0)] = DISC
    else:
        cls[pl.disc(0.0, 57.0, 17.0)] = BONE_CORTEX
        cls[pl.disc(0.0, 57.0, 15.0)] = BONE_MARROW
    cls[pl.cached("arch", _arch_mask)] = BONE_CORTEX
    if 8.0 < phase < 20.0:
        cls[pl.cached("transverse", _transverse_mask)] = BONE_CORTEX
    cls[pl.disc(0.0, 84.0, 8.0)] = CSF


def _arch_mask(pl: _Planes) -> np.ndarray:
    X, Y = pl.x, pl.y
    arch = (pl.disc(0.0, 84.0, 13.0) & (Y > 78.0)) | ((np.abs(X) > 6.0) & (np.abs(X) < 12.0)
                                                     & (Y > 70.0) & (Y < 84.0))
    return arch | ((np.abs(X) < 4.0) & (Y >= 84.0) & (Y < 106.0))


def _transverse_mask(pl: _Planes) -> np.ndarray:
    X, Y = pl.x, pl.y
    return (np.abs(X) > 10.0) & (np.abs(X) < 38.0) & (Y > 79.0) & (Y < 88.0)


# ----------------------------------------------------------------------------------------------
# Tubes: great vessels, airways, vessel trees
# ----------------------------------------------------------------------------------------------
@dataclass
class _Segment:
    p0: np.ndarray
    p1: np.ndarray
    radius_mm: float
    generation: int


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _perpendicular(d: np.ndarray, angle: float) -> np.ndarray:
    """A unit vector perpendicular to d, rotated by angle around it."""
    a = np.array([1.0, 0.0, 0.0]) if abs(d[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = _unit(np.cross(d, a))
    e2 = np.cross(d, e1)
    return np.cos(angle) * e1 + np.sin(angle) * e2


def _tree(rng: np.random.Generator, start: Sequence[float], directions: Sequence[Sequence[float]],
          radius_mm: float, length_mm: float, generations: int, *, radius_ratio: float = 0.74,
          length_ratio: float = 0.82, spread_deg: tuple[float, float] = (25.0, 50.0)) -> list[_Segment]:
    """A bifurcating tree of segments from ``start`` along each root direction."""
    start = np.asarray(start, float)
    out: list[_Segment] = []
    stack = [(start, _unit(np.asarray(d, float)), radius_mm, length_mm, 0) for d in directions]
    while stack:
        p0, d, r, length, gen = stack.pop()
        p1 = p0 + d * length * rng.uniform(0.8, 1.2)
        out.append(_Segment(p0, p1, r, gen))
        if gen + 1 >= generations:
            continue
        axis = _perpendicular(d, rng.uniform(0, 2 * np.pi))
        outward = _unit(p1 - start)
        for sign in (1.0, -1.0):
            theta = np.radians(rng.uniform(*spread_deg))
            child = _unit(np.cos(theta) * d + sign * np.sin(theta) * axis + 0.25 * outward)
            stack.append((p1, child, r * radius_ratio * rng.uniform(0.92, 1.05),
                          length * length_ratio, gen + 1))
    return out


def _radial_twigs(rng: np.random.Generator, n_per_lung: int) -> list[_Segment]:
    """Short vessels scattered through each lung, pointing at its hilum, thinner far from it."""
    out: list[_Segment] = []
    for side, x_range in ((1, (-140.0, -4.0)), (2, (4.0, 140.0))):
        hilum = (np.asarray(HILUM_ARTERY_MM[side]) + np.asarray(HILUM_VEIN_MM[side])) / 2.0
        pts = np.column_stack([rng.uniform(*x_range, n_per_lung), rng.uniform(-95.0, 85.0, n_per_lung),
                               rng.uniform(-128.0, 118.0, n_per_lung)])
        lengths = rng.uniform(6.0, 18.0, n_per_lung)
        jitter = rng.normal(0.0, 0.25, (n_per_lung, 3))
        for p, length, jit in zip(pts, lengths, jitter):
            dist = float(np.linalg.norm(p - hilum))
            d = _unit(_unit(hilum - p) + jit)
            radius = float(np.clip(2.6 - dist / 45.0, 0.6, 2.4))
            out.append(_Segment(p, p + d * min(length, 0.8 * dist), radius, 9))
    return out


@functools.lru_cache(maxsize=2)
def _segments_for_seed(seed: int) -> dict[str, list[_Segment]]:
    """The tubes of the phantom of ``seed`` (cached: the same at every time point and grid)."""
    return _anatomy_segments(np.random.default_rng([seed, 1]))


def _anatomy_segments(rng: np.random.Generator) -> dict[str, list[_Segment]]:
    """All tubes of the phantom, in anatomical mm, grouped by how they are drawn."""
    seg = lambda a, b, r: _Segment(np.asarray(a, float), np.asarray(b, float), r, 0)  # noqa: E731
    # aortic arch: from the ascending to the descending aorta, over the left main bronchus
    t = np.linspace(0.0, np.pi, 13)
    a0, a1 = np.array([8.0, -15.0, Z_ARCH_MM]), np.array([26.0, 40.0, Z_ARCH_MM])
    arch_pts = [a0 + (a1 - a0) * (1 - np.cos(ti)) / 2 + np.array([-6.0 * np.sin(ti), 0.0, 24.0 * np.sin(ti)])
                for ti in t]
    great = [seg(p, q, 13.0) for p, q in zip(arch_pts[:-1], arch_pts[1:])]
    bifurcation = (8.0, -8.0, 34.0)
    great += [seg((14.0, -38.0, 2.0), bifurcation, 13.0)]  # pulmonary trunk
    great += [seg(bifurcation, HILUM_ARTERY_MM[s], 9.0) for s in (1, 2)]
    great += [seg((18.0, 24.0, -12.0), HILUM_VEIN_MM[s], 7.0) for s in (1, 2)]  # veins to the atrium
    bronchi = [seg(CARINA_MM, BRONCHUS_END_MM[s], BRONCHUS_R_MM[s]) for s in (1, 2)]
    # vessel trees: arteries from the upper hilum, veins from the lower hilum
    art_dirs = {1: [(-0.3, 0.1, 1), (-0.5, -1, 0.3), (-1, 0.1, 0), (-0.4, 1, -0.1), (-0.5, 0.4, -1),
                    (-0.2, 0.9, -1), (-0.6, -0.8, -0.6)],
                2: [(0.3, 0.1, 1), (0.4, -1, 0.4), (1, 0.1, 0.1), (0.4, 1, -0.1), (0.5, 0.4, -1),
                    (0.2, 0.9, -1)]}
    vein_dirs = {1: [(-1, -0.3, -0.4), (-0.5, 0.6, -1), (-0.6, -0.7, -0.2)],
                 2: [(1, -0.2, -0.3), (0.4, 0.7, -1), (0.6, -0.4, 0.3)]}
    vessels: list[_Segment] = []
    for s in (1, 2):
        vessels += _tree(rng, HILUM_ARTERY_MM[s], art_dirs[s], 4.6, 30.0, 8, radius_ratio=0.76)
        vessels += _tree(rng, HILUM_VEIN_MM[s], vein_dirs[s], 4.2, 28.0, 8, radius_ratio=0.76)
    vessels += _radial_twigs(rng, 1300)
    aw_dirs = {1: [(-0.3, 0.2, 1), (-0.5, -0.8, -0.4), (-0.3, 0.6, -1)],
               2: [(0.3, -0.3, 1), (0.3, 0.6, -1)]}
    airways: list[_Segment] = []
    for s in (1, 2):
        airways += _tree(rng, BRONCHUS_END_MM[s], aw_dirs[s], 4.2, 24.0, 4, radius_ratio=0.76)
    return {"great": great, "bronchi": bronchi, "vessels": vessels, "airways": airways}


class _Grid:
    """Index/physical conversions of the phantom grid (anatomical mm)."""

    def __init__(self, shape_zyx: tuple[int, int, int], spacing_mm: tuple[float, float, float]):
        self.shape = shape_zyx
        self.spacing = np.asarray(spacing_mm, float)
        nz, ny, nx = shape_zyx
        sz, sy, sx = spacing_mm
        self.z = (np.arange(nz) - (nz - 1) / 2.0) * sz
        self.y = (np.arange(ny) - (ny - 1) / 2.0) * sy
        self.x = (np.arange(nx) - (nx - 1) / 2.0) * sx

    @property
    def origin_lps(self) -> tuple[float, float, float]:
        return (round(float(self.x[0]), 4), round(float(self.y[0]), 4),
                round(float(self.z[0] + Z_ANATOMY_IN_PATIENT_MM), 4))


def _render_segments(cls: np.ndarray, grid: _Grid, segments: Sequence[_Segment], new_class: int,
                     writable: Sequence[int], *, extra_mm: float = 0.0, min_radius_mm: float = 0.0,
                     slab: bool = False) -> None:
    """Set ``new_class`` where a voxel centre lies within radius(+extra) of a segment.

    With ``slab``, thick slices count a tube that crosses the middle half of the slice (as a thick
    reconstruction still shows it), by testing a few z offsets inside each slice.
    """
    lut = np.zeros(N_CLASSES, bool)
    lut[list(writable)] = True
    axes = (grid.z, grid.y, grid.x)
    reach = float(grid.spacing[0]) / 4.0 if slab else 0.0  # the middle half of each slice
    n_sub = int(np.ceil(2.0 * reach / float(max(grid.spacing[1:])))) + 1 if reach > 0.25 else 1
    offsets = np.linspace(-reach, reach, n_sub) if n_sub > 1 else np.zeros(1)
    for s in segments:
        r = max(s.radius_mm + extra_mm, min_radius_mm)
        lo = np.minimum(s.p0, s.p1)[::-1] - r  # (z, y, x)
        hi = np.maximum(s.p0, s.p1)[::-1] + r
        lo[0] -= reach
        hi[0] += reach
        sl = []
        for ax, a_lo, a_hi in zip(axes, lo, hi):
            i0 = int(np.searchsorted(ax, a_lo, "left"))
            i1 = int(np.searchsorted(ax, a_hi, "right"))
            if i1 <= i0:
                break
            sl.append(slice(i0, i1))
        if len(sl) < 3:
            continue
        yy = grid.y[sl[1]][None, :, None] - s.p0[1]
        xx = grid.x[sl[2]][None, None, :] - s.p0[0]
        d = s.p1 - s.p0
        dd = max(float(d @ d), 1e-9)
        inside = None
        for off in offsets:
            zz = grid.z[sl[0]][:, None, None] + off - s.p0[2]
            t = np.clip((xx * d[0] + yy * d[1] + zz * d[2]) / dd, 0.0, 1.0)
            hit = (xx - t * d[0]) ** 2 + (yy - t * d[1]) ** 2 + (zz - t * d[2]) ** 2 <= r * r
            inside = hit if inside is None else inside | hit
        sub = cls[tuple(sl)]
        sub[inside & lut[sub]] = new_class


# ----------------------------------------------------------------------------------------------
# Lesion propensity field
# ----------------------------------------------------------------------------------------------
def _lesion_fractions(severity: float, timepoint: str) -> tuple[float, float]:
    """(lesion, consolidation) fractions of candidate lung at this severity and time point."""
    s = max(0.0, float(severity))
    lesion = min(0.15 * s ** 1.2, 0.75)
    cons = min(0.035 * s ** 2, 0.6 * lesion)
    if timepoint == "day14":
        cons14 = 0.4 * cons
        return cons14 + 0.5 * (lesion - cons), cons14
    return lesion, cons


@functools.lru_cache(maxsize=2)
def _coarse_fields(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lesion propensity and a lesion texture on a fixed 3 mm grid (z, y, x) around the lungs.

    The propensity is higher near the chest wall and diaphragm (subpleural), posteriorly
    (dependent) and inferiorly, plus a smooth random field. Both fields are the same for every grid
    and time point of a seed. Returns (propensity, texture, z_axis_mm, xy_axis_mm).
    """
    z_axis = np.arange(-COARSE_HALF_Z_MM, COARSE_HALF_Z_MM + 0.5, COARSE_STEP_MM)
    xy_axis = np.arange(-COARSE_HALF_XY_MM, COARSE_HALF_XY_MM + 0.5, COARSE_STEP_MM)
    shape = (z_axis.size, xy_axis.size, xy_axis.size)
    rng = np.random.default_rng([seed, 2])
    g = np.zeros(shape, np.float32)
    for sigma_mm, weight in ((7.0, 1.0), (3.5, 0.5)):
        part = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32),
                                       sigma_mm / COARSE_STEP_MM)
        g += weight * (part - part.mean()) / part.std()
    g = (g - g.mean()) / g.std()
    texture = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 0.8)
    texture = (texture - texture.mean()) / texture.std()
    pl = _make_planes(xy_axis, xy_axis)
    inner = np.zeros(shape, bool)
    for k, z in enumerate(z_axis):
        inner[k] = pl.body_at(float(z)).cavity & (z > pl.dome) & _apex_ok(float(z), pl)
    wall_mm = ndimage.distance_transform_edt(inner, sampling=COARSE_STEP_MM)
    y = xy_axis[None, :, None]
    z = z_axis[:, None, None]
    post = np.clip((y + 85.0) / 165.0, 0.0, 1.0)
    inf = np.clip((90.0 - z) / 200.0, 0.0, 1.0)
    prop = g + 1.7 * np.exp(-wall_mm / 10.0) + 1.5 * post + 0.6 * inf
    return prop.astype(np.float32), texture.astype(np.float32), z_axis, xy_axis


class _PlaneInterpolator:
    """Trilinear interpolation of a coarse (z, y, x) field on fine axial planes (elementwise only,
    so results do not depend on the BLAS)."""

    def __init__(self, z_axis: np.ndarray, xy_axis: np.ndarray, y: np.ndarray, x: np.ndarray):
        self.z_axis = z_axis
        self.iy, self.wy = _interp_weights(xy_axis, y)
        self.ix, self.wx = _interp_weights(xy_axis, x)

    def __call__(self, field: np.ndarray, z: float) -> np.ndarray:
        iz, wz = _interp_weights(self.z_axis, np.array([z]))
        plane = (1 - wz[0]) * field[iz[0]] + wz[0] * field[iz[0] + 1]
        rows = (1 - self.wy)[:, None] * plane[self.iy] + self.wy[:, None] * plane[self.iy + 1]
        return (1 - self.wx)[None, :] * rows[:, self.ix] + self.wx[None, :] * rows[:, self.ix + 1]


def _interp_weights(coarse: np.ndarray, fine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = (fine - coarse[0]) / (coarse[1] - coarse[0])
    i0 = np.clip(np.floor(idx).astype(int), 0, coarse.size - 2)
    w = np.clip(idx - i0, 0.0, 1.0).astype(np.float32)
    return i0, w


def _filtered_sd(sigma_px: Sequence[float]) -> float:
    """Standard deviation of unit white noise after ndimage.gaussian_filter with sigma_px."""
    sd = 1.0
    for s in sigma_px:
        delta = np.zeros(64)
        delta[32] = 1.0
        k = ndimage.gaussian_filter1d(delta, s)
        sd *= float(np.sqrt(np.sum(k * k)))
    return sd


def _quantile_thresholds(values: np.ndarray, fractions: Sequence[float]) -> list[float]:
    """For each fraction f, the value above which a fraction f of ``values`` lies (inf for f <= 0)."""
    out = []
    for f in fractions:
        f = min(float(f), 0.95)
        out.append(float(np.quantile(values, 1.0 - f)) if f > 0 and values.size else np.inf)
    return out


# ----------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------
def make_phantom(shape_zyx: Sequence[int] = SAMPLE_SHAPE_ZYX,
                 spacing_mm: Sequence[float] = SAMPLE_SPACING_MM, *, timepoint: str = "baseline",
                 severity: float = 1.0, seed: int = 0) -> Phantom:
    """Build a chest CT phantom of COVID-19 pneumonia.

    Args:
        shape_zyx: voxels (z, y, x).
        spacing_mm: voxel size (z, y, x) in mm; the grid is centred on the chest (mid-lung height,
            body centre), and the anatomy is the same in mm for every grid.
        timepoint: "baseline" or "day14" (same anatomy, lesions shrunk inside the baseline ones).
        severity: 0 = no lesions, 1 = moderate (~15 % of lung), 3 = heavy dependent consolidation.
        seed: anatomy, lesion and noise seed.
    """
    if timepoint not in TIMEPOINTS:
        raise ValueError(f"timepoint must be one of {TIMEPOINTS}, not {timepoint!r}")
    shape = tuple(int(n) for n in shape_zyx)
    spacing = tuple(float(s) for s in spacing_mm)
    if len(shape) != 3 or min(shape) < 2 or len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError("shape_zyx needs 3 sizes >= 2 and spacing_mm 3 positive values")
    if severity < 0:
        raise ValueError("severity must be >= 0")
    grid = _Grid(shape, spacing)  # type: ignore[arg-type]
    pl = _make_planes(grid.x, grid.y)
    cls = np.empty(shape, np.uint8)
    for k in range(shape[0]):
        cls[k] = _slice_classes(float(grid.z[k]), pl)
    _draw_tubes(cls, grid, seed)

    prop_c, tex_c, z_axis, xy_axis = _coarse_fields(seed)
    interp = _PlaneInterpolator(z_axis, xy_axis, grid.y, grid.x)
    side = np.where(pl.right, 1, 2).astype(np.uint8)
    lung_slices = [k for k in range(shape[0]) if np.any(cls[k] == LUNG)]
    # thresholds per lung from the propensity of its lung parenchyma (right lung a bit worse)
    candidates: dict[int, list[np.ndarray]] = {1: [], 2: []}
    for k in lung_slices:
        prop = interp(prop_c, float(grid.z[k]))
        parenchyma = cls[k] == LUNG
        for s in (1, 2):
            candidates[s].append(prop[parenchyma & (side == s)])
    f_les, f_cons = _lesion_fractions(severity, timepoint)
    f_grade = _lesion_fractions(severity, "baseline")[1]
    t_ggo, t_cons, t_grade = (np.zeros(side.shape, np.float32) for _ in range(3))
    for s, scale in ((1, 1.1), (2, 0.9)):
        values = np.concatenate(candidates[s]) if candidates[s] else np.zeros(0, np.float32)
        tg, tc, tgr = _quantile_thresholds(values, (f_les * scale, f_cons * scale, f_grade * scale))
        t_ggo[side == s], t_cons[side == s] = tg, tc
        t_grade[side == s] = tgr if np.isfinite(tgr) else tg + 1.0
    del candidates

    lung_lut = np.zeros(N_CLASSES, bool)
    lung_lut[list(LUNG_CLASSES)] = True
    cons_lut = np.zeros(N_CLASSES, bool)
    cons_lut[[LUNG, LUNG_VESSEL, LUNG_AIRWAY_WALL]] = True
    lesion_lut = np.zeros(N_CLASSES, np.uint8)
    lesion_lut[GGO], lesion_lut[CONSOLIDATION] = 1, 2
    shader = _Shader(pl, grid, seed, timepoint)
    hu = np.empty(shape, np.int16)
    lung_labels = np.zeros(shape, np.uint8)
    lesion_labels = np.zeros(shape, np.uint8)
    lung_set = set(lung_slices)
    for k in range(shape[0]):
        c = cls[k]
        prop = tex = None
        if k in lung_set:
            z = float(grid.z[k])
            prop = interp(prop_c, z)
            tex = interp(tex_c, z)
            cons = (prop > t_cons) & cons_lut[c]
            ggo = (prop > t_ggo) & (c == LUNG) & ~cons
            c[cons] = CONSOLIDATION
            c[ggo] = GGO
            lung_labels[k] = np.where(lung_lut[c], side, 0)
            lesion_labels[k] = lesion_lut[c]
        hu[k] = shader(c, prop, tex, t_ggo, t_grade)
    params = {"shape_zyx": list(shape), "spacing_mm": list(spacing), "timepoint": timepoint,
              "severity": float(severity), "seed": int(seed)}
    return Phantom(hu=hu, lung_labels=lung_labels, lesion_labels=lesion_labels,
                   spacing_mm=spacing, origin_mm=grid.origin_lps, params=params)  # type: ignore[arg-type]


def _draw_tubes(cls: np.ndarray, grid: _Grid, seed: int) -> None:
    """Great vessels, main bronchi, hilar and lung vessels, small airways (anatomy stream of seed)."""
    segs = _segments_for_seed(seed)
    spacing = grid.spacing
    min_r = 0.55 * float(max(spacing[1], spacing[2]))  # thin vessels stay >= 1 voxel wide
    thorax = (MED_FAT, LUNG, SOFT, BLOOD)
    _render_segments(cls, grid, segs["great"], BLOOD, thorax)
    _render_segments(cls, grid, segs["bronchi"], AIRWAY_WALL, thorax + (AIRWAY_WALL,),
                     extra_mm=AIRWAY_WALL_MM)
    _render_segments(cls, grid, segs["bronchi"], AIRWAY_LUMEN, thorax + (AIRWAY_WALL, AIRWAY_LUMEN))
    big = [s for s in segs["vessels"] if s.radius_mm >= HILAR_RADIUS_MM]
    small = [s for s in segs["vessels"] if s.radius_mm < HILAR_RADIUS_MM]
    _render_segments(cls, grid, big, HILAR_VESSEL, (MED_FAT, LUNG))
    _render_segments(cls, grid, small, LUNG_VESSEL, (LUNG,), min_radius_mm=min_r, slab=True)
    _render_segments(cls, grid, segs["airways"], LUNG_AIRWAY_WALL, (LUNG, LUNG_VESSEL),
                     extra_mm=0.6, min_radius_mm=min_r + 0.6, slab=True)
    _render_segments(cls, grid, segs["airways"], LUNG_AIRWAY_LUMEN,
                     (LUNG, LUNG_VESSEL, LUNG_AIRWAY_WALL), min_radius_mm=min_r * 0.5)


class _Shader:
    """HU of one axial plane from its classes: mean per class, lung gradient, GGO grading and
    texture, then blur + correlated noise (one Gaussian filter), then per-class clipping."""

    def __init__(self, pl: _Planes, grid: _Grid, seed: int, timepoint: str):
        self.rng = np.random.default_rng([seed, 3, TIMEPOINTS.index(timepoint)])
        sy, sx = float(grid.spacing[1]), float(grid.spacing[2])
        self.sigma_px = (BLUR_MM / sy, BLUR_MM / sx)
        self.filter = max(self.sigma_px) >= 0.1
        self.noise_gain = NOISE_SD_HU / (_filtered_sd(self.sigma_px) if self.filter else 1.0)
        grad = -875.0 + 55.0 * np.clip((pl.y + 85.0) / 165.0, 0.0, 1.0)  # dependent lung denser
        self.lung_hu = np.ascontiguousarray(np.broadcast_to(grad, pl.shape), dtype=np.float32)
        self.clip_lo = np.full(N_CLASSES, HU_MIN, np.float32)
        self.clip_hi = np.full(N_CLASSES, HU_MAX, np.float32)
        for c, (lo, hi) in _CLIP_HU.items():
            self.clip_lo[c], self.clip_hi[c] = lo, hi

    def __call__(self, c: np.ndarray, prop: np.ndarray | None, tex: np.ndarray | None,
                 t_ggo: np.ndarray, t_grade: np.ndarray) -> np.ndarray:
        img = _MEAN_HU[c]
        if tex is not None:
            lung = c == LUNG
            img[lung] = self.lung_hu[lung] + 6.0 * tex[lung]
            g = c == GGO
            if g.any():
                span = np.maximum(t_grade[g] - t_ggo[g], 1e-6)
                grade = np.clip((prop[g] - t_ggo[g]) / span, 0.0, 1.0)
                img[g] = -620.0 + 240.0 * grade + 30.0 * tex[g]
            cmask = c == CONSOLIDATION
            img[cmask] = -25.0 + 25.0 * tex[cmask]
        img += self.noise_gain * self.rng.standard_normal(c.shape, dtype=np.float32)
        if self.filter:
            img = ndimage.gaussian_filter(img, self.sigma_px)
        np.clip(img, self.clip_lo[c], self.clip_hi[c], out=img)
        return np.rint(img).astype(np.int16)


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
DOSE_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.67"
MANUFACTURER = "ctquant phantom"


def uid_from(*parts: Any) -> str:
    """A DICOM UID derived deterministically from ``parts``."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _ds_str(value: float) -> str:
    """A decimal string (VR DS, at most 16 characters) for value."""
    text = f"{round(float(value), 6):.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _base_dataset(sop_class: str, sop_instance: str, transfer_syntax: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CTQUANT_PHANTOM"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    return ds


def _set_patient_study(ds, *, study_uid: str, study_date: str, study_time: str, patient_id: str,
                       patient_name: str, series_uid: str, series_number: int,
                       accession_number: str = "") -> None:
    """Patient, study and series attributes shared by every object the phantom writers make."""
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = int(series_number)
    ds.InstanceNumber = 1
    ds.StudyDate = study_date
    ds.StudyTime = study_time
    ds.AccessionNumber = accession_number
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyID = "1"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "synthetic"
    ds.InstitutionName = "ctquant"


def _file_names(n: int, seed: int, salt: str, shuffle: bool, nested: bool, suffix: str) -> list[str]:
    """Names for n files: random hex (order not revealed) or IM000001..., optionally in subfolders."""
    if not shuffle:
        return [f"IM{k + 1:06d}{suffix}" for k in range(n)]
    salt_int = int(hashlib.sha256(salt.encode()).hexdigest()[:15], 16)
    rng = np.random.default_rng([seed, 97, salt_int])
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        name = rng.bytes(8).hex()
        if name not in seen:
            seen.add(name)
            names.append(f"{name[:2]}/{name}{suffix}" if nested else f"{name}{suffix}")
    return names


def _check_encoder(transfer_syntax: str) -> None:
    """Raise ValueError unless pydicom has a usable encoder for this (compressed) syntax."""
    from pydicom.uid import UID

    ts = UID(transfer_syntax)
    if not ts.is_compressed:
        return
    from pydicom.pixels import get_encoder

    try:
        enc = get_encoder(ts)
    except Exception as exc:  # pydicom has no encoder for this syntax at all
        raise ValueError(f"pydicom cannot encode {ts.name}: {exc}") from None
    if not enc.is_available:
        raise ValueError(f"no installed encoder plugin for {ts.name}")


def can_encode(transfer_syntax: str) -> bool:
    """Whether :func:`write_dicom_series` can write this transfer syntax here."""
    try:
        _check_encoder(transfer_syntax)
    except ValueError:
        return False
    return True


def write_dicom_series(phantom: Phantom, out_dir: str | Path, *, study_uid: str, series_uid: str,
                       frame_of_reference_uid: str, study_date: str, series_description: str,
                       series_number: int, patient_id: str, patient_name: str,
                       study_time: str = "093000", accession_number: str = "",
                       rescale_slope: float = 1.0, rescale_intercept: float = -1024.0,
                       signed: bool | None = None, shuffle_names: bool = True, nested: bool = False,
                       suffix: str = "", seed: int = 0,
                       transfer_syntax: str = "1.2.840.10008.1.2.1",
                       convolution_kernel: str = "B30f", kvp: float = 120.0,
                       window_center_width: tuple[float, float] = (-600.0, 1500.0),
                       image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
                       slice_thickness_mm: float | None = None) -> list[Path]:
    """Write the phantom as a CT Image Storage series, one file per axial slice.

    Stored values are ``(hu - intercept) / slope`` rounded (exact for slope 1 and an integer
    intercept), uint16 unless they go negative (then int16; ``signed`` forces either). Files are
    named by random hex when ``shuffle_names`` (in 2-character subfolders when ``nested``);
    compressed transfer syntaxes (RLE Lossless, JPEG-LS, JPEG 2000 lossless, where an encoder is
    installed: see :func:`can_encode`) use pydicom's encoders. UIDs, names and times are
    deterministic. Returns the paths in z order (index 0, the most inferior slice, first).
    """
    from pydicom.uid import UID

    _check_encoder(transfer_syntax)
    ts = UID(transfer_syntax)
    out_dir = Path(out_dir)
    nz, ny, nx = phantom.hu.shape
    sz, sy, sx = phantom.spacing_mm
    ox, oy, oz = phantom.origin_mm
    lo = (float(phantom.hu.min()) - rescale_intercept) / rescale_slope
    hi = (float(phantom.hu.max()) - rescale_intercept) / rescale_slope
    lo, hi = min(lo, hi), max(lo, hi)
    if signed is None:
        signed = round(lo) < 0
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)
    if round(lo) < info.min or round(hi) > info.max:
        raise ValueError(f"stored values {lo:.0f}..{hi:.0f} do not fit {np.dtype(dtype).name}")
    exact = rescale_slope == 1.0 and float(rescale_intercept).is_integer()
    names = _file_names(nz, seed, series_uid, shuffle_names, nested, suffix)

    ds = _base_dataset(CT_IMAGE_STORAGE, uid_from(series_uid, "slice", 0), str(ts))
    ds.ImageType = list(image_type)
    ds.InstanceCreationDate = study_date
    ds.InstanceCreationTime = study_time
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study_time
    ds.Modality = "CT"
    ds.SeriesDescription = series_description
    _set_patient_study(ds, study_uid=study_uid, study_date=study_date, study_time=study_time,
                       patient_id=patient_id, patient_name=patient_name, series_uid=series_uid,
                       series_number=series_number, accession_number=accession_number)
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds_str(slice_thickness_mm if slice_thickness_mm else sz)
    ds.SpacingBetweenSlices = _ds_str(sz)
    ds.KVP = _ds_str(kvp)
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _ds_str(nx * sx)
    ds.XRayTubeCurrent = 200
    ds.ConvolutionKernel = convolution_kernel
    ds.PatientPosition = "HFS"
    ds.AcquisitionNumber = 1
    ds.ImagePositionPatient = [_ds_str(ox), _ds_str(oy), _ds_str(oz)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds_str(oz)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ny, nx
    ds.PixelSpacing = [_ds_str(sy), _ds_str(sx)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.WindowCenter = _ds_str(window_center_width[0])
    ds.WindowWidth = _ds_str(window_center_width[1])
    ds.RescaleIntercept = _ds_str(rescale_intercept)
    ds.RescaleSlope = _ds_str(rescale_slope)
    ds.RescaleType = "HU"
    paths: list[Path] = []
    for k in range(nz):  # one dataset, updated per slice (much faster than building 300)
        sop_uid = uid_from(series_uid, "slice", k)
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = nz - k  # numbered head first, as scanners do
        z_text = _ds_str(oz + k * sz)
        ds.ImagePositionPatient = [_ds_str(ox), _ds_str(oy), z_text]
        ds.SliceLocation = z_text
        if exact:
            stored = (phantom.hu[k].astype(np.int32) - int(rescale_intercept)).astype(dtype)
        else:
            stored = np.rint((phantom.hu[k] - rescale_intercept) / rescale_slope).astype(dtype)
        stored = np.ascontiguousarray(stored)
        if ts.is_compressed:
            ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
            if "PixelData" in ds:
                del ds.PixelData  # drop the previous slice's encapsulated element
            ds.PixelData = stored.tobytes()
            ds.compress(ts, arr=stored, generate_instance_uid=False)
        else:
            ds.PixelData = stored.tobytes()
        path = out_dir / names[k]
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def thick_slab_phantom(phantom: Phantom, n_slices: int = 5) -> Phantom:
    """A short, thick-slice version of the phantom: n slabs averaged over the central slices."""
    nz = phantom.hu.shape[0]
    per = max(1, nz // n_slices)
    start = (nz - per * n_slices) // 2
    block = phantom.hu[start:start + per * n_slices].astype(np.float32)
    hu = np.rint(block.reshape(n_slices, per, *block.shape[1:]).mean(axis=1)).astype(np.int16)
    centre = np.arange(n_slices) * per + start + per // 2
    sz = phantom.spacing_mm[0] * per
    oz = phantom.origin_mm[2] + phantom.spacing_mm[0] * (start + (per - 1) / 2.0)
    return replace(phantom, hu=hu, lung_labels=phantom.lung_labels[centre].copy(),
                   lesion_labels=phantom.lesion_labels[centre].copy(),
                   spacing_mm=(sz, phantom.spacing_mm[1], phantom.spacing_mm[2]),
                   origin_mm=(phantom.origin_mm[0], phantom.origin_mm[1], round(oz, 4)),
                   params={**phantom.params, "thick_slab_of": per})


def write_thick_series(phantom: Phantom, out_dir: str | Path, *, n_slices: int = 5,
                       **series_kwargs: Any) -> list[Path]:
    """Write a short thick-slice CT series (a decoy beside the main one) of the same phantom."""
    series_kwargs.setdefault("series_description", f"Thorax {n_slices} slabs")
    return write_dicom_series(thick_slab_phantom(phantom, n_slices), out_dir, **series_kwargs)


def write_localizer(phantom: Phantom, out_path: str | Path, *, study_uid: str, series_uid: str,
                    frame_of_reference_uid: str, study_date: str, patient_id: str, patient_name: str,
                    study_time: str = "092900", series_number: int = 1) -> Path:
    """Write a coronal scout (ImageType ORIGINAL\\PRIMARY\\LOCALIZER): an AP projection of the phantom."""
    nz, ny, nx = phantom.hu.shape
    sz, sy, sx = phantom.spacing_mm
    atten = np.clip(phantom.hu.astype(np.float32) + 1000.0, 0.0, None).sum(axis=1) * sy / 1000.0
    img = np.clip(atten / max(float(atten.max()), 1e-6) * 4000.0, 0, 4095).astype(np.uint16)[::-1]
    sop_uid = uid_from(series_uid, "localizer")
    ds = _base_dataset(CT_IMAGE_STORAGE, sop_uid, "1.2.840.10008.1.2.1")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.Modality = "CT"
    ds.SeriesDate = ds.ContentDate = study_date
    ds.SeriesTime = ds.ContentTime = study_time
    ds.SeriesDescription = "Topogram AP"
    _set_patient_study(ds, study_uid=study_uid, study_date=study_date, study_time=study_time,
                       patient_id=patient_id, patient_name=patient_name, series_uid=series_uid,
                       series_number=series_number)
    ds.KVP = "120"
    ds.SliceThickness = "0.6"
    ox, _, oz = phantom.origin_mm
    ds.ImagePositionPatient = [_ds_str(ox), "0", _ds_str(oz + (nz - 1) * sz)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape
    ds.PixelSpacing = [_ds_str(sz), _ds_str(sx)]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    ds.WindowCenter, ds.WindowWidth = "2000", "4000"
    ds.PixelData = np.ascontiguousarray(img).tobytes()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out_path, enforce_file_format=True)
    return out_path


def _code_item(value: str, scheme: str, meaning: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def write_dose_sr(out_path: str | Path, *, study_uid: str, series_uid: str, study_date: str,
                  patient_id: str, patient_name: str, study_time: str = "094500",
                  dlp_mgy_cm: float = 312.5, series_number: int = 999) -> Path:
    """Write a minimal X-Ray Radiation Dose SR (Modality SR) with the total DLP."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DSequence

    sop_uid = uid_from(series_uid, "dose-sr")
    ds = _base_dataset(DOSE_SR_STORAGE, sop_uid, "1.2.840.10008.1.2.1")
    ds.Modality = "SR"
    ds.SeriesDescription = "Dose Report"
    _set_patient_study(ds, study_uid=study_uid, study_date=study_date, study_time=study_time,
                       patient_id=patient_id, patient_name=patient_name, series_uid=series_uid,
                       series_number=series_number)
    ds.ContentDate, ds.ContentTime = study_date, study_time
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = DSequence([_code_item("113701", "DCM", "X-Ray Radiation Dose Report")])
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    num = Dataset()
    num.RelationshipType = "CONTAINS"
    num.ValueType = "NUM"
    num.ConceptNameCodeSequence = DSequence([_code_item("113813", "DCM", "CT Dose Length Product Total")])
    mv = Dataset()
    mv.NumericValue = _ds_str(dlp_mgy_cm)
    mv.MeasurementUnitsCodeSequence = DSequence([_code_item("mGy.cm", "UCUM", "mGy.cm")])
    num.MeasuredValueSequence = DSequence([mv])
    ds.ContentSequence = DSequence([num])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out_path, enforce_file_format=True)
    return out_path


def write_dose_screen(out_path: str | Path, *, study_uid: str, series_uid: str, study_date: str,
                      patient_id: str, patient_name: str, study_time: str = "094500",
                      series_number: int = 998) -> Path:
    """Write a Secondary Capture "dose screen" (Modality OT, 8-bit, DERIVED\\SECONDARY)."""
    img = np.zeros((256, 256), np.uint8)
    for row in range(20, 240, 24):  # text-like bars
        widths = (np.arange(30, 230, 9) + row) % 7
        for j, col in enumerate(range(16, 230, 9)):
            if widths[j % widths.size] > 1:
                img[row:row + 10, col:col + 6] = 220
    sop_uid = uid_from(series_uid, "dose-screen")
    ds = _base_dataset(SECONDARY_CAPTURE_STORAGE, sop_uid, "1.2.840.10008.1.2.1")
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesDescription = "Dose Info"
    _set_patient_study(ds, study_uid=study_uid, study_date=study_date, study_time=study_time,
                       patient_id=patient_id, patient_name=patient_name, series_uid=series_uid,
                       series_number=series_number)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = img.tobytes()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out_path, enforce_file_format=True)
    return out_path


def write_truth(phantom: Phantom, out_dir: str | Path, prefix: str) -> dict[str, Any]:
    """Write ``<prefix>_lungs.nii.gz`` and ``<prefix>_lesions.nii.gz`` on the series' geometry.

    Returns the truth dict (:meth:`Phantom.truth`).
    """
    import SimpleITK as sitk

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, arr in (("lungs", phantom.lung_labels), ("lesions", phantom.lesion_labels)):
        image = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.uint8))
        image.SetSpacing(tuple(float(s) for s in phantom.spacing_mm[::-1]))
        image.SetOrigin(tuple(float(o) for o in phantom.origin_mm))
        image.SetDirection(tuple(float(d) for d in phantom.direction))
        sitk.WriteImage(image, str(out_dir / f"{prefix}_{name}.nii.gz"), useCompression=True)
    return phantom.truth()


def study_date_plus(date: str, days: int) -> str:
    """A DICOM date (YYYYMMDD) shifted by days."""
    return (_dt.datetime.strptime(date, "%Y%m%d") + _dt.timedelta(days=days)).strftime("%Y%m%d")
