"""Reader agreement: masks from two or more readers (or a model), and tables of per-case measures.

Two modes, both used by ``ctquant agree``:

* **masks** — label maps of the same scans by several readers, matched by relative file name (one
  folder per reader), by a CSV (``case_id, reader, path[, labels][, lungs]``) or taken from
  ``ctquant quantify`` output folders (``<case>/lesions.nii.gz`` + ``<case>/lungs.nii.gz``). Per case,
  class and reader pair: Dice, Jaccard, HD95 and ASSD in mm (MONAI, real voxel spacing), volumes in
  mL and their difference in mL and % of lung; per class: ICC of the volumes, Bland–Altman per pair.
* **table** — a long (``case_id, reader, measure, value``) or wide (``case_id, reader, <measure>...``)
  CSV of numbers or categories: ICC, Bland–Altman and correlations for continuous measures; Cohen's
  (weighted for ordinal) and Fleiss' kappa with % agreement for categorical ones.

Arrays follow :mod:`ctquant.io.scans`: numpy (z, y, x), ``spacing_mm`` (z, y, x). Pure computations are
:func:`mask_metrics` and the functions of :mod:`ctquant.trial.stats`; the rest is I/O glue.
Outputs are written atomically (:func:`atomic_output`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ..version import __version__
from .stats import (
    NAN,
    bland_altman,
    bland_altman_plot,
    cohen_kappa,
    correlation,
    describe,
    fleiss_kappa,
    icc,
    jsonable,
    pairs_of,
)
from ..measures.overlap import dice_score
from ..outputs.atomic import atomic_output_dir
from ..errors import CtquantError, GeometryError, InputError

#: Default label map of lesion masks (``ctquant quantify``'s ``lesions.nii.gz`` convention).
DEFAULT_LABELS = "1=ggo,2=consolidation"
#: File suffixes accepted as masks (``.dcm`` = DICOM SEG through :mod:`ctquant.outputs.dicomseg`).
MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
#: File names inside a ``ctquant quantify`` case folder.
QUANTIFY_LESIONS = "lesions.nii.gz"
QUANTIFY_LUNGS = "lungs.nii.gz"
#: Two grids are "the same" when size matches and spacing/origin differ by at most this (mm) ...
GEOMETRY_TOLERANCE_MM = 0.01
#: ... and direction cosines by at most this.
DIRECTION_TOLERANCE = 1e-4
#: Share of a resampled mask's labelled volume that may change before the warning stresses it.
RESAMPLE_VOLUME_CHANGE_WARN = 0.05

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


# --------------------------------------------------------------------------------------------------
# Label maps
# --------------------------------------------------------------------------------------------------


def parse_label_map(text: str, *, where: str = "--labels") -> dict[int, str]:
    """Parse ``"1=ggo,2=consolidation"`` into ``{1: "ggo", 2: "consolidation"}``.

    Values are positive integers; several values may map to the same class name. Raises
    :class:`InputError` naming ``where`` on a malformed map.
    """
    out: dict[int, str] = {}
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise InputError(f"empty label map {text!r}; expected e.g. {DEFAULT_LABELS}", where)
    for item in items:
        value, sep, name = item.partition("=")
        name = name.strip()
        try:
            number = int(value.strip())
        except ValueError:
            number = -1
        if not sep or number <= 0 or not _NAME_RE.match(name):
            raise InputError(f"bad label map entry {item!r}; expected VALUE=name, e.g. {DEFAULT_LABELS}", where)
        if number in out and out[number] != name:
            raise InputError(f"label value {number} mapped twice ({out[number]}, {name})", where)
        out[number] = name
    return out


def classes_of(label_map: dict[int, str]) -> list[str]:
    """Class names of a label map, in order of their first (lowest) value."""
    seen: list[str] = []
    for _, name in sorted(label_map.items()):
        if name not in seen:
            seen.append(name)
    return seen


def format_label_map(label_map: dict[int, str]) -> str:
    """Inverse of :func:`parse_label_map`."""
    return ",".join(f"{k}={v}" for k, v in sorted(label_map.items()))


def class_masks(labels: np.ndarray, label_map: dict[int, str], classes: Sequence[str],
                union: str | None = None) -> dict[str, np.ndarray]:
    """Boolean masks per class name from a label array; ``union`` (if given) is every mapped value."""
    out: dict[str, np.ndarray] = {}
    for name in classes:
        values = [v for v, n in label_map.items() if n == name]
        out[name] = np.isin(labels, values) if values else np.zeros(labels.shape, bool)
    if union:
        out[union] = np.isin(labels, list(label_map))
    return out


def _present_values(labels: np.ndarray) -> set[int]:
    """Distinct non-zero values of an integer label array (bincount when cheap)."""
    if labels.size == 0:
        return set()
    lo, hi = int(labels.min()), int(labels.max())
    if lo >= 0 and hi < 1 << 16:
        counts = np.bincount(labels.ravel().astype(np.int64, copy=False), minlength=1)
        return {int(v) for v in np.flatnonzero(counts) if v != 0}
    return {int(v) for v in np.unique(labels) if v != 0}


# --------------------------------------------------------------------------------------------------
# Mask metrics (pure)
# --------------------------------------------------------------------------------------------------


def voxel_volume_ml(spacing_mm: Sequence[float]) -> float:
    """Volume of one voxel in mL from its (z, y, x) spacing in mm."""
    return float(np.prod([float(s) for s in spacing_mm])) / 1000.0


def surface_distances_mm(a: np.ndarray, b: np.ndarray, spacing_mm: Sequence[float]) -> tuple[float, float]:
    """(HD95, ASSD) in mm between two non-empty boolean masks on the same grid.

    Same definitions as MONAI's ``compute_hausdorff_distance(percentile=95)`` (the 95th percentile of
    the distances from each surface voxel of one mask to the nearest surface voxel of the other, the
    larger of the two directions) and ``compute_average_surface_distance(symmetric=True)`` (the mean of
    all those distances, both directions pooled), from one call of the function both use,
    ``monai.metrics.utils.get_edge_surface_distance``. Surface voxels are mask voxels with a
    6-connected background neighbour (the image border counts as background); distances use the real
    (anisotropic) ``spacing_mm``.
    """
    import torch
    from monai.metrics.utils import get_edge_surface_distance

    both = a | b
    lo = [int(np.flatnonzero(both.any(axis=tuple(j for j in range(3) if j != i))).min()) for i in range(3)]
    hi = [int(np.flatnonzero(both.any(axis=tuple(j for j in range(3) if j != i))).max()) for i in range(3)]
    crop = tuple(slice(max(l - 1, 0), h + 2) for l, h in zip(lo, hi))  # MONAI pads at the border itself
    a, b = np.ascontiguousarray(a[crop]), np.ascontiguousarray(b[crop])
    if np.array_equal(a, b):
        return 0.0, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, distances, _ = get_edge_surface_distance(torch.from_numpy(a), torch.from_numpy(b),
                                                    spacing=[float(s) for s in spacing_mm], symmetric=True)
    d_ab, d_ba = (np.asarray(d.cpu().numpy(), dtype=np.float64) for d in distances)
    hd95 = max(float(np.percentile(d_ab, 95)), float(np.percentile(d_ba, 95)))  # linear, as torch.quantile
    assd = float(np.concatenate([d_ab, d_ba]).mean())
    return hd95, assd


def mask_metrics(a: np.ndarray, b: np.ndarray, spacing_mm: Sequence[float]) -> dict[str, Any]:
    """Overlap, surface distance and volume agreement of two boolean masks on one (z, y, x) grid.

    Returns ``dice``, ``jaccard``, ``hd95_mm``, ``assd_mm``, ``volume_a_ml``, ``volume_b_ml``,
    ``volume_diff_ml`` (a − b) and ``note``: both empty → Dice/Jaccard 1, distances 0, note
    ``"both empty"``; exactly one empty → Dice/Jaccard 0, distances NaN, note ``"one empty"``.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"masks must be 3-D and of one shape, got {a.shape} and {b.shape}")
    if len(spacing_mm) != 3 or not all(float(s) > 0 for s in spacing_mm):
        raise ValueError(f"spacing_mm must be 3 positive numbers, got {spacing_mm}")
    voxel_ml = voxel_volume_ml(spacing_mm)
    n_a, n_b = int(np.count_nonzero(a)), int(np.count_nonzero(b))
    out: dict[str, Any] = {
        "volume_a_ml": n_a * voxel_ml,
        "volume_b_ml": n_b * voxel_ml,
        "volume_diff_ml": (n_a - n_b) * voxel_ml,
        "note": "",
        "dice": dice_score(a, b),  # 1 where both are empty, 0 where only one is
    }
    if n_a == 0 and n_b == 0:
        out.update(jaccard=1.0, hd95_mm=0.0, assd_mm=0.0, note="both empty")
    elif n_a == 0 or n_b == 0:
        out.update(jaccard=0.0, hd95_mm=NAN, assd_mm=NAN, note="one empty")
    else:
        inter = int(np.count_nonzero(a & b))
        out["jaccard"] = inter / (n_a + n_b - inter)
        out["hd95_mm"], out["assd_mm"] = surface_distances_mm(a, b, spacing_mm)
    return {k: out[k] for k in ("dice", "jaccard", "hd95_mm", "assd_mm", "volume_a_ml", "volume_b_ml",
                                "volume_diff_ml", "note")}


# --------------------------------------------------------------------------------------------------
# Reading masks and aligning grids
# --------------------------------------------------------------------------------------------------


def mask_suffix(path: str | Path) -> str | None:
    """The mask suffix of a file name (``.nii.gz`` ...), or None when it is not a mask file."""
    name = Path(path).name.lower()
    for suffix in MASK_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def is_dicom_seg(path: str | Path) -> bool:
    """True for ``.dcm`` mask files (read as DICOM SEG)."""
    return mask_suffix(path) == ".dcm"


def read_label_image(path: str | Path, *, which: str = "lesions", reference: sitk.Image | None = None) -> sitk.Image:
    """Read a 3-D label map (NIfTI/NRRD/MHA via SimpleITK; ``.dcm`` DICOM SEG via
    :func:`ctquant.outputs.dicomseg.read_seg`, its ``which`` ("lesions" or "lungs") label map, on the
    ``reference`` grid when one is given). Raises :class:`InputError` when unreadable or unsuitable."""
    path = Path(path)
    if not path.is_file():
        raise InputError("mask file not found", path)
    if is_dicom_seg(path):
        try:
            from ..outputs.dicomseg import read_seg  # another module; optional here
        except ImportError:
            raise InputError("DICOM SEG input needs ctquant.outputs.dicomseg.read_seg, which this installation lacks",
                             path) from None
        try:
            if which == "lesions" and reference is None:
                image = read_seg(path)
            else:
                image = read_seg(path, which=which, reference=reference)
        except CtquantError:
            raise
        except Exception as exc:  # noqa: BLE001 - any parser failure is bad input here
            raise InputError(f"cannot read DICOM SEG: {_first_line(exc)}", path) from None
    else:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise InputError(f"cannot read mask: {_first_line(exc)}", path) from None
    if image.GetDimension() != 3:
        raise InputError(f"mask must be 3-D, got {image.GetDimension()}-D", path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("mask must be a scalar label map (got a multi-component image)", path)
    return image


def label_array(image: sitk.Image, path: str | Path) -> np.ndarray:
    """The (z, y, x) integer label array of a label image; non-integer values are an InputError."""
    arr = sitk.GetArrayFromImage(image)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise InputError("mask has non-integer values (a probability map?); give a label map", path)
        arr = arr.astype(np.int32)
    elif arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    elif arr.dtype.kind not in "iu":
        raise InputError(f"unsupported mask pixel type {arr.dtype}", path)
    return arr


def spacing_zyx(image: sitk.Image) -> tuple[float, float, float]:
    """SimpleITK (x, y, z) spacing as (z, y, x) mm, the :mod:`ctquant.io.scans` convention."""
    sx, sy, sz = image.GetSpacing()
    return (float(sz), float(sy), float(sx))


def grid_differences(ref: sitk.Image, image: sitk.Image, tolerance_mm: float = GEOMETRY_TOLERANCE_MM) -> list[str]:
    """What differs between two grids beyond tolerance: subset of size/spacing/origin/direction."""
    diffs = []
    if tuple(ref.GetSize()) != tuple(image.GetSize()):
        diffs.append(f"size {ref.GetSize()} vs {image.GetSize()}")
    if np.max(np.abs(np.subtract(ref.GetSpacing(), image.GetSpacing()))) > tolerance_mm:
        diffs.append("spacing {} vs {} mm".format(*(tuple(round(v, 4) for v in im.GetSpacing())
                                                    for im in (ref, image))))
    if np.max(np.abs(np.subtract(ref.GetOrigin(), image.GetOrigin()))) > tolerance_mm:
        diffs.append("origin {} vs {} mm".format(*(tuple(round(v, 3) for v in im.GetOrigin())
                                                   for im in (ref, image))))
    if np.max(np.abs(np.subtract(ref.GetDirection(), image.GetDirection()))) > DIRECTION_TOLERANCE:
        diffs.append("direction differs")
    return diffs


def physical_bounds_mm(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned (LPS) bounding box of an image's voxels, edges included: (low, high) in mm."""
    size = image.GetSize()
    corners = []
    for i in (-0.5, size[0] - 0.5):
        for j in (-0.5, size[1] - 0.5):
            for k in (-0.5, size[2] - 0.5):
                corners.append(image.TransformContinuousIndexToPhysicalPoint((i, j, k)))
    pts = np.asarray(corners)
    return pts.min(axis=0), pts.max(axis=0)


def extent_overlap_fraction(ref: sitk.Image, image: sitk.Image) -> float:
    """Volume of the intersection of the two physical extents over the smaller extent (0 = disjoint)."""
    lo1, hi1 = physical_bounds_mm(ref)
    lo2, hi2 = physical_bounds_mm(image)
    inter = np.clip(np.minimum(hi1, hi2) - np.maximum(lo1, lo2), 0, None)
    smaller = min(np.prod(hi1 - lo1), np.prod(hi2 - lo2))
    return float(np.prod(inter) / smaller) if smaller > 0 else 0.0


def align_to(ref: sitk.Image, image: sitk.Image, path: str | Path,
             tolerance_mm: float = GEOMETRY_TOLERANCE_MM) -> tuple[sitk.Image, str]:
    """``image`` on ``ref``'s grid: itself when the grids match within tolerance, otherwise resampled
    with nearest neighbour when the physical extents overlap (returns a note saying what differed).

    Raises :class:`GeometryError` when the extents do not overlap, or when the labelled voxels fall
    entirely outside ``ref``'s grid (a different frame of reference).
    """
    diffs = grid_differences(ref, image, tolerance_mm)
    if not diffs:
        return image, ""
    overlap = extent_overlap_fraction(ref, image)
    if overlap <= 0.0:
        raise GeometryError(f"mask grid does not overlap the reference reader's in space ({'; '.join(diffs)}); "
                            "not the same scan or frame of reference", path)
    resampled = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, image.GetPixelID())
    before = float(np.count_nonzero(sitk.GetArrayViewFromImage(image))) * voxel_volume_ml(spacing_zyx(image))
    after = float(np.count_nonzero(sitk.GetArrayViewFromImage(resampled))) * voxel_volume_ml(spacing_zyx(ref))
    if before > 0 and after == 0:
        raise GeometryError("labelled voxels fall entirely outside the reference reader's grid "
                            f"({'; '.join(diffs)}); different frame of reference?", path)
    note = f"resampled (nearest neighbour): {'; '.join(diffs)}"
    if before > 0 and abs(after - before) > RESAMPLE_VOLUME_CHANGE_WARN * before:
        note += f"; labelled volume {before:.1f} -> {after:.1f} mL"
    return resampled, note


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if line.strip() and not line.strip().startswith(("File ", "sitk::", "itk::")):
            return line.strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# Reader inputs
# --------------------------------------------------------------------------------------------------


@dataclass
class CaseInput:
    """One reader's mask of one case (plus an optional lung mask and per-file label map)."""

    path: Path
    lungs: Path | None = None
    label_map: dict[int, str] | None = None


@dataclass
class Reader:
    """A reader (or model) and its masks keyed by case id."""

    name: str
    source: str
    layout: str  # "folder", "quantify" or "csv"
    cases: dict[str, CaseInput] = field(default_factory=dict)
    label_map: dict[int, str] | None = None


def _case_id(rel: Path) -> str:
    suffix = mask_suffix(rel) or ""
    text = rel.as_posix()
    return text[: len(text) - len(suffix)] if suffix else text


def discover_masks(root: Path, *, lungs: bool = False) -> tuple[str, dict[str, CaseInput]]:
    """Masks under a reader folder, keyed by case id; returns (layout, cases).

    A folder holding ``<case>/lesions.nii.gz`` files is a ``ctquant quantify`` output ("quantify"
    layout): case id = the case folder's path relative to ``root``, lungs from ``lungs.nii.gz`` beside
    it. Otherwise ("folder" layout) every mask file (:data:`MASK_SUFFIXES`) is a case whose id is
    its relative path without the suffix. With ``lungs=True`` (a ``--lungs`` folder) the quantify
    layout's ``lungs.nii.gz`` files are the masks.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError("reader folder not found" if not root.exists() else "not a folder", root)
    marker = QUANTIFY_LUNGS if lungs else QUANTIFY_LESIONS
    quantify = sorted(p for p in root.rglob(marker) if p.is_file() and not _hidden(p, root))
    cases: dict[str, CaseInput] = {}
    if quantify:
        for path in quantify:
            rel = path.parent.relative_to(root)
            case = rel.as_posix() if rel.parts else root.name
            lung = path.parent / QUANTIFY_LUNGS
            cases[case] = CaseInput(path=path, lungs=lung if lung.is_file() and not lungs else None)
        return "quantify", cases
    for path in sorted(root.rglob("*")):
        if not path.is_file() or _hidden(path, root) or mask_suffix(path) is None:
            continue
        case = _case_id(path.relative_to(root))
        if case in cases:
            raise InputError(f"two mask files for case {case!r} ({cases[case].path.name}, {path.name})", root)
        cases[case] = CaseInput(path=path)
    if not cases:
        raise InputError(f"no mask files ({', '.join(MASK_SUFFIXES)}) in folder", root)
    return "folder", cases


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def readers_from_folders(folders: Sequence[str | Path], names: Sequence[str] | None = None) -> list[Reader]:
    """One :class:`Reader` per folder (name: the folder's name, made unique, or ``names``)."""
    if names is not None and len(names) != len(folders):
        raise InputError(f"--names gives {len(names)} names for {len(folders)} readers", "--names")
    readers: list[Reader] = []
    for i, folder in enumerate(folders):
        folder = Path(folder)
        layout, cases = discover_masks(folder)
        name = names[i] if names is not None else (folder.resolve().name or f"reader{i + 1}")
        readers.append(Reader(name=name, source=str(folder.resolve()), layout=layout, cases=cases))
    _unique_names(readers)
    return readers


def _unique_names(readers: list[Reader]) -> None:
    seen: dict[str, int] = {}
    for reader in readers:
        if reader.name in seen:
            seen[reader.name] += 1
            reader.name = f"{reader.name}_{seen[reader.name]}"
        else:
            seen[reader.name] = 1


def readers_from_csv(path: str | Path) -> list[Reader]:
    """Readers from a CSV with columns ``case_id, reader, path`` and optional ``labels`` (this file's
    label map, e.g. ``3=ggo,4=consolidation``) and ``lungs`` (a lung mask). Relative paths are
    relative to the CSV's folder; a path may be a ``ctquant quantify`` case folder."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"cannot read CSV: {_first_line(exc)}", path) from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    missing = {"case_id", "reader", "path"} - set(frame.columns)
    if missing:
        raise InputError(f"CSV lacks column(s) {', '.join(sorted(missing))}; expected case_id, reader, path"
                         "[, labels][, lungs]", path)
    base = path.resolve().parent
    readers: dict[str, Reader] = {}
    for row_no, row in enumerate(frame.to_dict("records"), start=2):
        case, name, file = (str(row[k]).strip() for k in ("case_id", "reader", "path"))
        if not case or not name or not file:
            raise InputError(f"row {row_no}: empty case_id, reader or path", path)
        reader = readers.setdefault(name, Reader(name=name, source=str(path.resolve()), layout="csv"))
        if case in reader.cases:
            raise InputError(f"row {row_no}: case {case!r} listed twice for reader {name!r}", path)
        mask = _resolve(base, file)
        lungs = _resolve(base, str(row.get("lungs", "")).strip()) if str(row.get("lungs", "")).strip() else None
        if mask.is_dir():
            if not (mask / QUANTIFY_LESIONS).is_file():
                raise InputError(f"row {row_no}: folder has no {QUANTIFY_LESIONS}", mask)
            if lungs is None and (mask / QUANTIFY_LUNGS).is_file():
                lungs = mask / QUANTIFY_LUNGS
            mask = mask / QUANTIFY_LESIONS
        elif not mask.is_file():
            raise InputError(f"row {row_no}: mask file not found", mask)
        if lungs is not None and not lungs.is_file():
            raise InputError(f"row {row_no}: lung mask not found", lungs)
        labels_text = str(row.get("labels", "")).strip()
        label_map = parse_label_map(labels_text, where=f"{path} row {row_no}") if labels_text else None
        reader.cases[case] = CaseInput(path=mask, lungs=lungs, label_map=label_map)
    if not readers:
        raise InputError("CSV lists no masks", path)
    return list(readers.values())


def _resolve(base: Path, text: str) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else base / p


def parse_reader_labels(specs: Sequence[str], readers: Sequence[Reader]) -> None:
    """Apply ``--reader-labels READER:3=ggo,4=consolidation`` (READER: name or 1-based position)."""
    for spec in specs or []:
        who, sep, text = str(spec).partition(":")
        if not sep:
            raise InputError(f"bad --reader-labels {spec!r}; expected READER:VALUE=name,...", "--reader-labels")
        who = who.strip()
        match = [r for r in readers if r.name == who]
        if not match and who.isdigit() and 1 <= int(who) <= len(readers):
            match = [readers[int(who) - 1]]
        if not match:
            raise InputError(f"--reader-labels names unknown reader {who!r} (readers: "
                             f"{', '.join(r.name for r in readers)})", "--reader-labels")
        match[0].label_map = parse_label_map(text, where="--reader-labels")


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path, index=False, na_rep="", float_format="%.6g", quoting=csv.QUOTE_MINIMAL)


def _write_json(data: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def _pair_key(a: str, b: str) -> str:
    return f"{a} vs {b}"


@dataclass
class Report:
    """What ``ctquant agree`` computed: the summary (as written to summary.json), warnings, files."""

    mode: str
    out_dir: Path
    summary: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def _provenance(inputs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    software = {}
    for pkg in ("monai", "pingouin", "statsmodels", "scipy", "SimpleITK", "numpy"):
        try:
            software[pkg] = version(pkg)
        except PackageNotFoundError:
            software[pkg] = None
    return {
        "tool": "ctquant agree",
        "ctquant_version": __version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        **extra,
        "software": software,
    }


# --------------------------------------------------------------------------------------------------
# Continuous and categorical analyses of a case × reader table
# --------------------------------------------------------------------------------------------------


def analyse_continuous(wide: pd.DataFrame, measure: str, *, units: str = "", plot_dir: Path | None = None,
                       files: list[str] | None = None) -> dict[str, Any]:
    """ICC over all readers plus, per reader pair, that pair's own ICC, Bland–Altman (a − b),
    Pearson/Spearman and a PNG.

    ``wide``: index case id, one numeric column per reader (NaN = not rated).
    """
    readers = list(wide.columns)
    out: dict[str, Any] = {"units": units, "n_cases": int(wide.notna().sum(axis=1).ge(2).sum()),
                           "icc": icc(wide), "pairs": {}}
    for a, b in pairs_of(readers):
        x, y = wide[a].to_numpy(float), wide[b].to_numpy(float)
        entry = {"reader_a": a, "reader_b": b, "icc": icc(wide[[a, b]]), "bland_altman": bland_altman(x, y),
                 "correlation": correlation(x, y)}
        ok = np.isfinite(x) & np.isfinite(y)
        if plot_dir is not None and ok.any():
            name = f"bland_altman_{_safe(measure)}_{_safe(a)}_vs_{_safe(b)}.png"
            bland_altman_plot(x, y, plot_dir / name, title=f"{measure}: {a} vs {b}", units=units,
                              label_x=a, label_y=b)
            entry["plot"] = name
            if files is not None:
                files.append(name)
        out["pairs"][_pair_key(a, b)] = entry
    return out


def analyse_categorical(wide: pd.DataFrame, *, categories: Sequence[Any] | None = None,
                        ordinal: bool = False) -> dict[str, Any]:
    """Per reader pair Cohen's kappa (plus linear/quadratic weighted when ordinal) and % agreement;
    Fleiss' kappa when there are more than two readers. ``wide``: case × reader labels (None = missing)."""
    readers = list(wide.columns)
    values = {v for col in readers for v in wide[col] if v is not None and not _isnan(v)}
    if categories is None:
        from .stats import _sort_key

        categories = sorted(values, key=_sort_key)
    out: dict[str, Any] = {"type": "ordinal" if ordinal else "categorical",
                           "categories": list(categories),
                           "n_cases": int(wide.notna().sum(axis=1).ge(2).sum()), "pairs": {}}
    for a, b in pairs_of(readers):
        res = cohen_kappa(list(wide[a]), list(wide[b]), categories, ordinal=ordinal)
        out["pairs"][_pair_key(a, b)] = {"reader_a": a, "reader_b": b, **res}
    if len(readers) > 2:
        out["fleiss"] = fleiss_kappa(wide.to_numpy(dtype=object), categories)
    return out


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


# --------------------------------------------------------------------------------------------------
# Mask mode
# --------------------------------------------------------------------------------------------------

CASE_COLUMNS = ["case_id", "label", "reader_a", "reader_b", "dice", "jaccard", "hd95_mm", "assd_mm",
                "volume_a_ml", "volume_b_ml", "volume_diff_ml", "lung_volume_ml", "volume_diff_pct_lung",
                "pct_lung_a", "pct_lung_b", "resampled", "note"]
VOLUME_COLUMNS = ["case_id", "reader", "label", "volume_ml", "lung_volume_ml", "pct_lung", "resampled", "path"]


def _lung_volume_ml(path: Path) -> float:
    image = read_label_image(path, which="lungs")
    return float(np.count_nonzero(label_array(image, path))) * voxel_volume_ml(spacing_zyx(image))


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole and math.isfinite(whole) and whole > 0 else NAN


@dataclass
class _CaseMasks:
    """One case's masks of every reader present, on the reference reader's grid."""

    ref_name: str
    spacing_mm: tuple[float, float, float]
    masks: dict[str, dict[str, np.ndarray]]  # reader -> class -> mask (reference grid)
    volumes_ml: dict[str, dict[str, float]]  # reader -> class -> volume on the reader's own grid
    notes: dict[str, str]  # reader -> resampling note ("" = same grid)
    unmapped: dict[str, set[int]]  # reader -> mask values outside its label map
    paths: dict[str, Path]


def _load_case(case: str, present: Sequence[Reader], label_map: dict[int, str], classes: Sequence[str],
               union: str | None, tolerance_mm: float) -> _CaseMasks:
    """Read every reader's mask of ``case``; align them to the reference (the first non-DICOM-SEG reader)."""
    # DICOM SEGs may span only their non-empty slices: read them onto a full (non-SEG) reference grid.
    # When every reader is a SEG, they are read as they are and aligned like any other mask (with warnings).
    order = sorted(present, key=lambda r: is_dicom_seg(r.cases[case].path))
    full_ref = not is_dicom_seg(order[0].cases[case].path)
    ref_image: sitk.Image | None = None
    out = _CaseMasks(order[0].name, (1.0, 1.0, 1.0), {}, {}, {}, {}, {})
    for reader in order:
        item = reader.cases[case]
        image = read_label_image(item.path, reference=ref_image if full_ref and is_dicom_seg(item.path) else None)
        rmap = item.label_map or reader.label_map or label_map
        native = label_array(image, item.path)
        native_masks = class_masks(native, rmap, classes, union)
        note = ""
        aligned_masks = native_masks
        if ref_image is None:
            ref_image = image
            out.spacing_mm = spacing_zyx(image)
        else:
            aligned, note = align_to(ref_image, image, item.path, tolerance_mm)
            if aligned is not image:
                aligned_masks = class_masks(label_array(aligned, item.path), rmap, classes, union)
        voxel_ml = voxel_volume_ml(spacing_zyx(image))
        out.masks[reader.name] = aligned_masks
        out.volumes_ml[reader.name] = {c: float(np.count_nonzero(m)) * voxel_ml for c, m in native_masks.items()}
        out.notes[reader.name] = note
        out.unmapped[reader.name] = _present_values(native) - set(rmap)
        out.paths[reader.name] = item.path
    return out


def _load_readers(inputs: Sequence[Path], names: Sequence[str] | None) -> list[Reader]:
    if len(inputs) == 1 and inputs[0].suffix.lower() == ".csv":
        if names:
            raise InputError("--names applies to reader folders, not to a CSV (it names the readers)", "--names")
        readers = readers_from_csv(inputs[0])
    else:
        if any(p.suffix.lower() == ".csv" and p.is_file() for p in inputs):
            raise InputError("give either one CSV or two or more reader folders", inputs[0])
        if len(inputs) < 2:
            raise InputError("need masks from at least two readers (two or more folders, or one CSV)",
                             inputs[0] if inputs else None)
        readers = readers_from_folders(inputs, names)
    if len(readers) < 2:
        raise InputError(f"need at least two readers, found {len(readers)} ({readers[0].name})", inputs[0])
    return readers


def run_mask_agreement(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    labels: str = DEFAULT_LABELS,
    reader_labels: Sequence[str] = (),
    names: Sequence[str] | None = None,
    lungs: str | Path | None = None,
    union: str | None = None,
    tolerance_mm: float = GEOMETRY_TOLERANCE_MM,
) -> Report:
    """Agreement of reader masks; writes ``cases.csv``, ``volumes.csv``, ``summary.json`` and
    Bland–Altman PNGs into ``out_dir`` (atomically). ``inputs``: two or more reader folders, or one
    CSV (``case_id, reader, path[, labels][, lungs]``)."""
    inputs = [Path(p) for p in inputs]
    label_map = parse_label_map(labels)
    classes = classes_of(label_map)
    if union and (not _NAME_RE.match(union) or union in classes):
        raise InputError(f"--union name {union!r} must be a new class name", "--union")
    all_classes = classes + ([union] if union else [])
    if not (tolerance_mm >= 0):
        raise InputError(f"--tolerance-mm must be >= 0, got {tolerance_mm}", "--tolerance-mm")
    readers = _load_readers(inputs, names)
    parse_reader_labels(reader_labels, readers)
    for reader in readers:
        for m in [reader.label_map] + [c.label_map for c in reader.cases.values()]:
            if m and set(m.values()) - set(classes):
                raise InputError(f"reader {reader.name}: label map names {sorted(set(m.values()) - set(classes))} "
                                 f"not among --labels classes ({', '.join(classes)})", "--reader-labels")
    lung_cases: dict[str, Path] = {}
    if lungs is not None:
        lung_cases = {case: ci.path for case, ci in discover_masks(Path(lungs), lungs=True)[1].items()}

    all_cases = sorted({c for r in readers for c in r.cases})
    matched = [c for c in all_cases if sum(c in r.cases for r in readers) >= 2]
    if not matched:
        raise InputError("no case is present for two or more readers (cases match by relative file name "
                         "without suffix, or case_id in a CSV)", inputs[0])
    messages: list[str] = []
    for reader in readers:
        lacking = [c for c in matched if c not in reader.cases]
        if lacking:
            messages.append(f"reader {reader.name} lacks {len(lacking)} case(s) that others have: {_few(lacking)}")
    single = [c for c in all_cases if c not in matched]
    if single:
        messages.append(f"{len(single)} case(s) have a mask from one reader only, skipped: {_few(single)}")

    case_rows: list[dict[str, Any]] = []
    volume_rows: list[dict[str, Any]] = []
    resample_notes: dict[str, list[str]] = {r.name: [] for r in readers}
    unmapped: dict[str, set[int]] = {r.name: set() for r in readers}
    lungs_missing: list[str] = []
    for case in matched:
        present = [r for r in readers if case in r.cases]
        lung_ml = NAN
        lung_path = lung_cases.get(case) or next((r.cases[case].lungs for r in present if r.cases[case].lungs), None)
        if lung_path is not None:
            lung_ml = _lung_volume_ml(lung_path)
        elif lungs is not None or any(r.layout == "quantify" for r in present):
            lungs_missing.append(case)
        loaded = _load_case(case, present, label_map, classes, union, tolerance_mm)
        for reader in present:
            name, note = reader.name, loaded.notes[reader.name]
            unmapped[name] |= loaded.unmapped[name]
            if note:
                resample_notes[name].append(f"{case} ({note})")
            for cls, vol in loaded.volumes_ml[name].items():
                volume_rows.append({"case_id": case, "reader": name, "label": cls, "volume_ml": vol,
                                    "lung_volume_ml": lung_ml, "pct_lung": _pct(vol, lung_ml),
                                    "resampled": bool(note), "path": str(loaded.paths[name])})
        for cls in all_classes:
            for a, b in pairs_of([r.name for r in present]):
                m = mask_metrics(loaded.masks[a][cls], loaded.masks[b][cls], loaded.spacing_mm)
                va, vb = loaded.volumes_ml[a][cls], loaded.volumes_ml[b][cls]  # each reader's own grid
                moved = [r for r in (a, b) if loaded.notes[r]]
                notes = ([m["note"]] if m["note"] else []) + (
                    [f"{' and '.join(moved)} resampled onto {loaded.ref_name}'s grid"] if moved else [])
                case_rows.append({
                    "case_id": case, "label": cls, "reader_a": a, "reader_b": b,
                    "dice": m["dice"], "jaccard": m["jaccard"], "hd95_mm": m["hd95_mm"], "assd_mm": m["assd_mm"],
                    "volume_a_ml": va, "volume_b_ml": vb, "volume_diff_ml": va - vb, "lung_volume_ml": lung_ml,
                    "volume_diff_pct_lung": _pct(va - vb, lung_ml), "pct_lung_a": _pct(va, lung_ml),
                    "pct_lung_b": _pct(vb, lung_ml), "resampled": bool(moved), "note": "; ".join(notes),
                })
        del loaded
    for name, notes in resample_notes.items():
        if notes:
            messages.append(f"reader {name}: {len(notes)} mask(s) on a different grid were resampled onto the "
                            f"reference reader's grid with nearest neighbour (see 'resampled' in cases.csv): "
                            f"{_few(notes, 2)}")
    for name, values in unmapped.items():
        if values:
            messages.append(f"reader {name}: mask values {sorted(values)} are not in its label map and were "
                            "ignored (set --reader-labels or a 'labels' CSV column)")
    if lungs_missing:
        messages.append(f"{len(lungs_missing)} case(s) without a lung mask, no % of lung: {_few(lungs_missing)}")

    cases = pd.DataFrame(case_rows, columns=CASE_COLUMNS)
    volumes = pd.DataFrame(volume_rows, columns=VOLUME_COLUMNS)
    reader_names = [r.name for r in readers]
    provenance = _provenance(
        [{"reader": r.name, "source": r.source, "layout": r.layout, "n_cases": len(r.cases)} for r in readers],
        label_map={str(k): v for k, v in sorted(label_map.items())},
        reader_label_maps={r.name: format_label_map(r.label_map) for r in readers if r.label_map},
        per_file_label_maps=any(c.label_map for r in readers for c in r.cases.values()),
        union=union, lungs=str(Path(lungs).resolve()) if lungs is not None else None,
        tolerance_mm=tolerance_mm,
        definitions={
            "dice": "2|A∩B| / (|A|+|B|); 1 when both masks are empty",
            "hd95_mm": "as MONAI compute_hausdorff_distance(percentile=95): 95th percentile of surface distances, "
                       "larger of the two directions, real voxel spacing",
            "assd_mm": "as MONAI compute_average_surface_distance(symmetric=True): mean surface distance, both "
                       "directions pooled",
            "volume_ml": "each reader's own mask on its own grid",
            "volume_diff": "reader_a - reader_b; Bland-Altman limits = bias ± 1.96 SD",
            "pct_lung": "100 * volume / lung volume of the case (--lungs, else the first reader with a lung mask)",
            "grid": "per case, masks on another grid than the reference reader's (the first reader whose mask is not "
                    "a DICOM SEG) are resampled onto it (nearest neighbour); DICOM SEGs are read onto it",
        },
    )
    summary: dict[str, Any] = {"mode": "masks", "provenance": provenance, "readers": reader_names,
                               "classes": all_classes, "n_cases": len(matched), "labels": {}, "warnings": messages}
    files: list[str] = []
    with atomic_output_dir(out_dir) as tmp:
        for cls in all_classes:
            summary["labels"][cls] = _summarize_label(cases[cases["label"] == cls], volumes[volumes["label"] == cls],
                                                      cls, reader_names, tmp, files)
        _write_csv(cases, tmp / "cases.csv")
        _write_csv(volumes, tmp / "volumes.csv")
        _write_json(summary, tmp / "summary.json")
    return Report(mode="masks", out_dir=Path(out_dir), summary=jsonable(summary), warnings=messages,
                  files=["cases.csv", "volumes.csv", "summary.json", *files])


def _summarize_label(rows: pd.DataFrame, vols: pd.DataFrame, cls: str, readers: list[str], plot_dir: Path,
                     files: list[str]) -> dict[str, Any]:
    def block(frame: pd.DataFrame) -> dict[str, Any]:
        not_both = frame[frame["note"].str.contains("both empty") == False]  # noqa: E712
        return {
            "n_cases": int(len(frame)),
            "n_both_empty": int(frame["note"].str.contains("both empty").sum()),
            "n_one_empty": int(frame["note"].str.contains("one empty").sum()),
            "n_resampled": int(frame["resampled"].astype(bool).sum()),
            "dice": describe(frame["dice"]),
            "dice_excluding_both_empty": describe(not_both["dice"]),
            "jaccard": describe(frame["jaccard"]),
            "hd95_mm": describe(frame["hd95_mm"]),
            "assd_mm": describe(frame["assd_mm"]),
            "volume_diff_ml": describe(frame["volume_diff_ml"]),
        }

    out = {"n_cases": int(rows["case_id"].nunique()), **{k: v for k, v in block(rows).items() if k != "n_cases"},
           "pairs": {}}
    for a, b in pairs_of(readers):
        pair = rows[(rows["reader_a"] == a) & (rows["reader_b"] == b)]
        if len(pair):
            out["pairs"][_pair_key(a, b)] = {"reader_a": a, "reader_b": b, **block(pair)}
    wide_vol = vols.pivot_table(index="case_id", columns="reader", values="volume_ml", aggfunc="first")
    wide_vol = wide_vol.reindex(columns=[r for r in readers if r in wide_vol.columns])
    out["volume_ml"] = analyse_continuous(wide_vol, f"{cls}_volume_ml", units="mL", plot_dir=plot_dir, files=files)
    if vols["pct_lung"].notna().any():
        wide_pct = vols.pivot_table(index="case_id", columns="reader", values="pct_lung", aggfunc="first")
        wide_pct = wide_pct.reindex(columns=[r for r in readers if r in wide_pct.columns])
        out["pct_lung"] = analyse_continuous(wide_pct, f"{cls}_pct_lung", units="% of lung", plot_dir=plot_dir,
                                             files=files)
    else:
        out["pct_lung"] = None
    return out


def _few(items: Sequence[str], k: int = 5) -> str:
    items = list(items)
    return ", ".join(items[:k]) + (f", ... (+{len(items) - k} more)" if len(items) > k else "")


# --------------------------------------------------------------------------------------------------
# Table mode
# --------------------------------------------------------------------------------------------------


def parse_ordinal_specs(specs: Sequence[str]) -> dict[str, list[Any] | None]:
    """``--ordinal severity`` / ``--ordinal a,b`` / ``--ordinal "severity=none<mild<severe"`` → {measure:
    category order or None (numeric values, ordered by value)}."""
    out: dict[str, list[Any] | None] = {}
    for spec in specs or []:
        spec = str(spec).strip()
        if "=" in spec:
            name, _, order = spec.partition("=")
            levels = [_canon(v) for v in order.split("<") if v.strip()]
            if len(levels) < 2 or len(set(levels)) != len(levels):
                raise InputError(f"bad ordinal order {spec!r}; expected name=low<mid<high", "--ordinal")
            out[name.strip()] = levels
        else:
            for name in spec.split(","):
                if name.strip():
                    out[name.strip()] = None
    return out


def _canon(value: Any) -> Any:
    """A category value: numbers as int/float (so "1" == "1.0"), other text stripped; None if blank."""
    if value is None or _isnan(value):
        return None
    text = str(value).strip()
    if not text or text.lower() in {"nan", "na", "n/a"}:
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    if math.isfinite(number) and number == int(number):
        return int(number)
    return number


def read_measure_table(path: str | Path) -> tuple[dict[str, pd.DataFrame], list[str], str]:
    """Read a long (``case_id, reader, measure, value``) or wide (``case_id, reader, <measure>...``) CSV.

    Returns ({measure: case × reader DataFrame of raw strings, '' = missing}, readers, layout).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("table not found", path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"cannot read CSV: {_first_line(exc)}", path) from None
    frame.columns = [str(c).strip() for c in frame.columns]
    lower = {c.lower(): c for c in frame.columns}
    if "case_id" not in lower or "reader" not in lower:
        raise InputError("table needs columns case_id and reader (plus measure,value or one column per "
                         "measure)", path)
    frame = frame.rename(columns={lower["case_id"]: "case_id", lower["reader"]: "reader"})
    for col in frame.columns:
        frame[col] = frame[col].astype(str).str.strip()
    if "measure" in lower and "value" in lower:
        layout = "long"
        frame = frame.rename(columns={lower["measure"]: "measure", lower["value"]: "value"})
        long = frame[["case_id", "reader", "measure", "value"]]
    else:
        layout = "wide"
        measures = [c for c in frame.columns if c not in ("case_id", "reader")]
        if not measures:
            raise InputError("table has no measure columns", path)
        long = frame.melt(id_vars=["case_id", "reader"], value_vars=measures, var_name="measure", value_name="value")
    if (long["case_id"] == "").any() or (long["reader"] == "").any():
        raise InputError("table has rows with an empty case_id or reader", path)
    dup = long.duplicated(["case_id", "reader", "measure"], keep=False)
    if dup.any():
        first = long[dup].iloc[0]
        raise InputError(f"case {first['case_id']!r}, reader {first['reader']!r}, measure {first['measure']!r} "
                         "appears more than once", path)
    readers = list(dict.fromkeys(long["reader"]))
    tables = {}
    for measure, sub in long.groupby("measure", sort=False):
        wide = sub.pivot(index="case_id", columns="reader", values="value").reindex(columns=readers)
        tables[str(measure)] = wide.fillna("")
    return tables, readers, layout


def run_table_agreement(
    table: str | Path,
    out_dir: str | Path,
    *,
    categorical: Sequence[str] = (),
    ordinal: Sequence[str] = (),
) -> Report:
    """Agreement of per-case measures from a CSV; writes ``measures.csv``, ``summary.json`` and
    Bland–Altman PNGs (continuous measures) into ``out_dir`` atomically."""
    tables, readers, layout = read_measure_table(table)
    if len(readers) < 2:
        raise InputError(f"need at least two readers, the table has {len(readers)}", table)
    ordinal_specs = parse_ordinal_specs(ordinal)
    nominal = [n.strip() for spec in categorical or [] for n in str(spec).split(",") if n.strip()]
    unknown = sorted((set(nominal) | set(ordinal_specs)) - set(tables))
    if unknown:
        raise InputError(f"measure(s) {', '.join(unknown)} not in the table (it has: {', '.join(tables)})",
                         "--categorical/--ordinal")
    messages: list[str] = []
    summary: dict[str, Any] = {"measures": {}}
    rows: list[dict[str, Any]] = []
    files: list[str] = []
    with atomic_output_dir(out_dir) as tmp:
        for measure, raw in tables.items():
            n_matched = int((raw != "").sum(axis=1).ge(2).sum())
            if n_matched == 0:
                messages.append(f"measure {measure}: no case rated by two or more readers, skipped")
                summary["measures"][measure] = {"type": "skipped", "n_cases": 0}
                continue
            if measure in ordinal_specs or measure in nominal:
                wide = pd.DataFrame({c: [_canon(v) for v in raw[c]] for c in raw.columns}, index=raw.index,
                                    dtype=object)
                order = ordinal_specs.get(measure)
                is_ordinal = measure in ordinal_specs
                if is_ordinal and order is None:
                    bad = [v for v in wide.to_numpy().ravel() if v is not None and isinstance(v, str)]
                    if bad:
                        raise InputError(f"ordinal measure {measure!r} has non-numeric values (e.g. {bad[0]!r}); "
                                         f"give the order: --ordinal \"{measure}=low<...<high\"", table)
                if order is not None:
                    extra = sorted({str(v) for v in wide.to_numpy().ravel() if v is not None} - set(map(str, order)))
                    if extra:
                        raise InputError(f"measure {measure!r} has values {extra} not in its --ordinal order", table)
                    by_text = {str(o): o for o in order}
                    wide = pd.DataFrame({c: [None if v is None else by_text[str(v)] for v in wide[c]]
                                         for c in wide.columns}, index=wide.index, dtype=object)
                res = analyse_categorical(wide, categories=order, ordinal=is_ordinal)
                for key, pair in res["pairs"].items():
                    rows.append({"measure": measure, "type": res["type"], "reader_a": pair["reader_a"],
                                 "reader_b": pair["reader_b"], "n": pair["n"], "pct_agreement": pair["pct_agreement"],
                                 "kappa": pair["kappa"]["value"],
                                 "kappa_linear": pair.get("kappa_linear", {}).get("value", NAN),
                                 "kappa_quadratic": pair.get("kappa_quadratic", {}).get("value", NAN)})
                if "fleiss" in res:
                    rows.append({"measure": measure, "type": res["type"], "reader_a": "(all)", "reader_b": "",
                                 "n": res["fleiss"]["n"], "pct_agreement": res["fleiss"]["pct_pairwise_agreement"],
                                 "fleiss_kappa": res["fleiss"]["kappa"]})
            else:
                numeric = raw.apply(lambda col: pd.to_numeric(col.replace("", np.nan), errors="coerce"))
                bad = raw[(numeric.isna()) & (raw != "")].stack()
                bad = [v for v in bad if str(v).strip().lower() not in {"nan", "na", "n/a"}]
                if bad:
                    raise InputError(f"measure {measure!r} has non-numeric values (e.g. {bad[0]!r}); declare it "
                                     "with --categorical or --ordinal", table)
                res = {"type": "continuous", **analyse_continuous(numeric.astype(float), measure, plot_dir=tmp,
                                                                  files=files)}
                for key, pair in res["pairs"].items():
                    ba, cor = pair["bland_altman"], pair["correlation"]
                    rows.append({"measure": measure, "type": "continuous", "reader_a": pair["reader_a"],
                                 "reader_b": pair["reader_b"], "n": ba["n"], "bias": ba["bias"],
                                 "sd_diff": ba["sd_diff"], "loa_lower": ba["loa_lower"], "loa_upper": ba["loa_upper"],
                                 "pearson_r": cor["pearson_r"], "spearman_rho": cor["spearman_rho"],
                                 "icc2_1": pair["icc"]["icc2_1"]["value"], "icc3_1": pair["icc"]["icc3_1"]["value"]})
                rows.append({"measure": measure, "type": "continuous", "reader_a": "(all)", "reader_b": "",
                             "n": res["icc"]["n_cases"], "icc2_1": res["icc"]["icc2_1"]["value"],
                             "icc3_1": res["icc"]["icc3_1"]["value"]})
            summary["measures"][measure] = res
        columns = ["measure", "type", "reader_a", "reader_b", "n", "bias", "sd_diff", "loa_lower", "loa_upper",
                   "pearson_r", "spearman_rho", "icc2_1", "icc3_1", "pct_agreement", "kappa", "kappa_linear",
                   "kappa_quadratic", "fleiss_kappa"]
        summary = {
            "mode": "table",
            "provenance": _provenance([{"table": str(Path(table).resolve()), "layout": layout}],
                                      categorical=nominal, ordinal={k: v for k, v in ordinal_specs.items()}),
            "readers": readers,
            **summary,
            "warnings": messages,
        }
        _write_csv(pd.DataFrame(rows, columns=columns), tmp / "measures.csv")
        _write_json(summary, tmp / "summary.json")
    return Report(mode="table", out_dir=Path(out_dir), summary=jsonable(summary), warnings=messages,
                  files=["measures.csv", "summary.json", *files])


# --------------------------------------------------------------------------------------------------
# Terminal summary
# --------------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _fmt_icc(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "–"
    lo, hi = entry.get("ci95") or [None, None]
    return f"{_fmt(entry['value'], 2)} [{_fmt(lo, 2)}, {_fmt(hi, 2)}]"


def print_summary(report: Report, console: Any = None) -> None:
    """Print a short rich table of the results (one row per label/measure and reader pair)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=160)  # as the other commands: no wrapping in logs and pipes
    s = report.summary
    if report.mode == "masks":
        table = Table(title=f"Reader agreement: {s['n_cases']} case(s), readers {', '.join(s['readers'])}")
        table.caption = "HD95/ASSD: medians; volume bias = reader_a − reader_b with 95 % limits of agreement"
        for col in ("label", "pair", "n", "Dice mean", "Dice median", "HD95 mm", "ASSD mm",
                    "vol. bias mL [LoA]", "ICC(2,1) vol. [CI]"):
            table.add_column(col, justify="left" if col in ("label", "pair") else "right")
        for cls, lab in s["labels"].items():
            for key, pair in lab["pairs"].items():
                vol = lab["volume_ml"]["pairs"].get(key, {})
                ba = vol.get("bland_altman", {})
                table.add_row(cls, key, str(pair["n_cases"]), _fmt(pair["dice"]["mean"]),
                              _fmt(pair["dice"]["median"]), _fmt(pair["hd95_mm"]["median"]),
                              _fmt(pair["assd_mm"]["median"]),
                              f"{_fmt(ba.get('bias'))} [{_fmt(ba.get('loa_lower'))}, {_fmt(ba.get('loa_upper'))}]",
                              _fmt_icc((vol.get("icc") or {}).get("icc2_1")))
            if len(lab["pairs"]) > 1:  # the all-readers ICC, labelled as such
                everyone = lab["volume_ml"]["icc"]
                table.add_row(cls, f"all {everyone.get('n_readers', '')} readers", str(everyone.get("n_cases", "")),
                              "", "", "", "", "", _fmt_icc(everyone.get("icc2_1")))
    else:
        table = Table(title=f"Reader agreement: readers {', '.join(s['readers'])}")
        for col in ("measure", "type", "pair", "n", "agreement", "ICC(2,1) [CI] / κ"):
            table.add_column(col, justify="left" if col in ("measure", "type", "pair") else "right")
        for name, res in s["measures"].items():
            kind = res.get("type", "")
            if kind == "skipped":
                table.add_row(name, kind, "", "0", "–", "–")
                continue
            for key, pair in res["pairs"].items():
                if kind == "continuous":
                    ba = pair["bland_altman"]
                    text = f"bias {_fmt(ba['bias'])} [{_fmt(ba['loa_lower'])}, {_fmt(ba['loa_upper'])}]"
                    n = ba["n"]
                    own = _fmt_icc((pair.get("icc") or {}).get("icc2_1"))
                else:
                    text = f"κ {_fmt(pair['kappa']['value'], 2)}, {_fmt(pair['pct_agreement'], 3)}% agree"
                    if kind == "ordinal":
                        text += (f", κw lin {_fmt(pair['kappa_linear']['value'], 2)}"
                                 f" quad {_fmt(pair['kappa_quadratic']['value'], 2)}")
                    n = pair["n"]
                    own = f"κ {_fmt(pair['kappa']['value'], 2)}"
                table.add_row(name, kind, key, str(n), text, own)
            if len(res["pairs"]) > 1:  # the all-readers statistic, labelled as such
                if kind == "continuous":
                    everyone = res["icc"]
                    table.add_row(name, kind, f"all {everyone.get('n_readers', '')} readers",
                                  str(everyone.get("n_cases", "")), "", _fmt_icc(everyone.get("icc2_1")))
                elif res.get("fleiss"):
                    table.add_row(name, kind, f"all {len(s['readers'])} readers (Fleiss κ)",
                                  str(res["fleiss"]["n"]), f"{_fmt(res['fleiss']['pct_pairwise_agreement'], 3)}% agree",
                                  _fmt(res["fleiss"]["kappa"]))
    console.print(table)
    console.print(f"Outputs in {report.out_dir}: {', '.join(report.files[:4])}"
                  + (f" and {len(report.files) - 4} more" if len(report.files) > 4 else ""))
