"""Measures from lung and lesion label volumes: volumes (mL), % of lung, mean HU, bilateral flags.

The measures dict (``measures.json``'s ``lungs`` field) holds, for ``right``, ``left`` and ``both``:
``lung_volume_ml``, ``ggo_volume_ml``, ``ggo_pct``, ``consolidation_volume_ml``, ``consolidation_pct``,
``opacity_volume_ml``, ``opacity_pct`` (GGO + consolidation) and ``mean_lung_hu``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..segment.grid import bounding_box
from ..segment.lesions import CONSOLIDATION, GGO
from ..segment.lungs import LEFT, RIGHT

MEASURES = ("lung_volume_ml", "ggo_volume_ml", "ggo_pct", "consolidation_volume_ml", "consolidation_pct",
            "opacity_volume_ml", "opacity_pct", "mean_lung_hu")
FINDINGS = ("ggo", "consolidation", "opacity")
SIDES = ("right", "left", "both")


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole > 0 else 0.0


def lung_measures(hu: np.ndarray, lung_labels: np.ndarray, lesion_labels: np.ndarray,
                  spacing_mm: tuple[float, float, float]) -> dict[str, dict[str, float]]:
    """Per lung (right, left) and both: volumes in mL, % of that lung's volume, mean lung HU."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    counts = np.zeros((3, 3), dtype=np.int64)
    hu_sums = np.zeros(3, dtype=np.float64)
    box = bounding_box(lung_labels)
    if box is not None:
        # Inside the lungs' bounding box: counts per (lung, lesion) label pair, HU sums per lung.
        lungs, lesions, hu = lung_labels[box], lesion_labels[box], hu[box]
        pair = lungs * np.uint8(3) + np.minimum(lesions, 2)
        counts = np.bincount(pair.ravel(), minlength=9).reshape(3, 3)
        for label in (RIGHT, LEFT):
            hu_sums[label] = float(hu[lungs == label].sum(dtype=np.int64))
    out: dict[str, dict[str, float]] = {}
    for side, rows in (("right", [RIGHT]), ("left", [LEFT]), ("both", [RIGHT, LEFT])):
        lung_n = counts[rows].sum()
        ggo_n = counts[rows, GGO].sum()
        cons_n = counts[rows, CONSOLIDATION].sum()
        lung_ml, ggo_ml, cons_ml = lung_n * voxel_ml, ggo_n * voxel_ml, cons_n * voxel_ml
        out[side] = {
            "lung_volume_ml": round(lung_ml, 3),
            "ggo_volume_ml": round(ggo_ml, 3),
            "ggo_pct": round(_pct(ggo_ml, lung_ml), 4),
            "consolidation_volume_ml": round(cons_ml, 3),
            "consolidation_pct": round(_pct(cons_ml, lung_ml), 4),
            "opacity_volume_ml": round(ggo_ml + cons_ml, 3),
            "opacity_pct": round(_pct(ggo_ml + cons_ml, lung_ml), 4),
            "mean_lung_hu": round(float(hu_sums[rows].sum() / lung_n), 2) if lung_n else None,
        }
    return out


def bilateral_flags(measures: dict[str, dict[str, float]], min_pct_of_lung: float) -> dict[str, bool]:
    """A finding is bilateral when it covers at least ``min_pct_of_lung`` % of each lung."""
    return {
        finding: bool(measures["right"][f"{finding}_pct"] >= min_pct_of_lung
                      and measures["left"][f"{finding}_pct"] >= min_pct_of_lung)
        for finding in FINDINGS
    }


def quality_flags(lung_labels: np.ndarray, measures: dict[str, dict[str, float]],
                  config: dict[str, Any]) -> list[str]:
    """Warnings about results that may be wrong: implausible lung volume, lungs cut by the field of view."""
    flags = []
    bounds = config.get("plausibility", {})
    total = measures["both"]["lung_volume_ml"]
    if total < bounds.get("min_lung_volume_ml", 1500) or total > bounds.get("max_lung_volume_ml", 9000):
        flags.append(f"implausible_lung_volume: {total:.0f} mL")
    box = bounding_box(lung_labels)
    for side, label in (("right", RIGHT), ("left", LEFT)):
        if measures[side]["lung_volume_ml"] == 0 or box is None:
            flags.append(f"{side}_lung_not_found")
            continue
        lung = lung_labels[box] == label  # this lung within the lungs' box
        area = lung.sum(axis=(1, 2))
        peak = area.max()
        cut = []
        ends = [area[0] if box[0].start == 0 else 0, area[-1] if box[0].stop == lung_labels.shape[0] else 0]
        if max(ends) > 0.05 * peak:
            cut.append("z")
        _, ny, nx = lung_labels.shape
        edges = []  # the image's edge lines, where the box reaches them
        if box[1].start == 0:
            edges.append(lung[:, 0, :])
        if box[1].stop == ny:
            edges.append(lung[:, -1, :])
        if box[2].start == 0:
            edges.append(lung[:, :, 0])
        if box[2].stop == nx:
            edges.append(lung[:, :, -1])
        if any(edge.any() for edge in edges):
            cut.append("in-plane")
        if cut:
            flags.append(f"{side}_lung_cut_by_field_of_view: {'/'.join(cut)}")
    return flags


def flatten(measures: dict[str, dict[str, float]], bilateral: dict[str, bool]) -> dict[str, Any]:
    """One flat row: ``{side}_{measure}`` columns and ``{finding}_bilateral``."""
    row: dict[str, Any] = {f"{side}_{key}": measures[side][key] for side in SIDES for key in MEASURES}
    row.update({f"{finding}_bilateral": bilateral[finding] for finding in FINDINGS})
    return row
