#!/usr/bin/env python
"""Evaluate the shipped lesion model on labelled 2D slices (0 background, 1 GGO, 2 consolidation).

Usage::

    python scripts/evaluate_lesion_model.py --images DIR --labels DIR --json OUT.json \
        [--device cpu|cuda|auto] [--model PATH] [--only-split val|train --split configs/lesion_split.json]

Every ``DIR/N.jpg`` or ``DIR/N.png`` is read with its label ``LABELS/N.png``, normalised and segmented
exactly as the product does (``ctquant.segment.lesion_model.image8_to_unit`` then ``predict_slices``: resize to
the model's input size, softmax, bilinear resize back, argmax). The whole image is the crop (these
exports are already framed around the lungs; no lung mask is applied).

Real HU data are read too, normalised as the product normalises (``hu_to_unit``, lung crop):

- ``DIR/N.dcm`` single DICOM slices (HU through RescaleSlope/Intercept) with ``LABELS/N.png`` (or
  ``N.nii.gz``) on the slice grid: the slice is cropped to the bounding box of a crude 2D lung mask
  (air below -400 HU inside the body, the two largest components, 1 % margin, as
  ``lung_crop_box``) and run; pixels outside the crop are background;
- ``DIR/N.nii.gz`` (``.nii``, ``.nrrd``, ``.mha``) volumes with a label volume ``LABELS/N.nii.gz`` on
  the same grid: lungs from the product's lung step (``ctquant.segment.lungs.segment_lungs``), lesions from
  ``segment_lesions``; every axial slice with labelled lesion is one image (``N.nii.gz#z``).

``--unlabelled`` scores nothing: it runs every image (labelled or not) and reports the predicted GGO and
consolidation share of the crop and their median HU (the check of the HU window on real COVID-19).

``--hybrids`` paints pneumonia (``ctquant.synthetic.hybrid.paint_pneumonia``, ``--hybrid-seed``, moderate and
severe) into the same scans (``--part``) and reports the share of painted consolidation / GGO the model calls
consolidation / GGO inside the reference lungs, and the volume errors (``hybrid_scores``)::

    python scripts/evaluate_lesion_model.py --hybrids --part held_out --hybrid-seed 1 --json OUT.json

``--specificity`` runs the held-out scans without pneumonia of ``configs/lesion_split.json``
(``real_ct_negatives``; ``--part train|held_out|all``) and reports GGO, consolidation and opacity in %
of each lung, for the model and for ``--method hu``, inside the product's lung masks and inside the
reference lung masks; ``--pixels-averaged 2`` does the same on the scans averaged over 2 x 2 pixels (a
256 matrix, roughly)::

    python scripts/evaluate_lesion_model.py --specificity --json OUT.json [--part held_out] [--pixels-averaged 2]

``--pool-folds`` pools a cross-validation: each fold's scoring of its own held-out slices, one JSON per
fold, into the out-of-fold figures that ``--record-accuracy`` takes as its CV.json::

    python scripts/evaluate_lesion_model.py --pool-folds EVAL0.json EVAL1.json EVAL2.json --what TEXT --json CV.json

Scores are per-image Dice for GGO, consolidation and lesion (GGO ∪ consolidation), with the
convention: class absent from both prediction and label → 1, absent from one only → 0; a set's figure
is the mean over images. Lesion-area error is predicted minus labelled lesion area, in % of image pixels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from ctquant.measures import overlap  # noqa: E402
from ctquant.segment import lesion_model as lm  # noqa: E402
from ctquant.errors import CtquantError  # noqa: E402
from real_ct import averaged, load_reference_scan, lung_fold_model_path  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DICOM_SUFFIXES = (".dcm",)
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
DATA_ROOT = REPO_ROOT.parent / "shared" / "data"


def image_kind(path: Path) -> str | None:
    """``slice8`` (8-bit export), ``dicom`` (one HU slice), ``volume`` (HU volume file) or None."""
    name = path.name.lower()
    if name.endswith(IMAGE_SUFFIXES):
        return "slice8"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    if name.endswith(VOLUME_SUFFIXES):
        return "volume"
    return None


def stem_of(path: Path) -> str:
    """File name without its (possibly double) suffix."""
    name = path.name
    for suffix in VOLUME_SUFFIXES + DICOM_SUFFIXES + IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_dicom_hu(path: Path) -> np.ndarray:
    """One DICOM slice in HU (float32, (h, w)) through RescaleSlope/Intercept."""
    import pydicom

    ds = pydicom.dcmread(str(path))
    pixels = ds.pixel_array.astype(np.float32)
    if pixels.ndim != 2:
        raise ValueError(f"{path}: expected one 2D slice, got pixel array {pixels.shape}")
    return pixels * float(getattr(ds, "RescaleSlope", 1.0) or 1.0) + float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)


def crude_lung_mask_2d(hu: np.ndarray, air_hu: float = -400.0, min_share: float = 0.002) -> np.ndarray:
    """Air inside the body on one slice: below ``air_hu``, not touching the image border, the two
    largest components (each at least ``min_share`` of the slice). Used only to place the crop box."""
    from scipy import ndimage as ndi

    air = np.asarray(hu) < air_hu
    labels, n = ndi.label(air)
    if n == 0:
        return np.zeros(air.shape, bool)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    sizes = ndi.sum(air, labels, index=np.arange(1, n + 1))
    sizes[border[border > 0] - 1] = 0
    keep = [i + 1 for i in np.argsort(sizes)[::-1][:2] if sizes[i] >= min_share * air.size]
    return np.isin(labels, keep)


def predict_hu_slice(model: lm.LesionModel, hu: np.ndarray) -> np.ndarray:
    """Labels (h, w) of one HU slice: crude lung box crop, ``hu_to_unit``, ``predict_slices``."""
    lung = crude_lung_mask_2d(hu)
    box = lm.lung_crop_box(lung[None])
    labels = np.zeros(hu.shape, dtype=np.uint8)
    if box is None:
        return labels
    _, y_box, x_box = box
    labels[y_box, x_box] = lm.predict_slices(model, lm.hu_to_unit(hu[y_box, x_box], model.hu_window)[None])[0]
    return labels


def find_pairs(images_dir: Path, labels_dir: Path | None) -> tuple[list[tuple[str, Path, Path | None]], list[str]]:
    """(name, image path, label path) for every image with a label; and the unlabelled names.

    Labels: ``<stem>.png`` for 8-bit exports, ``<stem>.png`` or ``<stem>.nii.gz`` for DICOM slices,
    ``<stem>.nii.gz`` (or the image's own file name) for volumes. With ``labels_dir`` None every
    image is returned with label None.
    """
    pairs, unlabelled = [], []
    files = [p for p in images_dir.iterdir() if p.is_file() and image_kind(p)]
    files.sort(key=lambda p: (0, int(stem_of(p)), "") if stem_of(p).isdigit() else (1, 0, p.name))
    for path in files:
        stem = stem_of(path)
        if labels_dir is None:
            pairs.append((path.name, path, None))
            continue
        kind = image_kind(path)
        names = {"slice8": [f"{stem}.png"], "dicom": [f"{stem}.png", f"{stem}.nii.gz"],
                 "volume": [f"{stem}.nii.gz", path.name]}[kind]
        label = next((labels_dir / n for n in names if (labels_dir / n).is_file()), None)
        if label is not None:
            pairs.append((path.name, path, label))
        else:
            unlabelled.append(path.name)
    return pairs, unlabelled


def read_label_image(path: Path) -> np.ndarray:
    """A label image or volume as uint8 (values 0/1/2 checked by the caller)."""
    name = path.name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        import SimpleITK as sitk

        label = np.asarray(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
    else:
        label = np.array(Image.open(path))
        if label.ndim == 3:
            label = label[..., 0]
    return label


def read_pair(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The grey image (uint8) and its label image (uint8, values 0/1/2), checked to match."""
    image = np.array(Image.open(image_path).convert("L"))
    label = np.array(Image.open(label_path))
    if label.ndim == 3:
        label = label[..., 0]
    if label.shape != image.shape:
        raise ValueError(f"{label_path}: label shape {label.shape} differs from image {image.shape}")
    if label.max(initial=0) > 2:
        raise ValueError(f"{label_path}: label values {np.unique(label).tolist()} outside 0/1/2")
    return image, label.astype(np.uint8)


def _check_label(label: np.ndarray, shape: tuple[int, ...], path: Path) -> np.ndarray:
    if label.shape != tuple(shape):
        raise ValueError(f"{path}: label shape {label.shape} differs from image {tuple(shape)}")
    if label.max(initial=0) > 2 or label.min(initial=0) < 0:
        raise ValueError(f"{path}: label values {np.unique(label).tolist()[:8]} outside 0/1/2")
    return label.astype(np.uint8)


def predictions(model: lm.LesionModel, pairs: list[tuple[str, Path, Path | None]]):
    """Yield (name, prediction, label or None, HU image or None, ms) per scored image."""
    for name, image_path, label_path in pairs:
        kind = image_kind(image_path)
        if kind == "slice8":
            if label_path is None:
                image, label = np.array(Image.open(image_path).convert("L")), None
            else:
                image, label = read_pair(image_path, label_path)
            t0 = time.perf_counter()
            pred = lm.predict_slices(model, lm.image8_to_unit(image)[None])[0]
            yield name, pred, label, None, (time.perf_counter() - t0) * 1000.0
        elif kind == "dicom":
            hu = read_dicom_hu(image_path)
            label = None if label_path is None else _check_label(np.squeeze(read_label_image(label_path)), hu.shape, label_path)
            t0 = time.perf_counter()
            pred = predict_hu_slice(model, hu)
            yield name, pred, label, hu, (time.perf_counter() - t0) * 1000.0
        else:
            from ctquant.io.scans import load_scan
            from ctquant.segment.lungs import segment_lungs

            scan = load_scan(image_path)
            labels = None if label_path is None else _check_label(read_label_image(label_path), scan.hu.shape, label_path)
            t0 = time.perf_counter()
            lungs = segment_lungs(scan.hu, scan.spacing_mm)
            pred = lm.segment_lesions(scan.hu, lungs, model, spacing_mm=scan.spacing_mm,
                                      **model_postprocessing())
            ms = (time.perf_counter() - t0) * 1000.0
            zs = np.flatnonzero((labels if labels is not None else pred).any(axis=(1, 2)))
            for z in zs:
                yield f"{name}#{int(z)}", pred[z], None if labels is None else labels[z], scan.hu[z], ms / max(1, len(zs))


def median_hu(hu: np.ndarray | None, mask: np.ndarray) -> float | None:
    """Median HU under ``mask`` (None without HU or pixels)."""
    if hu is None or not mask.any():
        return None
    return round(float(np.median(hu[mask])), 1)


def describe(model: lm.LesionModel, pairs: list[tuple[str, Path, Path | None]]) -> list[dict]:
    """Per-image predicted GGO/consolidation share of the image and their median HU (no label needed)."""
    rows = []
    for name, pred, _, hu, ms in predictions(model, pairs):
        rows.append({
            "name": name, "height": int(pred.shape[0]), "width": int(pred.shape[1]),
            "ggo_area_pct_pred": round(100.0 * float((pred == lm.GGO).mean()), 3),
            "consolidation_area_pct_pred": round(100.0 * float((pred == lm.CONSOLIDATION).mean()), 3),
            "ggo_median_hu_pred": median_hu(hu, pred == lm.GGO),
            "consolidation_median_hu_pred": median_hu(hu, pred == lm.CONSOLIDATION),
            "ms": round(ms, 1),
        })
    return rows


def evaluate(model: lm.LesionModel, pairs: list[tuple[str, Path, Path | None]]) -> list[dict]:
    """Per-image scores of ``model`` on ``pairs``."""
    rows = []
    for name, pred, label, hu, ms in predictions(model, pairs):
        area_pred = 100.0 * float((pred > 0).mean())
        area_label = 100.0 * float((label > 0).mean())
        rows.append({
            "name": name,
            "height": int(pred.shape[0]), "width": int(pred.shape[1]),
            **{k: round(v, 4) for k, v in overlap.class_dice(pred, label).items()},
            "ggo_area_pct_pred": round(100.0 * float((pred == lm.GGO).mean()), 3),
            "ggo_area_pct_label": round(100.0 * float((label == lm.GGO).mean()), 3),
            "consolidation_area_pct_pred": round(100.0 * float((pred == lm.CONSOLIDATION).mean()), 3),
            "consolidation_area_pct_label": round(100.0 * float((label == lm.CONSOLIDATION).mean()), 3),
            "lesion_area_pct_pred": round(area_pred, 3),
            "lesion_area_pct_label": round(area_label, 3),
            "lesion_area_error_pct": round(area_pred - area_label, 3),
            "ms": round(ms, 1),
        })
        if hu is not None:
            rows[-1]["ggo_median_hu_pred"] = median_hu(hu, pred == lm.GGO)
            rows[-1]["consolidation_median_hu_pred"] = median_hu(hu, pred == lm.CONSOLIDATION)
    return rows


def model_postprocessing() -> dict[str, float]:
    """The model's volume post-processing of ``configs/quantify.yaml``, as the product applies it
    (:func:`ctquant.segment.lesion_model.postprocess_settings`)."""
    from ctquant.config import load_quantify_config

    return lm.postprocess_settings(load_quantify_config())


def lesions_hu_method(hu: np.ndarray, lungs: np.ndarray, spacing_mm: tuple[float, float, float],
                      config: dict) -> np.ndarray:
    """``--method hu`` lesions exactly as ``ctquant.run.scan.analyse_scan`` calls them."""
    from ctquant.segment.lesions import segment_lesions_hu_config

    return segment_lesions_hu_config(hu, lungs, spacing_mm, config)


def specificity(model: lm.LesionModel, real_ct: Path, entries: list[dict], with_hu: bool = True,
                pixels_averaged: int = 1) -> list[dict]:
    """GGO / consolidation / opacity % of each lung on scans without pneumonia, per lung mask and method.

    Lung masks: ``product`` (the product's lung step, :func:`ctquant.segment.lung_model.segment_lungs_with_model`,
    with the lung network trained without the scan when there is one) and ``reference`` (the scan's
    reference in ``configs/real_ct_references.json``); methods: ``model`` and (``with_hu``) ``hu``. Slices in
    ``exclude_z`` (e.g. a tumour) are left out of both lung masks before measuring. With ``pixels_averaged``
    > 1 each scan is first averaged over that many pixels along y and x (a coarser matrix; its reference by
    majority, :func:`real_ct.averaged`) and the product's lungs are found on the averaged scan.
    """
    from ctquant.config import load_quantify_config
    from ctquant.segment.lung_model import load_lung_model, segment_lungs_with_model
    from ctquant.measures.volumes import lung_measures

    config = load_quantify_config()
    rows = []
    for entry in entries:
        hu, spacing, reference = load_reference_scan(real_ct, entry["scan"])
        if pixels_averaged > 1:
            hu, reference = averaged(hu, (1, pixels_averaged, pixels_averaged), reference)
            spacing = (spacing[0], spacing[1] * pixels_averaged, spacing[2] * pixels_averaged)
        fold = lung_fold_model_path(entry["scan"])
        lung_model = load_lung_model(fold if fold.is_file() else None)
        t0 = time.perf_counter()
        product = segment_lungs_with_model(hu, spacing, lung_model)
        lung_s = time.perf_counter() - t0
        masks = {"product": product, "reference": reference}
        for low, high in entry.get("exclude_z", []):
            for mask in masks.values():
                mask[int(low):int(high)] = 0
        row: dict = {"scan": entry["scan"], "shape": list(hu.shape), "spacing_mm": [round(v, 3) for v in spacing],
                     "lung_step_seconds": round(lung_s, 1),
                     "lung_model": lung_model.path.name, "excluded_z": entry.get("exclude_z", [])}
        for mask_name, lungs in masks.items():
            methods = {"model": lambda: lm.segment_lesions(hu, lungs, model, spacing_mm=spacing,
                                                           **model_postprocessing())}
            if with_hu:
                methods["hu"] = lambda: lesions_hu_method(hu, lungs, spacing, config)
            for method, run in methods.items():
                t0 = time.perf_counter()
                lesions = run()
                seconds = time.perf_counter() - t0
                m = lung_measures(hu, lungs, lesions, spacing)
                row[f"{method}_in_{mask_name}_lungs"] = {
                    side: {k: m[side][k] for k in ("lung_volume_ml", "ggo_pct", "consolidation_pct", "opacity_pct")}
                    for side in ("right", "left", "both")}
                row[f"{method}_in_{mask_name}_lungs"]["seconds"] = round(seconds, 2)
                if method == "model":
                    row[f"{method}_in_{mask_name}_lungs"]["ggo_median_hu"] = median_hu(hu, lesions == lm.GGO)
                    row[f"{method}_in_{mask_name}_lungs"]["consolidation_median_hu"] = median_hu(
                        hu, lesions == lm.CONSOLIDATION)
        rows.append(row)
    return rows


def hybrid_scores(pred: np.ndarray, truth: np.ndarray, lungs: np.ndarray) -> dict[str, float]:
    """How a prediction reads painted pneumonia inside ``lungs`` (all (z, y, x); labels 0/1 GGO/2 consolidation).

    ``consolidation_called_consolidation_pct``: % of painted consolidation voxels called consolidation;
    ``consolidation_called_lesion_pct``: called GGO or consolidation; ``ggo_called_ggo_pct``,
    ``ggo_called_lesion_pct`` likewise for painted GGO; ``ggo_volume_error_pct`` and
    ``consolidation_volume_error_pct``: predicted minus painted volume inside the lungs, in % of the
    painted volume; ``*_pct_of_lung``: painted and predicted shares of the lung volume.
    """
    inside = np.asarray(lungs) > 0
    pred = np.where(inside, pred, 0)
    truth = np.where(inside, truth, 0)
    n_lung = max(1, int(inside.sum()))
    out: dict[str, float] = {}
    for label, key in ((lm.GGO, "ggo"), (lm.CONSOLIDATION, "consolidation")):
        painted = truth == label
        n_painted = int(painted.sum())
        n_pred = int((pred == label).sum())
        out[f"{key}_called_{key}_pct"] = round(100.0 * int((painted & (pred == label)).sum()) / max(1, n_painted), 2)
        out[f"{key}_called_lesion_pct"] = round(100.0 * int((painted & (pred > 0)).sum()) / max(1, n_painted), 2)
        out[f"{key}_volume_error_pct"] = round(100.0 * (n_pred - n_painted) / max(1, n_painted), 1)
        out[f"{key}_painted_pct_of_lung"] = round(100.0 * n_painted / n_lung, 3)
        out[f"{key}_pred_pct_of_lung"] = round(100.0 * n_pred / n_lung, 3)
    return out


def hybrids(model: lm.LesionModel, real_ct: Path, entries: list[dict], seed: int,
            severities: tuple[str, ...] = ("moderate", "severe")) -> list[dict]:
    """Pneumonia painted (``ctquant.synthetic.hybrid.paint_pneumonia``, ``seed``) into each scan of ``entries``,
    segmented by the model inside the reference lungs as the product does (lung crop, minimum component),
    scored by :func:`hybrid_scores`; slices in ``exclude_z`` are left out of the lungs."""
    from ctquant.synthetic.hybrid import paint_pneumonia

    rows = []
    for entry in entries:
        hu, spacing, reference = load_reference_scan(real_ct, entry["scan"])
        for severity in severities:
            case = paint_pneumonia(hu, reference, spacing, severity=severity, seed=seed)
            lungs = case.lung_labels.copy()
            for low, high in entry.get("exclude_z", []):
                lungs[int(low):int(high)] = 0
            t0 = time.perf_counter()
            pred = lm.segment_lesions(case.hu, lungs, model, spacing_mm=spacing,
                                      **model_postprocessing())
            rows.append({"scan": entry["scan"], "severity": severity, "seed": seed, "lungs": "reference",
                         "seconds": round(time.perf_counter() - t0, 2),
                         **hybrid_scores(pred, case.lesion_labels, lungs)})
    return rows


def print_specificity(rows: list[dict]) -> None:
    """One line per scan, lung mask and method: GGO / consolidation % of right, left lung."""
    print(f"{'scan':<34}{'lungs':<11}{'method':<7}{'GGO % R / L / both':>22}{'cons % R / L / both':>22}")
    for row in rows:
        for key, value in row.items():
            if not key.endswith("_lungs"):
                continue
            method, _, mask = key.removesuffix("_lungs").partition("_in_")
            g = " / ".join(f"{value[s]['ggo_pct']:.2f}" for s in ("right", "left", "both"))
            c = " / ".join(f"{value[s]['consolidation_pct']:.2f}" for s in ("right", "left", "both"))
            print(f"{row['scan'][:33]:<34}{mask:<11}{method:<7}{g:>22}{c:>22}")


def summarise(rows: list[dict]) -> dict:
    """Means over images of the per-image figures."""
    def mean(key: str) -> float:
        return round(float(np.mean([r[key] for r in rows])), 4)

    errors = np.array([r["lesion_area_error_pct"] for r in rows])
    return {
        "n_images": len(rows),
        "dice_ggo": mean("dice_ggo"),
        "dice_consolidation": mean("dice_consolidation"),
        "dice_lesion": mean("dice_lesion"),
        "lesion_area_error_pct_mean": round(float(errors.mean()), 3),
        "lesion_area_abs_error_pct_mean": round(float(np.abs(errors).mean()), 3),
        "lesion_area_pct_label_mean": mean("lesion_area_pct_label"),
        "lesion_area_pct_pred_mean": mean("lesion_area_pct_pred"),
    }


def pool_folds(fold_results: list[dict], what: str) -> dict:
    """Out-of-fold figures of a cross-validation: the per-image rows of each fold's scoring JSON pooled.

    Each image must be scored by exactly one fold. Returns :func:`summarise` of the pooled rows, the
    median and the 95 % CI half-width (t distribution) of each Dice, each fold's means, and ``what``: the
    shape :func:`accuracy_card` takes as its ``cv``.
    """
    rows = [row for result in fold_results for row in result["per_image"]]
    names = [row["name"] for row in rows]
    if len(set(names)) != len(names):
        raise ValueError("an image is scored by more than one fold")
    pooled = {**summarise(rows), "what": what, "n_folds": len(fold_results)}
    folds = [summarise(result["per_image"]) for result in fold_results]
    t = float(stats.t.ppf(0.975, len(rows) - 1)) if len(rows) > 1 else float("nan")
    for key in ("dice_ggo", "dice_consolidation", "dice_lesion"):
        values = np.array([row[key] for row in rows], dtype=float)
        pooled[f"{key}_median"] = round(float(np.median(values)), 4)
        pooled[f"{key}_ci95_half_width"] = round(t * float(values.std(ddof=1)) / np.sqrt(len(values)), 4)
        pooled[f"{key}_folds"] = [fold[key] for fold in folds]
    pooled["n_images_folds"] = [fold["n_images"] for fold in folds]
    return pooled


def print_table(rows: list[dict], summary: dict) -> None:
    """A plain-text table of per-image and mean figures."""
    header = f"{'image':<14}{'GGO':>7}{'cons':>7}{'lesion':>8}{'area% lab':>11}{'area% pred':>11}{'err':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:<14}{r['dice_ggo']:>7.3f}{r['dice_consolidation']:>7.3f}{r['dice_lesion']:>8.3f}"
              f"{r['lesion_area_pct_label']:>11.2f}{r['lesion_area_pct_pred']:>11.2f}{r['lesion_area_error_pct']:>+8.2f}")
    print("-" * len(header))
    print(f"{'mean (n=%d)' % summary['n_images']:<14}{summary['dice_ggo']:>7.3f}{summary['dice_consolidation']:>7.3f}"
          f"{summary['dice_lesion']:>8.3f}{summary['lesion_area_pct_label_mean']:>11.2f}"
          f"{summary['lesion_area_pct_pred_mean']:>11.2f}{summary['lesion_area_error_pct_mean']:>+8.2f}")
    print(f"mean |lesion-area error|: {summary['lesion_area_abs_error_pct_mean']:.2f} % of image pixels")


def accuracy_card(val: dict, spec: dict, cv: dict | None = None) -> dict:
    """The ``ctquant_accuracy`` block of ``configs/metadata.json`` that the reports quote.

    ``val``: this script's JSON on the held-out medseg-2d slices; ``spec``: its ``--specificity`` JSON
    (held-out scans; with the HU figures); ``cv``: optional ``{"dice_ggo", "dice_consolidation",
    "dice_lesion", "n_images", "what"}`` of the cross-validation.
    """
    if spec.get("pixels_averaged", 1) != 1:
        raise ValueError("the specificity figures to record are the scans' own pixels, not --pixels-averaged")
    figures, hu_figures = {}, {}
    for row in spec["scans"]:
        for method, target in (("model", figures), ("hu", hu_figures)):
            ref = row.get(f"{method}_in_reference_lungs")
            if ref:
                target[row["scan"]] = {
                    "lungs": "reference",
                    "ggo_pct_max_lung": max(ref[s]["ggo_pct"] for s in ("right", "left")),
                    "consolidation_pct_max_lung": max(ref[s]["consolidation_pct"] for s in ("right", "left")),
                    "opacity_pct_both": ref["both"]["opacity_pct"]}
    scans = ", ".join(figures)

    def worst(table: dict, key: str) -> float:
        return max(v[key] for v in table.values())

    model = {
        "validation_dice": {"n": val["n_images"], "ggo": val["dice_ggo"], "consolidation": val["dice_consolidation"],
                            "lesion": val["dice_lesion"]},
        "validation": (f"Validation on {val['n_images']} held-out medseg-2d COVID-19 slices (mean per-image Dice): "
                       f"GGO {val['dice_ggo']:.2f}, consolidation {val['dice_consolidation']:.2f}, "
                       f"lesion {val['dice_lesion']:.2f}; a small set, about ±0.1 either way."),
        "specificity_figures": figures,
        "specificity": (f"On {len(figures)} held-out real scan(s) without pneumonia ({scans}; reference lung masks) "
                        f"it called at most {worst(figures, 'ggo_pct_max_lung'):.2f} % GGO and "
                        f"{worst(figures, 'consolidation_pct_max_lung'):.2f} % consolidation of a lung: "
                        "a spot check on few normal scans, not a specificity estimate."),
    }
    if cv:
        model["cross_validation_dice"] = {k: cv[k] for k in ("n_images", "dice_ggo", "dice_consolidation", "dice_lesion")}
        model["cross_validation"] = (f"{cv['what']}: GGO {cv['dice_ggo']:.2f}, consolidation "
                                     f"{cv['dice_consolidation']:.2f}, lesion {cv['dice_lesion']:.2f} "
                                     f"(n = {cv['n_images']}).")
    card = {"model_sha256": spec["model"]["sha256"], "model": model,
            "see": "Figures, data and limits: models/README.md (model card)."}
    if val["model"]["sha256"] != spec["model"]["sha256"]:
        raise ValueError("validation and specificity results come from different model files")
    if hu_figures:
        card["hu"] = {"specificity_figures": hu_figures,
                      "specificity": (f"HU bands on the same held-out scan(s) without pneumonia: up to "
                                      f"{worst(hu_figures, 'ggo_pct_max_lung'):.1f} % GGO and "
                                      f"{worst(hu_figures, 'consolidation_pct_max_lung'):.1f} % consolidation of "
                                      "a lung with no pneumonia there (dependent lung, partial volume, noise): "
                                      "HU-band figures up to that level are not evidence of disease. "
                                      "Measured with configs/quantify.yaml as it was then; re-record after changing it.")}
    return card


def write_json(path: Path, doc: dict) -> None:
    """Write ``doc`` to ``path`` whole or not at all (``ctquant.outputs.atomic.atomic_write_text``)."""
    from ctquant.outputs.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


def _error(where: object, reason: str) -> None:
    print(f"evaluate_lesion_model: error: {where}: {reason}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, help="folder of N.jpg|png exports, N.dcm HU slices or N.nii.gz volumes")
    parser.add_argument("--labels", type=Path, help="folder of labels N.png / N.nii.gz (0/1/2)")
    parser.add_argument("--json", required=True, type=Path, help="output JSON file")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--model", default=None, type=Path, help="weights (default: models/lesion_model.pt)")
    parser.add_argument("--only-split", choices=["train", "val"], default=None,
                        help="evaluate only the slices of this part of --split")
    parser.add_argument("--split", default=REPO_ROOT / "configs" / "lesion_split.json", type=Path)
    parser.add_argument("--unlabelled", action="store_true",
                        help="no scoring: predicted GGO/consolidation share and median HU of every image")
    parser.add_argument("--specificity", action="store_true",
                        help="GGO/consolidation %% of lung on the split's real scans without pneumonia")
    parser.add_argument("--hybrids", action="store_true",
                        help="painted pneumonia in the split's real scans (--part): painted consolidation and GGO "
                             "called, volume errors, inside the reference lungs")
    parser.add_argument("--hybrid-seed", type=int, default=1,
                        help="seed of the painted pneumonia for --hybrids (training paints other seeds)")
    parser.add_argument("--part", choices=["held_out", "train", "all"], default="held_out",
                        help="which real_ct_negatives scans --specificity / --hybrids run")
    parser.add_argument("--real-ct", type=Path, default=DATA_ROOT / "real-ct", help="folder of the real scans")
    parser.add_argument("--no-hu", action="store_true", help="--specificity without the --method hu figures")
    parser.add_argument("--pixels-averaged", type=int, default=1, metavar="N",
                        help="--specificity on the scans averaged over N x N pixels (a coarser matrix)")
    parser.add_argument("--record-accuracy", nargs="+", type=Path, metavar="JSON",
                        help="VAL.json SPEC.json [CV.json]: write their figures into --json (configs/metadata.json) "
                             "as ctquant_accuracy, the block the reports quote")
    parser.add_argument("--pool-folds", nargs="+", type=Path, metavar="JSON",
                        help="FOLD0.json FOLD1.json ...: each fold's scoring of its held-out slices (--only-split val "
                             "--split SPLITk.json --model FOLDk.pt); write the pooled out-of-fold figures to --json "
                             "(the CV.json of --record-accuracy)")
    parser.add_argument("--what", default="cross-validation", help="--pool-folds: what the folds are (recorded)")
    args = parser.parse_args(argv)

    if args.pool_folds:
        try:
            pooled = pool_folds([json.loads(p.read_text()) for p in args.pool_folds], args.what)
        except (ValueError, KeyError) as exc:
            _error(args.pool_folds[0], f"cannot pool: {exc}")
            return 3
        write_json(args.json, pooled)
        print(f"{pooled['n_images']} images in {pooled['n_folds']} folds: GGO {pooled['dice_ggo']:.3f}, "
              f"consolidation {pooled['dice_consolidation']:.3f}, lesion {pooled['dice_lesion']:.3f} -> {args.json}")
        return 0

    if args.record_accuracy:
        docs = [json.loads(p.read_text()) for p in args.record_accuracy]
        if len(docs) not in (2, 3):
            parser.error("--record-accuracy takes VAL.json SPEC.json [CV.json]")
        bundle = json.loads(args.json.read_text())
        bundle["ctquant_accuracy"] = accuracy_card(*docs)
        write_json(args.json, bundle)
        print(f"wrote ctquant_accuracy into {args.json}")
        return 0

    if args.specificity or args.hybrids:
        negatives = json.loads(args.split.read_text()).get("real_ct_negatives", {})
        entries = negatives.get("train", []) + negatives.get("held_out", []) if args.part == "all" else negatives.get(args.part, [])
        if not entries:
            _error(args.split, f"no real_ct_negatives {args.part} scans")
            return 3
        if not args.real_ct.is_dir():
            _error(args.real_ct, "not a folder")
            return 3
    else:
        if args.images is None or (args.labels is None and not args.unlabelled):
            parser.error("--images and --labels are required (or --images with --unlabelled, or --specificity)")
        for folder in (args.images, args.labels):
            if folder is not None and not folder.is_dir():
                _error(folder, "not a folder")
                return 3
        pairs, unlabelled = find_pairs(args.images, None if args.unlabelled else args.labels)
        if args.only_split:
            wanted = {Path(n).stem for n in json.loads(args.split.read_text())[args.only_split]}
            pairs = [p for p in pairs if stem_of(Path(p[0])) in wanted]
        if not pairs:
            _error(args.images, f"no image with a label in {args.labels}")
            return 3
    try:
        model = lm.load_lesion_model(args.model, device=args.device)
    except CtquantError as exc:
        print(f"evaluate_lesion_model: error: {exc}", file=sys.stderr)
        return exc.exit_code
    started = time.perf_counter()
    if args.hybrids:
        rows = hybrids(model, args.real_ct, entries, args.hybrid_seed)
        result = {"mode": "hybrids", "part": args.part, "split": str(args.split), "real_ct": str(args.real_ct),
                  "seed": args.hybrid_seed, "unit": "% of painted voxels (called), % of painted volume (error)",
                  "model": model.provenance(), "device": str(model.device),
                  "seconds": round(time.perf_counter() - started, 2), "cases": rows}
    elif args.specificity:
        rows = specificity(model, args.real_ct, entries, with_hu=not args.no_hu, pixels_averaged=args.pixels_averaged)
        result = {"mode": "specificity", "part": args.part, "split": str(args.split), "real_ct": str(args.real_ct),
                  "pixels_averaged": args.pixels_averaged,
                  "unit": "% of each lung's volume (right, left, both)", "model": model.provenance(),
                  "device": str(model.device), "seconds": round(time.perf_counter() - started, 2), "scans": rows}
    elif args.unlabelled:
        rows = describe(model, pairs)
        result = {"mode": "unlabelled", "n_images": len(rows), "images": str(args.images), "model": model.provenance(),
                  "device": str(model.device), "seconds": round(time.perf_counter() - started, 2), "per_image": rows}
    else:
        try:
            rows = evaluate(model, pairs)
        except ValueError as exc:
            reason = str(exc)
            _error(*reason.split(": ", 1)) if ": " in reason else _error(args.images, reason)
            return 3
        summary = summarise(rows)
        result = {
            **summary,
            "dice_convention": "per-image Dice; class absent from both prediction and label = 1, absent from one only = 0; "
                               "set figure = mean over images",
            "images": str(args.images), "labels": str(args.labels),
            "split": {"file": str(args.split), "part": args.only_split} if args.only_split else None,
            "unlabelled_images_skipped": unlabelled,
            "model": model.provenance(),
            "device": str(model.device),
            "seconds": round(time.perf_counter() - started, 2),
            "per_image": rows,
        }
    write_json(args.json, result)
    if args.hybrids:
        for r in rows:
            print(f"{r['scan'][:33]:<34}{r['severity']:<9} consolidation called consolidation "
                  f"{r['consolidation_called_consolidation_pct']:5.1f} % (lesion {r['consolidation_called_lesion_pct']:5.1f} %)"
                  f"  GGO called GGO {r['ggo_called_ggo_pct']:5.1f} %  volume error GGO {r['ggo_volume_error_pct']:+.1f} %"
                  f"  consolidation {r['consolidation_volume_error_pct']:+.1f} %")
    elif args.specificity:
        print_specificity(rows)
    elif args.unlabelled:
        for r in rows:
            print(f"{r['name']:<28} GGO {r['ggo_area_pct_pred']:6.2f} % (median {r['ggo_median_hu_pred']} HU)  "
                  f"consolidation {r['consolidation_area_pct_pred']:6.2f} % (median {r['consolidation_median_hu_pred']} HU)")
    else:
        print_table(rows, summary)
        if unlabelled:
            print(f"skipped {len(unlabelled)} image(s) without a label: {', '.join(unlabelled[:10])}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
