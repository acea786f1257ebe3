"""The real scans with reference lung masks (``configs/real_ct_references.json``), for the scripts and tests.

One registry and one loader: ``scripts/evaluate_lungs.py --real``, the lesion model's negatives,
painted positives and specificity scans (``configs/lesion_split.json`` ``real_ct_negatives`` name
scans from the registry) and ``tests/test_lungs_real.py`` all read the scans and their references here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCES_FILE = REPO_ROOT / "configs" / "real_ct_references.json"


def reference_entries(path: Path = REFERENCES_FILE) -> list[dict]:
    """The registry's entries: ``scan`` (under real-ct), ``lungs`` (label volume), ``lung_values``."""
    return json.loads(Path(path).read_text())["scans"]


def case_name(scan: str) -> str:
    """A registry scan's short name: its folder under real-ct (``copdgene-10002K-x8/ct-64.nrrd`` →
    ``copdgene-10002K-x8``)."""
    return scan.split("/")[0]


def load_reference_scan(real_ct: Path, scan: str, path: Path = REFERENCES_FILE
                        ) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """HU volume, spacing (z, y, x) mm and reference lung labels (uint8, 1 right, 2 left) of a registry scan.

    The scan goes through the product's reader (``ctquant.io.scans.load_scan``) and the reference through
    ``read_label_image`` (both in LPS), so the arrays line up voxel for voxel.
    """
    from ctquant.io.scans import load_scan, read_label_image

    entry = next((e for e in reference_entries(path) if e["scan"] == scan), None)
    if entry is None:
        raise KeyError(f"{scan}: not in {path}")
    loaded = load_scan(Path(real_ct) / scan)
    values, _ = read_label_image(Path(real_ct) / entry["lungs"])
    if values.shape != loaded.hu.shape:
        raise ValueError(f"{entry['lungs']}: lung mask {values.shape} differs from scan {loaded.hu.shape}")
    lungs = np.zeros(values.shape, dtype=np.uint8)
    for source, target in entry["lung_values"].items():
        lungs[values == int(source)] = int(target)
    return loaded.hu, tuple(float(v) for v in loaded.spacing_mm), lungs


LUNG_FOLD_DIR = REPO_ROOT / "models" / "lung_model_folds"


def lung_fold_model_path(scan: str) -> Path:
    """The lung network trained without registry scan ``scan`` (``scripts/train_lung_model.py``): the one
    that scores it in ``scripts/evaluate_lungs.py --real``."""
    return LUNG_FOLD_DIR / f"without_{case_name(scan)}.pt"


def averaged(hu: np.ndarray, factors: tuple[int, int, int], lungs: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """HU averaged over blocks of ``factors`` (z, y, x) voxels, as a thicker slice or a coarser matrix
    reconstructs them (int16), and ``lungs`` on the same blocks: a block is a lung where more than half of
    it is (trailing voxels that fill no whole block are dropped)."""
    from ctquant.segment.grid import block_mean
    from ctquant.segment.lungs import LEFT, RIGHT

    hu_out = block_mean(hu, factors).round().astype(np.int16)
    if lungs is None:
        return hu_out, None
    lungs_out = np.zeros(hu_out.shape, np.uint8)
    for side in (RIGHT, LEFT):
        lungs_out[block_mean(lungs == side, factors) > 0.5] = side
    return hu_out, lungs_out
