"""Reader agreement (ctquant.trial.agreement, ctquant.trial.stats, ``ctquant agree``).

Statistics are checked against published reference values; mask metrics against shapes whose
overlap and surface distances are known exactly in anisotropic spacing.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from ctquant.trial.agreement import (
    align_to,
    mask_metrics,
    parse_label_map,
    parse_ordinal_specs,
)
from ctquant.trial.stats import bland_altman, cohen_kappa, correlation, describe, fleiss_kappa, icc
from ctquant.cli import app
from ctquant.outputs.atomic import atomic_output_dir
from ctquant.errors import GeometryError, InputError

SPACING = (2.5, 0.7, 0.7)  # (z, y, x) mm: anisotropic, like a thick-slice chest CT


# --------------------------------------------------------------------------------------------------
# Statistics: published reference values
# --------------------------------------------------------------------------------------------------

# Shrout PE, Fleiss JL (1979) Psychol Bull 86:420, Table 2: 6 targets x 4 judges.
SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]])


def test_icc_reproduces_shrout_fleiss_1979():
    res = icc(SHROUT_FLEISS)
    # Published (Table 4): ICC(1,1) = .17, ICC(2,1) = .29, ICC(3,1) = .71
    assert round(res["icc1_1"]["value"], 2) == 0.17
    assert round(res["icc2_1"]["value"], 2) == 0.29
    assert round(res["icc3_1"]["value"], 2) == 0.71
    # Exact values from the paper's mean squares (BMS 11.24, WMS 6.26, JMS 32.49, EMS 1.02, to 2 dp):
    n, k = SHROUT_FLEISS.shape
    grand = SHROUT_FLEISS.mean()
    bms = k * ((SHROUT_FLEISS.mean(1) - grand) ** 2).sum() / (n - 1)
    jms = n * ((SHROUT_FLEISS.mean(0) - grand) ** 2).sum() / (k - 1)
    ems = (((SHROUT_FLEISS - SHROUT_FLEISS.mean(1, keepdims=True) - SHROUT_FLEISS.mean(0) + grand) ** 2).sum()
           / ((n - 1) * (k - 1)))
    assert (round(bms, 2), round(jms, 2), round(ems, 2)) == (11.24, 32.49, 1.02)
    assert res["icc2_1"]["value"] == pytest.approx((bms - ems) / (bms + (k - 1) * ems + k * (jms - ems) / n))
    assert res["icc3_1"]["value"] == pytest.approx((bms - ems) / (bms + (k - 1) * ems))
    # CIs at full precision (pingouin rounds them to 2 dp by default) and bracketing the estimate
    for key in ("icc1_1", "icc2_1", "icc3_1"):
        lo, hi = res[key]["ci95"]
        assert lo < res[key]["value"] < hi
    assert res["icc2_1"]["ci95"][0] != round(res["icc2_1"]["ci95"][0], 2)
    assert res["n_cases"] == 6 and res["n_readers"] == 4


def test_icc_drops_incomplete_cases_and_handles_constant_data():
    table = pd.DataFrame(SHROUT_FLEISS.astype(float))
    table.loc[6] = [1.0, np.nan, 2.0, 3.0]
    res = icc(table)
    assert res["n_cases"] == 6 and res["n_dropped_incomplete"] == 1
    assert res["icc2_1"]["value"] == pytest.approx(icc(SHROUT_FLEISS)["icc2_1"]["value"])
    flat = icc(np.ones((5, 2)))
    assert math.isnan(flat["icc2_1"]["value"]) and "undefined" in flat["note"]


def test_cohen_kappa_textbook_2x2():
    # Wikipedia "Cohen's kappa", worked example: 50 grant proposals, both "yes" 20, A yes/B no 5,
    # A no/B yes 10, both "no" 15: p_o = 0.70, p_e = 0.5*0.6 + 0.5*0.4 = 0.50, kappa = 0.40.
    a = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    res = cohen_kappa(a, b)
    assert res["kappa"]["value"] == pytest.approx(0.40)
    assert res["pct_agreement"] == pytest.approx(70.0)
    assert res["n"] == 50


# R package irr, data(anxiety): 20 subjects rated by 3 raters on a 1-6 scale (also in statsmodels' tests).
ANXIETY = np.array([3, 3, 3, 4, 5, 5, 2, 3, 5, 2, 2, 6, 1, 5, 2, 2, 1, 2, 4, 3,
                    3, 6, 4, 6, 2, 4, 2, 4, 3, 3, 2, 3, 3, 3, 2, 2, 1, 3, 3, 4,
                    2, 1, 4, 4, 3, 2, 1, 6, 1, 1, 1, 2, 3, 3, 1, 1, 3, 3, 2, 2]).reshape(3, 20).T


def test_weighted_kappa_matches_irr_kappa2():
    # irr::kappa2(anxiety[, 2:3]) = -0.006289308; "equal" (linear) = 0.1459075; "squared" = 0.2520325
    res = cohen_kappa(ANXIETY[:, 1], ANXIETY[:, 2], ordinal=True)
    assert res["kappa"]["value"] == pytest.approx(-0.006289308, abs=1e-8)
    assert res["kappa_linear"]["value"] == pytest.approx(0.1459075, abs=1e-7)
    assert res["kappa_quadratic"]["value"] == pytest.approx(0.2520325, abs=1e-7)
    # independent implementation agrees
    from sklearn.metrics import cohen_kappa_score

    assert res["kappa_quadratic"]["value"] == pytest.approx(
        cohen_kappa_score(ANXIETY[:, 1], ANXIETY[:, 2], weights="quadratic"))


def test_weighted_kappa_with_unobserved_category_sas_example():
    # SAS PROC FREQ AGREE example (as in statsmodels' tests): table [[0,4,1],[0,8,0],[0,1,5]];
    # simple kappa 0.4842, weighted kappa (Cicchetti-Allison = linear weights) 0.4701. Rater b never
    # uses category 1, so the category set must be given to keep the 3x3 table.
    table = [[0, 4, 1], [0, 8, 0], [0, 1, 5]]
    a, b = [], []
    for i, row in enumerate(table):
        for j, count in enumerate(row):
            a += [i + 1] * count
            b += [j + 1] * count
    res = cohen_kappa(a, b, categories=[1, 2, 3], ordinal=True)
    assert res["kappa"]["value"] == pytest.approx(0.4842, abs=5e-5)
    assert res["kappa_linear"]["value"] == pytest.approx(0.4701, abs=5e-5)
    assert res["kappa"]["ci95"] == pytest.approx([0.2137, 0.7547], abs=5e-5)


# Fleiss JL (1971) Psychol Bull 76:378: 30 patients, 6 psychiatrists, 5 diagnoses (raw ratings as in
# R irr's data(diagnoses)); the paper reports kappa = 0.430.
DIAGNOSES = np.array([
    [4, 4, 4, 4, 4, 4], [2, 2, 2, 5, 5, 5], [2, 3, 3, 3, 3, 5], [5, 5, 5, 5, 5, 5], [2, 2, 2, 4, 4, 4],
    [1, 1, 3, 3, 3, 3], [3, 3, 3, 3, 5, 5], [1, 1, 3, 3, 3, 4], [1, 1, 4, 4, 4, 4], [5, 5, 5, 5, 5, 5],
    [1, 4, 4, 4, 4, 4], [1, 2, 4, 4, 4, 4], [2, 2, 2, 3, 3, 3], [1, 4, 4, 4, 4, 4], [2, 2, 4, 4, 4, 5],
    [3, 3, 3, 3, 3, 5], [1, 1, 1, 4, 5, 5], [1, 1, 1, 1, 1, 2], [2, 2, 4, 4, 4, 4], [1, 3, 3, 5, 5, 5],
    [5, 5, 5, 5, 5, 5], [2, 4, 4, 4, 4, 4], [2, 2, 4, 5, 5, 5], [1, 1, 4, 4, 4, 4], [1, 4, 4, 4, 4, 5],
    [2, 2, 2, 2, 2, 4], [1, 1, 1, 1, 5, 5], [2, 2, 4, 4, 4, 4], [1, 3, 3, 3, 3, 3], [5, 5, 5, 5, 5, 5],
])


def test_fleiss_kappa_reproduces_fleiss_1971():
    res = fleiss_kappa(DIAGNOSES)
    assert round(res["kappa"], 3) == 0.430
    assert res["n"] == 30 and res["n_raters"] == 6
    assert res["pct_all_agree"] == pytest.approx(100 * 5 / 30)  # patients 1, 4, 10, 21, 30 unanimous


def test_kappa_undefined_and_missing_items_are_explicit():
    res = cohen_kappa(["a", "a", None], ["a", "a", "b"])
    assert res["n"] == 2 and res["n_dropped"] == 1
    assert math.isnan(res["kappa"]["value"]) and "undefined" in res["note"]
    assert res["pct_agreement"] == 100.0


def test_bland_altman_and_correlation_by_hand():
    x = np.array([10.0, 20.0, 30.0, 40.0, np.nan])
    y = np.array([8.0, 19.0, 27.0, 36.0, 5.0])
    res = bland_altman(x, y)
    # differences 2, 1, 3, 4: mean 2.5, SD sqrt(5/3)
    sd = math.sqrt(5 / 3)
    assert res["n"] == 4 and res["n_dropped"] == 1
    assert res["bias"] == pytest.approx(2.5)
    assert res["sd_diff"] == pytest.approx(sd)
    assert res["loa_lower"] == pytest.approx(2.5 - 1.96 * sd)
    assert res["loa_upper"] == pytest.approx(2.5 + 1.96 * sd)
    cor = correlation(x, y)
    assert cor["n"] == 4 and cor["spearman_rho"] == pytest.approx(1.0)
    assert cor["pearson_r"] == pytest.approx(np.corrcoef(x[:4], y[:4])[0, 1])


def test_describe_skips_nan_with_counts():
    d = describe([1.0, np.nan, 3.0])
    assert d["n"] == 2 and d["n_nan"] == 1 and d["mean"] == 2.0 and d["median"] == 2.0
    assert math.isnan(describe([np.nan])["mean"])


# --------------------------------------------------------------------------------------------------
# Mask metrics with known overlap and surface distances (anisotropic spacing)
# --------------------------------------------------------------------------------------------------


def _box(shape, z, y, x):
    m = np.zeros(shape, bool)
    m[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = True
    return m


def test_plates_shifted_along_each_axis_use_that_axis_spacing():
    # One-voxel-thick plates: every surface voxel of one is exactly k voxels from the other.
    shape = (12, 20, 20)
    a = _box(shape, (2, 3), (3, 15), (3, 15))
    b = _box(shape, (5, 6), (3, 15), (3, 15))  # 3 slices further along z
    m = mask_metrics(a, b, SPACING)
    assert m["dice"] == 0.0 and m["jaccard"] == 0.0
    assert m["hd95_mm"] == pytest.approx(3 * 2.5, abs=1e-5)
    assert m["assd_mm"] == pytest.approx(3 * 2.5, abs=1e-5)
    # plates perpendicular to x, 4 columns apart with x spacing 0.9 mm
    a = _box((10, 20, 30), (2, 8), (3, 15), (3, 4))
    b = _box((10, 20, 30), (2, 8), (3, 15), (7, 8))
    m = mask_metrics(a, b, (2.5, 0.7, 0.9))
    assert m["hd95_mm"] == pytest.approx(4 * 0.9, abs=1e-5)
    assert m["assd_mm"] == pytest.approx(4 * 0.9, abs=1e-5)


def test_boxes_shifted_one_slice_known_dice_hd95_assd():
    # 4 x 40 x 40 voxel boxes, B one slice (2.5 mm) further along z; in-plane spacing 0.7 mm.
    shape = (10, 50, 50)
    a = _box(shape, (2, 6), (5, 45), (5, 45))
    b = _box(shape, (3, 7), (5, 45), (5, 45))
    m = mask_metrics(a, b, SPACING)
    assert m["dice"] == pytest.approx(2 * 3 / 8)  # overlap 3 of 4 slices
    assert m["jaccard"] == pytest.approx(3 / 5)
    assert m["volume_a_ml"] == pytest.approx(4 * 40 * 40 * 2.5 * 0.7 * 0.7 / 1000)
    assert m["volume_diff_ml"] == pytest.approx(0.0)
    # Surface voxels of A (3512): bottom slice 1600 at 2.5 mm (B's bottom one slice up); the rims of
    # the two middle slices (2 x 156) lie on B's rim: 0; top slice: rim 156 at 0, then rings d = 1, 2, 3
    # voxels in from the rim (148, 140, 132 voxels) reach B's side wall at d * 0.7 mm, the inner
    # 32 x 32 = 1024 reach B's top at 2.5 mm. B -> A is the mirror image.
    n = 1600 + 312 + 156 + 148 + 140 + 132 + 1024
    assert n == 3512
    total = 1600 * 2.5 + 148 * 0.7 + 140 * 1.4 + 132 * 2.1 + 1024 * 2.5
    assert m["assd_mm"] == pytest.approx(total / n, rel=1e-6)
    # 2624 of 3512 (75 %) distances are 2.5 mm, the maximum: the 95th percentile is 2.5 mm
    assert m["hd95_mm"] == pytest.approx(2.5, rel=1e-6)


def test_identical_and_empty_masks():
    a = _box((8, 20, 20), (2, 5), (4, 12), (6, 14))
    m = mask_metrics(a, a.copy(), SPACING)
    assert (m["dice"], m["jaccard"], m["hd95_mm"], m["assd_mm"], m["note"]) == (1.0, 1.0, 0.0, 0.0, "")
    empty = np.zeros_like(a)
    both = mask_metrics(empty, empty, SPACING)
    assert (both["dice"], both["jaccard"], both["hd95_mm"], both["assd_mm"]) == (1.0, 1.0, 0.0, 0.0)
    assert both["note"] == "both empty"
    one = mask_metrics(a, empty, SPACING)
    assert one["dice"] == 0.0 and one["jaccard"] == 0.0 and one["note"] == "one empty"
    assert math.isnan(one["hd95_mm"]) and math.isnan(one["assd_mm"])
    assert one["volume_a_ml"] > 0 and one["volume_b_ml"] == 0


def test_parse_label_maps():
    assert parse_label_map("1=ggo,2=consolidation") == {1: "ggo", 2: "consolidation"}
    assert parse_label_map(" 3=ggo, 4=ggo ") == {3: "ggo", 4: "ggo"}
    for bad in ("", "ggo", "0=ggo", "1=", "x=ggo", "1=g g"):
        with pytest.raises(InputError):
            parse_label_map(bad)
    assert parse_ordinal_specs(["a,b", "sev=none<mild<severe"]) == {"a": None, "b": None,
                                                                     "sev": ["none", "mild", "severe"]}


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------


def _image(array: np.ndarray, spacing_zyx=SPACING, origin_xyz=(0.0, 0.0, 0.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(array.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    img.SetOrigin(origin_xyz)
    return img


def test_mismatched_grid_is_resampled_when_it_overlaps():
    labels = np.zeros((10, 40, 40), np.uint8)
    labels[3:7, 10:30, 10:30] = 1
    ref = _image(labels)
    same, note = align_to(ref, _image(labels, origin_xyz=(0.001, 0.0, 0.0)), "b.nii.gz")
    assert note == ""  # within tolerance: used as is
    # the same box drawn on a 1.4 mm in-plane grid: resampled onto ref's 0.7 mm grid
    coarse = np.zeros((10, 20, 20), np.uint8)
    coarse[3:7, 5:15, 5:15] = 1
    other = _image(coarse, spacing_zyx=(2.5, 1.4, 1.4), origin_xyz=(0.35, 0.35, 0.0))
    aligned, note = align_to(ref, other, "b.nii.gz")
    assert "resampled" in note and "spacing" in note
    assert aligned.GetSize() == ref.GetSize()
    arr = sitk.GetArrayFromImage(aligned)
    assert mask_metrics(arr == 1, labels == 1, SPACING)["dice"] == pytest.approx(1.0)


def test_disjoint_grid_is_refused():
    labels = np.zeros((10, 40, 40), np.uint8)
    labels[3:7, 10:30, 10:30] = 1
    far = _image(labels, origin_xyz=(500.0, 0.0, 0.0))
    with pytest.raises(GeometryError, match="does not overlap"):
        align_to(_image(labels), far, "b.nii.gz")
    assert issubclass(GeometryError, InputError)


# --------------------------------------------------------------------------------------------------
# End to end: ``ctquant agree``
# --------------------------------------------------------------------------------------------------

SHAPE = (10, 40, 40)


def _write(path: Path, array: np.ndarray, spacing_zyx=SPACING, origin_xyz=(0.0, 0.0, 0.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(_image(array, spacing_zyx, origin_xyz), str(path))
    return path


def _lesions(ggo_z: tuple[int, int], cons: bool = True, ggo_value: int = 1, cons_value: int = 2) -> np.ndarray:
    arr = np.zeros(SHAPE, np.uint8)
    arr[ggo_z[0]:ggo_z[1], 5:25, 5:25] = ggo_value
    if cons:
        arr[4:6, 28:34, 28:34] = cons_value
    return arr


@pytest.fixture()
def readers(tmp_path: Path) -> tuple[Path, Path]:
    """Reader A (1=ggo, 2=consolidation) and reader B (3=ggo, 4=consolidation), three cases."""
    a, b = tmp_path / "readerA", tmp_path / "readerB"
    _write(a / "case1.nii.gz", _lesions((2, 6)))
    _write(b / "case1.nii.gz", _lesions((3, 7), ggo_value=3, cons_value=4))  # GGO shifted one slice
    _write(a / "site2" / "case2.nii.gz", _lesions((2, 6), cons=False))
    _write(b / "site2" / "case2.nii.gz", _lesions((2, 6), cons=False, ggo_value=3))  # identical, no consolidation
    _write(a / "case3.nii.gz", _lesions((2, 8)))
    _write(b / "case3.nii.gz", _lesions((2, 6), ggo_value=3, cons_value=4))
    return a, b


def _run(args: list[str]):
    return CliRunner().invoke(app, ["agree", *args])


def test_cli_two_reader_folders(tmp_path: Path, readers):
    a, b = readers
    out = tmp_path / "agree"
    result = _run([str(a), str(b), "--out", str(out), "--reader-labels", "readerB:3=ggo,4=consolidation"])
    assert result.exit_code == 0, result.output
    cases = pd.read_csv(out / "cases.csv")  # empty cells (NaN distances, no note) read as NaN
    cases["note"] = cases["note"].fillna("")
    for col in ("case_id", "label", "reader_a", "reader_b", "dice", "jaccard", "hd95_mm", "assd_mm",
                "volume_a_ml", "volume_b_ml", "volume_diff_ml", "resampled", "note"):
        assert col in cases.columns
    assert len(cases) == 3 * 2  # cases x labels, one pair
    row = cases[(cases.case_id == "case1") & (cases.label == "ggo")].iloc[0]
    assert (row.reader_a, row.reader_b) == ("readerA", "readerB")
    assert row.dice == pytest.approx(0.75, abs=1e-6)
    assert row.hd95_mm == pytest.approx(2.5, abs=1e-5)
    voxel_ml = 2.5 * 0.7 * 0.7 / 1000
    assert row.volume_a_ml == pytest.approx(4 * 400 * voxel_ml, rel=1e-5)
    cons = cases[(cases.case_id == "site2/case2") & (cases.label == "consolidation")].iloc[0]
    assert cons.dice == 1.0 and cons.hd95_mm == 0.0 and cons.note == "both empty"
    ggo2 = cases[(cases.case_id == "site2/case2") & (cases.label == "ggo")].iloc[0]
    assert ggo2.dice == 1.0 and ggo2.note == ""
    row3 = cases[(cases.case_id == "case3") & (cases.label == "ggo")].iloc[0]
    assert row3.volume_diff_ml == pytest.approx(2 * 400 * voxel_ml, rel=1e-5)
    assert not cases["resampled"].astype(bool).any()

    summary = json.loads((out / "summary.json").read_text())
    ggo = summary["labels"]["ggo"]
    assert ggo["n_cases"] == 3
    # Dice 0.75 (case1), 1 (case2), 2*4/(6+4) = 0.8 (case3)
    assert ggo["dice"]["n"] == 3 and ggo["dice"]["median"] == pytest.approx(0.8, abs=1e-6)
    assert ggo["dice"]["mean"] == pytest.approx((0.75 + 1 + 0.8) / 3, abs=1e-6)
    assert set(ggo["volume_ml"]["icc"]) >= {"icc2_1", "icc3_1"}
    assert len(ggo["volume_ml"]["icc"]["icc2_1"]["ci95"]) == 2
    ba = ggo["volume_ml"]["pairs"]["readerA vs readerB"]["bland_altman"]
    assert ba["bias"] == pytest.approx(2 * 400 * voxel_ml / 3, rel=1e-5)  # differences 0, 0, 2 slices
    assert (out / ggo["volume_ml"]["pairs"]["readerA vs readerB"]["plot"]).is_file()
    assert summary["labels"]["consolidation"]["n_both_empty"] == 1
    prov = summary["provenance"]
    assert prov["label_map"] == {"1": "ggo", "2": "consolidation"}
    assert prov["reader_label_maps"] == {"readerB": "3=ggo,4=consolidation"}
    assert prov["ctquant_version"] and len(prov["inputs"]) == 2
    assert "ggo" in result.stdout and "readerA vs readerB" in result.stdout
    assert not list(tmp_path.glob(".agree.tmp-*"))


def test_cli_warns_on_unmapped_values_and_resamples_other_grid(tmp_path: Path, readers):
    a, b = readers
    # case3 of reader B re-drawn on a 1.4 mm in-plane grid covering the same space
    coarse = np.zeros((10, 20, 20), np.uint8)
    coarse[2:6, 3:12, 3:12] = 3
    (b / "case3.nii.gz").unlink()
    _write(b / "case3.nii.gz", coarse, spacing_zyx=(2.5, 1.4, 1.4), origin_xyz=(0.35, 0.35, 0.0))
    out = tmp_path / "out"
    result = _run([str(a), str(b), "--out", str(out), "--names", "A,B"])  # no remapping for B's 3/4
    assert result.exit_code == 0, result.output
    assert "values [3, 4] are not in its label map" in result.stderr
    assert "resampled" in result.stderr and "case3" in result.stderr
    cases = pd.read_csv(out / "cases.csv")
    cases["note"] = cases["note"].fillna("")
    assert set(cases[cases.resampled.astype(str) == "True"].case_id) == {"case3"}
    # with 3/4 unmapped, B's masks are empty: explicit notes, NaN distances skipped with counts
    ggo = cases[cases.label == "ggo"]
    assert (ggo.note.str.contains("one empty")).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"]["ggo"]["hd95_mm"]["n"] == 0 and summary["labels"]["ggo"]["hd95_mm"]["n_nan"] == 3
    assert summary["labels"]["ggo"]["pairs"]["A vs B"]["n_resampled"] == 1


def test_cli_csv_with_labels_column_and_quantify_reader_with_lungs(tmp_path: Path, readers):
    a, b = readers
    model = tmp_path / "model"
    lungs = np.zeros(SHAPE, np.uint8)
    lungs[1:9, 2:38, 2:19] = 1
    lungs[1:9, 2:38, 21:38] = 2
    for case, z in (("case1", (2, 6)), ("site2/case2", (2, 6)), ("case3", (2, 8))):
        _write(model / case / "lesions.nii.gz", _lesions(z, cons=case != "site2/case2"))  # same as reader A
        _write(model / case / "lungs.nii.gz", lungs)
    rows = []
    for case, file in (("case1", "case1.nii.gz"), ("site2/case2", "site2/case2.nii.gz"), ("case3", "case3.nii.gz")):
        rows.append({"case_id": case, "reader": "A", "path": str(a / file), "labels": ""})
        rows.append({"case_id": case, "reader": "B", "path": str(b / file), "labels": "3=ggo,4=consolidation"})
    csv_path = tmp_path / "masks.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    out = tmp_path / "csv_out"
    result = _run([str(csv_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    cases = pd.read_csv(out / "cases.csv")
    assert cases.loc[(cases.case_id == "case1") & (cases.label == "ggo"), "dice"].item() == pytest.approx(0.75)

    # a model reader from ctquant quantify folders: case ids are the subfolder paths; lungs give % of lung
    out2 = tmp_path / "model_out"
    result = _run([str(a), str(model), "--out", str(out2)])
    assert result.exit_code == 0, result.output
    cases = pd.read_csv(out2 / "cases.csv")
    assert set(cases.case_id) == {"case1", "site2/case2", "case3"}
    assert (cases.dice == 1.0).all()
    lung_ml = np.count_nonzero(lungs) * 2.5 * 0.7 * 0.7 / 1000
    assert cases.lung_volume_ml.to_numpy() == pytest.approx(np.full(len(cases), lung_ml))
    row = cases[(cases.case_id == "case3") & (cases.label == "ggo")].iloc[0]
    assert row.pct_lung_a == pytest.approx(100 * row.volume_a_ml / lung_ml)
    assert row.volume_diff_pct_lung == pytest.approx(0.0)
    summary = json.loads((out2 / "summary.json").read_text())
    assert summary["labels"]["ggo"]["pct_lung"]["icc"]["n_cases"] == 3


def test_cli_bad_inputs_exit_nonzero_without_output(tmp_path: Path, readers):
    a, b = readers
    out = tmp_path / "out"
    # fewer than two readers
    result = _run([str(a), "--out", str(out)])
    assert result.exit_code == 3 and "at least two readers" in result.stderr
    # no matching cases
    other = tmp_path / "other"
    _write(other / "zzz.nii.gz", _lesions((2, 6)))
    result = _run([str(a), str(other), "--out", str(out)])
    assert result.exit_code == 3 and "no case" in result.stderr
    # unreadable mask
    (b / "case3.nii.gz").write_bytes(b"not a nifti")
    result = _run([str(a), str(b), "--out", str(out)])
    assert result.exit_code == 3 and "cannot read mask" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # a grid elsewhere in space
    _write(b / "case3.nii.gz", _lesions((2, 6)), origin_xyz=(0.0, 0.0, 900.0))
    result = _run([str(a), str(b), "--out", str(out)])
    assert result.exit_code == 4 and "does not overlap" in result.stderr
    # unknown reader in --reader-labels
    result = _run([str(a), str(b), "--out", str(out), "--reader-labels", "nobody:3=ggo"])
    assert result.exit_code == 3
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_atomic_output_leaves_existing_folder_untouched_on_failure(tmp_path: Path):
    out = tmp_path / "res"
    out.mkdir()
    (out / "summary.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "summary.json").write_text("new")
            raise RuntimeError("boom")
    assert (out / "summary.json").read_text() == "old"
    with atomic_output_dir(out) as tmp:
        (tmp / "summary.json").write_text("new")
    assert (out / "summary.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["res"]


def test_cli_table_mode_long_and_wide(tmp_path: Path):
    # long table: a continuous measure, a nominal verdict and an ordinal severity, three readers
    rng = np.random.default_rng(0)
    rows = []
    truth = rng.uniform(0, 40, 12)
    severity = ["none", "mild", "moderate", "severe"]
    for i in range(12):
        for r, name in enumerate(["R1", "R2", "R3"]):
            rows.append((f"c{i}", name, "lesion_pct", round(truth[i] + r * 0.5 + rng.normal(0, 1), 2)))
            rows.append((f"c{i}", name, "verdict", "covid" if (i + (r == 2 and i == 0)) % 2 else "other"))
            rows.append((f"c{i}", name, "severity", severity[min(3, i // 3 + (r == 1 and i == 5))]))
    long = tmp_path / "scores.csv"
    pd.DataFrame(rows, columns=["case_id", "reader", "measure", "value"]).to_csv(long, index=False)
    out = tmp_path / "t"
    result = _run(["--table", str(long), "--out", str(out), "--categorical", "verdict",
                   "--ordinal", "severity=none<mild<moderate<severe"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    m = summary["measures"]
    assert m["lesion_pct"]["type"] == "continuous" and m["lesion_pct"]["icc"]["icc2_1"]["value"] > 0.9
    assert m["lesion_pct"]["pairs"]["R1 vs R2"]["bland_altman"]["n"] == 12
    assert m["verdict"]["type"] == "categorical" and "fleiss" in m["verdict"]
    assert m["verdict"]["pairs"]["R1 vs R2"]["kappa"]["value"] == pytest.approx(1.0)
    assert m["verdict"]["pairs"]["R1 vs R3"]["pct_agreement"] == pytest.approx(100 * 11 / 12)
    sev = m["severity"]["pairs"]["R1 vs R2"]
    assert m["severity"]["categories"] == severity
    assert sev["kappa_linear"]["value"] > sev["kappa"]["value"]  # one adjacent-category disagreement
    measures = pd.read_csv(out / "measures.csv")
    assert {"measure", "reader_a", "reader_b", "bias", "kappa", "kappa_quadratic"} <= set(measures.columns)
    assert (out / "bland_altman_lesion_pct_R1_vs_R2.png").is_file()

    # wide table; a text value in an undeclared measure is a one-line input error
    wide = tmp_path / "wide.csv"
    pd.DataFrame({"case_id": ["a", "a", "b", "b", "c", "c"], "reader": ["x", "y"] * 3,
                  "score": [1, 2, 3, 3, 5, 4], "verdict": ["p", "p", "n", "p", "n", "n"]}).to_csv(wide, index=False)
    result = _run(["--table", str(wide), "--out", str(tmp_path / "w")])
    assert result.exit_code == 3 and "--categorical" in result.stderr
    result = _run(["--table", str(wide), "--out", str(tmp_path / "w"), "--categorical", "verdict",
                   "--ordinal", "score"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert summary["measures"]["score"]["categories"] == [1, 2, 3, 4, 5]
    assert summary["measures"]["verdict"]["pairs"]["x vs y"]["pct_agreement"] == pytest.approx(100 * 2 / 3)


def test_dicom_seg_reader_goes_through_dicomseg_read_seg(tmp_path: Path, readers, monkeypatch):
    import sys

    import ctquant.outputs.dicomseg

    a, b = readers
    seg_dir = tmp_path / "seg"
    calls = []

    def fake_read_seg(path, which="lesions", reference=None):
        # stands in for ctquant.outputs.dicomseg.read_seg: the label map of "x.dcm" lies in the hidden ".x.nii.gz"
        path = Path(path)
        calls.append((path.name, which, reference is not None))
        image = sitk.ReadImage(str(path.parent / f".{path.stem}.nii.gz"))
        if reference is not None:
            image = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        return image

    for src in a.rglob("*.nii.gz"):
        rel = src.relative_to(a)
        dst = seg_dir / rel.parent / rel.name.replace(".nii.gz", ".dcm")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(b"placeholder")
        shutil.copy(src, dst.parent / f".{dst.stem}.nii.gz")  # hidden: not a mask file of the folder
    monkeypatch.setattr(ctquant.outputs.dicomseg, "read_seg", fake_read_seg)
    out = tmp_path / "seg_out"
    result = _run([str(seg_dir), str(a), "--out", str(out)])  # the SEG reader first: read onto A's grid
    assert result.exit_code == 0, result.output
    assert calls and all(which == "lesions" and has_ref for _, which, has_ref in calls)
    cases = pd.read_csv(out / "cases.csv")
    assert (cases.dice == 1.0).all() and set(cases.reader_a) == {"seg"}

    monkeypatch.setitem(sys.modules, "ctquant.outputs.dicomseg", None)  # as if the module were absent
    result = _run([str(seg_dir), str(a), "--out", str(tmp_path / "x")])
    assert result.exit_code == 3 and "DICOM SEG input needs ctquant.outputs.dicomseg.read_seg" in result.stderr


def test_cli_three_readers_lungs_folder_and_union(tmp_path: Path, readers):
    a, b = readers
    c = tmp_path / "readerC"
    for src in a.rglob("*.nii.gz"):
        dst = c / src.relative_to(a)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    lungs_dir = tmp_path / "lungs"
    lungs = np.zeros(SHAPE, np.uint8)
    lungs[1:9, 2:38, 2:38] = 1
    for case in ("case1", "site2/case2", "case3"):
        _write(lungs_dir / f"{case}.nii.gz", lungs)
    out = tmp_path / "three"
    result = _run([str(a), str(b), str(c), "--out", str(out), "--reader-labels", "2:3=ggo,4=consolidation",
                   "--lungs", str(lungs_dir), "--union", "lesion"])
    assert result.exit_code == 0, result.output
    cases = pd.read_csv(out / "cases.csv")
    assert len(cases) == 3 * 3 * 3  # cases x (2 classes + union) x 3 pairs
    assert set(zip(cases.reader_a, cases.reader_b)) == {("readerA", "readerB"), ("readerA", "readerC"),
                                                        ("readerB", "readerC")}
    lung_ml = np.count_nonzero(lungs) * 2.5 * 0.7 * 0.7 / 1000
    row = cases[(cases.case_id == "case3") & (cases.label == "ggo") & (cases.reader_b == "readerB")].iloc[0]
    assert row.volume_diff_pct_lung == pytest.approx(100 * row.volume_diff_ml / lung_ml)
    union = cases[(cases.case_id == "case1") & (cases.label == "lesion") & (cases.reader_b == "readerC")].iloc[0]
    assert union.dice == 1.0 and union.volume_a_ml == pytest.approx((1600 + 72) * 2.5 * 0.7 * 0.7 / 1000, rel=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"]["ggo"]["volume_ml"]["icc"]["n_readers"] == 3
    assert len(summary["labels"]["ggo"]["pairs"]) == 3
    assert summary["labels"]["lesion"]["pct_lung"]["icc"]["n_cases"] == 3
    volumes = pd.read_csv(out / "volumes.csv")
    assert len(volumes) == 3 * 3 * 3 and volumes.pct_lung.notna().all()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notice inside its metrics
def test_surface_distances_equal_monai_public_metrics():
    # the single-pass computation equals MONAI's compute_hausdorff_distance / compute_average_surface_distance
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
    from scipy import ndimage

    rng = np.random.default_rng(3)
    field = ndimage.gaussian_filter(rng.standard_normal((16, 48, 48)), 2.0)
    a, b = field > 0.05, np.roll(field, 2, axis=2) > 0.0
    spacing = (3.0, 0.8, 0.6)
    m = mask_metrics(a, b, spacing)
    ta, tb = (torch.from_numpy(x.astype(np.float32))[None, None] for x in (a, b))
    hd95 = compute_hausdorff_distance(ta, tb, include_background=True, percentile=95, spacing=list(spacing))
    assd = compute_average_surface_distance(ta, tb, include_background=True, symmetric=True, spacing=list(spacing))
    assert m["hd95_mm"] == pytest.approx(float(hd95), rel=1e-5)
    assert m["assd_mm"] == pytest.approx(float(assd), rel=1e-5)


def test_real_dicom_seg_reader_against_nifti_reader(tmp_path: Path):
    # A ctquant DICOM SEG (stores only its non-empty slices) against the same labels as NIfTI on the CT grid
    helpers = pytest.importorskip("test_dicomseg", reason="needs tests/test_dicomseg.py helpers")
    from ctquant.outputs.dicomseg import write_seg
    from ctquant.io.scans import load_scan

    scan = load_scan(helpers.make_ct_series(tmp_path / "ct"))
    lungs, lesions = helpers.toy_labels(scan.hu.shape)
    seg_reader, nifti_reader, lung_dir = tmp_path / "seg", tmp_path / "nifti", tmp_path / "lungs"
    seg_reader.mkdir()
    lung_dir.mkdir()
    write_seg(scan, lungs, lesions, seg_reader / "case1.dcm", method="hu")
    shutil.copy(seg_reader / "case1.dcm", lung_dir / "case1.dcm")
    nifti_reader.mkdir()
    sitk.WriteImage(scan.to_sitk(lesions), str(nifti_reader / "case1.nii.gz"))
    out = tmp_path / "out"
    result = _run([str(seg_reader), str(nifti_reader), "--out", str(out), "--lungs", str(lung_dir)])
    assert result.exit_code == 0, result.output
    assert "resampled" not in result.stderr
    cases = pd.read_csv(out / "cases.csv")
    assert (cases.dice == 1.0).all() and (cases.volume_diff_ml == 0).all()
    lung_ml = np.count_nonzero(lungs) * scan.voxel_volume_ml
    assert cases.lung_volume_ml.to_numpy() == pytest.approx(np.full(len(cases), lung_ml), rel=1e-6)


def test_agree_gives_each_pair_its_own_icc_and_labels_the_all_readers_one(tmp_path: Path):
    """Shrout & Fleiss' 4 judges: ICC(2,1) 0.29 over all; each pair's own differs (J1–J3 agree well)."""
    rows = [(f"t{i}", f"J{j + 1}", "score", float(SHROUT_FLEISS[i, j])) for i in range(6) for j in range(4)]
    table = tmp_path / "scores.csv"
    pd.DataFrame(rows, columns=["case_id", "reader", "measure", "value"]).to_csv(table, index=False)
    out = tmp_path / "t"
    result = _run(["--table", str(table), "--out", str(out)])
    assert result.exit_code == 0, result.output
    pairs = json.loads((out / "summary.json").read_text())["measures"]["score"]["pairs"]
    csv_rows = pd.read_csv(out / "measures.csv")
    seen = set()
    for a, b in [(0, 1), (0, 2), (2, 3)]:
        own = icc(SHROUT_FLEISS[:, [a, b]])["icc2_1"]["value"]
        key = f"J{a + 1} vs J{b + 1}"
        assert pairs[key]["icc"]["icc2_1"]["value"] == pytest.approx(own)
        row = csv_rows[(csv_rows.reader_a == f"J{a + 1}") & (csv_rows.reader_b == f"J{b + 1}")].iloc[0]
        assert row["icc2_1"] == pytest.approx(own, abs=1e-5)
        seen.add(round(own, 2))
        line = next(line for line in result.output.splitlines() if key in line)
        assert f"{own:.2g}" in line and "0.29" not in line  # the pair's own, not the all-readers value
    assert len(seen) == 3
    everyone = next(line for line in result.output.splitlines() if "all 4 readers" in line)
    assert "0.29" in everyone
    assert csv_rows[csv_rows.reader_a == "(all)"].iloc[0]["icc2_1"] == pytest.approx(0.2898, abs=1e-3)
