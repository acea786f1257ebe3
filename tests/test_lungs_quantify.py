"""Lung segmentation and quantification: known volumes on hand-made arrays, phantoms and the sample."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from ctquant.io import load_scan
from ctquant.lungs import LEFT, RIGHT, segment_lungs
from ctquant.phantom import make_phantom
from ctquant.pipeline import quantify_to_dir
from ctquant.quantify import bilateral_flags, lung_measures, quality_flags


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_lung_measures_known_volumes():
    spacing = (2.0, 1.0, 0.5)  # 1 mm3 voxels -> 0.001 mL
    lungs = np.zeros((10, 20, 40), np.uint8)
    lungs[:, :, :20] = RIGHT  # 4000 voxels = 4 mL
    lungs[:, :, 20:] = LEFT
    lesions = np.zeros_like(lungs)
    lesions[:5, :, :10] = 1  # 1000 voxels GGO in the right lung
    lesions[:2, :, 30:] = 2  # 400 voxels consolidation in the left lung
    hu = np.full(lungs.shape, -800, np.int16)
    hu[:, :, 20:] = -700
    m = lung_measures(hu, lungs, lesions, spacing)
    assert m["right"]["lung_volume_ml"] == pytest.approx(4.0)
    assert m["right"]["ggo_volume_ml"] == pytest.approx(1.0)
    assert m["right"]["ggo_pct"] == pytest.approx(25.0)
    assert m["left"]["consolidation_pct"] == pytest.approx(10.0)
    assert m["both"]["opacity_volume_ml"] == pytest.approx(1.4)
    assert m["both"]["opacity_pct"] == pytest.approx(17.5)
    assert m["both"]["mean_lung_hu"] == pytest.approx(-750.0)
    flags = bilateral_flags(m, min_pct_of_lung=0.5)
    assert flags == {"ggo": False, "consolidation": False, "opacity": True}


def test_quality_flags_cut_and_implausible():
    spacing = (5.0, 2.0, 2.0)
    lungs = np.zeros((20, 40, 40), np.uint8)
    lungs[0:10, 10:30, 5:18] = RIGHT  # touches the first slice: cut in z
    lungs[5:15, 10:30, 22:35] = LEFT
    m = lung_measures(np.zeros(lungs.shape, np.int16), lungs, np.zeros_like(lungs), spacing)
    flags = quality_flags(lungs, m, {"plausibility": {"min_lung_volume_ml": 1000, "max_lung_volume_ml": 10000}})
    assert any(f.startswith("implausible_lung_volume") for f in flags)
    assert any(f.startswith("right_lung_cut_by_field_of_view: z") for f in flags)
    assert not any(f.startswith("left_lung_cut") for f in flags)


@pytest.mark.parametrize("severity, min_dice", [(0.0, 0.98), (1.0, 0.975), (2.0, 0.95)])
def test_lungs_keep_consolidated_lung(severity, min_dice):
    """Dice against the generator's truth, including heavy pleura-touching dependent consolidation."""
    phantom = make_phantom(severity=severity, seed=3)
    labels = segment_lungs(phantom.hu, phantom.spacing_mm)
    for label in (RIGHT, LEFT):
        assert _dice(labels == label, phantom.lung_labels == label) >= min_dice - 0.01
    assert _dice(labels > 0, phantom.lung_labels > 0) >= min_dice
    # Right lung is on the patient's right: the lower LPS x index.
    x_right = np.nonzero((labels == RIGHT).any(axis=(0, 1)))[0].mean()
    x_left = np.nonzero((labels == LEFT).any(axis=(0, 1)))[0].mean()
    assert x_right < x_left


def test_trachea_is_not_lung():
    phantom = make_phantom(severity=0.0, seed=1)
    labels = segment_lungs(phantom.hu, phantom.spacing_mm)
    top = phantom.hu.shape[0] - 1
    trachea = (phantom.hu[top] < -950) & (phantom.lung_labels[top] == 0)
    assert trachea.any()
    assert not (labels[top][trachea] > 0).any()


def _truth(sample_dir, timepoint):
    return json.loads((sample_dir / "truth.json").read_text())["timepoints"][timepoint]["volumes"]


@pytest.mark.parametrize("timepoint", ["baseline", "day14"])
def test_sample_hu_method_against_truth(sample_dir, tmp_path, timepoint):
    """Lung volumes within 3 %; HU-band GGO within 10 % and consolidation within 35 % (see README)."""
    measures = quantify_to_dir(sample_dir / timepoint, tmp_path / "out", method="hu", device="cpu",
                               subject_id="S1", timepoint=timepoint)
    truth = _truth(sample_dir, timepoint)
    for side in ("right", "left", "both"):
        got, want = measures["lungs"][side], truth[side]
        assert got["lung_volume_ml"] == pytest.approx(want["lung_ml"], rel=0.03)
    both, want = measures["lungs"]["both"], truth["both"]
    assert both["ggo_volume_ml"] == pytest.approx(want["ggo_ml"], rel=0.10)
    assert both["consolidation_volume_ml"] == pytest.approx(want["consolidation_ml"], rel=0.35)
    assert measures["bilateral"]["ggo"] and measures["bilateral"]["opacity"]
    for name in ("measures.json", "measures.csv", "lungs.nii.gz", "lesions.nii.gz"):
        assert (tmp_path / "out" / name).is_file()
    written = sitk.ReadImage(str(tmp_path / "out" / "lungs.nii.gz"))
    truth_image = sitk.ReadImage(str(sample_dir / "truth" / f"{timepoint}_lungs.nii.gz"))
    assert written.GetSize() == truth_image.GetSize()
    assert np.allclose(written.GetOrigin(), truth_image.GetOrigin(), atol=1e-3)
    assert np.allclose(written.GetSpacing(), truth_image.GetSpacing(), atol=1e-4)


def test_dicom_and_nifti_give_the_same_numbers(sample_dir, tmp_path):
    scan = load_scan(sample_dir / "baseline")
    nifti = tmp_path / "baseline.nii.gz"
    sitk.WriteImage(scan.to_sitk(), str(nifti))
    from_dicom = quantify_to_dir(sample_dir / "baseline", tmp_path / "a", method="hu", device="cpu")
    from_nifti = quantify_to_dir(nifti, tmp_path / "b", method="hu", device="cpu")
    for side in ("right", "left", "both"):
        for key in ("lung_volume_ml", "ggo_volume_ml", "consolidation_volume_ml"):
            assert from_nifti["lungs"][side][key] == pytest.approx(from_dicom["lungs"][side][key], rel=0.01)
