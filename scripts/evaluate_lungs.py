#!/usr/bin/env python3
"""Measure the lung segmentation: Dice and HD95 per lung (right, left) and for both lungs.

Three modes:

- ``--real`` runs every scan of ``../shared/data/real-ct`` that has a reference lung mask, and the
  hybrids made from each (pneumonia painted in, :mod:`ctquant.synthetic.hybrid`, moderate and severe, and
  moderate painted in front for a prone patient, seed
  ``--hybrid-seed``): Dice (both, right, left), volume error, leak (lung volume outside the reference,
  % of it; also counted on the reference's own slices only, since a reference may leave out an end
  slice that holds lung), and for hybrids the share of painted consolidation inside the lung mask (all
  of it, on the lateral half of each lung slice, against the rib cage, and on the medial half, against
  the mediastinum), the ``--method hu`` GGO and consolidation volume errors (shipped
  ``configs/quantify.yaml``) and the shipped model's, and the share of the painted consolidation that
  the model calls consolidation inside the reference lungs (the lung step out of the picture);
- ``--protocols`` runs the same scans as other reconstructions and doses would give them: pixels averaged
  2 × 2 (a 256 matrix), slices averaged in pairs, white noise of 25 and 50 HU; against the reference
  brought to the same grid (a voxel is lung when more than half of its block is). The unlabelled real
  COVID-19 scan (``ricord-1a-000082``) goes through the same variants, slices averaged to 2.5 and 5 mm as
  well, with its lung volumes and the shipped model's GGO and consolidation % of each lung;
- ``--pred P.nii.gz --ref R.nii.gz`` compares two label files (1 right, 2 left; any format SimpleITK
  reads), e.g. ``ctquant quantify`` output against a reference mask;
- ``--phantoms`` generates synthetic chest CTs at several lesion severities (up to heavy,
  pleura-touching dependent consolidation), segments them and compares with the generator's truth
  (a regression check: the phantom is not evidence of accuracy on real CT).

Examples::

    python scripts/evaluate_lungs.py --real --json real_lungs.json
    python scripts/evaluate_lungs.py --protocols --json protocols.json
    python scripts/evaluate_lungs.py --phantoms --severities 0 1 2 3 --seeds 0 1 --json lungs_eval.json
    python scripts/evaluate_lungs.py --pred results/baseline/lungs.nii.gz --ref sample_dicom/truth/baseline_lungs.nii.gz
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ctquant.trial.agreement import mask_metrics
from ctquant.io.scans import read_label_image
from ctquant.segment.lung_model import LungModel, load_lung_model, segment_lungs_with_model
from ctquant.segment.lungs import LEFT, RIGHT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_ct import averaged, case_name, load_reference_scan, lung_fold_model_path, reference_entries  # noqa: E402

if TYPE_CHECKING:
    from ctquant.segment.lesion_model import LesionModel

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def lung_scores(pred: np.ndarray, ref: np.ndarray, spacing_mm: tuple[float, float, float]) -> dict[str, float]:
    """Dice and HD95 (mm) for the right lung, the left lung and both lungs."""
    out: dict[str, float] = {}
    for name, p, r in (("right", pred == RIGHT, ref == RIGHT), ("left", pred == LEFT, ref == LEFT),
                       ("both", pred > 0, ref > 0)):
        metrics = mask_metrics(p, r, spacing_mm)
        out[f"dice_{name}"] = round(metrics["dice"], 4)
        out[f"hd95_{name}_mm"] = round(metrics["hd95_mm"], 2)
    out["volume_error_pct"] = round(100.0 * (np.count_nonzero(pred) / max(1, np.count_nonzero(ref)) - 1.0), 2)
    return out


def evaluate_phantoms(severities: list[float], seeds: list[int], shape: tuple[int, int, int] | None,
                      spacing: tuple[float, float, float] | None, lung_model: LungModel | None = None) -> list[dict]:
    """Segment generated phantoms (the product's lung step: ``lung_model``, None for the classical step alone)
    and score them against their truth."""
    from ctquant.synthetic.phantom import make_phantom

    rows = []
    for seed in seeds:
        for severity in severities:
            kwargs = {}
            if shape:
                kwargs["shape_zyx"] = shape
            if spacing:
                kwargs["spacing_mm"] = spacing
            phantom = make_phantom(severity=severity, seed=seed, **kwargs)
            t0 = time.perf_counter()
            pred = segment_lungs_with_model(phantom.hu, phantom.spacing_mm, lung_model)
            seconds = time.perf_counter() - t0
            lung = phantom.lung_labels > 0
            lesion_share = float(np.count_nonzero(phantom.lesion_labels) / max(1, np.count_nonzero(lung)))
            consolidation_share = float(np.count_nonzero(phantom.lesion_labels == 2) / max(1, np.count_nonzero(lung)))
            rows.append({"case": f"phantom seed {seed} severity {severity:g}", "severity": severity, "seed": seed,
                         "lesion_pct_of_lung": round(100 * lesion_share, 1),
                         "consolidation_pct_of_lung": round(100 * consolidation_share, 1),
                         "seconds": round(seconds, 2),
                         **lung_scores(pred, phantom.lung_labels, phantom.spacing_mm)})
    return rows


def leak_pct(pred: np.ndarray, ref: np.ndarray, reference_slices_only: bool = False) -> float:
    """Lung volume outside the reference, % of the reference volume; optionally counted only on the
    axial slices where the reference holds lung."""
    outside = (pred > 0) & (ref == 0)
    if reference_slices_only:
        outside &= (ref > 0).any(axis=(1, 2))[:, None, None]
    return round(100.0 * np.count_nonzero(outside) / max(1, np.count_nonzero(ref)), 2)


def kept_pct_by_half(pred: np.ndarray, truth: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Share (%) of the ``truth`` voxels inside the lung mask ``pred``: all, on the lateral half of each
    reference lung's axial slice (towards the rib cage) and on its medial half (towards the mediastinum).

    The halves are cut at the slice's lung centroid in x; the right lung (lower LPS x) has its medial
    side towards higher x.
    """
    medial = np.zeros(truth.shape, dtype=bool)
    xs = np.arange(truth.shape[2])
    for side, towards_high_x in ((RIGHT, True), (LEFT, False)):
        lung = ref == side
        for z in np.flatnonzero(lung.any(axis=(1, 2))):
            centre_x = float(np.nonzero(lung[z])[1].mean())
            half = xs > centre_x if towards_high_x else xs < centre_x
            medial[z] |= lung[z] & half[None, :]
    inside = pred > 0
    out = {}
    for name, where in (("all", truth), ("lateral", truth & ~medial), ("medial", truth & medial)):
        out[name] = round(100.0 * np.count_nonzero(where & inside) / max(1, np.count_nonzero(where)), 1)
    return out


def real_case_rows(scan_name: str, root: Path, hybrid_seed: int, model: LesionModel | None = None,
                   lung_model: LungModel | None = None) -> list[dict]:
    """Rows for one registry scan (``configs/real_ct_references.json``) and its hybrids (moderate, severe, prone)
    (``model``: a loaded lesion model, whose GGO and consolidation on the hybrids are scored too; ``lung_model``:
    the lung network that adds dense lung, one that never saw this scan; None: the classical step alone)."""
    from ctquant.config import load_quantify_config
    from ctquant.synthetic.hybrid import CONSOLIDATION, GGO, paint_pneumonia
    from ctquant.segment.lesion_model import postprocess_settings, segment_lesions
    from ctquant.segment.lesions import segment_lesions_hu_config

    scan_hu, spacing_mm, ref = load_reference_scan(root, scan_name)
    name = case_name(scan_name)
    config = load_quantify_config()
    rows = []
    # The last case stands for a prone patient: its dependent consolidation painted in front, and the lung
    # step told the patient is prone (the anatomy stays that of a supine scan).
    for severity, dependent in ((None, "posterior"), ("moderate", "posterior"), ("severe", "posterior"),
                                ("moderate", "anterior")):
        case = (paint_pneumonia(scan_hu, ref, spacing_mm, severity=severity, seed=hybrid_seed, dependent=dependent)
                if severity else None)
        hu = case.hu if case else scan_hu
        t0 = time.perf_counter()
        pred = segment_lungs_with_model(hu, spacing_mm, lung_model, dependent=dependent)
        seconds = time.perf_counter() - t0
        label = f" + {severity} pneumonia" + (", prone" if dependent == "anterior" else "") if severity else ""
        row = {"case": name + label, "seconds": round(seconds, 2),
               **lung_scores(pred, ref, spacing_mm), "leak_pct": leak_pct(pred, ref),
               "leak_on_reference_slices_pct": leak_pct(pred, ref, reference_slices_only=True)}
        if case:
            cons = case.lesion_labels == CONSOLIDATION
            kept = kept_pct_by_half(pred, cons, ref)
            row.update({"consolidation_kept_pct": kept["all"], "kept_lateral_pct": kept["lateral"],
                        "kept_medial_pct": kept["medial"]})
            methods = {"hu": segment_lesions_hu_config(hu, pred, spacing_mm, config)}
            settings = postprocess_settings(config)  # as the product runs the model
            if model is not None:
                methods["model"] = segment_lesions(hu, pred, model, spacing_mm=spacing_mm, **settings)
            for method, lesions in methods.items():
                for label, key in ((GGO, "ggo"), (CONSOLIDATION, "consolidation")):
                    truth = np.count_nonzero(case.lesion_labels == label)
                    row[f"{method}_{key}_error_pct"] = round(100.0 * (np.count_nonzero(lesions == label) / truth - 1.0), 1)
            if model is not None:
                in_ref = segment_lesions(hu, ref, model, spacing_mm=spacing_mm, **settings)
                row["model_calls_consolidation_pct"] = round(
                    100.0 * np.count_nonzero(cons & (in_ref == CONSOLIDATION)) / np.count_nonzero(cons), 1)
        rows.append(row)
    return rows


def with_noise(hu: np.ndarray, sigma_hu: float, seed: int = 0) -> np.ndarray:
    """``hu`` plus white Gaussian noise of ``sigma_hu`` (a lower dose, roughly), clipped to the int16 CT range."""
    noisy = hu + np.random.default_rng(seed).normal(0.0, sigma_hu, hu.shape)
    return np.clip(noisy, -1024, 3071).round().astype(np.int16)


#: ``--protocols`` variants: name, averaging factors (z, y, x), noise (HU).
PROTOCOLS = (("as scanned", (1, 1, 1), 0.0), ("pixels x2", (1, 2, 2), 0.0), ("slices x2", (2, 1, 1), 0.0),
             ("noise 25 HU", (1, 1, 1), 25.0), ("noise 50 HU", (1, 1, 1), 50.0))
#: ``--protocols`` keeps variants within the reconstructions a chest CT is read at (mm, z then in-plane).
MAX_PROTOCOL_SPACING_MM = (10.0, 3.0)
#: The unlabelled real COVID-19 scan of ``--protocols`` and its extra variants (slices to 2.5 and 5 mm).
PROTOCOL_COVID_SCAN = "ricord-1a-000082"
COVID_PROTOCOLS = PROTOCOLS[:3] + (("slices x4", (4, 1, 1), 0.0),) + PROTOCOLS[3:]


def protocol_rows(root: Path, model: LesionModel | None, classical: bool = False) -> list[dict]:
    """``--protocols``: each registry scan under ``root`` (its held-out lung network) and the real COVID-19
    scan (the shipped one) as other reconstructions and doses would give them."""
    from ctquant.config import load_quantify_config
    from ctquant.io.scans import load_scan
    from ctquant.segment.lesion_model import postprocess_settings, segment_lesions

    rows = []
    for entry in reference_entries():
        if not (root / entry["scan"]).exists():
            continue
        scan_hu, spacing_mm, ref = load_reference_scan(root, entry["scan"])
        lung_model = None if classical else load_lung_model(lung_fold_model_path(entry["scan"]))
        for name, factors, sigma in PROTOCOLS:
            spacing = tuple(s * f for s, f in zip(spacing_mm, factors))
            if factors != (1, 1, 1) and (spacing[0] > MAX_PROTOCOL_SPACING_MM[0] or max(spacing[1:]) > MAX_PROTOCOL_SPACING_MM[1]):
                continue  # the COPDGene case's 4 mm voxels made coarser: no clinical reconstruction
            hu, ref_v = averaged(scan_hu, factors, ref)
            hu = with_noise(hu, sigma) if sigma else hu
            pred = segment_lungs_with_model(hu, spacing, lung_model)
            rows.append({"case": f"{case_name(entry['scan'])}, {name}", "spacing_mm": [round(s, 2) for s in spacing],
                         **lung_scores(pred, ref_v, spacing), "leak_pct": leak_pct(pred, ref_v),
                         "leak_on_reference_slices_pct": leak_pct(pred, ref_v, reference_slices_only=True)})
    covid = root / PROTOCOL_COVID_SCAN
    if covid.exists():
        scan = load_scan(covid)
        lung_model = None if classical else load_lung_model()
        settings = postprocess_settings(load_quantify_config())
        for name, factors, sigma in COVID_PROTOCOLS:
            hu, _ = averaged(scan.hu, factors)
            hu = with_noise(hu, sigma) if sigma else hu
            spacing = tuple(s * f for s, f in zip(scan.spacing_mm, factors))
            pred = segment_lungs_with_model(hu, spacing, lung_model)
            row = {"case": f"{PROTOCOL_COVID_SCAN}, {name}", "spacing_mm": [round(s, 2) for s in spacing]}
            lesions = segment_lesions(hu, pred, model, spacing_mm=spacing, **settings) if model is not None else None
            for side, lung in ((RIGHT, "right"), (LEFT, "left")):
                n = np.count_nonzero(pred == side)
                row[f"{lung}_ml"] = round(n * float(np.prod(spacing)) / 1000.0, 1)
                if lesions is not None:
                    for label, key in ((1, "ggo"), (2, "consolidation")):
                        row[f"{lung}_model_{key}_pct"] = round(
                            100.0 * np.count_nonzero((lesions == label) & (pred == side)) / max(1, n), 2)
            rows.append(row)
    return rows


def _span(values: list[float], spec: str) -> str:
    low, high = format(min(values), spec), format(max(values), spec)
    return low if low == high else f"{low}–{high}"


def accuracy_record(rows: list[dict]) -> dict:
    """``configs/lung_accuracy.json`` from the ``--real`` rows: per-case figures, their ranges and the lines
    that every report shows, for the lung code that measured them (:data:`ctquant.segment.lungs.CODE_FILES`)."""
    from ctquant import __version__
    from ctquant.config import code_sha256, file_sha256
    from ctquant.segment.lung_model import DEFAULT_MODEL_PATH
    from ctquant.segment.lungs import CODE_FILES

    clean = [r for r in rows if "consolidation_kept_pct" not in r]
    hybrids = [r for r in rows if "consolidation_kept_pct" in r]
    keys = ("dice_both", "dice_right", "dice_left", "volume_error_pct", "leak_pct", "leak_on_reference_slices_pct")
    lines = [f"Lungs: on {len(clean)} real chest CTs without pneumonia (reference lung masks; each segmented with a "
             f"lung network that never saw it) Dice "
             f"{_span([r['dice_both'] for r in clean], '.3f')} (each lung ≥ "
             f"{min(min(r['dice_right'], r['dice_left']) for r in clean):.3f}), lung volume outside the reference "
             f"{_span([r['leak_pct'] for r in clean], '.1f')} % of it."]
    if hybrids:
        lines.append(
            f"Dense lung: with pneumonia painted into the same scans ({len(hybrids)} cases), "
            f"{_span([r['consolidation_kept_pct'] for r in hybrids], '.0f')} % of the airless consolidation "
            f"(+20 … +50 HU) is inside the lung mask (lung Dice {_span([r['dice_both'] for r in hybrids], '.2f')}): "
            "where consolidation is extensive, the lung volume is too small and consolidation is undercounted. "
            "Look at the QC picture.")
    return {
        "what": "Measured accuracy of the lung step on real CT, shown in every report: python "
                "scripts/evaluate_lungs.py --real --record-accuracy (../shared/data/real-ct, "
                "configs/real_ct_references.json).",
        "lung_code_sha256": code_sha256(CODE_FILES),
        "lung_code_files": list(CODE_FILES),
        "lung_model_sha256": file_sha256(DEFAULT_MODEL_PATH),
        "held_out": "each scan and its hybrids segmented with the lung network trained without that scan "
                    "(models/lung_model_folds, scripts/train_lung_model.py)",
        "ctquant_version": __version__,
        "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cases": {r["case"]: {k: r[k] for k in keys + ("consolidation_kept_pct",) if k in r} for r in rows},
        "lines": lines,
        "see": "README.md, Accuracy: Lungs on real CT.",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", type=Path, help="predicted lung labels (1 right, 2 left)")
    parser.add_argument("--ref", type=Path, help="reference lung labels (1 right, 2 left)")
    parser.add_argument("--phantoms", action="store_true", help="evaluate on generated phantoms")
    parser.add_argument("--severities", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 3.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--shape", type=int, nargs=3, help="phantom shape z y x (default: the sample's)")
    parser.add_argument("--spacing", type=float, nargs=3, help="phantom spacing z y x mm")
    parser.add_argument("--real", action="store_true",
                        help="real scans with reference lungs in ../shared/data/real-ct, and hybrids made from them")
    parser.add_argument("--protocols", action="store_true",
                        help="the real scans as other reconstructions and doses give them (pixels or slices "
                             "averaged, noise added)")
    parser.add_argument("--hybrid-seed", type=int, default=1, help="seed of the painted pneumonia (--real)")
    parser.add_argument("--no-model", action="store_true", help="--real without the lesion model's figures")
    parser.add_argument("--classical", action="store_true",
                        help="the classical lung step alone (no lung network); by default --real scores each scan "
                             "with the lung network trained without it (models/lung_model_folds), --phantoms with "
                             "the shipped one")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--record-accuracy", action="store_true",
                        help="with --real: write the figures to configs/lung_accuracy.json (shown in every report)")
    args = parser.parse_args(argv)
    if args.record_accuracy and (not args.real or args.classical):
        parser.error("--record-accuracy needs --real, with the product's lung step (no --classical)")

    rows: list[dict] = []
    real_rows: list[dict] = []
    if args.pred or args.ref:
        if not (args.pred and args.ref):
            parser.error("--pred and --ref go together")
        pred, spacing = read_label_image(args.pred)
        ref, ref_spacing = read_label_image(args.ref)
        if pred.shape != ref.shape or not np.allclose(spacing, ref_spacing, rtol=1e-3):
            print(f"error: grids differ: {pred.shape} {spacing} vs {ref.shape} {ref_spacing}", file=sys.stderr)
            return 3
        rows.append({"case": str(args.pred), **lung_scores(pred, ref, spacing)})
    if args.phantoms:
        rows += evaluate_phantoms(args.severities, args.seeds, tuple(args.shape) if args.shape else None,
                                  tuple(args.spacing) if args.spacing else None,
                                  None if args.classical else load_lung_model())
    if args.real:
        root = SHARED_DATA / "real-ct"
        names = [e["scan"] for e in reference_entries() if (root / e["scan"]).exists()]
        if not names:
            print(f"no real CT with lung masks under {root}", file=sys.stderr)
            return 3
        if args.record_accuracy and len(names) < len(reference_entries()):
            print(f"--record-accuracy: only {len(names)} of the {len(reference_entries())} registered scans are "
                  f"under {root}", file=sys.stderr)
            return 3
        model = None
        if not args.no_model:
            from ctquant.segment.lesion_model import load_lesion_model

            model = load_lesion_model()
        for name in names:
            lung_model = None if args.classical else load_lung_model(lung_fold_model_path(name))
            real_rows += real_case_rows(name, root, args.hybrid_seed, model, lung_model)
        rows += real_rows
    if args.protocols:
        root = SHARED_DATA / "real-ct"
        if not root.is_dir():
            print(f"no real CT under {root}", file=sys.stderr)
            return 3
        from ctquant.segment.lesion_model import load_lesion_model

        rows += protocol_rows(root, None if args.no_model else load_lesion_model(), classical=args.classical)
    if not rows:
        parser.error("nothing to evaluate: give --real, --protocols, --pred/--ref or --phantoms")

    columns = [c for c in dict.fromkeys(k for row in rows for k in row) if c not in ("seed", "severity")]
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row.get(c, "")) for c in columns))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.record_accuracy:
        from ctquant.config import CONFIG_DIR
        from ctquant.outputs.atomic import atomic_write_text

        record = accuracy_record(real_rows)
        text = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
        path = atomic_write_text(CONFIG_DIR / "lung_accuracy.json", text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
