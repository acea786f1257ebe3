"""Issue 16, item 16: -h, --debug after the command, one line per warning, flags without <bool>,
and compare rounding one change one way."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import bad_inputs as bi  # noqa: E402
from test_endpoints import measures, write_result  # noqa: E402

from ctquant.trial import endpoints as E  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("args", [["-h"], ["quantify", "-h"], ["batch", "-h"], ["compare", "-h"]])
def test_short_help(args):
    code, stdout, stderr = bi.run_in_process(args)
    assert code == 0, stderr
    assert "Usage:" in stdout and "--help" in stdout


@pytest.mark.parametrize("command", ["quantify", "batch", "report"])
def test_flags_are_not_shown_as_taking_a_bool(command):
    code, stdout, _ = bi.run_in_process([command, "--help"])
    assert code == 0
    assert "<bool>" not in stdout
    assert re.search(r"--debug\s+Show tracebacks", stdout)


def test_debug_after_the_command(tmp_path: Path, monkeypatch):
    import ctquant.run.scan

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(ctquant.run.scan, "load_scan", broken)
    args = ["quantify", str(tmp_path), "--out", str(tmp_path / "out"), "--method", "hu", "--device", "cpu"]
    code, _, stderr = bi.run_in_process([*args, "--debug"])
    assert code == 1 and "Traceback (most recent call last)" in stderr and "second line" in stderr
    code, _, stderr = bi.run_in_process(args)  # and off again in the next invocation
    assert code == 1 and "Traceback" not in stderr


def test_quality_flags_printed_once(tmp_path: Path):
    """The tiny phantom's lungs touch the ends of the stack: each quality flag is one warning line."""
    import json

    bi.write_series(tmp_path / "study")
    code, stdout, stderr = bi.run_in_process(["quantify", str(tmp_path / "study"), "--out", str(tmp_path / "o"),
                                              "--method", "hu", "--device", "cpu"])
    assert code == 0, stderr
    flags = json.loads((tmp_path / "o" / "measures.json").read_text())["flags"]
    assert flags
    lines = (stdout + stderr).splitlines()
    for flag in flags:
        said = [line for line in lines if flag in line]
        assert len(said) == 1 and said[0].startswith("ctquant: warning: "), lines


def test_a_lung_not_found_is_flagged_and_the_table_still_printed(tmp_path: Path):
    """A phantom whose left lung is airless (+40 HU): quantify exits 0, flags left_lung_not_found, keeps the
    right lung whole and prints "–" for the missing lung's mean HU (it stopped with an internal error)."""
    import dataclasses
    import json

    import numpy as np

    from ctquant.synthetic import phantom as ph

    phantom = ph.make_phantom((32, 80, 80), (10.0, 4.4, 4.4), seed=1)
    hu = phantom.hu.copy()
    hu[phantom.lung_labels == 2] = 40
    bi.write_series(tmp_path / "study", dataclasses.replace(phantom, hu=hu))
    code, stdout, stderr = bi.run_in_process(["quantify", str(tmp_path / "study"), "--out", str(tmp_path / "o"),
                                              "--method", "hu", "--device", "cpu"])
    assert code == 0, stderr
    result = json.loads((tmp_path / "o" / "measures.json").read_text())
    assert "left_lung_not_found" in result["flags"]
    assert result["lungs"]["left"]["lung_volume_ml"] == 0 and result["lungs"]["left"]["mean_lung_hu"] is None
    right_truth_ml = np.count_nonzero(phantom.lung_labels == 1) * np.prod(phantom.spacing_mm) / 1000.0
    assert result["lungs"]["right"]["lung_volume_ml"] == pytest.approx(right_truth_ml, rel=0.1)
    assert re.search(r"mean lung HU\s+│\s+-?\d+\s+│\s+–", stdout), stdout


def test_compare_mismatch_warned_once(tmp_path: Path):
    a = write_result(tmp_path / "a", measures())
    b = write_result(tmp_path / "b", measures(tp="day14", right=1.0, left=1.0, method="hu"))
    code, stdout, stderr = bi.run_in_process(["compare", str(a), str(b), "--out", str(tmp_path / "cmp"),
                                              "--allow-mismatch"])
    assert code == 0, stderr
    said = [line for line in (stdout + stderr).splitlines() if "method" in line and "hu" in line
            and "warning" in line.lower()]
    assert len(said) == 1, stdout + stderr


def test_compare_table_and_verdict_round_a_change_alike(tmp_path: Path):
    """GGO 10 → 4.63451 %: −53.6549 %; the table used to say −53.6 (from the stored −53.65) and the
    verdict −53.7 (from the exact value)."""
    a = write_result(tmp_path / "a", measures(right=10.0, left=10.0, both=10.0))
    b = write_result(tmp_path / "b", measures(tp="day14", right=4.63451, left=4.63451, both=4.63451))
    doc = E.run_compare(a, b, tmp_path / "cmp")
    table, _ = E.comparison_table(doc)
    rows = list(zip(*[column._cells for column in table.columns]))
    ggo_both = next(r for r in rows if r[0] == "ggo_pct" and r[1] == "both")
    table_pct = ggo_both[5]
    verdict = next(e for e in doc["endpoints"] if e["definition"]["measure"] == "ggo_pct")
    said = re.search(r"\(([−+]?[\d.]+) %\)", verdict["reason"]).group(1)
    assert table_pct == said, (table_pct, verdict["reason"])
    change = re.search(r": ([−+]?[\d.]+) points", verdict["reason"]).group(1)
    assert ggo_both[4] == change.lstrip("+")
