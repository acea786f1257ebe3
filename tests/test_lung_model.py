"""The dense-lung network (ctquant.segment.lung_model): its grid, its checkpoints, what it may add, and
what it adds on real CT it never saw (../shared/data/real-ct; those tests skip without it)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from ctquant.errors import ModelError
from ctquant.io.scans import load_scan, read_label_image
from ctquant.segment.lung_model import (DEFAULT_MODEL_PATH, GRID_MM, add_dense_lung, load_lung_model, lung_grid,
                                        segment_lungs_with_model)
from ctquant.segment.lungs import RIGHT, segment_lungs
from ctquant.synthetic.hybrid import CONSOLIDATION, paint_pneumonia


def _scripts_module(name: str):
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    if str(scripts) not in sys.path:
        sys.path.insert(0, str(scripts))
    return importlib.import_module(name)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def test_grid_keeps_a_known_volume():
    """A 60 × 80 mm box at 0.7 mm pixels, sampled onto the 2.5 mm grid, keeps its area within 3 %, and
    each scan pixel's nearest grid pixel holds its value."""
    spacing = (2.5, 0.7, 0.7)
    mask = np.zeros((20, 512, 512), dtype=np.uint8)
    mask[5:15, 200:286, 150:264] = 1  # 86 × 114 pixels = 60.2 × 79.8 mm
    grid = lung_grid(mask, spacing)
    assert grid is not None and grid.z_step == 1
    sampled = grid.sample(mask, grid.z, "nearest").numpy()
    area_mm2 = sampled.sum(axis=(1, 2)).max() * GRID_MM ** 2
    assert area_mm2 == pytest.approx(86 * 114 * 0.49, rel=0.03)
    iy, on_y = grid.pixel_index(1, 512)
    ix, on_x = grid.pixel_index(2, 512)
    z = int(np.flatnonzero(grid.z == 10)[0])
    back = sampled[z][np.ix_(iy, ix)] * on_y[:, None] * on_x[None, :]
    assert _dice(back > 0, mask[10] > 0) >= 0.97


def test_corrupt_or_foreign_checkpoint_is_refused(tmp_path):
    garbage = tmp_path / "lung.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read lung model weights"):
        load_lung_model(garbage)
    with pytest.raises(ModelError, match="not a ctquant lung model checkpoint"):
        load_lung_model(Path(__file__).resolve().parents[1] / "models" / "lesion_model.pt")
    with pytest.raises(ModelError, match="not found"):
        load_lung_model(tmp_path / "missing.pt")


def test_shipped_and_held_out_models_say_what_they_were_trained_on():
    """models/lung_model.pt saw every registered real scan; each fold model saw all but the one it is named after."""
    real_ct = _scripts_module("real_ct")
    scans = [e["scan"] for e in real_ct.reference_entries()]
    names = [real_ct.case_name(s) for s in scans]
    shipped = load_lung_model()
    assert shipped.path == DEFAULT_MODEL_PATH and sorted(shipped.metadata["training"]["scans"]) == sorted(names)
    for scan, name in zip(scans, names):
        fold = load_lung_model(real_ct.lung_fold_model_path(scan))
        training = fold.metadata["training"]
        assert training["held_out"] == name and name not in training["scans"] and len(training["scans"]) == len(names) - 1


def test_network_only_adds_soft_tissue_touching_the_lungs(sample_dir):
    """On the sample: the classical lungs are kept whole, and every voxel the network adds is soft tissue
    (-400 … +200 HU) in a component that touches them."""
    from scipy import ndimage as ndi

    scan = load_scan(sample_dir / "baseline")
    classical = segment_lungs(scan.hu, scan.spacing_mm)
    labels = add_dense_lung(scan.hu, scan.spacing_mm, classical, load_lung_model())
    assert np.array_equal(labels[classical > 0], classical[classical > 0])
    added = (labels > 0) & (classical == 0)
    assert np.all((scan.hu[added] >= -400) & (scan.hu[added] < 200))
    components, n = ndi.label(labels > 0)
    assert set(np.unique(components[added])) <= set(np.unique(components[classical > 0]))


def test_phantom_lungs_stay_right_with_the_network(sample_dir):
    """The sample's truth: the network costs the phantom little (measured Dice 0.960 against 0.964 for the
    classical step alone: it adds some of the phantom's heart border, which has no fat plane; a retraining on
    the classical masks with the rib-cage fill's 4 mm minimum, not shipped, also added 44 mL of its anterior
    mediastinal fat and scored 0.956)."""
    scan = load_scan(sample_dir / "baseline")
    truth, _ = read_label_image(sample_dir / "truth" / "baseline_lungs.nii.gz")
    classical = segment_lungs(scan.hu, scan.spacing_mm)
    labels = segment_lungs_with_model(scan.hu, scan.spacing_mm, load_lung_model())
    assert _dice(labels > 0, truth > 0) >= 0.955
    assert _dice(labels > 0, truth > 0) >= _dice(classical > 0, truth > 0) - 0.008
    assert _dice(labels == RIGHT, truth == RIGHT) >= 0.95


def _real(shared_data, scan: str):
    if not (shared_data / "real-ct" / scan).exists():
        pytest.skip(f"{scan} is not in ../shared/data/real-ct")
    return _scripts_module("real_ct").load_reference_scan(shared_data / "real-ct", scan)


# Measured with the fold model that never saw the scan (scripts/evaluate_lungs.py --real, seed 1): kept 53 %
# of the painted consolidation on A0001 (classical step 36 %), 78 % on COPDGene (48 %); leak on the clean
# scans 0.99 % and 3.57 % (classical 0.97 / 3.49 %; before the rib-cage fill's 4 mm minimum 1.22 / 5.27 %).
# Asserted with a margin.
HELD_OUT_BOUNDS = {  # scan: (kept at least, classical kept at most, leak on the clean scan at most %)
    "lung-pet-ct-dx-A0001": (0.48, 0.42, 1.5),
    "copdgene-10002K-x8/ct-64.nrrd": (0.72, 0.53, 4.1),
}


@pytest.mark.parametrize("scan", sorted(HELD_OUT_BOUNDS))
def test_network_keeps_dense_lung_on_a_scan_it_never_saw(shared_data, scan):
    """Moderate pneumonia painted into a real scan: the network trained without that scan keeps much more of
    the painted consolidation inside the lungs than the classical step, and adds little on the clean scan."""
    evaluate = _scripts_module("evaluate_lungs")
    hu, spacing, ref = _real(shared_data, scan)
    model = load_lung_model(_scripts_module("real_ct").lung_fold_model_path(scan))
    case = paint_pneumonia(hu, ref, spacing, severity="moderate", seed=1)
    cons = case.lesion_labels == CONSOLIDATION
    classical = segment_lungs(case.hu, spacing)
    with_network = add_dense_lung(case.hu, spacing, classical, model)
    kept = {name: np.count_nonzero(cons & (labels > 0)) / np.count_nonzero(cons)
            for name, labels in (("classical", classical), ("network", with_network))}
    min_kept, max_classical, max_leak = HELD_OUT_BOUNDS[scan]
    assert kept["network"] >= min_kept and kept["classical"] <= max_classical
    assert _dice(with_network > 0, ref > 0) > _dice(classical > 0, ref > 0) + 0.005
    assert evaluate.leak_pct(segment_lungs_with_model(hu, spacing, model), ref) <= max_leak
