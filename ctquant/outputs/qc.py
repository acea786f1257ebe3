"""QC picture of one scan: axial and coronal lung-window slices with the lung and lesion contours.

:func:`qc_montage` draws, for a radiologist to check a result at a glance:

- 12 axial slices spread evenly over the lungs' cranio-caudal extent (the slice with the most opacity
  replaces its nearest neighbour so the worst level is always shown), cropped to the lungs;
- one coronal slice through the lungs' centre (anterior–posterior), superior at the top;
- lung window (W 1500 / L −600), true aspect ratio from the voxel spacing;
- contours of the right lung, left lung, ground-glass opacity and consolidation in Okabe–Ito
  colour-blind-safe colours, with a legend;
- a caption with the key numbers (lung volumes, GGO / consolidation % per lung), subject, time point,
  method, model/config hashes and the ctquant version.

Orientation is the radiological convention: the patient's right on the image's left (LPS arrays:
x index 0 is the patient's right, so the (y, x) slice shown with origin upper is radiological, anterior
at the top), and the coronal slice with superior at the top. "R"/"L" markers are drawn on each image.

Matplotlib is used through its object API (no pyplot), so batch worker threads can draw safely.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..version import __version__
from .dicomseg import COLOURS
from ..segment.grid import bounding_box
from ..segment.lesions import CONSOLIDATION, GGO
from ..segment.lungs import LEFT, RIGHT

#: Lung window (HU): width 1500, level -600.
WINDOW = (-600.0 - 750.0, -600.0 + 750.0)
#: In-plane margin (mm) kept around the lungs when cropping.
MARGIN_MM = 12.0

_LAYERS = (  # (key, legend label, array name, value, line width)
    ("right_lung", "Right lung", "lungs", RIGHT, 1.1),
    ("left_lung", "Left lung", "lungs", LEFT, 1.1),
    ("ggo", "Ground-glass opacity", "lesions", GGO, 0.9),
    ("consolidation", "Consolidation", "lesions", CONSOLIDATION, 0.9),
)


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % rgb


def _box_sums(labels: np.ndarray, box: tuple[slice, ...] | None, axis: int) -> np.ndarray:
    """Non-zero voxels of ``labels`` per index along ``axis``, counted within ``box`` (the lungs' bounding
    box: lesion labels lie inside the lungs); all zero when there is no box."""
    out = np.zeros(labels.shape[axis], dtype=np.int64)
    if box is not None:
        out[box[axis]] = np.count_nonzero(labels[box], axis=tuple(a for a in range(3) if a != axis))
    return out


def pick_axial_slices(lung_labels: np.ndarray, lesion_labels: np.ndarray, n: int = 12) -> list[int]:
    """``n`` axial slice indices spread over the lungs (the slices holding at least 5 % of the largest
    lung cross-section; the whole volume if no lung was found).

    The slice with the largest opacity area (if any) replaces the nearest pick. Returned in display
    order: superior (apex) first.
    """
    box = bounding_box(lung_labels)
    area = _box_sums(lung_labels, box, axis=0)
    zs = np.flatnonzero(area >= 0.05 * area.max()) if area.any() else np.array([], int)  # skip slivers
    lo, hi = (int(zs[0]), int(zs[-1])) if zs.size else (0, lung_labels.shape[0] - 1)
    span = hi - lo
    n = max(1, min(n, span + 1))
    inset = 0.04 * span
    picks = [int(round(v)) for v in np.linspace(lo + inset, hi - inset, n)]
    opacity = _box_sums(lesion_labels, box, axis=0)
    if opacity.any():
        worst = int(np.argmax(opacity))
        if worst not in picks:
            picks[int(np.argmin([abs(p - worst) for p in picks]))] = worst
    picks = sorted(set(picks))
    return picks[::-1]  # LPS: higher z index = more superior


def pick_coronal_row(lung_labels: np.ndarray, lesion_labels: np.ndarray) -> int:
    """The coronal plane (y index) to show: among the rows where the lungs are at least half their
    largest coronal area, the one with the most opacity, else the one with the most lung."""
    box = bounding_box(lung_labels)
    lung_area = _box_sums(lung_labels, box, axis=1)
    if not lung_area.any():
        return lung_labels.shape[1] // 2
    wide = lung_area >= 0.5 * lung_area.max()
    opacity = np.where(wide, _box_sums(lesion_labels, box, axis=1), 0)
    return int(np.argmax(opacity)) if opacity.any() else int(np.argmax(lung_area))


def _crop_box(extent: tuple[slice, slice] | None, spacing: tuple[float, float],
              shape: tuple[int, int]) -> tuple[slice, slice]:
    """(rows, columns) ``extent`` of the lungs in a plane with a margin, or the full plane without lungs."""
    if extent is None:
        return slice(0, shape[0]), slice(0, shape[1])
    pads = (int(np.ceil(MARGIN_MM / spacing[0])), int(np.ceil(MARGIN_MM / spacing[1])))
    return tuple(slice(max(0, e.start - pad), min(n, e.stop + pad)) for e, pad, n in zip(extent, pads, shape))


def _draw(ax, image: np.ndarray, lungs: np.ndarray, lesions: np.ndarray, aspect: float, title: str,
          markers: dict[str, str]) -> None:
    from matplotlib.collections import LineCollection
    from skimage.measure import find_contours

    ax.imshow(image, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], aspect=aspect, interpolation="bilinear",
              origin="upper")
    arrays = {"lungs": lungs, "lesions": lesions}
    for key, _label, source, value, width in _LAYERS:
        mask = arrays[source] == value
        if mask.any() and min(mask.shape) > 1:
            # Marching squares at 0.5, as matplotlib's contour draws them (three times faster): (row, col)
            # points on the pixel centres imshow uses, drawn as (x = col, y = row).
            lines = [line[:, ::-1] for line in find_contours(mask.astype(np.float32), 0.5)]
            ax.add_collection(LineCollection(lines, colors=_hex(COLOURS[key]), linewidths=width), autolim=False)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=8, color="#dddddd", pad=2)
    from matplotlib import patheffects

    style = {"color": "#ffffff", "fontsize": 9, "fontweight": "bold",
             "path_effects": [patheffects.withStroke(linewidth=2.5, foreground="black")]}
    for where, text in markers.items():
        x, ha = {"left": (0.02, "left"), "right": (0.98, "right"), "top": (0.5, "center")}[where]
        y, va = (0.97, "top") if where == "top" else (0.5, "center")
        ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, **style)


def _fmt(value: Any, spec: str) -> str:
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return "–"


def caption_lines(measures: dict[str, Any]) -> list[str]:
    """The caption's text lines (also used by the tests)."""
    lungs = measures["lungs"]
    prov = measures.get("provenance", {})
    who = " · ".join(str(v) for v in (measures.get("subject_id"), measures.get("timepoint")) if v) or "unnamed scan"
    model = (prov.get("model_sha256") or "")[:12]
    lines = [
        f"{who}   method: {measures.get('method')}{'  model ' + model if model else ''}   "
        f"config {str(prov.get('config_sha256') or '')[:12]}   study date {prov.get('study_date') or '–'}   "
        f"ctquant {prov.get('ctquant_version', __version__)}",
    ]
    for side, name in (("right", "Right lung"), ("left", "Left lung"), ("both", "Both lungs")):
        m = lungs[side]
        lines.append(f"{name}: {_fmt(m['lung_volume_ml'], '.0f')} mL   GGO {_fmt(m['ggo_pct'], '.2f')} %   "
                     f"consolidation {_fmt(m['consolidation_pct'], '.2f')} %   "
                     f"opacity {_fmt(m['opacity_pct'], '.2f')} %")
    flags = measures.get("flags") or []
    if flags:
        lines.append("FLAGS: " + "; ".join(flags))
    return lines


def qc_montage(scan, lung_labels: np.ndarray, lesion_labels: np.ndarray, measures: dict[str, Any],
               path: str | Path, *, n_axial: int = 12, dpi: int = 110) -> Path:
    """Write the QC montage PNG (see the module docstring); returns ``path``."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    hu = scan.hu
    dz, dy, dx = (float(s) for s in scan.spacing_mm)
    picks = pick_axial_slices(lung_labels, lesion_labels, n_axial)
    box = bounding_box(lung_labels)
    rows_box, cols_box = _crop_box(None if box is None else box[1:], (dy, dx), hu.shape[1:])

    # Coronal plane through the lungs' centre of mass (anterior-posterior), cropped in z and x.
    y_c = pick_coronal_row(lung_labels, lesion_labels)
    n_z = hu.shape[0]
    cor_extent = None if box is None else (slice(n_z - box[0].stop, n_z - box[0].start), box[2])  # z flipped
    cor_box = _crop_box(cor_extent, (dz, dx), (n_z, hu.shape[2]))

    n_cols = 4
    n_rows = int(np.ceil(len(picks) / n_cols))
    crop_h, crop_w = (rows_box.stop - rows_box.start) * dy, (cols_box.stop - cols_box.start) * dx
    cor_h, cor_w = (cor_box[0].stop - cor_box[0].start) * dz, (cor_box[1].stop - cor_box[1].start) * dx
    tile_w = 3.0  # inches per axial tile
    tile_h = tile_w * crop_h / max(crop_w, 1e-6)
    axial_h = n_rows * (tile_h + 0.25)
    cor_w_in = min(axial_h * cor_w / max(cor_h, 1e-6), 2.2 * tile_w)
    caption_h = 0.26 * (len(caption_lines(measures)) + 1)
    legend_h = 0.45
    fig_w = n_cols * tile_w + cor_w_in + 0.4
    fig_h = axial_h + caption_h + legend_h
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi, facecolor="black")

    top = 1 - legend_h / fig_h
    bottom = caption_h / fig_h
    axial_right = n_cols * tile_w / fig_w
    grid = fig.add_gridspec(n_rows, n_cols, left=0.005, right=axial_right, top=top, bottom=bottom,
                            wspace=0.03, hspace=0.12)
    for i, z in enumerate(picks):
        ax = fig.add_subplot(grid[i // n_cols, i % n_cols])
        ax.set_facecolor("black")
        position_mm = float((np.asarray(scan.direction).reshape(3, 3) @ np.array([0, 0, z * dz]))[2]
                            + scan.origin_mm[2])
        _draw(ax, hu[z][rows_box, cols_box], lung_labels[z][rows_box, cols_box],
              lesion_labels[z][rows_box, cols_box], aspect=dy / dx,
              title=f"axial {z + 1}/{hu.shape[0]}  z {position_mm:.0f} mm",
              markers={"left": "R", "right": "L"})
    cor_ax = fig.add_axes((axial_right + 0.01, bottom, 1 - axial_right - 0.015, top - bottom))
    cor_ax.set_facecolor("black")
    zsl, xsl = cor_box
    _draw(cor_ax, hu[::-1, y_c, :][zsl, xsl], lung_labels[::-1, y_c, :][zsl, xsl],
          lesion_labels[::-1, y_c, :][zsl, xsl], aspect=dz / dx, title=f"coronal (row {y_c + 1}/{hu.shape[1]})",
          markers={"left": "R", "right": "L", "top": "S"})
    cor_ax.set_anchor("N")

    handles = [Line2D([0], [0], color=_hex(COLOURS[key]), lw=2.5, label=label) for key, label, *_ in _LAYERS]
    legend = fig.legend(handles=handles, loc="upper center", ncol=4, frameon=False, fontsize=10,
                        bbox_to_anchor=(0.5, 1.0))
    for text in legend.get_texts():
        text.set_color("#ffffff")
    lines = caption_lines(measures)
    fig.text(0.01, bottom - 0.1 / fig_h, "\n".join(lines), ha="left", va="top", color="#ffffff", fontsize=9.5,
             family="monospace", linespacing=1.45)
    fig.text(0.99, 0.02 / fig_h + 0.005, "radiological view: patient's right on image left · W1500/L−600",
             ha="right", va="bottom", color="#aaaaaa", fontsize=7.5)
    path = Path(path)
    fig.savefig(path, format="png", dpi=dpi, facecolor="black")
    return path
