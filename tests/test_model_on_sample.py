"""The shipped lesion model on the synthetic sample study (the product path: quantify --method model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from ctquant.run.scan import quantify_to_dir


@pytest.fixture(scope="module")
def baseline_result(sample_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "baseline"
    measures = quantify_to_dir(sample_dir / "baseline", out, method="model", device="cpu",
                               subject_id="S1", timepoint="baseline")
    return out, measures


def test_model_lesions_overlap_the_phantom_lesions(sample_dir, baseline_result):
    """The phantom is not real CT, so the bound is loose: most found opacity lies on true lesions."""
    out, measures = baseline_result
    found = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "lesions.nii.gz"))) > 0
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_dir / "truth" / "baseline_lesions.nii.gz"))) > 0
    assert found.any()
    dice = 2 * np.count_nonzero(found & truth) / (np.count_nonzero(found) + np.count_nonzero(truth))
    precision = np.count_nonzero(found & truth) / np.count_nonzero(found)
    assert dice >= 0.4, f"lesion Dice {dice:.3f} against the phantom's truth"
    assert precision >= 0.5, f"only {precision:.0%} of the model's opacity is on true lesions"
    prov = measures["provenance"]
    assert prov["method"] == "model" and len(prov["model_sha256"]) == 64
    lungs = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "lungs.nii.gz")))
    assert not (found & (lungs == 0)).any(), "lesions must stay inside the lungs"


def test_model_sees_the_day14_improvement(sample_dir, baseline_result, tmp_path):
    _, baseline = baseline_result
    day14 = quantify_to_dir(sample_dir / "day14", tmp_path / "day14", method="model", device="cpu")
    truth = json.loads((sample_dir / "truth.json").read_text())["timepoints"]
    true_drop = truth["baseline"]["volumes"]["both"]["lesion_pct"] - truth["day14"]["volumes"]["both"]["lesion_pct"]
    found_drop = baseline["lungs"]["both"]["opacity_pct"] - day14["lungs"]["both"]["opacity_pct"]
    assert true_drop > 0
    assert found_drop > 0.3 * true_drop
