"""Issue 16, items 8-10: a results folder holds one run; options, config and output checked up front."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import bad_inputs as bi  # noqa: E402
from ctquant.synthetic import phantom as ph  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def two_scans(tmp_path_factory) -> Path:
    """Two tiny series of one subject (baseline and day 14: other series UIDs)."""
    root = tmp_path_factory.mktemp("scans")
    bi.write_series(root / "baseline", tag="baseline")
    bi.write_series(root / "day14", tag="day14", study_uid=ph.uid_from("study", "day14"), study_date="20200415")
    return root


def quantify(*args: str) -> tuple[int, str, str]:
    return bi.run_in_process(["quantify", *args, "--method", "hu", "--device", "cpu"])


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- item 8 --------------------------------------------------------------------------------------------


def test_reused_out_refuses_another_series_then_replaces_it_whole(two_scans: Path, tmp_path: Path):
    out = tmp_path / "X"
    code, _, stderr = quantify(str(two_scans / "baseline"), "--out", str(out), "--seg-format", "both")
    assert code == 0, stderr
    first = json.loads((out / "measures.json").read_text())
    assert "segmentation.dcm" in first["files"] and first["files"] == _listing(out)
    (out / "my-notes.txt").write_text("the user's own file\n")
    before = {name: (out / name).read_bytes() for name in _listing(out)}

    code, _, stderr = quantify(str(two_scans / "day14"), "--out", str(out))
    assert code == 7, stderr
    assert "holds the result of another scan" in stderr and "--force" in stderr
    assert {name: (out / name).read_bytes() for name in _listing(out)} == before  # untouched

    code, _, stderr = quantify(str(two_scans / "day14"), "--out", str(out), "--force")
    assert code == 0, stderr
    second = json.loads((out / "measures.json").read_text())
    assert second["provenance"]["series_instance_uid"] == ph.uid_from("series", "day14")
    assert "segmentation.dcm" not in _listing(out)  # the baseline's SEG is gone
    assert second["files"] == sorted(set(_listing(out)) - {"my-notes.txt"})
    assert (out / "my-notes.txt").exists()  # not ctquant's: kept
    assert not list(tmp_path.glob(".*tmp*"))


def test_another_subject_over_results_is_refused(two_scans: Path, tmp_path: Path):
    out = tmp_path / "X"
    assert quantify(str(two_scans / "baseline"), "--out", str(out), "--subject", "P01")[0] == 0
    code, _, stderr = quantify(str(two_scans / "baseline"), "--out", str(out), "--subject", "P02")
    assert code == 7 and "subject P01 there, P02 now" in stderr
    # the same scan again (a rerun) replaces its own result without --force
    code, _, stderr = quantify(str(two_scans / "baseline"), "--out", str(out), "--subject", "P01",
                               "--seg-format", "dicom-seg")
    assert code == 0, stderr
    names = _listing(out)
    assert "segmentation.dcm" in names and "lungs.nii.gz" not in names  # NIfTI of the older run removed
    assert json.loads((out / "measures.json").read_text())["files"] == names


def test_legacy_results_folder_without_file_list(two_scans: Path, tmp_path: Path):
    """Results written before measures.json listed its files: ctquant's own names are the older run's."""
    out = tmp_path / "X"
    assert quantify(str(two_scans / "baseline"), "--out", str(out), "--seg-format", "both")[0] == 0
    doc = json.loads((out / "measures.json").read_text())
    del doc["files"]
    (out / "measures.json").write_text(json.dumps(doc))
    assert quantify(str(two_scans / "baseline"), "--out", str(out))[0] == 0
    assert "segmentation.dcm" not in _listing(out)


# -- item 9 --------------------------------------------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the scan is read: a refusal must come first."""
    from ctquant.run import scan as pipeline

    def loaded(*args, **kwargs):
        raise AssertionError("the scan was read before the refusal")

    monkeypatch.setattr(pipeline, "load_scan", loaded)


def test_bad_seg_format_refused_before_reading(two_scans: Path, tmp_path: Path, no_loading):
    t0 = time.perf_counter()
    code, _, stderr = quantify(str(two_scans / "baseline"), "--out", str(tmp_path / "o"), "--seg-format", "dicomseg")
    assert code == 3 and "unknown --seg-format 'dicomseg'" in stderr
    assert time.perf_counter() - t0 < 2.0
    assert not (tmp_path / "o").exists()


def test_unwritable_out_refused_before_reading(two_scans: Path, tmp_path: Path, no_loading):
    (tmp_path / "file").write_text("x")
    code, _, stderr = quantify(str(two_scans / "baseline"), "--out", str(tmp_path / "file" / "out"))
    assert code == 7 and "cannot write here" in stderr


def test_full_disk_refused_before_segmenting(two_scans: Path, tmp_path: Path, monkeypatch):
    from ctquant.run import scan as pipeline

    def segmented(*args, **kwargs):
        raise AssertionError("segmentation started on a full disk")

    monkeypatch.setattr(pipeline, "analyse_scan", segmented)
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100 << 30, 100 << 30, 1 << 20))
    code, _, stderr = quantify(str(two_scans / "baseline"), "--out", str(tmp_path / "o"))
    assert code == 7 and "not enough free disk space (1 MB free" in stderr


def test_dicom_seg_of_a_volume_refused_before_segmenting(tmp_path: Path, monkeypatch):
    from ctquant.run import scan as pipeline

    monkeypatch.setattr(pipeline, "analyse_scan", lambda *a, **k: (_ for _ in ()).throw(AssertionError("segmented")))
    volume = bi.phantom_volume(tmp_path / "scan.nii.gz")
    code, _, stderr = quantify(str(volume), "--out", str(tmp_path / "o"), "--seg-format", "dicom-seg")
    assert code == 3 and "DICOM SEG needs a DICOM source" in stderr


# -- item 10 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,key,valid", [
    ("bilateral_min_pct: 1.0\n", "'bilateral_min_pct'", "bilateral_min_pct_of_lung"),
    ("hu_bands:\n  gg0: [-700, -300]\n", "'hu_bands.gg0'", "consolidation, ggo"),
])
def test_unknown_config_keys_refused_with_the_valid_ones(two_scans: Path, tmp_path: Path, no_loading,
                                                         text: str, key: str, valid: str):
    config = tmp_path / "my.yaml"
    config.write_text(text)
    code, _, stderr = quantify(str(two_scans / "baseline"), "--out", str(tmp_path / "o"), "--config", str(config))
    assert code == 3, stderr
    assert f"unknown config key {key}" in stderr and valid in stderr
    assert len(stderr.splitlines()) == 1


def test_known_config_keys_still_accepted(tmp_path: Path):
    from ctquant.config import load_quantify_config

    config = tmp_path / "my.yaml"
    config.write_text("bilateral_min_pct_of_lung: 1.0\nseries_selection:\n  kernel: sharp\n")
    merged = load_quantify_config(config)
    assert merged["bilateral_min_pct_of_lung"] == 1.0 and merged["series_selection"]["kernel"] == "sharp"
    assert merged["series_selection"]["smooth_kernels"]  # the rest of the section is kept


def test_dicom_seg_of_a_series_without_uid_refused_before_segmenting(tmp_path: Path, monkeypatch):
    from ctquant.run import scan as pipeline

    monkeypatch.setattr(pipeline, "analyse_scan", lambda *a, **k: (_ for _ in ()).throw(AssertionError("segmented")))
    for path in bi.write_series(tmp_path / "study"):
        bi.edit(path, lambda ds: setattr(ds, "SeriesInstanceUID", ""))
    code, _, stderr = quantify(str(tmp_path / "study"), "--out", str(tmp_path / "o"), "--seg-format", "both")
    assert code == 3 and "DICOM SEG needs the source's SeriesInstanceUID" in stderr
    assert not (tmp_path / "o").exists()
