"""scripts/benchmark_device.py: the label comparison and one CPU run (figures, not timings, asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_device.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_device", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_labels_counts_inside_the_lungs(bench):
    lungs = np.zeros((1, 10, 10), np.uint8)
    lungs[:, :, :5] = 1
    reference = np.zeros_like(lungs)
    reference[:, :4, :5] = 1      # 20 GGO voxels
    reference[:, 4:6, :5] = 2     # 10 consolidation voxels
    other = reference.copy()
    other[:, 0, :5] = 0           # 5 GGO voxels lost
    other[:, 6, :5] = 2           # 5 consolidation voxels gained
    other[:, :, 5:] = 1           # outside the lungs: not counted in the agreement
    out = bench.compare_labels(reference, other, lungs)
    assert out["same_label_pct"] == pytest.approx(80.0)
    assert out["consolidation_volume_diff_pct"] == pytest.approx(50.0)
    assert out["ggo_volume_diff_pct"] == pytest.approx(100.0 * (65 - 20) / 20)


def test_cpu_run_writes_stage_figures(bench, tmp_path):
    out = tmp_path / "device.json"
    assert bench.main(["--shapes", "54x192x192", "--devices", "cpu", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert row["shape_zyx"] == [54, 192, 192] and row["spacing_mm"] == [5.0, 1.8, 1.8]
    assert row["cpu"]["lung_slices"] == 50  # the sample-sized phantom's slices that hold lung
    assert row["cpu"]["lesion_stage_s"] > 0 and set(row["cpu"]["analyse_scan_s"]) == {"lungs", "lesions", "quantify"}
    assert "cuda_vs_cpu" not in row
