#!/usr/bin/env python
"""Generate the shipped synthetic sample (or a larger phantom study) with its ground truth.

By default this rewrites ``sample_dicom/``: one synthetic subject, a baseline and a day-14 study
(one CT series each, shuffled file names, study dates 14 days apart), the NIfTI truth masks under
``truth/`` and the true volumes in ``truth.json``. The output is deterministic: the same options
give byte-identical files.

Examples:
    python scripts/make_sample_dicom.py
    python scripts/make_sample_dicom.py --out /tmp/bench --shape 300 512 512 --spacing 1 0.7 0.7 \\
        --compress rle
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from ctquant.synthetic import phantom as ph  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "sample_dicom"
BASELINE_DATE = "20200406"
DAY_OFFSETS = {"baseline": 0, "day14": 14}
SERIES_TIMES = {"baseline": "101500", "day14": "094000"}
TRANSFER_SYNTAXES = {
    "none": "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "rle": "1.2.840.10008.1.2.5",  # RLE Lossless
    "jpegls": "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "j2k": "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
}
GENERATOR = "ctquant.phantom"  # the tag in sample_dicom truth.json files (the module now lives at ctquant.synthetic.phantom)

README = """# Synthetic sample study (generated, do not edit)

Made by `python scripts/make_sample_dicom.py` from `ctquant/phantom.py`; rerunning it gives
byte-identical files.

- `baseline/`, `day14/`: one synthetic subject, two CT studies 14 days apart (one axial series
  each; file names are random hex without extension and do not reveal slice order).
- `truth/<timepoint>_lungs.nii.gz`: 1 = right lung, 2 = left lung (trachea, main bronchi and
  hilar vessels excluded); `truth/<timepoint>_lesions.nii.gz`: 1 = ground-glass opacity,
  2 = consolidation. Same grid and geometry (LPS) as the DICOM series.
- `truth.json`: true volumes in mL (per lung and both lungs, per class, % of lung), generator
  parameters, UIDs and a SHA-256 of the HU voxels (int16, z/y/x C order, z ascending).

The lesion HU lie in the bands GGO [-700, -300) and consolidation [-300, 100); lung vessels
(~+40 HU) are not lesions.
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=list(ph.SAMPLE_SHAPE_ZYX))
    p.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"),
                   default=list(ph.SAMPLE_SPACING_MM), help="voxel size in mm")
    p.add_argument("--severity", type=float, default=1.0, help="0 none, 1 moderate, 3 heavy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timepoints", nargs="+", choices=ph.TIMEPOINTS, default=list(ph.TIMEPOINTS))
    p.add_argument("--compress", choices=sorted(TRANSFER_SYNTAXES), default="none",
                   help="transfer syntax of the pixel data")
    p.add_argument("--nested", action="store_true", help="put files in 2-character subfolders")
    p.add_argument("--decoys", action="store_true",
                   help="also write a localizer, a dose SR, a dose screen and a 5-slab series per study")
    p.add_argument("--force", action="store_true", help="replace existing output folders")
    return p.parse_args(argv)


def _prepare_out(out: Path, timepoints: Sequence[str], force: bool) -> None:
    """Clear the folders this script writes; refuse foreign content unless forced."""
    truth_json = out / "truth.json"
    ours = False
    if truth_json.exists():
        try:
            ours = json.loads(truth_json.read_text()).get("generator") == GENERATOR
        except (OSError, ValueError):
            ours = False
    targets = [out / tp for tp in ph.TIMEPOINTS] + [out / "truth"]
    busy = [t for t in targets if t.exists() and any(t.iterdir())]
    if busy and not (ours or force):
        raise SystemExit(f"make_sample_dicom: {busy[0]} is not empty and {truth_json} is not ours; "
                         "use --force to replace it")
    for t in busy:
        shutil.rmtree(t)
    out.mkdir(parents=True, exist_ok=True)


def _round_floats(obj: Any, ndigits: int = 6) -> Any:
    if isinstance(obj, float):
        return round(obj, ndigits)
    if isinstance(obj, dict):
        return {k: _round_floats(v, ndigits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round_floats(v, ndigits) for v in obj]
    return obj


def pixel_sha256(hu) -> str:
    """SHA-256 of an int16 (z, y, x) HU array in C order."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(hu, dtype="<i2").tobytes()).hexdigest()


def generate(out: Path, *, shape: Sequence[int], spacing: Sequence[float], severity: float, seed: int,
             timepoints: Sequence[str], compress: str = "none", nested: bool = False,
             decoys: bool = False, force: bool = False, log=print) -> dict[str, Any]:
    """Write the studies, truth masks and truth.json under ``out``; return the truth.json content."""
    out = Path(out)
    _prepare_out(out, timepoints, force)
    key = [seed, *shape, *spacing, severity]
    patient_id = f"CTQ-SYN-{seed:04d}"
    patient_name = f"PHANTOM^CTQUANT{seed}"
    doc: dict[str, Any] = {
        "generator": GENERATOR,
        "format_version": 1,
        "parameters": {"shape_zyx": list(shape), "spacing_mm": list(spacing), "severity": severity,
                       "seed": seed, "compress": compress, "nested": nested},
        "patient_id": patient_id,
        "label_values": {"lungs": {"1": "right lung", "2": "left lung"},
                         "lesions": {"1": "ground-glass opacity", "2": "consolidation"}},
        "hu_bands": {"ggo": list(ph.GGO_BAND_HU), "consolidation": list(ph.CONSOLIDATION_BAND_HU)},
        "timepoints": {},
    }
    for tp in timepoints:
        t0 = time.perf_counter()
        phantom = ph.make_phantom(shape, spacing, timepoint=tp, severity=severity, seed=seed)
        t1 = time.perf_counter()
        study_uid = ph.uid_from("study", tp, *key)
        series_uid = ph.uid_from("series", tp, *key)
        for_uid = ph.uid_from("frame-of-reference", tp, *key)
        date = ph.study_date_plus(BASELINE_DATE, DAY_OFFSETS[tp])
        common = dict(study_uid=study_uid, study_date=date, patient_id=patient_id,
                      patient_name=patient_name)
        paths = ph.write_dicom_series(
            phantom, out / tp, series_uid=series_uid, frame_of_reference_uid=for_uid,
            series_description=f"Thorax {spacing[0]:g} B30f", series_number=2,
            study_time=SERIES_TIMES[tp], accession_number=f"ACC{seed:04d}{DAY_OFFSETS[tp]:02d}",
            shuffle_names=True, nested=nested, seed=seed,
            transfer_syntax=TRANSFER_SYNTAXES[compress], **common)
        if decoys:
            ph.write_localizer(phantom, out / tp / "decoy_localizer", series_uid=ph.uid_from("loc", tp, *key),
                               frame_of_reference_uid=for_uid, **common)
            ph.write_dose_sr(out / tp / "decoy_dose_sr", series_uid=ph.uid_from("sr", tp, *key), **common)
            ph.write_dose_screen(out / tp / "decoy_dose_screen", series_uid=ph.uid_from("sc", tp, *key),
                                 **common)
            ph.write_thick_series(phantom, out / tp / "decoy_slabs", n_slices=5,
                                  series_uid=ph.uid_from("slabs", tp, *key), frame_of_reference_uid=for_uid,
                                  series_number=3, seed=seed + 1, **common)
        truth = ph.write_truth(phantom, out / "truth", tp)
        t2 = time.perf_counter()
        doc["timepoints"][tp] = {
            "dicom_dir": tp,
            "n_slices": len(paths),
            "study_date": date,
            "study_instance_uid": study_uid,
            "series_instance_uid": series_uid,
            "frame_of_reference_uid": for_uid,
            "origin_mm": list(phantom.origin_mm),
            "direction": list(phantom.direction),
            "truth_masks": {"lungs": f"truth/{tp}_lungs.nii.gz", "lesions": f"truth/{tp}_lesions.nii.gz"},
            "pixel_sha256": pixel_sha256(phantom.hu),
            "volumes": truth,
        }
        both = truth["both"]
        log(f"{tp}: {len(paths)} slices -> {out / tp} (phantom {t1 - t0:.1f} s, files {t2 - t1:.1f} s); "
            f"lungs {both['lung_ml']:.0f} mL, GGO {both['ggo_ml']:.0f} mL, "
            f"consolidation {both['consolidation_ml']:.0f} mL ({both['lesion_pct']:.1f} % of lung)")
    if "baseline" in doc["timepoints"] and "day14" in doc["timepoints"]:
        change = {}
        for lung in ("right", "left", "both"):
            b = doc["timepoints"]["baseline"]["volumes"][lung]
            d = doc["timepoints"]["day14"]["volumes"][lung]
            change[lung] = {f"{c}_ml": d[f"{c}_ml"] - b[f"{c}_ml"] for c in ("ggo", "consolidation", "lesion")}
        doc["change_day14_minus_baseline"] = change
    doc = _round_floats(doc)
    (out / "truth.json").write_text(json.dumps(doc, indent=2) + "\n")
    if out.resolve() == DEFAULT_OUT.resolve():
        (out / "README.md").write_text(README)
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not ph.can_encode(TRANSFER_SYNTAXES[args.compress]):
        raise SystemExit(f"make_sample_dicom: no installed encoder for --compress {args.compress}")
    generate(args.out, shape=args.shape, spacing=args.spacing, severity=args.severity, seed=args.seed,
             timepoints=args.timepoints, compress=args.compress, nested=args.nested,
             decoys=args.decoys, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
