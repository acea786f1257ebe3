"""Trial endpoints: reduction rule, bilateral scope, exact intervals, config validation, CLI."""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import pytest
from scipy.stats import beta
from typer.testing import CliRunner

from ctquant.trial import endpoints as E
from ctquant.config import file_sha256
from ctquant.segment.lung_model import DEFAULT_MODEL_PATH as LUNG_MODEL_PATH
from ctquant.run.batch import ScanRecord, read_manifest
from ctquant.cli import app
from ctquant.config import code_sha256, config_hash, load_quantify_config
from ctquant.errors import IncompatibleResults, InputError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LUNG_ML = 3000.0  # equal lungs: the both-lung % is the mean of the two lungs' %
runner = CliRunner()


# --------------------------------------------------------------------------------------------------
# Hand-made results


def lung(ggo_pct: float, cons_pct: float = 0.0, lung_ml: float = LUNG_ML) -> dict:
    return {
        "lung_volume_ml": lung_ml,
        "ggo_volume_ml": ggo_pct * lung_ml / 100,
        "ggo_pct": ggo_pct,
        "consolidation_volume_ml": cons_pct * lung_ml / 100,
        "consolidation_pct": cons_pct,
        "opacity_volume_ml": (ggo_pct + cons_pct) * lung_ml / 100,
        "opacity_pct": ggo_pct + cons_pct,
        "mean_lung_hu": -800.0,
    }


def measures(sid: str = "S01", tp: str = "baseline", right: float = 5.0, left: float = 5.0,
             both: float | None = None, cons: float = 0.0, method: str = "model",
             model_sha: str = "a" * 64, config_sha: str = "c" * 16, study_date: str = "20260101") -> dict:
    """A measures.json mapping; ``both`` overrides the both-lung GGO % (else the mean of the lungs)."""
    both_entry = lung((right + left) / 2 if both is None else both, cons, lung_ml=2 * LUNG_ML)
    return {
        "schema": "ctquant.measures/1",
        "subject_id": sid,
        "timepoint": tp,
        "method": method,
        "lungs": {"right": lung(right, cons), "left": lung(left, cons), "both": both_entry},
        "bilateral": {"ggo": True, "consolidation": False, "opacity": True},
        "flags": [],
        "provenance": {"ctquant_version": "0.1.0", "code_sha256": code_sha256(), "method": method,
                       "model_file": "lesion_model.pt", "lung_model_sha256": file_sha256(LUNG_MODEL_PATH),
                       "model_sha256": model_sha, "config_sha256": config_sha, "config": {},
                       "input": f"/data/{sid}/{tp}", "series_instance_uid": f"1.2.3.{sid}.{tp}",
                       "study_date": study_date, "spacing_mm": [5.0, 0.7, 0.7], "created_utc": "x"},
    }


def write_result(folder: Path, m: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "measures.json").write_text(json.dumps(m))
    return folder


def endpoint(**overrides) -> E.Endpoint:
    spec = dict(name="ggo", measure="ggo_pct", from_tp="baseline", to_tp="day14",
                min_relative_decrease_pct=25.0, min_absolute_decrease=1.0)
    spec.update(overrides)
    return E.Endpoint(**spec)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5000, f"{path} is only {len(data)} bytes"
    from matplotlib.image import imread

    image = imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 200


# --------------------------------------------------------------------------------------------------
# Config


def test_shipped_config_defines_the_two_trial_endpoints():
    config = E.load_endpoints()
    by_name = {ep.name: ep for ep in config.endpoints}
    assert set(by_name) == {"bilateral_ggo_reduction", "bilateral_infiltration_reduction"}
    assert by_name["bilateral_ggo_reduction"].measure == "ggo_pct"
    assert by_name["bilateral_infiltration_reduction"].measure == "opacity_pct"
    for ep in config.endpoints:
        assert (ep.from_tp, ep.to_tp, ep.scope, ep.evaluate) == ("baseline", "day14", "bilateral", "both")
        assert (ep.min_relative_decrease_pct, ep.min_absolute_decrease) == (25.0, 1.0)
        assert ep.bilateral_min_pct_of_lung == 0.5
        assert ep.description
    assert len(config.sha256) == 16 and config.sha256 == E.load_endpoints().sha256


@pytest.mark.parametrize(
    "body, message",
    [
        ("endpoints:\n  - name: bad\n    measure: ggo_percent\n    from: baseline\n    to: day14\n"
         "    reduction: {min_relative_decrease_pct: 25, min_absolute_decrease: 1}\n",
         "endpoint 'bad': unknown measure 'ggo_percent'"),
        ("endpoints:\n  - name: nofrom\n    measure: ggo_pct\n    to: day14\n"
         "    reduction: {min_relative_decrease_pct: 25, min_absolute_decrease: 1}\n",
         "endpoint 'nofrom': missing field 'from'"),
        ("endpoints:\n  - name: norule\n    measure: ggo_pct\n    from: baseline\n    to: day14\n",
         "endpoint 'norule': missing field 'reduction'"),
        ("endpoints:\n  - name: halfrule\n    measure: ggo_pct\n    from: baseline\n    to: day14\n"
         "    reduction: {min_relative_decrease_pct: 25}\n",
         "endpoint 'halfrule': missing field 'reduction.min_absolute_decrease'"),
        ("endpoints:\n  - measure: ggo_pct\n    from: baseline\n    to: day14\n"
         "    reduction: {min_relative_decrease_pct: 25, min_absolute_decrease: 1}\n",
         "endpoint #1: missing field 'name'"),
        ("endpoints:\n  - name: typo\n    mesure: ggo_pct\n    from: baseline\n    to: day14\n"
         "    reduction: {min_relative_decrease_pct: 25, min_absolute_decrease: 1}\n",
         "endpoint 'typo': unknown field(s) mesure"),
        ("endpoints:\n  - name: ev\n    measure: ggo_pct\n    from: baseline\n    to: day14\n"
         "    evaluate: any\n    reduction: {min_relative_decrease_pct: 25, min_absolute_decrease: 1}\n",
         "endpoint 'ev': evaluate must be one of both, each"),
        ("endpoints:\n  - name: neg\n    measure: ggo_pct\n    from: baseline\n    to: day14\n"
         "    reduction: {min_relative_decrease_pct: 25, min_absolute_decrease: -1}\n",
         "endpoint 'neg': reduction.min_absolute_decrease must be between"),
        ("endpoints:\n  - name: txt\n    measure: ggo_pct\n    from: baseline\n    to: day14\n"
         "    reduction: {min_relative_decrease_pct: lots, min_absolute_decrease: 1}\n",
         "endpoint 'txt': reduction.min_relative_decrease_pct must be a number"),
        ("endpoints:\n  - name: same\n    measure: ggo_pct\n    from: day14\n    to: day14\n"
         "    reduction: {min_relative_decrease_pct: 25, min_absolute_decrease: 1}\n",
         "endpoint 'same': 'from' and 'to' are the same"),
        ("defaults: {from: baseline, to: day14, reduction: {min_relative_decrease_pct: 25, min_absolute_decrease: 1}}\n"
         "endpoints:\n  - {name: twice, measure: ggo_pct}\n  - {name: twice, measure: opacity_pct}\n",
         "duplicate endpoint name(s): twice"),
        ("endpoints: []\n", "'endpoints' must be a non-empty list"),
    ],
)
def test_config_validation_names_file_and_endpoint(tmp_path, body, message):
    path = tmp_path / "my_endpoints.yaml"
    path.write_text(body)
    with pytest.raises(InputError) as info:
        E.load_endpoints(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)
    assert info.value.exit_code == 3


def test_defaults_block_applies_and_endpoint_overrides(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text(
        "defaults:\n  from: baseline\n  to: day14\n"
        "  reduction: {min_relative_decrease_pct: 30, min_absolute_decrease: 2}\n"
        "endpoints:\n"
        "  - {name: a, measure: ggo_pct}\n"
        "  - {name: b, measure: consolidation_volume_ml, to: day4, evaluate: each, scope: all,\n"
        "     reduction: {min_absolute_decrease: 10}}\n")
    a, b = E.load_endpoints(path).endpoints
    assert (a.min_relative_decrease_pct, a.min_absolute_decrease, a.to_tp, a.evaluate) == (30, 2, "day14", "both")
    assert (b.min_relative_decrease_pct, b.min_absolute_decrease, b.to_tp) == (30, 10, "day4")
    assert (b.evaluate, b.scope, b.unit) == ("each", "all", "ml")


# --------------------------------------------------------------------------------------------------
# Pure functions


def test_change():
    ch = E.change(12.3, 6.1)
    assert ch["abs_change"] == pytest.approx(-6.2)
    assert ch["rel_change_pct"] == pytest.approx(-6.2 / 12.3 * 100)
    assert E.change(0.0, 2.0) == {"baseline": 0.0, "follow_up": 2.0, "abs_change": 2.0, "rel_change_pct": None}
    assert E.change(-800.0, -700.0)["rel_change_pct"] is None  # HU: no ratio
    assert E.change(None, 3.0)["abs_change"] is None
    assert E.change(4.0, 5.0)["rel_change_pct"] == pytest.approx(25.0)


def test_is_bilateral_per_lung_with_minimum():
    assert E.is_bilateral(measures(right=3.0, left=0.6), "ggo_pct", 0.5)
    assert E.is_bilateral(measures(right=3.0, left=0.5), "ggo_pct", 0.5)  # at the threshold: involved
    assert not E.is_bilateral(measures(right=3.0, left=0.49), "ggo_pct", 0.5)
    assert not E.is_bilateral(measures(right=0.0, left=8.0), "ggo_pct", 0.0)  # 0 is never involved
    # a volume measure is judged on the matching % of lung
    assert E.is_bilateral(measures(right=3.0, left=0.6), "ggo_volume_ml", 0.5)
    assert not E.is_bilateral(measures(right=3.0, left=0.4), "ggo_volume_ml", 0.5)
    # infiltration counts consolidation too
    assert E.is_bilateral(measures(right=3.0, left=0.2, cons=0.4), "opacity_pct", 0.5)


def test_verdict_reduction_with_reason():
    ep = endpoint()
    v = E.reduction_verdict(ep, measures(right=13, left=11.6, both=12.3), measures(tp="day14", right=6, left=6.2, both=6.1))
    assert v.evaluable and v.reduction is True and v.label == "reduction"
    assert v.reason == ("GGO % of lung (both lungs) 12.3 → 6.1: −6.2 points (−50.4 %) "
                        "≥ 1 point and ≥ 25 %: reduction")
    assert v.changes["both"]["abs_change"] == pytest.approx(-6.2)
    assert v.bilateral_at_baseline is True


@pytest.mark.parametrize(
    "before, after, expected, why",
    [
        (4.0, 3.0, True, "≥ 1 point and ≥ 25 %"),         # exactly at both thresholds: reduction
        (4.0, 3.01, False, "decrease < 1 point and < 25 %"),  # −0.99 points, −24.75 %
        (10.0, 7.5, True, "≥ 1 point and ≥ 25 %"),        # −2.5 points, −25 %
        (10.0, 7.51, False, "decrease < 25 %"),            # −2.49 points (enough), −24.9 % (not)
        (2.0, 1.0, True, "≥ 1 point and ≥ 25 %"),         # −1 point, −50 %
        (2.0, 1.01, False, "decrease < 1 point"),          # −0.99 points (not), −49.5 % (enough)
        (3.0, 3.0, False, "no decrease"),
        (3.0, 4.5, False, "no decrease"),
    ],
)
def test_threshold_just_under_and_just_over(before, after, expected, why):
    v = E.reduction_verdict(endpoint(), measures(both=before), measures(tp="day14", both=after))
    assert v.evaluable and v.reduction is expected
    assert why in v.reason
    assert v.reason.endswith(": reduction" if expected else ": no reduction")


def test_unilateral_baseline_is_not_evaluable():
    ep = endpoint()
    v = E.reduction_verdict(ep, measures(right=9.0, left=0.2), measures(tp="day14", right=1.0, left=0.0))
    assert not v.evaluable and v.reduction is None and v.label == "not evaluable"
    assert v.reason.startswith("not bilateral at baseline: GGO % of lung right 9, left 0.2")
    assert "≥ 0.5 %" in v.reason
    # with scope "all" the same participant is evaluable (and reduced)
    v = E.reduction_verdict(endpoint(scope="all"), measures(right=9.0, left=0.2), measures(tp="day14", right=1.0, left=0.0))
    assert v.evaluable and v.reduction is True


def test_missing_time_point_is_not_evaluable():
    v = E.reduction_verdict(endpoint(), measures(), None)
    assert not v.evaluable and v.reduction is None and v.reason == "no day14 result"
    v = E.reduction_verdict(endpoint(), None, None)
    assert v.reason == "no baseline result; no day14 result"


def test_evaluate_each_lung_requires_reduction_in_both_lungs():
    before, after = measures(right=10.0, left=2.0), measures(tp="day14", right=2.0, left=1.8)
    # both lungs total: 6 → 1.9 is a reduction
    assert E.reduction_verdict(endpoint(), before, after).reduction is True
    v = E.reduction_verdict(endpoint(evaluate="each"), before, after)
    assert v.evaluable and v.reduction is False
    assert "(right lung) 10 → 2" in v.reason and "(left lung) 2 → 1.8" in v.reason
    assert "not met in the left lung" in v.reason
    v = E.reduction_verdict(endpoint(evaluate="each"), before, measures(tp="day14", right=2.0, left=1.0))
    assert v.reduction is True and v.reason.endswith("reduction in each lung")


def test_volume_endpoint_uses_millilitres():
    ep = endpoint(measure="ggo_volume_ml", min_absolute_decrease=50.0)
    v = E.reduction_verdict(ep, measures(right=4.0, left=4.0), measures(tp="day14", right=3.0, left=3.0))
    # 240 ml → 180 ml in each lung; both: 240 → 180 (−60 ml, −25 %)
    assert v.reduction is True and "−60 ml" in v.reason and "≥ 50 ml" in v.reason


def exact_cp(k: int, n: int) -> tuple[float, float]:
    """Clopper-Pearson from the beta quantiles, independently of statsmodels."""
    lo = 0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1)
    hi = 1.0 if k == n else beta.ppf(0.975, k + 1, n - k)
    return lo, hi


@pytest.mark.parametrize("k", range(10))
def test_clopper_pearson_matches_beta_quantiles(k):
    assert E.clopper_pearson(k, 9) == pytest.approx(exact_cp(k, 9), abs=1e-10)


def test_clopper_pearson_known_values():
    assert E.clopper_pearson(0, 9) == pytest.approx((0.0, 0.3363), abs=5e-5)
    assert E.clopper_pearson(9, 9) == pytest.approx((0.6637, 1.0), abs=5e-5)
    assert E.clopper_pearson(4, 9) == pytest.approx((0.1370, 0.7880), abs=5e-5)
    # 0/9 upper bound in closed form: 1 - 0.025 ** (1/9)
    assert E.clopper_pearson(0, 9)[1] == pytest.approx(1 - 0.025 ** (1 / 9))
    with pytest.raises(ValueError):
        E.clopper_pearson(0, 0)


@pytest.mark.parametrize("k", [0, 4, 9])
def test_cohort_summary(k):
    ep = endpoint()
    rows = [{"subject_id": f"S{i}", "endpoint": "ggo", "evaluable": True, "reduction": i < k, "reason": "r"}
            for i in range(9)]
    rows.append({"subject_id": "S9", "endpoint": "ggo", "evaluable": False, "reduction": None,
                 "reason": "no day14 scan in the manifest"})
    rows.append({"subject_id": "S0", "endpoint": "other", "evaluable": True, "reduction": True, "reason": ""})
    s = E.cohort_summary(rows, ep)
    assert (s["n_subjects"], s["n_evaluable"], s["n_reduction"]) == (10, 9, k)
    assert s["pct_reduction"] == round(100 * k / 9, 2)
    lo, hi = exact_cp(k, 9)
    assert s["ci95"] == pytest.approx([lo, hi], abs=1e-10)
    assert (s["ci95_low_pct"], s["ci95_high_pct"]) == (round(100 * lo, 2), round(100 * hi, 2))
    assert s["not_evaluable"] == [{"subject_id": "S9", "reason": "no day14 scan in the manifest"}]


def test_cohort_summary_without_evaluable_participants():
    s = E.cohort_summary([{"subject_id": "S1", "endpoint": "ggo", "evaluable": False, "reduction": None,
                           "reason": "x"}], endpoint())
    assert s["n_evaluable"] == 0 and s["pct_reduction"] is None and s["ci95"] == [None, None]


def test_load_measures_rejects_incomplete_results(tmp_path):
    m = measures()
    del m["lungs"]["left"]["ggo_pct"]
    path = write_result(tmp_path / "r", m)
    with pytest.raises(InputError, match="lungs.left.ggo_pct is missing"):
        E.load_measures(path)
    (tmp_path / "r" / "measures.json").write_text(json.dumps({**measures(), "schema": "other/2"}))
    with pytest.raises(InputError, match="unsupported result schema"):
        E.load_measures(path)
    m = measures()
    m["lungs"]["right"]["mean_lung_hu"] = float("nan")  # quantify writes NaN when a lung is empty
    (tmp_path / "r" / "measures.json").write_text(json.dumps(m))
    assert E.load_measures(path)["subject_id"] == "S01"


# --------------------------------------------------------------------------------------------------
# ctquant compare


def test_compare_cli_on_result_folders(tmp_path):
    a = write_result(tmp_path / "a", measures(right=13.0, left=11.6, both=12.3, study_date="20260101"))
    b = write_result(tmp_path / "b", measures(tp="day14", right=6.0, left=6.2, both=6.1, study_date="20260115"))
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(a), str(b / "measures.json"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "bilateral_ggo_reduction" in result.output

    rows = read_csv(out / "comparison.csv")
    assert len(rows) == len(E.MEASURES) * 3
    ggo_both = next(r for r in rows if r["measure"] == "ggo_pct" and r["lung"] == "both")
    assert (ggo_both["from_timepoint"], ggo_both["to_timepoint"]) == ("baseline", "day14")
    assert float(ggo_both["from_value"]) == 12.3 and float(ggo_both["to_value"]) == 6.1
    assert float(ggo_both["abs_change"]) == pytest.approx(-6.2)
    assert float(ggo_both["rel_change_pct"]) == pytest.approx(-50.41, abs=0.01)
    ggo_right = next(r for r in rows if r["measure"] == "ggo_pct" and r["lung"] == "right")
    assert float(ggo_right["abs_change"]) == pytest.approx(-7.0)

    verdicts = {r["endpoint"]: r for r in read_csv(out / "verdicts.csv")}
    assert verdicts["bilateral_ggo_reduction"]["verdict"] == "reduction"
    assert "12.3 → 6.1: −6.2 points (−50.4 %) ≥ 1 point and ≥ 25 %: reduction" in verdicts["bilateral_ggo_reduction"]["reason"]
    assert verdicts["bilateral_infiltration_reduction"]["verdict"] == "reduction"

    doc = json.loads((out / "comparison.json").read_text())
    assert doc["schema"] == "ctquant.comparison/1" and doc["subject_id"] == "S01"
    assert doc["days_between"] == 14 and doc["mismatch"] == []
    assert {e["endpoint"] for e in doc["endpoints"]} == {"bilateral_ggo_reduction", "bilateral_infiltration_reduction"}
    prov = doc["provenance"]
    assert prov["endpoints_config_sha256"] == E.load_endpoints().sha256
    assert prov["ctquant_version"]
    assert prov["results"]["baseline"]["model_sha256"] == "a" * 64
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("field", ["method", "model_sha", "config_sha"])
def test_compare_refuses_mismatched_results(tmp_path, field):
    other = {"method": "hu", "model_sha": "b" * 64, "config_sha": "d" * 16}[field]
    a = write_result(tmp_path / "a", measures())
    b = write_result(tmp_path / "b", measures(tp="day14", right=1.0, left=1.0, **{field: other}))
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(a), str(b), "--out", str(out)])
    assert result.exit_code == 9, result.output
    assert "--allow-mismatch" in result.output
    assert not (out / "comparison.json").exists()

    result = runner.invoke(app, ["compare", str(a), str(b), "--out", str(out), "--allow-mismatch"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "comparison.json").read_text())
    recorded = {m["field"] for m in doc["mismatch"]}
    assert recorded == {{"method": "method", "model_sha": "model_sha256", "config_sha": "config_sha256"}[field]}
    assert doc["provenance"]["allow_mismatch"] is True
    assert any("made differently" in n for n in doc["notes"])
    verdict = read_csv(out / "verdicts.csv")[0]
    assert verdict["mismatch"]


def test_acquisition_differences_name_spacing_and_kernel_beyond_the_tolerance():
    def with_protocol(spacing_mm, kernel_class=None):
        m = measures()
        m["provenance"]["spacing_mm"] = spacing_mm
        if kernel_class:
            m["provenance"]["kernel_class"] = kernel_class
        return m

    thin = with_protocol([1.25, 0.7, 0.7], "smooth")
    assert E.acquisition_differences(thin, with_protocol([1.5, 0.78, 0.78], "unknown")) == []  # within 25 %
    assert E.acquisition_differences(thin, with_protocol([5.0, 0.7, 0.7], "sharp")) == [
        {"field": "slice_spacing_mm", "from": 1.25, "to": 5.0},
        {"field": "kernel_class", "from": "smooth", "to": "sharp"}]
    assert [d["field"] for d in E.acquisition_differences(thin, with_protocol([1.25, 0.98, 0.98]))] == ["pixel_spacing_mm"]
    older = measures()
    del older["provenance"]["spacing_mm"]  # a result that does not record it is not compared on it
    assert E.acquisition_differences(thin, older) == []


def test_compare_notes_scans_reconstructed_differently(tmp_path):
    """Different slice spacing is a note in comparison.json and on the console, not a refusal."""
    a = write_result(tmp_path / "a", measures(right=13.0, left=11.6))
    day14 = measures(tp="day14", right=6.0, left=6.2)
    day14["provenance"]["spacing_mm"] = [1.25, 0.7, 0.7]
    b = write_result(tmp_path / "b", day14)
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(a), str(b), "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "comparison.json").read_text())
    assert doc["acquisition_differences"] == [{"field": "slice_spacing_mm", "from": 5.0, "to": 1.25}]
    assert any("reconstructed differently (slice_spacing_mm 5.0 vs 1.25)" in n for n in doc["notes"])
    assert "reconstructed differently" in result.output
    assert doc["mismatch"] == [] and doc["endpoints"][0]["verdict"] == "reduction"


def test_compare_refuses_different_subjects(tmp_path):
    a = write_result(tmp_path / "a", measures(sid="S01"))
    b = write_result(tmp_path / "b", measures(sid="S02", tp="day14"))
    with pytest.raises(IncompatibleResults, match="subject_id S01 vs S02"):
        E.run_compare(a, b, tmp_path / "cmp")


def test_compare_unmatched_time_points_writes_table_only(tmp_path):
    a = write_result(tmp_path / "a", measures())
    b = write_result(tmp_path / "b", measures(tp="day4", right=1.0, left=1.0))
    doc = E.run_compare(a, b, tmp_path / "cmp")
    assert doc["to_timepoint"] == "day4" and doc["endpoints"] == []
    assert len(read_csv(tmp_path / "cmp" / "comparison.csv")) == len(E.MEASURES) * 3
    # --to relabels; then the day-14 endpoints apply
    doc = E.run_compare(a, b, tmp_path / "cmp2", to_tp="day14")
    assert len(doc["endpoints"]) == 2


class FakePipeline:
    """Stands in for ``pipeline.quantify_to_dir``: lays out a results folder from hand-made measures as
    the pipeline would (so that the batch finds it current on a re-run), or fails on request."""

    def __init__(self, values: dict[tuple[str, str], dict], fail: set[tuple[str, str]] = frozenset()):
        self.values, self.fail, self.calls = values, set(fail), []

    def quantify_to_dir(self, input_path, out_dir, *, method="model", device="auto", subject_id=None,
                        timepoint=None, config_path=None, extra_provenance=None, **_):
        self.calls.append({"input": str(input_path), "out": str(out_dir), "method": method,
                           "subject_id": subject_id, "timepoint": timepoint})
        if (subject_id, timepoint) in self.fail:
            raise InputError("not a CT series", input_path)
        m = copy.deepcopy(self.values[(subject_id, timepoint)])
        m["provenance"].update(extra_provenance or {})
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "measures.csv").write_text(f"subject_id,timepoint\n{subject_id},{timepoint}\n")
        for name in ("lungs.nii.gz", "lesions.nii.gz"):
            (out / name).write_bytes(b"")
        write_result(out, m)  # measures.json last
        return m

    def install(self, monkeypatch):
        from ctquant.run import scan as pipeline

        monkeypatch.setattr(pipeline, "quantify_to_dir", self.quantify_to_dir)
        return self


def test_compare_quantifies_scan_inputs(tmp_path, monkeypatch):
    fake = FakePipeline({("P7", "baseline"): measures(sid="P7", right=8, left=6),
                         ("P7", "day14"): measures(sid="P7", tp="day14", right=7.5, left=5.8)}).install(monkeypatch)
    scans = tmp_path / "dicom"
    for name in ("b", "f"):
        (scans / name).mkdir(parents=True)
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(scans / "b"), str(scans / "f"), "--out", str(out),
                                 "--subject", "P7", "--method", "hu"])
    assert result.exit_code == 0, result.output
    assert [(c["timepoint"], c["method"], Path(c["out"]).name) for c in fake.calls] == [
        ("baseline", "hu", "baseline"), ("day14", "hu", "day14")]
    assert (out / "baseline" / "measures.json").exists() and (out / "day14" / "measures.json").exists()
    verdicts = {r["endpoint"]: r for r in read_csv(out / "verdicts.csv")}
    # 7 → 6.65: −0.35 points, −5 %
    assert verdicts["bilateral_ggo_reduction"]["verdict"] == "no reduction"
    assert "decrease < 1 point and < 25 %" in verdicts["bilateral_ggo_reduction"]["reason"]


def test_compare_missing_input_is_an_input_error(tmp_path):
    a = write_result(tmp_path / "a", measures())
    result = runner.invoke(app, ["compare", str(a), str(tmp_path / "nope.nii.gz"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 3
    assert "nope.nii.gz" in result.output


# --------------------------------------------------------------------------------------------------
# ctquant endpoints (cohort)

#: A 10-participant cohort (GGO: 8 evaluable, 4 with reduction; S09 unilateral, S10 without day 14).
COHORT = {
    # subject: (baseline right, left, day14 right, left) GGO %
    "S01": (10.0, 8.0, 4.0, 3.0),   # 9 → 3.5: reduction
    "S02": (6.0, 6.0, 2.0, 2.0),    # 6 → 2: reduction
    "S03": (4.0, 4.0, 3.0, 3.0),    # 4 → 3: exactly −1 point, −25 %: reduction
    "S04": (4.0, 4.0, 3.01, 3.01),  # 4 → 3.01: just under: no reduction
    "S05": (20.0, 10.0, 12.0, 8.0),  # 15 → 10: reduction
    "S06": (3.0, 3.0, 3.5, 3.5),    # increase
    "S07": (2.0, 2.0, 1.6, 1.6),    # −0.4 points: no reduction
    "S08": (12.0, 12.0, 9.6, 9.6),  # −2.4 points but −20 %: no reduction
    "S09": (9.0, 0.1, 2.0, 0.0),    # unilateral at baseline: not evaluable
    "S10": (5.0, 5.0, None, None),  # no day 14
}


#: Hand-made results as ``--method hu`` with the default quantification config makes them (current for the batch).
HU = dict(method="hu", model_sha=None, config_sha=config_hash(load_quantify_config()))


def cohort(tmp_path: Path, subjects=tuple(COHORT), day2: dict | None = None,
           **kw) -> tuple[Path, dict[tuple[str, str], dict]]:
    """A manifest (baseline, day2, day14 rows; arm and site columns; an input folder per row) and each
    row's hand-made measures; day 2 as baseline unless ``day2`` gives the subject's (right, left) GGO %."""
    lines = ["subject_id,timepoint,input,arm,site"]
    values = {}
    for i, sid in enumerate(subjects):
        br, bl, fr, fl = COHORT[sid]
        arm, site = "active" if i % 2 == 0 else "placebo", f"site-{i % 3}"
        scans = {"baseline": (br, bl, "20260101"), "day2": (*(day2 or {}).get(sid, (br, bl)), "20260103")}
        if fr is not None:
            scans["day14"] = (fr, fl, "20260115")
        for tp, (right, left, when) in scans.items():
            values[(sid, tp)] = measures(sid=sid, tp=tp, right=right, left=left, cons=0.5, study_date=when, **kw)
            (tmp_path / "scans" / f"{sid}_{tp}").mkdir(parents=True)
            lines.append(f"{sid},{tp},scans/{sid}_{tp},{arm},{site}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, values


def scan_results(manifest: Path, values: dict[tuple[str, str], dict], out: Path) -> dict[tuple[str, str], ScanRecord]:
    """The batch records of the manifest's rows, made from hand-made measures (current results)."""
    rows, _ = read_manifest(manifest)
    return {row.key: ScanRecord(row.subject_id, row.timepoint, row.input, str(out / "scans" / row.key[0] / row.key[1]),
                                "skipped", measures=values[(row.subject_id, row.timepoint)])
            for row in rows}


@pytest.fixture()
def no_pipeline(monkeypatch):
    """Any attempt to quantify fails the test."""
    from ctquant.run import scan as pipeline

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected quantification of {args}")

    monkeypatch.setattr(pipeline, "quantify_to_dir", refuse)


def endpoints_cli(manifest: Path, out: Path, *args: str):
    return runner.invoke(app, ["endpoints", str(manifest), "--out", str(out), "--method", "hu", "--device", "cpu",
                               *args])


def test_endpoints_cli_end_to_end(tmp_path, monkeypatch):
    manifest, values = cohort(tmp_path, **HU)
    fake = FakePipeline(values).install(monkeypatch)
    out = tmp_path / "out"
    result = endpoints_cli(manifest, out)
    assert result.exit_code == 0, result.output
    assert "bilateral_ggo_reduction" in result.output
    assert len(fake.calls) == len(values) == 29  # the batch quantifies every manifest row (day 2 too)

    cohort_table = {r["endpoint"]: r for r in read_csv(out / "endpoints" / "endpoints.csv")}
    ggo = cohort_table["bilateral_ggo_reduction"]
    assert (ggo["n_subjects"], ggo["n_evaluable"], ggo["n_reduction"]) == ("10", "8", "4")
    lo, hi = exact_cp(4, 8)
    assert float(ggo["pct_reduction"]) == 50.0
    assert float(ggo["ci95_low_pct"]) == pytest.approx(100 * lo, abs=0.006)
    assert float(ggo["ci95_high_pct"]) == pytest.approx(100 * hi, abs=0.006)
    assert "S09: not bilateral at baseline" in ggo["not_evaluable"]
    assert "S10: no day14 scan in the manifest" in ggo["not_evaluable"]
    assert ggo["endpoints_config_sha256"] == E.load_endpoints().sha256
    # infiltration = GGO + 0.5 % consolidation per lung: S09's left lung is 0.6 % → bilateral, 5.05 → 1.5
    # (reduction); S03 4.5 → 3.5 is −22 %: no reduction (unlike its GGO); S01, S02, S05 reduce.
    infl = cohort_table["bilateral_infiltration_reduction"]
    assert (infl["n_evaluable"], infl["n_reduction"]) == ("9", "4")
    assert "S10: no day14 scan in the manifest" == infl["not_evaluable"]

    subjects = read_csv(out / "endpoints" / "subjects.csv")
    assert len(subjects) == 2 * 10
    by = {(r["endpoint"], r["subject_id"]): r for r in subjects}
    s03 = by[("bilateral_ggo_reduction", "S03")]
    assert s03["verdict"] == "reduction" and "4 → 3: −1 point (−25 %) ≥ 1 point and ≥ 25 %" in s03["reason"]
    s04 = by[("bilateral_ggo_reduction", "S04")]
    assert s04["verdict"] == "no reduction" and s04["reduction"] == "False"
    assert float(s04["both_abs_change"]) == pytest.approx(-0.99)
    assert by[("bilateral_ggo_reduction", "S09")]["verdict"] == "not evaluable"
    assert by[("bilateral_ggo_reduction", "S10")]["reason"] == "no day14 scan in the manifest"
    assert by[("bilateral_ggo_reduction", "S10")]["both_from"] == "5.0"  # baseline value kept
    assert by[("bilateral_ggo_reduction", "S01")]["arm"] == "active"     # extra manifest columns kept
    assert by[("bilateral_ggo_reduction", "S02")]["site"] == "site-1"
    assert by[("bilateral_ggo_reduction", "S01")]["days_between"] == "14"
    scans = out.resolve() / "scans"
    assert by[("bilateral_ggo_reduction", "S01")]["from_result"] == str(scans / "S01" / "baseline" / "measures.json")

    doc = json.loads((out / "endpoints" / "endpoints.json").read_text())
    assert doc["failures"] == [] and doc["mismatch"] == []
    summary = {s["endpoint"]: s for s in doc["endpoints"]}["bilateral_ggo_reduction"]
    assert summary["ci95"] == pytest.approx(list(exact_cp(4, 8)), abs=1e-10)
    prov = doc["provenance"]
    assert prov["ctquant_version"] and prov["endpoints_config_sha256"] == E.load_endpoints().sha256
    assert len(prov["manifest_sha256"]) == 64
    assert {s["status"] for s in prov["scans"]} == {"ok"} and len(prov["scans"]) == 29

    for name in ("bilateral_ggo_reduction", "bilateral_infiltration_reduction"):
        assert_png(out / "endpoints" / f"trajectory_{name}.png")
        assert_png(out / "endpoints" / f"waterfall_{name}.png")
    # the batch's own outputs, in the same folder
    assert read_csv(out / "failures.csv") == []
    assert len(read_csv(out / "cohort.csv")) == 29 and (out / "batch.json").is_file()
    assert not list(out.glob(".*.tmp")) and not (out / ".batch.lock").exists()


def test_endpoints_all_and_none_reduced(tmp_path, no_pipeline):
    manifest, values = cohort(tmp_path, ("S01", "S02", "S03", "S05"))
    out = tmp_path / "out"
    doc = E.run_endpoints(manifest, out, scan_results=scan_results(manifest, values, out))
    ggo = {s["endpoint"]: s for s in doc["endpoints"]}["bilateral_ggo_reduction"]
    assert (ggo["n_evaluable"], ggo["n_reduction"]) == (4, 4)
    assert ggo["ci95"] == pytest.approx(list(exact_cp(4, 4)), abs=1e-10) and ggo["ci95"][1] == 1.0
    assert not (out / "scans").exists() and not (out / "cohort.csv").exists()  # nothing was run

    manifest, values = cohort(tmp_path / "b", ("S04", "S06", "S07", "S08"))
    out = tmp_path / "b" / "out"
    doc = E.run_endpoints(manifest, out, scan_results=scan_results(manifest, values, out))
    ggo = {s["endpoint"]: s for s in doc["endpoints"]}["bilateral_ggo_reduction"]
    assert (ggo["n_evaluable"], ggo["n_reduction"], ggo["ci95"][0]) == (4, 0, 0.0)


def test_yaml_added_endpoint_is_picked_up(tmp_path, monkeypatch):
    manifest, values = cohort(tmp_path, ("S01", "S02", "S06"),
                              day2={"S01": (9.0, 7.0), "S02": (6.0, 6.0), "S06": (1.0, 1.0)}, **HU)
    FakePipeline(values).install(monkeypatch)
    config = tmp_path / "mine.yaml"
    config.write_text(E.DEFAULT_CONFIG.read_text() + """
  - name: early_consolidation_volume
    description: consolidation volume down by 10 % and 20 ml by day 2, whatever the scope
    measure: consolidation_volume_ml
    to: day2
    scope: all
    reduction: {min_relative_decrease_pct: 10, min_absolute_decrease: 20}

  - name: ggo_day2_each_lung
    measure: ggo_pct
    to: day2
    evaluate: each
""")
    out = tmp_path / "out"
    result = endpoints_cli(manifest, out, "--config", str(config))
    assert result.exit_code == 0, result.output
    cohort_table = {r["endpoint"]: r for r in read_csv(out / "endpoints" / "endpoints.csv")}
    assert set(cohort_table) == {"bilateral_ggo_reduction", "bilateral_infiltration_reduction",
                                 "early_consolidation_volume", "ggo_day2_each_lung"}
    # consolidation is 0.5 % at every time point: no participant reduces it
    early = cohort_table["early_consolidation_volume"]
    assert (early["n_evaluable"], early["n_reduction"]) == ("3", "0")
    # GGO baseline → day 2, each lung: S01 (10, 8) → (9, 7) no; S02 (6, 6) → (6, 6) no; S06 (3, 3) → (1, 1) yes
    each = cohort_table["ggo_day2_each_lung"]
    assert (each["to"], each["evaluate"], each["n_evaluable"], each["n_reduction"]) == ("day2", "each", "3", "1")
    assert_png(out / "endpoints" / "waterfall_early_consolidation_volume.png")
    assert_png(out / "endpoints" / "trajectory_ggo_day2_each_lung.png")
    doc = json.loads((out / "endpoints" / "endpoints.json").read_text())
    assert doc["provenance"]["endpoints_config"] == str(config)
    assert doc["provenance"]["endpoints_config_sha256"] != E.load_endpoints().sha256


def test_endpoints_reports_failed_scans_and_a_rerun_retries_only_them(tmp_path, monkeypatch):
    manifest, values = cohort(tmp_path, ("S01", "S02", "S03"), **HU)
    fake = FakePipeline(values, fail={("S02", "baseline")}).install(monkeypatch)
    out = tmp_path / "out"
    result = endpoints_cli(manifest, out)
    assert result.exit_code == 8, result.output
    assert "1 scan(s) failed" in result.output
    assert len(fake.calls) == 9
    assert fake.calls[0] == {"input": str((tmp_path / "scans" / "S01_baseline").resolve()),
                             "out": str(out.resolve() / "scans" / "S01" / "baseline"),
                             "method": "hu", "subject_id": "S01", "timepoint": "baseline"}
    failures = read_csv(out / "failures.csv")
    assert [(f["subject_id"], f["timepoint"], f["exit_code"], f["category"], f["reason"]) for f in failures] == [
        ("S02", "baseline", "3", "InputError", "not a CT series")]
    ggo = {r["endpoint"]: r for r in read_csv(out / "endpoints" / "endpoints.csv")}["bilateral_ggo_reduction"]
    assert (ggo["n_evaluable"], ggo["n_reduction"]) == ("2", "2")
    assert "S02: baseline scan failed: not a CT series" in ggo["not_evaluable"]
    doc = json.loads((out / "endpoints" / "endpoints.json").read_text())
    assert doc["failures"] == [{"subject_id": "S02", "timepoint": "baseline", "manifest_line": 5,
                                "exit_code": 3, "category": "InputError", "reason": "not a CT series"}]

    # a second run reuses the batch's current results and retries only the failed scan
    fake.fail, fake.calls = set(), []
    result = endpoints_cli(manifest, out)
    assert result.exit_code == 0, result.output
    assert "1 scan(s) to quantify, 8 current result(s) skipped" in result.output
    assert [(c["subject_id"], c["timepoint"]) for c in fake.calls] == [("S02", "baseline")]
    assert read_csv(out / "failures.csv") == []
    statuses = {(s["subject_id"], s["timepoint"]): s["status"]
                for s in json.loads((out / "endpoints" / "endpoints.json").read_text())["provenance"]["scans"]}
    assert statuses[("S02", "baseline")] == "ok" and statuses[("S01", "day14")] == "skipped"
    ggo = {r["endpoint"]: r for r in read_csv(out / "endpoints" / "endpoints.csv")}["bilateral_ggo_reduction"]
    assert (ggo["n_evaluable"], ggo["n_reduction"]) == ("3", "3")


def test_endpoints_refuses_mixed_models_in_cohort(tmp_path, monkeypatch):
    manifest, values = cohort(tmp_path, ("S01", "S02"), **HU)
    values[("S02", "day14")] = measures(sid="S02", tp="day14", right=2, left=2, **{**HU, "model_sha": "f" * 64})
    FakePipeline(values).install(monkeypatch)
    out = tmp_path / "out"
    result = endpoints_cli(manifest, out)
    assert result.exit_code == 9, result.output
    assert "--allow-mismatch" in result.output
    assert not (out / "endpoints" / "endpoints.csv").exists()
    result = endpoints_cli(manifest, out, "--allow-mismatch")
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "endpoints" / "endpoints.json").read_text())
    assert len(doc["mismatch"]) == 2 and doc["provenance"]["allow_mismatch"] is True
    s02 = [r for r in read_csv(out / "endpoints" / "subjects.csv") if r["subject_id"] == "S02"][0]
    assert s02["mismatch"] == "model_sha256"


def test_cohort_lists_participants_whose_time_points_were_reconstructed_differently(tmp_path, no_pipeline):
    manifest, values = cohort(tmp_path, ("S01", "S02"))
    values[("S02", "day14")]["provenance"]["spacing_mm"] = [1.25, 0.7, 0.7]
    out = tmp_path / "out"
    doc = E.run_endpoints(manifest, out, scan_results=scan_results(manifest, values, out))
    assert doc["acquisition_differs"] == ["S02"]
    rows = {r["subject_id"]: r for r in read_csv(out / "subjects.csv")}  # given scan results: the report in out
    assert rows["S02"]["acquisition_differs"] == "slice_spacing_mm 5.0 vs 1.25"
    assert rows["S01"]["acquisition_differs"] == ""


def test_mismatch_at_an_unevaluated_time_point_is_not_refused(tmp_path, no_pipeline):
    manifest, values = cohort(tmp_path, ("S01", "S02"))
    values[("S02", "day2")] = measures(sid="S02", tp="day2", model_sha="f" * 64)  # no endpoint uses day 2
    out = tmp_path / "out"
    doc = E.run_endpoints(manifest, out, scan_results=scan_results(manifest, values, out))
    assert doc["mismatch"] == []


def test_endpoints_outputs_are_all_or_nothing(tmp_path, no_pipeline, monkeypatch):
    manifest, values = cohort(tmp_path, ("S01", "S02"))
    out = tmp_path / "out"

    def broken(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(E, "plot_waterfall", broken)
    with pytest.raises(RuntimeError):
        E.run_endpoints(manifest, out, scan_results=scan_results(manifest, values, out))
    assert sorted(p.name for p in out.iterdir()) == []  # no csv, json, png, nor temporary file


def test_scan_results_must_cover_the_manifest(tmp_path, no_pipeline):
    manifest, values = cohort(tmp_path, ("S01",))
    out = tmp_path / "out"
    given = scan_results(manifest, values, out)
    del given[("S01", "day2")]
    with pytest.raises(InputError, match="no scan result for S01/day2"):
        E.run_endpoints(manifest, out, scan_results=given)


@pytest.mark.parametrize(
    "content, message",
    [
        ("subject_id,input\nS01,x\n", "lacks column(s) timepoint"),
        ("subject_id,timepoint,input\nS01,baseline,a\nS01,baseline,b\n", "duplicate subject/time point S01/baseline"),
        ("subject_id,timepoint,input\n../..,baseline,a\n", "has no letters or digits"),
        ("subject_id,timepoint,input\n", "manifest has no rows"),
    ],
)
def test_bad_manifest_is_an_input_error(tmp_path, content, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text(content)
    result = runner.invoke(app, ["endpoints", str(manifest), "--out", str(tmp_path / "o")])
    assert result.exit_code == 3, result.output
    assert message in result.output and str(manifest) in result.output
    assert not (tmp_path / "o").exists()  # refused before the batch started


def test_endpoints_on_real_phantom_scans(tmp_path):
    """The real path: ``ctquant endpoints`` quantifies tiny phantom scans with the batch, then re-uses them."""
    from ctquant.synthetic.phantom import make_phantom, uid_from, write_dicom_series

    lines = ["subject_id,timepoint,input"]
    for sid, seed in (("P1", 1), ("P2", 2)):
        for tp, when in (("baseline", "20200401"), ("day14", "20200415")):
            ph = make_phantom((24, 96, 96), (8.0, 3.6, 3.6), timepoint=tp, severity=1.0, seed=seed)
            write_dicom_series(ph, tmp_path / "dicom" / f"{sid}_{tp}", study_uid=uid_from(sid, tp, "study"),
                               series_uid=uid_from(sid, tp, "series"), frame_of_reference_uid=uid_from(sid, "for"),
                               study_date=when, series_description="chest", series_number=1, patient_id=sid,
                               patient_name=f"Test^{sid}", seed=seed)
            lines.append(f"{sid},{tp},dicom/{sid}_{tp}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    result = endpoints_cli(manifest, out)
    assert result.exit_code == 0, result.output
    assert "4 scan(s) to quantify, 0 current result(s) skipped" in result.output
    for sid in ("P1", "P2"):
        for tp in ("baseline", "day14"):
            assert (out / "scans" / sid / tp / "measures.json").is_file()
    table = read_csv(out / "endpoints" / "endpoints.csv")
    assert [(r["endpoint"], r["n_subjects"]) for r in table] == [
        ("bilateral_ggo_reduction", "2"), ("bilateral_infiltration_reduction", "2")]
    subjects = read_csv(out / "endpoints" / "subjects.csv")
    assert {r["days_between"] for r in subjects} == {"14"}
    assert {r["verdict"] for r in subjects} == {"reduction"}  # the phantom's lesions shrink by day 14 (~ −50 %)
    assert all(r["from_result"].startswith(str(out.resolve() / "scans")) for r in subjects)
    assert {s["status"] for s in json.loads((out / "endpoints" / "endpoints.json").read_text())["provenance"]["scans"]} == {"ok"}
    assert_png(out / "endpoints" / "waterfall_bilateral_ggo_reduction.png")
    before = (out / "endpoints" / "endpoints.csv").read_text()

    result = endpoints_cli(manifest, out)  # resumable: nothing to quantify, same answer
    assert result.exit_code == 0, result.output
    assert "0 scan(s) to quantify, 4 current result(s) skipped" in result.output
    assert (out / "endpoints" / "endpoints.csv").read_text() == before


# --------------------------------------------------------------------------------------------------
# Groups, one report folder, manifest checks, privacy (issue 16)


def test_group_by_arm_gives_each_arm_its_table_and_plots(tmp_path, monkeypatch):
    manifest, values = cohort(tmp_path, **HU)
    FakePipeline(values).install(monkeypatch)
    out = tmp_path / "out"
    result = endpoints_cli(manifest, out, "--group-by", "arm")
    assert result.exit_code == 0, result.output
    table = {(r["endpoint"], r["group"]): r for r in read_csv(out / "endpoints" / "endpoints.csv")}
    # GGO: active S01 S03 S05 reduce, S07 not, S09 not evaluable; placebo S02 reduces, S04 S06 S08 not, S10 n.e.
    for group, k, n in (("all", 4, 8), ("arm=active", 3, 4), ("arm=placebo", 1, 4)):
        row = table[("bilateral_ggo_reduction", group)]
        assert (int(row["n_evaluable"]), int(row["n_reduction"]), int(row["n_subjects"])) == (n, k, 5 if group != "all" else 10)
        lo, hi = exact_cp(k, n)
        assert float(row["ci95_low_pct"]) == pytest.approx(100 * lo, abs=0.006)
        assert float(row["ci95_high_pct"]) == pytest.approx(100 * hi, abs=0.006)
    assert "S09: not bilateral at baseline" in table[("bilateral_ggo_reduction", "arm=active")]["not_evaluable"]
    assert "S09" not in table[("bilateral_ggo_reduction", "arm=placebo")]["not_evaluable"]
    doc = json.loads((out / "endpoints" / "endpoints.json").read_text())
    assert doc["group_by"] == "arm" and {g["group_value"] for g in doc["groups"]} == {"active", "placebo"}
    for name in ("bilateral_ggo_reduction", "bilateral_infiltration_reduction"):
        for suffix in ("", "_arm-active", "_arm-placebo"):
            assert_png(out / "endpoints" / f"trajectory_{name}{suffix}.png")
            assert_png(out / "endpoints" / f"waterfall_{name}{suffix}.png")
    assert "arm=placebo" in result.output  # console table too
    bad = endpoints_cli(manifest, tmp_path / "o2", "--group-by", "ward")
    assert bad.exit_code == 3 and "--group-by ward: no such manifest column (extra columns: arm, site)" in bad.output
    assert not (tmp_path / "o2").exists()  # refused before any work


def test_endpoints_and_batch_on_one_folder_write_one_report(tmp_path, monkeypatch):
    from ctquant.outputs.reports import render_cohort_report

    manifest, values = cohort(tmp_path, ("S01", "S02", "S03"), **HU)
    FakePipeline(values).install(monkeypatch)
    out = tmp_path / "out"
    assert runner.invoke(app, ["batch", str(manifest), "--out", str(out), "--method", "hu",
                               "--device", "cpu"]).exit_code == 0
    assert endpoints_cli(manifest, out).exit_code == 0
    assert (out / "endpoints" / "endpoints.csv").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(("endpoints.", "subjects.", "trajectory_"))]
    html = render_cohort_report(out, embed_qc=False)
    assert html.count("(endpoints.csv)") == 1 and html.count("(subjects.csv)") == 1
    # a folder written by an older ctquant (a copy at the top as well): the report still shows one
    shutil.copy(out / "endpoints" / "endpoints.csv", out / "endpoints.csv")
    assert render_cohort_report(out, embed_qc=False).count("(endpoints.csv)") == 1


def test_manifest_time_point_spellings_are_warned_and_unified(tmp_path, monkeypatch, caplog):
    values = {("S1", "baseline"): measures(sid="S1", **HU), ("S1", "day_14"): measures(sid="S1", tp="day_14", **HU)}
    fake = FakePipeline(values).install(monkeypatch)
    for name in ("b", "f"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "IM1").write_text(name)
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject_id,timepoint,input\nS1,baseline,b\nS1,day 14,f\n")
    out = tmp_path / "out"
    result = endpoints_cli(manifest, out)
    assert result.exit_code == 0, result.output
    assert "manifest time point 'day 14' is used by no endpoint (they use baseline, day14); did you mean 'day14'?" \
        in result.output
    assert "manifest time point 'day 14' is written 'day_14' in folders and tables" in result.output
    assert [c["timepoint"] for c in fake.calls] == ["baseline", "day_14"]
    assert [r["timepoint"] for r in read_csv(out / "cohort.csv")] == ["baseline", "day_14"]  # as the folders
    assert (out / "scans" / "S1" / "day_14" / "measures.json").is_file()
    assert {r["reason"] for r in read_csv(out / "endpoints" / "subjects.csv")} == {"no day14 scan in the manifest"}


def test_one_scan_under_two_rows_is_refused_unless_allowed(tmp_path, monkeypatch):
    values = {(s, tp): measures(sid=s, tp=tp, **HU) for s in ("S1", "S2") for tp in ("baseline", "day14")}
    fake = FakePipeline(values).install(monkeypatch)
    for name in ("a", "b", "c", "d"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "IM1").write_text(name)
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject_id,timepoint,input\nS1,baseline,a\nS1,day14,b\nS2,baseline,a\nS2,day14,d\n")
    result = endpoints_cli(manifest, tmp_path / "out")
    assert result.exit_code == 3
    assert "the same input is listed as S1/baseline and S2/baseline" in result.output
    assert fake.calls == [] and not (tmp_path / "out" / "scans").exists()  # refused before any work
    allowed = endpoints_cli(manifest, tmp_path / "out", "--allow-duplicate-scans")
    assert allowed.exit_code == 0 and "(allowed)" in allowed.output
    # different folders, but the results name the same SeriesInstanceUID: found after quantifying
    values[("S2", "day14")]["provenance"]["series_instance_uid"] = values[("S1", "day14")]["provenance"]["series_instance_uid"]
    manifest.write_text("subject_id,timepoint,input\nS1,baseline,a\nS1,day14,b\nS2,baseline,c\nS2,day14,d\n")
    out = tmp_path / "out3"
    result = runner.invoke(app, ["batch", str(manifest), "--out", str(out), "--method", "hu", "--device", "cpu"])
    assert result.exit_code == 3 and "the same SeriesInstanceUID is listed as S1/day14 and S2/day14" in result.output
    assert (out / "cohort.csv").is_file() and not (out / "endpoints").exists()


def test_input_paths_are_only_in_inputs_csv(tmp_path, monkeypatch):
    """Folder names often carry patient names: none of the shareable outputs holds an input path."""
    values = {(s, tp): measures(sid=s, tp=tp, **HU) for s in ("S1", "S2") for tp in ("baseline", "day14")}
    fake = FakePipeline(values, fail={("S2", "day14")}).install(monkeypatch)
    root = tmp_path / "Doe_Jane_1960"
    rows = ["subject_id,timepoint,input"]
    for sid, tp in values:
        (root / f"{sid}{tp}").mkdir(parents=True)
        (root / f"{sid}{tp}" / "IM1").write_text(sid + tp)
        rows.append(f"{sid},{tp},{root / (sid + tp)}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    result = endpoints_cli(manifest, out)
    assert result.exit_code == 8, result.output
    assert len(fake.calls) == 4
    leaks = [p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.suffix in (".csv", ".json", ".html", ".log")
             and "Doe_Jane" in p.read_text(errors="replace")]
    assert leaks == [Path("inputs.csv")]
    assert [r["input"] for r in read_csv(out / "inputs.csv")] == [str(root / f"{s}{tp}") for s, tp in values]
    failure = read_csv(out / "failures.csv")[0]
    assert (failure["subject_id"], failure["manifest_line"], failure["reason"]) == ("S2", "5", "not a CT series")
    assert read_csv(out / "cohort.csv")[0]["output_dir"] == "scans/S1/baseline"
